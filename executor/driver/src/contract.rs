use std::collections::BTreeMap;
use std::fmt::Debug;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tokio::io::AsyncWrite;

use crate::{DriverError, Task};

/// Where a driver writes a task's output: any async byte sink (our stdout, a file, a buffer).
pub type LogSink<'a> = &'a mut (dyn AsyncWrite + Send + Unpin);

/// A backend that runs tasks in one namespace.
///
/// Object-safe: the CLI and the job flow only ever hold a `Box<dyn Driver>`.
#[async_trait]
pub trait Driver: Send + Sync + Debug {
    /// The driver kind, as written in a DSN (`native`, `qemu`, `docker`, …).
    fn name(&self) -> &'static str;

    /// The namespace every resource of this driver is named and labelled with.
    fn namespace(&self) -> &str;

    /// Creates volume `name` in the namespace, or returns the existing one.
    /// `size_bytes` is a hint; zero means the backend's default.
    async fn create_volume(
        &self,
        name: &str,
        size_bytes: u64,
    ) -> Result<Box<dyn Volume>, DriverError>;

    /// Starts `task` and returns at once. If a container for `task.id` already exists in the
    /// namespace (running or exited), returns it instead of starting another.
    /// Volumes named in `task.mounts` are created on demand.
    async fn run_container(&self, task: Task) -> Result<Box<dyn Container>, DriverError>;

    /// Removes every container and volume of the namespace, including leftovers of a crashed
    /// run. Idempotent; a partial failure is logged and cleanup carries on, then the first
    /// error is returned.
    async fn close(&self) -> Result<(), DriverError>;

    /// Identifies the environment tasks with an empty image run in — the guest image digest
    /// for VM drivers, the base image's id for container engines, an identity of the host for
    /// host processes — so a result recorded in one is never replayed for another. It is an
    /// input of every result key, so each driver must say what it is.
    async fn environment_digest(&self) -> Result<String, DriverError>;

    /// How the job flow (`ci-exec test`) uses this driver: where `mk` comes from in the base
    /// OS, where `mk test` runs, which test image is the default.
    fn job_support(&self) -> JobSupport;

    /// Reading files back out of a volume, if this driver can.
    fn as_volume_files(&self) -> Option<&dyn VolumeFiles> {
        None
    }

    /// Exec in a long-lived sandbox, if this driver can.
    fn as_sandbox(&self) -> Option<&dyn SandboxExec> {
        None
    }

    /// A per-repository warm state of the base OS, if this driver keeps one.
    fn as_repository_state(&self) -> Option<&dyn RepositoryState> {
        None
    }
}

/// Optional: what a repository's base-OS steps built (a container engine's images and layer
/// cache) kept after a successful job and given to the next job of the same repository, as
/// seed `002_…`'s per-repository snapshot. Keyed by repository and base environment, never
/// shared between repositories.
#[async_trait]
pub trait RepositoryState: Send + Sync {
    /// Before the first task: start from the saved state of repository `key`, or from nothing
    /// when `fresh` or when none is saved.
    fn use_state(&self, key: &str, fresh: bool) -> Result<(), DriverError>;

    /// After a successful job: keep what the base OS holds now as `key`'s state (saved when
    /// the driver closes). Without this call the run's changes are dropped.
    async fn keep_state(&self) -> Result<(), DriverError>;
}

/// Where the base OS of a driver (the OS of image-less tasks) gets our `mk`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MkSource {
    /// The base OS carries it (our guest images put the static `mk` on the `PATH`).
    BaseOs,
    /// The job uploads our static `mk` (a stock container image has none).
    Upload,
    /// The base OS is this host: the job puts the `mk` built beside `ci-exec` on the `PATH`.
    Host,
}

/// What the job flow needs to know of a driver, declared by the driver itself so that the
/// flow and the CLI never branch on a driver's name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobSupport {
    pub mk: MkSource,
    /// `mk test` runs in the test image (`CONTAINERIMAGE`) as a task with that image; when
    /// false it runs in the base OS (host processes have no container runtime).
    pub test_in_container: bool,
    /// The test image when the mkfile names none; empty means the driver's own default image
    /// (the one image-less tasks run in).
    pub default_test_image: String,
    /// Image-less tasks share one machine-wide `/var/run/ci` (host processes): the flow gives
    /// each of its steps a private one.
    pub shares_host_run_dir: bool,
}

/// A started task.
#[async_trait]
pub trait Container: Send + Sync + Debug {
    /// The task id this container runs.
    fn id(&self) -> &str;

    /// The current state; cheap enough to poll. Works after exit.
    async fn status(&self) -> Result<ContainerStatus, DriverError>;

    /// Writes everything the task has written so far, from the beginning, stdout to `stdout`
    /// and stderr to `stderr`, byte-exact. Works after exit and gives the same bytes each time.
    async fn logs(&self, stdout: LogSink<'_>, stderr: LogSink<'_>) -> Result<(), DriverError>;

    /// Stops the task if it runs and removes the container. Idempotent.
    async fn cleanup(&self) -> Result<(), DriverError>;

    /// Live log streaming, if this driver can.
    fn as_follow(&self) -> Option<&dyn FollowLogs> {
        None
    }
}

/// A named volume of the namespace, shared by the tasks that mount it.
#[async_trait]
pub trait Volume: Send + Sync + Debug {
    /// The name the volume was created with (not the namespaced backend name).
    fn name(&self) -> &str;

    /// Deletes the volume and its contents. Idempotent.
    async fn cleanup(&self) -> Result<(), DriverError>;
}

/// Optional: stream a container's output while it runs.
#[async_trait]
pub trait FollowLogs: Send + Sync {
    /// Writes the output from the beginning and keeps writing as the task produces more;
    /// returns promptly once the task has exited and all output was written.
    async fn follow(&self, stdout: LogSink<'_>, stderr: LogSink<'_>) -> Result<(), DriverError>;
}

/// Optional: read files back out of a volume of the namespace.
#[async_trait]
pub trait VolumeFiles: Send + Sync {
    /// Reads `path` (relative to the volume's root; `..` is rejected) from volume `volume`.
    async fn read_file(&self, volume: &str, path: &str) -> Result<Vec<u8>, DriverError>;
}

/// `path` as [`VolumeFiles::read_file`] takes it: relative to the volume's root, never empty,
/// without `..` or a root; anything else is the caller's error, naming the volume.
pub fn volume_relative_path<'a>(
    volume: &str,
    path: &'a str,
) -> Result<&'a std::path::Path, DriverError> {
    use std::path::{Component, Path};
    let relative = Path::new(path);
    if relative.as_os_str().is_empty()
        || !relative
            .components()
            .all(|component| matches!(component, Component::Normal(_) | Component::CurDir))
    {
        return Err(DriverError::InvalidVolume {
            volume: volume.to_owned(),
            reason: format!("path `{path}` must be relative to the volume's root, without `..`"),
        });
    }
    Ok(relative)
}

/// Optional: a long-lived environment (same image, mounts and env as `task`) in which commands
/// run one after another, as the job flow does with its mk steps.
#[async_trait]
pub trait SandboxExec: Send + Sync {
    async fn start_sandbox(&self, task: Task) -> Result<Box<dyn Sandbox>, DriverError>;
}

#[async_trait]
pub trait Sandbox: Send + Sync + Debug {
    /// Runs `command` to completion with `env` added to the sandbox's, streaming its output
    /// to the sinks while it runs.
    async fn exec(
        &self,
        command: &[String],
        env: &BTreeMap<String, String>,
        stdout: LogSink<'_>,
        stderr: LogSink<'_>,
    ) -> Result<SandboxOutput, DriverError>;

    /// Removes the sandbox. Idempotent.
    async fn cleanup(&self) -> Result<(), DriverError>;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SandboxOutput {
    pub exit_code: i32,
}

/// What `Container::status` reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContainerStatus {
    Running,
    /// The task ended; a task killed by signal `n` exits with `128 + n`, as a shell reports it.
    Exited {
        code: i32,
    },
}

impl ContainerStatus {
    pub fn is_done(&self) -> bool {
        matches!(self, ContainerStatus::Exited { .. })
    }

    /// The exit code, once done.
    pub fn exit_code(&self) -> Option<i32> {
        match self {
            ContainerStatus::Running => None,
            ContainerStatus::Exited { code } => Some(*code),
        }
    }
}

/// Polls `container` until it is done, backing off from 1 ms to `max_interval`, and returns
/// its exit code. Gives up with [`DriverError::Timeout`] after `timeout`, if one is given.
pub async fn wait_for_exit(
    container: &dyn Container,
    max_interval: Duration,
    timeout: Option<Duration>,
) -> Result<i32, DriverError> {
    let start = Instant::now();
    let mut interval = Duration::from_millis(1);
    loop {
        if let ContainerStatus::Exited { code } = container.status().await? {
            return Ok(code);
        }
        if let Some(timeout) = timeout
            && start.elapsed() > timeout
        {
            return Err(DriverError::Timeout {
                task: container.id().to_owned(),
                after: timeout,
            });
        }
        tokio::time::sleep(interval).await;
        interval = (interval * 2).min(max_interval);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn volume_paths_stay_inside_the_volume() {
        assert_eq!(
            volume_relative_path("v", "a/./b.txt").expect("relative"),
            std::path::Path::new("a/./b.txt")
        );
        for bad in ["", "/etc/passwd", "../x", "a/../../x"] {
            let error = volume_relative_path("cache", bad).expect_err(bad);
            assert!(error.to_string().contains("cache"), "{error}");
        }
    }
}
