use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bollard::container::LogOutput;
use bollard::exec::{CreateExecOptions, StartExecResults};
use futures_util::StreamExt;

use ci_exec_driver::{
    DriverError, LogSink, Sandbox, SandboxExec, SandboxOutput, Task, resource_name,
};

use crate::container::write_chunk;
use crate::driver::{Inner, Role, status_code, validate_name};
use crate::{DockerDriver, EngineProblem};

/// The sandbox's main process: idles until the container is removed. A `sleep` in a loop
/// rather than `sleep infinity`, which busybox and older coreutils lack; `exec`s run beside it.
const KEEP_ALIVE: &str = "trap 'exit 0' TERM INT; while :; do sleep 3600 & wait $!; done";

/// How long the daemon may take to record an exec's exit code after its output ended.
const EXIT_CODE_DEADLINE: Duration = Duration::from_secs(10);

/// How long a signal-killed command's container may take to show as stopped.
const SETTLE_DEADLINE: Duration = Duration::from_secs(2);

/// A long-lived container (same image, env, mounts, limits and user as the task it was
/// started from) that commands are `exec`ed into one after another, as the job flow runs its
/// mk steps.
#[derive(Debug)]
pub struct DockerSandbox {
    inner: Arc<Inner>,
    name: String,
    user: Option<String>,
    workdir: Option<String>,
}

impl DockerSandbox {
    /// The container's name on the engine.
    pub fn backend_name(&self) -> &str {
        &self.name
    }

    /// An error for a sandbox whose container stopped under a running command; removes it.
    async fn lost(&self, command: &[String]) -> DriverError {
        self.inner.remove_container(&self.name).await.ok();
        self.inner.backend(
            format!("run `{}` in sandbox `{}`", command.join(" "), self.name),
            EngineProblem::SandboxLost,
        )
    }

    async fn container_running(&self) -> Result<bool, DriverError> {
        Ok(self
            .inner
            .inspect_state(&self.name)
            .await?
            .is_some_and(|state| state.running))
    }

    /// Whether the container stops within [`SETTLE_DEADLINE`]: a command killed by a signal
    /// may have died with its container, whose state the daemon records a moment later.
    async fn container_stops_soon(&self) -> Result<bool, DriverError> {
        let start = Instant::now();
        while start.elapsed() < SETTLE_DEADLINE {
            if !self.container_running().await? {
                return Ok(true);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(false)
    }
}

#[async_trait]
impl SandboxExec for DockerDriver {
    async fn start_sandbox(&self, task: Task) -> Result<Box<dyn Sandbox>, DriverError> {
        validate_name(&task.id).map_err(|reason| DriverError::InvalidTask {
            task: task.id.clone(),
            reason: format!("bad task id: {reason}"),
        })?;
        let inner = &self.inner;
        let name = resource_name(inner.namespace(), &task.id);
        let reuse = match inner.find_container(&name).await? {
            Some(found) if found.running => true,
            Some(_) => {
                // A stopped sandbox cannot be exec'ed into: start afresh.
                inner.remove_container(&name).await?;
                false
            }
            None => false,
        };
        if !reuse {
            let mut body = inner.container_body(&task, Role::Sandbox).await?;
            body.entrypoint = Some(vec!["/bin/sh".to_owned(), "-c".to_owned()]);
            body.cmd = Some(vec![KEEP_ALIVE.to_owned()]);
            body.attach_stdin = Some(false);
            body.open_stdin = Some(false);
            body.stdin_once = Some(false);
            inner
                .create_and_start(&name, &task.id, "/bin/sh", body, None)
                .await?;
        }
        Ok(Box::new(DockerSandbox {
            inner: inner.clone(),
            name,
            user: task.user,
            workdir: task.workdir,
        }))
    }
}

#[async_trait]
impl Sandbox for DockerSandbox {
    async fn exec(
        &self,
        command: &[String],
        env: &BTreeMap<String, String>,
        stdout: LogSink<'_>,
        stderr: LogSink<'_>,
    ) -> Result<SandboxOutput, DriverError> {
        if command.is_empty() {
            return Err(DriverError::InvalidTask {
                task: self.name.clone(),
                reason: "the command to exec is empty".to_owned(),
            });
        }
        let docker = self.inner.docker().await?;
        let action = || format!("run `{}` in sandbox `{}`", command.join(" "), self.name);
        let options = CreateExecOptions {
            attach_stdout: Some(true),
            attach_stderr: Some(true),
            cmd: Some(command.to_vec()),
            // Added to the container's own env, which holds the task's.
            env: Some(
                env.iter()
                    .map(|(name, value)| format!("{name}={value}"))
                    .collect(),
            ),
            user: self.user.clone(),
            working_dir: self.workdir.clone(),
            ..CreateExecOptions::default()
        };
        let exec = match docker.create_exec(&self.name, options).await {
            Ok(exec) => exec,
            // 404: the container is gone; 409: it is not running.
            Err(error) if matches!(status_code(&error), Some(404 | 409)) => {
                return Err(self.lost(command).await);
            }
            Err(source) => return Err(self.inner.backend(action(), source)),
        };
        let started = docker
            .start_exec(&exec.id, None)
            .await
            .map_err(|source| self.inner.backend(action(), source))?;
        let StartExecResults::Attached { mut output, .. } = started else {
            return Err(self.inner.backend(action(), EngineProblem::ExecDetached));
        };
        let write_error = |source| self.inner.backend("write a command's output", source);
        let mut stream_failed = false;
        while let Some(chunk) = output.next().await {
            let written = match chunk {
                Ok(LogOutput::StdOut { message } | LogOutput::Console { message }) => {
                    write_chunk(stdout, &message, true).await
                }
                Ok(LogOutput::StdErr { message }) => write_chunk(stderr, &message, true).await,
                Ok(LogOutput::StdIn { .. }) => Ok(()),
                Err(error) => {
                    tracing::debug!(sandbox = %self.name, %error, "exec output stream broke");
                    stream_failed = true;
                    break;
                }
            };
            written.map_err(write_error)?;
        }
        if stream_failed || !self.container_running().await? {
            return Err(self.lost(command).await);
        }

        // The output ends when the process does; its exit code may land a moment later.
        let start = Instant::now();
        let mut interval = Duration::from_millis(1);
        loop {
            let inspected = match docker.inspect_exec(&exec.id).await {
                Ok(inspected) => inspected,
                Err(error) if status_code(&error) == Some(404) => {
                    return Err(self.lost(command).await);
                }
                Err(source) => return Err(self.inner.backend(action(), source)),
            };
            if !inspected.running.unwrap_or(false)
                && let Some(code) = inspected.exit_code
            {
                let exit_code = i32::try_from(code).unwrap_or(-1);
                if exit_code > 128 && self.container_stops_soon().await? {
                    return Err(self.lost(command).await);
                }
                return Ok(SandboxOutput { exit_code });
            }
            if start.elapsed() > EXIT_CODE_DEADLINE {
                return Err(self.inner.backend(
                    action(),
                    EngineProblem::ExitCodeLate {
                        after: EXIT_CODE_DEADLINE,
                    },
                ));
            }
            tokio::time::sleep(interval).await;
            interval = (interval * 2).min(Duration::from_millis(50));
        }
    }

    async fn cleanup(&self) -> Result<(), DriverError> {
        self.inner.remove_container(&self.name).await
    }
}
