//! The vz driver of ci-exec: runs tasks in a local Linux VM on Apple's Virtualization.framework,
//! booting the same guest as the qemu driver (our kernel and initramfs, the root disk as a raw
//! copy-on-write clone, virtiofs for the share, NAT networking) and driving it over vsock with
//! the same guest agent and control protocols the qemu driver speaks over virtio-serial.
//!
//! Everything but the framework glue is plain Rust and compiled on every OS, so it is
//! unit-tested on Linux: the configuration ([`config`], [`spec`]), the image and disk
//! preparation ([`image`], [`disk`]), the run directory and task files ([`share`]), the entitlement error ([`entitlement`]) and the vsock
//! transport ([`transport`]) and the warm-start state files ([`warm`]). The framework glue (`VzDriver`) exists only on macOS.
//!
//! It is not an image builder (`ci-exec image build --arch aarch64` makes the guest) and holds
//! no CLI.

pub mod config;
pub mod disk;
pub mod entitlement;
pub mod error;
pub mod image;
pub mod share;
pub mod spec;
pub mod transport;
pub mod warm;

#[cfg(target_os = "macos")]
mod macos;

pub use config::VzConfig;
pub use error::VzError;
#[cfg(target_os = "macos")]
pub use macos::VzDriver;
