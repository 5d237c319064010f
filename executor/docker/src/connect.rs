//! Reaching the daemon: the address, and which engine answers.

use std::io;

use bollard::{API_DEFAULT_VERSION, Docker};

use crate::DockerError;
use crate::config::{DockerConfig, Engine, Host};

/// Seconds bollard waits for a response's headers. Long enough for a slow pull to start
/// answering or an ssh master to come up; streams (logs, attach) are not bound by it.
const REQUEST_TIMEOUT_SECONDS: u64 = 120;

/// A client whose daemon has answered.
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
        Host::Ssh(url) => Docker::connect_with_ssh(
            url,
            REQUEST_TIMEOUT_SECONDS,
            API_DEFAULT_VERSION,
            config
                .ssh_identity
                .as_ref()
                .map(|path| path.to_string_lossy().into_owned()),
        ),
    }
    .map_err(|source| DockerError::Client {
        driver,
        host: host.to_string(),
        source,
    })?;

    let connection = probe(client)
        .await
        .map_err(|source| unreachable(engine, &host, source))?;
    tracing::debug!(driver, %host, is_podman = connection.is_podman, "connected");
    Ok(connection)
}

/// One request that both proves the daemon answers and says which engine it is: podman
/// serves `/libpod/_ping`, Docker answers it with 404.
///
/// Not `/version`: podman 4 answers that in ~0.7 s (it asks its OCI runtime and conmon for
/// their versions), the largest cost of a short `ci-exec run` on podman. Nor an API version
/// negotiation: bollard 0.21 sends unversioned paths (it joins the absolute request path onto
/// its `/vX.Y` base, which drops the prefix), so the daemon answers in its own current API
/// version whatever the client's is set to, and negotiating would only add a `/version`.
async fn probe(docker: Docker) -> Result<Connection, bollard::errors::Error> {
    let libpod = rewriting(&docker, |uri| {
        uri.strip_suffix("/_ping")
            .map(|base| format!("{base}/libpod/_ping"))
    });
    let is_podman = match libpod.ping().await {
        Ok(_) => true,
        Err(error) if crate::driver::status_code(&error) == Some(404) => false,
        Err(error) => return Err(error),
    };
    Ok(Connection { docker, is_podman })
}

/// A copy of `docker` whose requests go to the URI `rewrite` makes of theirs (where it makes
/// one), for what bollard has no call or parameter for. bollard's documented request hook does
/// the rewriting; only the copy has it.
pub(crate) fn rewriting(
    docker: &Docker,
    rewrite: impl Fn(&str) -> Option<String> + Send + Sync + 'static,
) -> Docker {
    docker.clone().with_request_modifier(move |mut request| {
        if let Some(uri) = rewrite(&request.uri().to_string())
            && let Ok(uri) = uri.parse()
        {
            *request.uri_mut() = uri;
        }
        request
    })
}

/// Why the daemon at `host` did not answer, in words that say how to fix it.
fn unreachable(engine: Engine, host: &Host, source: bollard::errors::Error) -> DockerError {
    let driver = engine.driver_name();
    match (host.socket_path(), io_kind(&source)) {
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
    }
}

/// The kind of the first I/O error in `error`'s source chain.
fn io_kind(error: &bollard::errors::Error) -> Option<io::ErrorKind> {
    // bollard's `IOError` is `#[error(transparent)]`: its `source()` skips the I/O error.
    if let bollard::errors::Error::IOError { err } = error {
        return Some(err.kind());
    }
    let mut current: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(error) = current {
        if let Some(io) = error.downcast_ref::<io::Error>() {
            return Some(io.kind());
        }
        current = error.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Root connects to any socket whatever its mode, so the engine tests cannot provoke
    /// this; the mapping from the I/O error is what decides the message.
    #[test]
    fn permission_denied_and_refused_sockets_say_which_and_how_to_fix() {
        let host = Host::Unix("/run/docker.sock".into());
        let io_error = |kind| bollard::errors::Error::IOError {
            err: io::Error::from(kind),
        };
        let denied = unreachable(
            Engine::Docker,
            &host,
            io_error(io::ErrorKind::PermissionDenied),
        );
        assert!(matches!(denied, DockerError::SocketPermission { .. }));
        let message = denied.to_string();
        assert!(message.starts_with("permission denied on the `docker` socket `/run/docker.sock`"));
        assert!(message.contains("usermod -aG docker"), "{message}");

        let refused = unreachable(
            Engine::Podman,
            &host,
            io_error(io::ErrorKind::ConnectionRefused),
        );
        let message = refused.to_string();
        assert!(message.contains("daemon is not running"), "{message}");
        assert!(message.contains("podman system service"), "{message}");

        let other = unreachable(
            Engine::Docker,
            &Host::Tcp("tcp://box:2375".into()),
            io_error(io::ErrorKind::PermissionDenied),
        );
        assert!(matches!(other, DockerError::Unreachable { .. }), "{other}");
    }
}
