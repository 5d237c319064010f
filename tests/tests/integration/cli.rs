//! `ci-exec` as a user drives it: exit codes, streams, stdin, bad input, namespaces, signals.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use ci_exec_tests::{SEED_EXAMPLES, ci_exec_binary};

/// A `ci-exec` invocation with a clean environment: its own native state dir, no driver or
/// token variables from the caller.
struct Cli {
    state: tempfile::TempDir,
}

impl Cli {
    fn new() -> Cli {
        Cli {
            state: tempfile::tempdir().expect("tempdir"),
        }
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(ci_exec_binary());
        command
            .args(args)
            .env("CI_EXEC_NATIVE_STATE_DIR", self.state.path())
            .env("NO_COLOR", "1")
            .env_remove("RUST_LOG")
            .env_remove("CI_EXEC_DRIVER");
        for variable in ["DIGITALOCEAN_TOKEN", "HETZNER_TOKEN", "FLY_API_TOKEN"] {
            command.env_remove(variable);
        }
        command
    }

    fn run(&self, args: &[&str]) -> Output {
        self.command(args)
            .stdin(Stdio::null())
            .output()
            .expect("run ci-exec")
    }

    fn run_with_input(&self, args: &[&str], input: &[u8]) -> Output {
        let mut child = self
            .command(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn ci-exec");
        let mut stdin = child.stdin.take().expect("stdin");
        stdin.write_all(input).expect("write stdin");
        drop(stdin);
        child.wait_with_output().expect("wait")
    }

    /// Namespaces left in the native state directory.
    fn namespaces(&self) -> Vec<String> {
        match std::fs::read_dir(self.state.path()) {
            Ok(entries) => entries
                .flatten()
                .map(|entry| entry.file_name().to_string_lossy().into_owned())
                .collect(),
            Err(_) => Vec::new(),
        }
    }
}

fn code(output: &Output) -> i32 {
    output.status.code().expect("exited normally")
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn first_line(output: &Output) -> String {
    stderr(output).lines().next().unwrap_or_default().to_owned()
}

#[test]
fn version_prints_name_and_version() {
    let output = Cli::new().run(&["--version"]);
    assert_eq!(code(&output), 0);
    assert_eq!(
        String::from_utf8_lossy(&output.stdout).trim(),
        format!("ci-exec {}", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn run_exits_with_the_task_code_and_keeps_streams_apart() {
    let cli = Cli::new();
    let output = cli.run(&[
        "run",
        "--driver=native",
        "--",
        "sh",
        "-c",
        "printf out; printf err >&2; exit 3",
    ]);
    assert_eq!(code(&output), 3, "stderr: {}", stderr(&output));
    assert_eq!(output.stdout, b"out");
    assert_eq!(output.stderr, b"err");
    assert!(cli.namespaces().is_empty(), "left {:?}", cli.namespaces());
}

#[test]
fn run_output_is_byte_exact() {
    let output = Cli::new().run(&[
        "run",
        "--driver=native",
        "--",
        "printf",
        "\\000\\001\\377\\r\\n",
    ]);
    assert_eq!(code(&output), 0);
    assert_eq!(output.stdout, b"\x00\x01\xff\r\n");
}

#[test]
fn run_forwards_stdin_only_with_i() {
    let cli = Cli::new();
    let input = b"line one\n\x00\xffend";
    let output = cli.run_with_input(&["run", "--driver=native", "-i", "--", "cat"], input);
    assert_eq!(code(&output), 0, "stderr: {}", stderr(&output));
    assert_eq!(output.stdout, input);
    let output = cli.run_with_input(&["run", "--driver=native", "--", "cat"], input);
    assert_eq!(code(&output), 0);
    assert_eq!(output.stdout, b"", "stdin reached the task without -i");
}

/// Regression: dropping the async runtime joined the thread blocked in a read of our stdin,
/// so `run -i` stayed alive after its task ended until the input did.
#[test]
fn run_i_exits_when_the_task_ends_while_stdin_stays_open() {
    let cli = Cli::new();
    let mut child = cli
        .command(&["run", "--driver=native", "-i", "--", "true"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn ci-exec");
    let open_stdin = child.stdin.take();
    let mut status = None;
    wait_for(
        "`run -i` to exit with its stdin open",
        Duration::from_secs(60),
        || {
            status = child.try_wait().expect("wait");
            status.is_some()
        },
    );
    drop(open_stdin);
    assert_eq!(status.and_then(|status| status.code()), Some(0));
    assert!(cli.namespaces().is_empty(), "{:?}", cli.namespaces());
}

#[test]
fn run_passes_env_and_no_host_env() {
    let output = Cli::new()
        .command(&[
            "run",
            "--driver=native",
            "-e",
            "A=1",
            "-e",
            "HOST_ONLY",
            "--",
            "env",
        ])
        .env("HOST_ONLY", "copied")
        .env("NOT_PASSED", "secret")
        .output()
        .expect("run");
    assert_eq!(code(&output), 0);
    let mut lines: Vec<String> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(str::to_owned)
        .collect();
    lines.sort();
    assert_eq!(
        lines,
        [
            "A=1",
            "HOST_ONLY=copied",
            &format!("PATH={}", ci_exec_native::DEFAULT_PATH)
        ]
    );
}

#[test]
fn missing_program_exits_127_with_one_line() {
    let cli = Cli::new();
    let output = cli.run(&["run", "--driver=native", "--", "no-such-program-x"]);
    assert_eq!(code(&output), 127);
    let line = first_line(&output);
    assert!(
        line.starts_with("error: command `no-such-program-x` of task `run-")
            && line.ends_with("` not found"),
        "{line}"
    );
    assert!(stderr(&output).contains("hint: "));
    assert!(cli.namespaces().is_empty(), "left {:?}", cli.namespaces());
}

#[test]
fn program_that_cannot_run_exits_126() {
    let cli = Cli::new();
    let script = cli.state.path().join("not-executable.sh");
    std::fs::write(&script, "echo hi\n").expect("write");
    let output = cli.run(&[
        "run",
        "--driver=native",
        "--",
        script.to_str().expect("utf-8"),
    ]);
    assert_eq!(code(&output), 126, "stderr: {}", stderr(&output));
    assert!(
        first_line(&output).starts_with("error: cannot run `"),
        "{}",
        stderr(&output)
    );
}

#[test]
fn bad_driver_strings_exit_2_with_one_clear_line() {
    let cli = Cli::new();
    let cases = [
        (
            "--driver=nope",
            "error: unknown driver `nope`: use one of `k8s`, `docker`, `podman`, `native`, \
             `digitalocean`, `hetzner`, `fly`, `qemu`, `vz`",
        ),
        (
            "--driver=qemu:memory=lots",
            "error: invalid value `lots` for parameter `memory` of driver `qemu` (from the DSN): \
             expected a whole number of at least 64",
        ),
        (
            "--driver=hetzner",
            "error: missing parameter `token` of driver `hetzner`: set it in the DSN \
             (`hetzner:token=…`) or in `HETZNER_TOKEN`",
        ),
        (
            "--driver=qemu:memory",
            "error: malformed DSN for driver `qemu`: segment `memory` is not `KEY=VALUE`; write \
             `qemu:KEY=VALUE,…`",
        ),
        (
            "--driver=native://bad%2Fname",
            "error: invalid namespace `bad/name`: it contains a character other than letters, \
             digits, `_`, `.` or `-`; use letters, digits, `_`, `.` or `-`, starting with a \
             letter or digit, at most 63 characters",
        ),
    ];
    for (driver, expected) in cases {
        for args in [
            vec!["run", driver, "--", "true"],
            vec!["driver", "show", driver],
        ] {
            let output = cli.run(&args);
            assert_eq!(code(&output), 2, "{args:?}: {}", stderr(&output));
            assert_eq!(first_line(&output), expected, "{args:?}");
        }
    }
    // A value only the driver can judge is a usage error too, found before connecting.
    let output = cli.run(&["run", "--driver=docker://ns?host=bogus", "--", "true"]);
    assert_eq!(code(&output), 2, "{}", stderr(&output));
    assert_eq!(
        first_line(&output),
        "error: invalid `host` `bogus` for the `docker` driver: expected `unix:///path/to.sock`, \
         `tcp://host:port` or `ssh://[user@]host[:port]`"
    );
    assert!(cli.namespaces().is_empty());
}

#[test]
fn bad_run_arguments_exit_2() {
    let cli = Cli::new();
    let output = cli.run(&["run", "--driver=native", "-v", "/srv:/data", "--", "true"]);
    assert_eq!(code(&output), 2);
    assert!(first_line(&output).starts_with("error: invalid `-v /srv:/data`"));
    let output = cli.run(&["run", "--driver=native"]);
    assert_eq!(code(&output), 2, "a command is required");
}

/// `vz` is Apple's Virtualization.framework: listed everywhere, refused off a Mac in one line
/// that names the driver to use instead.
#[cfg(not(target_os = "macos"))]
#[test]
fn vz_off_a_mac_is_one_line_pointing_at_qemu_with_exit_2() {
    let output = Cli::new().run(&["run", "--driver=vz", "--", "true"]);
    assert_eq!(code(&output), 2);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(
        stderr.trim_end(),
        "error: driver `vz` needs macOS (Apple Virtualization.framework); use `--driver=qemu`",
        "exactly one line: {stderr}"
    );
}

#[test]
fn every_driver_is_listed_with_its_availability() {
    let listing = Cli::new().run(&["drivers"]);
    let table = String::from_utf8_lossy(&listing.stdout);
    assert!(table.contains("\nvz  "), "{table}");
    assert!(table.contains("\nfly  "), "{table}");
    assert!(table.contains("\nk8s  "), "{table}");
    assert!(table.contains("\nqemu  "), "{table}");
    let json = Cli::new().run(&["drivers", "--json"]);
    let json: serde_json::Value = serde_json::from_slice(&json.stdout).expect("json");
    let available = |name: &str| {
        json.as_array()
            .and_then(|drivers| drivers.iter().find(|driver| driver["name"] == name))
            .map(|driver| driver["available"].clone())
    };
    assert_eq!(available("vz"), Some(serde_json::Value::Bool(true)));
    assert_eq!(available("fly"), Some(serde_json::Value::Bool(true)));
    assert_eq!(available("docker"), Some(serde_json::Value::Bool(true)));
}

#[test]
fn a_closed_stdout_ends_listing_commands_quietly() {
    use std::io::Read as _;
    for args in [
        &["drivers"][..],
        &["results", "list"],
        &["drivers", "--json"],
    ] {
        let mut child = Command::new(ci_exec_binary())
            .args(args)
            .env(
                "CI_EXEC_RESULTS",
                std::env::temp_dir().join("ci-exec-epipe-results"),
            )
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn");
        // `| head -0`: the reader goes away before the first write.
        drop(child.stdout.take());
        let mut stderr = String::new();
        child
            .stderr
            .take()
            .expect("stderr")
            .read_to_string(&mut stderr)
            .expect("read");
        let status = child.wait().expect("wait");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
        assert!(
            !stderr.to_lowercase().contains("broken pipe"),
            "{args:?}: {stderr}"
        );
        assert!(
            status.code().is_none_or(|code| code == 0),
            "{args:?}: {status}"
        );
    }
}

#[test]
fn secrets_are_never_printed() {
    let output = Cli::new()
        .command(&[
            "driver",
            "show",
            "--json",
            "--driver=hetzner:labels=env=prod,app=x",
        ])
        .env("HETZNER_TOKEN", "very-secret-token")
        .output()
        .expect("run");
    assert_eq!(code(&output), 0, "{}", stderr(&output));
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(!text.contains("very-secret-token"), "{text}");
    let json: serde_json::Value = serde_json::from_str(&text).expect("json");
    assert_eq!(json["params"]["token"], "<redacted>");
    assert_eq!(json["params"]["labels"], "env=prod,app=x");
    let output = Cli::new().run(&["driver", "show", "--driver=fly:token=fo1_secret,org=x"]);
    assert!(!String::from_utf8_lossy(&output.stdout).contains("fo1_secret"));
}

#[test]
fn driver_show_resolves_every_seed_example() {
    let cli = Cli::new();
    for (dsn, env) in SEED_EXAMPLES {
        let mut command = cli.command(&["driver", "show", "--json", &format!("--driver={dsn}")]);
        if let Some((variable, value)) = env {
            command.env(variable, value);
        }
        let output = command.output().expect("run");
        assert_eq!(code(&output), 0, "`{dsn}`: {}", stderr(&output));
        let json: serde_json::Value = serde_json::from_slice(&output.stdout).expect("json output");
        let name = dsn.split(':').next().unwrap_or_default();
        assert_eq!(json["driver"], name, "`{dsn}`");
        let spec = ci_exec_driver::driver_spec(name).expect("registered");
        let params = json["params"].as_object().expect("params");
        assert_eq!(
            params.len(),
            spec.params.len(),
            "`{dsn}`: every parameter listed"
        );
        for param in spec.params.iter().filter(|param| param.secret) {
            let value = &params[param.name];
            assert!(value.is_null() || value == "<redacted>", "`{dsn}`: {value}");
        }
    }
    // Spot checks of what the seeds say the examples mean.
    let show = |dsn: &str, env: &[(&str, &str)]| -> serde_json::Value {
        let mut command = cli.command(&["driver", "show", "--json", &format!("--driver={dsn}")]);
        command.envs(env.iter().copied());
        serde_json::from_slice(&command.output().expect("run").stdout).expect("json")
    };
    let json = show("k8s://staging?region=us-east&timeout=300", &[]);
    assert_eq!(json["namespace"], "staging");
    assert_eq!(json["unknown"]["region"], "us-east");
    let json = show(
        "digitalocean:tags=prod,myapp",
        &[("DIGITALOCEAN_TOKEN", "t")],
    );
    assert_eq!(json["params"]["tags"], "prod,myapp");
    let json = show(
        "qemu:memory=4096,cpus=4",
        &[("QEMU_MEMORY", "1024"), ("QEMU_ACCEL", "tcg")],
    );
    assert_eq!(json["params"]["memory"], 4096, "DSN beats env");
    assert_eq!(json["params"]["accel"], "tcg", "env beats default");
    assert_eq!(json["params"]["image"], "debian-bookworm");
    let json = show("k8s:namespace=prod,kubeconfig=/etc/k8s/config", &[]);
    assert_eq!(json["namespace"], "prod");
    assert_eq!(json["params"]["kubeconfig"], "/etc/k8s/config");
}

#[test]
fn drivers_lists_every_driver_with_its_parameters() {
    let output = Cli::new().run(&["drivers", "--json"]);
    assert_eq!(code(&output), 0);
    let json: serde_json::Value = serde_json::from_slice(&output.stdout).expect("json");
    let names: Vec<_> = json
        .as_array()
        .expect("array")
        .iter()
        .map(|driver| driver["name"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert_eq!(
        names,
        [
            "k8s",
            "docker",
            "podman",
            "native",
            "digitalocean",
            "hetzner",
            "fly",
            "qemu",
            "vz"
        ]
    );
    let qemu = &json[7]["params"];
    let memory = qemu
        .as_array()
        .expect("params")
        .iter()
        .find(|param| param["name"] == "memory")
        .expect("memory");
    assert_eq!(memory["default"], "2048");
    assert_eq!(memory["env"], "QEMU_MEMORY");
    let table = Cli::new().run(&["drivers"]);
    assert!(String::from_utf8_lossy(&table.stdout).contains("HETZNER_TOKEN"));
}

#[test]
fn named_namespace_keeps_volumes_until_closed() {
    let cli = Cli::new();
    let write = cli.run(&[
        "run",
        "--driver=native://shared",
        "-v",
        "data:/data",
        "--",
        "sh",
        "-c",
        "echo kept > data/file",
    ]);
    assert_eq!(code(&write), 0, "{}", stderr(&write));
    let read = cli.run(&[
        "run",
        "--driver=native://shared",
        "-v",
        "data:/data",
        "--",
        "cat",
        "data/file",
    ]);
    assert_eq!(code(&read), 0, "{}", stderr(&read));
    assert_eq!(read.stdout, b"kept\n");
    assert_eq!(cli.namespaces(), ["shared"]);
    let close = cli.run(&["driver", "close", "--driver=native://shared"]);
    assert_eq!(code(&close), 0, "{}", stderr(&close));
    assert!(cli.namespaces().is_empty(), "left {:?}", cli.namespaces());
    let again = cli.run(&["driver", "close", "--driver=native://shared"]);
    assert_eq!(code(&again), 0, "closing twice is fine");
}

#[test]
fn driver_close_needs_a_namespace() {
    let output = Cli::new().run(&["driver", "close", "--driver=native"]);
    assert_eq!(code(&output), 2);
    assert_eq!(
        first_line(&output),
        "error: `driver close` needs the namespace to close: write `--driver=native://NAMESPACE`"
    );
}

/// Starts `ci-exec run` whose task prints its shell's pid and then sleeps; returns the child
/// and that pid.
fn start_sleeper(cli: &Cli, driver: &str) -> (std::process::Child, i32) {
    let mut child = cli
        .command(&[
            "run",
            driver,
            "--",
            "sh",
            "-c",
            "echo $$; sleep 600; echo never",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let stdout = child.stdout.take().expect("stdout");
    let (sender, receiver) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = sender.send(line);
    });
    let line = receiver
        .recv_timeout(Duration::from_secs(60))
        .expect("the task printed its pid");
    let pid = line.trim().parse().expect("a pid");
    (child, pid)
}

/// Whether `pid` is gone (or a zombie nobody reaped yet).
fn gone(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => {
            stat.rfind(')')
                .and_then(|end| stat[end + 1..].split_whitespace().next())
                == Some("Z")
        }
    }
}

fn wait_for(what: &str, timeout: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Sends `signal` to the `ci-exec` we started and waits (up to 30 s) for it to exit.
fn signal_and_wait(child: &mut std::process::Child, signal: i32) -> std::process::ExitStatus {
    let ci_exec_pid = i32::try_from(child.id()).expect("pid");
    // SAFETY: sends a signal to the child we started.
    unsafe {
        libc::kill(ci_exec_pid, signal);
    }
    let mut status = None;
    wait_for("ci-exec to exit", Duration::from_secs(30), || {
        status = child.try_wait().expect("try_wait");
        status.is_some()
    });
    status.expect("exited")
}

#[test]
fn ctrl_c_stops_the_task_and_cleans_up() {
    let cli = Cli::new();
    let (mut child, task_pid) = start_sleeper(&cli, "--driver=native");
    let status = signal_and_wait(&mut child, libc::SIGINT);
    assert_eq!(status.code(), Some(130));
    wait_for("the task to be killed", Duration::from_secs(30), || {
        gone(task_pid)
    });
    assert!(cli.namespaces().is_empty(), "left {:?}", cli.namespaces());
}

#[test]
fn close_recovers_after_a_killed_run() {
    let cli = Cli::new();
    let (mut child, task_pid) = start_sleeper(&cli, "--driver=native://crashed");
    child.kill().expect("SIGKILL ci-exec");
    child.wait().expect("reap");
    assert!(!gone(task_pid), "the task outlives a killed ci-exec");
    assert_eq!(cli.namespaces(), ["crashed"]);
    let close = cli.run(&["driver", "close", "--driver=native://crashed"]);
    assert_eq!(code(&close), 0, "{}", stderr(&close));
    wait_for(
        "the orphaned task to be killed",
        Duration::from_secs(30),
        || gone(task_pid),
    );
    assert!(cli.namespaces().is_empty(), "left {:?}", cli.namespaces());
}

/// The same for the qemu driver: Ctrl-C ends the run (130) and stops its VM; `kill -9` of
/// `ci-exec` takes QEMU with it (parent-death signal); `driver close` then removes the rest.
#[test]
fn ctrl_c_and_kill_stop_the_qemu_vm_and_close_removes_the_rest() {
    let namespace = ci_exec_tests::unique_namespace("cli-qemu");
    let Some(config) = ci_exec_tests::drivers::qemu_config(&format!("qemu://{namespace}")) else {
        return;
    };
    let run_dir = config.run_dir();
    let driver = format!("--driver=qemu://{namespace}");
    let cli = Cli::new();
    for signal in [libc::SIGINT, libc::SIGKILL] {
        let (mut child, _) = start_sleeper(&cli, &driver);
        let pid_file = ci_exec_qemu::run_dir::RunDir::new(run_dir.clone()).pid_file();
        let qemu: i32 = std::fs::read_to_string(&pid_file)
            .unwrap_or_else(|error| panic!("{}: {error}", pid_file.display()))
            .trim()
            .parse()
            .expect("a pid in the pid file");
        let status = signal_and_wait(&mut child, signal);
        if signal == libc::SIGINT {
            assert_eq!(status.code(), Some(130));
        }
        wait_for("QEMU to exit", Duration::from_secs(30), || gone(qemu));
    }
    assert!(run_dir.exists(), "the killed run's directory is a leftover");
    let close = cli.run(&["driver", "close", &driver]);
    assert_eq!(code(&close), 0, "{}", stderr(&close));
    assert!(!run_dir.exists(), "{} is left", run_dir.display());
}

/// A run killed in a generated namespace leaves its task running and its directory behind;
/// nobody can name that namespace in `driver close`, so the next run removes both once the
/// killed run's owner lock is free and the directory is old enough (a minute).
#[test]
fn the_next_run_removes_what_a_killed_run_left_in_a_generated_namespace() {
    let cli = Cli::new();
    let (mut child, task_pid) = start_sleeper(&cli, "--driver=native");
    child.kill().expect("SIGKILL ci-exec");
    child.wait().expect("reap");
    assert!(!gone(task_pid), "the task outlives a killed ci-exec");
    let left = cli.namespaces();
    assert_eq!(left.len(), 1, "{left:?}");
    let run = cli.run(&["run", "--driver=native", "--", "true"]);
    assert_eq!(code(&run), 0, "{}", stderr(&run));
    assert_eq!(
        cli.namespaces(),
        left,
        "a fresh leftover may be a run starting up"
    );

    let a_minute_ago = std::time::SystemTime::now() - Duration::from_secs(61);
    std::fs::File::open(cli.state.path().join(&left[0]))
        .and_then(|directory| directory.set_modified(a_minute_ago))
        .expect("age the leftover");
    let run = cli.run(&["run", "--driver=native", "--", "true"]);
    assert_eq!(code(&run), 0, "{}", stderr(&run));
    wait_for(
        "the orphaned task to be killed",
        Duration::from_secs(30),
        || gone(task_pid),
    );
    assert!(cli.namespaces().is_empty(), "left {:?}", cli.namespaces());
}

/// `kill -9` of a `hetzner` run leaves its server (as a crashed machine would); `driver close`
/// of the namespace finds it by label and deletes it with the run's ssh key. Against the fake
/// API, whose server is the test sshd.
#[test]
fn driver_close_deletes_what_a_killed_cloud_run_left() {
    let host = match ci_exec_fake_cloud::SshTestHost::from_env() {
        Ok(host) => host,
        Err(missing) => {
            let _ = ci_exec_tests::missing_prerequisite::<()>(
                "hetzner",
                &format!("{missing}: source .ci/setup-docker.sh"),
            );
            return;
        }
    };
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let fake = runtime
        .block_on(ci_exec_fake_cloud::FakeCloud::start(
            ci_exec_fake_cloud::Api::Hetzner,
            host.options(),
        ))
        .expect("fake API");
    let namespace = ci_exec_tests::unique_namespace("cli-cloud");
    let driver = format!(
        "--driver=hetzner://{namespace}?token={}&endpoint={}&ssh_user={}",
        ci_exec_tests::drivers::FAKE_CLOUD_TOKEN,
        fake.endpoint(),
        host.user
    );
    let cli = Cli::new();
    let (mut child, _) = start_sleeper(&cli, &driver);
    assert_eq!(fake.servers().len(), 1);
    child.kill().expect("SIGKILL ci-exec");
    child.wait().expect("reap");
    assert_eq!(fake.servers().len(), 1, "a killed run leaves its server");
    assert_eq!(fake.keys().len(), 1, "and its key");
    let close = cli.run(&["driver", "close", &driver]);
    assert_eq!(code(&close), 0, "{}", stderr(&close));
    assert!(fake.servers().is_empty(), "{:?}", fake.servers());
    assert!(fake.keys().is_empty(), "{:?}", fake.keys());
    assert_eq!(fake.violations(), Vec::<String>::new());
    // A real server takes its containers with it; the fake's is this machine's test engine.
    let docker = cli.run(&["driver", "close", &format!("--driver=docker://{namespace}")]);
    assert_eq!(code(&docker), 0, "{}", stderr(&docker));
}
