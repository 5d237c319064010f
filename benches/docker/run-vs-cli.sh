#!/usr/bin/env bash
# `ci-exec run --driver=docker -- true` (Engine API through bollard) against `docker run --rm
# IMAGE true` (the CLI), and the same for podman, measured in one hyperfine run each so the
# ratio is against a baseline taken on the same machine at the same moment. Target: ratio ≤ 1.0.
#
#   bash benches/docker/run-vs-cli.sh            # after `bash .ci/setup-docker.sh`
#
# Needs hyperfine, a release `ci-exec` (built here, or CI_EXEC_BIN), dockerd on $DOCKER_HOST and the podman
# service on /run/podman/podman.sock, and the test image. Writes hyperfine's markdown tables
# to $OUT (default: benches/docker/last-run.md).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
image="${CI_EXEC_DOCKER_IMAGE:-localhost/ci-exec/test:latest}"
docker_host="${DOCKER_HOST:-unix:///run/ci-exec/docker.sock}"
podman_host="unix:///run/podman/podman.sock"
runs="${RUNS:-30}"
out="${OUT:-benches/docker/last-run.md}"
target="${CARGO_TARGET_DIR:-target}"

# CI_EXEC_BIN: a release binary built already (a release build takes long on 2 cores).
if [ -n "${CI_EXEC_BIN:-}" ]; then
    ci_exec="$CI_EXEC_BIN"
else
    cargo build --quiet --release -p ci-exec
    ci_exec="$target/release/ci-exec"
fi
docker_cli="$(command -v docker)"
podman_flags="--runtime=runc --cgroup-manager=cgroupfs --events-backend=file"
# Rootful podman without CAP_SYS_RESOURCE needs the same ulimits the driver adds.
podman_ulimits="--ulimit nofile=20000:20000 --ulimit nproc=32768:32768"

: >"$out"
echo "== docker: API (ci-exec) vs CLI, $runs runs" >&2
table="$(mktemp)"
DOCKER_HOST="$docker_host" hyperfine --warmup 3 --runs "$runs" --export-markdown "$table" \
    --command-name "docker run --rm IMAGE true" \
    "$docker_cli run --rm $image true" \
    --command-name "ci-exec run --driver=docker -- true" \
    "$ci_exec run --driver=docker --image=$image -- true"
cat "$table" >>"$out"

echo "== podman: API (ci-exec) vs CLI, $runs runs" >&2
hyperfine --warmup 3 --runs "$runs" --export-markdown "$table" \
    --command-name "podman run --rm IMAGE true" \
    "podman $podman_flags run --rm $podman_ulimits $image true" \
    --command-name "docker -H podman.sock run --rm IMAGE true" \
    "$docker_cli -H $podman_host run --rm $podman_ulimits $image true" \
    --command-name "ci-exec run --driver=podman -- true" \
    "$ci_exec run --driver=podman:host=$podman_host --image=$image -- true"
cat "$table" >>"$out"
rm -f "$table"

# The Engine API requests one run makes, in order (bollard logs each request's URL at debug).
for driver in "docker:host=$docker_host" "podman:host=$podman_host"; do
    {
        echo
        echo "Requests of one \`ci-exec run --driver=${driver%%:*} -- true\`:"
        echo
        RUST_LOG=bollard=debug "$ci_exec" run --driver="$driver" --image="$image" -- true 2>&1 |
            sed -nE 's#^.*debug: [a-z]+://[0-9a-f]*(/[^?]*).*#    \1#p' |
            sed -E '\#/containers/(create|json)$#!{s#/containers/[^/]+/#/containers/NAME/#; s#/containers/[^/]+$#/containers/NAME#}'
    } >>"$out"
done
cat "$out"
