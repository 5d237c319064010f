#!/usr/bin/env bash
# The conformance suite on the `k8s` driver (against the fake API server, whose pods run on
# Docker) and on the `docker` driver, in the same invocation, so their ratio is what to read;
# then the API requests one task costs on `k8s`. Builds first, so no compile time is counted.
#
#   benches/k8s/conformance.sh
#
# Needs the engine of .ci/setup-docker.sh (DOCKER_HOST defaults to its socket).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
export DOCKER_HOST="${DOCKER_HOST:-unix:///run/ci-exec/docker.sock}"
export CI_EXEC_DOCKER_IMAGE="${CI_EXEC_DOCKER_IMAGE:-localhost/ci-exec/base:latest}"
export RUST_BACKTRACE=0
cargo test -j1 -p ci-exec-tests --test integration --no-run >/dev/null 2>&1
for driver in docker k8s; do
    start=$(date +%s.%N)
    status=0
    cargo test -j1 -p ci-exec-tests --test integration -- "conformance::$driver::" --test-threads 2 \
        >"/tmp/ci-exec-bench-k8s-$driver.log" 2>&1 || status=$?
    end=$(date +%s.%N)
    passed=$(grep -o '[0-9]* passed' "/tmp/ci-exec-bench-k8s-$driver.log" | tail -1)
    printf '%s: %.1f s (%s, exit %s)\n' "$driver" "$(echo "$end - $start" | bc)" "$passed" "$status"
done
cargo test -j1 -p ci-exec-tests --test integration -- k8s::api_requests_per_task --nocapture 2>&1 |
    grep 'API requests'
