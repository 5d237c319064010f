//! The per-namespace run directory: everything a VM of one namespace leaves on the host, so
//! that `close` — from this process or another one after a crash — finds and removes it.
//!
//! ```text
//! <run_root>/<namespace>/
//!   owner.lock                  locked by the driver using the directory (`ci_exec_driver::leftovers`)
//!   qemu.pid  qmp.sock  qga.sock  ctl.sock  console.log  qemu.log  overlay.qcow2
//!   share/                      the 9p export, `/mnt/ci` in the guest
//!     volumes/<name>/           a volume (`/mnt/volumes/<name>` in the guest)
//!     tasks/<id>/               task (or run.sh) stdin stdout stderr exit pid
//! ```

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ci_exec_driver::leftovers::{self, OwnerLock};

use crate::QemuError;

/// Where the share is mounted in the guest.
pub const GUEST_SHARE: &str = "/mnt/ci";
/// The 9p mount tag of the share.
pub const SHARE_TAG: &str = "ci";

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
    /// The VM's second disk: a repository's state overlay, or an empty placeholder.
    pub fn state_disk(&self) -> PathBuf {
        self.path.join("state.qcow2")
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
        // A driver of this process that closed the namespace a moment ago may still hold it
        // for a little while: a child being spawned meanwhile (by any thread) keeps a copy of
        // every descriptor, and so the lock, until its exec.
        let deadline = Instant::now() + Duration::from_secs(1);
        loop {
            match leftovers::lock_owner(&self.path, true) {
                Ok(Some(lock)) => return Ok(lock),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Ok(None) => {
                    return Err(QemuError::NamespaceLocked {
                        namespace: namespace.to_owned(),
                    });
                }
                Err(source) => {
                    return Err(QemuError::CreateDir {
                        path: self.path.join(leftovers::OWNER_LOCK),
                        source,
                    });
                }
            }
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

/// Removes what killed runs left under `run_root` in generated namespaces (see
/// [`leftovers::sweep_abandoned`]): their qemu, if one still runs, and their directory. A
/// directory from before owner locks that still has a live qemu is left alone: its owner may be
/// an older `ci-exec`.
pub fn sweep_abandoned(run_root: &Path) -> Vec<String> {
    leftovers::sweep_abandoned(run_root, leftovers::SWEEP_MIN_AGE, |dir, had_lock| {
        let run = RunDir::new(dir.to_owned());
        if !had_lock && run.live_qemu().is_some() {
            return Ok(false);
        }
        run.remove_leftovers().map(|()| true)
    })
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
