//! A fake OIDC issuer on loopback for the tests (this crate's and the CLI's, which includes
//! this file): a discovery document, a JWKS with the test key of `testdata/`, and GitHub
//! Actions' token endpoint, which mints a token for the `audience` asked for with the claims
//! the test set. Real HTTP on a real socket, one thread, `Connection: close`.

#![allow(dead_code, reason = "each test crate uses its own part of it")]

use std::io::{BufRead as _, BufReader, Write as _};
use std::net::TcpListener;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

/// The bearer the token endpoint requires (`ACTIONS_ID_TOKEN_REQUEST_TOKEN`).
pub const REQUEST_TOKEN: &str = "request-token-of-this-job";

fn testdata(name: &str) -> Vec<u8> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("remote")
        .join("testdata")
        .join(name);
    std::fs::read(&path).unwrap_or_else(|error| panic!("{}: {error}", path.display()))
}

#[derive(Debug)]
pub struct Issuer {
    pub url: String,
    /// The claims the token endpoint mints (besides iss, aud, iat, nbf, exp, jti).
    pub claims: Arc<Mutex<Value>>,
    jwks_fetches: Arc<AtomicUsize>,
    minted: Arc<AtomicUsize>,
}

pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| elapsed.as_secs())
        .unwrap_or(0)
}

impl Issuer {
    pub fn start() -> Issuer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the issuer");
        let url = format!("http://{}", listener.local_addr().expect("address"));
        let claims = Arc::new(Mutex::new(json!({})));
        let jwks_fetches = Arc::new(AtomicUsize::new(0));
        let minted = Arc::new(AtomicUsize::new(0));
        let issuer = Issuer {
            url: url.clone(),
            claims: claims.clone(),
            jwks_fetches: jwks_fetches.clone(),
            minted: minted.clone(),
        };
        let signer = Issuer {
            url,
            claims,
            jwks_fetches,
            minted,
        };
        // Detached: it ends with the test process.
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                signer.answer(stream);
            }
        });
        issuer
    }

    fn answer(&self, mut stream: std::net::TcpStream) {
        let mut reader = BufReader::new(stream.try_clone().expect("clone"));
        let mut first = String::new();
        if reader.read_line(&mut first).is_err() {
            return;
        }
        let mut authorization = String::new();
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                break;
            }
            if let Some((name, value)) = line.split_once(':')
                && name.eq_ignore_ascii_case("authorization")
            {
                authorization = value.trim().to_owned();
            }
        }
        let target = first.split_whitespace().nth(1).unwrap_or("/").to_owned();
        let (path, query) = target.split_once('?').unwrap_or((&target, ""));
        let (status, body) = match path {
            "/.well-known/openid-configuration" => (
                200,
                json!({"issuer": self.url, "jwks_uri": format!("{}/.well-known/jwks", self.url)})
                    .to_string(),
            ),
            "/.well-known/jwks" => {
                self.jwks_fetches.fetch_add(1, Ordering::SeqCst);
                (
                    200,
                    String::from_utf8(testdata("oidc-issuer.jwks.json")).expect("utf-8"),
                )
            }
            "/token" if authorization == format!("bearer {REQUEST_TOKEN}") => {
                let audience = query
                    .split('&')
                    .find_map(|pair| pair.strip_prefix("audience="))
                    .map(percent_decode)
                    .unwrap_or_default();
                let claims = self.claims.lock().expect("claims").clone();
                let token = self.sign(&self.complete(claims, &audience));
                (200, json!({"value": token}).to_string())
            }
            "/token" => (401, "{\"message\":\"bad request token\"}".into()),
            _ => (404, "{}".into()),
        };
        let _ = write!(
            stream,
            "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
    }

    /// `claims` with the registered claims a real token has: iss, aud, iat, nbf, exp (5
    /// minutes, as GitHub's) and a fresh jti. Claims already set are kept.
    pub fn complete(&self, mut claims: Value, audience: &str) -> Value {
        let now = now();
        let jti = self.minted.fetch_add(1, Ordering::SeqCst);
        let defaults = json!({
            "iss": self.url,
            "aud": audience,
            "iat": now,
            "nbf": now,
            "exp": now + 300,
            "jti": format!("jti-{}-{jti}", std::process::id()),
        });
        if let (Some(claims), Some(defaults)) = (claims.as_object_mut(), defaults.as_object()) {
            for (name, value) in defaults {
                claims.entry(name.clone()).or_insert(value.clone());
            }
        }
        claims
    }

    /// Signs `claims` with the issuer's key (kid `test-key-1`).
    pub fn sign(&self, claims: &Value) -> String {
        sign_with(claims, &testdata("oidc-issuer.pem"), "test-key-1")
    }

    /// A complete token for `audience`.
    pub fn token(&self, claims: Value, audience: &str) -> String {
        self.sign(&self.complete(claims, audience))
    }

    pub fn jwks_fetches(&self) -> usize {
        self.jwks_fetches.load(Ordering::SeqCst)
    }
}

pub fn sign_with(claims: &Value, pem: &[u8], kid: &str) -> String {
    let mut header = Header::new(Algorithm::RS256);
    header.kid = Some(kid.to_owned());
    let key = EncodingKey::from_rsa_pem(pem).expect("test key");
    jsonwebtoken::encode(&header, claims, &key).expect("sign")
}

/// A token signed by a key the issuer does not publish.
pub fn impostor(claims: &Value) -> String {
    sign_with(claims, &testdata("oidc-impostor.pem"), "test-key-1")
}

/// The claims of a GitHub Actions job of repository `id` (owner `owner_id`).
pub fn github(id: u64, owner_id: u64, event: &str, git_ref: &str, protected: bool) -> Value {
    json!({
        "sub": format!("repo:acme/widget:ref:{git_ref}"),
        "repository": "acme/widget",
        "repository_id": id.to_string(),
        "repository_owner": "acme",
        "repository_owner_id": owner_id.to_string(),
        "event_name": event,
        "ref": git_ref,
        "ref_protected": protected.to_string(),
        "ref_type": "branch",
        "workflow_ref": format!("acme/widget/.github/workflows/ci-exec.yml@{git_ref}"),
        "runner_environment": "github-hosted",
    })
}

/// The claims of a GitLab CI job of project `id` (namespace `namespace_id`).
pub fn gitlab(id: u64, namespace_id: u64, source: &str, git_ref: &str, protected: bool) -> Value {
    json!({
        "sub": format!("project_path:acme/widget:ref_type:branch:ref:{git_ref}"),
        "project_path": "acme/widget",
        "project_id": id.to_string(),
        "namespace_path": "acme",
        "namespace_id": namespace_id.to_string(),
        "pipeline_source": source,
        "ref": git_ref,
        "ref_type": "branch",
        "ref_path": format!("refs/heads/{git_ref}"),
        "ref_protected": protected.to_string(),
    })
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        if bytes[index] == b'%'
            && let Some(hex) = text.get(index + 1..index + 3)
            && let Ok(byte) = u8::from_str_radix(hex, 16)
        {
            out.push(byte);
            index += 3;
            continue;
        }
        out.push(bytes[index]);
        index += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}
