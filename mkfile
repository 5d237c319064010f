# ci-exec's own development tasks, run with our mk:
#   cargo build --release -p mkrunner && target/release/mk check
# `mk test` is what CI runs (through .ci/run); `mk bench` writes the benchmark tables.

check:V:
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings

test:V:
	cargo test --workspace

# The static mk every guest image and container gets.
static-mk:V:
	cargo build --release --target x86_64-unknown-linux-musl -p mkrunner

# The default guest image (Debian bookworm), built once into the user cache.
image:V: static-mk
	cargo run --release -p ci-exec -- image build

# macOS: the vz driver needs the `com.apple.security.virtualization` entitlement, granted by
# an ad-hoc signature with executor/vz/ci-exec.entitlements (sign again after every build).
sign:V:
	cargo build --release -p ci-exec
	codesign --entitlements executor/vz/ci-exec.entitlements --force -s - "${CARGO_TARGET_DIR:-target}/release/ci-exec"

bench:V: bench-mk bench-native bench-job bench-remote bench-qemu bench-k8s

bench-mk:V:
	benches/mk/bench.sh

bench-native:V:
	benches/native/run-overhead.sh

bench-job:V:
	benches/job/bench.sh --drivers 'native qemu'

bench-k8s:V:
	benches/k8s/conformance.sh

bench-remote:V:
	benches/remote/replay.sh
	cargo bench -p ci-exec-remote --bench lookup

bench-qemu:V:
	benches/qemu/bench.sh
	benches/qemu/conformance.sh
