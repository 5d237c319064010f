//! Where a job's output goes: live to the terminal and into the recording, with secret values
//! replaced by `***` in both.

use std::io::Write;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use tokio::io::AsyncWrite;

const MASK: &[u8] = b"***";

/// Replaces every occurrence of any secret in a byte stream that arrives in arbitrary chunks.
///
/// It holds back the last `longest secret - 1` bytes of what it has seen, because they may be
/// the start of a secret that the next chunk completes; everything before them is final.
#[derive(Debug, Clone, Default)]
pub struct Redactor {
    secrets: Vec<Vec<u8>>,
    pending: Vec<u8>,
}

impl Redactor {
    pub fn new(secrets: impl IntoIterator<Item = Vec<u8>>) -> Self {
        let mut secrets: Vec<Vec<u8>> = secrets.into_iter().filter(|s| !s.is_empty()).collect();
        // Longest first, so a secret that contains another is masked whole.
        secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
        Redactor {
            secrets,
            pending: Vec::new(),
        }
    }

    fn hold_back(&self) -> usize {
        self.secrets.first().map_or(0, |s| s.len() - 1)
    }

    /// Feeds `chunk`; returns the bytes that are now final.
    pub fn push(&mut self, chunk: &[u8]) -> Vec<u8> {
        if self.secrets.is_empty() {
            return chunk.to_vec();
        }
        self.pending.extend_from_slice(chunk);
        let (out, rest) = self.mask(false);
        self.pending = rest;
        out
    }

    /// Ends the stream; returns what was held back.
    pub fn finish(&mut self) -> Vec<u8> {
        let (out, _) = self.mask(true);
        self.pending.clear();
        out
    }

    /// Masks `pending`, returning (final bytes, bytes still to hold back).
    fn mask(&self, at_end: bool) -> (Vec<u8>, Vec<u8>) {
        let data = &self.pending;
        let mut out = Vec::with_capacity(data.len());
        let mut i = 0;
        let keep_from = if at_end {
            data.len()
        } else {
            data.len().saturating_sub(self.hold_back())
        };
        // Before `keep_from` the longest secret fits in what we have, so every decision there
        // is final; after it, a longer secret might still be completed by the next chunk.
        while i < keep_from {
            if let Some(secret) = self.secrets.iter().find(|s| data[i..].starts_with(s)) {
                out.extend_from_slice(MASK);
                i += secret.len();
            } else {
                out.push(data[i]);
                i += 1;
            }
        }
        (out, data[i.min(data.len())..].to_vec())
    }
}

/// One output stream of a job (stdout or stderr): redacted, then written live to `live` and
/// appended to the recording.
pub struct Stream {
    redactor: Redactor,
    live: Box<dyn Write + Send>,
    recording: Arc<Mutex<Vec<u8>>>,
}

impl std::fmt::Debug for Stream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stream").finish_non_exhaustive()
    }
}

impl Stream {
    pub fn new(live: Box<dyn Write + Send>, secrets: &[Vec<u8>]) -> Self {
        Stream {
            redactor: Redactor::new(secrets.iter().cloned()),
            live,
            recording: Arc::new(Mutex::new(Vec::new())),
        }
    }

    fn emit(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        if bytes.is_empty() {
            return Ok(());
        }
        if let Ok(mut recording) = self.recording.lock() {
            recording.extend_from_slice(bytes);
        }
        // The terminal going away must not fail the job: the recording is what counts.
        let _ = self.live.write_all(bytes).and_then(|()| self.live.flush());
        Ok(())
    }

    /// Writes out whatever the redactor still holds (at the end of a step).
    pub fn finish_step(&mut self) {
        let rest = self.redactor.finish();
        let _ = self.emit(&rest);
    }

    /// Everything recorded so far.
    pub fn recorded(&self) -> Vec<u8> {
        self.recording.lock().map(|r| r.clone()).unwrap_or_default()
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let final_bytes = this.redactor.push(buf);
        Poll::Ready(this.emit(&final_bytes).map(|()| buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn redact_in_chunks(secrets: &[&str], input: &[u8], chunk: usize) -> Vec<u8> {
        let mut r = Redactor::new(secrets.iter().map(|s| s.as_bytes().to_vec()));
        let mut out = Vec::new();
        for piece in input.chunks(chunk.max(1)) {
            out.extend(r.push(piece));
        }
        out.extend(r.finish());
        out
    }

    #[test]
    fn secrets_are_masked_whatever_the_chunking() {
        let cases: &[(&[&str], &str, &str)] = &[
            (&["hunter2"], "pw=hunter2!", "pw=***!"),
            (&["hunter2"], "hunter2hunter2", "******"),
            (&["ab", "abc"], "xabcx abx", "x***x ***x"),
            (&["s3cr3t"], "no secret here", "no secret here"),
            (&["zz"], "z", "z"),
            (&[], "plain", "plain"),
        ];
        for (secrets, input, want) in cases {
            for chunk in 1..=input.len().max(1) {
                let got = redact_in_chunks(secrets, input.as_bytes(), chunk);
                assert_eq!(
                    String::from_utf8_lossy(&got),
                    *want,
                    "{secrets:?} chunk {chunk}"
                );
            }
        }
    }

    #[test]
    fn binary_output_passes_through_byte_exact() {
        let input: Vec<u8> = (0..=255u8).cycle().take(70_000).collect();
        assert_eq!(redact_in_chunks(&["\u{1}secret"], &input, 4096), input);
    }
}
