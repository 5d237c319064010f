# Sourced by .ci/run. The qemu driver's tests boot real VMs (TCG is enough): they need
# qemu-system-x86 and qemu-img (qemu-utils). The guest image itself is built by
# .ci/setup-image.sh, which installs both already. Idempotent: quick when everything is present.
if ! command -v qemu-system-x86_64 >/dev/null 2>&1 || ! command -v qemu-img >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ]; then ci_exec_sudo=""; else ci_exec_sudo="sudo"; fi
    $ci_exec_sudo apt-get update -qq
    # One version for both (see .ci/setup-image.sh): a newer qemu-utils blocks qemu-system-x86.
    ci_exec_qemu_version="$(apt-cache policy qemu-system-x86 | awk '$1 == "Candidate:" { print $2 }')"
    $ci_exec_sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        --allow-downgrades "qemu-utils=$ci_exec_qemu_version" "qemu-system-x86=$ci_exec_qemu_version"
    unset ci_exec_sudo ci_exec_qemu_version
fi
