//! `ci-exec serve`: the orchestrator. It stores signed results per repository, serves them to
//! executors that hold a token (or client certificate, or a CI job's OIDC identity) of that
//! repository, and lets only publish grants write — write-once, each into its own scope.

pub mod auth;
pub mod oidc;
pub mod relay;
pub mod storage;

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt as _;
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest as _, Sha256};
use tokio::io::AsyncWriteExt as _;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tower::ServiceExt as _;

use ci_exec_job::store::ResultRecord;

use crate::identity;
use crate::wire::{Announcement, ErrorBody, Login, MAX_RECORD_BYTES, Route, TrustedKeys};
use auth::{AuthError, Authenticator, Grants, Presented};
use oidc::{Oidc, OidcConfigError, OidcOptions};
use relay::{Answer, Relay, SessionProblem};
use storage::{Grant, Publish, Storage, StorageError};

#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub listen: SocketAddr,
    pub data: PathBuf,
    pub tls: Option<TlsOptions>,
    /// Drop results published longer ago than this, hourly; keep them forever when `None`.
    pub keep_days: Option<u64>,
    /// The largest blob accepted.
    pub max_blob_bytes: u64,
    /// Accept CI jobs' OIDC ID tokens of these issuers.
    pub oidc: Option<OidcOptions>,
    /// Repositories whose trusted results anyone may read without a credential (a fork's
    /// pull request has none, yet may replay what the default branch published).
    pub public_read: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct TlsOptions {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Require client certificates issued by this CA (mapped to repositories by
    /// `ci-exec token create --cert`).
    pub client_ca: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("refusing to serve plain HTTP on `{addr}`, which is not a loopback address")]
    PlainHttpOffLoopback { addr: SocketAddr },
    #[error("cannot listen on `{addr}`")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read TLS file `{}`: {reason}", path.display())]
    TlsFile { path: PathBuf, reason: String },
    #[error("cannot set up TLS")]
    Tls(#[source] rustls::Error),
    #[error("the orchestrator's storage failed")]
    Storage(#[from] StorageError),
    #[error(transparent)]
    Oidc(#[from] OidcConfigError),
}

impl ServeError {
    pub fn hint(&self) -> Option<&'static str> {
        match self {
            ServeError::PlainHttpOffLoopback { .. } => Some(
                "pass `--tls-cert` and `--tls-key`, or listen on `127.0.0.1` behind a TLS proxy",
            ),
            ServeError::Bind { .. } => Some("choose a free port with `--listen ADDR:PORT`"),
            ServeError::TlsFile { .. } => {
                Some("give PEM files: a certificate chain and its private key")
            }
            ServeError::Oidc(error) => Some(error.hint()),
            _ => None,
        }
    }
}

#[derive(Debug)]
struct App {
    storage: Arc<Storage>,
    authenticators: Vec<Box<dyn Authenticator>>,
    max_blob_bytes: u64,
    relay: Relay,
    /// How long a session token from `login` lasts.
    session_lifetime: Duration,
    /// [`ServeOptions::public_read`].
    public_read: std::collections::HashSet<String>,
}

/// The client certificate of a TLS connection, put into each of its requests.
#[derive(Debug, Clone)]
struct PeerCertificate(Option<Arc<Vec<u8>>>);

/// A bound, not yet running, orchestrator.
pub struct Server {
    listener: TcpListener,
    app: Arc<App>,
    tls: Option<tokio_rustls::TlsAcceptor>,
    keep_days: Option<u64>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("listen", &self.local_addr())
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

impl Server {
    pub async fn bind(options: &ServeOptions) -> Result<Server, ServeError> {
        if options.tls.is_none() && !options.listen.ip().is_loopback() {
            return Err(ServeError::PlainHttpOffLoopback {
                addr: options.listen,
            });
        }
        let tls = options.tls.as_ref().map(tls_acceptor).transpose()?;
        let storage = Arc::new(Storage::open(&options.data)?);
        let listener =
            TcpListener::bind(options.listen)
                .await
                .map_err(|source| ServeError::Bind {
                    addr: options.listen,
                    source,
                })?;
        let mut authenticators: Vec<Box<dyn Authenticator>> =
            vec![Box::new(Grants(storage.clone()))];
        if let Some(oidc) = &options.oidc {
            let mut oidc = oidc.clone();
            // On loopback the audience may default to the address itself (tests, a laptop);
            // anywhere else clients name the orchestrator by a URL only the operator knows.
            if oidc.audience.is_empty() && options.listen.ip().is_loopback() {
                let scheme = if tls.is_some() { "https" } else { "http" };
                if let Ok(addr) = listener.local_addr() {
                    oidc.audience = format!("{scheme}://{addr}");
                }
            }
            authenticators.push(Box::new(Oidc::new(storage.clone(), &oidc)?));
        }
        Ok(Server {
            listener,
            app: Arc::new(App {
                authenticators,
                storage,
                max_blob_bytes: options.max_blob_bytes,
                relay: Relay::default(),
                public_read: options.public_read.iter().cloned().collect(),
                session_lifetime: options
                    .oidc
                    .as_ref()
                    .map_or(Duration::from_secs(7200), |oidc| oidc.session),
            }),
            tls,
            keep_days: options.keep_days,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 0)))
    }

    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}", self.local_addr())
    }

    /// Serves until `shutdown` completes. Every acknowledged publish is already durable, so
    /// connections still open then are simply dropped.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let router = axum::Router::new()
            .fallback(handle)
            .with_state(self.app.clone());
        if let Some(days) = self.keep_days {
            let storage = self.app.storage.clone();
            tokio::spawn(async move {
                let mut hourly = tokio::time::interval(Duration::from_secs(3600));
                loop {
                    hourly.tick().await;
                    let storage = storage.clone();
                    match tokio::task::spawn_blocking(move || storage.collect_garbage(days)).await {
                        Ok(Ok((results, blobs))) => tracing::info!(
                            "gc: dropped {results} results and {blobs} blobs older than {days} days"
                        ),
                        Ok(Err(error)) => tracing::warn!("gc failed: {error}"),
                        Err(error) => tracing::warn!("gc failed: {error}"),
                    }
                }
            });
        }
        tokio::pin!(shutdown);
        loop {
            let (stream, peer) = tokio::select! {
                accepted = self.listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(error) => {
                        // Out of file descriptors, most often: wait rather than spin.
                        tracing::warn!("accept failed: {error}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
                () = &mut shutdown => return,
            };
            let router = router.clone();
            let tls = self.tls.clone();
            tokio::spawn(async move {
                let _ = stream.set_nodelay(true);
                match tls {
                    None => serve_connection(TokioIo::new(stream), router, None).await,
                    Some(acceptor) => {
                        let handshake =
                            tokio::time::timeout(Duration::from_secs(10), acceptor.accept(stream));
                        match handshake.await {
                            Ok(Ok(stream)) => {
                                let certificate = stream
                                    .get_ref()
                                    .1
                                    .peer_certificates()
                                    .and_then(|chain| chain.first())
                                    .map(|leaf| Arc::new(leaf.to_vec()));
                                serve_connection(TokioIo::new(stream), router, certificate).await;
                            }
                            Ok(Err(error)) => tracing::debug!("TLS handshake with {peer}: {error}"),
                            Err(_) => tracing::debug!("TLS handshake with {peer} timed out"),
                        }
                    }
                }
            });
        }
    }
}

async fn serve_connection<I>(io: I, router: axum::Router, certificate: Option<Arc<Vec<u8>>>)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let service = router.map_request(move |mut request: Request<hyper::body::Incoming>| {
        request
            .extensions_mut()
            .insert(PeerCertificate(certificate.clone()));
        request
    });
    let service = hyper_util::service::TowerToHyperService::new(service);
    if let Err(error) = hyper::server::conn::http1::Builder::new()
        .serve_connection(io, service)
        .await
    {
        tracing::debug!("connection ended: {error}");
    }
}

fn tls_acceptor(tls: &TlsOptions) -> Result<tokio_rustls::TlsAcceptor, ServeError> {
    let file_error = |path: &Path| {
        let path = path.to_owned();
        move |error: rustls::pki_types::pem::Error| ServeError::TlsFile {
            path,
            reason: error.to_string(),
        }
    };
    let certificates = CertificateDer::pem_file_iter(&tls.cert)
        .map_err(file_error(&tls.cert))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(file_error(&tls.cert))?;
    if certificates.is_empty() {
        return Err(ServeError::TlsFile {
            path: tls.cert.clone(),
            reason: "it holds no certificate".into(),
        });
    }
    let key = PrivateKeyDer::from_pem_file(&tls.key).map_err(file_error(&tls.key))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(ServeError::Tls)?;
    let builder = match &tls.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for certificate in CertificateDer::pem_file_iter(ca).map_err(file_error(ca))? {
                roots
                    .add(certificate.map_err(file_error(ca))?)
                    .map_err(ServeError::Tls)?;
            }
            let verifier =
                rustls::server::WebPkiClientVerifier::builder_with_provider(roots.into(), provider)
                    .build()
                    .map_err(|error| ServeError::TlsFile {
                        path: ca.clone(),
                        reason: error.to_string(),
                    })?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder
        .with_single_cert(certificates, key)
        .map_err(ServeError::Tls)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// A refused request: its status and the one line saying why.
#[derive(Debug)]
struct Refusal {
    status: StatusCode,
    message: String,
}

fn reply(status: StatusCode, message: impl Into<String>) -> Refusal {
    Refusal {
        status,
        message: message.into(),
    }
}

fn internal(error: impl std::fmt::Display) -> Refusal {
    tracing::error!("{error}");
    reply(
        StatusCode::INTERNAL_SERVER_ERROR,
        "the orchestrator failed; see its log",
    )
}

impl axum::response::IntoResponse for Refusal {
    fn into_response(self) -> Response {
        let body = serde_json::to_vec(&ErrorBody {
            error: self.message,
        })
        .unwrap_or_default();
        let mut response = (self.status, body).into_response();
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if self.status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"ci-exec\""),
            );
        }
        response
    }
}

/// Runs a storage call off the async threads (SQLite commits and fsyncs block).
async fn blocking<T: Send + 'static>(
    app: &Arc<App>,
    call: impl FnOnce(&Storage) -> Result<T, StorageError> + Send + 'static,
) -> Result<T, Refusal> {
    let storage = app.storage.clone();
    match tokio::task::spawn_blocking(move || call(&storage)).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(error)) => Err(internal(error)),
        Err(error) => Err(internal(error)),
    }
}

async fn handle(State(app): State<Arc<App>>, request: Request) -> Response {
    let route = match Route::parse(request.uri().path()) {
        Ok(route) => route,
        Err(message) => return reply(StatusCode::NOT_FOUND, message).into_response(),
    };
    if route == Route::Status {
        return (
            [(header::CONTENT_TYPE, "application/json")],
            format!(
                "{{\"ok\":true,\"version\":\"{}\"}}",
                env!("CARGO_PKG_VERSION")
            ),
        )
            .into_response();
    }
    let method = request.method().clone();
    let writes = matches!(method, Method::PUT | Method::DELETE);
    let allowed: &[Method] = match route {
        Route::Keys { .. } => &[Method::GET, Method::HEAD],
        Route::Session { .. } => &[Method::PUT, Method::DELETE],
        Route::Next { .. } => &[Method::GET],
        Route::Reply { .. } => &[Method::PUT],
        Route::Login { .. } => &[Method::POST],
        _ => &[Method::GET, Method::HEAD, Method::PUT],
    };
    if !allowed.contains(&method) {
        let list: Vec<&str> = allowed.iter().map(Method::as_str).collect();
        let mut response = reply(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("`{method}` is not served here"),
        )
        .into_response();
        if let Ok(value) = HeaderValue::from_str(&list.join(", ")) {
            response.headers_mut().insert(header::ALLOW, value);
        }
        return response;
    }
    let bearer = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| {
            value
                .strip_prefix("Bearer ")
                .or_else(|| value.strip_prefix("bearer "))
        })
        .map(|token| token.trim().to_owned());
    let certificate = request
        .extensions()
        .get::<PeerCertificate>()
        .and_then(|peer| peer.0.clone());
    if matches!(route, Route::Login { .. })
        && bearer
            .as_deref()
            .is_some_and(|token| token.starts_with(auth::SESSION_PREFIX))
    {
        return reply(
            StatusCode::BAD_REQUEST,
            "log in with a CI job's ID token, not with a session token",
        )
        .into_response();
    }
    // Off the async threads: storage lookups, and an issuer's keys may have to be fetched.
    let authorizing = {
        let (app, route) = (app.clone(), route.clone());
        tokio::task::spawn_blocking(move || {
            authorize(
                &app,
                bearer.as_deref(),
                certificate.as_deref(),
                &route,
                writes,
            )
        })
    };
    let grant = match authorizing.await {
        Ok(Ok(grant)) => grant,
        Ok(Err(refusal)) => return refusal.into_response(),
        Err(error) => return internal(error).into_response(),
    };
    let result = match route {
        Route::Result { repository, key } => match method {
            Method::PUT => put_result(&app, repository, key, grant, request.into_body()).await,
            _ => get_result(&app, &grant, repository, key, method == Method::HEAD).await,
        },
        Route::Blob { repository, sha256 } => match method {
            Method::PUT => {
                let (parts, body) = request.into_parts();
                put_blob(&app, &grant, sha256, &parts.headers, body).await
            }
            _ => get_blob(&app, &grant, repository, sha256, method == Method::HEAD).await,
        },
        Route::Keys { .. } => {
            let namespaces = grant.read_namespaces();
            blocking(&app, move |storage| {
                let mut keys = Vec::new();
                for namespace in &namespaces {
                    keys.extend(storage.trusted_keys(namespace)?);
                }
                keys.sort();
                keys.dedup();
                Ok(keys)
            })
            .await
            .map(|keys| {
                let body = serde_json::to_vec(&TrustedKeys { keys }).unwrap_or_default();
                ([(header::CONTENT_TYPE, "application/json")], body).into_response()
            })
        }
        Route::Login { .. } => login(&app, grant).await,
        Route::Session {
            repository,
            session,
        } => match method {
            Method::DELETE => app
                .relay
                .leave(&repository, &session, &grant.id)
                .map(|()| StatusCode::NO_CONTENT.into_response())
                .map_err(session_refusal),
            _ if grant.scope.is_some() => Err(reply(
                StatusCode::FORBIDDEN,
                "only credentials of the repository's trusted scope serve connected results",
            )),
            _ => announce(&app, repository, session, grant, request.into_body()).await,
        },
        Route::Next {
            repository,
            session,
        } => match app.relay.next(&repository, &session, &grant.id).await {
            Ok(Some(relayed)) => Ok((
                [(header::CONTENT_TYPE, "application/json")],
                serde_json::to_vec(&relayed).unwrap_or_default(),
            )
                .into_response()),
            Ok(None) => Ok(StatusCode::NO_CONTENT.into_response()),
            Err(problem) => Err(session_refusal(problem)),
        },
        Route::Reply { session, id, .. } => {
            let (parts, body) = request.into_parts();
            relay_answer(&app, &session, id, &parts.headers, body).await
        }
        Route::Status => Ok(StatusCode::OK.into_response()),
    };
    result.unwrap_or_else(IntoResponse::into_response)
}

/// Checks the request's credentials against the route: 401 without a known credential, 403
/// for another repository or a write without a publish grant.
fn authorize(
    app: &App,
    bearer: Option<&str>,
    certificate: Option<&Vec<u8>>,
    route: &Route,
    writes: bool,
) -> Result<Grant, Refusal> {
    let presented = Presented {
        bearer,
        certificate: certificate.map(Vec::as_slice),
    };
    let repository = route.repository().unwrap_or_default();
    if presented.is_empty()
        && !writes
        && matches!(
            route,
            Route::Result { .. } | Route::Blob { .. } | Route::Keys { .. }
        )
        && app.public_read.contains(repository)
    {
        // Anonymous reads of the trusted scope, nothing else.
        return Ok(Grant {
            repository: repository.to_owned(),
            publish: false,
            created_unix: 0,
            id: "anonymous".to_owned(),
            scope: None,
        });
    }
    if presented.is_empty() {
        return Err(reply(
            StatusCode::UNAUTHORIZED,
            "no credentials: send `Authorization: Bearer <token>` (from `ci-exec token create`)",
        ));
    }
    let mut grant = None;
    for authenticator in &app.authenticators {
        match authenticator.authenticate(&presented) {
            Ok(Some(found)) => {
                grant = Some(found);
                break;
            }
            Ok(None) => {}
            Err(AuthError::Refused(message)) => {
                return Err(reply(StatusCode::UNAUTHORIZED, message));
            }
            Err(AuthError::Storage(error)) => return Err(internal(error)),
        }
    }
    let Some(grant) = grant else {
        return Err(reply(
            StatusCode::UNAUTHORIZED,
            "unknown token or certificate (revoked, or of another orchestrator)",
        ));
    };
    if grant.repository != repository {
        return Err(reply(
            StatusCode::FORBIDDEN,
            format!(
                "this credential is for repository `{}`, not `{repository}`",
                grant.repository
            ),
        ));
    }
    if writes && !grant.publish {
        return Err(reply(
            StatusCode::FORBIDDEN,
            if grant.id.starts_with("oidc-") {
                "this CI job may only read: only protected refs built by push, schedule or manual runs publish"
            } else {
                "this credential may only read: publishing needs one made with `ci-exec token create --publish`"
            },
        ));
    }
    Ok(grant)
}

/// `POST …/login`: a session token standing for the grant the ID token proved, for the rest
/// of the job (the ID token itself was good for this one request).
async fn login(app: &Arc<App>, grant: Grant) -> Result<Response, Refusal> {
    let token = auth::new_session_token().map_err(internal)?;
    let expires_unix = ci_exec_job::store::unix_now() + app.session_lifetime.as_secs();
    let (stored_token, stored_grant) = (token.clone(), grant.clone());
    blocking(app, move |storage| {
        storage.add_session(&stored_token, &stored_grant, expires_unix)
    })
    .await?;
    tracing::info!(
        "login: `{}` ({}) for scope `{}`, {}",
        grant.repository,
        grant.id,
        grant.scope.as_deref().unwrap_or("trusted"),
        if grant.publish { "publish" } else { "read" }
    );
    let body = serde_json::to_vec(&Login {
        token,
        expires_unix,
        publish: grant.publish,
        scope: grant.scope,
    })
    .map_err(internal)?;
    Ok(([(header::CONTENT_TYPE, "application/json")], body).into_response())
}

async fn get_result(
    app: &Arc<App>,
    grant: &Grant,
    repository: String,
    key: String,
    head: bool,
) -> Result<Response, Refusal> {
    let (namespaces, stored_key) = (grant.read_namespaces(), key.clone());
    let published = blocking(app, move |storage| {
        for namespace in &namespaces {
            if let Some(published) = storage.result(namespace, &stored_key)? {
                return Ok(Some(published));
            }
        }
        Ok(None)
    })
    .await?;
    match published {
        None => relayed(app, &repository, true, &key, head, "application/json").await,
        Some(published) => {
            let length = published.record.len();
            let body = if head {
                Body::empty()
            } else {
                Body::from(published.record)
            };
            Ok((
                [
                    (header::CONTENT_TYPE, "application/json".to_owned()),
                    (header::CONTENT_LENGTH, length.to_string()),
                ],
                body,
            )
                .into_response())
        }
    }
}

async fn put_result(
    app: &Arc<App>,
    repository: String,
    key: String,
    grant: Grant,
    body: Body,
) -> Result<Response, Refusal> {
    let bytes = axum::body::to_bytes(body, MAX_RECORD_BYTES)
        .await
        .map_err(|_| {
            reply(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("a record is at most {MAX_RECORD_BYTES} bytes, or the upload broke off"),
            )
        })?;
    let raw = String::from_utf8(bytes.to_vec())
        .map_err(|_| reply(StatusCode::BAD_REQUEST, "the record is not UTF-8 JSON"))?;
    let record: ResultRecord = serde_json::from_str(&raw).map_err(|error| {
        reply(
            StatusCode::BAD_REQUEST,
            format!("malformed result record: {error}"),
        )
    })?;
    let bad = |message: String| reply(StatusCode::BAD_REQUEST, message);
    if record.key != key {
        return Err(bad(format!(
            "the record's key `{}` is not the key `{key}` it is published under",
            record.key
        )));
    }
    if record.repository.as_deref() != Some(repository.as_str()) {
        return Err(bad(format!(
            "the record names repository `{}`, not `{repository}`",
            record.repository.as_deref().unwrap_or("(none)")
        )));
    }
    if !record.succeeded() {
        return Err(bad("only successful results are published".into()));
    }
    let signer = identity::signer_of(&record)
        .ok_or_else(|| bad("the record is not signed by an executor key".into()))?;
    identity::verify_signature(&record, &signer)
        .map_err(|problem| bad(format!("the record's signature is refused: {problem}")))?;
    let signer = signer.to_string();
    let namespace = grant.write_namespace();
    let outcome = blocking(app, move |storage| {
        storage.publish(&namespace, &record, &raw, &signer, &grant)
    })
    .await?;
    match outcome {
        Publish::Created => Ok(StatusCode::CREATED.into_response()),
        Publish::Identical => Ok(StatusCode::OK.into_response()),
        Publish::Conflict => Err(reply(
            StatusCode::CONFLICT,
            "another record is already published under this key (results are write-once)",
        )),
        Publish::MissingBlob(sha256) => Err(bad(format!(
            "blob `{sha256}` of the record is not uploaded: `PUT` it to `cas/{sha256}` first"
        ))),
    }
}

async fn get_blob(
    app: &Arc<App>,
    grant: &Grant,
    repository: String,
    sha256: String,
    head: bool,
) -> Result<Response, Refusal> {
    let path = app.storage.blob_path(&sha256);
    let (namespaces, stored_sha256) = (grant.read_namespaces(), sha256.clone());
    let member = blocking(app, move |storage| {
        for namespace in &namespaces {
            if storage.is_member(namespace, &stored_sha256)? {
                return Ok(true);
            }
        }
        Ok(false)
    })
    .await?;
    if !member {
        return relayed(
            app,
            &repository,
            false,
            &sha256,
            head,
            "application/octet-stream",
        )
        .await;
    }
    let file = tokio::fs::File::open(&path)
        .await
        .map_err(|_| reply(StatusCode::NOT_FOUND, "no blob with this digest"))?;
    let length = file.metadata().await.map_err(internal)?.len();
    let body = if head {
        Body::empty()
    } else {
        // Streamed in 64 KiB pieces: serving a large artifact to many clients holds no more
        // than that per connection.
        Body::from_stream(tokio_util::io::ReaderStream::with_capacity(file, 1 << 16))
    };
    Ok((
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_owned()),
            (header::CONTENT_LENGTH, length.to_string()),
        ],
        body,
    )
        .into_response())
}

/// A result or blob from a connected executor that announced it, streamed through.
async fn relayed(
    app: &Arc<App>,
    repository: &str,
    result: bool,
    digest: &str,
    head: bool,
    content_type: &'static str,
) -> Result<Response, Refusal> {
    let missing = || {
        reply(
            StatusCode::NOT_FOUND,
            if result {
                "no result with this key"
            } else {
                "no blob with this digest"
            },
        )
    };
    let session = app
        .relay
        .holder(repository, result, digest)
        .ok_or_else(missing)?;
    if head {
        return Ok(StatusCode::OK.into_response());
    }
    let answer = app
        .relay
        .ask(&session, result, digest)
        .await
        .ok_or_else(missing)?;
    if answer.status != 200 {
        return Err(missing());
    }
    let done = answer.done;
    // `done` lives as long as the response body: when the body is sent (or the asker goes
    // away) the connected executor's upload is answered.
    let stream = answer.body.into_data_stream().map(move |chunk| {
        let _ = &done;
        chunk
    });
    let mut response = (
        [(header::CONTENT_TYPE, content_type)],
        Body::from_stream(stream),
    )
        .into_response();
    if let Some(length) = answer.length
        && let Ok(value) = HeaderValue::from_str(&length.to_string())
    {
        response.headers_mut().insert(header::CONTENT_LENGTH, value);
    }
    Ok(response)
}

/// `PUT …/executors/<session>`: a connected executor says what it holds, proving its key.
async fn announce(
    app: &Arc<App>,
    repository: String,
    session: String,
    grant: Grant,
    body: Body,
) -> Result<Response, Refusal> {
    let bytes = axum::body::to_bytes(body, 64 << 20).await.map_err(|_| {
        reply(
            StatusCode::PAYLOAD_TOO_LARGE,
            "an announcement is at most 64 MiB",
        )
    })?;
    let announcement: Announcement = serde_json::from_slice(&bytes).map_err(|error| {
        reply(
            StatusCode::BAD_REQUEST,
            format!("malformed announcement: {error}"),
        )
    })?;
    let digests_ok = announcement
        .keys
        .iter()
        .chain(&announcement.blobs)
        .all(|digest| crate::wire::is_digest(digest));
    if !digests_ok {
        return Err(reply(
            StatusCode::BAD_REQUEST,
            "an announced key or blob is not 64 lowercase hex digits",
        ));
    }
    let signer = identity::PublicKey::parse(&announcement.signer)
        .map_err(|error| reply(StatusCode::BAD_REQUEST, error.to_string()))?;
    if !identity::verify_bytes(
        &crate::wire::announcement_bytes(&repository, &session),
        &announcement.signature,
        &signer,
    ) {
        return Err(reply(
            StatusCode::BAD_REQUEST,
            "the announcement's signature does not match its key",
        ));
    }
    let signer_text = signer.to_string();
    let (trusted_repository, trusted_grant) = (repository.clone(), grant.clone());
    blocking(app, move |storage| {
        storage.trust_key(&trusted_repository, &signer_text, &trusted_grant)
    })
    .await?;
    app.relay
        .announce(
            &repository,
            &session,
            &grant.id,
            announcement.keys,
            announcement.blobs,
        )
        .map_err(session_refusal)?;
    Ok(StatusCode::OK.into_response())
}

/// `PUT …/reply/<id>`: streamed to the executor waiting for it; answered once it is sent.
async fn relay_answer(
    app: &Arc<App>,
    session: &str,
    id: u64,
    headers: &HeaderMap,
    body: Body,
) -> Result<Response, Refusal> {
    let status = headers
        .get("x-ci-exec-status")
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<u16>().ok())
        .unwrap_or(200);
    let length = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<u64>().ok());
    let (done, sent) = oneshot::channel();
    let answer = Answer {
        status,
        length,
        body,
        done,
    };
    if app.relay.reply(session, id, answer).is_err() {
        return Err(reply(
            StatusCode::NOT_FOUND,
            "nobody waits for this answer any more",
        ));
    }
    // Err: the sender was dropped, which is how the asking side says it is finished.
    let _ = sent.await;
    Ok(StatusCode::OK.into_response())
}

fn session_refusal(problem: SessionProblem) -> Refusal {
    match problem {
        SessionProblem::Unknown => reply(
            StatusCode::NOT_FOUND,
            "no such session (expired?): announce again",
        ),
        SessionProblem::NotYours => reply(
            StatusCode::FORBIDDEN,
            "this session was announced by another credential",
        ),
    }
}

async fn put_blob(
    app: &Arc<App>,
    grant: &Grant,
    sha256: String,
    headers: &HeaderMap,
    body: Body,
) -> Result<Response, Refusal> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<u64>().ok());
    let too_large = || {
        reply(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("a blob is at most {} bytes here", app.max_blob_bytes),
        )
    };
    if declared.is_some_and(|length| length > app.max_blob_bytes) {
        return Err(too_large());
    }
    let upload = app.storage.upload_path();
    let received = receive(&upload, body, app.max_blob_bytes).await;
    let outcome = match received {
        Ok((_, length)) if declared.is_some_and(|declared| declared != length) => Err(reply(
            StatusCode::BAD_REQUEST,
            format!(
                "the upload is truncated: {length} bytes of {}",
                declared.unwrap_or(0)
            ),
        )),
        Ok((digest, _)) if digest != sha256 => Err(reply(
            StatusCode::BAD_REQUEST,
            format!("the content hashes to `{digest}`, not `{sha256}`"),
        )),
        Ok(_) => Ok(()),
        Err(Received::TooLarge) => Err(too_large()),
        Err(Received::BrokenOff) => Err(reply(
            StatusCode::BAD_REQUEST,
            "the upload broke off before its end",
        )),
        Err(Received::Io(error)) => Err(internal(error)),
    };
    if let Err(refusal) = outcome {
        let _ = tokio::fs::remove_file(&upload).await;
        return Err(refusal);
    }
    let stored = upload.clone();
    let namespace = grant.write_namespace();
    let result = blocking(app, move |storage| {
        storage.add_blob(&namespace, &sha256, &stored)
    })
    .await;
    if result.is_err() {
        let _ = tokio::fs::remove_file(&upload).await;
    }
    result.map(|()| StatusCode::CREATED.into_response())
}

enum Received {
    TooLarge,
    BrokenOff,
    Io(std::io::Error),
}

/// Streams `body` into `path`, hashing it; never holds more than one chunk.
async fn receive(path: &Path, body: Body, limit: u64) -> Result<(String, u64), Received> {
    let mut file = tokio::fs::File::create(path).await.map_err(Received::Io)?;
    let mut hasher = Sha256::new();
    let mut length = 0u64;
    let mut stream = body.into_data_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|_| Received::BrokenOff)?;
        length += chunk.len() as u64;
        if length > limit {
            return Err(Received::TooLarge);
        }
        hasher.update(&chunk);
        file.write_all(&chunk).await.map_err(Received::Io)?;
    }
    file.flush().await.map_err(Received::Io)?;
    Ok((hex::encode(hasher.finalize()), length))
}
