# Sourced by .ci/run. The qemu driver's tests boot real VMs (TCG is enough): they need
# qemu-system-x86 and qemu-img (qemu-utils). The guest image itself is built by
# .ci/setup-image.sh. Idempotent: quick when everything is present.
ci_exec_qemu_packages=""
command -v qemu-system-x86_64 >/dev/null 2>&1 || ci_exec_qemu_packages="$ci_exec_qemu_packages qemu-system-x86"
command -v qemu-img >/dev/null 2>&1 || ci_exec_qemu_packages="$ci_exec_qemu_packages qemu-utils"
if [ -n "$ci_exec_qemu_packages" ]; then
    if [ "$(id -u)" = 0 ]; then ci_exec_sudo=""; else ci_exec_sudo="sudo"; fi
    $ci_exec_sudo apt-get update -qq
    # shellcheck disable=SC2086 # the list is split on purpose
    $ci_exec_sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $ci_exec_qemu_packages
    unset ci_exec_sudo
fi
unset ci_exec_qemu_packages
