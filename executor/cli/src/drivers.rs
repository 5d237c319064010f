//! The one place a DSN becomes a driver. Every driver crate adds its arm here, behind its
//! cargo feature; the rest of the CLI only sees `Box<dyn Driver>`.

use ci_exec_driver::{Driver, DriverConfig};

use crate::exit::CliError;

/// The driver a resolved DSN names.
pub async fn new_driver(config: &DriverConfig) -> anyhow::Result<Box<dyn Driver>> {
    if ci_exec_driver::driver_spec(&config.driver).is_some_and(|spec| !spec.available) {
        return Err(not_available(&config.driver).into());
    }
    let driver: Box<dyn Driver> = match config.driver.as_str() {
        "native" => Box::new(ci_exec_native::NativeDriver::new(config)?),
        #[cfg(feature = "qemu")]
        "qemu" => Box::new(ci_exec_qemu::QemuDriver::new(
            ci_exec_qemu::QemuConfig::from_driver_config(config).map_err(bad_parameter)?,
        )),
        #[cfg(all(feature = "vz", target_os = "macos"))]
        "vz" => Box::new(ci_exec_vz::VzDriver::new(
            ci_exec_vz::VzConfig::from_driver_config(config),
        )),
        #[cfg(not(target_os = "macos"))]
        "vz" => return Err(vz_needs_macos().into()),
        #[cfg(feature = "docker")]
        "docker" | "podman" => Box::new(
            ci_exec_docker::DockerDriver::connect(
                ci_exec_docker::DockerConfig::from_driver_config(config).map_err(bad_parameter)?,
            )
            .await?,
        ),
        #[cfg(feature = "k8s")]
        "k8s" => Box::new(
            ci_exec_k8s::K8sDriver::connect(ci_exec_k8s::K8sConfig::from_driver_config(config))
                .await?,
        ),
        #[cfg(feature = "cloud")]
        "hetzner" | "digitalocean" => Box::new(
            ci_exec_cloud::CloudDriver::new(
                ci_exec_cloud::CloudConfig::from_driver_config(config).map_err(bad_parameter)?,
            )
            .map_err(bad_parameter)?,
        ),
        #[cfg(feature = "cloud")]
        "fly" => Box::new(
            ci_exec_cloud::FlyDriver::new(
                ci_exec_cloud::FlyConfig::from_driver_config(config).map_err(bad_parameter)?,
            )
            .map_err(bad_parameter)?,
        ),
        name => return Err(not_built(name).into()),
    };
    tracing::debug!(driver = %config.driver, namespace = %config.namespace, "driver ready");
    Ok(driver)
}

/// A driver's own check of its parameters failed (a `host=` the DSN grammar cannot judge):
/// the user's input is wrong, so it exits like any other bad DSN.
#[cfg(any(feature = "qemu", feature = "docker", feature = "cloud"))]
fn bad_parameter(error: impl std::error::Error) -> CliError {
    CliError::usage(error.to_string())
        .hint("`ci-exec drivers` lists every driver and its parameters")
}

/// A registered driver that ci-exec does not implement yet.
fn not_available(name: &str) -> CliError {
    CliError::usage(format!(
        "driver `{name}` is not available yet in ci-exec {}",
        env!("CARGO_PKG_VERSION")
    ))
    .hint(
        "`ci-exec drivers` lists the available ones (`qemu`, `native`, `docker`, `podman`, `k8s`, `hetzner`, `digitalocean`, `fly`)",
    )
}

/// `vz` anywhere but on a Mac: the framework it drives is Apple's.
#[cfg(not(target_os = "macos"))]
fn vz_needs_macos() -> CliError {
    CliError::usage("driver `vz` needs macOS (Apple Virtualization.framework); use `--driver=qemu`")
}

/// An available driver this binary was built without (its cargo feature was off).
fn not_built(name: &str) -> CliError {
    // podman shares the docker driver's crate and feature; the VM clouds share `cloud`.
    let feature = match name {
        "podman" => "docker",
        "hetzner" | "digitalocean" | "fly" => "cloud",
        other => other,
    };
    CliError::usage(format!("driver `{name}` is not built into this binary")).hint(format!(
        "rebuild with its cargo feature: `cargo build --release -p ci-exec --features {feature}`"
    ))
}
