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
