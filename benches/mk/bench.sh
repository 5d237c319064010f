#!/bin/sh
# bench.sh [N]: our mk against 9base mk on a generated mkfile with N (default 10000)
# `%.o: %.c` targets: (1) all up to date, (2) all out of date with -n. Wall time by
# hyperfine, both tools in the same run; peak memory by /usr/bin/time -v.
# Needs: hyperfine, /usr/bin/time, 9base (/usr/lib/plan9/bin/mk), a release build of mk.
set -e
n=${1:-10000}
root=$(cd "$(dirname "$0")/../.." && pwd)
target=${CARGO_TARGET_DIR:-$root/target}
ours=$target/release/mk
reference=/usr/lib/plan9/bin/mk
work=${TMPDIR:-/tmp}/mk-bench.$$
trap 'rm -rf "$work"' EXIT
(cd "$root" && cargo build --release -q -p mkrunner)
"$root/benches/mk/generate.sh" "$work/fresh" "$n" fresh
"$root/benches/mk/generate.sh" "$work/stale" "$n" stale

# The outputs must agree before the times mean anything.
(cd "$work/fresh" && "$reference" > ../fresh.9base && "$ours" > ../fresh.ours)
cmp "$work/fresh.9base" "$work/fresh.ours"
(cd "$work/stale" && "$reference" -n > ../stale.9base && "$ours" -n > ../stale.ours)
cmp "$work/stale.9base" "$work/stale.ours"

echo "## $n targets, all up to date"
(cd "$work/fresh" && hyperfine -N --warmup 2 --export-markdown ../fresh.md \
    -n 9base "$reference" -n ours "$ours")
echo "## $n targets, all out of date, -n"
(cd "$work/stale" && hyperfine -N --warmup 2 --export-markdown ../stale.md \
    -n '9base -n' "$reference -n" -n 'ours -n' "$ours -n")
cat "$work/fresh.md" "$work/stale.md"

echo "## peak memory (maximum resident set size, KiB)"
for tool in "$reference" "$ours"; do
    up=$(cd "$work/fresh" && /usr/bin/time -v "$tool" 2>&1 >/dev/null | awk -F': ' '/Maximum resident/ {print $2}')
    dry=$(cd "$work/stale" && /usr/bin/time -v "$tool" -n 2>&1 >/dev/null | awk -F': ' '/Maximum resident/ {print $2}')
    echo "$tool: up to date $up KiB, -n out of date $dry KiB"
done
