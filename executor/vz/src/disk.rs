//! The root disk of a vz VM. The framework attaches raw images only, and guest images ship a
//! qcow2: [`RawDisks`] converts each image's disk once (`qemu-img convert -O raw`) into a cache
//! keyed by the image digest, and each VM then boots its own copy-on-write clone of it
//! ([`CloneFile`]: `clonefile(2)` on APFS, so a VM's disk costs no space until written).
//!
//! A conversion is written under a temporary name, checked against the qcow2's virtual size,
//! synced and then renamed into place, so the cache only ever holds whole disks: a killed
//! conversion leaves a `.partial` file, which is never used and is removed once stale.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, SystemTime};

use crate::VzError;
use crate::image::VzImage;

/// A `.partial` conversion older than this was left by a killed run: nobody will finish it.
const STALE_PARTIAL: Duration = Duration::from_secs(3600);

/// How a file was duplicated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Duplicated {
    /// A copy-on-write clone: instant, and no space used until written.
    Clone,
    /// A byte copy (the filesystem cannot clone, or source and target are on two volumes).
    Copy,
}

/// Duplicates a disk image for one VM. A trait so the driver's disk preparation runs against a
/// recording double in tests, and against the real system call on each OS.
pub trait CloneFile: Send + Sync + std::fmt::Debug {
    /// Makes `to` (which must not exist) a duplicate of `from`.
    fn clone_file(&self, from: &Path, to: &Path) -> std::io::Result<Duplicated>;
}

/// The system's cheapest duplicate: `clonefile(2)` on macOS, falling back to a copy where the
/// volume cannot clone; elsewhere `std::fs::copy`, which on Linux reflinks through
/// `copy_file_range` where the filesystem can (btrfs, XFS) and copies otherwise.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClone;

impl CloneFile for SystemClone {
    fn clone_file(&self, from: &Path, to: &Path) -> std::io::Result<Duplicated> {
        #[cfg(target_os = "macos")]
        {
            match clonefile(from, to) {
                Ok(()) => return Ok(Duplicated::Clone),
                // Not APFS, or the two paths are on different volumes.
                Err(error)
                    if matches!(
                        error.raw_os_error(),
                        Some(libc::ENOTSUP) | Some(libc::EXDEV)
                    ) =>
                {
                    tracing::warn!(
                        from = %from.display(),
                        to = %to.display(),
                        "cannot clone the root disk ({error}); copying it instead"
                    );
                }
                Err(error) => return Err(error),
            }
        }
        std::fs::copy(from, to).map(|_| Duplicated::Copy)
    }
}

/// `clonefile(src, dst, 0)`. No crate wraps this one call (`reflink-copy` would pull in a
/// Windows dependency tree for it), so it is called through `libc` directly.
#[cfg(target_os = "macos")]
fn clonefile(from: &Path, to: &Path) -> std::io::Result<()> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let c_path = |path: &Path| {
        CString::new(path.as_os_str().as_bytes())
            .map_err(|error| std::io::Error::new(std::io::ErrorKind::InvalidInput, error))
    };
    let (source, target) = (c_path(from)?, c_path(to)?);
    // SAFETY: both pointers are NUL-terminated strings that outlive the call; flags 0.
    let status = unsafe { libc::clonefile(source.as_ptr(), target.as_ptr(), 0) };
    if status == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Makes `to` this VM's duplicate of the cached raw disk `from`, replacing a leftover.
pub fn clone_root_disk(
    cloner: &dyn CloneFile,
    from: &Path,
    to: &Path,
) -> Result<Duplicated, VzError> {
    match std::fs::remove_file(to) {
        Ok(()) => {}
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(VzError::Remove {
                path: to.to_owned(),
                source,
            });
        }
    }
    cloner
        .clone_file(from, to)
        .map_err(|source| VzError::Clone {
            from: from.to_owned(),
            to: to.to_owned(),
            source,
        })
}

/// The cache of raw root disks, one per image digest.
#[derive(Debug, Clone)]
pub struct RawDisks {
    dir: PathBuf,
    qemu_img: String,
}

impl RawDisks {
    pub fn new(dir: PathBuf) -> Self {
        RawDisks {
            dir,
            qemu_img: "qemu-img".to_owned(),
        }
    }

    /// Uses `program` as `qemu-img` (tests, and hosts where it is not on the `PATH`).
    pub fn with_qemu_img(mut self, program: impl Into<String>) -> Self {
        self.qemu_img = program.into();
        self
    }

    /// The cached raw disk of `image`, converting its qcow2 first when the cache has none.
    pub async fn get(&self, image: &VzImage) -> Result<PathBuf, VzError> {
        if image.digest.is_empty()
            || !image
                .digest
                .bytes()
                .all(|byte| byte.is_ascii_alphanumeric() || byte == b'-' || byte == b'_')
        {
            return Err(VzError::ImageLoad {
                image: image.name.clone(),
                source: format!("digest `{}` is not a plain name", image.digest).into(),
            });
        }
        let ready = self.dir.join(format!("{}.raw", image.digest));
        if ready.is_file() {
            return Ok(ready);
        }
        std::fs::create_dir_all(&self.dir).map_err(|source| VzError::CreateDir {
            path: self.dir.clone(),
            source,
        })?;
        self.remove_stale_partials(&image.digest);
        let nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|elapsed| elapsed.subsec_nanos())
            .unwrap_or(0);
        let partial = self.dir.join(format!(
            ".{}.raw.{}-{nanos}.partial",
            image.digest,
            std::process::id()
        ));
        let converted = self.convert(&image.disk, &partial).await;
        if let Err(error) = converted {
            let _ = std::fs::remove_file(&partial);
            return Err(error);
        }
        // Another process may have finished the same conversion meanwhile: its disk is as good.
        std::fs::rename(&partial, &ready).map_err(|source| {
            let _ = std::fs::remove_file(&partial);
            VzError::WriteFile {
                path: ready.clone(),
                source,
            }
        })?;
        tracing::debug!(disk = %ready.display(), image = %image.name, "raw root disk cached");
        Ok(ready)
    }

    /// Converts `qcow2` to raw at `target`, then checks and syncs the result.
    async fn convert(&self, qcow2: &Path, target: &Path) -> Result<(), VzError> {
        let info = self
            .qemu_img(&["info", "--output=json", "-f", "qcow2"], &[qcow2])
            .await?;
        let expected = serde_json::from_slice::<serde_json::Value>(&info)
            .ok()
            .and_then(|info| info["virtual-size"].as_u64())
            .ok_or_else(|| VzError::ToolFailed {
                program: "qemu-img info".to_owned(),
                status: "0".to_owned(),
                stderr: format!("no `virtual-size` in its output for `{}`", qcow2.display()),
            })?;
        self.qemu_img(
            &["convert", "-q", "-f", "qcow2", "-O", "raw"],
            &[qcow2, target],
        )
        .await?;
        let actual = std::fs::metadata(target)
            .map_err(|source| VzError::ReadFile {
                path: target.to_owned(),
                source,
            })?
            .len();
        if actual != expected {
            return Err(VzError::DiskSize {
                path: target.to_owned(),
                expected,
                actual,
            });
        }
        // The rename must not publish a disk whose blocks are still only in the page cache.
        std::fs::File::open(target)
            .and_then(|file| file.sync_all())
            .map_err(|source| VzError::WriteFile {
                path: target.to_owned(),
                source,
            })
    }

    /// Runs `qemu-img ARGUMENTS… PATHS…` and returns its stdout; its failure carries its stderr.
    async fn qemu_img(&self, arguments: &[&str], paths: &[&Path]) -> Result<Vec<u8>, VzError> {
        let output = tokio::process::Command::new(&self.qemu_img)
            .args(arguments)
            .args(paths)
            .stdin(Stdio::null())
            .output()
            .await
            .map_err(|source| {
                if source.kind() == std::io::ErrorKind::NotFound {
                    VzError::QemuImgMissing
                } else {
                    VzError::Spawn {
                        program: self.qemu_img.clone(),
                        source,
                    }
                }
            })?;
        if !output.status.success() {
            return Err(VzError::ToolFailed {
                program: format!(
                    "qemu-img {}",
                    arguments.first().copied().unwrap_or_default()
                ),
                status: output.status.to_string(),
                stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
            });
        }
        Ok(output.stdout)
    }

    fn remove_stale_partials(&self, digest: &str) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        let prefix = format!(".{digest}.raw.");
        for entry in entries.flatten() {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if !(name.starts_with(&prefix) && name.ends_with(".partial")) {
                continue;
            }
            let stale = entry
                .metadata()
                .and_then(|metadata| metadata.modified())
                .ok()
                .and_then(|modified| modified.elapsed().ok())
                .is_some_and(|age| age > STALE_PARTIAL);
            if stale {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    /// A qcow2 of `size` bytes whose first bytes are `data` (written through `qemu-img dd`
    /// from a raw file, so the qcow2 holds real allocated clusters).
    fn qcow2(dir: &Path, size: &str, data: &[u8]) -> PathBuf {
        let seed = dir.join("seed.raw");
        std::fs::write(&seed, data).expect("write seed");
        let disk = dir.join("disk.qcow2");
        let status = std::process::Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&disk)
            .arg(size)
            .status()
            .expect("qemu-img is installed (apt-get install qemu-utils)");
        assert!(status.success());
        let status = std::process::Command::new("qemu-img")
            .args(["dd", "-f", "raw", "-O", "qcow2", "conv=notrunc"])
            .arg(format!("if={}", seed.display()))
            .arg(format!("of={}", disk.display()))
            .status()
            .expect("qemu-img dd");
        if !status.success() {
            // `qemu-img dd` truncates the target on older versions: convert the seed instead.
            let status = std::process::Command::new("qemu-img")
                .args(["convert", "-q", "-f", "raw", "-O", "qcow2"])
                .arg(&seed)
                .arg(&disk)
                .status()
                .expect("qemu-img convert");
            assert!(status.success());
            let status = std::process::Command::new("qemu-img")
                .args(["resize", "-q", "-f", "qcow2"])
                .arg(&disk)
                .arg(size)
                .status()
                .expect("qemu-img resize");
            assert!(status.success());
        }
        disk
    }

    fn image(disk: PathBuf, digest: &str) -> VzImage {
        VzImage {
            name: "test-arm64".to_owned(),
            digest: digest.to_owned(),
            vmlinux: PathBuf::from("/unused"),
            initrd: PathBuf::from("/unused"),
            disk,
            kernel_cmdline: String::new(),
            arch: "aarch64".to_owned(),
        }
    }

    #[tokio::test]
    async fn a_qcow2_is_converted_once_and_cached_by_digest() {
        let directory = tempfile::tempdir().expect("tempdir");
        let data = b"ci-exec root disk\x00\xffend".repeat(1000);
        let disk = qcow2(directory.path(), "4M", &data);
        let cache = RawDisks::new(directory.path().join("disks"));
        let raw = cache
            .get(&image(disk.clone(), "abc123"))
            .await
            .expect("raw");
        assert_eq!(raw, directory.path().join("disks/abc123.raw"));
        let bytes = std::fs::read(&raw).expect("read raw");
        assert_eq!(bytes.len(), 4 << 20, "the raw disk has the virtual size");
        assert_eq!(&bytes[..data.len()], &data[..]);
        assert!(bytes[data.len()..].iter().all(|&byte| byte == 0));
        // Cached: the qcow2 is not read again (it is gone, and the disk still resolves).
        std::fs::remove_file(&disk).expect("remove qcow2");
        assert_eq!(
            cache.get(&image(disk, "abc123")).await.expect("cached"),
            raw
        );
        let leftovers: Vec<_> = std::fs::read_dir(directory.path().join("disks"))
            .expect("list")
            .flatten()
            .map(|entry| entry.file_name())
            .collect();
        assert_eq!(leftovers, vec![std::ffi::OsString::from("abc123.raw")]);
    }

    #[tokio::test]
    async fn a_partial_conversion_is_never_used_and_a_failure_leaves_nothing() {
        let directory = tempfile::tempdir().expect("tempdir");
        let disks = directory.path().join("disks");
        std::fs::create_dir_all(&disks).expect("mkdir");
        // What a killed conversion left behind an hour and more ago, and what a conversion
        // running now (in another process) writes.
        let stale = disks.join(".abc.raw.1-2.partial");
        std::fs::write(&stale, b"half a disk").expect("write");
        std::fs::File::options()
            .write(true)
            .open(&stale)
            .and_then(|file| file.set_modified(SystemTime::now() - 2 * STALE_PARTIAL))
            .expect("age the stale partial");
        std::fs::write(disks.join(".abc.raw.3-4.partial"), b"in progress").expect("write");
        let not_qcow2 = directory.path().join("broken.qcow2");
        std::fs::write(&not_qcow2, b"not a qcow2 image").expect("write");
        let error = RawDisks::new(disks.clone())
            .get(&image(not_qcow2, "abc"))
            .await
            .expect_err("a broken qcow2 fails");
        assert!(
            matches!(error, VzError::ToolFailed { .. }),
            "{error}: {error:?}"
        );
        assert!(!disks.join("abc.raw").exists());
        let names: Vec<String> = std::fs::read_dir(&disks)
            .expect("list")
            .flatten()
            .map(|entry| entry.file_name().to_string_lossy().into_owned())
            .collect();
        // The stale partial and ours are gone; the fresh one of a live conversion stays.
        assert_eq!(names, vec![".abc.raw.3-4.partial".to_owned()]);
    }

    #[tokio::test]
    async fn a_conversion_shorter_than_the_virtual_size_is_never_published() {
        use std::os::unix::fs::PermissionsExt;
        let directory = tempfile::tempdir().expect("tempdir");
        // A `qemu-img` that claims 1 MiB and writes 10 bytes (a full disk, an interrupted copy).
        let program = directory.path().join("qemu-img");
        std::fs::write(
            &program,
            "#!/bin/sh\ncase \"$1\" in\n\
             info) echo '{\"virtual-size\": 1048576}' ;;\n\
             convert) for last; do :; done; printf 0123456789 > \"$last\" ;;\n\
             esac\n",
        )
        .expect("write");
        std::fs::set_permissions(&program, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let disks = directory.path().join("disks");
        let error = RawDisks::new(disks.clone())
            .with_qemu_img(program.display().to_string())
            .get(&image(directory.path().join("disk.qcow2"), "abc"))
            .await
            .expect_err("short conversion");
        assert!(
            matches!(
                error,
                VzError::DiskSize {
                    expected: 1048576,
                    actual: 10,
                    ..
                }
            ),
            "{error}"
        );
        assert_eq!(std::fs::read_dir(&disks).expect("list").count(), 0);
    }

    #[tokio::test]
    async fn without_qemu_img_the_error_says_brew_install_qemu() {
        let directory = tempfile::tempdir().expect("tempdir");
        let error = RawDisks::new(directory.path().join("disks"))
            .with_qemu_img("ci-exec-test-no-such-qemu-img")
            .get(&image(directory.path().join("disk.qcow2"), "abc"))
            .await
            .expect_err("no qemu-img");
        let text = error.to_string();
        assert_eq!(text.lines().count(), 1, "{text}");
        assert!(text.contains("`brew install qemu`"), "{text}");
    }

    #[tokio::test]
    async fn digests_must_be_plain_file_names() {
        let error = RawDisks::new(PathBuf::from("/nonexistent"))
            .get(&image(PathBuf::from("/x.qcow2"), "../../etc"))
            .await
            .expect_err("a path as digest");
        assert!(error.to_string().contains("test-arm64"), "{error}");
    }

    #[derive(Debug, Default)]
    struct Recording {
        calls: Mutex<Vec<(PathBuf, PathBuf)>>,
    }

    impl CloneFile for Recording {
        fn clone_file(&self, from: &Path, to: &Path) -> std::io::Result<Duplicated> {
            self.calls
                .lock()
                .expect("lock")
                .push((from.to_owned(), to.to_owned()));
            if to.exists() {
                return Err(std::io::Error::from(std::io::ErrorKind::AlreadyExists));
            }
            std::fs::write(to, b"clone").map(|()| Duplicated::Clone)
        }
    }

    #[test]
    fn each_vm_gets_a_fresh_clone_replacing_a_leftover() {
        let directory = tempfile::tempdir().expect("tempdir");
        let raw = directory.path().join("base.raw");
        let root = directory.path().join("root.raw");
        std::fs::write(&raw, b"base").expect("write");
        std::fs::write(&root, b"written by the last VM").expect("write");
        let recording = Recording::default();
        assert_eq!(
            clone_root_disk(&recording, &raw, &root).expect("clone"),
            Duplicated::Clone
        );
        assert_eq!(std::fs::read(&root).expect("read"), b"clone");
        assert_eq!(
            *recording.calls.lock().expect("lock"),
            vec![(raw.clone(), root.clone())]
        );
    }

    #[test]
    fn the_system_clone_duplicates_and_keeps_the_source() {
        let directory = tempfile::tempdir().expect("tempdir");
        let raw = directory.path().join("base.raw");
        let root = directory.path().join("root.raw");
        std::fs::write(&raw, b"base disk").expect("write");
        clone_root_disk(&SystemClone, &raw, &root).expect("clone");
        std::fs::write(&root, b"guest wrote this").expect("write clone");
        assert_eq!(std::fs::read(&raw).expect("read"), b"base disk");
        let error = clone_root_disk(&SystemClone, &directory.path().join("none"), &root)
            .expect_err("no source");
        assert!(error.to_string().contains("none"), "{error}");
    }
}
