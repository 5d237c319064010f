//! What the pool and the driver need of a VM provider (Hetzner, DigitalOcean), in the
//! providers' common terms: servers with key=value labels (DigitalOcean's tags are encoded as
//! `key:value`), and ssh keys by name.

use std::collections::BTreeMap;
use std::fmt::Debug;

use async_trait::async_trait;

use crate::CloudError;

pub(crate) type Labels = BTreeMap<String, String>;

/// Labels every server of ci-exec carries, and the pool's bookkeeping (seed `001_…`'s names,
/// with the pool key as the `ci-worker` value instead of the per-run namespace: pocketci's pool
/// never shared a worker between runs because its key was per run).
pub(crate) mod label {
    /// `true` on everything ci-exec makes.
    pub(crate) const CI: &str = "ci";
    /// The namespace of the run that holds (or last held) the server.
    pub(crate) const NAMESPACE: &str = "namespace";
    /// The pool: a hash of (provider, repository, size).
    pub(crate) const WORKER: &str = "ci-worker";
    /// `busy` or `idle`.
    pub(crate) const STATUS: &str = "ci-worker-status";
    /// Which key pair logs in: a parked server is claimed only by a run that holds that key.
    pub(crate) const KEY: &str = "ci-key";
    /// The claim token of the run that holds the server (the compare-and-set value).
    pub(crate) const CLAIM: &str = "ci-claim";
    /// Unix time of the holder's last heartbeat; a busy server whose heartbeat is stale was
    /// left by a killed run.
    pub(crate) const HEARTBEAT: &str = "ci-heartbeat";
    /// Unix time a server was parked; parked longer than `max_idle`, it is deleted.
    pub(crate) const IDLE_SINCE: &str = "ci-idle-since";

    pub(crate) const BUSY: &str = "busy";
    pub(crate) const IDLE: &str = "idle";
}

/// A server as the provider reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Server {
    pub(crate) id: String,
    pub(crate) name: String,
    /// The provider says it runs (Hetzner `running`, DigitalOcean `active`).
    pub(crate) running: bool,
    /// Public IPv4, once assigned.
    pub(crate) address: Option<String>,
    pub(crate) labels: Labels,
}

impl Server {
    pub(crate) fn label(&self, name: &str) -> Option<&str> {
        self.labels.get(name).map(String::as_str)
    }

    /// A Unix-time label, if present and numeric.
    pub(crate) fn time_label(&self, name: &str) -> Option<u64> {
        self.label(name)?.parse().ok()
    }
}

/// An ssh key the provider holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SshKey {
    pub(crate) id: String,
    pub(crate) name: String,
}

/// What ci-exec asks for when it creates a server.
#[derive(Debug, Clone)]
pub(crate) struct ServerRequest {
    pub(crate) name: String,
    /// Hetzner server type / DigitalOcean size slug.
    pub(crate) size: String,
    pub(crate) image: String,
    /// Hetzner location / DigitalOcean region.
    pub(crate) location: String,
    pub(crate) ssh_key: SshKey,
    pub(crate) labels: Labels,
    /// Free-form tags the user asked for (DigitalOcean `tags=`); Hetzner's go into `labels`.
    pub(crate) user_tags: Vec<String>,
}

/// A provider's API, as the pool and the driver use it.
#[async_trait]
pub(crate) trait Provider: Send + Sync + Debug {
    /// `hetzner`, `digitalocean`.
    fn driver(&self) -> &'static str;

    async fn create_key(&self, name: &str, public_key: &str) -> Result<SshKey, CloudError>;

    /// The keys whose names start with `prefix`.
    async fn keys(&self, prefix: &str) -> Result<Vec<SshKey>, CloudError>;

    /// Deletes a key; a missing one is fine.
    async fn delete_key(&self, key: &SshKey) -> Result<(), CloudError>;

    /// Creates a server; returns as soon as the provider accepted it.
    async fn create_server(&self, request: &ServerRequest) -> Result<Server, CloudError>;

    /// The server, or `None` once it is gone.
    async fn server(&self, id: &str) -> Result<Option<Server>, CloudError>;

    /// Every server carrying all of `labels` (`(name, value)`).
    async fn servers(&self, labels: &[(&str, &str)]) -> Result<Vec<Server>, CloudError>;

    /// Replaces the server's labels with `labels` (callers start from [`Server::labels`]).
    async fn set_labels(&self, server: &Server, labels: &Labels) -> Result<(), CloudError>;

    /// Deletes a server; a missing one is fine.
    async fn delete_server(&self, id: &str) -> Result<(), CloudError>;

    /// API requests sent so far.
    fn requests(&self) -> u64;
}
