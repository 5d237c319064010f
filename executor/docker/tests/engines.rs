//! The docker and podman drivers against real engines: what the shared conformance suite does
//! not cover (engine-specific bad input, limits, sandboxes, outside interference).
//!
//! Each test runs against the engine at `DOCKER_HOST` / `CONTAINER_HOST` (or the sockets
//! `.ci/setup-docker.sh` starts) with the image in `CI_EXEC_DOCKER_IMAGE` (default
//! `localhost/ci-exec/test:latest`), in a namespace of its own, and ends by checking that
//! `close` left nothing of that namespace on the engine. A missing engine skips with a
//! reason, and fails under `CI=true`.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::time::Duration;

use bollard::query_parameters::{ListContainersOptionsBuilder, ListVolumesOptionsBuilder};
use ci_exec_docker::{DockerConfig, DockerDriver, DockerError, Engine};
use ci_exec_driver::{Container, Driver, DriverError, Limits, Sandbox, Stdin, Task, wait_for_exit};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

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

/// A sandbox of `driver` started from `task`.
async fn start_sandbox(driver: &DockerDriver, task: Task) -> Box<dyn Sandbox> {
    driver
        .as_sandbox()
        .unwrap()
        .start_sandbox(task)
        .await
        .unwrap()
}

/// A task running `script` with `sh -c`.
fn shell(id: &str, script: &str) -> Task {
    Task::new(id, ["sh", "-c", script])
}

fn namespace(test: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!("t-{test}-{}-{nanos:x}", std::process::id())
}

/// What a finished task left: its exit code and output.
#[derive(Debug, PartialEq, Eq)]
struct Finished {
    code: i32,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
}

impl Finished {
    /// Waits for `container` to exit, then reads its logs.
    async fn of(container: &dyn Container) -> Finished {
        let code = wait_for_exit(
            container,
            Duration::from_millis(50),
            Some(Duration::from_secs(60)),
        )
        .await
        .unwrap();
        let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
        container.logs(&mut stdout, &mut stderr).await.unwrap();
        Finished {
            code,
            stdout,
            stderr,
        }
    }

    fn stdout_text(&self) -> String {
        String::from_utf8(self.stdout.clone()).unwrap()
    }

    fn stderr_text(&self) -> String {
        String::from_utf8(self.stderr.clone()).unwrap()
    }
}

/// One engine test's driver, in a namespace of its own, and a client of its own on the same
/// engine to look at (or interfere with) what the driver made.
struct Subject {
    engine: Engine,
    host: String,
    driver: DockerDriver,
}

impl Subject {
    /// A connected driver in a fresh namespace, or `None` (with a printed reason) when the
    /// engine is not available; under `CI=true` a missing engine fails the test.
    async fn new(engine: Engine, test: &str) -> Option<Subject> {
        let name = engine.driver_name();
        let missing = |reason: String| {
            let _ = ci_exec_prerequisite::require(
                test,
                Some(format!("the {name} engine is unavailable: {reason}")),
                FIX,
            );
            None
        };
        let Some(host) = engine_host(engine) else {
            return missing("no daemon socket found".to_owned());
        };
        let driver = match DockerDriver::connect(Subject::config(engine, &host, test)).await {
            Ok(driver) => driver,
            Err(error) => return missing(error.to_string()),
        };
        match driver.image_present(&test_image()).await {
            Ok(true) => Some(Subject {
                engine,
                host,
                driver,
            }),
            Ok(false) => missing(format!("test image `{}` is missing", test_image())),
            Err(error) => panic!("{name} engine answers but cannot inspect images: {error}"),
        }
    }

    /// The config of a driver for `test` on this engine, in a namespace of its own.
    fn config(engine: Engine, host: &str, test: &str) -> DockerConfig {
        DockerConfig::new(engine, namespace(test))
            .host(host)
            .image(test_image())
    }

    /// Another driver on the same engine.
    fn neighbour(&self, config: impl FnOnce(DockerConfig) -> DockerConfig) -> DockerDriver {
        let config = config(Subject::config(self.engine, &self.host, "neighbour"));
        DockerDriver::new(config).unwrap()
    }

    /// Runs `task` to its end.
    async fn run(&self, task: Task) -> Finished {
        let container = self.driver.run_container(task).await.unwrap();
        Finished::of(container.as_ref()).await
    }

    /// The engine's name for a container or volume `id` of the namespace.
    fn backend_name(&self, id: &str) -> String {
        format!("{}-{id}", self.driver.namespace())
    }

    /// A client of the test's own, as a user's `docker` CLI would be.
    fn raw_client(&self) -> bollard::Docker {
        let path = self
            .host
            .strip_prefix("unix://")
            .expect("tests use unix sockets");
        bollard::Docker::connect_with_unix(path, 30, bollard::API_DEFAULT_VERSION).unwrap()
    }

    /// Containers and volumes labelled with `driver`'s namespace, straight from the engine.
    async fn leftovers(&self, driver: &DockerDriver) -> (usize, usize) {
        let docker = self.raw_client();
        let filters = HashMap::from([(
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
        let options = ListVolumesOptionsBuilder::new().filters(&filters).build();
        let volumes = docker.list_volumes(Some(options)).await.unwrap();
        (
            containers,
            volumes.volumes.map_or(0, |volumes| volumes.len()),
        )
    }

    /// Closes the namespace: nothing of it may stay on the engine.
    async fn close_leaves_nothing(&self) {
        self.driver.close().await.unwrap();
        assert_eq!(self.leftovers(&self.driver).await, (0, 0), "after close");
    }
}

/// Runs each test body once per engine, then closes its namespace and checks it is empty.
macro_rules! engine_tests {
    ($($test:ident),* $(,)?) => {
        mod docker {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    super::engine_test(ci_exec_docker::Engine::Docker, stringify!($test), super::$test).await;
                }
            )*
        }
        mod podman {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    super::engine_test(ci_exec_docker::Engine::Podman, stringify!($test), super::$test).await;
                }
            )*
        }
    };
}

async fn engine_test(engine: Engine, test: &str, body: impl AsyncFnOnce(&Subject)) {
    let Some(subject) = Subject::new(engine, test).await else {
        return;
    };
    body(&subject).await;
    subject.close_leaves_nothing().await;
}

engine_tests!(
    runs_are_idempotent_and_streams_stay_apart,
    stdin_reaches_the_task,
    volumes_are_shared_and_readable,
    follow_streams_until_exit,
    limits_user_and_workdir_apply,
    privileged_runs_where_the_engine_can_grant_it,
    only_the_task_env_reaches_the_task,
    close_removes_running_and_stopped_containers_and_volumes,
    close_of_a_generated_namespace_removes_what_the_driver_made,
    missing_program_is_not_found,
    missing_image_names_the_image,
    sandbox_runs_commands_one_after_another,
    sandbox_killed_from_outside_is_an_infrastructure_error,
    task_killed_from_outside_is_an_infrastructure_error,
    task_removed_from_outside_is_an_infrastructure_error,
    non_utf8_output_is_byte_exact,
);

async fn runs_are_idempotent_and_streams_stay_apart(subject: &Subject) {
    let task = || shell("hello", "echo out; echo err >&2; exit 3");
    let expected = Finished {
        code: 3,
        stdout: b"out\n".to_vec(),
        stderr: b"err\n".to_vec(),
    };
    assert_eq!(subject.run(task()).await, expected);
    // Same id: the first container is returned, not a second run.
    assert_eq!(subject.run(task()).await, expected);
    assert_eq!(subject.leftovers(&subject.driver).await, (1, 0));

    // A container of that name outside the namespace's label is never taken for the task's.
    let stranger = subject.neighbour(|config| config);
    let name = format!("{}-hello", stranger.namespace());
    let body = bollard::models::ContainerCreateBody {
        image: Some(test_image()),
        cmd: Some(vec!["true".to_owned()]),
        ..Default::default()
    };
    let options = bollard::query_parameters::CreateContainerOptionsBuilder::new()
        .name(&name)
        .build();
    let docker = subject.raw_client();
    docker.create_container(Some(options), body).await.unwrap();
    let error = stranger.run_container(task()).await.unwrap_err();
    let message = format!("{error}: {}", std::error::Error::source(&error).unwrap());
    assert!(message.contains("is not labelled"), "{message}");
    let options = bollard::query_parameters::RemoveContainerOptionsBuilder::new()
        .force(true)
        .build();
    docker.remove_container(&name, Some(options)).await.unwrap();
}

async fn stdin_reaches_the_task(subject: &Subject) {
    let task = shell("cat", "cat; echo done").stdin(Stdin::bytes(&b"line one\nline two\n"[..]));
    let finished = subject.run(task).await;
    assert_eq!(
        (finished.code, finished.stdout_text().as_str()),
        (0, "line one\nline two\ndone\n")
    );

    let (reader, mut writer) = tokio::io::duplex(64);
    let task = Task::new("stream", ["wc", "-c"]).stdin(Stdin::stream(reader));
    let container = subject.driver.run_container(task).await.unwrap();
    writer.write_all(&[b'x'; 100_000]).await.unwrap();
    drop(writer);
    let finished = Finished::of(container.as_ref()).await;
    assert_eq!(
        (finished.code, finished.stdout_text().trim()),
        (0, "100000")
    );
}

async fn volumes_are_shared_and_readable(subject: &Subject) {
    let writer = shell(
        "writer",
        "mkdir -p /data/dir && printf 'shared\\n' > /data/dir/file",
    )
    .mount("cache", "/data");
    assert_eq!(subject.run(writer).await.code, 0);
    let reader = Task::new("reader", ["cat", "/mnt/dir/file"]).mount("cache", "/mnt");
    assert_eq!(subject.run(reader).await.stdout_text(), "shared\n");

    let files = subject.driver.as_volume_files().unwrap();
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
    let volume = subject.driver.create_volume("cache", 0).await.unwrap();
    assert_eq!(volume.name(), "cache");
    let solo = subject.driver.create_volume("solo", 0).await.unwrap();
    solo.cleanup().await.unwrap();
    solo.cleanup().await.unwrap();
    assert_eq!(subject.leftovers(&subject.driver).await.1, 1);
}

async fn follow_streams_until_exit(subject: &Subject) {
    let task = shell(
        "follow",
        "echo first; sleep 1; echo second >&2; sleep 1; echo third",
    );
    let container = subject.driver.run_container(task).await.unwrap();
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
}

async fn limits_user_and_workdir_apply(subject: &Subject) {
    let mut task = shell("limits", "id -u; pwd").user("1234").workdir("/tmp");
    task.limits = Limits {
        cpu_shares: 512,
        memory_bytes: 64 * 1024 * 1024,
    };
    let finished = subject.run(task).await;
    assert_eq!(
        (finished.code, finished.stdout_text().as_str()),
        (0, "1234\n/tmp\n")
    );

    let name = subject.backend_name("limits");
    let host_config = match subject.raw_client().inspect_container(&name, None).await {
        Ok(inspected) => serde_json::to_value(inspected.host_config.unwrap()).unwrap(),
        Err(bollard::errors::Error::JsonDataError { contents, .. }) => {
            serde_json::from_str::<serde_json::Value>(&contents).unwrap()["HostConfig"].clone()
        }
        Err(error) => panic!("cannot inspect `{name}`: {error}"),
    };
    assert_eq!(host_config["Memory"], 64 * 1024 * 1024);
    assert_eq!(host_config["CpuShares"], 512);
}

/// The effective capabilities a task's `grep CapEff /proc/self/status` printed.
fn capabilities(stdout: &str) -> u64 {
    let mask = stdout
        .lines()
        .find_map(|line| line.strip_prefix("CapEff:"))
        .expect("a CapEff line")
        .trim();
    u64::from_str_radix(mask, 16).unwrap()
}

/// Whether this process's capability bounding set holds every capability the kernel knows.
/// Docker 20.10 grants a privileged container all of them, so on a host whose daemon lacks
/// some (a nested container, a sandboxed VM; the tests run beside the daemon, as root) runc
/// refuses to start it. Podman grants the capabilities it has, so it runs either way.
fn bounding_set_is_full() -> bool {
    let last = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .unwrap()
        .trim()
        .parse::<u32>()
        .unwrap();
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let bounding = status
        .lines()
        .find_map(|line| line.strip_prefix("CapBnd:"))
        .map(|mask| u64::from_str_radix(mask.trim(), 16).unwrap())
        .unwrap();
    let all = if last >= 63 {
        u64::MAX
    } else {
        (1u64 << (last + 1)) - 1
    };
    bounding & all == all
}

async fn privileged_runs_where_the_engine_can_grant_it(subject: &Subject) {
    const CAP_SYS_ADMIN: u64 = 1 << 21;
    let unprivileged = Task::new("plain", ["grep", "CapEff", "/proc/self/status"]);
    let finished = subject.run(unprivileged).await;
    assert_eq!(capabilities(&finished.stdout_text()) & CAP_SYS_ADMIN, 0);

    let mut privileged = Task::new("privileged", ["grep", "CapEff", "/proc/self/status"]);
    privileged.privileged = true;
    let grantable = subject.engine == Engine::Podman || bounding_set_is_full();
    match subject.driver.run_container(privileged).await {
        Ok(container) => {
            assert!(
                grantable,
                "a privileged container started on a host lacking capabilities"
            );
            let finished = Finished::of(container.as_ref()).await;
            assert_eq!(finished.code, 0, "{}", finished.stderr_text());
            assert_ne!(capabilities(&finished.stdout_text()) & CAP_SYS_ADMIN, 0);
        }
        Err(error) => {
            assert!(
                !grantable,
                "privileged refused where it should run: {error:?}"
            );
            assert_eq!(error.exit_class().code(), 125);
            let source = std::error::Error::source(&error).unwrap().to_string();
            assert!(
                source.starts_with("the OCI runtime could not grant the capabilities"),
                "{source}"
            );
            assert!(source.contains("run the task unprivileged"), "{source}");
            assert!(!source.contains('\n'), "not one line: {source}");
            // The refused container is not left behind.
            let name = subject.backend_name("privileged");
            let inspected = subject.raw_client().inspect_container(&name, None).await;
            assert!(
                matches!(
                    inspected,
                    Err(bollard::errors::Error::DockerResponseServerError {
                        status_code: 404,
                        ..
                    })
                ),
                "{inspected:?}"
            );
        }
    }
}

async fn only_the_task_env_reaches_the_task(subject: &Subject) {
    let task = Task::new("env", ["env"]).env("CI_EXEC_GIVEN", "yes it is");
    let finished = subject.run(task).await;
    assert_eq!(finished.code, 0);
    let stdout = finished.stdout_text();
    let env: BTreeMap<&str, &str> = stdout
        .lines()
        .filter_map(|line| line.split_once('='))
        .collect();
    assert_eq!(env.get("CI_EXEC_GIVEN"), Some(&"yes it is"));
    // The test image sets no PATH: the engine's default applies.
    assert!(
        env.get("PATH")
            .is_some_and(|path| path.contains("/usr/bin"))
    );
    // The test process's own environment (CARGO_*, HOME of the host user…) stays outside.
    assert!(!env.keys().any(|name| name.starts_with("CARGO")), "{env:?}");
    assert!(!env.contains_key("DOCKER_HOST") && !env.contains_key("CI_EXEC_DOCKER_IMAGE"));

    // A sandbox's commands find their programs through the same default.
    let sandbox = start_sandbox(&subject.driver, Task::new("env-sandbox", ["unused"])).await;
    let mut stdout = Vec::new();
    let output = sandbox
        .exec(
            &["env".to_owned()],
            &BTreeMap::new(),
            &mut stdout,
            &mut Vec::new(),
        )
        .await
        .unwrap();
    assert_eq!(output.exit_code, 0);
    let stdout = String::from_utf8(stdout).unwrap();
    assert!(
        stdout.lines().any(|line| line.starts_with("PATH=")),
        "{stdout}"
    );
    sandbox.cleanup().await.unwrap();
}

async fn close_removes_running_and_stopped_containers_and_volumes(subject: &Subject) {
    closes_everything(subject, &subject.driver).await;
}

async fn close_of_a_generated_namespace_removes_what_the_driver_made(subject: &Subject) {
    // `close` in a generated namespace removes what this driver made, without listing.
    let driver = subject.neighbour(|config| config.namespace_generated(true));
    closes_everything(subject, &driver).await;
}

/// Fills `driver`'s namespace with a stopped and a running task, volumes and a sandbox, then
/// checks that `close` removes all of it and nothing of a neighbour namespace.
async fn closes_everything(subject: &Subject, driver: &DockerDriver) {
    let stopped = driver
        .run_container(Task::new("stopped", ["true"]).mount("v", "/v"))
        .await
        .unwrap();
    Finished::of(stopped.as_ref()).await;
    let running = driver
        .run_container(Task::new("running", ["sleep", "300"]))
        .await
        .unwrap();
    assert!(!running.status().await.unwrap().is_done());
    driver.create_volume("extra", 0).await.unwrap();
    start_sandbox(driver, Task::new("sandbox", ["unused"])).await;
    assert_eq!(subject.leftovers(driver).await, (3, 2));

    // A neighbour namespace on the same engine is left alone.
    let neighbour = subject.neighbour(|config| config);
    neighbour.create_volume("kept", 0).await.unwrap();

    driver.close().await.unwrap();
    assert_eq!(subject.leftovers(driver).await, (0, 0));
    assert_eq!(subject.leftovers(&neighbour).await, (0, 1));
    // Idempotent, and the handles say the container is gone.
    driver.close().await.unwrap();
    running.cleanup().await.unwrap();
    let error = running.status().await.unwrap_err();
    let message = format!("{error}: {}", std::error::Error::source(&error).unwrap());
    assert!(message.contains("no longer exists"), "{message}");
    neighbour.close().await.unwrap();
    assert_eq!(subject.leftovers(&neighbour).await, (0, 0));
}

async fn missing_program_is_not_found(subject: &Subject) {
    let error = subject
        .driver
        .run_container(Task::new("nope", ["no-such-program-here"]))
        .await
        .unwrap_err();
    assert!(
        matches!(&error, DriverError::ProgramNotFound { program, .. } if program == "no-such-program-here"),
        "{error:?}"
    );
    assert_eq!(error.exit_class().code(), 127);
}

async fn missing_image_names_the_image(subject: &Subject) {
    // No registry is reachable here, and none serves this name anywhere.
    let image = "localhost:1/ci-exec/never-built:nope";
    let error = subject
        .driver
        .run_container(Task::new("img", ["true"]).image(image))
        .await
        .unwrap_err();
    assert!(
        matches!(error, DriverError::ImageNotFound { .. }),
        "{error:?}"
    );
    assert_eq!(error.exit_class().code(), 125);
    let message = error.to_string();
    assert!(
        message.contains(&format!("image `{image}` not found")),
        "{message}"
    );
    assert!(message.contains("import"), "{message}");
    assert!(!message.contains('\n'), "not one line: {message}");
}

async fn sandbox_runs_commands_one_after_another(subject: &Subject) {
    let task = Task::new("job", ["unused"])
        .env("FROM_TASK", "task")
        .workdir("/work")
        .mount("src", "/work");
    let sandbox = start_sandbox(&subject.driver, task).await;
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
        subject
            .driver
            .as_volume_files()
            .unwrap()
            .read_file("src", "state")
            .await
            .unwrap(),
        b"kept\n"
    );
    sandbox.cleanup().await.unwrap();
    sandbox.cleanup().await.unwrap();
}

/// Kills container `name` through the engine, as `docker kill` does, once `progress` shows
/// the word `started`; keeps draining `progress` after that so its writer never blocks.
fn kill_once_started(
    subject: &Subject,
    name: String,
    mut progress: tokio::io::DuplexStream,
) -> tokio::task::JoinHandle<()> {
    let docker = subject.raw_client();
    tokio::spawn(async move {
        let mut seen = Vec::new();
        let mut buffer = [0u8; 256];
        while !seen.windows(7).any(|window| window == b"started") {
            let read = tokio::time::timeout(Duration::from_secs(30), progress.read(&mut buffer))
                .await
                .expect("the long command never started")
                .unwrap();
            assert_ne!(read, 0, "output ended before the command started");
            seen.extend_from_slice(&buffer[..read]);
        }
        docker
            .kill_container(
                &name,
                None::<bollard::query_parameters::KillContainerOptions>,
            )
            .await
            .unwrap();
        while progress.read(&mut buffer).await.is_ok_and(|read| read > 0) {}
    })
}

/// `error`'s message and its source's, as the CLI prints them.
fn chain(error: &DriverError) -> String {
    format!("{error}: {}", std::error::Error::source(error).unwrap())
}

async fn sandbox_killed_from_outside_is_an_infrastructure_error(subject: &Subject) {
    let sandbox = start_sandbox(&subject.driver, Task::new("victim", ["unused"])).await;
    // The command says when it runs; the killer reads that from its output.
    let (mut output, progress) = tokio::io::duplex(1024);
    let killer = kill_once_started(subject, subject.backend_name("victim"), progress);
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
    assert!(chain(&error).contains("killed from outside"), "{error:?}");
    // Cleaned up: the container is gone.
    assert_eq!(subject.leftovers(&subject.driver).await.0, 0);
}

async fn task_killed_from_outside_is_an_infrastructure_error(subject: &Subject) {
    let task = shell("victim", "echo started; sleep 600");
    let container = subject.driver.run_container(task).await.unwrap();
    let (mut output, progress) = tokio::io::duplex(1024);
    let killer = kill_once_started(subject, subject.backend_name("victim"), progress);
    // Following returns once the task is gone; how it ended is the status's to say.
    container
        .as_follow()
        .unwrap()
        .follow(&mut output, &mut Vec::new())
        .await
        .unwrap();
    drop(output);
    killer.await.unwrap();
    let error = container.status().await.unwrap_err();
    assert_eq!(error.exit_class().code(), 125, "{error}");
    let message = chain(&error);
    assert!(
        message.contains("was stopped from outside ci-exec"),
        "{message}"
    );
    assert!(!message.contains('\n'), "not one line: {message}");
    container.cleanup().await.unwrap();
    assert_eq!(subject.leftovers(&subject.driver).await.0, 0);

    // A task that exits with a signal's code by itself keeps its code.
    let task = shell("self", "exit 137");
    assert_eq!(subject.run(task).await.code, 137);
}

async fn task_removed_from_outside_is_an_infrastructure_error(subject: &Subject) {
    let task = shell("victim", "echo started; sleep 600");
    let container = subject.driver.run_container(task).await.unwrap();
    // Once the task runs, remove it as `docker rm -f` does, then ask. (Asked while a follow
    // runs, the driver may see the kill first, as the test above; podman 4 records an event
    // for `kill` but none for `rm -f` or `stop`.)
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let mut stdout = Vec::new();
        container.logs(&mut stdout, &mut Vec::new()).await.unwrap();
        if stdout == b"started\n" {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the task never started"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let options = bollard::query_parameters::RemoveContainerOptionsBuilder::new()
        .force(true)
        .build();
    let name = subject.backend_name("victim");
    subject
        .raw_client()
        .remove_container(&name, Some(options))
        .await
        .unwrap();
    let error = container
        .as_follow()
        .unwrap()
        .follow(&mut Vec::new(), &mut Vec::new())
        .await
        .unwrap_err();
    assert_eq!(error.exit_class().code(), 125, "{error}");
    assert!(chain(&error).contains("no longer exists"), "{error:?}");
    let error = container.status().await.unwrap_err();
    assert_eq!(error.exit_class().code(), 125, "{error}");
    container.cleanup().await.unwrap();
}

async fn non_utf8_output_is_byte_exact(subject: &Subject) {
    let task = Task::new("bytes", ["printf", "\\377\\000a\\r\\nno newline"]);
    assert_eq!(subject.run(task).await.stdout, b"\xff\x00a\r\nno newline");
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
    let message = connect_error(Engine::Docker, &missing).await;
    assert!(message.contains("daemon is not running"), "{message}");
    assert!(message.contains("does not exist"), "{message}");

    // A socket file nobody listens on: what a crashed daemon leaves behind.
    let stale = directory.path().join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    let message = connect_error(Engine::Podman, &stale).await;
    assert!(message.contains("nothing listens"), "{message}");
    assert!(message.contains("podman system service"), "{message}");
}

/// What connecting `engine`'s driver to the socket at `socket` says.
async fn connect_error(engine: Engine, socket: &Path) -> String {
    let host = format!("unix://{}", socket.display());
    match DockerDriver::connect(DockerConfig::new(engine, "ns").host(host)).await {
        Ok(_) => "connected".to_owned(),
        Err(error) => error.to_string(),
    }
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

/// Set in the child that `permission_denied_on_the_socket_says_so` starts: the socket to try.
const DENIED_SOCKET_ENV: &str = "CI_EXEC_TEST_DENIED_SOCKET";

#[tokio::test]
async fn permission_denied_on_the_socket_says_so() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    use std::os::unix::process::CommandExt;

    if let Ok(socket) = std::env::var(DENIED_SOCKET_ENV) {
        let message = connect_error(Engine::Docker, Path::new(&socket)).await;
        println!("connect: {message}");
        return;
    }
    let directory = tempfile::tempdir().unwrap();
    std::fs::set_permissions(directory.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let socket = directory.path().join("engine.sock");
    let _listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    let message = if std::fs::metadata("/proc/self").unwrap().uid() == 0 {
        // Root opens any socket: ask again as `nobody`, from this same test binary.
        std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o600)).unwrap();
        // A copy `nobody` can reach: the checkout (and the test binary in it) may sit under a
        // directory only its owner may enter, as `mktemp -d` makes.
        let test_binary = directory.path().join("engines-test");
        std::fs::copy(std::env::current_exe().unwrap(), &test_binary).unwrap();
        std::fs::set_permissions(&test_binary, std::fs::Permissions::from_mode(0o755)).unwrap();
        let output = std::process::Command::new(&test_binary)
            .args([
                "--exact",
                "permission_denied_on_the_socket_says_so",
                "--nocapture",
            ])
            .env(DENIED_SOCKET_ENV, &socket)
            .uid(65534)
            .gid(65534)
            .output()
            .unwrap();
        String::from_utf8_lossy(&output.stdout).into_owned()
    } else {
        std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o000)).unwrap();
        connect_error(Engine::Docker, &socket).await
    };
    assert!(
        message.contains("permission denied on the `docker` socket"),
        "{message}"
    );
    assert!(message.contains("usermod -aG docker"), "{message}");
}

/// `host=ssh://…` reaches a remote engine through `ssh … docker system dial-stdio`, as the
/// cloud drivers will. `.ci/setup-docker.sh` starts a private sshd on 127.0.0.1 whose sessions
/// see the test daemon, and exports `CI_EXEC_TEST_SSH_HOST`, the ssh URL to use.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssh_host_runs_tasks_on_the_remote_engine() {
    let Some(local) = Subject::new(Engine::Docker, "ssh").await else {
        return;
    };
    let Some(ssh) = std::env::var("CI_EXEC_TEST_SSH_HOST")
        .ok()
        .filter(|host| !host.is_empty())
    else {
        let _ = ci_exec_prerequisite::require(
            "ssh_remote",
            Some("`CI_EXEC_TEST_SSH_HOST` is not set".to_owned()),
            FIX,
        );
        return;
    };
    let config = DockerConfig::new(Engine::Docker, namespace("ssh-remote"))
        .host(&ssh)
        .image(test_image());
    let driver = DockerDriver::connect(config).await.unwrap();
    let task = shell("remote", "echo out; echo err >&2; cat; exit 3")
        .stdin(Stdin::bytes(&b"in\n"[..]))
        .mount("data", "/data");
    let container = driver.run_container(task).await.unwrap();
    let finished = Finished::of(container.as_ref()).await;
    assert_eq!(
        finished,
        Finished {
            code: 3,
            stdout: b"out\nin\n".to_vec(),
            stderr: b"err\n".to_vec(),
        }
    );
    driver.close().await.unwrap();
    assert_eq!(
        local.leftovers(&driver).await,
        (0, 0),
        "after close over ssh"
    );
    local.close_leaves_nothing().await;
}
