//! Per-repository warm state: a disk that holds what a repository's base-OS steps built in the
//! guest — podman's storage (images and the layer cache of `podman build`) — kept after a
//! successful job and attached to the next VM that runs a job of the same repository on the
//! same guest image, so an unchanged `base-image` is a layer-cache hit.
//!
//! Every VM has a second virtio disk (`/dev/vdb`, the same virtual size whatever backs it), so
//! a VM restored from a warm state (saved with an empty placeholder there) can be given a
//! repository's disk instead: the guest mounts it only after the restore, having dropped what
//! its buffer cache held of the placeholder. Each run writes a qcow2 overlay of the saved disk;
//! on success the overlay is committed into it once QEMU has exited, on failure it is dropped.
//!
//! A repository without a saved state runs on the image's own storage, untouched; only when
//! its successful job changed podman's images is the storage copied onto the (then formatted)
//! disk to be kept — a job that builds no image pays nothing, and one that does pays the copy
//! once (about 8 s for the default image's 133 MB under TCG).
//!
//! States live in `{cache_dir}/repositories/{image digest}/{repository}/disk.qcow2`, its
//! modification time the last use. [`prune`] drops states older than an age limit, then the
//! least recently used ones while the total is above a size cap.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde::Serialize;

use crate::QemuError;
use crate::machine::qemu_img;

/// The virtual size of every VM's second disk (sparse: only what is written takes space).
pub const DISK_SIZE: &str = "64G";
/// States unused for longer are dropped.
pub const MAX_AGE: Duration = Duration::from_secs(14 * 24 * 3600);
/// Above this total, the least recently used states are dropped.
pub const MAX_BYTES: u64 = 20 << 30;

/// Where the guest mounts the state disk, and what it binds from there.
const GUEST_MOUNT: &str = "/mnt/ci-state";
const PODMAN_STORAGE: &str = "/var/lib/containers/storage";

/// A job's request: start from repository `key`'s saved state unless `fresh`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub key: String,
    pub fresh: bool,
}

/// One saved state, as `ci-exec cache list` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SavedState {
    pub repository: String,
    pub image_digest: String,
    pub path: PathBuf,
    /// Bytes the disk takes on the host.
    pub bytes: u64,
    pub last_used_unix: u64,
}

/// The saved disk of repository `key` on the image with `digest`.
pub fn saved_disk(cache_dir: &Path, digest: &str, key: &str) -> PathBuf {
    cache_dir
        .join("repositories")
        .join(&digest[..digest.len().min(16)])
        .join(key)
        .join("disk.qcow2")
}

/// Makes `run_disk` the second disk of a VM: an overlay of the saved state when `request`
/// wants one and it exists (returns `false`: not fresh), else an empty disk (returns `true`).
pub async fn prepare_disk(
    cache_dir: &Path,
    digest: &str,
    request: Option<&Request>,
    run_disk: &Path,
) -> Result<bool, QemuError> {
    if let Some(request) = request
        && !request.fresh
    {
        let saved = saved_disk(cache_dir, digest, &request.key);
        if saved.is_file() {
            crate::machine::create_overlay(&saved, run_disk).await?;
            touch(&saved);
            return Ok(false);
        }
    }
    create_empty(run_disk).await?;
    Ok(true)
}

/// An empty qcow2 disk of [`DISK_SIZE`].
pub async fn create_empty(path: &Path) -> Result<(), QemuError> {
    let _ = std::fs::remove_file(path);
    qemu_img(
        &["create", "-q", "-f", "qcow2"],
        &[path.as_os_str(), std::ffi::OsStr::new(DISK_SIZE)],
    )
    .await
}

/// Marks when a fresh job started, to tell afterwards whether it changed podman's images. A
/// saved (warm) state carries one made when it was saved, after podman's last change to its
/// images: a VM restored from it needs no mark of its own.
const FRESH_MARK: &str = "/run/ci-state.start";

/// The two files whose modification times tell whether a fresh run changed podman's images
/// (what [`keep_script`] checks first).
pub const FRESH_CHANGE: (&str, &str) = (
    "/var/lib/containers/storage/overlay-images/images.json",
    FRESH_MARK,
);

/// Makes the mark, in a guest about to be saved as a warm state.
pub fn mark_script() -> String {
    format!("touch {FRESH_MARK}")
}

/// The guest side, after boot or restore: a saved state's disk is mounted and podman's storage
/// put on it; for a fresh one only the start is marked (see [`keep_script`]).
pub fn mount_script(fresh: bool) -> String {
    if fresh {
        return format!("touch {FRESH_MARK}");
    }
    format!(
        "blockdev --flushbufs /dev/vdb && mkdir -p {GUEST_MOUNT} && \
         mount -t ext4 -o noatime /dev/vdb {GUEST_MOUNT} && \
         mount --bind {GUEST_MOUNT}/storage {PODMAN_STORAGE}"
    )
}

/// The guest side after a successful job; prints `kept` when there is a state to save: a
/// saved state's disk is synced and unmounted; on a fresh run, when podman's images changed,
/// the storage is copied onto the freshly formatted disk.
pub fn keep_script(fresh: bool) -> String {
    if fresh {
        format!(
            "if [ {PODMAN_STORAGE}/overlay-images/images.json -nt {FRESH_MARK} ]; then \
               blockdev --flushbufs /dev/vdb && \
               mkfs.ext4 -q -F -E lazy_itable_init=1,lazy_journal_init=1 /dev/vdb && \
               mkdir -p {GUEST_MOUNT} && mount -t ext4 -o noatime /dev/vdb {GUEST_MOUNT} && \
               cp -a {PODMAN_STORAGE} {GUEST_MOUNT}/storage && sync && umount {GUEST_MOUNT} && \
               echo kept; \
             fi"
        )
    } else {
        format!("sync && umount {PODMAN_STORAGE} && umount {GUEST_MOUNT} && echo kept")
    }
}

/// After QEMU has exited: the run's disk becomes repository `key`'s saved state (committed
/// into it when it was an overlay of it, moved there when it was fresh).
pub async fn save(
    cache_dir: &Path,
    digest: &str,
    key: &str,
    run_disk: &Path,
    fresh: bool,
) -> Result<PathBuf, QemuError> {
    let saved = saved_disk(cache_dir, digest, key);
    // A disk QEMU did not close cleanly is not trusted.
    qemu_img(&["check", "-q"], &[run_disk.as_os_str()]).await?;
    if fresh {
        if let Some(parent) = saved.parent() {
            std::fs::create_dir_all(parent).map_err(|source| QemuError::CreateDir {
                path: parent.to_owned(),
                source,
            })?;
        }
        std::fs::rename(run_disk, &saved).map_err(|source| QemuError::WriteFile {
            path: saved.clone(),
            source,
        })?;
    } else {
        qemu_img(&["commit", "-q"], &[run_disk.as_os_str()]).await?;
    }
    touch(&saved);
    Ok(saved)
}

/// Every saved state under `cache_dir`, least recently used first.
pub fn list(cache_dir: &Path) -> Vec<SavedState> {
    let mut states = Vec::new();
    let root = cache_dir.join("repositories");
    for image in read_dir(&root) {
        for repository in read_dir(&image) {
            let disk = repository.join("disk.qcow2");
            let Ok(metadata) = std::fs::metadata(&disk) else {
                continue;
            };
            use std::os::unix::fs::MetadataExt;
            states.push(SavedState {
                repository: file_name(&repository),
                image_digest: file_name(&image),
                bytes: metadata.blocks() * 512,
                last_used_unix: metadata
                    .modified()
                    .ok()
                    .and_then(|time| time.duration_since(SystemTime::UNIX_EPOCH).ok())
                    .map_or(0, |elapsed| elapsed.as_secs()),
                path: disk,
            });
        }
    }
    states.sort_by_key(|state| state.last_used_unix);
    states
}

/// Drops states unused for longer than `max_age`, then the least recently used while the
/// total is above `max_bytes`; everything with `all`. Returns what was dropped.
pub fn prune(cache_dir: &Path, max_age: Duration, max_bytes: u64, all: bool) -> Vec<SavedState> {
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs());
    let states = list(cache_dir);
    let mut total: u64 = states.iter().map(|state| state.bytes).sum();
    let mut dropped = Vec::new();
    for state in states {
        let old = now.saturating_sub(state.last_used_unix) > max_age.as_secs();
        if (all || old || total > max_bytes)
            && let Some(directory) = state.path.parent()
            && std::fs::remove_dir_all(directory).is_ok()
        {
            total = total.saturating_sub(state.bytes);
            dropped.push(state);
        }
    }
    dropped
}

fn touch(path: &Path) {
    if let Ok(file) = std::fs::File::options().append(true).open(path) {
        let _ = file.set_modified(SystemTime::now());
    }
}

fn read_dir(path: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(path)
        .into_iter()
        .flatten()
        .flatten()
        .map(|entry| entry.path())
        .filter(|path| path.is_dir())
        .collect()
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fresh_change_files_are_the_keep_scripts() {
        let (images, mark) = FRESH_CHANGE;
        assert!(keep_script(true).starts_with(&format!("if [ {images} -nt {mark} ]")));
    }

    fn state(dir: &Path, image: &str, repository: &str, bytes: usize, age: Duration) {
        let disk = dir
            .join("repositories")
            .join(image)
            .join(repository)
            .join("disk.qcow2");
        std::fs::create_dir_all(disk.parent().expect("parent")).expect("mkdir");
        std::fs::write(&disk, vec![1u8; bytes]).expect("write");
        let file = std::fs::File::options()
            .append(true)
            .open(&disk)
            .expect("open");
        file.set_modified(SystemTime::now() - age).expect("mtime");
    }

    #[test]
    fn states_are_keyed_by_image_and_repository() {
        let dir = Path::new("/cache");
        assert_ne!(saved_disk(dir, "aaaa", "r1"), saved_disk(dir, "bbbb", "r1"));
        assert_ne!(saved_disk(dir, "aaaa", "r1"), saved_disk(dir, "aaaa", "r2"));
    }

    #[test]
    fn pruning_drops_old_states_then_the_least_recently_used() {
        let dir = tempfile::tempdir().expect("tempdir");
        let day = Duration::from_secs(24 * 3600);
        state(dir.path(), "img", "old", 4096, 30 * day);
        state(dir.path(), "img", "lru", 8192, 2 * day);
        state(dir.path(), "img", "recent", 8192, day);
        state(dir.path(), "other", "new", 8192, Duration::ZERO);
        assert_eq!(list(dir.path()).len(), 4);
        let dropped = prune(dir.path(), 14 * day, 20_000, false);
        let names: Vec<_> = dropped.iter().map(|s| s.repository.as_str()).collect();
        assert_eq!(names, ["old", "lru"]);
        let left: Vec<_> = list(dir.path()).into_iter().map(|s| s.repository).collect();
        assert_eq!(left, ["recent", "new"]);
        assert_eq!(prune(dir.path(), 14 * day, u64::MAX, true).len(), 2);
        assert!(list(dir.path()).is_empty());
    }

    #[test]
    fn a_fresh_disk_is_formatted_only_when_there_is_something_to_keep() {
        assert!(!mount_script(true).contains("mkfs.ext4"));
        assert!(!mount_script(false).contains("mkfs.ext4"));
        assert!(
            mount_script(false)
                .contains("mount --bind /mnt/ci-state/storage /var/lib/containers/storage")
        );
        assert!(keep_script(true).contains("-nt /run/ci-state.start"));
        assert!(keep_script(true).contains("mkfs.ext4"));
        assert!(!keep_script(false).contains("mkfs.ext4"));
    }
}
