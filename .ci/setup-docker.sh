# Sourced by .ci/run. The docker and podman drivers' tests run against real engines:
#   - dockerd (Debian's docker.io) with its own data root, exec root and socket
#     (/run/ci-exec/docker.sock), so it never touches a system Docker;
#   - podman's Docker-compatible API service on the rootful well-known socket
#     (/run/podman/podman.sock, what `systemctl start podman.socket` would give);
#   - the test image `localhost/ci-exec/test:latest` in both: a Debian bookworm minbase rootfs
#     made by mmdebstrap from the mirror apt already uses, then `docker import` / `podman import`
#     (no registry is reachable in CI).
#   - `localhost/ci-exec/base:latest`: the test image plus our static `mk`, the default image of
#     image-less tasks (CI_EXEC_DOCKER_IMAGE), where the job flow runs its base-OS steps.
# Exports DOCKER_HOST, CI_EXEC_DOCKER_IMAGE and CI_EXEC_TEST_SSH_HOST (a private sshd on
# 127.0.0.1:2222 for the `host=ssh://…` test), and the same sshd on 127.0.0.2:22 as
# CI_EXEC_TEST_SSH_ADDRESS, _USER and _AUTHORIZED_KEYS for the cloud drivers' fake servers. It does not export CONTAINER_HOST: podman's own
# CLI turns into a remote client when that is set, which would change other setup scripts.
# Idempotent: quick when the daemons answer and the image is present.
#
# What this sandbox needed (measured, Debian bookworm on a firecracker VM, cgroup v1 hybrid,
# root without CAP_SYS_RESOURCE):
#   - dockerd: nothing special (overlay2 and iptables work); a private --data-root/--exec-root.
#   - podman: `--runtime=runc` (crun 1.8 refuses hybrid cgroups: "cgroups in hybrid mode not
#     supported"), `--cgroup-manager=cgroupfs` (no systemd), `--events-backend=file` (no
#     journald); and ulimits nofile=20000:20000, nproc=32768:32768 on every container, which
#     the driver adds itself when it lacks CAP_SYS_RESOURCE.
# No `||` after the subshell: bash ignores `set -e` inside a command whose status is tested.
(
    set -euo pipefail
    trap 'echo "error: .ci/setup-docker.sh: line $LINENO failed (logs in /var/log/ci-exec)" >&2' ERR
    log_dir=/var/log/ci-exec
    cache_dir=/var/cache/ci-exec/docker
    image=localhost/ci-exec/test:latest
    base_image=localhost/ci-exec/base:latest
    docker_socket=/run/ci-exec/docker.sock
    podman_socket=/run/podman/podman.sock
    if [ "$(id -u)" = 0 ]; then sudo=""; else sudo="sudo"; fi

    packages=""
    for tool in dockerd:docker.io podman:podman runc:runc mmdebstrap:mmdebstrap curl:curl \
        sshd:openssh-server ssh:openssh-client; do
        PATH="$PATH:/usr/sbin:/sbin" command -v "${tool%%:*}" >/dev/null 2>&1 || packages="$packages ${tool##*:}"
    done
    if [ -n "$packages" ]; then
        $sudo apt-get update -qq
        # shellcheck disable=SC2086 # the list is split on purpose
        $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $packages
    fi
    $sudo mkdir -p "$log_dir" "$cache_dir" /run/ci-exec /run/podman

    answers() { curl -fsS --max-time 5 --unix-socket "$1" http://engine/_ping >/dev/null 2>&1; }
    wait_for() { # socket, what, log: poll with a deadline
        local deadline=$(( $(date +%s) + 60 ))
        until answers "$1"; do
            if [ "$(date +%s)" -ge "$deadline" ]; then
                echo "error: $2 did not answer on $1 within 60 s; its log:" >&2
                tail -n 30 "$3" >&2 || true
                return 1
            fi
            sleep 0.2
        done
    }

    # The engines start in `/`, not in this checkout: a daemon whose working directory is
    # deleted (a removed clone) makes conmon fail every container start ("write child: broken
    # pipe") while the socket still answers.
    if ! answers "$docker_socket"; then
        (cd / && $sudo setsid -f /usr/sbin/dockerd \
            --data-root /var/lib/ci-exec/docker \
            --exec-root /run/ci-exec/docker \
            --pidfile /run/ci-exec/docker.pid \
            -H "unix://$docker_socket" \
            </dev/null >"$log_dir/dockerd.log" 2>&1)
        wait_for "$docker_socket" dockerd "$log_dir/dockerd.log"
    fi

    podman_flags="--runtime=runc --cgroup-manager=cgroupfs --events-backend=file"
    if ! answers "$podman_socket"; then
        # shellcheck disable=SC2086 # the flags are split on purpose
        (cd / && $sudo setsid -f podman $podman_flags system service --time=0 "unix://$podman_socket" \
            </dev/null >"$log_dir/podman-service.log" 2>&1)
        wait_for "$podman_socket" "the podman service" "$log_dir/podman-service.log"
    fi

    export DOCKER_HOST="unix://$docker_socket"
    missing_in_docker=0
    docker image inspect "$image" >/dev/null 2>&1 || missing_in_docker=1
    missing_in_podman=0
    # shellcheck disable=SC2086
    $sudo podman $podman_flags image exists "$image" || missing_in_podman=1
    if [ $(( missing_in_docker + missing_in_podman )) -gt 0 ]; then
        rootfs="$cache_dir/bookworm-minbase.tar"
        if [ ! -s "$rootfs" ]; then
            # The mirror apt is configured with on this machine, never a hard-coded host.
            sources=""
            for file in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
                [ -s "$file" ] && sources="$sources $file"
            done
            # shellcheck disable=SC2086
            # mmdebstrap picks the output format from the name: keep `.tar` last.
            $sudo mmdebstrap --variant=minbase --quiet bookworm "$cache_dir/partial.tar" $sources
            $sudo mv "$cache_dir/partial.tar" "$rootfs"
        fi
        changes=(--change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' --change 'CMD ["/bin/sh"]')
        if [ "$missing_in_docker" = 1 ]; then
            docker import "${changes[@]}" "$rootfs" "$image" >/dev/null
        fi
        if [ "$missing_in_podman" = 1 ]; then
            # shellcheck disable=SC2086
            $sudo podman $podman_flags import --quiet "${changes[@]}" "$rootfs" "$image" >/dev/null
        fi
    fi

    # The base image of image-less tasks (the job flow's base-OS steps run `mk` there): the
    # test image plus our static mk. Built with each engine's CLI (seed 004: CLIs build
    # images); the COPY layer is cached, so this is quick when mk did not change.
    if command -v rustup >/dev/null 2>&1 && ! rustup target list --installed 2>/dev/null | grep -qx x86_64-unknown-linux-musl; then
        rustup target add x86_64-unknown-linux-musl
    fi
    cargo build --quiet --release --target x86_64-unknown-linux-musl -p mkrunner
    context="$(mktemp -d)"
    cp "${CARGO_TARGET_DIR:-target}/x86_64-unknown-linux-musl/release/mk" "$context/mk"
    printf 'FROM %s\nCOPY mk /usr/local/bin/mk\n' "$image" >"$context/Containerfile"
    DOCKER_BUILDKIT=0 docker build --quiet -t "$base_image" -f "$context/Containerfile" "$context" >/dev/null
    # shellcheck disable=SC2086
    $sudo podman $podman_flags build --quiet --pull=never -t "$base_image" -f "$context/Containerfile" "$context" >/dev/null
    rm -rf "$context"

    # A base image with nothing but a static busybox (no libc, no bash): the job tests run
    # `ci-exec test` in it to show that only a static mk is uploaded.
    busybox_image=localhost/ci-exec/busybox:latest
    if ! docker image inspect "$busybox_image" >/dev/null 2>&1; then
        if [ ! -x /bin/busybox ]; then
            $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends busybox-static
        fi
        rootfs="$(mktemp -d)"
        mkdir -p "$rootfs/bin" "$rootfs/tmp" "$rootfs/etc"
        cp /bin/busybox "$rootfs/bin/busybox"
        "$rootfs/bin/busybox" --install -s "$rootfs/bin"
        # --install links to the absolute path of the busybox that ran it.
        for link in "$rootfs"/bin/*; do
            [ -L "$link" ] && ln -sf busybox "$link"
        done
        tar -C "$rootfs" -c . | docker import --change 'ENV PATH=/bin' --change 'CMD ["/bin/sh"]' - "$busybox_image" >/dev/null
        rm -rf "$rootfs"
    fi

    # `host=ssh://…`: a private sshd on 127.0.0.1:2222 whose sessions see the test dockerd,
    # reached through the host alias `ci-exec-ssh-test` (included into the user's ssh config).
    ssh_dir=/var/lib/ci-exec/ssh
    $sudo mkdir -p "$ssh_dir" /run/sshd
    if [ ! -f "$ssh_dir/host_ed25519" ]; then
        $sudo ssh-keygen -q -t ed25519 -N '' -f "$ssh_dir/host_ed25519"
        # A new host key: forget the old one where the cloud drivers' tests accepted it.
        ssh-keygen -R 127.0.0.2 >/dev/null 2>&1 || true
    fi
    [ -f "$ssh_dir/id_ed25519" ] || $sudo ssh-keygen -q -t ed25519 -N '' -f "$ssh_dir/id_ed25519"
    $sudo chown "$(id -u):$(id -g)" "$ssh_dir/id_ed25519"
    $sudo cp "$ssh_dir/id_ed25519.pub" "$ssh_dir/authorized_keys"
    # 127.0.0.2:22 too: the cloud drivers' fake servers are reached there, on the standard port
    # (the docker driver's ssh transport, bollard, cannot pass a port to ssh).
    printf '%s\n' "Port 2222" "ListenAddress 127.0.0.1" "ListenAddress 127.0.0.2:22" "HostKey $ssh_dir/host_ed25519" \
        "AuthorizedKeysFile $ssh_dir/authorized_keys" "PermitRootLogin prohibit-password" \
        "PasswordAuthentication no" "PidFile /run/ci-exec/sshd.pid" \
        "SetEnv DOCKER_HOST=unix://$docker_socket" | $sudo tee "$ssh_dir/sshd_config" >/dev/null
    printf '%s\n' "Host ci-exec-ssh-test" "  HostName 127.0.0.1" "  Port 2222" \
        "  IdentityFile $ssh_dir/id_ed25519" "  IdentitiesOnly yes" "  StrictHostKeyChecking no" \
        "  UserKnownHostsFile /dev/null" "  LogLevel ERROR" | $sudo tee "$ssh_dir/config" >/dev/null
    mkdir -p "$HOME/.ssh"
    if ! grep -qx "Include $ssh_dir/config" "$HOME/.ssh/config" 2>/dev/null; then
        # An Include before any Host block applies everywhere.
        { echo "Include $ssh_dir/config"; cat "$HOME/.ssh/config" 2>/dev/null || true; } >"$HOME/.ssh/config.new"
        mv "$HOME/.ssh/config.new" "$HOME/.ssh/config"
        chmod 600 "$HOME/.ssh/config"
    fi
    if ! ssh -o BatchMode=yes -o ConnectTimeout=5 "$(id -un)@ci-exec-ssh-test" true 2>/dev/null ||
        ! timeout 5 bash -c '</dev/tcp/127.0.0.2/22' 2>/dev/null; then
        if [ -f /run/ci-exec/sshd.pid ]; then $sudo kill "$(cat /run/ci-exec/sshd.pid)" 2>/dev/null || true; fi
        $sudo /usr/sbin/sshd -f "$ssh_dir/sshd_config" -E "$log_dir/sshd.log"
        ssh -o BatchMode=yes -o ConnectTimeout=10 "$(id -un)@ci-exec-ssh-test" true
    fi
    echo "setup-docker: dockerd on $docker_socket, podman on $podman_socket, images $image and $base_image ready, ssh alias ci-exec-ssh-test" >&2
)
ci_exec_docker_status=$?
export DOCKER_HOST=unix:///run/ci-exec/docker.sock
export CI_EXEC_DOCKER_IMAGE=localhost/ci-exec/base:latest
CI_EXEC_TEST_SSH_HOST="ssh://$(id -un)@ci-exec-ssh-test"
export CI_EXEC_TEST_SSH_HOST
# The same sshd by address, for the cloud drivers' fake APIs (tests/fake-cloud): their servers'
# public IPv4 is this address, and the keys a server is created with go into its authorized_keys.
CI_EXEC_TEST_SSH_ADDRESS=127.0.0.2
CI_EXEC_TEST_SSH_USER="$(id -un)"
CI_EXEC_TEST_SSH_AUTHORIZED_KEYS=/var/lib/ci-exec/ssh/authorized_keys
export CI_EXEC_TEST_SSH_ADDRESS CI_EXEC_TEST_SSH_USER CI_EXEC_TEST_SSH_AUTHORIZED_KEYS
[ "$ci_exec_docker_status" = 0 ]
