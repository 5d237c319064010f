use std::path::{Path, PathBuf};

use crate::DockerError;

/// The image tasks run in when they name none.
///
/// A container engine has no "host OS" to fall back to, so an image-less task runs in a plain
/// Debian: the same distribution the qemu driver's guest runs, so a repository's
/// `prepare-runtime` (which installs with `apt-get`) works the same on both. Override it with
/// the `image` DSN parameter or `CI_EXEC_DOCKER_IMAGE`; CI points it at the image that
/// `.ci/setup-docker.sh` imports from a tarball, since no registry is reachable there.
pub const DEFAULT_IMAGE: &str = "docker.io/library/debian:bookworm-slim";

/// Environment variable naming the default image when the DSN does not.
pub const IMAGE_ENV: &str = "CI_EXEC_DOCKER_IMAGE";

/// Which engine sits behind the socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    Docker,
    Podman,
}

impl Engine {
    /// The driver name, as written in a DSN.
    pub fn driver_name(self) -> &'static str {
        match self {
            Engine::Docker => "docker",
            Engine::Podman => "podman",
        }
    }

    /// The environment variable that names the daemon when the DSN does not.
    pub fn host_env(self) -> &'static str {
        match self {
            Engine::Docker => "DOCKER_HOST",
            Engine::Podman => "CONTAINER_HOST",
        }
    }

    /// The daemon address used when neither the DSN nor the environment gives one.
    pub fn default_host(self) -> String {
        match self {
            Engine::Docker => "unix:///var/run/docker.sock".to_owned(),
            Engine::Podman => {
                // Rootless podman listens under the user's runtime dir; rootful podman (and
                // the root user) under /run/podman.
                let rootless = std::env::var_os("XDG_RUNTIME_DIR")
                    .map(|dir| PathBuf::from(dir).join("podman/podman.sock"))
                    .filter(|socket| socket.exists());
                match rootless {
                    Some(socket) => format!("unix://{}", socket.display()),
                    None => "unix:///run/podman/podman.sock".to_owned(),
                }
            }
        }
    }
}

/// Where the daemon listens, parsed from `host=`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Host {
    Unix(PathBuf),
    /// `tcp://host:port` or `http://host:port`, kept as given.
    Tcp(String),
    /// `ssh://[user@]host[:port]`, kept as given.
    Ssh(String),
}

impl Host {
    pub(crate) fn parse(engine: Engine, host: &str) -> Result<Host, DockerError> {
        let invalid = |reason: &str| DockerError::InvalidHost {
            driver: engine.driver_name(),
            host: host.to_owned(),
            reason: reason.to_owned(),
        };
        let Some((scheme, rest)) = host.split_once("://") else {
            return Err(invalid(
                "expected `unix:///path/to.sock`, `tcp://host:port` or `ssh://[user@]host[:port]`",
            ));
        };
        match scheme {
            "unix" => {
                if !rest.starts_with('/') {
                    return Err(invalid("the socket path must be absolute"));
                }
                Ok(Host::Unix(PathBuf::from(rest)))
            }
            "tcp" | "http" => {
                let authority = rest.trim_end_matches('/');
                let Some((name, port)) = authority.rsplit_once(':') else {
                    return Err(invalid("a tcp host needs a port, as in `tcp://host:2375`"));
                };
                if name.is_empty() || authority.contains('/') {
                    return Err(invalid("expected `tcp://host:port`"));
                }
                if port.parse::<u16>().is_err() {
                    return Err(invalid("the port is not a number from 1 to 65535"));
                }
                Ok(Host::Tcp(format!("tcp://{authority}")))
            }
            "ssh" => {
                let authority = rest.trim_end_matches('/');
                let machine = authority.rsplit_once('@').map_or(authority, |(_, m)| m);
                if machine.is_empty() || machine.starts_with(':') {
                    return Err(invalid("expected `ssh://[user@]host[:port]`"));
                }
                if authority.contains('/') {
                    return Err(invalid(
                        "a socket path after the ssh host is not supported: the remote side \
                         runs `docker system dial-stdio`, which finds its own socket",
                    ));
                }
                if let Some((host, port)) = machine.rsplit_once(':') {
                    match port.parse::<u16>() {
                        Err(_) => {
                            return Err(invalid("the ssh port is not a number from 1 to 65535"));
                        }
                        // bollard hands ssh `user@host:port` whole, which ssh reads as a host
                        // name: port 22 is dropped, any other must come from ssh's config.
                        Ok(22) => {
                            let user = authority.rsplit_once('@').map(|(user, _)| user);
                            return Ok(Host::Ssh(match user {
                                Some(user) => format!("ssh://{user}@{host}"),
                                None => format!("ssh://{host}"),
                            }));
                        }
                        Ok(_) => {
                            return Err(invalid(&format!(
                                "an ssh port other than 22 cannot be given here: add `Host \
                                 {host}` with `Port {port}` to ~/.ssh/config and use \
                                 `ssh://[user@]{host}`"
                            )));
                        }
                    }
                }
                Ok(Host::Ssh(format!("ssh://{authority}")))
            }
            "https" => Err(invalid(
                "TLS hosts are not supported; reach a remote daemon over `ssh://` instead",
            )),
            _ => Err(invalid(
                "unknown scheme; expected `unix://`, `tcp://` or `ssh://`",
            )),
        }
    }

    pub(crate) fn socket_path(&self) -> Option<&Path> {
        match self {
            Host::Unix(path) => Some(path),
            _ => None,
        }
    }
}

impl std::fmt::Display for Host {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Host::Unix(path) => write!(f, "unix://{}", path.display()),
            Host::Tcp(url) | Host::Ssh(url) => f.write_str(url),
        }
    }
}

/// Everything a [`DockerDriver`](crate::DockerDriver) needs, resolved.
#[derive(Debug, Clone)]
pub struct DockerConfig {
    pub engine: Engine,
    pub namespace: String,
    /// Daemon address; `None` uses the engine's environment variable, then its local socket.
    pub host: Option<String>,
    /// The image of tasks that name none (see [`DEFAULT_IMAGE`]).
    pub image: String,
    /// The namespace was generated for this driver (no `NAME://NAMESPACE` in the DSN), so
    /// nothing else holds resources in it: `close` removes what this driver made without
    /// listing the engine's containers and volumes (two requests, each up to a second on a
    /// loaded podman). A named namespace is always listed, as other runs may share it.
    pub namespace_generated: bool,
    /// The private key for an `ssh://` host, instead of the user's ssh agent and config (the
    /// cloud drivers' per-server key).
    pub ssh_identity: Option<PathBuf>,
}

impl DockerConfig {
    /// A config for `engine` in `namespace`, with the host and image from the environment.
    pub fn new(engine: Engine, namespace: impl Into<String>) -> Self {
        DockerConfig {
            engine,
            namespace: namespace.into(),
            host: None,
            image: std::env::var(IMAGE_ENV)
                .ok()
                .filter(|image| !image.is_empty())
                .unwrap_or_else(|| DEFAULT_IMAGE.to_owned()),
            namespace_generated: false,
            ssh_identity: None,
        }
    }

    /// Uses the private key at `path` for an `ssh://` host.
    pub fn ssh_identity(mut self, path: impl Into<PathBuf>) -> Self {
        self.ssh_identity = Some(path.into());
        self
    }

    pub fn host(mut self, host: impl Into<String>) -> Self {
        self.host = Some(host.into());
        self
    }

    pub fn image(mut self, image: impl Into<String>) -> Self {
        self.image = image.into();
        self
    }

    /// Marks the namespace as generated for this driver (see [`Self::namespace_generated`]).
    pub fn namespace_generated(mut self, generated: bool) -> Self {
        self.namespace_generated = generated;
        self
    }

    /// From a parsed `--driver=docker…` or `--driver=podman…` DSN: `host` (which the DSN
    /// layer already fell back to `DOCKER_HOST` / `CONTAINER_HOST` for) and `image`.
    pub fn from_driver_config(config: &ci_exec_driver::DriverConfig) -> Result<Self, DockerError> {
        let engine = match config.driver.as_str() {
            "docker" => Engine::Docker,
            "podman" => Engine::Podman,
            other => {
                return Err(DockerError::NotADockerDriver {
                    driver: other.to_owned(),
                });
            }
        };
        let mut docker = DockerConfig::new(engine, config.namespace.clone());
        docker.namespace_generated = !config.namespace_given;
        if let Some(host) = config.str("host").filter(|host| !host.is_empty()) {
            docker.host = Some(host.to_owned());
        }
        if let Some(image) = config.str("image").filter(|image| !image.is_empty()) {
            docker.image = image.to_owned();
        }
        // A malformed `host=` (or DOCKER_HOST) is the user's input: say so before connecting.
        docker.resolve_host()?;
        Ok(docker)
    }

    /// The address to connect to: `host`, else the engine's environment variable, else the
    /// engine's local socket.
    pub(crate) fn resolve_host(&self) -> Result<Host, DockerError> {
        let host = match &self.host {
            Some(host) => host.clone(),
            None => std::env::var(self.engine.host_env())
                .ok()
                .filter(|host| !host.is_empty())
                .unwrap_or_else(|| self.engine.default_host()),
        };
        Host::parse(self.engine, &host)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_parse_or_name_the_problem() {
        let cases: &[(&str, Result<Host, &str>)] = &[
            (
                "unix:///run/docker.sock",
                Ok(Host::Unix("/run/docker.sock".into())),
            ),
            ("unix://run/docker.sock", Err("must be absolute")),
            (
                "tcp://10.0.0.1:2375",
                Ok(Host::Tcp("tcp://10.0.0.1:2375".into())),
            ),
            ("http://box:2375/", Ok(Host::Tcp("tcp://box:2375".into()))),
            ("tcp://box", Err("needs a port")),
            ("tcp://box:99999", Err("port is not a number")),
            ("ssh://me@box:22", Ok(Host::Ssh("ssh://me@box".into()))),
            ("ssh://box:22", Ok(Host::Ssh("ssh://box".into()))),
            (
                "ssh://me@box:2222",
                Err("`Host box` with `Port 2222` to ~/.ssh/config"),
            ),
            ("ssh://box", Ok(Host::Ssh("ssh://box".into()))),
            ("ssh://me@", Err("expected `ssh://")),
            ("ssh://me@box:x", Err("ssh port")),
            ("ssh://box/run/podman.sock", Err("socket path")),
            ("https://box:2376", Err("TLS")),
            ("/var/run/docker.sock", Err("expected `unix:///")),
            ("ftp://box", Err("unknown scheme")),
        ];
        for (input, expected) in cases {
            let parsed = Host::parse(Engine::Docker, input);
            match (parsed, expected) {
                (Ok(host), Ok(want)) => assert_eq!(&host, want, "{input}"),
                (Err(error), Err(fragment)) => {
                    let message = error.to_string();
                    assert!(message.contains(fragment), "{input}: {message}");
                    assert!(message.contains(&format!("`{input}`")), "{message}");
                }
                (got, want) => panic!("{input}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn explicit_host_beats_the_environment() {
        let config = DockerConfig::new(Engine::Podman, "ns").host("tcp://box:8080");
        assert_eq!(
            config.resolve_host().unwrap(),
            Host::Tcp("tcp://box:8080".into())
        );
    }
}
