//! A recording fake driver for tests of code above the contract (the job flow, the CLI's
//! commands): every task is recorded and answered by a handler the test supplies, with no
//! process, VM or daemon behind it. Built only with the `fake` cargo feature.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};

use async_trait::async_trait;
use tokio::io::AsyncWriteExt as _;

use crate::{
    Container, ContainerStatus, Driver, DriverError, JobSupport, LogSink, MkSource, Mount,
    RepositoryState, Stdin, Task, Volume,
};

/// A task as the fake received it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskCall {
    pub id: String,
    pub image: String,
    pub command: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub mounts: Vec<Mount>,
    pub workdir: Option<String>,
    /// Fixed input bytes (a streamed input is recorded as empty).
    pub stdin: Option<Vec<u8>>,
    pub network: Option<bool>,
}

impl TaskCall {
    /// The command joined by blanks, for matching in handlers and assertions.
    pub fn line(&self) -> String {
        self.command.join(" ")
    }
}

/// How a task ends: its exit code and output.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reply {
    pub code: i32,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

impl Reply {
    pub fn ok() -> Reply {
        Reply::default()
    }

    pub fn exit(code: i32) -> Reply {
        Reply {
            code,
            ..Reply::default()
        }
    }

    pub fn stdout(mut self, bytes: impl Into<Vec<u8>>) -> Reply {
        self.stdout = bytes.into();
        self
    }

    pub fn stderr(mut self, bytes: impl Into<Vec<u8>>) -> Reply {
        self.stderr = bytes.into();
        self
    }
}

/// What the handler decides for each task: a reply, a driver failure, or a task that never
/// ends (to test interruption).
#[derive(Debug)]
pub enum Answer {
    Reply(Reply),
    Fail(DriverError),
    Hang,
}

type Handler = dyn Fn(&TaskCall) -> Answer + Send + Sync;

/// The fake driver. Clones share their recordings.
#[derive(Clone)]
pub struct FakeDriver {
    name: &'static str,
    namespace: String,
    support: JobSupport,
    environment: String,
    handler: Arc<Handler>,
    calls: Arc<Mutex<Vec<TaskCall>>>,
    closed: Arc<Mutex<usize>>,
    /// `use KEY fresh=BOOL` and `keep`, in order.
    states: Arc<Mutex<Vec<String>>>,
}

impl std::fmt::Debug for FakeDriver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeDriver")
            .field("name", &self.name)
            .field("namespace", &self.namespace)
            .finish_non_exhaustive()
    }
}

impl FakeDriver {
    /// A fake that answers every task with `handler`; it declares the job support of a VM
    /// driver (mk in the base OS, the test in a container) until [`FakeDriver::support`].
    pub fn new(handler: impl Fn(&TaskCall) -> Answer + Send + Sync + 'static) -> FakeDriver {
        FakeDriver {
            name: "fake",
            namespace: "fake".to_owned(),
            support: JobSupport {
                mk: MkSource::BaseOs,
                test_in_container: true,
                default_test_image: "localhost/fake/base:latest".to_owned(),
                shares_host_run_dir: false,
            },
            environment: "fake:environment-1".to_owned(),
            handler: Arc::new(handler),
            calls: Arc::default(),
            closed: Arc::default(),
            states: Arc::default(),
        }
    }

    pub fn support(mut self, support: JobSupport) -> FakeDriver {
        self.support = support;
        self
    }

    pub fn environment(mut self, digest: impl Into<String>) -> FakeDriver {
        self.environment = digest.into();
        self
    }

    /// Every task received so far, in order.
    pub fn calls(&self) -> Vec<TaskCall> {
        self.calls
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The repository-state requests received, in order.
    pub fn state_calls(&self) -> Vec<String> {
        self.states
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// How many times `close` was called.
    pub fn closes(&self) -> usize {
        *self.closed.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[async_trait]
impl Driver for FakeDriver {
    fn name(&self) -> &'static str {
        self.name
    }

    fn namespace(&self) -> &str {
        &self.namespace
    }

    async fn environment_digest(&self) -> Result<String, DriverError> {
        Ok(self.environment.clone())
    }

    fn job_support(&self) -> JobSupport {
        self.support.clone()
    }

    async fn create_volume(
        &self,
        name: &str,
        _size_bytes: u64,
    ) -> Result<Box<dyn Volume>, DriverError> {
        Ok(Box::new(FakeVolume {
            name: name.to_owned(),
        }))
    }

    async fn run_container(&self, task: Task) -> Result<Box<dyn Container>, DriverError> {
        let call = TaskCall {
            id: task.id.clone(),
            image: task.image.clone(),
            command: task.command.clone(),
            env: task.env.clone(),
            mounts: task.mounts.clone(),
            workdir: task.workdir.clone(),
            network: task.network,
            stdin: match &task.stdin {
                Some(Stdin::Bytes(bytes)) => Some(bytes.to_vec()),
                Some(Stdin::Stream(_)) => Some(Vec::new()),
                None => None,
            },
        };
        self.calls
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(call.clone());
        match (self.handler)(&call) {
            Answer::Reply(reply) => Ok(Box::new(FakeContainer {
                id: task.id,
                reply: Some(reply),
            })),
            Answer::Hang => Ok(Box::new(FakeContainer {
                id: task.id,
                reply: None,
            })),
            Answer::Fail(error) => Err(error),
        }
    }

    async fn close(&self) -> Result<(), DriverError> {
        *self.closed.lock().unwrap_or_else(PoisonError::into_inner) += 1;
        Ok(())
    }

    fn as_repository_state(&self) -> Option<&dyn RepositoryState> {
        Some(self)
    }
}

#[async_trait]
impl RepositoryState for FakeDriver {
    fn use_state(&self, key: &str, fresh: bool) -> Result<(), DriverError> {
        self.states
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(format!("use {key} fresh={fresh}"));
        Ok(())
    }

    async fn keep_state(&self) -> Result<(), DriverError> {
        self.states
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push("keep".to_owned());
        Ok(())
    }
}

#[derive(Debug)]
struct FakeContainer {
    id: String,
    /// `None`: the task never ends.
    reply: Option<Reply>,
}

#[async_trait]
impl Container for FakeContainer {
    fn id(&self) -> &str {
        &self.id
    }

    async fn status(&self) -> Result<ContainerStatus, DriverError> {
        Ok(match &self.reply {
            Some(reply) => ContainerStatus::Exited { code: reply.code },
            None => ContainerStatus::Running,
        })
    }

    async fn logs(&self, stdout: LogSink<'_>, stderr: LogSink<'_>) -> Result<(), DriverError> {
        if let Some(reply) = &self.reply {
            let io = |source| DriverError::backend("fake", "write logs", source);
            stdout.write_all(&reply.stdout).await.map_err(io)?;
            stderr.write_all(&reply.stderr).await.map_err(io)?;
        }
        Ok(())
    }

    async fn cleanup(&self) -> Result<(), DriverError> {
        Ok(())
    }
}

#[derive(Debug)]
struct FakeVolume {
    name: String,
}

#[async_trait]
impl Volume for FakeVolume {
    fn name(&self) -> &str {
        &self.name
    }

    async fn cleanup(&self) -> Result<(), DriverError> {
        Ok(())
    }
}
