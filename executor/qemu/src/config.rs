use std::path::PathBuf;
use std::time::Duration;

use ci_exec_driver::DriverConfig;

use crate::QemuError;
use crate::accel::AccelChoice;

/// Everything the qemu driver is configured with (DSN parameters and their env vars).
#[derive(Debug, Clone)]
pub struct QemuConfig {
    pub namespace: String,
    /// Guest memory in MiB (`memory`, `QEMU_MEMORY`).
    pub memory_mb: u64,
    /// vCPUs (`cpus`, `QEMU_CPUS`).
    pub cpus: u64,
    /// `accel`: `auto` probes.
    pub accel: AccelChoice,
    /// `qemu_binary`: the system emulator; `None` is `qemu-system-<the image's architecture>`.
    pub qemu_binary: Option<String>,
    /// `cache_dir`: the accelerator verdict and warm VM states live here.
    pub cache_dir: PathBuf,
    /// `image`: a catalog name (`debian-bookworm`), or the path of a built image's directory
    /// or `manifest.json`.
    pub image: String,
    /// `boot_timeout`: the longest wait for the guest agent to answer after start.
    pub boot_timeout: Duration,
    /// Where per-namespace run directories (pid file, sockets, overlay, share) live.
    pub run_root: PathBuf,
    /// `warm` (`QEMU_WARM`): start from a saved VM state when one exists.
    pub warm: bool,
    /// `network` (`QEMU_NETWORK`): give the VM outbound network through QEMU's user-mode
    /// stack (NAT, DNS relayed to the host's resolver); tasks still choose per task.
    pub network: bool,
}

impl QemuConfig {
    /// Defaults for `namespace`, as the DSN registry documents them.
    pub fn new(namespace: impl Into<String>) -> Self {
        QemuConfig {
            namespace: namespace.into(),
            memory_mb: 2048,
            cpus: 2,
            accel: AccelChoice::Auto,
            qemu_binary: None,
            cache_dir: ci_exec_driver::user_cache_dir()
                .map(|dir| dir.join("qemu"))
                .unwrap_or_else(|| std::env::temp_dir().join("ci-exec-cache").join("qemu")),
            image: ci_exec_guest_image::default_image(),
            boot_timeout: Duration::from_secs(300),
            run_root: default_run_root(),
            warm: true,
            network: true,
        }
    }

    /// The configuration a resolved `--driver=qemu…` asks for.
    pub fn from_driver_config(config: &DriverConfig) -> Result<Self, QemuError> {
        let mut qemu = QemuConfig::new(config.namespace.clone());
        if let Some(memory) = config.u64("memory") {
            qemu.memory_mb = memory;
        }
        if let Some(cpus) = config.u64("cpus") {
            qemu.cpus = cpus;
        }
        if let Some(accel) = config.str("accel") {
            qemu.accel = accel.parse()?;
        }
        if let Some(binary) = config.str("qemu_binary") {
            qemu.qemu_binary = Some(binary.to_owned());
        }
        if let Some(cache_dir) = config.str("cache_dir") {
            qemu.cache_dir = PathBuf::from(cache_dir);
        }
        if let Some(image) = config.str("image") {
            qemu.image = image.to_owned();
        }
        if let Some(timeout) = config.duration("boot_timeout") {
            qemu.boot_timeout = timeout;
        }
        if let Some(warm) = config.bool("warm") {
            qemu.warm = warm;
        }
        if let Some(network) = config.bool("network") {
            qemu.network = network;
        }
        Ok(qemu)
    }

    /// The system emulator for guests of `arch`: `qemu_binary` when given, else
    /// `qemu-system-x86_64` or `qemu-system-aarch64`.
    pub fn qemu_binary_for(&self, arch: ci_exec_guest_image::Arch) -> String {
        self.qemu_binary
            .clone()
            .unwrap_or_else(|| format!("qemu-system-{arch}"))
    }

    /// The run directory of this driver's namespace.
    pub fn run_dir(&self) -> PathBuf {
        self.run_root.join(&self.namespace)
    }
}

/// `$XDG_RUNTIME_DIR/ci-exec/qemu`, else `/tmp/ci-exec-<uid>/qemu`: short, so socket paths
/// stay under the 108-byte limit of `sun_path`.
pub fn default_run_root() -> PathBuf {
    if let Some(runtime) = std::env::var_os("XDG_RUNTIME_DIR").map(PathBuf::from)
        && runtime.is_absolute()
    {
        return runtime.join("ci-exec").join("qemu");
    }
    // SAFETY: getuid has no preconditions and cannot fail.
    let uid = unsafe { libc::getuid() };
    PathBuf::from(format!("/tmp/ci-exec-{uid}")).join("qemu")
}
