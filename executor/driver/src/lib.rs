//! The driver contract of ci-exec: what every backend (native processes, a QEMU guest, Docker,
//! Kubernetes, cloud VMs) must do to run a [`Task`], and the types that cross that seam.
//!
//! The contract follows the orchestra driver guide (seed `003_…`): every resource a driver makes
//! is named `{namespace}-{task.id}` and labelled with its namespace; [`Driver::run_container`]
//! is idempotent per task id and returns as soon as the task has started; a [`Container`]'s
//! status is pollable, its logs can be read after exit and more than once; cleanup and
//! [`Driver::close`] are idempotent, and `close` removes everything in the namespace (which is
//! also how a crashed run is recovered). Optional capabilities — following logs live, reading
//! files out of a volume, exec in a long-lived sandbox — are separate traits a driver may also
//! implement, discovered through the `as_*` accessors.
//!
//! It also holds the DSN (`--driver=`) parser and the registry of every driver with its
//! parameters, so every crate resolves a driver configuration the same way.
//!
//! This crate holds no backend. It does not spawn processes or talk to any daemon.

mod contract;
mod dsn;
mod error;
#[cfg(feature = "fake")]
pub mod fake;
pub mod leftovers;
mod registry;
mod task;

pub use contract::{
    Container, ContainerStatus, Driver, FollowLogs, JobSupport, LogSink, MkSource, RepositoryState,
    Sandbox, SandboxExec, SandboxOutput, Volume, VolumeFiles, volume_relative_path, wait_for_exit,
};
pub use dsn::{
    DriverConfig, DsnError, ParamSource, ParamValue, REDACTED, ResolvedParam, generate_namespace,
    is_generated_namespace, parse_duration, validate_namespace,
};
pub use error::{DriverError, ExitClass, error_chain};
pub use registry::{
    DriverSpec, ParamDefault, ParamKind, ParamSpec, driver_spec, drivers, user_cache_dir,
    user_state_dir,
};
pub use task::{Limits, Mount, Stdin, Task};

/// The name of a resource of task or volume `id` in `namespace`, as the contract requires.
pub fn resource_name(namespace: &str, id: &str) -> String {
    format!("{namespace}-{id}")
}
