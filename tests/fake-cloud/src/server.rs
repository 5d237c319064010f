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

type Shared = Arc<(Mutex<State0>, Spec)>;

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
}

impl Answer {
    pub(crate) fn json(status: u16, body: Value) -> Answer {
        Answer {
            status,
            body: Some(body),
        }
    }

    pub(crate) fn empty(status: u16) -> Answer {
        Answer { status, body: None }
    }
}

impl FakeCloud {
    /// Starts a fake of `api` on a free loopback port.
    pub async fn start(api: Api, options: FakeOptions) -> std::io::Result<FakeCloud> {
        let spec = match api {
            Api::Hetzner => Spec::hetzner(),
            Api::DigitalOcean => Spec::digitalocean(crate::digitalocean::PATHS),
        };
        let shared: Shared = Arc::new((
            Mutex::new(State0 {
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
        ));
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
        self.shared.0.lock().unwrap_or_else(PoisonError::into_inner)
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
    let (state, spec) = &*shared;
    let path = uri.path().to_owned();
    let mut state = state.lock().unwrap_or_else(PoisonError::into_inner);
    let answer = answer(&mut state, spec, &method, &path, &headers, &query, &body);
    let (mut answer, extra_headers) = answer;
    if let Err(violation) =
        spec.check_response(method.as_str(), &path, answer.status, answer.body.as_ref())
    {
        // The fake's own bug: a 500 makes the driver, and so the test, fail.
        tracing::error!(%violation, "fake cloud response breaks the spec");
        state.violations.push(format!("response: {violation}"));
        answer = match state.api {
            Api::Hetzner => Answer::json(
                500,
                serde_json::json!({"error": {"code": "server_error", "message": violation, "details": {}}}),
            ),
            Api::DigitalOcean => Answer::json(
                500,
                serde_json::json!({"id": "server_error", "message": violation, "request_id": "fake"}),
            ),
        };
    }
    state.requests.push(Recorded {
        method: method.to_string(),
        path: path.clone(),
        status: answer.status,
    });
    let status = StatusCode::from_u16(answer.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut response = match answer.body {
        Some(body) => (status, axum::Json(body)).into_response(),
        None => status.into_response(),
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

fn answer(
    state: &mut State0,
    spec: &Spec,
    method: &Method,
    path: &str,
    headers: &HeaderMap,
    query: &[(String, String)],
    body: &[u8],
) -> (Answer, Vec<(String, String)>) {
    let api = state.api;
    let error = |status: u16, code: &str, message: &str| match api {
        Api::Hetzner => Answer::json(
            status,
            serde_json::json!({"error": {"code": code, "message": message, "details": {}}}),
        ),
        Api::DigitalOcean => Answer::json(
            status,
            serde_json::json!({"id": code, "message": message, "request_id": "fake"}),
        ),
    };
    let token = headers
        .get("authorization")
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "));
    if !token.is_some_and(|token| state.options.tokens.iter().any(|known| known == token)) {
        return (
            error(401, "unauthorized", "Unable to authenticate you"),
            Vec::new(),
        );
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
        return (answer, headers);
    }
    let parsed = if body.is_empty() {
        None
    } else {
        match serde_json::from_slice::<Value>(body) {
            Ok(value) => Some(value),
            Err(parse) => {
                return (
                    error(400, "json_error", &format!("invalid JSON: {parse}")),
                    Vec::new(),
                );
            }
        }
    };
    if let Err(violation) = spec.check_request(method.as_str(), path, query, parsed.as_ref()) {
        tracing::error!(%violation, "request breaks the spec");
        state.violations.push(format!("request: {violation}"));
        return (error(422, "invalid_input", &violation), Vec::new());
    }
    let template = spec.template(path).unwrap_or_default().to_owned();
    let answer = match api {
        Api::Hetzner => {
            crate::hetzner::handle(state, spec, method.as_str(), &template, path, query, parsed)
        }
        Api::DigitalOcean => crate::digitalocean::handle(
            state,
            spec,
            method.as_str(),
            &template,
            path,
            query,
            parsed,
        ),
    };
    state.peak_servers = state.peak_servers.max(state.servers.len());
    (answer, Vec::new())
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
