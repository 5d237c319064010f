//! The HTTP side: one axum fallback handler that authenticates, checks the request against the
//! spec, hands it to the provider's state machine, and checks the response before sending it.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};

use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::Value;

use crate::openapi::Spec;

/// Which API a fake speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    Hetzner,
    DigitalOcean,
    /// Fly Machines: each machine is a container on the Docker engine of `DOCKER_HOST`.
    Fly,
}

/// How a fake behaves.
#[derive(Debug, Clone)]
pub struct FakeOptions {
    /// Bearer tokens it accepts.
    pub tokens: Vec<String>,
    /// The public IPv4 every server gets: where the test sshd listens.
    pub server_address: String,
    /// An sshd's `authorized_keys`: the keys a server is created with are added to it, as
    /// cloud-init adds them on a real server, and removed when the last server holding them is
    /// deleted.
    pub authorized_keys: Option<PathBuf>,
    /// GETs of a new server answered with its booting status before it runs.
    pub boot_polls: u32,
}

impl Default for FakeOptions {
    fn default() -> Self {
        FakeOptions {
            tokens: vec!["fake-cloud-token".to_owned()],
            server_address: "127.0.0.1".to_owned(),
            authorized_keys: None,
            boot_polls: 1,
        }
    }
}

/// One request as the fake received it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recorded {
    pub method: String,
    pub path: String,
    pub status: u16,
}

/// A failure to answer with instead of handling, for the next `times` requests that match.
#[derive(Debug, Clone)]
pub struct Fault {
    pub method: Method,
    /// The request path starts with this.
    pub path: String,
    pub status: u16,
    pub body: Value,
    pub headers: Vec<(String, String)>,
    pub times: u32,
}

/// A server (Hetzner) or droplet (DigitalOcean) of the fake.
#[derive(Debug, Clone)]
pub struct FakeServer {
    pub id: u64,
    pub name: String,
    /// Hetzner labels, or DigitalOcean tags as `tag → ""`.
    pub labels: BTreeMap<String, String>,
    /// The public keys it was created with.
    pub public_keys: Vec<String>,
    /// The API representation.
    pub(crate) object: Value,
    pub(crate) polls: u32,
}

#[derive(Debug, Clone)]
pub(crate) struct FakeKey {
    pub(crate) id: u64,
    pub(crate) name: String,
    pub(crate) public_key: String,
    pub(crate) object: Value,
}

#[derive(Debug)]
pub(crate) struct State0 {
    pub(crate) api: Api,
    pub(crate) options: FakeOptions,
    pub(crate) servers: BTreeMap<u64, FakeServer>,
    pub(crate) keys: BTreeMap<u64, FakeKey>,
    /// DigitalOcean's tags (they exist apart from what they tag).
    pub(crate) tags: std::collections::BTreeSet<String>,
    pub(crate) next_id: u64,
    pub(crate) requests: Vec<Recorded>,
    pub(crate) violations: Vec<String>,
    pub(crate) faults: Vec<Fault>,
    /// Most servers that existed at once.
    pub(crate) peak_servers: usize,
}

impl State0 {
    pub(crate) fn next_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }
}

/// What every request of one fake shares.
#[derive(Debug)]
pub(crate) struct Fake {
    state: Mutex<State0>,
    spec: Spec,
    /// Fly's machines and volumes, handled with the state's lock released (they await Docker).
    fly: Option<crate::fly::Fly>,
}

type Shared = Arc<Fake>;

/// A fake provider API on `127.0.0.1`, serving on the runtime it was started on.
#[derive(Debug, Clone)]
pub struct FakeCloud {
    pub address: SocketAddr,
    shared: Shared,
}

/// What a provider handler answers.
pub(crate) struct Answer {
    pub(crate) status: u16,
    pub(crate) body: Option<Value>,
    /// An `application/octet-stream` body instead (Fly's `exec`).
    pub(crate) raw: Option<Vec<u8>>,
}

impl Answer {
    pub(crate) fn json(status: u16, body: Value) -> Answer {
        Answer {
            status,
            body: Some(body),
            raw: None,
        }
    }

    pub(crate) fn empty(status: u16) -> Answer {
        Answer {
            status,
            body: None,
            raw: None,
        }
    }

    pub(crate) fn raw(status: u16, bytes: Vec<u8>) -> Answer {
        Answer {
            status,
            body: None,
            raw: Some(bytes),
        }
    }

    /// An error in `api`'s own shape: Hetzner `{"error":{"code","message"}}`, DigitalOcean
    /// `{"id","message"}`, Fly `{"error"}`.
    pub(crate) fn error(api: Api, status: u16, code: &str, message: &str) -> Answer {
        Answer::json(
            status,
            match api {
                Api::Hetzner => {
                    serde_json::json!({"error": {"code": code, "message": message, "details": {}}})
                }
                Api::DigitalOcean => {
                    serde_json::json!({"id": code, "message": message, "request_id": "fake"})
                }
                Api::Fly => serde_json::json!({"error": message}),
            },
        )
    }
}

impl FakeCloud {
    /// Starts a fake of `api` on a free loopback port. The Fly fake needs the Docker engine of
    /// `DOCKER_HOST` (or the default socket) and fails when it does not answer.
    pub async fn start(api: Api, options: FakeOptions) -> std::io::Result<FakeCloud> {
        let spec = match api {
            Api::Hetzner => Spec::hetzner(),
            Api::DigitalOcean => Spec::digitalocean(crate::digitalocean::PATHS),
            Api::Fly => Spec::fly(),
        };
        let fly = match api {
            Api::Fly => Some(crate::fly::Fly::connect().await?),
            _ => None,
        };
        let shared: Shared = Arc::new(Fake {
            state: Mutex::new(State0 {
                api,
                options,
                servers: BTreeMap::new(),
                keys: BTreeMap::new(),
                tags: Default::default(),
                next_id: 1000,
                requests: Vec::new(),
                violations: Vec::new(),
                faults: Vec::new(),
                peak_servers: 0,
            }),
            spec,
            fly,
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let address = listener.local_addr()?;
        let router = axum::Router::new()
            .fallback(handle)
            .with_state(shared.clone());
        tokio::spawn(async move {
            if let Err(error) = axum::serve(listener, router).await {
                tracing::error!(%error, "fake cloud API stopped");
            }
        });
        Ok(FakeCloud { address, shared })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State0> {
        self.shared
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Fly: the machines that exist (not destroyed), as `(app, id, state)`.
    pub fn fly_machines(&self) -> Vec<(String, String, String)> {
        self.shared
            .fly
            .as_ref()
            .map(crate::fly::Fly::machines)
            .unwrap_or_default()
    }

    /// Fly: the apps and their volumes that exist, as `(app, volume name)` (a `""` name for an
    /// app without volumes).
    pub fn fly_apps(&self) -> Vec<(String, String)> {
        self.shared
            .fly
            .as_ref()
            .map(crate::fly::Fly::apps)
            .unwrap_or_default()
    }

    /// The base URL to give a driver as `endpoint`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.address)
    }

    /// Every request so far.
    pub fn requests(&self) -> Vec<Recorded> {
        self.state().requests.clone()
    }

    /// Requests or responses that broke the spec (answered with 422 and 500, so the driver fails
    /// too). A test asserts this is empty.
    pub fn violations(&self) -> Vec<String> {
        self.state().violations.clone()
    }

    pub fn servers(&self) -> Vec<FakeServer> {
        self.state().servers.values().cloned().collect()
    }

    /// Names of the ssh keys it holds.
    pub fn keys(&self) -> Vec<String> {
        self.state()
            .keys
            .values()
            .map(|key| key.name.clone())
            .collect()
    }

    /// Most servers that existed at the same time.
    pub fn peak_servers(&self) -> usize {
        self.state().peak_servers
    }

    /// Deletes every server (revoking its keys from the sshd), as a test's last step when it
    /// leaves parked servers behind.
    pub fn remove_all_servers(&self) {
        let mut state = self.state();
        let servers = std::mem::take(&mut state.servers);
        let keys: Vec<String> = servers
            .values()
            .flat_map(|server| server.public_keys.clone())
            .collect();
        revoke(&state, &keys);
    }

    pub fn inject(&self, fault: Fault) {
        self.state().faults.push(fault);
    }

    /// Sets a server's labels behind the driver's back (a parked server from an earlier
    /// run, a clock moved forward).
    pub fn set_labels(&self, id: u64, labels: BTreeMap<String, String>) {
        let mut state = self.state();
        let api = state.api;
        if let Some(server) = state.servers.get_mut(&id) {
            server.labels = labels;
            match api {
                Api::Hetzner => crate::hetzner::sync(server),
                Api::DigitalOcean => crate::digitalocean::sync(server),
                Api::Fly => {}
            }
        }
    }
}

async fn handle(
    State(shared): State<Shared>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    Query(query): Query<Vec<(String, String)>>,
    body: Bytes,
) -> Response {
    let spec = &shared.spec;
    let path = uri.path().to_owned();
    let lock = || shared.state.lock().unwrap_or_else(PoisonError::into_inner);
    let prepared = prepare(&mut lock(), spec, &method, &path, &headers, &query, &body);
    let (mut answer, extra_headers) = match prepared {
        Err(early) => early,
        Ok(parsed) => {
            let template = spec.template(&path).unwrap_or_default().to_owned();
            let answer = match &shared.fly {
                Some(fly) => {
                    fly.handle(spec, method.as_str(), &template, &path, &query, parsed)
                        .await
                }
                None => {
                    let mut state = lock();
                    let handle = match state.api {
                        Api::Hetzner => crate::hetzner::handle,
                        _ => crate::digitalocean::handle,
                    };
                    let answer = handle(
                        &mut state,
                        spec,
                        method.as_str(),
                        &template,
                        &path,
                        &query,
                        parsed,
                    );
                    state.peak_servers = state.peak_servers.max(state.servers.len());
                    answer
                }
            };
            (answer, Vec::new())
        }
    };
    let mut state = lock();
    let checked = match &answer.raw {
        Some(_) => spec.check_raw_response(method.as_str(), &path, answer.status),
        None => spec.check_response(method.as_str(), &path, answer.status, answer.body.as_ref()),
    };
    if let Err(violation) = checked {
        // The fake's own bug: a 500 makes the driver, and so the test, fail.
        tracing::error!(%violation, "fake cloud response breaks the spec");
        state.violations.push(format!("response: {violation}"));
        answer = Answer::error(state.api, 500, "server_error", &violation);
    }
    state.requests.push(Recorded {
        method: method.to_string(),
        path: path.clone(),
        status: answer.status,
    });
    drop(state);
    let status = StatusCode::from_u16(answer.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut response = match (answer.raw, answer.body) {
        (Some(raw), _) => (
            status,
            [(axum::http::header::CONTENT_TYPE, "application/octet-stream")],
            raw,
        )
            .into_response(),
        (None, Some(body)) => (status, axum::Json(body)).into_response(),
        (None, None) => status.into_response(),
    };
    for (name, value) in extra_headers {
        if let (Ok(name), Ok(value)) = (
            axum::http::HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(&value),
        ) {
            response.headers_mut().insert(name, value);
        }
    }
    response
}

/// An answer sent instead of the handler's, with extra headers (a fault's rate-limit ones).
type Early = (Answer, Vec<(String, String)>);

/// What every API does before its handler: the bearer token, injected faults, a JSON body and
/// the request against the spec. `Err` is the answer to send instead.
fn prepare(
    state: &mut State0,
    spec: &Spec,
    method: &Method,
    path: &str,
    headers: &HeaderMap,
    query: &[(String, String)],
    body: &[u8],
) -> Result<Option<Value>, Early> {
    let api = state.api;
    let token = headers
        .get("authorization")
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "));
    if !token.is_some_and(|token| state.options.tokens.iter().any(|known| known == token)) {
        return Err((
            Answer::error(api, 401, "unauthorized", "Unable to authenticate you"),
            Vec::new(),
        ));
    }
    if let Some(index) = state
        .faults
        .iter()
        .position(|fault| fault.method == method && path.starts_with(&fault.path))
    {
        let fault = &mut state.faults[index];
        fault.times = fault.times.saturating_sub(1);
        let answer = Answer::json(fault.status, fault.body.clone());
        let headers = fault.headers.clone();
        if fault.times == 0 {
            state.faults.remove(index);
        }
        return Err((answer, headers));
    }
    let parsed = if body.is_empty() {
        None
    } else {
        match serde_json::from_slice::<Value>(body) {
            Ok(value) => Some(value),
            Err(parse) => {
                return Err((
                    Answer::error(api, 400, "json_error", &format!("invalid JSON: {parse}")),
                    Vec::new(),
                ));
            }
        }
    };
    if let Err(violation) = spec.check_request(method.as_str(), path, query, parsed.as_ref()) {
        tracing::error!(%violation, "request breaks the spec");
        state.violations.push(format!("request: {violation}"));
        return Err((
            Answer::error(api, 422, "invalid_input", &violation),
            Vec::new(),
        ));
    }
    Ok(parsed)
}

/// Lines added to the sshd's `authorized_keys` are shared by every fake of the process.
static AUTHORIZED_KEYS: Mutex<()> = Mutex::new(());

/// Adds `keys` to the file (a server was created with them).
pub(crate) fn authorize(options: &FakeOptions, keys: &[String]) {
    let Some(path) = &options.authorized_keys else {
        return;
    };
    let _guard = AUTHORIZED_KEYS
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    let mut text = std::fs::read_to_string(path).unwrap_or_default();
    for key in keys {
        if !text.lines().any(|line| line == key) {
            if !text.is_empty() && !text.ends_with('\n') {
                text.push('\n');
            }
            text.push_str(key);
            text.push('\n');
        }
    }
    if let Err(error) = std::fs::write(path, text) {
        tracing::error!(%error, path = %path.display(), "cannot authorize the server's keys");
    }
}

/// Removes `keys` from the file unless a server still holds them.
pub(crate) fn revoke(state: &State0, keys: &[String]) {
    let Some(path) = &state.options.authorized_keys else {
        return;
    };
    let still_used = |key: &String| {
        state
            .servers
            .values()
            .any(|server| server.public_keys.contains(key))
    };
    let _guard = AUTHORIZED_KEYS
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    let Ok(text) = std::fs::read_to_string(path) else {
        return;
    };
    let kept: Vec<&str> = text
        .lines()
        .filter(|line| !keys.iter().any(|key| key == line && !still_used(key)))
        .collect();
    let mut out = kept.join("\n");
    out.push('\n');
    let _ = std::fs::write(path, out);
}

/// A page of `items` and the Hetzner pagination `meta`.
pub(crate) fn page(
    items: Vec<Value>,
    query: &[(String, String)],
    default_per_page: usize,
) -> (Vec<Value>, usize, usize, usize) {
    let number = |name: &str, default: usize| {
        query
            .iter()
            .find(|(key, _)| key == name)
            .and_then(|(_, value)| value.parse::<usize>().ok())
            .unwrap_or(default)
            .max(1)
    };
    let per_page = number("per_page", default_per_page);
    let page = number("page", 1);
    let total = items.len();
    let taken = items
        .into_iter()
        .skip((page - 1) * per_page)
        .take(per_page)
        .collect();
    (taken, page, per_page, total)
}
