# Sourced by .ci/run. The mkrunner differential suite compares our mk with Debian's 9base mk,
# and the musl target builds the static mk. Idempotent: quick when everything is present.
if [ ! -x /usr/lib/plan9/bin/mk ]; then
    if [ "$(id -u)" = 0 ]; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq 9base
    else
        sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq 9base
    fi
fi
if command -v rustup >/dev/null 2>&1 && ! rustup target list --installed 2>/dev/null | grep -qx x86_64-unknown-linux-musl; then
    rustup target add x86_64-unknown-linux-musl
fi
