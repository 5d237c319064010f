# The fly driver's machines run our static `ci-exec-init` (`--serve`), found in cargo's musl
# output by the driver and the conformance tests. Sourced by .ci/run; quick when it is built.
if command -v rustup >/dev/null 2>&1 && ! rustup target list --installed 2>/dev/null | grep -qx x86_64-unknown-linux-musl; then
    rustup target add x86_64-unknown-linux-musl
fi
cargo build --quiet --release --target x86_64-unknown-linux-musl -p ci-exec-guest-init
