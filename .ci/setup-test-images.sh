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
)
