//! The one place a DSN becomes a driver. Every driver crate adds its arm here, behind its
//! cargo feature; the rest of the CLI only sees `Box<dyn Driver>`.

use ci_exec_driver::{Driver, DriverConfig};

use crate::exit::CliError;

/// The driver a resolved DSN names.
pub async fn new_driver(config: &DriverConfig) -> anyhow::Result<Box<dyn Driver>> {
    let driver: Box<dyn Driver> = match config.driver.as_str() {
        "native" => Box::new(ci_exec_native::NativeDriver::new(config)?),
        #[cfg(feature = "qemu")]
        "qemu" => Box::new(ci_exec_qemu::QemuDriver::new(
            ci_exec_qemu::QemuConfig::from_driver_config(config).map_err(bad_parameter)?,
        )),
        #[cfg(feature = "docker")]
        "docker" | "podman" => Box::new(
            ci_exec_docker::DockerDriver::connect(
                ci_exec_docker::DockerConfig::from_driver_config(config).map_err(bad_parameter)?,
            )
            .await?,
        ),
        name => return Err(not_built(name).into()),
    };
    tracing::debug!(driver = %config.driver, namespace = %config.namespace, "driver ready");
    Ok(driver)
}

/// A driver's own check of its parameters failed (a `host=` the DSN grammar cannot judge):
/// the user's input is wrong, so it exits like any other bad DSN.
#[cfg(any(feature = "qemu", feature = "docker"))]
fn bad_parameter(error: impl std::error::Error) -> CliError {
    CliError::usage(error.to_string())
        .hint("`ci-exec drivers` lists every driver and its parameters")
}

/// A registered driver whose implementation this binary lacks.
fn not_built(name: &str) -> CliError {
    CliError::infrastructure(format!("driver `{name}` is not built into this binary yet"))
        .hint("use `--driver=native`, or a build with that driver's cargo feature")
}
