#!/usr/bin/env bash
# Per-task overhead of `ci-exec run --driver=native -- true` against a bare `sh -c true` spawn,
# and the startup time of `ci-exec --version`, all measured in the same hyperfine run so the
# ratios compare like with like. Target: run overhead (run minus bare spawn) <= 5 ms.
#
#   bash benches/native/run-overhead.sh            # builds target/release/ci-exec if needed
#   CI_EXEC_BIN=/path/to/ci-exec bash benches/native/run-overhead.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
target_dir="${CARGO_TARGET_DIR:-target}"
bin="${CI_EXEC_BIN:-$target_dir/release/ci-exec}"
if [ -z "${CI_EXEC_BIN:-}" ]; then
    cargo build --release --quiet -p ci-exec
fi
command -v hyperfine >/dev/null || { echo "error: hyperfine not found: apt-get install hyperfine" >&2; exit 2; }
out=benches/out
mkdir -p "$out"
state="$(mktemp -d)"
trap 'rm -rf "$state"' EXIT
export CI_EXEC_NATIVE_STATE_DIR="$state"
runs="${RUNS:-300}"

hyperfine --shell=none --warmup 20 --runs "$runs" --export-json "$out/native-run.json" \
    --command-name "sh -c true" "sh -c true" \
    --command-name "ci-exec --version" "$bin --version" \
    --command-name "ci-exec run --driver=native -- true" "$bin run --driver=native -- true"

python3 - "$out/native-run.json" <<'PY'
import json, sys
results = {r["command"]: r for r in json.load(open(sys.argv[1]))["results"]}
base = results["sh -c true"]
print(f"\n{'command':40} {'mean ms':>9} {'median ms':>10} {'× sh -c true':>13}")
for name, r in results.items():
    print(f"{name:40} {r['mean']*1e3:9.2f} {r['median']*1e3:10.2f} {r['mean']/base['mean']:13.2f}")
run = results["ci-exec run --driver=native -- true"]
overhead = (run["median"] - base["median"]) * 1e3
print(f"\nper-task overhead (median run - median bare spawn): {overhead:.2f} ms (target <= 5 ms)")
PY
# The runs used a generated namespace each: nothing may be left behind.
leftover="$(find "$state" -mindepth 1 -maxdepth 1 | wc -l)"
echo "namespaces left in the state dir: $leftover"
