//! `ci-exec-init --agent PORT`: the guest agent for root filesystems without `qemu-ga` (stock
//! cloud images, which we boot without installing packages).
//!
//! It speaks the part of the QEMU guest agent protocol the qemu driver uses, with qemu-ga's
//! wire behaviour: one JSON command per line, `0xFF` resets the parser, `guest-sync-delimited`
//! answers with a `0xFF` before its JSON, answers echo the command's `id`, and
//! `guest-exec-status` forgets a process once it has reported its exit. Written here rather
//! than shipping qemu-ga: qemu-ga is a dynamically linked glib program, and a static build of
//! it for every guest would be larger than this whole init.

use base64::Engine as _;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::thread::JoinHandle;
use std::time::Duration;

const SENTINEL: u8 = 0xFF;

/// The vsock port the agent listens on with `ci.transport=vsock`: `--agent vsock:1024`.
pub const VSOCK_PORT: u32 = 1024;

/// Serves the host on `port`: a virtio-serial device path, or `vsock:<port>` to listen there
/// and serve each connection in turn (the processes started stay known across connections).
pub fn run(port: &Path) -> ! {
    let mut agent = Agent::default();
    if let Some(vsock_port) = port.to_str().and_then(|port| port.strip_prefix("vsock:")) {
        let listener = vsock_port
            .parse()
            .map_err(|_| std::io::Error::other(format!("bad vsock port `{vsock_port}`")))
            .and_then(crate::vsock::Listener::bind);
        let listener = match listener {
            Ok(listener) => listener,
            Err(error) => {
                eprintln!("ci-exec-init: error: agent on vsock {vsock_port}: {error}");
                std::process::exit(1);
            }
        };
        loop {
            match listener.accept() {
                Ok(connection) => agent.serve(connection),
                Err(error) => {
                    eprintln!("ci-exec-init: warning: agent accept on vsock {vsock_port}: {error}");
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        }
    }
    loop {
        let file = match std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(port)
        {
            Ok(file) => file,
            Err(error) => {
                eprintln!(
                    "ci-exec-init: error: agent port `{}`: {error}",
                    port.display()
                );
                std::process::exit(1);
            }
        };
        agent.serve(file);
        // The host closed its end: virtio-serial reads return 0 until it connects again.
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A started process and the threads collecting its captured output.
struct Process {
    child: Child,
    stdout: Option<JoinHandle<Vec<u8>>>,
    stderr: Option<JoinHandle<Vec<u8>>>,
}

#[derive(Default)]
struct Agent {
    processes: HashMap<u32, Process>,
}

impl Agent {
    /// Answers commands from `port` until the host side goes away.
    fn serve(&mut self, mut port: impl Read + Write) {
        let mut pending = Vec::new();
        let mut buffer = [0u8; 64 * 1024];
        loop {
            let read = match port.read(&mut buffer) {
                Ok(0) => return,
                Ok(read) => read,
                Err(error) if error.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => return,
            };
            for &byte in &buffer[..read] {
                match byte {
                    // A sentinel discards whatever partial command came before it.
                    SENTINEL => pending.clear(),
                    b'\n' => {
                        let line = std::mem::take(&mut pending);
                        if let Some(answer) = self.answer(&line)
                            && port.write_all(&answer).is_err()
                        {
                            return;
                        }
                    }
                    _ => pending.push(byte),
                }
            }
        }
    }

    /// The bytes to send back for one command line (none for an empty line or a shutdown).
    fn answer(&mut self, line: &[u8]) -> Option<Vec<u8>> {
        if line.iter().all(u8::is_ascii_whitespace) {
            return None;
        }
        let command: Value = match serde_json::from_slice(line) {
            Ok(command) => command,
            Err(error) => return Some(encode(&error_value("GenericError", &error.to_string()))),
        };
        let name = command["execute"].as_str().unwrap_or_default().to_owned();
        let arguments = command.get("arguments").cloned().unwrap_or(Value::Null);
        let mut delimited = false;
        let result = match name.as_str() {
            "guest-sync-delimited" => {
                delimited = true;
                Ok(arguments["id"].clone())
            }
            "guest-sync" => Ok(arguments["id"].clone()),
            "guest-ping" => Ok(json!({})),
            "guest-info" => Ok(json!({
                "version": env!("CARGO_PKG_VERSION"),
                "supported_commands": COMMANDS
                    .iter()
                    .map(|name| json!({"name": name, "enabled": true, "success-response": true}))
                    .collect::<Vec<_>>(),
            })),
            "guest-exec" => self.exec(&arguments),
            "guest-exec-status" => self.status(&arguments),
            "guest-shutdown" => {
                let signal = match arguments["mode"].as_str() {
                    Some("reboot") => libc::SIGTERM,
                    _ => libc::SIGUSR2,
                };
                // SAFETY: kill has no memory-safety preconditions.
                unsafe { libc::kill(1, signal) };
                // qemu-ga sends no answer to a shutdown that goes ahead.
                return None;
            }
            _ => Err((
                "CommandNotFound",
                format!("The command {name} has not been found"),
            )),
        };
        let mut answer = match result {
            Ok(value) => json!({ "return": value }),
            Err((class, description)) => error_value(class, &description),
        };
        if let Some(id) = command.get("id") {
            answer["id"] = id.clone();
        }
        let mut bytes = encode(&answer);
        if delimited {
            bytes.insert(0, SENTINEL);
        }
        Some(bytes)
    }

    fn exec(&mut self, arguments: &Value) -> Result<Value, (&'static str, String)> {
        let invalid = |what: &str| ("GenericError", format!("Invalid parameter '{what}'"));
        let path = arguments["path"].as_str().ok_or_else(|| invalid("path"))?;
        let strings = |field: &str| -> Result<Vec<String>, (&'static str, String)> {
            match &arguments[field] {
                Value::Null => Ok(Vec::new()),
                Value::Array(items) => items
                    .iter()
                    .map(|item| {
                        item.as_str()
                            .map(str::to_owned)
                            .ok_or_else(|| invalid(field))
                    })
                    .collect(),
                _ => Err(invalid(field)),
            }
        };
        let args = strings("arg")?;
        let env = strings("env")?;
        // A bool before QEMU 9.1, an enum (`none`, `stdout`, `stderr`, `separated`, `merged`)
        // since; `merged` is taken as `separated`.
        let capture = match &arguments["capture-output"] {
            Value::Bool(capture) => *capture,
            Value::String(mode) => mode != "none",
            _ => false,
        };
        let input = match arguments["input-data"].as_str() {
            Some(text) => Some(
                base64::engine::general_purpose::STANDARD
                    .decode(text)
                    .map_err(|_| invalid("input-data"))?,
            ),
            None => None,
        };
        let mut command = Command::new(path);
        command.args(&args).current_dir("/");
        if arguments.get("env").is_some_and(|env| !env.is_null()) {
            command.env_clear();
            for variable in &env {
                if let Some((name, value)) = variable.split_once('=') {
                    command.env(name, value);
                }
            }
        }
        let piped = |wanted: bool| {
            if wanted {
                Stdio::piped()
            } else {
                Stdio::null()
            }
        };
        command
            .stdin(piped(input.is_some()))
            .stdout(piped(capture))
            .stderr(piped(capture));
        // As qemu-ga's children: default signal dispositions, nothing blocked.
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            command.pre_exec(|| {
                let mut set: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut set);
                libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
                Ok(())
            });
        }
        let mut child = command.spawn().map_err(|error| {
            (
                "GenericError",
                format!("Failed to execute child process “{path}” ({error})"),
            )
        })?;
        if let (Some(bytes), Some(mut stdin)) = (input, child.stdin.take()) {
            std::thread::spawn(move || {
                let _ = stdin.write_all(&bytes);
            });
        }
        let collect = |stream: Option<Box<dyn Read + Send>>| {
            stream.map(|mut stream| {
                std::thread::spawn(move || {
                    let mut bytes = Vec::new();
                    let _ = stream.read_to_end(&mut bytes);
                    bytes
                })
            })
        };
        let stdout = collect(
            child
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn Read + Send>),
        );
        let stderr = collect(
            child
                .stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn Read + Send>),
        );
        let pid = child.id();
        self.processes.insert(
            pid,
            Process {
                child,
                stdout,
                stderr,
            },
        );
        Ok(json!({ "pid": pid }))
    }

    fn status(&mut self, arguments: &Value) -> Result<Value, (&'static str, String)> {
        let invalid = || ("GenericError", "Invalid parameter 'pid'".to_owned());
        let pid = arguments["pid"]
            .as_u64()
            .and_then(|pid| u32::try_from(pid).ok())
            .ok_or_else(invalid)?;
        let process = self.processes.get_mut(&pid).ok_or_else(invalid)?;
        let status = match process.child.try_wait() {
            Ok(None) => return Ok(json!({ "exited": false })),
            Ok(Some(status)) => status,
            Err(error) => return Err(("GenericError", error.to_string())),
        };
        let Some(process) = self.processes.remove(&pid) else {
            return Err(invalid());
        };
        let mut answer = json!({ "exited": true });
        match (status.code(), status.signal()) {
            (Some(code), _) => answer["exitcode"] = json!(code),
            (None, Some(signal)) => answer["signal"] = json!(signal),
            (None, None) => {}
        }
        let encode = |bytes: Vec<u8>| base64::engine::general_purpose::STANDARD.encode(bytes);
        if let Some(stdout) = process.stdout {
            answer["out-data"] = json!(encode(stdout.join().unwrap_or_default()));
        }
        if let Some(stderr) = process.stderr {
            answer["err-data"] = json!(encode(stderr.join().unwrap_or_default()));
        }
        Ok(answer)
    }
}

const COMMANDS: &[&str] = &[
    "guest-sync-delimited",
    "guest-sync",
    "guest-ping",
    "guest-info",
    "guest-exec",
    "guest-exec-status",
    "guest-shutdown",
];

fn error_value(class: &str, description: &str) -> Value {
    json!({ "error": { "class": class, "desc": description } })
}

fn encode(value: &Value) -> Vec<u8> {
    let mut bytes = value.to_string().into_bytes();
    bytes.push(b'\n');
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ask(agent: &mut Agent, line: &str) -> Value {
        let bytes = agent.answer(line.as_bytes()).expect("an answer");
        let text = bytes.strip_prefix(&[SENTINEL]).unwrap_or(&bytes);
        serde_json::from_slice(text).expect("JSON")
    }

    fn status_command(pid: u64) -> String {
        format!(r#"{{"execute":"guest-exec-status","arguments":{{"pid":{pid}}}}}"#)
    }

    /// Polls `guest-exec-status` until `pid` has exited; its answer.
    fn exited(agent: &mut Agent, pid: u64) -> Value {
        loop {
            let status = ask(agent, &status_command(pid));
            if status["return"]["exited"] == json!(true) {
                return status["return"].clone();
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn sync_delimited_answers_after_a_sentinel_and_echoes_the_id() {
        let mut agent = Agent::default();
        let bytes = agent
            .answer(br#"{"execute":"guest-sync-delimited","arguments":{"id":42}}"#)
            .expect("answer");
        assert_eq!(bytes[0], SENTINEL);
        assert_eq!(&bytes[1..], b"{\"return\":42}\n");
        assert_eq!(
            ask(&mut agent, r#"{"execute":"guest-ping","id":7}"#),
            json!({"return": {}, "id": 7})
        );
    }

    #[test]
    fn exec_runs_with_exactly_the_given_environment_and_reports_once() {
        let mut agent = Agent::default();
        let started = ask(
            &mut agent,
            r#"{"execute":"guest-exec","arguments":{"path":"/bin/sh","arg":["-c","printf \"$A\"; printf err >&2; exit 3"],"env":["A=x y"],"capture-output":true}}"#,
        );
        let pid = started["return"]["pid"].as_u64().expect("pid");
        let status = exited(&mut agent, pid);
        assert_eq!(status["exitcode"], json!(3));
        assert_eq!(status["out-data"], json!("eCB5"));
        assert_eq!(status["err-data"], json!("ZXJy"));
        let again = ask(&mut agent, &status_command(pid));
        assert_eq!(again["error"]["class"], json!("GenericError"));
    }

    #[test]
    fn a_killed_process_reports_its_signal_and_unknown_commands_are_errors() {
        let mut agent = Agent::default();
        let started = ask(
            &mut agent,
            r#"{"execute":"guest-exec","arguments":{"path":"/bin/sh","arg":["-c","kill -9 $$"]}}"#,
        );
        let pid = started["return"]["pid"].as_u64().expect("pid");
        let status = exited(&mut agent, pid);
        assert_eq!(status["signal"], json!(9));
        assert!(status.get("out-data").is_none());
        let unknown = ask(&mut agent, r#"{"execute":"guest-fsfreeze-freeze","id":1}"#);
        assert_eq!(unknown["error"]["class"], json!("CommandNotFound"));
        assert_eq!(unknown["id"], json!(1));
        let missing = ask(&mut agent, r#"{"execute":"guest-exec","arguments":{}}"#);
        assert_eq!(missing["error"]["desc"], json!("Invalid parameter 'path'"));
    }

    /// The framing a vsock connection gets, over a socket pair (no vsock transport to test on
    /// here): a partial command before a sentinel is dropped, answers come in order, and a
    /// process started on one connection is still known on the next.
    #[test]
    fn a_stream_connection_is_served_until_its_peer_hangs_up() {
        use std::io::{BufRead, BufReader};
        use std::os::unix::net::UnixStream;
        let agent = std::sync::Arc::new(std::sync::Mutex::new(Agent::default()));
        let connect = |agent: &std::sync::Arc<std::sync::Mutex<Agent>>| {
            let (guest, host) = UnixStream::pair().expect("socket pair");
            let agent = agent.clone();
            let server = std::thread::spawn(move || {
                agent.lock().expect("agent").serve(guest);
            });
            (host, server)
        };
        let (mut host, server) = connect(&agent);
        let mut reader = BufReader::new(host.try_clone().expect("clone"));
        host.write_all(b"{\"execute\":\"guest-pi").expect("write");
        host.write_all(&[SENTINEL]).expect("write");
        host.write_all(b"{\"execute\":\"guest-sync\",\"arguments\":{\"id\":7}}\n{\"execute\":\"guest-exec\",\"arguments\":{\"path\":\"/bin/sh\",\"arg\":[\"-c\",\"exit 3\"]}}\n")
            .expect("write");
        let mut line = String::new();
        reader.read_line(&mut line).expect("sync answer");
        assert_eq!(
            serde_json::from_str::<Value>(&line).expect("json")["return"],
            json!(7)
        );
        line.clear();
        reader.read_line(&mut line).expect("exec answer");
        let pid = serde_json::from_str::<Value>(&line).expect("json")["return"]["pid"]
            .as_u64()
            .expect("pid");
        drop(host);
        drop(reader);
        server.join().expect("served until the hang-up");

        let (mut host, server) = connect(&agent);
        let mut reader = BufReader::new(host.try_clone().expect("clone"));
        let status = loop {
            host.write_all(format!("{}\n", status_command(pid)).as_bytes())
                .expect("write");
            line.clear();
            reader.read_line(&mut line).expect("status answer");
            let status = serde_json::from_str::<Value>(&line).expect("json");
            if status["return"]["exited"] == json!(true) {
                break status;
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        assert_eq!(status["return"]["exitcode"], json!(3));
        drop(host);
        drop(reader);
        server.join().expect("served until the hang-up");
    }
}
