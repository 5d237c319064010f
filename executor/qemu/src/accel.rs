//! Choosing the accelerator: probe that a guest actually runs, never trust that `/dev/kvm`
//! exists.
//!
//! Measured on the machines this was written on: `/dev/kvm` is a paravirtual KVM (`kvm_pvm`)
//! that cannot run a stock kernel — a guest hangs in firmware, then dies with an emulation
//! failure. So `auto` first makes a zero-cost check (`kvm_intel` or `kvm_amd` loaded,
//! `/dev/kvm` openable), then boots a 64 KiB firmware blob that counts down a loop and exits
//! through `isa-debug-exit`, with a 2 s limit. The verdict is cached per boot of the host and
//! per QEMU binary; a fallback to TCG is announced once with a warning.

use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::QemuError;

/// An accelerator QEMU can use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    Kvm,
    Hvf,
    Tcg,
}

impl Accel {
    pub fn as_str(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Hvf => "hvf",
            Accel::Tcg => "tcg",
        }
    }
}

impl fmt::Display for Accel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The `accel=` parameter: probe, or use what the user said.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccelChoice {
    Auto,
    Fixed(Accel),
}

impl FromStr for AccelChoice {
    type Err = QemuError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "" | "auto" => Ok(AccelChoice::Auto),
            "kvm" => Ok(AccelChoice::Fixed(Accel::Kvm)),
            "hvf" => Ok(AccelChoice::Fixed(Accel::Hvf)),
            "tcg" => Ok(AccelChoice::Fixed(Accel::Tcg)),
            other => Err(QemuError::InvalidParameter {
                parameter: "accel".to_owned(),
                reason: format!("`{other}` is not one of `auto`, `kvm`, `hvf`, `tcg`"),
            }),
        }
    }
}

/// Which accelerator will be used, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccelVerdict {
    pub accel: Accel,
    pub reason: String,
}

/// The value `isa-debug-exit` turns the blob's `out 0xf4, 0x2a` into: `(0x2a << 1) | 1`.
const PROBE_EXIT_CODE: i32 = 85;
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// A 64 KiB x86 firmware image: at the reset vector (offset 0xFFF0) it counts `cx` down
/// from 0xFFFF, writes 0x2a to port 0xF4 (`isa-debug-exit`) and halts.
pub fn probe_firmware() -> Vec<u8> {
    let mut blob = vec![0u8; 64 * 1024];
    let code: [u8; 12] = [
        0xB9, 0xFF, 0xFF, // mov cx, 0xffff
        0xE2, 0xFE, // loop $
        0xB0, 0x2A, // mov al, 0x2a
        0xE6, 0xF4, // out 0xf4, al
        0xF4, // hlt
        0xEB, 0xFD, // jmp to hlt
    ];
    blob[0xFFF0..0xFFF0 + code.len()].copy_from_slice(&code);
    blob
}

/// The zero-cost check for KVM: a hardware KVM module is loaded and `/dev/kvm` opens.
/// `Err` carries the reason KVM is out.
pub fn kvm_precheck() -> Result<(), String> {
    let module = ["kvm_intel", "kvm_amd"]
        .into_iter()
        .find(|module| Path::new("/sys/module").join(module).exists());
    let Some(module) = module else {
        let other: Vec<String> = std::fs::read_dir("/sys/module")
            .map(|entries| {
                entries
                    .filter_map(Result::ok)
                    .map(|entry| entry.file_name().to_string_lossy().into_owned())
                    .filter(|name| name.starts_with("kvm_"))
                    .collect()
            })
            .unwrap_or_default();
        return Err(if other.is_empty() {
            "neither `kvm_intel` nor `kvm_amd` is loaded".to_owned()
        } else {
            format!(
                "neither `kvm_intel` nor `kvm_amd` is loaded (found `{}`, which cannot run a stock guest)",
                other.join("`, `")
            )
        });
    };
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .map_err(|error| format!("`{module}` is loaded but `/dev/kvm` does not open: {error}"))?;
    Ok(())
}

/// Boots the probe firmware under `accel` and reports whether it exited as it should within
/// the probe's time limit. `Err` carries what happened instead.
pub async fn probe_guest(
    qemu_binary: &str,
    accel: Accel,
    scratch: &Path,
) -> Result<Duration, String> {
    let firmware = scratch.join(format!("accel-probe-{}.bin", std::process::id()));
    std::fs::write(&firmware, probe_firmware())
        .map_err(|error| format!("cannot write `{}`: {error}", firmware.display()))?;
    let started = std::time::Instant::now();
    let child = tokio::process::Command::new(qemu_binary)
        .args(["-accel", accel.as_str(), "-machine", "pc", "-m", "16"])
        .arg("-bios")
        .arg(&firmware)
        .args([
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-serial",
            "none",
            "-monitor",
            "none",
            "-device",
            "isa-debug-exit,iobase=0xf4,iosize=0x04",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn();
    let result = match child {
        Err(error) => Err(format!("cannot run `{qemu_binary}`: {error}")),
        Ok(child) => match tokio::time::timeout(PROBE_TIMEOUT, child.wait_with_output()).await {
            Err(_) => Err(format!(
                "a test guest under `{accel}` did not finish within {PROBE_TIMEOUT:?}"
            )),
            Ok(Err(error)) => Err(format!("waiting for `{qemu_binary}` failed: {error}")),
            Ok(Ok(output)) if output.status.code() == Some(PROBE_EXIT_CODE) => {
                Ok(started.elapsed())
            }
            Ok(Ok(output)) => Err(format!(
                "a test guest under `{accel}` exited with {}: {}",
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            )),
        },
    };
    let _ = std::fs::remove_file(&firmware);
    result
}

/// What the cached verdict is valid for: this boot of the host and this QEMU binary.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
struct VerdictKey {
    boot_id: String,
    qemu_binary: String,
    qemu_modified: u64,
}

#[derive(Debug, Serialize, Deserialize)]
struct CachedVerdict {
    key: VerdictKey,
    verdict: AccelVerdict,
}

fn verdict_key(qemu_binary: &str) -> VerdictKey {
    let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|text| text.trim().to_owned())
        .unwrap_or_default();
    let resolved = find_on_path(qemu_binary).unwrap_or_else(|| PathBuf::from(qemu_binary));
    let qemu_modified = std::fs::metadata(&resolved)
        .and_then(|metadata| metadata.modified())
        .ok()
        .and_then(|time| time.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|elapsed| elapsed.as_secs())
        .unwrap_or(0);
    VerdictKey {
        boot_id,
        qemu_binary: resolved.display().to_string(),
        qemu_modified,
    }
}

/// `program` as found on `PATH` (or itself, when it has a slash and exists).
pub fn find_on_path(program: &str) -> Option<PathBuf> {
    if program.contains('/') {
        let path = PathBuf::from(program);
        return path.exists().then_some(path);
    }
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|directory| directory.join(program))
        .find(|candidate| candidate.is_file())
}

/// Picks the accelerator for `choice`. With `Auto`, probes (or reads the verdict cached in
/// `cache_dir`) and warns once when it falls back to TCG.
pub async fn choose(choice: AccelChoice, qemu_binary: &str, cache_dir: &Path) -> AccelVerdict {
    let hardware = if cfg!(target_os = "macos") {
        Accel::Hvf
    } else {
        Accel::Kvm
    };
    match choice {
        AccelChoice::Fixed(accel) => AccelVerdict {
            accel,
            reason: format!("`accel={accel}` was given"),
        },
        AccelChoice::Auto => {
            let cache_file = cache_dir.join("accel-verdict.json");
            let key = verdict_key(qemu_binary);
            if let Ok(text) = std::fs::read_to_string(&cache_file)
                && let Ok(cached) = serde_json::from_str::<CachedVerdict>(&text)
                && cached.key == key
            {
                return cached.verdict;
            }
            let verdict = probe(hardware, qemu_binary, cache_dir).await;
            if verdict.accel == Accel::Tcg {
                tracing::warn!(
                    "using TCG (software emulation), VMs will be slow: {}",
                    verdict.reason
                );
            }
            let cached = CachedVerdict {
                key,
                verdict: verdict.clone(),
            };
            if std::fs::create_dir_all(cache_dir).is_ok()
                && let Ok(text) = serde_json::to_string_pretty(&cached)
                && let Err(error) = std::fs::write(&cache_file, text)
            {
                tracing::debug!(%error, path = %cache_file.display(), "cannot cache the accelerator verdict");
            }
            verdict
        }
    }
}

async fn probe(hardware: Accel, qemu_binary: &str, scratch: &Path) -> AccelVerdict {
    if hardware == Accel::Kvm
        && let Err(reason) = kvm_precheck()
    {
        return AccelVerdict {
            accel: Accel::Tcg,
            reason: format!("`kvm` unusable: {reason}"),
        };
    }
    let scratch = if std::fs::create_dir_all(scratch).is_ok() {
        scratch.to_owned()
    } else {
        std::env::temp_dir()
    };
    match probe_guest(qemu_binary, hardware, &scratch).await {
        Ok(took) => AccelVerdict {
            accel: hardware,
            reason: format!("a test guest ran under `{hardware}` in {took:?}"),
        },
        Err(reason) => AccelVerdict {
            accel: Accel::Tcg,
            reason: format!("`{hardware}` unusable: {reason}"),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn firmware_has_the_exit_code_at_the_reset_vector() {
        let blob = probe_firmware();
        assert_eq!(blob.len(), 65536);
        assert_eq!(&blob[0xFFF0..0xFFF3], &[0xB9, 0xFF, 0xFF]);
        assert_eq!(blob[0xFFF6], 0x2A);
        assert_eq!((0x2A << 1) | 1, PROBE_EXIT_CODE);
    }

    #[test]
    fn accel_parameter_parses() {
        let table = [
            ("auto", AccelChoice::Auto),
            ("", AccelChoice::Auto),
            ("kvm", AccelChoice::Fixed(Accel::Kvm)),
            ("hvf", AccelChoice::Fixed(Accel::Hvf)),
            ("tcg", AccelChoice::Fixed(Accel::Tcg)),
        ];
        for (text, expected) in table {
            assert_eq!(text.parse::<AccelChoice>().expect(text), expected);
        }
        let error = "xen".parse::<AccelChoice>().expect_err("xen");
        assert!(error.to_string().contains("`accel`"), "{error}");
    }

    #[tokio::test]
    async fn fixed_accel_is_used_without_probing() {
        let verdict = choose(
            AccelChoice::Fixed(Accel::Tcg),
            "/nonexistent/qemu",
            Path::new("/nonexistent"),
        )
        .await;
        assert_eq!(verdict.accel, Accel::Tcg);
        assert!(verdict.reason.contains("accel=tcg"));
    }

    #[tokio::test]
    async fn a_missing_qemu_fails_the_probe_with_its_name() {
        let scratch = tempfile::tempdir().expect("tempdir");
        let error = probe_guest(
            "/nonexistent/qemu-system-x86_64",
            Accel::Tcg,
            scratch.path(),
        )
        .await
        .expect_err("no such binary");
        assert!(error.contains("/nonexistent/qemu-system-x86_64"), "{error}");
    }
}
