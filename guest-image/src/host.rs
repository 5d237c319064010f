//! Host tools the builder shells out to, found up front so a missing one is one clear error.

use crate::arch::Arch;
use crate::{Error, Reporter};
use std::collections::VecDeque;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// A host program and the Debian package that provides it.
#[derive(Debug, Clone, Copy)]
pub struct Tool {
    pub name: &'static str,
    pub hint: &'static str,
}

pub const MMDEBSTRAP: Tool = Tool {
    name: "mmdebstrap",
    hint: "apt-get install mmdebstrap",
};
pub const QEMU_IMG: Tool = Tool {
    name: "qemu-img",
    hint: "apt-get install qemu-utils",
};
pub const MKFS_EXT4: Tool = Tool {
    name: "mkfs.ext4",
    hint: "apt-get install e2fsprogs",
};
pub const XZ: Tool = Tool {
    name: "xz",
    hint: "apt-get install xz-utils",
};
pub const GZIP: Tool = Tool {
    name: "gzip",
    hint: "apt-get install gzip",
};
const UIDMAP_HINT: &str =
    "apt-get install uidmap; building as a normal user uses mmdebstrap's unshare mode";
pub const NEWUIDMAP: Tool = Tool {
    name: "newuidmap",
    hint: UIDMAP_HINT,
};
pub const NEWGIDMAP: Tool = Tool {
    name: "newgidmap",
    hint: UIDMAP_HINT,
};
pub const PODMAN: Tool = Tool {
    name: "podman",
    hint: "apt-get install podman",
};

pub const ARCH_TEST: Tool = Tool {
    name: "arch-test",
    hint: "apt-get install arch-test qemu-user-static binfmt-support",
};

/// What building for another architecture than the host's needs: mmdebstrap runs the guest's
/// maintainer scripts and our build hook's `chroot` commands through qemu-user, registered in
/// binfmt_misc with the `F` flag (so it works inside the bootstrap's chroot), and checks that
/// with `arch-test`.
pub fn require_foreign_programs(arch: Arch) -> Result<(), Error> {
    if arch == Arch::host() {
        return Ok(());
    }
    find(ARCH_TEST)?;
    let entry = Path::new("/proc/sys/fs/binfmt_misc").join(arch.binfmt_name());
    let registered = std::fs::read_to_string(&entry).unwrap_or_default();
    if !registered.starts_with("enabled") {
        return Err(Error::Build {
            reason: format!(
                "building a {arch} image on this {} host runs {arch} programs through qemu-user, \
                 but binfmt_misc has no enabled `{}` entry: `apt-get install qemu-user-static \
                 binfmt-support` (and `mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc` \
                 where it is not mounted)",
                Arch::host(),
                arch.binfmt_name()
            ),
        });
    }
    Ok(())
}

/// Finds `tool` on PATH, then in the sbin directories a normal user's PATH often lacks.
pub fn find(tool: Tool) -> Result<PathBuf, Error> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let extra = ["/usr/local/sbin", "/usr/sbin", "/sbin"].map(PathBuf::from);
    std::env::split_paths(&path)
        .chain(extra)
        .map(|directory| directory.join(tool.name))
        .find(|candidate| is_executable(candidate))
        .ok_or(Error::MissingTool {
            tool: tool.name,
            hint: tool.hint,
        })
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .is_ok_and(|metadata| metadata.is_file() && metadata.permissions().mode() & 0o111 != 0)
}

/// Runs `command` to completion, passing its output lines to the reporter and keeping the last
/// lines of stderr for the error message.
pub fn run(mut command: Command, reporter: &dyn Reporter) -> Result<(), Error> {
    let description = describe(&command);
    tracing::debug!(command = %description, "running");
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| Error::Spawn {
            program: command.get_program().to_string_lossy().into_owned(),
            source,
        })?;
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();
    let tail = std::thread::scope(|scope| {
        if let Some(stdout) = stdout {
            scope.spawn(move || {
                for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                    reporter.log(&line);
                }
            });
        }
        let mut tail = VecDeque::new();
        if let Some(stderr) = stderr {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                reporter.log(&line);
                if tail.len() == 25 {
                    tail.pop_front();
                }
                tail.push_back(line);
            }
        }
        tail
    });
    let status = child.wait().map_err(|source| Error::Spawn {
        program: description.clone(),
        source,
    })?;
    if status.success() {
        Ok(())
    } else {
        Err(Error::CommandFailed {
            command: description,
            status,
            stderr_tail: tail.into_iter().collect::<Vec<_>>().join("\n"),
        })
    }
}

/// Runs `command` and returns its stdout.
pub fn output(mut command: Command) -> Result<Vec<u8>, Error> {
    let description = describe(&command);
    let output = command
        .stdin(Stdio::null())
        .output()
        .map_err(|source| Error::Spawn {
            program: description.clone(),
            source,
        })?;
    if output.status.success() {
        Ok(output.stdout)
    } else {
        Err(Error::CommandFailed {
            command: description,
            status: output.status,
            stderr_tail: String::from_utf8_lossy(&output.stderr).into_owned(),
        })
    }
}

/// The program name and its first arguments, short enough for an error line.
fn describe(command: &Command) -> String {
    let mut words = vec![command.get_program().to_string_lossy().into_owned()];
    words.extend(
        command
            .get_args()
            .take(3)
            .map(|argument| argument.to_string_lossy().into_owned()),
    );
    if command.get_args().len() > 3 {
        words.push("…".to_owned());
    }
    words.join(" ")
}

/// Refuses dynamically linked executables: the init runs in an initramfs without a libc, and
/// `mk` is mounted into arbitrary containers.
pub fn require_static(path: &Path, package: &'static str, arch: Arch) -> Result<Vec<u8>, Error> {
    let bytes = std::fs::read(path).map_err(|source| Error::Read {
        path: path.to_owned(),
        source,
    })?;
    let reason = elf_static_problem(&bytes, arch);
    match reason {
        None => Ok(bytes),
        Some(reason) => Err(Error::NotStaticBinary {
            path: path.to_owned(),
            reason,
            package,
        }),
    }
}

/// `None` when `bytes` is a 64-bit little-endian ELF executable for `arch` with no
/// interpreter.
pub(crate) fn elf_static_problem(bytes: &[u8], arch: Arch) -> Option<&'static str> {
    if bytes.len() < 64 || &bytes[..4] != b"\x7fELF" {
        return Some("not an ELF file");
    }
    if bytes[4] != 2 || bytes[5] != 1 {
        return Some("not a 64-bit little-endian ELF");
    }
    let u16_at = |offset: usize| u16::from_le_bytes([bytes[offset], bytes[offset + 1]]);
    let u64_at = |offset: usize| {
        let mut word = [0; 8];
        word.copy_from_slice(&bytes[offset..offset + 8]);
        u64::from_le_bytes(word)
    };
    if u16_at(18) != arch.elf_machine() {
        return Some(match arch {
            Arch::X86_64 => "not built for x86-64",
            Arch::Aarch64 => "not built for aarch64",
        });
    }
    let (table, entry_size, count) = (
        u64_at(32) as usize,
        u16_at(54) as usize,
        u16_at(56) as usize,
    );
    for index in 0..count {
        let offset = table + index * entry_size;
        if offset + 4 > bytes.len() {
            return Some("truncated program headers");
        }
        const PT_INTERP: u32 = 3;
        if u32::from_le_bytes([
            bytes[offset],
            bytes[offset + 1],
            bytes[offset + 2],
            bytes[offset + 3],
        ]) == PT_INTERP
        {
            return Some("it is dynamically linked");
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_dynamic_and_non_elf_files() {
        let shell = std::fs::read("/bin/sh").expect("read /bin/sh");
        let (host, other) = match Arch::host() {
            Arch::X86_64 => (Arch::X86_64, Arch::Aarch64),
            Arch::Aarch64 => (Arch::Aarch64, Arch::X86_64),
        };
        assert_eq!(
            elf_static_problem(&shell, host),
            Some("it is dynamically linked")
        );
        assert!(
            elf_static_problem(&shell, other)
                .is_some_and(|problem| problem.starts_with("not built for")),
            "a binary for the other architecture is refused"
        );
        assert_eq!(
            elf_static_problem(b"#!/bin/sh\necho hi\n", Arch::X86_64),
            Some("not an ELF file")
        );
    }

    #[test]
    fn missing_tool_names_the_tool_and_package() {
        let error = find(Tool {
            name: "ci-exec-no-such-tool",
            hint: "apt-get install nothing",
        })
        .unwrap_err();
        assert_eq!(
            error.to_string(),
            "host tool `ci-exec-no-such-tool` not found on PATH (install it: apt-get install nothing)"
        );
    }

    #[test]
    fn failed_command_keeps_its_stderr() {
        let mut command = Command::new("sh");
        command.args(["-c", "echo one >&2; echo two >&2; exit 3"]);
        let error = run(command, &crate::SilentReporter).unwrap_err();
        let message = error.to_string();
        assert!(message.contains("exit status: 3"), "{message}");
        assert!(message.ends_with("one\ntwo"), "{message}");
    }
}
