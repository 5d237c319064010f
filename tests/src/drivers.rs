//! One constructor per driver under test. Each makes the driver in a fresh namespace, or
//! returns [`missing_prerequisite`](crate::missing_prerequisite) when the machine lacks what
//! the driver needs (that fails under `CI=true`).

use std::path::PathBuf;

use ci_exec_driver::{Driver, DriverConfig};

use crate::unique_namespace;

/// Where native test namespaces live: under the temp dir, never the user's state.
pub fn native_state_dir() -> PathBuf {
    std::env::temp_dir().join("ci-exec-tests").join("native")
}

/// The native driver in a fresh namespace. Its only prerequisite is `sh`, which every host
/// that builds ci-exec has.
pub async fn native() -> Option<Box<dyn Driver>> {
    let dsn = format!(
        "native://{}?state_dir={}",
        unique_namespace("native"),
        native_state_dir().display()
    );
    let config = DriverConfig::parse_with_env(&dsn, &|_| None)
        .unwrap_or_else(|error| panic!("native DSN `{dsn}`: {error}"));
    let driver = ci_exec_native::NativeDriver::new(&config)
        .unwrap_or_else(|error| panic!("native driver: {error}"));
    Some(Box::new(driver))
}

/// The image the docker and podman conformance runs use: `.ci/setup-docker.sh` imports it.
pub const CONTAINER_TEST_IMAGE: &str = "localhost/ci-exec/test:latest";

/// The docker driver in a fresh namespace, on `DOCKER_HOST` or the socket
/// `.ci/setup-docker.sh` starts (`/run/ci-exec/docker.sock`), else the system socket.
pub async fn docker() -> Option<Box<dyn Driver>> {
    container_engine(
        "docker",
        "DOCKER_HOST",
        &["/run/ci-exec/docker.sock", "/var/run/docker.sock"],
    )
    .await
}

/// The podman driver in a fresh namespace, on `CONTAINER_HOST` or the rootful podman socket.
pub async fn podman() -> Option<Box<dyn Driver>> {
    container_engine("podman", "CONTAINER_HOST", &["/run/podman/podman.sock"]).await
}

async fn container_engine(name: &str, host_env: &str, sockets: &[&str]) -> Option<Box<dyn Driver>> {
    const FIX: &str = "run `bash .ci/setup-docker.sh` as root (installs docker.io and podman, \
                       starts dockerd and the podman service, imports the test image)";
    let host = match std::env::var(host_env).ok().filter(|host| !host.is_empty()) {
        Some(host) => host,
        None => match sockets
            .iter()
            .find(|socket| std::path::Path::new(socket).exists())
        {
            Some(socket) => format!("unix://{socket}"),
            None => {
                return crate::missing_prerequisite(
                    name,
                    &format!(
                        "no `{name}` daemon socket (`{host_env}` unset, none of {sockets:?}); {FIX}"
                    ),
                );
            }
        },
    };
    let dsn = format!("{name}://{}", unique_namespace(name));
    let config = DriverConfig::parse_with_env(&dsn, &|variable| {
        (variable == host_env).then(|| host.clone())
    })
    .unwrap_or_else(|error| panic!("{name} DSN `{dsn}`: {error}"));
    let config = ci_exec_docker::DockerConfig::from_driver_config(&config)
        .unwrap_or_else(|error| panic!("{name} config: {error}"))
        .image(CONTAINER_TEST_IMAGE);
    let driver = match ci_exec_docker::DockerDriver::connect(config).await {
        Ok(driver) => driver,
        Err(error) => return crate::missing_prerequisite(name, &format!("{error}; {FIX}")),
    };
    match driver.image_present(CONTAINER_TEST_IMAGE).await {
        Ok(true) => Some(Box::new(driver)),
        Ok(false) => crate::missing_prerequisite(
            name,
            &format!("test image `{CONTAINER_TEST_IMAGE}` is missing; {FIX}"),
        ),
        Err(error) => panic!("{name} driver: {error}"),
    }
}

/// The container image the default guest image preloads (tasks of `qemu_podman` run in it).
pub const QEMU_GUEST_CONTAINER_IMAGE: &str = "localhost/ci-exec/base:latest";

/// The qemu driver in a fresh namespace: a real VM (TCG is enough) booted from the default
/// guest image. Its prerequisites are QEMU, `qemu-img` and that image.
pub async fn qemu() -> Option<Box<dyn Driver>> {
    let dsn = format!("qemu://{}", unique_namespace("qemu"));
    let config = qemu_config(&dsn)?;
    Some(Box::new(ci_exec_qemu::QemuDriver::new(config)))
}

/// The Ubuntu guest image (`ci-exec image build ubuntu-noble`; `.ci/setup-test-images.sh`).
pub const UBUNTU_IMAGE: &str = "ubuntu-noble";

/// The qemu driver booting the Ubuntu image: the same suite, another guest OS.
pub async fn qemu_ubuntu() -> Option<Box<dyn Driver>> {
    qemu_with_image("qemu-ubuntu", UBUNTU_IMAGE)
}

/// Alpine's cloud image as a guest (`ci-exec image build alpine-3.22`; CI builds it from a
/// stand-in in Alpine's format served on loopback, `.ci/setup-test-images.sh`).
pub const ALPINE_CLOUD_IMAGE: &str = "alpine-3.22";

/// The qemu driver booting Alpine's cloud image: a busybox userland, no qemu-ga, no `mk`.
pub async fn qemu_alpine_cloud() -> Option<Box<dyn Driver>> {
    qemu_with_image("qemu-alpine", ALPINE_CLOUD_IMAGE)
}

/// The default image for aarch64 (`ci-exec image build --arch aarch64`;
/// `.ci/setup-test-images.sh`), which the `vz` driver boots on a Mac.
pub const ARM64_IMAGE: &str = "debian-bookworm-arm64";

/// The qemu driver booting the aarch64 image: `qemu-system-aarch64`, which on an x86_64 host
/// emulates the guest (TCG), as it does here.
pub async fn qemu_arm64() -> Option<Box<dyn Driver>> {
    qemu_with_image("qemu-arm64", ARM64_IMAGE)
}

/// Canonical's Ubuntu cloud image as a guest (`ci-exec image build ubuntu-24.04`; CI builds it
/// from a stand-in in the same format served on loopback, `.ci/setup-test-images.sh`).
pub const UBUNTU_CLOUD_IMAGE: &str = "ubuntu-24.04";

/// The qemu driver booting the stock cloud image: no qemu-ga and no `mk` in it, our init is
/// the agent.
pub async fn qemu_ubuntu_cloud() -> Option<Box<dyn Driver>> {
    qemu_with_image("qemu-cloud", UBUNTU_CLOUD_IMAGE)
}

/// The qemu driver booting `image`, in a fresh namespace named after `prefix`.
fn qemu_with_image(prefix: &str, image: &str) -> Option<Box<dyn Driver>> {
    let dsn = format!("qemu://{}?image={image}", unique_namespace(prefix));
    let config = qemu_config(&dsn)?;
    Some(Box::new(ci_exec_qemu::QemuDriver::new(config)))
}

/// The qemu driver's configuration for `dsn`, or `None` (skipped, or a failure under `CI=true`)
/// when QEMU, `qemu-img` or the default guest image is missing.
pub fn qemu_config(dsn: &str) -> Option<ci_exec_qemu::QemuConfig> {
    let config = DriverConfig::parse_with_env(dsn, &|variable| std::env::var(variable).ok())
        .unwrap_or_else(|error| panic!("qemu DSN `{dsn}`: {error}"));
    let config = ci_exec_qemu::QemuConfig::from_driver_config(&config)
        .unwrap_or_else(|error| panic!("qemu config: {error}"));
    let image = match ci_exec_qemu::resolve_image(&config.image) {
        Ok(image) => image,
        Err(error) => return crate::missing_prerequisite("qemu", &error.to_string()),
    };
    let qemu_binary = config.qemu_binary_for(image.arch);
    for program in [qemu_binary.as_str(), "qemu-img"] {
        if ci_exec_qemu::accel::find_on_path(program).is_none() {
            return crate::missing_prerequisite(
                "qemu",
                &format!(
                    "`{program}` is not installed: apt-get install qemu-system-x86 qemu-system-arm qemu-utils"
                ),
            );
        }
    }
    Some(config)
}

/// The vz driver in a fresh namespace (macOS only), booting the aarch64 guest image
/// (`VZ_IMAGE`, `debian-bookworm-arm64` by default); missing when the image or `qemu-img`
/// (which converts its disk to raw once) is missing. The binary running the tests needs the
/// `com.apple.security.virtualization` entitlement: see README.md, "Mac (vz)".
#[cfg(target_os = "macos")]
pub async fn vz() -> Option<Box<dyn Driver>> {
    let dsn = format!("vz://{}", unique_namespace("vz"));
    let config = DriverConfig::parse_with_env(&dsn, &|variable| std::env::var(variable).ok())
        .unwrap_or_else(|error| panic!("vz DSN `{dsn}`: {error}"));
    let config = ci_exec_vz::VzConfig::from_driver_config(&config);
    if let Err(error) = ci_exec_vz::image::resolve(&config.image) {
        return crate::missing_prerequisite("vz", &error.to_string());
    }
    if ci_exec_qemu::accel::find_on_path("qemu-img").is_none() {
        return crate::missing_prerequisite("vz", "`qemu-img` is not installed: brew install qemu");
    }
    Some(Box::new(ci_exec_vz::VzDriver::new(config)))
}

/// The Kubernetes namespace the fake API server holds and the `k8s` tests run in (each test
/// still gets its own ci-exec namespace, a label inside it).
pub const FAKE_KUBE_NAMESPACE: &str = "ci-exec";
/// The bearer token the fake accepts; the tests' kubeconfig carries it.
pub const FAKE_KUBE_TOKEN: &str = "fake-kube-token-7f3a";

/// The fake Kubernetes API server of this test process, its pods run on the Docker engine of
/// `DOCKER_HOST` (or `.ci/setup-docker.sh`'s socket), with a kubeconfig for it. It runs on a
/// runtime of its own: each test has its own runtime, and the fake outlives them all.
pub fn fake_kube() -> Result<&'static (ci_exec_fake_kube::FakeKube, PathBuf), String> {
    static FAKE: std::sync::OnceLock<Result<(ci_exec_fake_kube::FakeKube, PathBuf), String>> =
        std::sync::OnceLock::new();
    FAKE.get_or_init(|| {
        let host = docker_host().ok_or_else(|| {
            "no Docker engine for the fake API server's pods (`DOCKER_HOST` unset, no \
             /run/ci-exec/docker.sock): run `bash .ci/setup-docker.sh` as root"
                .to_owned()
        })?;
        let (sender, receiver) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let runtime = match tokio::runtime::Runtime::new() {
                Ok(runtime) => runtime,
                Err(error) => {
                    let _ = sender.send(Err(format!("fake API server runtime: {error}")));
                    return;
                }
            };
            runtime.block_on(async move {
                let options = ci_exec_fake_kube::FakeOptions {
                    namespaces: vec![FAKE_KUBE_NAMESPACE.to_owned()],
                    tokens: vec![FAKE_KUBE_TOKEN.to_owned()],
                    forbidden_tokens: vec!["fake-kube-forbidden".to_owned()],
                    docker_host: Some(host),
                    drop_follow_after: None,
                };
                let started = ci_exec_fake_kube::FakeKube::start(options).await;
                let _ = sender.send(started);
                std::future::pending::<()>().await;
            });
        });
        let fake = receiver
            .recv()
            .map_err(|_| "the fake API server's thread ended".to_owned())??;
        let directory =
            std::env::temp_dir().join(format!("ci-exec-fake-kube-{}", std::process::id()));
        std::fs::create_dir_all(&directory).map_err(|error| error.to_string())?;
        let kubeconfig = fake
            .write_kubeconfig(
                &directory.join("kubeconfig"),
                FAKE_KUBE_NAMESPACE,
                FAKE_KUBE_TOKEN,
            )
            .map_err(|error| format!("write the fake's kubeconfig: {error}"))?;
        Ok((fake, kubeconfig))
    })
    .as_ref()
    .map_err(Clone::clone)
}

/// The Docker engine the fake API server runs pods on: `DOCKER_HOST`, else a local socket.
pub fn docker_host() -> Option<String> {
    std::env::var("DOCKER_HOST")
        .ok()
        .filter(|host| !host.is_empty())
        .or_else(|| {
            ["/run/ci-exec/docker.sock", "/var/run/docker.sock"]
                .iter()
                .find(|socket| std::path::Path::new(socket).exists())
                .map(|socket| format!("unix://{socket}"))
        })
}

/// The `k8s` driver in a fresh namespace, against the fake API server (pods on Docker).
pub async fn k8s() -> Option<Box<dyn Driver>> {
    let (_, kubeconfig) = match fake_kube() {
        Ok(fake) => fake,
        Err(reason) => return crate::missing_prerequisite("k8s", &reason),
    };
    let dsn = format!(
        "k8s://{}?kube_namespace={FAKE_KUBE_NAMESPACE}&kubeconfig={}&image={CONTAINER_TEST_IMAGE}",
        unique_namespace("k8s"),
        kubeconfig.display()
    );
    let config = DriverConfig::parse_with_env(&dsn, &|_| None)
        .unwrap_or_else(|error| panic!("k8s DSN `{dsn}`: {error}"));
    let config = ci_exec_k8s::K8sConfig::from_driver_config(&config);
    let driver = ci_exec_k8s::K8sDriver::connect(config)
        .await
        .unwrap_or_else(|error| panic!("k8s driver: {error}"));
    Some(Box::new(driver))
}

/// The `k8s` driver against a real cluster: opt-in, with `CI_EXEC_K8S_REAL=1` and `KUBECONFIG`
/// (`CI_EXEC_K8S_NAMESPACE` names the Kubernetes namespace, `CI_EXEC_K8S_IMAGE` the test image,
/// which the cluster must be able to pull). Skipped, even in CI, unless asked for.
pub async fn k8s_real() -> Option<Box<dyn Driver>> {
    if std::env::var("CI_EXEC_K8S_REAL").as_deref() != Ok("1")
        || std::env::var_os("KUBECONFIG").is_none()
    {
        eprintln!(
            "k8s_real: set CI_EXEC_K8S_REAL=1 and KUBECONFIG to run the suite against a real cluster"
        );
        return None;
    }
    let dsn = format!("k8s://{}", unique_namespace("k8s"));
    let config = DriverConfig::parse_with_env(&dsn, &|variable| std::env::var(variable).ok())
        .unwrap_or_else(|error| panic!("k8s DSN `{dsn}`: {error}"));
    let mut config = ci_exec_k8s::K8sConfig::from_driver_config(&config);
    if std::env::var_os("CI_EXEC_K8S_NAMESPACE").is_none() {
        config.kube_namespace = "default".to_owned();
    }
    let driver = ci_exec_k8s::K8sDriver::connect(config)
        .await
        .unwrap_or_else(|error| panic!("k8s driver: {error}"));
    Some(Box::new(driver))
}

/// The bearer token the fake cloud APIs accept.
pub const FAKE_CLOUD_TOKEN: &str = "fake-cloud-token";

/// A cloud VM driver in a fresh namespace against a fake of its API (`tests/fake-cloud`),
/// started on this test's runtime: its servers are the test sshd of `.ci/setup-docker.sh`,
/// whose sessions see the test Docker engine.
async fn fake_cloud(api: ci_exec_fake_cloud::Api, name: &str) -> Option<Box<dyn Driver>> {
    let host = match ci_exec_fake_cloud::SshTestHost::from_env() {
        Ok(host) => host,
        Err(missing) => {
            return crate::missing_prerequisite(
                name,
                &format!("{missing}: source .ci/setup-docker.sh (starts the test sshd)"),
            );
        }
    };
    let fake = ci_exec_fake_cloud::FakeCloud::start(api, host.options())
        .await
        .unwrap_or_else(|error| panic!("fake {name} API: {error}"));
    let dsn = format!(
        "{name}://{}?token={FAKE_CLOUD_TOKEN}&endpoint={}&ssh_user={}&ssh_timeout=1m&docker_timeout=1m",
        unique_namespace(name),
        fake.endpoint(),
        host.user,
    );
    let config = DriverConfig::parse_with_env(&dsn, &|_| None)
        .unwrap_or_else(|error| panic!("{name} DSN `{dsn}`: {error}"));
    let mut config = ci_exec_cloud::CloudConfig::from_driver_config(&config)
        .unwrap_or_else(|error| panic!("{name} config: {error}"));
    config.container_image = CONTAINER_TEST_IMAGE.to_owned();
    let driver = ci_exec_cloud::CloudDriver::new(config)
        .unwrap_or_else(|error| panic!("{name} driver: {error}"));
    Some(Box::new(driver))
}

/// The `hetzner` driver against the fake Hetzner Cloud API.
pub async fn hetzner() -> Option<Box<dyn Driver>> {
    fake_cloud(ci_exec_fake_cloud::Api::Hetzner, "hetzner").await
}

/// The `digitalocean` driver against the fake DigitalOcean API.
pub async fn digitalocean() -> Option<Box<dyn Driver>> {
    fake_cloud(ci_exec_fake_cloud::Api::DigitalOcean, "digitalocean").await
}

/// The `fly` driver against the fake Fly Machines API, whose machines are containers on the
/// test Docker engine (`.ci/setup-docker.sh`), running the static `ci-exec-init` that
/// `.ci/setup-fly.sh` builds.
pub async fn fly() -> Option<Box<dyn Driver>> {
    const FIX: &str = "source .ci/setup-docker.sh (starts dockerd, imports the test image) and \
                       .ci/setup-fly.sh (builds the static ci-exec-init)";
    if ci_exec_guest_image::binaries::locate_static("ci-exec-init").is_none() {
        return crate::missing_prerequisite(
            "fly",
            &format!("no static `ci-exec-init` (the machines' agent); {FIX}"),
        );
    }
    let fake = match ci_exec_fake_cloud::FakeCloud::start(
        ci_exec_fake_cloud::Api::Fly,
        ci_exec_fake_cloud::FakeOptions::default(),
    )
    .await
    {
        Ok(fake) => fake,
        Err(error) => return crate::missing_prerequisite("fly", &format!("{error}; {FIX}")),
    };
    let dsn = format!(
        "fly://{}?token={FAKE_CLOUD_TOKEN}&endpoint={}&start_timeout=1m",
        unique_namespace("fly"),
        fake.endpoint(),
    );
    let config = DriverConfig::parse_with_env(&dsn, &|_| None)
        .unwrap_or_else(|error| panic!("fly DSN `{dsn}`: {error}"));
    let mut config = ci_exec_cloud::FlyConfig::from_driver_config(&config)
        .unwrap_or_else(|error| panic!("fly config: {error}"));
    config.container_image = CONTAINER_TEST_IMAGE.to_owned();
    let driver =
        ci_exec_cloud::FlyDriver::new(config).unwrap_or_else(|error| panic!("fly driver: {error}"));
    Some(Box::new(driver))
}

/// The `fly` driver against Fly.io (opt-in with `CI_EXEC_CLOUD_REAL=1` and `FLY_API_TOKEN`;
/// the rest of the DSN from `FLY_APP`, `FLY_REGION`, `FLY_ORG`). Each case makes real machines
/// in an ephemeral app (billed), deleted at close.
pub async fn fly_real() -> Option<Box<dyn Driver>> {
    if std::env::var("CI_EXEC_CLOUD_REAL").as_deref() != Ok("1")
        || std::env::var_os("FLY_API_TOKEN").is_none()
    {
        eprintln!(
            "fly_real: set CI_EXEC_CLOUD_REAL=1 and FLY_API_TOKEN to run the suite against Fly.io (billed)"
        );
        return None;
    }
    let dsn = format!("fly://{}", unique_namespace("fly"));
    let config = DriverConfig::parse_with_env(&dsn, &|variable| std::env::var(variable).ok())
        .unwrap_or_else(|error| panic!("fly DSN `{dsn}`: {error}"));
    let config = ci_exec_cloud::FlyConfig::from_driver_config(&config)
        .unwrap_or_else(|error| panic!("fly config: {error}"));
    let driver =
        ci_exec_cloud::FlyDriver::new(config).unwrap_or_else(|error| panic!("fly driver: {error}"));
    Some(Box::new(driver))
}

/// A cloud VM driver against the real service: opt-in with `CI_EXEC_CLOUD_REAL=1` and the
/// provider's token variable (`HETZNER_TOKEN`, `DIGITALOCEAN_TOKEN`); the rest of the DSN comes
/// from the provider's variables too. Each case creates (and deletes) a real server, billed.
/// Skipped, even in CI, unless asked for.
async fn real_cloud(name: &str, token_env: &str) -> Option<Box<dyn Driver>> {
    if std::env::var("CI_EXEC_CLOUD_REAL").as_deref() != Ok("1")
        || std::env::var_os(token_env).is_none()
    {
        eprintln!(
            "{name}_real: set CI_EXEC_CLOUD_REAL=1 and {token_env} to run the suite against the real service (billed)"
        );
        return None;
    }
    let dsn = format!("{name}://{}", unique_namespace(name));
    let config = DriverConfig::parse_with_env(&dsn, &|variable| std::env::var(variable).ok())
        .unwrap_or_else(|error| panic!("{name} DSN `{dsn}`: {error}"));
    let config = ci_exec_cloud::CloudConfig::from_driver_config(&config)
        .unwrap_or_else(|error| panic!("{name} config: {error}"));
    let driver = ci_exec_cloud::CloudDriver::new(config)
        .unwrap_or_else(|error| panic!("{name} driver: {error}"));
    Some(Box::new(driver))
}

/// The `hetzner` driver against Hetzner Cloud (opt-in, see [`real_cloud`]).
pub async fn hetzner_real() -> Option<Box<dyn Driver>> {
    real_cloud("hetzner", "HETZNER_TOKEN").await
}

/// The `digitalocean` driver against DigitalOcean (opt-in, see [`real_cloud`]).
pub async fn digitalocean_real() -> Option<Box<dyn Driver>> {
    real_cloud("digitalocean", "DIGITALOCEAN_TOKEN").await
}
