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

/// The qemu driver's configuration for `dsn`, or `None` (skipped, or a failure under `CI=true`)
/// when QEMU, `qemu-img` or the default guest image is missing.
pub fn qemu_config(dsn: &str) -> Option<ci_exec_qemu::QemuConfig> {
    let config = DriverConfig::parse_with_env(dsn, &|variable| std::env::var(variable).ok())
        .unwrap_or_else(|error| panic!("qemu DSN `{dsn}`: {error}"));
    let config = ci_exec_qemu::QemuConfig::from_driver_config(&config)
        .unwrap_or_else(|error| panic!("qemu config: {error}"));
    for program in [config.qemu_binary.as_str(), "qemu-img"] {
        if ci_exec_qemu::accel::find_on_path(program).is_none() {
            return crate::missing_prerequisite(
                "qemu",
                &format!(
                    "`{program}` is not installed: apt-get install qemu-system-x86 qemu-utils"
                ),
            );
        }
    }
    if let Err(error) = ci_exec_qemu::resolve_image(&config.image) {
        return crate::missing_prerequisite("qemu", &error.to_string());
    }
    Some(config)
}
