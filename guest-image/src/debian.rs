//! The default image, built locally from Debian's archive with `mmdebstrap`, and the Ubuntu
//! image (`ubuntu-noble`) built the same way from Ubuntu's archive.
//!
//! Two bootstraps: a `minbase` userland that becomes the preloaded container image
//! `localhost/ci-exec/base:latest`, then the guest OS. Everything that touches the guest's files
//! runs inside one mmdebstrap customize hook (`finish.sh`), because in unshare mode (a normal
//! user) only the hook sees the tree with the right owners; the hook ends by making the ext4
//! image with `mkfs.ext4 -d`, so no loop mount is needed anywhere.

use crate::exchange::Exchange;
use crate::manifest::{Manifest, RECIPE_VERSION};
use crate::{Arch, Error, Reporter, disk, host, initramfs, kernel};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Guest OS packages of the default image. Their dependencies come along; Recommends do not.
pub const PACKAGES: &[&str] = &[
    "podman",
    "crun",
    "netavark",
    "iptables",
    "kmod",
    "git",
    "rsync",
    "qemu-guest-agent",
    "ca-certificates",
    "netbase",
    "procps",
    "iproute2",
];

/// Added for Ubuntu images: mmdebstrap's `minbase` of an Ubuntu suite has no apt.
pub const UBUNTU_PACKAGES: &[&str] = &["apt", "ubuntu-keyring", "mount"];

/// Added for aarch64 images, which the `vz` driver boots too.
pub const AARCH64_PACKAGES: &[&str] = &["udhcpc"];

/// Added for the cloud-init variant, which boots systemd so that cloud-init's units run.
pub const CLOUD_INIT_PACKAGES: &[&str] = &["cloud-init", "systemd-sysv", "udev"];

/// The container image every default guest has offline.
pub const BASE_CONTAINER_IMAGE: &str = "localhost/ci-exec/base:latest";

/// Kernel module trees no guest of ours needs (hardware we never emulate): dropping them
/// takes about 250 MB off the disk.
const PRUNED_MODULE_DIRECTORIES: &[&str] = &[
    "sound",
    "drivers/gpu",
    "drivers/media",
    "drivers/net/wireless",
    "drivers/net/ethernet",
    "drivers/net/usb",
    "drivers/net/can",
    "drivers/net/wwan",
    "drivers/net/ieee802154",
    "drivers/net/hamradio",
    "drivers/infiniband",
    "drivers/usb",
    "drivers/iio",
    "drivers/hwmon",
    "drivers/staging",
    "drivers/hid",
    "drivers/platform",
    "drivers/comedi",
    "drivers/mtd",
    "drivers/video",
    "drivers/target",
    "drivers/isdn",
    "drivers/bluetooth",
    "drivers/mmc",
    "drivers/thunderbolt",
    "drivers/misc",
    "drivers/nfc",
    "drivers/leds",
    "drivers/power",
    "drivers/w1",
    "drivers/spi",
    "drivers/gnss",
    "drivers/fpga",
    "drivers/firewire",
    "drivers/pcmcia",
    "drivers/ssb",
    "drivers/bcma",
    "drivers/atm",
    "drivers/scsi/mpt3sas",
    "drivers/scsi/lpfc",
    "drivers/scsi/qla2xxx",
    "drivers/scsi/megaraid",
    "net/wireless",
    "net/mac80211",
    "net/bluetooth",
    "net/nfc",
    "net/ieee802154",
    "net/mac802154",
];

/// The guest kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kernel {
    /// Debian's own (`linux-image-amd64`, `-arm64`): virtio, ext4 and 9p are modules, which
    /// the init loads from the initramfs before and while the agent starts.
    Debian,
    /// Ubuntu 22.04's `kvm` flavour (x86_64 only), a kernel configured for virtual machines:
    /// virtio, ext4 and 9p are built in, so nothing is loaded before the agent starts and
    /// there are half as many initcalls. Measured here under TCG, the guest is ready about
    /// 0.6 s sooner than with Debian's (BENCHMARKS.md). Ubuntu publishes its updates in
    /// `jammy-updates` until April 2027; after that, `Debian` is the kernel to choose.
    UbuntuKvm,
}

impl Kernel {
    /// The kernel `image build` uses unless told: Ubuntu's `kvm` flavour where it exists.
    pub fn default_for(arch: &str) -> Self {
        if arch == "x86_64" {
            Kernel::UbuntuKvm
        } else {
            Kernel::Debian
        }
    }

    /// `debian`, `ubuntu-kvm`: the spelling of `ci-exec image build --kernel`.
    pub fn name(self) -> &'static str {
        match self {
            Kernel::Debian => "debian",
            Kernel::UbuntuKvm => "ubuntu-kvm",
        }
    }
}

impl std::str::FromStr for Kernel {
    type Err = String;

    fn from_str(name: &str) -> Result<Self, String> {
        [Kernel::Debian, Kernel::UbuntuKvm]
            .into_iter()
            .find(|kernel| kernel.name() == name)
            .ok_or_else(|| format!("unknown kernel `{name}` (known: debian, ubuntu-kvm)"))
    }
}

/// Where Ubuntu's packages come from, unless told (`BuildOptions::ubuntu_mirror`).
pub const UBUNTU_MIRROR: &str = "http://archive.ubuntu.com/ubuntu";

/// The key that signs Ubuntu's archive ("Ubuntu Archive Automatic Signing Key (2018)",
/// F6ECB3762474EDA9D21B7022871920D1991BC93C), from Ubuntu's `ubuntu-keyring` package: Debian
/// has no package of it, and apt checks the kernel's packages against it.
const UBUNTU_ARCHIVE_KEY: &[u8] = include_bytes!("../keys/ubuntu-archive-2018.asc");

/// Whose archive the guest OS and the container base image come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Distribution {
    /// Debian (`bookworm`), from the host's Debian sources unless told.
    Debian,
    /// Ubuntu (`noble`), from [`BuildOptions::ubuntu_mirror`] (`main` and `universe`, with the
    /// `-updates` and `-security` pockets), checked against Ubuntu's archive key. Its kernel is
    /// the suite's own `linux-image-virtual`.
    Ubuntu,
}

impl Distribution {
    /// `debian`, `ubuntu`: the first word of an image name.
    pub fn name(self) -> &'static str {
        match self {
            Distribution::Debian => "debian",
            Distribution::Ubuntu => "ubuntu",
        }
    }
}

/// Which flavour of the Debian image to build.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Variant {
    /// Our own PID 1 (`ci-exec-init`): agent up in about a second under TCG.
    Default,
    /// systemd + Debian's `cloud-init`, for testing NoCloud seeds against the real thing.
    CloudInit,
}

/// What to build. [`BuildOptions::new`] gives the default image.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    /// Our static `mk` (`cargo build --release --target x86_64-unknown-linux-musl -p mkrunner`);
    /// installed as `/usr/local/bin/mk`.
    pub mk_binary: PathBuf,
    /// Our static init (`… -p ci-exec-guest-init`, binary `ci-exec-init`).
    pub init_binary: PathBuf,
    /// The guest's architecture; another than the host's runs the bootstrap's programs through
    /// qemu-user (binfmt_misc), which is slower but needs no machine of that architecture.
    pub arch: Arch,
    pub distribution: Distribution,
    /// The distribution's suite: `bookworm`, `noble`.
    pub suite: String,
    /// A mirror URL or a sources file for mmdebstrap; `None` uses the host's Debian sources
    /// file when it names the suite, else mmdebstrap's default.
    pub mirror: Option<String>,
    pub variant: Variant,
    /// The guest kernel; [`Kernel::default_for`] this machine unless told.
    pub kernel: Kernel,
    /// Ubuntu mirror URL, for [`Kernel::UbuntuKvm`].
    pub ubuntu_mirror: String,
    /// More guest packages.
    pub extra_packages: Vec<String>,
    /// Size of the root filesystem the guest sees (the qcow2 only holds what is used).
    pub disk_size_gib: u32,
    /// Build even if a current build exists.
    pub force: bool,
}

impl BuildOptions {
    pub fn new(mk_binary: PathBuf, init_binary: PathBuf) -> Self {
        Self {
            mk_binary,
            init_binary,
            arch: Arch::host(),
            distribution: Distribution::Debian,
            suite: "bookworm".to_owned(),
            mirror: None,
            variant: Variant::Default,
            kernel: Kernel::default_for(std::env::consts::ARCH),
            ubuntu_mirror: UBUNTU_MIRROR.to_owned(),
            extra_packages: Vec::new(),
            disk_size_gib: 16,
            force: false,
        }
    }

    /// The Ubuntu image: `ubuntu-noble` (24.04 LTS), our init and agent, podman, mk, git.
    pub fn ubuntu(mk_binary: PathBuf, init_binary: PathBuf) -> Self {
        Self {
            distribution: Distribution::Ubuntu,
            suite: "noble".to_owned(),
            kernel: Kernel::UbuntuKvm,
            ..Self::new(mk_binary, init_binary)
        }
    }

    /// The options that build image `name` (`debian-bookworm`, `debian-bookworm-cloud-init`,
    /// `ubuntu-noble`, each for aarch64 with `-arm64` at the end), or `None` for a name no
    /// recipe here makes.
    pub fn for_image(name: &str, mk_binary: PathBuf, init_binary: PathBuf) -> Option<Self> {
        let (_, arch) = Arch::split_image_name(name);
        let mut options = if name.starts_with("ubuntu-") {
            Self::ubuntu(mk_binary, init_binary)
        } else {
            Self::new(mk_binary, init_binary)
        };
        options.set_arch(arch);
        if name == options.image_name() {
            return Some(options);
        }
        options.variant = Variant::CloudInit;
        (options.distribution == Distribution::Debian && name == options.image_name())
            .then_some(options)
    }

    /// Builds for `arch`, with the kernel that is the default there.
    pub fn set_arch(&mut self, arch: Arch) {
        self.arch = arch;
        if self.distribution == Distribution::Debian {
            self.kernel = Kernel::default_for(arch.name());
        }
    }

    /// `debian-bookworm`, `debian-bookworm-cloud-init`, `ubuntu-noble`; `-arm64` at the end
    /// for aarch64.
    pub fn image_name(&self) -> String {
        let distribution = self.distribution.name();
        let suffix = self.arch.image_suffix();
        match self.variant {
            Variant::Default => format!("{distribution}-{}{suffix}", self.suite),
            Variant::CloudInit => format!("{distribution}-{}-cloud-init{suffix}", self.suite),
        }
    }

    /// Whether the options make sense together: Ubuntu images boot Ubuntu's own kernel.
    pub fn check(&self) -> Result<(), Error> {
        if self.arch == Arch::Aarch64 && self.distribution == Distribution::Ubuntu {
            return Err(Error::Build {
                reason: format!(
                    "`{}` is built for x86_64 only (Ubuntu's arm64 packages are on another \
                     archive, ports.ubuntu.com): build `debian-bookworm-arm64`",
                    self.image_name()
                ),
            });
        }
        if self.arch == Arch::Aarch64 && self.kernel == Kernel::UbuntuKvm {
            return Err(Error::Build {
                reason:
                    "the `ubuntu-kvm` kernel exists for x86_64 only: drop `--kernel ubuntu-kvm` \
                         (aarch64 images boot Debian's arm64 kernel)"
                        .to_owned(),
            });
        }
        if self.distribution == Distribution::Ubuntu && self.kernel != Kernel::UbuntuKvm {
            return Err(Error::Build {
                reason: format!(
                    "`{}` boots Ubuntu's own kernel: drop `--kernel {}`",
                    self.image_name(),
                    self.kernel.name()
                ),
            });
        }
        if self.distribution == Distribution::Ubuntu && self.variant == Variant::CloudInit {
            return Err(Error::Build {
                reason: "the cloud-init variant is built from Debian only".to_owned(),
            });
        }
        Ok(())
    }

    fn packages(&self) -> Vec<String> {
        let mut packages: Vec<String> = PACKAGES.iter().map(|name| (*name).to_owned()).collect();
        if self.variant == Variant::CloudInit {
            packages.extend(CLOUD_INIT_PACKAGES.iter().map(|name| (*name).to_owned()));
        }
        if self.arch == Arch::Aarch64 {
            // Apple's Virtualization.framework (`vz`) gives its NAT network addresses by DHCP
            // only (QEMU's user network is set up statically): busybox's small client.
            packages.extend(AARCH64_PACKAGES.iter().map(|name| (*name).to_owned()));
        }
        if self.distribution == Distribution::Ubuntu {
            // apt in the guest trusts the archive through `ubuntu-keyring`'s key; `mount` is
            // not Essential in Ubuntu, and the driver mounts its 9p share.
            packages.extend(UBUNTU_PACKAGES.iter().map(|name| (*name).to_owned()));
        }
        packages.extend(self.extra_packages.iter().cloned());
        packages.sort();
        packages.dedup();
        packages
    }

    fn kernel_cmdline(&self) -> String {
        let base = format!(
            "root=/dev/vda rootfstype=ext4 rw console={} quiet panic=-1",
            self.arch.serial_console()
        );
        match self.variant {
            Variant::Default => base,
            Variant::CloudInit => format!("{base} ci.init=/sbin/init"),
        }
    }
}

/// Binaries read and checked once per build.
pub(crate) struct Inputs {
    pub mk: Vec<u8>,
    pub init: Vec<u8>,
    /// sha256 over the request: decides whether a cached build is current.
    pub digest: String,
}

pub(crate) fn inputs(options: &BuildOptions) -> Result<Inputs, Error> {
    let mk = host::require_static(&options.mk_binary, "mkrunner", options.arch)?;
    let init = host::require_static(&options.init_binary, "ci-exec-guest-init", options.arch)?;
    options.check()?;
    let request = serde_json::json!({
        "recipe_version": RECIPE_VERSION,
        "name": options.image_name(),
        "suite": options.suite,
        "arch": options.arch.name(),
        "packages": options.packages(),
        "kernel": options.kernel,
        "kernel_cmdline": options.kernel_cmdline(),
        "disk_size_gib": options.disk_size_gib,
        "mk_sha256": sha256_hex(&mk),
        "init_sha256": sha256_hex(&init),
    });
    Ok(Inputs {
        digest: sha256_hex(request.to_string().as_bytes()),
        mk,
        init,
    })
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Builds the image in `work` (a fresh directory on the cache's filesystem) and returns its
/// manifest with paths inside `work`; the cache moves it into place.
pub(crate) fn build(
    options: &BuildOptions,
    inputs: &Inputs,
    work: &Path,
    apt_cache: &Path,
    reporter: &dyn Reporter,
) -> Result<Manifest, Error> {
    let mmdebstrap = host::find(host::MMDEBSTRAP)?;
    let mkfs = host::find(host::MKFS_EXT4)?;
    host::find(host::QEMU_IMG)?;
    host::find(host::XZ)?;
    let podman = host::find(host::PODMAN)?;
    host::require_foreign_programs(options.arch)?;
    create_directory(apt_cache)?;
    let exchange = Exchange::new(work)?;
    let out = exchange.path();

    write_file(&out.join("mk"), &inputs.mk)?;
    write_file(&out.join("ci-exec-init"), &inputs.init)?;
    write_file(&out.join("ubuntu-archive.asc"), UBUNTU_ARCHIVE_KEY)?;
    let mut mirror = mirror(options);
    if options.distribution == Distribution::Ubuntu {
        // apt as mmdebstrap runs it trusts the keys in this directory (armoured `.asc` files
        // are read as they are); apt inside the tree trusts `ubuntu-keyring`'s copy. apt checks
        // signatures as its `_apt` user, which cannot reach a directory in root's home, so
        // mmdebstrap's apt keeps root (the hook drops that setting from the tree).
        let keyring = out.join("keyring");
        create_directory(&keyring)?;
        write_file(&keyring.join("ubuntu-archive.asc"), UBUNTU_ARCHIVE_KEY)?;
        mirror.splice(
            0..0,
            [
                format!("--keyring={}", keyring.display()),
                "--aptopt=APT::Sandbox::User \"root\"".to_owned(),
            ],
        );
    }

    // The two bootstraps are independent until the hook imports the base image, so they run
    // side by side; the hook waits for `base.ok` (or `base.failed`) before the import.
    reporter.step("bootstrapping the guest root filesystem and the container base image");
    let base_tar = out.join("base.tar");
    let mut base = Command::new(&mmdebstrap);
    base.arg("--variant=minbase");
    base.arg(format!("--architectures={}", options.arch.debian()));
    base.args(common_mmdebstrap_arguments(apt_cache));
    base.arg(format!(
        "--customize-hook=chroot \"$1\" dpkg-query -W -f '${{Package}}\\t${{Version}}\\n' > {}",
        shell_quote(&out.join("base-packages.tsv"))
    ));
    base.arg(&options.suite).arg(&base_tar);
    base.args(&mirror);

    let script = out.join("finish.sh");
    write_file(
        &script,
        finish_script(options, out, &mkfs, &podman).as_bytes(),
    )?;
    let mut root = Command::new(&mmdebstrap);
    root.arg("--variant=minbase");
    root.arg(format!("--architectures={}", options.arch.debian()));
    root.arg(format!("--include={}", options.packages().join(",")));
    root.args(common_mmdebstrap_arguments(apt_cache));
    root.arg(format!(
        "--customize-hook=sh {} \"$1\"",
        shell_quote(&script)
    ));
    root.arg(&options.suite).arg("/dev/null");
    root.args(&mirror);

    let (base_result, root_result) = std::thread::scope(|scope| {
        let base_thread = scope.spawn(|| {
            let result = host::run(base, reporter);
            let marker = out.join(if result.is_ok() {
                "base.ok"
            } else {
                "base.failed"
            });
            let _ = std::fs::write(marker, b"");
            result
        });
        let root_result = host::run(root, reporter);
        // If the root bootstrap failed before its hook, nothing waits for the base: let it end.
        let base_result = base_thread
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        (base_result, root_result)
    });
    base_result?;
    root_result.map_err(|error| with_hook_reason(out, error))?;
    keep_packages(&out.join("debs"), apt_cache)?;

    reporter.step("building the initramfs");
    let release = read_text(&out.join("kernel-release"))?.trim().to_owned();
    let modules = initramfs_modules(out, options.arch)?;
    let initrd = work.join("initrd.cpio");
    initramfs::build(&inputs.init, &modules, &initrd)?;

    reporter.step("extracting the uncompressed kernel");
    let kernel = work.join("vmlinuz");
    let vmlinux = work.join("vmlinux");
    exchange.take(&out.join("vmlinuz"), &kernel)?;
    kernel::extract_vmlinux(&kernel, &vmlinux)?;

    reporter.step("converting the root filesystem to qcow2");
    let raw = out.join("root.ext4");
    require_output(&raw)?;
    let qcow2 = work.join("disk.qcow2");
    disk::convert_to_qcow2(&raw, "raw", &qcow2, reporter)?;
    std::fs::remove_file(&raw).map_err(|source| Error::Remove {
        path: raw.clone(),
        source,
    })?;

    let mut packages = parse_packages(&read_text(&out.join("packages.tsv"))?);
    let kernel_package = read_text(&out.join("kernel-package"))?;
    if let Some((name, version)) = kernel_package.trim().split_once('\t') {
        packages.insert(name.to_owned(), version.to_owned());
    }
    let base_packages = parse_packages(&read_text(&out.join("base-packages.tsv"))?);
    let kernel_hz = std::fs::read_to_string(out.join("kernel-config"))
        .ok()
        .and_then(|config| crate::clock::kernel_hz(&config));
    let digest = sha256_hex(
        serde_json::json!({
            "recipe_version": RECIPE_VERSION,
            "inputs": inputs.digest,
            "packages": packages,
            "base_packages": base_packages,
            "kernel_release": release,
        })
        .to_string()
        .as_bytes(),
    );
    let disk_bytes = std::fs::metadata(&qcow2)
        .map(|metadata| metadata.len())
        .unwrap_or(0);
    Ok(Manifest {
        name: options.image_name(),
        digest,
        kernel,
        vmlinux,
        initrd,
        disk: qcow2,
        // Host-specific and so outside the digest: see `clock` (x86 guests on x86 hosts only).
        kernel_cmdline: match crate::clock::tcg_kernel_arguments(kernel_hz)
            .filter(|_| options.arch == Arch::X86_64)
        {
            Some(argument) => format!("{} {argument}", options.kernel_cmdline()),
            None => options.kernel_cmdline(),
        },
        packages,
        recipe_version: RECIPE_VERSION,
        inputs: inputs.digest.clone(),
        arch: options.arch.name().to_owned(),
        os: pretty_name(&read_text(&out.join("os-release"))?),
        kernel_release: release,
        container_images: vec![BASE_CONTAINER_IMAGE.to_owned()],
        source: "mmdebstrap".to_owned(),
        built_at: crate::cache::now_rfc3339(),
        disk_bytes,
    })
}

/// Arguments both bootstraps share: no docs, man pages or locales, and a persistent apt
/// archive so a rebuild downloads nothing that has not changed.
fn common_mmdebstrap_arguments(apt_cache: &Path) -> Vec<String> {
    let cache = shell_quote(apt_cache);
    vec![
        "--dpkgopt=path-exclude=/usr/share/man/*".to_owned(),
        "--dpkgopt=path-exclude=/usr/share/locale/*".to_owned(),
        "--dpkgopt=path-include=/usr/share/locale/locale.alias".to_owned(),
        "--dpkgopt=path-exclude=/usr/share/doc/*".to_owned(),
        "--dpkgopt=path-include=/usr/share/doc/*/copyright".to_owned(),
        "--dpkgopt=path-exclude=/usr/share/info/*".to_owned(),
        // No fsync per file: the image is either finished whole or thrown away, and on a busy
        // disk dpkg's syncs cost minutes.
        "--dpkgopt=force-unsafe-io".to_owned(),
        "--skip=essential/unlink".to_owned(),
        "--setup-hook=mkdir -p \"$1\"/var/cache/apt/archives/".to_owned(),
        format!("--setup-hook=sync-in {cache} /var/cache/apt/archives/"),
        format!("--customize-hook=sync-out /var/cache/apt/archives {cache}"),
    ]
}

/// The mirror argument(s) for mmdebstrap.
fn mirror(options: &BuildOptions) -> Vec<String> {
    if options.distribution == Distribution::Ubuntu {
        // The release pocket alone would give the packages as they were in April 2024.
        let url = options.mirror.as_deref().unwrap_or(&options.ubuntu_mirror);
        let suite = &options.suite;
        return ["", "-updates", "-security"]
            .iter()
            .map(|pocket| format!("deb {url} {suite}{pocket} main universe"))
            .collect();
    }
    if let Some(mirror) = &options.mirror {
        return vec![mirror.clone()];
    }
    // The host's own Debian sources, when they are for the suite we build: that is the mirror
    // (or proxy, or snapshot) this machine is known to reach.
    for candidate in [
        "/etc/apt/sources.list.d/debian.sources",
        "/etc/apt/sources.list",
    ] {
        if let Ok(text) = std::fs::read_to_string(candidate)
            && text
                .lines()
                .any(|line| !line.trim_start().starts_with('#') && line.contains(&options.suite))
        {
            return vec![candidate.to_owned()];
        }
    }
    Vec::new()
}

/// The customize hook: kernel, modules, our binaries, configuration, the preloaded container
/// image, the package list, and finally the ext4 image.
fn finish_script(options: &BuildOptions, out: &Path, mkfs: &Path, podman: &Path) -> String {
    let quote = |path: &Path| shell_quote(path);
    let pruned = PRUNED_MODULE_DIRECTORIES.join(" ");
    let modules = initramfs::modules(options.arch)
        .iter()
        .map(|(name, _)| *name)
        .collect::<Vec<_>>()
        .join(" ");
    let agent_symlinks = if options.variant == Variant::Default {
        "for name in poweroff halt reboot shutdown; do\n  [ -e \"$root/sbin/$name\" ] || ln -s ci-exec-init \"$root/sbin/$name\"\ndone\n"
    } else {
        ""
    };
    let cloud_init = if options.variant == Variant::CloudInit {
        // Only the NoCloud source: probing for cloud metadata services would wait on a network
        // that is not there.
        "mkdir -p \"$root/etc/cloud/cloud.cfg.d\"\nprintf 'datasource_list: [ NoCloud, None ]\\n' > \"$root/etc/cloud/cloud.cfg.d/90-ci-exec.cfg\"\nchroot \"$root\" systemctl enable qemu-guest-agent.service >&2 || true\n"
    } else {
        ""
    };
    let kernel = kernel_script(options);
    format!(
        r#"set -eu
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
root="$1"
work={out}
runroot=""
# In unshare mode this hook's root is a subordinate id of the user who builds: whatever it
# writes in the exchange directory must stay readable and removable by that user.
finish() {{
  status=$?
  if mountpoint -q "$work/rootview" 2>/dev/null; then umount "$work/rootview"; fi
  [ -z "$runroot" ] || rm -rf "$runroot"
  if [ "${{MMDEBSTRAP_MODE:-root}}" = unshare ]; then chmod -R a+rwX "$work" 2>/dev/null || true; fi
  exit "$status"
}}
trap finish EXIT
# A failure the user can act on: its reason becomes the build's error (`failure`).
fail() {{
  printf '%s\n' "$1" > "$work/failure"
  echo "$1" >&2
  exit 1
}}

{kernel}release=$(ls "$root/lib/modules" | head -n 1)
printf '%s\n' "$release" > "$work/kernel-release"
cat "$root/usr/lib/os-release" > "$work/os-release"
for directory in {pruned}; do rm -rf "$root/lib/modules/$release/kernel/$directory"; done
chroot "$root" /sbin/depmod --all "$release"
cp "$root/boot/vmlinuz-$release" "$work/vmlinuz"
cp "$root/boot/config-$release" "$work/kernel-config"
rm -f "$root/boot/vmlinuz-$release" "$root/boot/System.map-$release"

# Modules for the initramfs, in load order, each wanted module's list after a `wanted` line.
: > "$work/modules.show"
for module in {modules}; do
  echo "wanted $module" >> "$work/modules.show"
  chroot "$root" /sbin/modprobe --set-version "$release" --show-depends "$module" >> "$work/modules.show"
done
mkdir -p "$work/modules"
awk '$1 == "insmod" {{ print $2 }}' "$work/modules.show" | while read -r path; do
  mkdir -p "$work/modules$(dirname "$path")"
  cp "$root$path" "$work/modules$path"
done

install -m 0755 "$work/mk" "$root/usr/local/bin/mk"
install -m 0755 "$work/ci-exec-init" "$root/usr/sbin/ci-exec-init"
{agent_symlinks}echo ci-exec > "$root/etc/hostname"
printf '127.0.0.1\tlocalhost\n127.0.1.1\tci-exec\n::1\tlocalhost ip6-localhost ip6-loopback\n' > "$root/etc/hosts"
rm -f "$root/etc/resolv.conf"
printf '# ci-exec guests are offline unless a network is attached\n' > "$root/etc/resolv.conf"
mkdir -p "$root/etc/containers"
cat > "$root/etc/containers/containers.conf" <<'CONF'
# Written by ci-exec: the guest's PID 1 is not always systemd, so podman manages cgroups itself.
# Containers (`podman build`'s RUN steps too) share the guest's network: the VM is the
# boundary, and a bridge would need netfilter modules and setup for no gain.
[containers]
log_driver = "k8s-file"
netns = "host"
[engine]
cgroup_manager = "cgroupfs"
events_logger = "file"
CONF
{cloud_init}
# The preloaded container image, in the storage podman in the guest uses (overlay on ext4).
# Its tarball comes from the bootstrap running beside this one.
waited=0
until [ -e "$work/base.ok" ]; do
  if [ -e "$work/base.failed" ] || [ "$waited" -gt 3000 ]; then
    fail "the container base image bootstrap failed or took over 10 minutes"
  fi
  sleep 0.2
  waited=$((waited + 1))
done
# podman refuses a runroot path over 50 characters, so it gets a short one of its own; its
# other state goes there too, away from the host's /run (which unshare mode cannot write).
runroot=$(mktemp -d /tmp/ci-exec-podman.XXXXXX)
if [ "${{MMDEBSTRAP_MODE:-root}}" = unshare ]; then
  # Our root here is a subordinate id: podman must not take root's host-wide locks
  # (/dev/shm/libpod_lock), so it runs as a rootless podman whose namespace is this one.
  export _CONTAINERS_USERNS_CONFIGURED=done
fi
# Its configuration and lock directories go there as well: in unshare mode our root is a
# subordinate id that cannot write the building user's home (`mkdir $HOME/.config`).
HOME="$runroot" XDG_CONFIG_HOME="$runroot/config" XDG_DATA_HOME="$runroot/data" \
{podman} --root "$root/var/lib/containers/storage" --runroot "$runroot" --storage-driver overlay \
  --tmpdir "$runroot/libpod" --events-backend none --cgroup-manager cgroupfs \
  import --arch {debian_arch} --change 'CMD ["/bin/sh"]' --message 'ci-exec base image' "$work/base.tar" {base_image} >&2
# podman's database records the host paths it was run with; the guest makes its own.
rm -rf "$root/var/lib/containers/storage/libpod" "$root/var/lib/containers/storage/tmp" \
  "$root/var/lib/containers/storage/defaultNetworkBackend" \
  "$root/var/lib/containers/storage/mounts" "$root/var/lib/containers/storage/userns.lock"
rm -rf "$runroot"
runroot=""
if [ -n "${{_CONTAINERS_USERNS_CONFIGURED:-}}" ]; then rm -f /dev/shm/libpod_rootless_lock_0; fi

chroot "$root" dpkg-query -W -f '${{Package}}\t${{Version}}\n' > "$work/packages.tsv"

# Keep downloaded packages for the next build (the builder moves them into its apt archive),
# then drop them (and the indexes) from the image.
mkdir -p "$work/debs"
find "$root/var/cache/apt/archives" -maxdepth 1 -name '*.deb' -exec cp {{}} "$work/debs/" \;
rm -f "$root"/var/cache/apt/archives/*.deb "$root"/var/cache/apt/*.bin
# mmdebstrap's own apt settings (`--aptopt`) are not the guest's.
rm -f "$root/etc/apt/apt.conf.d/99mmdebstrap"
rm -rf "$root"/var/lib/apt/lists/*

# mkfs.ext4 -d copies a directory tree; a non-recursive bind mount of the root shows the tree
# without the /proc, /sys and /dev that mmdebstrap has mounted inside it.
mkdir -p "$work/rootview"
mount --bind "$root" "$work/rootview"
{mkfs} -q -F -L ci-exec-root -d "$work/rootview" -m 0 -i 65536 -J size=16 \
  -E lazy_itable_init=0,lazy_journal_init=0 "$work/root.ext4" {size}G
"#,
        out = quote(out),
        kernel = kernel,
        podman = quote(podman),
        mkfs = quote(mkfs),
        base_image = BASE_CONTAINER_IMAGE,
        debian_arch = options.arch.debian(),
        size = options.disk_size_gib,
    )
}

/// The hook's part that puts the kernel's packages in the tree, unpacked rather than installed:
/// installing pulls in initramfs-tools and spends half a minute making an initramfs we replace
/// with our own. Writes `kernel-package` (name, tab, version) for the manifest.
fn kernel_script(options: &BuildOptions) -> String {
    // tar must keep /lib a symlink to usr/lib (merged /usr); `dpkg-deb --extract` would
    // replace it. `record` writes the image package's name and version.
    let unpack = r#"unpack() {
  chroot "$root" sh -c "dpkg-deb --fsys-tarfile '/var/cache/apt/archives/$1' | tar -x --keep-directory-symlink -C /"
}
record() {
  chroot "$root" dpkg-deb --field "/var/cache/apt/archives/$1" Package Version | sed 's/^[A-Za-z]*: //' | paste - - > "$work/kernel-package"
}
"#;
    if options.distribution == Distribution::Ubuntu {
        // The suite's own kernel, from the tree's own sources: the current image and modules
        // packages of `linux-image-virtual` (since 24.04 the `kvm` flavour is an alias of it:
        // the generic kernel without `linux-modules-extra`), without the dependencies an
        // installed kernel would pull in.
        let flavour = "virtual";
        return format!(
            r#"{unpack}image=$(chroot "$root" apt-cache depends linux-image-{flavour} | awk '$1 == "Depends:" && $2 ~ /^linux-image-(unsigned-)?[0-9]/ {{ print $2; exit }}')
[ -n "$image" ] ||
  fail "Ubuntu's archive has no linux-image-{flavour} for {suite}"
modules="linux-modules-${{image#linux-image-}}"
modules="${{modules#linux-modules-unsigned-}}"
case "$modules" in linux-modules-*) ;; *) modules="linux-modules-$modules" ;; esac
chroot "$root" sh -c "cd /var/cache/apt/archives && apt-get download $image $modules" >&2
for package in "$modules" "$image"; do
  deb=$(ls "$root"/var/cache/apt/archives/"$package"_*.deb | sort -V | tail -n 1)
  unpack "${{deb##*/}}"
done
record "${{deb##*/}}"
"#,
            suite = options.suite,
        );
    }
    match options.kernel {
        Kernel::Debian => format!(
            r#"{unpack}chroot "$root" apt-get install --download-only --yes --no-install-recommends linux-image-{arch} >&2
deb=$(ls "$root"/var/cache/apt/archives/linux-image-[0-9]*.deb | head -n 1)
record "${{deb##*/}}"
unpack "${{deb##*/}}"
"#,
            arch = options.arch.debian(),
        ),
        // apt in the tree fetches Ubuntu's indexes into a directory of their own (the tree's
        // apt never sees them), checks them against Ubuntu's key, and downloads the flavour's
        // current image and modules packages, without their dependencies (kmod, linux-base:
        // the tree has Debian's).
        Kernel::UbuntuKvm => format!(
            r#"{unpack}ubuntu=/tmp/ci-exec-ubuntu
mkdir -p "$root$ubuntu/lists/partial" "$root$ubuntu/parts"
cp "$work/ubuntu-archive.asc" "$root$ubuntu/archive.asc"
for pocket in jammy-updates jammy-security; do
  printf 'deb [signed-by=%s/archive.asc] %s %s main\n' "$ubuntu" {mirror} "$pocket"
done > "$root$ubuntu/sources.list"
apt_ubuntu="-o Dir::Etc::SourceList=$ubuntu/sources.list -o Dir::Etc::SourceParts=$ubuntu/parts -o Dir::Etc::Preferences=$ubuntu/none -o Dir::Etc::PreferencesParts=$ubuntu/parts -o Dir::State::Lists=$ubuntu/lists -o Dir::Cache::pkgcache= -o Dir::Cache::srcpkgcache= -o Acquire::Languages=none"
chroot "$root" apt-get $apt_ubuntu --error-on=any update >&2 ||
  fail "cannot fetch jammy's indexes from Ubuntu's archive at {mirror} for the guest kernel: pass \`--ubuntu-mirror URL\` or build with \`--kernel debian\`"
image=$(chroot "$root" apt-cache $apt_ubuntu depends linux-image-kvm | awk '$1 == "Depends:" && $2 ~ /^linux-image-[0-9]/ {{ print $2; exit }}')
[ -n "$image" ] ||
  fail "Ubuntu's archive at {mirror} has no linux-image-kvm for jammy: build with \`--kernel debian\`"
modules="linux-modules-${{image#linux-image-}}"
chroot "$root" sh -c "cd /var/cache/apt/archives && apt-get $apt_ubuntu download $image $modules" >&2
rm -rf "$root$ubuntu"
for package in "$modules" "$image"; do
  deb=$(ls "$root"/var/cache/apt/archives/"$package"_*.deb | head -n 1)
  unpack "${{deb##*/}}"
done
record "${{deb##*/}}"
"#,
            mirror = shell_quote(Path::new(&options.ubuntu_mirror)),
        ),
    }
}

/// The reason the hook gave for failing (its `fail`), if it gave one, in place of mmdebstrap's
/// exit status and log tail.
fn with_hook_reason(exchange: &Path, error: Error) -> Error {
    match std::fs::read_to_string(exchange.join("failure")) {
        Ok(reason) if !reason.trim().is_empty() => Error::Build {
            reason: reason.trim().to_owned(),
        },
        _ => error,
    }
}

/// Moves the packages the hook downloaded into the persistent apt archive, for the next build.
fn keep_packages(debs: &Path, apt_cache: &Path) -> Result<(), Error> {
    let Ok(entries) = std::fs::read_dir(debs) else {
        return Ok(());
    };
    for entry in entries.flatten() {
        let target = apt_cache.join(entry.file_name());
        if target.exists() {
            continue;
        }
        // A copy, not a rename: in unshare mode the file belongs to a subordinate id.
        std::fs::copy(entry.path(), &target).map_err(|source| Error::Write {
            path: target.clone(),
            source,
        })?;
    }
    Ok(())
}

/// Module files listed by `modprobe --show-depends` after each `wanted` line, deduplicated, in
/// load order, each in its wanted module's group; signatures stripped.
fn initramfs_modules(work: &Path, arch: Arch) -> Result<Vec<initramfs::ModuleFile>, Error> {
    let listing = read_text(&work.join("modules.show"))?;
    let mut seen = std::collections::HashSet::new();
    let mut modules = Vec::new();
    let mut group = initramfs::Group::Boot;
    for line in listing.lines() {
        let mut words = line.split_whitespace();
        match words.next() {
            Some("wanted") => {
                let name = words.next().unwrap_or_default();
                group = initramfs::group_of(arch, name).unwrap_or(initramfs::Group::Boot);
                continue;
            }
            Some("insmod") => {}
            _ => continue,
        }
        let Some(path) = words.next() else { continue };
        if !seen.insert(path.to_owned()) {
            continue;
        }
        let Some(relative) = path.strip_prefix("/lib/modules/") else {
            continue;
        };
        let source = work.join("modules").join(path.trim_start_matches('/'));
        let contents = std::fs::read(&source).map_err(|_| Error::MissingModule {
            module: relative.to_owned(),
            path: source.clone(),
        })?;
        modules.push(initramfs::ModuleFile {
            relative_path: relative.to_owned(),
            group,
            contents: initramfs::strip_signature(&contents).to_vec(),
        });
    }
    for (wanted, _) in initramfs::modules(arch) {
        let found = modules
            .iter()
            .any(|module| initramfs::module_name(&module.relative_path) == *wanted);
        let builtin = listing
            .lines()
            .any(|line| line.trim() == format!("builtin {wanted}"));
        if !found && !builtin {
            return Err(Error::MissingModule {
                module: (*wanted).to_owned(),
                path: work.join("modules.show"),
            });
        }
    }
    Ok(modules)
}

/// `PRETTY_NAME` from an `os-release` file (`Debian GNU/Linux 12 (bookworm)`), else `NAME`
/// and `VERSION_ID`.
pub(crate) fn pretty_name(os_release: &str) -> String {
    let field = |key: &str| {
        os_release.lines().find_map(|line| {
            let value = line.strip_prefix(key)?.strip_prefix('=')?;
            Some(value.trim().trim_matches('"').to_owned())
        })
    };
    field("PRETTY_NAME")
        .or_else(|| Some(format!("{} {}", field("NAME")?, field("VERSION_ID")?)))
        .unwrap_or_default()
}

fn parse_packages(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|line| line.split_once('\t'))
        .map(|(name, version)| (name.to_owned(), version.to_owned()))
        .collect()
}

pub(crate) fn shell_quote(path: &Path) -> String {
    format!("'{}'", path.display().to_string().replace('\'', "'\\''"))
}

fn create_directory(path: &Path) -> Result<(), Error> {
    std::fs::create_dir_all(path).map_err(|source| Error::CreateDirectory {
        path: path.to_owned(),
        source,
    })
}

fn write_file(path: &Path, contents: &[u8]) -> Result<(), Error> {
    std::fs::write(path, contents).map_err(|source| Error::Write {
        path: path.to_owned(),
        source,
    })
}

fn read_text(path: &Path) -> Result<String, Error> {
    if !path.exists() {
        return Err(Error::MissingOutput {
            path: path.to_owned(),
        });
    }
    std::fs::read_to_string(path).map_err(|source| Error::Read {
        path: path.to_owned(),
        source,
    })
}

fn require_output(path: &Path) -> Result<(), Error> {
    if path.exists() {
        Ok(())
    } else {
        Err(Error::MissingOutput {
            path: path.to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_cmdlines_per_variant() {
        let mut options = BuildOptions::new("mk".into(), "init".into());
        assert_eq!(options.image_name(), "debian-bookworm");
        assert!(!options.kernel_cmdline().contains("ci.init"));
        options.variant = Variant::CloudInit;
        assert_eq!(options.image_name(), "debian-bookworm-cloud-init");
        assert!(options.kernel_cmdline().ends_with("ci.init=/sbin/init"));
        assert!(options.packages().contains(&"cloud-init".to_owned()));
    }

    #[test]
    fn arm64_images_are_named_for_their_architecture_and_boot_debians_kernel() {
        let options = BuildOptions::for_image("debian-bookworm-arm64", "mk".into(), "init".into())
            .expect("arm64 default image");
        assert_eq!(options.arch, Arch::Aarch64);
        assert_eq!(options.kernel, Kernel::Debian);
        assert_eq!(options.image_name(), "debian-bookworm-arm64");
        assert!(options.kernel_cmdline().contains("console=ttyAMA0"));
        assert!(options.packages().contains(&"udhcpc".to_owned()));
        assert!(
            !BuildOptions::new("mk".into(), "init".into())
                .packages()
                .contains(&"udhcpc".to_owned())
        );
        options.check().expect("consistent");
        let cloud_init = BuildOptions::for_image(
            "debian-bookworm-cloud-init-arm64",
            "mk".into(),
            "init".into(),
        )
        .expect("arm64 cloud-init variant");
        assert_eq!(cloud_init.variant, Variant::CloudInit);
        let ubuntu = BuildOptions::for_image("ubuntu-noble-arm64", "mk".into(), "init".into())
            .expect("named");
        let error = ubuntu.check().expect_err("no arm64 Ubuntu");
        assert!(error.to_string().contains("x86_64 only"), "{error}");
        let mut ubuntu_kernel = options.clone();
        ubuntu_kernel.kernel = Kernel::UbuntuKvm;
        let error = ubuntu_kernel.check().expect_err("no arm64 kvm flavour");
        assert!(
            error.to_string().contains("drop `--kernel ubuntu-kvm`"),
            "{error}"
        );
    }

    #[test]
    fn image_names_choose_their_recipe() {
        let options = |name: &str| BuildOptions::for_image(name, "mk".into(), "init".into());
        let ubuntu = options("ubuntu-noble").expect("ubuntu");
        assert_eq!(ubuntu.distribution, Distribution::Ubuntu);
        assert_eq!(ubuntu.image_name(), "ubuntu-noble");
        assert!(ubuntu.packages().contains(&"ubuntu-keyring".to_owned()));
        assert!(ubuntu.packages().contains(&"apt".to_owned()));
        assert_eq!(
            options("debian-bookworm-cloud-init").map(|options| options.variant),
            Some(Variant::CloudInit)
        );
        assert_eq!(
            options("debian-bookworm").map(|options| options.distribution),
            Some(Distribution::Debian)
        );
        for unknown in [
            "ubuntu-noble-cloud-init",
            "ubuntu-jammy",
            "fedora-41",
            "debian-sid",
        ] {
            assert!(options(unknown).is_none(), "{unknown}");
        }
        // The Debian image's request (and so its digest) does not name the distribution.
        assert!(
            !BuildOptions::new("mk".into(), "init".into())
                .packages()
                .contains(&"apt".to_owned())
        );
    }

    #[test]
    fn ubuntu_images_come_from_ubuntus_archive_with_updates_and_its_own_kernel() {
        let mut options = BuildOptions::ubuntu("mk".into(), "init".into());
        options.ubuntu_mirror = "http://mirror.example/ubuntu".to_owned();
        assert_eq!(
            mirror(&options),
            [
                "deb http://mirror.example/ubuntu noble main universe",
                "deb http://mirror.example/ubuntu noble-updates main universe",
                "deb http://mirror.example/ubuntu noble-security main universe",
            ]
        );
        let kernel = kernel_script(&options);
        assert!(
            kernel.contains("apt-cache depends linux-image-virtual"),
            "{kernel}"
        );
        assert!(!kernel.contains("jammy"), "{kernel}");
        options.check().expect("consistent");
        options.kernel = Kernel::Debian;
        let error = options.check().expect_err("Debian's kernel on Ubuntu");
        assert!(
            error.to_string().contains("drop `--kernel debian`"),
            "{error}"
        );
    }

    #[test]
    fn os_release_names_the_guest_os() {
        assert_eq!(
            pretty_name(
                "NAME=\"Ubuntu\"\nVERSION_ID=\"24.04\"\nPRETTY_NAME=\"Ubuntu 24.04.3 LTS\"\n"
            ),
            "Ubuntu 24.04.3 LTS"
        );
        assert_eq!(
            pretty_name("NAME=Alpine\nVERSION_ID=3.22.1\n"),
            "Alpine 3.22.1"
        );
        assert_eq!(pretty_name(""), "");
    }

    #[test]
    fn kernels_parse_by_name_and_default_by_architecture() {
        for kernel in [Kernel::Debian, Kernel::UbuntuKvm] {
            assert_eq!(kernel.name().parse::<Kernel>(), Ok(kernel));
        }
        let error = "fedora".parse::<Kernel>().expect_err("unknown");
        assert!(error.contains("debian, ubuntu-kvm"), "{error}");
        assert_eq!(Kernel::default_for("x86_64"), Kernel::UbuntuKvm);
        assert_eq!(Kernel::default_for("aarch64"), Kernel::Debian);
    }

    #[test]
    fn the_kernel_choice_decides_what_the_hook_fetches() {
        let mut options = BuildOptions::new("mk".into(), "init".into());
        options.kernel = Kernel::UbuntuKvm;
        options.ubuntu_mirror = "http://mirror.example/ubuntu".to_owned();
        let ubuntu = kernel_script(&options);
        assert!(
            ubuntu.contains("'http://mirror.example/ubuntu'"),
            "{ubuntu}"
        );
        assert!(ubuntu.contains("linux-image-kvm"), "{ubuntu}");
        assert!(ubuntu.contains("--error-on=any update"), "{ubuntu}");
        options.kernel = Kernel::Debian;
        let debian = kernel_script(&options);
        assert!(
            debian.contains(&format!("linux-image-{}", options.arch.debian())),
            "{debian}"
        );
        options.set_arch(Arch::Aarch64);
        assert!(kernel_script(&options).contains("linux-image-arm64"));
        assert!(!debian.contains("ubuntu"), "{debian}");
        assert!(
            String::from_utf8_lossy(UBUNTU_ARCHIVE_KEY)
                .starts_with("-----BEGIN PGP PUBLIC KEY BLOCK-----")
        );
    }

    #[test]
    fn the_hooks_reason_replaces_mmdebstraps_exit_status() {
        let exchange = tempfile::tempdir().expect("tempdir");
        let failed = || Error::MissingOutput {
            path: PathBuf::from("disk.qcow2"),
        };
        assert!(matches!(
            with_hook_reason(exchange.path(), failed()),
            Error::MissingOutput { .. }
        ));
        std::fs::write(exchange.path().join("failure"), "no kernel: use X\n").expect("write");
        assert_eq!(
            with_hook_reason(exchange.path(), failed()).to_string(),
            "the image build failed: no kernel: use X"
        );
    }

    #[test]
    fn shell_quote_survives_quotes() {
        assert_eq!(shell_quote(Path::new("/a b/it's")), r"'/a b/it'\''s'");
    }

    #[test]
    fn package_table_parses() {
        let packages = parse_packages("git\t1:2.39.5-0+deb12u2\npodman\t4.3.1+ds1-8+deb12u1\n");
        assert_eq!(packages["podman"], "4.3.1+ds1-8+deb12u1");
    }
}
