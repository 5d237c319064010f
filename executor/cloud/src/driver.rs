use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use ci_exec_docker::{DockerConfig, DockerDriver, Engine};
use ci_exec_driver::{
    Container, Driver, DriverError, JobSupport, Limits, RepositoryState, Sandbox, SandboxExec,
    Task, Volume, VolumeFiles,
};

use crate::api::{Api, TokenSource};
use crate::config::{CloudConfig, ProviderKind};
use crate::hetzner::Hetzner;
use crate::pool::{Seeker, Slot, now_unix, pool_key, random_hex, sweep};
use crate::provider::{Labels, Provider, Server, ServerRequest, SshKey, label};
use crate::ssh::{KeyFile, wait_for_sshd};
use crate::{CloudError, sizes};

/// The `hetzner` and `digitalocean` drivers: one server running Docker per run (or a parked
/// one claimed from the pool), every task handed to the docker driver over `ssh://`.
///
/// Cheap to construct: the server is provisioned by the first task or volume, sized from that
/// task's limits when the size is `auto`.
#[derive(Debug, Clone)]
pub struct CloudDriver {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    config: CloudConfig,
    provider: Arc<dyn Provider>,
    /// The repository of the job (`RepositoryState::use_state`), part of the pool key.
    repository: Mutex<String>,
    worker: tokio::sync::OnceCell<Worker>,
    /// Made by this driver and not yet deleted, recorded as soon as the API accepted them so
    /// that `close` removes them even when provisioning failed half-way.
    made: Mutex<Made>,
    claim_token: String,
    /// The API refused the token (401).
    rejected: AtomicBool,
}

#[derive(Debug, Default)]
struct Made {
    servers: Vec<String>,
    key: Option<SshKey>,
}

#[derive(Debug)]
struct Worker {
    server: Server,
    docker: DockerDriver,
    /// Holds the private key file (removed on drop for an ephemeral key).
    _key: KeyFile,
    labels: Arc<Mutex<Labels>>,
    heartbeat: tokio::task::JoinHandle<()>,
}

/// A dropped driver (never closed: a panic, a cancelled job) stops beating, so its server is
/// swept as abandoned after the lease instead of looking held for ever.
impl Drop for Worker {
    fn drop(&mut self) {
        self.heartbeat.abort();
    }
}

impl CloudDriver {
    /// A driver for `config`: checks the parameters, contacts nothing yet.
    pub fn new(config: CloudConfig) -> Result<Self, CloudError> {
        let driver = config.provider.driver_name();
        let api = Api::new(
            driver,
            match config.provider {
                ProviderKind::Hetzner => "Hetzner Cloud",
                ProviderKind::DigitalOcean => "DigitalOcean",
            },
            &config.endpoint,
            config.token.clone(),
            TokenSource {
                parameter: "token",
                env: config.provider.token_env(),
            },
        )?;
        let provider: Arc<dyn Provider> = match config.provider {
            ProviderKind::Hetzner => Arc::new(Hetzner { api }),
            ProviderKind::DigitalOcean => Arc::new(crate::digitalocean::DigitalOcean { api }),
        };
        Ok(CloudDriver {
            inner: Arc::new(Inner {
                config,
                provider,
                repository: Mutex::new(String::new()),
                worker: tokio::sync::OnceCell::new(),
                made: Mutex::default(),
                claim_token: random_hex(8),
                rejected: AtomicBool::new(false),
            }),
        })
    }

    /// API requests this driver has sent so far (the benchmarks' "requests per task").
    pub fn api_requests(&self) -> u64 {
        self.inner.provider.requests()
    }

    /// The server tasks run on, once provisioned: its provider id and name.
    pub fn server(&self) -> Option<(String, String)> {
        self.inner
            .worker
            .get()
            .map(|worker| (worker.server.id.clone(), worker.server.name.clone()))
    }

    async fn docker(&self, limits: &Limits) -> Result<&DockerDriver, DriverError> {
        let inner = &self.inner;
        let worker = inner
            .worker
            .get_or_try_init(|| inner.provision(limits))
            .await
            .map_err(|error| inner.backend("provision a server", error))?;
        Ok(&worker.docker)
    }
}

impl Inner {
    fn driver(&self) -> &'static str {
        self.config.provider.driver_name()
    }

    fn backend(&self, action: &str, error: CloudError) -> DriverError {
        if matches!(error, CloudError::Unauthorized { .. }) {
            self.rejected.store(true, Ordering::Relaxed);
        }
        DriverError::backend(self.driver(), action, error)
    }

    fn made(&self) -> std::sync::MutexGuard<'_, Made> {
        self.made.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn size_for(&self, limits: &Limits) -> String {
        if self.config.size != "auto" {
            return self.config.size.clone();
        }
        match self.config.provider {
            ProviderKind::Hetzner => sizes::hetzner_server_type(limits),
            ProviderKind::DigitalOcean => sizes::digitalocean_size(limits),
        }
        .to_owned()
    }

    /// Finds a slot in the pool, claims or creates the server, waits for its sshd and Docker.
    async fn provision(&self, limits: &Limits) -> Result<Worker, CloudError> {
        let config = &self.config;
        let provider = self.provider.as_ref();
        let size = self.size_for(limits);
        let repository = self
            .repository
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let pool = pool_key(config.provider, &repository, &size);
        sweep(provider, &config.pool).await?;

        let key = if config.pool.reuse_worker {
            let dir = config
                .state_dir
                .as_ref()
                .ok_or_else(|| CloudError::InvalidParameter {
                    driver: self.driver(),
                    parameter: "reuse_worker",
                    reason: "no state directory (set HOME or XDG_STATE_HOME) to keep the pool's \
                         ssh key in"
                        .to_owned(),
                })?;
            KeyFile::persistent(
                &dir.join(self.driver()).join(&pool).join("id_ed25519"),
                &format!("ci-exec pool {pool}"),
            )
        } else {
            KeyFile::ephemeral(&format!("ci-exec {}", config.namespace))
        }
        .map_err(|source| CloudError::SshKey {
            provider: self.driver(),
            source,
        })?;
        let key_id = key_id(&key.public);

        let seeker = Seeker {
            provider,
            pool: &config.pool,
            pool_key: &pool,
            key_id: &key_id,
            claim_token: &self.claim_token,
            namespace: &config.namespace,
        };
        let server = loop {
            match seeker.wait_for_slot().await? {
                Slot::Claimed(server) => break server,
                Slot::Free => {
                    let provider_key = self.provider_key(&key, &key_id, &pool).await?;
                    let mut labels = config.user_label_map();
                    labels.extend([
                        (label::CI.to_owned(), "true".to_owned()),
                        (label::NAMESPACE.to_owned(), config.namespace.clone()),
                        (label::WORKER.to_owned(), pool.clone()),
                        (label::STATUS.to_owned(), label::BUSY.to_owned()),
                        (label::KEY.to_owned(), key_id.clone()),
                        (label::CLAIM.to_owned(), self.claim_token.clone()),
                        (label::HEARTBEAT.to_owned(), now_unix().to_string()),
                    ]);
                    let request = ServerRequest {
                        name: server_name(&config.namespace),
                        size: size.clone(),
                        image: config.image.clone(),
                        location: config.location.clone(),
                        ssh_key: provider_key,
                        labels,
                        user_tags: config.user_labels.clone(),
                    };
                    let server = provider.create_server(&request).await?;
                    self.made().servers.push(server.id.clone());
                    tracing::info!(driver = self.driver(), server = %server.name, size, "created a server");
                    if seeker.overshot(&server).await? {
                        tracing::info!(server = %server.name, "another run took the last slot: giving way");
                        provider.delete_server(&server.id).await?;
                        self.made().servers.retain(|id| *id != server.id);
                        tokio::time::sleep(config.pool.poll_interval).await;
                        continue;
                    }
                    break server;
                }
            }
        };

        let labels = Arc::new(Mutex::new(server.labels.clone()));
        let heartbeat = tokio::spawn(beat(
            self.provider.clone(),
            server.clone(),
            labels.clone(),
            config.pool.heartbeat,
        ));
        match self.connect(&server, &key).await {
            Ok((server, docker)) => Ok(Worker {
                server,
                docker,
                _key: key,
                labels,
                heartbeat,
            }),
            Err(error) => {
                heartbeat.abort();
                if let Err(delete) = provider.delete_server(&server.id).await {
                    tracing::warn!(error = %delete, server = %server.name, "cannot delete the unreachable server");
                }
                self.made().servers.retain(|id| *id != server.id);
                Err(error)
            }
        }
    }

    /// The provider-side key to create a server with: the run's own (deleted on close), or the
    /// pool's (kept, so parked servers can be logged into by later runs on this machine).
    async fn provider_key(
        &self,
        key: &KeyFile,
        key_id: &str,
        pool: &str,
    ) -> Result<SshKey, CloudError> {
        if let Some(made) = self.made().key.clone() {
            return Ok(made);
        }
        let name = if self.config.pool.reuse_worker {
            format!("ci-pool-{pool}-{key_id}")
        } else {
            format!("ci-{}-{}-{key_id}", self.config.namespace, now_unix())
        };
        if self.config.pool.reuse_worker
            && let Some(existing) = self
                .provider
                .keys(&name)
                .await?
                .into_iter()
                .find(|existing| existing.name == name)
        {
            return Ok(existing);
        }
        let created = self.provider.create_key(&name, &key.public).await?;
        if !self.config.pool.reuse_worker {
            self.made().key = Some(created.clone());
        }
        Ok(created)
    }

    /// Waits for the server to run, its sshd to answer and Docker to answer through it.
    async fn connect(
        &self,
        server: &Server,
        key: &KeyFile,
    ) -> Result<(Server, DockerDriver), CloudError> {
        let config = &self.config;
        let started = Instant::now();
        let timeout = |what, parameter, after| CloudError::ProvisioningTimeout {
            provider: self.driver(),
            server: server.name.clone(),
            what,
            parameter,
            after,
        };
        let mut current = server.clone();
        let mut interval = Duration::from_millis(100);
        let address =
            loop {
                if current.running
                    && let Some(address) = current.address.clone()
                {
                    break address;
                }
                if started.elapsed() >= config.ssh_timeout {
                    return Err(timeout("the start", "ssh_timeout", config.ssh_timeout));
                }
                tokio::time::sleep(interval).await;
                interval = (interval * 2).min(Duration::from_secs(3));
                current = self.provider.server(&server.id).await?.ok_or_else(|| {
                    CloudError::Protocol {
                        provider: self.driver(),
                        action: format!("wait for server `{}`", server.name),
                        reason: "the server disappeared while starting".to_owned(),
                    }
                })?;
            };
        // Port 22: the docker driver's ssh transport (bollard) cannot pass another to ssh.
        let sshd = format!("{address}:22");
        let left = config.ssh_timeout.saturating_sub(started.elapsed());
        if !wait_for_sshd(&sshd, left).await {
            return Err(timeout("sshd", "ssh_timeout", config.ssh_timeout));
        }
        let host = format!("ssh://{}@{address}", config.ssh_user);
        let docker_config = DockerConfig::new(Engine::Docker, config.namespace.clone())
            .host(host)
            .image(config.container_image.clone())
            .ssh_identity(key.path());
        let docker_started = Instant::now();
        let mut interval = Duration::from_millis(200);
        loop {
            match DockerDriver::connect(docker_config.clone()).await {
                Ok(docker) => return Ok((current, docker)),
                Err(error) if docker_started.elapsed() >= config.docker_timeout => {
                    tracing::warn!(%error, "Docker on the server never answered");
                    return Err(timeout("Docker", "docker_timeout", config.docker_timeout));
                }
                Err(error) => {
                    tracing::debug!(%error, "Docker on the server does not answer yet");
                    tokio::time::sleep(interval).await;
                    interval = (interval * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    /// Parks or deletes the run's server, deletes its key, then whatever the namespace still
    /// holds (a killed run's) and what the sweep finds. The first error is returned.
    async fn close(&self) -> Result<(), DriverError> {
        if self.rejected.load(Ordering::Relaxed) && self.worker.get().is_none() {
            // Nothing can have been made with a token the API refused, and every request
            // would be refused again: the run's error already said so, once.
            return Ok(());
        }
        let provider = self.provider.as_ref();
        let mut first: Option<DriverError> = None;
        let mut keep = |result: Result<(), DriverError>| {
            if let Err(error) = result {
                tracing::warn!(%error, "close");
                first.get_or_insert(error);
            }
        };
        if let Some(worker) = self.worker.get() {
            worker.heartbeat.abort();
            let docker_closed = worker.docker.close().await;
            let parked = self.config.pool.reuse_worker && docker_closed.is_ok();
            keep(docker_closed);
            if parked {
                let mut labels = worker
                    .labels
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .clone();
                labels.insert(label::STATUS.into(), label::IDLE.into());
                labels.insert(label::IDLE_SINCE.into(), now_unix().to_string());
                labels.remove(label::CLAIM);
                labels.remove(label::HEARTBEAT);
                keep(
                    provider
                        .set_labels(&worker.server, &labels)
                        .await
                        .map_err(|error| self.backend("park the server", error)),
                );
                self.made().servers.retain(|id| *id != worker.server.id);
            }
        }
        let servers = std::mem::take(&mut self.made().servers);
        for id in servers {
            keep(
                provider
                    .delete_server(&id)
                    .await
                    .map_err(|error| self.backend("delete the server", error)),
            );
        }
        let key = self.made().key.take();
        if let Some(key) = key {
            keep(
                provider
                    .delete_key(&key)
                    .await
                    .map_err(|error| self.backend("delete the ssh key", error)),
            );
        }
        keep(
            self.close_namespace()
                .await
                .map_err(|error| self.backend("clean up the namespace", error)),
        );
        if let Err(error) = sweep(provider, &self.config.pool).await {
            tracing::debug!(%error, "no sweep at close");
        }
        tracing::debug!(
            driver = self.driver(),
            requests = provider.requests(),
            "closed"
        );
        match first {
            Some(error) => Err(error),
            None => Ok(()),
        }
    }

    /// What a killed run of this namespace left: its busy servers and its ssh keys.
    async fn close_namespace(&self) -> Result<(), CloudError> {
        let provider = self.provider.as_ref();
        let namespace = self.config.namespace.as_str();
        for server in provider
            .servers(&[(label::CI, "true"), (label::NAMESPACE, namespace)])
            .await?
        {
            if server.label(label::STATUS) != Some(label::IDLE) {
                tracing::info!(server = %server.name, "deleting a server the namespace left");
                provider.delete_server(&server.id).await?;
            }
        }
        for key in provider.keys(&format!("ci-{namespace}-")).await? {
            if key_namespace(&key.name) == Some(namespace) {
                provider.delete_key(&key).await?;
            }
        }
        Ok(())
    }
}

/// Refreshes the server's heartbeat label every `interval`, until aborted.
async fn beat(
    provider: Arc<dyn Provider>,
    server: Server,
    labels: Arc<Mutex<Labels>>,
    interval: Duration,
) {
    loop {
        tokio::time::sleep(interval).await;
        let current = {
            let mut labels = labels.lock().unwrap_or_else(PoisonError::into_inner);
            labels.insert(label::HEARTBEAT.into(), now_unix().to_string());
            labels.clone()
        };
        if let Err(error) = provider.set_labels(&server, &current).await {
            tracing::warn!(%error, server = %server.name, "heartbeat");
        }
    }
}

/// The `ci-key` label of a public key: 12 hex digits of its SHA-256.
fn key_id(public: &str) -> String {
    use sha2::Digest as _;
    let key = public
        .split_whitespace()
        .take(2)
        .collect::<Vec<_>>()
        .join(" ");
    hex::encode(sha2::Sha256::digest(key.as_bytes()))[..12].to_owned()
}

/// A server's name: the namespace (cut to fit a hostname) and a random suffix.
fn server_name(namespace: &str) -> String {
    let prefix: String = namespace.chars().take(48).collect();
    format!("{}-{}", prefix.trim_end_matches('-'), random_hex(4))
}

/// The namespace of an ephemeral key named `ci-<namespace>-<unix time>-<key id>`.
fn key_namespace(name: &str) -> Option<&str> {
    let mut parts = name.rsplitn(3, '-');
    let (_id, time, rest) = (parts.next()?, parts.next()?, parts.next()?);
    time.parse::<u64>().ok()?;
    rest.strip_prefix("ci-")
}

#[async_trait]
impl Driver for CloudDriver {
    fn name(&self) -> &'static str {
        self.inner.driver()
    }

    fn namespace(&self) -> &str {
        &self.inner.config.namespace
    }

    async fn create_volume(
        &self,
        name: &str,
        size_bytes: u64,
    ) -> Result<Box<dyn Volume>, DriverError> {
        self.docker(&Limits::default())
            .await?
            .create_volume(name, size_bytes)
            .await
    }

    async fn run_container(&self, task: Task) -> Result<Box<dyn Container>, DriverError> {
        let limits = task.limits;
        self.docker(&limits).await?.run_container(task).await
    }

    async fn close(&self) -> Result<(), DriverError> {
        self.inner.close().await
    }

    /// Names the server image and the container image, without provisioning: a result is
    /// keyed before any server exists. The container image's id is not known until then.
    async fn environment_digest(&self) -> Result<String, DriverError> {
        let config = &self.inner.config;
        Ok(format!(
            "{}:{}:{}",
            self.inner.driver(),
            config.image,
            config.container_image
        ))
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

    fn as_sandbox(&self) -> Option<&dyn SandboxExec> {
        Some(self)
    }

    fn as_repository_state(&self) -> Option<&dyn RepositoryState> {
        Some(self)
    }
}

#[async_trait]
impl VolumeFiles for CloudDriver {
    async fn read_file(&self, volume: &str, path: &str) -> Result<Vec<u8>, DriverError> {
        self.docker(&Limits::default())
            .await?
            .read_file(volume, path)
            .await
    }
}

#[async_trait]
impl SandboxExec for CloudDriver {
    async fn start_sandbox(&self, task: Task) -> Result<Box<dyn Sandbox>, DriverError> {
        let limits = task.limits;
        self.docker(&limits).await?.start_sandbox(task).await
    }
}

/// The pool key takes the job's repository; the server's Docker keeps its images between the
/// runs of a pool, which is the warm state, so there is nothing more to save.
#[async_trait]
impl RepositoryState for CloudDriver {
    fn use_state(&self, key: &str, _fresh: bool) -> Result<(), DriverError> {
        *self
            .inner
            .repository
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = key.to_owned();
        Ok(())
    }

    async fn keep_state(&self) -> Result<(), DriverError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ephemeral_key_names_give_their_namespace_back() {
        assert_eq!(
            key_namespace("ci-my-ns-1700000000-abcdef012345"),
            Some("my-ns")
        );
        assert_eq!(key_namespace("ci-pool-abc-def"), None);
        assert_eq!(key_namespace("other-1-2"), None);
    }

    #[test]
    fn server_names_are_hostnames() {
        let name = server_name(&"n".repeat(80));
        assert!(name.len() <= 63, "{name}");
        assert!(name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'));
    }

    #[test]
    fn key_ids_ignore_the_comment() {
        assert_eq!(
            key_id("ssh-ed25519 AAAA one"),
            key_id("ssh-ed25519 AAAA two")
        );
        assert_eq!(key_id("ssh-ed25519 AAAA").len(), 12);
    }
}
