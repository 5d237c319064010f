//! [`VzConfig`]: what the vz driver is configured with (its DSN parameters and their `VZ_*`
//! environment variables), named as the qemu driver names the same things.

use std::path::PathBuf;
use std::time::Duration;

use ci_exec_driver::DriverConfig;

/// The guest image a vz VM boots when `image=` is not set: the aarch64 build of the qemu
/// driver's default (`ci-exec image build --arch aarch64`).
pub const DEFAULT_IMAGE: &str = "debian-bookworm-arm64";

/// Everything the vz driver is configured with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VzConfig {
    pub namespace: String,
    /// Guest memory in MiB (`memory`, `VZ_MEMORY`).
    pub memory_mb: u64,
    /// vCPUs (`cpus`, `VZ_CPUS`).
    pub cpus: u64,
    /// `cache_dir` (`VZ_CACHE_DIR`): the raw root disks, the warm VM states and the run
    /// directories live here.
    pub cache_dir: PathBuf,
    /// `image` (`VZ_IMAGE`): a catalog name (`debian-bookworm-arm64`), or the path of a built
    /// image's directory or `manifest.json`. It must be an aarch64 image.
    pub image: String,
    /// `boot_timeout` (`VZ_BOOT_TIMEOUT`): the longest wait for the guest agent after start.
    pub boot_timeout: Duration,
    /// `warm` (`VZ_WARM`): start from a saved VM state when one exists (macOS 14 and later).
    pub warm: bool,
    /// `network` (`VZ_NETWORK`): a virtio NIC on the framework's NAT; tasks still choose per
    /// task, as with the qemu driver.
    pub network: bool,
}

impl VzConfig {
    /// Defaults for `namespace`, as the DSN registry documents them.
    pub fn new(namespace: impl Into<String>) -> Self {
        VzConfig {
            namespace: namespace.into(),
            memory_mb: 2048,
            cpus: 2,
            cache_dir: ci_exec_driver::user_cache_dir()
                .map(|dir| dir.join("vz"))
                .unwrap_or_else(|| std::env::temp_dir().join("ci-exec-cache").join("vz")),
            image: DEFAULT_IMAGE.to_owned(),
            boot_timeout: Duration::from_secs(300),
            warm: true,
            network: true,
        }
    }

    /// The configuration a resolved `--driver=vz…` asks for.
    pub fn from_driver_config(config: &DriverConfig) -> Self {
        let mut vz = VzConfig::new(config.namespace.clone());
        if let Some(memory) = config.u64("memory") {
            vz.memory_mb = memory;
        }
        if let Some(cpus) = config.u64("cpus") {
            vz.cpus = cpus;
        }
        if let Some(cache_dir) = config.str("cache_dir") {
            vz.cache_dir = PathBuf::from(cache_dir);
        }
        if let Some(image) = config.str("image") {
            vz.image = image.to_owned();
        }
        if let Some(timeout) = config.duration("boot_timeout") {
            vz.boot_timeout = timeout;
        }
        if let Some(warm) = config.bool("warm") {
            vz.warm = warm;
        }
        if let Some(network) = config.bool("network") {
            vz.network = network;
        }
        vz
    }

    /// Where the raw root disks converted from the images' qcow2 are cached.
    pub fn disk_cache(&self) -> PathBuf {
        self.cache_dir.join("disks")
    }

    /// Where saved VM states (warm starts) are kept.
    pub fn state_cache(&self) -> PathBuf {
        self.cache_dir.join("warm")
    }

    /// The run directory of this driver's namespace. It sits beside the disk cache, not in a
    /// runtime directory as the qemu driver's does, because a VM's root disk is an APFS clone
    /// of a cached disk and `clonefile(2)` only clones within one volume (elsewhere it would
    /// be a full copy of the disk).
    pub fn run_dir(&self) -> PathBuf {
        self.run_root().join(&self.namespace)
    }

    /// Where every namespace's run directory is.
    pub fn run_root(&self) -> PathBuf {
        self.cache_dir.join("run")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(dsn: &str, env: &[(&str, &str)]) -> VzConfig {
        let config = DriverConfig::parse_with_env(dsn, &|variable| {
            env.iter()
                .find(|(name, _)| *name == variable)
                .map(|(_, value)| (*value).to_owned())
        })
        .unwrap_or_else(|error| panic!("`{dsn}`: {error}"));
        VzConfig::from_driver_config(&config)
    }

    #[test]
    fn defaults_match_the_registry() {
        let config = parse("vz://ns", &[]);
        assert_eq!(config.namespace, "ns");
        assert_eq!((config.memory_mb, config.cpus), (2048, 2));
        assert_eq!(config.image, DEFAULT_IMAGE);
        assert_eq!(config.boot_timeout, Duration::from_secs(300));
        assert!(config.warm && config.network);
    }

    #[test]
    fn dsn_parameters_beat_environment_variables() {
        let config = parse(
            "vz://ns?memory=4096&image=/images/x&warm=false",
            &[
                ("VZ_MEMORY", "1024"),
                ("VZ_CPUS", "6"),
                ("VZ_NETWORK", "false"),
                ("VZ_CACHE_DIR", "/cache/vz"),
                ("VZ_BOOT_TIMEOUT", "90s"),
            ],
        );
        assert_eq!((config.memory_mb, config.cpus), (4096, 6));
        assert_eq!(config.image, "/images/x");
        assert!(!config.warm && !config.network);
        assert_eq!(config.boot_timeout, Duration::from_secs(90));
        assert_eq!(config.run_dir(), PathBuf::from("/cache/vz/run/ns"));
        assert_eq!(config.disk_cache(), PathBuf::from("/cache/vz/disks"));
    }
}
