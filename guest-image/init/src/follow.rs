//! `ci-exec-init --follow FILE END`: copies FILE to stdout as it grows, until the file END
//! exists and everything before it has been copied, or until stdout's reader is gone.
//!
//! Why: the qemu driver streams a task's stdin through a file on the 9p share, which the host
//! appends to as its own input arrives. A 9p reader cannot block on a growing file (a FIFO on
//! a 9p mount is a guest-local pipe, not the host's), and neither `cat` nor `tail -f` knows
//! when the host's input has ended; this loop does, and costs one exec.

use std::io::{self, Read, Write};
use std::path::Path;
use std::time::Duration;

const LONGEST_WAIT: Duration = Duration::from_millis(50);

pub fn run(file: &Path, end: &Path) -> ! {
    match copy(file, end, &mut io::stdout().lock(), |timeout| {
        reader_gone(1, timeout)
    }) {
        Ok(()) => std::process::exit(0),
        Err(error) => {
            eprintln!("ci-exec-init --follow: error: {error}");
            std::process::exit(1);
        }
    }
}

/// The copy loop; `wait` sleeps up to its argument and says whether the reader is gone.
pub(crate) fn copy(
    file: &Path,
    end: &Path,
    output: &mut impl Write,
    wait_for_reader: impl Fn(Duration) -> bool,
) -> io::Result<()> {
    let mut input = std::fs::File::open(file).map_err(|error| {
        io::Error::new(error.kind(), format!("open `{}`: {error}", file.display()))
    })?;
    let mut buffer = vec![0u8; 64 * 1024];
    let mut wait = Duration::from_millis(1);
    let mut ended = false;
    let mut position = 0u64;
    loop {
        let read = input.read(&mut buffer)?;
        if read > 0 {
            if !pass(output, &buffer[..read])? {
                return Ok(());
            }
            position += read as u64;
            wait = Duration::from_millis(1);
            continue;
        }
        // At the end as this kernel knows it, which may be an old size: 9p on Linux 6.8
        // (netfs) reads no further than the size it last heard of, and an open file is never
        // asked again. A stat of the path asks the server and updates that size.
        if std::fs::metadata(file).is_ok_and(|metadata| metadata.len() > position) {
            continue;
        }
        if ended {
            return Ok(());
        }
        if end.exists() {
            // END is made after the last append: read to the end once more, then stop.
            ended = true;
            continue;
        }
        if wait_for_reader(wait) {
            return Ok(());
        }
        wait = (wait * 2).min(LONGEST_WAIT);
    }
}

/// Writes `bytes` through; false when the reader is gone (the command ended without reading
/// everything), which ends the copy, not as an error. Rust ignores SIGPIPE, so this is EPIPE.
fn pass(output: &mut impl Write, bytes: &[u8]) -> io::Result<bool> {
    match output.write_all(bytes).and_then(|()| output.flush()) {
        Ok(()) => Ok(true),
        Err(error) if error.kind() == io::ErrorKind::BrokenPipe => Ok(false),
        Err(error) => Err(error),
    }
}

/// Waits up to `timeout` on `fd` (the writing end of a pipe); true when its reader has closed
/// (POLLERR), so a command that exits without reading does not leave the copy waiting for input
/// forever.
pub(crate) fn reader_gone(fd: libc::c_int, timeout: Duration) -> bool {
    let mut descriptor = libc::pollfd {
        fd,
        events: 0,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call.
    let ready = unsafe { libc::poll(&mut descriptor, 1, timeout.as_millis() as libc::c_int) };
    ready > 0 && descriptor.revents & (libc::POLLERR | libc::POLLHUP | libc::POLLNVAL) != 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_a_file_that_grows_until_the_end_marker() {
        let directory = std::env::temp_dir().join(format!("follow-test-{}", std::process::id()));
        std::fs::create_dir_all(&directory).expect("mkdir");
        let file = directory.join("stdin");
        let end = directory.join("stdin.end");
        std::fs::write(&file, b"one\n").expect("write");
        let writer = {
            let (file, end) = (file.clone(), end.clone());
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(30));
                let mut handle = std::fs::OpenOptions::new()
                    .append(true)
                    .open(&file)
                    .expect("open");
                handle.write_all(b"two\n").expect("append");
                std::fs::write(&end, b"").expect("end");
            })
        };
        let mut output = Vec::new();
        copy(&file, &end, &mut output, |wait| {
            std::thread::sleep(wait);
            false
        })
        .expect("copy");
        writer.join().expect("writer");
        let _ = std::fs::remove_dir_all(&directory);
        assert_eq!(output, b"one\ntwo\n");
    }
}
