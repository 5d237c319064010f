//! Pods as containers on the Docker engine: a pod's spec becomes a ci-exec `Task` for the
//! `docker` driver, and the container's life is written back into the pod's status.

use std::collections::BTreeMap;

use ci_exec_driver::{DriverError, Limits, Mount, Stdin, Task};
use k8s_openapi::api::core::v1::{
    ContainerState, ContainerStateRunning, ContainerStateTerminated, ContainerStateWaiting,
    ContainerStatus, Pod, PodStatus,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use tokio::io::DuplexStream;

/// The engine-side task of a pod, with the write end of its stdin when it takes stdin.
pub fn task_of(
    namespace: &str,
    pod: &Pod,
    offline: bool,
) -> Result<(Task, Option<DuplexStream>), String> {
    let name = pod.metadata.name.clone().unwrap_or_default();
    let spec = pod.spec.as_ref().ok_or("pod has no spec")?;
    let container = spec.containers.first().ok_or("pod has no container")?;
    let mut command: Vec<String> = container.command.clone().unwrap_or_default();
    command.extend(container.args.clone().unwrap_or_default());
    if command.is_empty() {
        return Err("the fake needs `command` (it does not read the image's entrypoint)".into());
    }
    let mut task = Task::new(engine_name(namespace, &name), command);
    task.image = container.image.clone().unwrap_or_default();
    task.env = container
        .env
        .iter()
        .flatten()
        .map(|var| (var.name.clone(), var.value.clone().unwrap_or_default()))
        .collect::<BTreeMap<_, _>>();
    task.workdir = container.working_dir.clone();
    let claims: BTreeMap<String, String> = spec
        .volumes
        .iter()
        .flatten()
        .filter_map(|volume| {
            let claim = volume.persistent_volume_claim.as_ref()?;
            Some((volume.name.clone(), claim.claim_name.clone()))
        })
        .collect();
    for mount in container.volume_mounts.iter().flatten() {
        let claim = claims
            .get(&mount.name)
            .ok_or_else(|| format!("volume `{}` is not a PVC", mount.name))?;
        task.mounts.push(Mount {
            volume: engine_name(namespace, claim),
            path: mount.mount_path.clone(),
        });
    }
    if let Some(security) = &container.security_context {
        task.privileged = security.privileged.unwrap_or(false);
        task.user = match (security.run_as_user, security.run_as_group) {
            (Some(uid), Some(gid)) => Some(format!("{uid}:{gid}")),
            (Some(uid), None) => Some(uid.to_string()),
            _ => None,
        };
    }
    if let Some(resources) = &container.resources {
        let memory = resources
            .limits
            .as_ref()
            .and_then(|limits| limits.get("memory"))
            .map(|quantity| parse_quantity(&quantity.0))
            .transpose()?
            .unwrap_or(0.0);
        let cpu = resources
            .requests
            .as_ref()
            .and_then(|requests| requests.get("cpu"))
            .map(|quantity| parse_quantity(&quantity.0))
            .transpose()?
            .unwrap_or(0.0);
        task.limits = Limits {
            memory_bytes: memory as u64,
            cpu_shares: (cpu * 1024.0).round() as u64,
        };
    }
    if offline {
        task.network = Some(false);
    }
    let mut stdin_writer = None;
    if container.stdin == Some(true) {
        let (writer, reader) = tokio::io::duplex(64 * 1024);
        task.stdin = Some(Stdin::stream(reader));
        stdin_writer = Some(writer);
    }
    Ok((task, stdin_writer))
}

/// The engine's name of a pod or claim: unique across Kubernetes namespaces.
pub fn engine_name(namespace: &str, name: &str) -> String {
    format!("{namespace}.{name}")
}

/// A Kubernetes quantity (`512Mi`, `250m`, `1.5`, `1e3`) as a number.
pub fn parse_quantity(text: &str) -> Result<f64, String> {
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '+' || c == '-'))
        .unwrap_or(text.len());
    let (number, suffix) = text.split_at(split);
    let number: f64 = number
        .parse()
        .map_err(|_| format!("quantity `{text}` is not a number"))?;
    let factor = match suffix {
        "" => 1.0,
        "m" => 1e-3,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "Ki" => 1024.0,
        "Mi" => 1024.0 * 1024.0,
        "Gi" => 1024.0 * 1024.0 * 1024.0,
        "Ti" => 1024.0_f64.powi(4),
        exponent if exponent.starts_with(['e', 'E']) => 10f64.powi(
            exponent[1..]
                .parse()
                .map_err(|_| format!("quantity `{text}` has a bad exponent"))?,
        ),
        _ => return Err(format!("quantity `{text}` has an unknown suffix")),
    };
    Ok(number * factor)
}

/// Now, to the second (jiff's `Timestamp::now` needs a feature k8s-openapi does not turn on).
pub fn now() -> Time {
    let seconds = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs());
    Time(
        k8s_openapi::jiff::Timestamp::from_second(i64::try_from(seconds).unwrap_or(0))
            .unwrap_or(k8s_openapi::jiff::Timestamp::UNIX_EPOCH),
    )
}

fn status_with(phase: &str, state: ContainerState, ready: bool, image: &str) -> PodStatus {
    PodStatus {
        phase: Some(phase.to_owned()),
        host_ip: Some("127.0.0.1".to_owned()),
        start_time: Some(now()),
        container_statuses: Some(vec![ContainerStatus {
            name: "task".to_owned(),
            image: image.to_owned(),
            image_id: String::new(),
            ready,
            restart_count: 0,
            started: Some(ready),
            state: Some(state),
            ..ContainerStatus::default()
        }]),
        ..PodStatus::default()
    }
}

pub fn pending(image: &str, reason: &str, message: Option<String>) -> PodStatus {
    status_with(
        "Pending",
        ContainerState {
            waiting: Some(ContainerStateWaiting {
                reason: Some(reason.to_owned()),
                message,
            }),
            ..ContainerState::default()
        },
        false,
        image,
    )
}

pub fn running(image: &str) -> PodStatus {
    status_with(
        "Running",
        ContainerState {
            running: Some(ContainerStateRunning {
                started_at: Some(now()),
            }),
            ..ContainerState::default()
        },
        true,
        image,
    )
}

pub fn terminated(image: &str, code: i32, reason: &str, message: Option<String>) -> PodStatus {
    status_with(
        if code == 0 { "Succeeded" } else { "Failed" },
        ContainerState {
            terminated: Some(ContainerStateTerminated {
                exit_code: code,
                reason: Some(reason.to_owned()),
                message,
                finished_at: Some(now()),
                ..ContainerStateTerminated::default()
            }),
            ..ContainerState::default()
        },
        false,
        image,
    )
}

/// The status a container runtime reports when the engine could not start the task.
pub fn start_failure(image: &str, error: &DriverError) -> PodStatus {
    match error {
        DriverError::ImageNotFound { image, .. } => pending(
            image,
            "ErrImagePull",
            Some(format!("failed to pull image \"{image}\": not found")),
        ),
        DriverError::ProgramNotFound { program, .. } => terminated(
            image,
            128,
            "StartError",
            Some(format!(
                "failed to create containerd task: exec: \"{program}\": executable file not found in $PATH"
            )),
        ),
        DriverError::CannotInvoke { program, .. } => terminated(
            image,
            128,
            "StartError",
            Some(format!("exec: \"{program}\": permission denied")),
        ),
        other => pending(image, "CreateContainerError", Some(other.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::parse_quantity;

    #[test]
    fn quantities() {
        for (text, want) in [
            ("33554432", 33554432.0),
            ("32Mi", 33554432.0),
            ("500m", 0.5),
            ("1.5", 1.5),
            ("1e3", 1000.0),
            ("2k", 2000.0),
        ] {
            assert_eq!(parse_quantity(text).unwrap(), want, "{text}");
        }
        assert!(parse_quantity("12parsecs").is_err());
    }
}
