use std::path::PathBuf;

use ci_exec_driver::{DriverConfig, ParamSource};

/// The image of tasks that name none, when the DSN and `CI_EXEC_K8S_IMAGE` do not say.
pub const DEFAULT_IMAGE: &str = "docker.io/library/debian:bookworm-slim";

/// What the `k8s` driver needs from its DSN.
#[derive(Debug, Clone)]
pub struct K8sConfig {
    /// The ci-exec namespace: every resource's name prefix and `ci-exec.namespace` label.
    pub namespace: String,
    /// The Kubernetes namespace the pods and PVCs live in.
    pub kube_namespace: String,
    /// The kubeconfig to read; `None` (or a default path that does not exist) means the
    /// in-cluster configuration.
    pub kubeconfig: Option<PathBuf>,
    /// Whether `kubeconfig` was asked for explicitly (a missing file is then an error).
    pub kubeconfig_given: bool,
    pub storage_class: Option<String>,
    /// The image of tasks that name none.
    pub image: String,
}

impl K8sConfig {
    /// From a parsed `--driver=k8s…` DSN. The Kubernetes namespace is `kube_namespace=`, else
    /// the DSN's namespace when one was given, else `default`.
    pub fn from_driver_config(config: &DriverConfig) -> K8sConfig {
        let text = |name: &str| config.str(name).filter(|value| !value.is_empty());
        let kube_namespace = match text("kube_namespace") {
            Some(namespace) => namespace.to_owned(),
            None if config.namespace_given => config.namespace.clone(),
            None => "default".to_owned(),
        };
        K8sConfig {
            namespace: config.namespace.clone(),
            kube_namespace,
            kubeconfig: text("kubeconfig").map(expand_home),
            kubeconfig_given: !matches!(
                config.source("kubeconfig"),
                Some(ParamSource::Default | ParamSource::Unset) | None
            ),
            storage_class: text("storage_class").map(str::to_owned),
            image: text("image").unwrap_or(DEFAULT_IMAGE).to_owned(),
        }
    }
}

fn expand_home(path: &str) -> PathBuf {
    match path.strip_prefix("~/") {
        Some(rest) => std::env::var_os("HOME")
            .map(|home| PathBuf::from(home).join(rest))
            .unwrap_or_else(|| PathBuf::from(path)),
        None => PathBuf::from(path),
    }
}
