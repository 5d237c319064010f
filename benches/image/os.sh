#!/usr/bin/env bash
# Issue 21's measures: each guest OS image against the default one (debian-bookworm), in the
# same runs, so the ratios hold on a noisy machine:
#   - build time from a warm apt archive (the image removed, downloaded packages kept); for a
#     publisher's cloud image (`ubuntu-24.04`), download + verify + assemble from a mirror:
#     $CI_EXEC_CLOUD_MIRROR, else a stand-in in the publisher's format served on loopback
#     (guest-image/tests/fixtures/make-ubuntu-cloud-image.sh, made from ubuntu-noble, and
#     make-alpine-cloud-image.sh);
#   - disk size (qcow2 bytes) and the kernel and initramfs sizes;
#   - cold start: `ci-exec run --driver=qemu:image=NAME,warm=false -- true` (boot to the agent);
#   - warm start: the same from the image's saved VM state (made once before timing).
# An aarch64 image (`debian-bookworm-arm64`) is built through qemu-user and booted under
# qemu-system-aarch64 (TCG on an x86_64 host), from binaries for aarch64-unknown-linux-musl.
# Usage, as root: benches/image/os.sh [RUNS] [IMAGE…]  (default: 5 runs, ubuntu-noble);
# BENCH_BUILD=0 leaves out the (forced, slow) build row.
#   e.g. benches/image/os.sh 5 ubuntu-noble ubuntu-24.04 debian-bookworm-arm64
# Needs hyperfine, mmdebstrap, qemu, and the mirrors the builds use.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
runs=${1:-5}
shift || true
images=("$@")
[ ${#images[@]} -gt 0 ] || images=(ubuntu-noble)
command -v hyperfine >/dev/null || { echo "bench: hyperfine is missing: apt-get install hyperfine" >&2; exit 2; }
target="${CARGO_TARGET_DIR:-$root/target}"
cargo build --quiet --release --manifest-path "$root/Cargo.toml" --target x86_64-unknown-linux-musl \
    -p mkrunner -p ci-exec-guest-init
case " ${images[*]} " in *-arm64\ *)
    cargo build --quiet --release --manifest-path "$root/Cargo.toml" --target aarch64-unknown-linux-musl \
        -p mkrunner -p ci-exec-guest-init ;;
esac
cargo build --quiet --release --manifest-path "$root/Cargo.toml" -p ci-exec
musl="$target/x86_64-unknown-linux-musl/release"
arm="$target/aarch64-unknown-linux-musl/release"
table=$(mktemp)
# hyperfine rewrites its Markdown file as it goes: the table is read once it is done.
timed() { hyperfine "$@" --export-markdown "$table" >/dev/null 2>&1; cat "$table"; }
bin="$target/release/ci-exec"
options() {
    case "$1" in
    ubuntu-2*.* | alpine-*) echo "--mk $musl/mk --mirror $mirror" ;;
    *-arm64) echo "--mk $arm/mk --init $arm/ci-exec-init" ;;
    *) echo "--mk $musl/mk --init $musl/ci-exec-init" ;;
    esac
}
mirror=${CI_EXEC_CLOUD_MIRROR:-}
server=""
trap 'rm -f "$table"; [ -z "$server" ] || kill "$server"; [ -z "${served:-}" ] || rm -rf "$served"' EXIT
all=(debian-bookworm "${images[@]}")
# Without a mirror, the cloud images come from stand-ins in their publishers' formats, served
# on loopback from one directory (their paths do not collide).
serve() {
    [ -z "$server" ] || return 0
    served=$(mktemp -d)
    port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    python3 -m http.server --bind 127.0.0.1 --directory "$served" "$port" >/dev/null 2>&1 &
    server=$!
    mirror="http://127.0.0.1:$port"
    sleep 1
}
if [ -z "$mirror" ]; then
    for image in "${all[@]}"; do
        case "$image" in
        ubuntu-24.04)
            "$bin" image build ubuntu-noble $(options ubuntu-noble) >/dev/null 2>&1
            serve
            bash "$root/guest-image/tests/fixtures/make-ubuntu-cloud-image.sh" \
                "$("$bin" image path ubuntu-noble --json | python3 -c 'import json, sys; print(json.load(sys.stdin)["disk"])')" \
                "$served"
            ;;
        alpine-*)
            serve
            bash "$root/guest-image/tests/fixtures/make-alpine-cloud-image.sh" "$served"
            ;;
        esac
    done
fi
# shellcheck disable=SC2046 # the options are words
for image in "${all[@]}"; do "$bin" image build "$image" $(options "$image") >/dev/null 2>&1; done

if [ "${BENCH_BUILD:-1}" != 0 ]; then
echo "== build from a warm apt archive, or download + verify + assemble (image forced)"
commands=()
downloads="${CI_EXEC_IMAGE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/ci-exec/images}/downloads"
for image in "${all[@]}"; do
    # A cloud image's run starts without its download (it is what that build does).
    commands+=(--prepare "rm -f $downloads/*$image*" "$bin image build $image --force $(options "$image")")
done
timed --runs 1 "${commands[@]}"
fi

echo "== sizes (bytes)"
for image in "${all[@]}"; do
    "$bin" image path "$image" --json | python3 -c '
import json, os, sys
files = json.load(sys.stdin)
print(files["name"], *(f"{key}={os.path.getsize(files[key])}" for key in ("disk", "vmlinux", "initrd")))'
done

echo "== cold start (boot to the agent, no saved state) and warm start (from the saved state)"
commands=()
for image in "${all[@]}"; do
    "$bin" run --driver="qemu:image=$image" -- true # makes the saved state
    commands+=("$bin run --driver=qemu:image=$image,warm=false -- true")
    commands+=("$bin run --driver=qemu:image=$image -- true")
done
timed --warmup 1 --runs "$runs" "${commands[@]}"
