//! Fakes of the Hetzner Cloud, DigitalOcean and Fly Machines APIs on loopback, for the cloud drivers' tests:
//! nothing here reaches a real provider.
//!
//! Each speaks the documented wire format for exactly what the drivers use: servers / droplets
//! with labels / tags and label selectors, ssh keys, pagination, the providers' error bodies,
//! 401 for an unknown token, and injected faults (429 with rate-limit headers, 403, 422). Every
//! request the fake receives and every response it returns is checked against the provider's
//! published OpenAPI document ([`openapi`]); a violation is recorded
//! ([`FakeCloud::violations`]) and a bad request is refused with 422, so a test fails.
//!
//! Its servers are real enough to log into: every server's public IPv4 is one address (a test
//! sshd whose sessions see a local Docker engine), and the public keys a server is created
//! with are added to that sshd's `authorized_keys` (as cloud-init adds them on a real server)
//! and removed when the server is deleted.
//!
//! The Fly fake's machines are containers on the local Docker engine (`fly.rs`): the `fly`
//! driver's agent really runs in them, and `exec` really executes there.
//!
//! It is not a simulator of the providers: no billing, no actions API, no regions.

mod digitalocean;
mod fly;
mod hetzner;
pub mod openapi;
mod server;

pub use hetzner::matches as label_selector_matches;
pub use server::{Api, FakeCloud, FakeOptions, FakeServer, Fault, Recorded};

/// The sshd the fake's servers are: `.ci/setup-docker.sh` starts it (its sessions see the test
/// Docker engine) and exports where it is.
#[derive(Debug, Clone)]
pub struct SshTestHost {
    pub address: String,
    pub user: String,
    pub authorized_keys: std::path::PathBuf,
}

impl SshTestHost {
    /// From `CI_EXEC_TEST_SSH_ADDRESS` (its sshd on port 22), `_USER` and `_AUTHORIZED_KEYS`; the error says
    /// what is missing.
    pub fn from_env() -> Result<SshTestHost, String> {
        let variable = |name: &str| {
            std::env::var(name)
                .ok()
                .filter(|value| !value.is_empty())
                .ok_or_else(|| format!("`{name}` is not set"))
        };
        Ok(SshTestHost {
            address: variable("CI_EXEC_TEST_SSH_ADDRESS")?,
            user: variable("CI_EXEC_TEST_SSH_USER")?,
            authorized_keys: variable("CI_EXEC_TEST_SSH_AUTHORIZED_KEYS")?.into(),
        })
    }

    /// Fake options whose servers are this host.
    pub fn options(&self) -> FakeOptions {
        FakeOptions {
            server_address: self.address.clone(),
            authorized_keys: Some(self.authorized_keys.clone()),
            ..FakeOptions::default()
        }
    }
}
