//! [`VzError`]: what can go wrong in the vz driver, one variant per failure site.

use std::path::PathBuf;
use std::time::Duration;

use ci_exec_qemu::ProtocolError;

use crate::entitlement;

#[derive(Debug, thiserror::Error)]
pub enum VzError {
    #[error("invalid vz parameter `{parameter}`: {reason}")]
    InvalidParameter { parameter: String, reason: String },

    #[error(
        "guest image `{image}` not found; build it with `ci-exec image build --arch aarch64` or set `image=` to a built aarch64 image"
    )]
    ImageMissing { image: String },

    #[error("cannot load guest image `{image}`")]
    ImageLoad {
        image: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },

    #[error(
        "guest image `{image}` is built for `{arch}`, and vz boots only aarch64 guests; build one with `ci-exec image build --arch aarch64`"
    )]
    WrongArch { image: String, arch: String },

    #[error("{what} `{path}` of the vz VM is missing")]
    FileMissing { what: &'static str, path: PathBuf },

    #[error(
        "`qemu-img` not found (it converts the guest image's qcow2 disk to raw, once per image); install it with `brew install qemu`"
    )]
    QemuImgMissing,

    #[error("cannot run `{program}`")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },

    #[error("`{program}` failed ({status}): {stderr}")]
    ToolFailed {
        program: String,
        status: String,
        stderr: String,
    },

    #[error(
        "raw disk `{path}` has {actual} bytes where the image's disk has {expected}; it was removed"
    )]
    DiskSize {
        path: PathBuf,
        expected: u64,
        actual: u64,
    },

    #[error("cannot create `{path}`")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("cannot write `{path}`")]
    WriteFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("cannot read `{path}`")]
    ReadFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("cannot remove `{path}`")]
    Remove {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("cannot clone `{from}` to `{to}`")]
    Clone {
        from: PathBuf,
        to: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error(
        "this binary lacks the `{}` entitlement that Apple's Virtualization framework requires; sign it with `mk sign`",
        entitlement::ENTITLEMENT
    )]
    MissingEntitlement,

    #[error("Virtualization framework failed to {action}: {message}")]
    Framework { action: String, message: String },

    #[error("guest agent failed during {stage}")]
    Agent {
        stage: String,
        #[source]
        source: ProtocolError,
    },

    #[error("guest control port failed during {stage}")]
    Control {
        stage: String,
        #[source]
        source: ProtocolError,
    },

    #[error("guest did not become ready within {after:?}; last console lines:\n{console}")]
    BootTimeout { after: Duration, console: String },

    #[error("VM stopped during {stage}; last console lines:\n{console}")]
    Stopped { stage: String, console: String },

    #[error("guest command `{command}` failed with exit code {code}: {stderr}")]
    GuestCommand {
        command: String,
        code: i32,
        stderr: String,
    },

    #[error(
        "namespace `{namespace}` is in use by another ci-exec driver; wait for it to finish, or stop it with `ci-exec driver close --driver=vz://{namespace}`"
    )]
    NamespaceLocked { namespace: String },
}
