//! `ci-exec daemon`: a background executor. It stays connected to the orchestrator of each
//! registered repository, serving every result of it in the local store, and runs each
//! repository's schedule (`/var/run/ci/crontab`, built by mk in the base OS), recording those
//! runs as `ci-exec test` records them — each run *is* a `ci-exec test` child process, so a
//! scheduled run replays, publishes and cleans up exactly as one started by hand.
//!
//! State, under `$XDG_DATA_HOME/ci-exec/daemon/`: `repositories.json` (what `add` registered,
//! with its orchestrator credentials, owner-only), `daemon.pid`, `daemon.log` (every run's
//! output), `status.json` (what the running daemon knows) and `runs.jsonl` (one line per
//! scheduled run).

use std::collections::{HashMap, HashSet};
use std::fs;
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context as _;
use ci_exec_job::ResultStore;
use ci_exec_job::schedule::{self, Entry};
use ci_exec_job::store::unix_now;
use ci_exec_remote::client::{ClientOptions, Connected, Orchestrator};
use ci_exec_remote::identity::ExecutorKey;
use serde::{Deserialize, Serialize};

use crate::exit::{CliError, SUCCESS};

#[derive(Debug, clap::Subcommand)]
pub enum DaemonCommand {
    /// Register a repository: its schedule runs, and its results are served while the daemon
    /// runs (the orchestrator and token are taken from `CI_EXEC_ORCHESTRATOR`,
    /// `CI_EXEC_TOKEN`, `CI_EXEC_REPO` now)
    Add {
        #[arg(default_value = ".")]
        path: PathBuf,
        /// The driver its scheduled runs use
        #[arg(long, default_value = "qemu", value_name = "DSN")]
        driver: String,
    },
    /// Unregister a repository
    Remove {
        #[arg(default_value = ".")]
        path: PathBuf,
    },
    /// Start the daemon in the background
    Start,
    /// Stop the daemon (its running jobs are stopped and cleaned up)
    Stop,
    /// Whether it runs, what it serves and schedules, and its recent runs
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Run the daemon in the foreground (what `start` starts)
    #[command(hide = true)]
    Run,
}

/// A registered repository.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Registered {
    path: PathBuf,
    driver: String,
    #[serde(default)]
    orchestrator: Option<String>,
    #[serde(default)]
    token: Option<String>,
    /// Its name at the orchestrator, when given (`CI_EXEC_REPO`); its `origin` otherwise.
    #[serde(default)]
    repo: Option<String>,
}

/// One scheduled run, as `runs.jsonl` records it.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct ScheduledRun {
    started_unix: u64,
    path: PathBuf,
    line: String,
    target: String,
    exit_code: Option<i32>,
    key: Option<String>,
    replayed: bool,
}

/// What the running daemon knows, for `status`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Status {
    pid: u32,
    started_unix: u64,
    repositories: Vec<RepositoryStatus>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct RepositoryStatus {
    path: PathBuf,
    driver: String,
    serving: Option<String>,
    schedule: Vec<String>,
    schedule_error: Option<String>,
    next_unix: Option<i64>,
}

fn state_dir() -> PathBuf {
    dirs::data_dir()
        .unwrap_or_else(std::env::temp_dir)
        .join("ci-exec")
        .join("daemon")
}

fn read_registry(dir: &Path) -> Vec<Registered> {
    fs::read(dir.join("repositories.json"))
        .ok()
        .and_then(|bytes| serde_json::from_slice(&bytes).ok())
        .unwrap_or_default()
}

fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir).with_context(|| format!("cannot create `{}`", dir.display()))?;
    let staged = path.with_extension("tmp");
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&staged)
        .with_context(|| format!("cannot write `{}`", staged.display()))?;
    file.write_all(bytes)?;
    file.sync_all()?;
    fs::rename(&staged, path).with_context(|| format!("cannot write `{}`", path.display()))
}

/// The pid in `daemon.pid`, when that process is alive.
fn running_pid(dir: &Path) -> Option<i32> {
    let pid: i32 = fs::read_to_string(dir.join("daemon.pid"))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    // SAFETY: signal 0 only checks that the process exists; nothing is sent.
    (pid > 0 && unsafe { libc::kill(pid, 0) } == 0).then_some(pid)
}

pub async fn run(command: DaemonCommand) -> anyhow::Result<u8> {
    let dir = state_dir();
    match command {
        DaemonCommand::Add { path, driver } => {
            ci_exec_driver::DriverConfig::parse(&driver)?;
            let root = ci_exec_job::Snapshot::of_head(&path)?.root;
            let root = root.canonicalize().unwrap_or(root);
            let entry = Registered {
                path: root.clone(),
                driver,
                orchestrator: std::env::var("CI_EXEC_ORCHESTRATOR").ok(),
                token: std::env::var("CI_EXEC_TOKEN").ok(),
                repo: std::env::var("CI_EXEC_REPO").ok(),
            };
            let mut registry = read_registry(&dir);
            registry.retain(|known| known.path != root);
            registry.push(entry);
            write_private(
                &dir.join("repositories.json"),
                &serde_json::to_vec_pretty(&registry)?,
            )?;
            eprintln!("registered `{}`", root.display());
        }
        DaemonCommand::Remove { path } => {
            let root = path.canonicalize().unwrap_or(path);
            let mut registry = read_registry(&dir);
            let before = registry.len();
            registry.retain(|known| known.path != root);
            if registry.len() == before {
                return Err(
                    CliError::usage(format!("`{}` is not registered", root.display()))
                        .hint("`ci-exec daemon status` lists the registered repositories")
                        .into(),
                );
            }
            write_private(
                &dir.join("repositories.json"),
                &serde_json::to_vec_pretty(&registry)?,
            )?;
            eprintln!("unregistered `{}`", root.display());
        }
        DaemonCommand::Start => return start(&dir),
        DaemonCommand::Stop => return stop(&dir),
        DaemonCommand::Status { json } => return status(&dir, json),
        DaemonCommand::Run => {
            let stop = Arc::new(AtomicBool::new(false));
            let mut daemon = {
                let stop = stop.clone();
                tokio::task::spawn_blocking(move || Daemon::new(dir, stop).run())
            };
            let ended = tokio::select! {
                () = super::run::interrupted() => {
                    stop.store(true, Ordering::Relaxed);
                    daemon.await
                }
                ended = &mut daemon => ended,
            };
            ended.context("the daemon's loop failed")?;
        }
    }
    Ok(SUCCESS)
}

fn start(dir: &Path) -> anyhow::Result<u8> {
    if let Some(pid) = running_pid(dir) {
        eprintln!("the daemon already runs (pid {pid})");
        return Ok(SUCCESS);
    }
    fs::create_dir_all(dir).with_context(|| format!("cannot create `{}`", dir.display()))?;
    let log = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("daemon.log"))
        .context("cannot open the daemon's log")?;
    let _ = fs::remove_file(dir.join("status.json"));
    let mut command = Command::new(std::env::current_exe()?);
    command
        .args(["daemon", "run"])
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    // SAFETY: setsid() is async-signal-safe; it detaches the daemon from our terminal and
    // process group, so a Ctrl-C in this shell does not reach it.
    unsafe {
        command.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let child = command.spawn().context("cannot start the daemon")?;
    let pid = child.id();
    fs::write(dir.join("daemon.pid"), pid.to_string())?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if read_status(dir).is_some_and(|status| status.pid == pid) {
            eprintln!(
                "the daemon runs (pid {pid}); its log is `{}`",
                dir.join("daemon.log").display()
            );
            return Ok(SUCCESS);
        }
        if running_pid(dir).is_none() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Err(CliError::infrastructure("the daemon did not start")
        .hint(format!("see `{}`", dir.join("daemon.log").display()))
        .into())
}

fn stop(dir: &Path) -> anyhow::Result<u8> {
    let Some(pid) = running_pid(dir) else {
        eprintln!("the daemon does not run");
        return Ok(SUCCESS);
    };
    // SAFETY: kill(2) with a pid read from our own pid file, checked alive above.
    unsafe {
        libc::kill(pid, libc::SIGTERM);
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        // SAFETY: as above; signal 0 only probes.
        if unsafe { libc::kill(pid, 0) } != 0 {
            let _ = fs::remove_file(dir.join("daemon.pid"));
            let _ = fs::remove_file(dir.join("status.json"));
            eprintln!("the daemon stopped");
            return Ok(SUCCESS);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Err(CliError::infrastructure(format!("the daemon (pid {pid}) did not stop within 60 s")).into())
}

fn read_status(dir: &Path) -> Option<Status> {
    serde_json::from_slice(&fs::read(dir.join("status.json")).ok()?).ok()
}

fn read_runs(dir: &Path) -> Vec<ScheduledRun> {
    fs::read_to_string(dir.join("runs.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|line| serde_json::from_str(line).ok())
        .collect()
}

fn status(dir: &Path, json: bool) -> anyhow::Result<u8> {
    let pid = running_pid(dir);
    let status = pid.and_then(|_| read_status(dir));
    let runs = read_runs(dir);
    if json {
        let value = serde_json::json!({
            "running": pid.is_some(),
            "pid": pid,
            "status": status,
            "registered": read_registry(dir).iter().map(|r| &r.path).collect::<Vec<_>>(),
            "runs": runs,
        });
        println!("{}", serde_json::to_string_pretty(&value)?);
        return Ok(SUCCESS);
    }
    match pid {
        Some(pid) => println!("running (pid {pid})"),
        None => println!("not running"),
    }
    let registry = read_registry(dir);
    for registered in &registry {
        println!("{}  [{}]", registered.path.display(), registered.driver);
        let known = status
            .as_ref()
            .and_then(|s| s.repositories.iter().find(|r| r.path == registered.path));
        if let Some(known) = known {
            if let Some(url) = &known.serving {
                println!("  serving its results through {url}");
            }
            for line in &known.schedule {
                println!("  schedule: {line}");
            }
            if let Some(error) = &known.schedule_error {
                println!("  schedule error: {error}");
            }
        }
    }
    for run in runs.iter().rev().take(10) {
        let when = humantime::format_rfc3339_seconds(
            std::time::UNIX_EPOCH + Duration::from_secs(run.started_unix),
        );
        let outcome = match run.exit_code {
            Some(0) if run.replayed => "replayed".to_owned(),
            Some(0) => "passed".to_owned(),
            Some(code) => format!("failed ({code})"),
            None => "did not run".to_owned(),
        };
        println!(
            "{when}  {}  {}  {outcome}  {}",
            run.path.display(),
            run.target,
            run.key
                .as_deref()
                .map_or("", |key| &key[..12.min(key.len())])
        );
    }
    Ok(SUCCESS)
}

/// A repository's schedule as last read, and when.
#[derive(Debug, Default)]
struct Known {
    commit: Option<String>,
    entries: Vec<Entry>,
    error: Option<String>,
    read_at: Option<Instant>,
    reading: bool,
}

struct Daemon {
    dir: PathBuf,
    stop: Arc<AtomicBool>,
    registry: Vec<Registered>,
    registry_time: Option<SystemTime>,
    sessions: HashMap<PathBuf, (Arc<Connected>, Arc<AtomicBool>, String)>,
    schedules: Arc<Mutex<HashMap<PathBuf, Known>>>,
    /// (repository, line, minute) already started: each line fires once a minute.
    fired: HashSet<(PathBuf, String, i64)>,
    busy: Arc<Mutex<HashSet<PathBuf>>>,
    children: Arc<Mutex<Vec<u32>>>,
    started_unix: u64,
}

impl Daemon {
    fn new(dir: PathBuf, stop: Arc<AtomicBool>) -> Daemon {
        Daemon {
            dir,
            stop,
            registry: Vec::new(),
            registry_time: None,
            sessions: HashMap::new(),
            schedules: Arc::default(),
            fired: HashSet::new(),
            busy: Arc::default(),
            children: Arc::default(),
            started_unix: unix_now(),
        }
    }

    fn log(&self, message: &str) {
        let when = humantime::format_rfc3339_seconds(SystemTime::now());
        eprintln!("[{when}] {message}");
    }

    fn run(mut self) {
        self.log("daemon started");
        while !self.stop.load(Ordering::Relaxed) {
            self.reload_registry();
            self.refresh_schedules();
            self.fire_due();
            self.write_status();
            std::thread::sleep(Duration::from_secs(1));
        }
        for (connected, stop, _) in self.sessions.values() {
            stop.store(true, Ordering::Relaxed);
            connected.leave();
        }
        let children = self.children.lock().map(|c| c.clone()).unwrap_or_default();
        for pid in children {
            // SAFETY: kill(2) on our own child, which stops its job and cleans up.
            unsafe {
                libc::kill(pid as i32, libc::SIGTERM);
            }
        }
        let deadline = Instant::now() + Duration::from_secs(50);
        while Instant::now() < deadline && self.busy.lock().is_ok_and(|busy| !busy.is_empty()) {
            std::thread::sleep(Duration::from_millis(100));
        }
        self.log("daemon stopped");
    }

    fn reload_registry(&mut self) {
        let time = fs::metadata(self.dir.join("repositories.json"))
            .and_then(|m| m.modified())
            .ok();
        if time == self.registry_time && self.registry_time.is_some() {
            return;
        }
        self.registry_time = time;
        self.registry = read_registry(&self.dir);
        let paths: HashSet<PathBuf> = self.registry.iter().map(|r| r.path.clone()).collect();
        self.sessions.retain(|path, (connected, stop, _)| {
            let keep = paths.contains(path);
            if !keep {
                stop.store(true, Ordering::Relaxed);
                connected.leave();
            }
            keep
        });
        if let Ok(mut schedules) = self.schedules.lock() {
            schedules.retain(|path, _| paths.contains(path));
        }
        for registered in self.registry.clone() {
            if !self.sessions.contains_key(&registered.path)
                && let Err(error) = self.connect(&registered)
            {
                self.log(&format!(
                    "`{}` is not served: {error:#}",
                    registered.path.display()
                ));
            }
        }
    }

    /// Stays connected to the repository's orchestrator, serving every successful result of
    /// it in the local store.
    fn connect(&mut self, registered: &Registered) -> anyhow::Result<()> {
        let (Some(url), Some(token)) = (&registered.orchestrator, &registered.token) else {
            return Ok(());
        };
        let job = ci_exec_job::PreparedJob::prepare(ci_exec_job::JobOptions {
            path: registered.path.clone(),
            repository: registered.repo.clone(),
            ..Default::default()
        })?;
        anyhow::ensure!(
            job.has_shared_name(),
            "it has no `origin` remote; register it with `CI_EXEC_REPO` set"
        );
        let name = job.repository().to_owned();
        let client = Orchestrator::new(ClientOptions {
            url: url.clone(),
            token: Some(token.clone()),
            id_token: None,
            repository: name.clone(),
            ca: std::env::var_os("CI_EXEC_ORCHESTRATOR_CA").map(PathBuf::from),
            client_certificate: None,
        })?;
        let key = ExecutorKey::load_or_create(&ExecutorKey::default_path())?;
        let connected = Arc::new(client.connect(key));
        let stop = Arc::new(AtomicBool::new(false));
        let store = ResultStore::open(None)?;
        {
            let (connected, stop) = (connected.clone(), stop.clone());
            std::thread::spawn(move || {
                let holdings = || {
                    store
                        .list()
                        .unwrap_or_default()
                        .into_iter()
                        .filter(|r| r.succeeded() && r.repository.as_deref() == Some(&name))
                        .collect()
                };
                connected.serve(&store, &holdings, &stop);
            });
        }
        self.log(&format!(
            "serving `{}` through {url}",
            registered.path.display()
        ));
        self.sessions
            .insert(registered.path.clone(), (connected, stop, url.clone()));
        Ok(())
    }

    /// Reads each schedule again when its commit changed, or hourly, in the background (a
    /// VM may take a while to build it).
    fn refresh_schedules(&mut self) {
        for registered in &self.registry {
            let commit = ci_exec_job::Snapshot::of_head(&registered.path)
                .ok()
                .map(|snapshot| snapshot.commit);
            let mut schedules = match self.schedules.lock() {
                Ok(schedules) => schedules,
                Err(_) => return,
            };
            let known = schedules.entry(registered.path.clone()).or_default();
            let stale = known.commit != commit
                || known
                    .read_at
                    .is_none_or(|at| at.elapsed() > Duration::from_secs(3600));
            if !stale || known.reading {
                continue;
            }
            known.reading = true;
            let (schedules, registered) = (self.schedules.clone(), registered.clone());
            std::thread::spawn(move || {
                let output =
                    Command::new(std::env::current_exe().unwrap_or_else(|_| "ci-exec".into()))
                        .arg("schedule")
                        .arg(&registered.path)
                        .arg(format!("--driver={}", registered.driver))
                        .stdin(Stdio::null())
                        .stderr(Stdio::inherit())
                        .output();
                let (entries, error) = match output {
                    Ok(output) if output.status.success() => {
                        match schedule::parse(&String::from_utf8_lossy(&output.stdout)) {
                            Ok(entries) => (entries, None),
                            Err(error) => (Vec::new(), Some(error)),
                        }
                    }
                    Ok(output) => (
                        Vec::new(),
                        Some(format!("`ci-exec schedule` failed ({})", output.status)),
                    ),
                    Err(error) => (Vec::new(), Some(error.to_string())),
                };
                if let Ok(mut schedules) = schedules.lock() {
                    let known = schedules.entry(registered.path.clone()).or_default();
                    *known = Known {
                        commit,
                        entries,
                        error,
                        read_at: Some(Instant::now()),
                        reading: false,
                    };
                }
            });
        }
    }

    /// Starts the runs whose minute has come; a repository runs one scheduled job at a time.
    fn fire_due(&mut self) {
        let now = chrono::Local::now();
        let minute = now.timestamp() / 60;
        let due: Vec<(Registered, Entry)> = {
            let Ok(schedules) = self.schedules.lock() else {
                return;
            };
            self.registry
                .iter()
                .flat_map(|registered| {
                    schedules
                        .get(&registered.path)
                        .map(|known| known.entries.clone())
                        .unwrap_or_default()
                        .into_iter()
                        .filter(|entry| entry.fires_at(&now))
                        .map(move |entry| (registered.clone(), entry))
                })
                .collect()
        };
        for (registered, entry) in due {
            let fired = (registered.path.clone(), entry.line.clone(), minute);
            if self.fired.contains(&fired) {
                continue;
            }
            let busy = self
                .busy
                .lock()
                .is_ok_and(|busy| busy.contains(&registered.path));
            if busy {
                // Still running the previous one: this minute's run is skipped, as cron
                // would not stack them either.
                self.log(&format!(
                    "`{}`: `{}` skipped, the previous run is still going",
                    registered.path.display(),
                    entry.line
                ));
                self.fired.insert(fired);
                continue;
            }
            self.fired.insert(fired);
            if let Ok(mut busy) = self.busy.lock() {
                busy.insert(registered.path.clone());
            }
            let (busy, children, dir, stop) = (
                self.busy.clone(),
                self.children.clone(),
                self.dir.clone(),
                self.stop.clone(),
            );
            std::thread::spawn(move || {
                for target in &entry.targets {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let run = run_target(&dir, &registered, &entry, target, &children);
                    let line = serde_json::to_string(&run).unwrap_or_default();
                    let _ = fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(dir.join("runs.jsonl"))
                        .and_then(|mut file| writeln!(file, "{line}"));
                    if run.exit_code != Some(0) {
                        break;
                    }
                }
                if let Ok(mut busy) = busy.lock() {
                    busy.remove(&registered.path);
                }
            });
        }
        self.fired.retain(|(_, _, at)| *at >= minute - 1);
    }

    fn write_status(&self) {
        let schedules = self.schedules.lock();
        let repositories = self
            .registry
            .iter()
            .map(|registered| {
                let known = schedules
                    .as_ref()
                    .ok()
                    .and_then(|s| s.get(&registered.path));
                let now = chrono::Local::now();
                RepositoryStatus {
                    path: registered.path.clone(),
                    driver: registered.driver.clone(),
                    serving: self
                        .sessions
                        .get(&registered.path)
                        .map(|(_, _, url)| url.clone()),
                    schedule: known
                        .map(|k| k.entries.iter().map(|e| e.line.clone()).collect())
                        .unwrap_or_default(),
                    schedule_error: known.and_then(|k| k.error.clone()),
                    next_unix: known.and_then(|k| {
                        k.entries
                            .iter()
                            .filter_map(|entry| entry.next_after(&now))
                            .map(|time| time.timestamp())
                            .min()
                    }),
                }
            })
            .collect();
        let status = Status {
            pid: std::process::id(),
            started_unix: self.started_unix,
            repositories,
        };
        if let Ok(json) = serde_json::to_vec_pretty(&status) {
            let _ = write_private(&self.dir.join("status.json"), &json);
        }
    }
}

/// Runs `ci-exec test --target TARGET` for a scheduled line, its output into the log.
fn run_target(
    dir: &Path,
    registered: &Registered,
    entry: &Entry,
    target: &str,
    children: &Arc<Mutex<Vec<u32>>>,
) -> ScheduledRun {
    let report = dir.join(format!("report-{}.json", std::process::id()));
    let mut command = Command::new(std::env::current_exe().unwrap_or_else(|_| "ci-exec".into()));
    command
        .arg("test")
        .arg(&registered.path)
        .arg(format!("--driver={}", registered.driver))
        .arg(format!("--target={target}"))
        .arg("--report")
        .arg(&report)
        .stdin(Stdio::null());
    for (name, value) in [
        ("CI_EXEC_ORCHESTRATOR", &registered.orchestrator),
        ("CI_EXEC_TOKEN", &registered.token),
        ("CI_EXEC_REPO", &registered.repo),
    ] {
        match value {
            Some(value) => command.env(name, value),
            None => command.env_remove(name),
        };
    }
    let started_unix = unix_now();
    eprintln!(
        "[{}] `{}`: `{}` runs `mk {target}`",
        humantime::format_rfc3339_seconds(SystemTime::now()),
        registered.path.display(),
        entry.line
    );
    let _ = fs::remove_file(&report);
    let exit_code = match command.spawn() {
        Ok(mut child) => {
            if let Ok(mut list) = children.lock() {
                list.push(child.id());
            }
            let status = child.wait().ok().and_then(|status| status.code());
            if let Ok(mut list) = children.lock() {
                list.retain(|pid| *pid != child.id());
            }
            status
        }
        Err(_) => None,
    };
    let report: Option<serde_json::Value> = fs::read(&report)
        .ok()
        .and_then(|bytes| serde_json::from_slice(&bytes).ok());
    ScheduledRun {
        started_unix,
        path: registered.path.clone(),
        line: entry.line.clone(),
        target: target.to_owned(),
        exit_code,
        key: report
            .as_ref()
            .and_then(|r| r["key"].as_str().map(str::to_owned)),
        replayed: report.as_ref().is_some_and(|r| r["replayed"] == true),
    }
}
