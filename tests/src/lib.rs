//! Shared harness for the integration and conformance suites: the driver constructors the
//! conformance suite runs against, prerequisite handling (`CI=true` turns a missing
//! prerequisite into a failure), polling with a deadline, and collecting a task's output.
//!
//! It holds no test cases itself; those are in `tests/integration/`.

pub mod drivers;

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ci_exec_driver::{Container, Driver, Task, wait_for_exit};

pub use ci_exec_prerequisite::ci;

/// Reports a missing prerequisite of `driver`: fails under `CI=true`, otherwise prints why
/// the driver's tests are skipped. Constructors return this.
pub fn missing_prerequisite<T>(driver: &str, reason: &str) -> Option<T> {
    let _ = ci_exec_prerequisite::require(
        &format!("the `{driver}` driver's tests"),
        Some(reason.to_owned()),
        "bash .ci/run installs and starts every driver's prerequisites",
    );
    None
}

/// Polls `condition` until it holds or `timeout` passes; returns whether it held.
pub async fn wait_until<F, Fut>(timeout: Duration, mut condition: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    let mut interval = Duration::from_millis(2);
    loop {
        if condition().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(interval).await;
        interval = (interval * 2).min(Duration::from_millis(100));
    }
}

/// A namespace no other test uses.
pub fn unique_namespace(prefix: &str) -> String {
    format!(
        "{prefix}-{}",
        &ci_exec_driver::generate_namespace()["ci-".len()..]
    )
}

/// The driver under test, and the image its tasks use (empty for drivers without images).
#[derive(Debug, Clone)]
pub struct Subject {
    pub driver: Arc<dyn Driver>,
    pub image: &'static str,
    pub capabilities: Capabilities,
}

/// What a driver declares it can do where it joins the suite. A case that needs a declared
/// capability fails when the driver turns out not to have it; a capability a driver does
/// not declare is reported as such and its case passes without testing it.
#[derive(Debug, Clone, Copy, Default)]
pub struct Capabilities {
    /// [`ci_exec_driver::Driver::as_volume_files`].
    pub volume_files: bool,
    /// [`ci_exec_driver::Container::as_follow`].
    pub follow: bool,
    /// `Task::user` as a numeric uid (the native driver needs root for it).
    pub user: bool,
    /// `Task::privileged` grants `CAP_SYS_ADMIN` and an unprivileged task lacks it.
    pub privileged: bool,
    /// `Task::limits.memory_bytes` stops a task that needs more.
    pub limits: bool,
}

impl Subject {
    /// Whether the driver declared `capability`; says so on stderr when it did not.
    pub fn declares(&self, capability: &str, declared: bool) -> bool {
        if !declared {
            eprintln!(
                "driver `{}` does not declare `{capability}`: not tested",
                self.driver.name()
            );
        }
        declared
    }
}

impl Subject {
    /// A task for this driver: `sh -c script`, in the subject's image.
    pub fn shell(&self, id: &str, script: &str) -> Task {
        Task::new(id, ["sh", "-c", script]).image(self.image)
    }

    /// Runs `task` to the end and collects its output.
    pub async fn run(&self, task: Task) -> Output {
        let container = self
            .driver
            .run_container(task)
            .await
            .unwrap_or_else(|error| panic!("run_container failed: {}", chain(&error)));
        Output::of(&*container).await
    }
}

/// What a finished task produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Output {
    pub code: i32,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

impl Output {
    /// Waits (up to 10 minutes) for `container` to exit and reads its logs.
    pub async fn of(container: &dyn Container) -> Output {
        let code = wait_for_exit(
            container,
            Duration::from_millis(100),
            Some(Duration::from_secs(600)),
        )
        .await
        .unwrap_or_else(|error| panic!("waiting for `{}`: {}", container.id(), chain(&error)));
        let (stdout, stderr) = logs(container).await;
        Output {
            code,
            stdout,
            stderr,
        }
    }

    pub fn stdout_text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    pub fn stderr_text(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }
}

/// A container's logs so far, stdout and stderr.
pub async fn logs(container: &dyn Container) -> (Vec<u8>, Vec<u8>) {
    let mut stdout = Vec::new();
    let mut stderr = Vec::new();
    container
        .logs(&mut stdout, &mut stderr)
        .await
        .unwrap_or_else(|error| panic!("logs of `{}`: {}", container.id(), chain(&error)));
    (stdout, stderr)
}

/// Runs one conformance case against the driver `constructor` makes, then closes the driver
/// even when the case failed. Skips (or, under `CI=true`, fails) when the constructor found a
/// prerequisite missing; an opt-in `*_real` driver that was not asked for always skips.
pub async fn run_case<C, F, Fut>(
    driver: &str,
    constructor: C,
    image: &'static str,
    capabilities: Capabilities,
    case: F,
) where
    C: Future<Output = Option<Box<dyn Driver>>>,
    F: FnOnce(Subject) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let Some(built) = constructor.await else {
        // `*_real` drivers (a real cluster, a real cloud) are opt-in: not asked for, they skip
        // even under CI=true.
        if ci() && !driver.ends_with("_real") {
            panic!("driver `{driver}` is missing a prerequisite (CI=true makes this a failure)");
        }
        return;
    };
    let subject = Subject {
        driver: Arc::from(built),
        image,
        capabilities,
    };
    let outcome = tokio::spawn(tokio::time::timeout(
        Duration::from_secs(900),
        case(subject.clone()),
    ))
    .await;
    let closed = subject.driver.close().await;
    match outcome {
        Err(join_error) => match join_error.try_into_panic() {
            Ok(panic) => std::panic::resume_unwind(panic),
            Err(error) => panic!("case was cancelled: {error}"),
        },
        Ok(Err(_)) => panic!("case did not finish within 15 minutes"),
        Ok(Ok(())) => {}
    }
    if let Err(error) = closed {
        panic!("close failed: {}", chain(&error));
    }
}

/// The `ci-exec` binary, built once per test run (from this workspace, same profile and target
/// directory as the tests) or taken from `CI_EXEC_BIN`.
pub fn ci_exec_binary() -> &'static std::path::Path {
    use std::path::{Path, PathBuf};
    static BINARY: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BINARY.get_or_init(|| {
        if let Some(binary) = std::env::var_os("CI_EXEC_BIN") {
            return PathBuf::from(binary);
        }
        let exe = std::env::current_exe().expect("path of the test executable");
        // target/<profile>/deps/integration-<hash>
        let profile_dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("test executable under target/<profile>/deps");
        let target_dir = profile_dir.parent().expect("target directory");
        let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .expect("workspace root");
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let mut command = std::process::Command::new(cargo);
        command
            .args(["build", "--quiet", "-p", "ci-exec", "--bin", "ci-exec"])
            .arg("--manifest-path")
            .arg(workspace.join("Cargo.toml"))
            .arg("--target-dir")
            .arg(target_dir);
        if profile_dir.ends_with("release") {
            command.arg("--release");
        }
        let status = command.status().expect("run cargo to build `ci-exec`");
        assert!(status.success(), "building `ci-exec` failed: {status}");
        profile_dir.join("ci-exec")
    })
}

/// Every `--driver=` example the seed documents write, with the token variable an example
/// relies on (the seeds pass some tokens through the environment).
pub const SEED_EXAMPLES: &[(&str, Option<(&str, &str)>)] = &[
    ("native", None),
    ("docker", None),
    ("k8s", None),
    ("k8s://production", None),
    ("k8s://staging?region=us-east&timeout=300", None),
    ("k8s:namespace=production", None),
    ("k8s:namespace=staging,region=us-west,timeout=600", None),
    ("k8s://my-namespace", None),
    ("k8s:namespace=staging", None),
    ("k8s:namespace=prod,kubeconfig=/etc/k8s/config", None),
    ("k8s://production?kubeconfig=/path/to/config", None),
    ("k8s://staging?region=us-east", None),
    ("k8s://production?region=us-west", None),
    ("docker:host=unix:///var/run/docker.sock", None),
    ("docker:host=ssh://user@host:22", None),
    ("docker:host=ssh://user@remote:22", None),
    ("digitalocean:token=dop_v1_xxx", None),
    (
        "digitalocean:image=docker-24-04",
        Some(("DIGITALOCEAN_TOKEN", "dop_v1_env")),
    ),
    (
        "digitalocean:size=s-2vcpu-4gb",
        Some(("DIGITALOCEAN_TOKEN", "dop_v1_env")),
    ),
    (
        "digitalocean:region=sfo3",
        Some(("DIGITALOCEAN_TOKEN", "dop_v1_env")),
    ),
    (
        "digitalocean:disk_size=50",
        Some(("DIGITALOCEAN_TOKEN", "dop_v1_env")),
    ),
    (
        "digitalocean:tags=prod,myapp",
        Some(("DIGITALOCEAN_TOKEN", "dop_v1_env")),
    ),
    (
        "digitalocean:max_workers=3",
        Some(("DIGITALOCEAN_TOKEN", "dop_v1_env")),
    ),
    (
        "digitalocean:reuse_worker=true",
        Some(("DIGITALOCEAN_TOKEN", "dop_v1_env")),
    ),
    (
        "digitalocean:poll_interval=5s",
        Some(("DIGITALOCEAN_TOKEN", "dop_v1_env")),
    ),
    (
        "digitalocean:wait_timeout=30m",
        Some(("DIGITALOCEAN_TOKEN", "dop_v1_env")),
    ),
    ("digitalocean", Some(("DIGITALOCEAN_TOKEN", "dop_v1_env"))),
    (
        "digitalocean:size=auto",
        Some(("DIGITALOCEAN_TOKEN", "dop_v1_env")),
    ),
    (
        "digitalocean://ci-namespace?token=dop_v1_xxx&image=docker-20-04&size=s-2vcpu-4gb&region=sfo3&disk_size=50",
        None,
    ),
    ("digitalocean:token=dop_v1_xxx,size=auto,region=nyc1", None),
    ("digitalocean:token=dop_v1_xxx,max_workers=3", None),
    (
        "digitalocean:token=dop_v1_xxx,reuse_worker=true,max_workers=2",
        None,
    ),
    ("hetzner:token=xxx", None),
    (
        "hetzner:image=ubuntu-22.04",
        Some(("HETZNER_TOKEN", "hetzner_env")),
    ),
    (
        "hetzner:server_type=cx33",
        Some(("HETZNER_TOKEN", "hetzner_env")),
    ),
    (
        "hetzner:location=fsn1",
        Some(("HETZNER_TOKEN", "hetzner_env")),
    ),
    (
        "hetzner:disk_size=50",
        Some(("HETZNER_TOKEN", "hetzner_env")),
    ),
    (
        "hetzner:ssh_timeout=10m",
        Some(("HETZNER_TOKEN", "hetzner_env")),
    ),
    (
        "hetzner:docker_timeout=10m",
        Some(("HETZNER_TOKEN", "hetzner_env")),
    ),
    (
        "hetzner:labels=env=prod,app=x",
        Some(("HETZNER_TOKEN", "hetzner_env")),
    ),
    (
        "hetzner:max_workers=3",
        Some(("HETZNER_TOKEN", "hetzner_env")),
    ),
    (
        "hetzner:reuse_worker=true",
        Some(("HETZNER_TOKEN", "hetzner_env")),
    ),
    (
        "hetzner:poll_interval=5s",
        Some(("HETZNER_TOKEN", "hetzner_env")),
    ),
    (
        "hetzner:wait_timeout=30m",
        Some(("HETZNER_TOKEN", "hetzner_env")),
    ),
    ("hetzner", Some(("HETZNER_TOKEN", "hetzner_env"))),
    (
        "hetzner:server_type=auto",
        Some(("HETZNER_TOKEN", "hetzner_env")),
    ),
    (
        "hetzner://ci-namespace?token=xxx&image=docker-ce&server_type=cx33&location=nbg1&disk_size=50",
        None,
    ),
    ("hetzner:token=xxx,server_type=auto,location=fsn1", None),
    ("hetzner:token=xxx,max_workers=3", None),
    ("hetzner:token=xxx,reuse_worker=true,max_workers=2", None),
    ("fly:token=fo1_xxx", None),
    ("fly:app=my-ci", Some(("FLY_API_TOKEN", "fo1_env"))),
    ("fly:region=ord", Some(("FLY_API_TOKEN", "fo1_env"))),
    ("fly:org=my-org", Some(("FLY_API_TOKEN", "fo1_env"))),
    ("fly:size=shared-cpu-2x", Some(("FLY_API_TOKEN", "fo1_env"))),
    ("fly", Some(("FLY_API_TOKEN", "fo1_env"))),
    (
        "fly:app=my-ci-app,region=ord",
        Some(("FLY_API_TOKEN", "fo1_env")),
    ),
    (
        "fly://my-namespace?token=fo1_xxx&app=my-ci&region=lax",
        None,
    ),
    (
        "fly:token=fo1_xxx,app=my-ci,region=ord,org=my-org,size=shared-cpu-2x",
        None,
    ),
    ("qemu", None),
    ("qemu:memory=4096", None),
    ("qemu:cpus=4", None),
    ("qemu:accel=tcg", None),
    ("qemu:qemu_binary=/usr/bin/qemu-system-x86_64", None),
    ("qemu:cache_dir=/tmp/qemu-cache", None),
    ("qemu:image=/path/to/image.qcow2", None),
    ("qemu:memory=4096,cpus=4", None),
    ("qemu://my-namespace?memory=4096&cpus=4", None),
    ("qemu:image=/path/to/custom.qcow2", None),
    ("vz", None),
    ("vz:memory=4096", None),
    ("vz:cpus=4", None),
    ("vz:cache_dir=/tmp/vz-cache", None),
    ("vz:image=/path/to/image.raw", None),
    ("vz:memory=4096,cpus=4", None),
    ("vz://my-namespace?memory=4096&cpus=4", None),
    ("vz:image=/path/to/custom.raw", None),
];

/// An error with its sources, `: `-separated, for a test's panic message.
pub use ci_exec_driver::error_chain as chain;
