#!/usr/bin/env bash
# Remote replay (issue 16), ratios measured in one run, native driver so the numbers are about
# the result store and the orchestrator, not a VM:
#   - the real run of a job whose test leaves a 10 MB artifact
#   - its local replay (the executor's own store)
#   - its remote replay: a fresh executor fetching record and blobs from `ci-exec serve` over
#     loopback, checking signature and digests, then replaying
#   - resident memory of `ci-exec serve` while 10 clients download a 100 MB blob
# Usage: benches/remote/replay.sh [RUNS]   (Markdown on stdout)
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
runs=${1:-10}
for tool in hyperfine curl python3; do
  command -v $tool >/dev/null || { echo "bench: $tool is missing (apt-get install $tool)" >&2; exit 2; }
done
cargo build --release -q --manifest-path "$root/Cargo.toml" -p ci-exec -p mkrunner >&2
bin="${CARGO_TARGET_DIR:-$root/target}/release"
work=$(mktemp -d)
serve_pid=
cleanup() { [ -n "$serve_pid" ] && kill "$serve_pid" 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT
export NO_COLOR=1

# The repository: `mk test` writes 10 MB of random bytes, collected as an artifact.
mkdir -p "$work/repo"
cat > "$work/repo/mkfile" <<'MK'
test:V:
	mkdir -p out
	head -c 10485760 /dev/urandom > out/big.bin
	echo built 10 MB

/var/run/ci/artifacts/big.bin:
	cp out/big.bin $target
MK
git -C "$work/repo" init -q
git -C "$work/repo" remote add origin https://example.com/bench/replay.git
git -C "$work/repo" add -A
git -C "$work/repo" -c user.name=b -c user.email=b@b commit -qm bench

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
url="http://127.0.0.1:$port"
"$bin/ci-exec" serve --listen "127.0.0.1:$port" --data "$work/data" 2>"$work/serve.log" &
serve_pid=$!
for _ in $(seq 100); do curl -fs "$url/status" >/dev/null && break; sleep 0.05; done
publish=$("$bin/ci-exec" token create --data "$work/data" --repo example.com/bench/replay --publish 2>/dev/null)
read_token=$("$bin/ci-exec" token create --data "$work/data" --repo example.com/bench/replay 2>/dev/null)

a="XDG_DATA_HOME=$work/a CI_EXEC_RESULTS=$work/a/results"
b="XDG_DATA_HOME=$work/b CI_EXEC_RESULTS=$work/b/results"
test_cmd="$bin/ci-exec test --driver=native --artifacts $work/out $work/repo"
# Executor A runs and publishes once; B starts empty before each remote replay.
env $a CI_EXEC_ORCHESTRATOR=$url CI_EXEC_TOKEN=$publish $test_cmd >/dev/null 2>&1
json="$work/h.json"
median() { python3 -c "import json; print(json.load(open('$json'))['results'][0]['median'])"; }
hyperfine -N --runs 5 --export-json "$json" "env $a $test_cmd --no-replay" >/dev/null 2>&1
real=$(median)
env $a CI_EXEC_ORCHESTRATOR=$url CI_EXEC_TOKEN=$publish $test_cmd >/dev/null 2>&1
hyperfine -N --warmup 1 --runs "$runs" --export-json "$json" "env $a $test_cmd" >/dev/null 2>&1
local_replay=$(median)
hyperfine -N --runs "$runs" --prepare "rm -rf $work/b" --export-json "$json" \
  "env $b CI_EXEC_ORCHESTRATOR=$url CI_EXEC_TOKEN=$read_token $test_cmd" >/dev/null 2>&1
remote_replay=$(median)
# The last remote replay must really have been one.
rm -rf "$work/b"
check=$(env $b CI_EXEC_ORCHESTRATOR=$url CI_EXEC_TOKEN=$read_token $test_cmd 2>&1 >/dev/null)
case $check in
  *"replaying result"*"from $url"*) ;;
  *) echo "bench: B did not replay from the orchestrator: $check" >&2; exit 1 ;;
esac

# serve's memory while 10 clients download one 100 MB blob at once (rate-limited, so the
# downloads overlap for several seconds).
head -c 104857600 /dev/urandom > "$work/blob"
sha=$(sha256sum "$work/blob" | cut -d' ' -f1)
curl -fs -X PUT -H "Authorization: Bearer $publish" --data-binary @"$work/blob" \
  "$url/example.com/bench/replay/cas/$sha" >/dev/null
rss() { awk '/^VmRSS/ {print $2}' "/proc/$serve_pid/status"; }
idle=$(rss)
pids=()
for i in $(seq 10); do
  curl -fs --limit-rate 25M -H "Authorization: Bearer $read_token" -o "$work/down-$i" \
    "$url/example.com/bench/replay/cas/$sha" &
  pids+=($!)
done
peak=$idle
while kill -0 "${pids[@]}" 2>/dev/null; do
  now=$(rss); [ "$now" -gt "$peak" ] && peak=$now
  sleep 0.05
done
wait "${pids[@]}"
for i in $(seq 10); do
  [ "$(sha256sum "$work/down-$i" | cut -d' ' -f1)" = "$sha" ] || { echo "bench: download $i differs" >&2; exit 1; }
done

fmt() { python3 -c "print(f'{float(\"$1\"):.3f} s')"; }
ratio() { python3 -c "print(f'{float(\"$1\")/float(\"$2\"):.2f}')"; }
echo "### Remote replay ($(date -u +%Y-%m-%d), $(nproc) cores, load $(cut -d' ' -f1 /proc/loadavg))"
echo
echo "Command: \`benches/remote/replay.sh $runs\` (release build, native driver, a 10 MB artifact, orchestrator on loopback)"
echo
echo "| measurement | median | vs the real run |"
echo "|---|---|---|"
echo "| real run (native) | $(fmt "$real") | 1.00 |"
echo "| local replay | $(fmt "$local_replay") | $(ratio "$local_replay" "$real") |"
echo "| remote replay (fresh executor: fetch, verify, replay) | $(fmt "$remote_replay") | $(ratio "$remote_replay" "$real") |"
echo
echo "Remote vs local replay: $(ratio "$remote_replay" "$local_replay")x."
echo
echo "\`ci-exec serve\` resident memory while 10 clients download one 100 MB blob (25 MB/s each): idle $((idle / 1024)) MiB, peak $((peak / 1024)) MiB (+$(((peak - idle) / 1024)) MiB)."
