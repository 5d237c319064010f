use std::time::Duration;

/// What went wrong at the driver seam. Every variant names the thing it is about.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    /// The task itself is malformed (empty command, bad mount path, …).
    #[error("invalid task `{task}`: {reason}")]
    InvalidTask { task: String, reason: String },

    /// The command's program does not exist where the task runs.
    #[error("command `{program}` of task `{task}` not found")]
    ProgramNotFound { task: String, program: String },

    /// The program exists but cannot be executed (permissions, bad format).
    #[error("cannot run `{program}` of task `{task}`")]
    CannotInvoke {
        task: String,
        program: String,
        #[source]
        source: std::io::Error,
    },

    /// A volume name or a path inside a volume is not acceptable.
    #[error("invalid volume `{volume}`: {reason}")]
    InvalidVolume { volume: String, reason: String },

    /// A file asked for in a volume does not exist.
    #[error("`{path}` not found in volume `{volume}`")]
    FileNotFound { volume: String, path: String },

    /// The container image does not exist and cannot be fetched.
    #[error("image `{image}` not found{hint}")]
    ImageNotFound { image: String, hint: String },

    /// A waited-for task did not finish in time.
    #[error("task `{task}` did not finish within {after:?}")]
    Timeout { task: String, after: Duration },

    /// The backend itself failed (daemon unreachable, VM would not boot, I/O on its files).
    #[error("`{driver}` driver failed to {action}")]
    Backend {
        driver: &'static str,
        action: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// How a failure should be reported by a CLI that runs tasks, as `docker run` does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitClass {
    /// 125: the driver or the infrastructure failed.
    Infrastructure,
    /// 126: the command exists but cannot be invoked.
    CannotInvoke,
    /// 127: the command was not found.
    NotFound,
}

impl ExitClass {
    pub fn code(self) -> u8 {
        match self {
            ExitClass::Infrastructure => 125,
            ExitClass::CannotInvoke => 126,
            ExitClass::NotFound => 127,
        }
    }
}

impl DriverError {
    /// A `Backend` error from any error type, with what the driver was doing.
    pub fn backend(
        driver: &'static str,
        action: impl Into<String>,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        DriverError::Backend {
            driver,
            action: action.into(),
            source: source.into(),
        }
    }

    pub fn exit_class(&self) -> ExitClass {
        match self {
            DriverError::ProgramNotFound { .. } => ExitClass::NotFound,
            DriverError::CannotInvoke { .. } => ExitClass::CannotInvoke,
            _ => ExitClass::Infrastructure,
        }
    }
}

/// `error: cause: cause`, on one line: an error with every source below it.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
