//! One constructor per driver under test. Each makes the driver in a fresh namespace, or
//! returns [`missing_prerequisite`](crate::missing_prerequisite) when the machine lacks what
//! the driver needs (that fails under `CI=true`).

use std::path::PathBuf;

use ci_exec_driver::{Driver, DriverConfig};

use crate::unique_namespace;

/// Where native test namespaces live: under the temp dir, never the user's state.
pub fn native_state_dir() -> PathBuf {
    std::env::temp_dir().join("ci-exec-tests").join("native")
}

/// The native driver in a fresh namespace. Its only prerequisite is `sh`, which every host
/// that builds ci-exec has.
pub async fn native() -> Option<Box<dyn Driver>> {
    let dsn = format!(
        "native://{}?state_dir={}",
        unique_namespace("native"),
        native_state_dir().display()
    );
    let config = DriverConfig::parse_with_env(&dsn, &|_| None)
        .unwrap_or_else(|error| panic!("native DSN `{dsn}`: {error}"));
    let driver = ci_exec_native::NativeDriver::new(&config)
        .unwrap_or_else(|error| panic!("native driver: {error}"));
    Some(Box::new(driver))
}
