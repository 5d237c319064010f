//! `ci-exec cache`: the per-repository warm states the qemu driver keeps (podman's images and
//! layer cache from a repository's base-OS steps), and dropping them.

use std::time::{Duration, UNIX_EPOCH};

use ci_exec_qemu::repository::{self, SavedState};

use crate::exit::SUCCESS;

#[derive(Debug, clap::Subcommand)]
pub enum CacheCommand {
    /// Every repository's warm state, least recently used first
    List {
        #[arg(long)]
        json: bool,
    },
    /// Drop states unused for 14 days and the least recently used above 20 GiB (all with `--all`)
    Prune {
        #[arg(long)]
        all: bool,
        #[arg(long)]
        json: bool,
    },
}

pub fn run(command: CacheCommand) -> anyhow::Result<u8> {
    // The qemu driver's default cache directory (`cache_dir=`): where its jobs keep them.
    let cache_dir = ci_exec_qemu::QemuConfig::new("cache").cache_dir;
    let (states, json) = match command {
        CacheCommand::List { json } => (repository::list(&cache_dir), json),
        CacheCommand::Prune { all, json } => (
            repository::prune(&cache_dir, repository::MAX_AGE, repository::MAX_BYTES, all),
            json,
        ),
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&states)?);
    } else if states.is_empty() {
        eprintln!("no repository warm states in `{}`", cache_dir.display());
    } else {
        for state in &states {
            println!("{}", line(state));
        }
    }
    Ok(SUCCESS)
}

fn line(state: &SavedState) -> String {
    let used =
        humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(state.last_used_unix));
    format!(
        "{}  image {}  {:>8.1} MB  last used {used}  {}",
        state.repository,
        state.image_digest,
        state.bytes as f64 / 1e6,
        state.path.display()
    )
}
