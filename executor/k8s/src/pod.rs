//! A task as a Pod object, and what a Pod's status says about the task: sans-IO, so both are
//! tested without a cluster.

use std::collections::BTreeMap;

use ci_exec_driver::{ContainerStatus, DriverError, Task};
use k8s_openapi::api::core::v1::{
    Container, ContainerStateTerminated, EnvVar, PersistentVolumeClaimVolumeSource, Pod, PodSpec,
    ResourceRequirements, SecurityContext, Volume as PodVolume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use crate::names::kube_name;
use crate::{CONTAINER, ID_ANNOTATION, ID_LABEL, NAMESPACE_LABEL, ROLE_LABEL};

/// Label on a task that must not reach the network; the driver's deny-all NetworkPolicy
/// selects it.
pub const NETWORK_LABEL: &str = "ci-exec.network";

/// The `PATH` a task gets when its env sets none, as the other container drivers give it.
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The labels every resource of `namespace` with id `id` and role `role` carries.
pub fn labels(namespace: &str, id: &str, role: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (NAMESPACE_LABEL.to_owned(), namespace.to_owned()),
        (ID_LABEL.to_owned(), kube_name(id)),
        (ROLE_LABEL.to_owned(), role.to_owned()),
    ])
}

/// The pod that runs `task`, named `name`, with the PVC of each mount named by `claim`.
pub fn task_pod(
    name: &str,
    namespace: &str,
    role: &str,
    image: &str,
    task: &Task,
    claim: &dyn Fn(&str) -> String,
) -> Result<Pod, DriverError> {
    let mut labels = labels(namespace, &task.id, role);
    if task.network == Some(false) {
        labels.insert(NETWORK_LABEL.to_owned(), "none".to_owned());
    }
    let mut env: Vec<EnvVar> = task
        .env
        .iter()
        .map(|(name, value)| EnvVar {
            name: name.clone(),
            value: Some(value.clone()),
            ..EnvVar::default()
        })
        .collect();
    if !task.env.contains_key("PATH") {
        env.push(EnvVar {
            name: "PATH".to_owned(),
            value: Some(DEFAULT_PATH.to_owned()),
            ..EnvVar::default()
        });
    }
    let (run_as_user, run_as_group) = match &task.user {
        None => (None, None),
        Some(user) => numeric_user(&task.id, user)?,
    };
    let security_context = (run_as_user.is_some() || task.privileged).then(|| SecurityContext {
        run_as_user,
        run_as_group,
        privileged: task.privileged.then_some(true),
        ..SecurityContext::default()
    });
    let mut limits = BTreeMap::new();
    let mut requests = BTreeMap::new();
    if task.limits.memory_bytes > 0 {
        let memory = Quantity(task.limits.memory_bytes.to_string());
        limits.insert("memory".to_owned(), memory.clone());
        requests.insert("memory".to_owned(), memory);
    }
    if task.limits.cpu_shares > 0 {
        // Docker's shares are a relative weight, as Kubernetes' CPU request is (1024 shares =
        // one CPU = 1000m); a share weight is no ceiling, so it sets no CPU limit.
        let millis = (task.limits.cpu_shares * 1000 / 1024).max(1);
        requests.insert("cpu".to_owned(), Quantity(format!("{millis}m")));
    }
    let resources = (!limits.is_empty() || !requests.is_empty()).then(|| ResourceRequirements {
        limits: (!limits.is_empty()).then_some(limits),
        requests: (!requests.is_empty()).then_some(requests),
        ..ResourceRequirements::default()
    });
    let mut volumes = Vec::new();
    let mut mounts = Vec::new();
    for (index, mount) in task.mounts.iter().enumerate() {
        let volume = format!("volume-{index}");
        volumes.push(PodVolume {
            name: volume.clone(),
            persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                claim_name: claim(&mount.volume),
                read_only: None,
            }),
            ..PodVolume::default()
        });
        mounts.push(VolumeMount {
            name: volume,
            mount_path: mount.path.clone(),
            ..VolumeMount::default()
        });
    }
    let stdin = task.stdin.is_some();
    Ok(Pod {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            labels: Some(labels),
            annotations: Some(BTreeMap::from([(
                ID_ANNOTATION.to_owned(),
                task.id.clone(),
            )])),
            ..ObjectMeta::default()
        },
        spec: Some(PodSpec {
            restart_policy: Some("Never".to_owned()),
            // A task's own deadline is the caller's; deleting a pod should not wait 30 s.
            termination_grace_period_seconds: Some(0),
            automount_service_account_token: Some(false),
            enable_service_links: Some(false),
            containers: vec![Container {
                name: CONTAINER.to_owned(),
                image: Some(image.to_owned()),
                command: Some(task.command.clone()),
                env: Some(env),
                working_dir: task.workdir.clone(),
                stdin: stdin.then_some(true),
                stdin_once: stdin.then_some(true),
                security_context,
                resources,
                volume_mounts: (!mounts.is_empty()).then_some(mounts),
                ..Container::default()
            }],
            volumes: (!volumes.is_empty()).then_some(volumes),
            ..PodSpec::default()
        }),
        status: None,
    })
}

/// `uid` or `uid:gid`: Kubernetes runs a container as numbers, never a user name.
fn numeric_user(task: &str, user: &str) -> Result<(Option<i64>, Option<i64>), DriverError> {
    let invalid = || DriverError::InvalidTask {
        task: task.to_owned(),
        reason: format!(
            "user `{user}` is not numeric: the `k8s` driver runs tasks as `UID` or `UID:GID`"
        ),
    };
    let (uid, gid) = match user.split_once(':') {
        Some((uid, gid)) => (uid, Some(gid)),
        None => (user, None),
    };
    let uid = uid.parse::<i64>().map_err(|_| invalid())?;
    let gid = gid
        .map(|gid| gid.parse::<i64>().map_err(|_| invalid()))
        .transpose()?;
    Ok((Some(uid), gid))
}

/// What a pod's status says about its task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PodState {
    /// Not started yet (scheduling, pulling the image, creating the container).
    Pending,
    Running,
    Exited(i32),
    /// The task can never run or finish (image pull failure, eviction, lost node).
    Failed {
        reason: String,
        message: String,
    },
}

impl PodState {
    pub fn of(pod: &Pod) -> PodState {
        let Some(status) = &pod.status else {
            return PodState::Pending;
        };
        let container = status
            .container_statuses
            .iter()
            .flatten()
            .find(|container| container.name == CONTAINER);
        let state = container.and_then(|container| container.state.as_ref());
        if let Some(terminated) = state.and_then(|state| state.terminated.as_ref()) {
            return PodState::Exited(exit_code(terminated));
        }
        let pod_reason = status.reason.clone().unwrap_or_default();
        let pod_message = status.message.clone().unwrap_or_default();
        if matches!(pod_reason.as_str(), "Evicted" | "NodeLost")
            || status.phase.as_deref() == Some("Unknown")
        {
            let reason = if pod_reason.is_empty() {
                "NodeLost".to_owned()
            } else {
                pod_reason
            };
            return PodState::Failed {
                reason,
                message: pod_message,
            };
        }
        if let Some(waiting) = state.and_then(|state| state.waiting.as_ref()) {
            let reason = waiting.reason.clone().unwrap_or_default();
            if matches!(
                reason.as_str(),
                "ErrImagePull"
                    | "ImagePullBackOff"
                    | "InvalidImageName"
                    | "ErrImageNeverPull"
                    // The runtime refused the container (a privileged one on a host that
                    // cannot grant it, a bad config): kubelet retries, but it never starts.
                    | "CreateContainerError"
                    | "CreateContainerConfigError"
                    | "RunContainerError"
            ) {
                return PodState::Failed {
                    reason,
                    message: waiting.message.clone().unwrap_or_default(),
                };
            }
        }
        if state.is_some_and(|state| state.running.is_some()) {
            return PodState::Running;
        }
        match status.phase.as_deref() {
            // A failed pod whose container never ran.
            Some("Failed") => PodState::Failed {
                reason: if pod_reason.is_empty() {
                    "Failed".to_owned()
                } else {
                    pod_reason
                },
                message: pod_message,
            },
            _ => PodState::Pending,
        }
    }

    pub fn container_status(&self) -> Option<ContainerStatus> {
        match self {
            PodState::Pending | PodState::Running => Some(ContainerStatus::Running),
            PodState::Exited(code) => Some(ContainerStatus::Exited { code: *code }),
            PodState::Failed { .. } => None,
        }
    }
}

/// The task's exit code. A container that could not start reports 128 with the runtime's
/// reason; a missing program is 127 and one that cannot run 126, as a shell reports them.
fn exit_code(terminated: &ContainerStateTerminated) -> i32 {
    let reason = terminated.reason.as_deref().unwrap_or_default();
    if matches!(reason, "StartError" | "ContainerCannotRun") {
        let message = terminated
            .message
            .as_deref()
            .unwrap_or_default()
            .to_ascii_lowercase();
        if message.contains("not found") || message.contains("no such file") {
            return 127;
        }
        if message.contains("permission denied") || message.contains("exec format") {
            return 126;
        }
    }
    terminated.exit_code
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{
        ContainerState, ContainerStateRunning, ContainerStateWaiting, ContainerStatus as Status,
        PodStatus,
    };

    fn pod(phase: &str, reason: Option<&str>, state: ContainerState) -> Pod {
        Pod {
            status: Some(PodStatus {
                phase: Some(phase.to_owned()),
                reason: reason.map(str::to_owned),
                container_statuses: Some(vec![Status {
                    name: CONTAINER.to_owned(),
                    state: Some(state),
                    ..Status::default()
                }]),
                ..PodStatus::default()
            }),
            ..Pod::default()
        }
    }

    fn terminated(code: i32, reason: &str, message: &str) -> ContainerState {
        ContainerState {
            terminated: Some(ContainerStateTerminated {
                exit_code: code,
                reason: Some(reason.to_owned()),
                message: Some(message.to_owned()),
                ..ContainerStateTerminated::default()
            }),
            ..ContainerState::default()
        }
    }

    #[test]
    fn pod_states_from_statuses() {
        let waiting = |reason: &str| ContainerState {
            waiting: Some(ContainerStateWaiting {
                reason: Some(reason.to_owned()),
                message: Some("m".to_owned()),
            }),
            ..ContainerState::default()
        };
        let running = ContainerState {
            running: Some(ContainerStateRunning::default()),
            ..ContainerState::default()
        };
        let cases = [
            (
                pod("Pending", None, waiting("ContainerCreating")),
                PodState::Pending,
            ),
            (pod("Running", None, running.clone()), PodState::Running),
            (
                pod("Failed", None, terminated(42, "Error", "")),
                PodState::Exited(42),
            ),
            (
                pod(
                    "Failed",
                    None,
                    terminated(
                        128,
                        "StartError",
                        "exec: \"nope\": executable file not found in $PATH",
                    ),
                ),
                PodState::Exited(127),
            ),
            (
                pod(
                    "Failed",
                    None,
                    terminated(128, "StartError", "exec: \"/x\": permission denied"),
                ),
                PodState::Exited(126),
            ),
            (
                pod("Pending", None, waiting("ImagePullBackOff")),
                PodState::Failed {
                    reason: "ImagePullBackOff".into(),
                    message: "m".into(),
                },
            ),
            (
                pod("Failed", Some("Evicted"), running.clone()),
                PodState::Failed {
                    reason: "Evicted".into(),
                    message: String::new(),
                },
            ),
            (
                pod("Unknown", None, running),
                PodState::Failed {
                    reason: "NodeLost".into(),
                    message: String::new(),
                },
            ),
        ];
        for (pod, want) in cases {
            assert_eq!(PodState::of(&pod), want);
        }
    }

    #[test]
    fn users_are_numeric() {
        assert_eq!(numeric_user("t", "1000").unwrap(), (Some(1000), None));
        assert_eq!(numeric_user("t", "1:2").unwrap(), (Some(1), Some(2)));
        assert!(numeric_user("t", "nobody").is_err());
    }
}
