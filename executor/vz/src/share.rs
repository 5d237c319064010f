//! The run directory and its share, as the qemu driver lays them out (the guest sees the share
//! at `/mnt/ci` over virtiofs instead of 9p), and the files a task's wrapper reads and writes
//! there: plain files, so everything here is tested on any OS.
//!
//! ```text
//! <cache_dir>/run/<namespace>/
//!   owner.lock  root.raw  console.log
//!   share/                      virtiofs tag `ci`, `/mnt/ci` in the guest
//!     volumes/<name>/           a volume
//!     tasks/<id>/               task (the wrapper's spec) stdin stdout stderr exit pid
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use ci_exec_driver::{Stdin, Task};
use ci_exec_qemu::guest::{self, Runner, StdinSource};
use tokio::io::{AsyncRead, AsyncWriteExt};

use crate::VzError;
use crate::spec::RunFiles;

/// The paths of one namespace's run directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunDir {
    path: PathBuf,
}

impl RunDir {
    pub fn new(path: PathBuf) -> Self {
        RunDir { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The files the VM's spec names.
    pub fn files(&self) -> RunFiles {
        RunFiles {
            root_disk: self.path.join("root.raw"),
            share: self.share(),
            console_log: self.path.join("console.log"),
        }
    }

    pub fn share(&self) -> PathBuf {
        self.path.join("share")
    }

    pub fn volume(&self, name: &str) -> PathBuf {
        self.share().join("volumes").join(name)
    }

    pub fn task(&self, id: &str) -> PathBuf {
        self.share().join("tasks").join(id)
    }

    /// Creates the directory tree.
    pub fn create(&self) -> Result<(), VzError> {
        for directory in [
            self.path.clone(),
            self.share().join("volumes"),
            self.share().join("tasks"),
        ] {
            std::fs::create_dir_all(&directory).map_err(|source| VzError::CreateDir {
                path: directory.clone(),
                source,
            })?;
        }
        Ok(())
    }
}

/// A task's input that the host keeps writing after the task started.
pub type StdinStream = Box<dyn AsyncRead + Send + Unpin>;

/// Writes task `task`'s directory for the guest's `ci-exec-init --task` wrapper (`env` is the
/// command's whole environment): empty `stdout` and `stderr`, the wrapper's `task` spec, and
/// `stdin` (whole, or empty and followed). What an earlier run of the same id left (`exit`,
/// `pid`, `stdin.end`) goes first. Returns the directory, and the input still to stream with
/// [`stream_stdin`] once the task runs.
pub async fn write_task_files(
    run: &RunDir,
    task: &Task,
    env: &BTreeMap<String, String>,
    runner: Runner<'_>,
) -> Result<(PathBuf, Option<StdinStream>), VzError> {
    let dir = run.task(&task.id);
    std::fs::create_dir_all(&dir).map_err(|source| VzError::CreateDir {
        path: dir.clone(),
        source,
    })?;
    for stale in ["exit", "pid", "stdin.end"] {
        let _ = std::fs::remove_file(dir.join(stale));
    }
    let mut stream = None;
    let (source, stdin_bytes) = match &task.stdin {
        None => (StdinSource::None, None),
        Some(stdin @ Stdin::Stream(_)) => {
            stream = stdin.take_reader();
            (StdinSource::Follow, Some(Vec::new()))
        }
        Some(stdin) => {
            let mut bytes = Vec::new();
            if let Some(mut reader) = stdin.take_reader() {
                tokio::io::copy(&mut reader, &mut bytes)
                    .await
                    .map_err(|source| VzError::ReadFile {
                        path: PathBuf::from(format!("<stdin of task `{}`>", task.id)),
                        source,
                    })?;
            }
            (StdinSource::File, Some(bytes))
        }
    };
    let mut files = vec![
        ("stdout", Vec::new()),
        ("stderr", Vec::new()),
        ("task", guest::task_spec(task, env, runner, source)),
    ];
    if let Some(bytes) = stdin_bytes {
        files.push(("stdin", bytes));
    }
    for (name, contents) in files {
        let path = dir.join(name);
        std::fs::write(&path, contents).map_err(|source| VzError::WriteFile { path, source })?;
    }
    Ok((dir, stream))
}

/// Appends what `reader` gives to the task's `stdin` as it comes, then makes `stdin.end`: the
/// guest's `--follow` helper copies the file to the task until the end marker exists.
pub async fn stream_stdin(mut reader: StdinStream, dir: PathBuf) {
    use tokio::io::AsyncReadExt;
    let path = dir.join("stdin");
    let copied = async {
        let mut file = tokio::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .await?;
        let mut buffer = vec![0u8; 64 * 1024];
        loop {
            let read = reader.read(&mut buffer).await?;
            if read == 0 {
                return Ok::<(), std::io::Error>(());
            }
            file.write_all(&buffer[..read]).await?;
            file.flush().await?;
        }
    }
    .await;
    if let Err(error) = copied {
        // The task sees its input end here; the task itself reports what that means.
        tracing::warn!(%error, path = %path.display(), "streaming stdin to the guest");
    }
    let end = dir.join("stdin.end");
    if let Err(error) = tokio::fs::write(&end, b"").await {
        tracing::warn!(%error, path = %end.display(), "ending the guest's stdin");
    }
}

/// The exit code the task's wrapper wrote, once it has.
pub fn read_exit(dir: &Path) -> Option<i32> {
    std::fs::read_to_string(dir.join("exit"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn records(spec: &[u8]) -> Vec<String> {
        spec.split(|&byte| byte == 0)
            .filter(|record| !record.is_empty())
            .map(|record| String::from_utf8_lossy(record).into_owned())
            .collect()
    }

    #[tokio::test]
    async fn a_task_with_whole_stdin_gets_its_files_and_stale_ones_go() {
        let directory = tempfile::tempdir().expect("tempdir");
        let run = RunDir::new(directory.path().join("ns"));
        run.create().expect("create");
        let task = Task::new("t1", ["cat"])
            .env("A", "1")
            .stdin(Stdin::bytes(&b"in\x00put"[..]));
        // What an earlier run of the same id left.
        let dir = run.task("t1");
        std::fs::create_dir_all(&dir).expect("mkdir");
        for stale in ["exit", "pid", "stdin.end"] {
            std::fs::write(dir.join(stale), b"0").expect("write");
        }
        let (written, stream) = write_task_files(&run, &task, &task.env, Runner::GuestOs)
            .await
            .expect("files");
        assert_eq!(written, directory.path().join("ns/share/tasks/t1"));
        assert!(stream.is_none());
        assert_eq!(
            std::fs::read(dir.join("stdin")).expect("stdin"),
            b"in\x00put"
        );
        assert_eq!(std::fs::read(dir.join("stdout")).expect("stdout"), b"");
        for stale in ["exit", "pid", "stdin.end"] {
            assert!(!dir.join(stale).exists(), "{stale}");
        }
        assert_eq!(read_exit(&dir), None);
        let spec = records(&std::fs::read(dir.join("task")).expect("task"));
        for expected in [
            "stdin=file",
            "mode=guest-os",
            "network=none",
            "env=A=1",
            "arg=cat",
        ] {
            assert!(
                spec.iter().any(|record| record == expected),
                "{expected}: {spec:?}"
            );
        }
    }

    #[tokio::test]
    async fn streamed_stdin_is_appended_then_ended() {
        let directory = tempfile::tempdir().expect("tempdir");
        let run = RunDir::new(directory.path().join("ns"));
        run.create().expect("create");
        let (host, mut writer) = tokio::io::duplex(64);
        let task = Task::new("t2", ["cat"]).stdin(Stdin::stream(host));
        let (dir, stream) = write_task_files(&run, &task, &task.env, Runner::GuestOs)
            .await
            .expect("files");
        let spec = records(&std::fs::read(dir.join("task")).expect("task"));
        assert!(
            spec.iter().any(|record| record == "stdin=follow"),
            "{spec:?}"
        );
        assert_eq!(std::fs::read(dir.join("stdin")).expect("stdin"), b"");
        let streaming = tokio::spawn(stream_stdin(stream.expect("a stream"), dir.clone()));
        writer.write_all(b"first ").await.expect("write");
        writer.write_all(b"second").await.expect("write");
        drop(writer);
        streaming.await.expect("join");
        assert_eq!(
            std::fs::read(dir.join("stdin")).expect("stdin"),
            b"first second"
        );
        assert!(dir.join("stdin.end").exists());
    }

    #[tokio::test]
    async fn an_image_task_runs_under_podman_with_its_volumes() {
        let directory = tempfile::tempdir().expect("tempdir");
        let run = RunDir::new(directory.path().join("ns"));
        run.create().expect("create");
        let task = Task::new("t3", ["true"])
            .image("localhost/ci-exec/base:latest")
            .mount("cache", "/cache");
        let runner = Runner::PodmanRun {
            image: &task.image,
            name: "ns-t3",
        };
        let (dir, _) = write_task_files(&run, &task, &task.env, runner)
            .await
            .expect("files");
        let spec = records(&std::fs::read(dir.join("task")).expect("task"));
        assert!(spec.iter().any(|record| record == "mode=exec"), "{spec:?}");
        assert!(
            spec.iter()
                .any(|record| record == "arg=--volume=/mnt/ci/volumes/cache:/cache"),
            "{spec:?}"
        );
        assert!(!dir.join("stdin").exists());
    }

    #[test]
    fn the_exit_code_is_read_once_written_whole() {
        let directory = tempfile::tempdir().expect("tempdir");
        assert_eq!(read_exit(directory.path()), None);
        std::fs::write(directory.path().join("exit"), b"").expect("write");
        assert_eq!(
            read_exit(directory.path()),
            None,
            "created, not yet written"
        );
        std::fs::write(directory.path().join("exit"), b"42\n").expect("write");
        assert_eq!(read_exit(directory.path()), Some(42));
    }
}
