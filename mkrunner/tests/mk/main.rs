//! mkrunner's integration tests, one binary: the differential suite against 9base mk,
//! golden diagnostics, the library API through a runner, and a property test of the parser.

mod api;
mod diagnostics;
mod differential;
mod fuzz;
mod harness;
