#!/usr/bin/env bash
# Benchmarks of `ci-exec test` (issue 6), ratios measured in one run:
#   - replay vs a real run of a job that takes ~10 s (target: replay <= 0.2 s and >= 50x faster)
#   - `ci-exec test` on tests/examples/hello: native (real run) vs plain `mk test`, and qemu
#     (cold and warm) when a guest image is built
#   - result store size per result
# Usage: benches/job/bench.sh [--drivers "native qemu"]   (writes a Markdown table to stdout)
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
drivers="native"
if [ "${1:-}" = "--drivers" ]; then drivers=$2; fi
command -v hyperfine >/dev/null || { echo "bench: hyperfine is missing: apt-get install hyperfine" >&2; exit 2; }

# CI_EXEC_BIN: a directory with release `ci-exec` and `mk` already built; otherwise they are
# built here (BENCH_CARGO_FLAGS, e.g. --no-default-features, selects the features).
if [ -n "${CI_EXEC_BIN:-}" ]; then
  bin=$CI_EXEC_BIN
else
  cargo build --release -q --manifest-path "$root/Cargo.toml" -p ci-exec -p mkrunner ${BENCH_CARGO_FLAGS:-} >&2
  bin="${CARGO_TARGET_DIR:-$root/target}/release"
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export CI_EXEC_RESULTS="$work/store" NO_COLOR=1

repo() { # name mkfile-source-dir
  mkdir -p "$work/$1" && cp -r "$2"/. "$work/$1/"
  git -C "$work/$1" init -q
  git -C "$work/$1" add -A
  git -C "$work/$1" -c user.name=b -c user.email=b@b commit -qm bench
}
repo hello "$root/tests/examples/hello"
mkdir -p "$work/slow-src"
printf 'test:V:\n\techo working\n\tsleep 10\n\techo done\n' > "$work/slow-src/mkfile"
repo slow "$work/slow-src"

json="$work/hyperfine.json"
echo "# ci-exec test ($(date -u +%Y-%m-%d), $(nproc) cores, $(uname -r))"
echo
echo "Command: \`benches/job/bench.sh --drivers \"$drivers\"\`"
echo
echo "| measurement | median | vs baseline |"
echo "|---|---|---|"

median() { python3 -c "import json,sys; r=json.load(open('$json'))['results']; print(' '.join(str(x['median']) for x in r))"; }
fmt() { python3 -c "print(f'{float(\"$1\"):.3f} s')"; }
ratio() { python3 -c "print(f'{float(\"$1\")/float(\"$2\"):.2f}x')"; }

# Replay vs a real run of a ~10 s job (native driver, so the ratio is about the store, not a VM).
(cd "$work/slow" && "$bin/ci-exec" test --driver=native >/dev/null 2>&1)
hyperfine -N --warmup 1 --runs 20 --export-json "$json" \
  "$bin/ci-exec test --driver=native $work/slow" >/dev/null 2>&1
replay=$(median)
hyperfine -N --runs 3 --export-json "$json" \
  "$bin/ci-exec test --driver=native --no-replay $work/slow" >/dev/null 2>&1
real=$(median)
echo "| real run of a 10 s job (native) | $(fmt "$real") | baseline |"
echo "| replay of the same job | $(fmt "$replay") | $(ratio "$real" "$replay") faster |"

# hello: plain mk test vs ci-exec test on each driver.
hyperfine -N --warmup 2 --runs 10 --export-json "$json" \
  "$bin/mk -f $work/hello/mkfile test" >/dev/null 2>&1
plain=$(median)
echo "| \`mk test\` on examples/hello, plain | $(fmt "$plain") | baseline |"
for driver in $drivers; do
  hyperfine -N --warmup 1 --runs 5 --export-json "$json" \
    "$bin/ci-exec test --driver=$driver --no-replay $work/hello" >/dev/null 2>&1
  t=$(median)
  echo "| \`ci-exec test --driver=$driver --no-replay\` on examples/hello | $(fmt "$t") | $(ratio "$t" "$plain") of plain mk |"
done

size=$(du -sb "$CI_EXEC_RESULTS/ok" "$CI_EXEC_RESULTS/blobs" | awk '{s+=$1} END {print s}')
count=$(ls "$CI_EXEC_RESULTS/ok" | wc -l)
echo "| store size per successful result (records + blobs / $count) | $((size / count)) bytes | |"
