//! `ci-exec test`: the repository's mk job, replayed when its inputs were already tested.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use ci_exec_driver::{Driver, DriverConfig, MkSource, error_chain};
use ci_exec_job::store::Keep;
use ci_exec_job::{JobOptions, JobReport, PreparedJob, ResultStore, Terminal};
use ci_exec_remote::client::{ClientOptions, Fetched, Orchestrator, Published};
use ci_exec_remote::identity::{ExecutorKey, PublicKey};
use ci_exec_remote::platform;

use super::run::interrupted;
use crate::drivers::new_driver;
use crate::exit::{CliError, INTERRUPTED, SUCCESS, TEST_FAILED};

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
    /// The orchestrator to fetch results from before running, and to publish to after a
    /// successful run (with `CI_EXEC_TOKEN`)
    #[arg(long, env = "CI_EXEC_ORCHESTRATOR", value_name = "URL")]
    orchestrator: Option<String>,
    /// The repository's name at the orchestrator (default: from its `origin` remote)
    #[arg(long, env = "CI_EXEC_REPO", value_name = "REPO")]
    repo: Option<String>,
    /// Run `mk TARGET` in the test container instead of `mk test` (what the schedule's
    /// lines name); it has a result key of its own
    #[arg(long, value_name = "TARGET")]
    target: Option<String>,
    /// After a successful job, stay connected to the orchestrator until Ctrl-C or SIGTERM,
    /// serving the result to other executors instead of uploading it
    #[arg(long, requires = "orchestrator")]
    serve_results: bool,
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
        repository: args.repo.clone(),
        target: args.target.clone(),
    };
    let retention = retention()?;
    // Usage errors (no repository, no mkfile, a bad mkfile) before any driver starts.
    let job = PreparedJob::prepare(options)?;
    for submodule in &job.snapshot.skipped_submodules {
        eprintln!("warning: submodule `{submodule}` is not part of the committed tree; skipped");
    }
    let remote = match &args.orchestrator {
        Some(url) => Remote::connect(url, &job)?,
        None => None,
    };

    let store = ResultStore::open(None)?;
    let driver = new_driver(&config).await?;
    let bound = match job.bind(&*driver, mk_for(&*driver)).await {
        Ok(bound) => bound,
        Err(error) => {
            let _ = driver.close().await;
            return Err(error.into());
        }
    };
    let mut terminal = terminal();
    let mut outcome = bound.replay(&store, &mut terminal);
    if let (Ok(None), Some(remote), false) = (&outcome, &remote, args.no_replay) {
        let fetched = tokio::task::block_in_place(|| remote.fetch(bound.key(), &store));
        if fetched {
            outcome = bound.replay_fetched(&store, &mut terminal, Some(remote.client.url()));
        }
    }
    let outcome = match outcome {
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
    if let Some(remote) = &remote
        && !report.replayed
        && report.exit_code == 0
        && !args.serve_results
    {
        tokio::task::block_in_place(|| remote.publish(&report.key, &store));
    }
    match store.retain(retention) {
        Ok((0, _)) => {}
        Ok((removed, freed)) => tracing::info!(
            "retention: removed {removed} older results and {freed} bytes of their output"
        ),
        Err(error) => eprintln!("warning: older results were not pruned: {error}"),
    }
    if let Some(path) = &args.report {
        write_report(path, &report)?;
    }
    summarize(&report, &*driver, keep, &config);
    step_summary(&report, &*driver);
    if let Some(remote) = remote
        && args.serve_results
        && report.exit_code == 0
    {
        remote.serve_until_stopped(&report.key, store).await;
    }
    Ok(if report.exit_code == 0 {
        SUCCESS
    } else {
        TEST_FAILED
    })
}

/// `CI_EXEC_KEEP`: how many results of each repository the local store keeps.
fn retention() -> anyhow::Result<Keep> {
    match std::env::var("CI_EXEC_KEEP") {
        Ok(text) => text.parse().map_err(|reason: String| {
            CliError::usage(format!("`CI_EXEC_KEEP`: {reason}"))
                .hint("set it to a count of results per repository (`3`) or an age (`7d`)")
                .into()
        }),
        Err(_) => Ok(Keep::default()),
    }
}

/// The orchestrator of this job: where results are fetched from and published to.
struct Remote {
    client: Orchestrator,
    key: ExecutorKey,
    pinned: Vec<PublicKey>,
    /// No credential: reads only what the orchestrator serves publicly, publishes nothing.
    anonymous: bool,
}

impl Remote {
    /// The orchestrator with this job's credential: `CI_EXEC_TOKEN`, a client certificate,
    /// or the CI platform's ID token (traded for a session here). `None`, with a warning,
    /// when a CI job has no credential (a fork's pull request) or the login fails: the job
    /// then runs here.
    fn connect(url: &str, job: &PreparedJob) -> anyhow::Result<Option<Remote>> {
        if !job.has_shared_name() {
            return Err(CliError::usage(format!(
                "repository `{}` has no `origin` remote, so the orchestrator cannot tell which repository it is",
                job.snapshot.root.display()
            ))
            .hint("name it with `--repo host/owner/name` or `CI_EXEC_REPO`")
            .into());
        }
        if !(url.starts_with("https://") || url.starts_with("http://")) {
            return Err(
                CliError::usage(format!("orchestrator `{url}` is not an http(s) URL"))
                    .hint("give it as `https://host[:port]`")
                    .into(),
            );
        }
        let pinned = match std::env::var("CI_EXEC_TRUSTED_KEYS") {
            Ok(text) => PublicKey::parse_list(&text).map_err(|error| {
                CliError::usage(format!("`CI_EXEC_TRUSTED_KEYS`: {error}"))
                    .hint("`ci-exec key show` prints a key in the expected form")
            })?,
            Err(_) => Vec::new(),
        };
        let token = std::env::var("CI_EXEC_TOKEN")
            .ok()
            .filter(|token| !token.is_empty());
        let path = |name: &str| std::env::var_os(name).map(PathBuf::from);
        let client_certificate = match (path("CI_EXEC_CLIENT_CERT"), path("CI_EXEC_CLIENT_KEY")) {
            (Some(cert), Some(key)) => Some((cert, key)),
            (None, None) => None,
            _ => {
                return Err(CliError::usage(
                    "`CI_EXEC_CLIENT_CERT` and `CI_EXEC_CLIENT_KEY` go together",
                )
                .into());
            }
        };
        let (mut id_token, mut anonymous) = (None, false);
        if token.is_none() && client_certificate.is_none() {
            let audience = url.trim_end_matches('/');
            match platform::id_token(audience, &|name| std::env::var(name).ok()) {
                Ok(Some((jwt, source))) => {
                    eprintln!("==> using the CI job's ID token from {source}");
                    id_token = Some(jwt);
                }
                Ok(None) if in_ci() => {
                    eprintln!(
                        "warning: no credential for orchestrator `{url}` (no `CI_EXEC_TOKEN`, no ID token: a fork's pull request?); reading it anonymously, publishing nothing"
                    );
                    anonymous = true;
                }
                Ok(None) => {
                    return Err(CliError::usage(format!(
                        "orchestrator `{url}` needs a credential"
                    ))
                    .hint("export `CI_EXEC_TOKEN` (from `ci-exec token create --repo REPO`)")
                    .into());
                }
                Err(error) => {
                    eprintln!(
                        "warning: {}; running without the orchestrator\nhint: {}",
                        error_chain(&error),
                        error.hint()
                    );
                    return Ok(None);
                }
            }
        }
        let mut client = Orchestrator::new(ClientOptions {
            url: url.to_owned(),
            token,
            id_token,
            repository: job.repository().to_owned(),
            ca: path("CI_EXEC_ORCHESTRATOR_CA"),
            client_certificate,
        })?;
        match tokio::task::block_in_place(|| client.log_in()) {
            Ok(None) => {}
            Ok(Some(login)) => eprintln!(
                "==> logged in to {url} as a CI job of `{}`: {} the {} scope",
                job.repository(),
                if login.publish {
                    "reads and publishes to"
                } else {
                    "only reads"
                },
                login.scope.as_deref().unwrap_or("trusted")
            ),
            Err(error) => {
                eprintln!(
                    "warning: cannot log in to the orchestrator: {}; running the job here",
                    error_chain(&error)
                );
                return Ok(None);
            }
        }
        let key = ExecutorKey::load_or_create(&ExecutorKey::default_path())?;
        Ok(Some(Remote {
            client,
            key,
            pinned,
            anonymous,
        }))
    }

    /// Brings the orchestrator's result of `key` into `store`; whether it did. Any failure
    /// is a warning: the job then runs here.
    fn fetch(&self, key: &str, store: &ResultStore) -> bool {
        match self
            .client
            .fetch(key, store, &self.pinned, &self.key.public())
        {
            Ok(Fetched::Stored(_)) => true,
            Ok(Fetched::Miss) => false,
            Ok(Fetched::Untrusted(why)) => {
                eprintln!(
                    "warning: not replaying the orchestrator's result {}: {why}; running the job",
                    &key[..12]
                );
                false
            }
            Err(error) => {
                eprintln!("warning: {}; running the job here", error_chain(&error));
                false
            }
        }
    }

    /// Stays connected, serving the result of `key` from `store`, until SIGINT or SIGTERM.
    async fn serve_until_stopped(self, key: &str, store: ResultStore) {
        if self.anonymous {
            eprintln!("note: not serving results: there is no credential for the orchestrator");
            return;
        }
        let record = match store.get(key) {
            Ok(Some(record)) => record,
            _ => return,
        };
        let url = self.client.url().to_owned();
        let connected = std::sync::Arc::new(self.client.connect(self.key));
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        eprintln!(
            "==> serving result {} to other executors through {url}; Ctrl-C to stop",
            &key[..12]
        );
        let serving = {
            let (connected, stop) = (connected.clone(), stop.clone());
            std::thread::spawn(move || {
                connected.serve(&store, &|| vec![record.clone()], &stop);
            })
        };
        interrupted().await;
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        tokio::task::block_in_place(|| connected.leave());
        // The serving thread may sit in a long poll; the process ends without waiting for it.
        drop(serving);
        eprintln!("==> left {url}");
    }

    /// Publishes the recorded result of `key`; a failure is a warning (the run stands).
    fn publish(&self, key: &str, store: &ResultStore) {
        if self.anonymous {
            return;
        }
        let record = match store.get(key) {
            Ok(Some(record)) => record,
            _ => return,
        };
        match self.client.publish(&record, store, &self.key) {
            Ok(Published::Created) => eprintln!(
                "==> published result {} to {}",
                &key[..12],
                self.client.url()
            ),
            Ok(Published::AlreadyThere) => {}
            Ok(Published::ReadOnly) => eprintln!(
                "note: result {} not published: the token may only read",
                &key[..12]
            ),
            Ok(Published::Conflict) => eprintln!(
                "warning: the orchestrator holds a different result {} (results are write-once); this run is kept here only",
                &key[..12]
            ),
            Err(error) => eprintln!(
                "warning: result {} not published: {}",
                &key[..12],
                error_chain(&error)
            ),
        }
    }
}

/// Whether this runs in a CI job (GitHub Actions, GitLab CI, or any that sets `CI`).
fn in_ci() -> bool {
    ["GITHUB_ACTIONS", "GITLAB_CI", "CI"]
        .iter()
        .any(|name| std::env::var(name).is_ok_and(|value| value == "true"))
}

/// On GitHub Actions, the result key and whether it was replayed, in the job's summary
/// page (`$GITHUB_STEP_SUMMARY`); the log has the same on its last line.
fn step_summary(report: &JobReport, driver: &dyn Driver) {
    let Some(path) = std::env::var_os("GITHUB_STEP_SUMMARY") else {
        return;
    };
    let outcome = if report.replayed {
        format!(
            "passed, **replayed** from {}",
            report.replayed_from.as_deref().unwrap_or("the local store")
        )
    } else if report.exit_code == 0 {
        format!("passed, ran on `{}`", driver.name())
    } else {
        format!("**failed** with status {}", report.exit_code)
    };
    let line = format!(
        "### ci-exec\n\n| result key | outcome |\n|---|---|\n| `{}` | {outcome} |\n",
        report.key
    );
    let written = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(&path)
        .and_then(|mut file| std::io::Write::write_all(&mut file, line.as_bytes()));
    if let Err(error) = written {
        eprintln!("warning: cannot write the step summary: {error}");
    }
}

fn summarize(report: &JobReport, driver: &dyn Driver, kept: bool, config: &DriverConfig) {
    let key = &report.key[..12];
    if report.replayed {
        match report.replayed_from.as_deref() {
            Some(origin) if origin != "local" => {
                eprintln!("==> passed (replayed result {key} from {origin})");
            }
            _ => eprintln!("==> passed (replayed result {key})"),
        }
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
pub(super) fn terminal() -> Terminal {
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

/// Our `mk` on this host, for a driver whose base OS has none.
pub(super) fn mk_for(driver: &dyn Driver) -> Option<PathBuf> {
    match driver.job_support().mk {
        MkSource::BaseOs => None,
        // Stock base images (docker, podman) have no mk, and may have no libc either.
        MkSource::Upload => ci_exec_guest_image::binaries::locate_static("mk"),
        MkSource::Host => mk_beside_us().or_else(|| on_default_path("mk")),
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
