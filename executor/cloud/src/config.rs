use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use ci_exec_driver::DriverConfig;

use crate::CloudError;
use crate::api::Secret;

/// Which provider's VMs a [`CloudConfig`] asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProviderKind {
    Hetzner,
    DigitalOcean,
}

impl ProviderKind {
    pub fn driver_name(self) -> &'static str {
        match self {
            ProviderKind::Hetzner => "hetzner",
            ProviderKind::DigitalOcean => "digitalocean",
        }
    }

    /// The environment variable of the token, for the 401 message.
    pub(crate) fn token_env(self) -> &'static str {
        match self {
            ProviderKind::Hetzner => "HETZNER_TOKEN",
            ProviderKind::DigitalOcean => "DIGITALOCEAN_TOKEN",
        }
    }

    /// The name of the size parameter (`server_type` / `size`).
    pub(crate) fn size_parameter(self) -> &'static str {
        match self {
            ProviderKind::Hetzner => "server_type",
            ProviderKind::DigitalOcean => "size",
        }
    }
}

/// The worker pool: how many servers at once, and whether they outlive a run.
#[derive(Debug, Clone)]
pub struct PoolConfig {
    pub max_workers: u64,
    /// Park the server on close (label `ci-worker-status=idle`) instead of deleting it.
    pub reuse_worker: bool,
    pub poll_interval: Duration,
    /// Longest wait for a free slot; `None` waits for ever.
    pub wait_timeout: Option<Duration>,
    /// Parked servers idle longer than this are deleted; `None` keeps them.
    pub max_idle: Option<Duration>,
    /// How often a held server's heartbeat label is refreshed; a busy server whose heartbeat is
    /// older than five of these was left by a killed run, and any run of the provider deletes it.
    pub heartbeat: Duration,
    /// A claim of a parked server is confirmed by a re-read this long after writing it
    /// (see `pool.rs`).
    pub settle: Duration,
}

/// Everything a [`CloudDriver`](crate::CloudDriver) for Hetzner or DigitalOcean needs,
/// resolved. The token is a [`Secret`]: its `Debug` does not show it.
#[derive(Debug, Clone)]
pub struct CloudConfig {
    pub provider: ProviderKind,
    pub namespace: String,
    pub token: Secret,
    /// API base URL.
    pub endpoint: String,
    /// Server image (`docker-ce`, `docker-20-04`).
    pub image: String,
    /// Server type / droplet size, or `auto`.
    pub size: String,
    /// Location / region.
    pub location: String,
    pub disk_size_gb: u64,
    /// Hetzner labels (`key=value`) or DigitalOcean tags (`tag`).
    pub user_labels: Vec<String>,
    pub ssh_user: String,
    pub ssh_timeout: Duration,
    pub docker_timeout: Duration,
    pub pool: PoolConfig,
    /// The image of tasks that name none, on the server's Docker (the docker driver's
    /// `CI_EXEC_DOCKER_IMAGE`, else its default).
    pub container_image: String,
    /// Where a pool's private key is kept between runs (`reuse_worker=true`).
    pub state_dir: Option<PathBuf>,
}

impl CloudConfig {
    /// From a parsed `--driver=hetzner…` or `--driver=digitalocean…` DSN.
    pub fn from_driver_config(config: &DriverConfig) -> Result<Self, CloudError> {
        let provider = match config.driver.as_str() {
            "hetzner" => ProviderKind::Hetzner,
            "digitalocean" => ProviderKind::DigitalOcean,
            other => {
                return Err(CloudError::InvalidParameter {
                    driver: "hetzner",
                    parameter: "driver",
                    reason: format!("`{other}` is not a cloud VM driver"),
                });
            }
        };
        let driver = provider.driver_name();
        let text = |name: &str| config.str(name).unwrap_or_default().to_owned();
        let duration = |name: &str| config.duration(name).unwrap_or_default();
        let optional = |name: &str| config.duration(name).filter(|value| !value.is_zero());
        let (location, labels) = match provider {
            ProviderKind::Hetzner => ("location", "labels"),
            ProviderKind::DigitalOcean => ("region", "tags"),
        };
        let user_labels: Vec<String> = config
            .list(labels)
            .unwrap_or_default()
            .into_iter()
            .map(str::to_owned)
            .collect();
        if provider == ProviderKind::Hetzner
            && let Some(bad) = user_labels.iter().find(|label| !label.contains('='))
        {
            return Err(CloudError::InvalidParameter {
                driver,
                parameter: "labels",
                reason: format!("`{bad}` is not `key=value`"),
            });
        }
        if matches!(
            config.source("disk_size"),
            Some(ci_exec_driver::ParamSource::Dsn | ci_exec_driver::ParamSource::Env(_))
        ) {
            tracing::warn!(
                driver,
                "`disk_size` is not applied yet: Docker's data stays on the server's own disk"
            );
        }
        Ok(CloudConfig {
            provider,
            namespace: config.namespace.clone(),
            token: Secret::new(text("token")),
            endpoint: text("endpoint"),
            image: text("image"),
            size: text(provider.size_parameter()),
            location: text(location),
            disk_size_gb: config.u64("disk_size").unwrap_or_default(),
            user_labels,
            ssh_user: text("ssh_user"),
            ssh_timeout: duration("ssh_timeout"),
            docker_timeout: duration("docker_timeout"),
            pool: PoolConfig {
                max_workers: config.u64("max_workers").unwrap_or(1).max(1),
                reuse_worker: config.bool("reuse_worker").unwrap_or(false),
                poll_interval: duration("poll_interval").max(Duration::from_millis(10)),
                wait_timeout: optional("wait_timeout"),
                max_idle: optional("max_idle"),
                heartbeat: Duration::from_secs(60),
                settle: Duration::from_secs(2),
            },
            container_image: ci_exec_docker::DockerConfig::new(ci_exec_docker::Engine::Docker, "")
                .image,
            state_dir: ci_exec_driver::user_state_dir().map(|dir| dir.join("cloud")),
        })
    }

    /// The user's labels as a map (Hetzner), for the server's labels.
    pub(crate) fn user_label_map(&self) -> BTreeMap<String, String> {
        self.user_labels
            .iter()
            .filter_map(|label| label.split_once('='))
            .map(|(key, value)| (key.to_owned(), value.to_owned()))
            .collect()
    }
}
