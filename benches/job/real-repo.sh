#!/usr/bin/env bash
# Issue 15's measures, ratios against baselines taken in the same hyperfine invocation:
#   - the hello job on a warm qemu VM (`ci-exec test --no-replay`) vs a bare warm
#     `ci-exec run --driver=qemu -- true` (targets: <= 3 s, <= 4x);
#   - a repository shaped like a real one (base-image runs `podman build` with a RUN that
#     downloads from a server on the host; ENV PATH; env file; cache target; artifact):
#     its first run vs a second run of the same repository (target: second <= 0.4x first).
# Usage: benches/job/real-repo.sh [RUNS]   (writes a Markdown table to stdout)
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
runs=${1:-5}
command -v hyperfine >/dev/null || { echo "bench: hyperfine is missing: apt-get install hyperfine" >&2; exit 2; }
if [ -n "${CI_EXEC_BIN:-}" ]; then
  bin=$CI_EXEC_BIN
else
  cargo build --release -q --manifest-path "$root/Cargo.toml" -p ci-exec -p mkrunner >&2
  bin="${CARGO_TARGET_DIR:-$root/target}/release"
fi
work=$(mktemp -d)
server_pid=""
trap '[ -n "$server_pid" ] && kill "$server_pid" 2>/dev/null; rm -rf "$work"' EXIT
export CI_EXEC_RESULTS="$work/store" NO_COLOR=1

commit() { git -C "$1" init -q && git -C "$1" add -A && git -C "$1" -c user.name=b -c user.email=b@b commit -qm bench; }
mkdir -p "$work/hello" && cp -r "$root/tests/examples/hello/." "$work/hello/" && commit "$work/hello"

# The real-shaped repository and the server its image build downloads from.
mkdir -p "$work/www" && echo "payload" > "$work/www/index.html"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("",0)); print(s.getsockname()[1])')
(cd "$work/www" && exec python3 -m http.server "$port" --bind 0.0.0.0 >/dev/null 2>&1) &
server_pid=$!
mkdir -p "$work/real"
cat > "$work/real/Containerfile" <<'CONTAINERFILE'
FROM localhost/ci-exec/base:latest
ARG SERVER
RUN mkdir -p /opt/tool && printf '#!/bin/sh\necho tool ran\n' > /opt/tool/thetool && chmod +x /opt/tool/thetool
RUN bash -c 'exec 3<>/dev/tcp/${SERVER%:*}/${SERVER#*:} && printf "GET / HTTP/1.0\r\n\r\n" >&3 && cat <&3 > /opt/tool/fetched'
ENV PATH=/opt/tool:$PATH
CONTAINERFILE
printf 'prepare-runtime:V: base-image\n\ttrue\nbase-image:V:\n\tpodman build -q --build-arg SERVER=$SERVER -t localhost/tool:1 .\n/var/run/ci/env/CONTAINERIMAGE: base-image\n\techo localhost/tool:1 > $target\n/var/run/ci/cache/deps:\n\tmkdir -p $target\ntest:V:\n\tthetool\n/var/run/ci/artifacts/report.txt:\n\techo report > $target\n' > "$work/real/mkfile"
commit "$work/real"
export SERVER="10.0.2.2:$port"

json="$work/hyperfine.json"
median() { python3 -c "import json; r=json.load(open('$json'))['results']; print(' '.join(str(x['median']) for x in r))"; }
fmt() { python3 -c "print(f'{float(\"$1\"):.3f} s')"; }
ratio() { python3 -c "print(f'{float(\"$1\")/float(\"$2\"):.2f}x')"; }

echo "# issue 15 measures ($(date -u '+%Y-%m-%d %H:%M'), $(nproc) cores, $(uname -r), QEMU under $("$bin/ci-exec" doctor --no-boot --json 2>/dev/null | python3 -c 'import json,sys; print(json.load(sys.stdin).get("accel",{}).get("accel","?"))' 2>/dev/null || echo '?'))"
echo
echo "Command: \`benches/job/real-repo.sh $runs\`"
echo
echo "| measurement | median | ratio |"
echo "|---|---|---|"
# Warm states for both commands first (a cold start saves one).
"$bin/ci-exec" run --driver=qemu -- true >/dev/null 2>&1
(cd "$work/hello" && "$bin/ci-exec" test --no-replay >/dev/null 2>&1)
hyperfine -N --warmup 1 --runs "$runs" --export-json "$json" \
  "$bin/ci-exec run --driver=qemu -- true" \
  "$bin/ci-exec test --no-replay $work/hello" >/dev/null 2>&1
read -r bare hello <<<"$(median)"
echo "| bare warm \`ci-exec run --driver=qemu -- true\` | $(fmt "$bare") | baseline |"
echo "| hello job, warm VM (\`ci-exec test --no-replay\`) | $(fmt "$hello") | $(ratio "$hello" "$bare") of bare |"

hyperfine -N --runs 1 --export-json "$json" \
  "$bin/ci-exec test --env SERVER --no-replay $work/real" >/dev/null 2>&1
first=$(median)
hyperfine -N --runs "$runs" --export-json "$json" \
  "$bin/ci-exec test --env SERVER --no-replay $work/real" >/dev/null 2>&1
second=$(median)
echo "| real-shaped repository, first run | $(fmt "$first") | baseline |"
echo "| the same repository, later runs | $(fmt "$second") | $(ratio "$second" "$first") of first |"
