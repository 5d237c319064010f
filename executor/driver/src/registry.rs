//! Every driver ci-exec knows, with the parameters its DSN accepts.
//!
//! A driver is listed here even before its implementation lands, so a DSN for it parses,
//! validates and resolves the same way everywhere (`ci-exec driver show`, `ci-exec drivers`).

use std::path::PathBuf;

/// One driver of the registry.
#[derive(Debug)]
pub struct DriverSpec {
    /// The name written in a DSN (`qemu`, `native`, …).
    pub name: &'static str,
    pub description: &'static str,
    /// Implemented in this version of ci-exec. A driver that is not is still listed (its DSN
    /// parses and resolves), and using it is a usage error that says so.
    pub available: bool,
    pub params: &'static [ParamSpec],
}

impl DriverSpec {
    /// The parameter called `name`, if this driver knows it.
    pub fn param(&self, name: &str) -> Option<&'static ParamSpec> {
        self.params.iter().find(|param| param.name == name)
    }
}

/// One parameter of a driver's DSN.
#[derive(Debug, Clone, Copy)]
pub struct ParamSpec {
    pub name: &'static str,
    pub kind: ParamKind,
    pub default: ParamDefault,
    /// The environment variable consulted when the DSN does not set the parameter.
    pub env: Option<&'static str>,
    /// Parsing fails when neither the DSN nor the environment variable sets it.
    pub required: bool,
    /// Never printed: `<redacted>` in JSON, logs and error messages.
    pub secret: bool,
    pub description: &'static str,
}

/// What values a parameter accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParamKind {
    /// Any non-empty text.
    String,
    /// A whole number, at least `min`.
    Integer { min: u64 },
    /// `true`/`false` (also `1`/`0`, `yes`/`no`, `on`/`off`).
    Bool,
    /// `300ms`, `10s`, `5m`, `1h30m`; a bare number counts as seconds; `0` means none.
    Duration,
    /// One of the listed words.
    Enum(&'static [&'static str]),
    /// Comma-separated values, kept as written (`prod,myapp`, `env=prod,app=x`).
    List,
}

impl ParamKind {
    /// The type as `ci-exec drivers` prints it.
    pub fn describe(&self) -> String {
        match self {
            ParamKind::String => "string".to_owned(),
            ParamKind::Integer { min: 0 } => "integer".to_owned(),
            ParamKind::Integer { min } => format!("integer >= {min}"),
            ParamKind::Bool => "bool".to_owned(),
            ParamKind::Duration => "duration".to_owned(),
            ParamKind::Enum(words) => words.join("|"),
            ParamKind::List => "list".to_owned(),
        }
    }
}

/// A parameter's value when neither the DSN nor the environment sets it.
#[derive(Debug, Clone, Copy)]
pub enum ParamDefault {
    /// No value: the driver decides (for example, the local daemon socket).
    None,
    Fixed(&'static str),
    /// Depends on the host (architecture, home directory).
    Computed(fn() -> Option<String>),
}

impl ParamDefault {
    pub fn value(&self) -> Option<String> {
        match self {
            ParamDefault::None => None,
            ParamDefault::Fixed(value) => Some((*value).to_owned()),
            ParamDefault::Computed(compute) => compute(),
        }
    }
}

/// Every driver ci-exec knows, in the order `ci-exec drivers` lists them.
pub fn drivers() -> &'static [DriverSpec] {
    DRIVERS
}

/// The driver called `name`, if it is registered.
pub fn driver_spec(name: &str) -> Option<&'static DriverSpec> {
    DRIVERS.iter().find(|driver| driver.name == name)
}

/// The user's cache directory for ci-exec: `$XDG_CACHE_HOME/ci-exec` or `~/.cache/ci-exec`.
pub fn user_cache_dir() -> Option<PathBuf> {
    xdg_dir("XDG_CACHE_HOME", ".cache")
}

/// The user's state directory for ci-exec: `$XDG_STATE_HOME/ci-exec` or `~/.local/state/ci-exec`.
pub fn user_state_dir() -> Option<PathBuf> {
    xdg_dir("XDG_STATE_HOME", ".local/state")
}

fn xdg_dir(variable: &str, fallback_under_home: &str) -> Option<PathBuf> {
    let base = std::env::var_os(variable)
        .map(PathBuf::from)
        .filter(|path| path.is_absolute())
        .or_else(|| {
            std::env::var_os("HOME")
                .map(PathBuf::from)
                .filter(|home| home.is_absolute())
                .map(|home| home.join(fallback_under_home))
        })?;
    Some(base.join("ci-exec"))
}

fn path_string(path: Option<PathBuf>) -> Option<String> {
    path.map(|path| path.to_string_lossy().into_owned())
}

fn qemu_cache_dir() -> Option<String> {
    path_string(user_cache_dir().map(|dir| dir.join("qemu")))
}

fn vz_cache_dir() -> Option<String> {
    path_string(user_cache_dir().map(|dir| dir.join("vz")))
}

fn native_state_dir() -> Option<String> {
    path_string(user_state_dir().map(|dir| dir.join("native")))
}

const fn param(name: &'static str, kind: ParamKind, description: &'static str) -> ParamSpec {
    ParamSpec {
        name,
        kind,
        default: ParamDefault::None,
        env: None,
        required: false,
        secret: false,
        description,
    }
}

impl ParamSpec {
    const fn default(mut self, value: &'static str) -> Self {
        self.default = ParamDefault::Fixed(value);
        self
    }

    const fn computed(mut self, compute: fn() -> Option<String>) -> Self {
        self.default = ParamDefault::Computed(compute);
        self
    }

    const fn env(mut self, variable: &'static str) -> Self {
        self.env = Some(variable);
        self
    }

    const fn required(mut self) -> Self {
        self.required = true;
        self
    }

    const fn secret(mut self) -> Self {
        self.secret = true;
        self
    }
}

use ParamKind::{Bool, Duration, Enum, Integer, List, String as Text};

const ACCEL: &[&str] = &["auto", "kvm", "hvf", "tcg"];

/// The worker-pool parameters DigitalOcean and Hetzner share, with their env prefix.
macro_rules! pool_params {
    ($prefix:literal, $machines:literal) => {
        [
            param(
                "max_workers",
                Integer { min: 1 },
                concat!("maximum concurrent ", $machines, " in the pool"),
            )
            .default("1")
            .env(concat!($prefix, "_MAX_WORKERS")),
            param(
                "reuse_worker",
                Bool,
                concat!("park ", $machines, " on close instead of deleting them"),
            )
            .default("false")
            .env(concat!($prefix, "_REUSE_WORKER")),
            param(
                "poll_interval",
                Duration,
                "how often to check for a free worker slot",
            )
            .default("10s")
            .env(concat!($prefix, "_POLL_INTERVAL")),
            param(
                "wait_timeout",
                Duration,
                "longest wait for a worker slot (0 = no limit)",
            )
            .default("10m")
            .env(concat!($prefix, "_WAIT_TIMEOUT")),
            param(
                "max_idle",
                Duration,
                concat!(
                    "parked ",
                    $machines,
                    " idle longer than this are deleted (0 = never)"
                ),
            )
            .default("30m")
            .env(concat!($prefix, "_MAX_IDLE")),
            param(
                "ssh_user",
                Text,
                concat!("user the driver logs in as on its ", $machines),
            )
            .default("root")
            .env(concat!($prefix, "_SSH_USER")),
        ]
    };
}

const DIGITALOCEAN_POOL: [ParamSpec; 6] = pool_params!("DIGITALOCEAN", "droplets");
const HETZNER_POOL: [ParamSpec; 6] = pool_params!("HETZNER", "servers");

/// The base image of the container drivers (docker, podman): what tasks that name no image run in.
const CONTAINER_BASE_IMAGE: ParamSpec = param(
    "image",
    Text,
    "image of tasks that name none (the job's base OS steps)",
)
.env("CI_EXEC_DOCKER_IMAGE")
.default("docker.io/library/debian:bookworm-slim");

static DRIVERS: &[DriverSpec] = &[
    DriverSpec {
        name: "k8s",
        description: "Kubernetes Pods and PVCs; the Kubernetes namespace is the DSN namespace \
                      (`k8s://NS` or `k8s:namespace=NS`), `default` when none is given, \
                      unless `kube_namespace=` names another",
        available: true,
        params: &[
            param("kubeconfig", Text, "path to the kubeconfig file (in-cluster config when it does not exist)")
                .env("KUBECONFIG")
                .default("~/.kube/config"),
            param(
                "kube_namespace",
                Text,
                "Kubernetes namespace of the pods and PVCs (they are labelled with the DSN namespace)",
            )
            .env("CI_EXEC_K8S_NAMESPACE"),
            param("storage_class", Text, "storage class of the volumes' PVCs; the cluster's default when unset")
                .env("CI_EXEC_K8S_STORAGE_CLASS"),
            param("image", Text, "image of tasks that name none (the job's base OS steps)")
                .env("CI_EXEC_K8S_IMAGE")
                .default("docker.io/library/debian:bookworm-slim"),
        ],
    },
    DriverSpec {
        name: "docker",
        description: "containers on a Docker Engine (local socket, tcp:// or ssh://)",
        available: true,
        params: &[
            param(
                "host",
                Text,
                "Docker daemon address; the local socket when unset",
            )
            .env("DOCKER_HOST"),
            CONTAINER_BASE_IMAGE,
        ],
    },
    DriverSpec {
        name: "podman",
        description: "containers on podman's Docker-compatible API socket",
        available: true,
        params: &[
            param(
                "host",
                Text,
                "podman API address; the local podman socket when unset",
            )
            .env("CONTAINER_HOST"),
            CONTAINER_BASE_IMAGE,
        ],
    },
    DriverSpec {
        name: "native",
        description: "host processes, no isolation: the fast path for trusted local runs",
        available: true,
        params: &[param(
            "state_dir",
            Text,
            "where namespaces keep their task and volume directories",
        )
        .computed(native_state_dir)
        .env("CI_EXEC_NATIVE_STATE_DIR")],
    },
    DriverSpec {
        name: "digitalocean",
        description: "an on-demand DigitalOcean droplet running Docker, reached over SSH",
        available: true,
        params: &[
            param("token", Text, "DigitalOcean API token")
                .env("DIGITALOCEAN_TOKEN")
                .required()
                .secret(),
            param("image", Text, "droplet image slug")
                .default("docker-20-04")
                .env("DIGITALOCEAN_IMAGE"),
            param(
                "size",
                Text,
                "droplet size slug, or `auto` to size from task limits",
            )
            .default("s-1vcpu-1gb")
            .env("DIGITALOCEAN_SIZE"),
            param("region", Text, "droplet region")
                .default("nyc3")
                .env("DIGITALOCEAN_REGION"),
            param(
                "disk_size",
                Integer { min: 1 },
                "disk size for Docker volumes, in GB",
            )
            .default("25")
            .env("DIGITALOCEAN_DISK_SIZE"),
            param("tags", List, "comma-separated custom tags").env("DIGITALOCEAN_TAGS"),
            DIGITALOCEAN_POOL[0],
            DIGITALOCEAN_POOL[1],
            DIGITALOCEAN_POOL[2],
            DIGITALOCEAN_POOL[3],
            DIGITALOCEAN_POOL[4],
            DIGITALOCEAN_POOL[5],
            param("ssh_timeout", Duration, "longest wait for SSH to answer")
                .default("5m")
                .env("DIGITALOCEAN_SSH_TIMEOUT"),
            param(
                "docker_timeout",
                Duration,
                "longest wait for Docker to answer",
            )
            .default("5m")
            .env("DIGITALOCEAN_DOCKER_TIMEOUT"),
            param("endpoint", Text, "API base URL (for tests and proxies)")
                .default("https://api.digitalocean.com")
                .env("DIGITALOCEAN_ENDPOINT"),
        ],
    },
    DriverSpec {
        name: "hetzner",
        description: "an on-demand Hetzner Cloud server running Docker, reached over SSH",
        available: true,
        params: &[
            param("token", Text, "Hetzner Cloud API token")
                .env("HETZNER_TOKEN")
                .required()
                .secret(),
            param("image", Text, "server image name")
                .default("docker-ce")
                .env("HETZNER_IMAGE"),
            param(
                "server_type",
                Text,
                "server type slug, or `auto` to size from task limits",
            )
            .default("cx23")
            .env("HETZNER_SERVER_TYPE"),
            param(
                "location",
                Text,
                "server location (fsn1, nbg1, hel1, ash, hil)",
            )
            .default("nbg1")
            .env("HETZNER_LOCATION"),
            param(
                "disk_size",
                Integer { min: 1 },
                "disk size for Docker volumes, in GB",
            )
            .default("10")
            .env("HETZNER_DISK_SIZE"),
            param("ssh_timeout", Duration, "longest wait for SSH to answer")
                .default("5m")
                .env("HETZNER_SSH_TIMEOUT"),
            param(
                "docker_timeout",
                Duration,
                "longest wait for Docker to answer",
            )
            .default("5m")
            .env("HETZNER_DOCKER_TIMEOUT"),
            param("labels", List, "comma-separated key=value labels").env("HETZNER_LABELS"),
            HETZNER_POOL[0],
            HETZNER_POOL[1],
            HETZNER_POOL[2],
            HETZNER_POOL[3],
            HETZNER_POOL[4],
            HETZNER_POOL[5],
            param("endpoint", Text, "API base URL (for tests and proxies)")
                .default("https://api.hetzner.cloud/v1")
                .env("HETZNER_ENDPOINT"),
        ],
    },
    DriverSpec {
        name: "fly",
        description: "Fly Machines on Fly.io, in an existing or an ephemeral app",
        available: true,
        params: &[
            param("token", Text, "Fly API token")
                .env("FLY_API_TOKEN")
                .required()
                .secret(),
            param(
                "app",
                Text,
                "existing Fly app; an ephemeral `ci-<namespace>` app when unset",
            )
            .env("FLY_APP"),
            param(
                "region",
                Text,
                "Fly region for machines; Fly's default when unset",
            )
            .env("FLY_REGION"),
            param("org", Text, "Fly organization slug")
                .default("personal")
                .env("FLY_ORG"),
            param("size", Text, "machine size preset").default("shared-cpu-1x"),
            param("endpoint", Text, "Machines API base URL (for tests and proxies)")
                .default("https://api.machines.dev/v1")
                .env("FLY_API_ENDPOINT"),
            param(
                "start_timeout",
                Duration,
                "longest wait for a machine to start; it is deleted after it",
            )
            .default("5m")
            .env("FLY_START_TIMEOUT"),
        ],
    },
    DriverSpec {
        name: "qemu",
        description: "a local QEMU virtual machine per job (KVM/HVF when usable, else TCG)",
        available: true,
        params: &[
            param("memory", Integer { min: 64 }, "VM memory in MB")
                .default("2048")
                .env("QEMU_MEMORY"),
            param("cpus", Integer { min: 1 }, "number of vCPUs")
                .default("2")
                .env("QEMU_CPUS"),
            param(
                "accel",
                Enum(ACCEL),
                "acceleration: `auto` probes KVM/HVF and falls back to TCG",
            )
            .default("auto")
            .env("QEMU_ACCEL"),
            param(
                "qemu_binary",
                Text,
                "QEMU system emulator to run (default: `qemu-system-<the image's architecture>`)",
            )
            .env("QEMU_BINARY"),
            param("cache_dir", Text, "directory for cached guest images")
                .computed(qemu_cache_dir)
                .env("QEMU_CACHE_DIR"),
            param(
                "image",
                Text,
                "guest base image: a qcow2 path or a catalog name",
            )
            .default("debian-bookworm")
            .env("QEMU_IMAGE"),
            param(
                "boot_timeout",
                Duration,
                "longest wait for the guest to boot",
            )
            .default("5m")
            .env("QEMU_BOOT_TIMEOUT"),
            param(
                "warm",
                Bool,
                "start from a saved VM state of the image when one exists (`false` boots cold)",
            )
            .default("true")
            .env("QEMU_WARM"),
            param(
                "network",
                Bool,
                "outbound network for the VM (QEMU user-mode NAT and DNS); tasks are offline unless they ask for it",
            )
            .default("true")
            .env("QEMU_NETWORK"),
        ],
    },
    DriverSpec {
        name: "vz",
        description: "a local VM on Apple's Virtualization.framework (macOS only): the qemu \
                      driver's guest, built for aarch64, over vsock and virtiofs",
        available: true,
        params: &[
            param("memory", Integer { min: 64 }, "VM memory in MB")
                .default("2048")
                .env("VZ_MEMORY"),
            param("cpus", Integer { min: 1 }, "number of vCPUs")
                .default("2")
                .env("VZ_CPUS"),
            param(
                "cache_dir",
                Text,
                "directory for raw root disks, warm VM states and run directories",
            )
            .computed(vz_cache_dir)
            .env("VZ_CACHE_DIR"),
            param(
                "image",
                Text,
                "guest base image (aarch64): a catalog name or a built image's directory",
            )
            .default("debian-bookworm-arm64")
            .env("VZ_IMAGE"),
            param(
                "boot_timeout",
                Duration,
                "longest wait for the guest to boot",
            )
            .default("5m")
            .env("VZ_BOOT_TIMEOUT"),
            param(
                "warm",
                Bool,
                "start from a saved VM state when one exists (macOS 14+; `false` boots cold)",
            )
            .default("true")
            .env("VZ_WARM"),
            param(
                "network",
                Bool,
                "outbound network for the VM (the framework's NAT); tasks are offline unless they ask for it",
            )
            .default("true")
            .env("VZ_NETWORK"),
        ],
    },
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_parameters_are_unique_per_driver() {
        let mut names: Vec<_> = drivers().iter().map(|driver| driver.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), drivers().len());
        for driver in drivers() {
            let mut params: Vec<_> = driver.params.iter().map(|param| param.name).collect();
            params.sort_unstable();
            params.dedup();
            assert_eq!(
                params.len(),
                driver.params.len(),
                "driver `{}`",
                driver.name
            );
            assert!(
                driver.param("namespace").is_none(),
                "`namespace` is the DSN's own key"
            );
        }
    }

    #[test]
    fn seed_drivers_and_podman_are_registered() {
        for name in [
            "k8s",
            "docker",
            "podman",
            "native",
            "digitalocean",
            "hetzner",
            "fly",
            "qemu",
            "vz",
        ] {
            assert!(driver_spec(name).is_some(), "driver `{name}` missing");
        }
    }

    #[test]
    fn fixed_defaults_are_valid_values_of_their_kind() {
        for driver in drivers() {
            for param in driver.params {
                if let Some(value) = param.default.value() {
                    crate::dsn::parse_value(param, &value).unwrap_or_else(|expected| {
                        panic!(
                            "default `{value}` of `{}.{}` is not {expected}",
                            driver.name, param.name
                        )
                    });
                }
            }
        }
    }
}
