//! `ci-exec-init --task DIR` run as the guest agent runs it, on this host: the wrapper is an
//! ordinary static program, so everything but the guest itself is tested here.

use std::io::Write;
use std::path::PathBuf;

fn records(pairs: &[&str]) -> Vec<u8> {
    pairs
        .iter()
        .flat_map(|pair| [pair.as_bytes(), b"\0"].concat())
        .collect()
}

/// Whether something is mounted at `path` (per this process's mount table).
fn is_mount_point(path: &str) -> bool {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .any(|line| line.split(' ').nth(4) == Some(path))
}

/// A fresh directory, removed on drop.
struct Dir(PathBuf);

impl Dir {
    fn new() -> Dir {
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path =
            std::env::temp_dir().join(format!("ci-exec-init-task-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("mkdir");
        Dir(path)
    }

    fn read(&self, name: &str) -> String {
        std::fs::read_to_string(self.0.join(name)).unwrap_or_default()
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Polls `condition` until it holds; fails the test after `timeout`.
fn wait_until(timeout: std::time::Duration, condition: impl Fn() -> bool) {
    let deadline = std::time::Instant::now() + timeout;
    while !condition() {
        assert!(
            std::time::Instant::now() < deadline,
            "condition not met within {timeout:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

fn wrapper() -> std::process::Command {
    std::process::Command::new(env!("CARGO_BIN_EXE_ci-exec-init"))
}

/// Runs the wrapper as the agent would, in a fresh directory holding `spec` (and `stdin` when
/// given); checks that it exits with the code it wrote to `exit`.
fn wrap(spec: &[&str], stdin: Option<&[u8]>) -> Dir {
    let dir = Dir::new();
    std::fs::write(dir.0.join("task"), records(spec)).expect("write task");
    if let Some(stdin) = stdin {
        std::fs::write(dir.0.join("stdin"), stdin).expect("write stdin");
    }
    let status = wrapper()
        .arg("--task")
        .arg(&dir.0)
        .env("PATH", "/usr/bin:/bin")
        .status()
        .expect("run the wrapper");
    let exit: i32 = dir.read("exit").trim().parse().expect("a number in `exit`");
    assert_eq!(status.code(), Some(exit));
    dir
}

#[test]
fn guest_os_tasks_get_exactly_their_env_workdir_stdin_and_exit_code() {
    let dir = wrap(
        &[
            "stdin=file",
            "mode=guest-os",
            "workdir=/tmp",
            "env=ONLY=this one",
            "env=PATH=/usr/bin:/bin",
            "arg=sh",
            "arg=-c",
            "arg=cat; env | sort; pwd; echo oops >&2; exit 3",
        ],
        Some(b"in\n"),
    );
    assert_eq!(dir.read("exit"), "3\n");
    assert_eq!(
        dir.read("stdout"),
        "in\nONLY=this one\nPATH=/usr/bin:/bin\nPWD=/tmp\n/tmp\n"
    );
    assert_eq!(dir.read("stderr"), "oops\n");
    assert!(dir.read("pid").trim().parse::<u32>().is_ok());
}

#[test]
fn missing_commands_workdirs_and_signals_have_shell_exit_codes() {
    let missing = wrap(
        &["mode=guest-os", "env=PATH=/bin", "arg=no-such-program-x"],
        None,
    );
    assert_eq!(missing.read("exit"), "127\n");
    assert!(
        missing
            .read("stderr")
            .contains("`no-such-program-x`: command not found"),
        "{}",
        missing.read("stderr")
    );
    let not_executable = wrap(&["mode=guest-os", "arg=/etc/passwd"], None);
    assert_eq!(not_executable.read("exit"), "126\n");
    let no_workdir = wrap(
        &["mode=guest-os", "workdir=/no/such/dir", "arg=/bin/true"],
        None,
    );
    assert_eq!(no_workdir.read("exit"), "125\n");
    assert!(no_workdir.read("stderr").contains("/no/such/dir"));
    let killed = wrap(
        &["mode=exec", "arg=sh", "arg=-c", "arg=kill -TERM $$"],
        None,
    );
    assert_eq!(killed.read("exit"), "143\n");
    let bad = wrap(&["mode=sideways", "arg=true"], None);
    assert_eq!(bad.read("exit"), "125\n");
    assert!(bad.read("stderr").contains("unknown mode `sideways`"));
    // No `stdin` file although the task says there is one: the task cannot start, and says why
    // where its own errors would have gone.
    let no_stdin = wrap(&["stdin=file", "mode=exec", "arg=cat"], None);
    assert_eq!(no_stdin.read("exit"), "125\n");
    assert!(
        no_stdin.read("stderr").contains("open the task's stdin"),
        "{}",
        no_stdin.read("stderr")
    );
}

#[test]
fn users_are_switched_by_number_and_by_name_when_root() {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !ci_exec_prerequisite::require_that(
        "users_are_switched_by_number_and_by_name_when_root",
        root,
        "switching users needs root",
        "run the tests as root (CI does)",
    ) {
        return;
    }
    let numeric = wrap(
        &["mode=guest-os", "user=65534:65534", "arg=/usr/bin/id"],
        None,
    );
    assert_eq!(
        numeric.read("stdout"),
        "uid=65534(nobody) gid=65534(nogroup) groups=65534(nogroup)\n"
    );
    let named = wrap(
        &["mode=guest-os", "user=nobody", "arg=/usr/bin/id", "arg=-u"],
        None,
    );
    assert_eq!(named.read("stdout"), "65534\n", "{}", named.read("stderr"));
    let unknown = wrap(
        &["mode=guest-os", "user=no-such-user-x", "arg=/bin/true"],
        None,
    );
    assert_eq!(unknown.read("exit"), "125\n");
    assert!(
        unknown
            .read("stderr")
            .contains("`no-such-user-x` does not exist")
    );
}

#[test]
fn exec_mode_inherits_the_agents_environment() {
    let dir = wrap(&["mode=exec", "arg=sh", "arg=-c", "arg=echo $PATH"], None);
    assert_eq!(dir.read("stdout"), "/usr/bin:/bin\n");
    assert_eq!(dir.read("exit"), "0\n");
}

#[test]
fn followed_stdin_is_streamed_until_the_end_marker() {
    let dir = Dir::new();
    std::fs::write(
        dir.0.join("task"),
        records(&["stdin=follow", "mode=exec", "arg=cat"]),
    )
    .expect("task");
    std::fs::write(dir.0.join("stdin"), b"one\n").expect("stdin");
    let mut child = wrapper().arg("--task").arg(&dir.0).spawn().expect("spawn");
    // The first line comes through before the rest exists: the input is streamed.
    wait_until(std::time::Duration::from_secs(10), || {
        dir.read("stdout") == "one\n"
    });
    let mut input = std::fs::OpenOptions::new()
        .append(true)
        .open(dir.0.join("stdin"))
        .expect("open");
    input.write_all(b"two\n").expect("append");
    std::fs::write(dir.0.join("stdin.end"), b"").expect("end");
    assert!(child.wait().expect("wait").success());
    assert_eq!(dir.read("stdout"), "one\ntwo\n");
}

#[test]
fn volumes_are_bound_in_a_private_namespace_when_root() {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !ci_exec_prerequisite::require_that(
        "volumes_are_bound_in_a_private_namespace_when_root",
        root,
        "bind mounts need root",
        "run the tests as root (CI does)",
    ) {
        return;
    }
    let volume = Dir::new();
    std::fs::write(volume.0.join("file"), b"in the volume\n").expect("write");
    let target = format!("/tmp/ci-exec-init-bind-{}", std::process::id());
    let dir = wrap(
        &[
            "mode=guest-os",
            &format!("bind={}", volume.0.display()),
            &format!("at={target}"),
            &format!("workdir={target}"),
            "arg=/bin/cat",
            "arg=file",
        ],
        None,
    );
    assert_eq!(
        dir.read("stdout"),
        "in the volume\n",
        "{}",
        dir.read("stderr")
    );
    // The bind was private to the task: nothing is mounted there outside it.
    assert!(!is_mount_point(&target));
    let _ = std::fs::remove_dir(&target);
}
