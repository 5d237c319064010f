//! The docker and podman drivers against real engines: what the shared conformance suite does
//! not cover (engine-specific bad input, limits, sandboxes, outside interference).
//!
//! Each test runs against the engine at `DOCKER_HOST` / `CONTAINER_HOST` (or the sockets
//! `.ci/setup-docker.sh` starts) with the image in `CI_EXEC_DOCKER_IMAGE` (default
//! `localhost/ci-exec/test:latest`). A missing engine skips with a reason, and fails under
//! `CI=true`.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use ci_exec_docker::{DockerConfig, DockerDriver, DockerError, Engine};
use ci_exec_driver::{Driver, DriverError, Limits, Stdin, Task, wait_for_exit};

const TEST_IMAGE: &str = "localhost/ci-exec/test:latest";
const FIX: &str = "run `bash .ci/setup-docker.sh` (as root) to install and start dockerd and the \
                   podman service and import the test image";

/// The address of `engine`'s test daemon, if one answers at a known place.
fn engine_host(engine: Engine) -> Option<String> {
    let (env, candidates): (&str, &[&str]) = match engine {
        Engine::Docker => (
            "DOCKER_HOST",
            &["/run/ci-exec/docker.sock", "/var/run/docker.sock"],
        ),
        Engine::Podman => ("CONTAINER_HOST", &["/run/podman/podman.sock"]),
    };
    if let Some(host) = std::env::var(env).ok().filter(|host| !host.is_empty()) {
        return Some(host);
    }
    candidates
        .iter()
        .find(|path| Path::new(path).exists())
        .map(|path| format!("unix://{path}"))
}

fn test_image() -> String {
    std::env::var("CI_EXEC_DOCKER_IMAGE")
        .ok()
        .filter(|image| !image.is_empty())
        .unwrap_or_else(|| TEST_IMAGE.to_owned())
}

fn namespace(test: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!("t-{test}-{}-{nanos:x}", std::process::id())
}

/// A connected driver in a fresh namespace, or `None` (with a printed reason) when the engine
/// is not available; under `CI=true` a missing engine fails the test.
async fn driver(engine: Engine, test: &str) -> Option<DockerDriver> {
    let name = engine.driver_name();
    let missing = |reason: String| {
        if std::env::var("CI").is_ok_and(|ci| ci == "true") {
            panic!("{name} engine unavailable under CI=true: {reason}; fix: {FIX}");
        }
        eprintln!("skipping `{test}` on {name}: {reason}; fix: {FIX}");
        None
    };
    let Some(host) = engine_host(engine) else {
        return missing("no daemon socket found".to_owned());
    };
    let config = DockerConfig::new(engine, namespace(test))
        .host(host)
        .image(test_image());
    let driver = match DockerDriver::connect(config).await {
        Ok(driver) => driver,
        Err(error) => return missing(error.to_string()),
    };
    let probe = driver
        .run_container(Task::new("probe", ["true"]).image(test_image()))
        .await;
    match probe {
        Ok(container) => {
            container.cleanup().await.unwrap();
            Some(driver)
        }
        Err(DriverError::ImageNotFound { image, .. }) => {
            missing(format!("test image `{image}` is missing"))
        }
        Err(error) => panic!("{name} engine answers but cannot run the probe: {error}"),
    }
}

async fn run_to_end(driver: &DockerDriver, task: Task) -> (i32, String, String) {
    let container = driver.run_container(task).await.unwrap();
    let code = wait_for_exit(
        container.as_ref(),
        Duration::from_millis(50),
        Some(Duration::from_secs(60)),
    )
    .await
    .unwrap();
    let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
    container.logs(&mut stdout, &mut stderr).await.unwrap();
    (
        code,
        String::from_utf8(stdout).unwrap(),
        String::from_utf8(stderr).unwrap(),
    )
}

/// Containers and volumes labelled with the driver's namespace, straight from the engine.
async fn leftovers(driver: &DockerDriver, host: &str) -> (usize, usize) {
    use bollard::query_parameters::{ListContainersOptionsBuilder, ListVolumesOptionsBuilder};
    let docker = match host.strip_prefix("unix://") {
        Some(path) => bollard::Docker::connect_with_unix(path, 30, bollard::API_DEFAULT_VERSION),
        None => bollard::Docker::connect_with_http(host, 30, bollard::API_DEFAULT_VERSION),
    }
    .unwrap();
    let filters = std::collections::HashMap::from([(
        "label",
        vec![format!("ci-exec.namespace={}", driver.namespace())],
    )]);
    let options = ListContainersOptionsBuilder::new()
        .all(true)
        .filters(&filters)
        .build();
    // Podman 4 reports a `stopped` state bollard's types reject: count the raw answer then.
    let containers = match docker.list_containers(Some(options)).await {
        Ok(containers) => containers.len(),
        Err(bollard::errors::Error::JsonDataError { contents, .. }) => {
            serde_json::from_str::<Vec<serde_json::Value>>(&contents)
                .unwrap()
                .len()
        }
        Err(error) => panic!("cannot list containers: {error}"),
    };
    let volumes = docker
        .list_volumes(Some(
            ListVolumesOptionsBuilder::new().filters(&filters).build(),
        ))
        .await
        .unwrap();
    (
        containers,
        volumes.volumes.map_or(0, |volumes| volumes.len()),
    )
}

fn raw_client(host: &str) -> bollard::Docker {
    let path = host
        .strip_prefix("unix://")
        .expect("tests use unix sockets");
    bollard::Docker::connect_with_unix(path, 30, bollard::API_DEFAULT_VERSION).unwrap()
}

/// Runs each test body once per engine.
macro_rules! engine_tests {
    ($($test:ident),* $(,)?) => {
        mod docker {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    super::$test(ci_exec_docker::Engine::Docker, stringify!($test)).await;
                }
            )*
        }
        mod podman {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    super::$test(ci_exec_docker::Engine::Podman, stringify!($test)).await;
                }
            )*
        }
    };
}

engine_tests!(
    runs_are_idempotent_and_streams_stay_apart,
    stdin_reaches_the_task,
    volumes_are_shared_and_readable,
    follow_streams_until_exit,
    limits_user_workdir_and_privileged_apply,
    only_the_task_env_reaches_the_task,
    close_removes_running_and_stopped_containers_and_volumes,
    missing_program_is_not_found,
    missing_image_names_the_image,
    sandbox_runs_commands_one_after_another,
    sandbox_killed_from_outside_is_an_infrastructure_error,
    non_utf8_output_is_byte_exact,
);

async fn runs_are_idempotent_and_streams_stay_apart(engine: Engine, test: &str) {
    let Some(driver) = driver(engine, test).await else {
        return;
    };
    let task = || Task::new("hello", ["sh", "-c", "echo out; echo err >&2; exit 3"]);
    let (code, stdout, stderr) = run_to_end(&driver, task()).await;
    assert_eq!(
        (code, stdout.as_str(), stderr.as_str()),
        (3, "out\n", "err\n")
    );
    // Same id: the first container is returned, not a second run.
    let (code, stdout, stderr) = run_to_end(&driver, task()).await;
    assert_eq!(
        (code, stdout.as_str(), stderr.as_str()),
        (3, "out\n", "err\n")
    );
    let host = engine_host(engine).unwrap();
    assert_eq!(leftovers(&driver, &host).await, (1, 0));
    driver.close().await.unwrap();
}

async fn stdin_reaches_the_task(engine: Engine, test: &str) {
    let Some(driver) = driver(engine, test).await else {
        return;
    };
    let task = Task::new("cat", ["sh", "-c", "cat; echo done"])
        .stdin(Stdin::bytes(&b"line one\nline two\n"[..]));
    let (code, stdout, _) = run_to_end(&driver, task).await;
    assert_eq!((code, stdout.as_str()), (0, "line one\nline two\ndone\n"));

    let (reader, mut writer) = tokio::io::duplex(64);
    let task = Task::new("stream", ["wc", "-c"]).stdin(Stdin::stream(reader));
    let container = driver.run_container(task).await.unwrap();
    use tokio::io::AsyncWriteExt;
    writer.write_all(&[b'x'; 100_000]).await.unwrap();
    drop(writer);
    let code = wait_for_exit(
        container.as_ref(),
        Duration::from_millis(50),
        Some(Duration::from_secs(60)),
    )
    .await
    .unwrap();
    let mut stdout = Vec::new();
    container.logs(&mut stdout, &mut Vec::new()).await.unwrap();
    assert_eq!(
        (code, String::from_utf8(stdout).unwrap().trim()),
        (0, "100000")
    );
    driver.close().await.unwrap();
}

async fn volumes_are_shared_and_readable(engine: Engine, test: &str) {
    let Some(driver) = driver(engine, test).await else {
        return;
    };
    let writer = Task::new(
        "writer",
        [
            "sh",
            "-c",
            "mkdir -p /data/dir && printf 'shared\\n' > /data/dir/file",
        ],
    )
    .mount("cache", "/data");
    assert_eq!(run_to_end(&driver, writer).await.0, 0);
    let reader = Task::new("reader", ["cat", "/mnt/dir/file"]).mount("cache", "/mnt");
    assert_eq!(run_to_end(&driver, reader).await.1, "shared\n");

    let files = driver.as_volume_files().unwrap();
    assert_eq!(
        files.read_file("cache", "dir/file").await.unwrap(),
        b"shared\n"
    );
    assert!(matches!(
        files.read_file("cache", "dir/absent").await,
        Err(DriverError::FileNotFound { .. })
    ));
    let error = files.read_file("cache", "dir").await.unwrap_err();
    assert!(error.to_string().contains("is a directory"), "{error}");
    let error = files.read_file("cache", "../etc/passwd").await.unwrap_err();
    assert!(
        matches!(error, DriverError::InvalidVolume { .. }),
        "{error}"
    );
    let error = files.read_file("nope", "file").await.unwrap_err();
    assert!(error.to_string().contains("no such volume"), "{error}");

    // An explicitly created volume is the same one the mounts use.
    let volume = driver.create_volume("cache", 0).await.unwrap();
    assert_eq!(volume.name(), "cache");
    let solo = driver.create_volume("solo", 0).await.unwrap();
    solo.cleanup().await.unwrap();
    solo.cleanup().await.unwrap();
    let host = engine_host(engine).unwrap();
    assert_eq!(leftovers(&driver, &host).await.1, 1);
    driver.close().await.unwrap();
    assert_eq!(leftovers(&driver, &host).await, (0, 0));
}

async fn follow_streams_until_exit(engine: Engine, test: &str) {
    let Some(driver) = driver(engine, test).await else {
        return;
    };
    let task = Task::new(
        "follow",
        [
            "sh",
            "-c",
            "echo first; sleep 1; echo second >&2; sleep 1; echo third",
        ],
    );
    let container = driver.run_container(task).await.unwrap();
    let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
    container
        .as_follow()
        .unwrap()
        .follow(&mut stdout, &mut stderr)
        .await
        .unwrap();
    assert_eq!(String::from_utf8(stdout).unwrap(), "first\nthird\n");
    assert_eq!(String::from_utf8(stderr).unwrap(), "second\n");
    // Following returned because the task ended.
    assert!(container.status().await.unwrap().is_done());
    driver.close().await.unwrap();
}

async fn limits_user_workdir_and_privileged_apply(engine: Engine, test: &str) {
    let Some(driver) = driver(engine, test).await else {
        return;
    };
    let mut task = Task::new(
        "limits",
        ["sh", "-c", "id -u; pwd; grep CapEff /proc/self/status"],
    )
    .user("1234")
    .workdir("/tmp");
    task.limits = Limits {
        cpu_shares: 512,
        memory_bytes: 64 * 1024 * 1024,
    };
    let (code, stdout, _) = run_to_end(&driver, task).await;
    assert_eq!(code, 0);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines[..2], ["1234", "/tmp"]);

    let host = engine_host(engine).unwrap();
    let name = format!("{}-limits", driver.namespace());
    let host_config = match raw_client(&host).inspect_container(&name, None).await {
        Ok(inspected) => serde_json::to_value(inspected.host_config.unwrap()).unwrap(),
        Err(bollard::errors::Error::JsonDataError { contents, .. }) => {
            serde_json::from_str::<serde_json::Value>(&contents).unwrap()["HostConfig"].clone()
        }
        Err(error) => panic!("cannot inspect `{name}`: {error}"),
    };
    assert_eq!(host_config["Memory"], 64 * 1024 * 1024);
    assert_eq!(host_config["CpuShares"], 512);

    let capabilities = |stdout: &str| {
        let mask = stdout
            .lines()
            .find_map(|line| line.strip_prefix("CapEff:"))
            .unwrap()
            .trim()
            .to_owned();
        u64::from_str_radix(&mask, 16).unwrap()
    };
    const CAP_SYS_ADMIN: u64 = 1 << 21;
    let unprivileged = Task::new("plain", ["grep", "CapEff", "/proc/self/status"]);
    assert_eq!(
        capabilities(&run_to_end(&driver, unprivileged).await.1) & CAP_SYS_ADMIN,
        0
    );
    let mut privileged = Task::new("privileged", ["grep", "CapEff", "/proc/self/status"]);
    privileged.privileged = true;
    match driver.run_container(privileged).await {
        Ok(container) => {
            wait_for_exit(container.as_ref(), Duration::from_millis(50), None)
                .await
                .unwrap();
            let mut stdout = Vec::new();
            container.logs(&mut stdout, &mut Vec::new()).await.unwrap();
            let stdout = String::from_utf8(stdout).unwrap();
            assert_ne!(capabilities(&stdout) & CAP_SYS_ADMIN, 0);
        }
        // Docker 20.10 grants a privileged container every capability the kernel knows; in a
        // sandbox whose bounding set lacks one, runc refuses, and the driver says why.
        Err(error) => {
            let message = format!("{error}: {}", std::error::Error::source(&error).unwrap());
            assert!(
                message.contains("could not grant the capabilities"),
                "{message}"
            );
            eprintln!("privileged containers are refused on this host: {message}");
        }
    }
    driver.close().await.unwrap();
}

async fn only_the_task_env_reaches_the_task(engine: Engine, test: &str) {
    let Some(driver) = driver(engine, test).await else {
        return;
    };
    let task = Task::new("env", ["env"]).env("CI_EXEC_GIVEN", "yes it is");
    let (code, stdout, _) = run_to_end(&driver, task).await;
    assert_eq!(code, 0);
    let env: BTreeMap<&str, &str> = stdout
        .lines()
        .filter_map(|line| line.split_once('='))
        .collect();
    assert_eq!(env.get("CI_EXEC_GIVEN"), Some(&"yes it is"));
    assert!(
        env.get("PATH")
            .is_some_and(|path| path.contains("/usr/bin"))
    );
    // The test process's own environment (CARGO_*, HOME of the host user…) stays outside.
    assert!(!env.keys().any(|name| name.starts_with("CARGO")), "{env:?}");
    assert!(!env.contains_key("DOCKER_HOST") && !env.contains_key("CI_EXEC_DOCKER_IMAGE"));
    driver.close().await.unwrap();
}

async fn close_removes_running_and_stopped_containers_and_volumes(engine: Engine, test: &str) {
    let Some(driver) = driver(engine, test).await else {
        return;
    };
    let host = engine_host(engine).unwrap();
    let stopped = driver
        .run_container(Task::new("stopped", ["true"]).mount("v", "/v"))
        .await
        .unwrap();
    wait_for_exit(
        stopped.as_ref(),
        Duration::from_millis(50),
        Some(Duration::from_secs(60)),
    )
    .await
    .unwrap();
    let running = driver
        .run_container(Task::new("running", ["sleep", "300"]))
        .await
        .unwrap();
    assert!(!running.status().await.unwrap().is_done());
    driver.create_volume("extra", 0).await.unwrap();
    assert_eq!(leftovers(&driver, &host).await, (2, 2));

    // A neighbour namespace on the same engine is left alone.
    let neighbour = DockerDriver::new(
        DockerConfig::new(engine, namespace("neighbour"))
            .host(host.clone())
            .image(test_image()),
    )
    .unwrap();
    neighbour.create_volume("kept", 0).await.unwrap();

    driver.close().await.unwrap();
    assert_eq!(leftovers(&driver, &host).await, (0, 0));
    assert_eq!(leftovers(&neighbour, &host).await, (0, 1));
    // Idempotent, and the handles say the container is gone.
    driver.close().await.unwrap();
    running.cleanup().await.unwrap();
    let error = running.status().await.unwrap_err();
    let message = format!("{error}: {}", std::error::Error::source(&error).unwrap());
    assert!(message.contains("no longer exists"), "{message}");
    neighbour.close().await.unwrap();
}

async fn missing_program_is_not_found(engine: Engine, test: &str) {
    let Some(driver) = driver(engine, test).await else {
        return;
    };
    let error = driver
        .run_container(Task::new("nope", ["no-such-program-here"]))
        .await
        .unwrap_err();
    assert!(
        matches!(&error, DriverError::ProgramNotFound { program, .. } if program == "no-such-program-here"),
        "{error:?}"
    );
    assert_eq!(error.exit_class().code(), 127);
    driver.close().await.unwrap();
}

async fn missing_image_names_the_image(engine: Engine, test: &str) {
    let Some(driver) = driver(engine, test).await else {
        return;
    };
    // No registry is reachable here, and none serves this name anywhere.
    let image = "localhost:1/ci-exec/never-built:nope";
    let error = driver
        .run_container(Task::new("img", ["true"]).image(image))
        .await
        .unwrap_err();
    assert!(
        matches!(error, DriverError::ImageNotFound { .. }),
        "{error:?}"
    );
    let message = error.to_string();
    assert!(
        message.contains(&format!("image `{image}` not found")),
        "{message}"
    );
    assert!(message.contains("import"), "{message}");
    driver.close().await.unwrap();
}

async fn sandbox_runs_commands_one_after_another(engine: Engine, test: &str) {
    let Some(driver) = driver(engine, test).await else {
        return;
    };
    let sandboxes = driver.as_sandbox().unwrap();
    let task = Task::new("job", ["unused"])
        .env("FROM_TASK", "task")
        .workdir("/work")
        .mount("src", "/work");
    let sandbox = sandboxes.start_sandbox(task).await.unwrap();
    let env = BTreeMap::from([("FROM_STEP".to_owned(), "step".to_owned())]);
    let command = |script: &str| vec!["sh".to_owned(), "-c".to_owned(), script.to_owned()];

    let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
    let output = sandbox
        .exec(
            &command("echo $FROM_TASK $FROM_STEP; pwd; echo kept > state; echo oops >&2"),
            &env,
            &mut stdout,
            &mut stderr,
        )
        .await
        .unwrap();
    assert_eq!(output.exit_code, 0);
    assert_eq!(String::from_utf8(stdout).unwrap(), "task step\n/work\n");
    assert_eq!(String::from_utf8(stderr).unwrap(), "oops\n");

    // The next command sees what the previous one left; exit codes come through.
    let mut stdout = Vec::new();
    let output = sandbox
        .exec(
            &command("cat state; exit 7"),
            &BTreeMap::new(),
            &mut stdout,
            &mut Vec::new(),
        )
        .await
        .unwrap();
    assert_eq!((output.exit_code, stdout.as_slice()), (7, &b"kept\n"[..]));
    assert_eq!(
        driver
            .as_volume_files()
            .unwrap()
            .read_file("src", "state")
            .await
            .unwrap(),
        b"kept\n"
    );
    sandbox.cleanup().await.unwrap();
    sandbox.cleanup().await.unwrap();
    driver.close().await.unwrap();
}

async fn sandbox_killed_from_outside_is_an_infrastructure_error(engine: Engine, test: &str) {
    let Some(driver) = driver(engine, test).await else {
        return;
    };
    let host = engine_host(engine).unwrap();
    let sandbox = driver
        .as_sandbox()
        .unwrap()
        .start_sandbox(Task::new("victim", ["unused"]))
        .await
        .unwrap();
    let name = format!("{}-victim", driver.namespace());
    // The command says when it runs; the killer reads that from its output, then kills the
    // whole container from outside, as `docker kill` would.
    let (mut output, mut progress) = tokio::io::duplex(1024);
    let killer = {
        let name = name.clone();
        let host = host.clone();
        tokio::spawn(async move {
            use tokio::io::AsyncReadExt;
            let mut seen = Vec::new();
            let mut buffer = [0u8; 256];
            while !seen.windows(7).any(|window| window == b"started") {
                let read =
                    tokio::time::timeout(Duration::from_secs(30), progress.read(&mut buffer))
                        .await
                        .expect("the long command never started")
                        .unwrap();
                assert_ne!(read, 0, "output ended before the command started");
                seen.extend_from_slice(&buffer[..read]);
            }
            raw_client(&host)
                .kill_container(
                    &name,
                    None::<bollard::query_parameters::KillContainerOptions>,
                )
                .await
                .unwrap();
            // Keep reading so the writer never blocks.
            while progress.read(&mut buffer).await.is_ok_and(|read| read > 0) {}
        })
    };
    let error = sandbox
        .exec(
            &[
                "sh".to_owned(),
                "-c".to_owned(),
                "echo started; sleep 600".to_owned(),
            ],
            &BTreeMap::new(),
            &mut output,
            &mut Vec::new(),
        )
        .await
        .unwrap_err();
    drop(output);
    killer.await.unwrap();
    assert_eq!(error.exit_class().code(), 125, "{error}");
    let message = format!("{error}: {}", std::error::Error::source(&error).unwrap());
    assert!(message.contains("killed from outside"), "{message}");
    // Cleaned up: the container is gone.
    assert_eq!(leftovers(&driver, &host).await.0, 0);
    driver.close().await.unwrap();
}

async fn non_utf8_output_is_byte_exact(engine: Engine, test: &str) {
    let Some(driver) = driver(engine, test).await else {
        return;
    };
    let task = Task::new("bytes", ["printf", "\\377\\000a\\r\\nno newline"]);
    let container = driver.run_container(task).await.unwrap();
    wait_for_exit(
        container.as_ref(),
        Duration::from_millis(50),
        Some(Duration::from_secs(60)),
    )
    .await
    .unwrap();
    let mut stdout = Vec::new();
    container.logs(&mut stdout, &mut Vec::new()).await.unwrap();
    assert_eq!(stdout, b"\xff\x00a\r\nno newline");
    driver.close().await.unwrap();
}

#[tokio::test]
async fn bad_hosts_say_what_is_wrong() {
    let error =
        DockerDriver::new(DockerConfig::new(Engine::Docker, "ns").host("docker.sock")).unwrap_err();
    assert!(matches!(error, DockerError::InvalidHost { .. }), "{error}");
    assert!(
        error.to_string().contains("`host` `docker.sock`"),
        "{error}"
    );

    let directory = tempfile::tempdir().unwrap();
    let missing = directory.path().join("missing.sock");
    let error = DockerDriver::connect(
        DockerConfig::new(Engine::Docker, "ns").host(format!("unix://{}", missing.display())),
    )
    .await
    .unwrap_err();
    let message = error.to_string();
    assert!(message.contains("daemon is not running"), "{message}");
    assert!(message.contains("does not exist"), "{message}");

    // A socket file nobody listens on: what a crashed daemon leaves behind.
    let stale = directory.path().join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    let error = DockerDriver::connect(
        DockerConfig::new(Engine::Podman, "ns").host(format!("unix://{}", stale.display())),
    )
    .await
    .unwrap_err();
    let message = error.to_string();
    assert!(message.contains("nothing listens"), "{message}");
    assert!(message.contains("podman system service"), "{message}");
}

#[tokio::test]
async fn an_unreachable_daemon_fails_the_first_operation_with_the_fix() {
    let directory = tempfile::tempdir().unwrap();
    let missing = directory.path().join("missing.sock");
    let driver = DockerDriver::new(
        DockerConfig::new(Engine::Docker, "ns").host(format!("unix://{}", missing.display())),
    )
    .unwrap();
    let error = driver
        .run_container(Task::new("t", ["true"]))
        .await
        .unwrap_err();
    assert_eq!(error.exit_class().code(), 125);
    let source = std::error::Error::source(&error).unwrap().to_string();
    assert!(source.contains("start it"), "{source}");
}
