#!/usr/bin/env bash
# Writes BENCHMARKS.md from each area's benches/RESULTS-<area>.md (each written by its own
# benchmark script run; every table there names the command and date that produced it).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
{
  cat <<'HEAD'
# Benchmarks

Every number below comes from a benchmark script in `benches/` (never from a timed test), run on
the project's shared 2-core / 24 GiB development machine: QEMU runs under TCG there (its
`/dev/kvm` is a paravirtual KVM that cannot run a stock guest). The host is shared: the
earliest sections were taken while five engineers built and tested at once (load average 10–18
on 2 cores), later ones on a quieter host, and each section states its load. Each comparison ran
its baseline in the same invocation, so the **ratios** are the figures to read. Each section
names the command that produced it; re-run them with `mk bench` (the project's own mkfile). In
the commands, `$TARGET` is the cargo target directory used and `$PREVIOUS` a release build of
the commit compared against.

HEAD
  for area in job native mk qemu image docker; do
    file="$root/benches/RESULTS-$area.md"
    [ -f "$file" ] || continue
    echo
    # Demote the area's headings one level under this page's title.
    sed 's/^#/##/' "$file"
  done
} > "$root/BENCHMARKS.md"
echo "wrote BENCHMARKS.md" >&2
