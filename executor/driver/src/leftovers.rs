//! What a killed run leaves on this host, and how the next run finds it.
//!
//! Drivers that keep a namespace in a local directory (the native driver's state, the qemu
//! driver's run directories) have that directory outlive a process killed with `kill -9`.
//! Each user of such a directory holds a lock on its [`OWNER_LOCK`] file for as long as it uses
//! it: shared where several processes may use one namespace at once (native), exclusive where
//! only one may (qemu, one VM per namespace). The kernel drops the lock however the process
//! ends. A named namespace waits for `ci-exec driver close`, which removes it whatever its lock
//! says; a generated one cannot be named again, so the next run of the driver removes it with
//! [`sweep_abandoned`] once its lock is free.

use std::fs::{File, TryLockError};
use std::io;
use std::path::Path;
use std::time::Duration;

use crate::is_generated_namespace;

/// The lock file in a namespace directory.
pub const OWNER_LOCK: &str = "owner.lock";

/// A namespace directory younger than this is never swept: its user may be between creating it
/// and taking its lock.
pub const SWEEP_MIN_AGE: Duration = Duration::from_secs(60);

/// A held lock on a namespace directory; dropping it releases the lock.
#[derive(Debug)]
pub struct OwnerLock {
    _file: File,
}

/// Takes the lock of namespace directory `dir` (creating its lock file) without waiting;
/// `None` while a conflicting lock is held, by another process or another open of this one.
pub fn lock_owner(dir: &Path, exclusive: bool) -> io::Result<Option<OwnerLock>> {
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join(OWNER_LOCK))?;
    let taken = if exclusive {
        file.try_lock()
    } else {
        file.try_lock_shared()
    };
    match taken {
        Ok(()) => Ok(Some(OwnerLock { _file: file })),
        Err(TryLockError::WouldBlock) => Ok(None),
        Err(TryLockError::Error(error)) => Err(error),
    }
}

/// Removes what killed runs left under `root` in generated namespaces: each directory at least
/// `min_age` old whose lock can be taken exclusively (nobody uses it) is handed to `remove`,
/// with whether it had a lock file (a directory from before owner locks did not), while the
/// sweep holds its lock. `remove` says whether it removed the directory (`Ok(false)`: left
/// alone); a failure is logged. The names of the directories removed are returned.
pub fn sweep_abandoned<E: std::fmt::Display>(
    root: &Path,
    min_age: Duration,
    mut remove: impl FnMut(&Path, bool) -> Result<bool, E>,
) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(root) else {
        return Vec::new();
    };
    let mut removed = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let old_enough = entry
            .metadata()
            .and_then(|metadata| metadata.modified())
            .is_ok_and(|modified| modified.elapsed().unwrap_or_default() >= min_age);
        if !is_generated_namespace(&name) || !old_enough {
            continue;
        }
        let dir = entry.path();
        let had_lock = dir.join(OWNER_LOCK).exists();
        let Ok(Some(_lock)) = lock_owner(&dir, true) else {
            continue;
        };
        match remove(&dir, had_lock) {
            Ok(true) => {
                tracing::debug!(namespace = %name, "removed the leftovers of a killed run");
                removed.push(name);
                continue;
            }
            Ok(false) => {}
            Err(error) => tracing::warn!(%error, "cannot remove the leftovers of a killed run"),
        }
        if !had_lock {
            let _ = std::fs::remove_file(dir.join(OWNER_LOCK));
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A child being spawned holds copies of this process's descriptors until its exec, and
    /// with them every lock they carry: the tests that spawn and the ones that watch a lock go
    /// free take turns.
    static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

    /// `flock(1)` holding `dir`'s lock in another process, as a live user would.
    fn hold_lock_elsewhere(dir: &Path) -> std::process::Child {
        // `-o`: `sleep` does not inherit the lock, so killing `flock` releases it. The `sleep`
        // it leaves behind gets no descriptor of ours: an orphan holding the test's stdout
        // kept `cargo test | tee` (CI) waiting for it to end.
        let child = std::process::Command::new("flock")
            .arg("-o")
            .arg(dir.join(OWNER_LOCK))
            .args(["sleep", "60"])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("flock(1) from util-linux");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while lock_owner(dir, true).expect("lock").is_some() {
            assert!(
                std::time::Instant::now() < deadline,
                "flock(1) never took the lock"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        child
    }

    #[test]
    fn only_killed_runs_in_generated_namespaces_are_swept() {
        let _serial = SERIAL
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let root = tempfile::tempdir().expect("tempdir");
        let dir = |name: &str| {
            let dir = root.path().join(name);
            std::fs::create_dir(&dir).expect("mkdir");
            dir
        };
        let killed = dir("ci-00000000000a");
        let mut owner = hold_lock_elsewhere(&killed);
        owner.kill().expect("kill -9 the owner");
        owner.wait().expect("reap");
        let live = dir("ci-00000000000b");
        let mut live_owner = hold_lock_elsewhere(&live);
        let named = dir("main");
        let ours = dir("ci-00000000000c");
        let _shared = lock_owner(&ours, false).expect("lock").expect("free");
        let old_format = dir("ci-00000000000d");
        let kept_by_remove = dir("ci-00000000000e");

        let mut offered = Vec::new();
        let mut remove = |dir: &Path, had_lock: bool| {
            offered.push((dir.to_owned(), had_lock));
            if dir == kept_by_remove {
                return Ok(false);
            }
            std::fs::remove_dir_all(dir).map(|()| true)
        };
        assert!(sweep_abandoned(root.path(), Duration::from_secs(3600), &mut remove).is_empty());
        let mut removed = sweep_abandoned(root.path(), Duration::ZERO, &mut remove);
        live_owner.kill().expect("kill");
        live_owner.wait().expect("reap");
        removed.sort();
        assert_eq!(removed, ["ci-00000000000a", "ci-00000000000d"]);
        assert!(offered.contains(&(killed, true)));
        assert!(offered.contains(&(old_format, false)), "{offered:?}");
        assert!(live.exists(), "its owner lives");
        assert!(ours.exists(), "this process uses it");
        assert!(named.exists(), "a named namespace waits for `driver close`");
        assert!(kept_by_remove.exists());
        assert!(
            !kept_by_remove.join(OWNER_LOCK).exists(),
            "the sweep leaves no lock file where there was none"
        );
    }

    #[test]
    fn exclusive_and_shared_owners() {
        let _serial = SERIAL
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let dir = tempfile::tempdir().expect("tempdir");
        let first = lock_owner(dir.path(), false).expect("lock").expect("free");
        let second = lock_owner(dir.path(), false).expect("lock");
        assert!(second.is_some(), "shared users share");
        assert!(lock_owner(dir.path(), true).expect("lock").is_none());
        drop((first, second));
        let only = lock_owner(dir.path(), true).expect("lock").expect("free");
        assert!(lock_owner(dir.path(), false).expect("lock").is_none());
        assert!(lock_owner(dir.path(), true).expect("lock").is_none());
        drop(only);
        assert!(lock_owner(dir.path(), true).expect("lock").is_some());
    }
}
