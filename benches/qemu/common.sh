# Sourced by the qemu benchmark scripts.

# What else the host did while a benchmark ran. This machine is a shared VM, so a slow run is
# often time the hypervisor gave to its neighbours ("steal" in /proc/stat), which the load
# average does not show.
host_cpu() { awk '/^cpu /{ print $2 + $3 + $4 + $5 + $6 + $7 + $8 + $9, $9 }' /proc/stat; }
host_before() {
    read -r host_total host_steal < <(host_cpu)
    echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
}
host_after() {
    local total steal
    read -r total steal < <(host_cpu)
    echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
    echo "CPU time stolen by the host meanwhile: $(( 100 * (steal - host_steal) / (total - host_total) ))%" >&2
}

# The medians (and the spread) of hyperfine's JSON export $1 as a markdown table whose first
# column is headed $2, with each row's ratio to the first row (the baseline of the run).
median_table() {
    python3 - "$1" "$2" <<'PY'
import json, sys
results = json.load(open(sys.argv[1]))["results"]
base = results[0]["median"]
def t(seconds):
    return f"{seconds * 1000:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"
print(f"| {sys.argv[2]} | median | min … max | vs {results[0]['command']} |")
print("|---|---|---|---|")
for r in results:
    print(f"| {r['command']} | {t(r['median'])} | {t(r['min'])} … {t(r['max'])} | {r['median'] / base:.0f}× |")
PY
}
