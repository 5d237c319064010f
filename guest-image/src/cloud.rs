//! Publishers' cloud images (Canonical's Ubuntu, Alpine's nocloud) as ci-exec guests, with no
//! package installed and no first boot: the downloaded, verified qcow2 is the root disk as it
//! is, and it boots with the default image's kernel and initramfs. The initramfs finds the
//! image's root partition, copies our init (which is also the guest agent when the image has
//! no `qemu-ga`) and our static `mk` onto it — the VM's own overlay, so the cached image is
//! never written — and switches to it (`ci.install=1`, see `guest-image/init`).
//!
//! Why not the image's own kernel, firmware and cloud-init: under TCG that boot takes minutes
//! per VM (firmware, GRUB, systemd, cloud-init) where ours takes seconds, and the agent would
//! need a package install at boot, which needs the network and makes every boot differ.

use crate::catalog::CloudImage;
use crate::manifest::{Manifest, RECIPE_VERSION};
use crate::{Error, initramfs};
use std::path::{Path, PathBuf};

/// Options for [`crate::ImageCache::fetch_cloud`].
#[derive(Debug, Clone)]
pub struct CloudOptions {
    /// Our static `mk`, copied to `/usr/local/bin/mk` in the guest at boot.
    pub mk_binary: PathBuf,
    /// Assemble again even if a current image exists.
    pub force: bool,
    /// Where to download from instead of the publisher (`https://host/path`: the catalog's
    /// paths are appended), for mirrors and tests.
    pub mirror: Option<String>,
}

impl CloudOptions {
    pub fn new(mk_binary: PathBuf) -> Self {
        Self {
            mk_binary,
            force: false,
            mirror: None,
        }
    }
}

/// The kernel command line a cloud image boots with: `base`'s (the default image's), whose
/// `root=/dev/vda` makes the initramfs look for the root among the disk's partitions, plus the
/// install of our init and `mk`.
pub fn kernel_cmdline(base: &str) -> String {
    format!("{base} ci.install=1 ci.init=/usr/sbin/ci-exec-init")
}

/// Assembles the manifest of `image` in `work` from the verified `download`, the `base`
/// image's kernel and initramfs, and `mk`.
pub(crate) fn assemble(
    image: &CloudImage,
    download: &Path,
    base: &Manifest,
    inputs: String,
    mk: &[u8],
    work: &Path,
) -> Result<Manifest, Error> {
    let mut magic = [0u8; 4];
    let read = std::fs::File::open(download)
        .and_then(|mut file| std::io::Read::read_exact(&mut file, &mut magic));
    if read.is_err() || &magic != b"QFI\xfb" {
        return Err(Error::Prepare {
            name: image.name.clone(),
            reason: format!("`{}` is not a qcow2 image", download.display()),
        });
    }
    let disk = work.join("disk.qcow2");
    link_or_copy(download, &disk)?;
    let kernel = work.join("vmlinuz");
    link_or_copy(&base.kernel, &kernel)?;
    let vmlinux = work.join("vmlinux");
    link_or_copy(&base.vmlinux, &vmlinux)?;
    let initrd = work.join("initrd.img");
    initramfs::extend(
        &base.initrd,
        &[("ci-exec-root/usr/local/bin/mk", mk)],
        &initrd,
    )?;
    let disk_bytes = std::fs::metadata(&disk)
        .map(|metadata| metadata.len())
        .unwrap_or(0);
    let digest = crate::debian::sha256_hex(format!("{RECIPE_VERSION}\n{inputs}\n").as_bytes());
    Ok(Manifest {
        name: image.name.clone(),
        digest,
        kernel,
        vmlinux,
        initrd,
        disk,
        kernel_cmdline: kernel_cmdline(&base.kernel_cmdline),
        packages: Default::default(),
        recipe_version: RECIPE_VERSION,
        inputs,
        arch: std::env::consts::ARCH.to_owned(),
        os: image.os.clone(),
        kernel_release: base.kernel_release.clone(),
        container_images: Vec::new(),
        source: "download".to_owned(),
        built_at: crate::cache::now_rfc3339(),
        disk_bytes,
    })
}

/// A hard link (the cache is one filesystem), else a copy.
fn link_or_copy(from: &Path, to: &Path) -> Result<(), Error> {
    if std::fs::hard_link(from, to).is_ok() {
        return Ok(());
    }
    std::fs::copy(from, to)
        .map(drop)
        .map_err(|source| Error::Write {
            path: to.to_owned(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_keeps_the_base_and_asks_for_the_install() {
        assert_eq!(
            kernel_cmdline("root=/dev/vda rootfstype=ext4 rw console=ttyS0 quiet"),
            "root=/dev/vda rootfstype=ext4 rw console=ttyS0 quiet ci.install=1 \
             ci.init=/usr/sbin/ci-exec-init"
        );
    }
}
