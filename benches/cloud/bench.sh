#!/usr/bin/env bash
# The cloud drivers (`hetzner`, `digitalocean`, then `fly`) against their fake APIs, whose server is the
# test sshd of .ci/setup-docker.sh (its sessions see the test Docker engine): API requests of
# a run of one task and of ten, and the time from `run_container` on a driver that has not
# provisioned yet to the task's first output byte, next to the plain `docker` driver on the
# same engine, in the same test process. Builds first, so no compile time is counted.
#
#   source .ci/setup-docker.sh   # as root: dockerd, the test sshd, the test image
#   benches/cloud/bench.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
export DOCKER_HOST="${DOCKER_HOST:-unix:///run/ci-exec/docker.sock}"
export RUST_BACKTRACE=0
cargo test -j1 -p ci-exec-cloud --test fake_api --no-run >/dev/null 2>&1
cargo test -j1 -p ci-exec-cloud --test fake_api -- --exact bench_api_requests_and_time_to_first_output \
    --nocapture 2>&1 | grep '^bench:'
# The `fly` driver against its fake, whose machines are containers on the same engine running
# the static ci-exec-init (.ci/setup-fly.sh builds it).
CI=true bash -c 'source .ci/setup-fly.sh'
cargo test -j1 -p ci-exec-cloud --test fake_api -- --exact fly::fly_bench_api_requests_and_time_to_first_output \
    --nocapture 2>&1 | grep '^bench:'
