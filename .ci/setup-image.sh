# Builds the default guest image (`debian-bookworm`) into the user cache
# ($XDG_CACHE_HOME/ci-exec/images): README's first command runs it, and .ci/run sources it so
# the VM tests have the image. When the cached image is current (same recipe, packages request,
# mk and init binaries) the build returns at once. Needs the Debian mirror this machine's apt
# uses and, on x86_64, Ubuntu's archive (archive.ubuntu.com) for the guest kernel
# (`--kernel debian` avoids it). Idempotent: quick when everything is present.
#
# Every step that fails stops the script with its own message and a non-zero status. No `||`
# after the subshell: bash ignores `set -e` inside a command whose status is tested.
(
    set -euo pipefail
    trap 'echo "error: .ci/setup-image.sh: line $LINENO failed; the default guest image was not built" >&2' ERR
    if [ "$(id -u)" = 0 ]; then sudo=""; else sudo="sudo"; fi
    tools="mmdebstrap:mmdebstrap qemu-img:qemu-utils qemu-system-x86_64:qemu-system-x86
        mkfs.ext4:e2fsprogs xz:xz-utils podman:podman fsck.vfat:dosfstools blkid:util-linux
        newuidmap:uidmap runuser:util-linux"
    missing() {
        local tool packages=""
        for tool in $tools; do
            PATH="$PATH:/usr/sbin:/sbin" command -v "${tool%%:*}" >/dev/null 2>&1 || packages="$packages ${tool##*:}"
        done
        echo "$packages"
    }
    packages="$(missing)"
    if [ -n "$packages" ]; then
        $sudo apt-get update -qq
        # qemu-system-x86 and qemu-utils come from one source package and must have the same
        # version: Debian's qemu-system-x86 cannot be installed beside a newer qemu-utils (one
        # from backports, say), so both are installed together at the version the sources
        # offer for qemu-system-x86, replacing (even downgrading) the qemu-utils there is.
        case "$packages" in *qemu-*)
            version="$(apt-cache policy qemu-system-x86 | awk '$1 == "Candidate:" { print $2 }')"
            packages="$(echo "$packages" | tr ' ' '\n' | grep -v '^qemu-' | tr '\n' ' ')"
            packages="$packages qemu-utils=$version qemu-system-x86=$version"
            ;;
        esac
        # shellcheck disable=SC2086 # the list is split on purpose
        $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends --allow-downgrades $packages
        still="$(missing)"
        if [ -n "$still" ]; then
            echo "error: .ci/setup-image.sh: still missing after apt-get install:$still" >&2
            exit 1
        fi
    fi
    if command -v rustup >/dev/null 2>&1 && ! rustup target list --installed 2>/dev/null | grep -qx x86_64-unknown-linux-musl; then
        rustup target add x86_64-unknown-linux-musl
    fi
    target="${CARGO_TARGET_DIR:-target}"
    cargo build --quiet --release --target x86_64-unknown-linux-musl -p mkrunner -p ci-exec-guest-init
    musl="$target/x86_64-unknown-linux-musl/release"
    started=$(date +%s)
    cargo build --quiet -p ci-exec-guest-image --example build_image
    "$target/debug/examples/build_image" "$musl/mk" "$musl/ci-exec-init" default >/dev/null
    echo "setup-image: default guest image ready ($(( $(date +%s) - started )) s)" >&2
)
