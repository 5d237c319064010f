//! The `fly` driver: one Fly Machine per task, in an ephemeral app `ci-<namespace>` (deleted
//! on close) or an existing `app` (kept; only this namespace's machines and volumes go).
//!
//! Fly's Machines API has no stdin attach and no separate stdout/stderr (its log endpoint is
//! merged lines, and not part of the Machines API), so every machine runs our static
//! `ci-exec-init` as its entrypoint (`--serve`, injected through `config.files`), which runs
//! each task with the qemu driver's task wrapper (streams in files, exit code in a file) and
//! answers short `exec` commands: start a task, read its output from an offset, append to its
//! stdin, signal it, read a file of a volume. The driver polls those, as the qemu driver polls
//! its guest agent. Fly's own logs are not read.
//!
//! A Fly Machine mounts one Fly volume, and a Fly volume is attached to one machine at a time.
//! So a namespace has one Fly volume, made by its first volume, and each of the driver's
//! volumes is a directory of it, bind-mounted where a task wants it (a task may mount several).
//! Tasks with volumes run in the machine that holds the Fly volume (the first such task's, kept
//! after the task exits until its last task is cleaned up) when they use its image; a task with
//! another image gets the Fly volume once no task of the holder runs (the holder's output is
//! kept in memory first, and the holder is destroyed).
//!
//! Limits: the machine's `guest` from `size`, with the task's CPUs and memory instead when it
//! has limits, and the task's memory limit as an address-space limit inside the machine (Fly's
//! smallest machine has 256 MB).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use ci_exec_driver::{
    Container, ContainerStatus, Driver, DriverConfig, DriverError, FollowLogs, JobSupport, Limits,
    LogSink, Task, Volume, VolumeFiles,
};
use reqwest::Method;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::CloudError;
use crate::api::{Api, Secret, TokenSource};

const DRIVER: &str = "fly";
const PROVIDER: &str = "Fly Machines";
/// Where the agent, the tasks and the Fly volume are in a machine.
const AGENT: &str = "/ci-exec/init";
const TASKS: &str = "/ci-exec/tasks";
const DATA: &str = "/ci-exec/data";
/// Fly writes `files` without an executable bit (its `api.File` has no mode), so the image's
/// `sh` and `chmod` make the agent executable, then it replaces the shell.
const ENTRYPOINT: &str = "chmod 755 /ci-exec/init && exec /ci-exec/init --serve /ci-exec/tasks";
/// Most output bytes per stream in one `--poll`.
const READ_MAX: u64 = 4 * 1024 * 1024;
/// Most stdin bytes in one `--append` (base64 in one argument, under Linux's 128 KiB).
const STDIN_CHUNK: usize = 64 * 1024;
/// What one `wait` request may take, in seconds (Fly's limit is 60).
const WAIT_SECONDS: u64 = 60;
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Everything the `fly` driver needs, resolved. The token is a [`Secret`].
#[derive(Debug, Clone)]
pub struct FlyConfig {
    pub namespace: String,
    pub token: Secret,
    /// An existing app; `None` makes (and deletes) `ci-<namespace>`.
    pub app: Option<String>,
    pub region: Option<String>,
    pub org: String,
    /// A size preset (`shared-cpu-1x`, `performance-2x`, …).
    pub size: String,
    pub endpoint: String,
    /// Longest wait for a machine to start; it is deleted after it (exit 125).
    pub start_timeout: Duration,
    /// The image of tasks that name none (the docker driver's default).
    pub container_image: String,
}

impl FlyConfig {
    /// From a parsed `--driver=fly…` DSN.
    pub fn from_driver_config(config: &DriverConfig) -> Result<Self, CloudError> {
        let text = |name: &str| {
            config
                .str(name)
                .filter(|value| !value.is_empty())
                .map(str::to_owned)
        };
        let size = text("size").unwrap_or_else(|| "shared-cpu-1x".to_owned());
        preset(&size)?;
        Ok(FlyConfig {
            namespace: config.namespace.clone(),
            token: Secret::new(text("token").unwrap_or_default()),
            app: text("app"),
            region: text("region"),
            org: text("org").unwrap_or_else(|| "personal".to_owned()),
            size,
            endpoint: text("endpoint").unwrap_or_default(),
            start_timeout: config
                .duration("start_timeout")
                .filter(|value| !value.is_zero())
                .unwrap_or(Duration::from_secs(300)),
            container_image: ci_exec_docker::DockerConfig::new(ci_exec_docker::Engine::Docker, "")
                .image,
        })
    }

    /// The app machines go into.
    pub fn app_name(&self) -> String {
        self.app
            .clone()
            .unwrap_or_else(|| ephemeral_app(&self.namespace))
    }
}

/// `ci-<namespace>` as a Fly app name: lower-case letters, digits and dashes, at most 63.
fn ephemeral_app(namespace: &str) -> String {
    let name: String = format!("ci-{namespace}")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .take(63)
        .collect();
    name.trim_end_matches('-').to_owned()
}

/// `(cpu_kind, cpus, memory_mb)` of a Fly size preset.
fn preset(size: &str) -> Result<(&'static str, u64, u64), CloudError> {
    let invalid = || CloudError::InvalidParameter {
        driver: DRIVER,
        parameter: "size",
        reason: format!(
            "`{size}` is not a Fly preset: use `shared-cpu-Nx` or `performance-Nx` with N of 1, 2, 4, 8 or 16"
        ),
    };
    let (kind, count) = if let Some(count) = size.strip_prefix("shared-cpu-") {
        ("shared", count)
    } else if let Some(count) = size.strip_prefix("performance-") {
        ("performance", count)
    } else {
        return Err(invalid());
    };
    let cpus: u64 = count
        .strip_suffix('x')
        .and_then(|count| count.parse().ok())
        .filter(|count| [1, 2, 4, 8, 16].contains(count))
        .ok_or_else(invalid)?;
    let memory = if kind == "shared" { 256 } else { 2048 } * cpus;
    Ok((kind, cpus, memory))
}

/// The machine's `guest`: the preset, with the CPUs and memory a task's limits ask for instead
/// (Fly sizes memory in steps of 256 MB; a smaller limit is enforced inside the machine).
fn guest(size: &str, limits: &Limits) -> Result<Value, CloudError> {
    let (kind, mut cpus, mut memory_mb) = preset(size)?;
    if limits.cpu_shares > 0 {
        cpus = limits.cpu_shares.div_ceil(1024).max(1);
    }
    if limits.memory_bytes > 0 {
        memory_mb = limits
            .memory_bytes
            .div_ceil(1024 * 1024)
            .div_ceil(256)
            .max(1)
            * 256;
    }
    Ok(json!({"cpu_kind": kind, "cpus": cpus, "memory_mb": memory_mb}))
}

/// A name as a directory name: letters, digits and `-` kept, anything else `_xx`.
fn directory_name(name: &str) -> String {
    let mut directory = String::new();
    for byte in name.bytes() {
        if byte.is_ascii_alphanumeric() || byte == b'-' {
            directory.push(byte as char);
        } else {
            directory.push_str(&format!("_{byte:02x}"));
        }
    }
    directory
}

fn task_dir(id: &str) -> String {
    format!("{TASKS}/{}", directory_name(id))
}

fn short_hash(text: &str) -> String {
    use sha2::Digest as _;
    hex::encode(sha2::Sha256::digest(text.as_bytes()))[..8].to_owned()
}

/// The namespace's Fly volume name (`[a-z0-9_]`, at most 30): `ci_`, the namespace's hash and
/// `data`, so a run finds its namespace's volume in a shared app by prefix.
fn volume_name(namespace: &str) -> String {
    format!("{}data", volume_prefix(namespace))
}

fn volume_prefix(namespace: &str) -> String {
    format!("ci_{}_", short_hash(namespace))
}

/// The task as the wrapper's NUL-separated records (`guest-image/init/src/task.rs`).
fn task_spec(task: &Task, binds: &[(String, String)]) -> Result<Vec<u8>, DriverError> {
    let mut records: Vec<Vec<u8>> = vec![b"mode=guest-os".to_vec()];
    let mut record = |key: &str, value: &[u8]| {
        records.push([key.as_bytes(), b"=", value].concat());
    };
    record(
        "stdin",
        if task.stdin.is_some() {
            b"follow"
        } else {
            b"none"
        },
    );
    if task.network == Some(false) {
        record("network", b"none");
    }
    record(
        "caps",
        if task.privileged {
            b"all"
        } else {
            b"container"
        },
    );
    if let Some(workdir) = &task.workdir {
        record("workdir", workdir.as_bytes());
    }
    if let Some(user) = &task.user {
        record("user", user.as_bytes());
    }
    if task.limits.memory_bytes > 0 {
        record("memory", task.limits.memory_bytes.to_string().as_bytes());
    }
    for (source, target) in binds {
        record("bind", source.as_bytes());
        record("at", target.as_bytes());
    }
    if !task.env.contains_key("PATH") {
        record("env", format!("PATH={DEFAULT_PATH}").as_bytes());
    }
    for (name, value) in &task.env {
        record("env", format!("{name}={value}").as_bytes());
    }
    for word in &task.command {
        record("arg", word.as_bytes());
    }
    if records.iter().any(|record| record.contains(&0)) {
        return Err(DriverError::InvalidTask {
            task: task.id.clone(),
            reason: "a command word or an environment entry holds a NUL byte".to_owned(),
        });
    }
    Ok(records
        .into_iter()
        .flat_map(|record| [record, vec![0]].concat())
        .collect())
}

/// One `--poll` answer.
#[derive(Debug, PartialEq, Eq)]
struct Poll {
    exit: Option<i32>,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
}

fn parse_poll(text: &str) -> Result<Poll, String> {
    let mut lines = text.split('\n');
    let state = lines.next().unwrap_or_default().trim();
    let exit = match state.strip_prefix("exit ") {
        Some(code) => Some(
            code.trim()
                .parse()
                .map_err(|_| format!("bad exit code `{code}`"))?,
        ),
        None if matches!(state, "running" | "unknown") => None,
        None => return Err(format!("unknown state `{state}`")),
    };
    let mut stream = || {
        STANDARD
            .decode(lines.next().unwrap_or_default().trim())
            .map_err(|error| format!("output is not base64: {error}"))
    };
    Ok(Poll {
        exit,
        stdout: stream()?,
        stderr: stream()?,
    })
}

/// The text an exec answered with: Fly's documented raw output, or a JSON answer carrying it
/// (`{"stdout", "stderr", "exit_code"}`, as the API also serves it).
fn exec_output(bytes: &[u8]) -> Result<String, String> {
    match serde_json::from_slice::<Value>(bytes) {
        Ok(Value::String(text)) => Ok(text),
        Ok(Value::Object(object)) => {
            let code = object.get("exit_code").and_then(Value::as_i64).unwrap_or(0);
            if code != 0 {
                return Err(format!(
                    "the agent exited with {code}: {}",
                    object.get("stderr").and_then(Value::as_str).unwrap_or("")
                ));
            }
            Ok(object
                .get("stdout")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_owned())
        }
        _ => Ok(String::from_utf8_lossy(bytes).into_owned()),
    }
}

/// The `fly` driver. Cheap to construct: the app is made by the first task or volume.
#[derive(Debug, Clone)]
pub struct FlyDriver {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    config: FlyConfig,
    api: Api,
    app: String,
    /// `ci-exec-init`, base64, as `config.files` takes it.
    agent: tokio::sync::OnceCell<Arc<String>>,
    /// Held across a placement (which machine a task goes to, made or reused), so two tasks
    /// never race for one volume.
    state: tokio::sync::Mutex<State>,
    /// Stdin copies still running.
    pumps: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    rejected: AtomicBool,
}

#[derive(Debug, Default)]
struct State {
    /// The app exists (made or found); reset by `close`, which deletes an ephemeral one.
    app_ready: bool,
    machines: Vec<Machine>,
    tasks: BTreeMap<String, Arc<TaskState>>,
    /// The namespace's Fly volume, once a volume was asked for.
    data: Option<FlyVolume>,
    /// The driver's volumes: name → its directory in the Fly volume (a fresh one after a
    /// cleanup; the old one goes with the Fly volume).
    volumes: BTreeMap<String, String>,
    generation: u64,
}

#[derive(Debug)]
struct Machine {
    id: String,
    instance_id: String,
    image: String,
    /// The machine holds the namespace's Fly volume.
    holds_data: bool,
    tasks: Vec<Arc<TaskState>>,
}

/// The task a new machine starts with, written by its `files`.
#[derive(Debug)]
struct FirstTask<'a> {
    dir: &'a str,
    spec: Vec<u8>,
    /// Fixed stdin, whole.
    stdin: Option<Vec<u8>>,
}

#[derive(Debug, Clone)]
struct FlyVolume {
    id: String,
    region: Option<String>,
}

#[derive(Debug)]
struct TaskState {
    id: String,
    machine: String,
    dir: String,
    exit: Mutex<Option<i32>>,
    /// All of the output, kept when the machine had to go while the handle lives.
    kept: Mutex<Option<(Vec<u8>, Vec<u8>)>>,
    removed: AtomicBool,
}

impl TaskState {
    fn exit(&self) -> Option<i32> {
        *self.exit.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn kept(&self) -> Option<(Vec<u8>, Vec<u8>)> {
        self.kept
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

impl FlyDriver {
    /// A driver for `config`: checks the parameters, contacts nothing yet.
    pub fn new(config: FlyConfig) -> Result<Self, CloudError> {
        let api = Api::new(
            DRIVER,
            PROVIDER,
            &config.endpoint,
            config.token.clone(),
            TokenSource {
                parameter: "token",
                env: "FLY_API_TOKEN",
            },
        )?;
        Ok(FlyDriver {
            inner: Arc::new(Inner {
                app: config.app_name(),
                config,
                api,
                agent: tokio::sync::OnceCell::new(),
                state: tokio::sync::Mutex::default(),
                pumps: Mutex::default(),
                rejected: AtomicBool::new(false),
            }),
        })
    }

    /// API requests this driver has sent so far (the benchmarks' "requests per task").
    pub fn api_requests(&self) -> u64 {
        self.inner.api.requests()
    }

    /// The app machines go into.
    pub fn app(&self) -> &str {
        &self.inner.app
    }
}

impl Inner {
    fn backend(&self, action: &str, error: CloudError) -> DriverError {
        if matches!(error, CloudError::Unauthorized { .. }) {
            self.rejected.store(true, Ordering::Relaxed);
        }
        DriverError::backend(DRIVER, action, error)
    }

    fn path(&self, rest: &str) -> String {
        format!("/apps/{}{rest}", self.app)
    }

    async fn agent(&self) -> Result<Arc<String>, CloudError> {
        self.agent
            .get_or_try_init(|| async {
                let path = ci_exec_guest_image::binaries::locate_static("ci-exec-init")
                    .ok_or(CloudError::MissingAgent)?;
                let bytes = tokio::fs::read(&path)
                    .await
                    .map_err(|_| CloudError::MissingAgent)?;
                tracing::debug!(path = %path.display(), bytes = bytes.len(), "the machines' agent");
                Ok(Arc::new(STANDARD.encode(bytes)))
            })
            .await
            .cloned()
    }

    /// The app exists: an existing `app` must; the ephemeral one is made (or taken over from a
    /// killed run of the namespace).
    async fn ensure_app(&self, state: &mut State) -> Result<(), CloudError> {
        if state.app_ready {
            return Ok(());
        }
        let path = format!("/apps/{}", self.app);
        let found = self
            .api
            .call(Method::GET, &path, &[], None, "look up the app", true)
            .await?;
        match (found, &self.config.app) {
            (Some(_), _) => {}
            (None, Some(app)) => {
                return Err(CloudError::InvalidParameter {
                    driver: DRIVER,
                    parameter: "app",
                    reason: format!(
                        "app `{app}` does not exist in Fly (unset `app` for an ephemeral one)"
                    ),
                });
            }
            (None, None) => {
                let body = json!({"app_name": self.app, "org_slug": self.config.org});
                self.api
                    .call(
                        Method::POST,
                        "/apps",
                        &[],
                        Some(&body),
                        "create the app",
                        false,
                    )
                    .await?;
                tracing::info!(app = %self.app, "created an ephemeral Fly app");
            }
        }
        state.app_ready = true;
        Ok(())
    }

    /// Runs one agent command in `machine`, returning what it printed.
    async fn exec(
        &self,
        machine: &str,
        command: &[&str],
        action: &str,
    ) -> Result<String, CloudError> {
        let mut words = vec![AGENT];
        words.extend_from_slice(command);
        let body = json!({"command": words, "timeout": WAIT_SECONDS});
        let bytes = self
            .api
            .send(
                Method::POST,
                &self.path(&format!("/machines/{machine}/exec")),
                &[],
                Some(&body),
                action,
                false,
            )
            .await?
            .unwrap_or_default();
        exec_output(&bytes).map_err(|reason| self.api.protocol(action, reason))
    }

    async fn poll(
        &self,
        task: &TaskState,
        out: u64,
        err: u64,
        max: u64,
    ) -> Result<Poll, DriverError> {
        let action = format!("read the output of task `{}`", task.id);
        let text = self
            .exec(
                &task.machine,
                &[
                    "--poll",
                    &task.dir,
                    &out.to_string(),
                    &err.to_string(),
                    &max.to_string(),
                ],
                &action,
            )
            .await
            .map_err(|error| self.backend(&action, error))?;
        let poll = parse_poll(&text)
            .map_err(|reason| self.backend(&action, self.api.protocol(&action, reason)))?;
        if let Some(code) = poll.exit {
            *task.exit.lock().unwrap_or_else(PoisonError::into_inner) = Some(code);
        }
        Ok(poll)
    }

    /// All of a task's output so far.
    async fn output(&self, task: &TaskState) -> Result<(Vec<u8>, Vec<u8>), DriverError> {
        if let Some(kept) = task.kept() {
            return Ok(kept);
        }
        let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
        loop {
            let poll = self
                .poll(task, stdout.len() as u64, stderr.len() as u64, READ_MAX)
                .await?;
            let more = poll.stdout.len() as u64 == READ_MAX || poll.stderr.len() as u64 == READ_MAX;
            stdout.extend_from_slice(&poll.stdout);
            stderr.extend_from_slice(&poll.stderr);
            if !more {
                return Ok((stdout, stderr));
            }
        }
    }

    /// The directory of volume `name` in the Fly volume, made (with the Fly volume) if new.
    async fn create_volume_locked(
        &self,
        state: &mut State,
        name: &str,
        size_bytes: u64,
    ) -> Result<String, DriverError> {
        if let Some(directory) = state.volumes.get(name) {
            return Ok(directory.clone());
        }
        if name.is_empty() || name.contains('/') || name.contains('\0') {
            return Err(DriverError::InvalidVolume {
                volume: name.to_owned(),
                reason: "a volume name must be non-empty, without `/`".to_owned(),
            });
        }
        if state.data.is_none() {
            self.ensure_app(state)
                .await
                .map_err(|error| self.backend("create the app", error))?;
            let mut body = json!({
                "name": volume_name(&self.config.namespace),
                "size_gb": size_bytes.div_ceil(1 << 30).max(1),
            });
            if let Some(region) = &self.config.region {
                body["region"] = json!(region);
            }
            let action = "create the namespace's Fly volume";
            let created = self
                .api
                .call(
                    Method::POST,
                    &self.path("/volumes"),
                    &[],
                    Some(&body),
                    action,
                    false,
                )
                .await
                .map_err(|error| self.backend(action, error))?
                .unwrap_or_default();
            let id = created["id"]
                .as_str()
                .ok_or_else(|| self.backend(action, self.api.protocol(action, "no volume `id`")))?;
            state.data = Some(FlyVolume {
                id: id.to_owned(),
                region: created["region"].as_str().map(str::to_owned),
            });
        }
        state.generation += 1;
        let directory = format!("{DATA}/{}.{}", directory_name(name), state.generation);
        state.volumes.insert(name.to_owned(), directory.clone());
        Ok(directory)
    }

    /// Creates a machine running the agent (and `first`'s task, if given) and waits for it to
    /// start; a machine that does not start in `start_timeout` is deleted.
    async fn create_machine(
        &self,
        image: &str,
        limits: &Limits,
        volume: Option<&FlyVolume>,
        first: Option<FirstTask<'_>>,
    ) -> Result<Machine, CloudError> {
        let agent = self.agent().await?;
        let mut files = vec![json!({"guest_path": AGENT, "raw_value": agent.as_str()})];
        if let Some(FirstTask { dir, spec, stdin }) = &first {
            if let Some(stdin) = stdin {
                files.push(json!({"guest_path": format!("{dir}/stdin"), "raw_value": STANDARD.encode(stdin)}));
                files.push(json!({"guest_path": format!("{dir}/stdin.end"), "raw_value": ""}));
            }
            // Last: the agent starts a task once its `task` file is there.
            files.push(
                json!({"guest_path": format!("{dir}/task"), "raw_value": STANDARD.encode(spec)}),
            );
        }
        let mut config = json!({
            "image": image,
            "init": {"entrypoint": ["/bin/sh", "-c", ENTRYPOINT]},
            "files": files,
            "guest": guest(&self.config.size, limits)?,
            "auto_destroy": true,
            "restart": {"policy": "no"},
            "metadata": {"ci": "true", "ci-namespace": self.config.namespace},
        });
        let mut body = json!({});
        if let Some(volume) = volume {
            config["mounts"] = json!([{"volume": volume.id, "path": DATA}]);
        }
        let region = volume
            .and_then(|volume| volume.region.clone())
            .or_else(|| self.config.region.clone());
        if let Some(region) = region {
            body["region"] = json!(region);
        }
        body["config"] = config;
        let created = self
            .api
            .call(
                Method::POST,
                &self.path("/machines"),
                &[],
                Some(&body),
                "create a machine",
                false,
            )
            .await?
            .unwrap_or_default();
        let id = created["id"]
            .as_str()
            .ok_or_else(|| self.api.protocol("create a machine", "no machine `id`"))?
            .to_owned();
        let machine = Machine {
            instance_id: created["instance_id"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
            id,
            image: image.to_owned(),
            holds_data: volume.is_some(),
            tasks: Vec::new(),
        };
        tracing::info!(app = %self.app, machine = %machine.id, image, "created a machine");
        if let Err(error) = self.wait_started(&machine).await {
            if let Err(delete) = self.destroy(&machine).await {
                tracing::warn!(error = %delete, machine = %machine.id, "cannot delete the machine that did not start");
            }
            return Err(error);
        }
        Ok(machine)
    }

    async fn wait_started(&self, machine: &Machine) -> Result<(), CloudError> {
        let started = Instant::now();
        let timeout = self.config.start_timeout;
        loop {
            let left = timeout.saturating_sub(started.elapsed());
            if left.is_zero() {
                return Err(CloudError::ProvisioningTimeout {
                    provider: PROVIDER,
                    server: machine.id.clone(),
                    what: "the start",
                    parameter: "start_timeout",
                    after: timeout,
                });
            }
            let seconds = left.as_secs().clamp(1, WAIT_SECONDS);
            let query = [
                ("state", "started".to_owned()),
                ("timeout", seconds.to_string()),
            ];
            let asked = Instant::now();
            match self
                .api
                .call(
                    Method::GET,
                    &self.path(&format!("/machines/{}/wait", machine.id)),
                    &query,
                    None,
                    "wait for the machine to start",
                    false,
                )
                .await
            {
                Ok(_) => return self.wait_for_agent(machine, started).await,
                Err(CloudError::Refused { status: 408, .. }) => {
                    // Fly answers 408 at the request's timeout; one sooner (a proxy) must not
                    // turn this into a busy loop.
                    if asked.elapsed() < Duration::from_secs(1) {
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                }
                Err(error) => return Err(error),
            }
        }
    }

    /// Waits until the agent answers an `exec`: a started machine's entrypoint may not have made
    /// it executable yet, nor made its tasks directory.
    async fn wait_for_agent(&self, machine: &Machine, started: Instant) -> Result<(), CloudError> {
        let alive = format!("{TASKS}/.alive");
        let mut interval = Duration::from_millis(20);
        loop {
            match self
                .exec(
                    &machine.id,
                    &["--touch", &alive],
                    "wait for the machine's agent",
                )
                .await
            {
                Ok(_) => return Ok(()),
                Err(error @ CloudError::Unauthorized { .. }) => return Err(error),
                Err(error) if started.elapsed() < self.config.start_timeout => {
                    tracing::debug!(%error, machine = %machine.id, "the agent does not answer yet");
                }
                Err(_) => {
                    return Err(CloudError::ProvisioningTimeout {
                        provider: PROVIDER,
                        server: machine.id.clone(),
                        what: "the agent",
                        parameter: "start_timeout",
                        after: self.config.start_timeout,
                    });
                }
            }
            tokio::time::sleep(interval).await;
            interval = (interval * 2).min(Duration::from_millis(500));
        }
    }

    /// Stops and deletes a machine; one already gone is fine.
    async fn destroy(&self, machine: &Machine) -> Result<(), CloudError> {
        let path = self.path(&format!("/machines/{}", machine.id));
        let stopped = self
            .api
            .call(
                Method::POST,
                &format!("{path}/stop"),
                &[],
                None,
                "stop a machine",
                true,
            )
            .await?;
        if stopped.is_some() {
            let mut query = vec![
                ("state", "stopped".to_owned()),
                ("timeout", WAIT_SECONDS.to_string()),
            ];
            if !machine.instance_id.is_empty() {
                query.push(("instance_id", machine.instance_id.clone()));
            }
            match self
                .api
                .call(
                    Method::GET,
                    &format!("{path}/wait"),
                    &query,
                    None,
                    "wait for a machine to stop",
                    true,
                )
                .await
            {
                Ok(_) | Err(CloudError::Refused { status: 408, .. }) => {}
                Err(error) => return Err(error),
            }
        }
        self.api.delete(&path, "delete a machine").await
    }

    /// Frees the machine at `index` for another image: its tasks' output is kept in memory and
    /// it is destroyed, unless one of them still runs.
    async fn release(
        &self,
        state: &mut State,
        index: usize,
        volume: &str,
    ) -> Result<(), DriverError> {
        let machine = &state.machines[index];
        for task in &machine.tasks {
            if task.removed.load(Ordering::Relaxed) || task.kept().is_some() {
                continue;
            }
            let output = self.output(task).await?;
            if task.exit().is_none() {
                return Err(DriverError::InvalidVolume {
                    volume: volume.to_owned(),
                    reason: format!(
                        "Fly attaches a volume to one machine at a time, and the namespace's \
                         volumes are held by the machine of task `{}` (image `{}`), which still \
                         runs: tasks that use volumes at the same time need the same image",
                        task.id, machine.image
                    ),
                });
            }
            *task.kept.lock().unwrap_or_else(PoisonError::into_inner) = Some(output);
        }
        let machine = state.machines.remove(index);
        self.destroy(&machine)
            .await
            .map_err(|error| self.backend("delete a machine", error))
    }

    async fn run(self: &Arc<Self>, task: Task) -> Result<Arc<TaskState>, DriverError> {
        let mut state = self.state.lock().await;
        if let Some(existing) = state.tasks.get(&task.id) {
            return Ok(existing.clone());
        }
        if task.command.is_empty() {
            return Err(DriverError::InvalidTask {
                task: task.id.clone(),
                reason: "the command is empty".to_owned(),
            });
        }
        for mount in &task.mounts {
            mount.check(&task.id)?;
        }
        self.ensure_app(&mut state)
            .await
            .map_err(|error| self.backend("create the app", error))?;
        let image = if task.image.is_empty() {
            self.config.container_image.clone()
        } else {
            task.image.clone()
        };
        let mut binds = Vec::new();
        for mount in &task.mounts {
            let directory = self
                .create_volume_locked(&mut state, &mount.volume, 0)
                .await?;
            binds.push((directory, mount.path.clone()));
        }
        let dir = task_dir(&task.id);
        let spec = task_spec(&task, &binds)?;
        let action = format!("start task `{}`", task.id);

        let holder = if binds.is_empty() {
            None
        } else {
            state.machines.iter().position(|machine| machine.holds_data)
        };
        let holder = match holder {
            Some(index) if state.machines[index].image == image => Some(index),
            Some(index) => {
                let volume = task.mounts[0].volume.clone();
                self.release(&mut state, index, &volume).await?;
                None
            }
            None => None,
        };
        let task_state = |machine: &str| {
            Arc::new(TaskState {
                id: task.id.clone(),
                machine: machine.to_owned(),
                dir: dir.clone(),
                exit: Mutex::new(None),
                kept: Mutex::new(None),
                removed: AtomicBool::new(false),
            })
        };
        let (handle, stream, fixed_sent) = match holder {
            Some(index) => {
                let machine_id = state.machines[index].id.clone();
                self.exec(
                    &machine_id,
                    &["--start", &dir, &STANDARD.encode(&spec)],
                    &action,
                )
                .await
                .map_err(|error| self.backend(&action, error))?;
                let handle = task_state(&machine_id);
                state.machines[index].tasks.push(handle.clone());
                (
                    handle,
                    task.stdin.as_ref().and_then(|stdin| stdin.take_reader()),
                    false,
                )
            }
            None => {
                // Small fixed input goes in with the machine; a stream, or input that would
                // swell the create request (Fly's API bounds a body), is copied after it starts.
                let (fixed, stream) = match &task.stdin {
                    Some(ci_exec_driver::Stdin::Bytes(bytes)) if bytes.len() <= STDIN_CHUNK => {
                        (Some(bytes.to_vec()), None)
                    }
                    Some(stdin) => (None, stdin.take_reader()),
                    None => (None, None),
                };
                let fixed_sent = fixed.is_some();
                let first = Some(FirstTask {
                    dir: &dir,
                    spec,
                    stdin: fixed,
                });
                let volume = if binds.is_empty() {
                    None
                } else {
                    state.data.clone()
                };
                let mut machine = self
                    .create_machine(&image, &task.limits, volume.as_ref(), first)
                    .await
                    .map_err(|error| self.backend(&action, error))?;
                let handle = task_state(&machine.id);
                machine.tasks.push(handle.clone());
                state.machines.push(machine);
                (handle, stream, fixed_sent)
            }
        };
        if let Some(stream) = stream {
            self.pump(handle.clone(), stream);
        } else if task.stdin.is_some() && !fixed_sent {
            // A stream already taken: the task gets an empty stdin.
            self.exec(
                &handle.machine,
                &["--touch", &format!("{dir}/stdin.end")],
                &action,
            )
            .await
            .map_err(|error| self.backend(&action, error))?;
        }
        state.tasks.insert(task.id.clone(), handle.clone());
        Ok(handle)
    }

    /// Copies a stdin stream into the task's `stdin`, then marks its end.
    fn pump(
        self: &Arc<Self>,
        task: Arc<TaskState>,
        mut reader: Box<dyn tokio::io::AsyncRead + Send + Unpin>,
    ) {
        let inner = self.clone();
        let handle = tokio::spawn(async move {
            let stdin = format!("{}/stdin", task.dir);
            let mut buffer = vec![0u8; STDIN_CHUNK];
            loop {
                let read = match reader.read(&mut buffer).await {
                    Ok(read) => read,
                    Err(error) => {
                        tracing::warn!(%error, task = %task.id, "reading the task's stdin");
                        0
                    }
                };
                if read == 0 {
                    break;
                }
                let data = STANDARD.encode(&buffer[..read]);
                if let Err(error) = inner
                    .exec(
                        &task.machine,
                        &["--append", &stdin, &data],
                        "write the task's stdin",
                    )
                    .await
                {
                    tracing::warn!(%error, task = %task.id, "writing the task's stdin");
                    return;
                }
            }
            if let Err(error) = inner
                .exec(
                    &task.machine,
                    &["--touch", &format!("{stdin}.end")],
                    "close the task's stdin",
                )
                .await
            {
                tracing::warn!(%error, task = %task.id, "closing the task's stdin");
            }
        });
        self.pumps
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(handle);
    }

    async fn cleanup(&self, task: &TaskState) -> Result<(), DriverError> {
        if task.removed.swap(true, Ordering::Relaxed) {
            return Ok(());
        }
        let mut state = self.state.lock().await;
        let Some(index) = state
            .machines
            .iter()
            .position(|machine| machine.id == task.machine)
        else {
            return Ok(());
        };
        let action = format!("stop task `{}`", task.id);
        let others_live = state.machines[index]
            .tasks
            .iter()
            .any(|other| !other.removed.load(Ordering::Relaxed));
        if others_live {
            if task.exit().is_none() {
                self.exec(&task.machine, &["--signal", &task.dir, "9"], &action)
                    .await
                    .map_err(|error| self.backend(&action, error))?;
            }
            return Ok(());
        }
        let machine = state.machines.remove(index);
        self.destroy(&machine)
            .await
            .map_err(|error| self.backend(&action, error))?;
        if task.exit().is_none() {
            *task.exit.lock().unwrap_or_else(PoisonError::into_inner) = Some(128 + 9);
        }
        Ok(())
    }

    /// Forgets the volume: its directory stays in the Fly volume, unseen (the next volume of
    /// that name gets a fresh one), until close deletes the Fly volume. No request.
    async fn volume_cleanup(&self, name: &str) -> Result<(), DriverError> {
        self.state.lock().await.volumes.remove(name);
        Ok(())
    }

    async fn read_file(&self, volume: &str, path: &str) -> Result<Vec<u8>, DriverError> {
        let relative = ci_exec_driver::volume_relative_path(volume, path)?;
        let mut state = self.state.lock().await;
        let not_found = || DriverError::FileNotFound {
            volume: volume.to_owned(),
            path: path.to_owned(),
        };
        let (Some(directory), Some(data)) =
            (state.volumes.get(volume).cloned(), state.data.clone())
        else {
            return Err(not_found());
        };
        let index = match state.machines.iter().position(|machine| machine.holds_data) {
            Some(index) => index,
            None => {
                // Nothing holds the Fly volume: a machine of the default image does from now on.
                let image = self.config.container_image.clone();
                let machine = self
                    .create_machine(&image, &Limits::default(), Some(&data), None)
                    .await
                    .map_err(|error| self.backend("start a machine to read a volume", error))?;
                state.machines.push(machine);
                state.machines.len() - 1
            }
        };
        let file = format!("{directory}/{}", relative.display());
        let action = format!("read `{path}` of volume `{volume}`");
        let text = self
            .exec(&state.machines[index].id, &["--cat", &file], &action)
            .await
            .map_err(|error| self.backend(&action, error))?;
        match text.split_once('\n') {
            Some(("ok", data)) => STANDARD.decode(data.trim()).map_err(|error| {
                self.backend(
                    &action,
                    self.api.protocol(&action, format!("not base64: {error}")),
                )
            }),
            _ if text.trim() == "missing" => Err(not_found()),
            _ => Err(self.backend(
                &action,
                self.api
                    .protocol(&action, format!("unexpected answer `{}`", text.trim())),
            )),
        }
    }

    /// Deletes everything of the namespace: the ephemeral app (with all it holds), or this
    /// namespace's machines and volumes in an existing app. The first error is returned.
    async fn close(&self) -> Result<(), DriverError> {
        for pump in std::mem::take(&mut *self.pumps.lock().unwrap_or_else(PoisonError::into_inner))
        {
            pump.abort();
        }
        if self.rejected.load(Ordering::Relaxed) {
            return Ok(());
        }
        let mut state = self.state.lock().await;
        let result = if self.config.app.is_none() {
            self.api
                .delete(&format!("/apps/{}", self.app), "delete the ephemeral app")
                .await
        } else {
            self.close_in_app(&mut state).await
        };
        state.machines.clear();
        state.volumes.clear();
        state.data = None;
        state.app_ready = false;
        for task in state.tasks.values() {
            task.removed.store(true, Ordering::Relaxed);
        }
        // A later task makes the app again.
        drop(state);
        tracing::debug!(driver = DRIVER, requests = self.api.requests(), "closed");
        result.map_err(|error| self.backend("clean up the namespace", error))
    }

    async fn close_in_app(&self, state: &mut State) -> Result<(), CloudError> {
        let mut first = None;
        let mut keep = |result: Result<(), CloudError>| {
            if let Err(error) = result {
                tracing::warn!(%error, "close");
                first.get_or_insert(error);
            }
        };
        let listed = self
            .api
            .call(
                Method::GET,
                &self.path("/machines"),
                &[],
                None,
                "list machines",
                true,
            )
            .await?
            .unwrap_or_default();
        for machine in listed.as_array().into_iter().flatten() {
            let ours = machine["config"]["metadata"]["ci-namespace"].as_str()
                == Some(self.config.namespace.as_str());
            if !ours || machine["state"] == "destroyed" {
                continue;
            }
            let machine = Machine {
                id: machine["id"].as_str().unwrap_or_default().to_owned(),
                instance_id: machine["instance_id"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
                image: String::new(),
                holds_data: false,
                tasks: Vec::new(),
            };
            keep(self.destroy(&machine).await);
        }
        state.machines.clear();
        let prefix = volume_prefix(&self.config.namespace);
        let volumes = self
            .api
            .call(
                Method::GET,
                &self.path("/volumes"),
                &[],
                None,
                "list volumes",
                true,
            )
            .await?
            .unwrap_or_default();
        for volume in volumes.as_array().into_iter().flatten() {
            let name = volume["name"].as_str().unwrap_or_default();
            if name.starts_with(&prefix)
                && volume["state"] != "destroyed"
                && let Some(id) = volume["id"].as_str()
            {
                keep(
                    self.api
                        .delete(&self.path(&format!("/volumes/{id}")), "delete a volume")
                        .await,
                );
            }
        }
        match first {
            Some(error) => Err(error),
            None => Ok(()),
        }
    }
}

#[derive(Debug)]
struct FlyContainer {
    inner: Arc<Inner>,
    task: Arc<TaskState>,
}

#[async_trait]
impl Container for FlyContainer {
    fn id(&self) -> &str {
        &self.task.id
    }

    async fn status(&self) -> Result<ContainerStatus, DriverError> {
        if let Some(code) = self.task.exit() {
            return Ok(ContainerStatus::Exited { code });
        }
        let poll = self.inner.poll(&self.task, 0, 0, 0).await?;
        Ok(match poll.exit {
            Some(code) => ContainerStatus::Exited { code },
            None => ContainerStatus::Running,
        })
    }

    async fn logs(&self, stdout: LogSink<'_>, stderr: LogSink<'_>) -> Result<(), DriverError> {
        let (out, err) = self.inner.output(&self.task).await?;
        let write =
            |error: std::io::Error| DriverError::backend(DRIVER, "write the task's output", error);
        stdout.write_all(&out).await.map_err(write)?;
        stderr.write_all(&err).await.map_err(write)?;
        stdout.flush().await.map_err(write)?;
        stderr.flush().await.map_err(write)
    }

    async fn cleanup(&self) -> Result<(), DriverError> {
        self.inner.cleanup(&self.task).await
    }

    fn as_follow(&self) -> Option<&dyn FollowLogs> {
        Some(self)
    }
}

#[async_trait]
impl FollowLogs for FlyContainer {
    async fn follow(&self, stdout: LogSink<'_>, stderr: LogSink<'_>) -> Result<(), DriverError> {
        let write =
            |error: std::io::Error| DriverError::backend(DRIVER, "write the task's output", error);
        if let Some((out, err)) = self.task.kept() {
            stdout.write_all(&out).await.map_err(write)?;
            stderr.write_all(&err).await.map_err(write)?;
            return Ok(());
        }
        let (mut out, mut err) = (0u64, 0u64);
        let mut interval = Duration::from_millis(20);
        loop {
            let poll = self.inner.poll(&self.task, out, err, READ_MAX).await?;
            let new = !poll.stdout.is_empty() || !poll.stderr.is_empty();
            out += poll.stdout.len() as u64;
            err += poll.stderr.len() as u64;
            stdout.write_all(&poll.stdout).await.map_err(write)?;
            stderr.write_all(&poll.stderr).await.map_err(write)?;
            if new {
                stdout.flush().await.map_err(write)?;
                stderr.flush().await.map_err(write)?;
                interval = Duration::from_millis(20);
                continue;
            }
            if poll.exit.is_some() {
                return Ok(());
            }
            tokio::time::sleep(interval).await;
            interval = (interval * 2).min(Duration::from_millis(500));
        }
    }
}

#[derive(Debug)]
struct FlyVolumeHandle {
    inner: Arc<Inner>,
    name: String,
}

#[async_trait]
impl Volume for FlyVolumeHandle {
    fn name(&self) -> &str {
        &self.name
    }

    async fn cleanup(&self) -> Result<(), DriverError> {
        self.inner.volume_cleanup(&self.name).await
    }
}

#[async_trait]
impl Driver for FlyDriver {
    fn name(&self) -> &'static str {
        DRIVER
    }

    fn namespace(&self) -> &str {
        &self.inner.config.namespace
    }

    async fn create_volume(
        &self,
        name: &str,
        size_bytes: u64,
    ) -> Result<Box<dyn Volume>, DriverError> {
        let mut state = self.inner.state.lock().await;
        self.inner
            .create_volume_locked(&mut state, name, size_bytes)
            .await?;
        Ok(Box::new(FlyVolumeHandle {
            inner: self.inner.clone(),
            name: name.to_owned(),
        }))
    }

    async fn run_container(&self, task: Task) -> Result<Box<dyn Container>, DriverError> {
        let task = self.inner.run(task).await?;
        Ok(Box::new(FlyContainer {
            inner: self.inner.clone(),
            task,
        }))
    }

    async fn close(&self) -> Result<(), DriverError> {
        self.inner.close().await
    }

    /// Names the default image: its digest is the registry's, not known before a machine runs.
    async fn environment_digest(&self) -> Result<String, DriverError> {
        Ok(format!("{DRIVER}:{}", self.inner.config.container_image))
    }

    fn job_support(&self) -> JobSupport {
        JobSupport {
            mk: ci_exec_driver::MkSource::Upload,
            test_in_container: true,
            default_test_image: String::new(),
            shares_host_run_dir: false,
        }
    }

    fn as_volume_files(&self) -> Option<&dyn VolumeFiles> {
        Some(self)
    }
}

#[async_trait]
impl VolumeFiles for FlyDriver {
    async fn read_file(&self, volume: &str, path: &str) -> Result<Vec<u8>, DriverError> {
        self.inner.read_file(volume, path).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_and_limits_make_the_guest() {
        let none = Limits::default();
        let cases = [
            (
                "shared-cpu-1x",
                none,
                json!({"cpu_kind": "shared", "cpus": 1, "memory_mb": 256}),
            ),
            (
                "shared-cpu-2x",
                none,
                json!({"cpu_kind": "shared", "cpus": 2, "memory_mb": 512}),
            ),
            (
                "performance-2x",
                none,
                json!({"cpu_kind": "performance", "cpus": 2, "memory_mb": 4096}),
            ),
            (
                "shared-cpu-1x",
                Limits {
                    cpu_shares: 2048,
                    memory_bytes: 32 << 20,
                },
                json!({"cpu_kind": "shared", "cpus": 2, "memory_mb": 256}),
            ),
            (
                "shared-cpu-1x",
                Limits {
                    cpu_shares: 0,
                    memory_bytes: 300 << 20,
                },
                json!({"cpu_kind": "shared", "cpus": 1, "memory_mb": 512}),
            ),
        ];
        for (size, limits, want) in cases {
            assert_eq!(guest(size, &limits).unwrap(), want, "{size} {limits:?}");
        }
        for bad in ["shared-cpu-3x", "huge", "performance-x", ""] {
            let error = preset(bad).unwrap_err().to_string();
            assert!(error.contains("`size`"), "{error}");
        }
    }

    #[test]
    fn app_and_volume_names_fit_fly() {
        assert_eq!(ephemeral_app("My_NS.1"), "ci-my-ns-1");
        assert!(ephemeral_app(&"n".repeat(80)).len() <= 63);
        let name = volume_name("ns");
        assert!(name.len() <= 30, "{name}");
        assert!(name.starts_with(&volume_prefix("ns")));
        assert!(
            name.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        );
        assert_ne!(volume_name("ns"), volume_name("other"));
    }

    #[test]
    fn task_dirs_are_injective_paths() {
        assert_eq!(task_dir("happy-1"), "/ci-exec/tasks/happy-1");
        assert_eq!(task_dir("a/b"), "/ci-exec/tasks/a_2fb");
        assert_eq!(task_dir(".."), "/ci-exec/tasks/_2e_2e");
        assert_ne!(task_dir("a_2f"), task_dir("a/"));
    }

    #[test]
    fn task_specs_are_the_wrappers_records() {
        let task = Task::new("t", ["sh", "-c", "echo $A"])
            .env("A", "1=2")
            .workdir("/work")
            .user("1:2")
            .network(false)
            .stdin(ci_exec_driver::Stdin::bytes("x"));
        let spec = task_spec(
            &task,
            &[("/ci-exec/data/v.1".to_owned(), "/work".to_owned())],
        )
        .unwrap();
        let records: Vec<&[u8]> = spec
            .split(|byte| *byte == 0)
            .filter(|r| !r.is_empty())
            .collect();
        let text: Vec<String> = records
            .iter()
            .map(|r| String::from_utf8_lossy(r).into_owned())
            .collect();
        assert_eq!(
            text,
            [
                "mode=guest-os",
                "stdin=follow",
                "network=none",
                "caps=container",
                "workdir=/work",
                "user=1:2",
                "bind=/ci-exec/data/v.1",
                "at=/work",
                &format!("env=PATH={DEFAULT_PATH}"),
                "env=A=1=2",
                "arg=sh",
                "arg=-c",
                "arg=echo $A",
            ]
        );
        let bad = Task::new("t", ["a\0b"]);
        assert!(matches!(
            task_spec(&bad, &[]),
            Err(DriverError::InvalidTask { .. })
        ));
    }

    #[test]
    fn polls_and_exec_answers_parse() {
        assert_eq!(
            parse_poll("exit 42\naGk=\n\n").unwrap(),
            Poll {
                exit: Some(42),
                stdout: b"hi".to_vec(),
                stderr: Vec::new()
            }
        );
        assert_eq!(parse_poll("running\n\n\n").unwrap().exit, None);
        assert!(parse_poll("what\n").is_err());
        assert_eq!(exec_output(b"running\n").unwrap(), "running\n");
        assert_eq!(
            exec_output(br#"{"stdout":"ok\n","exit_code":0}"#).unwrap(),
            "ok\n"
        );
        assert!(
            exec_output(br#"{"stdout":"","stderr":"boom","exit_code":1}"#)
                .unwrap_err()
                .contains("boom")
        );
    }
}
