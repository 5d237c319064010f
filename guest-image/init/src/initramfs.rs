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
    mount_root(&cmdline, flags)?;
    if cmdline.install {
        install(Path::new("/root"))?;
    }

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

/// Mounts the root filesystem on `/root`: `root=` itself, or, when it is a whole disk with
/// partitions (a cloud image: Ubuntu's has its root on 1 and `/boot` on 16), the first
/// partition that mounts and has an `/etc/os-release`.
fn mount_root(cmdline: &Cmdline, flags: libc::c_ulong) -> io::Result<()> {
    let target = Path::new("/root");
    let partitions = partitions_of(&cmdline.root);
    if partitions.is_empty() {
        return system::mount(
            &cmdline.root,
            target,
            &cmdline.root_fstype,
            flags,
            &cmdline.root_flags,
        );
    }
    let mut tried = Vec::new();
    for partition in &partitions {
        // Partition nodes appear a moment after the disk's.
        system::wait_for_path(Path::new(partition), Duration::from_secs(2));
        match system::mount(
            partition,
            target,
            &cmdline.root_fstype,
            flags,
            &cmdline.root_flags,
        ) {
            Ok(()) if target.join("etc/os-release").exists() => return Ok(()),
            Ok(()) => {
                tried.push(format!("{partition}: no etc/os-release"));
                system::unmount(target)?;
            }
            Err(error) => tried.push(format!("{partition}: {error}")),
        }
    }
    Err(io::Error::new(
        io::ErrorKind::NotFound,
        format!(
            "no partition of `{}` is a {} root filesystem ({})",
            cmdline.root,
            cmdline.root_fstype,
            tried.join("; ")
        ),
    ))
}

/// `/dev/vdaN` for each partition of the disk `/dev/vda`, in partition order (from sysfs).
fn partitions_of(disk: &str) -> Vec<String> {
    let Some(name) = disk.strip_prefix("/dev/") else {
        return Vec::new();
    };
    let Ok(entries) = std::fs::read_dir(format!("/sys/block/{name}")) else {
        return Vec::new();
    };
    let mut partitions: Vec<(u32, String)> = entries
        .flatten()
        .filter_map(|entry| {
            let number = std::fs::read_to_string(entry.path().join("partition")).ok()?;
            let number = number.trim().parse().ok()?;
            Some((
                number,
                format!("/dev/{}", entry.file_name().to_string_lossy()),
            ))
        })
        .collect();
    partitions.sort();
    partitions.into_iter().map(|(_, path)| path).collect()
}

/// Copies this init to `usr/sbin/ci-exec-init` of `root` (where the qemu driver runs it from) and the tree under `/ci-exec-root` to
/// the same places in `root`. The root disk is the VM's own overlay, so nothing outlives it.
fn install(root: &Path) -> io::Result<()> {
    copy_file(Path::new("/init"), &root.join("usr/sbin/ci-exec-init"))?;
    copy_tree(Path::new("/ci-exec-root"), root)
}

fn copy_tree(from: &Path, to: &Path) -> io::Result<()> {
    let entries = match std::fs::read_dir(from) {
        Ok(entries) => entries,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(error) => return Err(error),
    };
    for entry in entries {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            std::fs::create_dir_all(&target)?;
            copy_tree(&entry.path(), &target)?;
        } else {
            copy_file(&entry.path(), &target)?;
        }
    }
    Ok(())
}

/// Copies `from` over `to` (through the root's own symlinks, e.g. Ubuntu's `sbin -> usr/sbin`,
/// which resolve inside it because they are relative), keeping the mode.
fn copy_file(from: &Path, to: &Path) -> io::Result<()> {
    if let Some(parent) = to.parent() {
        std::fs::create_dir_all(parent)?;
    }
    // Replace rather than write into: the old file may be a running binary or a symlink.
    let _ = std::fs::remove_file(to);
    std::fs::copy(from, to).map(drop).map_err(|error| {
        io::Error::new(
            error.kind(),
            format!("copy `{}` to `{}`: {error}", from.display(), to.display()),
        )
    })
}
