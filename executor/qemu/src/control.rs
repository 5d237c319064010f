//! The host end of the guest's control port (`org.ci-exec.control.0`), served by our PID 1
//! (`guest-image/init/src/control.rs`): set the clock and mount the share without a
//! `guest-exec` (each exec of a dynamically linked program costs tens of milliseconds under
//! TCG; the shell that did this through the agent took ~0.8 s after a warm restore).
//!
//! QEMU connects to a socket the driver listens on (`server=off`), so the port's host end is
//! connected from the start and the guest's reader blocks instead of spinning. The guest
//! greets with [`HELLO`] when it opens the port: a guest whose init does not, or an image made
//! before the port existed, is driven through the agent instead.
//!
//! Lines of text; each request gets one answer, `ok` or `error <message>`.

use std::path::Path;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};

use crate::error::ProtocolError;
use crate::socket::read_some;

/// The port's name in the guest.
pub const PORT: &str = "org.ci-exec.control.0";
/// The guest's greeting, `ci-exec-init control <version>`. Version 1: the requests `time`
/// and `mount9p`, and `ci-exec-init --follow`; version 2 adds `ci-exec-init --task`.
pub const HELLO_PREFIX: &str = "ci-exec-init control ";

/// The protocol version the guest greets with (`None` for another line).
pub fn greeting_version(line: &str) -> Option<u32> {
    line.strip_prefix(HELLO_PREFIX)?
        .trim()
        .parse()
        .ok()
        .filter(|version| *version > 0)
}

/// Splits bytes into lines; no I/O.
#[derive(Debug, Default)]
pub struct LineCodec {
    pending: Vec<u8>,
}

impl LineCodec {
    pub fn push(&mut self, bytes: &[u8]) {
        self.pending.extend_from_slice(bytes);
    }

    /// The next complete line, without its newline.
    pub fn next_line(&mut self) -> Option<String> {
        let end = self.pending.iter().position(|&byte| byte == b'\n')?;
        let line: Vec<u8> = self.pending.drain(..=end).collect();
        Some(
            String::from_utf8_lossy(&line[..end])
                .trim_end_matches('\r')
                .to_owned(),
        )
    }
}

/// The request that sets the guest clock to `since_epoch`.
pub fn time_request(since_epoch: Duration) -> String {
    format!(
        "time {}.{:09}\n",
        since_epoch.as_secs(),
        since_epoch.subsec_nanos()
    )
}

/// The request that mounts 9p export `tag` at `target` with mount options `options`.
pub fn mount_request(tag: &str, target: &str, options: &str) -> String {
    format!("mount9p {tag} {target} {options}\n")
}

/// The request that mounts filesystem `fstype` from source `tag` at `target`, with mount options
/// `options` when not empty (`mountfs virtiofs ci /mnt/ci`), for a guest whose greeting says
/// version [`MOUNTFS_VERSION`] or later.
pub fn mountfs_request(fstype: &str, tag: &str, target: &str, options: &str) -> String {
    if options.is_empty() {
        format!("mountfs {fstype} {tag} {target}\n")
    } else {
        format!("mountfs {fstype} {tag} {target} {options}\n")
    }
}

/// The first greeting version that answers [`mountfs_request`].
pub const MOUNTFS_VERSION: u32 = 4;

/// The question whether `path` was modified after `reference` (`[ path -nt reference ]`),
/// answered `yes` or `no` by a guest whose greeting says version [`NEWER_VERSION`] or later.
pub fn newer_request(path: &str, reference: &str) -> String {
    format!("newer {path} {reference}\n")
}

/// The first greeting version that answers [`newer_request`].
pub const NEWER_VERSION: u32 = 3;

/// What an answer line means: `Ok` or the guest's error message.
pub fn parse_answer(line: &str) -> Result<(), String> {
    match line {
        "ok" => Ok(()),
        _ => Err(line.strip_prefix("error ").unwrap_or(line).to_owned()),
    }
}

/// The connection QEMU made to our listener, or any other byte stream to the same guest port
/// (the vz driver's vsock connection).
#[derive(Debug)]
pub struct ControlClient<S = UnixStream> {
    socket: S,
    codec: LineCodec,
    /// The protocol version the guest greeted with (or is known to serve); 0 before a greeting.
    version: u32,
}

impl ControlClient<UnixStream> {
    /// Listens on `path` (before QEMU starts: it connects once, at start).
    pub fn listen(path: &Path) -> Result<UnixListener, ProtocolError> {
        let _ = std::fs::remove_file(path);
        UnixListener::bind(path).map_err(|source| ProtocolError::Connect {
            peer: "control",
            path: path.to_owned(),
            source,
        })
    }

    /// Takes QEMU's connection. `version` is the protocol version of a guest already known to
    /// serve the port (a VM restored from a state saved after the greeting), else 0.
    pub async fn accept(listener: &UnixListener, version: u32) -> Result<Self, ProtocolError> {
        let (socket, _) = listener
            .accept()
            .await
            .map_err(|source| ProtocolError::Read {
                peer: "control",
                source,
            })?;
        Ok(ControlClient::from_stream(socket, version))
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> ControlClient<S> {
    /// A client over a connected `socket`; `version` as for [`ControlClient::accept`].
    pub fn from_stream(socket: S, version: u32) -> Self {
        ControlClient {
            socket,
            codec: LineCodec::default(),
            version,
        }
    }

    pub fn serves(&self) -> bool {
        self.version > 0
    }

    /// Waits up to `timeout` for the guest's greeting; returns the protocol version the guest
    /// serves (0: none, drive it through the agent).
    pub async fn await_hello(&mut self, timeout: Duration) -> u32 {
        if self.version > 0 {
            return self.version;
        }
        match tokio::time::timeout(timeout, self.read_line()).await {
            Ok(Ok(line)) => match greeting_version(&line) {
                Some(version) => self.version = version,
                None => tracing::debug!(%line, "control: unexpected greeting"),
            },
            Ok(Err(error)) => tracing::debug!(%error, "control: no greeting"),
            Err(_) => tracing::debug!("control: no greeting; using the guest agent"),
        }
        self.version
    }

    /// Sends `requests` (whole lines) at once.
    pub async fn send(&mut self, requests: &[String]) -> Result<(), ProtocolError> {
        let bytes = requests.concat();
        tracing::trace!(peer = "control", sent = %bytes.trim_end());
        self.socket
            .write_all(bytes.as_bytes())
            .await
            .map_err(|source| ProtocolError::Write {
                peer: "control",
                source,
            })
    }

    /// Reads the answers to `requests` (as sent by [`ControlClient::send`]), in order.
    pub async fn answers(
        &mut self,
        requests: &[String],
        timeout: Duration,
    ) -> Result<(), ProtocolError> {
        for request in requests {
            let line = self.read_answer(request, timeout).await?;
            parse_answer(&line).map_err(|description| ProtocolError::Command {
                peer: "control",
                command: request.trim_end().to_owned(),
                class: "GuestError".to_owned(),
                description,
            })?;
        }
        Ok(())
    }

    /// Reads the answer line to `request`, waiting up to `timeout`.
    async fn read_answer(
        &mut self,
        request: &str,
        timeout: Duration,
    ) -> Result<String, ProtocolError> {
        tokio::time::timeout(timeout, self.read_line())
            .await
            .map_err(|_| ProtocolError::Timeout {
                peer: "control",
                command: request.trim_end().to_owned(),
                after: timeout,
            })?
    }

    /// Sends one question (a [`newer_request`]) and reads its `yes` or `no`.
    pub async fn ask(&mut self, request: &str, timeout: Duration) -> Result<bool, ProtocolError> {
        self.send(&[request.to_owned()]).await?;
        let line = self.read_answer(request, timeout).await?;
        match line.as_str() {
            "yes" => Ok(true),
            "no" => Ok(false),
            other => Err(ProtocolError::Command {
                peer: "control",
                command: request.trim_end().to_owned(),
                class: "GuestError".to_owned(),
                description: other.strip_prefix("error ").unwrap_or(other).to_owned(),
            }),
        }
    }

    async fn read_line(&mut self) -> Result<String, ProtocolError> {
        let mut buffer = [0u8; 1024];
        loop {
            if let Some(line) = self.codec.next_line() {
                tracing::trace!(peer = "control", received = %line);
                return Ok(line);
            }
            let received = read_some(&mut self.socket, &mut buffer, "control").await?;
            self.codec.push(received);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_split_across_reads() {
        let mut codec = LineCodec::default();
        codec.push(b"ci-exec-init con");
        assert_eq!(codec.next_line(), None);
        codec.push(b"trol 1\nok\r\nerror mount `ci`: No such device\npart");
        let hello = codec.next_line().expect("greeting");
        assert_eq!(greeting_version(&hello), Some(1));
        assert_eq!(codec.next_line().as_deref(), Some("ok"));
        assert_eq!(
            parse_answer(&codec.next_line().expect("line")),
            Err("mount `ci`: No such device".to_owned())
        );
        assert_eq!(codec.next_line(), None);
    }

    #[test]
    fn greetings_carry_a_version() {
        assert_eq!(greeting_version("ci-exec-init control 2"), Some(2));
        assert_eq!(greeting_version("ci-exec-init control 0"), None);
        assert_eq!(greeting_version("ci-exec-init control two"), None);
        assert_eq!(greeting_version("hello"), None);
    }

    #[test]
    fn requests_are_lines_the_guest_parses() {
        assert_eq!(
            time_request(Duration::new(1_700_000_000, 5)),
            "time 1700000000.000000005\n"
        );
        assert_eq!(
            mount_request("ci", "/mnt/ci", "trans=virtio,msize=524288"),
            "mount9p ci /mnt/ci trans=virtio,msize=524288\n"
        );
        assert_eq!(parse_answer("ok"), Ok(()));
        assert_eq!(
            mountfs_request("virtiofs", "ci", "/mnt/ci", ""),
            "mountfs virtiofs ci /mnt/ci\n"
        );
        assert_eq!(
            mountfs_request("virtiofs", "ci", "/mnt/ci", "ro"),
            "mountfs virtiofs ci /mnt/ci ro\n"
        );
    }
}
