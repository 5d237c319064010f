//! The per-namespace run directory: everything a VM of one namespace leaves on the host, so
//! that `close` — from this process or another one after a crash — finds and removes it.
//!
//! ```text
//! <run_root>/<namespace>/
//!   owner.lock                  flock'ed by the driver using the directory, for its life
//!   qemu.pid  qmp.sock  qga.sock  ctl.sock  console.log  qemu.log  overlay.qcow2
//!   share/                      the 9p export, `/mnt/ci` in the guest
//!     volumes/<name>/           a volume (`/mnt/volumes/<name>` in the guest)
//!     tasks/<id>/               task (or run.sh) stdin stdout stderr exit pid
//! ```

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::QemuError;

/// Where the share is mounted in the guest.
pub const GUEST_SHARE: &str = "/mnt/ci";
/// The 9p mount tag of the share.
pub const SHARE_TAG: &str = "ci";
/// The run directory's owner lock: the driver that uses the directory holds an exclusive
/// `flock` on it for as long as it lives. The kernel releases it however that process ends
/// (`kill -9` included), which is how a later run tells a killed run's directory from a live one.
const OWNER_LOCK: &str = "owner.lock";
/// A run directory younger than this is never swept: its owner may be between creating it and
/// taking its lock.
pub const SWEEP_MIN_AGE: Duration = Duration::from_secs(60);

/// A held owner lock (see [`OWNER_LOCK`]); dropping it releases the lock.
#[derive(Debug)]
pub struct OwnerLock {
    _file: File,
}

/// Takes the lock at `path` (creating the file) without waiting; `None` when another open file
/// holds it: another process, or another driver of this one.
fn try_lock(path: &Path) -> std::io::Result<Option<OwnerLock>> {
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)?;
    // SAFETY: flock on a descriptor we own, which stays open for the call.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        return Ok(Some(OwnerLock { _file: file }));
    }
    let error = std::io::Error::last_os_error();
    if error.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(None)
    } else {
        Err(error)
    }
}

#[derive(Debug, Clone)]
pub struct RunDir {
    path: PathBuf,
}

impl RunDir {
    pub fn new(path: PathBuf) -> Self {
        RunDir { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
    pub fn pid_file(&self) -> PathBuf {
        self.path.join("qemu.pid")
    }
    pub fn qmp_socket(&self) -> PathBuf {
        self.path.join("qmp.sock")
    }
    pub fn qga_socket(&self) -> PathBuf {
        self.path.join("qga.sock")
    }
    /// The control port's socket (QEMU connects to it; see `control`).
    pub fn control_socket(&self) -> PathBuf {
        self.path.join("ctl.sock")
    }
    pub fn console_log(&self) -> PathBuf {
        self.path.join("console.log")
    }
    pub fn qemu_log(&self) -> PathBuf {
        self.path.join("qemu.log")
    }
    pub fn overlay(&self) -> PathBuf {
        self.path.join("overlay.qcow2")
    }
    pub fn share(&self) -> PathBuf {
        self.path.join("share")
    }
    pub fn volume(&self, name: &str) -> PathBuf {
        self.share().join("volumes").join(name)
    }
    pub fn task(&self, id: &str) -> PathBuf {
        self.share().join("tasks").join(id)
    }

    /// Creates the directory tree. Fails when a live qemu of ours already runs here.
    pub fn create(&self, namespace: &str) -> Result<(), QemuError> {
        if let Some(pid) = self.live_qemu() {
            return Err(QemuError::NamespaceBusy {
                namespace: namespace.to_owned(),
                pid,
            });
        }
        for directory in [
            self.path.clone(),
            self.share().join("volumes"),
            self.share().join("tasks"),
        ] {
            std::fs::create_dir_all(&directory).map_err(|source| QemuError::CreateDir {
                path: directory.clone(),
                source,
            })?;
        }
        let socket = self.qmp_socket();
        if socket.as_os_str().len() >= 104 {
            return Err(QemuError::InvalidParameter {
                parameter: "namespace".to_owned(),
                reason: format!(
                    "socket path `{}` is too long for a Unix socket; use a shorter namespace or set `XDG_RUNTIME_DIR`",
                    socket.display()
                ),
            });
        }
        Ok(())
    }

    /// Takes the directory's owner lock for this driver (after [`RunDir::create`]). Fails when
    /// another live driver, in this process or another, owns the namespace.
    pub fn lock_owner(&self, namespace: &str) -> Result<OwnerLock, QemuError> {
        let path = self.path.join(OWNER_LOCK);
        match try_lock(&path) {
            Ok(Some(lock)) => Ok(lock),
            Ok(None) => Err(QemuError::NamespaceLocked {
                namespace: namespace.to_owned(),
            }),
            Err(source) => Err(QemuError::CreateDir { path, source }),
        }
    }

    /// The pid in the pid file, if that process is alive and is a qemu of this run directory.
    pub fn live_qemu(&self) -> Option<i32> {
        let pid: i32 = std::fs::read_to_string(self.pid_file())
            .ok()?
            .trim()
            .parse()
            .ok()?;
        is_our_qemu(pid, &self.qmp_socket()).then_some(pid)
    }

    /// Kills a leftover qemu (checked through `/proc/<pid>/cmdline`) and removes the directory.
    /// Idempotent.
    pub fn remove_leftovers(&self) -> Result<(), QemuError> {
        if let Some(pid) = self.live_qemu() {
            tracing::info!(pid, run_dir = %self.path.display(), "killing leftover qemu");
            // SAFETY: kill has no memory-safety preconditions; the pid was checked to be ours.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            let deadline = Instant::now() + Duration::from_secs(5);
            while Path::new(&format!("/proc/{pid}")).exists() && Instant::now() < deadline {
                if is_zombie(pid) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        match std::fs::remove_dir_all(&self.path) {
            Ok(()) => Ok(()),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(QemuError::Remove {
                path: self.path.clone(),
                source,
            }),
        }
    }
}

fn is_zombie(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|stat| {
            stat.rsplit_once(')')
                .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(true)
}

/// Whether `pid` is a live qemu started with `qmp_socket` on its command line, so a recycled
/// pid is never killed.
pub fn is_our_qemu(pid: i32, qmp_socket: &Path) -> bool {
    if pid <= 0 || is_zombie(pid) {
        return false;
    }
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let needle = qmp_socket.as_os_str().as_encoded_bytes();
    let mut arguments = cmdline.split(|&byte| byte == 0);
    let is_qemu = arguments.next().is_some_and(|program| {
        String::from_utf8_lossy(program)
            .rsplit('/')
            .next()
            .is_some_and(|name| name.starts_with("qemu"))
    });
    is_qemu
        && cmdline
            .windows(needle.len().max(1))
            .any(|window| window == needle)
}

/// Removes what killed runs left under `run_root` in namespaces nobody named (a generated
/// namespace is never used again, so nothing else would): each directory at least `min_age`
/// old whose owner lock is free. A directory from before owner locks that still has a live
/// qemu is left alone: its owner may be an older `ci-exec`. Returns the namespaces removed.
pub fn sweep_abandoned(run_root: &Path, min_age: Duration) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(run_root) else {
        return Vec::new();
    };
    let mut removed = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let old_enough = entry
            .metadata()
            .and_then(|metadata| metadata.modified())
            .is_ok_and(|modified| modified.elapsed().unwrap_or_default() >= min_age);
        if !ci_exec_driver::is_generated_namespace(&name) || !old_enough {
            continue;
        }
        let run = RunDir::new(entry.path());
        let lock_path = run.path.join(OWNER_LOCK);
        let had_lock = lock_path.exists();
        let Ok(Some(_lock)) = try_lock(&lock_path) else {
            continue;
        };
        if !had_lock && run.live_qemu().is_some() {
            let _ = std::fs::remove_file(&lock_path);
            continue;
        }
        match run.remove_leftovers() {
            Ok(()) => {
                tracing::debug!(namespace = %name, "removed the leftovers of a killed run");
                removed.push(name);
            }
            Err(error) => tracing::warn!(%error, "cannot remove the leftovers of a killed run"),
        }
    }
    removed
}

/// Every run directory under `run_root` whose name is `namespace` (there is one per namespace).
pub fn leftovers(run_root: &Path, namespace: &str) -> Option<RunDir> {
    let path = run_root.join(namespace);
    path.exists().then(|| RunDir::new(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_is_under_the_namespace() {
        let run = RunDir::new(PathBuf::from("/run/ci-exec/qemu/ns"));
        assert_eq!(
            run.volume("v"),
            Path::new("/run/ci-exec/qemu/ns/share/volumes/v")
        );
        assert_eq!(
            run.task("t"),
            Path::new("/run/ci-exec/qemu/ns/share/tasks/t")
        );
    }

    #[test]
    fn our_own_process_is_not_a_qemu() {
        let pid = std::process::id() as i32;
        assert!(!is_our_qemu(pid, Path::new("/x/qmp.sock")));
        assert!(!is_our_qemu(0, Path::new("/x/qmp.sock")));
    }

    /// `flock(1)` holding `run`'s owner lock in another process, as a live driver would.
    fn hold_lock_elsewhere(run: &RunDir) -> std::process::Child {
        let lock = run.path().join(OWNER_LOCK);
        // `-o`: `sleep` does not inherit the lock, so killing `flock` releases it.
        let child = std::process::Command::new("flock")
            .arg("-o")
            .arg(&lock)
            .args(["sleep", "600"])
            .spawn()
            .expect("flock(1) from util-linux");
        let deadline = Instant::now() + Duration::from_secs(10);
        while try_lock(&lock).expect("lock").is_some() {
            assert!(Instant::now() < deadline, "flock(1) never took the lock");
            std::thread::sleep(Duration::from_millis(10));
        }
        child
    }

    #[test]
    fn only_killed_runs_in_generated_namespaces_are_swept() {
        let root = tempfile::tempdir().expect("tempdir");
        let run = |name: &str| {
            let run = RunDir::new(root.path().join(name));
            run.create(name).expect("create");
            run
        };
        let killed = run("ci-00000000000a");
        let mut owner = hold_lock_elsewhere(&killed);
        owner.kill().expect("kill -9 the owner");
        owner.wait().expect("reap");
        let live = run("ci-00000000000b");
        let mut live_owner = hold_lock_elsewhere(&live);
        let named = run("main");
        let ours = run("ci-00000000000c");
        let _lock = ours.lock_owner("ci-00000000000c").expect("lock");
        let young = run("ci-00000000000d");

        assert!(sweep_abandoned(root.path(), Duration::from_secs(3600)).is_empty());
        let removed = sweep_abandoned(root.path(), Duration::ZERO);
        live_owner.kill().expect("kill");
        live_owner.wait().expect("reap");
        assert_eq!(removed.len(), 2, "{removed:?}");
        assert!(!killed.path().exists());
        assert!(!young.path().exists(), "unlocked and old enough");
        assert!(live.path().exists(), "its owner lives");
        assert!(ours.path().exists(), "this process owns it");
        assert!(
            named.path().exists(),
            "a named namespace waits for `driver close`"
        );
    }

    #[test]
    fn a_namespace_has_one_owner_at_a_time() {
        let root = tempfile::tempdir().expect("tempdir");
        let run = RunDir::new(root.path().join("ns"));
        run.create("ns").expect("create");
        let first = run.lock_owner("ns").expect("first owner");
        let error = run.lock_owner("ns").expect_err("second owner");
        assert!(
            error
                .to_string()
                .contains("in use by another ci-exec driver"),
            "{error}"
        );
        drop(first);
        run.lock_owner("ns").expect("the lock is free again");
    }

    #[test]
    fn removing_leftovers_twice_is_fine() {
        let root = tempfile::tempdir().expect("tempdir");
        let run = RunDir::new(root.path().join("ns"));
        run.create("ns").expect("create");
        std::fs::write(run.pid_file(), "1").expect("pid");
        assert_eq!(run.live_qemu(), None, "pid 1 is not our qemu");
        run.remove_leftovers().expect("remove");
        assert!(!run.path().exists());
        run.remove_leftovers().expect("remove again");
    }
}
