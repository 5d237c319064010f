//! Our initramfs: a newc cpio (uncompressed: decompressing costs more than reading under TCG)
//! holding the static init as `/init`, the few modules needed to reach the root disk, and the
//! order to load them in.

use crate::Error;
use std::collections::BTreeSet;
use std::io::Write;
use std::path::Path;

/// Modules the guest needs before its root filesystem is up, by name; `modprobe --show-depends`
/// expands them to files in load order when the image is built. virtio_pci and virtio_mmio cover
/// both `q35`/`pc` and `microvm` machines; 9p and overlay are loaded early so the source share
/// and podman's storage work without a module lookup later.
pub const MODULES: &[&str] = &[
    "virtio_pci",
    "virtio_mmio",
    "virtio_blk",
    "virtio_console",
    "virtio_net",
    "crc32c_generic",
    "ext4",
    "overlay",
    "9pnet_virtio",
    "9p",
];

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
        .map(|module| format!("{}\n", module.relative_path))
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

    #[test]
    fn archive_holds_init_modules_and_load_order() {
        let directory = tempfile::tempdir().expect("tempdir");
        let output = directory.path().join("initrd.cpio");
        let modules = vec![
            ModuleFile {
                relative_path: "6.1.0/kernel/lib/crc16.ko".into(),
                contents: b"crc16".to_vec(),
            },
            ModuleFile {
                relative_path: "6.1.0/kernel/fs/ext4/ext4.ko".into(),
                contents: b"ext4".to_vec(),
            },
        ];
        build(b"\x7fELF init", &modules, &output).expect("build");

        let mut entries = Vec::new();
        let mut reader = std::fs::File::open(&output).expect("open");
        loop {
            let mut entry = cpio::newc::Reader::new(reader).expect("entry");
            if entry.entry().is_trailer() {
                break;
            }
            let name = entry.entry().name().to_owned();
            let mode = entry.entry().mode();
            let mut contents = Vec::new();
            std::io::Read::read_to_end(&mut entry, &mut contents).expect("read");
            entries.push((name, mode, contents));
            reader = entry.finish().expect("finish");
        }
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
            b"6.1.0/kernel/lib/crc16.ko\n6.1.0/kernel/fs/ext4/ext4.ko\n"
        );
        assert_eq!(find("lib/modules/6.1.0/kernel/fs/ext4/ext4.ko").2, b"ext4");
        // Parents come before children, as the kernel's unpacker needs.
        let position = |name: &str| {
            entries
                .iter()
                .position(|entry| entry.0 == name)
                .expect("present")
        };
        assert!(
            position("lib/modules/6.1.0/kernel/fs")
                < position("lib/modules/6.1.0/kernel/fs/ext4/ext4.ko")
        );
    }
}
