//! The REST client every cloud provider shares: bearer token, JSON bodies, the providers'
//! error shapes, and backing off on 429 as the rate-limit headers say.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use reqwest::{Method, StatusCode};
use serde_json::Value;

use crate::CloudError;

/// Longest total wait on 429 answers before giving up on one request.
const RATE_LIMIT_PATIENCE: Duration = Duration::from_secs(300);
/// Longest single wait on a 429, whatever the headers say: the limit is re-read after it.
const RATE_LIMIT_STEP: Duration = Duration::from_secs(60);
/// How long one request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// An API token. Its `Debug` and `Display` never show it.
#[derive(Clone)]
pub struct Secret(String);

impl Secret {
    pub fn new(token: impl Into<String>) -> Self {
        Secret(token.into())
    }

    pub(crate) fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(ci_exec_driver::REDACTED)
    }
}

/// Where a provider's token comes from, for the 401 message.
#[derive(Debug, Clone, Copy)]
pub(crate) struct TokenSource {
    pub(crate) parameter: &'static str,
    pub(crate) env: &'static str,
}

/// One provider's API: base URL, token, and a count of the requests sent (for the
/// benchmarks' "API requests per task").
#[derive(Debug, Clone)]
pub(crate) struct Api {
    pub(crate) provider: &'static str,
    base: String,
    token: Secret,
    token_source: TokenSource,
    client: reqwest::Client,
    requests: Arc<AtomicU64>,
}

impl Api {
    pub(crate) fn new(
        driver: &'static str,
        provider: &'static str,
        endpoint: &str,
        token: Secret,
        token_source: TokenSource,
    ) -> Result<Self, CloudError> {
        let invalid = |reason: String| CloudError::InvalidParameter {
            driver,
            parameter: "endpoint",
            reason,
        };
        let parsed = reqwest::Url::parse(endpoint)
            .map_err(|error| invalid(format!("`{endpoint}` is not a URL: {error}")))?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err(invalid(format!("`{endpoint}` is not an http(s) URL")));
        }
        Ok(Api {
            provider,
            base: endpoint.trim_end_matches('/').to_owned(),
            token,
            token_source,
            client: http_client().map_err(|error| invalid(error.to_string()))?,
            requests: Arc::new(AtomicU64::new(0)),
        })
    }

    /// Requests sent so far (retries included).
    pub(crate) fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// Deletes the resource at `path`; one already gone (404) is not an error.
    pub(crate) async fn delete(&self, path: &str, action: &str) -> Result<(), CloudError> {
        self.call(Method::DELETE, path, &[], None, action, true)
            .await?;
        Ok(())
    }

    /// Sends one request and returns its JSON body (`Value::Null` for an empty one). `action`
    /// says what the request is for, in error messages. A 404 is `Ok(None)` when `missing_ok`.
    pub(crate) async fn call(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, String)],
        body: Option<&Value>,
        action: &str,
        missing_ok: bool,
    ) -> Result<Option<Value>, CloudError> {
        let Some(bytes) = self
            .send(method, path, query, body, action, missing_ok)
            .await?
        else {
            return Ok(None);
        };
        if bytes.is_empty() {
            return Ok(Some(Value::Null));
        }
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|error| self.protocol(action, format!("not JSON: {error}")))
    }

    /// Sends one request and returns its body as bytes (Fly's `exec` answers with the
    /// command's raw output), backing off on 429 and mapping refusals to [`CloudError`]s.
    pub(crate) async fn send(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, String)],
        body: Option<&Value>,
        action: &str,
        missing_ok: bool,
    ) -> Result<Option<bytes::Bytes>, CloudError> {
        let url = format!("{}{path}", self.base);
        let mut waited = Duration::ZERO;
        loop {
            let mut request = self
                .client
                .request(method.clone(), &url)
                .bearer_auth(self.token.expose())
                .timeout(REQUEST_TIMEOUT);
            if !query.is_empty() {
                request = request.query(query);
            }
            if let Some(body) = body {
                request = request.json(body);
            }
            self.requests.fetch_add(1, Ordering::Relaxed);
            tracing::trace!(provider = self.provider, %method, path, "API request");
            let response = request
                .send()
                .await
                .map_err(|source| self.transport(action, source))?;
            let status = response.status();
            if status == StatusCode::TOO_MANY_REQUESTS {
                let wait = rate_limit_wait(response.headers(), SystemTime::now());
                if waited >= RATE_LIMIT_PATIENCE {
                    return Err(CloudError::RateLimited {
                        provider: self.provider,
                        action: action.to_owned(),
                        waited,
                    });
                }
                tracing::info!(
                    provider = self.provider,
                    ?wait,
                    action,
                    "rate-limited: backing off"
                );
                tokio::time::sleep(wait).await;
                waited += wait;
                continue;
            }
            let bytes = response
                .bytes()
                .await
                .map_err(|source| self.transport(action, source))?;
            if status == StatusCode::NOT_FOUND && missing_ok {
                return Ok(None);
            }
            if status == StatusCode::UNAUTHORIZED {
                return Err(CloudError::Unauthorized {
                    provider: self.provider,
                    parameter: self.token_source.parameter,
                    env: self.token_source.env,
                });
            }
            if !status.is_success() {
                return Err(CloudError::Refused {
                    provider: self.provider,
                    action: action.to_owned(),
                    status: status.as_u16(),
                    message: api_message(&bytes),
                });
            }
            return Ok(Some(bytes));
        }
    }

    pub(crate) fn protocol(&self, action: &str, reason: impl Into<String>) -> CloudError {
        CloudError::Protocol {
            provider: self.provider,
            action: action.to_owned(),
            reason: reason.into(),
        }
    }

    fn transport(&self, action: &str, source: reqwest::Error) -> CloudError {
        CloudError::Transport {
            provider: self.provider,
            action: action.to_owned(),
            endpoint: self.base.clone(),
            source: source.without_url(),
        }
    }
}

/// A reqwest client on rustls with ring and the platform's trust store, built without a
/// process-wide crypto provider (DESIGN.md §6: never aws-lc, never OpenSSL).
fn http_client() -> Result<reqwest::Client, Box<dyn std::error::Error + Send + Sync>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = rustls_platform_verifier::Verifier::new(provider.clone())?;
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    Ok(reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        .user_agent(concat!("ci-exec/", env!("CARGO_PKG_VERSION")))
        .build()?)
}

/// The message of an error body, in the shapes the providers use: Hetzner
/// `{"error":{"code","message"}}`, DigitalOcean `{"id","message"}`, Fly `{"error":"…"}`.
pub(crate) fn api_message(body: &[u8]) -> String {
    let text = || {
        let text = String::from_utf8_lossy(body);
        let text = text.trim();
        if text.is_empty() {
            "no message".to_owned()
        } else {
            text.chars().take(300).collect()
        }
    };
    let Ok(value) = serde_json::from_slice::<Value>(body) else {
        return text();
    };
    let message = value["error"]["message"]
        .as_str()
        .or_else(|| value["message"].as_str())
        .or_else(|| value["error"].as_str());
    match (message, value["error"]["code"].as_str()) {
        (Some(message), Some(code)) => format!("{message} ({code})"),
        (Some(message), None) => message.to_owned(),
        (None, _) => text(),
    }
}

/// How long to wait after a 429: `Retry-After` seconds, else until `RateLimit-Reset` (a Unix
/// time, as Hetzner and DigitalOcean send it), at least a second and at most
/// [`RATE_LIMIT_STEP`].
pub(crate) fn rate_limit_wait(headers: &reqwest::header::HeaderMap, now: SystemTime) -> Duration {
    let number = |name: &str| {
        headers
            .get(name)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.trim().parse::<u64>().ok())
    };
    let now_seconds = now.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
    let wait = if let Some(seconds) = number("retry-after") {
        Duration::from_secs(seconds)
    } else if let Some(reset) = number("ratelimit-reset") {
        Duration::from_secs(reset.saturating_sub(now_seconds))
    } else {
        Duration::from_secs(5)
    };
    wait.clamp(Duration::from_secs(1), RATE_LIMIT_STEP)
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::{HeaderMap, HeaderValue};

    #[test]
    fn error_messages_come_from_each_providers_body() {
        let cases: &[(&str, &str)] = &[
            (
                r#"{"error":{"code":"invalid_input","message":"server type cx99 not found","details":{}}}"#,
                "server type cx99 not found (invalid_input)",
            ),
            (
                r#"{"id":"unprocessable_entity","message":"You specified an invalid size for Droplet creation.","request_id":"x"}"#,
                "You specified an invalid size for Droplet creation.",
            ),
            (r#"{"error":"app not found"}"#, "app not found"),
            ("gateway timeout", "gateway timeout"),
            ("", "no message"),
        ];
        for (body, want) in cases {
            assert_eq!(api_message(body.as_bytes()), *want);
        }
    }

    #[test]
    fn rate_limit_waits_follow_the_headers() {
        let now = UNIX_EPOCH + Duration::from_secs(1_000_000);
        let mut headers = HeaderMap::new();
        assert_eq!(rate_limit_wait(&headers, now), Duration::from_secs(5));
        headers.insert("RateLimit-Reset", HeaderValue::from_static("1000003"));
        assert_eq!(rate_limit_wait(&headers, now), Duration::from_secs(3));
        headers.insert("RateLimit-Reset", HeaderValue::from_static("1003600"));
        assert_eq!(rate_limit_wait(&headers, now), RATE_LIMIT_STEP);
        headers.insert("RateLimit-Reset", HeaderValue::from_static("999999"));
        assert_eq!(rate_limit_wait(&headers, now), Duration::from_secs(1));
        headers.insert("Retry-After", HeaderValue::from_static("2"));
        assert_eq!(rate_limit_wait(&headers, now), Duration::from_secs(2));
    }

    /// The TLS path runs on ring without a process-wide provider (DESIGN.md §6): a handshake
    /// with something that is not a TLS server fails as a transport error, it does not panic.
    #[tokio::test]
    async fn https_handshakes_use_ring_without_a_global_provider() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(async move {
            use tokio::io::AsyncWriteExt as _;
            if let Ok((mut stream, _)) = listener.accept().await {
                let _ = stream.write_all(b"HTTP/1.1 400 not tls\r\n\r\n").await;
            }
        });
        let api = Api::new(
            "hetzner",
            "Hetzner Cloud",
            &format!("https://{address}/v1"),
            Secret::new("t"),
            TokenSource {
                parameter: "token",
                env: "HETZNER_TOKEN",
            },
        )
        .unwrap();
        let error = api
            .call(Method::GET, "/servers", &[], None, "list servers", false)
            .await
            .unwrap_err();
        assert!(matches!(error, CloudError::Transport { .. }), "{error:?}");
    }

    #[test]
    fn secrets_never_print() {
        let secret = Secret::new("hcloud-token-123");
        assert!(!format!("{secret:?}").contains("123"));
    }
}
