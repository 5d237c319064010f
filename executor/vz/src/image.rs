//! Resolving `image=` to the files a vz VM boots: the same guest-image cache and manifests as
//! the qemu driver, but only aarch64 images (Apple silicon runs arm64 guests only, and
//! `VZLinuxBootLoader` takes an uncompressed arm64 `Image`, which is the manifest's `vmlinux`
//! on aarch64 builds).

use std::path::{Path, PathBuf};

use crate::VzError;

/// The files of an aarch64 guest image.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
pub struct VzImage {
    pub name: String,
    pub digest: String,
    /// The uncompressed arm64 kernel `Image`.
    pub vmlinux: PathBuf,
    pub initrd: PathBuf,
    /// qcow2 base; never written (converted once to a cached raw disk, see [`crate::disk`]).
    pub disk: PathBuf,
    pub kernel_cmdline: String,
    /// `aarch64`, `x86_64`; empty in manifests that do not say.
    #[serde(default)]
    pub arch: String,
}

impl VzImage {
    /// The image's architecture: the manifest's, else what its name says (`…-arm64` is the
    /// catalog's suffix of aarch64 builds).
    pub fn arch(&self) -> &str {
        if !self.arch.is_empty() {
            &self.arch
        } else if self.name.ends_with("-arm64") || self.name.ends_with("-aarch64") {
            "aarch64"
        } else {
            "unknown"
        }
    }

    /// Errors unless this image boots on vz.
    pub fn check_arch(&self, image: &str) -> Result<(), VzError> {
        match self.arch() {
            "aarch64" | "arm64" => Ok(()),
            other => Err(VzError::WrongArch {
                image: image.to_owned(),
                arch: other.to_owned(),
            }),
        }
    }
}

/// `image` is a catalog name (looked up in the guest-image cache) or the path of a built image:
/// its directory or its `manifest.json`. The image must be an aarch64 one.
pub fn resolve(image: &str) -> Result<VzImage, VzError> {
    let files = if image.contains('/') || image.ends_with(".json") {
        let mut path = PathBuf::from(image);
        if path.is_dir() {
            path = path.join("manifest.json");
        }
        from_manifest(&path, image)?
    } else {
        let load = |source: ci_exec_guest_image::Error| VzError::ImageLoad {
            image: image.to_owned(),
            source: Box::new(source),
        };
        let cache = ci_exec_guest_image::ImageCache::open(None).map_err(load)?;
        let manifest = cache
            .get(image)
            .map_err(load)?
            .ok_or_else(|| VzError::ImageMissing {
                image: image.to_owned(),
            })?;
        VzImage {
            name: manifest.name,
            digest: manifest.digest,
            vmlinux: manifest.vmlinux,
            initrd: manifest.initrd,
            disk: manifest.disk,
            kernel_cmdline: manifest.kernel_cmdline,
            arch: manifest.arch,
        }
    };
    files.check_arch(image)?;
    for (what, path) in [
        ("kernel", &files.vmlinux),
        ("initramfs", &files.initrd),
        ("disk", &files.disk),
    ] {
        if !path.is_file() {
            return Err(VzError::FileMissing {
                what,
                path: path.clone(),
            });
        }
    }
    Ok(files)
}

fn from_manifest(path: &Path, image: &str) -> Result<VzImage, VzError> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            return Err(VzError::ImageMissing {
                image: image.to_owned(),
            });
        }
        Err(source) => {
            return Err(VzError::ReadFile {
                path: path.to_owned(),
                source,
            });
        }
    };
    let mut files: VzImage = serde_json::from_str(&text).map_err(|source| VzError::ImageLoad {
        image: image.to_owned(),
        source: Box::new(source),
    })?;
    // A manifest records absolute paths of the machine that built the image. An image copied
    // whole to another machine (built on Linux, booted on a Mac) has its files beside its
    // manifest instead: take those where the recorded ones do not exist.
    if let Some(dir) = path.parent() {
        for file in [&mut files.vmlinux, &mut files.initrd, &mut files.disk] {
            if !file.is_file()
                && let Some(name) = file.file_name()
                && dir.join(name).is_file()
            {
                *file = dir.join(name);
            }
        }
    }
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn built(root: &Path, name: &str, arch: Option<&str>) -> String {
        for file in ["vmlinux", "initrd", "disk.qcow2"] {
            std::fs::write(root.join(file), b"x").expect("write");
        }
        let mut manifest = serde_json::json!({
            "name": name, "digest": "d", "kernel_cmdline": "console=ttyAMA0 root=/dev/vda",
            "vmlinux": root.join("vmlinux"), "initrd": root.join("initrd"),
            "disk": root.join("disk.qcow2"), "packages": {},
        });
        if let Some(arch) = arch {
            manifest["arch"] = arch.into();
        }
        std::fs::write(root.join("manifest.json"), manifest.to_string()).expect("write");
        root.display().to_string()
    }

    #[test]
    fn an_aarch64_manifest_resolves_and_its_files_are_checked() {
        let directory = tempfile::tempdir().expect("tempdir");
        let image = built(directory.path(), "debian-bookworm-arm64", Some("aarch64"));
        let files = resolve(&image).expect("aarch64 image");
        assert_eq!(files.digest, "d");
        std::fs::remove_file(directory.path().join("initrd")).expect("remove");
        let error = resolve(&image).expect_err("initrd missing");
        assert!(error.to_string().contains("initramfs"), "{error}");
    }

    #[test]
    fn a_wrong_arch_image_is_one_line_naming_the_build_command() {
        let directory = tempfile::tempdir().expect("tempdir");
        let image = built(directory.path(), "debian-bookworm", Some("x86_64"));
        let error = resolve(&image).expect_err("x86_64 image");
        let text = error.to_string();
        assert_eq!(text.lines().count(), 1, "{text}");
        assert!(text.contains("`x86_64`"), "{text}");
        assert!(
            text.contains("`ci-exec image build --arch aarch64`"),
            "{text}"
        );
    }

    #[test]
    fn without_an_arch_field_the_name_decides() {
        let directory = tempfile::tempdir().expect("tempdir");
        let image = built(directory.path(), "debian-bookworm-arm64", None);
        assert!(resolve(&image).is_ok());
        let image = built(directory.path(), "debian-bookworm", None);
        assert!(matches!(resolve(&image), Err(VzError::WrongArch { .. })));
    }

    #[test]
    fn an_image_copied_from_another_machine_is_found_beside_its_manifest() {
        let built_on = tempfile::tempdir().expect("tempdir");
        built(built_on.path(), "debian-bookworm-arm64", Some("aarch64"));
        let copied = tempfile::tempdir().expect("tempdir");
        for file in ["manifest.json", "vmlinux", "initrd", "disk.qcow2"] {
            std::fs::copy(built_on.path().join(file), copied.path().join(file)).expect("copy");
        }
        drop(built_on);
        let files = resolve(&copied.path().display().to_string()).expect("relocated image");
        assert_eq!(files.disk, copied.path().join("disk.qcow2"));
        assert_eq!(files.vmlinux, copied.path().join("vmlinux"));
        assert_eq!(files.initrd, copied.path().join("initrd"));
    }

    #[test]
    fn a_missing_image_says_how_to_build_one() {
        let error = resolve("/nonexistent/image").expect_err("missing");
        assert!(
            error
                .to_string()
                .contains("ci-exec image build --arch aarch64"),
            "{error}"
        );
    }
}
