use std::collections::BTreeMap;
use std::fmt;
use std::sync::Mutex;

use bytes::Bytes;
use tokio::io::AsyncRead;

#[cfg(test)]
mod tests {
    use super::Mount;

    #[test]
    fn mount_paths_follow_one_rule() {
        let check = |path: &str| {
            Mount {
                volume: "v".into(),
                path: path.into(),
            }
            .check("t")
            .is_ok()
        };
        for good in ["/data", "/var/run/ci", "/a.b/c-d"] {
            assert!(check(good), "{good}");
        }
        for bad in [
            "", "/", ".", "data", "./data", "/data/", "//data", "/a/../b", "/a/./b", "/..",
        ] {
            assert!(!check(bad), "{bad}");
        }
    }
}

/// One unit of work for a driver: a command in an image (or in the driver's own OS when
/// `image` is empty), with its environment, volumes, limits and input.
///
/// Only the variables in `env` reach the command. A driver adds a default `PATH` when `env`
/// has none, and nothing else from the host.
#[derive(Debug, Default)]
pub struct Task {
    /// Unique per namespace; running the same id twice returns the first container.
    pub id: String,
    /// Container image, or empty for the driver's own OS (host processes, the guest OS).
    pub image: String,
    /// argv; `command[0]` is looked up on the task's `PATH`.
    pub command: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub mounts: Vec<Mount>,
    pub limits: Limits,
    pub privileged: bool,
    pub stdin: Option<Stdin>,
    /// User to run as (`name`, `uid` or `uid:gid`); `None` keeps the driver's default.
    pub user: Option<String>,
    /// Working directory of the command; `None` keeps the driver's default.
    pub workdir: Option<String>,
    /// Whether the task may reach the network: `Some(false)` runs it with none (only a
    /// loopback), `Some(true)` with the outbound network the driver offers (an error where
    /// it offers none), `None` keeps the driver's default.
    pub network: Option<bool>,
}

impl Task {
    pub fn new(
        id: impl Into<String>,
        command: impl IntoIterator<Item = impl Into<String>>,
    ) -> Self {
        Task {
            id: id.into(),
            command: command.into_iter().map(Into::into).collect(),
            ..Task::default()
        }
    }

    pub fn image(mut self, image: impl Into<String>) -> Self {
        self.image = image.into();
        self
    }

    pub fn env(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.insert(name.into(), value.into());
        self
    }

    pub fn mount(mut self, volume: impl Into<String>, path: impl Into<String>) -> Self {
        self.mounts.push(Mount {
            volume: volume.into(),
            path: path.into(),
        });
        self
    }

    pub fn stdin(mut self, stdin: Stdin) -> Self {
        self.stdin = Some(stdin);
        self
    }

    pub fn workdir(mut self, workdir: impl Into<String>) -> Self {
        self.workdir = Some(workdir.into());
        self
    }

    pub fn user(mut self, user: impl Into<String>) -> Self {
        self.user = Some(user.into());
        self
    }

    pub fn network(mut self, online: bool) -> Self {
        self.network = Some(online);
        self
    }
}

/// A volume mounted into a task: the volume `volume` (created on demand in the task's
/// namespace) appears at `path`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    pub volume: String,
    pub path: String,
}

impl Mount {
    /// The one rule for mount paths, the same on every driver: absolute, below `/`, and made
    /// of plain names (no empty, `.` or `..` component), so `/data` means the same place
    /// wherever a task runs (a container path, a guest path, `./data` for host processes).
    pub fn check(&self, task: &str) -> Result<(), crate::DriverError> {
        let plain = self.path.strip_prefix('/').is_some_and(|relative| {
            !relative.is_empty()
                && relative
                    .split('/')
                    .all(|part| !part.is_empty() && part != "." && part != "..")
        });
        if plain {
            Ok(())
        } else {
            Err(crate::DriverError::InvalidTask {
                task: task.to_owned(),
                reason: format!(
                    "mount path `{}` of volume `{}` must be an absolute path of plain names, such as `/data`",
                    self.path, self.volume
                ),
            })
        }
    }
}

/// Resource limits; zero means unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    /// Relative CPU weight as Docker's `--cpu-shares` (1024 = one full share).
    pub cpu_shares: u64,
    pub memory_bytes: u64,
}

/// A task's standard input: fixed bytes, or a stream forwarded as it arrives (`ci-exec run -i`).
///
/// A stream can be consumed once; a second `run_container` with the same task id returns the
/// existing container and never reads it.
pub enum Stdin {
    Bytes(Bytes),
    Stream(Mutex<Option<Box<dyn AsyncRead + Send + Unpin>>>),
}

impl Stdin {
    pub fn bytes(bytes: impl Into<Bytes>) -> Self {
        Stdin::Bytes(bytes.into())
    }

    pub fn stream(reader: impl AsyncRead + Send + Unpin + 'static) -> Self {
        Stdin::Stream(Mutex::new(Some(Box::new(reader))))
    }

    /// Takes the input as a reader. Returns `None` when a stream was already taken.
    pub fn take_reader(&self) -> Option<Box<dyn AsyncRead + Send + Unpin>> {
        match self {
            Stdin::Bytes(bytes) => Some(Box::new(std::io::Cursor::new(bytes.clone()))),
            Stdin::Stream(slot) => slot.lock().ok().and_then(|mut slot| slot.take()),
        }
    }
}

impl fmt::Debug for Stdin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Stdin::Bytes(bytes) => write!(f, "Stdin::Bytes({} bytes)", bytes.len()),
            Stdin::Stream(_) => f.write_str("Stdin::Stream"),
        }
    }
}
