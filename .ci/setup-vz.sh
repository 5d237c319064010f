# Sourced by .ci/run. The vz driver (executor/vz) is macOS-only: here its framework glue is
# compile-checked for aarch64-apple-darwin with clippy, and the run stops when that fails.
# ring (rustls, through the guest-image crate) compiles C for the target, and no macOS SDK
# exists here: zig (PyPI `ziglang`) is that cross C compiler, driven by `cargo-zigbuild`
# (PyPI too), which sets it up for the target's C builds and then runs plain clippy.
# Idempotent: quick when the target and tools are present and the check is cached.
(
    set -euo pipefail
    if ! rustup target list --installed 2>/dev/null | grep -qx aarch64-apple-darwin; then
        rustup target add aarch64-apple-darwin
    fi
    # By path: a pip-installed script gets no pyenv shim until a rehash.
    zigbuild="$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))')/cargo-zigbuild"
    if [ ! -x "$zigbuild" ] || ! python3 -m ziglang version >/dev/null 2>&1; then
        python3 -m pip install --quiet --disable-pip-version-check "ziglang==0.17.0" "cargo-zigbuild==0.24.0"
    fi
    "$zigbuild" clippy --quiet --target aarch64-apple-darwin -p ci-exec-vz -- -D warnings
)
