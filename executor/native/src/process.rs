//! Host process plumbing: finding a program on the task's `PATH`, process groups, limits, and
//! the pid files that let a later process kill what a crashed one left running.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use ci_exec_driver::{DriverError, Limits};

/// `PATH` for a task that sets none: the usual system directories, nothing from the host env.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Finds `program` as a shell would: a name with a `/` is taken as a path (relative to `cwd`),
/// anything else is searched on `path_var`.
pub fn resolve_program(
    task: &str,
    program: &str,
    path_var: &str,
    cwd: &Path,
) -> Result<PathBuf, DriverError> {
    let not_found = || DriverError::ProgramNotFound {
        task: task.to_owned(),
        program: program.to_owned(),
    };
    let cannot_invoke = |source: std::io::Error| DriverError::CannotInvoke {
        task: task.to_owned(),
        program: program.to_owned(),
        source,
    };
    if program.is_empty() {
        return Err(not_found());
    }
    if program.contains('/') {
        let candidate = cwd.join(program);
        return match executable(&candidate) {
            Candidate::Executable => Ok(candidate),
            Candidate::Missing => Err(not_found()),
            Candidate::NotExecutable(reason) => Err(cannot_invoke(reason)),
        };
    }
    let mut refused = None;
    for directory in path_var.split(':') {
        let directory = if directory.is_empty() { "." } else { directory };
        let candidate = cwd.join(directory).join(program);
        match executable(&candidate) {
            Candidate::Executable => return Ok(candidate),
            Candidate::Missing => {}
            Candidate::NotExecutable(reason) => {
                refused.get_or_insert(reason);
            }
        }
    }
    // As a shell does: a match without the execute bit is "permission denied", not "not found".
    match refused {
        Some(reason) => Err(cannot_invoke(reason)),
        None => Err(not_found()),
    }
}

enum Candidate {
    Executable,
    Missing,
    NotExecutable(std::io::Error),
}

fn executable(path: &Path) -> Candidate {
    match std::fs::metadata(path) {
        Err(_) => Candidate::Missing,
        Ok(metadata) if metadata.is_dir() => Candidate::NotExecutable(std::io::Error::new(
            std::io::ErrorKind::IsADirectory,
            "is a directory",
        )),
        Ok(metadata) if metadata.permissions().mode() & 0o111 == 0 => {
            Candidate::NotExecutable(std::io::Error::from(std::io::ErrorKind::PermissionDenied))
        }
        Ok(_) => Candidate::Executable,
    }
}

/// Applies `limits`, `user` and `offline` to `command`; the child also leads its own process
/// group so that cleanup kills every process it started.
pub fn prepare(
    command: &mut tokio::process::Command,
    task: &str,
    limits: Limits,
    user: Option<&str>,
    offline: bool,
) -> Result<(), DriverError> {
    command.process_group(0);
    if offline {
        if user.is_some() {
            return Err(DriverError::InvalidTask {
                task: task.to_owned(),
                reason: "the native driver cannot both switch the user and take the network away"
                    .to_owned(),
            });
        }
        // Network namespaces are Linux's: elsewhere (macOS) an offline task is refused.
        #[cfg(not(target_os = "linux"))]
        return Err(DriverError::InvalidTask {
            task: task.to_owned(),
            reason: "the native driver takes the network away only on Linux (network \
                     namespaces); run it online (`--network`)"
                .to_owned(),
        });
        #[cfg(target_os = "linux")]
        leave_the_network(command);
    }
    if let Some(user) = user {
        let (uid, gid) = parse_user(user).ok_or_else(|| DriverError::InvalidTask {
            task: task.to_owned(),
            reason: format!(
                "the native driver takes a numeric user (`uid` or `uid:gid`), got `{user}`"
            ),
        })?;
        if let Some(gid) = gid {
            command.gid(gid);
        }
        command.uid(uid);
    }
    let memory = limits.memory_bytes;
    // Docker's default share is 1024; below it, run nicer in proportion (up to nice 19).
    let nice = match limits.cpu_shares {
        0 => 0,
        shares if shares >= 1024 => 0,
        shares => i32::try_from((1024 - shares) * 19 / 1024).unwrap_or(19),
    };
    if memory > 0 || nice > 0 {
        // SAFETY: the closure runs in the forked child before exec and only makes
        // async-signal-safe system calls (setrlimit, setpriority) on values copied in.
        unsafe {
            command.pre_exec(move || {
                if memory > 0 {
                    let limit = libc::rlimit {
                        rlim_cur: memory as libc::rlim_t,
                        rlim_max: memory as libc::rlim_t,
                    };
                    if libc::setrlimit(libc::RLIMIT_AS, &limit) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                if nice > 0 && libc::setpriority(libc::PRIO_PROCESS, 0, nice) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    Ok(())
}

/// Runs the child in a network namespace of its own, with only a loopback (brought up). Root
/// makes one directly; anyone else through a user namespace that maps their own ids to
/// themselves, so the task still runs as the same user, only without the host's network.
#[cfg(target_os = "linux")]
fn leave_the_network(command: &mut tokio::process::Command) {
    // SAFETY: geteuid and getegid have no preconditions and cannot fail.
    let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
    // Made before the fork: the child may not allocate.
    let uid_map = format!("{uid} {uid} 1");
    let gid_map = format!("{gid} {gid} 1");
    // SAFETY: the closure runs in the forked child before exec and makes only
    // async-signal-safe system calls (unshare, open, write, close, socket, ioctl) on data
    // prepared before the fork.
    unsafe {
        command.pre_exec(move || {
            let error = std::io::Error::last_os_error;
            if uid == 0 {
                if libc::unshare(libc::CLONE_NEWNET) != 0 {
                    return Err(error());
                }
            } else {
                if libc::unshare(libc::CLONE_NEWUSER | libc::CLONE_NEWNET) != 0 {
                    return Err(error());
                }
                for (path, text) in [
                    (c"/proc/self/setgroups", "deny".as_bytes()),
                    (c"/proc/self/uid_map", uid_map.as_bytes()),
                    (c"/proc/self/gid_map", gid_map.as_bytes()),
                ] {
                    let file = libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                    if file < 0 {
                        return Err(error());
                    }
                    let written = libc::write(file, text.as_ptr().cast(), text.len());
                    libc::close(file);
                    if written < 0 {
                        return Err(error());
                    }
                }
            }
            let mut request: libc::ifreq = std::mem::zeroed();
            for (slot, byte) in request.ifr_name.iter_mut().zip(b"lo") {
                *slot = *byte as libc::c_char;
            }
            let socket = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
            if socket < 0 {
                return Err(error());
            }
            let mut result = libc::ioctl(socket, libc::SIOCGIFFLAGS as _, &mut request);
            if result == 0 {
                request.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
                result = libc::ioctl(socket, libc::SIOCSIFFLAGS as _, &request);
            }
            libc::close(socket);
            if result != 0 {
                return Err(error());
            }
            Ok(())
        });
    }
}

fn parse_user(user: &str) -> Option<(u32, Option<u32>)> {
    match user.split_once(':') {
        Some((uid, gid)) => Some((uid.parse().ok()?, Some(gid.parse().ok()?))),
        None => Some((user.parse().ok()?, None)),
    }
}

/// What a pid file holds: the process group leader, and its start time so that a recycled pid
/// is never killed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PidRecord {
    pub pid: i32,
    pub start_time: u64,
}

impl PidRecord {
    pub fn of(pid: u32) -> Option<PidRecord> {
        let pid = i32::try_from(pid).ok()?;
        Some(PidRecord {
            pid,
            start_time: start_time(pid).unwrap_or(0),
        })
    }

    pub fn encode(&self) -> String {
        format!("{} {}\n", self.pid, self.start_time)
    }

    pub fn decode(text: &str) -> Option<PidRecord> {
        let mut fields = text.split_whitespace();
        let pid = fields.next()?.parse().ok()?;
        let start_time = fields.next()?.parse().ok()?;
        (pid > 0).then_some(PidRecord { pid, start_time })
    }

    /// Whether the recorded process still exists (and is the same process).
    pub fn alive(&self) -> bool {
        // SAFETY: signal 0 only checks for existence and permission.
        let exists = unsafe { libc::kill(self.pid, 0) } == 0
            || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM);
        exists && (self.start_time == 0 || start_time(self.pid) == Some(self.start_time))
    }

    /// SIGKILLs the whole process group, if it is still the recorded one.
    pub fn kill_group(&self) {
        if self.alive() {
            kill_group(self.pid);
        }
    }
}

/// SIGKILLs process group `pgid`.
pub fn kill_group(pgid: i32) {
    if pgid > 0 {
        // SAFETY: plain system call; a negative pid addresses the process group.
        unsafe {
            libc::kill(-pgid, libc::SIGKILL);
        }
    }
}

/// The start time of `pid` in clock ticks since boot (field 22 of `/proc/PID/stat`).
#[cfg(target_os = "linux")]
fn start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces: count after the last `)`.
    let after_name = &stat[stat.rfind(')')? + 1..];
    after_name.split_whitespace().nth(19)?.parse().ok()
}

#[cfg(not(target_os = "linux"))]
fn start_time(_pid: i32) -> Option<u64> {
    None
}

/// The exit code of a finished process, `128 + n` for a process killed by signal `n`.
pub fn exit_code(status: std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => code,
        (None, Some(signal)) => 128 + signal,
        (None, None) => 255,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolve_finds_programs_and_classifies_failures() {
        let dir = tempfile::tempdir().expect("tempdir");
        let found = resolve_program("t", "sh", DEFAULT_PATH, dir.path()).expect("sh");
        assert!(found.ends_with("sh"));
        let missing = resolve_program("t", "no-such-program-x", DEFAULT_PATH, dir.path());
        assert!(matches!(missing, Err(DriverError::ProgramNotFound { .. })));
        std::fs::write(dir.path().join("plain"), "echo").expect("write");
        let refused = resolve_program("t", "./plain", DEFAULT_PATH, dir.path());
        assert!(matches!(refused, Err(DriverError::CannotInvoke { .. })));
        let on_path = resolve_program("t", "plain", dir.path().to_str().unwrap_or("/"), dir.path());
        assert!(matches!(on_path, Err(DriverError::CannotInvoke { .. })));
        let directory = resolve_program("t", "/tmp", DEFAULT_PATH, dir.path());
        assert!(matches!(directory, Err(DriverError::CannotInvoke { .. })));
    }

    #[test]
    fn pid_records_round_trip_and_see_their_own_process() {
        let record = PidRecord::of(std::process::id()).expect("own pid");
        assert_eq!(PidRecord::decode(&record.encode()), Some(record));
        assert!(record.alive());
        let recycled = PidRecord {
            start_time: record.start_time + 1,
            ..record
        };
        if cfg!(target_os = "linux") {
            assert!(
                !recycled.alive(),
                "a different start time is a different process"
            );
        }
        assert_eq!(PidRecord::decode("garbage"), None);
    }

    #[test]
    fn users_are_numeric() {
        assert_eq!(parse_user("1000"), Some((1000, None)));
        assert_eq!(parse_user("1000:100"), Some((1000, Some(100))));
        assert_eq!(parse_user("alice"), None);
    }
}
