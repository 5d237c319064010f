//! Who a request is. Each kind of credential is an [`Authenticator`]; the server asks each in
//! turn: bearer tokens, session tokens and client certificates as grants in storage
//! ([`Grants`]), and a CI platform's OIDC identity token ([`super::oidc::Oidc`]).

use std::sync::Arc;

use super::storage::{Credential, Grant, Storage, StorageError};

/// The credentials a request carries.
#[derive(Debug, Clone, Copy, Default)]
pub struct Presented<'a> {
    /// The token of `Authorization: Bearer <token>`.
    pub bearer: Option<&'a str>,
    /// The DER of the client certificate the TLS handshake verified.
    pub certificate: Option<&'a [u8]>,
}

impl Presented<'_> {
    pub fn is_empty(&self) -> bool {
        self.bearer.is_none() && self.certificate.is_none()
    }
}

/// Why a credential that an authenticator recognised is not accepted.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// The credential is refused: a 401 with this one line (expired, wrong audience, …).
    #[error("{0}")]
    Refused(String),
    /// The orchestrator itself failed (a 500).
    #[error(transparent)]
    Storage(#[from] StorageError),
}

pub trait Authenticator: Send + Sync + std::fmt::Debug {
    /// The grant `presented` proves, or `None` when this authenticator does not know it.
    /// It may block (storage, or fetching an issuer's keys): the server calls it off its async
    /// threads.
    fn authenticate(&self, presented: &Presented<'_>) -> Result<Option<Grant>, AuthError>;
}

/// Tokens from `ci-exec token create`, certificates registered with `--cert`, and the
/// session tokens `POST …/login` hands out.
#[derive(Debug)]
pub struct Grants(pub Arc<Storage>);

impl Authenticator for Grants {
    fn authenticate(&self, presented: &Presented<'_>) -> Result<Option<Grant>, AuthError> {
        if let Some(certificate) = presented.certificate
            && let Some(grant) = self.0.grant(Credential::Certificate(certificate))?
        {
            return Ok(Some(grant));
        }
        match presented.bearer {
            Some(token) if token.starts_with(SESSION_PREFIX) => Ok(self.0.session(token)?),
            Some(token) => Ok(self.0.grant(Credential::Token(token))?),
            None => Ok(None),
        }
    }
}

/// How a session token starts (a bearer token from `ci-exec token create` starts `cie_`).
pub const SESSION_PREFIX: &str = "cis_";

/// A new session token: `cis_` and 32 random bytes, URL-safe base64.
pub fn new_session_token() -> Result<String, getrandom::Error> {
    new_token().map(|token| token.replacen("cie_", SESSION_PREFIX, 1))
}

/// A new bearer token: `cie_` and 32 random bytes, URL-safe base64.
pub fn new_token() -> Result<String, getrandom::Error> {
    use base64::Engine as _;
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes)?;
    Ok(format!(
        "cie_{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    ))
}
