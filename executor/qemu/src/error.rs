use std::path::PathBuf;
use std::time::Duration;

use crate::wire::MalformedJson;

/// A failure talking QMP or QGA. `peer` is `qmp` or `qga`.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("cannot connect to `{peer}` socket `{path}`")]
    Connect {
        peer: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write to `{peer}`")]
    Write {
        peer: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read from `{peer}`")]
    Read {
        peer: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("`{peer}` closed the connection")]
    Closed { peer: &'static str },
    #[error("`{peer}` did not answer `{command}` within {after:?}")]
    Timeout {
        peer: &'static str,
        command: String,
        after: Duration,
    },
    #[error("`{peer}` rejected `{command}`: {class}: {description}")]
    Command {
        peer: &'static str,
        command: String,
        class: String,
        description: String,
    },
    #[error("unexpected message from `{peer}`: {message}")]
    Unexpected { peer: &'static str, message: String },
    #[error(transparent)]
    Malformed(#[from] MalformedJson),
    #[error("field `{field}` of `guest-exec-status` is not base64")]
    Base64 {
        field: String,
        #[source]
        source: base64::DecodeError,
    },
}

/// What can go wrong in the qemu driver, one variant per failure site.
#[derive(Debug, thiserror::Error)]
pub enum QemuError {
    #[error("invalid qemu parameter `{parameter}`: {reason}")]
    InvalidParameter { parameter: String, reason: String },

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
        "guest image `{image}` not found; build it with `ci-exec image build` or set `image=` to a built image"
    )]
    ImageMissing { image: String },

    #[error("cannot load guest image `{image}`")]
    ImageLoad {
        image: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },

    #[error("qemu exited during {stage} ({status}); last console lines:\n{console}")]
    QemuExited {
        stage: &'static str,
        status: String,
        console: String,
    },

    #[error("guest did not become ready within {after:?}; last console lines:\n{console}")]
    BootTimeout { after: Duration, console: String },

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

    #[error("monitor (QMP) failed during {stage}")]
    Monitor {
        stage: String,
        #[source]
        source: ProtocolError,
    },

    #[error("guest command `{command}` failed with exit code {code}: {stderr}")]
    GuestCommand {
        command: String,
        code: i32,
        stderr: String,
    },

    #[error(
        "namespace `{namespace}` is in use by qemu pid {pid}; stop it with `ci-exec driver close --driver=qemu://{namespace}`"
    )]
    NamespaceBusy { namespace: String, pid: i32 },

    #[error(
        "namespace `{namespace}` is in use by another ci-exec driver; wait for it to finish, or stop it with `ci-exec driver close --driver=qemu://{namespace}`"
    )]
    NamespaceLocked { namespace: String },

    #[error("saving the warm VM state failed: {reason}")]
    WarmSave { reason: String },
}
