//! cloud-init NoCloud seeds built in-process.
