//! The vsock transport: the guest agent ([`AGENT_PORT`]) and the control protocol
//! ([`CONTROL_PORT`]) over connections the host opens to ports the guest's init listens on.
//! The protocols are the qemu driver's ([`ci_exec_qemu::qga`], [`ci_exec_qemu::control`]),
//! unchanged: only the byte stream under them differs.
//!
//! The framework hands each connection over as a file descriptor (`VZVirtioSocketConnection`
//! `fileDescriptor`), a socket of its own that is no `AF_UNIX` or `AF_VSOCK` socket on the
//! host. tokio has no type for such a descriptor (`tokio-vsock` speaks Linux `AF_VSOCK`), so
//! [`VsockStream`] is a small `AsyncRead + AsyncWrite` over any stream descriptor through
//! tokio's `AsyncFd`. How a connection is opened is behind [`Connector`], so the boot-time
//! logic here (retry until the guest listens, sync, greeting) runs on Linux against a fake
//! guest on a socket pair.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use ci_exec_qemu::ProtocolError;
use ci_exec_qemu::control::{ControlClient, MOUNTFS_VERSION};
use ci_exec_qemu::qga::QgaClient;
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::VzError;
pub use crate::spec::{AGENT_PORT, CONTROL_PORT};

/// A connected stream socket, read and written without blocking through tokio's reactor.
#[derive(Debug)]
pub struct VsockStream {
    // A `File` only to hold the descriptor and read/write it (`read(2)`/`write(2)` work on any
    // descriptor); it is never treated as a file otherwise.
    fd: AsyncFd<File>,
}

impl VsockStream {
    /// Takes over `fd` (a connected stream socket), making it non-blocking.
    pub fn new(fd: OwnedFd) -> std::io::Result<Self> {
        let raw = fd.as_raw_fd();
        // SAFETY: fcntl on a descriptor we own, with no pointers involved.
        let flags = unsafe { libc::fcntl(raw, libc::F_GETFL) };
        if flags < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: as above.
        if unsafe { libc::fcntl(raw, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: the `File` owns the descriptor and keeps it open, unchanged, for as long as
        // the `AsyncFd` holding it lives.
        let fd = unsafe { AsyncFd::register(File::from(fd)) }.map_err(std::io::Error::from)?;
        Ok(VsockStream { fd })
    }
}

impl AsyncRead for VsockStream {
    fn poll_read(
        self: Pin<&mut Self>,
        context: &mut Context<'_>,
        buffer: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        loop {
            let mut guard = ready!(self.fd.poll_read_ready(context))?;
            let unfilled = buffer.initialize_unfilled();
            match guard.try_io(|inner| inner.get_ref().read(unfilled)) {
                Ok(Ok(read)) => {
                    buffer.advance(read);
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(error)) => return Poll::Ready(Err(error)),
                Err(_would_block) => continue,
            }
        }
    }
}

impl AsyncWrite for VsockStream {
    fn poll_write(
        self: Pin<&mut Self>,
        context: &mut Context<'_>,
        bytes: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        loop {
            let mut guard = ready!(self.fd.poll_write_ready(context))?;
            match guard.try_io(|inner| inner.get_ref().write(bytes)) {
                Ok(result) => return Poll::Ready(result),
                Err(_would_block) => continue,
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let fd = self.fd.get_ref().as_fd().as_raw_fd();
        // SAFETY: shutdown on a descriptor we own, with no pointers involved.
        if unsafe { libc::shutdown(fd, libc::SHUT_WR) } < 0 {
            return Poll::Ready(Err(std::io::Error::last_os_error()));
        }
        Poll::Ready(Ok(()))
    }
}

/// Opens a connection to a vsock port the guest listens on.
#[async_trait]
pub trait Connector: Send + Sync {
    /// Connects to `port`; fails while nothing in the guest listens there yet.
    async fn connect(&self, port: u32) -> Result<VsockStream, VzError>;

    /// Errors when the VM has stopped (a guest panic, a crash): no use waiting for it.
    fn check_running(&self, stage: &str) -> Result<(), VzError>;

    /// The last lines of the guest's console, for errors.
    fn console_tail(&self) -> String;
}

/// How long one agent handshake may take before the host tries again.
const SYNC_ATTEMPT: Duration = Duration::from_millis(500);
/// How long one connection attempt may take. The framework documents that connecting to a
/// port nobody listens on "does nothing": its completion handler may never be called, so an
/// attempt that hangs counts as a refusal.
const CONNECT_ATTEMPT: Duration = Duration::from_secs(2);

/// Connects to `port`, giving up after `limit`.
async fn connect_within(
    connector: &dyn Connector,
    port: u32,
    limit: Duration,
) -> Result<VsockStream, VzError> {
    match tokio::time::timeout(limit, connector.connect(port)).await {
        Ok(connected) => connected,
        Err(_) => {
            let stage = format!("connect to vsock port {port}");
            let source = |peer| ProtocolError::Timeout {
                peer,
                command: "connect".to_owned(),
                after: limit,
            };
            Err(if port == AGENT_PORT {
                VzError::Agent {
                    stage,
                    source: source("qga"),
                }
            } else {
                VzError::Control {
                    stage,
                    source: source("control"),
                }
            })
        }
    }
}
/// The longest pause between connection attempts while the guest boots.
const MAX_RETRY_INTERVAL: Duration = Duration::from_millis(100);

/// Connects to the guest agent as soon as the guest serves it and completes the agent's
/// handshake (0xFF sentinel and `guest-sync-delimited`), retrying until `boot_timeout`.
pub async fn connect_agent(
    connector: &dyn Connector,
    boot_timeout: Duration,
) -> Result<QgaClient<VsockStream>, VzError> {
    let deadline = Instant::now() + boot_timeout;
    let timed_out = || VzError::BootTimeout {
        after: boot_timeout,
        console: connector.console_tail(),
    };
    let mut interval = Duration::from_millis(5);
    loop {
        connector.check_running("boot")?;
        let attempt = CONNECT_ATTEMPT.min(deadline.saturating_duration_since(Instant::now()));
        match connect_within(connector, AGENT_PORT, attempt).await {
            Ok(stream) => {
                let mut agent = QgaClient::from_stream(stream);
                // The same connection is synced again after a timeout (a slow guest); a
                // broken one is replaced.
                loop {
                    let attempt_end = (Instant::now() + SYNC_ATTEMPT).min(deadline);
                    match agent.sync(SYNC_ATTEMPT, attempt_end).await {
                        Ok(()) => return Ok(agent),
                        Err(ProtocolError::Timeout { .. }) if Instant::now() < deadline => {
                            connector.check_running("boot")?;
                        }
                        Err(ProtocolError::Timeout { .. }) => return Err(timed_out()),
                        Err(error) => {
                            tracing::debug!(%error, "vsock agent connection lost; reconnecting");
                            break;
                        }
                    }
                }
            }
            Err(error) => tracing::trace!(%error, "guest agent not listening yet"),
        }
        if Instant::now() >= deadline {
            return Err(timed_out());
        }
        tokio::time::sleep(interval).await;
        interval = (interval * 2).min(MAX_RETRY_INTERVAL);
    }
}

/// Connects to the control port and reads the greeting. The vz guest must serve control
/// version [`MOUNTFS_VERSION`] (`mountfs`, for virtiofs); an older init is an error that says
/// to rebuild the image.
pub async fn connect_control(
    connector: &dyn Connector,
    timeout: Duration,
) -> Result<ControlClient<VsockStream>, VzError> {
    let control_error = |source| VzError::Control {
        stage: "connect".to_owned(),
        source,
    };
    let stream = connect_within(connector, CONTROL_PORT, timeout).await?;
    let mut control = ControlClient::from_stream(stream, 0);
    let version = control.await_hello(timeout).await;
    if version < MOUNTFS_VERSION {
        return Err(control_error(ProtocolError::Unexpected {
            peer: "control",
            message: format!(
                "the guest serves control version {version}, and vz needs {MOUNTFS_VERSION} \
                 (`mountfs`); rebuild the image with `ci-exec image build --arch aarch64`"
            ),
        }));
    }
    Ok(control)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};

    use ci_exec_qemu::control;
    use serde_json::{Value, json};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::UnixStream;

    use super::*;

    /// Our end as a [`VsockStream`], the guest's as a tokio stream.
    fn pair() -> (VsockStream, UnixStream) {
        let (host, guest) = std::os::unix::net::UnixStream::pair().expect("socketpair");
        guest.set_nonblocking(true).expect("nonblocking");
        (
            VsockStream::new(OwnedFd::from(host)).expect("vsock stream"),
            UnixStream::from_std(guest).expect("tokio stream"),
        )
    }

    /// A guest agent: answers the QGA subset our init serves, newline-framed JSON with the
    /// 0xFF sentinel before each `guest-sync-delimited` answer.
    async fn fake_agent(mut stream: UnixStream) {
        let mut pending = Vec::new();
        let mut buffer = [0u8; 4096];
        loop {
            let Ok(read) = stream.read(&mut buffer).await else {
                return;
            };
            if read == 0 {
                return;
            }
            pending.extend_from_slice(&buffer[..read]);
            while let Some(end) = pending.iter().position(|&byte| byte == b'\n') {
                let line: Vec<u8> = pending.drain(..=end).collect();
                let line: Vec<u8> = line.into_iter().filter(|&byte| byte != 0xFF).collect();
                let request: Value = serde_json::from_slice(&line).expect("json request");
                let mut answer = match request["execute"].as_str() {
                    Some("guest-sync-delimited") => {
                        let mut bytes = vec![0xFF];
                        bytes.extend_from_slice(
                            json!({"return": request["arguments"]["id"]})
                                .to_string()
                                .as_bytes(),
                        );
                        bytes
                    }
                    Some("guest-exec") => json!({"return": {"pid": 42}, "id": request["id"]})
                        .to_string()
                        .into_bytes(),
                    Some("guest-exec-status") => json!({
                        "return": {"exited": true, "exitcode": 0, "out-data": "aGk="},
                        "id": request["id"],
                    })
                    .to_string()
                    .into_bytes(),
                    other => panic!("unexpected request {other:?}"),
                };
                answer.push(b'\n');
                if stream.write_all(&answer).await.is_err() {
                    return;
                }
            }
        }
    }

    /// A guest init's control port: greets with `version`, answers `ok`, records the lines.
    async fn fake_control(mut stream: UnixStream, version: u32, lines: Arc<Mutex<Vec<String>>>) {
        let hello = format!("{}{version}\n", control::HELLO_PREFIX);
        if stream.write_all(hello.as_bytes()).await.is_err() {
            return;
        }
        let mut codec = control::LineCodec::default();
        let mut buffer = [0u8; 1024];
        loop {
            let Ok(read) = stream.read(&mut buffer).await else {
                return;
            };
            if read == 0 {
                return;
            }
            codec.push(&buffer[..read]);
            while let Some(line) = codec.next_line() {
                lines.lock().expect("lock").push(line);
                if stream.write_all(b"ok\n").await.is_err() {
                    return;
                }
            }
        }
    }

    /// A VM whose guest listens on the agent port after `refusals` connection attempts.
    struct FakeGuest {
        refusals: usize,
        /// Attempts before the guest listens hang instead of failing.
        hang: bool,
        attempts: AtomicUsize,
        control_version: u32,
        control_lines: Arc<Mutex<Vec<String>>>,
        running: bool,
    }

    impl FakeGuest {
        fn new(refusals: usize, control_version: u32) -> Self {
            FakeGuest {
                refusals,
                hang: false,
                attempts: AtomicUsize::new(0),
                control_version,
                control_lines: Arc::default(),
                running: true,
            }
        }
    }

    #[async_trait]
    impl Connector for FakeGuest {
        async fn connect(&self, port: u32) -> Result<VsockStream, VzError> {
            if self.attempts.fetch_add(1, Ordering::SeqCst) < self.refusals {
                if self.hang {
                    std::future::pending::<()>().await;
                }
                return Err(crate::entitlement::framework_error(
                    format!("connect to vsock port {port}"),
                    "Connection reset by peer",
                ));
            }
            let (host, guest) = pair();
            match port {
                AGENT_PORT => drop(tokio::spawn(fake_agent(guest))),
                CONTROL_PORT => drop(tokio::spawn(fake_control(
                    guest,
                    self.control_version,
                    self.control_lines.clone(),
                ))),
                other => panic!("unexpected port {other}"),
            }
            Ok(host)
        }

        fn check_running(&self, stage: &str) -> Result<(), VzError> {
            if self.running {
                Ok(())
            } else {
                Err(VzError::Stopped {
                    stage: stage.to_owned(),
                    console: self.console_tail(),
                })
            }
        }

        fn console_tail(&self) -> String {
            "[    0.000000] Booting Linux on physical CPU 0x0".to_owned()
        }
    }

    #[tokio::test]
    async fn the_agent_is_reached_once_the_guest_listens_and_runs_commands() {
        let guest = FakeGuest::new(3, 4);
        let mut agent = connect_agent(&guest, Duration::from_secs(10))
            .await
            .expect("agent");
        assert_eq!(guest.attempts.load(Ordering::SeqCst), 4);
        let timeout = Duration::from_secs(5);
        let pid = agent
            .exec(
                "/bin/sh",
                &["-c".to_owned(), "true".to_owned()],
                &[],
                true,
                timeout,
            )
            .await
            .expect("guest-exec");
        assert_eq!(pid, 42);
        let status = agent.exec_status(pid, timeout).await.expect("status");
        assert_eq!((status.shell_code(), status.stdout), (0, b"hi".to_vec()));
    }

    #[tokio::test]
    async fn a_connection_attempt_that_hangs_is_retried() {
        let mut guest = FakeGuest::new(2, 4);
        guest.hang = true;
        connect_agent(&guest, Duration::from_secs(60))
            .await
            .expect("agent after two hung attempts");
        assert_eq!(guest.attempts.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn a_guest_that_never_listens_is_a_boot_timeout_with_the_console() {
        let guest = FakeGuest::new(usize::MAX, 4);
        let error = connect_agent(&guest, Duration::from_millis(200))
            .await
            .expect_err("never listens");
        let text = error.to_string();
        assert!(
            text.starts_with("guest did not become ready within"),
            "{text}"
        );
        assert!(text.contains("Booting Linux"), "{text}");
    }

    #[tokio::test]
    async fn a_stopped_vm_ends_the_wait_at_once() {
        let mut guest = FakeGuest::new(usize::MAX, 4);
        guest.running = false;
        let started = Instant::now();
        let error = connect_agent(&guest, Duration::from_secs(60))
            .await
            .expect_err("stopped");
        assert!(matches!(error, VzError::Stopped { .. }), "{error}");
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[tokio::test]
    async fn the_control_port_greets_and_mounts_the_share_over_virtiofs() {
        let guest = FakeGuest::new(0, 4);
        let mut control = connect_control(&guest, Duration::from_secs(5))
            .await
            .expect("control");
        let requests = vec![control::mountfs_request("virtiofs", "ci", "/mnt/ci", "")];
        control.send(&requests).await.expect("send");
        control
            .answers(&requests, Duration::from_secs(5))
            .await
            .expect("ok");
        assert_eq!(
            *guest.control_lines.lock().expect("lock"),
            vec!["mountfs virtiofs ci /mnt/ci".to_owned()]
        );
    }

    #[tokio::test]
    async fn an_init_without_mountfs_is_refused_with_the_rebuild_command() {
        let guest = FakeGuest::new(0, 3);
        let error = connect_control(&guest, Duration::from_secs(5))
            .await
            .expect_err("version 3");
        let text = ci_exec_driver::error_chain(&error);
        assert!(text.contains("control version 3"), "{text}");
        assert!(
            text.contains("ci-exec image build --arch aarch64"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn the_stream_carries_bytes_both_ways_and_shuts_down() {
        let (mut host, mut guest) = pair();
        let payload: Vec<u8> = (0..=255u8).cycle().take(1 << 20).collect();
        let expected = payload.clone();
        let reader = tokio::spawn(async move {
            let mut received = Vec::new();
            guest.read_to_end(&mut received).await.expect("read");
            guest.write_all(b"bye").await.expect("write");
            received
        });
        host.write_all(&payload).await.expect("write");
        host.shutdown().await.expect("shutdown");
        assert_eq!(reader.await.expect("join"), expected);
        let mut answer = Vec::new();
        host.read_to_end(&mut answer).await.expect("read");
        assert_eq!(answer, b"bye");
    }
}
