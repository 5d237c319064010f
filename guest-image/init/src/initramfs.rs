//! Stage 1: from our initramfs to the root disk.

use crate::cmdline::Cmdline;
use crate::system;
use std::io;
use std::path::Path;
use std::time::Duration;

pub fn run() -> ! {
    let Err(error) = boot();
    eprintln!("ci-exec-init: error: {error}");
    eprintln!("ci-exec-init: powering off");
    let error = system::power_off(false);
    eprintln!("ci-exec-init: error: {error}");
    std::process::exit(1);
}

/// Only returns on failure: success is the exec of the root stage.
fn boot() -> io::Result<std::convert::Infallible> {
    system::mount_once("devtmpfs", "/dev", "devtmpfs", libc::MS_NOSUID, "mode=0755")?;
    system::mount_once(
        "proc",
        "/proc",
        "proc",
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        "",
    )?;
    system::mount_once(
        "sysfs",
        "/sys",
        "sysfs",
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        "",
    )?;

    let cmdline = Cmdline::parse(&std::fs::read_to_string("/proc/cmdline").unwrap_or_default());
    crate::modules::load(&cmdline)?;

    let root = Path::new(&cmdline.root);
    if !system::wait_for_path(root, Duration::from_secs(cmdline.root_wait_seconds)) {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!(
                "root device `{}` did not appear within {} s (is the disk attached as virtio-blk?)",
                cmdline.root, cmdline.root_wait_seconds
            ),
        ));
    }
    let mut flags = libc::MS_NOATIME;
    if cmdline.read_only {
        flags |= libc::MS_RDONLY;
    }
    std::fs::create_dir_all("/root")?;
    system::mount(
        &cmdline.root,
        Path::new("/root"),
        &cmdline.root_fstype,
        flags,
        &cmdline.root_flags,
    )?;

    for directory in ["/dev", "/proc", "/sys"] {
        let target = format!("/root{directory}");
        std::fs::create_dir_all(&target)?;
        system::mount(directory, Path::new(&target), "", libc::MS_MOVE, "")?;
    }
    system::chdir("/root")?;
    system::mount(".", Path::new("/"), "", libc::MS_MOVE, "")?;
    system::chroot(".")?;
    system::chdir("/")?;
    Err(system::exec(&cmdline.init))
}
