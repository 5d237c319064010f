# Sourced by the qemu benchmark scripts: what else the host did while a benchmark ran. This
# machine is a shared VM, so a slow run is often time the hypervisor gave to its neighbours
# ("steal" in /proc/stat), which the load average does not show.
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
