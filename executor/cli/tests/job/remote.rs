//! Remote replay end to end: a real `ci-exec serve`, executor A publishing with a publish
//! token, executor B (its own state and results) replaying with a read token — and every way
//! that must make B run the job itself instead.

use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

use super::{BINARY, Repo, assert_exit, available, text, walk};

pub(super) const REPO: &str = "github.com/acme/widget";

/// `ci-exec serve` on a free loopback port, with its own data directory; killed when dropped.
pub(super) struct Serve {
    child: Child,
    pub(super) url: String,
    pub(super) data: tempfile::TempDir,
}

impl Serve {
    pub(super) fn start() -> Serve {
        Serve::start_with(&[])
    }

    /// With more arguments (`--oidc-issuer URL`).
    pub(super) fn start_with(args: &[&str]) -> Serve {
        Serve::start_on(tempfile::tempdir().expect("tempdir"), "127.0.0.1:0", args)
    }

    /// Kills the server with SIGKILL and starts another on the same data and address.
    fn kill_and_restart(mut self) -> Serve {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let address = self.url.trim_start_matches("http://").to_owned();
        let data = std::mem::replace(&mut self.data, tempfile::tempdir().expect("tempdir"));
        Serve::start_on(data, &address, &[])
    }

    fn start_on(data: tempfile::TempDir, address: &str, args: &[&str]) -> Serve {
        let mut child = Command::new(BINARY)
            .args(["serve", "--listen", address, "--data"])
            .arg(data.path())
            .args(args)
            .stderr(Stdio::piped())
            .spawn()
            .expect("ci-exec serve starts");
        let stderr = child.stderr.take().expect("stderr");
        let mut lines = BufReader::new(stderr).lines();
        // The first line names the address; `serve` prints it once it listens.
        let line = lines.next().expect("a line").expect("utf-8");
        let url = line
            .split_whitespace()
            .find(|word| word.starts_with("http://"))
            .unwrap_or_else(|| panic!("no URL in `{line}`"))
            .to_owned();
        // Keep draining stderr so the server never blocks on a full pipe.
        std::thread::spawn(move || lines.for_each(drop));
        Serve { child, url, data }
    }

    pub(super) fn token(&self, repository: &str, publish: bool) -> String {
        let mut command = Command::new(BINARY);
        command
            .args(["token", "create", "--repo", repository, "--data"])
            .arg(self.data.path());
        if publish {
            command.arg("--publish");
        }
        let output = command.output().expect("token create");
        assert_exit(&output, 0);
        text(&output.stdout).trim().to_owned()
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One executor: its own state directory (key), result store and artifacts directory.
pub(super) struct Executor {
    pub(super) dir: tempfile::TempDir,
}

impl Executor {
    pub(super) fn new() -> Executor {
        Executor {
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }

    pub(super) fn artifacts(&self) -> PathBuf {
        self.dir.path().join("artifacts")
    }

    pub(super) fn test(&self, repo: &Repo, orchestrator: &str, token: Option<&str>) -> Output {
        self.command(repo, orchestrator, token)
            .output()
            .expect("ci-exec runs")
    }

    pub(super) fn command(&self, repo: &Repo, orchestrator: &str, token: Option<&str>) -> Command {
        let mut command = Command::new(BINARY);
        command
            .args(["test", "--driver=native", "--orchestrator", orchestrator])
            .arg("--artifacts")
            .arg(self.artifacts())
            .arg("--report")
            .arg(self.dir.path().join("report.json"))
            .current_dir(repo.path())
            .env("XDG_DATA_HOME", self.dir.path().join("state"))
            .env("CI_EXEC_RESULTS", self.dir.path().join("results"))
            .env("NO_COLOR", "1")
            .env_remove("CI_EXEC_TOKEN")
            .env_remove("CI_EXEC_DRIVER")
            .env_remove("CI_EXEC_REPO")
            .env_remove("CI_EXEC_TRUSTED_KEYS")
            .env_remove("CI_EXEC_ENV")
            // A laptop, not a CI job (tests that play one set these again).
            .env_remove("CI")
            .env_remove("GITHUB_ACTIONS")
            .env_remove("GITLAB_CI");
        if let Some(token) = token {
            command.env("CI_EXEC_TOKEN", token);
        }
        command
    }

    pub(super) fn report(&self) -> serde_json::Value {
        let bytes = std::fs::read(self.dir.path().join("report.json")).expect("report");
        serde_json::from_slice(&bytes).expect("json")
    }
}

pub(super) fn repository() -> Repo {
    let repo = Repo::example("artifacts-cache");
    repo.git(&[
        "remote",
        "add",
        "origin",
        "https://github.com/acme/widget.git",
    ]);
    repo
}

pub(super) fn files(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut files: Vec<_> = walk(dir)
        .into_iter()
        .map(|path| {
            let content = std::fs::read(&path).expect("read");
            (path.strip_prefix(dir).expect("inside").to_owned(), content)
        })
        .collect();
    files.sort();
    files
}

/// An orchestrator holding the result executor A ran and published with a publish token.
struct Published {
    serve: Serve,
    read: String,
    repo: Repo,
    a: Executor,
    first: Output,
}

fn published() -> Published {
    let serve = Serve::start();
    let publish = serve.token(REPO, true);
    let read = serve.token(REPO, false);
    let repo = repository();
    let a = Executor::new();
    let first = a.test(&repo, &serve.url, Some(&publish));
    assert_exit(&first, 0);
    assert!(ran_for_real(&first), "{}", text(&first.stderr));
    assert!(
        text(&first.stderr).contains("==> published result"),
        "{}",
        text(&first.stderr)
    );
    Published {
        serve,
        read,
        repo,
        a,
        first,
    }
}

pub(super) fn ran_for_real(output: &Output) -> bool {
    text(&output.stderr).contains("==> passed in")
}

#[test]
fn a_result_published_by_one_executor_is_replayed_by_another() {
    if !available("native") {
        return;
    }
    let Published {
        serve,
        read,
        repo,
        a,
        first,
    } = published();

    let b = Executor::new();
    let replay = b.test(&repo, &serve.url, Some(&read));
    assert_exit(&replay, 0);
    let stderr = text(&replay.stderr);
    assert!(stderr.contains(&format!("from {}", serve.url)), "{stderr}");
    assert_eq!(replay.stdout, first.stdout, "stdout byte-exact");
    assert_eq!(
        files(&b.artifacts()),
        files(&a.artifacts()),
        "artifacts restored"
    );
    assert!(!files(&b.artifacts()).is_empty());
    let report = b.report();
    assert_eq!(report["replayed"], true);
    assert_eq!(report["replayed_from"], serve.url.as_str());

    // A blob changed on the orchestrator: B's fresh twin refuses it and runs the job.
    let stdout_blob = a.report()["key"].as_str().map(str::to_owned).expect("key");
    let cas = serve.data.path().join("cas");
    let mut tampered = 0;
    for entry in std::fs::read_dir(&cas).expect("cas") {
        let path = entry.expect("entry").path();
        let mut content = std::fs::read(&path).expect("blob");
        content.push(b'!');
        std::fs::write(&path, content).expect("tamper");
        tampered += 1;
    }
    assert!(tampered > 0, "blobs of {stdout_blob}");
    let c = Executor::new();
    let output = c.test(&repo, &serve.url, Some(&read));
    assert_exit(&output, 0);
    let stderr = text(&output.stderr);
    assert!(stderr.contains("does not match its digest"), "{stderr}");
    assert!(ran_for_real(&output), "{stderr}");
    assert_eq!(output.stdout, first.stdout);
}

#[test]
fn wrong_missing_and_foreign_tokens_are_refused() {
    if !available("native") {
        return;
    }
    let serve = Serve::start();
    let publish = serve.token(REPO, true);
    let foreign = serve.token("github.com/acme/other", true);
    let repo = repository();
    let a = Executor::new();
    assert_exit(&a.test(&repo, &serve.url, Some(&publish)), 0);

    for (token, status) in [("cie_not-a-token", "(401)"), (foreign.as_str(), "(403)")] {
        let b = Executor::new();
        let output = b.test(&repo, &serve.url, Some(token));
        assert_exit(&output, 0);
        let stderr = text(&output.stderr);
        assert!(stderr.contains(status), "{token}: {stderr}");
        assert!(ran_for_real(&output), "{stderr}");
    }

    let output = Executor::new().test(&repo, &serve.url, None);
    assert_exit(&output, 2);
    assert!(
        text(&output.stderr).contains("CI_EXEC_TOKEN"),
        "{}",
        text(&output.stderr)
    );
}

#[test]
fn an_unreachable_orchestrator_never_fails_the_job() {
    if !available("native") {
        return;
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("free port");
    let repo = repository();
    let output = Executor::new().test(&repo, &format!("http://{port}"), Some("cie_x"));
    assert_exit(&output, 0);
    let stderr = text(&output.stderr);
    assert!(
        stderr.contains("unreachable") && stderr.contains("running the job here"),
        "{stderr}"
    );
    assert!(ran_for_real(&output), "{stderr}");
}

#[test]
fn a_repository_without_origin_must_be_named() {
    if !available("native") {
        return;
    }
    let repo = Repo::example("hello");
    let output = Executor::new().test(&repo, "http://127.0.0.1:9", Some("cie_x"));
    assert_exit(&output, 2);
    let stderr = text(&output.stderr);
    assert!(
        stderr.contains("has no `origin` remote") && stderr.contains("--repo"),
        "{stderr}"
    );
}

#[test]
fn a_connected_executors_result_is_replayed_through_the_orchestrator_until_it_leaves() {
    if !available("native") {
        return;
    }
    let serve = Serve::start();
    let publish = serve.token(REPO, true);
    let read = serve.token(REPO, false);
    let repo = repository();

    let a = Executor::new();
    let mut connected = a
        .command(&repo, &serve.url, Some(&publish))
        .arg("--serve-results")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("ci-exec test --serve-results");
    let mut lines = BufReader::new(connected.stderr.take().expect("stderr")).lines();
    let mut seen = Vec::new();
    for line in lines.by_ref() {
        let line = line.expect("utf-8");
        let serving = line.starts_with("==> serving result");
        seen.push(line);
        if serving {
            break;
        }
    }
    assert!(
        seen.last()
            .is_some_and(|line| line.starts_with("==> serving")),
        "{seen:#?}"
    );
    assert!(
        !seen.iter().any(|line| line.contains("published")),
        "{seen:#?}"
    );

    let b = Executor::new();
    // The announcement follows the line by one request; until it lands the key is unknown.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let replay = loop {
        let output = b.test(&repo, &serve.url, Some(&read));
        if text(&output.stderr).contains("replaying") || std::time::Instant::now() > deadline {
            break output;
        }
        let _ = std::fs::remove_dir_all(b.dir.path().join("results"));
    };
    assert_exit(&replay, 0);
    assert!(
        text(&replay.stderr).contains(&format!("from {}", serve.url)),
        "{}",
        text(&replay.stderr)
    );
    assert_eq!(files(&b.artifacts()), files(&a.artifacts()));
    assert!(
        std::fs::read_dir(serve.data.path().join("cas"))
            .expect("cas")
            .count()
            == 0,
        "a connected executor uploads nothing"
    );

    // SIGINT: it leaves, successfully, and its result is no longer offered.
    // SAFETY: kill(2) on our own child's pid; no memory is involved.
    unsafe {
        libc::kill(connected.id() as libc::pid_t, libc::SIGINT);
    }
    let status = connected.wait().expect("wait");
    assert_eq!(status.code(), Some(0));
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    assert!(
        rest.iter().any(|line| line.starts_with("==> left")),
        "{rest:#?}"
    );
    let c = Executor::new();
    let output = c.test(&repo, &serve.url, Some(&read));
    assert_exit(&output, 0);
    assert!(ran_for_real(&output), "{}", text(&output.stderr));
}

/// `ci-exec daemon …` with the executor's own state.
fn daemon(executor: &Executor, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = Command::new(BINARY);
    command
        .arg("daemon")
        .args(args)
        .env("XDG_DATA_HOME", executor.dir.path().join("state"))
        .env("CI_EXEC_RESULTS", executor.dir.path().join("results"))
        .env_remove("CI_EXEC_ORCHESTRATOR")
        .env_remove("CI_EXEC_TOKEN")
        .env_remove("CI_EXEC_REPO");
    for (name, value) in env {
        command.env(name, value);
    }
    command.output().expect("ci-exec daemon")
}

/// Stops the daemon however the test ends.
struct StopDaemon<'a>(&'a Executor);

impl Drop for StopDaemon<'_> {
    fn drop(&mut self) {
        let _ = daemon(self.0, &["stop"], &[]);
    }
}

#[test]
fn the_daemon_serves_its_store_and_records_scheduled_runs() {
    if !available("native") {
        return;
    }
    let serve = Serve::start();
    let publish = serve.token(REPO, true);
    let read = serve.token(REPO, false);
    let repo = repository();
    // A schedule that fires every minute, for a target of its own.
    repo.write(
        "mkfile",
        &format!(
            "{}\nnightly:V:\n\techo nightly build\n\n/var/run/ci/crontab:\n\techo '* * * * * nightly' > $target\n",
            std::fs::read_to_string(repo.path().join("mkfile")).expect("mkfile")
        ),
    );
    repo.commit("schedule");

    let d = Executor::new();
    // A result already in the daemon's store, from a run by hand with no orchestrator.
    let by_hand = Command::new(BINARY)
        .args(["test", "--driver=native"])
        .current_dir(repo.path())
        .env("XDG_DATA_HOME", d.dir.path().join("state"))
        .env("CI_EXEC_RESULTS", d.dir.path().join("results"))
        .env_remove("CI_EXEC_ORCHESTRATOR")
        .output()
        .expect("ci-exec test");
    assert_exit(&by_hand, 0);

    let env = [
        ("CI_EXEC_ORCHESTRATOR", serve.url.as_str()),
        ("CI_EXEC_TOKEN", publish.as_str()),
    ];
    let path = repo.path().to_str().expect("utf-8 path");
    assert_exit(&daemon(&d, &["add", path, "--driver=native"], &env), 0);
    assert_exit(&daemon(&d, &["start"], &[]), 0);
    let _stop = StopDaemon(&d);

    // The scheduled run: recorded within the minute it fires (the first tick for `* * * * *`).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(90);
    let runs = loop {
        let status = daemon(&d, &["status", "--json"], &[]);
        let value: serde_json::Value = serde_json::from_slice(&status.stdout).expect("json");
        let runs = value["runs"].as_array().cloned().unwrap_or_default();
        if !runs.is_empty() || std::time::Instant::now() > deadline {
            assert_eq!(value["running"], true, "{value:#}");
            break runs;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    assert!(!runs.is_empty(), "no scheduled run within 90 s");
    assert_eq!(runs[0]["target"], "nightly");
    assert_eq!(runs[0]["exit_code"], 0, "{runs:#?}");
    let text_status = text(&daemon(&d, &["status"], &[]).stdout);
    assert!(
        text_status.contains("schedule: * * * * * nightly"),
        "{text_status}"
    );
    assert!(
        text_status.contains(&format!("serving its results through {}", serve.url)),
        "{text_status}"
    );

    // Another executor replays the result made by hand, relayed from the daemon's store.
    let b = Executor::new();
    let replay = b.test(&repo, &serve.url, Some(&read));
    assert_exit(&replay, 0);
    assert!(
        text(&replay.stderr).contains(&format!("from {}", serve.url)),
        "{}",
        text(&replay.stderr)
    );
    assert_eq!(replay.stdout, by_hand.stdout);

    assert_exit(&daemon(&d, &["stop"], &[]), 0);
    let status = text(&daemon(&d, &["status"], &[]).stdout);
    assert!(status.starts_with("not running"), "{status}");
}

#[test]
fn a_killed_orchestrator_keeps_every_result_it_acknowledged() {
    if !available("native") {
        return;
    }
    let Published {
        serve,
        read,
        repo,
        a,
        first,
    } = published();

    let serve = serve.kill_and_restart();
    let b = Executor::new();
    let replay = b.test(&repo, &serve.url, Some(&read));
    assert_exit(&replay, 0);
    assert!(
        text(&replay.stderr).contains(&format!("from {}", serve.url)),
        "{}",
        text(&replay.stderr)
    );
    assert_eq!(replay.stdout, first.stdout);
    assert_eq!(files(&b.artifacts()), files(&a.artifacts()));
}
