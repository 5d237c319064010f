//! The orchestrator's HTTP protocol, shared by the server and its client. It has the shape of
//! bazel-remote's HTTP cache, scoped per repository:
//!
//! ```text
//! HEAD|GET|PUT /<repository>/results/<key>     a result record (JSON), write-once
//! HEAD|GET|PUT /<repository>/cas/<sha256>      a blob (stdout, stderr, an artifact)
//! GET          /<repository>/keys              the executor keys the repository trusts
//! GET          /status                         liveness, no authentication
//! ```
//!
//! `<repository>` is a name such as `github.com/owner/name` (its own slashes included); keys
//! and digests are 64 lowercase hex digits. Requests carry `Authorization: Bearer <token>`
//! unless a client certificate identifies them.

use ci_exec_job::source::valid_repository_name;
use serde::{Deserialize, Serialize};

/// The largest result record accepted: records name blobs, they do not hold output.
pub const MAX_RECORD_BYTES: usize = 1 << 20;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    Result { repository: String, key: String },
    Blob { repository: String, sha256: String },
    Keys { repository: String },
    Status,
}

impl Route {
    pub fn repository(&self) -> Option<&str> {
        match self {
            Route::Result { repository, .. }
            | Route::Blob { repository, .. }
            | Route::Keys { repository } => Some(repository),
            Route::Status => None,
        }
    }

    /// Reads a request path; the error says what is wrong with it.
    pub fn parse(path: &str) -> Result<Route, String> {
        let path = path
            .strip_prefix('/')
            .ok_or_else(|| format!("path `{path}` is not absolute"))?;
        if path == "status" {
            return Ok(Route::Status);
        }
        let repository_of = |name: &str| {
            if valid_repository_name(name) {
                Ok(name.to_owned())
            } else {
                Err(format!(
                    "`{name}` is not a repository name (segments of letters, digits, `.`, `_`, `-`)"
                ))
            }
        };
        if let Some(repository) = path.strip_suffix("/keys") {
            return Ok(Route::Keys {
                repository: repository_of(repository)?,
            });
        }
        let mut parts = path.rsplitn(3, '/');
        let (Some(last), Some(kind), Some(repository)) = (parts.next(), parts.next(), parts.next())
        else {
            return Err(format!(
                "path `/{path}` names nothing: expected `/<repository>/results/<key>`, `/<repository>/cas/<sha256>` or `/<repository>/keys`"
            ));
        };
        let repository = repository_of(repository)?;
        if !is_digest(last) {
            return Err(format!("`{last}` is not 64 lowercase hex digits"));
        }
        match kind {
            "results" => Ok(Route::Result {
                repository,
                key: last.to_owned(),
            }),
            "cas" => Ok(Route::Blob {
                repository,
                sha256: last.to_owned(),
            }),
            other => Err(format!(
                "`{other}` is not `results` or `cas` in path `/{path}`"
            )),
        }
    }

    pub fn path(&self) -> String {
        match self {
            Route::Result { repository, key } => format!("/{repository}/results/{key}"),
            Route::Blob { repository, sha256 } => format!("/{repository}/cas/{sha256}"),
            Route::Keys { repository } => format!("/{repository}/keys"),
            Route::Status => "/status".into(),
        }
    }
}

pub fn is_digest(text: &str) -> bool {
    text.len() == 64 && text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// `GET /<repository>/keys`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrustedKeys {
    /// `name:base64` public keys of the executors whose publish tokens published results.
    pub keys: Vec<String>,
}

/// Every error body: one line saying what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_parse_and_print_back() {
        let key = "0123456789abcdef".repeat(4);
        let cases = [
            Route::Result {
                repository: "github.com/o/r".into(),
                key: key.clone(),
            },
            Route::Blob {
                repository: "gitlab.example.org/g/sub/p".into(),
                sha256: key.clone(),
            },
            Route::Keys {
                repository: "local/abc".into(),
            },
            Route::Status,
        ];
        for route in cases {
            assert_eq!(Route::parse(&route.path()), Ok(route.clone()));
        }
    }

    #[test]
    fn path_tricks_are_refused() {
        let key = "ab".repeat(32);
        for bad in [
            format!("/../../etc/results/{key}"),
            format!("/github.com/o/../r/results/{key}"),
            format!("/github.com/o/r/results/{}", "AB".repeat(32)),
            format!("/github.com/o/r/results/{key}/x"),
            format!("/github.com/o%2fr/results/{key}"),
            format!("/github.com//r/cas/{key}"),
            format!("/results/{key}"),
            format!("/github.com/o/r/other/{key}"),
            "/keys".into(),
            "relative".into(),
            "/".into(),
        ] {
            assert!(Route::parse(&bad).is_err(), "{bad}");
        }
    }
}
