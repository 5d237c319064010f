//! JSON framing shared by the QMP and QGA codecs: bytes in, whole JSON values out.
//!
//! Both protocols send one JSON object after another (QMP ends each with `\r\n`, QGA with
//! `\n`, neither promises it), so the decoder does not split on newlines: it parses as far as a
//! complete value goes and keeps the rest for the next read. QGA additionally marks the start
//! of a `guest-sync-delimited` answer with a 0xFF byte, which tells the reader to throw away
//! whatever came before it (a half-written stale answer, for example).

use serde_json::Value;

/// The byte QGA sends before a `guest-sync-delimited` answer, and that a client sends to make
/// the agent drop a half-parsed request.
pub const SYNC_SENTINEL: u8 = 0xFF;

/// A stream of bytes did not hold JSON where a value was expected.
#[derive(Debug, thiserror::Error)]
#[error("malformed JSON from `{peer}` near `{excerpt}`")]
pub struct MalformedJson {
    pub peer: &'static str,
    pub excerpt: String,
    #[source]
    pub source: serde_json::Error,
}

/// Accumulates bytes and yields complete JSON values in order.
#[derive(Debug)]
pub struct JsonStream {
    peer: &'static str,
    buffer: Vec<u8>,
    /// When set, bytes are discarded until a [`SYNC_SENTINEL`] has been seen.
    await_sentinel: bool,
}

impl JsonStream {
    pub fn new(peer: &'static str) -> Self {
        JsonStream {
            peer,
            buffer: Vec::new(),
            await_sentinel: false,
        }
    }

    /// Discards input up to and including the next 0xFF byte (QGA's delimited sync).
    pub fn await_sentinel(&mut self) {
        self.await_sentinel = true;
        self.drop_to_sentinel();
    }

    pub fn push(&mut self, bytes: &[u8]) {
        self.buffer.extend_from_slice(bytes);
        self.drop_to_sentinel();
    }

    fn drop_to_sentinel(&mut self) {
        // A sentinel anywhere means the agent restarted its answer: what precedes it is stale.
        if let Some(position) = self.buffer.iter().rposition(|&b| b == SYNC_SENTINEL) {
            self.buffer.drain(..=position);
            self.await_sentinel = false;
        } else if self.await_sentinel {
            self.buffer.clear();
        }
    }

    /// The next complete value, `Ok(None)` when more bytes are needed.
    pub fn next_value(&mut self) -> Result<Option<Value>, MalformedJson> {
        if self.await_sentinel {
            return Ok(None);
        }
        let start = self
            .buffer
            .iter()
            .position(|b| !b.is_ascii_whitespace())
            .unwrap_or(self.buffer.len());
        if start == self.buffer.len() {
            self.buffer.clear();
            return Ok(None);
        }
        let mut values = serde_json::Deserializer::from_slice(&self.buffer[start..]).into_iter();
        match values.next() {
            Some(Ok(value)) => {
                let consumed = start + values.byte_offset();
                self.buffer.drain(..consumed);
                Ok(Some(value))
            }
            Some(Err(error)) if error.is_eof() => Ok(None),
            Some(Err(error)) => {
                let excerpt =
                    String::from_utf8_lossy(&self.buffer[start..self.buffer.len().min(start + 80)])
                        .into_owned();
                self.buffer.clear();
                Err(MalformedJson {
                    peer: self.peer,
                    excerpt,
                    source: error,
                })
            }
            None => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn drain(stream: &mut JsonStream) -> Vec<Value> {
        let mut values = Vec::new();
        while let Some(value) = stream.next_value().expect("valid json") {
            values.push(value);
        }
        values
    }

    #[test]
    fn values_split_across_reads_are_joined() {
        let mut stream = JsonStream::new("test");
        stream.push(b"{\"return\": {\"a\"");
        assert_eq!(drain(&mut stream), Vec::<Value>::new());
        stream.push(b": 1}}\r\n{\"event\": \"STOP\"}\r\n{\"ret");
        assert_eq!(
            drain(&mut stream),
            vec![json!({"return": {"a": 1}}), json!({"event": "STOP"})]
        );
        stream.push(b"urn\": 2}");
        assert_eq!(drain(&mut stream), vec![json!({"return": 2})]);
    }

    #[test]
    fn values_without_newlines_between_them_are_split() {
        let mut stream = JsonStream::new("test");
        stream.push(b"{\"return\":1}{\"return\":2}");
        assert_eq!(
            drain(&mut stream),
            vec![json!({"return": 1}), json!({"return": 2})]
        );
    }

    #[test]
    fn sentinel_discards_stale_bytes_before_it() {
        let mut stream = JsonStream::new("test");
        stream.push(b"{\"return\": {\"pid\": 4");
        stream.push(&[SYNC_SENTINEL]);
        stream.push(b"{\"return\": 77}\n");
        assert_eq!(drain(&mut stream), vec![json!({"return": 77})]);
    }

    #[test]
    fn awaiting_sentinel_ignores_complete_values_before_it() {
        let mut stream = JsonStream::new("test");
        stream.push(b"{\"return\": 1}\n");
        stream.await_sentinel();
        stream.push(b"{\"return\": 2}\n");
        assert_eq!(drain(&mut stream), Vec::<Value>::new());
        stream.push(&[SYNC_SENTINEL]);
        stream.push(b"{\"return\": 3}\n");
        assert_eq!(drain(&mut stream), vec![json!({"return": 3})]);
    }

    #[test]
    fn garbage_is_an_error_and_is_dropped() {
        let mut stream = JsonStream::new("test");
        stream.push(b"not json\n");
        let error = stream.next_value().expect_err("garbage");
        assert!(error.to_string().contains("`test`"), "{error}");
        stream.push(b"{\"return\": 1}");
        assert_eq!(drain(&mut stream), vec![json!({"return": 1})]);
    }
}
