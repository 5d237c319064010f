//! The `k8s` driver beyond the conformance suite: `kubectl` against the fake API server, the
//! failures a cluster reports, follow across dropped streams, and API requests per task.

use std::path::PathBuf;
use std::time::Duration;

use ci_exec_driver::{Driver, DriverConfig, DriverError, Task, wait_for_exit};
use ci_exec_fake_kube::{FakeKube, FakeOptions};
use ci_exec_tests::drivers::{CONTAINER_TEST_IMAGE, docker_host};
use ci_exec_tests::{missing_prerequisite, unique_namespace};

const NAMESPACE: &str = "work";
const TOKEN: &str = "s3cret-token-of-the-kubeconfig";
const FORBIDDEN: &str = "forbidden-token-of-the-kubeconfig";

/// A fake of its own (options differ per test), with a kubeconfig carrying `token`.
async fn fake(options: FakeOptions, token: &str) -> Option<(FakeKube, tempfile::TempDir, PathBuf)> {
    let Some(host) = docker_host() else {
        return missing_prerequisite(
            "k8s",
            "no Docker engine for the fake API server's pods: run `bash .ci/setup-docker.sh` as root",
        );
    };
    let options = FakeOptions {
        namespaces: vec![NAMESPACE.to_owned()],
        docker_host: Some(host),
        ..options
    };
    let fake = FakeKube::start(options).await.expect("fake API server");
    let directory = tempfile::tempdir().expect("temp dir");
    let kubeconfig = fake
        .write_kubeconfig(&directory.path().join("kubeconfig"), NAMESPACE, token)
        .expect("kubeconfig");
    Some((fake, directory, kubeconfig))
}

async fn driver(
    kubeconfig: &std::path::Path,
    kube_namespace: &str,
) -> (String, ci_exec_k8s::K8sDriver) {
    let namespace = unique_namespace("k8s");
    let dsn = format!(
        "k8s://{namespace}?kube_namespace={kube_namespace}&kubeconfig={}&image={CONTAINER_TEST_IMAGE}",
        kubeconfig.display()
    );
    let config = DriverConfig::parse_with_env(&dsn, &|_| None).expect("dsn");
    let driver =
        ci_exec_k8s::K8sDriver::connect(ci_exec_k8s::K8sConfig::from_driver_config(&config))
            .await
            .expect("driver");
    (namespace, driver)
}

fn shell(id: &str, script: &str) -> Task {
    Task::new(id, ["sh", "-c", script]).image(CONTAINER_TEST_IMAGE)
}

/// An infrastructure failure (exit 125) whose message names `pod` (when given) and `reason`
/// and never the kubeconfig's token.
fn assert_failure(error: &DriverError, pod: Option<&str>, reason: &str) {
    let message = ci_exec_driver::error_chain(error);
    assert_eq!(error.exit_class().code(), 125, "{message}");
    assert!(
        message.contains(reason),
        "`{reason}` missing from: {message}"
    );
    if let Some(pod) = pod {
        assert!(message.contains(pod), "pod `{pod}` missing from: {message}");
    }
    assert!(
        !message.contains(TOKEN) && !message.contains(FORBIDDEN),
        "{message}"
    );
    assert!(!message.contains('\n'), "one line: {message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_failures_are_infrastructure_errors_that_name_the_reason() {
    let options = FakeOptions {
        tokens: vec![TOKEN.to_owned()],
        forbidden_tokens: vec![FORBIDDEN.to_owned()],
        ..FakeOptions::default()
    };
    let Some((fake, directory, kubeconfig)) = fake(options, TOKEN).await else {
        return;
    };
    let task = || shell("t", "true");
    let pod_of = |namespace: &str| format!("{namespace}-t");

    // Unreachable: nothing listens on the port a stopped fake had.
    let unreachable = directory.path().join("unreachable");
    std::fs::write(
        &unreachable,
        std::fs::read_to_string(&kubeconfig)
            .unwrap()
            .replace(&fake.url(), "http://127.0.0.1:9"),
    )
    .unwrap();
    let (namespace, k8s) = driver(&unreachable, NAMESPACE).await;
    let error = k8s.run_container(task()).await.expect_err("unreachable");
    assert_failure(&error, Some(&pod_of(&namespace)), "API server unreachable");

    // 401 and 403.
    let wrong = directory.path().join("wrong");
    std::fs::write(
        &wrong,
        std::fs::read_to_string(&kubeconfig)
            .unwrap()
            .replace(TOKEN, "not-the-token"),
    )
    .unwrap();
    let (namespace, k8s) = driver(&wrong, NAMESPACE).await;
    let error = k8s.run_container(task()).await.expect_err("401");
    assert_failure(&error, Some(&pod_of(&namespace)), "401 Unauthorized");
    let forbidden = directory.path().join("forbidden");
    std::fs::write(
        &forbidden,
        std::fs::read_to_string(&kubeconfig)
            .unwrap()
            .replace(TOKEN, FORBIDDEN),
    )
    .unwrap();
    let (namespace, k8s) = driver(&forbidden, NAMESPACE).await;
    let error = k8s.run_container(task()).await.expect_err("403");
    assert_failure(&error, Some(&pod_of(&namespace)), "forbidden (403)");

    // A Kubernetes namespace that does not exist.
    let (namespace, k8s) = driver(&kubeconfig, "nope").await;
    let error = k8s
        .run_container(task())
        .await
        .expect_err("missing namespace");
    assert_failure(
        &error,
        Some(&pod_of(&namespace)),
        "Kubernetes namespace `nope` does not exist",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_failures_name_the_pod_and_leave_nothing_behind() {
    let options = FakeOptions {
        tokens: vec![TOKEN.to_owned()],
        ..FakeOptions::default()
    };
    let Some((fake, _directory, kubeconfig)) = fake(options, TOKEN).await else {
        return;
    };
    let (namespace, k8s) = driver(&kubeconfig, NAMESPACE).await;
    let selector = format!("ci-exec.namespace={namespace}");

    let missing = Task::new("pull", ["true"]).image("localhost/ci-exec/no-such-image:latest");
    let error = k8s.run_container(missing).await.expect_err("image pull");
    assert_failure(&error, Some(&format!("{namespace}-pull")), "ErrImagePull");
    assert_eq!(
        fake.objects(NAMESPACE, &selector).0,
        0,
        "the failed pod is deleted"
    );

    for reason in ["Evicted", "NodeLost"] {
        let id = reason.to_ascii_lowercase();
        let pod = format!("{namespace}-{id}");
        let container = k8s
            .run_container(shell(&id, "sleep 600"))
            .await
            .expect("start");
        fake.fail_pod(NAMESPACE, &pod, reason).await;
        let error = wait_for_exit(
            &*container,
            Duration::from_millis(50),
            Some(Duration::from_secs(60)),
        )
        .await
        .expect_err(reason);
        assert_failure(&error, Some(&pod), reason);
        assert_eq!(
            fake.objects(NAMESPACE, &selector).0,
            0,
            "{reason}: the pod is deleted"
        );
    }
    k8s.close().await.expect("close");
    assert_eq!(fake.objects(NAMESPACE, &selector), (0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follow_survives_dropped_streams_without_loss_or_repeat() {
    let options = FakeOptions {
        drop_follow_after: Some(256),
        ..FakeOptions::default()
    };
    let Some((fake, _directory, kubeconfig)) = fake(options, TOKEN).await else {
        return;
    };
    let (_, k8s) = driver(&kubeconfig, NAMESPACE).await;
    let container = k8s
        .run_container(shell(
            "counting",
            "sleep 1; for i in $(seq 1 300); do echo $i; echo e$i >&2; case $i in *0) sleep 0.05;; esac; done",
        ))
        .await
        .expect("start");
    let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
    container
        .as_follow()
        .expect("follow")
        .follow(&mut stdout, &mut stderr)
        .await
        .expect("follow");
    let expected: String = (1..=300).map(|i| format!("{i}\n")).collect();
    let expected_err: String = (1..=300).map(|i| format!("e{i}\n")).collect();
    assert!(
        String::from_utf8_lossy(&stdout) == expected,
        "stdout differs ({} bytes)",
        stdout.len()
    );
    assert!(
        String::from_utf8_lossy(&stderr) == expected_err,
        "stderr differs ({} bytes)",
        stderr.len()
    );
    let logs = fake
        .requests
        .snapshot()
        .get("GET pods/log")
        .copied()
        .unwrap_or(0);
    assert!(
        logs > 8,
        "the streams were dropped and resumed ({logs} log requests)"
    );
    k8s.close().await.expect("close");
}

/// The API requests one task costs (start, wait, read its logs, clean up), printed for
/// BENCHMARKS.md, and bounded so a regression to busier polling fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_requests_per_task() {
    let Some((fake, _directory, kubeconfig)) = fake(FakeOptions::default(), TOKEN).await else {
        return;
    };
    let (_, k8s) = driver(&kubeconfig, NAMESPACE).await;
    let before = fake.requests.total();
    let container = k8s
        .run_container(shell("one", "echo out; echo err >&2"))
        .await
        .expect("start");
    let code = wait_for_exit(
        &*container,
        Duration::from_millis(100),
        Some(Duration::from_secs(60)),
    )
    .await
    .expect("exit");
    assert_eq!(code, 0);
    let (stdout, stderr) = ci_exec_tests::logs(&*container).await;
    assert_eq!(
        (stdout.as_slice(), stderr.as_slice()),
        (&b"out\n"[..], &b"err\n"[..])
    );
    container.cleanup().await.expect("cleanup");
    let used = fake.requests.total() - before;
    eprintln!(
        "k8s: {used} API requests for one task: {:?}",
        fake.requests.snapshot()
    );
    assert!(used <= 40, "{used} requests for one task");
    k8s.close().await.expect("close");
}

fn kubectl(
    kubeconfig: &std::path::Path,
    args: &[&str],
    stdin: Option<&[u8]>,
) -> std::process::Output {
    use std::io::Write as _;
    let mut child = std::process::Command::new("kubectl")
        .args(args)
        .env("KUBECONFIG", kubeconfig)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("kubectl");
    let mut input = child.stdin.take().expect("stdin");
    if let Some(bytes) = stdin {
        input.write_all(bytes).expect("kubectl stdin");
    }
    drop(input);
    child.wait_with_output().expect("kubectl")
}

const POD: &str = "apiVersion: v1
kind: Pod
metadata:
  name: hello
  labels:
    app: hello
spec:
  restartPolicy: Never
  containers:
  - name: task
    image: localhost/ci-exec/test:latest
    command: [sh, -c, 'read line; echo got $line; echo to stderr >&2; seq 1 3']
    stdin: true
    stdinOnce: true
";

/// The stock `kubectl` (an independent client) creates a pod in the fake, attaches to it over
/// WebSocket, follows its logs, and sees what the driver made, by label.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_agrees_with_the_fake() {
    let present = std::process::Command::new("kubectl")
        .args(["version", "--client"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !present {
        return missing_prerequisite(
            "k8s",
            "`kubectl` is not installed: run `bash .ci/setup-k8s.sh`",
        )
        .unwrap_or(());
    }
    // client-go sends no bearer token over plain HTTP: this fake authenticates nobody.
    let Some((_fake, directory, kubeconfig)) = fake(FakeOptions::default(), "unused").await else {
        return;
    };
    let manifest = directory.path().join("pod.yaml");
    std::fs::write(&manifest, POD).unwrap();
    let kubeconfig_path = kubeconfig.clone();
    let run = move |args: Vec<&'static str>, stdin: Option<&'static [u8]>| {
        let kubeconfig = kubeconfig_path.clone();
        tokio::task::spawn_blocking(move || kubectl(&kubeconfig, &args, stdin))
    };
    let manifest_arg: &'static str = Box::leak(manifest.display().to_string().into_boxed_str());
    let created = run(vec!["create", "-f", manifest_arg], None).await.unwrap();
    assert!(
        created.status.success(),
        "{}",
        String::from_utf8_lossy(&created.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&created.stdout).trim(),
        "pod/hello created"
    );
    assert!(
        ci_exec_tests::wait_until(Duration::from_secs(60), || {
            let phase = run(
                vec!["get", "pod", "hello", "-o", "jsonpath={.status.phase}"],
                None,
            );
            async move { phase.await.is_ok_and(|o| o.stdout == b"Running") }
        })
        .await,
        "the pod runs"
    );
    let attached = run(vec!["attach", "-i", "hello", "-c", "task"], Some(b"hi\n"))
        .await
        .unwrap();
    assert!(
        attached.status.success(),
        "{}",
        String::from_utf8_lossy(&attached.stderr)
    );
    assert!(
        String::from_utf8_lossy(&attached.stdout).contains("got hi\n1\n2\n3\n"),
        "{}",
        String::from_utf8_lossy(&attached.stdout)
    );
    let logs = run(vec!["logs", "-f", "hello"], None).await.unwrap();
    assert!(
        logs.status.success(),
        "{}",
        String::from_utf8_lossy(&logs.stderr)
    );
    let all = String::from_utf8_lossy(&logs.stdout);
    for line in ["got hi", "to stderr", "1", "3"] {
        assert!(
            all.lines().any(|l| l == line),
            "`{line}` missing from kubectl logs -f:\n{all}"
        );
    }
    let phase = run(
        vec!["get", "pod", "hello", "-o", "jsonpath={.status.phase}"],
        None,
    )
    .await
    .unwrap();
    assert_eq!(String::from_utf8_lossy(&phase.stdout), "Succeeded");

    // What the driver makes, kubectl sees by its labels and reads the same logs of.
    let (namespace, k8s) = driver(&kubeconfig, NAMESPACE).await;
    let container = k8s
        .run_container(shell("seen", "echo from the driver"))
        .await
        .expect("start");
    wait_for_exit(
        &*container,
        Duration::from_millis(50),
        Some(Duration::from_secs(60)),
    )
    .await
    .expect("exit");
    let selector: &'static str =
        Box::leak(format!("ci-exec.namespace={namespace}").into_boxed_str());
    let listed = run(vec!["get", "pods", "-l", selector, "-o", "name"], None)
        .await
        .unwrap();
    let pod: &'static str = Box::leak(format!("pod/{namespace}-seen").into_boxed_str());
    assert_eq!(String::from_utf8_lossy(&listed.stdout).trim(), pod);
    let logs = run(vec!["logs", pod], None).await.unwrap();
    assert_eq!(String::from_utf8_lossy(&logs.stdout), "from the driver\n");
    k8s.close().await.expect("close");
    let listed = run(vec!["get", "pods", "-l", selector, "-o", "name"], None)
        .await
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&listed.stdout).trim(),
        "",
        "close deleted it"
    );
    let deleted = run(vec!["delete", "pod", "hello"], None).await.unwrap();
    assert!(
        deleted.status.success(),
        "{}",
        String::from_utf8_lossy(&deleted.stderr)
    );
}
