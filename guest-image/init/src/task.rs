//! `ci-exec-init --task DIR`: the qemu driver's task wrapper, started by the guest agent.
//!
//! It does what the driver's `run.sh` does for guests without it (see `executor/qemu/src/
//! guest.rs`): becomes a session leader (so stopping the task kills its process group),
//! connects stdin to `DIR/stdin` (whole, or streamed until `DIR/stdin.end` exists) or
//! `/dev/null` and stdout/stderr to `DIR/stdout` and `DIR/stderr`, runs the command, and writes
//! its exit code to `DIR/exit` in one write. For a guest-OS task it first bind-mounts the
//! volumes in a private mount namespace, changes directory, switches user and replaces the
//! environment with exactly the task's.
//!
//! Why not the shell script: the script costs four execs of dynamically linked programs
//! (`setsid`, `sh`, `env`, and `unshare`/`setpriv` when used) before the command's own; under
//! TCG each is tens of milliseconds of translating the loader and libc again, which was half
//! of a warm `ci-exec run`. This binary is static and does the same with system calls.
//!
//! `DIR/task` holds the task as NUL-terminated `key=value` records (so values may hold any
//! byte but NUL, as in argv and environ):
//!
//! ```text
//! stdin=none|file|follow     where stdin comes from
//! mode=guest-os|exec         guest-os: the steps above; exec: argv as given, inherited env
//! workdir=PATH               guest-os: the directory to run in (default `/`)
//! user=NAME|UID|UID:GID      guest-os: whom to run as (default root)
//! bind=SOURCE  at=TARGET     guest-os: a volume directory and where it appears, in pairs
//! env=NAME=VALUE             guest-os: the whole environment, one record per variable
//! caps=container|all         guest-os: `container` keeps only Docker's default capabilities
//!                            (a Fly Machine's root has all: its unprivileged tasks drop them)
//! arg=WORD                   the command, one record per word
//! ```

use std::ffi::{CString, OsStr};
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use crate::system::{self, context};

/// What the wrapper exits with when the task could not be started (the shell version's `exit
/// 125` after a failed `cd` or mount), as Docker does.
const SETUP_FAILED: i32 = 125;
/// A command that was found but cannot be executed, and one that was not found (POSIX).
const CANNOT_EXECUTE: i32 = 126;
const NOT_FOUND: i32 = 127;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StdinFrom {
    None,
    File,
    Follow,
}

/// One task, as read from `DIR/task`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Spec {
    stdin: StdinFrom,
    guest_os: bool,
    workdir: Option<Vec<u8>>,
    user: Option<String>,
    /// `network=none`: a network namespace of its own with only a loopback.
    offline: bool,
    /// `memory=BYTES`: the command's address space is limited to it, as the native driver
    /// limits host processes (a VM has no container runtime around its guest-OS tasks).
    memory: Option<u64>,
    /// `caps=container`: Docker's default capability set instead of root's whole one.
    container_caps: bool,
    binds: Vec<(Vec<u8>, Vec<u8>)>,
    env: Vec<Vec<u8>>,
    argv: Vec<Vec<u8>>,
}

fn parse(bytes: &[u8]) -> Result<Spec, String> {
    let mut spec = Spec {
        stdin: StdinFrom::None,
        guest_os: false,
        workdir: None,
        user: None,
        offline: false,
        memory: None,
        container_caps: false,
        binds: Vec::new(),
        env: Vec::new(),
        argv: Vec::new(),
    };
    let mut pending_bind: Option<Vec<u8>> = None;
    for record in bytes
        .split(|byte| *byte == 0)
        .filter(|record| !record.is_empty())
    {
        let Some(position) = record.iter().position(|byte| *byte == b'=') else {
            return Err(format!(
                "record `{}` has no `=`",
                String::from_utf8_lossy(record)
            ));
        };
        let (key, value) = (&record[..position], record[position + 1..].to_vec());
        let text = || String::from_utf8_lossy(&value).into_owned();
        match key {
            b"stdin" => {
                spec.stdin = match value.as_slice() {
                    b"none" => StdinFrom::None,
                    b"file" => StdinFrom::File,
                    b"follow" => StdinFrom::Follow,
                    _ => return Err(format!("unknown stdin `{}`", text())),
                }
            }
            b"mode" => {
                spec.guest_os = match value.as_slice() {
                    b"guest-os" => true,
                    b"exec" => false,
                    _ => return Err(format!("unknown mode `{}`", text())),
                }
            }
            b"workdir" => spec.workdir = Some(value),
            b"user" => spec.user = Some(text()),
            b"memory" => {
                spec.memory = Some(
                    text()
                        .parse()
                        .map_err(|_| format!("memory `{}` is not a number of bytes", text()))?,
                )
            }
            b"network" => {
                spec.offline = match value.as_slice() {
                    b"none" => true,
                    b"guest" => false,
                    _ => return Err(format!("unknown network `{}`", text())),
                }
            }
            b"caps" => {
                spec.container_caps = match value.as_slice() {
                    b"container" => true,
                    b"all" => false,
                    _ => return Err(format!("unknown caps `{}`", text())),
                }
            }
            b"bind" => pending_bind = Some(value),
            b"at" => {
                let source = pending_bind
                    .take()
                    .ok_or("`at` without a `bind` before it")?;
                spec.binds.push((source, value));
            }
            b"env" => spec.env.push(value),
            b"arg" => spec.argv.push(value),
            _ => return Err(format!("unknown key `{}`", String::from_utf8_lossy(key))),
        }
    }
    if pending_bind.is_some() {
        return Err("`bind` without an `at` after it".to_owned());
    }
    if spec.argv.is_empty() {
        return Err("no `arg`: the command is empty".to_owned());
    }
    Ok(spec)
}

pub fn run(dir: &Path) -> ! {
    let spec = std::fs::read(dir.join("task"))
        .map_err(|error| format!("read `{}`: {error}", dir.join("task").display()))
        .and_then(|bytes| parse(&bytes));
    let spec = match spec {
        Ok(spec) => spec,
        Err(message) => {
            // Where the task's own errors would go, so the user sees it.
            report(dir, &format!("ci-exec-init --task: error: {message}\n"));
            finish(dir, SETUP_FAILED);
        }
    };
    // The agent's child is not a group leader, so this succeeds; were it one, it already leads
    // the group the driver kills.
    // SAFETY: setsid takes no arguments.
    unsafe { libc::setsid() };
    let _ = std::fs::write(dir.join("pid"), format!("{}\n", std::process::id()));
    let code = match start(dir, &spec) {
        Ok(code) => code,
        Err(error) => {
            report(dir, &format!("ci-exec-init --task: error: {error}\n"));
            SETUP_FAILED
        }
    };
    finish(dir, code)
}

/// A task that could not start says why where its own errors would go (`DIR/stderr`, after
/// anything already there), so the user sees it, and on the wrapper's stderr.
fn report(dir: &Path, line: &str) {
    let _ = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("stderr"))
        .and_then(|mut file| file.write_all(line.as_bytes()));
    eprint!("{line}");
}

/// Writes `code` to `DIR/exit` in one write (a reader sees nothing or all of it) and exits.
fn finish(dir: &Path, code: i32) -> ! {
    let _ = std::fs::write(dir.join("exit"), format!("{code}\n"));
    std::process::exit(code)
}

/// Opens the task's stdio, forks the command and waits for it; the command's exit code.
fn start(dir: &Path, spec: &Spec) -> io::Result<i32> {
    let output = |name: &str| {
        File::create(dir.join(name))
            .map_err(|error| context(error, format!("open `{}`", dir.join(name).display())))
    };
    let stdout = output("stdout")?;
    let stderr = output("stderr")?;
    let (stdin, follow_into): (OwnedFd, Option<OwnedFd>) = match spec.stdin {
        StdinFrom::None => (File::open("/dev/null")?.into(), None),
        StdinFrom::File => (
            File::open(dir.join("stdin"))
                .map_err(|error| context(error, "open the task's stdin".to_owned()))?
                .into(),
            None,
        ),
        StdinFrom::Follow => {
            let (read, write) = system::pipe()?;
            (read, Some(write))
        }
    };
    // SAFETY: single-threaded until after the fork (the follow thread starts in the parent).
    let child = unsafe { libc::fork() };
    if child < 0 {
        return Err(context(io::Error::last_os_error(), "fork".to_owned()));
    }
    if child == 0 {
        // The command's stderr is the task's from here on: messages go where the task's would.
        for (from, to) in [
            (stdin.as_raw_fd(), 0),
            (stdout.as_raw_fd(), 1),
            (stderr.as_raw_fd(), 2),
        ] {
            // SAFETY: dup2 onto the standard descriptors; dup2 clears close-on-exec.
            unsafe { libc::dup2(from, to) };
        }
        let code = exec_command(spec);
        // SAFETY: leaving the child without the parent's exit handlers.
        unsafe { libc::_exit(code) }
    }
    drop(stdin);
    if let Some(pipe) = follow_into {
        let (file, end) = (dir.join("stdin"), dir.join("stdin.end"));
        std::thread::spawn(move || {
            let fd = pipe.as_raw_fd();
            let mut writer = File::from(pipe);
            if let Err(error) = crate::follow::copy(&file, &end, &mut writer, |timeout| {
                crate::follow::reader_gone(fd, timeout)
            }) {
                let _ = writeln!(io::stderr(), "ci-exec-init --task: stdin: {error}");
            }
        });
    }
    let mut status = 0;
    loop {
        // SAFETY: waitpid with a valid status pointer.
        let waited = unsafe { libc::waitpid(child, &mut status, 0) };
        if waited == child {
            break;
        }
        let error = io::Error::last_os_error();
        if error.kind() != io::ErrorKind::Interrupted {
            return Err(context(error, "wait for the command".to_owned()));
        }
    }
    Ok(if libc::WIFSIGNALED(status) {
        128 + libc::WTERMSIG(status)
    } else {
        libc::WEXITSTATUS(status)
    })
}

/// In the child: the guest-OS steps, then exec. Returns only the exit code of a failure.
fn exec_command(spec: &Spec) -> i32 {
    let fail = |code: i32, message: String| {
        let _ = writeln!(io::stderr(), "ci-exec: {message}");
        code
    };
    if spec.guest_os {
        if let Err(error) = bind_volumes(&spec.binds) {
            return fail(SETUP_FAILED, error.to_string());
        }
        if spec.offline
            && let Err(error) = leave_the_network()
        {
            return fail(SETUP_FAILED, error.to_string());
        }
        let workdir = spec.workdir.as_deref().unwrap_or(b"/");
        if let Err(error) = std::env::set_current_dir(OsStr::from_bytes(workdir)) {
            return fail(
                SETUP_FAILED,
                format!(
                    "cannot change to working directory `{}`: {error}",
                    String::from_utf8_lossy(workdir)
                ),
            );
        }
        if spec.container_caps
            && let Err(error) = drop_capabilities()
        {
            return fail(SETUP_FAILED, error.to_string());
        }
        if let Some(user) = &spec.user
            && let Err(error) = switch_user(user)
        {
            return fail(SETUP_FAILED, error.to_string());
        }
        if let Some(memory) = spec.memory {
            let limit = libc::rlimit {
                rlim_cur: memory as libc::rlim_t,
                rlim_max: memory as libc::rlim_t,
            };
            // SAFETY: setrlimit with a valid rlimit value.
            if unsafe { libc::setrlimit(libc::RLIMIT_AS, &limit) } != 0 {
                return fail(
                    SETUP_FAILED,
                    format!(
                        "limit the memory to {memory} bytes: {}",
                        io::Error::last_os_error()
                    ),
                );
            }
        }
    }
    let Ok(argv) = c_strings(&spec.argv) else {
        return fail(SETUP_FAILED, "a command word holds a NUL byte".to_owned());
    };
    let environment: Vec<Vec<u8>> = if spec.guest_os {
        spec.env.clone()
    } else {
        std::env::vars_os()
            .map(|(name, value)| [name.as_bytes(), b"=", value.as_bytes()].concat())
            .collect()
    };
    let Ok(envp) = c_strings(&environment) else {
        return fail(
            SETUP_FAILED,
            "an environment entry holds a NUL byte".to_owned(),
        );
    };
    let search_path = environment
        .iter()
        .find_map(|entry| entry.strip_prefix(b"PATH="))
        .unwrap_or(b"/usr/local/bin:/usr/bin:/bin");
    let program = &spec.argv[0];
    let candidates: Vec<PathBuf> = if program.contains(&b'/') {
        vec![PathBuf::from(OsStr::from_bytes(program))]
    } else {
        search_path
            .split(|byte| *byte == b':')
            .map(|directory| {
                let directory = if directory.is_empty() {
                    b"."
                } else {
                    directory
                };
                Path::new(OsStr::from_bytes(directory)).join(OsStr::from_bytes(program))
            })
            .collect()
    };
    let argv_pointers = pointers(&argv);
    let envp_pointers = pointers(&envp);
    let mut denied = None;
    for candidate in candidates {
        let Ok(path) = CString::new(candidate.as_os_str().as_bytes()) else {
            continue;
        };
        // SAFETY: NULL-terminated arrays of NUL-terminated strings that outlive the call.
        unsafe {
            libc::execve(
                path.as_ptr(),
                argv_pointers.as_ptr(),
                envp_pointers.as_ptr(),
            )
        };
        let error = io::Error::last_os_error();
        match error.raw_os_error() {
            Some(libc::ENOENT) | Some(libc::ENOTDIR) => {}
            _ => denied = Some((candidate, error)),
        }
    }
    let name = String::from_utf8_lossy(program);
    match denied {
        Some((path, error)) => fail(
            CANNOT_EXECUTE,
            format!("cannot execute `{}`: {error}", path.display()),
        ),
        None => fail(NOT_FOUND, format!("`{name}`: command not found")),
    }
}

/// A network namespace of our own, before the user switch (only root may make one): no
/// interface but a loopback, which is brought up so that tasks can still talk to themselves.
fn leave_the_network() -> io::Result<()> {
    // SAFETY: unshare with a constant flag.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        return Err(context(
            io::Error::last_os_error(),
            "unshare the network namespace".to_owned(),
        ));
    }
    system::loopback_up()
}

/// Docker's default capabilities (moby `oci/caps/defaults.go`): CHOWN, DAC_OVERRIDE, FOWNER,
/// FSETID, KILL, SETGID, SETUID, SETPCAP, NET_BIND_SERVICE, NET_RAW, SYS_CHROOT, MKNOD,
/// AUDIT_WRITE, SETFCAP.
const CONTAINER_CAPABILITIES: u64 = (1 << 0)
    | (1 << 1)
    | (1 << 3)
    | (1 << 4)
    | (1 << 5)
    | (1 << 6)
    | (1 << 7)
    | (1 << 8)
    | (1 << 10)
    | (1 << 13)
    | (1 << 18)
    | (1 << 27)
    | (1 << 29)
    | (1 << 31);

/// Keeps only [`CONTAINER_CAPABILITIES`], before the user switch: out of the bounding set (so
/// an exec as root cannot regain them) and out of the effective, permitted and inheritable
/// sets.
fn drop_capabilities() -> io::Result<()> {
    for capability in 0..64u64 {
        if CONTAINER_CAPABILITIES & (1 << capability) != 0 {
            continue;
        }
        // SAFETY: prctl with integer arguments; EINVAL past the kernel's last capability.
        if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, capability as libc::c_ulong, 0, 0, 0) } != 0
        {
            let error = io::Error::last_os_error();
            if error.raw_os_error() == Some(libc::EINVAL) {
                break;
            }
            return Err(context(error, "drop a capability".to_owned()));
        }
    }
    #[repr(C)]
    struct Header {
        version: u32,
        pid: libc::c_int,
    }
    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const VERSION_3: u32 = 0x2008_0522;
    let mut header = Header {
        version: VERSION_3,
        pid: 0,
    };
    let mut data = [Data::default(); 2];
    // SAFETY: capget with a version-3 header and room for its two data words.
    if unsafe { libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()) } != 0 {
        return Err(context(io::Error::last_os_error(), "capget".to_owned()));
    }
    for (word, data) in data.iter_mut().enumerate() {
        let keep = (CONTAINER_CAPABILITIES >> (32 * word)) as u32;
        data.effective &= keep;
        data.permitted &= keep;
        data.inheritable &= keep;
    }
    // SAFETY: capset with the header and data capget filled in.
    if unsafe { libc::syscall(libc::SYS_capset, &header, data.as_ptr()) } != 0 {
        return Err(context(io::Error::last_os_error(), "capset".to_owned()));
    }
    // SAFETY: prctl with integer arguments.
    unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
            0,
            0,
            0,
        )
    };
    Ok(())
}

/// A private mount namespace with each `(source, target)` bind-mounted, both created.
fn bind_volumes(binds: &[(Vec<u8>, Vec<u8>)]) -> io::Result<()> {
    if binds.is_empty() {
        return Ok(());
    }
    // SAFETY: unshare with a constant flag.
    if unsafe { libc::unshare(libc::CLONE_NEWNS) } != 0 {
        return Err(context(
            io::Error::last_os_error(),
            "unshare the mount namespace".to_owned(),
        ));
    }
    system::mount(
        "none",
        Path::new("/"),
        "",
        libc::MS_REC | libc::MS_PRIVATE,
        "",
    )?;
    for (source, target) in binds {
        let (source, target) = (
            Path::new(OsStr::from_bytes(source)),
            Path::new(OsStr::from_bytes(target)),
        );
        // The source too: the `fly` driver's volumes are directories made on first use.
        for directory in [source, target] {
            std::fs::create_dir_all(directory)
                .map_err(|error| context(error, format!("create `{}`", directory.display())))?;
        }
        system::mount(&source.to_string_lossy(), target, "", libc::MS_BIND, "")?;
    }
    Ok(())
}

/// `UID:GID` sets both and drops supplementary groups; a name or UID takes the group and
/// supplementary groups from the user database (an unknown UID runs with group 0, as Docker
/// and podman do).
fn switch_user(user: &str) -> io::Result<()> {
    let invalid = |what: String| io::Error::new(io::ErrorKind::InvalidInput, what);
    let (uid, gid, name) = match user.split_once(':') {
        Some((uid, gid)) => {
            let uid = uid
                .parse::<libc::uid_t>()
                .map_err(|_| invalid(format!("user `{user}`: UID:GID must be numbers")))?;
            let gid = gid
                .parse::<libc::gid_t>()
                .map_err(|_| invalid(format!("user `{user}`: UID:GID must be numbers")))?;
            (uid, gid, None)
        }
        None => match lookup_user(user) {
            Some((uid, gid, name)) => (uid, gid, Some(name)),
            None => match user.parse::<libc::uid_t>() {
                Ok(uid) => (uid, 0, None),
                Err(_) => return Err(invalid(format!("user `{user}` does not exist"))),
            },
        },
    };
    // SAFETY: plain credential calls; `name` is NUL-terminated and outlives initgroups.
    let failed = unsafe {
        let groups = match &name {
            Some(name) => libc::initgroups(name.as_ptr(), gid),
            None => libc::setgroups(0, std::ptr::null()),
        };
        groups != 0 || libc::setgid(gid) != 0 || libc::setuid(uid) != 0
    };
    if failed {
        return Err(context(
            io::Error::last_os_error(),
            format!("switch to user `{user}`"),
        ));
    }
    Ok(())
}

/// `(uid, gid, name)` of a user given by name or UID, from the user database.
fn lookup_user(user: &str) -> Option<(libc::uid_t, libc::gid_t, CString)> {
    let name = CString::new(user).ok()?;
    // SAFETY: getpwnam/getpwuid return a pointer into static storage or NULL; it is read
    // before any other call that could overwrite it (the child is single-threaded).
    unsafe {
        let mut entry = libc::getpwnam(name.as_ptr());
        if entry.is_null()
            && let Ok(uid) = user.parse::<libc::uid_t>()
        {
            entry = libc::getpwuid(uid);
        }
        if entry.is_null() {
            return None;
        }
        let entry = &*entry;
        let name = std::ffi::CStr::from_ptr(entry.pw_name).to_owned();
        Some((entry.pw_uid, entry.pw_gid, name))
    }
}

fn c_strings(values: &[Vec<u8>]) -> Result<Vec<CString>, std::ffi::NulError> {
    values
        .iter()
        .map(|value| CString::new(value.clone()))
        .collect()
}

/// A NULL-terminated array of pointers into `strings`.
fn pointers(strings: &[CString]) -> Vec<*const libc::c_char> {
    strings
        .iter()
        .map(|string| string.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn records(pairs: &[&str]) -> Vec<u8> {
        pairs
            .iter()
            .flat_map(|pair| [pair.as_bytes(), b"\0"].concat())
            .collect()
    }

    #[test]
    fn specs_parse_and_bad_ones_are_named() {
        let spec = parse(&records(&[
            "stdin=follow",
            "mode=guest-os",
            "workdir=/data",
            "user=1000:100",
            "network=none",
            "memory=1048576",
            "caps=container",
            "bind=/mnt/ci/volumes/v",
            "at=/data",
            "env=A=1=2",
            "env=PATH=/bin",
            "arg=sh",
            "arg=-c",
            "arg=echo \"$A\"",
        ]))
        .expect("parse");
        assert_eq!(
            spec,
            Spec {
                stdin: StdinFrom::Follow,
                guest_os: true,
                workdir: Some(b"/data".to_vec()),
                user: Some("1000:100".to_owned()),
                offline: true,
                memory: Some(1048576),
                container_caps: true,
                binds: vec![(b"/mnt/ci/volumes/v".to_vec(), b"/data".to_vec())],
                env: vec![b"A=1=2".to_vec(), b"PATH=/bin".to_vec()],
                argv: vec![b"sh".to_vec(), b"-c".to_vec(), b"echo \"$A\"".to_vec()],
            }
        );
        for (bad, message) in [
            (records(&["mode=guest-os"]), "command is empty"),
            (records(&["arg=x", "bind=/a"]), "`bind` without an `at`"),
            (records(&["arg=x", "at=/a"]), "`at` without a `bind`"),
            (records(&["arg=x", "stdin=maybe"]), "unknown stdin `maybe`"),
            (records(&["arg=x", "colour=red"]), "unknown key `colour`"),
            (
                records(&["arg=x", "network=some"]),
                "unknown network `some`",
            ),
            (records(&["arg=x", "novalue"]), "has no `=`"),
        ] {
            let error = parse(&bad).expect_err("bad spec");
            assert!(error.contains(message), "{error}");
        }
    }
}
