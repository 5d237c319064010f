//! `ci-exec test`: the repository's mk job, replayed when its inputs were already tested.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use ci_exec_driver::{Driver, DriverConfig, MkSource};
use ci_exec_job::{JobOptions, JobReport, PreparedJob, ResultStore, Terminal};

use super::run::interrupted;
use crate::drivers::new_driver;
use crate::exit::{INTERRUPTED, SUCCESS, TEST_FAILED};

#[derive(Debug, clap::Args)]
pub struct TestArgs {
    /// The repository, or any directory inside it
    #[arg(default_value = ".")]
    path: PathBuf,
    /// Test this committed revision (branch, tag, sha) instead of HEAD, without checking it out
    #[arg(long, value_name = "REV")]
    rev: Option<String>,
    /// The driver DSN (`qemu`, `native`, `docker://ns?host=…`, …)
    #[arg(
        long,
        env = "CI_EXEC_DRIVER",
        default_value = "qemu",
        value_name = "DSN"
    )]
    driver: String,
    /// An environment variable whose value is an input of the result (repeatable; also
    /// `CI_EXEC_ENV=NAME,NAME`)
    #[arg(long = "env", value_name = "NAME")]
    inputs: Vec<String>,
    /// An environment variable passed to the job but never hashed, stored or printed
    #[arg(long = "secret", value_name = "NAME")]
    secrets: Vec<String>,
    /// Always run, even when a recorded result could be replayed
    #[arg(long)]
    no_replay: bool,
    /// Ignore the repository's saved `/var/run/ci/cache`
    #[arg(long)]
    fresh: bool,
    /// No network for any step (the base-OS steps are online otherwise, and `mk test` when
    /// the mkfile sets `TEST_NETWORK=on`)
    #[arg(long)]
    offline: bool,
    /// Copy the artifacts into DIR (also when replaying)
    #[arg(long, value_name = "DIR")]
    artifacts: Option<PathBuf>,
    /// Write a JSON report of the run to FILE
    #[arg(long, value_name = "FILE")]
    report: Option<PathBuf>,
    /// Keep the driver's resources (VM, volumes) after the job for inspection
    #[arg(long)]
    keep: bool,
    /// Mixed into the result key: a new salt forces a new run
    #[arg(long)]
    salt: Option<String>,
}

pub async fn run(args: TestArgs) -> anyhow::Result<u8> {
    let mut inputs = args.inputs.clone();
    if let Ok(list) = std::env::var("CI_EXEC_ENV") {
        inputs.extend(
            list.split(',')
                .map(str::trim)
                .filter(|name| !name.is_empty())
                .map(str::to_owned),
        );
    }
    let config = DriverConfig::parse(&args.driver)?;
    let options = JobOptions {
        path: args.path.clone(),
        revision: args.rev.clone(),
        inputs,
        secrets: args.secrets.clone(),
        salt: args.salt.clone(),
        no_replay: args.no_replay,
        fresh: args.fresh,
        offline: args.offline,
        artifacts_dir: args.artifacts.clone(),
    };
    // Usage errors (no repository, no mkfile, a bad mkfile) before any driver starts.
    let job = PreparedJob::prepare(options)?;
    for submodule in &job.snapshot.skipped_submodules {
        eprintln!("warning: submodule `{submodule}` is not part of the committed tree; skipped");
    }

    let store = ResultStore::open(None)?;
    let driver = new_driver(&config).await?;
    let mk = match driver.job_support().mk {
        MkSource::BaseOs => None,
        // Stock base images (docker, podman) have no mk, and may have no libc either.
        MkSource::Upload => ci_exec_guest_image::binaries::locate_static("mk"),
        MkSource::Host => mk_beside_us().or_else(|| on_default_path("mk")),
    };
    let bound = match job.bind(&*driver, mk).await {
        Ok(bound) => bound,
        Err(error) => {
            let _ = driver.close().await;
            return Err(error.into());
        }
    };
    let mut terminal = terminal();
    let outcome = match bound.replay(&store, &mut terminal) {
        Ok(None) => {
            tokio::select! {
                result = bound.run(&store, terminal) => result.map(Some),
                () = interrupted() => Ok(None),
            }
        }
        replayed => replayed,
    };
    let keep = args.keep || config.namespace_given;
    if !keep && let Err(error) = driver.close().await {
        tracing::warn!("cannot close namespace `{}`: {error}", config.namespace);
    }
    let report = match outcome? {
        Some(report) => report,
        None => {
            eprintln!("ci-exec: interrupted; the job was stopped and its resources removed");
            return Ok(INTERRUPTED);
        }
    };
    if let Some(path) = &args.report {
        write_report(path, &report)?;
    }
    summarize(&report, &*driver, keep, &config);
    Ok(if report.exit_code == 0 {
        SUCCESS
    } else {
        TEST_FAILED
    })
}

fn summarize(report: &JobReport, driver: &dyn Driver, kept: bool, config: &DriverConfig) {
    let key = &report.key[..12];
    if report.replayed {
        eprintln!("==> passed (replayed result {key})");
    } else if report.exit_code == 0 {
        let ms: u64 = report.steps.iter().map(|step| step.ms).sum();
        eprintln!(
            "==> passed in {:.1}s on `{}` (result {key} recorded)",
            ms as f64 / 1000.0,
            driver.name()
        );
    } else {
        let failed = report
            .steps
            .iter()
            .find(|step| step.exit_code != 0)
            .map_or("the job", |step| step.name.as_str());
        eprintln!(
            "==> failed: `{failed}` exited with status {} (run {key} recorded; failed runs are never replayed)",
            report.exit_code
        );
    }
    if kept {
        eprintln!(
            "==> resources kept in namespace `{}`: remove them with `ci-exec driver close --driver={}://{}`",
            config.namespace, config.driver, config.namespace
        );
    }
}

fn write_report(path: &Path, report: &JobReport) -> anyhow::Result<()> {
    let json = serde_json::to_vec_pretty(report)?;
    std::fs::write(path, json).with_context(|| format!("cannot write report `{}`", path.display()))
}

/// Our live output: stdout and stderr as they are, step lines on stderr.
fn terminal() -> Terminal {
    Terminal {
        stdout: Box::new(std::io::stdout()),
        stderr: Box::new(std::io::stderr()),
        status: Box::new(StatusLine),
    }
}

/// Step announcements on stderr, bold on a terminal.
struct StatusLine;

impl std::io::Write for StatusLine {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut stderr = std::io::stderr().lock();
        if crate::exit::color_enabled() && buf.starts_with(b"==>") {
            stderr.write_all(b"\x1b[1m")?;
            stderr.write_all(buf)?;
            stderr.write_all(b"\x1b[0m")?;
        } else {
            stderr.write_all(buf)?;
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

/// Our `mk` when it was built beside this executable.
fn mk_beside_us() -> Option<PathBuf> {
    let mk = std::env::current_exe().ok()?.parent()?.join("mk");
    mk.is_file().then_some(mk)
}

/// `program` in the default `PATH` every job step gets.
fn on_default_path(program: &str) -> Option<PathBuf> {
    ci_exec_native::DEFAULT_PATH
        .split(':')
        .map(|dir| Path::new(dir).join(program))
        .find(|path| path.is_file())
}
