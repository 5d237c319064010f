//! The Virtualization framework glue, macOS only: [`vm`] drives one `VZVirtualMachine`,
//! [`driver`] implements the driver contract over it.
//!
//! Compile-checked only (clippy for `aarch64-apple-darwin` on Linux); it has not run on a Mac.

mod vm;

#[expect(unused_imports, reason = "used by the driver, next")]
pub use vm::{Vm, host_limits};

/// Stand-in until the driver lands in this module.
#[derive(Debug)]
pub struct VzDriver;
