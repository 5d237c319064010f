//! The driver conformance suite: every case runs against every driver listed in
//! `conformance!` at the bottom. A driver joins with one line there (see `tests/README.md`).
//!
//! Cases use only `sh`, `cat`, `env`, `printf`, `seq`, `head`, `sleep` and `touch`, so they run
//! in busybox, a Debian guest and on the host alike. Mount paths are absolute (`/data`) and the
//! commands reach them relative to the task's default working directory (`data/…`): that is `/`
//! in containers and VMs, and the task directory (where the mounts appear) for native.

use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use ci_exec_driver::{ContainerStatus, DriverError, Stdin, Task, wait_for_exit};
use ci_exec_tests::{Capabilities, Output, Subject, logs, unique_namespace, wait_until};
use tokio::io::{AsyncWrite, AsyncWriteExt as _};

/// Generates one `#[tokio::test]` per case for each driver:
/// `driver => constructor, image = …, capabilities = Capabilities { … };`.
macro_rules! conformance {
    ($($driver:ident => $constructor:path, image = $image:expr, capabilities = $capabilities:expr;)*) => {
        $(
            mod $driver {
                conformance!(@cases $driver, $constructor, $image, $capabilities;
                    stdin,
                    exit_code_1,
                    exit_code_42,
                    happy_path_same_id_is_idempotent,
                    volume_shared_between_tasks,
                    volume_files_read_back,
                    env_passed_without_host_leakage,
                    follow_streams_and_returns_after_exit,
                    stderr_apart_from_stdout,
                    binary_output_byte_exact,
                    output_50_mb_byte_exact,
                    close_removes_everything,
                    cleanup_twice_is_fine,
                    user_and_workdir_apply,
                    privileged_grants_capabilities,
                    stdin_streams_while_the_task_runs,
                    a_missing_program_exits_127,
                    offline_tasks_have_only_a_loopback,
                    a_memory_limit_applies,
                    a_file_that_cannot_be_executed_exits_126,
                );
            }
        )*
    };
    (@cases $driver:ident, $constructor:path, $image:expr, $capabilities:expr; $($case:ident,)*) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                ci_exec_tests::run_case(
                    stringify!($driver),
                    $constructor(),
                    $image,
                    {
                        // Written where the driver joins, at the bottom of this file.
                        use super::*;
                        $capabilities
                    },
                    super::$case,
                )
                .await;
            }
        )*
    };
}

fn id(name: &str) -> String {
    unique_namespace(name)
}

async fn stdin(subject: Subject) {
    let input = b"hello\nworld\n\x00\xff binary too".to_vec();
    let task = Task::new(id("stdin"), ["cat"])
        .image(subject.image)
        .stdin(Stdin::bytes(input.clone()));
    let output = subject.run(task).await;
    assert_eq!(output.code, 0, "stderr: {}", output.stderr_text());
    assert_eq!(output.stdout, input);
}

async fn exit_code_1(subject: Subject) {
    let output = subject.run(subject.shell(&id("exit1"), "exit 1")).await;
    assert_eq!(output.code, 1);
}

async fn exit_code_42(subject: Subject) {
    let output = subject
        .run(subject.shell(&id("exit42"), "echo before; exit 42"))
        .await;
    assert_eq!(output.code, 42);
    assert_eq!(output.stdout_text(), "before\n");
}

async fn happy_path_same_id_is_idempotent(subject: Subject) {
    let task_id = id("happy");
    let first = subject
        .driver
        .run_container(subject.shell(&task_id, "echo hello"))
        .await
        .expect("first run");
    let output = Output::of(&*first).await;
    assert_eq!((output.code, output.stdout_text().as_str()), (0, "hello\n"));

    // The same id again gives the first container, not a second run.
    let again = subject
        .driver
        .run_container(subject.shell(&task_id, "echo second-run"))
        .await
        .expect("second run_container");
    assert_eq!(again.id(), first.id());
    let output = Output::of(&*again).await;
    assert_eq!(output.stdout_text(), "hello\n", "the same id ran twice");
    // Logs can be read again, with the same bytes.
    assert_eq!(logs(&*first).await, (b"hello\n".to_vec(), Vec::new()));
}

async fn volume_shared_between_tasks(subject: Subject) {
    let volume = subject
        .driver
        .create_volume("data", 0)
        .await
        .expect("create volume");
    assert_eq!(volume.name(), "data");
    let writer = subject
        .shell(&id("writer"), "printf 'shared\\n' > data/file")
        .mount("data", "/data");
    assert_eq!(subject.run(writer).await.code, 0);
    let reader = subject
        .shell(&id("reader"), "cat data/file")
        .mount("data", "/data");
    let output = subject.run(reader).await;
    assert_eq!(output.code, 0, "stderr: {}", output.stderr_text());
    assert_eq!(output.stdout_text(), "shared\n");
    // A volume named only in a mount is created on demand.
    let fresh = subject
        .shell(&id("on-demand"), "echo made > other/file && cat other/file")
        .mount("other", "/other");
    assert_eq!(subject.run(fresh).await.stdout_text(), "made\n");
}

async fn volume_files_read_back(subject: Subject) {
    if !subject.declares("volume_files", subject.capabilities.volume_files) {
        return;
    }
    let files = subject
        .driver
        .as_volume_files()
        .expect("the driver declares volume_files but has no `as_volume_files`");
    let writer = subject
        .shell(
            &id("files"),
            "mkdir -p out/dir && printf 'a\\000b\\377' > out/dir/file.bin",
        )
        .mount("out", "/out");
    assert_eq!(subject.run(writer).await.code, 0);
    assert_eq!(
        files.read_file("out", "dir/file.bin").await.expect("read"),
        b"a\x00b\xff"
    );
    assert!(matches!(
        files.read_file("out", "dir/missing").await,
        Err(DriverError::FileNotFound { .. })
    ));
    for escape in ["../out/dir/file.bin", "/etc/passwd", "dir/../../x"] {
        assert!(
            matches!(
                files.read_file("out", escape).await,
                Err(DriverError::InvalidVolume { .. })
            ),
            "`{escape}` must be rejected"
        );
    }
}

async fn env_passed_without_host_leakage(subject: Subject) {
    // Cargo sets this in every test process: a driver that copies the host env leaks it.
    let leaked = "CARGO_PKG_NAME";
    assert!(std::env::var(leaked).is_ok(), "run the tests with cargo");
    let task = subject
        .shell(&id("env"), "env")
        .env("GREETING", "hello world")
        .env("EMPTY", "")
        .env("WITH_EQUALS", "a=b");
    let output = subject.run(task).await;
    assert_eq!(output.code, 0, "stderr: {}", output.stderr_text());
    let env = output.stdout_text();
    let lines: Vec<&str> = env.lines().collect();
    for expected in ["GREETING=hello world", "EMPTY=", "WITH_EQUALS=a=b"] {
        assert!(
            lines.contains(&expected),
            "`{expected}` missing from:\n{env}"
        );
    }
    assert!(
        !lines
            .iter()
            .any(|line| line.starts_with(&format!("{leaked}="))),
        "host variable `{leaked}` leaked into the task:\n{env}"
    );
    // `sh` finds `env` only through a PATH: the driver gives a default when the task has none.
    assert!(lines.iter().any(|line| line.starts_with("PATH=")), "{env}");
}

/// An `AsyncWrite` that shares what it received, so a test can look while `follow` runs.
#[derive(Clone, Default)]
struct Shared(Arc<Mutex<Vec<u8>>>);

impl Shared {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().expect("lock")).into_owned()
    }
}

impl AsyncWrite for Shared {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.0.lock().expect("lock").extend_from_slice(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

async fn follow_streams_and_returns_after_exit(subject: Subject) {
    // The task prints, then blocks until a second task creates `sync/go`: "first" must
    // arrive while it still runs, and `follow` must return promptly once it exits.
    let task = subject
        .shell(
            &id("follow"),
            "echo first; echo err-first >&2; \
             while [ ! -e sync/go ]; do sleep 0.05; done; echo second",
        )
        .mount("sync", "/sync");
    let container = subject.driver.run_container(task).await.expect("start");
    if !subject.declares("follow", subject.capabilities.follow) {
        let release = subject
            .shell(&id("go"), "touch sync/go")
            .mount("sync", "/sync");
        subject.run(release).await;
        return;
    }
    let stdout = Shared::default();
    let stderr = Shared::default();
    let (mut out, mut err) = (stdout.clone(), stderr.clone());
    let following = tokio::spawn(async move {
        // `follow` borrows the container: move an owned handle in.
        follow_owned(container, &mut out, &mut err).await
    });
    assert!(
        wait_until(Duration::from_secs(120), || async {
            stdout.text() == "first\n" && stderr.text() == "err-first\n"
        })
        .await,
        "output did not stream before exit: stdout {:?}, stderr {:?}",
        stdout.text(),
        stderr.text()
    );
    assert!(
        !following.is_finished(),
        "follow returned while the task ran"
    );
    let release = subject
        .shell(&id("go"), "touch sync/go")
        .mount("sync", "/sync");
    assert_eq!(subject.run(release).await.code, 0);
    let status = tokio::time::timeout(Duration::from_secs(60), following)
        .await
        .expect("follow did not return within 60 s of the task's exit")
        .expect("follow task");
    assert_eq!(status, ContainerStatus::Exited { code: 0 });
    assert_eq!(stdout.text(), "first\nsecond\n");
    assert_eq!(stderr.text(), "err-first\n");
}

async fn follow_owned(
    container: Box<dyn ci_exec_driver::Container>,
    out: &mut Shared,
    err: &mut Shared,
) -> ContainerStatus {
    let follow = container.as_follow().expect("checked before");
    follow.follow(out, err).await.expect("follow");
    // `follow` returned: the task must be done.
    container.status().await.expect("status")
}

async fn stderr_apart_from_stdout(subject: Subject) {
    let output = subject
        .run(subject.shell(
            &id("streams"),
            "echo out1; echo err1 >&2; echo out2; echo err2 >&2",
        ))
        .await;
    assert_eq!(output.code, 0);
    assert_eq!(output.stdout_text(), "out1\nout2\n");
    assert_eq!(output.stderr_text(), "err1\nerr2\n");
}

async fn binary_output_byte_exact(subject: Subject) {
    let output = subject
        .run(subject.shell(
            &id("binary"),
            "printf '\\000\\001\\177\\200\\377\\r\\n'; printf '\\377\\000' >&2",
        ))
        .await;
    assert_eq!(output.stdout, b"\x00\x01\x7f\x80\xff\r\n");
    assert_eq!(output.stderr, b"\xff\x00");
}

/// Output size of the large-output case. Docker and podman store a container's output in their
/// own log files and serve it back slowly (measured here: `docker logs` of 50 MB takes ~2.5 min
/// from the CLI alone, podman's timestamped log is 7x the output), so the engines get 5 MiB —
/// still many log chunks and frames, at a tenth of the engine time.
fn large_output_size(driver: &str) -> usize {
    match driver {
        // The fake API server's pods log through Docker too.
        "docker" | "podman" | "k8s" | "hetzner" | "digitalocean" => 5 * 1024 * 1024,
        _ => 50 * 1024 * 1024,
    }
}

async fn output_50_mb_byte_exact(subject: Subject) {
    let size = large_output_size(subject.driver.name());
    let output = subject
        .run(subject.shell(&id("large"), &format!("seq 1 7000000 | head -c {size}")))
        .await;
    assert_eq!(output.code, 0, "stderr: {}", output.stderr_text());
    let mut expected = Vec::with_capacity(size + 16);
    let mut number = 1u64;
    while expected.len() < size {
        expected.extend_from_slice(format!("{number}\n").as_bytes());
        number += 1;
    }
    expected.truncate(size);
    assert_eq!(output.stdout.len(), size);
    assert!(output.stdout == expected, "large output differs");

    // Following gives the same bytes as reading the logs.
    let container = subject
        .driver
        .run_container(subject.shell(
            &id("large-follow"),
            &format!("seq 1 7000000 | head -c {size}"),
        ))
        .await
        .expect("start");
    if let Some(follow) = container.as_follow() {
        let mut stdout = Vec::with_capacity(size);
        let mut stderr = Vec::new();
        follow
            .follow(&mut stdout, &mut stderr)
            .await
            .expect("follow");
        assert!(
            stdout == expected,
            "followed output differs ({} bytes)",
            stdout.len()
        );
    }
}

async fn close_removes_everything(subject: Subject) {
    let writer = subject
        .shell(&id("kept"), "echo x > data/file")
        .mount("data", "/data");
    assert_eq!(subject.run(writer).await.code, 0);
    let running = subject
        .driver
        .run_container(subject.shell(&id("long"), "sleep 600"))
        .await
        .expect("start");
    subject.driver.close().await.expect("close");
    if let Some(files) = subject.driver.as_volume_files() {
        assert!(
            files.read_file("data", "file").await.is_err(),
            "volume `data` survived close"
        );
    }
    // The running task was stopped: its status is no longer `Running` (or it is gone).
    if let Ok(status) = running.status().await {
        assert!(
            status.is_done(),
            "task still running after close: {status:?}"
        );
    }
    subject.driver.close().await.expect("second close");
}

async fn cleanup_twice_is_fine(subject: Subject) {
    let volume = subject
        .driver
        .create_volume("twice", 0)
        .await
        .expect("volume");
    let container = subject
        .driver
        .run_container(subject.shell(&id("twice"), "echo bye"))
        .await
        .expect("start");
    wait_for_exit(
        &*container,
        Duration::from_millis(50),
        Some(Duration::from_secs(600)),
    )
    .await
    .expect("exit");
    container.cleanup().await.expect("first cleanup");
    container.cleanup().await.expect("second cleanup");
    volume.cleanup().await.expect("first volume cleanup");
    volume.cleanup().await.expect("second volume cleanup");
    subject.driver.close().await.expect("first close");
    subject.driver.close().await.expect("second close");

    // Cleaning up a running task stops it.
    let running = subject
        .driver
        .run_container(subject.shell(&id("stop"), "sleep 600"))
        .await
        .expect("start");
    running.cleanup().await.expect("cleanup of a running task");
    running
        .cleanup()
        .await
        .expect("second cleanup of a running task");
    if let Ok(status) = running.status().await {
        assert!(
            status.is_done(),
            "task still running after cleanup: {status:?}"
        );
    }
}

async fn user_and_workdir_apply(subject: Subject) {
    if !subject.declares("user", subject.capabilities.user) {
        return;
    }
    // The working directory is a mount, so the check reads the same on every driver.
    let task = subject
        .shell(&id("user"), "id -u; id -g; echo here > file")
        .mount("work", "/work")
        .workdir("/work")
        .user("0:0");
    let output = subject.run(task).await;
    assert_eq!(
        (output.code, output.stdout_text().as_str()),
        (0, "0\n0\n"),
        "{}",
        output.stderr_text()
    );
    let task = subject.shell(&id("user"), "id -u; id -g").user("1234:2345");
    let output = subject.run(task).await;
    assert_eq!(
        (output.code, output.stdout_text().as_str()),
        (0, "1234\n2345\n"),
        "{}",
        output.stderr_text()
    );
    let read = subject
        .shell(&id("read"), "cat work/file")
        .mount("work", "/work");
    assert_eq!(subject.run(read).await.stdout_text(), "here\n");
}

/// The effective capability mask a task's `/proc/self/status` shows.
fn effective_capabilities(status: &str) -> u64 {
    let mask = status
        .lines()
        .find_map(|line| line.strip_prefix("CapEff:"))
        .expect("a CapEff line");
    u64::from_str_radix(mask.trim(), 16).expect("a hex mask")
}

async fn privileged_grants_capabilities(subject: Subject) {
    if !subject.declares("privileged", subject.capabilities.privileged) {
        return;
    }
    const CAP_SYS_ADMIN: u64 = 1 << 21;
    let plain = subject
        .run(subject.shell(&id("plain"), "cat /proc/self/status"))
        .await;
    assert_eq!(
        effective_capabilities(&plain.stdout_text()) & CAP_SYS_ADMIN,
        0
    );
    let mut task = subject.shell(&id("privileged"), "cat /proc/self/status");
    task.privileged = true;
    match subject.driver.run_container(task).await {
        Ok(container) => {
            let output = Output::of(&*container).await;
            assert_eq!(output.code, 0, "{}", output.stderr_text());
            assert_ne!(
                effective_capabilities(&output.stdout_text()) & CAP_SYS_ADMIN,
                0
            );
        }
        // Docker refuses a privileged container where its daemon lacks capabilities (a
        // nested or sandboxed host): an infrastructure error that says so, never a task
        // that silently runs unprivileged.
        Err(error) => assert_eq!(error.exit_class().code(), 125, "{error}"),
    }
}

async fn stdin_streams_while_the_task_runs(subject: Subject) {
    let (mut input, reader) = tokio::io::duplex(1024);
    let task = subject
        .shell(&id("stream"), "read a; echo got $a; cat")
        .stdin(Stdin::stream(reader));
    let container = subject.driver.run_container(task).await.expect("start");
    input.write_all(b"one\n").await.expect("write");
    assert!(
        wait_until(Duration::from_secs(120), || async {
            logs(&*container).await.0 == b"got one\n"
        })
        .await,
        "the first line did not reach the running task"
    );
    input.write_all(b"rest\x00\xff").await.expect("write");
    drop(input);
    let output = Output::of(&*container).await;
    assert_eq!(output.code, 0, "{}", output.stderr_text());
    assert_eq!(output.stdout, b"got one\nrest\x00\xff");
}

async fn a_missing_program_exits_127(subject: Subject) {
    // Either answer is the contract's: the driver knows before starting (an error whose exit
    // class is 127), or the task runs and exits 127 as a shell would.
    let task = Task::new(id("missing"), ["no-such-program-here"]).image(subject.image);
    match subject.driver.run_container(task).await {
        Err(error) => {
            assert!(
                matches!(error, DriverError::ProgramNotFound { .. }),
                "{error:?}"
            );
            assert_eq!(error.exit_class().code(), 127);
        }
        Ok(container) => assert_eq!(Output::of(&*container).await.code, 127),
    }
}

async fn offline_tasks_have_only_a_loopback(subject: Subject) {
    // /proc/net/dev lists the interfaces of the reader's network namespace.
    let interfaces = |output: &Output| -> Vec<String> {
        output
            .stdout_text()
            .lines()
            .filter_map(|line| line.split_once(':').map(|(name, _)| name.trim().to_owned()))
            .collect()
    };
    let offline = subject
        .shell(&id("offline"), "cat /proc/net/dev")
        .network(false);
    let output = subject.run(offline).await;
    assert_eq!(output.code, 0, "{}", output.stderr_text());
    assert_eq!(interfaces(&output), ["lo"]);
    let online = subject
        .shell(&id("online"), "cat /proc/net/dev")
        .network(true);
    let output = subject.run(online).await;
    assert_eq!(output.code, 0, "{}", output.stderr_text());
    assert!(
        interfaces(&output).iter().any(|name| name != "lo"),
        "an online task sees a network interface: {:?}",
        interfaces(&output)
    );
}

async fn a_memory_limit_applies(subject: Subject) {
    if !subject.declares("limits", subject.capabilities.limits) {
        return;
    }
    // `dd` holds one buffer of its block size: 100 MB fits no 32 MB limit, whether the
    // driver enforces it as an address-space limit (malloc fails) or a cgroup (OOM kill).
    let script = "dd if=/dev/zero of=/dev/null bs=100M count=1 2>/dev/null && echo fits";
    let free = subject.run(subject.shell(&id("unlimited"), script)).await;
    assert_eq!(
        (free.code, free.stdout_text().as_str()),
        (0, "fits\n"),
        "{}",
        free.stderr_text()
    );
    let mut limited = subject.shell(&id("limited"), script);
    limited.limits = ci_exec_driver::Limits {
        memory_bytes: 32 * 1024 * 1024,
        cpu_shares: 512,
    };
    let output = subject.run(limited).await;
    assert_ne!(
        output.code,
        0,
        "100 MB fitted in 32 MB: {}",
        output.stdout_text()
    );
    assert!(!output.stdout_text().contains("fits"));
}

async fn a_file_that_cannot_be_executed_exits_126(subject: Subject) {
    // The mount appears at `bin-volume` relative to the default working directory on every
    // driver (`/` in containers and VMs, the task directory for host processes).
    let make = subject
        .shell(
            &id("make"),
            "printf 'echo ran\\n' > bin-volume/plain && chmod 644 bin-volume/plain",
        )
        .mount("bin", "/bin-volume");
    assert_eq!(subject.run(make).await.code, 0);
    let task = Task::new(id("plain"), ["bin-volume/plain"])
        .image(subject.image)
        .mount("bin", "/bin-volume");
    match subject.driver.run_container(task).await {
        Err(error) => {
            assert!(
                matches!(error, DriverError::CannotInvoke { .. }),
                "{error:?}"
            );
            assert_eq!(error.exit_class().code(), 126);
        }
        Ok(container) => assert_eq!(Output::of(&*container).await.code, 126),
    }
}

/// Every driver declares what it can do where it joins (`tests/README.md`).
const ALL: Capabilities = Capabilities {
    volume_files: true,
    follow: true,
    user: true,
    privileged: true,
    limits: true,
};

conformance! {
    native => ci_exec_tests::drivers::native, image = "",
        // Host processes have no privilege of their own to grant.
        capabilities = Capabilities { privileged: false, ..ALL };
    docker => ci_exec_tests::drivers::docker, image = ci_exec_tests::drivers::CONTAINER_TEST_IMAGE,
        capabilities = ALL;
    podman => ci_exec_tests::drivers::podman, image = ci_exec_tests::drivers::CONTAINER_TEST_IMAGE,
        capabilities = ALL;
    k8s => ci_exec_tests::drivers::k8s, image = ci_exec_tests::drivers::CONTAINER_TEST_IMAGE,
        capabilities = ALL;
    k8s_real => ci_exec_tests::drivers::k8s_real, image = "",
        capabilities = ALL;
    hetzner => ci_exec_tests::drivers::hetzner, image = ci_exec_tests::drivers::CONTAINER_TEST_IMAGE,
        capabilities = ALL;
    digitalocean => ci_exec_tests::drivers::digitalocean, image = ci_exec_tests::drivers::CONTAINER_TEST_IMAGE,
        capabilities = ALL;
    fly => ci_exec_tests::drivers::fly, image = ci_exec_tests::drivers::CONTAINER_TEST_IMAGE,
        capabilities = ALL;
    fly_real => ci_exec_tests::drivers::fly_real, image = "",
        capabilities = ALL;
    hetzner_real => ci_exec_tests::drivers::hetzner_real, image = "",
        capabilities = ALL;
    digitalocean_real => ci_exec_tests::drivers::digitalocean_real, image = "",
        capabilities = ALL;
    qemu => ci_exec_tests::drivers::qemu, image = "",
        // The guest OS runs tasks as root in the VM: the VM is the isolation.
        capabilities = Capabilities { privileged: false, ..ALL };
    qemu_podman => ci_exec_tests::drivers::qemu, image = ci_exec_tests::drivers::QEMU_GUEST_CONTAINER_IMAGE,
        capabilities = ALL;
    qemu_ubuntu => ci_exec_tests::drivers::qemu_ubuntu, image = "",
        capabilities = Capabilities { privileged: false, ..ALL };
    qemu_ubuntu_podman => ci_exec_tests::drivers::qemu_ubuntu,
        image = ci_exec_tests::drivers::QEMU_GUEST_CONTAINER_IMAGE,
        capabilities = ALL;
    // A stock cloud image has no podman: its tasks run in the guest OS.
    qemu_ubuntu_cloud => ci_exec_tests::drivers::qemu_ubuntu_cloud, image = "",
        capabilities = Capabilities { privileged: false, ..ALL };
    qemu_alpine_cloud => ci_exec_tests::drivers::qemu_alpine_cloud, image = "",
        capabilities = Capabilities { privileged: false, ..ALL };
    // The aarch64 image under qemu-system-aarch64: what the `vz` driver boots on a Mac.
    qemu_arm64 => ci_exec_tests::drivers::qemu_arm64, image = "",
        capabilities = Capabilities { privileged: false, ..ALL };
    qemu_arm64_podman => ci_exec_tests::drivers::qemu_arm64,
        image = ci_exec_tests::drivers::QEMU_GUEST_CONTAINER_IMAGE,
        capabilities = ALL;
}

// Apple's Virtualization.framework, on a Mac only (README.md, "Mac (vz)"): the qemu driver's
// guest built for aarch64, over vsock and virtiofs.
#[cfg(target_os = "macos")]
conformance! {
    vz => ci_exec_tests::drivers::vz, image = "",
        // The guest OS runs tasks as root in the VM: the VM is the isolation.
        capabilities = Capabilities { privileged: false, ..ALL };
    vz_podman => ci_exec_tests::drivers::vz, image = ci_exec_tests::drivers::QEMU_GUEST_CONTAINER_IMAGE,
        capabilities = ALL;
}
