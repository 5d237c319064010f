#!/usr/bin/env bash
# Guest boot A/B: boots the default image cold, one boot per variant in turn, ROUNDS times, and
# prints each variant's median uptime at which the guest's init started the agent (the line
# `ci-exec-init: ready after … s` on the serial console). The machine and kernel arguments are
# the qemu driver's (as `RUST_LOG=ci_exec_qemu=debug ci-exec run --driver=qemu:warm=false`
# prints them), without its sockets.
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
        -append "$cmdline mitigations=off init_on_alloc=0 cryptomgr.notests 8250.nr_uarts=1 rodata=off initcall_blacklist=init_kprobe_trace,init_blk_tracer,crypto_kdf108_init,blake2s_mod_init,load_system_certificate_list,msr_init,vga_arb_device_init no5lvl tsc=reliable no_timer_check $args" \
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
