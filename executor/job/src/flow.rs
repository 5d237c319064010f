//! Running a job: replay a recorded result, or run the mk steps through a driver and record.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ci_exec_driver::{
    Driver, DriverError, JobSupport, LogSink, MkSource, Stdin, Task, wait_for_exit,
};
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::output::Stream;
use crate::plan::{ARTIFACTS_DIR, CACHE_DIR, CRONTAB, ENV_DIR, HostPlan, JobPlan, PLAN_VARIABLES};
use crate::store::{Artifact, ResultRecord, ResultStore, StepTiming, unix_now};
use crate::{JobError, KeyInputs, Snapshot};

/// Where the committed tree is unpacked, in the base OS and in the test container.
pub const SOURCE_PATH: &str = "/src";
/// Where ci-exec's own tools (the static `mk`) appear inside the test container.
pub const TOOLS_PATH: &str = "/opt/ci-exec/bin";
const RUN_CI: &str = "/var/run/ci";
/// Unpacks the source archive on stdin into the step's directory, and creates the well-known
/// directories mkfiles write into (`echo $CONTAINERIMAGE > $target` expects them).
const UNPACK: &str =
    "mkdir -p /var/run/ci/env /var/run/ci/artifacts /var/run/ci/cache && tar -x -f - -C .";
/// [`UNPACK`], then the base OS's mk copied into the tools volume (one `mkdir` for both).
const UNPACK_AND_INSTALL_MK: &str = "mkdir -p /var/run/ci/env /var/run/ci/artifacts /var/run/ci/cache /opt/ci-exec/bin && \
     tar -x -f - -C . && cp \"$(command -v mk)\" /opt/ci-exec/bin/mk";
/// Copies the base OS's mk into the tools volume, for the test container.
const INSTALL_MK: &str = "mkdir -p /opt/ci-exec/bin && cp \"$(command -v mk)\" /opt/ci-exec/bin/mk";
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// What the user asked for.
#[derive(Debug, Clone, Default)]
pub struct JobOptions {
    /// The repository (or any directory inside it).
    pub path: PathBuf,
    /// The committed revision to test (branch, tag, sha); HEAD when `None`.
    pub revision: Option<String>,
    /// Variables whose values are inputs of the result key, passed to the job.
    pub inputs: Vec<String>,
    /// Variables passed to the job but never hashed, stored or printed.
    pub secrets: Vec<String>,
    pub salt: Option<String>,
    /// Skip the replay lookup and always run.
    pub no_replay: bool,
    /// Ignore the repository's saved `/var/run/ci/cache`.
    pub fresh: bool,
    /// No step gets the network, whatever the mkfile declares.
    pub offline: bool,
    /// Copy artifacts here (on a run and on a replay).
    pub artifacts_dir: Option<PathBuf>,
    /// The repository's shared name (`--repo`, `CI_EXEC_REPO`); its `origin` when `None`.
    pub repository: Option<String>,
    /// The target run in the test container: `test` when `None`, or a scheduled target.
    pub target: Option<String>,
}

impl JobOptions {
    /// The target run in the test container.
    pub fn target(&self) -> &str {
        self.target.as_deref().unwrap_or("test")
    }
}

/// What `--report` writes.
#[derive(Debug, Clone, Serialize)]
pub struct JobReport {
    pub key: String,
    pub replayed: bool,
    /// Where the replayed result came from: `local` (this executor's store) or the URL of
    /// the orchestrator it was fetched from.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replayed_from: Option<String>,
    pub exit_code: i32,
    pub driver: String,
    /// What the driver's base environment is (guest image digest, base image id, host OS):
    /// an input of the key.
    pub environment: Option<String>,
    pub image: Option<String>,
    pub artifacts: Vec<ReportArtifact>,
    pub steps: Vec<StepTiming>,
    /// When the replayed result was recorded.
    pub recorded_unix: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct ReportArtifact {
    pub path: String,
    pub sha256: String,
    pub size: u64,
}

/// Live output destinations and the status channel for `==> step` lines.
pub struct Terminal {
    pub stdout: Box<dyn Write + Send>,
    pub stderr: Box<dyn Write + Send>,
    /// Step announcements and notes; not recorded.
    pub status: Box<dyn Write + Send>,
}

impl std::fmt::Debug for Terminal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Terminal")
    }
}

/// A job whose inputs are read and checked, before any driver exists: usage errors (no
/// repository, no mkfile, a bad mkfile) come out here, with nothing started.
#[derive(Debug)]
pub struct PreparedJob {
    pub snapshot: Snapshot,
    /// The plan, when the mkfile could be read without running a command; otherwise it is
    /// planned in the base OS when the job runs.
    pub plan: HostPlan,
    options: JobOptions,
    inputs: Vec<(String, Option<String>)>,
    secrets: Vec<(String, String)>,
    /// Identifies this checkout for its saved cache, lock and warm state.
    repository_id: String,
    /// The repository's name across clones and machines ([`PreparedJob::repository`]).
    repository: String,
    shared: bool,
}

impl PreparedJob {
    pub fn prepare(options: JobOptions) -> Result<PreparedJob, JobError> {
        let snapshot = Snapshot::of_revision(&options.path, options.revision.as_deref())?;
        let secrets = options
            .secrets
            .iter()
            .map(|name| match std::env::var(name) {
                Ok(value) => Ok((name.clone(), value)),
                Err(_) => Err(JobError::MissingEnv {
                    name: name.clone(),
                    role: "a secret",
                }),
            })
            .collect::<Result<Vec<_>, _>>()?;
        let inputs: Vec<(String, Option<String>)> = options
            .inputs
            .iter()
            .map(|name| (name.clone(), std::env::var(name).ok()))
            .collect();
        let scratch = tempfile_dir()?;
        unpack(&snapshot.archive, scratch.path())?;
        let visible: Vec<(String, String)> = inputs
            .iter()
            .filter_map(|(n, v)| v.clone().map(|v| (n.clone(), v)))
            .chain(secrets.iter().cloned())
            .collect();
        let plan = JobPlan::read(scratch.path(), &visible, options.target())?;
        drop(scratch);
        let repository_id =
            hex::encode(Sha256::digest(snapshot.root.as_os_str().as_encoded_bytes()))[..16]
                .to_owned();
        let shared_name = match &options.repository {
            Some(name) if crate::source::valid_repository_name(name) => Some(name.clone()),
            Some(name) => return Err(JobError::BadRepositoryName { name: name.clone() }),
            None => snapshot
                .origin
                .as_deref()
                .and_then(crate::source::repository_identity),
        };
        let shared = shared_name.is_some();
        let repository = shared_name.unwrap_or_else(|| format!("local/{repository_id}"));
        Ok(PreparedJob {
            snapshot,
            plan,
            options,
            inputs,
            secrets,
            repository_id,
            repository,
            shared,
        })
    }

    /// The repository's name: given, or from its `origin` (`github.com/owner/name`), or
    /// `local/<digest of its path>` when it has neither ([`PreparedJob::has_shared_name`]).
    pub fn repository(&self) -> &str {
        &self.repository
    }

    /// Whether [`PreparedJob::repository`] names the repository beyond this checkout.
    pub fn has_shared_name(&self) -> bool {
        self.shared
    }

    /// Ties the job to `driver`: reads what its key depends on there (the driver's base
    /// environment, our `mk` when the job brings it) and computes the key. `mk` is our `mk`
    /// on this host, required by drivers whose base OS has none ([`MkSource`]).
    pub async fn bind<'a>(
        &'a self,
        driver: &'a dyn Driver,
        mk: Option<PathBuf>,
    ) -> Result<BoundJob<'a>, JobError> {
        let support = driver.job_support();
        let mk = match (support.mk, mk) {
            (MkSource::BaseOs, _) => None,
            (_, Some(path)) => {
                let content = std::fs::read(&path).map_err(|source| JobError::Io {
                    action: "read our `mk` at",
                    path: path.clone(),
                    source,
                })?;
                let digest = hex::encode(Sha256::digest(&content));
                Some(HostMk { path, digest })
            }
            (source, None) => {
                return Err(JobError::NoMk {
                    driver: driver.name(),
                    upload: source == MkSource::Upload,
                });
            }
        };
        let environment = driver
            .environment_digest()
            .await
            .map_err(|source| JobError::Driver {
                step: "identify the base environment".into(),
                source,
            })?;
        let key = KeyInputs {
            tree: self.snapshot.tree.clone(),
            mkfile: self.snapshot.mkfile.clone(),
            // An unset input hashes differently from an empty one.
            env: self
                .inputs
                .iter()
                .map(|(n, v)| {
                    (
                        n.clone(),
                        v.as_ref().map_or("\0unset".into(), |v| format!("={v}")),
                    )
                })
                .collect(),
            environment_digest: Some(environment.clone()),
            tools: mk.as_ref().map(|mk| mk.digest.clone()),
            driver: driver.name().to_owned(),
            salt: self.options.salt.clone(),
            target: self
                .options
                .target
                .clone()
                .filter(|target| target != "test"),
        }
        .key();
        Ok(BoundJob {
            job: self,
            driver,
            support,
            environment,
            mk,
            key,
        })
    }
}

/// Our `mk` on this host and its sha256 (an input of the key: it decides how the mkfile
/// reads).
#[derive(Debug, Clone)]
struct HostMk {
    path: PathBuf,
    digest: String,
}

/// A job tied to a driver, with its result key.
#[derive(Debug)]
pub struct BoundJob<'a> {
    job: &'a PreparedJob,
    driver: &'a dyn Driver,
    support: JobSupport,
    environment: String,
    mk: Option<HostMk>,
    key: String,
}

impl BoundJob<'_> {
    pub fn key(&self) -> &str {
        &self.key
    }

    /// Replays the recorded successful result of `key`, if the store holds an intact one.
    /// A damaged record is moved aside with a warning and `None` is returned, so the job runs.
    pub fn replay(
        &self,
        store: &ResultStore,
        terminal: &mut Terminal,
    ) -> Result<Option<JobReport>, JobError> {
        self.replay_fetched(store, terminal, None)
    }

    /// [`BoundJob::replay`] of a result fetched into `store` from `origin` (an orchestrator's
    /// URL), which the report and the announcement name.
    pub fn replay_fetched(
        &self,
        store: &ResultStore,
        terminal: &mut Terminal,
        origin: Option<&str>,
    ) -> Result<Option<JobReport>, JobError> {
        let key = self.key.as_str();
        if self.job.options.no_replay {
            return Ok(None);
        }
        let record = match store.get(key) {
            Ok(Some(record)) => record,
            Ok(None) => return Ok(None),
            Err(JobError::DamagedRecord { path, source }) => {
                let moved = store.quarantine(key)?;
                let _ = writeln!(
                    terminal.status,
                    "warning: result record `{}` is damaged ({source}); moved it to `{}` and running the job",
                    path.display(),
                    moved.display()
                );
                return Ok(None);
            }
            Err(error) => return Err(error),
        };
        if let Err(damage) = store.verify(&record) {
            let moved = store.quarantine(key)?;
            let _ = writeln!(
                terminal.status,
                "warning: {damage}: moved its record to `{}` and running the job",
                moved.display()
            );
            return Ok(None);
        }
        let when = humantime::format_rfc3339_seconds(
            std::time::UNIX_EPOCH + Duration::from_secs(record.created_unix),
        );
        let from = origin
            .map(|url| format!(" (from {url})"))
            .unwrap_or_default();
        let _ = writeln!(
            terminal.status,
            "==> replaying result {} recorded {when} on `{}` by the `{}` driver{from}",
            &key[..12],
            record.host,
            record.driver
        );
        let stdout = store.read_blob(&record.stdout.sha256)?;
        let stderr = store.read_blob(&record.stderr.sha256)?;
        let _ = terminal
            .stdout
            .write_all(&stdout)
            .and_then(|()| terminal.stdout.flush());
        let _ = terminal
            .stderr
            .write_all(&stderr)
            .and_then(|()| terminal.stderr.flush());
        if let Some(dir) = &self.job.options.artifacts_dir {
            restore_artifacts(store, &record.artifacts, dir)?;
        }
        let mut report = report(&record, true);
        report.replayed_from = Some(origin.unwrap_or("local").to_owned());
        Ok(Some(report))
    }

    /// Runs the job on `driver` and records the result under `key`.
    pub async fn run(
        &self,
        store: &ResultStore,
        terminal: Terminal,
    ) -> Result<JobReport, JobError> {
        let key = self.key.as_str();
        let driver = self.driver;
        let mut terminal = terminal;
        let _lock = lock_repository(store, &self.job.repository_id, &mut *terminal.status)?;
        let mut run = self.start(terminal);
        let state = driver.as_repository_state();
        if let Some(state) = state {
            state
                .use_state(&self.job.repository_id, self.job.options.fresh)
                .map_err(|source| JobError::Driver {
                    step: "attach the repository's warm state".into(),
                    source,
                })?;
        }
        let (exit_code, artifacts, image) = self.steps(&mut run, store).await?;
        if exit_code == 0
            && let Some(state) = state
            && let Err(error) = state.keep_state().await
        {
            // The result stands; only the next run's head start is lost.
            let _ = writeln!(
                run.status,
                "warning: the repository's warm state was not kept: {error}"
            );
        }
        // The driver's own default image has no name worth recording.
        let image = image.filter(|image| !image.is_empty());
        let stdout = store.put_blob(&run.stdout.recorded())?;
        let stderr = store.put_blob(&run.stderr.recorded())?;
        let record = ResultRecord {
            format: crate::key::FORMAT_VERSION,
            key: key.to_owned(),
            exit_code,
            created_unix: unix_now(),
            driver: driver.name().to_owned(),
            environment_digest: Some(self.environment.clone()),
            image,
            host: host_name(),
            ci_exec_version: env!("CARGO_PKG_VERSION").to_owned(),
            commit: self.job.snapshot.commit.clone(),
            tree: self.job.snapshot.tree.clone(),
            stdout,
            stderr,
            artifacts,
            steps: run.steps,
            repository: Some(self.job.repository.clone()),
            target: self
                .job
                .options
                .target
                .clone()
                .filter(|target| target != "test"),
            signature: None,
        };
        store.put_record(&record)?;
        if exit_code == 0
            && let Some(dir) = &self.job.options.artifacts_dir
        {
            restore_artifacts(store, &record.artifacts, dir)?;
        }
        Ok(report(&record, false))
    }

    fn start(&self, terminal: Terminal) -> Run<'_> {
        let secrets: Vec<Vec<u8>> = self
            .job
            .secrets
            .iter()
            .map(|(_, v)| v.clone().into_bytes())
            .collect();
        Run {
            driver: self.driver,
            private_run_dir: self.support.shares_host_run_dir,
            online: !self.job.options.offline,
            job: format!("job-{}-{}", &self.key[..12], std::process::id()),
            stdout: Stream::new(terminal.stdout, &secrets),
            stderr: Stream::new(terminal.stderr, &secrets),
            status: terminal.status,
            steps: Vec::new(),
            counter: 0,
        }
    }

    /// The repository's schedule: `/var/run/ci/crontab`, built by mk in the base OS (online,
    /// as `prepare-runtime`), and its content; `None` when the mkfile has no such target.
    pub async fn schedule(&self, terminal: Terminal) -> Result<Option<String>, JobError> {
        if let HostPlan::Known(plan) = &self.job.plan
            && !plan.crontab
        {
            return Ok(None);
        }
        let mut run = self.start(terminal);
        let env = self.base_env();
        let plan = self.enter(&mut run, &env).await?;
        if !plan.crontab {
            return Ok(None);
        }
        let code = run.mk_base(&[CRONTAB], &env).await?;
        if code != 0 {
            return Err(JobError::ScheduleFailed { code });
        }
        let archive = run
            .capture(
                "read schedule",
                "cd /var/run/ci && tar -c -f - crontab",
                &env,
            )
            .await?;
        Ok(read_archive("read schedule", &archive)?
            .into_iter()
            .find(|(name, _, _)| name.trim_start_matches("./") == "crontab")
            .map(|(_, content, _)| String::from_utf8_lossy(&content).into_owned()))
    }

    /// The first steps of every run: a private `/var/run/ci` where needed, the source
    /// unpacked, our mk uploaded where the base OS has none, and the plan.
    async fn enter(
        &self,
        run: &mut Run<'_>,
        env: &BTreeMap<String, String>,
    ) -> Result<JobPlan, JobError> {
        if run.private_run_dir {
            run.check_private_run_dir(env).await?;
        }
        // Every base-OS step starts in the source directory, so paths relative to it work on
        // every driver (the native driver places mounts under the task's own directory).
        // A base OS that has our mk shares it with the test container in the same step (one
        // guest command less: each costs ~0.15 s under TCG).
        let unpack = if self.support.mk == MkSource::BaseOs && self.support.test_in_container {
            UNPACK_AND_INSTALL_MK
        } else {
            UNPACK
        };
        run.base(
            "unpack source",
            &["sh", "-c", unpack],
            env,
            Some(self.job.snapshot.archive.clone()),
        )
        .await
        .and_then(|code| expect_success("unpack source", code))?;

        if self.support.mk == MkSource::Upload
            && let Some(mk) = &self.mk
        {
            let archive = single_file_archive("mk", &mk.path)?;
            let script = format!("mkdir -p {TOOLS_PATH} && tar -x -f - -C {TOOLS_PATH}");
            run.base("upload mk", &["sh", "-c", &script], env, Some(archive))
                .await
                .and_then(|code| expect_success("upload mk", code))?;
        }

        match &self.job.plan {
            HostPlan::Known(plan) => Ok(plan.clone()),
            HostPlan::NeedsCommands => self.plan_in_base_os(run, env).await,
        }
    }

    /// The steps of seed `002_…`; returns (exit code, artifacts, test image).
    async fn steps(
        &self,
        run: &mut Run<'_>,
        store: &ResultStore,
    ) -> Result<(i32, Vec<Artifact>, Option<String>), JobError> {
        let env = self.base_env();
        let plan = self.enter(run, &env).await?;

        if !self.job.options.fresh
            && let Some(cache) = store.get_cache(&self.job.repository_id)
        {
            let script = format!("mkdir -p {CACHE_DIR} && tar -x -f - -C {CACHE_DIR}");
            run.base("restore cache", &["sh", "-c", &script], &env, Some(cache))
                .await
                .and_then(|code| expect_success("restore cache", code))?;
        }

        if plan.prepare_runtime {
            let code = run.mk_base(&["prepare-runtime"], &env).await?;
            if code != 0 {
                return Ok((code, Vec::new(), None));
            }
        }

        let mut test_env = BTreeMap::new();
        if !plan.env_targets.is_empty() {
            let targets: Vec<&str> = plan.env_targets.iter().map(String::as_str).collect();
            let code = run.mk_base(&targets, &env).await?;
            if code != 0 {
                return Ok((code, Vec::new(), None));
            }
            let archive = run
                .capture("read env", &format!("cd {ENV_DIR} && tar -c -f - ."), &env)
                .await?;
            for (name, content, _) in read_archive("read env", &archive)? {
                if !name.contains('/') {
                    test_env.insert(name, String::from_utf8_lossy(&content).trim().to_owned());
                }
            }
        }
        let image = test_env
            .get("CONTAINERIMAGE")
            .filter(|image| !image.is_empty())
            .cloned()
            .unwrap_or_else(|| self.support.default_test_image.clone());

        let in_container = self.support.test_in_container;
        // Hermetic where it counts: `mk test` is offline unless the mkfile declares
        // `TEST_NETWORK=on` (an input of the key, being in the mkfile).
        let test_online = plan.test_network && !self.job.options.offline;
        if !in_container && test_env.contains_key("CONTAINERIMAGE") {
            let _ = writeln!(
                run.status,
                "warning: the `{}` driver runs `mk test` in its base OS; `CONTAINERIMAGE={image}` is not used",
                run.driver.name()
            );
        }
        let test_env_sets_path = test_env.contains_key("PATH");
        let mut task_env = env.clone();
        task_env.extend(test_env);
        let code = if in_container {
            if self.support.mk == MkSource::Host {
                // The base OS has our mk: share it with the test container (`BaseOs`: done
                // with the unpacking).
                run.base("install mk", &["sh", "-c", INSTALL_MK], &env, None)
                    .await
                    .and_then(|code| expect_success("install mk", code))?;
            }
            // The test image's own environment (its `PATH` above all: `cargo` in a rust image,
            // `node` in a node image) stays; our tools directory goes in front of its `PATH`.
            if !test_env_sets_path {
                task_env.remove("PATH");
            }
            // `mk "$@"` with our tools directory in front of the image's own `PATH` (the
            // default one when the image sets none), so the image's tools stay reachable.
            let script = format!(
                "PATH=\"{TOOLS_PATH}:${{PATH:-{DEFAULT_PATH}}}\"; export PATH; exec mk \"$@\""
            );
            let target = self.job.options.target();
            let task = Task::new(run.next_id(target), ["sh", "-c", &script, "sh", target])
                .image(&image)
                .mount("src", SOURCE_PATH)
                .mount("tools", TOOLS_PATH)
                .workdir(SOURCE_PATH)
                .network(test_online);
            run.step(&format!("mk {target}"), task, &task_env).await?
        } else {
            run.mk_base_with_network(&[self.job.options.target()], &task_env, test_online)
                .await?
        };
        if code != 0 {
            return Ok((code, Vec::new(), Some(image)));
        }

        let mut artifacts = Vec::new();
        // Artifacts and the cache are what `mk test` leaves; a scheduled target (`nightly`)
        // is run and recorded for its output and status alone.
        let tests = self.job.options.target() == "test";
        if tests && !plan.artifact_targets.is_empty() {
            let targets: Vec<&str> = plan.artifact_targets.iter().map(String::as_str).collect();
            let code = run.mk_base(&targets, &env).await?;
            if code != 0 {
                return Ok((code, Vec::new(), Some(image)));
            }
            let archive = run
                .capture(
                    "collect artifacts",
                    &format!("mkdir -p {ARTIFACTS_DIR} && cd {ARTIFACTS_DIR} && tar -c -f - ."),
                    &env,
                )
                .await?;
            for (path, content, mode) in read_archive("collect artifacts", &archive)? {
                let blob = store.put_blob(&content)?;
                artifacts.push(Artifact {
                    path,
                    sha256: blob.sha256,
                    size: blob.size,
                    mode,
                });
            }
        }

        if tests && !plan.cache_targets.is_empty() {
            let targets: Vec<&str> = plan.cache_targets.iter().map(String::as_str).collect();
            let code = run.mk_base(&targets, &env).await?;
            if code == 0 {
                let archive = run
                    .capture(
                        "save cache",
                        &format!("mkdir -p {CACHE_DIR} && cd {CACHE_DIR} && tar -c -f - ."),
                        &env,
                    )
                    .await?;
                store.put_cache(&self.job.repository_id, &archive)?;
            } else {
                let _ = writeln!(
                    run.status,
                    "warning: cache targets failed; the cache was not saved"
                );
            }
        }

        if plan.post_test {
            let code = run.mk_base(&["post-test"], &env).await?;
            if code != 0 {
                return Ok((code, artifacts, Some(image)));
            }
        }
        Ok((0, artifacts, Some(image)))
    }

    /// The environment of base-OS steps: `PATH`, the declared inputs and the secrets —
    /// nothing else from this host.
    fn base_env(&self) -> BTreeMap<String, String> {
        let mut env = BTreeMap::new();
        let host_tools = self
            .mk
            .as_ref()
            .and_then(|mk| mk.path.parent())
            .map(|dir| dir.display().to_string());
        let path = match (self.support.mk, host_tools) {
            (MkSource::Host, Some(tools)) => format!("{tools}:{DEFAULT_PATH}"),
            (MkSource::Upload, _) => format!("{TOOLS_PATH}:{DEFAULT_PATH}"),
            _ => DEFAULT_PATH.to_owned(),
        };
        env.insert("PATH".to_owned(), path);
        for (name, value) in &self.job.inputs {
            if let Some(value) = value {
                env.insert(name.clone(), value.clone());
            }
        }
        env.extend(self.job.secrets.iter().cloned());
        env
    }

    /// Plans an mkfile that runs commands while it is read: our `mk --outline` reads it in
    /// the base OS, where its commands may run, and prints what it defines.
    async fn plan_in_base_os(
        &self,
        run: &mut Run<'_>,
        env: &BTreeMap<String, String>,
    ) -> Result<JobPlan, JobError> {
        let variables = PLAN_VARIABLES.join(",");
        let online = run.online;
        let mut task = run
            .base_task("plan", &["mk", "--outline", &variables], None)
            .network(online);
        task.env = env.clone();
        let mut listing = Vec::new();
        let code = run.execute("plan", task, Some(&mut listing)).await?;
        if code != 0 {
            return Err(JobError::OutlineFailed { code });
        }
        let outline = mkrunner::Outline::parse(&String::from_utf8_lossy(&listing))
            .map_err(|reason| JobError::OutlineUnreadable { reason })?;
        JobPlan::from_outline(&outline, Path::new(SOURCE_PATH), self.job.options.target())
    }
}

/// One job's run on a driver: step bookkeeping and the output streams.
struct Run<'a> {
    driver: &'a dyn Driver,
    /// Host processes share this machine's `/var/run/ci`: give each step a private one.
    private_run_dir: bool,
    /// Base-OS mk steps get the network (`--offline` takes it away).
    online: bool,
    job: String,
    stdout: Stream,
    stderr: Stream,
    status: Box<dyn Write + Send>,
    steps: Vec<StepTiming>,
    counter: usize,
}

impl Run<'_> {
    fn next_id(&mut self, step: &str) -> String {
        self.counter += 1;
        let step: String = step
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .collect();
        format!("{}-{}-{step}", self.job, self.counter)
    }

    fn base_task(&mut self, name: &str, command: &[&str], stdin: Option<Vec<u8>>) -> Task {
        let command: Vec<String> = if self.private_run_dir {
            private_run_dir_command(command)
        } else {
            command.iter().map(|&part| part.to_owned()).collect()
        };
        let mut task = Task::new(self.next_id(name), command)
            .mount("src", SOURCE_PATH)
            .mount("ci", RUN_CI)
            .mount("tools", TOOLS_PATH)
            .workdir(SOURCE_PATH);
        if let Some(bytes) = stdin {
            task = task.stdin(Stdin::bytes(bytes));
        }
        task
    }

    /// Fails with a clear error when this host cannot give the job a private `/var/run/ci`.
    async fn check_private_run_dir(
        &mut self,
        env: &BTreeMap<String, String>,
    ) -> Result<(), JobError> {
        let mut task = self.base_task("private run dir", &["true"], None);
        task.env = env.clone();
        let mut errors = Vec::new();
        let container =
            self.driver
                .run_container(task)
                .await
                .map_err(|source| JobError::Driver {
                    step: "private run dir".into(),
                    source,
                })?;
        let mut sink = Vec::new();
        let code = async {
            wait_for_exit(container.as_ref(), Duration::from_millis(50), None).await?;
            container.logs(&mut sink, &mut errors).await?;
            wait_for_exit(container.as_ref(), Duration::from_millis(50), None).await
        }
        .await
        .map_err(|source| JobError::Driver {
            step: "private run dir".into(),
            source,
        })?;
        let _ = container.cleanup().await;
        if code != 0 {
            return Err(JobError::PrivateRunDir {
                reason: String::from_utf8_lossy(&errors).trim().replace('\n', "; "),
            });
        }
        Ok(())
    }

    /// `mk TARGETS…` in the base OS, announced and recorded.
    /// `mk TARGETS…` in the base OS, announced and recorded; online unless the job is
    /// offline (the base OS is where a repository gets its dependencies).
    async fn mk_base(
        &mut self,
        targets: &[&str],
        env: &BTreeMap<String, String>,
    ) -> Result<i32, JobError> {
        self.mk_base_with_network(targets, env, self.online).await
    }

    async fn mk_base_with_network(
        &mut self,
        targets: &[&str],
        env: &BTreeMap<String, String>,
        online: bool,
    ) -> Result<i32, JobError> {
        let name = format!("mk {}", targets.join(" "));
        let command: Vec<&str> = std::iter::once("mk")
            .chain(targets.iter().copied())
            .collect();
        let task = self.base_task(&name, &command, None).network(online);
        self.step(&name, task, env).await
    }

    /// A base-OS helper step (its output is recorded like any other; it is quiet on success).
    async fn base(
        &mut self,
        name: &str,
        command: &[&str],
        env: &BTreeMap<String, String>,
        stdin: Option<Vec<u8>>,
    ) -> Result<i32, JobError> {
        let mut task = self.base_task(name, command, stdin);
        task.env = env.clone();
        self.execute(name, task, None).await
    }

    /// A base-OS step whose stdout is data (a tar stream), returned instead of shown.
    async fn capture(
        &mut self,
        name: &str,
        script: &str,
        env: &BTreeMap<String, String>,
    ) -> Result<Vec<u8>, JobError> {
        let mut task = self.base_task(name, &["sh", "-c", script], None);
        task.env = env.clone();
        let mut data = Vec::new();
        let code = self.execute(name, task, Some(&mut data)).await?;
        expect_success(name, code)?;
        Ok(data)
    }

    /// A user-visible step: announced with `==> name`, output live and recorded.
    async fn step(
        &mut self,
        name: &str,
        mut task: Task,
        env: &BTreeMap<String, String>,
    ) -> Result<i32, JobError> {
        let _ = writeln!(self.status, "==> {name}");
        task.env = env.clone();
        self.execute(name, task, None).await
    }

    async fn execute(
        &mut self,
        name: &str,
        task: Task,
        capture: Option<&mut Vec<u8>>,
    ) -> Result<i32, JobError> {
        let started = Instant::now();
        let driver_error = |source: DriverError| JobError::Driver {
            step: name.to_owned(),
            source,
        };
        let container = self
            .driver
            .run_container(task)
            .await
            .map_err(driver_error)?;
        let result = async {
            let stdout: LogSink<'_> = match capture {
                Some(buffer) => buffer,
                None => &mut self.stdout,
            };
            match container.as_follow() {
                Some(follow) => follow.follow(stdout, &mut self.stderr).await?,
                None => {
                    wait_for_exit(container.as_ref(), Duration::from_millis(200), None).await?;
                    container.logs(stdout, &mut self.stderr).await?;
                }
            }
            wait_for_exit(container.as_ref(), Duration::from_millis(100), None).await
        }
        .await;
        self.stdout.finish_step();
        self.stderr.finish_step();
        let cleanup = container.cleanup().await;
        let code = result.map_err(driver_error)?;
        cleanup.map_err(driver_error)?;
        self.steps.push(StepTiming {
            name: name.to_owned(),
            exit_code: code,
            ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
        });
        Ok(code)
    }
}

/// Wraps a base-OS command for the native driver: a new mount namespace in which the job's
/// `ci` volume is bound over `/var/run/ci`, so mkfiles can use the well-known paths without
/// touching the host's. The native driver keeps a namespace's volumes as sibling directories
/// and the step's working directory resolves to the `src` volume, so `ci` is `../ci`.
/// Not root: a user namespace maps us to root inside (where the kernel allows it).
fn private_run_dir_command(command: &[&str]) -> Vec<String> {
    const SCRIPT: &str = "mkdir -p /var/run/ci && mount --bind ../ci /var/run/ci && exec \"$@\"";
    let mut wrapped: Vec<String> = ["unshare", "--mount", "--propagation", "private"]
        .into_iter()
        .map(str::to_owned)
        .collect();
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        wrapped.push("--map-root-user".to_owned());
    }
    wrapped.extend(["--", "sh", "-c", SCRIPT, "ci-exec"].map(str::to_owned));
    wrapped.extend(command.iter().map(|&part| part.to_owned()));
    wrapped
}

fn expect_success(step: &str, code: i32) -> Result<i32, JobError> {
    if code == 0 {
        Ok(code)
    } else {
        Err(JobError::Driver {
            step: step.to_owned(),
            source: DriverError::InvalidTask {
                task: step.to_owned(),
                reason: format!("ci-exec's own helper command exited with status {code}"),
            },
        })
    }
}

/// A tar stream holding `path` as executable `name`.
fn single_file_archive(name: &str, path: &Path) -> Result<Vec<u8>, JobError> {
    let content = std::fs::read(path).map_err(|source| JobError::Io {
        action: "read",
        path: path.to_owned(),
        source,
    })?;
    let mut header = tar::Header::new_gnu();
    header.set_size(content.len() as u64);
    header.set_mode(0o755);
    header.set_entry_type(tar::EntryType::Regular);
    let mut builder = tar::Builder::new(Vec::new());
    builder
        .append_data(&mut header, name, content.as_slice())
        .and_then(|()| builder.into_inner())
        .map_err(|source| JobError::Archive {
            path: path.to_owned(),
            source,
        })
}

/// (path, content, mode) of every regular file in a tar stream.
fn read_archive(step: &str, archive: &[u8]) -> Result<Vec<(String, Vec<u8>, u32)>, JobError> {
    let error = |source| JobError::StepArchive {
        step: step.to_owned(),
        source,
    };
    let mut files = Vec::new();
    let mut reader = tar::Archive::new(archive);
    for entry in reader.entries().map_err(error)? {
        let mut entry = entry.map_err(error)?;
        if entry.header().entry_type() != tar::EntryType::Regular {
            continue;
        }
        let path = entry
            .path()
            .map_err(error)?
            .to_string_lossy()
            .trim_start_matches("./")
            .to_owned();
        let mode = entry.header().mode().unwrap_or(0o644);
        let mut content = Vec::new();
        entry.read_to_end(&mut content).map_err(error)?;
        files.push((path, content, mode));
    }
    Ok(files)
}

fn restore_artifacts(
    store: &ResultStore,
    artifacts: &[Artifact],
    dir: &Path,
) -> Result<(), JobError> {
    for artifact in artifacts {
        // Paths come from our own tar listing of the artifacts directory; still, never write
        // outside `dir`.
        if artifact.path.split('/').any(|part| part == "..") || artifact.path.starts_with('/') {
            continue;
        }
        let target = dir.join(&artifact.path);
        let io = |action, source| JobError::Io {
            action,
            path: target.clone(),
            source,
        };
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent).map_err(|e| io("create the artifacts directory", e))?;
        }
        let content = store.read_blob(&artifact.sha256)?;
        std::fs::write(&target, content).map_err(|e| io("write artifact", e))?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(
            &target,
            std::fs::Permissions::from_mode(artifact.mode & 0o7777),
        )
        .map_err(|e| io("set the mode of artifact", e))?;
    }
    Ok(())
}

fn report(record: &ResultRecord, replayed: bool) -> JobReport {
    JobReport {
        key: record.key.clone(),
        replayed,
        replayed_from: None,
        exit_code: record.exit_code,
        driver: record.driver.clone(),
        environment: record.environment_digest.clone(),
        image: record.image.clone(),
        artifacts: record
            .artifacts
            .iter()
            .map(|a| ReportArtifact {
                path: a.path.clone(),
                sha256: a.sha256.clone(),
                size: a.size,
            })
            .collect(),
        steps: record.steps.clone(),
        recorded_unix: record.created_unix,
    }
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|name| name.trim().to_owned())
        .ok()
        .filter(|name| !name.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "unknown".to_owned())
}

fn tempfile_dir() -> Result<tempfile::TempDir, JobError> {
    tempfile::Builder::new()
        .prefix("ci-exec-plan-")
        .tempdir()
        .map_err(|source| JobError::Io {
            action: "create a scratch directory in",
            path: std::env::temp_dir(),
            source,
        })
}

fn unpack(archive: &[u8], dir: &Path) -> Result<(), JobError> {
    tar::Archive::new(archive)
        .unpack(dir)
        .map_err(|source| JobError::Io {
            action: "unpack the committed tree into",
            path: dir.to_owned(),
            source,
        })
}

/// Holds the repository's lock until dropped: two `ci-exec test` in one repository run one
/// after the other, and the second says why it waits.
fn lock_repository(
    store: &ResultStore,
    repository: &str,
    status: &mut dyn Write,
) -> Result<std::fs::File, JobError> {
    let path = store
        .root()
        .join("locks")
        .join(format!("{repository}.lock"));
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|source| JobError::Io {
            action: "open the repository lock",
            path: path.clone(),
            source,
        })?;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let _ = writeln!(
                status,
                "==> waiting for another `ci-exec test` in this repository to finish"
            );
            file.lock().map_err(|source| JobError::Io {
                action: "lock",
                path: path.clone(),
                source,
            })?;
        }
        Err(std::fs::TryLockError::Error(source)) => {
            return Err(JobError::Io {
                action: "lock",
                path,
                source,
            });
        }
    }
    Ok(file)
}

#[cfg(test)]
mod tests;
