use std::path::PathBuf;

/// Why the driver could not be set up or could not reach its daemon. Each message says how to
/// fix it; at the driver seam these become the source of a
/// [`DriverError::Backend`](ci_exec_driver::DriverError::Backend).
#[derive(Debug, thiserror::Error)]
pub enum DockerError {
    #[error("driver `{driver}` is not served by the docker crate (expected `docker` or `podman`)")]
    NotADockerDriver { driver: String },

    #[error("invalid `host` `{host}` for the `{driver}` driver: {reason}")]
    InvalidHost {
        driver: &'static str,
        host: String,
        reason: String,
    },

    #[error(
        "the `{driver}` daemon is not running: socket `{path}` does not exist (start it{start}, \
         or point `host=` / `{env}` at the right socket)"
    )]
    SocketMissing {
        driver: &'static str,
        path: PathBuf,
        start: &'static str,
        env: &'static str,
    },

    #[error(
        "the `{driver}` daemon is not running: nothing listens on socket `{path}` (start it{start})"
    )]
    SocketRefused {
        driver: &'static str,
        path: PathBuf,
        start: &'static str,
        #[source]
        source: bollard::errors::Error,
    },

    #[error(
        "permission denied on the `{driver}` socket `{path}` (run as root, add your user to the \
         socket's group, e.g. `sudo usermod -aG docker $USER` and log in again, or use a \
         rootless daemon's socket)"
    )]
    SocketPermission {
        driver: &'static str,
        path: PathBuf,
        #[source]
        source: bollard::errors::Error,
    },

    #[error("cannot create a client for the `{driver}` daemon at `{host}`")]
    Client {
        driver: &'static str,
        host: String,
        #[source]
        source: bollard::errors::Error,
    },

    #[error("cannot reach the `{driver}` daemon at `{host}`")]
    Unreachable {
        driver: &'static str,
        host: String,
        #[source]
        source: bollard::errors::Error,
    },
}

/// What went wrong in an engine's answer or in a container's life, when no error of the
/// engine's client says it: the source of a [`DriverError::Backend`](ci_exec_driver::DriverError::Backend)
/// whose action names what the driver was doing.
#[derive(Debug, thiserror::Error)]
pub enum EngineProblem {
    #[error(
        "its container `{container}` was stopped from outside ci-exec (a `kill`{signal} through \
         the engine, as {commands} send)"
    )]
    StoppedFromOutside {
        container: String,
        /// ` with signal SIGKILL`, or empty when the engine did not say.
        signal: String,
        commands: &'static str,
    },

    #[error("the daemon ended the answer without an exit code")]
    NoExitCode,

    #[error("its output ended but the daemon reported no exit code within {after:?}")]
    ExitCodeLate { after: std::time::Duration },

    #[error("it no longer exists: it was removed by cleanup, `close` or from outside ci-exec")]
    ContainerGone,

    #[error("the daemon's answer is not {expected}: {contents}")]
    UnexpectedAnswer {
        expected: &'static str,
        contents: String,
    },

    #[error(
        "it exists but is not labelled `{label}={namespace}`; remove it or use another namespace"
    )]
    NotInNamespace {
        label: &'static str,
        namespace: String,
    },

    #[error("it was removed while this run looked it up")]
    RemovedDuringLookup,

    #[error("the engine reported no image id")]
    NoImageId,

    #[error(
        "the OCI runtime could not grant the capabilities of a privileged container (Docker \
         grants every capability the kernel knows, and the daemon's host lacks some, as in a \
         nested container or a sandboxed VM); run the task unprivileged, or on podman, which \
         grants the capabilities it has ({message})"
    )]
    CapabilitiesRefused { message: String },

    #[error(
        "the sandbox container stopped or was removed while the command ran (killed from \
         outside ci-exec?); it has been cleaned up"
    )]
    SandboxLost,

    #[error("the daemon started the exec detached")]
    ExecDetached,

    #[error("a container of that name exists already")]
    NameTaken,
}
