use sha2::{Digest, Sha256};

/// Bumped whenever what a result holds, or how its key is computed, changes: old results are
/// then simply never matched again.
pub const FORMAT_VERSION: u32 = 2;

/// Everything a result depends on. Secrets are deliberately absent: they are injected into the
/// job but never hashed, stored or printed.
#[derive(Debug, Clone, Default)]
pub struct KeyInputs {
    /// The git tree id of the committed HEAD (not the commit: a rebase that keeps the tree keeps
    /// the result).
    pub tree: String,
    pub mkfile: Vec<u8>,
    /// Declared input variables as (name, value); order does not matter.
    pub env: Vec<(String, String)>,
    /// The driver's base environment (the guest image digest), if it has one.
    pub environment_digest: Option<String>,
    /// The sha256 of the `mk` ci-exec brings into the job (uploaded, or on the host), when
    /// the base OS does not carry its own.
    pub tools: Option<String>,
    pub driver: String,
    pub salt: Option<String>,
    /// The target run in place of `test` (a scheduled one); `None` for `test`, whose keys
    /// predate targets and stay as they were.
    pub target: Option<String>,
}

impl KeyInputs {
    /// The result key: lowercase hex sha256 over every input, each length-prefixed so that no
    /// two different input sets can produce the same byte stream.
    pub fn key(&self) -> String {
        let mut hasher = Sha256::new();
        let mut field = |name: &str, value: &[u8]| {
            hasher.update((name.len() as u64).to_le_bytes());
            hasher.update(name.as_bytes());
            hasher.update((value.len() as u64).to_le_bytes());
            hasher.update(value);
        };
        field("format", &FORMAT_VERSION.to_le_bytes());
        field("tree", self.tree.as_bytes());
        field("mkfile", &self.mkfile);
        let mut env = self.env.clone();
        env.sort();
        for (name, value) in &env {
            field("env-name", name.as_bytes());
            field("env-value", value.as_bytes());
        }
        field(
            "environment",
            self.environment_digest.as_deref().unwrap_or("").as_bytes(),
        );
        field("tools", self.tools.as_deref().unwrap_or("").as_bytes());
        field("driver", self.driver.as_bytes());
        field("salt", self.salt.as_deref().unwrap_or("").as_bytes());
        if let Some(target) = &self.target {
            field("target", target.as_bytes());
        }
        hex::encode(hasher.finalize())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> KeyInputs {
        KeyInputs {
            tree: "4b825dc642cb6eb9a060e54bf8d69288fbee4904".into(),
            mkfile: b"test:V:\n\techo ok\n".to_vec(),
            env: vec![("A".into(), "1".into()), ("B".into(), "2".into())],
            environment_digest: Some("sha256:abc".into()),
            tools: None,
            driver: "qemu".into(),
            salt: None,
            target: None,
        }
    }

    #[test]
    fn key_is_stable_and_ignores_env_order() {
        let mut swapped = base();
        swapped.env.reverse();
        assert_eq!(base().key(), swapped.key());
        assert_eq!(base().key().len(), 64);
    }

    #[test]
    fn every_input_changes_the_key() {
        let key = base().key();
        type Change = Box<dyn Fn(&mut KeyInputs)>;
        let changes: Vec<Change> = vec![
            Box::new(|k| k.tree = "0".repeat(40)),
            Box::new(|k| k.mkfile.push(b'\n')),
            Box::new(|k| k.env[0].1 = "other".into()),
            Box::new(|k| k.env.push(("C".into(), String::new()))),
            Box::new(|k| k.environment_digest = None),
            Box::new(|k| k.environment_digest = Some("sha256:abd".into())),
            Box::new(|k| k.tools = Some("0".repeat(64))),
            Box::new(|k| k.driver = "native".into()),
            Box::new(|k| k.salt = Some("x".into())),
            Box::new(|k| k.target = Some("nightly".into())),
        ];
        for change in changes {
            let mut inputs = base();
            change(&mut inputs);
            assert_ne!(inputs.key(), key, "{inputs:?}");
        }
    }

    #[test]
    fn fields_cannot_bleed_into_each_other() {
        let mut a = base();
        a.env = vec![("AB".into(), "C".into())];
        let mut b = base();
        b.env = vec![("A".into(), "BC".into())];
        assert_ne!(a.key(), b.key());
    }
}
