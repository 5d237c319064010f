//! The `docker` and `podman` drivers: ci-exec tasks as containers on a Docker Engine, or on
//! podman's Docker-compatible API socket (`podman system service`), through `bollard`.
//!
//! Both engines share one code path ([`DockerDriver`]); the few places where podman differs
//! (its default socket, the ulimits rootful podman needs on hosts without `CAP_SYS_RESOURCE`)
//! are decided by [`Engine`] and by what the daemon reports about itself. Container
//! lifecycles go through the API (seed `004_…`: APIs for lifecycles, CLIs for image builds);
//! this crate never builds images and never shells out to a `docker` binary.
//!
//! Every container and volume is named `{namespace}-{id}` and labelled
//! `ci-exec.namespace=<namespace>`, so [`Driver::close`](ci_exec_driver::Driver::close)
//! removes exactly the namespace's resources, running or stopped.
//!
//! It is not an image builder, a registry client or a compose implementation.

mod config;
mod connect;
mod container;
mod driver;
mod error;
mod sandbox;
mod volume;

pub use config::{DEFAULT_IMAGE, DockerConfig, Engine};
pub use container::DockerContainer;
pub use driver::DockerDriver;
pub use error::{DockerError, EngineProblem};
pub use sandbox::DockerSandbox;
pub use volume::DockerVolume;

/// Label every resource of a namespace carries.
pub const NAMESPACE_LABEL: &str = "ci-exec.namespace";
/// Label holding the task id (containers) or the volume name (volumes).
pub const ID_LABEL: &str = "ci-exec.id";
/// Label saying what a container is for: `task`, `sandbox` or `volume-reader`.
pub const ROLE_LABEL: &str = "ci-exec.role";
