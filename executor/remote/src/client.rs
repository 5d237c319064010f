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
use crate::wire::{ErrorBody, MAX_RECORD_BYTES, Route, TrustedKeys};

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

#[derive(Debug)]
pub struct Orchestrator {
    url: String,
    token: Option<String>,
    repository: String,
    agent: ureq::Agent,
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
        let agent = ureq::Agent::config_builder()
            .timeout_connect(Some(CONNECT_TIMEOUT))
            .timeout_recv_response(Some(RESPONSE_TIMEOUT))
            .timeout_recv_body(Some(RESPONSE_TIMEOUT))
            .http_status_as_error(false)
            .tls_config(tls.build())
            .build()
            .into();
        Ok(Orchestrator {
            url: options.url.trim_end_matches('/').to_owned(),
            token: options.token,
            repository: options.repository,
            agent,
        })
    }

    pub fn url(&self) -> &str {
        &self.url
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
        let mut response = self
            .authorized(self.agent.get(self.address(&route)))
            .call()
            .map_err(|error| self.unreachable(error))?;
        match response.status().as_u16() {
            200 => {}
            404 => return Ok(Fetched::Miss),
            _ => return Err(self.refused(response)),
        }
        let body = response
            .body_mut()
            .with_config()
            .limit(MAX_RECORD_BYTES as u64)
            .read_to_string()
            .map_err(|error| self.unreachable(error))?;
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
            let mut response = self
                .authorized(self.agent.get(self.address(&route)))
                .call()
                .map_err(|error| self.unreachable(error))?;
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
        let mut response = self
            .authorized(self.agent.get(self.address(&route)))
            .call()
            .map_err(|error| self.unreachable(error))?;
        if response.status().as_u16() != 200 {
            return Err(self.refused(response));
        }
        let body = response
            .body_mut()
            .with_config()
            .limit(MAX_RECORD_BYTES as u64)
            .read_to_string()
            .map_err(|error| self.unreachable(error))?;
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
