//! What a job will do, read from its mkfile without running it.

use std::path::Path;

use mkrunner::{HostRunner, Mkfile, ParseOptions, Source};

use crate::JobError;

pub const ENV_DIR: &str = "/var/run/ci/env/";
pub const ARTIFACTS_DIR: &str = "/var/run/ci/artifacts/";
pub const CACHE_DIR: &str = "/var/run/ci/cache/";

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
}

impl JobPlan {
    /// Reads the mkfile in `directory` (an extracted copy of the committed tree) with only
    /// `environment` visible, as the job's mk will see it.
    pub fn read(directory: &Path, environment: &[(String, String)]) -> Result<JobPlan, JobError> {
        let options = ParseOptions {
            sources: vec![Source::File("mkfile".into())],
            directory: directory.to_owned(),
            environment: environment.to_vec(),
            assignments: Vec::new(),
            mkflags: String::new(),
            mkargs: String::new(),
        };
        let mkfile = Mkfile::parse(&options, &HostRunner).map_err(|error| JobError::BadMkfile {
            diagnostic: error.render(),
        })?;
        if !mkfile.has_target("test") {
            return Err(JobError::NoTestTarget {
                path: directory.join("mkfile"),
            });
        }
        let under = |prefix: &str| -> Vec<String> {
            mkfile
                .targets()
                .into_iter()
                .filter(|target| target.starts_with(prefix) && target.len() > prefix.len())
                .map(str::to_owned)
                .collect()
        };
        let mut artifact_targets = under(ARTIFACTS_DIR);
        for listed in mkfile.variable("ARTIFACTS").unwrap_or_default() {
            if !listed.is_empty() && !artifact_targets.contains(&listed) {
                artifact_targets.push(listed);
            }
        }
        Ok(JobPlan {
            prepare_runtime: mkfile.has_target("prepare-runtime"),
            post_test: mkfile.has_target("post-test"),
            env_targets: under(ENV_DIR),
            artifact_targets,
            cache_targets: under(CACHE_DIR),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(text: &str) -> Result<JobPlan, JobError> {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("mkfile"), text).expect("write");
        JobPlan::read(dir.path(), &[])
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
        assert!(error.to_string().contains("mk: error"), "{error}");
        assert!(error.is_usage());
    }
}
