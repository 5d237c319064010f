#![expect(
    clippy::result_large_err,
    reason = "handlers return `Result<Response, Response>`: the error is the response, built once per request"
)]

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path as UrlPath, Query, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use ci_exec_docker::{DockerConfig, DockerDriver, Engine};
use ci_exec_driver::{Container, Driver, Volume};
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, PersistentVolumeClaimStatus, Pod};
use serde_json::{Value, json};
use tokio::io::{AsyncWriteExt, DuplexStream};
use tokio_util::io::ReaderStream;

use crate::engine;
use crate::openapi;

/// How the fake behaves beyond the API's semantics.
#[derive(Debug, Clone, Default)]
pub struct FakeOptions {
    /// Kubernetes namespaces that exist (requests to others are `404 namespaces "x" not found`).
    pub namespaces: Vec<String>,
    /// Bearer tokens accepted; others (and none) are `401`.
    pub tokens: Vec<String>,
    /// Bearer tokens accepted but allowed nothing (`403`).
    pub forbidden_tokens: Vec<String>,
    /// End every follow log stream after this many bytes, as a dropped connection does.
    pub drop_follow_after: Option<u64>,
    /// Docker daemon address (`DOCKER_HOST` when unset).
    pub docker_host: Option<String>,
}

/// Requests the fake served, by kind (`create pods`, `get pods`, `log`, `attach`, …).
#[derive(Debug, Default)]
pub struct Requests {
    counts: Mutex<BTreeMap<String, u64>>,
}

impl Requests {
    fn count(&self, kind: String) {
        if let Ok(mut counts) = self.counts.lock() {
            *counts.entry(kind).or_default() += 1;
        }
    }

    pub fn snapshot(&self) -> BTreeMap<String, u64> {
        self.counts
            .lock()
            .map(|counts| counts.clone())
            .unwrap_or_default()
    }

    pub fn total(&self) -> u64 {
        self.snapshot().values().sum()
    }
}

/// A running fake API server.
#[derive(Debug)]
pub struct FakeKube {
    pub address: SocketAddr,
    pub requests: Arc<Requests>,
    state: Arc<Fake>,
}

struct PodEntry {
    pod: Pod,
    container: Option<Arc<dyn Container>>,
    stdin: Option<DuplexStream>,
}

#[derive(Default)]
struct Objects {
    pods: BTreeMap<(String, String), PodEntry>,
    claims: BTreeMap<(String, String), (PersistentVolumeClaim, Arc<dyn Volume>)>,
    policies: BTreeMap<(String, String), Value>,
}

struct Fake {
    /// Every change of a pod: (namespace, `ADDED`/`MODIFIED`/`DELETED`, the pod).
    events: tokio::sync::broadcast::Sender<(String, &'static str, Pod)>,
    options: FakeOptions,
    docker: DockerDriver,
    objects: Mutex<Objects>,
    version: AtomicU64,
    requests: Arc<Requests>,
}

impl std::fmt::Debug for Fake {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fake").finish_non_exhaustive()
    }
}

type Reply = Result<Response, Response>;

/// A Kubernetes `Status` failure response.
fn failure(code: StatusCode, reason: &str, message: String, details: Option<Value>) -> Response {
    let mut body = json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": message, "reason": reason, "code": code.as_u16(),
    });
    if let Some(details) = details {
        body["details"] = details;
    }
    (
        code,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

/// A body checked against the schema of `kind` before it goes out.
fn object(code: StatusCode, kind: &str, value: Value) -> Reply {
    if let Err(error) = openapi::check(kind, &value) {
        return Err(failure(
            StatusCode::INTERNAL_SERVER_ERROR,
            "InternalError",
            format!("the fake would return an invalid object: {error}"),
            None,
        ));
    }
    Ok((
        code,
        [(header::CONTENT_TYPE, "application/json")],
        value.to_string(),
    )
        .into_response())
}

/// A received body checked against the schema of `kind`, then parsed.
fn received<T: serde::de::DeserializeOwned>(kind: &str, body: &Bytes) -> Result<T, Response> {
    let invalid =
        |message: String| failure(StatusCode::UNPROCESSABLE_ENTITY, "Invalid", message, None);
    let value: Value = serde_json::from_slice(body).map_err(|error| {
        failure(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            format!("body is not JSON: {error}"),
            None,
        )
    })?;
    openapi::check(kind, &value).map_err(invalid)?;
    serde_json::from_value(openapi::without_nulls(&value))
        .map_err(|error| invalid(format!("{kind}: {error}")))
}

fn not_found(resource: &str, name: &str) -> Response {
    failure(
        StatusCode::NOT_FOUND,
        "NotFound",
        format!("{resource} \"{name}\" not found"),
        Some(json!({"name": name, "kind": resource})),
    )
}

/// `k=v,k2==v2,k3!=v3,k4`: the equality-based label selectors.
fn selects(selector: Option<&String>, labels: Option<&BTreeMap<String, String>>) -> bool {
    let Some(selector) = selector.filter(|selector| !selector.is_empty()) else {
        return true;
    };
    let empty = BTreeMap::new();
    let labels = labels.unwrap_or(&empty);
    selector.split(',').all(|term| {
        if let Some((key, value)) = term.split_once("!=") {
            labels.get(key.trim()).map(String::as_str) != Some(value.trim())
        } else if let Some((key, value)) = term.split_once('=') {
            let value = value.strip_prefix('=').unwrap_or(value);
            labels.get(key.trim()).map(String::as_str) == Some(value.trim())
        } else {
            labels.contains_key(term.trim())
        }
    })
}

impl FakeKube {
    /// Starts the fake on a loopback port, on the current tokio runtime.
    pub async fn start(options: FakeOptions) -> Result<FakeKube, String> {
        let mut docker_config =
            DockerConfig::new(Engine::Docker, format!("fake-kube-{}", std::process::id()));
        if let Some(host) = &options.docker_host {
            docker_config = docker_config.host(host.clone());
        }
        let docker = DockerDriver::connect(docker_config)
            .await
            .map_err(|error| format!("fake-kube needs a Docker engine: {error}"))?;
        let requests = Arc::new(Requests::default());
        let state = Arc::new(Fake {
            events: tokio::sync::broadcast::channel(1024).0,
            options,
            docker,
            objects: Mutex::new(Objects::default()),
            version: AtomicU64::new(1),
            requests: Arc::clone(&requests),
        });
        let namespaced = "/api/v1/namespaces/{namespace}";
        let router = Router::new()
            .route("/version", get(version))
            .route("/api", get(api_versions))
            .route("/apis", get(api_groups))
            .route("/api/v1", get(resources))
            .route("/apis/networking.k8s.io/v1", get(networking_resources))
            .route("/openapi/v3", get(openapi_paths))
            .route("/openapi/v3/api/v1", get(openapi_core))
            .route(namespaced, get(get_namespace))
            .route(
                &format!("{namespaced}/pods"),
                get(list_pods).post(create_pod).delete(delete_pods),
            )
            .route(
                &format!("{namespaced}/pods/{{name}}"),
                get(get_pod).delete(delete_pod),
            )
            .route(&format!("{namespaced}/pods/{{name}}/log"), get(pod_log))
            .route(
                &format!("{namespaced}/pods/{{name}}/attach"),
                get(attach).post(attach),
            )
            .route(
                &format!("{namespaced}/persistentvolumeclaims"),
                get(list_claims).post(create_claim).delete(delete_claims),
            )
            .route(
                &format!("{namespaced}/persistentvolumeclaims/{{name}}"),
                get(get_claim).delete(delete_claim),
            )
            .route(
                "/apis/networking.k8s.io/v1/namespaces/{namespace}/networkpolicies",
                axum::routing::post(create_policy).delete(delete_policies),
            )
            .layer(middleware::from_fn_with_state(Arc::clone(&state), gate))
            .with_state(Arc::clone(&state));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|error| format!("bind loopback: {error}"))?;
        let address = listener
            .local_addr()
            .map_err(|error| format!("local address: {error}"))?;
        tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        Ok(FakeKube {
            address,
            requests,
            state,
        })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.address)
    }

    /// Writes a kubeconfig for this server with `token` as the user's bearer token.
    pub fn write_kubeconfig(
        &self,
        path: &Path,
        namespace: &str,
        token: &str,
    ) -> std::io::Result<PathBuf> {
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: {}\n\
             contexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\n    namespace: {namespace}\n\
             current-context: fake\nusers:\n- name: fake\n  user:\n    token: {token}\n",
            self.url()
        );
        std::fs::write(path, text)?;
        Ok(path.to_owned())
    }

    /// The number of pods and PVCs the fake holds in `namespace` whose labels match `selector`.
    pub fn objects(&self, namespace: &str, selector: &str) -> (usize, usize) {
        let selector = selector.to_owned();
        let Ok(objects) = self.state.objects.lock() else {
            return (0, 0);
        };
        let pods = objects
            .pods
            .iter()
            .filter(|((ns, _), entry)| {
                ns == namespace && selects(Some(&selector), entry.pod.metadata.labels.as_ref())
            })
            .count();
        let claims = objects
            .claims
            .iter()
            .filter(|((ns, _), (claim, _))| {
                ns == namespace && selects(Some(&selector), claim.metadata.labels.as_ref())
            })
            .count();
        (pods, claims)
    }

    /// Marks pod `name` as a kubelet reports an eviction (`Evicted`) or a lost node
    /// (`NodeLost`, phase `Unknown`), and stops its container.
    pub async fn fail_pod(&self, namespace: &str, name: &str, reason: &str) {
        let container = {
            let Ok(mut objects) = self.state.objects.lock() else {
                return;
            };
            let Some(entry) = objects
                .pods
                .get_mut(&(namespace.to_owned(), name.to_owned()))
            else {
                return;
            };
            let status = entry.pod.status.get_or_insert_with(Default::default);
            status.phase = Some(
                if reason == "NodeLost" {
                    "Unknown"
                } else {
                    "Failed"
                }
                .to_owned(),
            );
            status.reason = Some(reason.to_owned());
            status.message = Some(format!("the fake's node reports `{reason}`"));
            let _ = self
                .state
                .events
                .send((namespace.to_owned(), "MODIFIED", entry.pod.clone()));
            entry.container.clone()
        };
        if let Some(container) = container {
            let _ = container.cleanup().await;
        }
    }
}

/// Counts, authenticates and checks the namespace of every request.
async fn gate(State(fake): State<Arc<Fake>>, request: Request, next: Next) -> Response {
    let path = request.uri().path().to_owned();
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let kind = match parts.as_slice() {
        ["api", "v1", "namespaces", _, resource] => {
            format!("{} {resource}", request.method())
        }
        ["api", "v1", "namespaces", _, resource, _] => {
            format!("{} {resource}/name", request.method())
        }
        ["api", "v1", "namespaces", _, _, _, sub] => format!("{} pods/{sub}", request.method()),
        _ => format!("{} {path}", request.method()),
    };
    fake.requests.count(kind);
    if !fake.options.tokens.is_empty() || !fake.options.forbidden_tokens.is_empty() {
        let token = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.strip_prefix("Bearer "))
            .map(str::to_owned);
        match token {
            Some(token) if fake.options.tokens.contains(&token) => {}
            Some(token) if fake.options.forbidden_tokens.contains(&token) => {
                return failure(
                    StatusCode::FORBIDDEN,
                    "Forbidden",
                    format!(
                        "{} {path} is forbidden: User \"fake\" cannot do this",
                        request.method()
                    ),
                    None,
                );
            }
            _ => {
                return failure(
                    StatusCode::UNAUTHORIZED,
                    "Unauthorized",
                    "Unauthorized".to_owned(),
                    None,
                );
            }
        }
    }
    let namespace = match parts.as_slice() {
        ["api", "v1", "namespaces", namespace, ..]
        | ["apis", _, _, "namespaces", namespace, ..] => Some((*namespace).to_owned()),
        _ => None,
    };
    if let Some(namespace) = namespace
        && !fake.options.namespaces.contains(&namespace)
    {
        return not_found("namespaces", &namespace);
    }
    next.run(request).await
}

async fn version() -> Response {
    Json(
        json!({"major": "1", "minor": "35", "gitVersion": "v1.35.0-fake", "platform": "linux/amd64"}),
    )
}

#[expect(
    non_snake_case,
    reason = "a tiny JSON response helper named like axum's `Json`"
)]
fn Json(value: Value) -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        value.to_string(),
    )
        .into_response()
}

async fn api_versions() -> Response {
    Json(json!({"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": []}))
}

async fn api_groups() -> Response {
    Json(
        json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": [{
        "name": "networking.k8s.io",
        "versions": [{"groupVersion": "networking.k8s.io/v1", "version": "v1"}],
        "preferredVersion": {"groupVersion": "networking.k8s.io/v1", "version": "v1"}}]}),
    )
}

async fn resources() -> Reply {
    let resource = |name: &str, kind: &str, verbs: &[&str]| json!({"name": name, "singularName": "", "namespaced": true, "kind": kind, "verbs": verbs});
    object(
        StatusCode::OK,
        "io.k8s.apimachinery.pkg.apis.meta.v1.APIResourceList",
        json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": "v1", "resources": [
            resource("pods", "Pod", &["create", "delete", "deletecollection", "get", "list"]),
            resource("pods/log", "Pod", &["get"]),
            resource("pods/attach", "PodAttachOptions", &["create", "get"]),
            resource("persistentvolumeclaims", "PersistentVolumeClaim",
                &["create", "delete", "deletecollection", "get", "list"]),
        ]}),
    )
}

async fn networking_resources() -> Response {
    Json(
        json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": "networking.k8s.io/v1",
        "resources": [{"name": "networkpolicies", "singularName": "networkpolicy", "namespaced": true,
            "kind": "NetworkPolicy", "verbs": ["create", "deletecollection"]}]}),
    )
}

/// kubectl validates what it sends against the server's OpenAPI: the same vendored document.
async fn openapi_paths() -> Response {
    Json(json!({"paths": {"api/v1": {"serverRelativeURL": "/openapi/v3/api/v1?hash=fake"}}}))
}

async fn openapi_core() -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        openapi::CORE_V1,
    )
        .into_response()
}

async fn get_namespace(UrlPath(namespace): UrlPath<String>) -> Reply {
    object(
        StatusCode::OK,
        "io.k8s.api.core.v1.Namespace",
        json!({"kind": "Namespace", "apiVersion": "v1", "metadata": {"name": namespace},
               "status": {"phase": "Active"}}),
    )
}

impl Fake {
    fn next_version(&self) -> String {
        self.version.fetch_add(1, Ordering::Relaxed).to_string()
    }

    fn objects(&self) -> std::sync::MutexGuard<'_, Objects> {
        match self.objects.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    fn pod_value(pod: &Pod) -> Value {
        let mut value = serde_json::to_value(pod).unwrap_or(Value::Null);
        value["kind"] = json!("Pod");
        value["apiVersion"] = json!("v1");
        value
    }

    fn claim_value(claim: &PersistentVolumeClaim) -> Value {
        let mut value = serde_json::to_value(claim).unwrap_or(Value::Null);
        value["kind"] = json!("PersistentVolumeClaim");
        value["apiVersion"] = json!("v1");
        value
    }

    fn set_status(
        &self,
        namespace: &str,
        name: &str,
        status: k8s_openapi::api::core::v1::PodStatus,
    ) {
        let version = self.next_version();
        let changed = self
            .objects()
            .pods
            .get_mut(&(namespace.to_owned(), name.to_owned()))
            .map(|entry| {
                entry.pod.status = Some(status);
                entry.pod.metadata.resource_version = Some(version);
                entry.pod.clone()
            });
        if let Some(pod) = changed {
            let _ = self.events.send((namespace.to_owned(), "MODIFIED", pod));
        }
    }

    /// Whether a deny-all NetworkPolicy of `namespace` selects `pod`.
    fn offline(&self, namespace: &str, pod: &Pod) -> bool {
        self.objects().policies.iter().any(|((ns, _), policy)| {
            let spec = &policy["spec"];
            let denies_all = spec["ingress"].as_array().is_none_or(Vec::is_empty)
                && spec["egress"].as_array().is_none_or(Vec::is_empty)
                && spec["policyTypes"]
                    .as_array()
                    .is_some_and(|types| types.iter().any(|t| t == "Egress"));
            let selector: BTreeMap<String, String> =
                serde_json::from_value(spec["podSelector"]["matchLabels"].clone())
                    .unwrap_or_default();
            ns == namespace
                && denies_all
                && selector.iter().all(|(key, value)| {
                    pod.metadata
                        .labels
                        .as_ref()
                        .and_then(|labels| labels.get(key))
                        == Some(value)
                })
        })
    }

    /// The kubelet's part: runs the pod's container and follows it to its end.
    async fn run(self: Arc<Self>, namespace: String, name: String) {
        let pod = {
            let objects = self.objects();
            match objects.pods.get(&(namespace.clone(), name.clone())) {
                Some(entry) => entry.pod.clone(),
                None => return,
            }
        };
        let image = pod
            .spec
            .as_ref()
            .and_then(|spec| spec.containers.first())
            .and_then(|container| container.image.clone())
            .unwrap_or_default();
        // A pod whose claim does not exist stays Pending, as the scheduler leaves it.
        let claims_missing = pod
            .spec
            .iter()
            .flat_map(|spec| spec.volumes.iter().flatten())
            .any(|volume| {
                volume
                    .persistent_volume_claim
                    .as_ref()
                    .is_some_and(|claim| {
                        !self
                            .objects()
                            .claims
                            .contains_key(&(namespace.clone(), claim.claim_name.clone()))
                    })
            });
        if claims_missing {
            return;
        }
        let offline = self.offline(&namespace, &pod);
        let (task, stdin) = match engine::task_of(&namespace, &pod, offline) {
            Ok(task) => task,
            Err(message) => {
                self.set_status(
                    &namespace,
                    &name,
                    engine::pending(&image, "CreateContainerConfigError", Some(message)),
                );
                return;
            }
        };
        let container: Arc<dyn Container> = match self.docker.run_container(task).await {
            Ok(container) => Arc::from(container),
            Err(error) => {
                self.set_status(&namespace, &name, engine::start_failure(&image, &error));
                return;
            }
        };
        let registered = match self
            .objects()
            .pods
            .get_mut(&(namespace.clone(), name.clone()))
        {
            Some(entry) => {
                entry.container = Some(Arc::clone(&container));
                entry.stdin = stdin;
                true
            }
            None => false,
        };
        if !registered {
            // Deleted while it started.
            let _ = container.cleanup().await;
            return;
        }
        self.set_status(&namespace, &name, engine::running(&image));
        let code =
            ci_exec_driver::wait_for_exit(&*container, Duration::from_millis(50), None).await;
        let still_ours = self
            .objects()
            .pods
            .get(&(namespace.clone(), name.clone()))
            .is_some_and(|entry| {
                entry
                    .pod
                    .status
                    .as_ref()
                    .and_then(|status| status.reason.as_ref())
                    .is_none()
            });
        if let (Ok(code), true) = (code, still_ours) {
            let reason = if code == 0 { "Completed" } else { "Error" };
            self.set_status(
                &namespace,
                &name,
                engine::terminated(&image, code, reason, None),
            );
        }
    }
}

async fn create_pod(
    State(fake): State<Arc<Fake>>,
    UrlPath(namespace): UrlPath<String>,
    body: Bytes,
) -> Reply {
    let mut pod: Pod = received("io.k8s.api.core.v1.Pod", &body)?;
    let Some(name) = pod.metadata.name.clone() else {
        return Err(failure(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Invalid",
            "Pod: metadata.name: Required value".into(),
            None,
        ));
    };
    pod.metadata.namespace = Some(namespace.clone());
    pod.metadata.uid = Some(format!("fake-{}", fake.next_version()));
    pod.metadata.resource_version = Some(fake.next_version());
    pod.metadata.creation_timestamp = Some(engine::now());
    let image = pod
        .spec
        .as_ref()
        .and_then(|spec| spec.containers.first())
        .and_then(|container| container.image.clone())
        .unwrap_or_default();
    pod.status = Some(engine::pending(&image, "ContainerCreating", None));
    {
        let mut objects = fake.objects();
        let key = (namespace.clone(), name.clone());
        if objects.pods.contains_key(&key) {
            return Err(failure(
                StatusCode::CONFLICT,
                "AlreadyExists",
                format!("pods \"{name}\" already exists"),
                Some(json!({"name": name, "kind": "pods"})),
            ));
        }
        objects.pods.insert(
            key,
            PodEntry {
                pod: pod.clone(),
                container: None,
                stdin: None,
            },
        );
    }
    let _ = fake.events.send((namespace.clone(), "ADDED", pod.clone()));
    tokio::spawn(Arc::clone(&fake).run(namespace, name));
    object(
        StatusCode::CREATED,
        "io.k8s.api.core.v1.Pod",
        Fake::pod_value(&pod),
    )
}

async fn get_pod(
    State(fake): State<Arc<Fake>>,
    UrlPath((namespace, name)): UrlPath<(String, String)>,
) -> Reply {
    let pod = fake
        .objects()
        .pods
        .get(&(namespace, name.clone()))
        .map(|entry| entry.pod.clone());
    match pod {
        Some(pod) => object(
            StatusCode::OK,
            "io.k8s.api.core.v1.Pod",
            Fake::pod_value(&pod),
        ),
        None => Err(not_found("pods", &name)),
    }
}

async fn list_pods(
    State(fake): State<Arc<Fake>>,
    UrlPath(namespace): UrlPath<String>,
    Query(query): Query<HashMap<String, String>>,
) -> Reply {
    if query
        .get("watch")
        .is_some_and(|watch| watch == "true" || watch == "1")
    {
        return Ok(watch_pods(
            &fake,
            namespace,
            query.get("labelSelector").cloned(),
        ));
    }
    let items: Vec<Value> = fake
        .objects()
        .pods
        .iter()
        .filter(|((ns, _), entry)| {
            *ns == namespace
                && selects(
                    query.get("labelSelector"),
                    entry.pod.metadata.labels.as_ref(),
                )
        })
        .map(|(_, entry)| Fake::pod_value(&entry.pod))
        .collect();
    object(
        StatusCode::OK,
        "io.k8s.api.core.v1.PodList",
        json!({"kind": "PodList", "apiVersion": "v1", "metadata": {"resourceVersion": fake.next_version()}, "items": items}),
    )
}

/// `GET …/pods?watch=true`: the matching pods as `ADDED`, then every change, one `WatchEvent`
/// JSON object per line, each checked against the schema.
fn watch_pods(fake: &Arc<Fake>, namespace: String, selector: Option<String>) -> Response {
    let mut changes = fake.events.subscribe();
    let current: Vec<Pod> = fake
        .objects()
        .pods
        .iter()
        .filter(|((ns, _), entry)| {
            *ns == namespace && selects(selector.as_ref(), entry.pod.metadata.labels.as_ref())
        })
        .map(|(_, entry)| entry.pod.clone())
        .collect();
    let (sender, receiver) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(64);
    tokio::spawn(async move {
        let line = |kind: &str, pod: &Pod| -> Option<Bytes> {
            let event = json!({"type": kind, "object": Fake::pod_value(pod)});
            openapi::check("io.k8s.apimachinery.pkg.apis.meta.v1.WatchEvent", &event)
                .map_err(|error| eprintln!("fake-kube: invalid watch event: {error}"))
                .ok()?;
            Some(Bytes::from(format!("{event}\n")))
        };
        for pod in &current {
            let Some(bytes) = line("ADDED", pod) else {
                return;
            };
            if sender.send(Ok(bytes)).await.is_err() {
                return;
            }
        }
        loop {
            let (ns, kind, pod) = match changes.recv().await {
                Ok(change) => change,
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                Err(_) => return,
            };
            if ns != namespace || !selects(selector.as_ref(), pod.metadata.labels.as_ref()) {
                continue;
            }
            let Some(bytes) = line(kind, &pod) else {
                return;
            };
            if sender.send(Ok(bytes)).await.is_err() {
                return;
            }
        }
    });
    (
        [(header::CONTENT_TYPE, "application/json")],
        Body::from_stream(tokio_stream_of(receiver)),
    )
        .into_response()
}

fn tokio_stream_of(
    mut receiver: tokio::sync::mpsc::Receiver<Result<Bytes, std::io::Error>>,
) -> impl futures_util::Stream<Item = Result<Bytes, std::io::Error>> {
    futures_util::stream::poll_fn(move |context| receiver.poll_recv(context))
}

/// Removes pods (their containers first), returning what was removed.
async fn remove_pods(fake: &Fake, keys: Vec<(String, String)>) -> Vec<Pod> {
    let entries: Vec<((String, String), PodEntry)> = {
        let mut objects = fake.objects();
        keys.into_iter()
            .filter_map(|key| objects.pods.remove(&key).map(|entry| (key, entry)))
            .collect()
    };
    let mut removed = Vec::new();
    for (key, entry) in entries {
        if let Some(container) = &entry.container {
            let _ = container.cleanup().await;
        }
        let _ = fake
            .events
            .send((key.0.clone(), "DELETED", entry.pod.clone()));
        removed.push(entry.pod);
    }
    removed
}

fn deleted_pod_response(mut pod: Pod) -> Reply {
    pod.metadata.deletion_timestamp = Some(engine::now());
    object(
        StatusCode::OK,
        "io.k8s.api.core.v1.Pod",
        Fake::pod_value(&pod),
    )
}

fn check_delete_options(body: &Bytes) -> Result<(), Response> {
    if body.is_empty() {
        return Ok(());
    }
    received::<Value>("io.k8s.apimachinery.pkg.apis.meta.v1.DeleteOptions", body).map(drop)
}

async fn delete_pod(
    State(fake): State<Arc<Fake>>,
    UrlPath((namespace, name)): UrlPath<(String, String)>,
    body: Bytes,
) -> Reply {
    check_delete_options(&body)?;
    match remove_pods(&fake, vec![(namespace, name.clone())])
        .await
        .pop()
    {
        Some(pod) => deleted_pod_response(pod),
        None => Err(not_found("pods", &name)),
    }
}

async fn delete_pods(
    State(fake): State<Arc<Fake>>,
    UrlPath(namespace): UrlPath<String>,
    Query(query): Query<HashMap<String, String>>,
    body: Bytes,
) -> Reply {
    check_delete_options(&body)?;
    let keys: Vec<_> = fake
        .objects()
        .pods
        .iter()
        .filter(|((ns, _), entry)| {
            *ns == namespace
                && selects(
                    query.get("labelSelector"),
                    entry.pod.metadata.labels.as_ref(),
                )
        })
        .map(|(key, _)| key.clone())
        .collect();
    let items: Vec<Value> = remove_pods(&fake, keys)
        .await
        .iter()
        .map(Fake::pod_value)
        .collect();
    object(
        StatusCode::OK,
        "io.k8s.api.core.v1.PodList",
        json!({"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": items}),
    )
}

async fn pod_log(
    State(fake): State<Arc<Fake>>,
    UrlPath((namespace, name)): UrlPath<(String, String)>,
    Query(query): Query<HashMap<String, String>>,
) -> Reply {
    for key in query.keys() {
        if !matches!(
            key.as_str(),
            "container" | "follow" | "stream" | "pretty" | "timestamps"
        ) {
            return Err(failure(
                StatusCode::BAD_REQUEST,
                "BadRequest",
                format!("the fake does not serve log parameter `{key}`"),
                None,
            ));
        }
    }
    if query.get("timestamps").is_some_and(|value| value == "true") {
        return Err(failure(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            "the fake serves no timestamps".into(),
            None,
        ));
    }
    if let Some(container) = query
        .get("container")
        .filter(|container| *container != "task")
    {
        return Err(failure(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            format!("container {container} is not valid for pod {name}"),
            None,
        ));
    }
    let container = {
        let objects = fake.objects();
        let Some(entry) = objects.pods.get(&(namespace, name.clone())) else {
            return Err(not_found("pods", &name));
        };
        let terminated = entry
            .pod
            .status
            .iter()
            .flat_map(|status| status.container_statuses.iter().flatten())
            .any(|status| {
                status
                    .state
                    .as_ref()
                    .is_some_and(|state| state.terminated.is_some())
            });
        match &entry.container {
            Some(container) => Arc::clone(container),
            // A container that never started wrote nothing.
            None if terminated => {
                return Ok(([(header::CONTENT_TYPE, "text/plain")], "").into_response());
            }
            None => {
                return Err(failure(
                    StatusCode::BAD_REQUEST,
                    "BadRequest",
                    format!(
                        "container \"task\" in pod \"{name}\" is waiting to start: ContainerCreating"
                    ),
                    None,
                ));
            }
        }
    };
    let follow = query
        .get("follow")
        .is_some_and(|value| value == "true" || value == "1");
    let (want_out, want_err) = match query.get("stream").map(String::as_str) {
        None | Some("All") => (true, true),
        Some("Stdout") => (true, false),
        Some("Stderr") => (false, true),
        Some(other) => {
            return Err(failure(
                StatusCode::UNPROCESSABLE_ENTITY,
                "Invalid",
                format!("stream: Unsupported value: \"{other}\""),
                None,
            ));
        }
    };
    let limit = if follow {
        fake.options.drop_follow_after
    } else {
        None
    };
    let (reader, writer) = tokio::io::duplex(64 * 1024);
    tokio::spawn(async move {
        let shared = Arc::new(tokio::sync::Mutex::new(Limited {
            writer,
            left: limit,
        }));
        let mut out = SharedSink {
            target: want_out.then(|| Arc::clone(&shared)),
        };
        let mut err = SharedSink {
            target: want_err.then(|| Arc::clone(&shared)),
        };
        let result = match (follow, container.as_follow()) {
            (true, Some(follower)) => follower.follow(&mut out, &mut err).await,
            _ => container.logs(&mut out, &mut err).await,
        };
        drop(result);
        let mut sink = shared.lock().await;
        let _ = sink.writer.shutdown().await;
    });
    Ok((
        [(header::CONTENT_TYPE, "text/plain")],
        Body::from_stream(ReaderStream::new(reader)),
    )
        .into_response())
}

/// The response body of a log, cut after `left` bytes when the fake drops follow streams.
struct Limited {
    writer: DuplexStream,
    left: Option<u64>,
}

/// One of a log's two streams, into the shared response body, or nowhere when not asked for.
struct SharedSink {
    target: Option<Arc<tokio::sync::Mutex<Limited>>>,
}

impl tokio::io::AsyncWrite for SharedSink {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        context: &mut std::task::Context<'_>,
        buffer: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        use std::task::Poll;
        let Some(target) = &self.target else {
            return Poll::Ready(Ok(buffer.len()));
        };
        let Ok(mut limited) = target.try_lock() else {
            context.waker().wake_by_ref();
            return Poll::Pending;
        };
        let length = match limited.left {
            // Dropped: end the response (the client sees the stream end while the task
            // runs) and discard the rest of what the engine sends.
            Some(0) => {
                return match std::pin::Pin::new(&mut limited.writer).poll_shutdown(context) {
                    Poll::Ready(_) => Poll::Ready(Ok(buffer.len())),
                    Poll::Pending => Poll::Pending,
                };
            }
            Some(left) => buffer
                .len()
                .min(usize::try_from(left).unwrap_or(usize::MAX)),
            None => buffer.len(),
        };
        let written =
            std::pin::Pin::new(&mut limited.writer).poll_write(context, &buffer[..length]);
        if let (Poll::Ready(Ok(count)), Some(left)) = (&written, limited.left.as_mut()) {
            *left -= *count as u64;
        }
        written
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        context: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match &self.target {
            Some(target) => match target.try_lock() {
                Ok(mut limited) => std::pin::Pin::new(&mut limited.writer).poll_flush(context),
                Err(_) => {
                    context.waker().wake_by_ref();
                    std::task::Poll::Pending
                }
            },
            None => std::task::Poll::Ready(Ok(())),
        }
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}

/// `pods/attach` over WebSocket: channel 0 is stdin, 1 stdout, 2 stderr, 3 the final
/// `Status`; v5 adds `[255, channel]` to close one stream.
async fn attach(
    State(fake): State<Arc<Fake>>,
    UrlPath((namespace, name)): UrlPath<(String, String)>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    upgrade: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Reply {
    let Ok(upgrade) = upgrade else {
        return Err(failure(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            "the fake serves attach over WebSocket only (no SPDY)".into(),
            None,
        ));
    };
    let offered = headers
        .get(header::SEC_WEBSOCKET_PROTOCOL)
        .and_then(|value| value.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let flag = |key: &str| {
        query
            .get(key)
            .is_some_and(|value| value == "true" || value == "1")
    };
    let (stdin, stdout, stderr) = (flag("stdin"), flag("stdout"), flag("stderr"));
    let (container, stdin_stream) = {
        let mut objects = fake.objects();
        let Some(entry) = objects.pods.get_mut(&(namespace, name.clone())) else {
            return Err(not_found("pods", &name));
        };
        let Some(container) = entry.container.clone() else {
            return Err(failure(
                StatusCode::BAD_REQUEST,
                "BadRequest",
                format!("pod {name} is not running"),
                None,
            ));
        };
        // stdinOnce: the first attachment that takes stdin owns it, and closes it.
        (container, if stdin { entry.stdin.take() } else { None })
    };
    let v5 = offered.contains("v5.channel.k8s.io");
    Ok(upgrade
        .protocols(["v5.channel.k8s.io", "v4.channel.k8s.io"])
        .on_upgrade(move |socket| attached(socket, v5, container, stdin_stream, stdout, stderr)))
}

async fn attached(
    socket: WebSocket,
    v5: bool,
    container: Arc<dyn Container>,
    mut stdin: Option<DuplexStream>,
    stdout: bool,
    stderr: bool,
) {
    use futures_util::{SinkExt, StreamExt};
    let (mut sender, mut receiver) = socket.split();
    let (frames, mut outgoing) = tokio::sync::mpsc::channel::<Vec<u8>>(16);
    let output = (stdout || stderr).then(|| {
        let frames = frames.clone();
        let container = Arc::clone(&container);
        tokio::spawn(async move {
            let mut out = ChannelSink {
                channel: 1,
                frames: stdout.then(|| frames.clone()),
            };
            let mut err = ChannelSink {
                channel: 2,
                frames: stderr.then(|| frames.clone()),
            };
            if let Some(follower) = container.as_follow() {
                let _ = follower.follow(&mut out, &mut err).await;
            }
        })
    });
    let has_output = output.is_some();
    let reader = async {
        while let Some(Ok(message)) = receiver.next().await {
            match message {
                Message::Binary(data) if data.first() == Some(&0) => {
                    if let Some(stdin) = stdin.as_mut() {
                        let _ = stdin.write_all(&data[1..]).await;
                    }
                }
                Message::Binary(data) if v5 && data.as_ref() == [255, 0] => {
                    if let Some(mut stdin) = stdin.take() {
                        let _ = stdin.shutdown().await;
                    }
                    if !has_output {
                        break;
                    }
                }
                Message::Close(_) => break,
                _ => {}
            }
        }
        if let Some(mut stdin) = stdin.take() {
            let _ = stdin.shutdown().await;
        }
    };
    let writer = async {
        while let Some(frame) = outgoing.recv().await {
            if sender.send(Message::Binary(frame.into())).await.is_err() {
                // The client is gone.
                return;
            }
        }
        // No output left to send: the attachment ends with the reader.
        std::future::pending::<()>().await;
    };
    let done = async {
        if let Some(output) = output {
            let _ = output.await;
        }
    };
    drop(frames);
    // The attachment ends when the container's output ends (it exited), or, with no output
    // asked for, when the client closes stdin.
    {
        tokio::pin!(reader, done, writer);
        let mut reader_done = false;
        loop {
            tokio::select! {
                _ = &mut reader, if !reader_done => {
                    reader_done = true;
                    if !has_output {
                        break;
                    }
                }
                _ = &mut done, if has_output => break,
                _ = &mut writer => break,
            }
        }
    }
    while let Ok(frame) = outgoing.try_recv() {
        let _ = sender.send(Message::Binary(frame.into())).await;
    }
    let mut status = vec![3u8];
    status.extend_from_slice(br#"{"metadata":{},"status":"Success"}"#);
    let _ = sender.send(Message::Binary(status.into())).await;
    // A normal closure (1000): kubectl reports a close without a code as an error.
    let _ = sender
        .send(Message::Close(Some(axum::extract::ws::CloseFrame {
            code: 1000,
            reason: "".into(),
        })))
        .await;
}

/// Output of an attached container as frames of one channel.
struct ChannelSink {
    channel: u8,
    frames: Option<tokio::sync::mpsc::Sender<Vec<u8>>>,
}

impl tokio::io::AsyncWrite for ChannelSink {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        context: &mut std::task::Context<'_>,
        buffer: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let Some(frames) = &self.frames else {
            return std::task::Poll::Ready(Ok(buffer.len()));
        };
        let length = buffer.len().min(32 * 1024);
        let mut frame = Vec::with_capacity(length + 1);
        frame.push(self.channel);
        frame.extend_from_slice(&buffer[..length]);
        match frames.try_send(frame) {
            Ok(()) => std::task::Poll::Ready(Ok(length)),
            Err(tokio::sync::mpsc::error::TrySendError::Full(_)) => {
                context.waker().wake_by_ref();
                std::task::Poll::Pending
            }
            Err(_) => std::task::Poll::Ready(Err(std::io::ErrorKind::BrokenPipe.into())),
        }
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}

async fn create_claim(
    State(fake): State<Arc<Fake>>,
    UrlPath(namespace): UrlPath<String>,
    body: Bytes,
) -> Reply {
    let mut claim: PersistentVolumeClaim =
        received("io.k8s.api.core.v1.PersistentVolumeClaim", &body)?;
    let Some(name) = claim.metadata.name.clone() else {
        return Err(failure(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Invalid",
            "PersistentVolumeClaim: metadata.name: Required value".into(),
            None,
        ));
    };
    let key = (namespace.clone(), name.clone());
    let exists = || {
        failure(
            StatusCode::CONFLICT,
            "AlreadyExists",
            format!("persistentvolumeclaims \"{name}\" already exists"),
            Some(json!({"name": name, "kind": "persistentvolumeclaims"})),
        )
    };
    if fake.objects().claims.contains_key(&key) {
        return Err(exists());
    }
    // A dynamic provisioner binds the claim to a new volume: here, a Docker volume.
    let volume = fake
        .docker
        .create_volume(&engine::engine_name(&namespace, &name), 0)
        .await
        .map_err(|error| {
            failure(
                StatusCode::INTERNAL_SERVER_ERROR,
                "InternalError",
                error.to_string(),
                None,
            )
        })?;
    claim.metadata.namespace = Some(namespace.clone());
    claim.metadata.uid = Some(format!("fake-{}", fake.next_version()));
    claim.metadata.resource_version = Some(fake.next_version());
    claim.status = Some(PersistentVolumeClaimStatus {
        phase: Some("Bound".to_owned()),
        access_modes: claim
            .spec
            .as_ref()
            .and_then(|spec| spec.access_modes.clone()),
        ..PersistentVolumeClaimStatus::default()
    });
    {
        let mut objects = fake.objects();
        if objects.claims.contains_key(&key) {
            return Err(exists());
        }
        objects
            .claims
            .insert(key, (claim.clone(), Arc::from(volume)));
    }
    object(
        StatusCode::CREATED,
        "io.k8s.api.core.v1.PersistentVolumeClaim",
        Fake::claim_value(&claim),
    )
}

async fn get_claim(
    State(fake): State<Arc<Fake>>,
    UrlPath((namespace, name)): UrlPath<(String, String)>,
) -> Reply {
    let claim = fake
        .objects()
        .claims
        .get(&(namespace, name.clone()))
        .map(|(claim, _)| claim.clone());
    match claim {
        Some(claim) => object(
            StatusCode::OK,
            "io.k8s.api.core.v1.PersistentVolumeClaim",
            Fake::claim_value(&claim),
        ),
        None => Err(not_found("persistentvolumeclaims", &name)),
    }
}

async fn list_claims(
    State(fake): State<Arc<Fake>>,
    UrlPath(namespace): UrlPath<String>,
    Query(query): Query<HashMap<String, String>>,
) -> Reply {
    let items: Vec<Value> = fake
        .objects()
        .claims
        .iter()
        .filter(|((ns, _), (claim, _))| {
            *ns == namespace && selects(query.get("labelSelector"), claim.metadata.labels.as_ref())
        })
        .map(|(_, (claim, _))| Fake::claim_value(claim))
        .collect();
    object(
        StatusCode::OK,
        "io.k8s.api.core.v1.PersistentVolumeClaimList",
        json!({"kind": "PersistentVolumeClaimList", "apiVersion": "v1", "metadata": {}, "items": items}),
    )
}

async fn remove_claims(fake: &Fake, keys: Vec<(String, String)>) -> Vec<PersistentVolumeClaim> {
    let entries: Vec<_> = {
        let mut objects = fake.objects();
        keys.iter()
            .filter_map(|key| objects.claims.remove(key))
            .collect()
    };
    let mut removed = Vec::new();
    for (claim, volume) in entries {
        let _ = volume.cleanup().await;
        removed.push(claim);
    }
    removed
}

async fn delete_claim(
    State(fake): State<Arc<Fake>>,
    UrlPath((namespace, name)): UrlPath<(String, String)>,
    body: Bytes,
) -> Reply {
    check_delete_options(&body)?;
    match remove_claims(&fake, vec![(namespace, name.clone())])
        .await
        .pop()
    {
        Some(claim) => object(
            StatusCode::OK,
            "io.k8s.api.core.v1.PersistentVolumeClaim",
            Fake::claim_value(&claim),
        ),
        None => Err(not_found("persistentvolumeclaims", &name)),
    }
}

async fn delete_claims(
    State(fake): State<Arc<Fake>>,
    UrlPath(namespace): UrlPath<String>,
    Query(query): Query<HashMap<String, String>>,
    body: Bytes,
) -> Reply {
    check_delete_options(&body)?;
    let keys: Vec<_> = fake
        .objects()
        .claims
        .iter()
        .filter(|((ns, _), (claim, _))| {
            *ns == namespace && selects(query.get("labelSelector"), claim.metadata.labels.as_ref())
        })
        .map(|(key, _)| key.clone())
        .collect();
    let items: Vec<Value> = remove_claims(&fake, keys)
        .await
        .iter()
        .map(Fake::claim_value)
        .collect();
    object(
        StatusCode::OK,
        "io.k8s.api.core.v1.PersistentVolumeClaimList",
        json!({"kind": "PersistentVolumeClaimList", "apiVersion": "v1", "metadata": {}, "items": items}),
    )
}

/// NetworkPolicies are kept only to decide which pods run offline. The vendored OpenAPI holds
/// core/v1 alone, so these bodies are checked for shape by hand, not against a schema.
async fn create_policy(
    State(fake): State<Arc<Fake>>,
    UrlPath(namespace): UrlPath<String>,
    body: Bytes,
) -> Reply {
    let mut policy: Value = serde_json::from_slice(&body).map_err(|error| {
        failure(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            error.to_string(),
            None,
        )
    })?;
    let Some(name) = policy["metadata"]["name"].as_str().map(str::to_owned) else {
        return Err(failure(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Invalid",
            "metadata.name: Required value".into(),
            None,
        ));
    };
    if !policy["spec"]["podSelector"].is_object() {
        return Err(failure(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Invalid",
            "spec.podSelector: Required value".into(),
            None,
        ));
    }
    let key = (namespace.clone(), name.clone());
    let mut objects = fake.objects();
    if objects.policies.contains_key(&key) {
        return Err(failure(
            StatusCode::CONFLICT,
            "AlreadyExists",
            format!("networkpolicies.networking.k8s.io \"{name}\" already exists"),
            Some(json!({"name": name, "kind": "networkpolicies"})),
        ));
    }
    policy["metadata"]["namespace"] = json!(namespace);
    objects.policies.insert(key, policy.clone());
    Ok((StatusCode::CREATED, Json(policy)).into_response())
}

async fn delete_policies(
    State(fake): State<Arc<Fake>>,
    UrlPath(namespace): UrlPath<String>,
    Query(query): Query<HashMap<String, String>>,
) -> Reply {
    let mut objects = fake.objects();
    let keys: Vec<_> = objects
        .policies
        .iter()
        .filter(|((ns, _), policy)| {
            let labels: BTreeMap<String, String> =
                serde_json::from_value(policy["metadata"]["labels"].clone()).unwrap_or_default();
            *ns == namespace && selects(query.get("labelSelector"), Some(&labels))
        })
        .map(|(key, _)| key.clone())
        .collect();
    let items: Vec<Value> = keys
        .iter()
        .filter_map(|key| objects.policies.remove(key))
        .collect();
    Ok(Json(
        json!({"kind": "NetworkPolicyList", "apiVersion": "networking.k8s.io/v1", "metadata": {}, "items": items}),
    ))
}
