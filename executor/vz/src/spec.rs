//! [`VmSpec`]: the VM a vz driver starts, as plain Rust. The macOS glue turns it into a
//! `VZVirtualMachineConfiguration` one field per device; everything decided here (kernel
//! command line, sizes, disk modes, shares) is tested on any OS.

use std::path::PathBuf;

use crate::image::VzImage;
use crate::{VzConfig, VzError};

/// The vsock port our guest init serves the guest agent on (QGA's JSON subset).
pub const AGENT_PORT: u32 = 1024;
/// The vsock port our guest init serves the control protocol on.
pub const CONTROL_PORT: u32 = 1025;
/// The virtiofs tag of the run's share (the qemu driver's 9p `SHARE_TAG`).
pub const SHARE_TAG: &str = ci_exec_qemu::run_dir::SHARE_TAG;
/// The longest virtiofs tag the framework accepts (`VZVirtioFileSystemDeviceConfiguration`
/// `validateTag:`, 36 bytes of UTF-8).
pub const MAX_TAG_BYTES: usize = 36;

/// Configures the guest's NIC on the framework's NAT, which hands out addresses by DHCP
/// (vmnet's, 192.168.64.0/24 by default, unlike QEMU's fixed user-mode addresses): a one-shot
/// lease from whichever DHCP client the image has. Idempotent.
pub const NETWORK_SETUP: &str = "ip link set eth0 up && \
     if command -v dhclient >/dev/null; then dhclient -1 eth0; \
     elif command -v udhcpc >/dev/null; then udhcpc -i eth0 -n -q -t 10; \
     else echo 'the guest image has no DHCP client (dhclient or udhcpc) for the vz NAT' >&2; exit 1; fi";

const MIB: u64 = 1024 * 1024;

/// What the host allows: the framework's `minimumAllowed…`/`maximumAllowed…` class properties
/// on macOS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostLimits {
    pub min_cpus: u64,
    pub max_cpus: u64,
    pub min_memory_bytes: u64,
    pub max_memory_bytes: u64,
}

/// How the framework caches a disk image (`VZDiskImageCachingMode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskCaching {
    Automatic,
    Cached,
    Uncached,
}

/// How the framework syncs a disk image to the host (`VZDiskImageSynchronizationMode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskSync {
    Full,
    Fsync,
    None,
}

/// A virtio-blk disk backed by a raw image file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskSpec {
    pub path: PathBuf,
    pub read_only: bool,
    pub caching: DiskCaching,
    pub sync: DiskSync,
}

impl DiskSpec {
    /// A writable disk in the modes lima uses on vz: cached (uncached disks corrupt on arm64
    /// guests, UTM #4840) and synced with `fsync`, not a full `F_FULLFSYNC` barrier per flush:
    /// the disk is a throwaway clone, so a host crash losing its tail costs nothing.
    pub fn writable(path: PathBuf) -> Self {
        DiskSpec {
            path,
            read_only: false,
            caching: DiskCaching::Cached,
            sync: DiskSync::Fsync,
        }
    }
}

/// A host directory shared over virtiofs under `tag`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShareSpec {
    pub tag: String,
    pub path: PathBuf,
    pub read_only: bool,
}

/// The VM to start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmSpec {
    /// Uncompressed arm64 `Image`.
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub cmdline: String,
    pub cpus: u64,
    pub memory_bytes: u64,
    /// `/dev/vda` first.
    pub disks: Vec<DiskSpec>,
    pub shares: Vec<ShareSpec>,
    /// A virtio socket device (the agent and control ports).
    pub vsock: bool,
    /// A virtio NIC on the framework's NAT.
    pub network: bool,
    /// Where the guest's virtio console (`hvc0`) is written.
    pub console_log: PathBuf,
}

/// The paths of one VM's run directory the spec refers to.
#[derive(Debug, Clone)]
pub struct RunFiles {
    /// The VM's own copy-on-write clone of the cached raw root disk.
    pub root_disk: PathBuf,
    /// The directory shared as [`SHARE_TAG`].
    pub share: PathBuf,
    pub console_log: PathBuf,
}

impl VmSpec {
    /// The VM `config` asks for, booting `image` from the files of `run`, checked against
    /// what the host allows.
    pub fn new(
        config: &VzConfig,
        image: &VzImage,
        run: &RunFiles,
        limits: &HostLimits,
    ) -> Result<VmSpec, VzError> {
        let invalid = |parameter: &str, reason: String| VzError::InvalidParameter {
            parameter: parameter.to_owned(),
            reason,
        };
        if config.cpus < limits.min_cpus || config.cpus > limits.max_cpus {
            return Err(invalid(
                "cpus",
                format!(
                    "{} is outside what this Mac allows ({} to {})",
                    config.cpus, limits.min_cpus, limits.max_cpus
                ),
            ));
        }
        let memory_bytes = config
            .memory_mb
            .checked_mul(MIB)
            .ok_or_else(|| invalid("memory", format!("{} MB is too large", config.memory_mb)))?;
        if memory_bytes < limits.min_memory_bytes || memory_bytes > limits.max_memory_bytes {
            return Err(invalid(
                "memory",
                format!(
                    "{} MB is outside what this Mac allows ({} to {} MB)",
                    config.memory_mb,
                    limits.min_memory_bytes.div_ceil(MIB),
                    limits.max_memory_bytes / MIB
                ),
            ));
        }
        let share = ShareSpec {
            tag: SHARE_TAG.to_owned(),
            path: run.share.clone(),
            read_only: false,
        };
        check_tag(&share.tag)?;
        Ok(VmSpec {
            kernel: image.vmlinux.clone(),
            initrd: image.initrd.clone(),
            cmdline: vz_cmdline(&image.kernel_cmdline),
            cpus: config.cpus,
            memory_bytes,
            disks: vec![DiskSpec::writable(run.root_disk.clone())],
            shares: vec![share],
            vsock: true,
            network: config.network,
            console_log: run.console_log.clone(),
        })
    }
}

/// A virtiofs tag the framework accepts: non-empty, at most [`MAX_TAG_BYTES`] bytes.
pub fn check_tag(tag: &str) -> Result<(), VzError> {
    if tag.is_empty() || tag.len() > MAX_TAG_BYTES {
        return Err(VzError::InvalidParameter {
            parameter: "share tag".to_owned(),
            reason: format!("`{tag}` must be 1 to {MAX_TAG_BYTES} bytes"),
        });
    }
    Ok(())
}

/// The image's kernel command line for vz: the console on the virtio console (`hvc0`; the
/// framework has no UART for `ttyS0`/`ttyAMA0`), and `ci.transport=vsock` so our init serves the
/// agent and control protocols on vsock instead of virtio-serial. Both go before a `--` (what
/// follows it is init's).
pub fn vz_cmdline(cmdline: &str) -> String {
    let mut arguments: Vec<String> = Vec::new();
    let mut init_arguments: Vec<String> = Vec::new();
    let mut console = false;
    let mut transport = false;
    let mut after_separator = false;
    for argument in cmdline.split_whitespace() {
        if after_separator {
            init_arguments.push(argument.to_owned());
            continue;
        }
        if argument == "--" {
            after_separator = true;
            continue;
        }
        match argument.split_once('=') {
            Some(("console", _)) => {
                // One console, the virtio one, however many the image names.
                if !console {
                    arguments.push("console=hvc0".to_owned());
                    console = true;
                }
            }
            Some(("ci.transport", _)) => {
                if !transport {
                    arguments.push("ci.transport=vsock".to_owned());
                    transport = true;
                }
            }
            _ => arguments.push(argument.to_owned()),
        }
    }
    if !console {
        arguments.push("console=hvc0".to_owned());
    }
    if !transport {
        arguments.push("ci.transport=vsock".to_owned());
    }
    if after_separator {
        arguments.push("--".to_owned());
        arguments.extend(init_arguments);
    }
    arguments.join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: HostLimits = HostLimits {
        min_cpus: 1,
        max_cpus: 8,
        min_memory_bytes: 128 * MIB,
        max_memory_bytes: 16 * 1024 * MIB,
    };

    fn image() -> VzImage {
        VzImage {
            name: "debian-bookworm-arm64".to_owned(),
            digest: "d".to_owned(),
            vmlinux: PathBuf::from("/images/Image"),
            initrd: PathBuf::from("/images/initrd"),
            disk: PathBuf::from("/images/disk.qcow2"),
            kernel_cmdline: "console=ttyAMA0 root=/dev/vda quiet".to_owned(),
            arch: "aarch64".to_owned(),
        }
    }

    fn run() -> RunFiles {
        RunFiles {
            root_disk: PathBuf::from("/run/ns/root.raw"),
            share: PathBuf::from("/run/ns/share"),
            console_log: PathBuf::from("/run/ns/console.log"),
        }
    }

    #[test]
    fn cmdline_table() {
        for (image, expected) in [
            (
                "console=ttyS0 root=/dev/vda quiet",
                "console=hvc0 root=/dev/vda quiet ci.transport=vsock",
            ),
            (
                "root=/dev/vda console=tty0 console=ttyAMA0,115200",
                "root=/dev/vda console=hvc0 ci.transport=vsock",
            ),
            (
                "root=/dev/vda",
                "root=/dev/vda console=hvc0 ci.transport=vsock",
            ),
            (
                "console=ttyAMA0 ci.transport=virtio-serial -- --verbose",
                "console=hvc0 ci.transport=vsock -- --verbose",
            ),
            // Arguments after `--` are init's: left as they are, even a `console=`.
            (
                "quiet -- console=ttyS0",
                "quiet console=hvc0 ci.transport=vsock -- console=ttyS0",
            ),
            ("", "console=hvc0 ci.transport=vsock"),
        ] {
            assert_eq!(vz_cmdline(image), expected, "{image:?}");
        }
    }

    #[test]
    fn the_spec_has_every_device_of_the_issue() {
        let mut config = VzConfig::new("ns");
        config.network = false;
        let spec = VmSpec::new(&config, &image(), &run(), &LIMITS).expect("valid");
        assert_eq!(spec.kernel, PathBuf::from("/images/Image"));
        assert_eq!(
            spec.cmdline,
            "console=hvc0 root=/dev/vda quiet ci.transport=vsock"
        );
        assert_eq!((spec.cpus, spec.memory_bytes), (2, 2048 * MIB));
        assert_eq!(
            spec.disks,
            vec![DiskSpec {
                path: PathBuf::from("/run/ns/root.raw"),
                read_only: false,
                caching: DiskCaching::Cached,
                sync: DiskSync::Fsync,
            }]
        );
        assert_eq!(
            spec.shares,
            vec![ShareSpec {
                tag: "ci".to_owned(),
                path: PathBuf::from("/run/ns/share"),
                read_only: false,
            }]
        );
        assert!(spec.vsock && !spec.network);
        assert_eq!(spec.console_log, PathBuf::from("/run/ns/console.log"));
    }

    #[test]
    fn sizes_outside_the_host_limits_are_one_line_errors_naming_the_parameter() {
        for (cpus, memory_mb, parameter) in [
            (0, 2048, "`cpus`"),
            (9, 2048, "`cpus`"),
            (2, 64, "`memory`"),
            (2, 32 * 1024, "`memory`"),
            (2, u64::MAX, "`memory`"),
        ] {
            let mut config = VzConfig::new("ns");
            config.cpus = cpus;
            config.memory_mb = memory_mb;
            let error = VmSpec::new(&config, &image(), &run(), &LIMITS).expect_err("out of bounds");
            let text = error.to_string();
            assert!(text.contains(parameter), "{text}");
            assert_eq!(text.lines().count(), 1, "{text}");
        }
    }

    #[test]
    fn share_tags_are_checked_as_the_framework_does() {
        assert!(check_tag("ci").is_ok());
        assert!(check_tag("").is_err());
        assert!(check_tag(&"x".repeat(MAX_TAG_BYTES)).is_ok());
        assert!(check_tag(&"x".repeat(MAX_TAG_BYTES + 1)).is_err());
    }
}
