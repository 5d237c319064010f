//! One task as a host process: its directory, output files, exit file, and the container
//! handle the contract hands out.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use ci_exec_driver::{Container, ContainerStatus, DriverError, FollowLogs, LogSink, Stdin, Task};
use tokio::io::AsyncWriteExt;
use tokio::sync::watch;

use crate::Inner;
use crate::error::NativeError;
use crate::paths::{create_dir, link_mounts, remove_all};
use crate::process::{self, DEFAULT_PATH, PidRecord};

const STDOUT: &str = "stdout";
const STDERR: &str = "stderr";
const EXIT: &str = "exit";
pub(crate) const PID: &str = "pid";
/// Bytes moved per read when copying output to a sink.
const COPY_BUFFER: usize = 256 * 1024;
/// The task's working directory (and where its mounts appear) inside its task directory.
pub(crate) const WORK: &str = "work";

/// A task's process and files. Shared by every handle `run_container` returns for its id.
#[derive(Debug)]
pub(crate) struct TaskState {
    pub id: String,
    pub dir: PathBuf,
    pub pid: PidRecord,
    /// `Some` when this process started the task and waits for it; `None` for a task adopted
    /// from another process's leftovers, whose exit code is read from its exit file.
    exit: Option<watch::Receiver<Option<i32>>>,
}

impl TaskState {
    /// Starts `task` in `dir`. On failure nothing is left behind.
    pub async fn spawn(task: Task, dir: PathBuf, volumes: &Path) -> Result<TaskState, DriverError> {
        let result = Self::spawn_inner(task, &dir, volumes).await;
        if result.is_err()
            && let Err(error) = remove_all(&dir)
        {
            tracing::warn!("{error}");
        }
        result
    }

    async fn spawn_inner(task: Task, dir: &Path, volumes: &Path) -> Result<TaskState, DriverError> {
        let id = task.id.clone();
        let Some(program) = task.command.first() else {
            return Err(DriverError::InvalidTask {
                task: id,
                reason: "the command is empty".to_owned(),
            });
        };
        if !task.image.is_empty() {
            tracing::debug!(task = %id, image = %task.image, "native driver ignores the image");
        }
        let work = dir.join(WORK);
        create_dir(&work).map_err(|error| error.into_driver("create a task directory"))?;
        link_mounts(&id, &work, volumes, &task.mounts)?;
        let cwd = match &task.workdir {
            Some(workdir) => {
                // Like mount paths, an absolute workdir names a place inside the task directory
                // (`Path::join` would otherwise replace the task directory with it).
                let workdir = work.join(workdir.trim_start_matches('/'));
                if !workdir.is_dir() {
                    return Err(DriverError::InvalidTask {
                        task: id,
                        reason: format!("working directory `{}` does not exist", workdir.display()),
                    });
                }
                workdir
            }
            None => work.clone(),
        };

        let env = task_env(&task.env);
        let path_var = env.get("PATH").map_or(DEFAULT_PATH, String::as_str);
        let resolved = process::resolve_program(&id, program, path_var, &cwd)?;

        let stdout = create_file(&dir.join(STDOUT))?;
        let stderr = create_file(&dir.join(STDERR))?;
        let mut command = tokio::process::Command::new(&resolved);
        command
            .arg0(program)
            .args(&task.command[1..])
            .env_clear()
            .envs(&env)
            .current_dir(&cwd)
            .stdout(stdout)
            .stderr(stderr)
            .kill_on_drop(false);
        process::prepare(
            &mut command,
            &id,
            task.limits,
            task.user.as_deref(),
            task.network == Some(false),
        )?;

        let mut stream = None;
        match &task.stdin {
            None => {
                command.stdin(Stdio::null());
            }
            Some(Stdin::Bytes(bytes)) => {
                let path = dir.join("stdin");
                std::fs::write(&path, bytes)
                    .map_err(|source| NativeError::Write {
                        path: path.clone(),
                        source,
                    })
                    .map_err(|error| error.into_driver("write a task's stdin"))?;
                command.stdin(open_file(&path)?);
            }
            Some(stdin @ Stdin::Stream(_)) => match stdin.take_reader() {
                Some(reader) => {
                    stream = Some(reader);
                    command.stdin(Stdio::piped());
                }
                None => {
                    command.stdin(Stdio::null());
                }
            },
        }

        let mut child = command.spawn().map_err(|source| match source.kind() {
            std::io::ErrorKind::NotFound => DriverError::ProgramNotFound {
                task: id.clone(),
                program: program.clone(),
            },
            std::io::ErrorKind::PermissionDenied => DriverError::CannotInvoke {
                task: id.clone(),
                program: program.clone(),
                source,
            },
            _ if source.raw_os_error() == Some(libc::ENOEXEC) => DriverError::CannotInvoke {
                task: id.clone(),
                program: program.clone(),
                source,
            },
            _ => NativeError::Spawn {
                program: program.clone(),
                source,
            }
            .into_driver(format!("start task `{id}`")),
        })?;
        let pid = child.id().and_then(PidRecord::of).ok_or_else(|| {
            NativeError::Wait {
                task: id.clone(),
                source: std::io::Error::other("the process has no pid"),
            }
            .into_driver(format!("start task `{id}`"))
        })?;
        let pid_path = dir.join(PID);
        if let Err(source) = std::fs::write(&pid_path, pid.encode()) {
            process::kill_group(pid.pid);
            return Err(NativeError::Write {
                path: pid_path,
                source,
            }
            .into_driver(format!("start task `{id}`")));
        }

        if let (Some(mut reader), Some(mut writer)) = (stream, child.stdin.take()) {
            tokio::spawn(async move {
                // The task may exit without reading all of its input: a broken pipe is normal.
                let _ = tokio::io::copy(&mut reader, &mut writer).await;
                let _ = writer.shutdown().await;
            });
        }

        let (sender, receiver) = watch::channel(None);
        let exit_path = dir.join(EXIT);
        let waited = id.clone();
        tokio::spawn(async move {
            let code = match child.wait().await {
                Ok(status) => process::exit_code(status),
                Err(error) => {
                    tracing::warn!(task = %waited, "cannot wait for task: {error}");
                    255
                }
            };
            // Written before anyone is told, so a later process reading the directory agrees.
            // It fails only when cleanup already removed the directory.
            let staged = exit_path.with_extension("tmp");
            if std::fs::write(&staged, format!("{code}\n")).is_ok() {
                let _ = std::fs::rename(&staged, &exit_path);
            }
            let _ = sender.send(Some(code));
        });

        Ok(TaskState {
            id,
            dir: dir.to_owned(),
            pid,
            exit: Some(receiver),
        })
    }

    /// A task directory another process left: readable, killable, not waited for.
    pub fn adopt(id: &str, dir: PathBuf) -> Option<TaskState> {
        let pid = PidRecord::decode(&std::fs::read_to_string(dir.join(PID)).ok()?)?;
        Some(TaskState {
            id: id.to_owned(),
            dir,
            pid,
            exit: None,
        })
    }

    pub fn status(&self) -> Result<ContainerStatus, DriverError> {
        if let Some(exit) = &self.exit {
            return Ok(match *exit.borrow() {
                Some(code) => ContainerStatus::Exited { code },
                None => ContainerStatus::Running,
            });
        }
        let path = self.dir.join(EXIT);
        match std::fs::read_to_string(&path) {
            Ok(text) => Ok(ContainerStatus::Exited {
                code: text.trim().parse().unwrap_or(255),
            }),
            Err(_) if self.pid.alive() => Ok(ContainerStatus::Running),
            Err(_) => Err(NativeError::Orphaned {
                task: self.id.clone(),
            }
            .into_driver(format!("read the status of task `{}`", self.id))),
        }
    }

    /// Resolves once the task has exited, or after `limit` when this process does not wait
    /// for it itself.
    async fn exited(&self, limit: Duration) {
        match &self.exit {
            Some(exit) => {
                let mut exit = exit.clone();
                let _ = tokio::time::timeout(limit, exit.wait_for(Option::is_some)).await;
            }
            None => tokio::time::sleep(limit).await,
        }
    }

    /// Kills the task's process group, waits (briefly) for it to be reaped, removes its files.
    pub async fn remove(&self) -> Result<(), DriverError> {
        if !matches!(self.status(), Ok(ContainerStatus::Exited { .. })) {
            self.pid.kill_group();
            if self.exit.is_some() {
                self.exited(Duration::from_secs(10)).await;
            }
        }
        remove_all(&self.dir)
            .map_err(|error| error.into_driver(format!("remove task `{}`", self.id)))
    }
}

/// The task's environment: exactly its variables, plus a default `PATH` when it sets none.
pub(crate) fn task_env(env: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    let mut env = env.clone();
    env.entry("PATH".to_owned())
        .or_insert_with(|| DEFAULT_PATH.to_owned());
    env
}

fn create_file(path: &Path) -> Result<std::fs::File, DriverError> {
    std::fs::File::create(path)
        .map_err(|source| NativeError::Write {
            path: path.to_owned(),
            source,
        })
        .map_err(|error| error.into_driver("create a task's output file"))
}

fn open_file(path: &Path) -> Result<std::fs::File, DriverError> {
    std::fs::File::open(path)
        .map_err(|source| NativeError::Read {
            path: path.to_owned(),
            source,
        })
        .map_err(|error| error.into_driver("open a task's file"))
}

/// The handle `run_container` returns.
#[derive(Debug)]
pub struct NativeContainer {
    pub(crate) state: Arc<TaskState>,
    pub(crate) driver: Arc<Inner>,
}

impl NativeContainer {
    // Plain `std::fs`: reads of a local regular file do not block for long, and tokio's file
    // handles would move every read to a blocking thread (per-task overhead, benches/native).
    fn open_output(&self, name: &str) -> Result<std::fs::File, DriverError> {
        let path = self.state.dir.join(name);
        std::fs::File::open(&path)
            .map_err(|source| NativeError::Read { path, source })
            .map_err(|error| {
                error.into_driver(format!("read the output of task `{}`", self.state.id))
            })
    }
}

#[async_trait]
impl Container for NativeContainer {
    fn id(&self) -> &str {
        &self.state.id
    }

    async fn status(&self) -> Result<ContainerStatus, DriverError> {
        self.state.status()
    }

    async fn logs(&self, stdout: LogSink<'_>, stderr: LogSink<'_>) -> Result<(), DriverError> {
        let mut out = self.open_output(STDOUT)?;
        let mut err = self.open_output(STDERR)?;
        let mut buffer = vec![0; COPY_BUFFER];
        copy_available(&mut out, stdout, &mut buffer).await?;
        copy_available(&mut err, stderr, &mut buffer).await?;
        flush(stdout, stderr).await
    }

    async fn cleanup(&self) -> Result<(), DriverError> {
        self.driver.tasks.lock().await.remove(&self.state.id);
        self.state.remove().await
    }

    fn as_follow(&self) -> Option<&dyn FollowLogs> {
        Some(self)
    }
}

#[async_trait]
impl FollowLogs for NativeContainer {
    async fn follow(&self, stdout: LogSink<'_>, stderr: LogSink<'_>) -> Result<(), DriverError> {
        let mut out = self.open_output(STDOUT)?;
        let mut err = self.open_output(STDERR)?;
        let mut buffer = vec![0; COPY_BUFFER];
        let mut idle = Duration::from_millis(1);
        loop {
            // Looked at before reading: once the task is seen done, one more read drains all
            // it wrote, since it wrote straight into these files.
            let done = self.state.status()?.is_done();
            let copied = copy_available(&mut out, stdout, &mut buffer).await?
                + copy_available(&mut err, stderr, &mut buffer).await?;
            if done {
                break;
            }
            if copied > 0 {
                flush(stdout, stderr).await?;
                idle = Duration::from_millis(1);
            } else {
                // Wakes at once on exit; otherwise polls the files, backing off to 20 ms.
                self.state.exited(idle).await;
                idle = (idle * 2).min(Duration::from_millis(20));
            }
        }
        flush(stdout, stderr).await
    }
}

/// Copies what `file` holds past its current position to `sink`; returns the byte count.
async fn copy_available(
    file: &mut std::fs::File,
    sink: &mut (dyn tokio::io::AsyncWrite + Send + Unpin),
    buffer: &mut [u8],
) -> Result<u64, DriverError> {
    let mut total = 0;
    loop {
        let read = std::io::Read::read(file, buffer)
            .map_err(|source| NativeError::Read {
                path: PathBuf::from("task output"),
                source,
            })
            .map_err(|error| error.into_driver("read task output"))?;
        if read == 0 {
            return Ok(total);
        }
        sink.write_all(&buffer[..read])
            .await
            .map_err(|source| NativeError::Sink { source }.into_driver("write task output"))?;
        total += read as u64;
    }
}

async fn flush(
    stdout: &mut (dyn tokio::io::AsyncWrite + Send + Unpin),
    stderr: &mut (dyn tokio::io::AsyncWrite + Send + Unpin),
) -> Result<(), DriverError> {
    let flushed = match stdout.flush().await {
        Ok(()) => stderr.flush().await,
        Err(error) => Err(error),
    };
    flushed.map_err(|source| NativeError::Sink { source }.into_driver("write task output"))
}
