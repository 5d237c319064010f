use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use ci_exec_driver::{Container, ContainerStatus, DriverError, FollowLogs, LogSink};

use crate::driver::Inner;
use crate::logs::Stream;
use crate::pod::PodState;

/// A task's pod.
#[derive(Debug)]
pub struct K8sContainer {
    pub(crate) inner: Arc<Inner>,
    pub(crate) task: String,
    pub(crate) pod: String,
}

impl K8sContainer {
    /// The pod's name in the Kubernetes namespace.
    pub fn pod_name(&self) -> &str {
        &self.pod
    }

    /// The pod's state; a pod that can never finish is deleted and reported as an error.
    async fn state(&self) -> Result<PodState, DriverError> {
        let state = self.inner.pod_state(&self.pod).await?;
        if let PodState::Failed { reason, message } = &state {
            // Nothing is left behind by a task that cannot run.
            let _ = self.inner.delete_pod(&self.pod).await;
            return Err(self.inner.pod_failed(&self.pod, reason, message));
        }
        Ok(state)
    }

    /// Waits until the container has started (or ended), when its logs can be read.
    pub(crate) async fn started(&self) -> Result<PodState, DriverError> {
        let mut interval = Duration::from_millis(20);
        loop {
            let state = self.state().await?;
            if state != PodState::Pending {
                return Ok(state);
            }
            self.inner.changed_or(interval).await;
            interval = (interval * 2).min(Duration::from_millis(500));
        }
    }

    async fn read(&self, stream: Stream, sink: LogSink<'_>) -> Result<(), DriverError> {
        let mut written = 0;
        self.inner
            .read_log(&self.pod, stream, false, &mut written, sink)
            .await
    }

    /// Follows one stream until the task has exited and all of it was written, reconnecting
    /// (from the byte offset reached) whenever the stream drops while the task runs.
    async fn follow_stream(&self, stream: Stream, sink: LogSink<'_>) -> Result<(), DriverError> {
        let mut written = 0;
        let mut state = self.started().await?;
        let mut backoff = Duration::from_millis(10);
        loop {
            if let PodState::Exited(_) = state {
                // Whatever the last follow stream did not deliver.
                return self
                    .inner
                    .read_log(&self.pod, stream, false, &mut written, sink)
                    .await;
            }
            let before = written;
            self.inner
                .read_log(&self.pod, stream, true, &mut written, sink)
                .await?;
            state = self.state().await?;
            if written == before && !matches!(state, PodState::Exited(_)) {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_millis(500));
            } else {
                backoff = Duration::from_millis(10);
            }
        }
    }
}

#[async_trait]
impl Container for K8sContainer {
    fn id(&self) -> &str {
        &self.task
    }

    async fn status(&self) -> Result<ContainerStatus, DriverError> {
        Ok(self
            .state()
            .await?
            .container_status()
            .unwrap_or(ContainerStatus::Running))
    }

    async fn logs(&self, stdout: LogSink<'_>, stderr: LogSink<'_>) -> Result<(), DriverError> {
        if self.started().await? == PodState::Pending {
            return Ok(());
        }
        self.read(Stream::Stdout, stdout).await?;
        self.read(Stream::Stderr, stderr).await
    }

    async fn cleanup(&self) -> Result<(), DriverError> {
        self.inner.delete_pod(&self.pod).await
    }

    fn as_follow(&self) -> Option<&dyn FollowLogs> {
        Some(self)
    }
}

#[async_trait]
impl FollowLogs for K8sContainer {
    async fn follow(&self, stdout: LogSink<'_>, stderr: LogSink<'_>) -> Result<(), DriverError> {
        let (out, err) = tokio::join!(
            self.follow_stream(Stream::Stdout, stdout),
            self.follow_stream(Stream::Stderr, stderr)
        );
        out.and(err)
    }
}

#[cfg(test)]
mod tests {
    use crate::logs;

    #[test]
    fn log_requests_ask_for_one_stream() {
        let request = logs::request("ns", "p", logs::Stream::Stderr, true).unwrap();
        assert_eq!(
            request.uri().to_string(),
            "/api/v1/namespaces/ns/pods/p/log?container=task&stream=Stderr&follow=true"
        );
    }
}
