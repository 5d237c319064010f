//! Stage 1: from our initramfs to the root disk.

use crate::cmdline::Cmdline;
use crate::system;
use std::io;
use std::path::Path;
use std::time::Duration;

/// Module paths (relative to `/lib/modules/`), one per line, in load order. Written by the
/// image builder from `modules.dep`, so this stage never resolves dependencies itself.
const LOAD_LIST: &str = "/lib/modules/ci-exec.load";

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
    load_modules(&cmdline)?;

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

fn load_modules(cmdline: &Cmdline) -> io::Result<()> {
    let list = match std::fs::read_to_string(LOAD_LIST) {
        Ok(list) => list,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(error) => {
            return Err(io::Error::new(
                error.kind(),
                format!("read `{LOAD_LIST}`: {error}"),
            ));
        }
    };
    for relative in list.lines().map(str::trim).filter(|line| !line.is_empty()) {
        let path = Path::new("/lib/modules").join(relative);
        let name = module_name(relative);
        system::load_module(&path, &cmdline.parameters_for(&name))?;
    }
    Ok(())
}

/// `kernel/fs/ext4/ext4.ko` → `ext4`; `virtio-mmio` style names fold to underscores.
fn module_name(relative: &str) -> String {
    let file = relative.rsplit('/').next().unwrap_or(relative);
    let stem = file.split(".ko").next().unwrap_or(file);
    stem.replace('-', "_")
}

#[cfg(test)]
mod tests {
    #[test]
    fn module_names_from_paths() {
        assert_eq!(super::module_name("kernel/fs/ext4/ext4.ko"), "ext4");
        assert_eq!(
            super::module_name("kernel/drivers/virtio/virtio-mmio.ko.xz"),
            "virtio_mmio"
        );
    }
}
