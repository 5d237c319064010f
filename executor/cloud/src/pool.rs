//! Worker pools: at most `max_workers` servers per pool, parked servers claimed by later runs,
//! and the sweep that deletes what killed runs and forgotten pools leave.
//!
//! A pool is keyed on (provider, repository, size), never on the per-run namespace: pocketci's
//! pool was keyed on the namespace, unique per run, so no two runs ever shared it.
//!
//! Neither provider has a conditional update, so a claim is a compare-and-set built from
//! ordered reads and writes. A claimer reads the server idle, writes its own claim token
//! (`ci-claim`) within `settle / 2` of that read, waits `settle`, and reads again: it holds the
//! server only if its token is still there. Two claimers that both read it idle wrote within
//! `settle / 2` of each other's read, so both writes land before either re-read, and both
//! re-reads see the same last token: exactly one wins. A claimer that took longer than
//! `settle / 2` between its read and its write gives up before writing.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use sha2::{Digest as _, Sha256};

use crate::config::PoolConfig;
use crate::provider::{Provider, Server, label};
use crate::{CloudError, ProviderKind};

/// A busy server whose heartbeat is older than this many heartbeats was left by a killed run.
const LEASE_HEARTBEATS: u32 = 5;

pub(crate) fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

/// The pool of (provider, repository, size), as a label value (12 hex digits).
pub(crate) fn pool_key(provider: ProviderKind, repository: &str, size: &str) -> String {
    let mut hasher = Sha256::new();
    for part in [provider.driver_name(), repository, size] {
        hasher.update(part.as_bytes());
        hasher.update([0]);
    }
    hex::encode(hasher.finalize())[..12].to_owned()
}

/// Random hex digits, for claim tokens and server names.
pub(crate) fn random_hex(bytes: usize) -> String {
    let mut buffer = vec![0u8; bytes];
    // A failing system RNG leaves zeros: names still work, claims then tie-break by write order.
    let _ = getrandom::fill(&mut buffer);
    hex::encode(buffer)
}

pub(crate) fn lease(pool: &PoolConfig) -> Duration {
    pool.heartbeat * LEASE_HEARTBEATS
}

/// Whether a busy server's holder stopped beating: killed, or its machine gone.
pub(crate) fn is_abandoned(server: &Server, pool: &PoolConfig, now: u64) -> bool {
    server.label(label::STATUS) != Some(label::IDLE)
        && server
            .time_label(label::HEARTBEAT)
            .is_some_and(|beat| now.saturating_sub(beat) > lease(pool).as_secs())
}

/// Whether a parked server has been idle longer than `max_idle`.
pub(crate) fn is_expired(server: &Server, pool: &PoolConfig, now: u64) -> bool {
    server.label(label::STATUS) == Some(label::IDLE)
        && pool.max_idle.is_some_and(|max_idle| {
            server
                .time_label(label::IDLE_SINCE)
                .is_some_and(|since| now.saturating_sub(since) > max_idle.as_secs())
        })
}

/// Deletes, across every pool of the provider: busy servers whose holder stopped beating, and
/// parked servers idle longer than `max_idle`. Returns the names of those deleted. Only the
/// listing fails it (the API refuses the token, or is down); a deletion that fails is logged.
pub(crate) async fn sweep(
    provider: &dyn Provider,
    pool: &PoolConfig,
) -> Result<Vec<String>, CloudError> {
    let servers = provider.servers(&[(label::CI, "true")]).await?;
    let now = now_unix();
    let mut deleted = Vec::new();
    for server in servers {
        let abandoned = is_abandoned(&server, pool, now);
        if !abandoned && !is_expired(&server, pool, now) {
            continue;
        }
        match provider.delete_server(&server.id).await {
            Ok(()) => {
                tracing::info!(
                    driver = provider.driver(),
                    server = %server.name,
                    reason = if abandoned { "left by a killed run" } else { "idle past max_idle" },
                    "deleted a server"
                );
                deleted.push(server.name);
            }
            Err(error) => tracing::warn!(%error, server = %server.name, "cannot delete"),
        }
    }
    Ok(deleted)
}

/// How a wait for a slot ends.
#[derive(Debug)]
pub(crate) enum Slot {
    /// A parked server now ours (its labels already say so).
    Claimed(Server),
    /// Room for one more server: create it.
    Free,
}

/// What a run needs to look for its slot.
#[derive(Debug)]
pub(crate) struct Seeker<'a> {
    pub(crate) provider: &'a dyn Provider,
    pub(crate) pool: &'a PoolConfig,
    pub(crate) pool_key: &'a str,
    /// The `ci-key` value of the key this run holds (parked servers of other keys are not
    /// claimable: the run could not log in).
    pub(crate) key_id: &'a str,
    pub(crate) claim_token: &'a str,
    /// The labels a claimed server gets besides the pool's (`namespace`).
    pub(crate) namespace: &'a str,
}

impl Seeker<'_> {
    /// Waits until a parked server is claimed (when `reuse_worker`) or the pool has room, up to
    /// `wait_timeout`.
    pub(crate) async fn wait_for_slot(&self) -> Result<Slot, CloudError> {
        let started = Instant::now();
        loop {
            let mut workers = self
                .provider
                .servers(&[(label::WORKER, self.pool_key)])
                .await?;
            // A slot held by a killed run, or by a server parked past `max_idle`, is free.
            let now = now_unix();
            let mut live = Vec::with_capacity(workers.len());
            for server in workers.drain(..) {
                if is_abandoned(&server, self.pool, now) || is_expired(&server, self.pool, now) {
                    tracing::info!(server = %server.name, "deleting a stale worker of the pool");
                    self.provider.delete_server(&server.id).await?;
                } else {
                    live.push(server);
                }
            }
            let workers = live;
            if self.pool.reuse_worker {
                for server in workers.iter().filter(|server| self.claimable(server)) {
                    if let Some(claimed) = self.claim(server).await? {
                        return Ok(Slot::Claimed(claimed));
                    }
                }
            }
            let count = workers.len();
            if (count as u64) < self.pool.max_workers {
                return Ok(Slot::Free);
            }
            // A full pool whose parked servers this run cannot use (it does not reuse, or
            // holds another key) would wait for `max_idle`: the longest-parked one gives way.
            let unusable = workers
                .iter()
                .filter(|server| {
                    server.label(label::STATUS) == Some(label::IDLE)
                        && !(self.pool.reuse_worker && self.claimable(server))
                })
                .min_by_key(|server| server.time_label(label::IDLE_SINCE).unwrap_or(0));
            if let Some(parked) = unusable {
                tracing::info!(server = %parked.name, "deleting a parked server this run cannot use");
                self.provider.delete_server(&parked.id).await?;
                return Ok(Slot::Free);
            }
            if let Some(timeout) = self.pool.wait_timeout
                && started.elapsed() >= timeout
            {
                return Err(CloudError::NoFreeWorker {
                    provider: self.provider.driver(),
                    pool: self.pool_key.to_owned(),
                    after: timeout,
                    workers: count,
                    max_workers: self.pool.max_workers,
                });
            }
            tracing::info!(
                driver = self.provider.driver(),
                pool = self.pool_key,
                workers = count,
                "every worker slot is taken: waiting"
            );
            tokio::time::sleep(self.pool.poll_interval).await;
        }
    }

    fn claimable(&self, server: &Server) -> bool {
        server.label(label::STATUS) == Some(label::IDLE)
            && server.label(label::KEY) == Some(self.key_id)
    }

    /// The compare-and-set of the module comment. `Some` when this run won the server.
    async fn claim(&self, listed: &Server) -> Result<Option<Server>, CloudError> {
        let read_at = Instant::now();
        let Some(fresh) = self.provider.server(&listed.id).await? else {
            return Ok(None);
        };
        if !self.claimable(&fresh) {
            return Ok(None);
        }
        if read_at.elapsed() > self.pool.settle / 2 {
            tracing::debug!(server = %fresh.name, "claim read too slow: not writing");
            return Ok(None);
        }
        let mut labels = fresh.labels.clone();
        labels.insert(label::STATUS.into(), label::BUSY.into());
        labels.insert(label::CLAIM.into(), self.claim_token.into());
        labels.insert(label::HEARTBEAT.into(), now_unix().to_string());
        labels.insert(label::NAMESPACE.into(), self.namespace.into());
        labels.remove(label::IDLE_SINCE);
        self.provider.set_labels(&fresh, &labels).await?;
        tokio::time::sleep(self.pool.settle).await;
        let Some(confirmed) = self.provider.server(&listed.id).await? else {
            return Ok(None);
        };
        if confirmed.label(label::CLAIM) == Some(self.claim_token)
            && confirmed.label(label::STATUS) == Some(label::BUSY)
        {
            tracing::info!(server = %confirmed.name, "claimed a parked server");
            Ok(Some(confirmed))
        } else {
            tracing::debug!(server = %confirmed.name, "another run claimed the server first");
            Ok(None)
        }
    }

    /// After creating `ours`: when racing runs made the pool overshoot `max_workers`, the
    /// newest servers (highest ids) give way. `true` when `ours` must be deleted.
    pub(crate) async fn overshot(&self, ours: &Server) -> Result<bool, CloudError> {
        let mut workers = self
            .provider
            .servers(&[(label::WORKER, self.pool_key)])
            .await?;
        workers.sort_by_key(|server| (server.id.len(), server.id.clone()));
        let position = workers.iter().position(|server| server.id == ours.id);
        Ok(position.is_some_and(|position| position as u64 >= self.pool.max_workers))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provider::Labels;

    fn pool() -> PoolConfig {
        PoolConfig {
            max_workers: 1,
            reuse_worker: true,
            poll_interval: Duration::from_secs(1),
            wait_timeout: None,
            max_idle: Some(Duration::from_secs(600)),
            heartbeat: Duration::from_secs(60),
            settle: Duration::from_secs(1),
        }
    }

    fn server(labels: &[(&str, &str)]) -> Server {
        Server {
            id: "1".into(),
            name: "s".into(),
            running: true,
            address: None,
            labels: labels
                .iter()
                .map(|(key, value)| ((*key).to_owned(), (*value).to_owned()))
                .collect::<Labels>(),
        }
    }

    #[test]
    fn pool_keys_depend_on_provider_repository_and_size_only() {
        let key = pool_key(ProviderKind::Hetzner, "repo", "cx23");
        assert_eq!(key.len(), 12);
        assert_eq!(key, pool_key(ProviderKind::Hetzner, "repo", "cx23"));
        assert_ne!(key, pool_key(ProviderKind::Hetzner, "repo", "cx33"));
        assert_ne!(key, pool_key(ProviderKind::Hetzner, "other", "cx23"));
        assert_ne!(key, pool_key(ProviderKind::DigitalOcean, "repo", "cx23"));
    }

    #[test]
    fn stale_heartbeats_and_long_idles_are_swept_and_nothing_else() {
        let pool = pool();
        let now = 10_000;
        let busy = |beat: u64| {
            server(&[
                ("ci-worker-status", "busy"),
                ("ci-heartbeat", &beat.to_string()),
            ])
        };
        assert!(is_abandoned(&busy(now - 301), &pool, now));
        assert!(!is_abandoned(&busy(now - 299), &pool, now));
        let idle = |since: u64| {
            server(&[
                ("ci-worker-status", "idle"),
                ("ci-idle-since", &since.to_string()),
            ])
        };
        assert!(
            !is_abandoned(&idle(0), &pool, now),
            "parked is not abandoned"
        );
        assert!(is_expired(&idle(now - 601), &pool, now));
        assert!(!is_expired(&idle(now - 599), &pool, now));
        assert!(!is_expired(
            &idle(0),
            &PoolConfig {
                max_idle: None,
                ..pool.clone()
            },
            now
        ));
        assert!(!is_expired(&busy(0), &pool, now));
        assert!(!is_abandoned(
            &server(&[("ci-worker-status", "busy")]),
            &pool,
            now
        ));
    }
}
