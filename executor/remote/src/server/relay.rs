//! Connected executors: results that stay on the executor that produced them, relayed by the
//! orchestrator to another executor that asks for them (the seed's "connected" state).
//!
//! A connected executor announces the keys and blobs it holds, then long-polls for requests.
//! A lookup the orchestrator cannot answer from storage is queued for an executor that
//! announced it; that executor `PUT`s the answer, and the orchestrator streams that upload
//! straight into the waiting response. Nothing relayed is stored or buffered whole, and the
//! asking executor checks signature and digests as for any fetched result.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::body::Body;
use tokio::sync::{Mutex as AsyncMutex, mpsc, oneshot};

use crate::wire::Relayed;

/// A session that has not polled for this long has gone away.
const SESSION_TTL: Duration = Duration::from_secs(60);
/// How long a poll waits for a request before answering "nothing yet".
pub const POLL_WAIT: Duration = Duration::from_secs(20);
/// How long an asking executor waits for the connected one to start answering.
const ANSWER_WAIT: Duration = Duration::from_secs(15);

/// A connected executor's answer: its status and its streamed body. Dropping it (once the
/// asking side has finished or given up) lets the answering upload complete.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub length: Option<u64>,
    pub body: Body,
    pub done: oneshot::Sender<()>,
}

#[derive(Debug)]
struct Session {
    repository: String,
    grant: String,
    keys: HashSet<String>,
    blobs: HashSet<String>,
    requests: mpsc::UnboundedSender<Relayed>,
    inbox: Arc<AsyncMutex<mpsc::UnboundedReceiver<Relayed>>>,
    last_seen: Instant,
}

#[derive(Debug, Default)]
pub struct Relay {
    sessions: std::sync::Mutex<HashMap<String, Session>>,
    waiting: std::sync::Mutex<HashMap<u64, (String, oneshot::Sender<Answer>)>>,
    next_id: AtomicU64,
}

/// Why a session call is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionProblem {
    /// Unknown or expired: announce again.
    Unknown,
    /// Announced by another credential.
    NotYours,
}

impl Relay {
    fn sessions(&self) -> std::sync::MutexGuard<'_, HashMap<String, Session>> {
        self.sessions
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Starts or refreshes `session` with what it holds.
    pub fn announce(
        &self,
        repository: &str,
        session: &str,
        grant: &str,
        keys: Vec<String>,
        blobs: Vec<String>,
    ) -> Result<(), SessionProblem> {
        let mut sessions = self.sessions();
        if let Some(existing) = sessions.get_mut(session) {
            if existing.grant != grant || existing.repository != repository {
                return Err(SessionProblem::NotYours);
            }
            existing.keys = keys.into_iter().collect();
            existing.blobs = blobs.into_iter().collect();
            existing.last_seen = Instant::now();
            return Ok(());
        }
        let (requests, inbox) = mpsc::unbounded_channel();
        sessions.insert(
            session.to_owned(),
            Session {
                repository: repository.to_owned(),
                grant: grant.to_owned(),
                keys: keys.into_iter().collect(),
                blobs: blobs.into_iter().collect(),
                requests,
                inbox: Arc::new(AsyncMutex::new(inbox)),
                last_seen: Instant::now(),
            },
        );
        Ok(())
    }

    pub fn leave(
        &self,
        repository: &str,
        session: &str,
        grant: &str,
    ) -> Result<(), SessionProblem> {
        let mut sessions = self.sessions();
        match sessions.get(session) {
            None => Err(SessionProblem::Unknown),
            Some(found) if found.grant != grant || found.repository != repository => {
                Err(SessionProblem::NotYours)
            }
            Some(_) => {
                sessions.remove(session);
                Ok(())
            }
        }
    }

    /// The next request for `session`, waiting up to [`POLL_WAIT`]; `Ok(None)` when none came.
    pub async fn next(
        &self,
        repository: &str,
        session: &str,
        grant: &str,
    ) -> Result<Option<Relayed>, SessionProblem> {
        let inbox = {
            let mut sessions = self.sessions();
            let found = sessions.get_mut(session).ok_or(SessionProblem::Unknown)?;
            if found.grant != grant || found.repository != repository {
                return Err(SessionProblem::NotYours);
            }
            found.last_seen = Instant::now();
            found.inbox.clone()
        };
        let mut inbox = inbox.lock().await;
        let request = tokio::time::timeout(POLL_WAIT, inbox.recv()).await;
        if let Some(found) = self.sessions().get_mut(session) {
            found.last_seen = Instant::now();
        }
        Ok(request.ok().flatten())
    }

    /// A live session of `repository` that announced `digest` (a result key when `result`,
    /// else a blob digest).
    pub fn holder(&self, repository: &str, result: bool, digest: &str) -> Option<String> {
        let mut sessions = self.sessions();
        sessions.retain(|_, session| session.last_seen.elapsed() < SESSION_TTL);
        sessions
            .iter()
            .find(|(_, session)| {
                session.repository == repository
                    && if result {
                        session.keys.contains(digest)
                    } else {
                        session.blobs.contains(digest)
                    }
            })
            .map(|(id, _)| id.clone())
    }

    /// Asks `session` for a result or blob and waits for the start of its answer.
    pub async fn ask(&self, session: &str, result: bool, digest: &str) -> Option<Answer> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (answer, answered) = oneshot::channel();
        self.waiting
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(id, (session.to_owned(), answer));
        let sent = self.sessions().get(session).is_some_and(|found| {
            found
                .requests
                .send(Relayed {
                    id,
                    kind: if result { "result" } else { "blob" }.into(),
                    digest: digest.to_owned(),
                })
                .is_ok()
        });
        let outcome = if sent {
            tokio::time::timeout(ANSWER_WAIT, answered)
                .await
                .ok()
                .and_then(Result::ok)
        } else {
            None
        };
        self.waiting
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&id);
        outcome
    }

    /// Hands `answer` to the request `id` of `session`; gives it back when nobody waits.
    pub fn reply(&self, session: &str, id: u64, answer: Answer) -> Result<(), Answer> {
        let waiting = self
            .waiting
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&id);
        match waiting {
            Some((owner, sender)) if owner == session => sender.send(answer),
            Some((owner, sender)) => {
                // Not this session's request: put it back untouched.
                self.waiting
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .insert(id, (owner, sender));
                Err(answer)
            }
            None => Err(answer),
        }
    }
}
