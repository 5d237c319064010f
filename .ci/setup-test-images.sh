# Sourced by .ci/run, after .ci/setup-image.sh (which built the default guest image and the
# static binaries): the guest images only the tests use: the default one with systemd and
# Debian's cloud-init, for the NoCloud seed boot test, and `ubuntu-noble`, which the qemu
# conformance suite and job tests also run on. Kept out of README's first command
# (it costs a newcomer two more minutes). Builds here run as root; the user `ci-exec-builder`
# (with subordinate id ranges) is made for the test that builds as a normal user through
# mmdebstrap's unshare mode. Idempotent: quick when everything is present.
# No `||` after the subshell: bash ignores `set -e` inside a command whose status is tested.
(
    set -euo pipefail
    trap 'echo "error: .ci/setup-test-images.sh: line $LINENO failed" >&2' ERR
    if [ "$(id -u)" = 0 ]; then sudo=""; else sudo="sudo"; fi
    builder=ci-exec-builder
    if ! id -u "$builder" >/dev/null 2>&1; then
        $sudo useradd --create-home --shell /usr/sbin/nologin "$builder"
    fi
    if ! grep -q "^$builder:" /etc/subuid || ! grep -q "^$builder:" /etc/subgid; then
        $sudo usermod --add-subuids 300000-365535 --add-subgids 300000-365535 "$builder"
    fi
    target="${CARGO_TARGET_DIR:-target}"
    musl="$target/x86_64-unknown-linux-musl/release"
    started=$(date +%s)
    "$target/debug/examples/build_image" "$musl/mk" "$musl/ci-exec-init" cloud-init >/dev/null
    echo "setup-test-images: cloud-init variant ready ($(( $(date +%s) - started )) s)" >&2
    started=$(date +%s)
    "$target/debug/examples/build_image" "$musl/mk" "$musl/ci-exec-init" ubuntu-noble >/dev/null
    echo "setup-test-images: ubuntu-noble ready ($(( $(date +%s) - started )) s)" >&2
)
