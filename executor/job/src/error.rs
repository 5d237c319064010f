use std::path::PathBuf;

use ci_exec_driver::DriverError;

/// Everything that can stop a job before or while it runs. Each variant knows which exit code
/// the CLI reports for it (see [`JobError::is_usage`]).
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error("`{path}` is not inside a git repository")]
    NotARepository {
        path: PathBuf,
        #[source]
        source: git2::Error,
    },

    #[error("repository `{path}` has no commits yet")]
    NoCommits { path: PathBuf },

    #[error("revision `{revision}` names no commit of repository `{path}`")]
    UnknownRevision {
        revision: String,
        path: PathBuf,
        #[source]
        source: git2::Error,
    },

    #[error("failed to read the committed tree of `{path}`")]
    ReadTree {
        path: PathBuf,
        #[source]
        source: git2::Error,
    },

    #[error("no `mkfile` is committed at the root of `{path}`")]
    NoMkfile { path: PathBuf },

    #[error("cannot read the mkfile")]
    BadMkfile {
        #[source]
        diagnostic: MkDiagnostic,
    },

    #[error("the mkfile of `{path}` has no `{target}` target")]
    NoTestTarget { path: PathBuf, target: String },

    #[error("the mkfile sets `{name}={value}`; expected {expected}")]
    BadDeclaration {
        name: &'static str,
        value: String,
        expected: &'static str,
    },

    #[error("environment variable `{name}` is declared as {role} but is not set")]
    MissingEnv { name: String, role: &'static str },

    #[error("failed to {action} `{path}`")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("result record `{path}` is damaged")]
    DamagedRecord {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },

    #[error("failed to build the source archive of `{path}`")]
    Archive {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("the `{step}` step could not run")]
    Driver {
        step: String,
        #[source]
        source: DriverError,
    },

    #[error("the `{step}` step produced an unreadable archive")]
    StepArchive {
        step: String,
        #[source]
        source: std::io::Error,
    },

    #[error("cannot give the job a private `/var/run/ci` on this host: {reason}")]
    PrivateRunDir { reason: String },

    #[error("no result with key `{key}` in the store")]
    UnknownResult { key: String },

    #[error("the `{driver}` driver needs our {} `mk` on this host", if *upload { "static" } else { "own" })]
    NoMk { driver: &'static str, upload: bool },

    #[error("`mk --outline` could not read the mkfile where the job runs (exit status {code})")]
    OutlineFailed { code: i32 },

    #[error("`mk --outline` printed an unreadable outline: {reason}")]
    OutlineUnreadable { reason: String },

    #[error("building the schedule `/var/run/ci/crontab` failed (exit status {code})")]
    ScheduleFailed { code: i32 },

    #[error("`{name}` is not a repository name")]
    BadRepositoryName { name: String },
}

impl JobError {
    /// A usage or configuration problem the user fixes in their repository or command line
    /// (exit status 2), as opposed to an infrastructure failure (125).
    pub fn is_usage(&self) -> bool {
        matches!(
            self,
            JobError::NotARepository { .. }
                | JobError::NoCommits { .. }
                | JobError::UnknownRevision { .. }
                | JobError::NoMkfile { .. }
                | JobError::BadMkfile { .. }
                | JobError::NoTestTarget { .. }
                | JobError::BadDeclaration { .. }
                | JobError::MissingEnv { .. }
                | JobError::UnknownResult { .. }
                | JobError::NoMk { .. }
                | JobError::OutlineFailed { .. }
                | JobError::BadRepositoryName { .. }
        )
    }

    /// How to fix it, when there is something to say.
    pub fn hint(&self) -> Option<String> {
        match self {
            JobError::NotARepository { .. } => {
                Some("run `ci-exec test` inside a git repository, or pass its path".into())
            }
            JobError::NoCommits { .. } => Some(
                "ci-exec runs the committed tree, never the work tree: commit your mkfile first"
                    .into(),
            ),
            JobError::UnknownRevision { .. } => Some(
                "give a branch, tag or commit sha that `git rev-parse REV^{commit}` accepts".into(),
            ),
            JobError::NoMkfile { .. } => Some(
                "add an `mkfile` with a `test:V:` rule and commit it (uncommitted files are ignored)"
                    .into(),
            ),
            JobError::NoTestTarget { target, .. } => Some(format!(
                "add a rule such as `{target}:V:` followed by a tab-indented recipe"
            )),
            JobError::MissingEnv { name, .. } => Some(format!("export `{name}` before running")),
            JobError::UnknownResult { .. } => Some("list keys with `ci-exec results list`".into()),
            JobError::NoMk { upload: true, .. } => Some(
                "build it with `cargo build --release --target x86_64-unknown-linux-musl -p mkrunner` (a dynamically linked `mk` does not start in every image)"
                    .into(),
            ),
            JobError::NoMk { upload: false, .. } => Some(
                "build it with `cargo build --release -p mkrunner` (it is found beside `ci-exec`)".into(),
            ),
            JobError::OutlineFailed { .. } | JobError::OutlineUnreadable { .. } => Some(
                "mk's message is above; a base OS whose `mk` predates `--outline` needs a newer one (`ci-exec image build` for the qemu guest image)"
                    .into(),
            ),
            JobError::PrivateRunDir { .. } => Some(
                "run as root, or allow unprivileged user namespaces (`sysctl kernel.unprivileged_userns_clone=1`), or use `--driver=qemu`"
                    .into(),
            ),
            JobError::BadRepositoryName { .. } => Some(
                "name it as `host/owner/name`: `/`-separated segments of letters, digits, `.`, `_` and `-`"
                    .into(),
            ),
            _ => None,
        }
    }
}

/// mk's own diagnostic (`mk: error: …`, the source line and a caret), shown as it renders it.
#[derive(Debug)]
pub struct MkDiagnostic(pub String);

impl std::fmt::Display for MkDiagnostic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0.trim_end())
    }
}

impl std::error::Error for MkDiagnostic {}
