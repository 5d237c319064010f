//! The orchestrator's HTTP protocol, shared by the server and its client. It has the shape of
//! bazel-remote's HTTP cache, scoped per repository:
//!
//! ```text
//! HEAD|GET|PUT /<repository>/results/<key>     a result record (JSON), write-once
//! HEAD|GET|PUT /<repository>/cas/<sha256>      a blob (stdout, stderr, an artifact)
//! GET          /<repository>/keys              the executor keys the repository trusts
//! POST         /<repository>/login             a CI job's OIDC ID token → a session token
//! GET          /status                         liveness, no authentication
//!
//! connected executors (`ci-exec test --serve-results`, `ci-exec daemon`):
//! PUT|DELETE   /<repository>/executors/<session>              announce what it holds; leave
//! GET          /<repository>/executors/<session>/next         long-poll: the next request
//! PUT          /<repository>/executors/<session>/reply/<id>   the answer, streamed
//! ```
//!
//! A lookup of a result or blob the orchestrator does not store, but a connected executor
//! announced, is relayed: the orchestrator queues the request for that executor and streams
//! its reply through, holding nothing.
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
    Result {
        repository: String,
        key: String,
    },
    Blob {
        repository: String,
        sha256: String,
    },
    Keys {
        repository: String,
    },
    /// Trade an ID token (good for one use) for a session token ([`Login`]).
    Login {
        repository: String,
    },
    /// A connected executor's session: announce (`PUT`) or leave (`DELETE`).
    Session {
        repository: String,
        session: String,
    },
    /// A connected executor waiting for the next request to relay.
    Next {
        repository: String,
        session: String,
    },
    /// A connected executor's answer to relayed request `id`.
    Reply {
        repository: String,
        session: String,
        id: u64,
    },
    Status,
}

impl Route {
    pub fn repository(&self) -> Option<&str> {
        match self {
            Route::Result { repository, .. }
            | Route::Blob { repository, .. }
            | Route::Keys { repository }
            | Route::Login { repository }
            | Route::Session { repository, .. }
            | Route::Next { repository, .. }
            | Route::Reply { repository, .. } => Some(repository),
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
        if let Some(repository) = path.strip_suffix("/login") {
            return Ok(Route::Login {
                repository: repository_of(repository)?,
            });
        }
        if let Some(route) = session_route(path) {
            let (repository, session, tail) = route;
            let repository = repository_of(repository)?;
            let session = session.to_owned();
            return match tail {
                None => Ok(Route::Session {
                    repository,
                    session,
                }),
                Some("next") => Ok(Route::Next {
                    repository,
                    session,
                }),
                Some(tail) => match tail.strip_prefix("reply/").map(str::parse::<u64>) {
                    Some(Ok(id)) => Ok(Route::Reply {
                        repository,
                        session,
                        id,
                    }),
                    _ => Err(format!("`{tail}` is not `next` or `reply/<id>`")),
                },
            };
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
            Route::Login { repository } => format!("/{repository}/login"),
            Route::Session {
                repository,
                session,
            } => format!("/{repository}/executors/{session}"),
            Route::Next {
                repository,
                session,
            } => format!("/{repository}/executors/{session}/next"),
            Route::Reply {
                repository,
                session,
                id,
            } => format!("/{repository}/executors/{session}/reply/{id}"),
            Route::Status => "/status".into(),
        }
    }
}

/// Splits `<repository>/executors/<session>[/<tail>]`, taking the last `executors` segment
/// followed by a session id (a repository may itself have a segment named `executors`).
fn session_route(path: &str) -> Option<(&str, &str, Option<&str>)> {
    let mut search = path;
    while let Some(at) = search.rfind("/executors/") {
        let (repository, rest) = (&path[..at], &path[at + "/executors/".len()..]);
        let (session, tail) = match rest.split_once('/') {
            Some((session, tail)) => (session, Some(tail)),
            None => (rest, None),
        };
        if is_session(session) {
            return Some((repository, session, tail));
        }
        search = &path[..at];
    }
    None
}

/// A session id: 32 lowercase hex digits, chosen by the executor.
pub fn is_session(text: &str) -> bool {
    text.len() == 32 && text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
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

/// `POST /<repository>/login`: what an ID token was traded for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Login {
    /// The bearer token for the rest of the job (`cis_…`).
    pub token: String,
    pub expires_unix: u64,
    /// Whether it may publish.
    pub publish: bool,
    /// `None`: the repository's trusted scope; else the scope it writes (`pr/12`).
    pub scope: Option<String>,
}

/// `PUT /<repository>/executors/<session>`: what a connected executor holds, signed by its
/// key over [`announcement_bytes`] so the orchestrator can trust the key for the repository.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Announcement {
    /// `name:base64`.
    pub signer: String,
    /// Base64 Ed25519 signature.
    pub signature: String,
    /// Result keys it can serve.
    pub keys: Vec<String>,
    /// Blob digests of those results.
    pub blobs: Vec<String>,
}

/// What an announcement's signature covers: the repository and session it is for.
pub fn announcement_bytes(repository: &str, session: &str) -> Vec<u8> {
    format!("ci-exec announcement v1\0{repository}\0{session}").into_bytes()
}

/// `GET …/next`: a request for the connected executor to answer at `…/reply/<id>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Relayed {
    pub id: u64,
    /// `result` or `blob`.
    pub kind: String,
    /// The result key or blob digest.
    pub digest: String,
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
            Route::Login {
                repository: "gitlab.com/g/p".into(),
            },
            Route::Session {
                repository: "github.com/o/executors".into(),
                session: "ab".repeat(16),
            },
            Route::Next {
                repository: "github.com/executors/r".into(),
                session: "cd".repeat(16),
            },
            Route::Reply {
                repository: "github.com/o/r".into(),
                session: "ef".repeat(16),
                id: 42,
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
            format!("/github.com/o/r/executors/{}/reply/x", "ab".repeat(16)),
            format!("/github.com/o/r/executors/{}/other", "ab".repeat(16)),
            "/github.com/o/r/executors/short".into(),
            "relative".into(),
            "/".into(),
        ] {
            assert!(Route::parse(&bad).is_err(), "{bad}");
        }
    }
}
