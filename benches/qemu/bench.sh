#!/usr/bin/env bash
# qemu driver benchmarks, as ratios against the native driver measured in the same run.
# Usage: benches/qemu/bench.sh [RUNS]   (needs hyperfine, QEMU, and the default guest image)
# CI_EXEC_BIN: an already built `ci-exec` (the VM dominates every number but the native one).
# BASELINE_BIN: another build (e.g. the previous release) measured in the same hyperfine run,
# so before/after compare under the same load. BASELINE_IMAGE: the image directory it boots
# (an image its own build made; default: the current one).
# Prints a markdown table; copy it into benches/RESULTS-qemu.md with the date and this command.
set -euo pipefail
runs=${1:-5}
root=$(cd "$(dirname "$0")/../.." && pwd)
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$root/target}
bin=${CI_EXEC_BIN:-}
if [ -z "$bin" ]; then
    cargo build -q --release -p ci-exec --manifest-path "$root/Cargo.toml"
    bin=$CARGO_TARGET_DIR/release/ci-exec
fi
image=localhost/ci-exec/base:latest
out=$(mktemp -d)
# One run per build makes (or reuses) its saved VM state, so "warm" measures starts from it.
"$bin" run --driver=qemu -- true
commands=(
    -n native "$bin run --driver=native -- echo hi"
    -n 'qemu warm (guest OS)' "$bin run --driver=qemu -- echo hi"
    -n 'qemu warm (podman)' "$bin run --driver=qemu --image $image -- echo hi"
    -n 'qemu cold (guest OS)' "$bin run --driver=qemu:warm=false -- echo hi"
)
if [ -n "${BASELINE_BIN:-}" ]; then
    baseline=qemu${BASELINE_IMAGE:+:image=$BASELINE_IMAGE}
    "$BASELINE_BIN" run --driver="$baseline" -- true
    commands+=(
        -n 'baseline: qemu warm (guest OS)' "$BASELINE_BIN run --driver=$baseline -- echo hi"
        -n 'baseline: qemu warm (podman)' "$BASELINE_BIN run --driver=$baseline --image $image -- echo hi"
        -n 'baseline: qemu cold (guest OS)' "$BASELINE_BIN run --driver=$baseline,warm=false -- echo hi"
    )
fi
. "$root/benches/qemu/common.sh"
host_before
hyperfine --runs "$runs" --warmup 1 --export-json "$out/start.json" "${commands[@]}" >&2
host_after
median_table "$out/start.json" 'command'
# In-VM numbers (9p throughput, podman overhead, idle VM memory): the driver's own bench.
cargo bench -q -p ci-exec-qemu --manifest-path "$root/Cargo.toml" --bench vm -- "$runs"
rm -rf "$out"
