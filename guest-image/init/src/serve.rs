//! The roles of `ci-exec-init` in a Fly Machine (the `fly` driver): the machine's entrypoint
//! starts tasks, and the driver reaches them only through the Machines API's `exec`, one short
//! command at a time, as the qemu driver reaches its guest through QGA.
//!
//! Why: Fly's API has no stdin attach and no separate stdout/stderr (its logs are merged
//! lines), so the task wrapper (`--task`, the qemu driver's) runs each task with its streams in
//! files, and these commands read and feed those files by offset.
//!
//! - `--serve DIR` (entrypoint): starts `--task DIR/<id>` for every `DIR/<id>/task` that
//!   appears (the first one is written by the machine's `files` before it starts), reaps every
//!   child, and exits once no task has run and no command below has come for [`IDLE`]: a machine
//!   a killed run left then stops, and Fly destroys it (`auto_destroy`).
//! - `--start TASKDIR SPEC` writes the task (base64 `SPEC`) and waits until it started.
//! - `--poll TASKDIR OUT ERR MAX`: the state (`running` or `exit N`), then up to `MAX` bytes
//!   of stdout from offset `OUT` and of stderr from `ERR`, each base64 on its own line. The
//!   state is read first, so the bytes after an `exit` line are all the task wrote.
//! - `--append FILE DATA` appends base64 `DATA` (streamed stdin); `--touch FILE` creates an
//!   empty file (`stdin.end`); `--signal TASKDIR N` signals the task's process group;
//!   `--cat FILE` prints `ok` and the file in base64, or `missing`.
//!
//! Output is base64 so that it survives an API that wraps it in JSON text.

use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;

/// How long the entrypoint lingers with nothing running and nobody asking.
const IDLE: Duration = Duration::from_secs(15 * 60);
/// How often the entrypoint looks for new tasks.
const TICK: Duration = Duration::from_millis(10);
/// Longest wait of `--start` for its task to start.
const START_WAIT: Duration = Duration::from_secs(30);
/// Touched by every command: the entrypoint's idle clock.
const ALIVE: &str = ".alive";

/// The exec commands, by flag; `None` when `arguments` is none of them.
pub fn command(arguments: &[std::ffi::OsString]) -> Option<i32> {
    let text: Vec<&str> = arguments
        .iter()
        .map(|arg| arg.to_str().unwrap_or(""))
        .collect();
    let result = match text.as_slice() {
        ["--serve", dir] => serve(Path::new(dir)),
        ["--start", task, spec] => start(Path::new(task), spec),
        ["--poll", task, out, err, max] => poll(Path::new(task), out, err, max),
        ["--append", file, data] => append(Path::new(file), data),
        ["--touch", file] => touch(Path::new(file)),
        ["--signal", task, number] => signal(Path::new(task), number),
        ["--cat", file] => cat(Path::new(file)),
        _ => return None,
    };
    Some(match result {
        Ok(()) => 0,
        Err(error) => {
            eprintln!("ci-exec-init {}: error: {error}", text[0]);
            1
        }
    })
}

fn invalid(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, message)
}

fn number(text: &str) -> io::Result<u64> {
    text.parse()
        .map_err(|_| invalid(format!("`{text}` is not a number")))
}

fn decode(data: &str) -> io::Result<Vec<u8>> {
    STANDARD
        .decode(data)
        .map_err(|error| invalid(format!("not base64: {error}")))
}

/// Marks activity for the entrypoint's idle clock: `TASKDIR/../.alive` or `FILE/../../.alive`.
fn alive(near: &Path) {
    for dir in near.ancestors().skip(1).take(2) {
        if dir.join(ALIVE).exists() {
            let _ = std::fs::write(dir.join(ALIVE), b"");
            return;
        }
    }
}

/// Set by SIGTERM or SIGINT (how Fly stops a machine): the tasks are killed and `--serve`
/// exits, so a stop takes no grace period.
static STOP: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

extern "C" fn on_stop(_: libc::c_int) {
    STOP.store(true, std::sync::atomic::Ordering::Relaxed);
}

fn serve(dir: &Path) -> io::Result<()> {
    let handler = on_stop as extern "C" fn(libc::c_int);
    for signal in [libc::SIGTERM, libc::SIGINT] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe { libc::signal(signal, handler as libc::sighandler_t) };
    }
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join(ALIVE), b"")?;
    let program = std::env::current_exe()?;
    let mut started: Vec<PathBuf> = Vec::new();
    let mut running = 0usize;
    let mut idle_since = Instant::now();
    loop {
        for entry in std::fs::read_dir(dir)?.flatten() {
            let task = entry.path();
            if !task.join("task").is_file() || started.contains(&task) {
                continue;
            }
            started.push(task.clone());
            let stdin = task.join("stdin");
            if !stdin.exists() {
                // Appending: `--append` may have made it already.
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&stdin)?;
            }
            match std::process::Command::new(&program)
                .arg("--task")
                .arg(&task)
                .stdin(std::process::Stdio::null())
                .spawn()
            {
                // Reaped below by pid, never through `Child`.
                Ok(_) => running += 1,
                Err(error) => {
                    let _ = std::fs::write(task.join("stderr"), format!("ci-exec: {error}\n"));
                    let _ = std::fs::write(task.join("exit"), "125\n");
                }
            }
        }
        loop {
            let mut status = 0;
            // SAFETY: waitpid with a valid status pointer; reaps our children and, as PID 1 in
            // a container, orphans.
            let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
            if pid <= 0 {
                break;
            }
            running = running.saturating_sub(1);
        }
        if STOP.load(std::sync::atomic::Ordering::Relaxed) {
            for task in &started {
                let _ = signal(task, "9");
            }
            return Ok(());
        }
        if running > 0 {
            idle_since = Instant::now();
        }
        let touched = std::fs::metadata(dir.join(ALIVE))
            .and_then(|metadata| metadata.modified())
            .ok()
            .and_then(|time| SystemTime::now().duration_since(time).ok())
            .unwrap_or_default();
        if running == 0 && idle_since.elapsed() >= IDLE && touched >= IDLE {
            return Ok(());
        }
        std::thread::sleep(TICK);
    }
}

fn start(task: &Path, spec: &str) -> io::Result<()> {
    alive(task);
    std::fs::create_dir_all(task)?;
    if !task.join("task").exists() {
        let partial = task.join("task.partial");
        std::fs::write(&partial, decode(spec)?)?;
        std::fs::rename(&partial, task.join("task"))?;
    }
    let deadline = Instant::now() + START_WAIT;
    while !task.join("pid").exists() && !task.join("exit").exists() {
        if Instant::now() >= deadline {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("task `{}` did not start in {START_WAIT:?}", task.display()),
            ));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    println!("started");
    Ok(())
}

/// Up to `max` bytes of `path` from `offset`; nothing when it does not exist yet.
fn chunk(path: &Path, offset: u64, max: u64) -> io::Result<Vec<u8>> {
    let mut file = match std::fs::File::open(path) {
        Ok(file) => file,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(error) => return Err(error),
    };
    file.seek(SeekFrom::Start(offset))?;
    let mut bytes = Vec::new();
    file.take(max).read_to_end(&mut bytes)?;
    Ok(bytes)
}

fn poll(task: &Path, out: &str, err: &str, max: &str) -> io::Result<()> {
    alive(task);
    let (out, err, max) = (number(out)?, number(err)?, number(max)?);
    // Before the output: an exit read first means the output read after it is complete.
    let state = match std::fs::read_to_string(task.join("exit")) {
        Ok(code) => format!("exit {}", code.trim()),
        Err(_) if task.join("task").exists() => "running".to_owned(),
        Err(_) => "unknown".to_owned(),
    };
    let stdout = chunk(&task.join("stdout"), out, max)?;
    let stderr = chunk(&task.join("stderr"), err, max)?;
    let mut lock = io::stdout().lock();
    writeln!(lock, "{state}")?;
    writeln!(lock, "{}", STANDARD.encode(stdout))?;
    writeln!(lock, "{}", STANDARD.encode(stderr))?;
    lock.flush()
}

fn append(file: &Path, data: &str) -> io::Result<()> {
    alive(file);
    let bytes = decode(data)?;
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(file)?
        .write_all(&bytes)
}

fn touch(file: &Path) -> io::Result<()> {
    alive(file);
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(file)
        .map(drop)
}

fn signal(task: &Path, signal: &str) -> io::Result<()> {
    alive(task);
    let signal = number(signal)? as libc::c_int;
    if task.join("exit").exists() {
        return Ok(());
    }
    let Ok(pid) = std::fs::read_to_string(task.join("pid")) else {
        return Ok(());
    };
    let pid: libc::pid_t = pid
        .trim()
        .parse()
        .map_err(|_| invalid(format!("bad pid file `{}`", pid.trim())))?;
    // SAFETY: kill of the task's process group (the wrapper is its session leader).
    if unsafe { libc::kill(-pid, signal) } != 0 {
        let error = io::Error::last_os_error();
        if error.raw_os_error() != Some(libc::ESRCH) {
            return Err(error);
        }
    }
    Ok(())
}

fn cat(file: &Path) -> io::Result<()> {
    match std::fs::metadata(file) {
        Ok(metadata) if metadata.is_dir() => {
            Err(invalid(format!("`{}` is a directory", file.display())))
        }
        Ok(_) => {
            println!("ok\n{}", STANDARD.encode(std::fs::read(file)?));
            Ok(())
        }
        Err(error)
            if matches!(
                error.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
            ) =>
        {
            println!("missing");
            Ok(())
        }
        Err(error) => Err(error),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_start_at_their_offset() {
        let dir = tempfile_dir();
        let file = dir.join("out");
        std::fs::write(&file, b"0123456789").unwrap();
        assert_eq!(chunk(&file, 3, 4).unwrap(), b"3456");
        assert_eq!(chunk(&file, 8, 100).unwrap(), b"89");
        assert_eq!(chunk(&file, 20, 4).unwrap(), b"");
        assert_eq!(chunk(&dir.join("none"), 0, 4).unwrap(), b"");
        std::fs::remove_dir_all(dir).unwrap();
    }

    fn tempfile_dir() -> PathBuf {
        let dir = std::env::temp_dir().join(format!("ci-exec-serve-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }
}
