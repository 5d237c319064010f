//! `ci-exec token`: the credentials an orchestrator accepts, per repository.

use std::path::PathBuf;

use ci_exec_job::source::valid_repository_name;
use ci_exec_remote::server::auth::new_token;
use ci_exec_remote::server::storage::Credential;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject as _;

use super::serve::DataDir;
use crate::exit::{CliError, SUCCESS};

#[derive(Debug, clap::Subcommand)]
pub enum TokenCommand {
    /// Create a token for one repository and print it (once: only its digest is stored)
    Create {
        #[command(flatten)]
        data: DataDir,
        /// The repository it is for, as executors name it (`github.com/owner/name`)
        #[arg(long, value_name = "REPO")]
        repo: String,
        /// Allow publishing results, not only reading them
        #[arg(long)]
        publish: bool,
        /// Register this client certificate (PEM) for the repository instead of printing a
        /// token (for `serve --client-ca`)
        #[arg(long, value_name = "PEM")]
        cert: Option<PathBuf>,
    },
    /// Let CI jobs of one repository in, by their platform's OIDC identity (no secret):
    /// GitHub's repository and owner ids, or GitLab's project and namespace ids
    Bind {
        #[command(flatten)]
        data: DataDir,
        /// The repository, as executors name it (`github.com/owner/name`)
        #[arg(long, value_name = "REPO")]
        repo: String,
        /// The issuer of the ID tokens, as `serve --oidc-issuer` names it
        #[arg(long, value_name = "URL")]
        issuer: String,
        /// The repository's numeric id (GitHub `repository_id`, GitLab `project_id`)
        #[arg(long, value_name = "ID")]
        id: String,
        /// Its owner's numeric id (GitHub `repository_owner_id`, GitLab `namespace_id`)
        #[arg(long, value_name = "ID")]
        owner_id: String,
    },
    /// Every token, certificate and CI binding, by id (never the token itself)
    List {
        #[command(flatten)]
        data: DataDir,
    },
    /// Revoke the token or certificate whose id starts with ID; the keys of executors it
    /// published with are no longer trusted
    Revoke {
        #[command(flatten)]
        data: DataDir,
        id: String,
    },
}

pub fn run(command: TokenCommand) -> anyhow::Result<u8> {
    match command {
        TokenCommand::Create {
            data,
            repo,
            publish,
            cert,
        } => {
            if !valid_repository_name(&repo) {
                return Err(CliError::usage(format!("`{repo}` is not a repository name"))
                    .hint("name it as `host/owner/name`, the way `ci-exec test` derives it from `origin`")
                    .into());
            }
            let storage = data.open()?;
            let access = if publish { "read and publish" } else { "read" };
            match cert {
                Some(path) => {
                    let certificate = CertificateDer::from_pem_file(&path).map_err(|error| {
                        CliError::usage(format!(
                            "cannot read a PEM certificate from `{}`: {error}",
                            path.display()
                        ))
                    })?;
                    let grant =
                        storage.add_grant(Credential::Certificate(&certificate), &repo, publish)?;
                    eprintln!("certificate {} may {access} `{repo}`", grant.id);
                }
                None => {
                    let token = new_token().map_err(|error| {
                        CliError::infrastructure(format!("no randomness: {error}"))
                    })?;
                    let grant = storage.add_grant(Credential::Token(&token), &repo, publish)?;
                    println!("{token}");
                    eprintln!(
                        "token {} may {access} `{repo}`; it is shown only now (give it to executors as `CI_EXEC_TOKEN`)",
                        grant.id
                    );
                }
            }
        }
        TokenCommand::Bind {
            data,
            repo,
            issuer,
            id,
            owner_id,
        } => {
            if !valid_repository_name(&repo) {
                return Err(CliError::usage(format!("`{repo}` is not a repository name"))
                    .hint("name it as `host/owner/name`, the way `ci-exec test` derives it from `origin`")
                    .into());
            }
            let numeric = |text: &str| !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit());
            if !numeric(&id) || !numeric(&owner_id) {
                return Err(CliError::usage("`--id` and `--owner-id` are numeric ids, not names")
                    .hint("GitHub: `gh api repos/OWNER/NAME --jq '.id, .owner.id'`; GitLab: the project's and its namespace's ids on its settings page")
                    .into());
            }
            let issuer = issuer.trim_end_matches('/');
            if !ci_exec_remote::server::oidc::acceptable_issuer(issuer) {
                return Err(CliError::usage(format!("issuer `{issuer}` is not an `https://` URL"))
                    .hint("`https://token.actions.githubusercontent.com` for GitHub Actions, `https://gitlab.com` for GitLab.com")
                    .into());
            }
            let binding = data.open()?.bind(issuer, &id, &owner_id, &repo)?;
            eprintln!(
                "binding {}: CI jobs of `{issuer}` for repository id {id} (owner id {owner_id}) act for `{repo}`; protected refs publish, pull requests write their own scope",
                binding.id
            );
        }
        TokenCommand::List { data } => {
            let storage = data.open()?;
            let grants = storage.grants()?;
            println!(
                "{:<17}  {:<8}  {:<20}  REPOSITORY",
                "ID", "ACCESS", "CREATED"
            );
            for grant in grants {
                let created = humantime::format_rfc3339_seconds(
                    std::time::UNIX_EPOCH + std::time::Duration::from_secs(grant.created_unix),
                );
                let access = if grant.publish { "publish" } else { "read" };
                println!(
                    "{:<17}  {access:<8}  {created:<20}  {}",
                    grant.id, grant.repository
                );
            }
            for binding in storage.bindings()? {
                let created = humantime::format_rfc3339_seconds(
                    std::time::UNIX_EPOCH + std::time::Duration::from_secs(binding.created_unix),
                );
                println!(
                    "{:<17}  {:<8}  {created:<20}  {} (id {}, owner id {} at {})",
                    binding.id,
                    "ci",
                    binding.repository,
                    binding.subject,
                    binding.owner,
                    binding.issuer
                );
            }
        }
        TokenCommand::Revoke { data, id } => {
            let removed = data.open()?.revoke(&id)?;
            if removed == 0 {
                return Err(CliError::usage(format!(
                    "no token or certificate has an id starting with `{id}`"
                ))
                .hint("`ci-exec token list` shows the ids")
                .into());
            }
            eprintln!("revoked {removed}");
        }
    }
    Ok(SUCCESS)
}
