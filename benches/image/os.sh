#!/usr/bin/env bash
# Issue 21's measures: each guest OS image against the default one (debian-bookworm), in the
# same runs, so the ratios hold on a noisy machine:
#   - build time from a warm apt archive (the image removed, downloaded packages kept);
#   - disk size (qcow2 bytes) and the kernel and initramfs sizes;
#   - cold start: `ci-exec run --driver=qemu:image=NAME,warm=false -- true` (boot to the agent);
#   - warm start: the same from the image's saved VM state (made once before timing).
# Usage, as root: benches/image/os.sh [RUNS] [IMAGE…]  (default: 5 runs, ubuntu-noble)
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
cargo build --quiet --release --manifest-path "$root/Cargo.toml" -p ci-exec
musl="$target/x86_64-unknown-linux-musl/release"
table=$(mktemp)
trap 'rm -f "$table"' EXIT
# hyperfine rewrites its Markdown file as it goes: the table is read once it is done.
timed() { hyperfine "$@" --export-markdown "$table" >/dev/null 2>&1; cat "$table"; }
bin="$target/release/ci-exec"
build() { "$bin" image build "$1" --mk "$musl/mk" --init "$musl/ci-exec-init" >/dev/null 2>&1; }
all=(debian-bookworm "${images[@]}")
for image in "${all[@]}"; do build "$image"; done

echo "== build from a warm apt archive (image forced, packages kept)"
commands=()
for image in "${all[@]}"; do
    commands+=("$bin image build $image --force --mk $musl/mk --init $musl/ci-exec-init")
done
timed --runs 1 "${commands[@]}"

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
