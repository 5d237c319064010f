//! QEMU driver: a hermetic VM per job.
