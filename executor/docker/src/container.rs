use std::sync::{Arc, OnceLock};

use async_trait::async_trait;
use bollard::container::LogOutput;
use bollard::query_parameters::LogsOptionsBuilder;
use futures_util::StreamExt;
use tokio::io::AsyncWriteExt;

use std::time::Duration;

use ci_exec_driver::{Container, ContainerStatus, DriverError, FollowLogs, LogSink, wait_for_exit};

use crate::driver::{Inner, status_code};

/// A task's container, named `{namespace}-{task id}`.
#[derive(Debug)]
pub struct DockerContainer {
    inner: Arc<Inner>,
    task_id: String,
    name: String,
    /// Once exited, the code never changes: later polls cost no request.
    exit_code: OnceLock<i32>,
}

impl DockerContainer {
    pub(crate) fn new(inner: Arc<Inner>, task_id: String, name: String) -> Self {
        DockerContainer {
            inner,
            task_id,
            name,
            exit_code: OnceLock::new(),
        }
    }

    /// The container's name on the engine.
    pub fn backend_name(&self) -> &str {
        &self.name
    }

    /// Writes the container's output from the beginning, leaving out the first `skip` bytes
    /// of stdout and of stderr (already written by an earlier pass). Returns how many bytes of
    /// each stream the engine sent, skipped ones included.
    async fn write_logs(
        &self,
        follow: bool,
        skip: [u64; 2],
        stdout: LogSink<'_>,
        stderr: LogSink<'_>,
    ) -> Result<[u64; 2], DriverError> {
        let docker = self.inner.docker().await?;
        let options = LogsOptionsBuilder::new()
            .stdout(true)
            .stderr(true)
            .follow(follow)
            .build();
        let mut seen = [0u64; 2];
        let mut logs = docker.logs(&self.name, Some(options));
        while let Some(chunk) = logs.next().await {
            let chunk = chunk.map_err(|source| {
                if status_code(&source) == Some(404) {
                    self.gone()
                } else {
                    self.inner.backend(
                        format!("read the logs of container `{}`", self.name),
                        source,
                    )
                }
            })?;
            let (stream, message) = match chunk {
                LogOutput::StdOut { message } | LogOutput::Console { message } => (0, message),
                LogOutput::StdErr { message } => (1, message),
                LogOutput::StdIn { .. } => continue,
            };
            let start = seen[stream];
            seen[stream] += message.len() as u64;
            let fresh = skip[stream].saturating_sub(start).min(message.len() as u64);
            let Some(bytes) = message.get(usize::try_from(fresh).unwrap_or(usize::MAX)..) else {
                continue;
            };
            if bytes.is_empty() {
                continue;
            }
            let written = if stream == 0 {
                write_chunk(stdout, bytes, follow).await
            } else {
                write_chunk(stderr, bytes, follow).await
            };
            written.map_err(|source| self.inner.backend("write a task's output", source))?;
        }
        let flushed = match stdout.flush().await {
            Ok(()) => stderr.flush().await,
            Err(error) => Err(error),
        };
        flushed.map_err(|source| self.inner.backend("write a task's output", source))?;
        Ok(seen)
    }

    fn gone(&self) -> DriverError {
        self.inner.backend(
            format!("find container `{}`", self.name),
            "it no longer exists: it was removed by cleanup, `close` or from outside ci-exec",
        )
    }
}

/// Writes `bytes` to `sink`, flushing at once when following so the output shows live.
pub(crate) async fn write_chunk(
    sink: &mut (dyn tokio::io::AsyncWrite + Send + Unpin),
    bytes: &[u8],
    flush: bool,
) -> std::io::Result<()> {
    sink.write_all(bytes).await?;
    if flush {
        sink.flush().await?;
    }
    Ok(())
}

#[async_trait]
impl Container for DockerContainer {
    fn id(&self) -> &str {
        &self.task_id
    }

    async fn status(&self) -> Result<ContainerStatus, DriverError> {
        if let Some(code) = self.exit_code.get() {
            return Ok(ContainerStatus::Exited { code: *code });
        }
        let Some(state) = self.inner.inspect_state(&self.name).await? else {
            return Err(self.gone());
        };
        if !state.exited() {
            return Ok(ContainerStatus::Running);
        }
        let code = state
            .exit_code
            .and_then(|code| i32::try_from(code).ok())
            .unwrap_or(-1);
        Ok(ContainerStatus::Exited {
            code: *self.exit_code.get_or_init(|| code),
        })
    }

    async fn logs(&self, stdout: LogSink<'_>, stderr: LogSink<'_>) -> Result<(), DriverError> {
        self.write_logs(false, [0, 0], stdout, stderr).await?;
        Ok(())
    }

    async fn cleanup(&self) -> Result<(), DriverError> {
        self.inner.remove_container(&self.name).await
    }

    fn as_follow(&self) -> Option<&dyn FollowLogs> {
        Some(self)
    }
}

#[async_trait]
impl FollowLogs for DockerContainer {
    async fn follow(&self, stdout: LogSink<'_>, stderr: LogSink<'_>) -> Result<(), DriverError> {
        let followed = self.write_logs(true, [0, 0], stdout, stderr).await?;
        // Podman 4 may end a follow when the container exits, before the last of its output
        // was sent: once the task is done, a plain read sends whatever the follow missed.
        if self.inner.connection().await?.is_podman {
            wait_for_exit(self, Duration::from_millis(50), None).await?;
            self.write_logs(false, followed, stdout, stderr).await?;
        }
        Ok(())
    }
}
