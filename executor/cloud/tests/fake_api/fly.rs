//! The `fly` driver against the fake Fly Machines API, whose machines are containers on the
//! test Docker engine running our static `ci-exec-init`: errors, timeouts, the app's lifetime,
//! a killed run's leftovers, and the API requests a task costs. Every test checks that the
//! fake saw no request and sent no answer that breaks Fly's OpenAPI document.

use std::time::{Duration, Instant};

use ci_exec_cloud::{FlyConfig, FlyDriver, Secret};
use ci_exec_driver::{Driver, DriverConfig, DriverError, Task, wait_for_exit};
use ci_exec_fake_cloud::{Api, FakeCloud, FakeOptions, Fault};

use super::{IMAGE, TOKEN, chain, namespace};

const FIX: &str = "source .ci/setup-docker.sh (the test Docker engine and image) and \
                   .ci/setup-fly.sh (the static ci-exec-init)";

/// The fake, or `None` (skipped; a failure under `CI=true`) without Docker or the agent.
async fn fake(test: &str) -> Option<FakeCloud> {
    if ci_exec_guest_image::binaries::locate_static("ci-exec-init").is_none() {
        ci_exec_prerequisite::require(test, Some("no static ci-exec-init".to_owned()), FIX);
        return None;
    }
    match FakeCloud::start(Api::Fly, FakeOptions::default()).await {
        Ok(fake) => Some(fake),
        Err(error) => {
            ci_exec_prerequisite::require(test, Some(error.to_string()), FIX);
            None
        }
    }
}

fn config(fake: &FakeCloud, namespace: &str, extra: &str) -> FlyConfig {
    let dsn = format!(
        "fly://{namespace}?token={TOKEN}&endpoint={}{extra}",
        fake.endpoint()
    );
    let parsed = DriverConfig::parse_with_env(&dsn, &|_| None).expect("DSN");
    let mut config = FlyConfig::from_driver_config(&parsed).expect("config");
    config.container_image = IMAGE.to_owned();
    config
}

async fn run(driver: &FlyDriver, id: &str, script: &str) -> Result<(i32, String), DriverError> {
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
    container.cleanup().await?;
    Ok((code, String::from_utf8_lossy(&stdout).into_owned()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fly_a_task_costs_few_requests_and_close_deletes_the_ephemeral_app() {
    let Some(fake) = fake("fly_a_task_costs_few_requests").await else {
        return;
    };
    let ns = namespace("fly-basic");
    let driver = FlyDriver::new(config(&fake, &ns, "")).expect("driver");
    assert!(fake.requests().is_empty(), "nothing before the first task");
    let (code, stdout) = run(&driver, "first", "echo hello; exit 3")
        .await
        .expect("run");
    assert_eq!((code, stdout.as_str()), (3, "hello\n"));
    let first = driver.api_requests();
    let (code, _) = run(&driver, "second", "true").await.expect("run");
    assert_eq!(code, 0);
    let per_task = driver.api_requests() - first;
    // Create, wait for the start, a status poll or two, one read of the output, and stop,
    // wait for the stop and delete at cleanup.
    assert!(
        per_task <= 9,
        "{per_task} requests for one task: {:?}",
        fake.requests()
    );
    eprintln!("fly: {per_task} API requests for a task (first with the app: {first})");
    assert_eq!(fake.fly_apps(), [(driver.app().to_owned(), String::new())]);
    assert!(
        fake.fly_machines().is_empty(),
        "cleanup deletes the machine"
    );

    driver.close().await.expect("close");
    assert!(fake.fly_apps().is_empty(), "the ephemeral app is deleted");
    driver.close().await.expect("close twice");
    assert_eq!(fake.violations(), Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fly_an_existing_app_is_kept_and_only_the_namespaces_machines_and_volumes_go() {
    let Some(fake) = fake("fly_an_existing_app_is_kept").await else {
        return;
    };
    // Another run's ephemeral app stands in for the user's existing one.
    let owner = FlyDriver::new(config(&fake, &namespace("fly-owner"), "")).expect("driver");
    let owners_task = owner
        .run_container(Task::new("keep", ["sleep", "600"]).image(IMAGE))
        .await
        .expect("owner's task");
    let app = owner.app().to_owned();
    let ns = namespace("fly-guest");
    let guest = FlyDriver::new(config(&fake, &ns, &format!("&app={app}"))).expect("driver");
    let task = Task::new("writer", ["sh", "-c", "echo x > /data/file; sleep 600"])
        .image(IMAGE)
        .mount("data", "/data");
    let _running = guest.run_container(task).await.expect("guest task");
    assert_eq!(fake.fly_machines().len(), 2);
    assert_eq!(fake.fly_apps().len(), 1, "{:?}", fake.fly_apps());

    // As if the guest run were killed: a new driver of the namespace closes what it left.
    drop(guest);
    let again = FlyDriver::new(config(&fake, &ns, &format!("&app={app}"))).expect("driver");
    again.close().await.expect("close");
    let machines = fake.fly_machines();
    assert_eq!(
        machines.len(),
        1,
        "only the owner's machine is left: {machines:?}"
    );
    assert_eq!(
        fake.fly_apps(),
        [(app.clone(), String::new())],
        "the app stays, without the volume"
    );

    owners_task.cleanup().await.expect("cleanup");
    owner.close().await.expect("close");
    assert!(fake.fly_apps().is_empty());
    assert_eq!(fake.violations(), Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fly_driver_close_finds_a_killed_runs_ephemeral_app_by_its_name() {
    let Some(fake) = fake("fly_driver_close_finds_a_killed_run").await else {
        return;
    };
    let ns = namespace("fly-killed");
    let killed = FlyDriver::new(config(&fake, &ns, "")).expect("driver");
    let _running = killed
        .run_container(Task::new("long", ["sleep", "600"]).image(IMAGE))
        .await
        .expect("start");
    drop(killed);
    assert_eq!(fake.fly_machines().len(), 1);
    let closer = FlyDriver::new(config(&fake, &ns, "")).expect("driver");
    closer.close().await.expect("close");
    assert!(fake.fly_apps().is_empty(), "{:?}", fake.fly_apps());
    assert!(fake.fly_machines().is_empty());
    assert_eq!(fake.violations(), Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fly_a_bad_token_names_the_parameter_and_its_variable_and_never_itself() {
    let Some(fake) = fake("fly_a_bad_token").await else {
        return;
    };
    let mut config = config(&fake, &namespace("fly-token"), "");
    config.token = Secret::new("fo1_s3cret-token-value");
    let driver = FlyDriver::new(config.clone()).expect("driver");
    let error = run(&driver, "t", "true").await.expect_err("401");
    let text = chain(&error);
    assert!(
        text.contains("parameter `token`")
            && text.contains("FLY_API_TOKEN")
            && text.contains("401"),
        "{text}"
    );
    assert_eq!(error.exit_class().code(), 125);
    for text in [text, format!("{config:?}"), format!("{driver:?}")] {
        assert!(!text.contains("s3cret"), "the token leaked: {text}");
    }
    driver
        .close()
        .await
        .expect("close after a 401 sends nothing more");
    assert_eq!(fake.violations(), Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fly_refusals_carry_the_apis_own_message_and_429_backs_off() {
    let Some(fake) = fake("fly_refusals").await else {
        return;
    };
    let ns = namespace("fly-refused");
    let driver = FlyDriver::new(config(&fake, &ns, "")).expect("driver");
    let machines = format!("/apps/{}/machines", driver.app());
    for (status, body, headers) in [
        (
            429,
            serde_json::json!({"error": "rate limit exceeded"}),
            vec![("Retry-After".to_owned(), "1".to_owned())],
        ),
        (
            403,
            serde_json::json!({"error": "your organization has reached its machine limit"}),
            Vec::new(),
        ),
    ] {
        fake.inject(Fault {
            method: "POST".parse().expect("method"),
            path: machines.clone(),
            status,
            body,
            headers,
            times: 1,
        });
    }
    let started = Instant::now();
    let error = run(&driver, "t", "true").await.expect_err("403");
    let text = chain(&error);
    assert!(
        text.contains("your organization has reached its machine limit") && text.contains("403"),
        "{text}"
    );
    assert_eq!(error.exit_class().code(), 125);
    let statuses: Vec<u16> = fake
        .requests()
        .iter()
        .filter(|request| request.method == "POST" && request.path == machines)
        .map(|request| request.status)
        .collect();
    assert_eq!(statuses, [429, 403], "retried after the 429");
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "waited as Retry-After said"
    );

    // A bad image is Fly's own 422 with its message.
    let task = Task::new("bad-image", ["true"]).image("localhost/ci-exec/no-such-image:1");
    let error = driver.run_container(task).await.expect_err("422");
    let text = chain(&error);
    assert!(
        text.contains("422") && text.contains("no-such-image"),
        "{text}"
    );
    driver.close().await.expect("close");
    assert_eq!(fake.violations(), Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fly_a_machine_that_does_not_start_in_start_timeout_is_deleted_with_exit_125() {
    let Some(fake) = fake("fly_a_machine_that_does_not_start").await else {
        return;
    };
    let driver =
        FlyDriver::new(config(&fake, &namespace("fly-slow"), "&start_timeout=2s")).expect("driver");
    // Every wait times out, as for a machine stuck in `created`.
    fake.inject(Fault {
        method: "GET".parse().expect("method"),
        path: format!("/apps/{}/machines/", driver.app()),
        status: 408,
        body: serde_json::json!({"error": "deadline exceeded"}),
        headers: Vec::new(),
        times: 1000,
    });
    let started = Instant::now();
    let error = run(&driver, "t", "sleep 600").await.expect_err("timeout");
    let text = chain(&error);
    assert!(
        text.contains("start_timeout") && text.contains("deleted"),
        "{text}"
    );
    assert_eq!(error.exit_class().code(), 125);
    assert!(started.elapsed() >= Duration::from_secs(2));
    assert!(
        fake.fly_machines().is_empty(),
        "the machine was deleted: {:?}",
        fake.fly_machines()
    );
    driver.close().await.expect("close");
    assert_eq!(fake.violations(), Vec::<String>::new());
}

/// The `fly` numbers of BENCHMARKS.md (`benches/cloud/bench.sh` prints the `bench:` lines): API
/// requests of a run of one task and of ten (each task cleaned up), and the time from
/// `run_container` on a fresh driver to the first output byte, next to the plain `docker`
/// driver on the same engine in the same process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fly_bench_api_requests_and_time_to_first_output() {
    let Some(fake) = fake("fly_bench_api_requests_and_time_to_first_output").await else {
        return;
    };
    super::docker_baseline().await;
    for tasks in [1usize, 10] {
        let before = fake.requests().len();
        let driver = FlyDriver::new(config(&fake, &namespace("fly-bench"), "")).expect("driver");
        let time = super::first_output(&driver, "task0").await;
        for task in 1..tasks {
            run(&driver, &format!("task{task}"), "true")
                .await
                .expect("run");
        }
        driver.close().await.expect("close");
        let requests = &fake.requests()[before..];
        let by_kind = requests.iter().fold(
            std::collections::BTreeMap::<String, usize>::new(),
            |mut map, request| {
                let path: Vec<&str> = request
                    .path
                    .split('/')
                    .enumerate()
                    .map(|(index, part)| match index {
                        2 => "{app}",
                        4 => "{id}",
                        _ => part,
                    })
                    .collect();
                *map.entry(format!("{} {}", request.method, path.join("/")))
                    .or_default() += 1;
                map
            },
        );
        eprintln!(
            "bench: fly: {tasks} task(s): {} API requests ({by_kind:?}); first output after {} ms",
            requests.len(),
            time.as_millis()
        );
    }
    assert_eq!(fake.violations(), Vec::<String>::new());
}
