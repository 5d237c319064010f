//! Guest images for ci-exec VMs: build the default Debian image from the Debian archive, keep
//! images in a cache with manifests and stable digests, and hand the qemu driver what it boots.
//! It does not boot anything itself (that is `ci-exec-qemu`), and it draws no progress bars
//! (it reports through [`Reporter`]; the CLI draws).
//!
//! # For the qemu driver
//! ```no_run
//! use ci_exec_guest_image::{BuildOptions, ImageCache, SilentReporter, create_overlay};
//! # fn main() -> Result<(), ci_exec_guest_image::Error> {
//! let cache = ImageCache::open(None)?; // $XDG_CACHE_HOME/ci-exec/images
//! let image = match cache.get("debian-bookworm")? {
//!     Some(image) => image,
//!     None => cache.build_default(
//!         &BuildOptions::new("target/x86_64-unknown-linux-musl/release/mk".into(),
//!                            "target/x86_64-unknown-linux-musl/release/ci-exec-init".into()),
//!         &SilentReporter,
//!     )?,
//! };
//! create_overlay(&image.disk, std::path::Path::new("/tmp/run.qcow2"))?;
//! // qemu-system-x86_64 -M microvm,pit=on -kernel {image.vmlinux} -initrd {image.initrd}
//! //   -append "{image.kernel_cmdline}" -drive file=/tmp/run.qcow2,if=none,id=root,format=qcow2
//! //   -device virtio-blk-device,drive=root
//! //   -device virtio-serial-device -chardev socket,id=qga,path=…,server=on,wait=off
//! //   -device virtserialport,chardev=qga,name=org.qemu.guest_agent.0
//! # Ok(()) }
//! ```
//! The guest: root on `/dev/vda` (ext4), our `ci-exec-init` as PID 1 with `/proc /sys /dev
//! /dev/pts /dev/shm /run /tmp` and cgroup2 mounted, loopback up, `qemu-ga` on the port named
//! `org.qemu.guest_agent.0`, podman (crun, overlay storage, `cgroup_manager = "cgroupfs"`) with
//! `localhost/ci-exec/base:latest` preloaded, 9p/virtio/overlay built into the kernel or loaded
//! from the initramfs, and `mk` at `/usr/local/bin/mk`.

mod arch;
pub mod binaries;
mod cache;
pub mod catalog;
mod clock;
#[cfg(feature = "download")]
mod cloud;
mod debian;
mod disk;
#[cfg(feature = "download")]
pub mod download;
mod error;
mod exchange;
mod host;
mod initramfs;
mod kernel;
mod manifest;
mod reporter;

pub use arch::{Arch, default_image};
pub use cache::{ImageCache, PruneReport, default_directory};
pub use clock::tcg_kernel_arguments;
#[cfg(feature = "download")]
pub use cloud::CloudOptions;
pub use debian::{
    BASE_CONTAINER_IMAGE, BuildOptions, Distribution, Kernel, PACKAGES, UBUNTU_MIRROR, Variant,
};
pub use disk::create_overlay;
pub use error::Error;
pub use kernel::extract_vmlinux;
pub use manifest::{Manifest, RECIPE_VERSION};
pub use reporter::{Reporter, SilentReporter, TracingReporter};

/// The name of the default image.
pub const DEFAULT_IMAGE: &str = "debian-bookworm";

/// The Ubuntu image (24.04 LTS), built like the default one from Ubuntu's archive.
pub const UBUNTU_IMAGE: &str = "ubuntu-noble";
