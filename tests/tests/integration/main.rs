//! The one integration test binary: the driver conformance suite, the CLI as a user drives
//! it, and native-driver specifics that the generic suite cannot see.

mod arm64;
mod cli;
mod cloud_image;
mod conformance;
mod k8s;
mod native;
