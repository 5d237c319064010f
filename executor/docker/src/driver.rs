use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use async_trait::async_trait;
use bollard::models::{
    ContainerCreateBody, HostConfig, HostConfigLogConfig, Mount as BackendMount, MountType,
    ResourcesUlimits, VolumeCreateRequest,
};
use bollard::query_parameters::{
    AttachContainerOptionsBuilder, CreateContainerOptionsBuilder, CreateImageOptionsBuilder,
    ListContainersOptionsBuilder, ListVolumesOptionsBuilder, RemoveContainerOptionsBuilder,
    RemoveVolumeOptionsBuilder,
};
use futures_util::StreamExt;
use tokio::io::AsyncWriteExt;

use ci_exec_driver::{
    Container, Driver, DriverError, JobSupport, MkSource, SandboxExec, Stdin, Task, Volume,
    VolumeFiles, resource_name,
};

use crate::config::{DockerConfig, Engine};
use crate::connect::{Connection, connect};
use crate::container::DockerContainer;
use crate::volume::DockerVolume;
use crate::{DockerError, EngineProblem, ID_LABEL, NAMESPACE_LABEL, ROLE_LABEL};

/// What rootful podman needs on hosts where it lacks `CAP_SYS_RESOURCE`: its default
/// `nofile=1048576` is above the hard limit it may raise to there, and the OCI runtime's
/// `setrlimit` fails. Measured on the CI machines (hard `nofile` 20000).
const PODMAN_ULIMITS: [(&str, i64); 2] = [("nofile", 20_000), ("nproc", 32_768)];

/// How long a container may stay in a state its engine cannot remove it from.
const REMOVE_DEADLINE: std::time::Duration = std::time::Duration::from_secs(10);

/// The `docker` or `podman` driver: tasks as containers on an Engine API socket.
///
/// Cheap to construct: it connects (and negotiates the API version) on first use, so an
/// unreachable daemon is reported by the first operation, with how to fix it.
/// [`DockerDriver::connect`] connects eagerly instead.
#[derive(Debug, Clone)]
pub struct DockerDriver {
    pub(crate) inner: Arc<Inner>,
}

#[derive(Debug)]
pub(crate) struct Inner {
    pub(crate) config: DockerConfig,
    connection: tokio::sync::OnceCell<Connection>,
    /// Learned: the engine refuses containers without our ulimits (see [`PODMAN_ULIMITS`]).
    needs_ulimits: AtomicBool,
    /// What this driver made and has not removed yet; `close` removes exactly this in a
    /// generated namespace ([`DockerConfig::namespace_generated`]).
    made: Mutex<Made>,
}

/// Backend names of the containers and volumes a driver made. A name is recorded before the
/// request that creates it, so one the daemon made while the request failed is covered too.
#[derive(Debug, Default)]
struct Made {
    containers: BTreeSet<String>,
    volumes: BTreeSet<String>,
}

/// What a container of ours is for, as its `ci-exec.role` label says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    Task,
    Sandbox,
    VolumeReader,
}

impl Role {
    fn label(self) -> &'static str {
        match self {
            Role::Task => "task",
            Role::Sandbox => "sandbox",
            Role::VolumeReader => "volume-reader",
        }
    }
}

impl DockerDriver {
    /// A driver for `config`; validates the host address but does not connect yet.
    pub fn new(config: DockerConfig) -> Result<Self, DockerError> {
        config.resolve_host()?;
        let needs_ulimits = config.engine == Engine::Podman && lacks_cap_sys_resource();
        Ok(DockerDriver {
            inner: Arc::new(Inner {
                config,
                connection: tokio::sync::OnceCell::new(),
                needs_ulimits: AtomicBool::new(needs_ulimits),
                made: Mutex::default(),
            }),
        })
    }

    /// A driver for `config`, connected: fails now if the daemon is unreachable.
    pub async fn connect(config: DockerConfig) -> Result<Self, DockerError> {
        let driver = DockerDriver::new(config)?;
        driver.inner.connect().await?;
        Ok(driver)
    }

    /// Whether the daemon behind the socket is podman (known once connected).
    pub async fn is_podman(&self) -> Result<bool, DriverError> {
        Ok(self.inner.connection().await?.is_podman)
    }

    /// Whether `image` is on the daemon already (nothing is pulled).
    pub async fn image_present(&self, image: &str) -> Result<bool, DriverError> {
        let docker = self.inner.docker().await?;
        match docker.inspect_image(image).await {
            Ok(_) => Ok(true),
            Err(error) if status_code(&error) == Some(404) => Ok(false),
            Err(source) => Err(self
                .inner
                .backend(format!("inspect image `{image}`"), source)),
        }
    }

    /// The image of tasks that name none.
    pub fn default_image(&self) -> &str {
        &self.inner.config.image
    }
}

impl Inner {
    pub(crate) fn driver_name(&self) -> &'static str {
        self.config.engine.driver_name()
    }

    pub(crate) fn namespace(&self) -> &str {
        &self.config.namespace
    }

    pub(crate) fn backend(
        &self,
        action: impl Into<String>,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> DriverError {
        DriverError::backend(self.driver_name(), action, source)
    }

    async fn connect(&self) -> Result<&Connection, DockerError> {
        self.connection
            .get_or_try_init(|| connect(&self.config))
            .await
    }

    pub(crate) async fn connection(&self) -> Result<&Connection, DriverError> {
        self.connect()
            .await
            .map_err(|source| self.backend("connect to its daemon", source))
    }

    pub(crate) async fn docker(&self) -> Result<&bollard::Docker, DriverError> {
        Ok(&self.connection().await?.docker)
    }

    pub(crate) fn labels(&self, id: &str, role: Option<Role>) -> HashMap<String, String> {
        let mut labels = HashMap::from([
            (NAMESPACE_LABEL.to_owned(), self.namespace().to_owned()),
            (ID_LABEL.to_owned(), id.to_owned()),
        ]);
        if let Some(role) = role {
            labels.insert(ROLE_LABEL.to_owned(), role.label().to_owned());
        }
        labels
    }

    fn made(&self) -> std::sync::MutexGuard<'_, Made> {
        // The sets stay consistent whatever panicked while holding the lock.
        self.made.lock().unwrap_or_else(PoisonError::into_inner)
    }

    async fn pull(&self, image: &str) -> Result<(), DriverError> {
        let docker = self.docker().await?;
        tracing::info!(driver = self.driver_name(), image, "pulling image");
        let options = CreateImageOptionsBuilder::new()
            .from_image(&with_tag(image))
            .build();
        let mut progress = docker.create_image(Some(options), None, None);
        while let Some(item) = progress.next().await {
            let failure = match item {
                Ok(info) => match info.error_detail.and_then(|detail| detail.message) {
                    Some(message) => message,
                    None => continue,
                },
                Err(error) => error_message(&error),
            };
            return Err(DriverError::ImageNotFound {
                image: image.to_owned(),
                hint: format!(
                    " locally, and pulling it failed ({failure}): check the name and that its \
                     registry is reachable, or build/import it on the daemon (`{engine} import \
                     rootfs.tar {image}`)",
                    failure = failure.trim(),
                    engine = self.driver_name(),
                ),
            });
        }
        Ok(())
    }

    /// Creates volume `name` of the namespace, or finds the existing one; returns its backend
    /// name.
    pub(crate) async fn ensure_volume(&self, name: &str) -> Result<String, DriverError> {
        validate_name(name).map_err(|reason| DriverError::InvalidVolume {
            volume: name.to_owned(),
            reason,
        })?;
        let docker = self.docker().await?;
        let backend_name = resource_name(self.namespace(), name);
        self.made().volumes.insert(backend_name.clone());
        let request = VolumeCreateRequest {
            name: Some(backend_name.clone()),
            labels: Some(self.labels(name, None)),
            ..VolumeCreateRequest::default()
        };
        match docker.create_volume(request).await {
            Ok(_) => Ok(backend_name),
            // Podman answers a second create of the same name with a conflict; Docker returns
            // the existing volume.
            Err(error) if status_code(&error) == Some(409) => Ok(backend_name),
            Err(source) => Err(self.backend(format!("create volume `{backend_name}`"), source)),
        }
    }

    /// The create body for `task` in the driver's conventions: argv run as given (no image
    /// entrypoint), only the task's env, volumes from the mounts. Both engines give a task
    /// whose env and image set no `PATH` their default one, so the image is not inspected.
    pub(crate) async fn container_body(
        &self,
        task: &Task,
        role: Role,
    ) -> Result<ContainerCreateBody, DriverError> {
        let image = if task.image.is_empty() {
            self.config.image.clone()
        } else {
            task.image.clone()
        };
        let mut mounts = Vec::with_capacity(task.mounts.len());
        for mount in &task.mounts {
            mount.check(&task.id)?;
            let source = self.ensure_volume(&mount.volume).await?;
            mounts.push(BackendMount {
                target: Some(mount.path.clone()),
                source: Some(source),
                typ: Some(MountType::VOLUME),
                ..BackendMount::default()
            });
        }
        let env: Vec<String> = task
            .env
            .iter()
            .map(|(name, value)| format!("{name}={value}"))
            .collect();
        let positive = |value: u64| (value > 0).then(|| i64::try_from(value).unwrap_or(i64::MAX));
        let host_config = HostConfig {
            mounts: Some(mounts),
            cpu_shares: positive(task.limits.cpu_shares),
            memory: positive(task.limits.memory_bytes),
            privileged: Some(task.privileged),
            // An offline task gets only a loopback; the others the engine's default network.
            network_mode: (task.network == Some(false)).then(|| "none".to_owned()),
            // `local` keeps the bytes as written (json-file re-encodes invalid UTF-8) and can
            // be read back whatever the daemon's default log driver is. Podman has its own
            // file logger and rejects `local`.
            log_config: (!self.connection().await?.is_podman).then(|| HostConfigLogConfig {
                typ: Some("local".to_owned()),
                // Docker 20.10 reads back only the live file, not rotated ones: one file, big
                // enough for a CI job's whole output, uncompressed.
                config: Some(HashMap::from([
                    ("max-size".to_owned(), "2g".to_owned()),
                    ("max-file".to_owned(), "1".to_owned()),
                    ("compress".to_owned(), "false".to_owned()),
                ])),
            }),
            ulimits: self
                .needs_ulimits
                .load(Ordering::Relaxed)
                .then(podman_ulimits),
            ..HostConfig::default()
        };
        let stdin = task.stdin.is_some();
        Ok(ContainerCreateBody {
            image: Some(image),
            cmd: Some(task.command.clone()),
            entrypoint: Some(Vec::new()),
            env: Some(env),
            user: task.user.clone(),
            working_dir: task.workdir.clone(),
            labels: Some(self.labels(&task.id, Some(role))),
            attach_stdin: Some(stdin),
            open_stdin: Some(stdin),
            stdin_once: Some(stdin),
            host_config: Some(host_config),
            ..ContainerCreateBody::default()
        })
    }

    /// The state of container `name`, or `None` when it does not exist.
    ///
    /// Podman 4 reports states Docker's API does not know (`stopped`, `configured`), which
    /// bollard's typed inspect rejects; the raw answer is read instead then.
    pub(crate) async fn inspect_state(
        &self,
        name: &str,
    ) -> Result<Option<ContainerState>, DriverError> {
        let docker = self.docker().await?;
        let mut answer = docker.inspect_container(name, None).await;
        // Podman 4 reads the container's `/proc/PID/cgroup` while answering; when the process
        // exits between its lookup and that read, it answers 500 "no such process". The
        // container is fine and the next inspect sees it exited, so the race is asked again.
        for _ in 0..INSPECT_RACE_RETRIES {
            match &answer {
                Err(error) if is_exit_race(error) => {
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                    answer = docker.inspect_container(name, None).await;
                }
                _ => break,
            }
        }
        match answer {
            Ok(inspected) => {
                let namespace = inspected
                    .config
                    .and_then(|config| config.labels)
                    .and_then(|mut labels| labels.remove(NAMESPACE_LABEL));
                let state = inspected.state.unwrap_or_default();
                Ok(Some(ContainerState {
                    namespace,
                    running: state.running.unwrap_or(false),
                    status: state
                        .status
                        .map(|status| status.to_string())
                        .unwrap_or_default(),
                    exit_code: state.exit_code,
                    started_at: state.started_at,
                }))
            }
            Err(bollard::errors::Error::JsonDataError { contents, .. }) => {
                ContainerState::from_json(&contents)
                    .map(Some)
                    .ok_or_else(|| {
                        self.backend(
                            format!("inspect container `{name}`"),
                            EngineProblem::UnexpectedAnswer {
                                expected: "a container",
                                contents: contents.clone(),
                            },
                        )
                    })
            }
            Err(error) if status_code(&error) == Some(404) => Ok(None),
            Err(source) => Err(self.backend(format!("inspect container `{name}`"), source)),
        }
    }

    /// The container `name`, if it exists. One of another namespace is an error, never reused.
    pub(crate) async fn find_container(
        &self,
        name: &str,
    ) -> Result<Option<ContainerState>, DriverError> {
        let Some(state) = self.inspect_state(name).await? else {
            return Ok(None);
        };
        if state.namespace.as_deref() != Some(self.namespace()) {
            return Err(self.backend(
                format!("reuse container `{name}`"),
                EngineProblem::NotInNamespace {
                    label: NAMESPACE_LABEL,
                    namespace: self.namespace().to_owned(),
                },
            ));
        }
        Ok(Some(state))
    }

    /// Creates container `name`, pulling its image only when the daemon does not have it
    /// (one request when it does: no inspect first). Returns `false` when a container of that
    /// name exists already.
    pub(crate) async fn create_container(
        &self,
        name: &str,
        body: &ContainerCreateBody,
    ) -> Result<bool, DriverError> {
        let docker = self.docker().await?;
        let first_time = self.made().containers.insert(name.to_owned());
        let mut pulled = false;
        loop {
            let options = CreateContainerOptionsBuilder::new().name(name).build();
            match docker.create_container(Some(options), body.clone()).await {
                Ok(_) => return Ok(true),
                Err(error) if name_in_use(&error) => {
                    // Not ours to remove at `close` unless this driver made it earlier.
                    if first_time {
                        self.made().containers.remove(name);
                    }
                    return Ok(false);
                }
                // The image is missing ("No such image" from Docker, "no such image" from
                // podman): pull it once, then create again.
                Err(error)
                    if status_code(&error) == Some(404)
                        && error_message(&error)
                            .to_ascii_lowercase()
                            .contains("no such image")
                        && !pulled =>
                {
                    let image = body.image.as_deref().unwrap_or_default();
                    tracing::debug!(
                        driver = self.driver_name(),
                        image,
                        "{}",
                        error_message(&error)
                    );
                    self.pull(image).await?;
                    pulled = true;
                }
                Err(source) => {
                    return Err(self.backend(format!("create container `{name}`"), source));
                }
            }
        }
    }

    /// Creates and starts container `name`. Returns `false` when it existed already (same
    /// task id, from an earlier or concurrent call): that container is the task's, as is.
    pub(crate) async fn create_and_start(
        &self,
        name: &str,
        task_id: &str,
        program: &str,
        mut body: ContainerCreateBody,
        stdin: Option<&Stdin>,
    ) -> Result<bool, DriverError> {
        let docker = self.docker().await?;
        let mut retried_with_ulimits = false;
        loop {
            if !self.create_container(name, &body).await? {
                return Ok(false);
            }
            // Attach before start, so not a byte of input is lost. Output is read from the
            // logs, not from this stream.
            let attached = match stdin {
                Some(_) => {
                    let options = AttachContainerOptionsBuilder::new()
                        .stdin(true)
                        .stream(true)
                        .build();
                    match docker.attach_container(name, Some(options)).await {
                        Ok(attached) => Some(attached),
                        Err(source) => {
                            self.remove_container(name).await.ok();
                            return Err(self.backend(
                                format!("attach to the input of container `{name}`"),
                                source,
                            ));
                        }
                    }
                }
                None => None,
            };
            match docker.start_container(name, None).await {
                Ok(()) => {
                    if let (Some(attached), Some(stdin)) = (attached, stdin) {
                        pump_stdin(self.driver_name(), name.to_owned(), attached, stdin);
                    }
                    return Ok(true);
                }
                Err(error) => {
                    self.remove_container(name).await.ok();
                    let message = error_message(&error);
                    if message.contains("rlimit") && !retried_with_ulimits {
                        tracing::info!(
                            driver = self.driver_name(),
                            "the engine cannot raise rlimits; retrying with ulimits {PODMAN_ULIMITS:?}"
                        );
                        self.needs_ulimits.store(true, Ordering::Relaxed);
                        if let Some(host_config) = body.host_config.as_mut() {
                            host_config.ulimits = Some(podman_ulimits());
                        }
                        retried_with_ulimits = true;
                        continue;
                    }
                    return Err(start_error(self, task_id, name, program, error));
                }
            }
        }
    }

    /// Removes container `name`, running or not. Idempotent.
    pub(crate) async fn remove_container(&self, name: &str) -> Result<(), DriverError> {
        let docker = self.docker().await?;
        let start = std::time::Instant::now();
        loop {
            // `v`: the anonymous volumes an image's `VOLUME` made go with the container; they
            // carry no namespace label, so nothing else would ever remove them.
            let options = RemoveContainerOptionsBuilder::new()
                .force(true)
                .v(true)
                .build();
            match docker.remove_container(name, Some(options)).await {
                Ok(()) => break,
                // Gone already, or another remove of it is under way.
                Err(error) if matches!(status_code(&error), Some(404 | 409)) => break,
                // Podman refuses while a container is between running and stopped.
                Err(error)
                    if error_message(&error).contains("state improper")
                        && start.elapsed() < REMOVE_DEADLINE =>
                {
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                }
                Err(source) => {
                    return Err(self.backend(format!("remove container `{name}`"), source));
                }
            }
        }
        self.made().containers.remove(name);
        Ok(())
    }

    pub(crate) async fn remove_volume(&self, backend_name: &str) -> Result<(), DriverError> {
        let docker = self.docker().await?;
        let options = RemoveVolumeOptionsBuilder::new().force(true).build();
        match docker.remove_volume(backend_name, Some(options)).await {
            Ok(()) => {}
            Err(error) if status_code(&error) == Some(404) => {}
            Err(source) => {
                return Err(self.backend(format!("remove volume `{backend_name}`"), source));
            }
        }
        self.made().volumes.remove(backend_name);
        Ok(())
    }

    fn namespace_filter(&self) -> HashMap<String, Vec<String>> {
        HashMap::from([(
            "label".to_owned(),
            vec![format!("{NAMESPACE_LABEL}={}", self.namespace())],
        )])
    }

    /// Removes every container and volume of the namespace, running or not.
    async fn close(&self) -> Result<(), DriverError> {
        let (containers, volumes) = if self.config.namespace_generated {
            let made = std::mem::take(&mut *self.made());
            (
                made.containers.into_iter().collect(),
                made.volumes.into_iter().collect(),
            )
        } else {
            (self.list_containers().await?, self.list_volumes().await?)
        };
        // Containers first: a volume in use cannot be removed.
        let mut first_error = None;
        for name in containers {
            if let Err(error) = self.remove_container(&name).await {
                tracing::warn!(driver = self.driver_name(), %error, "close: container left behind");
                first_error.get_or_insert(error);
            }
        }
        for name in volumes {
            if let Err(error) = self.remove_volume(&name).await {
                tracing::warn!(driver = self.driver_name(), %error, "close: volume left behind");
                first_error.get_or_insert(error);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// The ids of the namespace's containers, running or stopped.
    async fn list_containers(&self) -> Result<Vec<String>, DriverError> {
        let docker = self.docker().await?;
        let options = ListContainersOptionsBuilder::new()
            .all(true)
            .filters(&self.namespace_filter())
            .build();
        match docker.list_containers(Some(options)).await {
            Ok(containers) => Ok(containers.into_iter().filter_map(|c| c.id).collect()),
            // Podman 4 lists states Docker's API does not know (`stopped`): read the raw answer.
            Err(bollard::errors::Error::JsonDataError { contents, .. }) => {
                container_ids_from_json(&contents).ok_or_else(|| {
                    self.backend(
                        "list the namespace's containers",
                        EngineProblem::UnexpectedAnswer {
                            expected: "a container list",
                            contents: contents.clone(),
                        },
                    )
                })
            }
            Err(source) => Err(self.backend("list the namespace's containers", source)),
        }
    }

    /// The backend names of the namespace's volumes.
    async fn list_volumes(&self) -> Result<Vec<String>, DriverError> {
        let docker = self.docker().await?;
        let options = ListVolumesOptionsBuilder::new()
            .filters(&self.namespace_filter())
            .build();
        let volumes = docker
            .list_volumes(Some(options))
            .await
            .map_err(|source| self.backend("list the namespace's volumes", source))?;
        Ok(volumes
            .volumes
            .into_iter()
            .flatten()
            .map(|volume| volume.name)
            .collect())
    }
}

/// What the driver needs to know of a container's state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ContainerState {
    pub(crate) namespace: Option<String>,
    pub(crate) running: bool,
    /// `created`, `running`, `exited`, … (podman adds `stopped`, `configured`).
    pub(crate) status: String,
    pub(crate) exit_code: Option<i64>,
    /// RFC 3339, as the engine reports it.
    pub(crate) started_at: Option<String>,
}

impl ContainerState {
    /// Whether the task has ended for good.
    pub(crate) fn exited(&self) -> bool {
        !self.running && matches!(self.status.as_str(), "exited" | "dead" | "stopped")
    }

    fn from_json(json: &str) -> Option<ContainerState> {
        let value: serde_json::Value = serde_json::from_str(json).ok()?;
        let state = value.get("State")?;
        Some(ContainerState {
            namespace: value
                .pointer(&format!("/Config/Labels/{NAMESPACE_LABEL}"))
                .and_then(serde_json::Value::as_str)
                .map(str::to_owned),
            running: state.get("Running")?.as_bool()?,
            status: state.get("Status")?.as_str()?.to_owned(),
            exit_code: state.get("ExitCode").and_then(serde_json::Value::as_i64),
            started_at: state
                .get("StartedAt")
                .and_then(serde_json::Value::as_str)
                .map(str::to_owned),
        })
    }
}

#[async_trait]
impl Driver for DockerDriver {
    fn name(&self) -> &'static str {
        self.inner.driver_name()
    }

    fn namespace(&self) -> &str {
        self.inner.namespace()
    }

    /// The id of the base image on this engine (`sha256:…`, the hash of its configuration),
    /// pulled first if the engine lacks it: a tag moved to another build gives another id.
    async fn environment_digest(&self) -> Result<String, DriverError> {
        let inner = &self.inner;
        let image = inner.config.image.clone();
        let docker = inner.docker().await?;
        let inspected = match docker.inspect_image(&image).await {
            Err(error) if status_code(&error) == Some(404) => {
                inner.pull(&image).await?;
                docker.inspect_image(&image).await
            }
            other => other,
        };
        let inspected = inspected
            .map_err(|source| inner.backend(format!("inspect image `{image}`"), source))?;
        inspected.id.ok_or_else(|| {
            inner.backend(format!("inspect image `{image}`"), EngineProblem::NoImageId)
        })
    }

    fn job_support(&self) -> JobSupport {
        JobSupport {
            mk: MkSource::Upload,
            test_in_container: true,
            // The base image, unless the mkfile names one.
            default_test_image: String::new(),
            shares_host_run_dir: false,
        }
    }

    async fn create_volume(
        &self,
        name: &str,
        _size_bytes: u64,
    ) -> Result<Box<dyn Volume>, DriverError> {
        // The `local` volume driver has no size; the hint is not enforced.
        let backend_name = self.inner.ensure_volume(name).await?;
        Ok(Box::new(DockerVolume::new(
            self.inner.clone(),
            name.to_owned(),
            backend_name,
        )))
    }

    async fn run_container(&self, task: Task) -> Result<Box<dyn Container>, DriverError> {
        validate_task(&task)?;
        let inner = &self.inner;
        let name = resource_name(inner.namespace(), &task.id);
        // Create first and look only on a conflict: the usual new task costs no inspect.
        let body = inner.container_body(&task, Role::Task).await?;
        let created = inner
            .create_and_start(&name, &task.id, &task.command[0], body, task.stdin.as_ref())
            .await?;
        if !created && inner.find_container(&name).await?.is_none() {
            // Removed between our create and the look: a cleanup of the same id won.
            return Err(inner.backend(
                format!("reuse container `{name}`"),
                EngineProblem::RemovedDuringLookup,
            ));
        }
        Ok(Box::new(DockerContainer::new(inner.clone(), task.id, name)))
    }

    async fn close(&self) -> Result<(), DriverError> {
        self.inner.close().await
    }

    fn as_volume_files(&self) -> Option<&dyn VolumeFiles> {
        Some(self)
    }

    fn as_sandbox(&self) -> Option<&dyn SandboxExec> {
        Some(self)
    }
}

/// The `Id`s of a raw container list.
pub(crate) fn container_ids_from_json(json: &str) -> Option<Vec<String>> {
    let value: serde_json::Value = serde_json::from_str(json).ok()?;
    value
        .as_array()?
        .iter()
        .map(|container| container.get("Id")?.as_str().map(str::to_owned))
        .collect()
}

/// Copies the task's input into the attached stream, then closes it so the task sees EOF.
fn pump_stdin(
    driver: &'static str,
    name: String,
    attached: bollard::container::AttachContainerResults,
    stdin: &Stdin,
) {
    let Some(mut reader) = stdin.take_reader() else {
        return;
    };
    let bollard::container::AttachContainerResults {
        mut output,
        mut input,
    } = attached;
    tokio::spawn(async move {
        let copied = tokio::io::copy(&mut reader, &mut input).await;
        let closed = input.shutdown().await;
        if let Err(error) = copied.and(closed) {
            // The task may exit without reading all of its input, as with a pipe.
            tracing::debug!(driver, container = %name, %error, "input not fully delivered");
        }
        // Hold the connection until the daemon ends it, so the container's end of the pipe
        // is closed by EOF, not by a reset.
        while output.next().await.is_some() {}
    });
}

/// Names of tasks and volumes become parts of container and volume names.
pub(crate) fn validate_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("it is empty".to_owned());
    }
    if name.len() > 128 {
        return Err("it is longer than 128 characters".to_owned());
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
    {
        return Err(
            "container engines accept only letters, digits, `_`, `.` and `-` in names".to_owned(),
        );
    }
    Ok(())
}

pub(crate) fn validate_task(task: &Task) -> Result<(), DriverError> {
    validate_name(&task.id).map_err(|reason| DriverError::InvalidTask {
        task: task.id.clone(),
        reason: format!("bad task id: {reason}"),
    })?;
    if task.command.is_empty() {
        return Err(DriverError::InvalidTask {
            task: task.id.clone(),
            reason: "the command is empty".to_owned(),
        });
    }
    Ok(())
}

/// What a failed start means: a missing program (exit class 127), one that cannot be run (126),
/// or the engine failing.
fn start_error(
    inner: &Inner,
    task_id: &str,
    name: &str,
    program: &str,
    error: bollard::errors::Error,
) -> DriverError {
    let message = error_message(&error).to_ascii_lowercase();
    if message.contains("executable file not found")
        || message.contains("no such file or directory")
        || message.contains("command was not found")
    {
        DriverError::ProgramNotFound {
            task: task_id.to_owned(),
            program: program.to_owned(),
        }
    } else if message.contains("permission denied") || message.contains("exec format error") {
        DriverError::CannotInvoke {
            task: task_id.to_owned(),
            program: program.to_owned(),
            source: std::io::Error::new(std::io::ErrorKind::PermissionDenied, error),
        }
    } else if message.contains("apply caps") {
        inner.backend(
            format!("start container `{name}`"),
            EngineProblem::CapabilitiesRefused {
                message: error_message(&error).trim().to_owned(),
            },
        )
    } else {
        inner.backend(format!("start container `{name}`"), error)
    }
}

fn podman_ulimits() -> Vec<ResourcesUlimits> {
    PODMAN_ULIMITS
        .iter()
        .map(|(name, limit)| ResourcesUlimits {
            name: Some((*name).to_owned()),
            soft: Some(*limit),
            hard: Some(*limit),
        })
        .collect()
}

/// Whether this process lacks `CAP_SYS_RESOURCE` (capability 24): a podman service it starts
/// cannot raise rlimits either.
fn lacks_cap_sys_resource() -> bool {
    const CAP_SYS_RESOURCE: u32 = 24;
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else {
        return false;
    };
    status
        .lines()
        .find_map(|line| line.strip_prefix("CapEff:"))
        .and_then(|mask| u64::from_str_radix(mask.trim(), 16).ok())
        .is_some_and(|mask| mask & (1 << CAP_SYS_RESOURCE) == 0)
}

/// `image` with `:latest` when it names no tag or digest: the pull endpoint pulls every tag of
/// an untagged repository.
fn with_tag(image: &str) -> String {
    let last = image.rsplit('/').next().unwrap_or(image);
    if last.contains(':') || last.contains('@') {
        image.to_owned()
    } else {
        format!("{image}:latest")
    }
}

/// Whether a create failed because a container of that name exists: Docker answers 409,
/// podman 4 a 500 saying the name "is already in use".
fn name_in_use(error: &bollard::errors::Error) -> bool {
    match status_code(error) {
        Some(409) => true,
        Some(500) => error_message(error).contains("already in use"),
        _ => false,
    }
}

/// The HTTP status of a daemon's error answer.
pub(crate) fn status_code(error: &bollard::errors::Error) -> Option<u16> {
    match error {
        bollard::errors::Error::DockerResponseServerError { status_code, .. } => Some(*status_code),
        _ => None,
    }
}

/// How often an inspect that lost podman's exit race is asked again.
const INSPECT_RACE_RETRIES: usize = 20;

/// Whether `error` is podman's answer to an inspect that raced its container's exit: a 500
/// naming a `/proc` file of a process that just ended.
fn is_exit_race(error: &bollard::errors::Error) -> bool {
    status_code(error) == Some(500) && {
        let message = error_message(error);
        message.contains("/proc/") && message.contains("no such process")
    }
}

/// The daemon's own words for `error`, without bollard's wrapping.
pub(crate) fn error_message(error: &bollard::errors::Error) -> String {
    match error {
        bollard::errors::Error::DockerResponseServerError { message, .. } => message.clone(),
        bollard::errors::Error::DockerStreamError { error } => error.clone(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn untagged_images_pull_latest_only() {
        for (image, pulled) in [
            ("debian", "debian:latest"),
            ("debian:bookworm", "debian:bookworm"),
            ("localhost:5000/ci/test", "localhost:5000/ci/test:latest"),
            ("localhost:5000/ci/test:1", "localhost:5000/ci/test:1"),
            ("debian@sha256:abc", "debian@sha256:abc"),
        ] {
            assert_eq!(with_tag(image), pulled);
        }
    }

    #[test]
    fn podman_states_docker_does_not_know_are_read_from_the_raw_answer() {
        let json = r#"{"Id":"x","State":{"Status":"stopped","Running":false,"ExitCode":3},
            "Config":{"Labels":{"ci-exec.namespace":"ns"}}}"#;
        let state = ContainerState::from_json(json).unwrap();
        assert_eq!(
            state,
            ContainerState {
                namespace: Some("ns".to_owned()),
                running: false,
                status: "stopped".to_owned(),
                exit_code: Some(3),
                started_at: None,
            }
        );
        assert!(state.exited());
        assert_eq!(ContainerState::from_json("{}"), None);
        let list = r#"[{"Id":"a","State":"stopped"},{"Id":"b","State":"running"}]"#;
        assert_eq!(
            container_ids_from_json(list),
            Some(vec!["a".to_owned(), "b".to_owned()])
        );
    }

    #[test]
    fn only_podmans_exit_race_is_asked_again() {
        let server =
            |status_code, message: &str| bollard::errors::Error::DockerResponseServerError {
                status_code,
                message: message.to_owned(),
            };
        // The answer podman 4.3 gave in CI for a container whose process had just exited.
        assert!(is_exit_race(&server(
            500,
            "read /proc/16222/cgroup: no such process"
        )));
        assert!(!is_exit_race(&server(500, "no such process")));
        assert!(!is_exit_race(&server(404, "no such container")));
        assert!(!is_exit_race(&server(
            500,
            "read /proc/1/cgroup: permission denied"
        )));
    }

    #[test]
    fn names_with_characters_engines_reject_are_refused() {
        assert!(validate_name("build-1.x_y").is_ok());
        for bad in ["", "a b", "a/b", "ü", &"x".repeat(129)] {
            assert!(validate_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn an_empty_command_is_an_invalid_task() {
        let error = validate_task(&Task::new("t", Vec::<String>::new())).unwrap_err();
        assert!(error.to_string().contains("command is empty"), "{error}");
    }
}
