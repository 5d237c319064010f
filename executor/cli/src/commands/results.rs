//! `ci-exec results`: what the result store holds.

use std::time::{Duration, UNIX_EPOCH};

use ci_exec_job::{ResultRecord, ResultStore};

use crate::exit::{CliError, SUCCESS};

#[derive(Debug, clap::Subcommand)]
pub enum ResultsCommand {
    /// Every recorded run, newest first
    List {
        #[arg(long)]
        json: bool,
    },
    /// One recorded run, by key or unique key prefix
    Show {
        key: String,
        #[arg(long)]
        json: bool,
    },
    /// Remove records older than a duration (all with `--all`) and blobs nothing names
    Prune {
        /// e.g. `7d`, `12h`
        #[arg(long, value_name = "DURATION", default_value = "30d", value_parser = parse_duration)]
        older_than: Duration,
        #[arg(long, conflicts_with = "older_than")]
        all: bool,
        #[arg(long)]
        json: bool,
    },
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text).map_err(|error| format!("{error} (write e.g. `7d` or `12h`)"))
}

pub fn run(command: ResultsCommand) -> anyhow::Result<u8> {
    let store =
        ResultStore::open(None).map_err(|error| CliError::infrastructure(error.to_string()))?;
    match command {
        ResultsCommand::List { json } => {
            let records = store
                .list()
                .map_err(|error| CliError::infrastructure(error.to_string()))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&records)?);
            } else if records.is_empty() {
                eprintln!("no results recorded yet in `{}`", store.root().display());
            } else {
                println!(
                    "{:<12}  {:<6}  {:<8}  {:<20}  HOST",
                    "KEY", "EXIT", "DRIVER", "RECORDED"
                );
                for record in &records {
                    println!(
                        "{:<12}  {:<6}  {:<8}  {:<20}  {}",
                        &record.key[..12.min(record.key.len())],
                        record.exit_code,
                        record.driver,
                        when(record),
                        record.host
                    );
                }
            }
        }
        ResultsCommand::Show { key, json } => {
            let record = store.find(&key).map_err(|error| {
                CliError::usage(error.to_string()).hint("list keys with `ci-exec results list`")
            })?;
            if json {
                println!("{}", serde_json::to_string_pretty(&record)?);
            } else {
                print_record(&record);
            }
        }
        ResultsCommand::Prune {
            older_than,
            all,
            json,
        } => {
            let age = if all { 0 } else { older_than.as_secs() };
            let (removed, freed) = store
                .prune(age)
                .map_err(|error| CliError::infrastructure(error.to_string()))?;
            if json {
                println!(
                    "{}",
                    serde_json::json!({"removed": removed, "bytes_freed": freed})
                );
            } else {
                println!("removed {removed} results, freed {freed} bytes");
            }
        }
    }
    Ok(SUCCESS)
}

fn when(record: &ResultRecord) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(record.created_unix))
        .to_string()
}

fn print_record(record: &ResultRecord) {
    println!("key:       {}", record.key);
    println!(
        "exit code: {}{}",
        record.exit_code,
        if record.succeeded() {
            ""
        } else {
            " (never replayed)"
        }
    );
    println!(
        "recorded:  {} on `{}` by ci-exec {}",
        when(record),
        record.host,
        record.ci_exec_version
    );
    println!("driver:    {}", record.driver);
    if let Some(digest) = &record.environment_digest {
        println!("guest:     image digest {digest}");
    }
    if let Some(image) = &record.image {
        println!("image:     {image}");
    }
    println!("commit:    {} (tree {})", record.commit, record.tree);
    println!(
        "stdout:    {} bytes, stderr: {} bytes",
        record.stdout.size, record.stderr.size
    );
    for step in &record.steps {
        println!(
            "step:      {:<40} exit {:<4} {} ms",
            step.name, step.exit_code, step.ms
        );
    }
    for artifact in &record.artifacts {
        println!(
            "artifact:  {} ({} bytes, sha256 {})",
            artifact.path, artifact.size, artifact.sha256
        );
    }
}
