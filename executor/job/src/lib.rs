//! The ci-exec job: `ci-exec test` in a repository with an `mkfile`.
//!
//! It computes a result key from the committed tree and the other inputs, replays a recorded
//! successful result when the store holds one, and otherwise runs the job's mk steps through any
//! [`ci_exec_driver::Driver`] — `prepare-runtime` in the base OS, `mk test` in `CONTAINERIMAGE`,
//! artifacts, cache, `post-test` — streaming its output live and recording it.
//!
//! It is not a driver and does not draw progress: it talks to drivers only through the contract
//! and reports through plain writers the CLI hands it.

mod error;
mod flow;
pub mod key;
pub mod output;
pub mod plan;
pub mod schedule;
pub mod source;
pub mod store;

pub use error::JobError;
pub use flow::{
    BoundJob, JobOptions, JobReport, PreparedJob, ReportArtifact, SOURCE_PATH, TOOLS_PATH, Terminal,
};
pub use key::KeyInputs;
pub use plan::{HostPlan, JobPlan};
pub use source::Snapshot;
pub use store::{ResultRecord, ResultStore};
