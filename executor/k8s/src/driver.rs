use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use async_trait::async_trait;
use ci_exec_driver::{
    Container, Driver, DriverError, JobSupport, MkSource, Task, Volume, VolumeFiles, resource_name,
};
use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{
    PersistentVolumeClaim, PersistentVolumeClaimSpec, Pod, VolumeResourceRequirements,
};
use k8s_openapi::api::networking::v1::{NetworkPolicy, NetworkPolicySpec};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use kube::api::{Api, AttachParams, DeleteParams, ListParams, PostParams, WatchEvent, WatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use tokio::io::AsyncWriteExt;
use tokio::sync::Notify;
use tokio_util::compat::FuturesAsyncReadCompatExt;

use crate::container::K8sContainer;
use crate::logs::{self, Stream};
use crate::names::kube_name;
use crate::pod::{NETWORK_LABEL, PodState, labels, task_pod};
use crate::{CONTAINER, ID_ANNOTATION, K8sConfig, NAMESPACE_LABEL};

const DRIVER: &str = "k8s";

/// A PVC's size when `create_volume` gives none.
const DEFAULT_VOLUME_BYTES: u64 = 1024 * 1024 * 1024;

/// Where a volume reader pod mounts the volume it reads.
const READER_MOUNT: &str = "/volume";
/// The exit code of a volume reader that found no such file.
const READER_NO_FILE: i32 = 44;

/// The `k8s` driver: tasks as Pods in one Kubernetes namespace.
#[derive(Debug, Clone)]
pub struct K8sDriver {
    inner: Arc<Inner>,
}

pub(crate) struct Inner {
    config: K8sConfig,
    client: kube::Client,
    pods: Api<Pod>,
    claims: Api<PersistentVolumeClaim>,
    policies: Api<NetworkPolicy>,
    /// The deny-all NetworkPolicy of offline tasks exists (made once per driver).
    offline_policy: AtomicBool,
    readers: AtomicU64,
    /// The namespace's pods as one watch reports them; trusted only while `watching`.
    states: Mutex<HashMap<String, PodState>>,
    /// Pods this driver deleted whose `DELETED` event may not have arrived: a late
    /// `MODIFIED` must not bring them back to life in `states`.
    deleted: Mutex<std::collections::HashSet<String>>,
    watching: AtomicBool,
    /// Woken on every change the watch reports.
    changed: Notify,
    watcher: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Ok(mut watcher) = self.watcher.lock()
            && let Some(watcher) = watcher.take()
        {
            watcher.abort();
        }
    }
}

impl std::fmt::Debug for Inner {
    // The client holds the kubeconfig's credentials: never print it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inner")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// Why the API server or a pod failed, as one line.
#[derive(Debug, thiserror::Error)]
enum Problem {
    #[error("Kubernetes namespace `{0}` does not exist")]
    NamespaceMissing(String),
    #[error("the API server rejected the credentials (401 Unauthorized)")]
    Unauthorized,
    #[error("forbidden (403): {0}")]
    Forbidden(String),
    #[error("{reason} ({code}): {message}")]
    Api {
        code: u16,
        reason: String,
        message: String,
    },
    #[error("API server unreachable: {0}")]
    Unreachable(String),
    #[error("{0}")]
    Client(String),
    #[error("{reason}{message}")]
    Pod { reason: String, message: String },
    #[error("cannot read kubeconfig `{path}`: {reason}")]
    Kubeconfig { path: String, reason: String },
}

impl K8sDriver {
    /// Reads the kubeconfig (or the in-cluster configuration) and makes the client; the first
    /// request goes out with the first task.
    pub async fn connect(config: K8sConfig) -> Result<K8sDriver, DriverError> {
        let kube_config = match &config.kubeconfig {
            Some(path) if config.kubeconfig_given || path.exists() => {
                let text = path.display().to_string();
                let kubeconfig = read_kubeconfigs(&text)?;
                kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
                    .await
                    .map_err(|error| {
                        DriverError::backend(
                            DRIVER,
                            "load the kubeconfig",
                            Problem::Kubeconfig {
                                path: text,
                                reason: error.to_string(),
                            },
                        )
                    })?
            }
            _ => kube::Config::incluster().map_err(|error| {
                DriverError::backend(
                    DRIVER,
                    "find a cluster (no kubeconfig, not in a cluster)",
                    Problem::Client(error.to_string()),
                )
            })?,
        };
        let client = kube::Client::try_from(kube_config).map_err(|error| {
            DriverError::backend(
                DRIVER,
                "make the Kubernetes client",
                Problem::Client(error.to_string()),
            )
        })?;
        Ok(K8sDriver::with_client(config, client))
    }

    /// The driver on an existing client.
    pub fn with_client(config: K8sConfig, client: kube::Client) -> K8sDriver {
        let namespace = config.kube_namespace.clone();
        K8sDriver {
            inner: Arc::new(Inner {
                pods: Api::namespaced(client.clone(), &namespace),
                claims: Api::namespaced(client.clone(), &namespace),
                policies: Api::namespaced(client.clone(), &namespace),
                client,
                config,
                offline_policy: AtomicBool::new(false),
                readers: AtomicU64::new(0),
                states: Mutex::new(HashMap::new()),
                deleted: Mutex::new(std::collections::HashSet::new()),
                watching: AtomicBool::new(false),
                changed: Notify::new(),
                watcher: Mutex::new(None),
            }),
        }
    }

    pub fn config(&self) -> &K8sConfig {
        &self.inner.config
    }
}

/// `KUBECONFIG` may list several files, as kubectl merges them.
fn read_kubeconfigs(paths: &str) -> Result<Kubeconfig, DriverError> {
    let mut merged: Option<Kubeconfig> = None;
    for path in paths.split(':').filter(|path| !path.is_empty()) {
        let kubeconfig = Kubeconfig::read_from(path).map_err(|error| {
            DriverError::backend(
                DRIVER,
                "load the kubeconfig",
                Problem::Kubeconfig {
                    path: path.to_owned(),
                    reason: error.to_string(),
                },
            )
        })?;
        merged = Some(match merged {
            None => kubeconfig,
            Some(first) => first.merge(kubeconfig).map_err(|error| {
                DriverError::backend(
                    DRIVER,
                    "merge the kubeconfigs",
                    Problem::Kubeconfig {
                        path: path.to_owned(),
                        reason: error.to_string(),
                    },
                )
            })?,
        });
    }
    merged.ok_or_else(|| {
        DriverError::backend(
            DRIVER,
            "load the kubeconfig",
            Problem::Kubeconfig {
                path: paths.to_owned(),
                reason: "no file named".to_owned(),
            },
        )
    })
}

/// The one-line reason of a kube client error. Never includes request headers, so a token
/// never reaches a message.
fn problem(namespace: &str, error: kube::Error) -> Problem {
    match error {
        kube::Error::Api(status) => {
            let code = status.code;
            let not_found_namespace = code == 404
                && (status.details.as_ref().map(|d| d.kind.as_str()) == Some("namespaces")
                    || status
                        .message
                        .contains(&format!("namespaces \"{namespace}\" not found")));
            match code {
                _ if not_found_namespace => Problem::NamespaceMissing(namespace.to_owned()),
                401 => Problem::Unauthorized,
                403 => Problem::Forbidden(status.message),
                _ => Problem::Api {
                    code,
                    reason: status.reason,
                    message: status.message,
                },
            }
        }
        kube::Error::HyperError(error) => Problem::Unreachable(error.to_string()),
        kube::Error::Service(error) => Problem::Unreachable(source_chain(&*error)),
        other => Problem::Client(other.to_string()),
    }
}

fn source_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

fn status_code(error: &kube::Error) -> Option<u16> {
    match error {
        kube::Error::Api(status) => Some(status.code),
        _ => None,
    }
}

impl Inner {
    fn namespace(&self) -> &str {
        &self.config.namespace
    }

    fn error(&self, action: String, error: kube::Error) -> DriverError {
        DriverError::backend(DRIVER, action, problem(&self.config.kube_namespace, error))
    }

    fn selector(&self) -> String {
        format!("{NAMESPACE_LABEL}={}", self.namespace())
    }

    pub(crate) fn pod_failed(&self, pod: &str, reason: &str, message: &str) -> DriverError {
        DriverError::backend(
            DRIVER,
            format!("run pod `{pod}`"),
            Problem::Pod {
                reason: reason.to_owned(),
                message: if message.is_empty() {
                    String::new()
                } else {
                    format!(": {message}")
                },
            },
        )
    }

    pub(crate) async fn pod_state(&self, pod: &str) -> Result<PodState, DriverError> {
        if self.watching.load(Ordering::Acquire)
            && let Ok(states) = self.states.lock()
            && let Some(state) = states.get(pod)
        {
            return Ok(state.clone());
        }
        let found = self
            .pods
            .get(pod)
            .await
            .map_err(|error| self.error(format!("get pod `{pod}`"), error))?;
        Ok(PodState::of(&found))
    }

    /// Forgets what the watch said of `pods` (they are being deleted).
    fn forget(&self, pods: impl IntoIterator<Item = String>) {
        if let (Ok(mut states), Ok(mut deleted)) = (self.states.lock(), self.deleted.lock()) {
            for pod in pods {
                states.remove(&pod);
                deleted.insert(pod);
            }
        }
    }

    pub(crate) async fn delete_pod(&self, pod: &str) -> Result<(), DriverError> {
        self.forget([pod.to_owned()]);
        match self
            .pods
            .delete(pod, &DeleteParams::default().grace_period(0))
            .await
        {
            Ok(_) => Ok(()),
            Err(error) if status_code(&error) == Some(404) => Ok(()),
            Err(error) => Err(self.error(format!("delete pod `{pod}`"), error)),
        }
    }

    /// One stream of the task container's log, from byte `written` on (see [`logs`]).
    pub(crate) async fn read_log(
        &self,
        pod: &str,
        stream: Stream,
        follow: bool,
        written: &mut u64,
        sink: ci_exec_driver::LogSink<'_>,
    ) -> Result<(), DriverError> {
        let action = || format!("read the logs of pod `{pod}`");
        let request = logs::request(&self.config.kube_namespace, pod, stream, follow)
            .map_err(|error| DriverError::backend(DRIVER, action(), error))?;
        let reader = self
            .client
            .request_stream(request)
            .await
            .map_err(|error| self.error(action(), error))?;
        logs::copy_from_offset(Box::pin(reader.compat()), written, sink)
            .await
            .map_err(|error| {
                DriverError::backend(DRIVER, format!("write the logs of pod `{pod}`"), error)
            })
    }

    /// Waits for the watch to report a change, or `at_most`.
    pub(crate) async fn changed_or(&self, at_most: Duration) {
        let _ = tokio::time::timeout(at_most, self.changed.notified()).await;
    }

    /// Starts the namespace's pod watch once: one long request instead of a GET per status.
    fn watch(self: &Arc<Self>) {
        let Ok(mut watcher) = self.watcher.lock() else {
            return;
        };
        if watcher.is_none() {
            *watcher = Some(tokio::spawn(watch_pods(
                Arc::downgrade(self),
                self.pods.clone(),
                self.selector(),
            )));
        }
    }

    async fn ensure_claim(&self, volume: &str, size_bytes: u64) -> Result<String, DriverError> {
        if volume.is_empty() {
            return Err(DriverError::InvalidVolume {
                volume: volume.to_owned(),
                reason: "it is empty".to_owned(),
            });
        }
        let name = kube_name(&resource_name(self.namespace(), volume));
        let size = if size_bytes == 0 {
            DEFAULT_VOLUME_BYTES
        } else {
            size_bytes
        };
        let claim = PersistentVolumeClaim {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                labels: Some(labels(self.namespace(), volume, "volume")),
                annotations: Some(BTreeMap::from([(
                    ID_ANNOTATION.to_owned(),
                    volume.to_owned(),
                )])),
                ..ObjectMeta::default()
            },
            spec: Some(PersistentVolumeClaimSpec {
                // Tasks of a job run one after another; ReadWriteOnce is what every storage
                // class offers, and pods on one node share it.
                access_modes: Some(vec!["ReadWriteOnce".to_owned()]),
                resources: Some(VolumeResourceRequirements {
                    requests: Some(BTreeMap::from([(
                        "storage".to_owned(),
                        Quantity(size.to_string()),
                    )])),
                    ..VolumeResourceRequirements::default()
                }),
                storage_class_name: self.config.storage_class.clone(),
                ..PersistentVolumeClaimSpec::default()
            }),
            status: None,
        };
        match self.claims.create(&PostParams::default(), &claim).await {
            Ok(_) => Ok(name),
            Err(error) if status_code(&error) == Some(409) => Ok(name),
            Err(error) => Err(self.error(format!("create PVC `{name}`"), error)),
        }
    }

    /// The deny-all NetworkPolicy that cuts offline tasks off, enforced by the cluster's
    /// network plugin.
    async fn ensure_offline_policy(&self) -> Result<(), DriverError> {
        if self.offline_policy.load(Ordering::Acquire) {
            return Ok(());
        }
        let name = kube_name(&resource_name(self.namespace(), "offline"));
        let mut selected =
            BTreeMap::from([(NAMESPACE_LABEL.to_owned(), self.namespace().to_owned())]);
        selected.insert(NETWORK_LABEL.to_owned(), "none".to_owned());
        let policy = NetworkPolicy {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                labels: Some(labels(self.namespace(), "offline", "network-policy")),
                ..ObjectMeta::default()
            },
            spec: Some(NetworkPolicySpec {
                pod_selector: Some(LabelSelector {
                    match_labels: Some(selected),
                    match_expressions: None,
                }),
                policy_types: Some(vec!["Ingress".to_owned(), "Egress".to_owned()]),
                ingress: None,
                egress: None,
            }),
        };
        match self.policies.create(&PostParams::default(), &policy).await {
            Ok(_) => {}
            Err(error) if status_code(&error) == Some(409) => {}
            Err(error) => return Err(self.error(format!("create network policy `{name}`"), error)),
        }
        self.offline_policy.store(true, Ordering::Release);
        Ok(())
    }

    async fn start(
        self: &Arc<Self>,
        task: Task,
        role: &str,
        pod_name: String,
    ) -> Result<K8sContainer, DriverError> {
        if task.command.is_empty() {
            return Err(DriverError::InvalidTask {
                task: task.id.clone(),
                reason: "empty command".to_owned(),
            });
        }
        for mount in &task.mounts {
            mount.check(&task.id)?;
        }
        let container = K8sContainer {
            inner: Arc::clone(self),
            task: task.id.clone(),
            pod: pod_name.clone(),
        };
        self.watch();
        // Idempotent per task id: a pod of that name is this task's, whatever its state.
        match self.pods.get_opt(&pod_name).await {
            Ok(Some(_)) => return Ok(container),
            Ok(None) => {}
            Err(error) => return Err(self.error(format!("get pod `{pod_name}`"), error)),
        }
        for mount in &task.mounts {
            self.ensure_claim(&mount.volume, 0).await?;
        }
        if task.network == Some(false) {
            self.ensure_offline_policy().await?;
        }
        let image = if task.image.is_empty() {
            self.config.image.as_str()
        } else {
            task.image.as_str()
        };
        let namespace = self.namespace().to_owned();
        let pod = task_pod(&pod_name, &namespace, role, image, &task, &|volume| {
            kube_name(&resource_name(&namespace, volume))
        })?;
        match self.pods.create(&PostParams::default(), &pod).await {
            Ok(_) => {}
            // Another caller made it first: the same task.
            Err(error) if status_code(&error) == Some(409) => return Ok(container),
            Err(error) => return Err(self.error(format!("create pod `{pod_name}`"), error)),
        }
        // Started, as the other drivers return their containers: a task that can never run
        // (image pull failure, refused container) fails here, and its pod is deleted.
        container.started().await?;
        if let Some(reader) = task.stdin.as_ref().and_then(|stdin| stdin.take_reader()) {
            let inner = Arc::clone(self);
            tokio::spawn(async move {
                if let Err(error) = inner.pump_stdin(&pod_name, reader).await {
                    tracing::warn!(pod = %pod_name, "stdin not delivered: {}", source_chain(&error));
                }
            });
        }
        Ok(container)
    }

    /// Attaches to the pod once its container runs and streams `reader` to its stdin; closing
    /// the attachment closes the container's stdin (`stdinOnce`).
    async fn pump_stdin(
        &self,
        pod: &str,
        mut reader: Box<dyn tokio::io::AsyncRead + Send + Unpin>,
    ) -> Result<(), DriverError> {
        let mut interval = Duration::from_millis(20);
        loop {
            let state = self.pod_state(pod).await?;
            match state {
                PodState::Running => break,
                PodState::Pending => {}
                PodState::Exited(_) | PodState::Failed { .. } => return Ok(()),
            }
            tokio::time::sleep(interval).await;
            interval = (interval * 2).min(Duration::from_millis(500));
        }
        let params = AttachParams::default()
            .container(CONTAINER)
            .stdin(true)
            .stdout(false)
            .stderr(false);
        let mut attached = self
            .pods
            .attach(pod, &params)
            .await
            .map_err(|error| self.error(format!("attach to pod `{pod}`"), error))?;
        // The final `Status` frame goes to whoever holds this; without a holder `join` fails.
        let status = attached.take_status();
        if let Some(mut stdin) = attached.stdin() {
            let copied = tokio::io::copy(&mut reader, &mut stdin).await;
            let _ = stdin.shutdown().await;
            drop(stdin);
            copied.map_err(|error| {
                DriverError::backend(DRIVER, format!("send stdin to pod `{pod}`"), error)
            })?;
        }
        attached.join().await.map_err(|error| {
            DriverError::backend(DRIVER, format!("attach to pod `{pod}`"), error)
        })?;
        if let Some(status) = status
            && let Some(status) = status.await
            && status.status.as_deref() == Some("Failure")
        {
            return Err(DriverError::backend(
                DRIVER,
                format!("attach to pod `{pod}`"),
                Problem::Api {
                    code: status
                        .code
                        .and_then(|code| u16::try_from(code).ok())
                        .unwrap_or(500),
                    reason: status.reason.unwrap_or_default(),
                    message: status.message.unwrap_or_default(),
                },
            ));
        }
        Ok(())
    }
}

/// Follows the pods of the namespace's label into `Inner::states`; re-watches (from a fresh
/// list, `resourceVersion=0`) whenever the stream ends, and is trusted only while it runs.
async fn watch_pods(inner: Weak<Inner>, pods: Api<Pod>, selector: String) {
    let params = WatchParams::default().labels(&selector).timeout(290);
    loop {
        let stream = match pods.watch(&params, "0").await {
            Ok(stream) => stream,
            Err(error) => {
                tracing::debug!("pod watch failed, polling instead: {error}");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let mut stream = std::pin::pin!(stream);
        let mut first = true;
        while let Some(event) = stream.next().await {
            let Some(inner) = inner.upgrade() else {
                return;
            };
            let Ok(mut states) = inner.states.lock() else {
                return;
            };
            if first {
                // A new watch starts from the whole list: forget what the last one knew.
                states.clear();
                first = false;
            }
            match event {
                Ok(WatchEvent::Added(pod)) => {
                    if let Some(name) = pod.metadata.name.clone() {
                        if let Ok(mut deleted) = inner.deleted.lock() {
                            deleted.remove(&name);
                        }
                        states.insert(name, PodState::of(&pod));
                    }
                }
                Ok(WatchEvent::Modified(pod)) => {
                    let gone = |name: &String| {
                        inner
                            .deleted
                            .lock()
                            .is_ok_and(|deleted| deleted.contains(name))
                    };
                    if let Some(name) = pod.metadata.name.clone()
                        && !gone(&name)
                    {
                        states.insert(name, PodState::of(&pod));
                    }
                }
                Ok(WatchEvent::Deleted(pod)) => {
                    if let Some(name) = &pod.metadata.name {
                        states.remove(name);
                        if let Ok(mut deleted) = inner.deleted.lock() {
                            deleted.remove(name);
                        }
                    }
                }
                Ok(WatchEvent::Bookmark(_)) => {}
                Ok(WatchEvent::Error(_)) | Err(_) => break,
            }
            drop(states);
            inner.watching.store(true, Ordering::Release);
            inner.changed.notify_waiters();
        }
        match inner.upgrade() {
            Some(inner) => inner.watching.store(false, Ordering::Release),
            None => return,
        }
    }
}

#[async_trait]
impl Driver for K8sDriver {
    fn name(&self) -> &'static str {
        DRIVER
    }

    fn namespace(&self) -> &str {
        self.inner.namespace()
    }

    async fn create_volume(
        &self,
        name: &str,
        size_bytes: u64,
    ) -> Result<Box<dyn Volume>, DriverError> {
        let claim = self.inner.ensure_claim(name, size_bytes).await?;
        Ok(Box::new(K8sVolume {
            inner: Arc::clone(&self.inner),
            name: name.to_owned(),
            claim,
        }))
    }

    async fn run_container(&self, task: Task) -> Result<Box<dyn Container>, DriverError> {
        let pod = kube_name(&resource_name(self.inner.namespace(), &task.id));
        Ok(Box::new(self.inner.start(task, "task", pod).await?))
    }

    async fn close(&self) -> Result<(), DriverError> {
        let inner = &self.inner;
        let selector = inner.selector();
        let list = ListParams::default().labels(&selector);
        let delete = DeleteParams::default().grace_period(0);
        let mut first_error = None;
        let known: Vec<String> = inner
            .states
            .lock()
            .map(|states| states.keys().cloned().collect())
            .unwrap_or_default();
        inner.forget(known);
        let mut note = |result: Result<(), DriverError>| {
            if let Err(error) = result {
                tracing::warn!("close: {error}");
                first_error.get_or_insert(error);
            }
        };
        note(
            inner
                .pods
                .delete_collection(&delete, &list)
                .await
                .map(drop)
                .map_err(|error| {
                    inner.error(format!("delete the pods labelled `{selector}`"), error)
                }),
        );
        note(
            inner
                .claims
                .delete_collection(&delete, &list)
                .await
                .map(drop)
                .map_err(|error| {
                    inner.error(format!("delete the PVCs labelled `{selector}`"), error)
                }),
        );
        // Always, not only when this driver made one: a killed run may have left it. A user
        // allowed no network policies made none.
        inner.offline_policy.store(false, Ordering::Release);
        match inner.policies.delete_collection(&delete, &list).await {
            Ok(_) => {}
            Err(error) if matches!(status_code(&error), Some(403 | 404)) => {}
            Err(error) => note(Err(inner.error(
                format!("delete the network policies labelled `{selector}`"),
                error,
            ))),
        }
        first_error.map_or(Ok(()), Err)
    }

    async fn environment_digest(&self) -> Result<String, DriverError> {
        // The API offers no image digest before a pod runs it; the reference names the
        // environment (pin it by digest, `image@sha256:…`, for exact replays).
        Ok(format!("k8s-image:{}", self.inner.config.image))
    }

    fn job_support(&self) -> JobSupport {
        JobSupport {
            mk: MkSource::Upload,
            test_in_container: true,
            default_test_image: String::new(),
            shares_host_run_dir: false,
        }
    }

    fn as_volume_files(&self) -> Option<&dyn VolumeFiles> {
        Some(self)
    }
}

/// Reads a file with a short-lived reader pod that mounts the volume's PVC and `cat`s the
/// file to its stdout: the API has no other way into a volume.
#[async_trait]
impl VolumeFiles for K8sDriver {
    async fn read_file(&self, volume: &str, path: &str) -> Result<Vec<u8>, DriverError> {
        let inner = &self.inner;
        let invalid = |reason: String| DriverError::InvalidVolume {
            volume: volume.to_owned(),
            reason,
        };
        ci_exec_driver::volume_relative_path(volume, path)?;
        let claim = kube_name(&resource_name(inner.namespace(), volume));
        match inner.claims.get_opt(&claim).await {
            Ok(Some(found)) if found.metadata.deletion_timestamp.is_none() => {}
            Ok(_) => {
                return Err(invalid(format!(
                    "no such volume in namespace `{}`",
                    inner.namespace()
                )));
            }
            Err(error) => return Err(inner.error(format!("get PVC `{claim}`"), error)),
        }
        let number = inner.readers.fetch_add(1, Ordering::Relaxed);
        let id = format!("read-{}-{number}", std::process::id());
        let task = Task::new(
            id.clone(),
            [
                "sh",
                "-c",
                &format!(
                    "if [ -f \"$1\" ]; then exec cat -- \"$1\"; else exit {READER_NO_FILE}; fi"
                ),
                "read",
                &format!("{READER_MOUNT}/{path}"),
            ],
        )
        .mount(volume, READER_MOUNT);
        let pod = kube_name(&resource_name(inner.namespace(), &id));
        let reader = inner.start(task, "volume-reader", pod).await?;
        let result = async {
            let code =
                ci_exec_driver::wait_for_exit(&reader, Duration::from_millis(200), None).await?;
            if code == READER_NO_FILE {
                return Err(DriverError::FileNotFound {
                    volume: volume.to_owned(),
                    path: path.to_owned(),
                });
            }
            let mut stdout = Vec::new();
            let mut stderr = Vec::new();
            reader.logs(&mut stdout, &mut stderr).await?;
            if code != 0 {
                return Err(invalid(format!(
                    "reading `{path}` failed with exit code {code}: {}",
                    String::from_utf8_lossy(&stderr).trim()
                )));
            }
            Ok(stdout)
        }
        .await;
        let cleaned = reader.cleanup().await;
        let bytes = result?;
        cleaned?;
        Ok(bytes)
    }
}

/// A volume's PVC.
#[derive(Debug)]
pub struct K8sVolume {
    inner: Arc<Inner>,
    name: String,
    claim: String,
}

impl K8sVolume {
    pub fn claim_name(&self) -> &str {
        &self.claim
    }
}

#[async_trait]
impl Volume for K8sVolume {
    fn name(&self) -> &str {
        &self.name
    }

    async fn cleanup(&self) -> Result<(), DriverError> {
        match self
            .inner
            .claims
            .delete(&self.claim, &DeleteParams::default())
            .await
        {
            Ok(_) => Ok(()),
            Err(error) if status_code(&error) == Some(404) => Ok(()),
            Err(error) => Err(self
                .inner
                .error(format!("delete PVC `{}`", self.claim), error)),
        }
    }
}
