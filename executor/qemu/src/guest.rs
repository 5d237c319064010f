//! The shell scripts a task runs as in the guest.
//!
//! Live output: a task's stdin, stdout and stderr are files in its directory on the 9p share
//! (`/mnt/ci/tasks/<id>/` in the guest, `<run>/share/tasks/<id>/` on the host). The guest
//! writes through 9p with `cache=none`, so every write lands in the host file before the
//! writer continues, and the host tails those files while the task runs: byte-exact, stdout
//! and stderr kept apart, readable after exit and again. The exit code is written last, to
//! `exit` (through a rename, so a reader never sees half of it). QGA's `guest-exec-status`
//! only tells whether the wrapper itself is gone (killed before it could write `exit`).
//!
//! A task without an image runs in the guest OS as root, with exactly its own environment
//! (`env -i`), in a private mount namespace where its volumes are bind-mounted at their paths.
//! A task with an image runs under `podman run` in the guest, volumes bind-mounted from the
//! share.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use ci_exec_driver::{DriverError, Task};

use crate::machine::{GUEST_PATH, shell_quote};
use crate::run_dir::GUEST_SHARE;

/// The guest directory of task `id`.
pub fn guest_task_dir(id: &str) -> String {
    format!("{GUEST_SHARE}/tasks/{id}")
}

/// The guest directory of volume `name`.
pub fn guest_volume_dir(name: &str) -> String {
    format!("{GUEST_SHARE}/volumes/{name}")
}

/// Checks a task id or volume name for use as a file name and a podman name.
pub fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 128 {
        return Err("must be 1 to 128 characters".to_owned());
    }
    if name.starts_with('.') || name.starts_with('-') {
        return Err("must not start with `.` or `-`".to_owned());
    }
    if let Some(bad) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')))
    {
        return Err(format!(
            "contains `{bad}`; use letters, digits, `_`, `.` or `-`"
        ));
    }
    Ok(())
}

/// Checks a task before anything is started.
pub fn check_task(task: &Task) -> Result<(), DriverError> {
    let invalid = |reason: String| DriverError::InvalidTask {
        task: task.id.clone(),
        reason,
    };
    check_name(&task.id).map_err(|reason| invalid(format!("id {reason}")))?;
    if task.command.is_empty() {
        return Err(invalid("the command is empty".to_owned()));
    }
    for mount in &task.mounts {
        check_name(&mount.volume).map_err(|reason| DriverError::InvalidVolume {
            volume: mount.volume.clone(),
            reason,
        })?;
        mount.check(&task.id)?;
    }
    for name in task.env.keys() {
        if name.is_empty() || name.contains('=') {
            return Err(invalid(format!(
                "environment variable name `{name}` is invalid"
            )));
        }
    }
    Ok(())
}

/// The environment the guest agent starts a wrapper with (never the task's own).
pub fn wrapper_env() -> Vec<String> {
    vec![format!("PATH={GUEST_PATH}"), "HOME=/root".to_owned()]
}

/// Tasks run offline (`--network=none`), yet podman 4.3 still looks for its default network
/// backend's binary (`netavark`) and fails without it; the CNI backend needs no binary for
/// `none`.
const PODMAN_NETWORK_BACKEND: &str = "--network-backend=cni";
/// No events file: nothing reads it, and writing it costs each podman command time in the
/// guest (measured under TCG: ~0.25 s of a ~3.1 s `podman run`).
const PODMAN_EVENTS: &str = "--events-backend=none";

/// Where a task's stdin comes from, in its directory on the share.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StdinSource {
    /// `/dev/null`.
    None,
    /// `stdin`, written whole before the task starts.
    File,
    /// `stdin` as the host appends to it, until `stdin.end` exists: copied by our init's
    /// `--follow` helper (a 9p reader cannot block on a growing file).
    Follow,
}

/// The guest helper that streams a growing file (`guest-image/init/src/follow.rs`).
const FOLLOW: &str = "/usr/sbin/ci-exec-init --follow";
/// The guest's static task wrapper, run as `ci-exec-init --task DIR`
/// (`guest-image/init/src/task.rs`).
pub const TASK_HELPER: &str = "/usr/sbin/ci-exec-init";

/// How a script should run its command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Runner<'a> {
    /// In the guest OS.
    GuestOs,
    /// `podman run` of this image, as container `name`.
    PodmanRun { image: &'a str, name: &'a str },
    /// `podman run --detach` of this image as container `name`, idling in `sleep`: a sandbox.
    PodmanStart { image: &'a str, name: &'a str },
    /// `podman exec` in the running container `name`.
    PodmanExec { name: &'a str },
    /// `crun run` of the warm state's template of this image as container `name`
    /// ([`crate::oci`]), with `podman run` as the fallback.
    Crun {
        image: &'a str,
        name: &'a str,
        template: &'a crate::oci::Template,
        /// On the root filesystem the saved state mounted (the VM's first such task).
        premounted: bool,
    },
}

/// The wrapper script for a task (`run.sh`), which the agent starts as
/// `setsid -w /bin/sh run.sh`. `env` is the complete environment of the command.
pub fn task_script(
    task: &Task,
    env: &BTreeMap<String, String>,
    runner: Runner<'_>,
    stdin: StdinSource,
) -> String {
    let dir = guest_task_dir(&task.id);
    let has_stdin = stdin != StdinSource::None;
    let mut script = String::new();
    let _ = writeln!(script, "d={}", shell_quote(&dir));
    script.push_str("echo $$ >\"$d/pid\"\n");
    let redirect = match stdin {
        StdinSource::File => "\"$d/stdin\"",
        StdinSource::None | StdinSource::Follow => "/dev/null",
    };
    let _ = writeln!(script, "exec <{redirect} >\"$d/stdout\" 2>\"$d/stderr\"");
    if stdin == StdinSource::Follow {
        // A pipeline's status is its last command's: the task's.
        let _ = writeln!(script, "{FOLLOW} \"$d/stdin\" \"$d/stdin.end\" |");
    }
    match runner {
        Runner::GuestOs => guest_os_command(&mut script, task, env),
        _ => push_argv(&mut script, &podman_argv(task, env, runner, has_stdin)),
    }
    // One write(2) of a few bytes lands whole on the host (one 9p write); a reader that
    // comes between the create and the write sees an empty file and reads again. (A rename
    // would cost an exec of `mv`, tens of milliseconds under TCG, before the exit is seen.)
    script.push_str("echo $? >\"$d/exit\"\n");
    // The container is not removed (`--rm` holds the exit back ~3 s, a `podman rm` after it
    // takes guest CPU from the next task): the VM and all it holds go at `close`, and a task
    // id names one container for the driver's life.
    script
}

/// The `podman run` or `podman exec` command line of a task that has an image (none for the
/// guest OS).
fn podman_argv(
    task: &Task,
    env: &BTreeMap<String, String>,
    runner: Runner<'_>,
    has_stdin: bool,
) -> Vec<String> {
    match runner {
        Runner::GuestOs => Vec::new(),
        Runner::Crun {
            image,
            name,
            template,
            premounted,
        } => {
            let fallback = podman_argv(task, env, Runner::PodmanRun { image, name }, has_stdin);
            template.command(&guest_task_dir(&task.id), name, &fallback, premounted)
        }
        Runner::PodmanRun { image, name } | Runner::PodmanStart { image, name } => {
            let mut argv: Vec<String> = [
                "/usr/bin/podman",
                PODMAN_NETWORK_BACKEND,
                PODMAN_EVENTS,
                "run",
                // Online tasks share the guest's network (the VM is the boundary, and a
                // bridge would need netfilter modules and setup for no gain); the rest have
                // only a loopback.
                if task.network == Some(true) {
                    "--network=host"
                } else {
                    "--network=none"
                },
                "--pull=never",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            if matches!(runner, Runner::PodmanStart { .. }) {
                argv.extend([
                    "--log-driver=none".to_owned(),
                    "--rm".to_owned(),
                    "--detach".to_owned(),
                    "--entrypoint=sleep".to_owned(),
                ]);
            } else {
                // The container gets the wrapper's stdio (the task's files on the share)
                // itself: no conmon log, no attach socket for podman to copy through
                // (measured: ~0.3 s of a ~3.1 s `podman run` under TCG).
                argv.push("--log-driver=passthrough".to_owned());
            }
            // Measured in the guest under TCG: cgroup setup is ~1.2 s of a ~10 s `podman run`;
            // without limits there is nothing to put in a cgroup.
            if task.limits == ci_exec_driver::Limits::default() {
                argv.push("--cgroups=disabled".to_owned());
            }
            argv.push(format!("--name={name}"));
            podman_options(&mut argv, task, env, has_stdin);
            if task.privileged {
                argv.push("--privileged".to_owned());
            }
            if task.limits.memory_bytes > 0 {
                argv.push(format!("--memory={}b", task.limits.memory_bytes));
            }
            if task.limits.cpu_shares > 0 {
                argv.push(format!("--cpu-shares={}", task.limits.cpu_shares));
            }
            for mount in &task.mounts {
                argv.push(format!(
                    "--volume={}:{}",
                    guest_volume_dir(&mount.volume),
                    mount.path
                ));
            }
            argv.push(image.to_owned());
            argv.extend(task.command.iter().cloned());
            argv
        }
        Runner::PodmanExec { name } => {
            let mut argv: Vec<String> = vec![
                "/usr/bin/podman".to_owned(),
                PODMAN_NETWORK_BACKEND.to_owned(),
                PODMAN_EVENTS.to_owned(),
                "exec".to_owned(),
            ];
            podman_options(&mut argv, task, env, has_stdin);
            argv.push(name.to_owned());
            argv.extend(task.command.iter().cloned());
            argv
        }
    }
}

/// The task file that `ci-exec-init --task` reads (`guest-image/init/src/task.rs`): the same
/// task as [`task_script`], as NUL-terminated `key=value` records, for guests whose init has
/// the wrapper (control protocol 2). `env` is the complete environment of the command.
pub fn task_spec(
    task: &Task,
    env: &BTreeMap<String, String>,
    runner: Runner<'_>,
    stdin: StdinSource,
) -> Vec<u8> {
    let mut records: Vec<(&str, String)> = vec![(
        "stdin",
        match stdin {
            StdinSource::None => "none",
            StdinSource::File => "file",
            StdinSource::Follow => "follow",
        }
        .to_owned(),
    )];
    let argv = match runner {
        Runner::GuestOs => {
            records.push(("mode", "guest-os".to_owned()));
            // Guest-OS tasks are offline unless they ask: the wrapper gives them a network
            // namespace of their own with only a loopback.
            let network = if task.network == Some(true) {
                "guest"
            } else {
                "none"
            };
            records.push(("network", network.to_owned()));
            if task.limits.memory_bytes > 0 {
                records.push(("memory", task.limits.memory_bytes.to_string()));
            }
            if let Some(workdir) = &task.workdir {
                records.push(("workdir", workdir.clone()));
            }
            if let Some(user) = &task.user {
                records.push(("user", user.clone()));
            }
            for mount in &task.mounts {
                records.push(("bind", guest_volume_dir(&mount.volume)));
                records.push(("at", mount.path.clone()));
            }
            for (name, value) in command_env(env) {
                records.push(("env", format!("{name}={value}")));
            }
            task.command.clone()
        }
        _ => {
            records.push(("mode", "exec".to_owned()));
            podman_argv(task, env, runner, stdin != StdinSource::None)
        }
    };
    for word in argv {
        records.push(("arg", word));
    }
    let mut bytes = Vec::new();
    for (key, value) in records {
        bytes.extend_from_slice(key.as_bytes());
        bytes.push(b'=');
        bytes.extend_from_slice(value.as_bytes());
        bytes.push(0);
    }
    bytes
}

fn podman_options(
    argv: &mut Vec<String>,
    task: &Task,
    env: &BTreeMap<String, String>,
    has_stdin: bool,
) {
    if has_stdin {
        argv.push("--interactive".to_owned());
    }
    if let Some(user) = &task.user {
        argv.push(format!("--user={user}"));
    }
    if let Some(workdir) = &task.workdir {
        argv.push(format!("--workdir={workdir}"));
    }
    for (name, value) in env {
        argv.push(format!("--env={name}={value}"));
    }
}

fn push_argv(script: &mut String, argv: &[String]) {
    let quoted: Vec<String> = argv.iter().map(|argument| shell_quote(argument)).collect();
    script.push_str(&quoted.join(" "));
    script.push('\n');
}

/// A guest-OS command's whole environment: the task's, with the guest's `PATH` unless it
/// sets one.
fn command_env(env: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    let mut env = env.clone();
    env.entry("PATH".to_owned())
        .or_insert_with(|| GUEST_PATH.to_owned());
    env
}

/// The guest-OS path: volumes bind-mounted in a private mount namespace, then `cd`, then the
/// user switch, then `env -i` with exactly the task's environment.
fn guest_os_command(script: &mut String, task: &Task, env: &BTreeMap<String, String>) {
    let mut inner = String::new();
    for mount in &task.mounts {
        let _ = writeln!(
            inner,
            "/usr/bin/mkdir -p {path} && /usr/bin/mount --bind {volume} {path} || exit 125",
            path = shell_quote(&mount.path),
            volume = shell_quote(&guest_volume_dir(&mount.volume)),
        );
    }
    let workdir = task.workdir.as_deref().unwrap_or("/");
    let _ = writeln!(inner, "cd {} || exit 125", shell_quote(workdir));
    let mut argv: Vec<String> = vec!["exec".to_owned()];
    if let Some(user) = &task.user {
        argv.push("/usr/bin/setpriv".to_owned());
        match user.split_once(':') {
            Some((uid, gid)) => {
                argv.extend([
                    format!("--reuid={uid}"),
                    format!("--regid={gid}"),
                    "--clear-groups".to_owned(),
                ]);
            }
            None => {
                argv.extend([
                    format!("--reuid={user}"),
                    format!("--regid=$(/usr/bin/id -g {})", shell_quote(user)),
                    "--init-groups".to_owned(),
                ]);
            }
        }
        argv.push("--".to_owned());
    }
    // `--` ends env's options; what follows is `NAME=value`s, then the command.
    argv.extend(["/usr/bin/env".to_owned(), "-i".to_owned(), "--".to_owned()]);
    let env = command_env(env);
    let mut quoted: Vec<String> = Vec::new();
    for argument in &argv {
        // `$(id -g user)` must expand; everything else is literal.
        if argument.starts_with("--regid=$(") {
            quoted.push(format!("\"{argument}\""));
        } else {
            quoted.push(shell_quote(argument));
        }
    }
    for (name, value) in &env {
        quoted.push(shell_quote(&format!("{name}={value}")));
    }
    for argument in &task.command {
        quoted.push(shell_quote(argument));
    }
    inner.push_str(&quoted.join(" "));
    inner.push('\n');
    if task.mounts.is_empty() {
        let _ = writeln!(script, "(\n{inner})");
    } else {
        let _ = writeln!(
            script,
            "/usr/bin/unshare --mount --propagation private /bin/sh -c {}",
            shell_quote(&inner)
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        for good in ["a", "task-1", "T_2.x"] {
            assert!(check_name(good).is_ok(), "{good}");
        }
        for bad in ["", ".", "..", "a/b", "-x", "a b", &"x".repeat(129)] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn guest_os_script_runs_with_exactly_the_task_env() {
        let task = Task::new("t1", ["echo", "it's"]).env("A", "1 2");
        let script = task_script(&task, &task.env, Runner::GuestOs, StdinSource::None);
        assert!(script.contains("d=/mnt/ci/tasks/t1\n"), "{script}");
        assert!(script.contains("exec </dev/null >\"$d/stdout\" 2>\"$d/stderr\""));
        assert!(
            script.contains(
                "exec /usr/bin/env -i -- 'A=1 2' PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin echo 'it'\\''s'"
            ),
            "{script}"
        );
        assert!(script.contains("cd / || exit 125"));
        assert!(!script.contains("unshare"));
        assert!(script.ends_with(")\necho $? >\"$d/exit\"\n"), "{script}");
    }

    #[test]
    fn guest_os_mounts_use_a_private_namespace() {
        let task = Task::new("t2", ["ls"])
            .mount("cache", "/work/cache")
            .workdir("/work")
            .user("1000:1000");
        let script = task_script(&task, &task.env, Runner::GuestOs, StdinSource::File);
        assert!(script.contains("exec <\"$d/stdin\""));
        assert!(script.contains("/usr/bin/unshare --mount --propagation private /bin/sh -c '"));
        assert!(script.contains("/usr/bin/mount --bind /mnt/ci/volumes/cache /work/cache"));
        assert!(script.contains("--reuid=1000 --regid=1000 --clear-groups --"));
    }

    #[test]
    fn podman_script_passes_env_volumes_user_and_stdin() {
        let task = Task::new("t3", ["sh", "-c", "cat"])
            .image("localhost/ci-exec/base:latest")
            .env("K", "v")
            .mount("data", "/data")
            .workdir("/data")
            .user("nobody");
        let script = task_script(
            &task,
            &task.env,
            Runner::PodmanRun {
                image: &task.image,
                name: "ns-t3",
            },
            StdinSource::File,
        );
        assert!(
            script.contains(
                "/usr/bin/podman --network-backend=cni --events-backend=none run --network=none --pull=never --log-driver=passthrough --cgroups=disabled --name=ns-t3 --interactive --user=nobody --workdir=/data --env=K=v --volume=/mnt/ci/volumes/data:/data localhost/ci-exec/base:latest sh -c cat"
            ),
            "{script}"
        );
    }

    fn records(spec: &[u8]) -> Vec<String> {
        assert_eq!(spec.last(), Some(&0), "records end with NUL");
        spec.split(|byte| *byte == 0)
            .filter(|record| !record.is_empty())
            .map(|record| String::from_utf8(record.to_vec()).expect("utf-8"))
            .collect()
    }

    #[test]
    fn guest_os_task_files_hold_env_mounts_user_and_command() {
        let task = Task::new("t5", ["sh", "-c", "echo \"$A\""])
            .env("A", "1 2")
            .mount("cache", "/work/cache")
            .workdir("/work")
            .user("1000:1000");
        let spec = task_spec(&task, &task.env, Runner::GuestOs, StdinSource::File);
        let online = task_spec(
            &Task::new("t6", ["true"]).network(true),
            &BTreeMap::new(),
            Runner::GuestOs,
            StdinSource::None,
        );
        assert!(records(&online).contains(&"network=guest".to_owned()));
        let podman = Runner::PodmanRun {
            image: "i",
            name: "n",
        };
        assert!(
            podman_argv(
                &Task::new("t7", ["true"]).network(true),
                &BTreeMap::new(),
                podman,
                false
            )
            .contains(&"--network=host".to_owned())
        );
        assert!(
            podman_argv(&Task::new("t8", ["true"]), &BTreeMap::new(), podman, false)
                .contains(&"--network=none".to_owned())
        );
        assert_eq!(
            records(&spec),
            [
                "stdin=file",
                "mode=guest-os",
                "network=none",
                "workdir=/work",
                "user=1000:1000",
                "bind=/mnt/ci/volumes/cache",
                "at=/work/cache",
                "env=A=1 2",
                &format!("env=PATH={GUEST_PATH}"),
                "arg=sh",
                "arg=-c",
                "arg=echo \"$A\"",
            ]
        );
    }

    #[test]
    fn podman_task_files_run_the_same_command_line_as_the_script() {
        let task = Task::new("t6", ["cat"]).image("img").env("K", "v");
        let runner = Runner::PodmanRun {
            image: &task.image,
            name: "ns-t6",
        };
        let spec = records(&task_spec(&task, &task.env, runner, StdinSource::Follow));
        assert_eq!(spec[..2], ["stdin=follow", "mode=exec"]);
        let argv: Vec<String> = spec[2..]
            .iter()
            .map(|record| record.strip_prefix("arg=").expect("arg").to_owned())
            .collect();
        assert_eq!(argv, podman_argv(&task, &task.env, runner, true));
        assert!(argv.contains(&"--interactive".to_owned()));
        let script = task_script(&task, &task.env, runner, StdinSource::Follow);
        let quoted: Vec<String> = argv.iter().map(|word| shell_quote(word)).collect();
        assert!(script.contains(&quoted.join(" ")), "{script}");
    }

    #[test]
    fn tasks_are_checked() {
        assert!(check_task(&Task::new("ok", ["true"])).is_ok());
        assert!(check_task(&Task::new("ok", Vec::<String>::new())).is_err());
        assert!(check_task(&Task::new("../x", ["true"])).is_err());
        assert!(check_task(&Task::new("ok", ["true"]).mount("v", "relative")).is_err());
        assert!(check_task(&Task::new("ok", ["true"]).mount("a/b", "/x")).is_err());
    }

    #[test]
    fn streamed_stdin_is_piped_from_the_follow_helper() {
        let task = Task::new("t4", ["cat"]).image("img");
        let script = task_script(
            &task,
            &task.env,
            Runner::PodmanRun {
                image: &task.image,
                name: "ns-t4",
            },
            StdinSource::Follow,
        );
        assert!(
            script.contains(
                "exec </dev/null >\"$d/stdout\" 2>\"$d/stderr\"\n/usr/sbin/ci-exec-init --follow \"$d/stdin\" \"$d/stdin.end\" |\n/usr/bin/podman "
            ),
            "{script}"
        );
        assert!(script.contains(" --interactive "), "{script}");
    }
}
