//! `ci-exec schedule`: the repository's schedule, as the daemon reads it.

use std::path::PathBuf;

use ci_exec_driver::DriverConfig;
use ci_exec_job::{JobOptions, PreparedJob, Terminal};

use super::test::{mk_for, terminal};
use crate::drivers::new_driver;
use crate::exit::{CliError, SUCCESS};

#[derive(Debug, clap::Args)]
pub struct ScheduleArgs {
    /// The repository, or any directory inside it
    #[arg(default_value = ".")]
    path: PathBuf,
    /// The driver DSN whose base OS builds `/var/run/ci/crontab`
    #[arg(
        long,
        env = "CI_EXEC_DRIVER",
        default_value = "qemu",
        value_name = "DSN"
    )]
    driver: String,
}

/// Builds `/var/run/ci/crontab` of the committed tree in the driver's base OS, checks it, and
/// prints it on stdout (the build's own output goes to stderr).
pub async fn run(args: ScheduleArgs) -> anyhow::Result<u8> {
    let config = DriverConfig::parse(&args.driver)?;
    let job = PreparedJob::prepare(JobOptions {
        path: args.path.clone(),
        ..JobOptions::default()
    })?;
    let driver = new_driver(&config).await?;
    let result = async {
        let bound = job.bind(&*driver, mk_for(&*driver)).await?;
        let quiet = terminal();
        // Everything the build prints is diagnostics here: stdout carries the schedule.
        let to_stderr = Terminal {
            stdout: Box::new(std::io::stderr()),
            ..quiet
        };
        bound.schedule(to_stderr).await
    }
    .await;
    let _ = driver.close().await;
    match result? {
        None => {
            eprintln!("the mkfile has no `/var/run/ci/crontab` target: nothing is scheduled");
        }
        Some(text) => {
            ci_exec_job::schedule::parse(&text).map_err(|error| {
                CliError::usage(format!("`/var/run/ci/crontab`: {error}"))
                    .hint("each line is five cron fields (or `@daily`) then mk targets")
            })?;
            print!("{text}");
        }
    }
    Ok(SUCCESS)
}
