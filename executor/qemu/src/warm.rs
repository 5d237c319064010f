//! Warm start: after the first cold boot of an image, the booted VM's state is saved, and later
//! VMs start from it (`-incoming`) in a fraction of the boot time.
//!
//! A saved state is only valid with the disk it was saved with, so the VM that makes it boots
//! with its own overlay (`disk.qcow2` beside `state`), which is never written again: later VMs
//! put their fresh overlay over it. Its memory is a file (`ram`, see [`RamFile`]) that the
//! saving VM maps shared and later VMs map private, so `state` holds only device state and a
//! start reads no memory up front. The state is saved before the 9p share is mounted (a
//! mounted 9p export blocks migration) and the guest clock is set after every start. Its key
//! holds everything that must match: the image digest, the machine's size and accelerator,
//! the QEMU binary, and this module's format version.
//!
//! ```text
//! <cache_dir>/warm/<key>/{disk.qcow2, ram, state, image, control}
//! ```

use std::path::{Path, PathBuf};
use std::time::Duration;

use sha2::{Digest, Sha256};

use crate::QemuError;
use crate::machine::{Machine, MachineSpec, RamFile};
use crate::run_dir::RunDir;

/// Bumped when the device layout of [`MachineSpec::arguments`] or what a saved guest holds
/// changes.
const FORMAT_VERSION: u32 = 9;

/// The directory of the warm state for `spec`.
pub fn state_dir(cache_dir: &Path, spec: &MachineSpec) -> PathBuf {
    let binary = crate::accel::find_on_path(&spec.qemu_binary)
        .unwrap_or_else(|| PathBuf::from(&spec.qemu_binary));
    let modified = std::fs::metadata(&binary)
        .and_then(|metadata| metadata.modified())
        .ok()
        .and_then(|time| time.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|elapsed| elapsed.as_secs())
        .unwrap_or(0);
    let mut hasher = Sha256::new();
    for part in [
        format!("format={FORMAT_VERSION}"),
        format!("digest={}", spec.image.digest),
        format!("cmdline={}", spec.image.kernel_cmdline),
        format!("accel={}", spec.accel),
        format!("memory={}", spec.memory_mb),
        format!("cpus={}", spec.cpus),
        format!("network={}", spec.network),
        format!("qemu={}@{modified}", binary.display()),
    ] {
        hasher.update(part.as_bytes());
        hasher.update(b"\n");
    }
    let key = hex::encode(hasher.finalize());
    cache_dir.join("warm").join(&key[..24])
}

/// Whether the guest saved in `dir` serves the control port (it greeted the VM that saved
/// it; a restored guest does not greet again).
pub fn control_version(dir: &Path) -> u32 {
    match std::fs::read_to_string(dir.join("control")) {
        Ok(text) => text.trim().parse().unwrap_or(1),
        Err(_) => 0,
    }
}

/// Whether `dir` holds a complete saved state.
pub fn is_ready(dir: &Path) -> bool {
    ["state", "ram", "disk.qcow2"]
        .iter()
        .all(|file| dir.join(file).is_file())
}

/// Boots `spec` cold in `scratch` (its own sockets and share), saves its state into
/// `final_dir`, and stops it. Publishing is atomic: a half-made state is never used.
pub async fn create(
    spec: &MachineSpec,
    scratch: &RunDir,
    final_dir: &Path,
    boot_timeout: Duration,
) -> Result<(), QemuError> {
    let parent = final_dir.parent().unwrap_or(final_dir);
    std::fs::create_dir_all(parent).map_err(|source| QemuError::CreateDir {
        path: parent.to_owned(),
        source,
    })?;
    static SERIAL: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let building = parent.join(format!(
        ".building-{}-{}-{}",
        std::process::id(),
        SERIAL.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        final_dir
            .file_name()
            .map(|name| name.to_string_lossy().into_owned())
            .unwrap_or_default()
    ));
    let _ = std::fs::remove_dir_all(&building);
    for directory in [building.clone(), scratch.share()] {
        std::fs::create_dir_all(&directory).map_err(|source| QemuError::CreateDir {
            path: directory.clone(),
            source,
        })?;
    }
    let cold = MachineSpec {
        run_dir: scratch.clone(),
        overlay: building.join("disk.qcow2"),
        backing: spec.image.disk.clone(),
        incoming: None,
        ram_file: Some(RamFile {
            path: building.join("ram"),
            shared: true,
        }),
        incoming_control_version: 0,
        // The saved VM has an empty placeholder as its second disk, never mounted: a VM
        // started from the state may be given a repository's disk there instead.
        state_disk: building.join("state.qcow2"),
        repository_state: None,
        ..spec.clone()
    };
    let result = async {
        let machine = Machine::start(&cold, boot_timeout).await?;
        // podman's first run in a guest makes its database and storage state (measured: ~8 s
        // under TCG on a busy host); done here, every VM started from the state has it.
        if let Err(error) = machine
            .sh(
                "command -v podman >/dev/null || exit 0; podman --network-backend=cni info >/dev/null",
                Duration::from_secs(120),
            )
            .await
        {
            tracing::debug!(%error, "podman warm-up before saving the state");
        }
        // The default test image, prepared for crun (`oci.rs`): every VM started from the state
        // runs its tasks without podman's own start.
        match machine
            .sh(
                &crate::oci::prepare_script(crate::driver::DEFAULT_TEST_IMAGE),
                Duration::from_secs(180),
            )
            .await
        {
            Ok(status) if status.shell_code() == 0 => {
                match crate::oci::Template::parse(crate::driver::DEFAULT_TEST_IMAGE, &status.stdout) {
                    Some(template) => {
                        if let Err(error) = template.save(&building) {
                            tracing::debug!(%error, "keeping the crun template");
                        }
                    }
                    None => tracing::debug!("the crun template's output did not parse"),
                }
            }
            Ok(status) => tracing::debug!(
                stderr = %String::from_utf8_lossy(&status.stderr),
                "no crun template: podman run it is"
            ),
            Err(error) => tracing::debug!(%error, "no crun template"),
        }
        // After podman's last change to its images: every VM restored from the state starts a
        // fresh repository's run with this mark.
        machine
            .sh_ok(&crate::repository::mark_script(), Duration::from_secs(60))
            .await?;
        // The NIC is configured once, here, instead of in every VM started from the state.
        if cold.network {
            machine
                .sh_ok(crate::machine::NETWORK_SETUP, Duration::from_secs(60))
                .await?;
        }
        if machine.serves_control() {
            let version = machine.control_version().to_string();
            std::fs::write(building.join("control"), version).map_err(|source| {
                QemuError::WriteFile {
                    path: building.join("control"),
                    source,
                }
            })?;
        }
        let saved = machine.save_state(&building.join("state")).await;
        machine.shutdown().await;
        saved
    }
    .await;
    let _ = std::fs::remove_dir_all(scratch.path());
    if let Err(error) = result {
        let _ = std::fs::remove_dir_all(&building);
        return Err(error);
    }
    let image = format!(
        "{}\n{}\n{FORMAT_VERSION}\n",
        spec.image.name, spec.image.digest
    );
    let _ = std::fs::write(building.join("image"), image);
    match std::fs::rename(&building, final_dir) {
        Ok(()) => {
            // A pinned older build (`image=<dir>`, e.g. an A/B benchmark) must not evict the
            // current build's state.
            if spec.image.current {
                prune_superseded(parent, &spec.image.name, &spec.image.digest, FORMAT_VERSION);
            }
            Ok(())
        }
        // Another process published the same state first: use theirs.
        Err(_) if is_ready(final_dir) => {
            let _ = std::fs::remove_dir_all(&building);
            Ok(())
        }
        Err(source) => {
            let _ = std::fs::remove_dir_all(&building);
            Err(QemuError::WriteFile {
                path: final_dir.to_owned(),
                source,
            })
        }
    }
}

/// Removes the saved states of image `name` made from another digest or in another format: a
/// rebuilt image or a newer driver makes them useless, and each holds the guest's memory
/// (~100–300 MB).
pub fn prune_superseded(warm_root: &Path, name: &str, digest: &str, format: u32) {
    let Ok(entries) = std::fs::read_dir(warm_root) else {
        return;
    };
    for entry in entries.filter_map(Result::ok) {
        let path = entry.path();
        let Ok(image) = std::fs::read_to_string(path.join("image")) else {
            continue;
        };
        let mut lines = image.lines();
        let format = format.to_string();
        if lines.next() == Some(name)
            && (lines.next() != Some(digest) || lines.next() != Some(format.as_str()))
        {
            tracing::debug!(state = %path.display(), "removing a warm state of an older image");
            let _ = std::fs::remove_dir_all(&path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_states_of_the_same_image_with_another_digest_or_format_are_pruned() {
        let root = tempfile::tempdir().expect("tempdir");
        for (directory, image) in [
            ("old", "debian-bookworm\nd1\n3\n"),
            ("old-format", "debian-bookworm\nd2\n"),
            ("current", "debian-bookworm\nd2\n3\n"),
            ("other", "alpine\nd0\n1\n"),
        ] {
            std::fs::create_dir_all(root.path().join(directory)).expect("mkdir");
            std::fs::write(root.path().join(directory).join("image"), image).expect("write");
        }
        std::fs::create_dir_all(root.path().join("unknown")).expect("mkdir");
        prune_superseded(root.path(), "debian-bookworm", "d2", 3);
        assert!(!root.path().join("old").exists());
        assert!(!root.path().join("old-format").exists());
        for kept in ["current", "other", "unknown"] {
            assert!(root.path().join(kept).exists(), "{kept}");
        }
    }
}
