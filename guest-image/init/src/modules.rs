//! Kernel modules from the initramfs, in groups (the image builder's `Group`): `boot` and
//! `filesystem` at the same time (they share no module), then, on machines with virtio devices
//! on PCI, `pci`, all before the root disk is mounted; `background`
//! (9p, overlay) and, with a virtio network device, `net` in a child process that goes on
//! loading while PID 1 switches to the root disk and starts the agent.
//!
//! The child is forked before the switch, so it keeps reading the initramfs as its root. It
//! holds the write end of a pipe whose read end PID 1 keeps across the exec (its number in
//! [`FD_VARIABLE`]): the child writes an error there if a module fails, and the pipe's end
//! tells the root stage that the group is done. The root stage waits for that before it mounts
//! a 9p share, which the host asks for before it runs any task, so no task sees a missing module.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{FromRawFd, IntoRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use crate::cmdline::Cmdline;
use crate::system;

/// Module paths (relative to `/lib/modules/`), one per line after their group's word, in load
/// order. Written by the image builder from `modules.dep`, so the init never resolves
/// dependencies itself.
const LOAD_LIST: &str = "/lib/modules/ci-exec.load";

/// The environment variable that hands the background loader's pipe to the root stage.
pub const FD_VARIABLE: &str = "CI_EXEC_MODULES_FD";

/// One module to load.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Module {
    group: String,
    path: PathBuf,
    parameters: String,
}

/// The load list's modules in order; a line without a group word is in `boot`.
fn parse_list(list: &str, cmdline: &Cmdline) -> Vec<Module> {
    list.lines()
        .map(str::trim)
        .filter(|line| !line.is_empty())
        .map(|line| {
            let (group, relative) = line.split_once(' ').unwrap_or(("boot", line));
            Module {
                group: group.to_owned(),
                path: Path::new("/lib/modules").join(relative.trim()),
                parameters: cmdline.parameters_for(&module_name(relative)),
            }
        })
        .collect()
}

/// `kernel/fs/ext4/ext4.ko` → `ext4`; `virtio-mmio` style names fold to underscores.
fn module_name(relative: &str) -> String {
    let file = relative.rsplit('/').next().unwrap_or(relative);
    let stem = file.split(".ko").next().unwrap_or(file);
    stem.replace('-', "_")
}

fn load_group(modules: &[Module], group: &str) -> io::Result<()> {
    for module in modules.iter().filter(|module| module.group == group) {
        system::load_module(&module.path, &module.parameters)?;
    }
    Ok(())
}

/// Whether a device under `/sys/bus/<bus>/devices` has `attribute` equal to `value`.
fn has_device(bus: &str, attribute: &str, value: &str) -> bool {
    let Ok(entries) = std::fs::read_dir(format!("/sys/bus/{bus}/devices")) else {
        return false;
    };
    entries.flatten().any(|entry| {
        std::fs::read_to_string(entry.path().join(attribute)).is_ok_and(|text| text.trim() == value)
    })
}

/// Stage 1: loads what the root disk and the agent need, and starts loading the rest in a
/// child process. Without a load list (an initramfs not of ours) there is nothing to do.
pub fn load(cmdline: &Cmdline) -> io::Result<()> {
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
    let modules = parse_list(&list, cmdline);
    // Two CPUs under TCG load two modules in the time of one; joined before anything forks.
    std::thread::scope(|scope| {
        let filesystem = scope.spawn(|| load_group(&modules, "filesystem"));
        let devices = load_group(&modules, "boot");
        let filesystem = filesystem
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("the module loading thread panicked")));
        devices.and(filesystem)
    })?;
    // Red Hat's PCI vendor id, which every virtio PCI device carries.
    if has_device("pci", "vendor", "0x1af4") {
        load_group(&modules, "pci")?;
    }
    let mut later = vec!["background"];
    // Virtio device id 1 is a network card.
    if has_device("virtio", "device", "0x0001") {
        later.push("net");
    }
    if modules
        .iter()
        .any(|module| later.contains(&module.group.as_str()))
    {
        load_in_background(&modules, &later)?;
    }
    Ok(())
}

/// Forks the loader of `groups` and leaves its pipe's read end open across exec, named in
/// [`FD_VARIABLE`].
fn load_in_background(modules: &[Module], groups: &[&str]) -> io::Result<()> {
    let (read, write) = system::pipe()?;
    // SAFETY: this stage is single-threaded, so the child may run ordinary code after fork.
    match unsafe { libc::fork() } {
        -1 => Err(io::Error::last_os_error()),
        0 => {
            drop(read);
            let mut report = File::from(write);
            let loaded = groups
                .iter()
                .try_for_each(|group| load_group(modules, group));
            let status = match loaded {
                Ok(()) => 0,
                Err(error) => {
                    eprintln!("ci-exec-init: error: {error}");
                    let _ = writeln!(report, "{error}");
                    1
                }
            };
            drop(report);
            // SAFETY: leaving the child without running the parent's exit handlers.
            unsafe { libc::_exit(status) }
        }
        _ => {
            drop(write);
            let read_end = read.into_raw_fd();
            // SAFETY: the parent keeps only the read end, which must survive exec.
            unsafe { libc::fcntl(read_end, libc::F_SETFD, 0) };
            // SAFETY: single-threaded; the variable is read by the root stage after exec.
            unsafe { std::env::set_var(FD_VARIABLE, read_end.to_string()) };
            Ok(())
        }
    }
}

/// The background loader's pipe, taken over by the root stage.
static PENDING: Mutex<Option<File>> = Mutex::new(None);
static OUTCOME: OnceLock<Result<(), String>> = OnceLock::new();

/// Stage 2, first thing: takes the pipe named in [`FD_VARIABLE`] (closed on exec from now on,
/// so the agent and tasks do not inherit it) and removes the variable.
pub fn adopt_background() {
    let Some(fd) = std::env::var(FD_VARIABLE)
        .ok()
        .and_then(|value| value.parse::<RawFd>().ok())
    else {
        return;
    };
    // SAFETY: single-threaded at this point; the variable is ours.
    unsafe { std::env::remove_var(FD_VARIABLE) };
    // SAFETY: fcntl on a descriptor number; a bad one fails and is then ignored.
    if unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) } != 0 {
        return;
    }
    // SAFETY: stage 1 left this descriptor open for us alone.
    let file = unsafe { File::from_raw_fd(fd) };
    *PENDING
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(file);
}

/// Blocks until the background modules are loaded; the error is the loader's.
pub fn wait_for_background() -> Result<(), String> {
    OUTCOME
        .get_or_init(|| {
            let pending = PENDING
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .take();
            let Some(mut pipe) = pending else {
                return Ok(());
            };
            let mut message = String::new();
            match pipe.read_to_string(&mut message) {
                Ok(_) if message.trim().is_empty() => Ok(()),
                Ok(_) => Err(format!(
                    "loading kernel modules failed: {}",
                    message.trim().replace('\n', "; ")
                )),
                Err(error) => Err(format!("waiting for kernel modules: {error}")),
            }
        })
        .clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn module_names_from_paths() {
        assert_eq!(module_name("kernel/fs/ext4/ext4.ko"), "ext4");
        assert_eq!(
            module_name("kernel/drivers/virtio/virtio-mmio.ko.xz"),
            "virtio_mmio"
        );
    }

    #[test]
    fn list_lines_carry_their_group_and_default_to_boot() {
        let cmdline = Cmdline::parse("ext4.option=1");
        let modules = parse_list(
            "boot 6.1/kernel/fs/ext4/ext4.ko\n\nbackground 6.1/kernel/fs/9p/9p.ko\n6.1/old.ko\n",
            &cmdline,
        );
        let summary: Vec<_> = modules
            .iter()
            .map(|module| {
                (
                    module.group.as_str(),
                    module.path.display().to_string(),
                    module.parameters.as_str(),
                )
            })
            .collect();
        assert_eq!(
            summary,
            [
                (
                    "boot",
                    "/lib/modules/6.1/kernel/fs/ext4/ext4.ko".to_owned(),
                    "option=1"
                ),
                (
                    "background",
                    "/lib/modules/6.1/kernel/fs/9p/9p.ko".to_owned(),
                    ""
                ),
                ("boot", "/lib/modules/6.1/old.ko".to_owned(), ""),
            ]
        );
    }

    #[test]
    fn nothing_to_wait_for_without_a_background_loader() {
        assert_eq!(wait_for_background(), Ok(()));
    }
}
