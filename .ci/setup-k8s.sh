# Sourced by .ci/run. The `k8s` driver's tests run against the fake API server in
# tests/fake-kube (its pods run on the dockerd of .ci/setup-docker.sh, so that script comes
# first in sorted order); one test drives the fake with the stock `kubectl` (create, attach
# over WebSocket, logs -f). bookworm's `kubernetes-client` is 1.20, whose attach speaks SPDY
# only, so kubectl comes from Debian trixie's `kubectl` package (1.32), fetched and checked
# by apt against Debian's archive key with a private apt state (nothing of the host's apt
# configuration changes). Idempotent: nothing to do when a kubectl >= 1.30 is on the PATH.
(
    set -euo pipefail
    # `"minor": "32"`, or `"32+"` for vendor builds (Google Cloud SDK's dispatcher).
    if command -v kubectl >/dev/null 2>&1 &&
        kubectl version --client -o json 2>/dev/null |
        grep -Eq '"minor": "(3[0-9]|[4-9][0-9])\+?"'; then
        exit 0
    fi
    if [ "$(id -u)" = 0 ]; then sudo=""; else sudo="sudo"; fi
    workdir="$(mktemp -d)"
    trap 'rm -rf "$workdir"' EXIT
    mkdir -p "$workdir/lists/partial" "$workdir/parts"
    : > "$workdir/status"
    echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian trixie main" \
        > "$workdir/sources.list"
    apt=(-q -o "Dir::Etc::SourceList=$workdir/sources.list" -o "Dir::Etc::SourceParts=$workdir/parts"
        -o "Dir::State::Lists=$workdir/lists" -o "Dir::State::status=$workdir/status"
        -o Dir::Cache::pkgcache= -o Dir::Cache::srcpkgcache= -o Acquire::Languages=none
        -o Acquire::IndexTargets::deb::DEP-11::DefaultEnabled=false -o APT::Sandbox::User=root)
    apt-get "${apt[@]}" --error-on=any update >/dev/null
    (cd "$workdir" && apt-get "${apt[@]}" download kubectl >/dev/null)
    dpkg-deb -x "$workdir"/kubectl_*.deb "$workdir/root"
    $sudo install -m 0755 "$workdir/root/usr/bin/kubectl" /usr/local/bin/kubectl
    echo "setup-k8s: $(kubectl version --client | head -n 1)" >&2
)
