//! Preparing a downloaded cloud image once: boot it with a NoCloud seed that installs the guest
//! agent and our `mk` and powers off, then flatten the result into the cached qcow2. Later boots
//! of the prepared image need no network.

use crate::catalog::CloudImage;
use crate::manifest::{Manifest, RECIPE_VERSION};
use crate::{Error, Reporter, disk, host};
use ci_exec_cloud_init::{
    CloudConfig, Command as CloudCommand, MetaData, PowerState, Seed, User, WriteFile,
};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Options for [`crate::ImageCache::fetch_cloud`].
#[derive(Debug, Clone)]
pub struct CloudOptions {
    /// Our static `mk`, written to `/usr/local/bin/mk` in the guest.
    pub mk_binary: PathBuf,
    /// Prepare again even if a current prepared image exists.
    pub force: bool,
    /// How long the preparing boot may take (package installs under TCG are slow).
    pub timeout: Duration,
}

impl CloudOptions {
    pub fn new(mk_binary: PathBuf) -> Self {
        Self {
            mk_binary,
            force: false,
            timeout: Duration::from_secs(30 * 60),
        }
    }
}

/// The seed of the preparing boot.
pub fn preparation_seed(image: &CloudImage, mk: &[u8]) -> Seed {
    let mut mk_file = WriteFile::new("/usr/local/bin/mk", base64(mk)).permissions("0755");
    mk_file.encoding = Some("b64".to_owned());
    Seed {
        meta_data: MetaData::new(format!("ci-exec-prepare-{}", image.name), "ci-exec"),
        user_data: CloudConfig {
            users: vec![User::default_user()],
            write_files: vec![mk_file],
            packages: vec!["qemu-guest-agent".to_owned()],
            package_update: true,
            runcmd: vec![CloudCommand::from(
                "systemctl enable qemu-guest-agent 2>/dev/null || rc-update add qemu-guest-agent default",
            )],
            power_state: Some(PowerState {
                mode: "poweroff".to_owned(),
                message: None,
                delay: Some("now".to_owned()),
            }),
            ..CloudConfig::default()
        },
        network_config: None,
    }
}

/// Boots `download` once with the preparation seed and writes the prepared, standalone qcow2 to
/// `work/disk.qcow2`. Returns the manifest (paths inside `work`).
pub(crate) fn prepare(
    image: &CloudImage,
    download: &Path,
    inputs: String,
    mk: &[u8],
    work: &Path,
    timeout: Duration,
    reporter: &dyn Reporter,
) -> Result<Manifest, Error> {
    if image.firmware != "bios" || std::env::consts::ARCH != "x86_64" {
        return Err(Error::Prepare {
            name: image.name.clone(),
            reason: format!(
                "preparing {} images on {} is not supported yet",
                image.firmware,
                std::env::consts::ARCH
            ),
            console: PathBuf::new(),
        });
    }
    let qemu = host::find(host::QEMU_SYSTEM)?;
    let overlay = work.join("prepare.qcow2");
    disk::create_overlay(download, &overlay)?;
    let seed_path = work.join("seed.img");
    preparation_seed(image, mk)
        .write_image(&seed_path)
        .map_err(|error| Error::Prepare {
            name: image.name.clone(),
            reason: error.to_string(),
            console: PathBuf::new(),
        })?;
    let console = work.join("console.log");

    reporter.step(&format!(
        "preparing `{}`: first boot installs qemu-guest-agent and mk",
        image.name
    ));
    let mut child = Command::new(qemu)
        .args([
            "-M", "q35", "-accel", "kvm:tcg", "-cpu", "max", "-m", "2048", "-smp", "2",
        ])
        .args([
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
        ])
        .arg("-serial")
        .arg(format!("file:{}", console.display()))
        .arg("-drive")
        .arg(format!("file={},if=virtio,format=qcow2", overlay.display()))
        .arg("-drive")
        .arg(format!(
            "file={},if=virtio,format=raw,readonly=on",
            seed_path.display()
        ))
        .args([
            "-netdev",
            "user,id=net0",
            "-device",
            "virtio-net-pci,netdev=net0",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| Error::Spawn {
            program: "qemu-system-x86_64".to_owned(),
            source,
        })?;
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(500)),
            Ok(None) | Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(Error::Prepare {
                    name: image.name.clone(),
                    reason: format!("the guest did not power off within {} s", timeout.as_secs()),
                    console,
                });
            }
        }
    };
    if !status.success() {
        return Err(Error::Prepare {
            name: image.name.clone(),
            reason: format!("qemu exited with {status}"),
            console,
        });
    }
    let qcow2 = work.join("disk.qcow2");
    disk::convert_to_qcow2(&overlay, "qcow2", &qcow2, reporter)?;
    let disk_bytes = std::fs::metadata(&qcow2)
        .map(|metadata| metadata.len())
        .unwrap_or(0);
    let digest = crate::debian::sha256_hex(format!("{RECIPE_VERSION}\n{inputs}\n").as_bytes());
    Ok(Manifest {
        name: image.name.clone(),
        digest,
        kernel: PathBuf::new(),
        vmlinux: PathBuf::new(),
        initrd: PathBuf::new(),
        disk: qcow2,
        kernel_cmdline: String::new(),
        packages: Default::default(),
        recipe_version: RECIPE_VERSION,
        inputs,
        arch: std::env::consts::ARCH.to_owned(),
        // The catalog name says the release; the image is not opened to read its os-release.
        os: image.name.clone(),
        kernel_release: String::new(),
        container_images: Vec::new(),
        source: "download".to_owned(),
        built_at: crate::cache::now_rfc3339(),
        disk_bytes,
    })
}

fn base64(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc4648_vectors() {
        for (input, output) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(input.as_bytes()), output);
        }
    }

    #[test]
    fn preparation_seed_installs_agent_and_mk_then_powers_off() {
        let image = crate::catalog::lookup("ubuntu-24.04")
            .expect("entry")
            .resolve("x86_64")
            .expect("resolve");
        let seed = preparation_seed(&image, b"\x7fELF");
        assert_eq!(seed.user_data.packages, ["qemu-guest-agent"]);
        assert_eq!(seed.user_data.write_files[0].path, "/usr/local/bin/mk");
        assert_eq!(seed.user_data.write_files[0].content, "f0VMRg==");
        assert_eq!(
            seed.user_data
                .power_state
                .as_ref()
                .map(|state| state.mode.as_str()),
            Some("poweroff")
        );
    }
}
