//! Real VMs: QEMU (TCG is enough) and the default guest image. Without them the tests skip
//! with the reason, except under `CI=true`, where a missing prerequisite fails loudly.

use std::collections::BTreeMap;
use std::time::Duration;

use ci_exec_driver::{Container, Driver, Stdin, Task, wait_for_exit};
use ci_exec_qemu::{QemuConfig, QemuDriver};

const BASE_IMAGE: &str = "localhost/ci-exec/base:latest";

/// A driver for a fresh namespace, or `None` (after saying why) when this host cannot run VMs.
fn driver(test: &str) -> Option<QemuDriver> {
    let config = QemuConfig::new(format!("t-{test}-{}", std::process::id()));
    let mut missing = Vec::new();
    let qemu_binary = config.qemu_binary_for(ci_exec_guest_image::Arch::host());
    if ci_exec_qemu::accel::find_on_path(&qemu_binary).is_none() {
        missing.push(format!(
            "`{qemu_binary}` is not installed (`apt-get install qemu-system-x86`)"
        ));
    }
    if ci_exec_qemu::accel::find_on_path("qemu-img").is_none() {
        missing.push("`qemu-img` is not installed (`apt-get install qemu-utils`)".to_owned());
    }
    if let Err(error) = ci_exec_qemu::resolve_image(&config.image) {
        missing.push(error.to_string());
    }
    if missing.is_empty() {
        return Some(QemuDriver::new(config));
    }
    let _ = ci_exec_prerequisite::require(
        test,
        Some(missing.join("; ")),
        "bash .ci/setup-qemu.sh && bash .ci/setup-image.sh",
    );
    None
}

/// Waits (up to 120 s) for task `id` to exit; its code and raw output.
async fn finish(container: &dyn Container, id: &str) -> (i32, Vec<u8>, Vec<u8>) {
    let code = wait_for_exit(
        container,
        Duration::from_millis(20),
        Some(Duration::from_secs(120)),
    )
    .await
    .unwrap_or_else(|error| panic!("task `{id}`: {error}"));
    let mut stdout = Vec::new();
    let mut stderr = Vec::new();
    container
        .logs(&mut stdout, &mut stderr)
        .await
        .expect("logs");
    (code, stdout, stderr)
}

struct Output {
    code: i32,
    stdout: String,
    stderr: String,
}

async fn run(driver: &QemuDriver, task: Task) -> Output {
    let id = task.id.clone();
    let container = driver.run_container(task).await.expect("run_container");
    let (code, stdout, stderr) = finish(container.as_ref(), &id).await;
    Output {
        code,
        stdout: String::from_utf8_lossy(&stdout).into_owned(),
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_os_tasks_get_stdin_env_volumes_and_exit_codes() {
    let Some(driver) = driver("guest-os") else {
        return;
    };
    let uname = run(&driver, Task::new("uname", ["uname", "-r"])).await;
    assert_eq!(uname.code, 0, "stderr: {}", uname.stderr);
    assert!(uname.stdout.trim().contains('.'), "{}", uname.stdout);

    let stdin = run(
        &driver,
        Task::new("stdin", ["sh", "-c", "cat; echo to-stderr >&2; exit 3"])
            .stdin(Stdin::bytes(&b"hello\x00\xffworld"[..])),
    )
    .await;
    assert_eq!(stdin.code, 3);
    assert_eq!(
        stdin.stdout.as_bytes(),
        "hello\u{0}\u{fffd}world".as_bytes()
    );
    assert_eq!(stdin.stderr, "to-stderr\n");

    let env = run(&driver, Task::new("env", ["env"]).env("ONLY", "this one")).await;
    let mut names: Vec<&str> = env
        .stdout
        .lines()
        .filter_map(|line| line.split_once('=').map(|(name, _)| name))
        .collect();
    names.sort();
    assert_eq!(names, ["ONLY", "PATH"], "{}", env.stdout);
    assert!(env.stdout.contains("ONLY=this one\n"));

    let write = run(
        &driver,
        Task::new("write", ["sh", "-c", "echo shared >/data/file && pwd"])
            .mount("vol", "/data")
            .workdir("/data"),
    )
    .await;
    assert_eq!(write.code, 0, "{}", write.stderr);
    assert_eq!(write.stdout, "/data\n");
    let read = run(
        &driver,
        Task::new("read", ["cat", "/elsewhere/file"]).mount("vol", "/elsewhere"),
    )
    .await;
    assert_eq!(read.stdout, "shared\n");
    let files = driver.as_volume_files().expect("volume files");
    assert_eq!(
        files.read_file("vol", "file").await.expect("read"),
        b"shared\n"
    );

    let missing = run(&driver, Task::new("missing", ["no-such-program"])).await;
    assert_eq!(missing.code, 127, "{}", missing.stderr);

    // Same id: the first container, not a second run.
    let again = run(&driver, Task::new("stdin", ["sh", "-c", "exit 9"])).await;
    assert_eq!(again.code, 3);

    driver.close().await.expect("close");
    assert!(
        !driver.config().run_dir().exists(),
        "close removes the run dir"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn podman_tasks_and_sandboxes_run_in_the_guest() {
    let Some(driver) = driver("podman") else {
        return;
    };
    let task = Task::new(
        "os",
        ["sh", "-c", "cat /etc/os-release; cat >/work/in; id -u"],
    )
    .image(BASE_IMAGE)
    .env("K", "v")
    .mount("work", "/work")
    .stdin(Stdin::bytes("piped"));
    let output = run(&driver, task).await;
    assert_eq!(output.code, 0, "stderr: {}", output.stderr);
    assert!(output.stdout.contains("ID="), "{}", output.stdout);
    let files = driver.as_volume_files().expect("volume files");
    assert_eq!(files.read_file("work", "in").await.expect("read"), b"piped");

    let failing = run(
        &driver,
        Task::new("exit", ["sh", "-c", "echo out; echo err >&2; exit 42"]).image(BASE_IMAGE),
    )
    .await;
    assert_eq!(failing.code, 42);
    assert_eq!(failing.stdout, "out\n");
    assert_eq!(failing.stderr, "err\n");

    let sandboxes = driver.as_sandbox().expect("sandbox");
    let sandbox = sandboxes
        .start_sandbox(Task::new("job", ["true"]).image(BASE_IMAGE).env("A", "1"))
        .await
        .expect("start sandbox");
    let mut env = BTreeMap::new();
    env.insert("B".to_owned(), "2".to_owned());
    let mut stdout = Vec::new();
    let mut stderr = Vec::new();
    let result = sandbox
        .exec(
            &[
                "sh".to_owned(),
                "-c".to_owned(),
                "echo $A$B; exit 4".to_owned(),
            ],
            &env,
            &mut stdout,
            &mut stderr,
        )
        .await
        .expect("exec");
    assert_eq!(result.exit_code, 4, "{}", String::from_utf8_lossy(&stderr));
    assert_eq!(stdout, b"12\n");
    sandbox.cleanup().await.expect("cleanup");

    let guest = sandboxes
        .start_sandbox(Task::new("vm", ["true"]))
        .await
        .expect("guest sandbox");
    let mut stdout = Vec::new();
    let result = guest
        .exec(
            &["id".to_owned(), "-u".to_owned()],
            &BTreeMap::new(),
            &mut stdout,
            &mut Vec::new(),
        )
        .await
        .expect("exec in the guest");
    assert_eq!((result.exit_code, stdout.as_slice()), (0, &b"0\n"[..]));
    driver.close().await.expect("close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_run_leaves_nothing_after_close_and_a_dead_vm_is_reported() {
    let Some(first) = driver("leftover") else {
        return;
    };
    let namespace = first.namespace().to_owned();
    let run_dir = first.config().run_dir();
    let machine = first.machine().await.expect("boot");
    let pid = machine.pid();

    // A dead QEMU is an infrastructure error that shows the console.
    // SAFETY: kill has no memory-safety preconditions; `pid` is our qemu.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while machine.is_running() && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let error = first
        .run_container(Task::new("after-death", ["true"]))
        .await
        .expect_err("the VM is dead");
    let message = format!("{error:#?}");
    assert!(message.contains("QemuExited"), "{message}");
    assert_eq!(
        error.exit_class(),
        ci_exec_driver::ExitClass::Infrastructure
    );

    // A second instance finds the leftovers of the first (as `driver close` does) and removes
    // them: a live leftover qemu is simulated by forgetting a running driver.
    drop(machine);
    first.close().await.expect("close");
    let second = QemuDriver::new(QemuConfig::new(namespace.clone()));
    let machine = second.machine().await.expect("boot");
    let pid = machine.pid();
    drop(machine);
    std::mem::forget(second);
    assert!(std::path::Path::new(&format!("/proc/{pid}")).exists());
    QemuDriver::remove_leftovers(&ci_exec_qemu::default_run_root(), &namespace)
        .expect("remove leftovers");
    assert!(!run_dir.exists());
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    assert!(
        stat.is_empty() || stat.contains(") Z"),
        "qemu {pid} still runs: {stat}"
    );
}

/// Regression: warm starts failed with "restored VM is `paused`" and fell back to a cold boot
/// (a state saved after `stop` restores paused; the driver then treated that as an error).
/// Every warm start must restore and run, several in a row from one saved state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restored_vm_left_paused() {
    let Some(first) = driver("paused") else {
        return;
    };
    // The first start makes the saved state if there is none; the next ones restore it.
    let machine = first.machine().await.expect("first start");
    drop(machine);
    first.close().await.expect("close");
    for round in 0..3 {
        let mut config = first.config().clone();
        config.namespace = format!("{}-{round}", config.namespace);
        let driver = QemuDriver::new(config);
        let machine = driver.machine().await.expect("warm start");
        assert!(
            machine.restored(),
            "round {round} booted cold instead of restoring"
        );
        drop(machine);
        let echo = run(&driver, Task::new("echo", ["echo", "warm"])).await;
        assert_eq!(
            (echo.code, echo.stdout.as_str()),
            (0, "warm\n"),
            "{}",
            echo.stderr
        );
        driver.close().await.expect("close");
    }
}

/// `ci-exec run -i` streams: the task sees its first line while the host's input is still
/// open (the driver once read all of stdin before starting the task).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stdin_streams_to_a_running_task() {
    use tokio::io::AsyncWriteExt;
    let Some(driver) = driver("stdin-stream") else {
        return;
    };
    for image in ["", BASE_IMAGE] {
        let (mut input, reader) = tokio::io::duplex(1024);
        let id = if image.is_empty() { "os" } else { "podman" };
        let task = Task::new(
            id,
            ["sh", "-c", "read a; echo got $a; read b; echo got $b; cat"],
        )
        .image(image)
        .stdin(Stdin::stream(reader));
        let container = driver.run_container(task).await.expect("run_container");
        input.write_all(b"one\n").await.expect("write");
        let deadline = std::time::Instant::now() + Duration::from_secs(120);
        loop {
            let mut stdout = Vec::new();
            container
                .logs(&mut stdout, &mut Vec::new())
                .await
                .expect("logs");
            if stdout == b"got one\n" {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{id}: the first line did not reach the running task: {:?}",
                String::from_utf8_lossy(&stdout)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        input.write_all(b"two\nrest\x00\xff").await.expect("write");
        drop(input);
        let (code, stdout, stderr) = finish(container.as_ref(), id).await;
        assert_eq!(code, 0, "{id}: {}", String::from_utf8_lossy(&stderr));
        assert_eq!(stdout, b"got one\ngot two\nrest\x00\xff", "{id}");
    }
    driver.close().await.expect("close");
}

/// Tasks of the default image run podman's container with crun from the warm state's
/// template (`oci.rs`): each on a fresh root, with the image's environment under the task's;
/// once the guest's image store changes, `podman run` takes over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_image_runs_with_crun_until_the_image_store_changes() {
    let Some(driver) = driver("crun") else {
        return;
    };
    // The root filesystem's mount: ours (under /var/lib/ci-exec/oci) or podman's.
    let root_and_env = "head -1 /proc/self/mountinfo; echo \"container=$container K=$K\"; \
                        test -e /left-behind && echo dirty; touch /left-behind";
    let first = run(
        &driver,
        Task::new("crun-1", ["sh", "-c", root_and_env])
            .image(BASE_IMAGE)
            .env("K", "v"),
    )
    .await;
    assert_eq!(first.code, 0, "{}", first.stderr);
    assert!(
        first.stdout.contains("/var/lib/ci-exec/oci/next/"),
        "the saved state's root: {}",
        first.stdout
    );
    assert!(
        first.stdout.contains("container=podman K=v"),
        "{}",
        first.stdout
    );
    let second = run(
        &driver,
        Task::new("crun-2", ["sh", "-c", root_and_env]).image(BASE_IMAGE),
    )
    .await;
    assert_eq!(second.code, 0, "{}", second.stderr);
    assert!(
        second.stdout.contains("/var/lib/ci-exec/oci/tasks/"),
        "a root of its own: {}",
        second.stdout
    );
    assert!(!second.stdout.contains("dirty"), "{}", second.stdout);

    let tag = run(
        &driver,
        Task::new(
            "tag",
            [
                "podman",
                "--network-backend=cni",
                "tag",
                BASE_IMAGE,
                "localhost/ci-exec/other:1",
            ],
        ),
    )
    .await;
    assert_eq!(tag.code, 0, "{}", tag.stderr);
    let after = run(
        &driver,
        Task::new("podman-after-tag", ["sh", "-c", root_and_env])
            .image(BASE_IMAGE)
            .env("K", "w"),
    )
    .await;
    assert_eq!(after.code, 0, "{}", after.stderr);
    assert!(
        !after.stdout.contains("/var/lib/ci-exec/oci/"),
        "podman run after the store changed: {}",
        after.stdout
    );
    assert!(
        after.stdout.contains("container=podman K=w"),
        "{}",
        after.stdout
    );
    driver.close().await.expect("close");
}

/// Regression (a flaky conformance case under load): a guest that does not answer one status
/// question within the agent timeout — here QEMU stopped for longer than it — is a slow guest,
/// not a failed task. The task's exit is seen once the guest runs again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_stalled_past_the_agent_timeout_is_polled_on() {
    let Some(driver) = driver("stalled") else {
        return;
    };
    let machine = driver.machine().await.expect("boot");
    let pid = machine.pid();
    drop(machine);
    let task = Task::new("stalled", ["sh", "-c", "sleep 1; echo done"]);
    let container = driver.run_container(task).await.expect("run_container");
    // SAFETY: kill has no memory-safety preconditions; `pid` is our qemu.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    let resume = tokio::spawn(async move {
        let stalled = ci_exec_qemu::AGENT_TIMEOUT + Duration::from_secs(5);
        tokio::time::sleep(stalled).await;
        // SAFETY: as above.
        unsafe { libc::kill(pid, libc::SIGCONT) };
    });
    let (code, stdout, stderr) = finish(container.as_ref(), "stalled").await;
    resume.await.expect("resume");
    driver.close().await.expect("close");
    assert_eq!(
        (code, String::from_utf8_lossy(&stdout).as_ref()),
        (0, "done\n"),
        "{}",
        String::from_utf8_lossy(&stderr)
    );
}
