//! Warm starts: the state of a freshly booted guest (its agent and control port up, nothing of
//! a run in it yet) saved once with `saveMachineStateToURL`, beside a clone of its root disk at
//! that moment, and restored into every later VM of the same image and size instead of booting
//! (macOS 14 and later; the framework decides with `validateSaveRestoreSupport`).
//!
//! The layout and publication are plain files, tested on any OS:
//!
//! ```text
//! <cache_dir>/warm/<image digest>-<cpus>c-<memory>m-<net|nonet>/
//!   disk.raw        the root disk as it was when the state was saved (cloned per VM)
//!   state.vzvmsave  the framework's saved state
//!   ready           written last: a directory without it is an unfinished save
//! ```

use std::path::{Path, PathBuf};

use crate::VzError;
use crate::image::VzImage;
use crate::spec::VmSpec;

/// One saved state's directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WarmState {
    dir: PathBuf,
}

impl WarmState {
    /// The state for `image` booted as `spec` under `state_cache`. A restore needs a
    /// configuration compatible with the saved one, so every setting that shapes the machine
    /// is in the name; paths (disk clone, share, console) differ between VMs and are not.
    pub fn for_vm(state_cache: &Path, image: &VzImage, spec: &VmSpec) -> Self {
        let memory_mb = spec.memory_bytes / (1024 * 1024);
        let network = if spec.network { "net" } else { "nonet" };
        WarmState {
            dir: state_cache.join(format!(
                "{}-{}c-{memory_mb}m-{network}",
                image.digest, spec.cpus
            )),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn disk(&self) -> PathBuf {
        self.dir.join("disk.raw")
    }

    pub fn state(&self) -> PathBuf {
        self.dir.join("state.vzvmsave")
    }

    fn ready_marker(&self) -> PathBuf {
        self.dir.join("ready")
    }

    /// Whether a complete state is saved.
    pub fn is_ready(&self) -> bool {
        self.ready_marker().is_file() && self.disk().is_file() && self.state().is_file()
    }

    /// Where a save in progress writes its disk and state, to be published by
    /// [`WarmState::publish`]. Clears what an earlier unfinished save left.
    pub fn begin(&self) -> Result<(PathBuf, PathBuf), VzError> {
        self.discard()?;
        std::fs::create_dir_all(&self.dir).map_err(|source| VzError::CreateDir {
            path: self.dir.clone(),
            source,
        })?;
        Ok((
            self.dir.join(".disk.raw.partial"),
            self.dir.join(".state.vzvmsave.partial"),
        ))
    }

    /// Moves a finished save into place and marks it ready.
    pub fn publish(&self, disk: &Path, state: &Path) -> Result<(), VzError> {
        for (from, to) in [(disk, self.disk()), (state, self.state())] {
            std::fs::rename(from, &to).map_err(|source| VzError::WriteFile { path: to, source })?;
        }
        let marker = self.ready_marker();
        std::fs::write(&marker, b"").map_err(|source| VzError::WriteFile {
            path: marker,
            source,
        })
    }

    /// Removes the state (a restore that failed: the next VM saves a new one).
    pub fn discard(&self) -> Result<(), VzError> {
        match std::fs::remove_dir_all(&self.dir) {
            Ok(()) => Ok(()),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(VzError::Remove {
                path: self.dir.clone(),
                source,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{HostLimits, RunFiles};

    fn spec(cpus: u64, network: bool) -> (VzImage, VmSpec) {
        let image = VzImage {
            name: "debian-bookworm-arm64".to_owned(),
            digest: "0123abcd".to_owned(),
            vmlinux: PathBuf::from("/images/Image"),
            initrd: PathBuf::from("/images/initrd"),
            disk: PathBuf::from("/images/disk.qcow2"),
            kernel_cmdline: "console=ttyAMA0".to_owned(),
            arch: "aarch64".to_owned(),
        };
        let mut config = crate::VzConfig::new("ns");
        config.cpus = cpus;
        config.network = network;
        let run = RunFiles {
            root_disk: PathBuf::from("/run/root.raw"),
            share: PathBuf::from("/run/share"),
            console_log: PathBuf::from("/run/console.log"),
        };
        let limits = HostLimits {
            min_cpus: 1,
            max_cpus: 8,
            min_memory_bytes: 1 << 20,
            max_memory_bytes: 1 << 40,
        };
        let spec = VmSpec::new(&config, &image, &run, &limits).expect("spec");
        (image, spec)
    }

    #[test]
    fn states_are_kept_apart_by_image_and_machine_shape() {
        let cache = Path::new("/cache/warm");
        let (image, two) = spec(2, true);
        let state = WarmState::for_vm(cache, &image, &two);
        assert_eq!(state.dir(), Path::new("/cache/warm/0123abcd-2c-2048m-net"));
        let (_, four) = spec(4, true);
        let (_, offline) = spec(2, false);
        assert_ne!(WarmState::for_vm(cache, &image, &four), state);
        assert_ne!(WarmState::for_vm(cache, &image, &offline), state);
        // Another namespace's paths do not make another state.
        let mut elsewhere = two.clone();
        elsewhere.console_log = PathBuf::from("/other/console.log");
        assert_eq!(WarmState::for_vm(cache, &image, &elsewhere), state);
    }

    #[test]
    fn a_state_is_ready_only_once_published_and_discard_removes_it() {
        let directory = tempfile::tempdir().expect("tempdir");
        let (image, spec) = spec(2, true);
        let state = WarmState::for_vm(directory.path(), &image, &spec);
        assert!(!state.is_ready());
        let (disk, saved) = state.begin().expect("begin");
        std::fs::write(&disk, b"disk").expect("write");
        std::fs::write(&saved, b"state").expect("write");
        assert!(!state.is_ready(), "an unfinished save is not ready");
        state.publish(&disk, &saved).expect("publish");
        assert!(state.is_ready());
        assert_eq!(std::fs::read(state.disk()).expect("disk"), b"disk");
        // A new save starts from nothing.
        state.begin().expect("begin again");
        assert!(!state.is_ready());
        state.discard().expect("discard");
        assert!(!state.dir().exists());
        state.discard().expect("discard twice");
    }
}
