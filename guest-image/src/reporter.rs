/// Progress from long operations. The library never draws; the CLI turns these into bars
/// (and nothing at all when stderr is not a terminal).
pub trait Reporter: Send + Sync {
    /// A new step has started (`"bootstrapping root filesystem"`).
    fn step(&self, name: &str);
    /// A transfer has a known (or unknown: `None`) total size in bytes.
    fn transfer_started(&self, _what: &str, _total: Option<u64>) {}
    /// Bytes moved so far in the current transfer.
    fn transfer_progress(&self, _done: u64) {}
    fn transfer_finished(&self) {}
    /// A line of output from a build tool, for verbose logs.
    fn log(&self, _line: &str) {}
}

/// Reports nothing.
#[derive(Debug, Default, Clone, Copy)]
pub struct SilentReporter;

impl Reporter for SilentReporter {
    fn step(&self, _name: &str) {}
}

/// Logs steps through `tracing` at `info`, tool output at `debug`.
#[derive(Debug, Default, Clone, Copy)]
pub struct TracingReporter;

impl Reporter for TracingReporter {
    fn step(&self, name: &str) {
        tracing::info!(step = name, "image build step");
    }
    fn log(&self, line: &str) {
        tracing::debug!("{line}");
    }
}
