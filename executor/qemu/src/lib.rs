//! The qemu driver of ci-exec: runs tasks in a local QEMU VM, one VM per driver instance.
//!
//! Each VM boots a fresh qcow2 overlay over a cached guest image (the base is never written),
//! is driven over QMP for its lifecycle and over the guest agent (QGA) for exec, and shares one
//! 9p directory with the host that holds the namespace's volumes and each task's stdin, stdout,
//! stderr and exit status, so output streams to the host while a task runs. A task without an
//! image runs in the guest OS as root; a task with one runs under podman inside the guest.
//! After the first cold boot of an image, a saved VM state lets later VMs start warm.
//!
//! It is not an image builder (`ci-exec-guest-image` makes and caches images) and holds no
//! CLI; the protocol codecs ([`qmp`], [`qga`]) work on bytes and do no I/O of their own.

pub mod accel;
mod config;
pub mod control;
pub mod doctor;
mod driver;
pub mod error;
pub mod guest;
mod image;
pub mod machine;
mod oci;
pub mod output;
pub mod qga;
pub mod qmp;
pub mod repository;
pub mod run_dir;
mod socket;
mod warm;
mod wire;

pub use config::{QemuConfig, default_run_root};
pub use driver::QemuDriver;
pub use error::{ProtocolError, QemuError};
pub use image::resolve as resolve_image;
pub use machine::AGENT_TIMEOUT;
