//! Thin, checked wrappers over the Linux calls PID 1 needs. Each returns `io::Result` and says
//! which call on which path failed.

use std::ffi::CString;
use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::time::{Duration, Instant};

fn c_string(text: &[u8]) -> io::Result<CString> {
    CString::new(text)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL byte in argument"))
}

pub(crate) fn context(error: io::Error, what: String) -> io::Error {
    io::Error::new(error.kind(), format!("{what}: {error}"))
}

/// mount(2). `source`/`fstype` may be empty for moves and remounts.
pub fn mount(
    source: &str,
    target: &Path,
    fstype: &str,
    flags: libc::c_ulong,
    data: &str,
) -> io::Result<()> {
    let source_c = c_string(source.as_bytes())?;
    let target_c = c_string(target.as_os_str().as_bytes())?;
    let fstype_c = c_string(fstype.as_bytes())?;
    let data_c = c_string(data.as_bytes())?;
    // SAFETY: every pointer is a valid NUL-terminated string that outlives the call.
    let result = unsafe {
        libc::mount(
            source_c.as_ptr(),
            target_c.as_ptr(),
            if fstype.is_empty() {
                std::ptr::null()
            } else {
                fstype_c.as_ptr()
            },
            flags,
            if data.is_empty() {
                std::ptr::null()
            } else {
                data_c.as_ptr().cast()
            },
        )
    };
    if result == 0 {
        Ok(())
    } else {
        Err(context(
            io::Error::last_os_error(),
            format!("mount `{source}` ({fstype}) on `{}`", target.display()),
        ))
    }
}

/// umount(2) of `target`.
pub fn unmount(target: &Path) -> io::Result<()> {
    let target_c = c_string(target.as_os_str().as_bytes())?;
    // SAFETY: a valid NUL-terminated string that outlives the call.
    if unsafe { libc::umount(target_c.as_ptr()) } == 0 {
        Ok(())
    } else {
        Err(context(
            io::Error::last_os_error(),
            format!("unmount `{}`", target.display()),
        ))
    }
}

/// Mounts unless something is mounted there already (stage 1 may have moved it in).
pub fn mount_once(
    source: &str,
    target: &str,
    fstype: &str,
    flags: libc::c_ulong,
    data: &str,
) -> io::Result<()> {
    if is_mount_point(target) {
        return Ok(());
    }
    std::fs::create_dir_all(target)
        .map_err(|error| context(error, format!("create `{target}`")))?;
    mount(source, Path::new(target), fstype, flags, data)
}

/// True when `/proc/self/mounts` lists `target` (false if /proc is not mounted yet).
pub fn is_mount_point(target: &str) -> bool {
    std::fs::read_to_string("/proc/self/mounts")
        .map(|mounts| {
            mounts
                .lines()
                .any(|line| line.split(' ').nth(1) == Some(target))
        })
        .unwrap_or(false)
}

/// finit_module(2) on the file at `path`; an already loaded module is not an error, and
/// neither is one whose init finds nothing to drive on this machine (`ENODEV`, e.g.
/// `crc32c-intel` on a CPU model without SSE 4.2, where `crc32c_generic` serves instead).
pub fn load_module(path: &Path, parameters: &str) -> io::Result<()> {
    let file = std::fs::File::open(path)
        .map_err(|error| context(error, format!("open module `{}`", path.display())))?;
    let parameters_c = c_string(parameters.as_bytes())?;
    use std::os::fd::AsRawFd;
    let flags = module_init_flags(path);
    // SAFETY: the fd is open for the duration of the call and the parameters are NUL-terminated.
    let result = unsafe {
        libc::syscall(
            libc::SYS_finit_module,
            file.as_raw_fd(),
            parameters_c.as_ptr(),
            flags,
        )
    };
    if result == 0 {
        return Ok(());
    }
    let error = io::Error::last_os_error();
    match error.raw_os_error() {
        Some(libc::EEXIST) => Ok(()),
        Some(libc::ENODEV) => {
            eprintln!(
                "ci-exec-init: module `{}` has no device on this machine: skipped",
                path.display()
            );
            Ok(())
        }
        _ => Err(context(error, format!("load module `{}`", path.display()))),
    }
}

/// `MODULE_INIT_COMPRESSED_FILE` (linux/module.h): the kernel decompresses the file itself.
const MODULE_INIT_COMPRESSED_FILE: libc::c_int = 4;

/// finit_module's flags for the module file at `path`: compressed modules (Ubuntu's since
/// 23.10 are `.ko.zst`) are decompressed by a kernel built with `CONFIG_MODULE_DECOMPRESS`,
/// as every kernel that ships compressed modules is.
fn module_init_flags(path: &Path) -> libc::c_int {
    let name = path.to_string_lossy();
    if [".ko.zst", ".ko.xz", ".ko.gz"]
        .iter()
        .any(|suffix| name.ends_with(suffix))
    {
        MODULE_INIT_COMPRESSED_FILE
    } else {
        0
    }
}

/// Polls for `path` to exist until `timeout` passes.
pub fn wait_for_path(path: &Path, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if path.exists() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

pub fn chdir(path: &str) -> io::Result<()> {
    std::env::set_current_dir(path).map_err(|error| context(error, format!("chdir `{path}`")))
}

pub fn chroot(path: &str) -> io::Result<()> {
    let path_c = c_string(path.as_bytes())?;
    // SAFETY: NUL-terminated path valid for the call.
    if unsafe { libc::chroot(path_c.as_ptr()) } == 0 {
        Ok(())
    } else {
        Err(context(
            io::Error::last_os_error(),
            format!("chroot `{path}`"),
        ))
    }
}

/// Replaces this process with `program` (argv = [program]); returns only on failure.
pub fn exec(program: &str) -> io::Error {
    use std::os::unix::process::CommandExt;
    let error = std::process::Command::new(program).exec();
    context(error, format!("execute `{program}`"))
}

pub fn set_hostname(name: &str) -> io::Result<()> {
    // SAFETY: pointer and length describe `name`'s bytes.
    if unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) } == 0 {
        Ok(())
    } else {
        Err(context(
            io::Error::last_os_error(),
            format!("set hostname `{name}`"),
        ))
    }
}

/// Sets IFF_UP on the loopback interface.
pub fn loopback_up() -> io::Result<()> {
    // SAFETY: a plain socket(2) call.
    let socket = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if socket < 0 {
        return Err(context(
            io::Error::last_os_error(),
            "socket for `lo`".to_owned(),
        ));
    }
    // SAFETY: ifreq is plain data; zeroed is a valid value.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    for (slot, byte) in request.ifr_name.iter_mut().zip(b"lo\0") {
        *slot = *byte as libc::c_char;
    }
    // SAFETY: `request` is a valid ifreq for these ioctls; `socket` is open.
    let result = unsafe {
        if libc::ioctl(socket, libc::SIOCGIFFLAGS as _, &mut request) < 0 {
            -1
        } else {
            request.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
            libc::ioctl(socket, libc::SIOCSIFFLAGS as _, &request)
        }
    };
    let error = io::Error::last_os_error();
    // SAFETY: closing the socket we opened.
    unsafe { libc::close(socket) };
    if result < 0 {
        Err(context(error, "bring up `lo`".to_owned()))
    } else {
        Ok(())
    }
}

/// Flushes filesystems and powers off (or restarts); only returns if the kernel refuses.
pub fn power_off(restart: bool) -> io::Error {
    // SAFETY: sync and reboot take no pointers.
    unsafe {
        libc::sync();
        libc::reboot(if restart {
            libc::RB_AUTOBOOT
        } else {
            libc::RB_POWER_OFF
        });
    }
    context(io::Error::last_os_error(), "reboot(2)".to_owned())
}

/// `poweroff`/`reboot` personalities: ask PID 1.
pub fn signal_init(signal: libc::c_int) -> ! {
    // SAFETY: kill(2) with a constant pid and signal.
    if unsafe { libc::kill(1, signal) } != 0 {
        eprintln!(
            "ci-exec-init: error: cannot signal PID 1: {}",
            io::Error::last_os_error()
        );
        std::process::exit(1);
    }
    std::process::exit(0);
}

/// Seconds since boot, from /proc/uptime (0 when unreadable).
pub fn uptime() -> f64 {
    std::fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|text| {
            text.split_whitespace()
                .next()
                .and_then(|value| value.parse().ok())
        })
        .unwrap_or(0.0)
}

/// clock_settime(CLOCK_REALTIME): a VM restored from a saved state wakes with the time it was
/// saved at, and one booted reads only whole seconds from the RTC.
pub fn set_clock(seconds: i64, nanoseconds: i64) -> io::Result<()> {
    let time = libc::timespec {
        // `as _`: musl deprecates naming `time_t` (it turns 64-bit there).
        tv_sec: seconds as _,
        tv_nsec: nanoseconds as libc::c_long,
    };
    // SAFETY: a valid timespec that outlives the call.
    if unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &time) } == 0 {
        Ok(())
    } else {
        Err(context(
            io::Error::last_os_error(),
            format!("set the clock to {seconds}.{nanoseconds:09}"),
        ))
    }
}

/// A pipe, both ends closed on exec: `(read, write)`.
pub fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut ends: [RawFd; 2] = [-1; 2];
    // SAFETY: `ends` has room for the two descriptors.
    if unsafe { libc::pipe2(ends.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(context(io::Error::last_os_error(), "pipe".to_owned()));
    }
    // SAFETY: both descriptors were just made and are owned here alone.
    Ok(unsafe { (OwnedFd::from_raw_fd(ends[0]), OwnedFd::from_raw_fd(ends[1])) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compressed_modules_are_left_to_the_kernel_to_decompress() {
        let flags = |path: &str| module_init_flags(Path::new(path));
        assert_eq!(flags("/lib/modules/6.1.0/kernel/fs/9p/9p.ko"), 0);
        for compressed in ["overlay.ko.zst", "ext4.ko.xz", "crc16.ko.gz"] {
            assert_eq!(
                flags(compressed),
                MODULE_INIT_COMPRESSED_FILE,
                "{compressed}"
            );
        }
    }
}
