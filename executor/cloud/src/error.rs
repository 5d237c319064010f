use std::time::Duration;

/// Why a cloud driver could not provision, reach or remove its machines. No variant holds a
/// token or a private key: API errors carry the provider's own message and the request's path.
#[derive(Debug, thiserror::Error)]
pub enum CloudError {
    /// A malformed parameter (`labels=` without `=`, an `endpoint` that is no URL, …).
    #[error("invalid parameter `{parameter}` of driver `{driver}`: {reason}")]
    InvalidParameter {
        driver: &'static str,
        parameter: &'static str,
        reason: String,
    },

    /// 401: the one thing to fix is the token, so the message names where it comes from.
    #[error(
        "the {provider} API refused the token (401 Unauthorized): set a valid token in the DSN \
         parameter `{parameter}` or in `{env}`"
    )]
    Unauthorized {
        provider: &'static str,
        parameter: &'static str,
        env: &'static str,
    },

    /// Any other refusal (403 quota, 422 unknown size or location, 404, …), with the API's own
    /// message.
    #[error("the {provider} API refused to {action} ({status}): {message}")]
    Refused {
        provider: &'static str,
        action: String,
        status: u16,
        message: String,
    },

    /// Still rate-limited after backing off as the rate-limit headers said.
    #[error(
        "the {provider} API kept rate-limiting `{action}` (429) after {waited:?} of backing off"
    )]
    RateLimited {
        provider: &'static str,
        action: String,
        waited: Duration,
    },

    /// The API could not be reached, or answered with something that is not its wire format.
    #[error("cannot {action} through the {provider} API at `{endpoint}`")]
    Transport {
        provider: &'static str,
        action: String,
        endpoint: String,
        #[source]
        source: reqwest::Error,
    },

    #[error("unexpected answer of the {provider} API to `{action}`: {reason}")]
    Protocol {
        provider: &'static str,
        action: String,
        reason: String,
    },

    /// The server never became reachable: it has been deleted (exit 125).
    #[error(
        "{what} of {provider} server `{server}` did not answer within {after:?} (parameter \
         `{parameter}`); the server was deleted"
    )]
    ProvisioningTimeout {
        provider: &'static str,
        server: String,
        what: &'static str,
        parameter: &'static str,
        after: Duration,
    },

    /// Every worker slot of the pool stayed taken for `wait_timeout`.
    #[error(
        "no free {provider} worker in pool `{pool}` within {after:?} ({workers} of \
         `max_workers={max_workers}` busy; raise `wait_timeout` or `max_workers`)"
    )]
    NoFreeWorker {
        provider: &'static str,
        pool: String,
        after: Duration,
        workers: usize,
        max_workers: u64,
    },

    #[error("cannot make an ssh key for the {provider} server")]
    SshKey {
        provider: &'static str,
        #[source]
        source: std::io::Error,
    },

    /// The `fly` driver's machine agent is not on this machine.
    #[error(
        "the `fly` driver needs the static `ci-exec-init` (its machines' agent): build it with \
         `cargo build --release --target x86_64-unknown-linux-musl -p ci-exec-guest-init`, or \
         set `CI_EXEC_GUEST_BIN` to the directory that holds it"
    )]
    MissingAgent,
}
