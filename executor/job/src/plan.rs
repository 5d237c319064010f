//! What a job will do, read from its mkfile without running any of it on this host.
//!
//! The mkfile comes from the repository under test: its backquotes and `<|` includes are
//! commands, and on every driver they run where the job runs (the guest, a container), never
//! on the host that plans. [`JobPlan::read`] parses with a runner that refuses every command;
//! an mkfile that needs one is planned later, in the base OS, by our `mk --outline`
//! ([`JobPlan::from_outline`]).

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use mkrunner::{Mkfile, Outline, ParseOptions, Runner, RunnerError, Source};

use crate::JobError;

pub const ENV_DIR: &str = "/var/run/ci/env/";
pub const ARTIFACTS_DIR: &str = "/var/run/ci/artifacts/";
pub const CACHE_DIR: &str = "/var/run/ci/cache/";
/// The repository's schedule: five-field cron lines naming mk targets.
pub const CRONTAB: &str = "/var/run/ci/crontab";
/// The variables a plan reads besides the targets.
pub const PLAN_VARIABLES: &[&str] = &["ARTIFACTS", TEST_NETWORK];
/// `TEST_NETWORK=on` in the mkfile gives `mk test` the network (it is offline otherwise).
pub const TEST_NETWORK: &str = "TEST_NETWORK";

/// The well-known targets of a job's mkfile (seed `002_…`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JobPlan {
    pub prepare_runtime: bool,
    pub post_test: bool,
    /// `/var/run/ci/env/NAME` targets: each file's content becomes variable `NAME` of the test.
    pub env_targets: Vec<String>,
    /// Explicit `/var/run/ci/artifacts/…` targets, then those `ARTIFACTS` lists.
    pub artifact_targets: Vec<String>,
    /// Explicit `/var/run/ci/cache/…` targets, saved after a successful run.
    pub cache_targets: Vec<String>,
    /// `mk test` may reach the network (`TEST_NETWORK=on`).
    pub test_network: bool,
    /// The mkfile defines `/var/run/ci/crontab`, the repository's schedule.
    pub crontab: bool,
}

/// What reading the mkfile on this host gave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostPlan {
    /// The mkfile needed no command: this is its plan.
    Known(JobPlan),
    /// The mkfile runs commands while it is read (a backquote, a `<|` include): it is planned
    /// in the job's base OS instead.
    NeedsCommands,
}

impl JobPlan {
    /// Reads the mkfile in `directory` (an extracted copy of the committed tree) with only
    /// `environment` visible, running none of its commands. Syntax errors and a missing
    /// `test` target are found here, before anything starts, when no command is needed to
    /// see them.
    pub fn read(
        directory: &Path,
        environment: &[(String, String)],
        target: &str,
    ) -> Result<HostPlan, JobError> {
        let options = ParseOptions {
            sources: vec![Source::File("mkfile".into())],
            directory: directory.to_owned(),
            environment: environment.to_vec(),
            assignments: Vec::new(),
            mkflags: String::new(),
            mkargs: String::new(),
        };
        let runner = RefusingRunner::default();
        let parsed = Mkfile::parse(&options, &runner);
        if runner.refused.load(Ordering::Relaxed) {
            return Ok(HostPlan::NeedsCommands);
        }
        let mkfile = parsed.map_err(|error| JobError::BadMkfile {
            diagnostic: crate::error::MkDiagnostic(error.render()),
        })?;
        let outline = Outline::of(&mkfile, PLAN_VARIABLES);
        JobPlan::from_outline(&outline, directory, target).map(HostPlan::Known)
    }

    /// The plan of an mkfile whose outline our `mk --outline` printed where the job runs.
    /// `target` is what runs in the test container: `test`, or a scheduled target.
    pub fn from_outline(
        outline: &Outline,
        directory: &Path,
        target: &str,
    ) -> Result<JobPlan, JobError> {
        let has = |name: &str| outline.targets.iter().any(|defined| defined == name);
        if !has(target) {
            return Err(JobError::NoTestTarget {
                path: directory.join("mkfile"),
                target: target.to_owned(),
            });
        }
        let under = |prefix: &str| -> Vec<String> {
            outline
                .targets
                .iter()
                .filter(|target| target.starts_with(prefix) && target.len() > prefix.len())
                .cloned()
                .collect()
        };
        let mut artifact_targets = under(ARTIFACTS_DIR);
        for listed in outline.variables.get("ARTIFACTS").into_iter().flatten() {
            if !listed.is_empty() && !artifact_targets.contains(listed) {
                artifact_targets.push(listed.clone());
            }
        }
        let test_network = match outline
            .variables
            .get(TEST_NETWORK)
            .map(|words| words.join(" "))
            .as_deref()
        {
            None | Some("" | "off" | "no" | "false" | "0") => false,
            Some("on" | "yes" | "true" | "1") => true,
            Some(other) => {
                return Err(JobError::BadDeclaration {
                    name: TEST_NETWORK,
                    value: other.to_owned(),
                    expected: "`on` or `off`",
                });
            }
        };
        Ok(JobPlan {
            test_network,
            prepare_runtime: has("prepare-runtime"),
            post_test: has("post-test"),
            env_targets: under(ENV_DIR),
            artifact_targets,
            cache_targets: under(CACHE_DIR),
            crontab: has(CRONTAB),
        })
    }
}

/// Runs nothing: notes that the mkfile asked, and fails the command.
#[derive(Debug, Default)]
struct RefusingRunner {
    refused: AtomicBool,
}

impl Runner for RefusingRunner {
    fn run(&self, command: &mkrunner::Command) -> Result<mkrunner::Outcome, RunnerError> {
        self.refused.store(true, Ordering::Relaxed);
        Err(RunnerError::Remote {
            runner: "ci-exec's host planner".to_owned(),
            source: format!(
                "`{}` is not run on this host; the mkfile is planned where the job runs",
                command.argv.join(" ")
            )
            .into(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(text: &str) -> Result<HostPlan, JobError> {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("mkfile"), text).expect("write");
        JobPlan::read(dir.path(), &[], "test")
    }

    fn plan(text: &str) -> Result<JobPlan, JobError> {
        match read(text)? {
            HostPlan::Known(plan) => Ok(plan),
            HostPlan::NeedsCommands => panic!("this mkfile needs no command"),
        }
    }

    #[test]
    fn backquotes_and_command_includes_do_not_run_on_the_host() {
        let dir = tempfile::tempdir().expect("tempdir");
        let marker = dir.path().join("marker");
        for text in [
            format!("X=`{{touch {}}}\ntest:V:\n\techo $X\n", marker.display()),
            format!("<|touch {}\ntest:V:\n\ttrue\n", marker.display()),
            format!("test:V: `{{touch {}}}\n\ttrue\n", marker.display()),
        ] {
            assert_eq!(
                read(&text).expect("read"),
                HostPlan::NeedsCommands,
                "{text}"
            );
            assert!(!marker.exists(), "{text} ran on the host");
        }
    }

    #[test]
    fn outlines_printed_elsewhere_give_the_same_plan() {
        let text = "ARTIFACTS=/var/run/ci/artifacts/a\ntest:V:\n\ttrue\n/var/run/ci/env/X:\n\techo > $target\n";
        let on_host = plan(text).expect("plan");
        let mkfile = Mkfile::parse_str("mkfile", text, &[]).expect("parse");
        let outline =
            Outline::parse(&Outline::of(&mkfile, PLAN_VARIABLES).render()).expect("outline");
        assert_eq!(
            JobPlan::from_outline(&outline, Path::new("."), "test").expect("plan"),
            on_host
        );
        let no_test = Outline::parse("mk-outline 1\ntarget\tbuild\n").expect("outline");
        assert!(matches!(
            JobPlan::from_outline(&no_test, Path::new("."), "test"),
            Err(JobError::NoTestTarget { .. })
        ));
    }

    #[test]
    fn reads_the_well_known_targets() {
        let plan = plan(
            "ARTIFACTS=/var/run/ci/artifacts/report.txt\n\
             test:V:\n\tmk build\n\
             prepare-runtime:V: base-image\n\ttrue\n\
             base-image:V:\n\ttrue\n\
             /var/run/ci/env/CONTAINERIMAGE: base-image\n\techo img > $target\n\
             /var/run/ci/artifacts/bin: test\n\tcp bin $target\n\
             /var/run/ci/artifacts/%.txt:\n\tcp $stem.txt $target\n\
             /var/run/ci/cache/deps:\n\tmkdir -p $target\n\
             post-test:V:\n\techo done\n",
        )
        .expect("plan");
        assert!(plan.prepare_runtime && plan.post_test);
        assert_eq!(plan.env_targets, ["/var/run/ci/env/CONTAINERIMAGE"]);
        assert_eq!(
            plan.artifact_targets,
            [
                "/var/run/ci/artifacts/bin",
                "/var/run/ci/artifacts/report.txt"
            ]
        );
        assert_eq!(plan.cache_targets, ["/var/run/ci/cache/deps"]);
    }

    #[test]
    fn bad_mkfiles_are_usage_errors() {
        let error = plan("build:V:\n\techo\n").expect_err("no test");
        assert!(matches!(error, JobError::NoTestTarget { .. }), "{error}");
        let error = plan("test:V:\n\techo hi\nfoo bar\n").expect_err("syntax");
        let JobError::BadMkfile { diagnostic } = &error else {
            panic!("{error}");
        };
        assert!(diagnostic.to_string().contains("mk: error"), "{error}");
        assert!(error.is_usage());
    }
}
