//! The executor's side of the orchestrator: fetch a result into the local store (checked
//! before a byte of it is replayed) and publish one after a successful run.
//!
//! Blocking (ureq): the job waits on each call anyway, and one connection at a time is what a
//! fetch of a few blobs needs.

use std::collections::HashSet;
use std::fs::File;
use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ci_exec_job::store::{ImportError, ResultRecord, ResultStore};

use crate::identity::{self, ExecutorKey, PublicKey};
use crate::wire::{ErrorBody, Login, MAX_RECORD_BYTES, Route, TrustedKeys};

/// How long a connection may take before the orchestrator counts as down: a job never waits
/// longer than this for one that is unreachable.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long the orchestrator may take to start answering a request.
pub const RESPONSE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Default)]
pub struct ClientOptions {
    /// `https://host[:port]` (or `http://127.0.0.1:port`), without a path.
    pub url: String,
    pub token: Option<String>,
    /// A CI job's OIDC ID token, traded for a session token by [`Orchestrator::log_in`].
    pub id_token: Option<String>,
    pub repository: String,
    /// Trust this CA (PEM) for the orchestrator's certificate, instead of the public roots.
    pub ca: Option<PathBuf>,
    /// Present this client certificate and key (PEM), for an orchestrator that requires them.
    pub client_certificate: Option<(PathBuf, PathBuf)>,
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("orchestrator `{url}` is unreachable")]
    Unreachable {
        url: String,
        #[source]
        source: ureq::Error,
    },
    #[error("orchestrator `{url}` refused the request ({status}): {message}")]
    Refused {
        url: String,
        status: u16,
        message: String,
    },
    #[error("cannot read `{}` for the orchestrator connection", path.display())]
    Config {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the orchestrator's login answer is malformed: {reason}")]
    BadLogin { reason: String },
    #[error("`{}` holds no usable PEM {what}", path.display())]
    Pem { path: PathBuf, what: &'static str },
    #[error("the local result store failed")]
    Store(#[from] ci_exec_job::JobError),
}

/// What a fetch found.
#[derive(Debug)]
pub enum Fetched {
    /// The orchestrator has no result for the key.
    Miss,
    /// The result and every blob are now in the local store, checked.
    Stored(Box<ResultRecord>),
    /// The orchestrator has a result, but it is not trustworthy: the reason, for a warning.
    Untrusted(String),
}

/// What a publish did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Published {
    Created,
    /// This very record was already there.
    AlreadyThere,
    /// The token may only read.
    ReadOnly,
    /// Another record holds the key (write-once): the run disagrees with a published one.
    Conflict,
}

#[derive(Debug, Clone)]
pub struct Orchestrator {
    url: String,
    token: Option<String>,
    id_token: Option<String>,
    repository: String,
    agent: ureq::Agent,
    tls: ureq::tls::TlsConfig,
}

/// How long a whole body (a large artifact) may take to arrive.
pub const BODY_TIMEOUT: Duration = Duration::from_secs(600);

/// An agent that gives up connecting after [`CONNECT_TIMEOUT`], waiting for a response after
/// `wait`, and receiving it after [`BODY_TIMEOUT`].
fn agent(tls: &ureq::tls::TlsConfig, wait: Duration) -> ureq::Agent {
    ureq::Agent::config_builder()
        .timeout_connect(Some(CONNECT_TIMEOUT))
        .timeout_recv_response(Some(wait))
        .timeout_recv_body(Some(BODY_TIMEOUT))
        .http_status_as_error(false)
        .tls_config(tls.clone())
        .build()
        .into()
}

impl Orchestrator {
    pub fn new(options: ClientOptions) -> Result<Orchestrator, ClientError> {
        let mut tls = ureq::tls::TlsConfig::builder();
        if let Some(ca) = &options.ca {
            let certificates = read_certificates(ca)?;
            tls = tls.root_certs(ureq::tls::RootCerts::new_with_certs(&certificates));
        }
        if let Some((certificate, key)) = &options.client_certificate {
            let chain = read_certificates(certificate)?;
            let pem = read(key)?;
            let key = ureq::tls::PrivateKey::from_pem(&pem).map_err(|_| ClientError::Pem {
                path: key.clone(),
                what: "private key",
            })?;
            tls = tls.client_cert(Some(ureq::tls::ClientCert::new_with_certs(&chain, key)));
        }
        let tls = tls.build();
        Ok(Orchestrator {
            url: options.url.trim_end_matches('/').to_owned(),
            token: options.token,
            id_token: options.id_token,
            repository: options.repository,
            agent: agent(&tls, RESPONSE_TIMEOUT),
            tls,
        })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn repository(&self) -> &str {
        &self.repository
    }

    /// A connected session serving results of this repository from `store`.
    pub fn connect(&self, key: ExecutorKey) -> Connected {
        let mut nonce = [0u8; 16];
        let _ = getrandom::fill(&mut nonce);
        let poll = agent(
            &self.tls,
            crate::server::relay::POLL_WAIT + RESPONSE_TIMEOUT,
        );
        Connected {
            orchestrator: self.clone(),
            poll,
            session: hex::encode(nonce),
            key,
            announced: std::sync::Mutex::new(HashSet::new()),
        }
    }

    /// Trades the ID token for a session token, used for every later request. `None` when
    /// there is no ID token (the bearer token or certificate is used as it is).
    pub fn log_in(&mut self) -> Result<Option<Login>, ClientError> {
        let Some(id_token) = self.id_token.take() else {
            return Ok(None);
        };
        let route = Route::Login {
            repository: self.repository.clone(),
        };
        let mut response = self
            .agent
            .post(self.address(&route))
            .header("Authorization", format!("Bearer {id_token}"))
            .send_empty()
            .map_err(|error| self.unreachable(error))?;
        if response.status().as_u16() != 200 {
            return Err(self.refused(response));
        }
        let body = response
            .body_mut()
            .with_config()
            .limit(64 * 1024)
            .read_to_string()
            .map_err(|error| self.unreachable(error))?;
        let login: Login = serde_json::from_str(&body).map_err(|error| ClientError::BadLogin {
            reason: error.to_string(),
        })?;
        self.token = Some(login.token.clone());
        Ok(Some(login))
    }

    fn address(&self, route: &Route) -> String {
        format!("{}{}", self.url, route.path())
    }

    fn authorized<B>(&self, request: ureq::RequestBuilder<B>) -> ureq::RequestBuilder<B> {
        match &self.token {
            Some(token) => request.header("Authorization", format!("Bearer {token}")),
            None => request,
        }
    }

    /// An authorized `GET` of `route`; any status is returned for the caller to judge.
    fn get(&self, route: &Route) -> Result<ureq::http::Response<ureq::Body>, ClientError> {
        self.authorized(self.agent.get(self.address(route)))
            .call()
            .map_err(|error| self.unreachable(error))
    }

    /// A record-sized body as text ([`MAX_RECORD_BYTES`] at most).
    fn small_body(
        &self,
        response: &mut ureq::http::Response<ureq::Body>,
    ) -> Result<String, ClientError> {
        response
            .body_mut()
            .with_config()
            .limit(MAX_RECORD_BYTES as u64)
            .read_to_string()
            .map_err(|error| self.unreachable(error))
    }

    fn unreachable(&self, source: ureq::Error) -> ClientError {
        ClientError::Unreachable {
            url: self.url.clone(),
            source,
        }
    }

    fn refused(&self, mut response: ureq::http::Response<ureq::Body>) -> ClientError {
        let status = response.status().as_u16();
        let message = response
            .body_mut()
            .with_config()
            .limit(64 * 1024)
            .read_to_string()
            .ok()
            .and_then(|body| serde_json::from_str::<ErrorBody>(&body).ok())
            .map(|body| body.error)
            .unwrap_or_else(|| {
                response
                    .status()
                    .canonical_reason()
                    .unwrap_or("unexpected status")
                    .to_owned()
            });
        ClientError::Refused {
            url: self.url.clone(),
            status,
            message,
        }
    }

    /// Looks `key` up and, when the orchestrator has it, brings the record and its blobs into
    /// `store` — only if the record is signed by a key the repository trusts (the
    /// orchestrator's list, `pinned`, or this executor's own) and every blob matches its
    /// digest. Nothing untrusted is stored.
    pub fn fetch(
        &self,
        key: &str,
        store: &ResultStore,
        pinned: &[PublicKey],
        own: &PublicKey,
    ) -> Result<Fetched, ClientError> {
        let route = Route::Result {
            repository: self.repository.clone(),
            key: key.to_owned(),
        };
        let mut response = self.get(&route)?;
        match response.status().as_u16() {
            200 => {}
            404 => return Ok(Fetched::Miss),
            _ => return Err(self.refused(response)),
        }
        let body = self.small_body(&mut response)?;
        let record: ResultRecord = match serde_json::from_str(&body) {
            Ok(record) => record,
            Err(error) => {
                return Ok(Fetched::Untrusted(format!(
                    "its record is malformed ({error})"
                )));
            }
        };
        if record.key != key || !record.succeeded() {
            return Ok(Fetched::Untrusted(
                "its record is not a successful result of this key".into(),
            ));
        }
        let mut trusted = self.trusted_keys()?;
        trusted.extend(pinned.iter().cloned());
        trusted.push(own.clone());
        if let Err(problem) = identity::verify(&record, &trusted) {
            return Ok(Fetched::Untrusted(format!(
                "its record is refused: {problem}"
            )));
        }
        let mut seen = HashSet::new();
        for (sha256, size) in record.blobs() {
            if !seen.insert(sha256) || store.check_blob(sha256, size).is_ok() {
                continue;
            }
            let route = Route::Blob {
                repository: self.repository.clone(),
                sha256: sha256.to_owned(),
            };
            let mut response = self.get(&route)?;
            if response.status().as_u16() != 200 {
                return Ok(Fetched::Untrusted(format!(
                    "its blob `{sha256}` cannot be fetched ({})",
                    self.refused(response)
                )));
            }
            // One byte past the recorded size is enough to tell that the content is not it.
            let mut reader = response
                .body_mut()
                .with_config()
                .limit(u64::MAX)
                .reader()
                .take(size.saturating_add(1));
            match store.import_blob(sha256, size, &mut reader) {
                Ok(()) => {}
                Err(ImportError::Mismatch { .. }) => {
                    return Ok(Fetched::Untrusted(format!(
                        "its blob `{sha256}` does not match its digest (damaged or tampered with on the orchestrator)"
                    )));
                }
                Err(ImportError::Read(source)) => {
                    return Err(self.unreachable(ureq::Error::Io(source)));
                }
                Err(ImportError::Write { path, source }) => {
                    return Err(ClientError::Store(ci_exec_job::JobError::Io {
                        action: "write",
                        path,
                        source,
                    }));
                }
            }
        }
        store.put_record(&record)?;
        Ok(Fetched::Stored(Box::new(record)))
    }

    /// The keys the orchestrator trusts for this repository.
    pub fn trusted_keys(&self) -> Result<Vec<PublicKey>, ClientError> {
        let route = Route::Keys {
            repository: self.repository.clone(),
        };
        let mut response = self.get(&route)?;
        if response.status().as_u16() != 200 {
            return Err(self.refused(response));
        }
        let body = self.small_body(&mut response)?;
        let keys: TrustedKeys = serde_json::from_str(&body).unwrap_or_default();
        // One bad entry must not hide the good ones.
        Ok(keys
            .keys
            .iter()
            .filter_map(|key| PublicKey::parse(key).ok())
            .collect())
    }

    /// Signs `record` with `key` and publishes it with its blobs (those the orchestrator
    /// lacks), blobs first, so that a record the orchestrator accepts is complete.
    pub fn publish(
        &self,
        record: &ResultRecord,
        store: &ResultStore,
        key: &ExecutorKey,
    ) -> Result<Published, ClientError> {
        let mut record = record.clone();
        record.repository = Some(self.repository.clone());
        key.sign(&mut record);
        let mut seen = HashSet::new();
        for (sha256, size) in record.blobs() {
            if !seen.insert(sha256) {
                continue;
            }
            let route = Route::Blob {
                repository: self.repository.clone(),
                sha256: sha256.to_owned(),
            };
            let response = self
                .authorized(self.agent.head(self.address(&route)))
                .call()
                .map_err(|error| self.unreachable(error))?;
            match response.status().as_u16() {
                200 => continue,
                404 => {}
                _ => return Err(self.refused(response)),
            }
            let path = store.blob_file(sha256);
            let file = File::open(&path).map_err(|source| {
                ClientError::Store(ci_exec_job::JobError::Io {
                    action: "read",
                    path: path.clone(),
                    source,
                })
            })?;
            let response = self
                .authorized(self.agent.put(self.address(&route)))
                .header("Content-Type", "application/octet-stream")
                .header("Content-Length", size.to_string())
                .send(ureq::SendBody::from_owned_reader(file.take(size)))
                .map_err(|error| self.unreachable(error))?;
            match response.status().as_u16() {
                200 | 201 => {}
                403 => return Ok(Published::ReadOnly),
                _ => return Err(self.refused(response)),
            }
        }
        let route = Route::Result {
            repository: self.repository.clone(),
            key: record.key.clone(),
        };
        let json = serde_json::to_string(&record).map_err(|error| {
            ClientError::Store(ci_exec_job::JobError::DamagedRecord {
                path: PathBuf::from(&record.key),
                source: error,
            })
        })?;
        let response = self
            .authorized(self.agent.put(self.address(&route)))
            .header("Content-Type", "application/json")
            .send(json.as_str())
            .map_err(|error| self.unreachable(error))?;
        match response.status().as_u16() {
            201 => Ok(Published::Created),
            200 => Ok(Published::AlreadyThere),
            403 => Ok(Published::ReadOnly),
            409 => Ok(Published::Conflict),
            _ => Err(self.refused(response)),
        }
    }
}

/// A connected executor: it announces the results it holds and answers the orchestrator's
/// relayed requests for them until it leaves.
#[derive(Debug)]
pub struct Connected {
    orchestrator: Orchestrator,
    /// For the long polls, which wait longer than other requests may.
    poll: ureq::Agent,
    session: String,
    key: ExecutorKey,
    /// The blobs announced: the only ones served (the local store holds other repositories'
    /// too).
    announced: std::sync::Mutex<HashSet<String>>,
}

impl Connected {
    fn route(&self, tail: &str) -> String {
        let route = Route::Session {
            repository: self.orchestrator.repository.clone(),
            session: self.session.clone(),
        };
        format!("{}{tail}", self.orchestrator.address(&route))
    }

    /// Says which results (`records`) this executor serves.
    pub fn announce(&self, records: &[ResultRecord]) -> Result<(), ClientError> {
        let keys: Vec<String> = records.iter().map(|record| record.key.clone()).collect();
        let blobs: HashSet<String> = records
            .iter()
            .flat_map(|record| record.blobs().map(|(sha, _)| sha.to_owned()))
            .collect();
        let announcement = crate::wire::Announcement {
            signer: self.key.public().to_string(),
            signature: self.key.sign_bytes(&crate::wire::announcement_bytes(
                &self.orchestrator.repository,
                &self.session,
            )),
            keys,
            blobs: blobs.iter().cloned().collect(),
        };
        let json = serde_json::to_string(&announcement).unwrap_or_default();
        let response = self
            .orchestrator
            .authorized(self.orchestrator.agent.put(self.route("")))
            .header("Content-Type", "application/json")
            .send(json.as_str())
            .map_err(|error| self.orchestrator.unreachable(error))?;
        if response.status().as_u16() != 200 {
            return Err(self.orchestrator.refused(response));
        }
        *self
            .announced
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = blobs;
        Ok(())
    }

    /// Answers relayed requests until `stop` is set; `holdings` says what to serve (asked
    /// again after each request, so a daemon serves new results as they are recorded). An
    /// unreachable orchestrator is retried with a growing pause.
    pub fn serve(
        &self,
        store: &ResultStore,
        holdings: &dyn Fn() -> Vec<ResultRecord>,
        stop: &std::sync::atomic::AtomicBool,
    ) {
        use std::sync::atomic::Ordering;
        let mut pause = Duration::from_millis(500);
        let mut current: Vec<String> = Vec::new();
        let mut announced = false;
        while !stop.load(Ordering::Relaxed) {
            let records = holdings();
            let keys: Vec<String> = records.iter().map(|record| record.key.clone()).collect();
            if !announced || keys != current {
                match self.announce(&records) {
                    Ok(()) => {
                        announced = true;
                        current = keys;
                    }
                    Err(error) => {
                        tracing::warn!("cannot announce to the orchestrator: {error}");
                        std::thread::sleep(pause);
                        pause = (pause * 2).min(Duration::from_secs(30));
                        continue;
                    }
                }
            }
            let response = self
                .orchestrator
                .authorized(self.poll.get(self.route("/next")))
                .call();
            let mut response = match response {
                Ok(response) => response,
                Err(error) => {
                    if !stop.load(Ordering::Relaxed) {
                        tracing::warn!("lost the orchestrator: {error}; retrying");
                        std::thread::sleep(pause);
                        pause = (pause * 2).min(Duration::from_secs(30));
                    }
                    announced = false;
                    continue;
                }
            };
            pause = Duration::from_millis(500);
            match response.status().as_u16() {
                200 => {}
                204 => continue,
                404 => {
                    announced = false;
                    continue;
                }
                _ => {
                    tracing::warn!("{}", self.orchestrator.refused(response));
                    std::thread::sleep(Duration::from_secs(5));
                    continue;
                }
            }
            let request: Option<crate::wire::Relayed> = response
                .body_mut()
                .read_to_string()
                .ok()
                .and_then(|body| serde_json::from_str(&body).ok());
            if let Some(request) = request
                && let Err(error) = self.answer(store, &request)
            {
                tracing::warn!("could not answer a relayed request: {error}");
            }
        }
    }

    fn answer(
        &self,
        store: &ResultStore,
        request: &crate::wire::Relayed,
    ) -> Result<(), ClientError> {
        let url = self.route(&format!("/reply/{}", request.id));
        let put = || {
            self.orchestrator
                .authorized(self.orchestrator.agent.put(&url))
        };
        let missing = || put().header("X-Ci-Exec-Status", "404").send("");
        let response = match request.kind.as_str() {
            "result" => match store.get(&request.digest).ok().flatten() {
                Some(mut record) => {
                    record.repository = Some(self.orchestrator.repository.clone());
                    self.key.sign(&mut record);
                    let json = serde_json::to_string(&record).unwrap_or_default();
                    put()
                        .header("X-Ci-Exec-Status", "200")
                        .header("Content-Type", "application/json")
                        .send(json.as_str())
                }
                None => missing(),
            },
            _ => {
                let announced = self
                    .announced
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .contains(&request.digest);
                let path = store.blob_file(&request.digest);
                match (announced, File::open(&path)) {
                    (true, Ok(file)) => {
                        let length = file.metadata().map(|m| m.len()).unwrap_or(0);
                        put()
                            .header("X-Ci-Exec-Status", "200")
                            .header("Content-Length", length.to_string())
                            .send(ureq::SendBody::from_owned_reader(file.take(length)))
                    }
                    _ => missing(),
                }
            }
        };
        response
            .map(drop)
            .map_err(|error| self.orchestrator.unreachable(error))
    }

    /// Ends the session: the orchestrator stops relaying to it at once.
    pub fn leave(&self) {
        let _ = self
            .orchestrator
            .authorized(self.orchestrator.agent.delete(self.route("")))
            .call();
    }
}

fn read(path: &Path) -> Result<Vec<u8>, ClientError> {
    let mut bytes = Vec::new();
    File::open(path)
        .and_then(|mut file| file.read_to_end(&mut bytes))
        .map_err(|source| ClientError::Config {
            path: path.to_owned(),
            source,
        })?;
    Ok(bytes)
}

fn read_certificates(path: &Path) -> Result<Vec<ureq::tls::Certificate<'static>>, ClientError> {
    let pem = read(path)?;
    let certificates: Vec<_> = ureq::tls::parse_pem(&pem)
        .filter_map(|item| match item {
            Ok(ureq::tls::PemItem::Certificate(certificate)) => Some(certificate),
            _ => None,
        })
        .collect();
    if certificates.is_empty() {
        return Err(ClientError::Pem {
            path: path.to_owned(),
            what: "certificate",
        });
    }
    Ok(certificates)
}
