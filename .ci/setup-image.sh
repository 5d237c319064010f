# Sourced by .ci/run. Builds the default guest image (`debian-bookworm`) and its cloud-init
# variant into the user cache
# ($XDG_CACHE_HOME/ci-exec/images) so the VM tests have it; when the cached image is current
# (same recipe, packages request, mk and init binaries) the build returns at once. Needs the
# Debian mirror this machine's apt uses and, on x86_64, Ubuntu's archive (archive.ubuntu.com)
# for the guest kernel (`--kernel debian` avoids it). Builds here run as root; the user `ci-exec-builder`
# (with subordinate id ranges) is made for the test that builds as a normal user through
# mmdebstrap's unshare mode. Idempotent: quick when everything is present.
(
    set -euo pipefail
    packages=""
    for tool in mmdebstrap:mmdebstrap qemu-img:qemu-utils qemu-system-x86_64:qemu-system-x86 \
        mkfs.ext4:e2fsprogs xz:xz-utils podman:podman fsck.vfat:dosfstools blkid:util-linux \
        newuidmap:uidmap runuser:util-linux; do
        PATH="$PATH:/usr/sbin:/sbin" command -v "${tool%%:*}" >/dev/null 2>&1 || packages="$packages ${tool##*:}"
    done
    if [ "$(id -u)" = 0 ]; then sudo=""; else sudo="sudo"; fi
    if [ -n "$packages" ]; then
        $sudo apt-get update -qq
        # shellcheck disable=SC2086 # the list is split on purpose
        $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $packages
    fi
    builder=ci-exec-builder
    if ! id -u "$builder" >/dev/null 2>&1; then
        $sudo useradd --create-home --shell /usr/sbin/nologin "$builder"
    fi
    if ! grep -q "^$builder:" /etc/subuid || ! grep -q "^$builder:" /etc/subgid; then
        $sudo usermod --add-subuids 300000-365535 --add-subgids 300000-365535 "$builder"
    fi
    if command -v rustup >/dev/null 2>&1 && ! rustup target list --installed 2>/dev/null | grep -qx x86_64-unknown-linux-musl; then
        rustup target add x86_64-unknown-linux-musl
    fi
    target="${CARGO_TARGET_DIR:-target}"
    cargo build --quiet --release --target x86_64-unknown-linux-musl -p mkrunner -p ci-exec-guest-init
    musl="$target/x86_64-unknown-linux-musl/release"
    started=$(date +%s)
    cargo build --quiet -p ci-exec-guest-image --example build_image
    example="$target/debug/examples/build_image"
    "$example" "$musl/mk" "$musl/ci-exec-init" default >/dev/null
    echo "setup-image: default guest image ready ($(( $(date +%s) - started )) s)" >&2
    # The variant with systemd and Debian's cloud-init, for the NoCloud seed boot test.
    "$example" "$musl/mk" "$musl/ci-exec-init" cloud-init >/dev/null
    echo "setup-image: cloud-init variant ready ($(( $(date +%s) - started )) s)" >&2
) || { echo "error: .ci/setup-image.sh failed to build the default guest image" >&2; false; }
