//! The `k8s` driver: ci-exec tasks as Kubernetes Pods, volumes as PersistentVolumeClaims,
//! through kube-rs (`kube` + `k8s-openapi`, rustls with ring).
//!
//! A task is one bare Pod with `restartPolicy: Never`, not a batch/v1 Job: a Job with
//! `backoffLimit: 0` adds a controller between us and the pod (a second object to create,
//! watch and garbage-collect, and a pod name we learn only after the controller acts) and
//! gives nothing a task needs, since a task is never retried. GitLab Runner's kubernetes
//! executor makes the same choice.
//!
//! Every pod and PVC is named `{namespace}-{id}` (made a valid Kubernetes name) and labelled
//! `ci-exec.namespace=<namespace>`, so [`Driver::close`](ci_exec_driver::Driver::close)
//! deletes exactly the namespace's resources by label selector, running or not, which is also
//! how the leftovers of a killed run are removed.
//!
//! It is not a cluster installer, an image builder or a Job controller.

mod config;
mod container;
mod driver;
mod logs;
mod names;
mod pod;

pub use config::K8sConfig;
pub use container::K8sContainer;
pub use driver::{K8sDriver, K8sVolume};

/// Label every resource of a namespace carries.
pub const NAMESPACE_LABEL: &str = "ci-exec.namespace";
/// Label holding the task id (pods) or the volume name (PVCs), made a valid label value.
pub const ID_LABEL: &str = "ci-exec.id";
/// Label saying what a pod is for: `task` or `volume-reader`.
pub const ROLE_LABEL: &str = "ci-exec.role";
/// Annotation holding the task id or volume name exactly as given.
pub const ID_ANNOTATION: &str = "ci-exec.dev/id";
/// The name of the one container of a task's pod.
pub const CONTAINER: &str = "task";
