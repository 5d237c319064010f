//! Our initramfs: a newc cpio (uncompressed: decompressing costs more than reading under TCG)
//! holding the static init as `/init`, the few modules needed to reach the root disk, and the
//! order to load them in.

use crate::{Arch, Error};
use std::collections::BTreeSet;
use std::io::Write;
use std::path::Path;

/// When the guest's init loads a module (and the modules it depends on).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Group {
    /// Before the root disk is mounted, always: the virtio devices.
    Boot,
    /// Before the root disk is mounted, always, and at the same time as [`Group::Boot`] (on
    /// another CPU): the root filesystem, whose modules share none with the devices'.
    Filesystem,
    /// Before the root disk is mounted, when the machine has virtio devices on PCI (`q35`,
    /// `pc`); `microvm` has none.
    Pci,
    /// In the background while the root stage starts the agent. The root stage waits for the
    /// group to finish before it mounts a 9p share, which the host asks for before any task.
    Background,
    /// In the background too, when a virtio network device is attached.
    Net,
}

impl Group {
    /// The group's word in the load list (`/lib/modules/ci-exec.load`), which the init reads.
    pub fn word(self) -> &'static str {
        match self {
            Group::Boot => "boot",
            Group::Filesystem => "filesystem",
            Group::Pci => "pci",
            Group::Background => "background",
            Group::Net => "net",
        }
    }
}

/// The modules the guest needs, by name and group; `modprobe --show-depends` expands each to
/// files in load order when the image is built, and a module already listed by an earlier entry
/// is not listed again. What is on the way to the agent (the disk, its port, ext4) is loaded
/// first; 9p and overlay (a third of the bytes) load while the agent starts.
pub const MODULES: &[(&str, Group)] = &[
    ("virtio_mmio", Group::Boot),
    ("virtio_blk", Group::Boot),
    ("virtio_console", Group::Boot),
    ("crc32c_generic", Group::Filesystem),
    ("ext4", Group::Filesystem),
    ("virtio_pci", Group::Pci),
    ("overlay", Group::Background),
    ("9pnet_virtio", Group::Background),
    ("9p", Group::Background),
    ("virtio_net", Group::Net),
];

/// Added for aarch64 guests, which Apple's Virtualization.framework (`vz`) also boots: its
/// guest agent and control port are on vsock and its shares are virtiofs. They load in the
/// background; the init waits for vsock before it listens (`ci.transport=vsock`).
pub const AARCH64_MODULES: &[(&str, Group)] = &[
    ("vmw_vsock_virtio_transport", Group::Background),
    ("virtiofs", Group::Background),
];

/// The modules a guest of `arch` needs, in load order.
pub fn modules(arch: Arch) -> Vec<(&'static str, Group)> {
    let mut modules = MODULES.to_vec();
    if arch == Arch::Aarch64 {
        modules.extend_from_slice(AARCH64_MODULES);
    }
    modules
}

/// The group of module `name` in [`modules`] of `arch`.
pub fn group_of(arch: Arch, name: &str) -> Option<Group> {
    modules(arch)
        .into_iter()
        .find(|(module, _)| *module == name)
        .map(|(_, group)| group)
}

/// What ends a signed module: the signature, a 12-byte `struct module_signature` whose last
/// four bytes are the signature's length (big-endian), and this marker.
const SIGNATURE_MARKER: &[u8] = b"~Module signature appended~\n";

/// `module` without its appended signature (unchanged when it has none).
///
/// The initramfs carries its modules unsigned: checking a signature hashes the whole module,
/// which under TCG made loading them 0.4 s (a third) slower, measured. The kernel then taints
/// itself `E` (unsigned module), which nothing in a CI guest looks at; it still loads them
/// because Debian's kernel does not enforce signatures without Secure Boot, and the modules on
/// the root disk keep theirs.
pub fn strip_signature(module: &[u8]) -> &[u8] {
    let Some(rest) = module.strip_suffix(SIGNATURE_MARKER) else {
        return module;
    };
    let Some(info_start) = rest.len().checked_sub(12) else {
        return module;
    };
    let length = u32::from_be_bytes([
        rest[info_start + 8],
        rest[info_start + 9],
        rest[info_start + 10],
        rest[info_start + 11],
    ]);
    match info_start.checked_sub(length as usize) {
        Some(end) => &module[..end],
        None => module,
    }
}

/// `6.1.0/kernel/drivers/virtio/virtio_mmio.ko` → `virtio_mmio` (dashes fold to underscores,
/// as the kernel names modules).
pub fn module_name(relative_path: &str) -> String {
    let file = relative_path.rsplit('/').next().unwrap_or(relative_path);
    file.split(".ko").next().unwrap_or(file).replace('-', "_")
}

/// One kernel module file to include, by its path under `/lib/modules`.
#[derive(Debug, Clone)]
pub struct ModuleFile {
    pub relative_path: String,
    pub group: Group,
    pub contents: Vec<u8>,
}

/// Writes the initramfs to `output`.
pub fn build(init: &[u8], modules: &[ModuleFile], output: &Path) -> Result<(), Error> {
    let file = std::fs::File::create(output).map_err(|source| Error::Write {
        path: output.to_owned(),
        source,
    })?;
    let mut archive = Archive {
        writer: std::io::BufWriter::new(file),
        inode: 1,
    };
    let write = |result: std::io::Result<()>| {
        result.map_err(|source| Error::Write {
            path: output.to_owned(),
            source,
        })
    };

    let mut directories = BTreeSet::from(
        ["dev", "etc", "lib", "lib/modules", "proc", "root", "sys"].map(str::to_owned),
    );
    for module in modules {
        let mut parent = Path::new("lib/modules").join(&module.relative_path);
        while parent.pop() && !parent.as_os_str().is_empty() {
            directories.insert(parent.to_string_lossy().into_owned());
        }
    }
    for directory in &directories {
        write(archive.entry(directory, 0o040_755, &[], None))?;
    }
    write(archive.entry("dev/console", 0o020_600, &[], Some((5, 1))))?;
    write(archive.entry("dev/null", 0o020_666, &[], Some((1, 3))))?;
    write(archive.entry("init", 0o100_755, init, None))?;
    write(archive.entry(
        "etc/ci-exec-initramfs",
        0o100_644,
        b"built by ci-exec-guest-image\n",
        None,
    ))?;
    let load_list: String = modules
        .iter()
        .map(|module| format!("{} {}\n", module.group.word(), module.relative_path))
        .collect();
    write(archive.entry(
        "lib/modules/ci-exec.load",
        0o100_644,
        load_list.as_bytes(),
        None,
    ))?;
    for module in modules {
        let name = format!("lib/modules/{}", module.relative_path);
        write(archive.entry(&name, 0o100_644, &module.contents, None))?;
    }
    let mut writer = cpio::newc::trailer(archive.writer).map_err(|source| Error::Write {
        path: output.to_owned(),
        source,
    })?;
    write(writer.flush())
}

/// Writes `base` (an initramfs) followed by a second archive holding `files` (path, contents;
/// mode 0755) and their parent directories. Linux unpacks concatenated archives in order, so
/// this adds to an image's initramfs without rebuilding it (for cloud images).
#[cfg(feature = "download")]
pub fn extend(base: &Path, files: &[(&str, &[u8])], output: &Path) -> Result<(), Error> {
    let write_error = |source| Error::Write {
        path: output.to_owned(),
        source,
    };
    let mut bytes = std::fs::read(base).map_err(|source| Error::Read {
        path: base.to_owned(),
        source,
    })?;
    // Each archive starts on a 4-byte boundary.
    bytes.resize(bytes.len().next_multiple_of(4), 0);
    let mut archive = Archive {
        writer: bytes,
        inode: 1,
    };
    let mut directories = BTreeSet::new();
    for (name, _) in files {
        let mut parent = Path::new(name).to_owned();
        while parent.pop() && !parent.as_os_str().is_empty() {
            directories.insert(parent.to_string_lossy().into_owned());
        }
    }
    for directory in &directories {
        archive
            .entry(directory, 0o040_755, &[], None)
            .map_err(write_error)?;
    }
    for (name, contents) in files {
        archive
            .entry(name, 0o100_755, contents, None)
            .map_err(write_error)?;
    }
    let bytes = cpio::newc::trailer(archive.writer).map_err(write_error)?;
    std::fs::write(output, bytes).map_err(write_error)
}

struct Archive<W: Write> {
    writer: W,
    inode: u32,
}

impl<W: Write> Archive<W> {
    /// One entry; timestamps and owners are fixed so the same inputs give the same bytes.
    fn entry(
        &mut self,
        name: &str,
        mode: u32,
        contents: &[u8],
        device: Option<(u32, u32)>,
    ) -> std::io::Result<()> {
        let size = u32::try_from(contents.len())
            .map_err(|_| std::io::Error::other(format!("`{name}` is over 4 GiB")))?;
        let mut builder = cpio::newc::Builder::new(name)
            .ino(self.inode)
            .mode(mode)
            .uid(0)
            .gid(0)
            .nlink(1)
            .mtime(0);
        if let Some((major, minor)) = device {
            builder = builder.rdev_major(major).rdev_minor(minor);
        }
        self.inode += 1;
        let mut writer = builder.write(&mut self.writer, size);
        writer.write_all(contents)?;
        writer.finish()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (name, mode, contents) of each entry of the archive at the start of `bytes`.
    fn entries_of(bytes: &[u8]) -> Vec<(String, u32, Vec<u8>)> {
        let mut entries = Vec::new();
        let mut reader = bytes;
        loop {
            let mut entry = cpio::newc::Reader::new(reader).expect("entry");
            if entry.entry().is_trailer() {
                return entries;
            }
            let name = entry.entry().name().to_owned();
            let mode = entry.entry().mode();
            let mut contents = Vec::new();
            std::io::Read::read_to_end(&mut entry, &mut contents).expect("read");
            entries.push((name, mode, contents));
            reader = entry.finish().expect("finish");
        }
    }

    #[test]
    #[cfg(feature = "download")]
    fn extend_appends_a_second_archive_with_the_files_and_their_parents() {
        let directory = tempfile::tempdir().expect("tempdir");
        let base = directory.path().join("base.cpio");
        build(b"\x7fELF init", &[], &base).expect("build");
        let output = directory.path().join("extended.cpio");
        extend(&base, &[("ci-exec-root/usr/local/bin/mk", b"mk!")], &output).expect("extend");
        let base_bytes = std::fs::read(&base).expect("base");
        let bytes = std::fs::read(&output).expect("output");
        assert!(bytes.starts_with(&base_bytes));
        assert!(entries_of(&bytes).iter().any(|entry| entry.0 == "init"));
        let added = entries_of(&bytes[base_bytes.len().next_multiple_of(4)..]);
        let names: Vec<&str> = added.iter().map(|entry| entry.0.as_str()).collect();
        assert_eq!(
            names,
            [
                "ci-exec-root",
                "ci-exec-root/usr",
                "ci-exec-root/usr/local",
                "ci-exec-root/usr/local/bin",
                "ci-exec-root/usr/local/bin/mk"
            ]
        );
        assert_eq!(added[4].1, 0o100_755);
        assert_eq!(added[4].2, b"mk!");
    }

    #[test]
    fn archive_holds_init_modules_and_load_order() {
        let directory = tempfile::tempdir().expect("tempdir");
        let output = directory.path().join("initrd.cpio");
        let modules = vec![
            ModuleFile {
                relative_path: "6.1.0/kernel/lib/crc16.ko".into(),
                group: Group::Boot,
                contents: b"crc16".to_vec(),
            },
            ModuleFile {
                relative_path: "6.1.0/kernel/fs/9p/9p.ko".into(),
                group: Group::Background,
                contents: b"9p".to_vec(),
            },
        ];
        build(b"\x7fELF init", &modules, &output).expect("build");

        let entries = entries_of(&std::fs::read(&output).expect("read"));
        let find = |name: &str| {
            entries
                .iter()
                .find(|entry| entry.0 == name)
                .unwrap_or_else(|| panic!("no `{name}` in {entries:?}"))
        };
        assert_eq!(find("init").1, 0o100_755);
        assert_eq!(find("init").2, b"\x7fELF init");
        assert_eq!(find("dev/console").1, 0o020_600);
        assert_eq!(
            find("lib/modules/ci-exec.load").2,
            b"boot 6.1.0/kernel/lib/crc16.ko\nbackground 6.1.0/kernel/fs/9p/9p.ko\n"
        );
        assert_eq!(find("lib/modules/6.1.0/kernel/fs/9p/9p.ko").2, b"9p");
        // Parents come before children, as the kernel's unpacker needs.
        let position = |name: &str| {
            entries
                .iter()
                .position(|entry| entry.0 == name)
                .expect("present")
        };
        assert!(
            position("lib/modules/6.1.0/kernel/fs")
                < position("lib/modules/6.1.0/kernel/fs/9p/9p.ko")
        );
    }

    #[test]
    fn signatures_are_stripped_and_unsigned_modules_kept() {
        let body = b"\x7fELF module body".as_slice();
        let signature = [0xAB_u8; 7];
        let mut info = [0_u8; 12];
        info[8..].copy_from_slice(&(signature.len() as u32).to_be_bytes());
        let signed = [body, &signature, &info, SIGNATURE_MARKER].concat();
        assert_eq!(strip_signature(&signed), body);
        assert_eq!(strip_signature(body), body);
        // A length longer than the file: left alone rather than cut wrong.
        let mut bogus = [0_u8; 12];
        bogus[8..].copy_from_slice(&1000_u32.to_be_bytes());
        let broken = [body, &bogus, SIGNATURE_MARKER].concat();
        assert_eq!(strip_signature(&broken), broken.as_slice());
    }

    #[test]
    fn every_group_has_a_distinct_word_and_modules_are_unique() {
        let words: BTreeSet<_> = [
            Group::Boot,
            Group::Filesystem,
            Group::Pci,
            Group::Background,
            Group::Net,
        ]
        .map(Group::word)
        .into();
        assert_eq!(words.len(), 5);
        for arch in [Arch::X86_64, Arch::Aarch64] {
            let modules = modules(arch);
            let names: BTreeSet<_> = modules.iter().map(|(name, _)| name).collect();
            assert_eq!(names.len(), modules.len());
            assert_eq!(group_of(arch, "ext4"), Some(Group::Filesystem));
            assert_eq!(group_of(arch, "9p"), Some(Group::Background));
            assert_eq!(group_of(arch, "nope"), None);
        }
        assert_eq!(group_of(Arch::X86_64, "virtiofs"), None);
        assert_eq!(
            group_of(Arch::Aarch64, "vmw_vsock_virtio_transport"),
            Some(Group::Background)
        );
    }
}
