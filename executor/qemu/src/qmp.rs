//! QMP, the QEMU Machine Protocol: a sans-IO codec and a thin client over a Unix socket.
//!
//! Why not the `qapi` crate: its generated schema is QEMU 9.1's, and a QMP event that schema
//! does not know (QEMU 7.2 and 10.x both send some) makes it drop the connection. Lifecycle
//! needs a handful of commands (`qmp_capabilities`, `query-status`, `stop`, `cont`, `migrate`,
//! `query-migrate`, `blockdev-snapshot-sync`, `quit`), so a small client that keeps events as
//! plain `(name, data)` pairs is shorter than working around the schema.

use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;
use tokio::net::UnixStream;

use crate::error::ProtocolError;
use crate::socket::read_some;
use crate::wire::JsonStream;

/// One message from QEMU's monitor.
#[derive(Debug, Clone, PartialEq)]
pub enum QmpMessage {
    /// The greeting QEMU sends on connect; `version` is e.g. `7.2.22`.
    Greeting {
        version: String,
    },
    Return {
        id: Option<u64>,
        value: Value,
    },
    Error {
        id: Option<u64>,
        class: String,
        description: String,
    },
    /// Any event, known to us or not.
    Event {
        name: String,
        data: Value,
    },
}

/// Encodes commands with fresh ids and decodes messages; does no I/O.
#[derive(Debug)]
pub struct QmpCodec {
    stream: JsonStream,
    next_id: u64,
}

impl Default for QmpCodec {
    fn default() -> Self {
        QmpCodec {
            stream: JsonStream::new("qmp"),
            next_id: 1,
        }
    }
}

impl QmpCodec {
    /// The bytes of command `name` with `arguments` (`Value::Null` for none) and its id.
    pub fn encode(&mut self, name: &str, arguments: Value) -> (u64, Vec<u8>) {
        let id = self.next_id;
        self.next_id += 1;
        let mut command = json!({ "execute": name, "id": id });
        if !arguments.is_null() {
            command["arguments"] = arguments;
        }
        let mut bytes = command.to_string().into_bytes();
        bytes.extend_from_slice(b"\r\n");
        (id, bytes)
    }

    pub fn push(&mut self, bytes: &[u8]) {
        self.stream.push(bytes);
    }

    /// The next complete message, `Ok(None)` when more bytes are needed.
    pub fn next_message(&mut self) -> Result<Option<QmpMessage>, ProtocolError> {
        let Some(value) = self.stream.next_value()? else {
            return Ok(None);
        };
        parse_message(value).map(Some)
    }
}

fn parse_message(value: Value) -> Result<QmpMessage, ProtocolError> {
    let id = value.get("id").and_then(Value::as_u64);
    if let Some(greeting) = value.get("QMP") {
        let qemu = &greeting["version"]["qemu"];
        let version = format!(
            "{}.{}.{}",
            qemu["major"].as_u64().unwrap_or(0),
            qemu["minor"].as_u64().unwrap_or(0),
            qemu["micro"].as_u64().unwrap_or(0)
        );
        return Ok(QmpMessage::Greeting { version });
    }
    if let Some(returned) = value.get("return") {
        return Ok(QmpMessage::Return {
            id,
            value: returned.clone(),
        });
    }
    if let Some(error) = value.get("error") {
        return Ok(QmpMessage::Error {
            id,
            class: error["class"].as_str().unwrap_or("GenericError").to_owned(),
            description: error["desc"].as_str().unwrap_or("").to_owned(),
        });
    }
    if let Some(name) = value.get("event").and_then(Value::as_str) {
        return Ok(QmpMessage::Event {
            name: name.to_owned(),
            data: value.get("data").cloned().unwrap_or(Value::Null),
        });
    }
    Err(ProtocolError::Unexpected {
        peer: "qmp",
        message: value.to_string(),
    })
}

/// A connected, capability-negotiated QMP session. Commands run one at a time.
#[derive(Debug)]
pub struct QmpClient {
    socket: UnixStream,
    codec: QmpCodec,
    version: String,
    /// Events seen while waiting for answers, oldest first.
    events: Vec<(String, Value)>,
}

impl QmpClient {
    /// Connects to `path`, reads the greeting and leaves negotiation mode.
    pub async fn connect(path: &Path, timeout: Duration) -> Result<Self, ProtocolError> {
        let socket = UnixStream::connect(path)
            .await
            .map_err(|source| ProtocolError::Connect {
                peer: "qmp",
                path: path.to_owned(),
                source,
            })?;
        let mut client = QmpClient {
            socket,
            codec: QmpCodec::default(),
            version: String::new(),
            events: Vec::new(),
        };
        let greeting = tokio::time::timeout(timeout, client.read_message())
            .await
            .map_err(|_| ProtocolError::Timeout {
                peer: "qmp",
                command: "greeting".to_owned(),
                after: timeout,
            })??;
        match greeting {
            QmpMessage::Greeting { version } => client.version = version,
            other => {
                return Err(ProtocolError::Unexpected {
                    peer: "qmp",
                    message: format!("{other:?}"),
                });
            }
        }
        client
            .execute("qmp_capabilities", Value::Null, timeout)
            .await?;
        Ok(client)
    }

    /// QEMU's version from the greeting.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// Events received so far; drains them.
    pub fn take_events(&mut self) -> Vec<(String, Value)> {
        std::mem::take(&mut self.events)
    }

    /// Runs command `name` and returns its `return` value.
    pub async fn execute(
        &mut self,
        name: &str,
        arguments: Value,
        timeout: Duration,
    ) -> Result<Value, ProtocolError> {
        let (id, bytes) = self.codec.encode(name, arguments);
        tracing::trace!(peer = "qmp", sent = %String::from_utf8_lossy(&bytes).trim_end());
        self.socket
            .write_all(&bytes)
            .await
            .map_err(|source| ProtocolError::Write {
                peer: "qmp",
                source,
            })?;
        let answer = async {
            loop {
                match self.read_message().await? {
                    QmpMessage::Return {
                        id: Some(answer), ..
                    }
                    | QmpMessage::Error {
                        id: Some(answer), ..
                    } if answer != id => continue,
                    QmpMessage::Return { value, .. } => return Ok(value),
                    QmpMessage::Error {
                        class, description, ..
                    } => {
                        return Err(ProtocolError::Command {
                            peer: "qmp",
                            command: name.to_owned(),
                            class,
                            description,
                        });
                    }
                    QmpMessage::Event { name, data } => self.events.push((name, data)),
                    QmpMessage::Greeting { .. } => continue,
                }
            }
        };
        tokio::time::timeout(timeout, answer)
            .await
            .map_err(|_| ProtocolError::Timeout {
                peer: "qmp",
                command: name.to_owned(),
                after: timeout,
            })?
    }

    async fn read_message(&mut self) -> Result<QmpMessage, ProtocolError> {
        let mut buffer = [0u8; 8192];
        loop {
            if let Some(message) = self.codec.next_message()? {
                return Ok(message);
            }
            let received = read_some(&mut self.socket, &mut buffer, "qmp").await?;
            self.codec.push(received);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_get_fresh_ids_and_crlf() {
        let mut codec = QmpCodec::default();
        let (first, bytes) = codec.encode("qmp_capabilities", Value::Null);
        let (second, _) = codec.encode("stop", Value::Null);
        assert_ne!(first, second);
        let text = String::from_utf8(bytes).expect("utf-8");
        assert!(text.ends_with("\r\n"));
        let value: Value = serde_json::from_str(text.trim_end()).expect("json");
        assert_eq!(value, json!({"execute": "qmp_capabilities", "id": first}));
    }

    #[test]
    fn arguments_are_sent_when_given() {
        let mut codec = QmpCodec::default();
        let (id, bytes) = codec.encode("migrate", json!({"uri": "exec:cat > x"}));
        let value: Value = serde_json::from_slice(&bytes).expect("json");
        assert_eq!(
            value,
            json!({"execute": "migrate", "id": id, "arguments": {"uri": "exec:cat > x"}})
        );
    }

    #[test]
    fn messages_are_decoded_by_kind() {
        let mut codec = QmpCodec::default();
        codec.push(
            br#"{"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": "Debian"}, "capabilities": ["oob"]}}
{"return": {}, "id": 1}
{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "SOME_EVENT_FROM_QEMU_11", "data": {"x": 1}}
{"id": 2, "error": {"class": "GenericError", "desc": "no such device"}}
"#,
        );
        let mut messages = Vec::new();
        while let Some(message) = codec.next_message().expect("valid") {
            messages.push(message);
        }
        assert_eq!(
            messages,
            vec![
                QmpMessage::Greeting {
                    version: "7.2.22".to_owned()
                },
                QmpMessage::Return {
                    id: Some(1),
                    value: json!({})
                },
                QmpMessage::Event {
                    name: "SOME_EVENT_FROM_QEMU_11".to_owned(),
                    data: json!({"x": 1})
                },
                QmpMessage::Error {
                    id: Some(2),
                    class: "GenericError".to_owned(),
                    description: "no such device".to_owned()
                },
            ]
        );
    }

    #[test]
    fn an_object_of_no_known_kind_is_an_error() {
        let mut codec = QmpCodec::default();
        codec.push(b"{\"what\": 1}");
        assert!(codec.next_message().is_err());
    }
}
