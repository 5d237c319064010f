#!/bin/sh
# check-static.sh: build the static musl mk and run it in an empty root that holds only it
# and a static busybox (for /bin/sh), proving it needs nothing from the host.
# Needs: the x86_64-unknown-linux-musl target, busybox-static, root (for chroot).
set -e
root=$(cd "$(dirname "$0")/.." && pwd)
target=${CARGO_TARGET_DIR:-$root/target}
(cd "$root" && cargo build -q --release --target x86_64-unknown-linux-musl -p mkrunner)
mk=$target/x86_64-unknown-linux-musl/release/mk
file "$mk"
if ldd "$mk" 2>&1 | grep -q '=>'; then
    echo "error: $mk has dynamic dependencies" >&2
    ldd "$mk" >&2
    exit 1
fi
bare=$(mktemp -d)
trap 'rm -rf "$bare"' EXIT
mkdir -p "$bare/bin" "$bare/work"
cp "$mk" "$bare/bin/mk"
cp /bin/busybox "$bare/bin/busybox"
for tool in sh cat echo touch; do ln -s busybox "$bare/bin/$tool"; done
printf 'all:V: out.txt\n\tcat out.txt\nout.txt:\n\techo made $target > $target\n' > "$bare/work/mkfile"
chroot "$bare" /bin/sh -c 'cd /work && PATH=/bin && export PATH && mk && mk out.txt'
