//! `ci-exec serve`: the orchestrator other executors fetch results from and publish to.

use std::net::SocketAddr;
use std::path::PathBuf;

use ci_exec_remote::server::oidc::OidcOptions;
use ci_exec_remote::server::storage::Storage;
use ci_exec_remote::server::{ServeOptions, Server, TlsOptions};

use crate::exit::{CliError, SUCCESS};

#[derive(Debug, clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct ServeArgs {
    #[command(subcommand)]
    command: Option<ServeCommand>,
    /// The address to listen on; plain HTTP only on a loopback address
    #[arg(long, default_value = "127.0.0.1:8555", value_name = "ADDR:PORT")]
    listen: SocketAddr,
    #[command(flatten)]
    data: DataDir,
    /// The server's certificate chain (PEM): serve HTTPS
    #[arg(long, value_name = "PEM", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The private key of `--tls-cert` (PEM)
    #[arg(long, value_name = "PEM", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Require client certificates issued by this CA (PEM); map each to a repository with
    /// `ci-exec token create --cert`
    #[arg(long, value_name = "PEM", requires = "tls_cert")]
    client_ca: Option<PathBuf>,
    /// Drop results published more than DAYS ago (checked hourly); kept forever otherwise
    #[arg(long, value_name = "DAYS")]
    keep_days: Option<u64>,
    /// The largest blob (stdout, stderr, artifact) accepted, in bytes
    #[arg(long, value_name = "BYTES", default_value_t = 4 << 30)]
    max_blob_bytes: u64,
    /// Accept CI jobs' OIDC ID tokens from this issuer (repeatable):
    /// `https://token.actions.githubusercontent.com`, `https://gitlab.com`, a GitLab instance;
    /// bind repositories to their ids with `ci-exec token bind`
    #[arg(long = "oidc-issuer", value_name = "URL")]
    oidc_issuers: Vec<String>,
    /// The audience ID tokens must name: this orchestrator's URL as CI jobs reach it (what
    /// `ci-exec init --orchestrator` was given); defaults to the listen address on loopback
    #[arg(long, value_name = "URL", requires = "oidc_issuers")]
    oidc_audience: Option<String>,
    /// How long the session a CI job gets for its ID token lasts
    #[arg(long, value_name = "MINUTES", default_value_t = 120)]
    oidc_session_minutes: u64,
    /// Let anyone read this repository's trusted results without a credential (repeatable):
    /// for a public repository, whose forks' pull requests get no ID token yet may replay
    /// what the default branch published. Publishing still needs a credential
    #[arg(long = "public-read", value_name = "REPO")]
    public_read: Vec<String>,
}

/// The orchestrator's data directory, shared by `serve`, `serve gc` and `token`.
#[derive(Debug, Clone, clap::Args)]
pub struct DataDir {
    /// The orchestrator's data directory (default `$XDG_DATA_HOME/ci-exec/orchestrator`)
    #[arg(long = "data", env = "CI_EXEC_SERVE_DATA", value_name = "DIR")]
    path: Option<PathBuf>,
}

impl DataDir {
    pub fn path(&self) -> PathBuf {
        self.path.clone().unwrap_or_else(|| {
            dirs::data_dir()
                .unwrap_or_else(std::env::temp_dir)
                .join("ci-exec")
                .join("orchestrator")
        })
    }

    pub fn open(&self) -> anyhow::Result<Storage> {
        let path = self.path();
        Storage::open(&path).map_err(|error| {
            anyhow::Error::new(error).context(format!(
                "cannot open the orchestrator data directory `{}`",
                path.display()
            ))
        })
    }
}

#[derive(Debug, clap::Subcommand)]
enum ServeCommand {
    /// Drop results older than `--keep-days`, then the blobs no result names
    Gc {
        #[command(flatten)]
        data: DataDir,
        #[arg(long, value_name = "DAYS")]
        keep_days: u64,
    },
}

pub async fn run(args: ServeArgs) -> anyhow::Result<u8> {
    if let Some(ServeCommand::Gc { data, keep_days }) = args.command {
        let storage = data.open()?;
        let (results, blobs) = storage.collect_garbage(keep_days)?;
        eprintln!("dropped {results} results and {blobs} blobs");
        return Ok(SUCCESS);
    }
    if let Some(bad) = args
        .public_read
        .iter()
        .find(|name| !ci_exec_job::source::valid_repository_name(name))
    {
        return Err(
            CliError::usage(format!("`--public-read {bad}` is not a repository name"))
                .hint("name it as `host/owner/name`, the way `ci-exec test --repo` does")
                .into(),
        );
    }
    let options = ServeOptions {
        listen: args.listen,
        data: args.data.path(),
        tls: args
            .tls_cert
            .zip(args.tls_key)
            .map(|(cert, key)| TlsOptions {
                cert,
                key,
                client_ca: args.client_ca,
            }),
        keep_days: args.keep_days,
        max_blob_bytes: args.max_blob_bytes,
        oidc: (!args.oidc_issuers.is_empty()).then(|| OidcOptions {
            issuers: args.oidc_issuers.clone(),
            audience: args.oidc_audience.clone().unwrap_or_default(),
            session: std::time::Duration::from_secs(args.oidc_session_minutes * 60),
        }),
        public_read: args.public_read.clone(),
    };
    let server = match Server::bind(&options).await {
        Ok(server) => server,
        Err(error) => {
            let hint = error.hint();
            let mut cli = CliError::usage(error.to_string());
            if let Some(hint) = hint {
                cli = cli.hint(hint);
            }
            return Err(match error {
                ci_exec_remote::server::ServeError::PlainHttpOffLoopback { .. }
                | ci_exec_remote::server::ServeError::TlsFile { .. }
                | ci_exec_remote::server::ServeError::Oidc(_) => cli.into(),
                other => anyhow::Error::new(other),
            });
        }
    };
    eprintln!(
        "ci-exec serve: listening on {} (data in `{}`); Ctrl-C stops",
        server.url(),
        options.data.display()
    );
    for issuer in &args.oidc_issuers {
        eprintln!("ci-exec serve: accepting ID tokens of `{issuer}`");
    }
    server.run(super::run::interrupted()).await;
    eprintln!("ci-exec serve: stopped");
    Ok(SUCCESS)
}
