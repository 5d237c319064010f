# Sourced by .ci/run. The vz driver (executor/vz) is macOS-only: here its framework glue is
# compile-checked for aarch64-apple-darwin with clippy, and the run stops when that fails.
# Nothing under it compiles C for the target (the drivers use ci-exec-guest-image without its
# `download` feature, so no ring), so no macOS SDK is needed for the check.
# Idempotent: quick when the target is present and the check is cached.
(
    set -euo pipefail
    if ! rustup target list --installed 2>/dev/null | grep -qx aarch64-apple-darwin; then
        rustup target add aarch64-apple-darwin
    fi
    cargo clippy --quiet --target aarch64-apple-darwin -p ci-exec-vz -- -D warnings
)
