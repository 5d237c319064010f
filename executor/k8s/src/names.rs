//! Kubernetes names and label values from ci-exec namespaces and ids.

/// Kubernetes' longest label value, and the longest name that is also a valid hostname.
const MAX: usize = 63;

/// `raw` as a DNS-1123 label (lower-case alphanumerics and `-`, starting and ending with an
/// alphanumeric, at most 63 characters), which is a valid pod name, PVC name and label value.
/// When `raw` had to change, a hash of it is appended so two ids never share a name.
pub fn kube_name(raw: &str) -> String {
    let mapped: String = raw
        .chars()
        .map(|c| match c {
            'a'..='z' | '0'..='9' | '-' => c,
            'A'..='Z' => c.to_ascii_lowercase(),
            _ => '-',
        })
        .collect();
    let trimmed = mapped.trim_matches('-');
    if trimmed == raw && !raw.is_empty() && raw.len() <= MAX {
        return raw.to_owned();
    }
    let hash = format!("{:016x}", fnv1a(raw.as_bytes()));
    let keep = MAX - hash.len() - 1;
    let head: String = trimmed.chars().take(keep).collect();
    let head = head.trim_end_matches('-');
    if head.is_empty() {
        format!("x-{hash}")
    } else {
        format!("{head}-{hash}")
    }
}

/// FNV-1a: a stable hash (std's `DefaultHasher` may change between Rust releases, and a
/// name must stay the same for the next run to find and delete it).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::kube_name;

    #[test]
    fn names_are_valid_and_distinct() {
        for (raw, want) in [
            ("ns-task", Some("ns-task")),
            ("ns-Task", None),
            ("ns-a_b", None),
            ("-x-", None),
            ("", None),
        ] {
            let name = kube_name(raw);
            assert!(name.len() <= 63, "{name}");
            assert!(
                name.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'),
                "{name}"
            );
            assert!(!name.starts_with('-') && !name.ends_with('-'), "{name}");
            if let Some(want) = want {
                assert_eq!(name, want);
            }
        }
        assert_ne!(kube_name("ns-a_b"), kube_name("ns-a.b"));
        assert_eq!(kube_name(&"a".repeat(100)).len(), 63);
    }
}
