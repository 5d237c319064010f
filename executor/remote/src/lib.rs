//! Remote replay for ci-exec: a result recorded on one executor replayed on another.
//!
//! - [`server`]: the orchestrator, `ci-exec serve` — signed result records and
//!   content-addressed blobs per repository over HTTP(S), bearer tokens or client
//!   certificates, write-once publishing.
//! - [`client`]: what `ci-exec test` uses to fetch (and check) a result before running, and to
//!   publish one after a successful run.
//! - [`identity`]: executor keys (Ed25519) and record signatures.
//! - [`platform`]: the OIDC ID token a CI platform gives its job, which the orchestrator
//!   checks in [`server::oidc`].
//! - [`wire`]: the paths and bodies both sides speak.
//!
//! It does not run jobs or choose what to replay: the job flow (`ci-exec-job`) owns the local
//! store and replays what this crate has fetched into it.

pub mod client;
pub mod identity;
pub mod platform;
pub mod server;
pub mod wire;
