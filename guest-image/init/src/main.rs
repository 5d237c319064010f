//! `ci-exec-init`: the whole of PID 1 for ci-exec guests, as one static (musl) binary.
//!
//! Why a binary of ours and not a script or systemd: the initramfs has no shell (keeping it
//! to a few hundred KiB of modules and this file is what makes TCG boots take about a second),
//! and systemd spends seconds under TCG before the guest agent is up. This binary is not a
//! service manager: it mounts what podman and the guest agent need, starts the agent, reaps
//! orphans, and powers off on request.
//!
//! It runs in three roles, chosen at start:
//! - **initramfs stage** (`/init` in our cpio, marked by `/etc/ci-exec-initramfs`): loads the
//!   modules listed in `/lib/modules/ci-exec.load` in order (those only podman and the 9p share
//!   need in the background: `modules`), waits for the root disk, mounts it and switches root to `/sbin/ci-exec-init` (or `ci.init=` from the kernel command line,
//!   e.g. `ci.init=/sbin/init` for systemd).
//! - **root stage** (PID 1 on the root filesystem): mounts `/proc /sys /dev /dev/pts /dev/shm
//!   /run /tmp` and cgroup2, brings up loopback, sets the hostname, names the virtio-serial
//!   ports under `/dev/virtio-ports/` (udev's job elsewhere) and keeps `qemu-ga` running.
//!   It also answers the host on the control port (`control`): set the clock, mount the 9p
//!   share, without an exec.
//! - **`poweroff` / `reboot` / `halt` / `shutdown`** (by `argv[0]`): signals PID 1, so the
//!   guest agent's `guest-shutdown` works without systemd.
//! - **`ci-exec-init --follow FILE END`** (any PID): copies a growing file to stdout until
//!   END exists, for the qemu driver's streamed stdin (`follow`).
//! - **`ci-exec-init --agent PORT`** (any PID): the guest agent, for root filesystems
//!   without `qemu-ga` and, as `--agent vsock:1024`, for `ci.transport=vsock` (`agent`).
//! - **`ci-exec-init --task DIR`** (any PID): the qemu driver's task wrapper, which the guest
//!   agent starts (`task`).
//! - **`ci-exec-init --serve DIR`** and its exec commands (`--start`, `--poll`, …): a Fly
//!   Machine's entrypoint and what the `fly` driver runs through the Machines API's `exec`
//!   (`serve`).

mod agent;
mod cmdline;
mod control;
mod follow;
mod initramfs;
mod modules;
mod root;
mod serve;
mod system;
mod task;
mod vsock;

use std::path::Path;

/// Present only in the initramfs that `ci-exec-guest-image` builds.
const INITRAMFS_MARKER: &str = "/etc/ci-exec-initramfs";

fn main() {
    let program = std::env::args().next().unwrap_or_default();
    let name = Path::new(&program)
        .file_name()
        .and_then(|name| name.to_str())
        .unwrap_or_default()
        .to_owned();
    let arguments: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    if let [flag, file, end] = arguments.as_slice()
        && flag == "--follow"
    {
        follow::run(Path::new(file), Path::new(end));
    }
    if let [flag, port] = arguments.as_slice()
        && flag == "--agent"
    {
        agent::run(Path::new(port));
    }
    if let [flag, dir] = arguments.as_slice()
        && flag == "--task"
    {
        task::run(Path::new(dir));
    }
    if let Some(code) = serve::command(&arguments) {
        std::process::exit(code);
    }
    match name.as_str() {
        "poweroff" | "halt" => system::signal_init(libc::SIGUSR2),
        "reboot" => system::signal_init(libc::SIGTERM),
        "shutdown" => {
            let reboot = std::env::args().any(|argument| argument == "-r");
            system::signal_init(if reboot { libc::SIGTERM } else { libc::SIGUSR2 })
        }
        _ if std::process::id() != 1 => {
            eprintln!("ci-exec-init: error: must run as PID 1 (or be called `poweroff`, `reboot`)");
            std::process::exit(2);
        }
        _ if Path::new(INITRAMFS_MARKER).exists() => initramfs::run(),
        _ => root::run(),
    }
}
