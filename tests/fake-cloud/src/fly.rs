//! Fly Machines: apps, machines and volumes, where every machine is a container on a local
//! Docker engine (with the capabilities root holds in a Firecracker VM that the agent uses:
//! `SYS_ADMIN`, `NET_ADMIN`) running the
//! machine's image with its `files` written in (mode 0644: Fly's `api.File` has no mode) and
//! its `init.entrypoint`/`cmd`, and every volume a Docker volume. `exec` is a Docker exec whose
//! stdout is the raw answer; `wait` long-polls and answers 408 at its timeout; a machine whose
//! main process exits is destroyed when `auto_destroy` is set. A volume is attached to one
//! live machine at a time, and a started machine is not deleted without a stop first, as on
//! Fly.

use std::collections::BTreeMap;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use bollard::Docker;
use bollard::container::LogOutput;
use bollard::exec::{CreateExecOptions, StartExecResults};
use bollard::models::{ContainerCreateBody, HostConfig, Mount, MountType, VolumeCreateRequest};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, KillContainerOptionsBuilder, RemoveContainerOptionsBuilder,
    RemoveVolumeOptionsBuilder, UploadToContainerOptionsBuilder,
};
use futures_util::StreamExt as _;
use serde_json::{Value, json};

use crate::Api;
use crate::openapi::Spec;
use crate::server::Answer;

/// Labels every container and volume of the fake carries (to find leftovers by hand).
const LABEL: &str = "ci-exec-fake-fly";

fn error(status: u16, message: &str) -> Answer {
    Answer::error(Api::Fly, status, "", message)
}

fn now() -> String {
    "2026-12-03T08:00:00Z".to_owned()
}

#[derive(Debug)]
pub(crate) struct Fly {
    docker: Docker,
    state: Mutex<FlyState>,
}

#[derive(Debug, Default)]
struct FlyState {
    apps: BTreeMap<String, App>,
    next_id: u64,
}

#[derive(Debug)]
struct App {
    org: String,
    machines: BTreeMap<String, Machine>,
    volumes: BTreeMap<String, FlyVolume>,
}

#[derive(Debug, Clone)]
struct Machine {
    container: String,
    object: Value,
    auto_destroy: bool,
    volume: Option<String>,
}

impl Machine {
    fn state(&self) -> &str {
        self.object["state"].as_str().unwrap_or_default()
    }
}

#[derive(Debug, Clone)]
struct FlyVolume {
    docker_volume: String,
    object: Value,
}

impl FlyState {
    fn next_id(&mut self) -> String {
        self.next_id += 1;
        format!("{:014x}", 0x1d8e_0000_0000u64 + self.next_id)
    }
}

impl Fly {
    pub(crate) async fn connect() -> std::io::Result<Fly> {
        let docker = Docker::connect_with_defaults().map_err(std::io::Error::other)?;
        docker.ping().await.map_err(|error| {
            std::io::Error::other(format!(
                "the fake Fly API runs machines on Docker, which does not answer: {error}"
            ))
        })?;
        Ok(Fly {
            docker,
            state: Mutex::default(),
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, FlyState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn machines(&self) -> Vec<(String, String, String)> {
        let state = self.state();
        state
            .apps
            .iter()
            .flat_map(|(app, entry)| {
                entry
                    .machines
                    .iter()
                    .filter(|(_, machine)| machine.state() != "destroyed")
                    .map(move |(id, machine)| (app.clone(), id.clone(), machine.state().to_owned()))
            })
            .collect()
    }

    pub(crate) fn apps(&self) -> Vec<(String, String)> {
        let state = self.state();
        let mut apps = Vec::new();
        for (name, app) in &state.apps {
            let volumes: Vec<&FlyVolume> = app
                .volumes
                .values()
                .filter(|volume| volume.object["state"] != "destroyed")
                .collect();
            if volumes.is_empty() {
                apps.push((name.clone(), String::new()));
            }
            for volume in volumes {
                let volume_name = volume.object["name"].as_str().unwrap_or_default();
                apps.push((name.clone(), volume_name.to_owned()));
            }
        }
        apps
    }

    pub(crate) async fn handle(
        &self,
        _spec: &Spec,
        method: &str,
        template: &str,
        path: &str,
        query: &[(String, String)],
        body: Option<Value>,
    ) -> Answer {
        let body = body.unwrap_or_default();
        let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
        let app = parts.get(1).copied().unwrap_or_default().to_owned();
        let item = parts.get(3).copied().unwrap_or_default().to_owned();
        let query = |name: &str| {
            query
                .iter()
                .find(|(key, _)| key == name)
                .map(|(_, value)| value.clone())
        };
        if template.starts_with("/apps/{app_name}") && !self.state().apps.contains_key(&app) {
            return error(404, &format!("app {app} not found"));
        }
        match (method, template) {
            ("GET", "/apps") => {
                let org = query("org_slug").unwrap_or_default();
                let state = self.state();
                let apps: Vec<Value> = state
                    .apps
                    .iter()
                    .filter(|(_, entry)| entry.org == org)
                    .map(|(name, entry)| {
                        json!({"id": name, "name": name, "machine_count": entry.machines.len()})
                    })
                    .collect();
                Answer::json(200, json!({"total_apps": apps.len(), "apps": apps}))
            }
            ("POST", "/apps") => {
                let name = body["app_name"].as_str().unwrap_or_default().to_owned();
                let org = body["org_slug"].as_str().unwrap_or_default().to_owned();
                let valid = !name.is_empty()
                    && name.len() <= 63
                    && name
                        .chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
                if !valid {
                    return error(422, &format!("app name `{name}` is invalid"));
                }
                let mut state = self.state();
                if state.apps.contains_key(&name) {
                    return error(422, "Name has already been taken");
                }
                state.apps.insert(
                    name,
                    App {
                        org,
                        machines: BTreeMap::new(),
                        volumes: BTreeMap::new(),
                    },
                );
                Answer::empty(201)
            }
            ("GET", "/apps/{app_name}") => {
                let state = self.state();
                let org = state.apps[&app].org.clone();
                Answer::json(
                    200,
                    json!({"id": app, "name": app, "status": "deployed",
                           "organization": {"name": org, "slug": org}}),
                )
            }
            ("DELETE", "/apps/{app_name}") => {
                let removed = self.state().apps.remove(&app);
                if let Some(removed) = removed {
                    for machine in removed.machines.values() {
                        self.remove_container(&machine.container).await;
                    }
                    for volume in removed.volumes.values() {
                        self.remove_volume(&volume.docker_volume).await;
                    }
                }
                Answer::empty(202)
            }
            ("GET", "/apps/{app_name}/machines") => {
                let ids: Vec<String> = self.state().apps[&app].machines.keys().cloned().collect();
                let mut machines = Vec::new();
                for id in ids {
                    if let Some(machine) = self.refresh(&app, &id).await
                        && machine.state() != "destroyed"
                    {
                        machines.push(machine.object);
                    }
                }
                Answer::json(200, json!(machines))
            }
            ("POST", "/apps/{app_name}/machines") => self.create_machine(&app, &body).await,
            ("GET", "/apps/{app_name}/machines/{machine_id}") => {
                match self.refresh(&app, &item).await {
                    Some(machine) => Answer::json(200, machine.object),
                    None => error(404, "machine not found"),
                }
            }
            ("GET", "/apps/{app_name}/machines/{machine_id}/wait") => {
                let wanted = query("state").unwrap_or_else(|| "started".to_owned());
                if wanted == "stopped" && query("instance_id").is_none() {
                    return error(400, "instance_id is required to wait for `stopped`");
                }
                let seconds: u64 = query("timeout")
                    .and_then(|value| value.parse().ok())
                    .unwrap_or(60);
                let deadline = Instant::now() + Duration::from_secs(seconds);
                loop {
                    let Some(machine) = self.refresh(&app, &item).await else {
                        return error(404, "machine not found");
                    };
                    let reached = machine.state() == wanted
                        || (wanted == "stopped" && machine.state() == "destroyed");
                    if reached {
                        return Answer::empty(200);
                    }
                    if Instant::now() >= deadline {
                        return error(
                            408,
                            &format!("machine did not reach state `{wanted}` in time"),
                        );
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
            ("POST", "/apps/{app_name}/machines/{machine_id}/exec") => {
                let Some(machine) = self.refresh(&app, &item).await else {
                    return error(404, "machine not found");
                };
                if machine.state() != "started" {
                    return error(412, "machine is not started");
                }
                let command: Vec<String> = body["command"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|word| word.as_str().map(str::to_owned))
                    .collect();
                self.exec(&machine.container, command).await
            }
            ("POST", "/apps/{app_name}/machines/{machine_id}/signal") => {
                let Some(machine) = self.refresh(&app, &item).await else {
                    return error(404, "machine not found");
                };
                let signal = body["signal"].as_str().unwrap_or("SIGTERM");
                let options = KillContainerOptionsBuilder::new().signal(signal).build();
                match self
                    .docker
                    .kill_container(&machine.container, Some(options))
                    .await
                {
                    Ok(()) => Answer::empty(200),
                    Err(problem) => error(400, &problem.to_string()),
                }
            }
            ("POST", "/apps/{app_name}/machines/{machine_id}/stop") => {
                let Some(machine) = self.refresh(&app, &item).await else {
                    return error(404, "machine not found");
                };
                if machine.state() == "started" {
                    // `--serve` exits on SIGTERM at once; a grace period as Fly's, then kill.
                    let options = bollard::query_parameters::StopContainerOptionsBuilder::new()
                        .t(10)
                        .build();
                    if let Err(problem) = self
                        .docker
                        .stop_container(&machine.container, Some(options))
                        .await
                    {
                        return error(400, &problem.to_string());
                    }
                    self.refresh(&app, &item).await;
                }
                Answer::empty(200)
            }
            ("DELETE", "/apps/{app_name}/machines/{machine_id}") => {
                let Some(machine) = self.refresh(&app, &item).await else {
                    return error(404, "machine not found");
                };
                match machine.state() {
                    "started" => error(
                        412,
                        "failed_precondition: unable to destroy machine, not currently stopped",
                    ),
                    "destroyed" => error(404, "machine not found"),
                    _ => {
                        self.destroy(&app, &item).await;
                        Answer::empty(200)
                    }
                }
            }
            ("GET", "/apps/{app_name}/volumes") => {
                let ids: Vec<String> = self.state().apps[&app].volumes.keys().cloned().collect();
                let mut volumes = Vec::new();
                for id in ids {
                    if let Some(volume) = self.volume(&app, &id).await
                        && volume.object["state"] != "destroyed"
                    {
                        volumes.push(volume.object);
                    }
                }
                Answer::json(200, json!(volumes))
            }
            ("POST", "/apps/{app_name}/volumes") => self.create_volume(&app, &body).await,
            ("GET", "/apps/{app_name}/volumes/{volume_id}") => {
                match self.volume(&app, &item).await {
                    Some(volume) => Answer::json(200, volume.object),
                    None => error(404, "volume not found"),
                }
            }
            ("DELETE", "/apps/{app_name}/volumes/{volume_id}") => {
                let Some(volume) = self.volume(&app, &item).await else {
                    return error(404, "volume not found");
                };
                if volume.object["state"] == "destroyed" {
                    return error(404, "volume not found");
                }
                if volume.object["attached_machine_id"]
                    .as_str()
                    .is_some_and(|id| !id.is_empty())
                {
                    return error(
                        412,
                        "failed_precondition: volume is attached to a machine, destroy it first",
                    );
                }
                self.remove_volume(&volume.docker_volume).await;
                let mut state = self.state();
                let Some(entry) = state
                    .apps
                    .get_mut(&app)
                    .and_then(|app| app.volumes.get_mut(&item))
                else {
                    return error(404, "volume not found");
                };
                entry.object["state"] = json!("destroyed");
                Answer::json(200, entry.object.clone())
            }
            _ => error(404, &format!("the fake does not serve {method} {template}")),
        }
    }

    /// The machine after looking at its container: a container that exited is a stopped
    /// machine, or a destroyed one with `auto_destroy`.
    async fn refresh(&self, app: &str, id: &str) -> Option<Machine> {
        let machine = self.state().apps.get(app)?.machines.get(id)?.clone();
        if machine.state() != "started" {
            return Some(machine);
        }
        let running = match self
            .docker
            .inspect_container(&machine.container, None)
            .await
        {
            Ok(inspected) => inspected
                .state
                .and_then(|state| state.running)
                .unwrap_or(false),
            Err(_) => false,
        };
        if running {
            return Some(machine);
        }
        if machine.auto_destroy {
            self.destroy(app, id).await;
        } else {
            self.set_state(app, id, "stopped");
        }
        Some(self.state().apps.get(app)?.machines.get(id)?.clone())
    }

    fn set_state(&self, app: &str, id: &str, value: &str) {
        let mut state = self.state();
        if let Some(machine) = state
            .apps
            .get_mut(app)
            .and_then(|app| app.machines.get_mut(id))
        {
            machine.object["state"] = json!(value);
            machine.object["updated_at"] = json!(now());
        }
    }

    /// Removes the machine's container and releases its volume.
    async fn destroy(&self, app: &str, id: &str) {
        let container = {
            let mut state = self.state();
            let Some(entry) = state.apps.get_mut(app) else {
                return;
            };
            let Some(machine) = entry.machines.get_mut(id) else {
                return;
            };
            machine.object["state"] = json!("destroyed");
            let volume = machine.volume.take();
            let container = machine.container.clone();
            if let Some(volume) = volume.and_then(|volume| entry.volumes.get_mut(&volume)) {
                volume.object["attached_machine_id"] = json!("");
            }
            container
        };
        self.remove_container(&container).await;
    }

    async fn volume(&self, app: &str, id: &str) -> Option<FlyVolume> {
        // An attachment to a machine that exited ends with it.
        let attached = self.state().apps.get(app)?.volumes.get(id)?.object["attached_machine_id"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        if !attached.is_empty() {
            self.refresh(app, &attached).await;
        }
        self.state().apps.get(app)?.volumes.get(id).cloned()
    }

    async fn remove_container(&self, container: &str) {
        let options = RemoveContainerOptionsBuilder::new()
            .force(true)
            .v(true)
            .build();
        if let Err(problem) = self.docker.remove_container(container, Some(options)).await {
            tracing::debug!(%problem, container, "fake Fly: remove container");
        }
    }

    async fn remove_volume(&self, volume: &str) {
        let options = RemoveVolumeOptionsBuilder::new().force(true).build();
        if let Err(problem) = self.docker.remove_volume(volume, Some(options)).await {
            tracing::debug!(%problem, volume, "fake Fly: remove volume");
        }
    }

    async fn create_volume(&self, app: &str, body: &Value) -> Answer {
        let name = body["name"].as_str().unwrap_or_default().to_owned();
        let valid = !name.is_empty()
            && name.len() <= 30
            && name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        if !valid {
            return error(
                400,
                "volume name must be lowercase letters, digits and underscores, at most 30",
            );
        }
        let id = format!("vol_{}", self.state().next_id());
        let docker_volume = format!("{LABEL}-{app}-{id}");
        let request = VolumeCreateRequest {
            name: Some(docker_volume.clone()),
            labels: Some([(LABEL.to_owned(), app.to_owned())].into()),
            ..VolumeCreateRequest::default()
        };
        if let Err(problem) = self.docker.create_volume(request).await {
            return error(500, &format!("docker volume: {problem}"));
        }
        let region = body["region"].as_str().unwrap_or("fak").to_owned();
        let object = json!({
            "id": id,
            "name": name,
            "state": "created",
            "size_gb": body["size_gb"].as_i64().unwrap_or(1),
            "region": region,
            "zone": "fake",
            "encrypted": true,
            "attached_machine_id": "",
            "attached_alloc_id": "",
            "created_at": now(),
            "fstype": "ext4",
        });
        let mut state = self.state();
        let Some(entry) = state.apps.get_mut(app) else {
            return error(404, "app not found");
        };
        entry.volumes.insert(
            id,
            FlyVolume {
                docker_volume,
                object: object.clone(),
            },
        );
        Answer::json(200, object)
    }

    async fn create_machine(&self, app: &str, body: &Value) -> Answer {
        let config = &body["config"];
        let image = config["image"].as_str().unwrap_or_default().to_owned();
        if image.is_empty() {
            return error(422, "config.image is required");
        }
        let mounts = config["mounts"].as_array().cloned().unwrap_or_default();
        if mounts.len() > 1 {
            return error(422, "a machine can only mount one volume");
        }
        let id = self.state().next_id();
        let mut volume_mount = None;
        if let Some(mount) = mounts.first() {
            let volume_id = mount["volume"].as_str().unwrap_or_default();
            let Some(volume) = self.volume(app, volume_id).await else {
                return error(404, &format!("volume {volume_id} not found"));
            };
            let mut state = self.state();
            let Some(entry) = state
                .apps
                .get_mut(app)
                .and_then(|entry| entry.volumes.get_mut(volume_id))
            else {
                return error(404, &format!("volume {volume_id} not found"));
            };
            // Checked and taken under one lock: two creates never both get the volume.
            let attached = entry.object["attached_machine_id"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            if !attached.is_empty() || entry.object["state"] == "destroyed" {
                return error(
                    422,
                    &format!("volume {volume_id} is already attached to machine {attached}"),
                );
            }
            entry.object["attached_machine_id"] = json!(id);
            volume_mount = Some((
                volume_id.to_owned(),
                volume.docker_volume.clone(),
                mount["path"].as_str().unwrap_or_default().to_owned(),
            ));
        }
        let strings = |value: &Value| -> Option<Vec<String>> {
            value.as_array().map(|words| {
                words
                    .iter()
                    .filter_map(|word| word.as_str().map(str::to_owned))
                    .collect()
            })
        };
        let env: Vec<String> = config["env"]
            .as_object()
            .into_iter()
            .flatten()
            .map(|(name, value)| format!("{name}={}", value.as_str().unwrap_or_default()))
            .collect();
        let memory_mb = config["guest"]["memory_mb"].as_i64().unwrap_or(256);
        let cpus = config["guest"]["cpus"].as_i64().unwrap_or(1);
        let container = format!("{LABEL}-{app}-{id}");
        let create = ContainerCreateBody {
            image: Some(image.clone()),
            entrypoint: strings(&config["init"]["entrypoint"]),
            cmd: strings(&config["init"]["cmd"]),
            env: Some(env),
            labels: Some([(LABEL.to_owned(), app.to_owned())].into()),
            host_config: Some(HostConfig {
                // Root in a Fly Machine holds every capability; the agent needs these two
                // (namespaces and mounts, a loopback in a private network). Not `privileged`:
                // an engine that lacks a capability itself (a nested sandbox) refuses that.
                cap_add: Some(vec!["SYS_ADMIN".to_owned(), "NET_ADMIN".to_owned()]),
                security_opt: Some(vec!["apparmor=unconfined".to_owned()]),
                memory: Some(memory_mb * 1024 * 1024),
                nano_cpus: Some(cpus * 1_000_000_000),
                mounts: volume_mount.as_ref().map(|(_, docker_volume, path)| {
                    vec![Mount {
                        target: Some(path.clone()),
                        source: Some(docker_volume.clone()),
                        typ: Some(MountType::VOLUME),
                        ..Mount::default()
                    }]
                }),
                ..HostConfig::default()
            }),
            ..ContainerCreateBody::default()
        };
        let release = |fly: &Fly| {
            if let Some((volume_id, _, _)) = &volume_mount {
                let mut state = fly.state();
                if let Some(entry) = state
                    .apps
                    .get_mut(app)
                    .and_then(|entry| entry.volumes.get_mut(volume_id))
                {
                    entry.object["attached_machine_id"] = json!("");
                }
            }
        };
        let options = CreateContainerOptionsBuilder::new()
            .name(&container)
            .build();
        if let Err(problem) = self.docker.create_container(Some(options), create).await {
            release(self);
            return error(422, &format!("cannot create the machine: {problem}"));
        }
        let files = match files_archive(config["files"].as_array().into_iter().flatten()) {
            Ok(files) => files,
            Err(message) => {
                self.remove_container(&container).await;
                release(self);
                return error(422, &message);
            }
        };
        let options = UploadToContainerOptionsBuilder::new().path("/").build();
        let started = match self
            .docker
            .upload_to_container(&container, Some(options), bollard::body_full(files.into()))
            .await
        {
            Ok(()) => self.docker.start_container(&container, None).await,
            Err(problem) => Err(problem),
        };
        if let Err(problem) = started {
            self.remove_container(&container).await;
            release(self);
            return error(422, &format!("cannot start the machine: {problem}"));
        }
        let region = body["region"].as_str().unwrap_or("fak");
        let object = json!({
            "id": id,
            "name": body["name"].as_str().map(str::to_owned).unwrap_or_else(|| format!("machine-{id}")),
            "state": "started",
            "region": region,
            "instance_id": format!("01FAKE{id}"),
            "private_ip": "fdaa::3",
            "config": config,
            "image_ref": {"registry": "", "repository": image, "tag": "", "digest": ""},
            "created_at": now(),
            "updated_at": now(),
        });
        let mut state = self.state();
        let Some(entry) = state.apps.get_mut(app) else {
            return error(404, "app not found");
        };
        entry.machines.insert(
            id,
            Machine {
                container,
                object: object.clone(),
                auto_destroy: config["auto_destroy"].as_bool().unwrap_or(false),
                volume: volume_mount.map(|(volume_id, _, _)| volume_id),
            },
        );
        Answer::json(200, object)
    }

    /// A Docker exec: its stdout is the answer; a failed command is a 400 with its stderr.
    async fn exec(&self, container: &str, command: Vec<String>) -> Answer {
        let options = CreateExecOptions {
            attach_stdout: Some(true),
            attach_stderr: Some(true),
            cmd: Some(command),
            ..CreateExecOptions::default()
        };
        let exec = match self.docker.create_exec(container, options).await {
            Ok(exec) => exec,
            Err(problem) => return error(412, &format!("machine is not running: {problem}")),
        };
        let Ok(StartExecResults::Attached { mut output, .. }) =
            self.docker.start_exec(&exec.id, None).await
        else {
            return error(500, "exec did not attach");
        };
        let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
        while let Some(chunk) = output.next().await {
            match chunk {
                Ok(LogOutput::StdOut { message } | LogOutput::Console { message }) => {
                    stdout.extend_from_slice(&message)
                }
                Ok(LogOutput::StdErr { message }) => stderr.extend_from_slice(&message),
                Ok(LogOutput::StdIn { .. }) => {}
                Err(problem) => return error(500, &format!("exec output: {problem}")),
            }
        }
        let mut code = None;
        for _ in 0..500 {
            match self.docker.inspect_exec(&exec.id).await {
                Ok(inspected) if inspected.running != Some(true) => {
                    code = inspected.exit_code;
                    break;
                }
                Ok(_) => tokio::time::sleep(Duration::from_millis(2)).await,
                Err(problem) => return error(500, &format!("exec: {problem}")),
            }
        }
        match code {
            Some(0) => Answer::raw(200, stdout),
            code => error(
                400,
                &format!(
                    "command exited with {code:?}: {}",
                    String::from_utf8_lossy(&stderr).trim()
                ),
            ),
        }
    }
}

/// A tar archive of a machine's `files` (with their parent directories), each written 0644.
fn files_archive<'a>(files: impl Iterator<Item = &'a Value>) -> Result<Vec<u8>, String> {
    let mut archive = tar::Builder::new(Vec::new());
    let mut directories = std::collections::BTreeSet::new();
    for file in files {
        let path = file["guest_path"].as_str().unwrap_or_default();
        let Some(relative) = path.strip_prefix('/') else {
            return Err(format!("guest_path `{path}` must be absolute"));
        };
        let bytes = STANDARD
            .decode(file["raw_value"].as_str().unwrap_or_default())
            .map_err(|problem| format!("raw_value of `{path}` is not base64: {problem}"))?;
        let parts: Vec<&str> = relative.split('/').collect();
        for depth in 1..parts.len() {
            let directory = parts[..depth].join("/");
            if directories.insert(directory.clone()) {
                let mut header = tar::Header::new_gnu();
                header.set_entry_type(tar::EntryType::Directory);
                header.set_mode(0o755);
                header.set_size(0);
                archive
                    .append_data(&mut header, format!("{directory}/"), std::io::empty())
                    .map_err(|problem| problem.to_string())?;
            }
        }
        let mut header = tar::Header::new_gnu();
        header.set_mode(0o644);
        header.set_size(bytes.len() as u64);
        archive
            .append_data(&mut header, relative, bytes.as_slice())
            .map_err(|problem| problem.to_string())?;
    }
    archive.into_inner().map_err(|problem| problem.to_string())
}
