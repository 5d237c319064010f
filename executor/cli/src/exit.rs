//! Exit codes, in one place, and how a failure is printed.
//!
//! `error: …` then one `caused by: …` line per source, then an optional `hint: …`.

use std::fmt;
use std::io::IsTerminal;

use ci_exec_driver::{DriverError, DsnError, ExitClass};
use ci_exec_job::JobError;

/// Success.
pub const SUCCESS: u8 = 0;
/// The job's tests failed (the job ran; its result is a failure).
#[allow(
    dead_code,
    reason = "for `ci-exec test`, which lands with `ci-exec-job`"
)]
pub const TEST_FAILED: u8 = 1;
/// Bad usage or configuration: arguments, DSN, parameters. Nothing was run.
pub const USAGE: u8 = 2;
/// The driver or the infrastructure failed, as `docker run` reports it.
pub const INFRASTRUCTURE: u8 = 125;
/// The command exists but cannot be invoked.
pub const CANNOT_INVOKE: u8 = 126;
/// The command was not found.
pub const NOT_FOUND: u8 = 127;
/// Stopped by Ctrl-C / SIGTERM (128 + SIGINT), as a shell reports it.
pub const INTERRUPTED: u8 = 130;

/// A failure the CLI itself detects, with its exit code and how to fix it.
#[derive(Debug)]
pub struct CliError {
    pub message: String,
    pub code: u8,
    pub hint: Option<String>,
}

impl CliError {
    /// Bad arguments or configuration (exit 2).
    pub fn usage(message: impl Into<String>) -> CliError {
        CliError {
            message: message.into(),
            code: USAGE,
            hint: None,
        }
    }

    /// The infrastructure cannot do what was asked (exit 125).
    pub fn infrastructure(message: impl Into<String>) -> CliError {
        CliError {
            message: message.into(),
            code: INFRASTRUCTURE,
            hint: None,
        }
    }

    pub fn hint(mut self, hint: impl Into<String>) -> CliError {
        self.hint = Some(hint.into());
        self
    }
}

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for CliError {}

/// A reader that goes away (`ci-exec drivers | head -1`) ends the process as it ends `ls`,
/// silently, instead of a panic in the next `println!`. Only for commands that just print
/// ([`crate::commands::Command::only_prints`]).
pub fn end_quietly_on_closed_output() {
    // SAFETY: restoring the default disposition of SIGPIPE (Rust's runtime ignores it) has no
    // preconditions; no other thread runs yet.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

/// The exit code for `error`: the first error in its chain that knows one, else 125.
pub fn code(error: &anyhow::Error) -> u8 {
    for cause in error.chain() {
        if let Some(error) = cause.downcast_ref::<CliError>() {
            return error.code;
        }
        if cause.downcast_ref::<DsnError>().is_some() {
            return USAGE;
        }
        if let Some(error) = cause.downcast_ref::<JobError>() {
            return if error.is_usage() {
                USAGE
            } else {
                INFRASTRUCTURE
            };
        }
        if let Some(error) = cause.downcast_ref::<DriverError>() {
            return match error.exit_class() {
                ExitClass::Infrastructure => INFRASTRUCTURE,
                ExitClass::CannotInvoke => CANNOT_INVOKE,
                ExitClass::NotFound => NOT_FOUND,
            };
        }
    }
    INFRASTRUCTURE
}

/// How to fix `error`, if we can say.
pub fn hint(error: &anyhow::Error) -> Option<String> {
    // Deep in a driver's error, yet the fix is one command (and not the driver's).
    #[cfg(feature = "vz")]
    if error.chain().any(|cause| {
        matches!(
            cause.downcast_ref::<ci_exec_vz::VzError>(),
            Some(ci_exec_vz::VzError::MissingEntitlement)
        )
    }) {
        return Some(format!(
            "`mk sign` runs `{}`",
            ci_exec_vz::entitlement::SIGN_COMMAND
        ));
    }
    for cause in error.chain() {
        if let Some(error) = cause.downcast_ref::<CliError>() {
            return error.hint.clone();
        }
        if let Some(error) = cause.downcast_ref::<JobError>() {
            return error.hint();
        }
        if let Some(error) = cause.downcast_ref::<DsnError>() {
            return match error {
                DsnError::UnknownDriver { .. }
                | DsnError::InvalidValue { .. }
                | DsnError::MissingRequired { .. } => {
                    Some("`ci-exec drivers` lists every driver and its parameters".to_owned())
                }
                _ => None,
            };
        }
        if let Some(error) = cause.downcast_ref::<DriverError>() {
            return match error {
                DriverError::ProgramNotFound { .. } => Some(
                    "check the command's name; a task sees only its own `PATH` (`-e PATH=…`)"
                        .to_owned(),
                ),
                DriverError::CannotInvoke { .. } => {
                    Some("the command must be an executable file (`chmod +x`)".to_owned())
                }
                _ => None,
            };
        }
    }
    None
}

/// Prints `error` to stderr and returns its exit code.
pub fn report(error: &anyhow::Error) -> u8 {
    let color = color_enabled();
    let paint = |label: &str, ansi: &str| {
        if color {
            format!("\x1b[{ansi}m{label}\x1b[0m")
        } else {
            label.to_owned()
        }
    };
    let mut text = format!("{} {error}\n", paint("error:", "1;31"));
    for cause in error.chain().skip(1) {
        text.push_str(&format!("{} {cause}\n", paint("caused by:", "1")));
    }
    if let Some(hint) = hint(error) {
        text.push_str(&format!("{} {hint}\n", paint("hint:", "1;36")));
    }
    eprint!("{text}");
    code(error)
}

/// Colour on stderr only for a terminal, and never with `NO_COLOR` set (no-color.org).
pub fn color_enabled() -> bool {
    std::env::var_os("NO_COLOR").is_none_or(|value| value.is_empty())
        && std::io::stderr().is_terminal()
}

/// Logs to stderr, filtered by `RUST_LOG` (default: warnings and errors), as
/// `warning: …` / `error: …` lines like the CLI's own messages (`info:`, `debug:` below).
pub fn init_logging() {
    let color = color_enabled();
    let builder = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(color)
        .event_format(LogLine { color });
    // Without `RUST_LOG`, a plain level filter: parsing directives costs startup time.
    if std::env::var_os("RUST_LOG").is_none() {
        builder.with_max_level(tracing::Level::WARN).init();
        return;
    }
    match tracing_subscriber::EnvFilter::try_from_default_env() {
        Ok(filter) => builder.with_env_filter(filter).init(),
        Err(error) => {
            builder.with_max_level(tracing::Level::WARN).init();
            tracing::warn!("ignoring `RUST_LOG`: {error}");
        }
    }
}

/// One log event as `level: message key=value …`.
struct LogLine {
    color: bool,
}

impl<S, N> tracing_subscriber::fmt::FormatEvent<S, N> for LogLine
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    N: for<'a> tracing_subscriber::fmt::FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        context: &tracing_subscriber::fmt::FmtContext<'_, S, N>,
        mut writer: tracing_subscriber::fmt::format::Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> fmt::Result {
        let (label, ansi) = match *event.metadata().level() {
            tracing::Level::ERROR => ("error:", "1;31"),
            tracing::Level::WARN => ("warning:", "1;33"),
            tracing::Level::INFO => ("info:", "1"),
            tracing::Level::DEBUG => ("debug:", "2"),
            tracing::Level::TRACE => ("trace:", "2"),
        };
        if self.color {
            write!(writer, "\x1b[{ansi}m{label}\x1b[0m ")?;
        } else {
            write!(writer, "{label} ")?;
        }
        tracing_subscriber::fmt::FormatFields::format_fields(context, writer.by_ref(), event)?;
        writeln!(writer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_follow_the_error_chain() {
        let dsn = anyhow::Error::new(DsnError::Empty).context("bad --driver");
        assert_eq!(code(&dsn), USAGE);
        let missing = anyhow::Error::new(DriverError::ProgramNotFound {
            task: "t".into(),
            program: "nope".into(),
        });
        assert_eq!(code(&missing), NOT_FOUND);
        assert!(hint(&missing).is_some());
        let refused = anyhow::Error::new(DriverError::CannotInvoke {
            task: "t".into(),
            program: "x".into(),
            source: std::io::Error::from(std::io::ErrorKind::PermissionDenied),
        });
        assert_eq!(code(&refused), CANNOT_INVOKE);
        let usage = anyhow::Error::new(CliError::usage("bad").hint("fix it"));
        assert_eq!(code(&usage), USAGE);
        assert_eq!(hint(&usage).as_deref(), Some("fix it"));
        assert_eq!(code(&anyhow::anyhow!("something else")), INFRASTRUCTURE);
        assert_eq!(SUCCESS, 0);
    }
}
