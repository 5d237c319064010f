//! Reading a container's stdout and stderr apart, with follow that survives a dropped stream.
//!
//! kube's `LogParams` has no `stream` field, so the request is built here: the log endpoint's
//! `stream=Stdout|Stderr` parameter is the only way the API gives the two streams apart
//! (without it, both come interleaved).
//!
//! A dropped follow stream is resumed by byte offset: the endpoint has no offset parameter, so
//! the new stream starts from the beginning again and the bytes already written are skipped.

use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncWriteExt};

use ci_exec_driver::LogSink;

use crate::CONTAINER;

/// Which of the container's output streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

impl Stream {
    fn query(self) -> &'static str {
        match self {
            Stream::Stdout => "Stdout",
            Stream::Stderr => "Stderr",
        }
    }
}

/// `GET …/pods/{pod}/log` for one stream of the task container.
pub fn request(
    namespace: &str,
    pod: &str,
    stream: Stream,
    follow: bool,
) -> Result<http::Request<Vec<u8>>, http::Error> {
    let mut uri = format!(
        "/api/v1/namespaces/{namespace}/pods/{pod}/log?container={CONTAINER}&stream={}",
        stream.query()
    );
    if follow {
        uri.push_str("&follow=true");
    }
    http::Request::get(uri).body(Vec::new())
}

/// Copies `reader` to `sink`, skipping the bytes of it that an earlier connection already
/// wrote (`written` of them), and counts what it writes into `written`.
///
/// A read error ends the copy like the end of the stream does (the connection dropped); a
/// write error is the caller's and is returned.
pub async fn copy_from_offset(
    mut reader: impl AsyncBufRead + Unpin,
    written: &mut u64,
    sink: LogSink<'_>,
) -> std::io::Result<()> {
    let mut position: u64 = 0;
    loop {
        let chunk = match reader.fill_buf().await {
            Ok([]) | Err(_) => break,
            Ok(chunk) => chunk,
        };
        let length = chunk.len();
        let end = position + length as u64;
        if end > *written {
            let start = usize::try_from(written.saturating_sub(position)).unwrap_or(length);
            sink.write_all(&chunk[start..]).await?;
            *written = end;
        }
        position = end;
        reader.consume(length);
    }
    sink.flush().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_resumed_stream_neither_repeats_nor_loses_bytes() {
        let mut sink = Vec::new();
        let mut written = 0;
        // The first connection drops after 4 bytes; the second starts over and goes further.
        copy_from_offset(&b"abcd"[..], &mut written, &mut sink)
            .await
            .unwrap();
        copy_from_offset(&b"abcdefg"[..], &mut written, &mut sink)
            .await
            .unwrap();
        copy_from_offset(&b"abcdefghij"[..], &mut written, &mut sink)
            .await
            .unwrap();
        assert_eq!(sink, b"abcdefghij");
        assert_eq!(written, 10);
    }
}
