#!/usr/bin/env bash
# Wall time of the driver conformance suite (13 cases) for the qemu driver, guest OS and podman
# in the guest, against the native driver in the same hyperfine run.
# Usage: benches/qemu/conformance.sh [RUNS]   (needs hyperfine, QEMU, and the default guest image)
# Prints a markdown table; copy it into benches/RESULTS-qemu.md with the date and this command.
set -euo pipefail
runs=${1:-3}
root=$(cd "$(dirname "$0")/../.." && pwd)
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
# The suite's test binary, built once, so that no row pays for compiling.
tests=$(cargo test -q --no-run --message-format=json -p ci-exec-tests --test integration \
    --manifest-path "$root/Cargo.toml" |
    python3 -c 'import json, sys
for line in sys.stdin:
    message = json.loads(line)
    if message.get("reason") == "compiler-artifact" and message.get("executable"):
        print(message["executable"])')
# Make (or reuse) the image's saved VM state first, as a user's second run would find it.
cargo run -q --release -p ci-exec --manifest-path "$root/Cargo.toml" -- run --driver=qemu -- true
. "$root/benches/qemu/common.sh"
host_before
# The suite checks that cargo's env does not leak into tasks, so it needs that env.
CI=true CARGO_PKG_NAME=ci-exec-tests hyperfine --runs "$runs" --export-json "$out/suite.json" \
    -n native "$tests --quiet conformance::native::" \
    -n 'qemu (guest OS)' "$tests --quiet conformance::qemu::" \
    -n 'qemu (podman in the guest)' "$tests --quiet conformance::qemu_podman::" >&2
host_after
median_table "$out/suite.json" 'conformance suite (13 cases)'
