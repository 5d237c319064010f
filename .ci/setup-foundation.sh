# Sourced by .ci/run. The native driver's conformance and CLI tests run host processes with
# `sh`, `cat`, `env`, `printf`, `seq`, `head`, `sleep`, `mkdir`, `touch` and `ulimit`, all from
# Debian's essential packages; this only checks they are there (idempotent, instant).
(
    set -euo pipefail
    missing=""
    for tool in sh cat env printf seq head sleep mkdir touch; do
        command -v "$tool" >/dev/null 2>&1 || missing="$missing $tool"
    done
    if [ -n "$missing" ]; then
        echo "installing coreutils/dash for:$missing" >&2
        if [ "$(id -u)" = 0 ]; then sudo=""; else sudo="sudo"; fi
        $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends coreutils dash
    fi
)
