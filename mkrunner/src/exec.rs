//! The last stage: the seam through which every process mk starts goes.
//!
//! mkrunner never spawns a process itself: recipes, backquotes, `<|` includes and `P`
//! programs are all handed to a [`Runner`]. [`HostRunner`] runs them on this machine; a
//! runner that forwards to a VM guest or a container can replace it.

use std::io::{Read as _, Write as _};
use std::path::PathBuf;
use std::process::Stdio;

/// One process for a runner to start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Command {
    /// The program and its arguments, e.g. `["sh", "-e"]` for a recipe (the program is
    /// looked up in `PATH`, as `execvp` does).
    pub argv: Vec<String>,
    /// Text to write to the process's standard input (the recipe, for a recipe); with
    /// `None` standard input is empty.
    pub stdin: Option<String>,
    /// The complete environment of the process (mk replaces, not extends, the environment).
    pub environment: Vec<(String, String)>,
    /// The working directory.
    pub directory: PathBuf,
    /// Capture standard output and return it (backquotes, `<|`); otherwise standard output
    /// and standard error go where mk's own go.
    pub capture_stdout: bool,
    /// For a recipe, the targets it makes (for runners that label output); else empty.
    pub targets: Vec<String>,
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Exited(i32),
    Signaled { signal: i32, core_dumped: bool },
}

impl Status {
    pub fn success(&self) -> bool {
        matches!(self, Status::Exited(0))
    }

    /// mk's wording: `exit(1)`, `signal 9`.
    pub fn describe(&self) -> String {
        match self {
            Status::Exited(code) => format!("exit({code})"),
            Status::Signaled {
                signal,
                core_dumped: true,
            } => format!("signal {signal}, core dumped"),
            Status::Signaled { signal, .. } => format!("signal {signal}"),
        }
    }
}

/// What a runner reports back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub status: Status,
    /// Standard output when `capture_stdout` was set, else empty.
    pub stdout: Vec<u8>,
}

/// Why a runner could not run a command at all (a command that runs and fails is an
/// [`Outcome`] with a failing status, not an error).
#[derive(Debug, thiserror::Error)]
pub enum RunnerError {
    #[error("cannot start `{program}`")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot wait for `{program}`")]
    Wait {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the command line is empty")]
    EmptyCommand,
    #[error("runner `{runner}` failed")]
    Remote {
        runner: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// Starts processes for mk. `run` blocks until the process ends; mk calls it from several
/// threads at once when `NPROC` > 1.
pub trait Runner: Sync {
    fn run(&self, command: &Command) -> Result<Outcome, RunnerError>;
}

/// Runs commands as child processes of this one.
#[derive(Debug, Default, Clone, Copy)]
pub struct HostRunner;

impl Runner for HostRunner {
    fn run(&self, command: &Command) -> Result<Outcome, RunnerError> {
        let Some((program, arguments)) = command.argv.split_first() else {
            return Err(RunnerError::EmptyCommand);
        };
        let mut process = std::process::Command::new(program);
        process
            .args(arguments)
            .env_clear()
            .envs(command.environment.iter().map(|(k, v)| (k, v)))
            .current_dir(&command.directory)
            .stdin(if command.stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(if command.capture_stdout {
                Stdio::piped()
            } else {
                Stdio::inherit()
            });
        let spawn_error = |source| RunnerError::Spawn {
            program: program.clone(),
            source,
        };
        let wait_error = |source| RunnerError::Wait {
            program: program.clone(),
            source,
        };
        let mut child = process.spawn().map_err(spawn_error)?;
        // Feed standard input from a thread so a recipe that fills its output pipe before
        // reading all its input cannot deadlock with us.
        let writer = match (child.stdin.take(), command.stdin.clone()) {
            (Some(mut stdin), Some(text)) => Some(std::thread::spawn(move || {
                // A shell that exits early closes the pipe: not an error for mk.
                let _ = stdin.write_all(text.as_bytes());
            })),
            _ => None,
        };
        let mut stdout = Vec::new();
        if let Some(mut pipe) = child.stdout.take() {
            pipe.read_to_end(&mut stdout).map_err(wait_error)?;
        }
        let status = child.wait().map_err(wait_error)?;
        if let Some(writer) = writer {
            let _ = writer.join();
        }
        Ok(Outcome {
            status: status_of(status),
            stdout,
        })
    }
}

fn status_of(status: std::process::ExitStatus) -> Status {
    use std::os::unix::process::ExitStatusExt as _;
    match (status.code(), status.signal()) {
        (Some(code), _) => Status::Exited(code),
        (None, Some(signal)) => Status::Signaled {
            signal,
            core_dumped: status.core_dumped(),
        },
        (None, None) => Status::Exited(1),
    }
}
