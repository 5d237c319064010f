//! The QEMU guest agent protocol: a sans-IO codec and a thin client over the host end of the
//! agent's virtio-serial port.
//!
//! The agent has no greeting and keeps no session: a client that gave up on an answer (a
//! timeout) will later read that stale answer as the reply to its next command. So every
//! command carries a fresh id, answers with another id are dropped, and after any timeout the
//! client re-synchronises with the 0xFF sentinel and `guest-sync-delimited` before it sends
//! anything else. (`qapi` 0.15 panics with "duplicate command id" on the command after a
//! timeout and its 9.1 schema sends `capture-output` in a form QEMU 7.2 rejects; hence this
//! client.)

use std::path::Path;
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::UnixStream;

use crate::error::ProtocolError;
use crate::socket::read_some;
use crate::wire::{JsonStream, SYNC_SENTINEL};

/// One answer from the agent.
#[derive(Debug, Clone, PartialEq)]
pub enum QgaMessage {
    Return {
        id: Option<Value>,
        value: Value,
    },
    Error {
        id: Option<Value>,
        class: String,
        description: String,
    },
}

/// Encodes commands and sync requests; decodes answers. No I/O.
#[derive(Debug)]
pub struct QgaCodec {
    stream: JsonStream,
    next_id: u64,
}

impl QgaCodec {
    /// `seed` makes ids differ between clients of one agent (a stale answer to another
    /// process's sync must never match ours).
    pub fn new(seed: u64) -> Self {
        QgaCodec {
            stream: JsonStream::new("qga"),
            next_id: seed,
        }
    }

    fn fresh_id(&mut self) -> u64 {
        self.next_id = self.next_id.wrapping_add(1) & 0x7fff_ffff_ffff;
        self.next_id
    }

    /// The bytes of command `name` and its id.
    pub fn encode(&mut self, name: &str, arguments: Value) -> (u64, Vec<u8>) {
        let id = self.fresh_id();
        let mut command = json!({ "execute": name, "id": id });
        if !arguments.is_null() {
            command["arguments"] = arguments;
        }
        let mut bytes = command.to_string().into_bytes();
        bytes.push(b'\n');
        (id, bytes)
    }

    /// The bytes of a sentinel-led `guest-sync-delimited` and the id its answer must carry.
    /// Also makes the decoder skip input up to the agent's own sentinel.
    pub fn encode_sync(&mut self) -> (u64, Vec<u8>) {
        let id = self.fresh_id();
        let mut bytes = vec![SYNC_SENTINEL];
        bytes.extend_from_slice(
            json!({ "execute": "guest-sync-delimited", "arguments": { "id": id } })
                .to_string()
                .as_bytes(),
        );
        bytes.push(b'\n');
        self.stream.await_sentinel();
        (id, bytes)
    }

    pub fn push(&mut self, bytes: &[u8]) {
        self.stream.push(bytes);
    }

    pub fn next_message(&mut self) -> Result<Option<QgaMessage>, ProtocolError> {
        let Some(value) = self.stream.next_value()? else {
            return Ok(None);
        };
        let id = value.get("id").cloned();
        if let Some(returned) = value.get("return") {
            return Ok(Some(QgaMessage::Return {
                id,
                value: returned.clone(),
            }));
        }
        if let Some(error) = value.get("error") {
            return Ok(Some(QgaMessage::Error {
                id,
                class: error["class"].as_str().unwrap_or("GenericError").to_owned(),
                description: error["desc"].as_str().unwrap_or("").to_owned(),
            }));
        }
        Err(ProtocolError::Unexpected {
            peer: "qga",
            message: value.to_string(),
        })
    }

    /// Whether `message` answers the command with `id`. An answer without an id (agents
    /// older than QEMU 2.x) is taken as ours: after a sync nothing stale is left.
    pub fn answers(message: &QgaMessage, id: u64) -> bool {
        let answer_id = match message {
            QgaMessage::Return { id, .. } | QgaMessage::Error { id, .. } => id,
        };
        answer_id
            .as_ref()
            .is_none_or(|answer| answer.as_u64() == Some(id))
    }
}

/// What `guest-exec-status` reports.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ExecStatus {
    pub exited: bool,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

impl ExecStatus {
    pub fn from_value(value: &Value) -> Result<Self, ProtocolError> {
        let decode = |field: &str| -> Result<Vec<u8>, ProtocolError> {
            match value.get(field).and_then(Value::as_str) {
                None => Ok(Vec::new()),
                Some(text) => base64::engine::general_purpose::STANDARD
                    .decode(text)
                    .map_err(|source| ProtocolError::Base64 {
                        field: field.to_owned(),
                        source,
                    }),
            }
        };
        Ok(ExecStatus {
            exited: value["exited"].as_bool().unwrap_or(false),
            exit_code: value
                .get("exitcode")
                .and_then(Value::as_i64)
                .map(|code| code as i32),
            signal: value
                .get("signal")
                .and_then(Value::as_i64)
                .map(|code| code as i32),
            stdout: decode("out-data")?,
            stderr: decode("err-data")?,
        })
    }

    /// The exit code as a shell reports it (128 + signal for a killed process).
    pub fn shell_code(&self) -> i32 {
        match (self.exit_code, self.signal) {
            (_, Some(signal)) => 128 + signal,
            (Some(code), None) => code,
            (None, None) => 255,
        }
    }
}

/// A client of one guest agent. Commands run one at a time. The stream is the host end of the
/// agent's virtio-serial port (a Unix socket QEMU serves), or any other byte stream to the same
/// agent (the vz driver's vsock connection).
#[derive(Debug)]
pub struct QgaClient<S = UnixStream> {
    socket: S,
    codec: QgaCodec,
    synced: bool,
}

impl QgaClient {
    /// Connects to the host end of the agent's port. Does not talk yet: the agent may not be
    /// up; [`QgaClient::sync`] is the readiness check.
    pub async fn connect(path: &Path) -> Result<Self, ProtocolError> {
        let socket = UnixStream::connect(path)
            .await
            .map_err(|source| ProtocolError::Connect {
                peer: "qga",
                path: path.to_owned(),
                source,
            })?;
        Ok(QgaClient::from_stream(socket))
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> QgaClient<S> {
    /// A client over a connected `socket`. Does not talk yet: [`QgaClient::sync`] is the
    /// readiness check.
    pub fn from_stream(socket: S) -> Self {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|elapsed| elapsed.as_nanos() as u64)
            .unwrap_or(0)
            ^ u64::from(std::process::id()) << 32;
        QgaClient {
            socket,
            codec: QgaCodec::new(seed & 0x7fff_ffff_0000),
            synced: false,
        }
    }

    /// Handshake: sentinel + `guest-sync-delimited` with a fresh id, retried every `attempt`
    /// until the agent answers or `deadline` passes.
    pub async fn sync(
        &mut self,
        attempt: Duration,
        deadline: Instant,
    ) -> Result<(), ProtocolError> {
        loop {
            let (id, bytes) = self.codec.encode_sync();
            self.write(&bytes).await?;
            let attempt_end = (Instant::now() + attempt).min(deadline);
            // Answers to earlier syncs (queued while the agent was not up) come first: skip
            // them until ours arrives or this attempt is over.
            loop {
                let wait = attempt_end.saturating_duration_since(Instant::now());
                match tokio::time::timeout(wait, self.read_answer(id)).await {
                    Ok(Ok(QgaMessage::Return { value, .. })) if value.as_u64() == Some(id) => {
                        self.synced = true;
                        return Ok(());
                    }
                    Ok(Ok(_)) => continue,
                    Ok(Err(error @ ProtocolError::Malformed(_))) => {
                        tracing::debug!(%error, "qga: resyncing after malformed answer");
                        break;
                    }
                    Ok(Err(error)) => return Err(error),
                    Err(_) => break,
                }
            }
            if Instant::now() >= deadline {
                return Err(ProtocolError::Timeout {
                    peer: "qga",
                    command: "guest-sync-delimited".to_owned(),
                    after: attempt,
                });
            }
        }
    }

    /// Runs command `name`; re-syncs first if an earlier command timed out.
    pub async fn execute(
        &mut self,
        name: &str,
        arguments: Value,
        timeout: Duration,
    ) -> Result<Value, ProtocolError> {
        if !self.synced {
            self.sync(timeout, Instant::now() + timeout).await?;
        }
        let (id, bytes) = self.codec.encode(name, arguments);
        self.write(&bytes).await?;
        match tokio::time::timeout(timeout, self.read_answer(id)).await {
            Ok(Ok(QgaMessage::Return { value, .. })) => Ok(value),
            Ok(Ok(QgaMessage::Error {
                class, description, ..
            })) => Err(ProtocolError::Command {
                peer: "qga",
                command: name.to_owned(),
                class,
                description,
            }),
            Ok(Err(error)) => {
                self.synced = false;
                Err(error)
            }
            Err(_) => {
                self.synced = false;
                Err(ProtocolError::Timeout {
                    peer: "qga",
                    command: name.to_owned(),
                    after: timeout,
                })
            }
        }
    }

    /// Starts `path` with `arguments` and exactly the environment `env` (`NAME=value`); output
    /// goes wherever the command line sends it (not captured). Returns the guest pid.
    pub async fn exec(
        &mut self,
        path: &str,
        arguments: &[String],
        env: &[String],
        capture_output: bool,
        timeout: Duration,
    ) -> Result<i64, ProtocolError> {
        // QEMU 7.2 takes `capture-output` as a bool (9.1 added the enum form).
        let value = self
            .execute(
                "guest-exec",
                json!({
                    "path": path,
                    "arg": arguments,
                    "env": env,
                    "capture-output": capture_output,
                }),
                timeout,
            )
            .await?;
        value["pid"]
            .as_i64()
            .ok_or_else(|| ProtocolError::Unexpected {
                peer: "qga",
                message: value.to_string(),
            })
    }

    pub async fn exec_status(
        &mut self,
        pid: i64,
        timeout: Duration,
    ) -> Result<ExecStatus, ProtocolError> {
        let value = self
            .execute("guest-exec-status", json!({ "pid": pid }), timeout)
            .await?;
        ExecStatus::from_value(&value)
    }

    async fn write(&mut self, bytes: &[u8]) -> Result<(), ProtocolError> {
        tracing::trace!(peer = "qga", sent = %String::from_utf8_lossy(bytes).trim());
        self.socket
            .write_all(bytes)
            .await
            .map_err(|source| ProtocolError::Write {
                peer: "qga",
                source,
            })
    }

    async fn read_answer(&mut self, id: u64) -> Result<QgaMessage, ProtocolError> {
        let mut buffer = [0u8; 16384];
        loop {
            while let Some(message) = self.codec.next_message()? {
                if QgaCodec::answers(&message, id) {
                    return Ok(message);
                }
                tracing::debug!(?message, "qga: dropping a stale answer");
            }
            let received = read_some(&mut self.socket, &mut buffer, "qga").await?;
            self.codec.push(received);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn messages(codec: &mut QgaCodec) -> Vec<QgaMessage> {
        let mut all = Vec::new();
        while let Some(message) = codec.next_message().expect("valid") {
            all.push(message);
        }
        all
    }

    #[test]
    fn sync_starts_with_the_sentinel_and_skips_stale_answers() {
        let mut codec = QgaCodec::new(10);
        codec.push(b"{\"return\": {\"pid\": 1}, \"id\": 3}\n{\"return\": {\"pi");
        let (id, bytes) = codec.encode_sync();
        assert_eq!(bytes[0], SYNC_SENTINEL);
        let request: Value = serde_json::from_slice(&bytes[1..]).expect("json");
        assert_eq!(
            request,
            json!({"execute": "guest-sync-delimited", "arguments": {"id": id}})
        );
        // The rest of the stale answer arrives, then the agent's sentinel and our answer.
        codec.push(b"d\": 2}}\n");
        assert_eq!(messages(&mut codec), vec![]);
        codec.push(&[SYNC_SENTINEL]);
        codec.push(format!("{{\"return\": {id}}}\n").as_bytes());
        assert_eq!(
            messages(&mut codec),
            vec![QgaMessage::Return {
                id: None,
                value: json!(id)
            }]
        );
    }

    #[test]
    fn ids_are_fresh_and_answers_match_by_id() {
        let mut codec = QgaCodec::new(0);
        let (first, _) = codec.encode("guest-ping", Value::Null);
        let (second, bytes) = codec.encode("guest-exec-status", json!({"pid": 5}));
        assert_ne!(first, second);
        let request: Value = serde_json::from_slice(&bytes).expect("json");
        assert_eq!(request["id"], json!(second));
        let stale = QgaMessage::Return {
            id: Some(json!(first)),
            value: json!({}),
        };
        let ours = QgaMessage::Return {
            id: Some(json!(second)),
            value: json!({}),
        };
        assert!(!QgaCodec::answers(&stale, second));
        assert!(QgaCodec::answers(&ours, second));
    }

    #[test]
    fn errors_are_decoded() {
        let mut codec = QgaCodec::new(0);
        codec.push(
            br#"{"error": {"class": "GenericError", "desc": "Invalid parameter 'pid'"}, "id": 9}"#,
        );
        assert_eq!(
            messages(&mut codec),
            vec![QgaMessage::Error {
                id: Some(json!(9)),
                class: "GenericError".to_owned(),
                description: "Invalid parameter 'pid'".to_owned()
            }]
        );
    }

    #[test]
    fn exec_status_decodes_output_and_signals() {
        let status = ExecStatus::from_value(
            &json!({"exited": true, "exitcode": 3, "out-data": "aGk=", "err-data": ""}),
        )
        .expect("valid");
        assert_eq!(status.shell_code(), 3);
        assert_eq!(status.stdout, b"hi");
        let killed = ExecStatus::from_value(&json!({"exited": true, "signal": 9})).expect("valid");
        assert_eq!(killed.shell_code(), 137);
        assert!(ExecStatus::from_value(&json!({"exited": true, "out-data": "%%"})).is_err());
    }
}
