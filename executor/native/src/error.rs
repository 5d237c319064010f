use std::path::PathBuf;

use ci_exec_driver::DriverError;

/// Failures of the native driver's own file system work, turned into [`DriverError::Backend`]
/// at the contract seam so the caller sees the path and what was being done.
#[derive(Debug, thiserror::Error)]
pub enum NativeError {
    #[error("no state directory: set `HOME`, `XDG_STATE_HOME` or the `state_dir` parameter")]
    NoStateDir,

    #[error("another process is removing this namespace (`ci-exec driver close`); run again")]
    NamespaceRemoved,

    #[error("cannot create directory `{path}`")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("cannot remove `{path}`")]
    Remove {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("cannot read `{path}`")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("cannot write `{path}`")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("cannot start `{program}`")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },

    #[error("cannot link volume `{volume}` at `{path}`")]
    Link {
        volume: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("cannot wait for task `{task}`")]
    Wait {
        task: String,
        #[source]
        source: std::io::Error,
    },

    #[error("task `{task}` was started by another process that ended before the task did")]
    Orphaned { task: String },

    #[error("cannot write task output")]
    Sink {
        #[source]
        source: std::io::Error,
    },
}

impl NativeError {
    pub(crate) fn into_driver(self, action: impl Into<String>) -> DriverError {
        DriverError::backend(crate::NAME, action, self)
    }
}
