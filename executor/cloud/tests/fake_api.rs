//! The `hetzner` and `digitalocean` drivers (and `fly`, in `fake_api/fly.rs`) against the fake
//! APIs of `tests/fake-cloud`, whose
//! servers are the test sshd of `.ci/setup-docker.sh` (its sessions see the test Docker
//! engine): provisioning, errors, and the worker pool. Every test also checks that the fake
//! saw no request or sent no response that breaks the provider's OpenAPI document.

use std::sync::Arc;
use std::time::{Duration, Instant};

use ci_exec_cloud::{CloudConfig, CloudDriver};
use ci_exec_driver::{
    Driver, DriverConfig, DriverError, Task, error_chain as chain, wait_for_exit,
};
use ci_exec_fake_cloud::{Api, FakeCloud, FakeOptions, Fault, SshTestHost};

#[path = "fake_api/fly.rs"]
mod fly;

const TOKEN: &str = "fake-cloud-token";
const IMAGE: &str = "localhost/ci-exec/test:latest";
const FIX: &str = "source .ci/setup-docker.sh as root (starts the test sshd and Docker engine)";

fn namespace(prefix: &str) -> String {
    format!(
        "{prefix}-{}",
        &ci_exec_driver::generate_namespace()["ci-".len()..]
    )
}

fn driver_name(api: Api) -> &'static str {
    match api {
        Api::Hetzner => "hetzner",
        Api::DigitalOcean => "digitalocean",
        Api::Fly => "fly",
    }
}

/// The test sshd, or `None` (skipped; a failure under `CI=true`).
fn ssh_host(test: &str) -> Option<SshTestHost> {
    match SshTestHost::from_env() {
        Ok(host) => Some(host),
        Err(missing) => {
            ci_exec_prerequisite::require(test, Some(missing), FIX);
            None
        }
    }
}

struct Subject {
    fake: FakeCloud,
    api: Api,
    host: Option<SshTestHost>,
    state_dir: tempfile::TempDir,
}

impl Subject {
    async fn new(api: Api, host: Option<SshTestHost>) -> Subject {
        let options = host.as_ref().map(SshTestHost::options).unwrap_or_default();
        Subject {
            fake: FakeCloud::start(api, options).await.expect("fake API"),
            api,
            host,
            state_dir: tempfile::tempdir().expect("tempdir"),
        }
    }

    /// A config for the fake in `namespace`, with `extra` DSN parameters (`&k=v…`).
    fn config(&self, namespace: &str, extra: &str) -> CloudConfig {
        let user = self
            .host
            .as_ref()
            .map_or_else(|| "root".to_owned(), |host| host.user.clone());
        let mut params: Vec<(String, String)> = [
            ("token", TOKEN.to_owned()),
            ("endpoint", self.fake.endpoint()),
            ("ssh_user", user),
            ("ssh_timeout", "30s".to_owned()),
            ("docker_timeout", "30s".to_owned()),
            ("poll_interval", "100ms".to_owned()),
        ]
        .map(|(key, value)| (key.to_owned(), value))
        .to_vec();
        for pair in extra.split('&').filter(|pair| !pair.is_empty()) {
            let (key, value) = pair.split_once('=').expect("k=v");
            params.retain(|(known, _)| known != key);
            params.push((key.to_owned(), value.to_owned()));
        }
        let query: Vec<String> = params
            .iter()
            .map(|(key, value)| format!("{key}={value}"))
            .collect();
        let dsn = format!(
            "{}://{namespace}?{}",
            driver_name(self.api),
            query.join("&")
        );
        let parsed = DriverConfig::parse_with_env(&dsn, &|_| None)
            .unwrap_or_else(|error| panic!("DSN `{dsn}`: {error}"));
        let mut config = CloudConfig::from_driver_config(&parsed).expect("config");
        config.container_image = IMAGE.to_owned();
        config.state_dir = Some(self.state_dir.path().to_owned());
        config.pool.settle = Duration::from_millis(300);
        config
    }

    fn driver(&self, namespace: &str, extra: &str) -> CloudDriver {
        CloudDriver::new(self.config(namespace, extra)).expect("driver")
    }

    fn assert_spec_kept(&self) {
        assert_eq!(self.fake.violations(), Vec::<String>::new());
    }
}

/// Runs `script` to the end: exit code and stdout.
async fn run(driver: &CloudDriver, id: &str, script: &str) -> Result<(i32, String), DriverError> {
    let task = Task::new(id, ["sh", "-c", script]).image(IMAGE);
    let container = driver.run_container(task).await?;
    let code = wait_for_exit(
        &*container,
        Duration::from_millis(50),
        Some(Duration::from_secs(120)),
    )
    .await?;
    let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
    container.logs(&mut stdout, &mut stderr).await?;
    Ok((code, String::from_utf8_lossy(&stdout).into_owned()))
}

async fn runs_a_task_over_ssh_and_close_removes_server_and_key(api: Api) {
    let Some(host) = ssh_host("runs_a_task_over_ssh") else {
        return;
    };
    let subject = Subject::new(api, Some(host)).await;
    let ns = namespace("basic");
    let extra = match api {
        Api::Hetzner => "&server_type=auto&labels=team=ci,env=test",
        Api::DigitalOcean => "&size=auto&tags=prod,myapp",
        Api::Fly => unreachable!("the fly driver has its own tests (`fly.rs`)"),
    };
    let driver = subject.driver(&ns, extra);
    assert!(
        subject.fake.requests().is_empty(),
        "nothing before the first task"
    );
    let (code, stdout) = run(
        &driver,
        "hello",
        "echo hello from $(hostname -s >/dev/null; echo the server); exit 3",
    )
    .await
    .expect("run");
    assert_eq!((code, stdout.as_str()), (3, "hello from the server\n"));

    let servers = subject.fake.servers();
    assert_eq!(servers.len(), 1);
    let server = &servers[0];
    let has = |key: &str, value: &str| match api {
        Api::Hetzner => server.labels.get(key).map(String::as_str) == Some(value),
        Api::DigitalOcean => {
            let tag = match key {
                "ci" => "ci".to_owned(),
                "namespace" => format!("namespace-{value}"),
                _ if value.is_empty() => key.to_owned(),
                _ => format!("{key}:{value}"),
            };
            server.labels.contains_key(&tag)
        }
        Api::Fly => unreachable!("the fly driver has its own tests (`fly.rs`)"),
    };
    assert!(has("ci", "true"), "{:?}", server.labels);
    assert!(has("namespace", &ns), "{:?}", server.labels);
    assert!(has("ci-worker-status", "busy"), "{:?}", server.labels);
    match api {
        Api::Hetzner => assert!(
            has("team", "ci") && has("env", "test"),
            "{:?}",
            server.labels
        ),
        Api::DigitalOcean => assert!(has("prod", "") && has("myapp", ""), "{:?}", server.labels),
        Api::Fly => unreachable!("the fly driver has its own tests (`fly.rs`)"),
    }
    assert_eq!(server.public_keys.len(), 1);
    assert!(server.public_keys[0].starts_with("ssh-ed25519 "));
    assert_eq!(subject.fake.keys().len(), 1);

    driver.close().await.expect("close");
    assert!(subject.fake.servers().is_empty(), "the server is deleted");
    assert!(subject.fake.keys().is_empty(), "the key is deleted");
    driver.close().await.expect("close twice");
    subject.assert_spec_kept();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hetzner_runs_a_task_over_ssh_and_close_removes_server_and_key() {
    runs_a_task_over_ssh_and_close_removes_server_and_key(Api::Hetzner).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn digitalocean_runs_a_task_over_ssh_and_close_removes_server_and_key() {
    runs_a_task_over_ssh_and_close_removes_server_and_key(Api::DigitalOcean).await;
}

#[tokio::test]
async fn a_bad_token_names_the_parameter_and_its_variable_and_never_itself() {
    for api in [Api::Hetzner, Api::DigitalOcean] {
        let subject = Subject::new(api, None).await;
        let mut config = subject.config(&namespace("token"), "");
        config.token = ci_exec_cloud::Secret::new("s3cret-token-value");
        let driver = CloudDriver::new(config.clone()).expect("driver");
        let error = run(&driver, "t", "true").await.expect_err("401");
        let chain = chain(&error);
        let env = if api == Api::Hetzner {
            "HETZNER_TOKEN"
        } else {
            "DIGITALOCEAN_TOKEN"
        };
        assert!(
            chain.contains("parameter `token`") && chain.contains(env),
            "{chain}"
        );
        assert!(chain.contains("401"), "{chain}");
        for text in [chain, format!("{config:?}"), format!("{driver:?}")] {
            assert!(!text.contains("s3cret"), "the token leaked: {text}");
        }
        subject.assert_spec_kept();
    }
}

#[tokio::test]
async fn refusals_carry_the_apis_own_message_and_429_backs_off_as_the_headers_say() {
    for api in [Api::Hetzner, Api::DigitalOcean] {
        let subject = Subject::new(api, None).await;
        let (extra, message, create) = match api {
            Api::Hetzner => (
                "&server_type=cx99",
                "server type cx99 not found",
                "/servers",
            ),
            Api::DigitalOcean => (
                "&size=s-99",
                "invalid size for Droplet creation",
                "/v2/droplets",
            ),
            Api::Fly => unreachable!("the fly driver has its own tests (`fly.rs`)"),
        };
        let reset = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_secs()
            + 1;
        let body = match api {
            Api::Hetzner => {
                serde_json::json!({"error": {"code": "rate_limit_exceeded", "message": "limit", "details": {}}})
            }
            Api::DigitalOcean => {
                serde_json::json!({"id": "too_many_requests", "message": "API Rate limit exceeded."})
            }
            Api::Fly => unreachable!("the fly driver has its own tests (`fly.rs`)"),
        };
        subject.fake.inject(Fault {
            method: "POST".parse().expect("method"),
            path: create.to_owned(),
            status: 429,
            body,
            headers: vec![
                ("RateLimit-Limit".to_owned(), "3600".to_owned()),
                ("RateLimit-Remaining".to_owned(), "0".to_owned()),
                ("RateLimit-Reset".to_owned(), reset.to_string()),
            ],
            times: 1,
        });
        let driver = subject.driver(&namespace("refused"), extra);
        let started = Instant::now();
        let error = run(&driver, "t", "true").await.expect_err("422");
        let chain = chain(&error);
        assert!(chain.contains(message) && chain.contains("422"), "{chain}");
        assert_eq!(error.exit_class().code(), 125);
        let statuses: Vec<u16> = subject
            .fake
            .requests()
            .iter()
            .filter(|request| request.method == "POST" && request.path == create)
            .map(|request| request.status)
            .collect();
        assert_eq!(statuses, [429, 422], "retried after the 429");
        assert!(
            started.elapsed() >= Duration::from_millis(900),
            "waited for the reset"
        );
        driver.close().await.expect("close");
        assert!(
            subject.fake.keys().is_empty(),
            "the key made for the server is deleted"
        );
        subject.assert_spec_kept();
    }
}

#[tokio::test]
async fn a_403_carries_the_apis_own_message() {
    let subject = Subject::new(Api::Hetzner, None).await;
    subject.fake.inject(Fault {
        method: "POST".parse().expect("method"),
        path: "/servers".to_owned(),
        status: 403,
        body: serde_json::json!({"error": {"code": "resource_limit_exceeded", "message": "server limit exceeded for this project", "details": {}}}),
        headers: Vec::new(),
        times: 1,
    });
    let driver = subject.driver(&namespace("quota"), "");
    let error = run(&driver, "t", "true").await.expect_err("403");
    let chain = chain(&error);
    assert!(
        chain.contains("(403): server limit exceeded for this project (resource_limit_exceeded)"),
        "{chain}"
    );
    driver.close().await.expect("close");
    assert!(subject.fake.keys().is_empty());
    subject.assert_spec_kept();
}

#[tokio::test]
async fn a_server_whose_sshd_never_answers_is_deleted_and_the_run_fails_with_125() {
    for api in [Api::Hetzner, Api::DigitalOcean] {
        // TEST-NET-1: no sshd answers there.
        let options = FakeOptions {
            server_address: "192.0.2.1".to_owned(),
            ..FakeOptions::default()
        };
        let subject = Subject {
            fake: FakeCloud::start(api, options).await.expect("fake API"),
            api,
            host: None,
            state_dir: tempfile::tempdir().expect("tempdir"),
        };
        let driver = subject.driver(&namespace("timeout"), "&ssh_timeout=1s");
        let started = Instant::now();
        let error = run(&driver, "t", "true").await.expect_err("timeout");
        assert!(started.elapsed() < Duration::from_secs(20));
        assert_eq!(error.exit_class().code(), 125);
        let chain = chain(&error);
        assert!(
            chain.contains("ssh_timeout") && chain.contains("was deleted"),
            "{chain}"
        );
        assert!(
            subject.fake.servers().is_empty(),
            "the server is deleted at once"
        );
        driver.close().await.expect("close");
        assert!(subject.fake.keys().is_empty());
        subject.assert_spec_kept();
    }
}

/// Time a run held its server: from its first task's start to the end of its close.
async fn timed_run(driver: CloudDriver, id: &str) -> (Instant, Instant) {
    let (code, _) = run(&driver, id, "sleep 0.3").await.expect("run");
    let started = Instant::now() - Duration::from_millis(300);
    assert_eq!(code, 0);
    driver.close().await.expect("close");
    (started, Instant::now())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_workers_1_makes_three_runs_take_turns() {
    let Some(host) = ssh_host("max_workers_1_makes_three_runs_take_turns") else {
        return;
    };
    let subject = Arc::new(Subject::new(Api::Hetzner, Some(host)).await);
    let runs: Vec<_> = (0..3)
        .map(|run| {
            let driver = subject.driver(
                &namespace(&format!("turn{run}")),
                "&max_workers=1&wait_timeout=2m",
            );
            tokio::spawn(timed_run(driver, "turn"))
        })
        .collect();
    let mut spans = Vec::new();
    for run in runs {
        spans.push(run.await.expect("join"));
    }
    spans.sort();
    for pair in spans.windows(2) {
        assert!(
            pair[0].1 <= pair[1].0,
            "two runs held a server at once: {spans:?}"
        );
    }
    assert!(subject.fake.servers().is_empty());
    subject.assert_spec_kept();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_timeout_ends_the_wait_for_a_slot() {
    let Some(host) = ssh_host("wait_timeout_ends_the_wait_for_a_slot") else {
        return;
    };
    let subject = Subject::new(Api::Hetzner, Some(host)).await;
    let holder = subject.driver(&namespace("holder"), "");
    run(&holder, "hold", "true").await.expect("holder runs");
    let waiter = subject.driver(&namespace("waiter"), "&max_workers=1&wait_timeout=1s");
    let started = Instant::now();
    let error = run(&waiter, "wait", "true").await.expect_err("no slot");
    assert!(started.elapsed() >= Duration::from_secs(1));
    let chain = chain(&error);
    assert!(
        chain.contains("no free hetzner worker") && chain.contains("wait_timeout"),
        "{chain}"
    );
    assert_eq!(subject.fake.servers().len(), 1, "the waiter made no server");
    waiter.close().await.expect("close");
    holder.close().await.expect("close");
    subject.assert_spec_kept();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_runs_race_for_one_parked_worker_and_one_wins() {
    for api in [Api::Hetzner, Api::DigitalOcean] {
        let Some(host) = ssh_host("two_runs_race_for_one_parked_worker") else {
            return;
        };
        let subject = Arc::new(Subject::new(api, Some(host)).await);
        let pool = "&reuse_worker=true&max_workers=2";
        let first = subject.driver(&namespace("park"), pool);
        run(&first, "first", "true").await.expect("first run");
        first.close().await.expect("park");
        let parked = subject.fake.servers();
        assert_eq!(parked.len(), 1, "parked, not deleted");
        let parked_id = parked[0].id.to_string();

        let racers: Vec<_> = (0..2)
            .map(|racer| {
                let driver = subject.driver(&namespace(&format!("race{racer}")), pool);
                tokio::spawn(async move {
                    run(&driver, "race", "true").await.expect("race run");
                    let server = driver.server().expect("a server").0;
                    (driver, server)
                })
            })
            .collect();
        let mut held = Vec::new();
        for racer in racers {
            held.push(racer.await.expect("join"));
        }
        let on_parked = held
            .iter()
            .filter(|(_, server)| *server == parked_id)
            .count();
        assert_eq!(
            on_parked, 1,
            "exactly one run claimed the parked server ({api:?})"
        );
        assert_eq!(
            subject.fake.servers().len(),
            2,
            "the other made a second one"
        );
        for (driver, _) in held {
            driver.close().await.expect("park");
        }
        assert_eq!(subject.fake.servers().len(), 2, "both parked");
        subject.assert_spec_kept();
        subject.fake.remove_all_servers();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_workers_are_swept_idle_past_max_idle_and_busy_without_heartbeat() {
    let Some(host) = ssh_host("stale_workers_are_swept") else {
        return;
    };
    let subject = Subject::new(Api::Hetzner, Some(host)).await;
    let pool = "&reuse_worker=true&max_workers=3&max_idle=10m";
    let parked = subject.driver(&namespace("idle"), pool);
    run(&parked, "idle", "true").await.expect("run");
    parked.close().await.expect("park");
    let killed = subject.driver(&namespace("killed"), "&max_workers=3");
    run(&killed, "killed", "true").await.expect("run");
    // What an hour looks like to the labels: parked long ago, a heartbeat long stopped.
    let hour_ago = (std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs()
        - 3600)
        .to_string();
    for server in subject.fake.servers() {
        let mut labels = server.labels.clone();
        for key in ["ci-idle-since", "ci-heartbeat"] {
            if labels.contains_key(key) {
                labels.insert(key.to_owned(), hour_ago.clone());
            }
        }
        subject.fake.set_labels(server.id, labels);
    }
    let next = subject.driver(&namespace("next"), "&max_workers=3");
    run(&next, "next", "true").await.expect("run");
    let left: Vec<_> = subject
        .fake
        .servers()
        .iter()
        .map(|server| server.id)
        .collect();
    assert_eq!(left.len(), 1, "only the new run's server is left: {left:?}");
    next.close().await.expect("close");
    // The killed run's key goes with `driver close` of its namespace.
    let recovery = subject.driver(killed.namespace(), "");
    recovery.close().await.expect("driver close");
    let keys = subject.fake.keys();
    assert!(
        keys.iter().all(|key| key.starts_with("ci-pool-")),
        "only the pool's key stays: {keys:?}"
    );
    // A real server takes the killed run's containers with it; the fake's is the test engine.
    let docker_host = std::env::var("DOCKER_HOST")
        .unwrap_or_else(|_| "unix:///run/ci-exec/docker.sock".to_owned());
    let engine = ci_exec_docker::DockerDriver::new(
        ci_exec_docker::DockerConfig::new(ci_exec_docker::Engine::Docker, killed.namespace())
            .host(docker_host),
    )
    .expect("docker driver");
    engine
        .close()
        .await
        .expect("remove the killed run's containers");
    std::mem::forget(killed);
    subject.assert_spec_kept();
    subject.fake.remove_all_servers();
}

/// Time from `run_container` of a driver that has not provisioned yet to the task's first
/// output byte.
async fn first_output(driver: &dyn Driver, id: &str) -> Duration {
    let started = Instant::now();
    let task = Task::new(id, ["sh", "-c", "echo first; sleep 0.2"]).image(IMAGE);
    let container = driver.run_container(task).await.expect("run");
    loop {
        let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
        container
            .logs(&mut stdout, &mut stderr)
            .await
            .expect("logs");
        if !stdout.is_empty() {
            return started.elapsed();
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The baseline of the cloud benches: time to the first output byte of the plain `docker`
/// driver on the test engine, printed as `bench:` lines. Twice: the first also pays for the
/// engine's first connection of this process.
async fn docker_baseline() {
    let docker_host = std::env::var("DOCKER_HOST")
        .unwrap_or_else(|_| "unix:///run/ci-exec/docker.sock".to_owned());
    for round in ["cold", "warm"] {
        let docker = ci_exec_docker::DockerDriver::new(
            ci_exec_docker::DockerConfig::new(
                ci_exec_docker::Engine::Docker,
                namespace("bench-docker"),
            )
            .host(docker_host.clone())
            .image(IMAGE),
        )
        .expect("docker driver");
        let time = first_output(&docker, "first").await;
        eprintln!(
            "bench: docker ({round}): first output after {} ms",
            time.as_millis()
        );
        docker.close().await.expect("close");
    }
}

/// The numbers of BENCHMARKS.md (`benches/cloud/bench.sh` prints the `bench:` lines): API
/// requests of a run of one task and of ten, and the time to the first output byte against
/// the fakes (provisioning included: a server that is the local sshd) next to the plain
/// `docker` driver on the same engine.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_api_requests_and_time_to_first_output() {
    let Some(host) = ssh_host("bench_api_requests_and_time_to_first_output") else {
        return;
    };
    docker_baseline().await;
    for api in [Api::Hetzner, Api::DigitalOcean] {
        for tasks in [1usize, 10] {
            let subject = Subject::new(api, Some(host.clone())).await;
            let driver = subject.driver(&namespace("bench"), "");
            let time = first_output(&driver, "task0").await;
            for task in 1..tasks {
                run(&driver, &format!("task{task}"), "true")
                    .await
                    .expect("run");
            }
            driver.close().await.expect("close");
            let requests = subject.fake.requests();
            let by_kind = requests.iter().fold(
                std::collections::BTreeMap::<String, usize>::new(),
                |mut map, request| {
                    let path: Vec<&str> = request
                        .path
                        .split('/')
                        .map(|part| {
                            if part.chars().all(|c| c.is_ascii_digit()) && !part.is_empty() {
                                "{id}"
                            } else {
                                part
                            }
                        })
                        .collect();
                    *map.entry(format!("{} {}", request.method, path.join("/")))
                        .or_default() += 1;
                    map
                },
            );
            eprintln!(
                "bench: {}: {tasks} task(s): {} API requests ({by_kind:?}); first output after {} ms",
                driver_name(api),
                requests.len(),
                time.as_millis()
            );
            subject.assert_spec_kept();
        }
    }
}
