//! Reading a task's output files on the host: all at once (`logs`) or as they grow (`follow`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use ci_exec_driver::{DriverError, LogSink};
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};

const DRIVER: &str = "qemu";

/// One output file being tailed from an offset.
#[derive(Debug)]
struct Tail {
    path: PathBuf,
    offset: u64,
}

impl Tail {
    /// Copies whatever was appended since the last call to `sink`; returns how many bytes.
    async fn pump(&mut self, sink: LogSink<'_>) -> Result<u64, DriverError> {
        let mut file = match tokio::fs::File::open(&self.path).await {
            Ok(file) => file,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(0),
            Err(source) => return Err(read_error(&self.path, source)),
        };
        file.seek(std::io::SeekFrom::Start(self.offset))
            .await
            .map_err(|source| read_error(&self.path, source))?;
        let mut buffer = vec![0u8; 64 * 1024];
        let mut copied = 0;
        loop {
            let read = file
                .read(&mut buffer)
                .await
                .map_err(|source| read_error(&self.path, source))?;
            if read == 0 {
                break;
            }
            sink.write_all(&buffer[..read])
                .await
                .map_err(|source| DriverError::backend(DRIVER, "write task output", source))?;
            self.offset += read as u64;
            copied += read as u64;
        }
        if copied > 0 {
            sink.flush()
                .await
                .map_err(|source| DriverError::backend(DRIVER, "write task output", source))?;
        }
        Ok(copied)
    }
}

fn read_error(path: &Path, source: std::io::Error) -> DriverError {
    DriverError::backend(
        DRIVER,
        format!("read task output `{}`", path.display()),
        source,
    )
}

/// Writes `stdout` and `stderr` of task directory `dir` from the start, once.
pub async fn logs(dir: &Path, stdout: LogSink<'_>, stderr: LogSink<'_>) -> Result<(), DriverError> {
    Tail {
        path: dir.join("stdout"),
        offset: 0,
    }
    .pump(stdout)
    .await?;
    Tail {
        path: dir.join("stderr"),
        offset: 0,
    }
    .pump(stderr)
    .await?;
    Ok(())
}

/// Writes the output of task directory `dir` as it grows, until `done` says the task has
/// ended, then writes what is left and returns.
pub async fn follow<F, Fut>(
    dir: &Path,
    stdout: LogSink<'_>,
    stderr: LogSink<'_>,
    mut done: F,
) -> Result<(), DriverError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<bool, DriverError>>,
{
    let mut out = Tail {
        path: dir.join("stdout"),
        offset: 0,
    };
    let mut err = Tail {
        path: dir.join("stderr"),
        offset: 0,
    };
    let mut interval = Duration::from_millis(1);
    loop {
        // Ask before reading: output written before the end is then always read below.
        let finished = done().await?;
        let copied = out.pump(&mut *stdout).await? + err.pump(&mut *stderr).await?;
        if finished {
            return Ok(());
        }
        if copied > 0 {
            interval = Duration::from_millis(1);
        } else {
            tokio::time::sleep(interval).await;
            interval = (interval * 2).min(Duration::from_millis(25));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    #[tokio::test]
    async fn follow_sees_output_written_while_it_runs_and_stops_at_the_end() {
        let directory = tempfile::tempdir().expect("tempdir");
        let dir = directory.path().to_owned();
        let finished = Arc::new(AtomicBool::new(false));
        let writer = {
            let dir = dir.clone();
            let finished = finished.clone();
            tokio::spawn(async move {
                for chunk in 0..5 {
                    let mut file = tokio::fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(dir.join("stdout"))
                        .await
                        .expect("open");
                    file.write_all(format!("line {chunk}\n").as_bytes())
                        .await
                        .expect("write");
                    // tokio's File writes in the background: without a flush, a dropped
                    // file's line can land after the next one (seen once in CI).
                    file.flush().await.expect("flush");
                    tokio::task::yield_now().await;
                }
                tokio::fs::write(dir.join("stderr"), b"\xffraw")
                    .await
                    .expect("write");
                finished.store(true, Ordering::SeqCst);
            })
        };
        let mut stdout = Vec::new();
        let mut stderr = Vec::new();
        follow(&dir, &mut stdout, &mut stderr, || {
            let finished = finished.clone();
            async move { Ok(finished.load(Ordering::SeqCst)) }
        })
        .await
        .expect("follow");
        writer.await.expect("writer");
        assert_eq!(stdout, b"line 0\nline 1\nline 2\nline 3\nline 4\n");
        assert_eq!(stderr, b"\xffraw");

        let mut again_out = Vec::new();
        let mut again_err = Vec::new();
        logs(&dir, &mut again_out, &mut again_err)
            .await
            .expect("logs");
        assert_eq!(again_out, stdout);
        assert_eq!(again_err, stderr);
    }
}
