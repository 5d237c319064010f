//! The one CI gate of ci-exec's tests. A test that needs something this machine may lack (a
//! VM image, a container engine, root, a device) asks [`require`]: under `CI=true` a missing
//! prerequisite fails the test with the command that fixes it, so nothing skips silently in
//! CI; elsewhere the test is skipped with the same message on stderr.
//!
//! It is test support only, a dev-dependency of the crates whose tests need it (mkrunner keeps
//! its own copy: it depends on no other crate of ours).

/// Whether the tests run in CI, where a missing prerequisite is a failure.
pub fn ci() -> bool {
    std::env::var("CI").is_ok_and(|value| value == "true")
}

/// `true` when `missing` is `None`. Otherwise fails the calling test under `CI=true`, and
/// elsewhere prints `skipped: <test>: <missing>; fix: <fix>` and returns `false` for the test
/// to return early on.
#[track_caller]
pub fn require(test: &str, missing: Option<String>, fix: &str) -> bool {
    let Some(missing) = missing else {
        return true;
    };
    if ci() {
        panic!("`{test}` cannot run under CI=true: {missing}; fix: {fix}");
    }
    eprintln!("skipped: {test}: {missing}; fix: {fix}");
    false
}

/// [`require`] for a condition: `present` or the prerequisite named `what` is missing.
#[track_caller]
pub fn require_that(test: &str, present: bool, what: &str, fix: &str) -> bool {
    require(test, (!present).then(|| what.to_owned()), fix)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_present_prerequisite_passes() {
        assert!(require("t", None, "nothing"));
        assert!(require_that("t", true, "x", "y"));
    }

    #[test]
    fn a_missing_prerequisite_fails_under_ci_and_skips_elsewhere() {
        let outcome = std::panic::catch_unwind(|| require("t", Some("x".into()), "install x"));
        if ci() {
            let panic = outcome.expect_err("fails under CI");
            let message = panic.downcast_ref::<String>().cloned().unwrap_or_default();
            assert!(message.contains("fix: install x"), "{message}");
        } else {
            assert_eq!(outcome.ok(), Some(false));
        }
    }
}
