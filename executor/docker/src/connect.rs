//! Reaching the daemon: the address, the API version, and which engine answers.

use std::io;

use bollard::{API_DEFAULT_VERSION, Docker};

use crate::DockerError;
use crate::config::{DockerConfig, Engine, Host};

/// Seconds bollard waits for a response's headers. Long enough for a slow pull to start
/// answering or an ssh master to come up; streams (logs, attach) are not bound by it.
const REQUEST_TIMEOUT_SECONDS: u64 = 120;

/// A client that has negotiated its API version with the daemon.
#[derive(Debug, Clone)]
pub(crate) struct Connection {
    pub(crate) docker: Docker,
    /// Podman answers even when the `docker` driver is pointed at its socket; its quirks follow
    /// what answers, not the driver's name.
    pub(crate) is_podman: bool,
}

fn start_hint(engine: Engine) -> &'static str {
    match engine {
        Engine::Docker => ", e.g. `sudo systemctl start docker`",
        Engine::Podman => {
            ", e.g. `podman system service --time=0 &` or `systemctl start podman.socket`"
        }
    }
}

pub(crate) async fn connect(config: &DockerConfig) -> Result<Connection, DockerError> {
    let engine = config.engine;
    let driver = engine.driver_name();
    let host = config.resolve_host()?;
    if let Some(path) = host.socket_path()
        && !path.exists()
    {
        return Err(DockerError::SocketMissing {
            driver,
            path: path.to_owned(),
            start: start_hint(engine),
            env: engine.host_env(),
        });
    }
    let client = match &host {
        Host::Unix(path) => Docker::connect_with_unix(
            &path.to_string_lossy(),
            REQUEST_TIMEOUT_SECONDS,
            API_DEFAULT_VERSION,
        ),
        Host::Tcp(url) => {
            Docker::connect_with_http(url, REQUEST_TIMEOUT_SECONDS, API_DEFAULT_VERSION)
        }
        Host::Ssh(url) => {
            Docker::connect_with_ssh(url, REQUEST_TIMEOUT_SECONDS, API_DEFAULT_VERSION, None)
        }
    }
    .map_err(|source| DockerError::Client {
        driver,
        host: host.to_string(),
        source,
    })?;

    let unreachable = |source: bollard::errors::Error| match (host.socket_path(), io_kind(&source))
    {
        (Some(path), Some(io::ErrorKind::PermissionDenied)) => DockerError::SocketPermission {
            driver,
            path: path.to_owned(),
            source,
        },
        (Some(path), Some(io::ErrorKind::ConnectionRefused)) => DockerError::SocketRefused {
            driver,
            path: path.to_owned(),
            start: start_hint(engine),
            source,
        },
        _ => DockerError::Unreachable {
            driver,
            host: host.to_string(),
            source,
        },
    };
    let docker = client.negotiate_version().await.map_err(unreachable)?;
    let version = docker.version().await.map_err(unreachable)?;
    let is_podman = version
        .components
        .iter()
        .flatten()
        .any(|component| component.name.to_ascii_lowercase().contains("podman"));
    tracing::debug!(
        driver,
        %host,
        api = %docker.client_version(),
        is_podman,
        "connected"
    );
    Ok(Connection { docker, is_podman })
}

/// The kind of the first I/O error in `error`'s source chain.
fn io_kind(error: &bollard::errors::Error) -> Option<io::ErrorKind> {
    let mut current: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(error) = current {
        if let Some(io) = error.downcast_ref::<io::Error>() {
            return Some(io.kind());
        }
        current = error.source();
    }
    None
}
