//! Who a request is. Each kind of credential is an [`Authenticator`]; the server asks each in
//! turn. Two kinds exist: bearer tokens and client certificates, both as grants in storage.
//! A CI platform's OIDC identity token is the third kind to come: one more implementor.

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

pub trait Authenticator: Send + Sync + std::fmt::Debug {
    /// The grant `presented` proves, or `None` when this authenticator does not know it.
    fn authenticate(&self, presented: &Presented<'_>) -> Result<Option<Grant>, StorageError>;
}

/// Tokens from `ci-exec token create` and certificates registered with `--cert`.
#[derive(Debug)]
pub struct Grants(pub Arc<Storage>);

impl Authenticator for Grants {
    fn authenticate(&self, presented: &Presented<'_>) -> Result<Option<Grant>, StorageError> {
        if let Some(certificate) = presented.certificate
            && let Some(grant) = self.0.grant(Credential::Certificate(certificate))?
        {
            return Ok(Some(grant));
        }
        match presented.bearer {
            Some(token) => self.0.grant(Credential::Token(token)),
            None => Ok(None),
        }
    }
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
