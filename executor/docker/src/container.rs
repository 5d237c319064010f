use std::collections::HashMap;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use bollard::container::LogOutput;
use bollard::query_parameters::{EventsOptionsBuilder, LogsOptionsBuilder};
use futures_util::StreamExt;
use tokio::io::AsyncWriteExt;

use ci_exec_driver::{Container, ContainerStatus, DriverError, FollowLogs, LogSink};

use crate::EngineProblem;
use crate::connect::rewriting;
use crate::driver::{Inner, status_code};

/// Pauses between two reads of a running podman task's logs: the first is short and each
/// next one doubles up to `POLL_MIN`, so the end of a short task shows soon after it happens
/// (a `true` has often not exited yet at the first look); then the pause grows with the cost
/// of a read, up to `POLL_MAX`.
const POLL_FIRST: Duration = Duration::from_millis(10);
const POLL_MIN: Duration = Duration::from_millis(100);
const POLL_MAX: Duration = Duration::from_secs(2);

/// Output below which a re-read costs the engine little whatever time it took (a slow answer
/// then means a busy engine, not a long log): the pause stays at most `POLL_MIN`, so a busy
/// engine does not delay noticing the end of a short task by seconds.
const SMALL_LOG_BYTES: u64 = 1024 * 1024;

/// How one read of a container's logs goes.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum LogRead {
    /// Stream until the task exits, flushing every chunk.
    Follow,
    /// What the task has written so far, flushing every chunk; the last chunk waits for a
    /// later read to confirm it, as it may still be incomplete.
    Running,
    /// Everything, from a task that has exited.
    Complete,
}

/// One chunk of a container's log: `bytes` of `stream` (0 stdout, 1 stderr), `start` bytes
/// into that stream.
#[derive(PartialEq, Eq, Debug)]
struct Chunk {
    stream: usize,
    start: u64,
    bytes: bytes::Bytes,
}

/// How far earlier reads of a container's log got.
#[derive(Default, Debug)]
struct LogCursor {
    /// Bytes of stdout and of stderr already written.
    written: [u64; 2],
    /// The last chunk of the previous read of a running task's log, not yet written.
    held: Option<Chunk>,
}

/// How a task ended.
#[derive(Debug)]
enum Ended {
    /// The task's own exit code.
    Exited(i32),
    /// Stopped through the engine by someone else, with this `kill` signal if it said.
    KilledFromOutside { signal: Option<String> },
}

/// A task's container, named `{namespace}-{task id}`.
#[derive(Debug)]
pub struct DockerContainer {
    inner: Arc<Inner>,
    task_id: String,
    name: String,
    /// Once ended, a task stays so: later polls cost no request.
    ended: OnceLock<Ended>,
}

impl DockerContainer {
    pub(crate) fn new(inner: Arc<Inner>, task_id: String, name: String) -> Self {
        DockerContainer {
            inner,
            task_id,
            name,
            ended: OnceLock::new(),
        }
    }

    /// The container's name on the engine.
    pub fn backend_name(&self) -> &str {
        &self.name
    }

    /// Writes the container's output from the beginning, leaving out what `cursor` says
    /// an earlier pass already wrote, and moves the cursor past what this pass wrote.
    async fn write_logs(
        &self,
        read: LogRead,
        cursor: &mut LogCursor,
        stdout: LogSink<'_>,
        stderr: LogSink<'_>,
    ) -> Result<(), DriverError> {
        let docker = self.inner.docker().await?;
        let options = LogsOptionsBuilder::new()
            .stdout(true)
            .stderr(true)
            .follow(read == LogRead::Follow)
            .build();
        let skip = cursor.written;
        let mut seen = [0u64; 2];
        let mut last: Option<Chunk> = None;
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
            let (stream, bytes) = match chunk {
                LogOutput::StdOut { message } | LogOutput::Console { message } => (0, message),
                LogOutput::StdErr { message } => (1, message),
                LogOutput::StdIn { .. } => continue,
            };
            let chunk = Chunk {
                stream,
                start: seen[stream],
                bytes,
            };
            seen[stream] += chunk.bytes.len() as u64;
            let ready = if read == LogRead::Running {
                last.replace(chunk)
            } else {
                Some(chunk)
            };
            if let Some(chunk) = ready {
                self.write_fresh(&chunk, skip, stdout, stderr, read).await?;
            }
        }
        // A read of a running task's log may end inside a record the engine is still
        // writing: its last chunk is written once a later read shows it unchanged.
        if let Some(chunk) = last {
            seen[chunk.stream] = chunk.start;
            if cursor.held.as_ref() == Some(&chunk) {
                seen[chunk.stream] += chunk.bytes.len() as u64;
                self.write_fresh(&chunk, skip, stdout, stderr, read).await?;
            } else {
                cursor.held = Some(chunk);
            }
        }
        let flushed = match stdout.flush().await {
            Ok(()) => stderr.flush().await,
            Err(error) => Err(error),
        };
        flushed.map_err(|source| self.inner.backend("write a task's output", source))?;
        cursor.written = [skip[0].max(seen[0]), skip[1].max(seen[1])];
        Ok(())
    }

    /// Writes the part of `chunk` past the first `skip` bytes of its stream.
    async fn write_fresh(
        &self,
        chunk: &Chunk,
        skip: [u64; 2],
        stdout: LogSink<'_>,
        stderr: LogSink<'_>,
        read: LogRead,
    ) -> Result<(), DriverError> {
        let fresh = skip[chunk.stream]
            .saturating_sub(chunk.start)
            .min(chunk.bytes.len() as u64);
        let bytes = chunk
            .bytes
            .get(usize::try_from(fresh).unwrap_or(usize::MAX)..)
            .unwrap_or_default();
        if bytes.is_empty() {
            return Ok(());
        }
        let flush = read != LogRead::Complete;
        let written = if chunk.stream == 0 {
            write_chunk(stdout, bytes, flush).await
        } else {
            write_chunk(stderr, bytes, flush).await
        };
        written.map_err(|source| self.inner.backend("write a task's output", source))
    }

    /// Follows podman's logs by re-reading them until the task exits. Podman 4's followed
    /// logs drop lines when a task writes fast (measured with podman 4.3: of 5 MiB written
    /// by `seq`, 330 KB arrived, with gaps from line 44672 on); its plain reads are exact.
    /// Once the output is large, the pause between reads grows with the cost of a read, so a
    /// long, chatty task spends at most a fifth of the time re-reading.
    async fn poll_logs(&self, stdout: LogSink<'_>, stderr: LogSink<'_>) -> Result<(), DriverError> {
        let mut cursor = LogCursor::default();
        let mut floor = POLL_FIRST;
        loop {
            let exited = self.has_ended(self.status().await)?;
            let started = Instant::now();
            let read = if exited {
                LogRead::Complete
            } else {
                LogRead::Running
            };
            self.write_logs(read, &mut cursor, stdout, stderr).await?;
            if exited {
                return Ok(());
            }
            let longest = if cursor.written.iter().sum::<u64>() < SMALL_LOG_BYTES {
                POLL_MIN
            } else {
                POLL_MAX
            };
            let pause = (started.elapsed() * 4).clamp(floor, longest);
            floor = (floor * 2).min(POLL_MIN);
            tokio::time::sleep(pause).await;
        }
    }

    /// Records how the task ended, given its exit code, and says so as a status.
    async fn settle(
        &self,
        code: i64,
        started_at: Option<&str>,
    ) -> Result<ContainerStatus, DriverError> {
        let code = i32::try_from(code).unwrap_or(-1);
        let killed = if code > 128 {
            self.killed_from_outside(started_at).await
        } else {
            None
        };
        let ended = killed.unwrap_or(Ended::Exited(code));
        self.ended_status(self.ended.get_or_init(|| ended))
    }

    fn ended_status(&self, ended: &Ended) -> Result<ContainerStatus, DriverError> {
        match ended {
            Ended::Exited(code) => Ok(ContainerStatus::Exited { code: *code }),
            Ended::KilledFromOutside { signal } => Err(self.inner.backend(
                format!("run task `{}`", self.task_id),
                EngineProblem::StoppedFromOutside {
                    container: self.name.clone(),
                    signal: signal
                        .as_deref()
                        .map(|signal| format!(" with signal {signal}"))
                        .unwrap_or_default(),
                    // Podman records no event for its `stop` and `rm -f`.
                    commands: match self.inner.config.engine {
                        crate::Engine::Docker => "`docker kill`, `docker stop` and `docker rm -f`",
                        crate::Engine::Podman => "`podman kill`",
                    },
                },
            )),
        }
    }

    /// Whether an exit by a signal was someone's `kill` through the engine (`docker kill`,
    /// `docker stop`, `rm -f`), as the engine's event log says. Asked only of exits above
    /// 128, which a task can also produce itself (`exit 137`, a shell reporting a killed
    /// child); without such an event the exit code is the task's. Podman 4 records the event
    /// for `podman kill` only (`stop` and `rm -f` leave a bare `died`), so there a stopped
    /// task keeps the signal's exit code, as `podman run` reports it; a removed one is gone.
    /// A failing event query is logged and leaves the exit code as it is.
    async fn killed_from_outside(&self, started_at: Option<&str>) -> Option<Ended> {
        let connection = match self.inner.connection().await {
            Ok(connection) => connection,
            Err(error) => {
                tracing::warn!(%error, "cannot ask how the task ended");
                return None;
            }
        };
        let filters = HashMap::from([
            ("container", vec![self.name.clone()]),
            ("type", vec!["container".to_owned()]),
            ("event", vec!["kill".to_owned()]),
        ]);
        let since = started_at
            .and_then(|started| humantime::parse_rfc3339_weak(started).ok())
            .and_then(|started| started.duration_since(SystemTime::UNIX_EPOCH).ok())
            .map(|started| started.as_secs().to_string());
        let mut options = EventsOptionsBuilder::new().filters(&filters);
        if let Some(since) = &since {
            options = options.since(since);
        }
        // Without an end the engines keep the answer open for events to come. Docker ends it
        // at `until` (now, as seconds.nanoseconds). Podman's file-backed reader misses events
        // with an `until` (it tails the file and stops at that time, before reading when the
        // time is past): its own `stream=false` reads what is recorded and ends.
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        let until = format!("{}.{:09}", now.as_secs(), now.subsec_nanos());
        let client = if connection.is_podman {
            rewriting(&connection.docker, |uri| {
                let separator = if uri.contains('?') { '&' } else { '?' };
                Some(format!("{uri}{separator}stream=false"))
            })
        } else {
            options = options.until(&until);
            connection.docker.clone()
        };
        let mut events = client.events(Some(options.build()));
        match events.next().await {
            None => None,
            Some(Ok(event)) => Some(Ended::KilledFromOutside {
                signal: event
                    .actor
                    .and_then(|actor| actor.attributes)
                    .and_then(|mut attributes| attributes.remove("signal")),
            }),
            // An event our types do not know is still a `kill` of this container.
            Some(Err(bollard::errors::Error::JsonDataError { .. })) => {
                Some(Ended::KilledFromOutside { signal: None })
            }
            Some(Err(error)) => {
                tracing::warn!(container = %self.name, %error, "cannot read the engine's events");
                None
            }
        }
    }

    /// The exit code from the engine's `wait` endpoint, which answers when the task exits
    /// (Docker answers within milliseconds; podman 4 takes 0.4–1 s, so it is polled instead).
    async fn wait_for_end(&self) -> Result<ContainerStatus, DriverError> {
        if let Some(ended) = self.ended.get() {
            return self.ended_status(ended);
        }
        let docker = self.inner.docker().await?;
        let code = match docker.wait_container(&self.name, None).next().await {
            Some(Ok(response)) => response.status_code,
            // bollard reports a non-zero exit as an error; the daemon's own error is empty then.
            Some(Err(bollard::errors::Error::DockerContainerWaitError { error, code }))
                if error.is_empty() =>
            {
                code
            }
            Some(Err(error)) if status_code(&error) == Some(404) => return Err(self.gone()),
            Some(Err(source)) => {
                return Err(self.inner.backend(
                    format!("wait for container `{}` to exit", self.name),
                    source,
                ));
            }
            None => {
                return Err(self.inner.backend(
                    format!("wait for container `{}` to exit", self.name),
                    EngineProblem::NoExitCode,
                ));
            }
        };
        let started_at = if code > 128 {
            self.inner
                .inspect_state(&self.name)
                .await?
                .and_then(|state| state.started_at)
        } else {
            None
        };
        self.settle(code, started_at.as_deref()).await
    }

    /// Whether a status says the task has ended. One killed from outside has, and `status`
    /// reports that; following its output went fine.
    fn has_ended(&self, status: Result<ContainerStatus, DriverError>) -> Result<bool, DriverError> {
        match status {
            Ok(status) => Ok(status.is_done()),
            Err(_) if self.ended.get().is_some() => Ok(true),
            Err(error) => Err(error),
        }
    }

    fn gone(&self) -> DriverError {
        self.inner.backend(
            format!("find container `{}`", self.name),
            EngineProblem::ContainerGone,
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
        if let Some(ended) = self.ended.get() {
            return self.ended_status(ended);
        }
        let Some(state) = self.inner.inspect_state(&self.name).await? else {
            return Err(self.gone());
        };
        if !state.exited() {
            return Ok(ContainerStatus::Running);
        }
        self.settle(state.exit_code.unwrap_or(-1), state.started_at.as_deref())
            .await
    }

    async fn logs(&self, stdout: LogSink<'_>, stderr: LogSink<'_>) -> Result<(), DriverError> {
        self.write_logs(LogRead::Complete, &mut LogCursor::default(), stdout, stderr)
            .await?;
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
        if self.inner.connection().await?.is_podman {
            return self.poll_logs(stdout, stderr).await;
        }
        // Docker ends a followed log when the task exits. Waiting for the exit code at the
        // same time has it ready by then (the caller polls no status), and costs no time
        // after the output ends: the two answers come within milliseconds of each other.
        let mut cursor = LogCursor::default();
        let (followed, ended) = tokio::join!(
            self.write_logs(LogRead::Follow, &mut cursor, stdout, stderr),
            self.wait_for_end(),
        );
        followed?;
        self.has_ended(ended)?;
        // A followed log can end with the task before the engine has handed over its last
        // records (seen as a truncated tar stream from a task that wrote one): read the log
        // to its end once more; the cursor skips what was already written.
        self.write_logs(LogRead::Complete, &mut cursor, stdout, stderr)
            .await?;
        Ok(())
    }
}
