//! The orchestrator over real HTTP and TLS: a server on a loopback port, the executor's client,
//! and raw requests for everything a well-behaved client never sends.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;

use ci_exec_job::store::{Artifact, ResultRecord, ResultStore, unix_now};
use ci_exec_remote::client::{ClientOptions, Fetched, Orchestrator, Published};
use ci_exec_remote::identity::ExecutorKey;
use ci_exec_remote::server::storage::{Credential, Storage};
use ci_exec_remote::server::{ServeOptions, Server, TlsOptions};

#[path = "support/issuer.rs"]
mod issuer;
#[path = "orchestrator/oidc.rs"]
mod oidc;

const REPO: &str = "github.com/acme/widget";

/// A running orchestrator with its data directory; stopped when dropped.
struct Running {
    url: String,
    data: tempfile::TempDir,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn start(tls: Option<TlsOptions>, listen: &str) -> Running {
    start_with(tls, listen, |_| {})
}

/// With options changed by `configure`.
fn start_with(
    tls: Option<TlsOptions>,
    listen: &str,
    configure: impl FnOnce(&mut ServeOptions),
) -> Running {
    let data = tempfile::tempdir().expect("tempdir");
    let mut options = ServeOptions {
        listen: listen.parse().expect("address"),
        data: data.path().to_owned(),
        tls,
        keep_days: None,
        max_blob_bytes: 1 << 20,
        oidc: None,
        public_read: Vec::new(),
    };
    configure(&mut options);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let (ready, url) = std::sync::mpsc::channel();
    let thread = std::thread::spawn(move || {
        let runtime = tokio::runtime::Runtime::new().expect("runtime");
        runtime.block_on(async move {
            let server = Server::bind(&options).await.expect("bind");
            ready.send(server.url()).expect("send");
            server
                .run(async {
                    let _ = stopped.await;
                })
                .await;
        });
    });
    let url = url.recv().expect("server started");
    Running {
        url,
        data,
        stop: Some(stop),
        thread: Some(thread),
    }
}

impl Running {
    fn addr(&self) -> SocketAddr {
        self.url
            .rsplit("//")
            .next()
            .and_then(|addr| addr.parse().ok())
            .expect("address")
    }

    /// A token, as `ci-exec token create` makes it.
    fn token(&self, repository: &str, publish: bool) -> String {
        let token = ci_exec_remote::server::auth::new_token().expect("token");
        self.storage()
            .add_grant(Credential::Token(&token), repository, publish)
            .expect("grant");
        token
    }

    /// The data directory opened beside the server, as `ci-exec token` opens it.
    fn storage(&self) -> Storage {
        Storage::open(self.data.path()).expect("storage")
    }

    fn client(&self, token: Option<&str>) -> Orchestrator {
        Orchestrator::new(ClientOptions {
            url: self.url.clone(),
            token: token.map(str::to_owned),
            repository: REPO.into(),
            ..ClientOptions::default()
        })
        .expect("client")
    }
}

/// A successful result recorded in `store`, with a 200 KB artifact.
fn recorded(store: &ResultStore, key: &str) -> ResultRecord {
    let artifact: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let art = store.put_blob(&artifact).expect("blob");
    let record = ResultRecord {
        format: ci_exec_job::key::FORMAT_VERSION,
        key: key.into(),
        exit_code: 0,
        created_unix: unix_now(),
        driver: "native".into(),
        environment_digest: Some("native:debian-12/x86_64".into()),
        image: None,
        host: "executor-a".into(),
        ci_exec_version: "0".into(),
        commit: "c".repeat(40),
        tree: "t".repeat(40),
        stdout: store.put_blob(b"hello\n\x00\xff").expect("blob"),
        stderr: store.put_blob(b"").expect("blob"),
        artifacts: vec![Artifact {
            path: "dist/app.bin".into(),
            sha256: art.sha256,
            size: art.size,
            mode: 0o755,
        }],
        steps: vec![],
        repository: Some(REPO.into()),
        target: None,
        signature: None,
    };
    store.put_record(&record).expect("record");
    record
}

struct Executor {
    store: ResultStore,
    key: ExecutorKey,
    _dir: tempfile::TempDir,
}

fn executor(name: &str) -> Executor {
    let dir = tempfile::tempdir().expect("tempdir");
    Executor {
        store: ResultStore::open(Some(dir.path().join("results"))).expect("store"),
        key: ExecutorKey::generate(name).expect("key"),
        _dir: dir,
    }
}

fn key(n: u8) -> String {
    format!("{n:02x}").repeat(32)
}

#[test]
fn a_published_result_is_fetched_byte_exactly_by_another_executor() {
    let server = start(None, "127.0.0.1:0");
    let (publish, read) = (server.token(REPO, true), server.token(REPO, false));
    let a = executor("a");
    let b = executor("b");
    let record = recorded(&a.store, &key(1));

    let published = server
        .client(Some(&publish))
        .publish(&record, &a.store, &a.key)
        .expect("publish");
    assert_eq!(published, Published::Created);
    let again = server
        .client(Some(&publish))
        .publish(&record, &a.store, &a.key);
    // Signing again gives the same bytes (Ed25519 is deterministic): nothing to refuse.
    assert_eq!(again.expect("republish"), Published::AlreadyThere);

    let fetched = server
        .client(Some(&read))
        .fetch(&key(1), &b.store, &[], &b.key.public())
        .expect("fetch");
    let Fetched::Stored(got) = fetched else {
        panic!("expected the result, got {fetched:?}");
    };
    assert_eq!(
        got.signature.as_ref().map(|s| s.signer.clone()),
        Some(a.key.public().to_string())
    );
    let local = b.store.get(&key(1)).expect("get").expect("stored");
    b.store.verify(&local).expect("every blob intact");
    for (sha, _) in record.blobs() {
        assert_eq!(
            b.store.read_blob(sha).expect("blob"),
            a.store.read_blob(sha).expect("blob")
        );
    }
    assert!(matches!(
        server
            .client(Some(&read))
            .fetch(&key(2), &b.store, &[], &b.key.public()),
        Ok(Fetched::Miss)
    ));
}

#[test]
fn a_tampered_blob_or_a_revoked_signer_is_never_stored() {
    let server = start(None, "127.0.0.1:0");
    let (publish, read) = (server.token(REPO, true), server.token(REPO, false));
    let a = executor("a");
    let record = recorded(&a.store, &key(3));
    server
        .client(Some(&publish))
        .publish(&record, &a.store, &a.key)
        .expect("publish");

    let artifact = server
        .data
        .path()
        .join("cas")
        .join(&record.artifacts[0].sha256);
    let mut bytes = std::fs::read(&artifact).expect("blob");
    bytes[1000] ^= 1;
    std::fs::write(&artifact, &bytes).expect("tamper");
    let b = executor("b");
    let fetched = server
        .client(Some(&read))
        .fetch(&key(3), &b.store, &[], &b.key.public())
        .expect("fetch");
    assert!(
        matches!(&fetched, Fetched::Untrusted(why) if why.contains("does not match its digest")),
        "{fetched:?}"
    );
    assert!(
        b.store.get(&key(3)).expect("get").is_none(),
        "nothing replayable stored"
    );

    // Once the publishing token is revoked, its executor's key is no longer trusted.
    let publisher = server
        .storage()
        .grants()
        .expect("grants")
        .into_iter()
        .find(|grant| grant.publish)
        .expect("publish grant");
    server.storage().revoke(&publisher.id).expect("revoke");
    let c = executor("c");
    let fetched = server
        .client(Some(&read))
        .fetch(&key(3), &c.store, &[], &c.key.public())
        .expect("fetch");
    assert!(
        matches!(&fetched, Fetched::Untrusted(why) if why.contains("not a trusted key")),
        "{fetched:?}"
    );
    // A key the user pins is trusted whatever the orchestrator says.
    std::fs::write(
        &artifact,
        a.store
            .read_blob(&record.artifacts[0].sha256)
            .expect("blob"),
    )
    .expect("repair");
    let fetched = server
        .client(Some(&read))
        .fetch(&key(3), &c.store, &[a.key.public()], &c.key.public())
        .expect("fetch");
    assert!(matches!(fetched, Fetched::Stored(_)), "{fetched:?}");
}

/// One raw HTTP/1.1 request; returns (status, body).
fn raw(addr: SocketAddr, request: &[u8]) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream.write_all(request).expect("write");
    read_response(stream)
}

/// Sends `request` and closes the sending half, as a client that dies mid-upload.
fn raw_cut_short(addr: SocketAddr, request: &[u8]) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream.write_all(request).expect("write");
    let _ = stream.shutdown(std::net::Shutdown::Write);
    read_response(stream)
}

fn read_response(mut stream: TcpStream) -> (u16, String) {
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0);
    let body = response.split("\r\n\r\n").nth(1).unwrap_or("").to_owned();
    (status, body)
}

fn request(method: &str, path: &str, token: Option<&str>, body: &[u8]) -> Vec<u8> {
    let mut out = format!("{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n");
    if let Some(token) = token {
        out.push_str(&format!("Authorization: Bearer {token}\r\n"));
    }
    out.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
    let mut out = out.into_bytes();
    out.extend_from_slice(body);
    out
}

#[test]
fn wrong_missing_and_foreign_tokens_are_refused() {
    let server = start(None, "127.0.0.1:0");
    let publish = server.token(REPO, true);
    let read = server.token(REPO, false);
    let foreign = server.token("github.com/acme/other", true);
    let path = format!("/{REPO}/results/{}", key(4));
    let addr = server.addr();

    let (status, body) = raw(addr, &request("GET", &path, None, b""));
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("Authorization: Bearer"), "{body}");
    assert_eq!(
        raw(addr, &request("GET", &path, Some("cie_wrong"), b"")).0,
        401
    );
    let (status, body) = raw(addr, &request("GET", &path, Some(&foreign), b""));
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("github.com/acme/other"), "{body}");
    assert_eq!(raw(addr, &request("GET", &path, Some(&read), b"")).0, 404);
    let (status, body) = raw(addr, &request("PUT", &path, Some(&read), b"{}"));
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("--publish"), "{body}");

    // Through the client, a read token's publish stops at the first upload.
    let a = executor("a");
    let record = recorded(&a.store, &key(4));
    let published = server
        .client(Some(&read))
        .publish(&record, &a.store, &a.key);
    assert_eq!(published.expect("publish"), Published::ReadOnly);
    let error = server
        .client(Some(&foreign))
        .fetch(&key(4), &a.store, &[], &a.key.public())
        .expect_err("foreign");
    assert!(error.to_string().contains("(403)"), "{error}");
    assert_eq!(
        server
            .client(Some(&publish))
            .publish(&record, &a.store, &a.key)
            .expect("publish"),
        Published::Created
    );
}

#[test]
fn a_public_repository_is_read_without_a_credential_and_nothing_else_is() {
    let server = start_with(None, "127.0.0.1:0", |options| {
        options.public_read = vec![REPO.to_owned()];
    });
    let publish = server.token(REPO, true);
    let a = executor("a");
    let record = recorded(&a.store, &key(5));
    assert_eq!(
        server
            .client(Some(&publish))
            .publish(&record, &a.store, &a.key)
            .expect("publish"),
        Published::Created
    );
    let addr = server.addr();
    let path = format!("/{REPO}/results/{}", key(5));
    assert_eq!(raw(addr, &request("GET", &path, None, b"")).0, 200);
    assert_eq!(
        raw(addr, &request("GET", &format!("/{REPO}/keys"), None, b"")).0,
        200
    );
    let (status, body) = raw(addr, &request("PUT", &path, None, b"{}"));
    assert_eq!(status, 401, "{body}");
    let other = format!("/github.com/acme/other/results/{}", key(5));
    assert_eq!(raw(addr, &request("GET", &other, None, b"")).0, 401);

    // An executor with no credential fetches, verifies and stores it.
    let b = executor("b");
    let fetched = server
        .client(None)
        .fetch(&key(5), &b.store, &[], &b.key.public())
        .expect("fetch");
    assert!(matches!(fetched, Fetched::Stored(_)), "{fetched:?}");
}

#[test]
fn bad_uploads_store_nothing() {
    let server = start(None, "127.0.0.1:0");
    let publish = server.token(REPO, true);
    let addr = server.addr();
    let content = b"some artifact";
    let sha = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(content));
    let blob = format!("/{REPO}/cas/{sha}");
    let cas_is_empty = || {
        std::fs::read_dir(server.data.path().join("cas"))
            .expect("cas")
            .count()
            == 0
    };

    // Content that does not hash to its name.
    let (status, body) = raw(
        addr,
        &request("PUT", &blob, Some(&publish), b"other content"),
    );
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("hashes to"), "{body}");
    // A truncated upload: the connection closes after half the declared length.
    let mut truncated = format!(
        "PUT {blob} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {publish}\r\nContent-Length: {}\r\n\r\n",
        content.len()
    )
    .into_bytes();
    truncated.extend_from_slice(&content[..5]);
    let _ = raw_cut_short(addr, &truncated);
    // Larger than the server's limit (1 MiB here), refused on its declared length.
    let (status, _) = raw(
        addr,
        format!(
            "PUT {blob} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {publish}\r\nContent-Length: {}\r\n\r\n",
            2 << 20
        )
        .as_bytes(),
    );
    assert_eq!(status, 413);
    assert!(cas_is_empty(), "no blob stored");
    assert_eq!(
        raw(addr, &request("HEAD", &blob, Some(&publish), b"")).0,
        404
    );

    // Path tricks and malformed records.
    for path in [
        format!("/../{REPO}/cas/{sha}"),
        format!("/{REPO}/cas/{}", sha.to_uppercase()),
        format!("/{REPO}/cas/..%2f..%2fetc"),
        "/".into(),
    ] {
        let (status, body) = raw(addr, &request("GET", &path, Some(&publish), b""));
        assert_eq!(status, 404, "{path}: {body}");
    }
    let record = format!("/{REPO}/results/{}", key(5));
    for (body, expected) in [
        (&b"not json"[..], "malformed"),
        (&b"{\"key\":1}"[..], "malformed"),
    ] {
        let (status, reply) = raw(addr, &request("PUT", &record, Some(&publish), body));
        assert_eq!(status, 400, "{reply}");
        assert!(reply.contains(expected), "{reply}");
    }
    let (status, _) = raw(
        addr,
        &request("PUT", &record, Some(&publish), &vec![b' '; 2 << 20]),
    );
    assert_eq!(status, 413);

    // A well-formed record is still refused when unsigned, under another key, or naming
    // blobs never uploaded.
    let a = executor("a");
    let mut unsigned = recorded(&a.store, &key(5));
    let (status, reply) = raw(
        addr,
        &request(
            "PUT",
            &record,
            Some(&publish),
            serde_json::to_string(&unsigned).expect("json").as_bytes(),
        ),
    );
    assert_eq!(status, 400);
    assert!(reply.contains("not signed"), "{reply}");
    a.key.sign(&mut unsigned);
    let json = serde_json::to_string(&unsigned).expect("json");
    let (status, reply) = raw(
        addr,
        &request(
            "PUT",
            &format!("/{REPO}/results/{}", key(6)),
            Some(&publish),
            json.as_bytes(),
        ),
    );
    assert_eq!(status, 400);
    assert!(reply.contains("is not the key"), "{reply}");
    let (status, reply) = raw(
        addr,
        &request("PUT", &record, Some(&publish), json.as_bytes()),
    );
    assert_eq!(status, 400);
    assert!(reply.contains("is not uploaded"), "{reply}");
    assert_eq!(
        raw(addr, &request("HEAD", &record, Some(&publish), b"")).0,
        404
    );
}

#[test]
fn results_are_write_once() {
    let server = start(None, "127.0.0.1:0");
    let publish = server.token(REPO, true);
    let a = executor("a");
    let record = recorded(&a.store, &key(7));
    let client = server.client(Some(&publish));
    assert_eq!(
        client.publish(&record, &a.store, &a.key).expect("publish"),
        Published::Created
    );
    let mut different = record.clone();
    different.stdout = a.store.put_blob(b"another output").expect("blob");
    assert_eq!(
        client
            .publish(&different, &a.store, &a.key)
            .expect("publish"),
        Published::Conflict
    );
    let b = executor("b");
    let Fetched::Stored(got) = client
        .fetch(&key(7), &b.store, &[], &b.key.public())
        .expect("fetch")
    else {
        panic!("expected the first record");
    };
    assert_eq!(got.stdout, record.stdout);
}

#[test]
fn plain_http_is_refused_off_loopback() {
    let options = ServeOptions {
        listen: "0.0.0.0:0".parse().expect("address"),
        data: tempfile::tempdir().expect("tempdir").path().to_owned(),
        tls: None,
        keep_days: None,
        max_blob_bytes: 1,
        oidc: None,
        public_read: Vec::new(),
    };
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let error = runtime
        .block_on(Server::bind(&options))
        .expect_err("refused");
    assert!(
        error.to_string().contains("not a loopback address"),
        "{error}"
    );
    assert!(error.hint().is_some_and(|hint| hint.contains("--tls-cert")));
}

/// A CA, a server certificate for 127.0.0.1 and a client certificate, as PEM files in `dir`.
fn certificates(
    dir: &Path,
) -> (
    TlsOptions,
    std::path::PathBuf,
    (std::path::PathBuf, std::path::PathBuf),
    Vec<u8>,
) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
    let ca_key = KeyPair::generate().expect("key");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).expect("ca");
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let server_key = KeyPair::generate().expect("key");
    let server = CertificateParams::new(vec!["127.0.0.1".to_owned()])
        .expect("params")
        .signed_by(&server_key, &issuer)
        .expect("server");
    let client_key = KeyPair::generate().expect("key");
    let client = CertificateParams::new(vec!["executor".to_owned()])
        .expect("params")
        .signed_by(&client_key, &issuer)
        .expect("client");
    let write = |name: &str, content: String| {
        let path = dir.join(name);
        std::fs::write(&path, content).expect("write");
        path
    };
    let tls = TlsOptions {
        cert: write("server.pem", server.pem()),
        key: write("server.key", server_key.serialize_pem()),
        client_ca: Some(write("ca.pem", ca.pem())),
    };
    let ca_path = dir.join("ca.pem");
    let client_files = (
        write("client.pem", client.pem()),
        write("client.key", client_key.serialize_pem()),
    );
    (tls, ca_path, client_files, client.der().to_vec())
}

#[test]
fn tls_with_client_certificates_mapped_to_a_repository() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (tls, ca, client_files, client_der) = certificates(dir.path());
    let server = start(Some(tls), "127.0.0.1:0");
    assert!(server.url.starts_with("https://"), "{}", server.url);
    server
        .storage()
        .add_grant(Credential::Certificate(&client_der), REPO, true)
        .expect("grant");
    let a = executor("a");
    let record = recorded(&a.store, &key(8));
    let client = Orchestrator::new(ClientOptions {
        url: server.url.clone(),
        token: None,
        repository: REPO.into(),
        ca: Some(ca.clone()),
        client_certificate: Some(client_files),
        id_token: None,
    })
    .expect("client");
    assert_eq!(
        client.publish(&record, &a.store, &a.key).expect("publish"),
        Published::Created
    );

    // Without a client certificate the handshake itself is refused.
    let anonymous = Orchestrator::new(ClientOptions {
        url: server.url.clone(),
        token: Some("cie_x".into()),
        repository: REPO.into(),
        ca: Some(ca),
        client_certificate: None,
        id_token: None,
    })
    .expect("client");
    let error = anonymous
        .fetch(&key(8), &a.store, &[], &a.key.public())
        .expect_err("no certificate");
    assert!(error.to_string().contains("unreachable"), "{error}");
}

#[test]
fn an_unreachable_orchestrator_fails_fast() {
    // A port nothing listens on (bound, then closed).
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("port");
    let client = Orchestrator::new(ClientOptions {
        url: format!("http://{addr}"),
        token: Some("t".into()),
        repository: REPO.into(),
        ..ClientOptions::default()
    })
    .expect("client");
    let a = executor("a");
    let started = std::time::Instant::now();
    let error = client
        .fetch(&key(9), &a.store, &[], &a.key.public())
        .expect_err("down");
    assert!(error.to_string().contains("unreachable"), "{error}");
    assert!(started.elapsed() < ci_exec_remote::client::CONNECT_TIMEOUT * 2);
}

#[test]
fn a_connected_executors_result_is_relayed_and_gone_when_it_leaves() {
    let server = start(None, "127.0.0.1:0");
    let (publish, read) = (server.token(REPO, true), server.token(REPO, false));
    let e = executor("connected");
    let record = recorded(&e.store, &key(10));
    let connected = std::sync::Arc::new(
        server
            .client(Some(&publish))
            .connect(ExecutorKey::generate("connected").expect("key")),
    );
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let serving = {
        let (connected, stop) = (connected.clone(), stop.clone());
        let store = e.store.clone();
        let holdings = vec![record.clone()];
        std::thread::spawn(move || connected.serve(&store, &|| holdings.clone(), &stop))
    };

    let b = executor("b");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let fetched = loop {
        // Until the announcement has landed, the key is simply unknown.
        match server
            .client(Some(&read))
            .fetch(&key(10), &b.store, &[], &b.key.public())
        {
            Ok(Fetched::Miss) if std::time::Instant::now() < deadline => continue,
            other => break other.expect("fetch"),
        }
    };
    assert!(matches!(fetched, Fetched::Stored(_)), "{fetched:?}");
    for (sha, _) in record.blobs() {
        assert_eq!(
            b.store.read_blob(sha).expect("blob"),
            e.store.read_blob(sha).expect("blob")
        );
    }
    // Nothing relayed was stored on the orchestrator.
    assert_eq!(
        std::fs::read_dir(server.data.path().join("cas"))
            .expect("cas")
            .count(),
        0
    );

    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    connected.leave();
    let c = executor("c");
    assert!(matches!(
        server
            .client(Some(&read))
            .fetch(&key(10), &c.store, &[], &c.key.public()),
        Ok(Fetched::Miss)
    ));
    drop(serving);
}
