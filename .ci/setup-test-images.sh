# Sourced by .ci/run, after .ci/setup-image.sh (which built the default guest image and the
# static binaries): the guest images only the tests use: the default one with systemd and
# Debian's cloud-init, for the NoCloud seed boot test; `ubuntu-noble`, which the qemu
# conformance suite and job tests also run on; the stand-ins for Canonical's and Alpine's cloud
# images; and `debian-bookworm-arm64`, the aarch64 image
# (what the `vz` driver boots on a Mac), built through qemu-user and booted by the tests under
# qemu-system-aarch64. Kept out of README's first command
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

    # The aarch64 image builds in the background beside the x86_64 ones below: its bootstrap
    # is mostly dpkg running through qemu-user on one core. qemu-user is registered in
    # binfmt_misc, which must be mounted before qemu-user-static's install registers it;
    # qemu-system-arm must have the same version as the installed qemu-system-x86 (one
    # source package, see .ci/setup-image.sh).
    arm_started=$(date +%s)
    if [ ! -e /proc/sys/fs/binfmt_misc/register ]; then
        $sudo mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
    fi
    if ! command -v qemu-system-aarch64 >/dev/null 2>&1 || ! command -v arch-test >/dev/null 2>&1 ||
        ! command -v update-binfmts >/dev/null 2>&1 || [ ! -e /usr/libexec/qemu-binfmt/aarch64-binfmt-P ]; then
        version="$(dpkg-query -W -f '${Version}' qemu-system-x86)"
        $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            --allow-downgrades "qemu-system-arm=$version" "qemu-user-static=$version" binfmt-support arch-test
    fi
    grep -q '^enabled' /proc/sys/fs/binfmt_misc/qemu-aarch64 2>/dev/null ||
        $sudo update-binfmts --enable qemu-aarch64
    rustup target list --installed 2>/dev/null | grep -qx aarch64-unknown-linux-musl ||
        rustup target add aarch64-unknown-linux-musl
    cargo build --quiet --release --target aarch64-unknown-linux-musl -p mkrunner -p ci-exec-guest-init
    arm="$target/aarch64-unknown-linux-musl/release"
    arm_log=$(mktemp -t ci-exec-arm64-image.XXXXXX)
    "$target/debug/examples/build_image" "$arm/mk" "$arm/ci-exec-init" arm64 >/dev/null 2>"$arm_log" &
    arm_build=$!

    started=$(date +%s)
    "$target/debug/examples/build_image" "$musl/mk" "$musl/ci-exec-init" cloud-init >/dev/null
    echo "setup-test-images: cloud-init variant ready ($(( $(date +%s) - started )) s)" >&2
    started=$(date +%s)
    "$target/debug/examples/build_image" "$musl/mk" "$musl/ci-exec-init" ubuntu-noble >/dev/null
    echo "setup-test-images: ubuntu-noble ready ($(( $(date +%s) - started )) s)" >&2
    # Canonical's cloud image, from a stand-in in its format served on loopback
    # (cloud-images.ubuntu.com is not reachable from CI machines).
    started=$(date +%s)
    command -v sfdisk >/dev/null 2>&1 ||
        $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends fdisk
    cargo build --quiet -p ci-exec
    cloud=$(mktemp -d -t ci-exec-cloud-mirror.XXXXXX)
    noble=$("$target/debug/ci-exec" image path ubuntu-noble --json |
        python3 -c 'import json, sys; print(json.load(sys.stdin)["disk"])')
    bash guest-image/tests/fixtures/make-ubuntu-cloud-image.sh "$noble" "$cloud"
    python3 -u -m http.server --bind 127.0.0.1 --directory "$cloud" 0 >"$cloud.log" 2>&1 &
    server=$!
    trap 'kill "$server" 2>/dev/null; rm -rf "$cloud" "$cloud.log"' EXIT
    port=""
    for _ in $(seq 50); do
        port=$(sed -n 's/.*port \([0-9]*\).*/\1/p' "$cloud.log" | head -n 1)
        [ -n "$port" ] && break
        sleep 0.1
    done
    "$target/debug/ci-exec" image build ubuntu-24.04 --mk "$musl/mk" \
        --mirror "http://127.0.0.1:$port" >/dev/null
    echo "setup-test-images: ubuntu-24.04 (stand-in) ready ($(( $(date +%s) - started )) s)" >&2
    # Alpine's cloud image, from a stand-in in its format (busybox userland; Alpine's mirrors
    # are not reachable from CI machines), served from the same place under Alpine's paths.
    started=$(date +%s)
    bash guest-image/tests/fixtures/make-alpine-cloud-image.sh "$cloud"
    "$target/debug/ci-exec" image build alpine-3.22 --mk "$musl/mk" \
        --mirror "http://127.0.0.1:$port" >/dev/null
    echo "setup-test-images: alpine-3.22 (stand-in) ready ($(( $(date +%s) - started )) s)" >&2
    if ! wait "$arm_build"; then
        tail -n 30 "$arm_log" >&2
        echo "error: .ci/setup-test-images.sh: the aarch64 image (debian-bookworm-arm64) did not build" >&2
        exit 1
    fi
    rm -f "$arm_log"
    echo "setup-test-images: debian-bookworm-arm64 ready ($(( $(date +%s) - arm_started )) s)" >&2
)
