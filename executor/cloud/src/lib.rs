//! The cloud drivers of ci-exec: `hetzner` and `digitalocean` (a VM running Docker per run,
//! reached over SSH, with worker pools) and `fly` (one Fly Machine per task, driven through
//! the Machines API's `exec` and our static agent; see `fly.rs`).
//!
//! A VM driver provisions its server on the first task: an ephemeral ed25519 key pair (or the
//! pool's, when servers are reused), the server through the provider's REST API, labelled
//! `ci=true`, `namespace=<ns>` and the pool's labels, then waits for its sshd
//! (`ssh_timeout`) and its Docker (`docker_timeout`). From then on every task is the docker
//! driver's, over `ssh://`. `close` deletes the server and the key, or parks the server for the
//! pool; it also deletes what a killed run of the namespace left, and every run deletes busy
//! servers whose holder stopped its heartbeat and parked servers idle past `max_idle`.
//!
//! Tokens and private keys never reach a log line, an error message or `Debug` output.
//!
//! It is not a general client of these APIs: only the calls the drivers make are here.

mod api;
mod config;
mod digitalocean;
mod driver;
mod error;
mod fly;
mod hetzner;
mod pool;
mod provider;
pub mod sizes;
mod ssh;

pub use api::Secret;
pub use config::{CloudConfig, PoolConfig, ProviderKind};
pub use driver::CloudDriver;
pub use error::CloudError;
pub use fly::{FlyConfig, FlyDriver};
