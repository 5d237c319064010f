//! `ci-exec doctor`: what the qemu driver will do on this host, and whether it can.

use std::time::{Duration, Instant};

use serde::Serialize;

use crate::accel::AccelVerdict;
use crate::{QemuConfig, QemuDriver, image};

/// The container image the default guest image preloads.
pub const BASE_CONTAINER_IMAGE: &str = "localhost/ci-exec/base:latest";

#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub ok: bool,
    pub detail: String,
}

impl Check {
    fn ok(detail: impl Into<String>) -> Self {
        Check {
            ok: true,
            detail: detail.into(),
        }
    }
    fn failed(detail: impl Into<String>) -> Self {
        Check {
            ok: false,
            detail: detail.into(),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct DoctorReport {
    pub qemu_binary: String,
    pub qemu_version: Check,
    pub qemu_img: Check,
    pub accel: AccelVerdict,
    pub image: Check,
    /// Booting the guest and asking its agent (skipped when the image is missing).
    pub guest: Option<Check>,
    /// `podman` in the guest and the preloaded base image.
    pub podman: Option<Check>,
    pub warm_state_dir: String,
}

impl DoctorReport {
    pub fn ok(&self) -> bool {
        self.qemu_version.ok
            && self.qemu_img.ok
            && self.image.ok
            && self.guest.as_ref().is_none_or(|check| check.ok)
            && self.podman.as_ref().is_none_or(|check| check.ok)
    }
}

/// Checks the host; with `boot`, also boots a VM in a throwaway namespace and asks it.
pub async fn diagnose(config: &QemuConfig, boot: bool) -> DoctorReport {
    let resolved = image::resolve(&config.image);
    let arch = resolved
        .as_ref()
        .map_or(ci_exec_guest_image::Arch::host(), |files| files.arch);
    let qemu_binary = config.qemu_binary_for(arch);
    let qemu_version = version_of(&qemu_binary, "--version");
    let qemu_img = version_of("qemu-img", "--version");
    let driver = QemuDriver::new(config.clone());
    let accel = match driver.accel_for(arch).await {
        Ok(verdict) => verdict,
        Err(error) => crate::accel::AccelVerdict {
            accel: crate::accel::Accel::Tcg,
            reason: error.to_string(),
        },
    };
    let image = match resolved {
        Ok(files) => Check::ok(format!(
            "`{}` ({}) digest {} (kernel `{}`)",
            files.name,
            files.arch,
            &files.digest[..files.digest.len().min(16)],
            files.vmlinux.display()
        )),
        Err(error) => Check::failed(error.to_string()),
    };
    let (mut guest, mut podman) = (None, None);
    if boot && image.ok && qemu_version.ok && qemu_img.ok {
        let started = Instant::now();
        match driver.machine().await {
            Err(error) => guest = Some(Check::failed(error.to_string())),
            Ok(machine) => {
                guest = Some(Check::ok(format!(
                    "guest agent answered {:.1?} after start (QEMU {})",
                    started.elapsed(),
                    machine.version()
                )));
                let script = format!(
                    "podman --version && podman image exists {BASE_CONTAINER_IMAGE} && echo image-present"
                );
                podman = Some(match machine.sh(&script, Duration::from_secs(60)).await {
                    Ok(status) if status.shell_code() == 0 => Check::ok(format!(
                        "{}; `{BASE_CONTAINER_IMAGE}` is preloaded",
                        String::from_utf8_lossy(&status.stdout)
                            .lines()
                            .next()
                            .unwrap_or("podman")
                    )),
                    Ok(status) => Check::failed(format!(
                        "`{script}` exited {}: {}",
                        status.shell_code(),
                        String::from_utf8_lossy(&status.stderr).trim()
                    )),
                    Err(error) => Check::failed(error.to_string()),
                });
            }
        }
        if let Err(error) = ci_exec_driver::Driver::close(&driver).await {
            tracing::warn!(%error, "cannot close the doctor's VM");
        }
    }
    DoctorReport {
        qemu_binary,
        qemu_version,
        qemu_img,
        accel,
        image,
        guest,
        podman,
        warm_state_dir: config.cache_dir.join("warm").display().to_string(),
    }
}

fn version_of(program: &str, flag: &str) -> Check {
    match std::process::Command::new(program).arg(flag).output() {
        Ok(output) if output.status.success() => Check::ok(
            String::from_utf8_lossy(&output.stdout)
                .lines()
                .next()
                .unwrap_or("")
                .to_owned(),
        ),
        Ok(output) => Check::failed(format!("`{program} {flag}` exited with {}", output.status)),
        Err(error) => Check::failed(format!(
            "`{program}` cannot run ({error}); install it (`apt-get install qemu-system-x86 qemu-utils`)"
        )),
    }
}
