//! CI identity without stored secrets: a GitHub Actions or GitLab CI job proves which
//! repository it runs for with the platform's OIDC ID token, and the orchestrator checks it
//! the way the Rust registry's trusted publishing does:
//!
//! - the issuer must be one `serve --oidc-issuer` names; its keys come from its discovery
//!   document's `jwks_uri`, are cached by `kid`, and are fetched again on an unknown `kid` at
//!   most once a minute (a token with made-up key ids cannot make us hammer the issuer);
//! - RS256 only; `iss`, `aud` (the orchestrator's own URL), `exp` and `iat` are required, `nbf`
//!   is checked, an `iat` in the future is refused, and each `jti` is accepted once;
//! - the token maps to a repository by numeric id (GitHub `repository_id` and
//!   `repository_owner_id`, GitLab `project_id` and `namespace_id`) through a binding made by
//!   `ci-exec token bind` — never by name, which a rename or a re-registered owner can take over;
//! - its claims choose the scope it may write ([`access_of`]): only protected refs built by
//!   trusted events publish to the repository's trusted scope.
//!
//! A job makes many requests but holds one token (GitLab's `id_tokens:` is one variable), and
//! a `jti` is good once: the client trades the token for a short-lived session token at
//! `POST /<repository>/login`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use jsonwebtoken::jwk::{AlgorithmParameters, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

use super::auth::{AuthError, Authenticator, Presented};
use super::storage::{Grant, Storage};
use ci_exec_job::store::unix_now;

/// An unknown `kid` fetches the issuer's keys again at most this often.
pub const REFETCH_FLOOR: Duration = Duration::from_secs(60);
/// Keys older than this are fetched again on their next use (the issuer rotates them).
const KEYS_MAX_AGE: Duration = Duration::from_secs(3600);
/// How long a fetch from the issuer may take.
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// Clock skew allowed on `exp`, `nbf` and `iat`.
const LEEWAY_SECS: u64 = 60;

/// GitHub events that build what the repository's maintainers pushed or started.
const TRUSTED_GITHUB_EVENTS: &[&str] = &[
    "push",
    "schedule",
    "workflow_dispatch",
    "repository_dispatch",
];
/// GitHub events that run in the default branch's context on behalf of outsiders: the
/// triggers of the cache-poisoning attacks (research §2). They may read, never write.
const UNTRUSTED_GITHUB_EVENTS: &[&str] = &[
    "pull_request_target",
    "workflow_run",
    "issue_comment",
    "pull_request_review",
    "pull_request_review_comment",
    "discussion",
    "discussion_comment",
    "fork",
    "watch",
];
/// GitLab pipeline sources that build what the project's members pushed or started.
const TRUSTED_GITLAB_SOURCES: &[&str] = &["push", "schedule", "web", "api", "trigger", "pipeline"];

#[derive(Debug, Clone)]
pub struct OidcOptions {
    /// The issuers whose tokens are accepted (`https://token.actions.githubusercontent.com`,
    /// `https://gitlab.com`, …).
    pub issuers: Vec<String>,
    /// The `aud` a token must carry: the orchestrator's URL as clients name it.
    pub audience: String,
    /// How long a session token from `login` lasts.
    pub session: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum OidcConfigError {
    #[error("OIDC issuer `{issuer}` is not an `https://` URL")]
    NotHttps { issuer: String },
    #[error("`--oidc-issuer` needs `--oidc-audience`, the orchestrator's URL as CI jobs name it")]
    NoAudience,
}

impl OidcConfigError {
    pub fn hint(&self) -> &'static str {
        match self {
            OidcConfigError::NotHttps { .. } => {
                "give the issuer as CI tokens name it in `iss`, e.g. `https://token.actions.githubusercontent.com`; plain `http://` only on 127.0.0.1 (tests)"
            }
            OidcConfigError::NoAudience => {
                "pass `--oidc-audience https://ci.example.org`, the URL given to `ci-exec init --orchestrator`"
            }
        }
    }
}

/// Whether `url` may be an issuer: `https://`, or `http://` on a loopback address (a test
/// issuer; never a real one).
pub fn acceptable_issuer(url: &str) -> bool {
    if url.starts_with("https://") {
        return true;
    }
    let Some(rest) = url.strip_prefix("http://") else {
        return false;
    };
    let host = rest.split('/').next().unwrap_or_default();
    let host = match host.rsplit_once(':') {
        Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) => host,
        _ => host,
    };
    host == "localhost"
        || host == "[::1]"
        || host
            .parse::<std::net::Ipv4Addr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// What a verified token may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Access {
    /// Read and publish the repository's trusted scope.
    Trusted,
    /// Publish to this scope of its own (`pr/12`, `ref/refs/heads/topic`), read it and the
    /// trusted scope.
    Own(String),
    /// Read the trusted scope only.
    ReadOnly,
}

/// The claims this module reads; both platforms' tokens carry many more.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Claims {
    pub iss: String,
    #[serde(default)]
    pub jti: Option<String>,
    pub exp: u64,
    #[serde(default)]
    pub iat: Option<u64>,
    // GitHub Actions.
    #[serde(default)]
    pub repository_id: Option<IdClaim>,
    #[serde(default)]
    pub repository_owner_id: Option<IdClaim>,
    #[serde(default)]
    pub repository: Option<String>,
    #[serde(default)]
    pub event_name: Option<String>,
    // GitLab CI.
    #[serde(default)]
    pub project_id: Option<IdClaim>,
    #[serde(default)]
    pub namespace_id: Option<IdClaim>,
    #[serde(default)]
    pub project_path: Option<String>,
    #[serde(default)]
    pub pipeline_source: Option<String>,
    #[serde(default)]
    pub ref_path: Option<String>,
    // Both.
    #[serde(default, rename = "ref")]
    pub git_ref: Option<String>,
    #[serde(default)]
    pub ref_protected: Option<FlagClaim>,
}

/// A numeric id: GitHub sends them as strings, GitLab as strings too; numbers are accepted.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum IdClaim {
    Text(String),
    Number(u64),
}

impl IdClaim {
    fn text(&self) -> String {
        match self {
            IdClaim::Text(text) => text.clone(),
            IdClaim::Number(number) => number.to_string(),
        }
    }
}

/// `"true"` / `"false"` as both platforms send them, or a JSON boolean.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum FlagClaim {
    Text(String),
    Bool(bool),
}

impl FlagClaim {
    fn is_true(&self) -> bool {
        match self {
            FlagClaim::Text(text) => text == "true",
            FlagClaim::Bool(value) => *value,
        }
    }
}

impl Claims {
    /// (subject, owner): the repository or project id and its owner's or namespace's id.
    pub fn identity(&self) -> Result<(String, String), String> {
        match (
            &self.repository_id,
            &self.repository_owner_id,
            &self.project_id,
            &self.namespace_id,
        ) {
            (Some(repository), Some(owner), _, _) => Ok((repository.text(), owner.text())),
            (None, None, Some(project), Some(namespace)) => Ok((project.text(), namespace.text())),
            _ => Err("the ID token names no `repository_id` and `repository_owner_id` (GitHub) or `project_id` and `namespace_id` (GitLab)".into()),
        }
    }

    fn protected(&self) -> bool {
        self.ref_protected.as_ref().is_some_and(FlagClaim::is_true)
    }

    /// The name the token gives its repository, for messages only.
    fn name(&self) -> &str {
        self.repository
            .as_deref()
            .or(self.project_path.as_deref())
            .unwrap_or("(unnamed)")
    }
}

/// What a token's claims may do (research §2, "rules the best systems converge on"): only a
/// protected ref built by a trusted event writes the trusted scope; a pull or merge request
/// writes its own scope; events that run outsiders' requests in the default branch's context
/// only read.
pub fn access_of(claims: &Claims) -> Access {
    let git_ref = claims.git_ref.as_deref().unwrap_or_default();
    let own_ref = || Access::Own(format!("ref/{git_ref}"));
    if let Some(event) = claims.event_name.as_deref() {
        if UNTRUSTED_GITHUB_EVENTS.contains(&event) {
            return Access::ReadOnly;
        }
        if TRUSTED_GITHUB_EVENTS.contains(&event) && claims.protected() {
            return Access::Trusted;
        }
        if event == "pull_request" {
            return match pull_number(git_ref, "refs/pull/") {
                Some(number) => Access::Own(format!("pr/{number}")),
                None => own_ref(),
            };
        }
        return own_ref();
    }
    if let Some(source) = claims.pipeline_source.as_deref() {
        if TRUSTED_GITLAB_SOURCES.contains(&source) && claims.protected() {
            return Access::Trusted;
        }
        let path = claims.ref_path.as_deref().unwrap_or_default();
        if let Some(number) = pull_number(path, "refs/merge-requests/") {
            return Access::Own(format!("mr/{number}"));
        }
        return own_ref();
    }
    Access::ReadOnly
}

/// `12` of `refs/pull/12/merge` (or `refs/merge-requests/12/head`).
fn pull_number<'a>(git_ref: &'a str, prefix: &str) -> Option<&'a str> {
    let number = git_ref.strip_prefix(prefix)?.split('/').next()?;
    (!number.is_empty() && number.bytes().all(|b| b.is_ascii_digit())).then_some(number)
}

/// The keys of one issuer, as last fetched.
#[derive(Default)]
struct IssuerKeys {
    keys: HashMap<String, DecodingKey>,
    fetched: Option<Instant>,
    /// The last fetch, successful or not: the floor counts from it.
    attempted: Option<Instant>,
}

impl std::fmt::Debug for IssuerKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IssuerKeys")
            .field("kids", &self.keys.keys().collect::<Vec<_>>())
            .field("fetched", &self.fetched)
            .finish()
    }
}

/// The OIDC [`Authenticator`].
#[derive(Debug)]
pub struct Oidc {
    storage: Arc<Storage>,
    audience: String,
    issuers: HashMap<String, Mutex<IssuerKeys>>,
    agent: ureq::Agent,
}

#[derive(Debug, Deserialize)]
struct Discovery {
    issuer: String,
    jwks_uri: String,
}

impl Oidc {
    pub fn new(storage: Arc<Storage>, options: &OidcOptions) -> Result<Oidc, OidcConfigError> {
        if options.audience.is_empty() {
            return Err(OidcConfigError::NoAudience);
        }
        let mut issuers = HashMap::new();
        for issuer in &options.issuers {
            let issuer = normalize(issuer);
            if !acceptable_issuer(&issuer) {
                return Err(OidcConfigError::NotHttps { issuer });
            }
            issuers.insert(issuer, Mutex::new(IssuerKeys::default()));
        }
        let agent = ureq::Agent::config_builder()
            .timeout_global(Some(FETCH_TIMEOUT))
            .http_status_as_error(false)
            .build()
            .into();
        Ok(Oidc {
            storage,
            audience: normalize(&options.audience),
            issuers,
            agent,
        })
    }

    /// Checks `token` and returns its claims and the binding's grant.
    pub fn verify(&self, token: &str) -> Result<(Claims, Grant), AuthError> {
        let refused = |message: String| AuthError::Refused(message);
        let header = jsonwebtoken::decode_header(token)
            .map_err(|error| refused(format!("malformed ID token: {error}")))?;
        if header.alg != Algorithm::RS256 {
            return Err(refused(format!(
                "ID token signed with `{:?}`; only RS256 is accepted",
                header.alg
            )));
        }
        let kid = header
            .kid
            .ok_or_else(|| refused("the ID token's header has no `kid`".into()))?;
        // Which issuer to ask for keys: read before the signature is checked, then required
        // to match by the validation below.
        let unverified: Claims = jsonwebtoken::dangerous::insecure_decode_claims(token)
            .map_err(|error| refused(format!("malformed ID token claims: {error}")))?;
        let issuer = normalize(&unverified.iss);
        let Some(keys) = self.issuers.get(&issuer) else {
            return Err(refused(format!(
                "ID tokens of issuer `{}` are not accepted here (`serve --oidc-issuer`)",
                unverified.iss
            )));
        };
        let key = self.key(&issuer, keys, &kid)?;
        let mut validation = Validation::new(Algorithm::RS256);
        validation.leeway = LEEWAY_SECS;
        validation.validate_nbf = true;
        validation.set_required_spec_claims(&["exp", "iss", "aud"]);
        validation.set_issuer(&[unverified.iss.as_str()]);
        validation.set_audience(&[self.audience.as_str(), &format!("{}/", self.audience)]);
        let claims = jsonwebtoken::decode::<Claims>(token, &key, &validation)
            .map_err(|error| refused(self.explain(&error, token)))?
            .claims;
        let now = unix_now();
        let Some(iat) = claims.iat else {
            return Err(refused("the ID token has no `iat`".into()));
        };
        if iat > now + LEEWAY_SECS {
            return Err(refused(
                "the ID token was issued in the future (`iat`); check the clocks".into(),
            ));
        }
        let (subject, owner) = claims.identity().map_err(refused)?;
        let binding = self.storage.binding(&issuer, &subject)?.ok_or_else(|| {
            refused(format!(
                "no repository is bound to `{}` (id {subject}) of `{issuer}`: `ci-exec token bind` binds one",
                claims.name()
            ))
        })?;
        if binding.owner != owner {
            return Err(refused(format!(
                "`{}` (id {subject}) now belongs to owner id {owner}, not {} as bound: the binding no longer holds",
                claims.name(),
                binding.owner
            )));
        }
        let jti = claims
            .jti
            .as_deref()
            .filter(|jti| !jti.is_empty())
            .ok_or_else(|| {
                refused("the ID token has no `jti`, so a replay cannot be told".into())
            })?;
        if !self.storage.use_token_id(&issuer, jti, claims.exp)? {
            return Err(refused(
                "this ID token was already used (`jti`); request a new one".into(),
            ));
        }
        let (publish, scope) = match access_of(&claims) {
            Access::Trusted => (true, None),
            Access::Own(scope) => (true, Some(scope)),
            Access::ReadOnly => (false, None),
        };
        let grant = Grant {
            repository: binding.repository,
            publish,
            created_unix: now,
            id: binding.id,
            scope,
        };
        Ok((claims, grant))
    }

    fn explain(&self, error: &jsonwebtoken::errors::Error, token: &str) -> String {
        use jsonwebtoken::errors::ErrorKind;
        match error.kind() {
            ErrorKind::ExpiredSignature => "the ID token expired (`exp`)".into(),
            ErrorKind::ImmatureSignature => "the ID token is not valid yet (`nbf`)".into(),
            ErrorKind::InvalidAudience => {
                let audience =
                    jsonwebtoken::dangerous::insecure_decode_claims::<serde_json::Value>(token)
                        .ok()
                        .map(|claims| claims["aud"].to_string())
                        .unwrap_or_default();
                format!(
                    "the ID token is for audience {audience}, not `{}`",
                    self.audience
                )
            }
            ErrorKind::InvalidIssuer => "the ID token's issuer does not match".into(),
            ErrorKind::InvalidSignature => {
                "the ID token's signature does not verify with the issuer's key".into()
            }
            ErrorKind::MissingRequiredClaim(claim) => {
                format!("the ID token has no `{claim}`")
            }
            other => format!("the ID token is refused: {other:?}"),
        }
    }

    /// The key `kid` of `issuer`, fetching the issuer's keys when it is unknown (no more
    /// often than [`REFETCH_FLOOR`]) or they are old.
    fn key(
        &self,
        issuer: &str,
        keys: &Mutex<IssuerKeys>,
        kid: &str,
    ) -> Result<DecodingKey, AuthError> {
        // Held across the fetch: concurrent tokens of one issuer wait for one fetch rather
        // than each starting their own.
        let mut keys = keys
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let fresh = keys
            .fetched
            .is_some_and(|fetched| fetched.elapsed() < KEYS_MAX_AGE);
        if fresh && let Some(key) = keys.keys.get(kid) {
            return Ok(key.clone());
        }
        let may_fetch = keys
            .attempted
            .is_none_or(|attempted| attempted.elapsed() >= REFETCH_FLOOR)
            || !fresh;
        if may_fetch {
            keys.attempted = Some(Instant::now());
            match self.fetch(issuer) {
                Ok(fetched) => {
                    keys.keys = fetched;
                    keys.fetched = Some(Instant::now());
                }
                Err(problem) => {
                    tracing::warn!("cannot fetch the keys of OIDC issuer `{issuer}`: {problem}");
                    // Keys already held stay usable while the issuer is unreachable.
                    if let Some(key) = keys.keys.get(kid) {
                        return Ok(key.clone());
                    }
                    return Err(AuthError::Refused(format!(
                        "cannot fetch the keys of issuer `{issuer}`: {problem}"
                    )));
                }
            }
        }
        keys.keys.get(kid).cloned().ok_or_else(|| {
            AuthError::Refused(format!(
                "issuer `{issuer}` has no key `{kid}` (its keys were fetched within the last {} s)",
                REFETCH_FLOOR.as_secs()
            ))
        })
    }

    /// Discovery document, then `jwks_uri`: the RSA signing keys by `kid`.
    fn fetch(&self, issuer: &str) -> Result<HashMap<String, DecodingKey>, String> {
        let discovery: Discovery =
            self.get_json(&format!("{issuer}/.well-known/openid-configuration"))?;
        if normalize(&discovery.issuer) != issuer {
            return Err(format!(
                "its discovery document names issuer `{}`",
                discovery.issuer
            ));
        }
        let loopback_issuer = issuer.starts_with("http://");
        if !(discovery.jwks_uri.starts_with("https://")
            || loopback_issuer && acceptable_issuer(&discovery.jwks_uri))
        {
            return Err(format!(
                "its `jwks_uri` `{}` is not https",
                discovery.jwks_uri
            ));
        }
        let set: JwkSet = self.get_json(&discovery.jwks_uri)?;
        let mut keys = HashMap::new();
        for jwk in &set.keys {
            let (Some(kid), AlgorithmParameters::RSA(_)) = (&jwk.common.key_id, &jwk.algorithm)
            else {
                continue;
            };
            match DecodingKey::from_jwk(jwk) {
                Ok(key) => {
                    keys.insert(kid.clone(), key);
                }
                Err(error) => tracing::warn!("issuer `{issuer}`: key `{kid}` unusable: {error}"),
            }
        }
        if keys.is_empty() {
            return Err("its JWKS has no RSA key".into());
        }
        Ok(keys)
    }

    fn get_json<T: serde::de::DeserializeOwned>(&self, url: &str) -> Result<T, String> {
        let mut response = self
            .agent
            .get(url)
            .call()
            .map_err(|error| format!("`{url}`: {error}"))?;
        if response.status() != 200 {
            return Err(format!("`{url}` answered {}", response.status()));
        }
        let body = response
            .body_mut()
            .with_config()
            .limit(1 << 20)
            .read_to_string()
            .map_err(|error| format!("`{url}`: {error}"))?;
        serde_json::from_str(&body).map_err(|error| format!("`{url}`: {error}"))
    }
}

/// An ID token is three base64url parts; a bearer token from `token create` has no dots.
pub fn looks_like_jwt(token: &str) -> bool {
    token.split('.').count() == 3 && token.starts_with("eyJ")
}

impl Authenticator for Oidc {
    fn authenticate(&self, presented: &Presented<'_>) -> Result<Option<Grant>, AuthError> {
        match presented.bearer {
            Some(token) if looks_like_jwt(token) => {
                self.verify(token).map(|(_, grant)| Some(grant))
            }
            _ => Ok(None),
        }
    }
}

fn normalize(url: &str) -> String {
    url.trim_end_matches('/').to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn github(event: &str, git_ref: &str, protected: bool) -> Claims {
        Claims {
            event_name: Some(event.into()),
            git_ref: Some(git_ref.into()),
            ref_protected: Some(FlagClaim::Text(protected.to_string())),
            ..Claims::default()
        }
    }

    fn gitlab(source: &str, git_ref: &str, ref_path: &str, protected: bool) -> Claims {
        Claims {
            pipeline_source: Some(source.into()),
            git_ref: Some(git_ref.into()),
            ref_path: Some(ref_path.into()),
            ref_protected: Some(FlagClaim::Bool(protected)),
            ..Claims::default()
        }
    }

    #[test]
    fn claims_choose_the_scope() {
        let own = |scope: &str| Access::Own(scope.into());
        let cases = [
            (github("push", "refs/heads/main", true), Access::Trusted),
            (github("schedule", "refs/heads/main", true), Access::Trusted),
            (
                github("workflow_dispatch", "refs/heads/main", true),
                Access::Trusted,
            ),
            (
                github("push", "refs/heads/topic", false),
                own("ref/refs/heads/topic"),
            ),
            (
                github("pull_request", "refs/pull/12/merge", false),
                own("pr/12"),
            ),
            (
                github("pull_request_target", "refs/heads/main", true),
                Access::ReadOnly,
            ),
            (
                github("workflow_run", "refs/heads/main", true),
                Access::ReadOnly,
            ),
            (
                github("issue_comment", "refs/heads/main", true),
                Access::ReadOnly,
            ),
            (
                gitlab("push", "main", "refs/heads/main", true),
                Access::Trusted,
            ),
            (
                gitlab(
                    "merge_request_event",
                    "topic",
                    "refs/merge-requests/3/head",
                    false,
                ),
                own("mr/3"),
            ),
            (
                gitlab("push", "topic", "refs/heads/topic", false),
                own("ref/topic"),
            ),
            (Claims::default(), Access::ReadOnly),
        ];
        for (claims, expected) in cases {
            assert_eq!(access_of(&claims), expected, "{claims:?}");
        }
    }

    #[test]
    fn only_https_or_loopback_http_issuers() {
        for (url, ok) in [
            ("https://token.actions.githubusercontent.com", true),
            ("http://127.0.0.1:8080", true),
            ("http://localhost:1", true),
            ("http://[::1]:1/x", true),
            ("http://gitlab.example.org", false),
            ("http://127.0.0.1.evil.org", false),
            ("ftp://127.0.0.1", false),
        ] {
            assert_eq!(acceptable_issuer(url), ok, "{url}");
        }
    }

    #[test]
    fn ids_come_as_strings_or_numbers_and_need_their_owner() {
        let claims: Claims = serde_json::from_str(
            r#"{"iss":"i","exp":1,"repository_id":"10","repository_owner_id":20}"#,
        )
        .expect("claims");
        assert_eq!(claims.identity(), Ok(("10".into(), "20".into())));
        let claims: Claims =
            serde_json::from_str(r#"{"iss":"i","exp":1,"repository_id":"10"}"#).expect("claims");
        assert!(claims.identity().is_err());
    }
}
