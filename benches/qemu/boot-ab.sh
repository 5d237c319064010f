#!/usr/bin/env bash
# Guest boot A/B: boots the default image cold, one boot per variant in turn, ROUNDS times, and
# prints each variant's median uptime at which the guest's init started the agent (the line
# `ci-exec-init: ready after … s` on the serial console). The machine is the qemu driver's,
# without its sockets; the kernel arguments the driver adds to the image's are asked of the
# driver itself (one cold `ci-exec run` that logs its QEMU command line), so they cannot drift
# from `executor/qemu/src/machine.rs`. CI_EXEC_BIN: an already built `ci-exec`.
#
# Usage: benches/qemu/boot-ab.sh ROUNDS VARIANT...
#   VARIANT: "KEY=value ...;extra kernel arguments", where KEY is one of
#     IMAGE   an image directory (default: the current debian-bookworm)
#     CPU     the -cpu model (default: max)
#     MACHINE extra -machine properties, e.g. ",acpi=off"
#   e.g. benches/qemu/boot-ab.sh 6 ";" ";no5lvl" "IMAGE=$HOME/.cache/ci-exec/images/debian-bookworm/<digest>;"
set -euo pipefail
rounds=$1
shift
cache=${XDG_CACHE_HOME:-$HOME/.cache}/ci-exec/images/debian-bookworm
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
root=$(cd "$(dirname "$0")/../.." && pwd)
bin=${CI_EXEC_BIN:-}
if [ -z "$bin" ]; then
    cargo build -q --release -p ci-exec --manifest-path "$root/Cargo.toml"
    bin=${CARGO_TARGET_DIR:-$root/target}/release/ci-exec
fi
# The words of the driver's `-append` that the default image's own command line lacks.
RUST_LOG=ci_exec_qemu=debug "$bin" run --driver=qemu:warm=false -- true >"$work/driver.log" 2>&1
driver_arguments=$(python3 - "$work/driver.log" "$(readlink -f "$cache/current")/manifest.json" <<'PY'
import json, re, sys
line = next(line for line in open(sys.argv[1]) if "starting qemu" in line)
arguments = json.loads(re.search(r"arguments=(\[.*\])", line).group(1))
image = json.load(open(sys.argv[2]))["kernel_cmdline"].split()
print(" ".join(word for word in arguments[arguments.index("-append") + 1].split() if word not in image))
PY
)
echo "driver's kernel arguments: $driver_arguments"
boot() { # IMAGE CPU MACHINE ARGS → the ready uptime, or "-"
    local image=$1 cpu=$2 machine=$3 args=$4 cmdline
    cmdline=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["kernel_cmdline"])' "$image/manifest.json")
    rm -f "$work/overlay.qcow2" "$work/console.log"
    mkdir -p "$work/share"
    qemu-img create -q -f qcow2 -F qcow2 -b "$image/disk.qcow2" "$work/overlay.qcow2"
    timeout 15 qemu-system-x86_64 -accel tcg \
        -machine "microvm,pit=on,pic=off,rtc=on,isa-serial=on$machine" -cpu "$cpu" -m 2048 -smp 2 \
        -nodefaults -no-user-config -display none -no-reboot -nic none \
        -kernel "$image/vmlinux" -initrd "$image/initrd.cpio" \
        -append "$cmdline $driver_arguments $args" \
        -chardev "file,id=console,path=$work/console.log" -serial chardev:console \
        -drive "id=root,if=none,format=qcow2,cache=unsafe,file=$work/overlay.qcow2" -device virtio-blk-device,drive=root \
        -device virtio-serial-device,max_ports=3 -chardev socket,id=qga,path="$work/qga.sock",server=on,wait=off \
        -device virtserialport,chardev=qga,name=org.qemu.guest_agent.0 \
        -fsdev "local,id=share,path=$work/share,security_model=none" -device virtio-9p-device,fsdev=share,mount_tag=ci \
        >/dev/null 2>&1 &
    local qemu=$! ready=""
    for _ in $(seq 1 300); do
        ready=$(grep -a -o 'ready after [0-9.]*' "$work/console.log" 2>/dev/null | cut -d' ' -f3) || true
        [ -n "$ready" ] && break
        sleep 0.05
    done
    kill "$qemu" 2>/dev/null || true
    wait "$qemu" 2>/dev/null || true
    echo "${ready:--}"
}
declare -A times
for _ in $(seq 1 "$rounds"); do
    for variant in "$@"; do
        IMAGE=$(readlink -f "$cache/current") CPU=max MACHINE=""
        for assignment in ${variant%%;*}; do
            case $assignment in
                IMAGE=*|CPU=*|MACHINE=*) declare "$assignment" ;;
                *) echo "unknown variant setting \`$assignment\`" >&2; exit 2 ;;
            esac
        done
        times[$variant]="${times[$variant]:-} $(boot "$IMAGE" "$CPU" "$MACHINE" "${variant#*;}")"
    done
done
echo "load average: $(cut -d' ' -f1-3 /proc/loadavg)"
for variant in "$@"; do
    median=$(tr ' ' '\n' <<<"${times[$variant]}" | grep -v '^-*$' | sort -n | awk '{a[NR]=$1} END {print (NR ? a[int((NR+1)/2)] : "-")}')
    echo "\`$variant\`: median $median s of [${times[$variant]} ]"
done
