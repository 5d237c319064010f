#!/usr/bin/env bash
# Benchmarks for issue #4 (guest images): default image build time from scratch and from a warm
# apt cache, image size, and cloud-init seed build time. Run as root from anywhere:
#   bash benches/image/run.sh            # writes nothing; copy the numbers into RESULTS-image.md
# Needs the Debian mirror the host's apt uses, mmdebstrap, qemu-img, podman, hyperfine.
set -euo pipefail
cd "$(dirname "$0")/../.."
target="${CARGO_TARGET_DIR:-target}"
cargo build --quiet --release --target x86_64-unknown-linux-musl -p mkrunner -p ci-exec-guest-init
cargo build --quiet --release -p ci-exec-guest-image --example build_image
cargo build --quiet --release -p ci-exec-cloud-init --example seed_image
musl="$target/x86_64-unknown-linux-musl/release"
build="$target/release/examples/build_image $musl/mk $musl/ci-exec-init default"
scratch=$(mktemp -d /var/tmp/ci-exec-image-bench.XXXXXX)
trap 'rm -rf "$scratch"' EXIT

echo "== default image, from scratch (empty image cache and apt archive)"
hyperfine --runs 1 --prepare "rm -rf $scratch/cold" "XDG_CACHE_HOME=$scratch/cold $build"

echo "== default image, warm apt archive (image removed, downloaded packages kept)"
XDG_CACHE_HOME=$scratch/warm $build >/dev/null 2>&1
hyperfine --runs 2 --prepare "rm -rf $scratch/warm/ci-exec/images/debian-bookworm" "XDG_CACHE_HOME=$scratch/warm $build"

echo "== current image: no-op rebuild"
hyperfine --warmup 1 --runs 5 "XDG_CACHE_HOME=$scratch/warm $build"

echo "== sizes"
du -b "$scratch"/warm/ci-exec/images/debian-bookworm/current/* | sed "s|$scratch/warm/||"
qemu-img info "$scratch"/warm/ci-exec/images/debian-bookworm/current/disk.qcow2 | grep -E 'virtual size|disk size'

echo "== cloud-init seed image (FAT12 CIDATA, 64 KiB write_files)"
hyperfine --warmup 3 --runs 50 -N "$target/release/examples/seed_image $scratch/seed.img"
