# Sourced by .ci/run. The `k8s` driver's tests run against the fake API server in
# tests/fake-kube (its pods run on the dockerd of .ci/setup-docker.sh, so that script comes
# first in sorted order); one test drives the fake with the stock `kubectl` (create, attach
# over WebSocket, logs -f). Debian's `kubernetes-client` is 1.20, whose attach speaks SPDY
# only, so kubectl 1.32 comes from dl.k8s.io, checked against its published sha256.
# Idempotent: nothing to do when a kubectl >= 1.30 is on the PATH.
(
    set -euo pipefail
    version=v1.32.4
    if command -v kubectl >/dev/null 2>&1 &&
        kubectl version --client -o json 2>/dev/null |
        grep -Eq '"minor": "(3[0-9]|[4-9][0-9])"'; then
        exit 0
    fi
    if [ "$(id -u)" = 0 ]; then sudo=""; else sudo="sudo"; fi
    workdir="$(mktemp -d)"
    trap 'rm -rf "$workdir"' EXIT
    base="https://dl.k8s.io/release/$version/bin/linux/amd64"
    curl -fsSL --retry 3 -o "$workdir/kubectl" "$base/kubectl"
    curl -fsSL --retry 3 -o "$workdir/kubectl.sha256" "$base/kubectl.sha256"
    echo "$(cat "$workdir/kubectl.sha256")  $workdir/kubectl" | sha256sum --check --quiet
    $sudo install -m 0755 "$workdir/kubectl" /usr/local/bin/kubectl
    kubectl version --client
)
