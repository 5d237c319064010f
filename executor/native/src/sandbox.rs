//! `SandboxExec`: a directory with the task's mounts and environment in which commands run one
//! after another, their output piped straight to the caller's sinks.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;

use async_trait::async_trait;
use ci_exec_driver::{DriverError, LogSink, Sandbox, SandboxOutput, Task};
use tokio::io::AsyncWriteExt;

use crate::Inner;
use crate::error::NativeError;
use crate::paths::{create_dir, link_mounts, remove_all};
use crate::process::{self, DEFAULT_PATH, PidRecord};
use crate::task::{PID, WORK, task_env};

#[derive(Debug)]
pub struct NativeSandbox {
    id: String,
    dir: PathBuf,
    cwd: PathBuf,
    env: BTreeMap<String, String>,
    task: Task,
    /// Kept so the namespace directory outlives no handle that still points into it.
    _driver: Arc<Inner>,
}

impl NativeSandbox {
    pub(crate) fn start(driver: Arc<Inner>, task: Task) -> Result<NativeSandbox, DriverError> {
        crate::paths::check_task_id(&task.id)?;
        let dir = driver.root.join("sandboxes").join(&task.id);
        remove_all(&dir).map_err(|error| error.into_driver("reset a sandbox"))?;
        let work = dir.join(WORK);
        create_dir(&work).map_err(|error| error.into_driver("create a sandbox"))?;
        if let Err(error) = link_mounts(&task.id, &work, &driver.root.join("volumes"), &task.mounts)
        {
            let _ = remove_all(&dir);
            return Err(error);
        }
        let cwd = match &task.workdir {
            Some(workdir) => work.join(workdir),
            None => work,
        };
        if !cwd.is_dir() {
            let _ = remove_all(&dir);
            return Err(DriverError::InvalidTask {
                task: task.id.clone(),
                reason: format!("working directory `{}` does not exist", cwd.display()),
            });
        }
        Ok(NativeSandbox {
            id: task.id.clone(),
            env: task_env(&task.env),
            dir,
            cwd,
            task,
            _driver: driver,
        })
    }
}

#[async_trait]
impl Sandbox for NativeSandbox {
    async fn exec(
        &self,
        command: &[String],
        env: &BTreeMap<String, String>,
        stdout: LogSink<'_>,
        stderr: LogSink<'_>,
    ) -> Result<SandboxOutput, DriverError> {
        let Some(program) = command.first() else {
            return Err(DriverError::InvalidTask {
                task: self.id.clone(),
                reason: "the command is empty".to_owned(),
            });
        };
        let mut merged = self.env.clone();
        merged.extend(
            env.iter()
                .map(|(name, value)| (name.clone(), value.clone())),
        );
        let path_var = merged.get("PATH").map_or(DEFAULT_PATH, String::as_str);
        let resolved = process::resolve_program(&self.id, program, path_var, &self.cwd)?;
        let mut child_command = tokio::process::Command::new(&resolved);
        child_command
            .arg0(program)
            .args(&command[1..])
            .env_clear()
            .envs(&merged)
            .current_dir(&self.cwd)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        process::prepare(
            &mut child_command,
            &self.id,
            self.task.limits,
            self.task.user.as_deref(),
            self.task.network == Some(false),
        )?;
        let mut child = child_command.spawn().map_err(|source| {
            NativeError::Spawn {
                program: program.clone(),
                source,
            }
            .into_driver(format!("exec in sandbox `{}`", self.id))
        })?;
        if let Some(pid) = child.id().and_then(PidRecord::of) {
            // Lets `close` in a later process kill what a crashed one left running.
            let _ = std::fs::write(self.dir.join(PID), pid.encode());
        }
        let (Some(mut child_out), Some(mut child_err)) = (child.stdout.take(), child.stderr.take())
        else {
            return Err(NativeError::Spawn {
                program: program.clone(),
                source: std::io::Error::other("no output pipes"),
            }
            .into_driver(format!("exec in sandbox `{}`", self.id)));
        };
        let (out, err) = tokio::join!(pump(&mut child_out, stdout), pump(&mut child_err, stderr));
        let status = child.wait().await.map_err(|source| {
            NativeError::Wait {
                task: self.id.clone(),
                source,
            }
            .into_driver(format!("exec in sandbox `{}`", self.id))
        })?;
        let _ = std::fs::remove_file(self.dir.join(PID));
        out?;
        err?;
        Ok(SandboxOutput {
            exit_code: process::exit_code(status),
        })
    }

    async fn cleanup(&self) -> Result<(), DriverError> {
        if let Some(pid) = std::fs::read_to_string(self.dir.join(PID))
            .ok()
            .and_then(|text| PidRecord::decode(&text))
        {
            pid.kill_group();
        }
        remove_all(&self.dir).map_err(|error| error.into_driver("remove a sandbox"))
    }
}

async fn pump(
    source: &mut (dyn tokio::io::AsyncRead + Send + Unpin),
    sink: &mut (dyn tokio::io::AsyncWrite + Send + Unpin),
) -> Result<(), DriverError> {
    tokio::io::copy(source, sink)
        .await
        .map_err(|source| NativeError::Sink { source }.into_driver("stream sandbox output"))?;
    sink.flush()
        .await
        .map_err(|source| NativeError::Sink { source }.into_driver("stream sandbox output"))
}
