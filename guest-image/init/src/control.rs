//! The control port: a virtio-serial port on which the host asks PID 1 for the few things a
//! VM needs right after it starts or is restored from a saved state (set the clock, mount the
//! 9p share).
//!
//! Why not the guest agent: each of those is a `guest-exec` of a shell that runs `date`,
//! `mkdir` and `mount`, and every exec of a dynamically linked program costs tens of
//! milliseconds under TCG (measured: ~0.8 s for the post-restore step). Here they are a few
//! system calls in a thread that blocks on the port and so costs nothing while idle.
//!
//! The protocol is lines of text. The guest greets once with [`HELLO`] when it opens the
//! port; then each request line gets one answer line, `ok` or `error <message>` (`yes` or
//! `no` for a question):
//!
//! ```text
//! time <seconds>.<nanoseconds>          set CLOCK_REALTIME (Unix time)
//! mount9p <tag> <target> <options>      mkdir -p target; mount the 9p export `tag` there
//! mountfs <fstype> <tag> <target> [options]
//!                                       the same for `9p` or `virtiofs` (version 4)
//! newer <path> <reference>              yes when `path` was modified after `reference` (or
//!                                       `reference` is missing), as `[ path -nt reference ]`
//! ```

use std::fs::File;
use std::io::{self, Read, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use crate::system;

/// The port's name (`-device virtserialport,name=…` on the host).
pub const PORT: &str = "org.ci-exec.control.0";
/// The vsock port the control protocol is served on with `ci.transport=vsock` (Apple's
/// Virtualization.framework has no virtio-serial ports with names; it has vsock).
pub const VSOCK_PORT: u32 = 1025;
/// The greeting; its version number grows when the host may ask for more. Version 2: this
/// binary wraps tasks (`ci-exec-init --task`, see `task`); 3: `newer`; 4: `mountfs`.
pub const HELLO: &str = "ci-exec-init control 4";

/// The filesystems `mountfs` mounts: the shares a host exports to its guest.
const SHARE_FILESYSTEMS: &[&str] = &["9p", "virtiofs"];

/// One request from the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    Time {
        seconds: i64,
        nanoseconds: i64,
    },
    Mount {
        fstype: String,
        tag: String,
        target: String,
        options: String,
    },
    Newer {
        path: String,
        reference: String,
    },
}

/// Parses one request line (without its newline).
pub fn parse(line: &str) -> Result<Request, String> {
    let mut words = line.split_whitespace();
    match words.next() {
        Some("time") => {
            let value = words.next().ok_or("`time` needs a value")?;
            let (seconds, fraction) = value.split_once('.').unwrap_or((value, "0"));
            let seconds: i64 = seconds
                .parse()
                .map_err(|_| format!("bad seconds in `{value}`"))?;
            if fraction.is_empty()
                || fraction.len() > 9
                || !fraction.bytes().all(|b| b.is_ascii_digit())
            {
                return Err(format!("bad fraction in `{value}`"));
            }
            let nanoseconds: i64 = format!("{fraction:0<9}")
                .parse()
                .map_err(|_| format!("bad fraction in `{value}`"))?;
            Ok(Request::Time {
                seconds,
                nanoseconds,
            })
        }
        Some("mount9p") => {
            let (Some(tag), Some(target), Some(options), None) =
                (words.next(), words.next(), words.next(), words.next())
            else {
                return Err("`mount9p` needs a tag, a target and options".to_owned());
            };
            mount_request("9p", tag, target, options)
        }
        Some("mountfs") => {
            let (Some(fstype), Some(tag), Some(target), options, None) = (
                words.next(),
                words.next(),
                words.next(),
                words.next(),
                words.next(),
            ) else {
                return Err(
                    "`mountfs` needs a filesystem type, a tag, a target and maybe options"
                        .to_owned(),
                );
            };
            if !SHARE_FILESYSTEMS.contains(&fstype) {
                return Err(format!(
                    "`mountfs` mounts {}, not `{fstype}`",
                    SHARE_FILESYSTEMS.join(" or ")
                ));
            }
            mount_request(fstype, tag, target, options.unwrap_or_default())
        }
        Some("newer") => {
            let (Some(path), Some(reference), None) = (words.next(), words.next(), words.next())
            else {
                return Err("`newer` needs a path and a reference".to_owned());
            };
            if !path.starts_with('/') || !reference.starts_with('/') {
                return Err("`newer` takes absolute paths".to_owned());
            }
            Ok(Request::Newer {
                path: path.to_owned(),
                reference: reference.to_owned(),
            })
        }
        Some(other) => Err(format!("unknown request `{other}`")),
        None => Err("empty request".to_owned()),
    }
}

fn mount_request(fstype: &str, tag: &str, target: &str, options: &str) -> Result<Request, String> {
    if !target.starts_with('/') {
        return Err(format!("mount target `{target}` is not absolute"));
    }
    Ok(Request::Mount {
        fstype: fstype.to_owned(),
        tag: tag.to_owned(),
        target: target.to_owned(),
        options: options.to_owned(),
    })
}

/// `[ path -nt reference ]`: `path` exists and `reference` does not, or was modified earlier.
fn newer(path: &str, reference: &str) -> bool {
    let modified = |path: &str| {
        std::fs::metadata(path)
            .and_then(|meta| meta.modified())
            .ok()
    };
    match (modified(path), modified(reference)) {
        (Some(path), Some(reference)) => path > reference,
        (Some(_), None) => true,
        (None, _) => false,
    }
}

fn handle(request: &Request) -> io::Result<()> {
    match request {
        Request::Newer { .. } => Ok(()),
        Request::Time {
            seconds,
            nanoseconds,
        } => system::set_clock(*seconds, *nanoseconds),
        Request::Mount {
            fstype,
            tag,
            target,
            options,
        } => {
            std::fs::create_dir_all(target).map_err(|error| {
                io::Error::new(error.kind(), format!("create `{target}`: {error}"))
            })?;
            if system::is_mount_point(target) {
                return Ok(());
            }
            crate::modules::wait_for_background().map_err(io::Error::other)?;
            system::mount(tag, Path::new(target), fstype, 0, options)
        }
    }
}

/// The answer line for one request line.
fn answer(line: &str) -> String {
    if let Ok(Request::Newer { path, reference }) = parse(line) {
        return if newer(&path, &reference) {
            "yes\n"
        } else {
            "no\n"
        }
        .to_owned();
    }
    let result =
        parse(line).and_then(|request| handle(&request).map_err(|error| error.to_string()));
    match result {
        Ok(()) => "ok\n".to_owned(),
        // One line per answer: the host reads answers by line.
        Err(message) => format!("error {}\n", message.replace('\n', " ")),
    }
}

/// Finds the port (up to `timeout`: virtio-serial ports appear a moment after the device),
/// greets, and answers requests for as long as the guest runs. Runs on its own thread.
pub fn serve(timeout: Duration) {
    let Some(device) = wait_for_port(timeout) else {
        // A VM without the port (another host tool, an older driver): nothing to serve.
        return;
    };
    let mut port = match File::options().read(true).write(true).open(&device) {
        Ok(port) => port,
        Err(error) => {
            eprintln!(
                "ci-exec-init: warning: open control port `{}`: {error}",
                device.display()
            );
            return;
        }
    };
    serve_connection(&mut port, false);
}

/// Listens on vsock [`VSOCK_PORT`] and serves each connection the host makes, one at a time,
/// greeting each. Runs on its own thread for as long as the guest runs.
pub fn serve_vsock() {
    let listener = match crate::vsock::Listener::bind(VSOCK_PORT) {
        Ok(listener) => listener,
        Err(error) => {
            eprintln!("ci-exec-init: warning: control port on vsock {VSOCK_PORT}: {error}");
            return;
        }
    };
    loop {
        match listener.accept() {
            Ok(mut connection) => serve_connection(&mut connection, true),
            Err(error) => {
                eprintln!("ci-exec-init: warning: accept on vsock {VSOCK_PORT}: {error}");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

/// Greets and answers request lines on `port`. A stream connection (`ends`) is over at its
/// end; a virtio-serial port reads nothing while no host end is connected, and is polled.
fn serve_connection(port: &mut (impl Read + Write), ends: bool) {
    let _ = port.write_all(format!("{HELLO}\n").as_bytes());
    let mut pending: Vec<u8> = Vec::new();
    let mut buffer = [0u8; 4096];
    loop {
        match port.read(&mut buffer) {
            Ok(0) if ends => return,
            // No host end connected: reads do not block then, so wait before trying again.
            Ok(0) => std::thread::sleep(Duration::from_millis(50)),
            Ok(read) => {
                pending.extend_from_slice(&buffer[..read]);
                while let Some(end) = pending.iter().position(|&byte| byte == b'\n') {
                    let line: Vec<u8> = pending.drain(..=end).collect();
                    let line = String::from_utf8_lossy(&line[..end]);
                    let reply = answer(line.trim_end_matches('\r'));
                    let _ = port.write_all(reply.as_bytes());
                }
            }
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            Err(_) if ends => return,
            Err(error) => {
                eprintln!("ci-exec-init: warning: read control port: {error}");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

/// `/dev/vportNpM` of the port named [`PORT`].
fn wait_for_port(timeout: Duration) -> Option<std::path::PathBuf> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(entries) = std::fs::read_dir("/sys/class/virtio-ports") {
            for entry in entries.flatten() {
                let name = std::fs::read_to_string(entry.path().join("name")).unwrap_or_default();
                if name.trim() == PORT {
                    return Some(Path::new("/dev").join(entry.file_name()));
                }
            }
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newer_answers_as_test_nt_does() {
        let dir = std::env::temp_dir().join(format!("ci-exec-newer-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let (old, new) = (dir.join("old"), dir.join("new"));
        std::fs::write(&old, "").expect("old");
        std::fs::write(&new, "").expect("new");
        let earlier = std::time::SystemTime::now() - Duration::from_secs(60);
        File::options()
            .write(true)
            .open(&old)
            .and_then(|file| file.set_modified(earlier))
            .expect("age");
        let ask = |path: &Path, reference: &Path| {
            answer(&format!("newer {} {}", path.display(), reference.display()))
        };
        assert_eq!(ask(&new, &old), "yes\n");
        assert_eq!(ask(&old, &new), "no\n");
        assert_eq!(ask(&dir.join("missing"), &old), "no\n");
        assert_eq!(ask(&new, &dir.join("missing")), "yes\n");
        assert!(answer("newer relative /x").starts_with("error "));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn requests_parse() {
        for (line, expected) in [
            (
                "time 1700000000.5",
                Ok(Request::Time {
                    seconds: 1_700_000_000,
                    nanoseconds: 500_000_000,
                }),
            ),
            (
                "time 12.000000001",
                Ok(Request::Time {
                    seconds: 12,
                    nanoseconds: 1,
                }),
            ),
            (
                "time 7",
                Ok(Request::Time {
                    seconds: 7,
                    nanoseconds: 0,
                }),
            ),
            (
                "mount9p ci /mnt/ci trans=virtio,msize=524288",
                Ok(Request::Mount {
                    fstype: "9p".to_owned(),
                    tag: "ci".to_owned(),
                    target: "/mnt/ci".to_owned(),
                    options: "trans=virtio,msize=524288".to_owned(),
                }),
            ),
            (
                "mountfs virtiofs ci /run/ci",
                Ok(Request::Mount {
                    fstype: "virtiofs".to_owned(),
                    tag: "ci".to_owned(),
                    target: "/run/ci".to_owned(),
                    options: String::new(),
                }),
            ),
            (
                "mountfs 9p ci /mnt/ci trans=virtio",
                Ok(Request::Mount {
                    fstype: "9p".to_owned(),
                    tag: "ci".to_owned(),
                    target: "/mnt/ci".to_owned(),
                    options: "trans=virtio".to_owned(),
                }),
            ),
        ] {
            assert_eq!(parse(line), expected, "{line}");
        }
        for bad in [
            "",
            "time",
            "time x.1",
            "time 1.",
            "time 1.1234567890",
            "time 1.-5",
            "mount9p ci",
            "mount9p ci relative opts",
            "mount9p ci /a opts extra",
            "mountfs virtiofs ci",
            "mountfs ext4 /dev/vdb /mnt",
            "mountfs virtiofs ci relative",
            "mountfs virtiofs ci /a opts extra",
            "reboot",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_bad_request_gets_an_error_line() {
        assert_eq!(answer("bogus"), "error unknown request `bogus`\n");
    }

    /// The framing a vsock connection gets, over a socket pair (this host has no vsock
    /// transport to test on): greeting first, one answer line per request line (also when
    /// requests arrive split or together), and the end of the connection ends the serving.
    #[test]
    fn a_stream_connection_is_greeted_answered_line_by_line_and_ends_with_its_peer() {
        use std::io::{BufRead, BufReader};
        use std::os::unix::net::UnixStream;
        let (mut guest, host) = UnixStream::pair().expect("socket pair");
        let server = std::thread::spawn(move || serve_connection(&mut guest, true));
        let mut reader = BufReader::new(host.try_clone().expect("clone"));
        let mut host = host;
        let mut line = String::new();
        reader.read_line(&mut line).expect("greeting");
        assert_eq!(line, format!("{HELLO}\n"));
        host.write_all(b"newer /nonexistent /").expect("write");
        host.write_all(b"\nbogus\nnewer / /nonexistent\n")
            .expect("write");
        for expected in ["no\n", "error unknown request `bogus`\n", "yes\n"] {
            line.clear();
            reader.read_line(&mut line).expect("answer");
            assert_eq!(line, expected);
        }
        drop(host);
        drop(reader);
        server
            .join()
            .expect("the server returns when the host hangs up");
    }
}
