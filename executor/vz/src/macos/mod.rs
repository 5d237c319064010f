//! The Virtualization framework glue, macOS only: [`vm`] drives one `VZVirtualMachine`,
//! [`driver`] implements the driver contract over it.
//!
//! Compile-checked only (clippy for `aarch64-apple-darwin` on Linux); it has not run on a Mac.

mod driver;
mod vm;

pub use driver::VzDriver;
