//! The identity a CI platform gives the job it runs, without a stored secret: an OIDC ID
//! token whose audience is the orchestrator's URL (research §1.2).
//!
//! - GitHub Actions, with `permissions: id-token: write`, exports
//!   `ACTIONS_ID_TOKEN_REQUEST_URL` and `ACTIONS_ID_TOKEN_REQUEST_TOKEN`; a `GET` of the URL
//!   with `&audience=<aud>` and the request token as bearer answers `{"value": "<JWT>"}`.
//! - GitLab CI puts the token the job's `id_tokens:` declares into a variable:
//!   `CI_EXEC_ID_TOKEN` in the stub `ci-exec init gitlab` writes (any platform may set it).

use std::time::Duration;

/// The variable an ID token is read from.
pub const ID_TOKEN_VARIABLE: &str = "CI_EXEC_ID_TOKEN";

#[derive(Debug, thiserror::Error)]
pub enum PlatformError {
    #[error("cannot get an ID token from GitHub Actions (`ACTIONS_ID_TOKEN_REQUEST_URL`)")]
    Request(#[source] ureq::Error),
    #[error("GitHub Actions refused the ID token request ({status}): {message}")]
    Refused { status: u16, message: String },
    #[error("GitHub Actions answered the ID token request without a token")]
    NoValue,
}

impl PlatformError {
    pub fn hint(&self) -> &'static str {
        "the workflow needs `permissions: id-token: write` (`ci-exec init github` writes it)"
    }
}

/// Where this job's ID token comes from, for messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    GitHubActions,
    Variable,
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::GitHubActions => f.write_str("GitHub Actions"),
            Source::Variable => write!(f, "`{ID_TOKEN_VARIABLE}`"),
        }
    }
}

/// This job's ID token for `audience`, when the platform offers one; `lookup` reads the
/// environment (a parameter, so tests need not change the process's).
pub fn id_token(
    audience: &str,
    lookup: &dyn Fn(&str) -> Option<String>,
) -> Result<Option<(String, Source)>, PlatformError> {
    let variable = |name: &str| lookup(name).filter(|value| !value.is_empty());
    if let Some(token) = variable(ID_TOKEN_VARIABLE) {
        return Ok(Some((token.trim().to_owned(), Source::Variable)));
    }
    let (Some(url), Some(bearer)) = (
        variable("ACTIONS_ID_TOKEN_REQUEST_URL"),
        variable("ACTIONS_ID_TOKEN_REQUEST_TOKEN"),
    ) else {
        return Ok(None);
    };
    let separator = if url.contains('?') { '&' } else { '?' };
    let url = format!("{url}{separator}audience={}", url_encode(audience));
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(10)))
        .http_status_as_error(false)
        .build()
        .into();
    let mut response = agent
        .get(&url)
        .header("Authorization", format!("bearer {bearer}"))
        .header("Accept", "application/json")
        .call()
        .map_err(PlatformError::Request)?;
    let status = response.status().as_u16();
    let body = response
        .body_mut()
        .with_config()
        .limit(64 * 1024)
        .read_to_string()
        .map_err(PlatformError::Request)?;
    if status != 200 {
        return Err(PlatformError::Refused {
            status,
            message: body.chars().take(200).collect(),
        });
    }
    #[derive(serde::Deserialize)]
    struct Answer {
        value: Option<String>,
    }
    let answer: Answer = serde_json::from_str(&body).map_err(|_| PlatformError::NoValue)?;
    answer
        .value
        .filter(|value| !value.is_empty())
        .map(|value| Some((value, Source::GitHubActions)))
        .ok_or(PlatformError::NoValue)
}

/// Percent-encodes everything but RFC 3986's unreserved characters.
fn url_encode(text: &str) -> String {
    let mut encoded = String::with_capacity(text.len() * 3);
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            encoded.push(byte as char);
        } else {
            encoded.push_str(&format!("%{byte:02X}"));
        }
    }
    encoded
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn audiences_are_percent_encoded() {
        assert_eq!(
            url_encode("https://ci.example.org:8555"),
            "https%3A%2F%2Fci.example.org%3A8555"
        );
    }

    #[test]
    fn the_variable_wins_and_nothing_is_no_token() {
        let none = |_: &str| None;
        assert!(matches!(id_token("https://x", &none), Ok(None)));
        let variable = |name: &str| (name == ID_TOKEN_VARIABLE).then(|| "eyJ.a.b\n".to_owned());
        assert_eq!(
            id_token("https://x", &variable).ok().flatten(),
            Some(("eyJ.a.b".to_owned(), Source::Variable))
        );
    }
}
