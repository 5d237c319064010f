//! Resolving the `image=` parameter to the files a VM boots.

use std::path::{Path, PathBuf};

use crate::QemuError;
use crate::machine::ImageFiles;

/// `image` is a catalog name (looked up in the guest image cache) or the path of a built
/// image: its directory or its `manifest.json`.
pub fn resolve(image: &str) -> Result<ImageFiles, QemuError> {
    if image.contains('/') || image.ends_with(".json") {
        let mut path = PathBuf::from(image);
        if path.is_dir() {
            path = path.join("manifest.json");
        }
        return from_manifest(&path, image);
    }
    let load = |source: ci_exec_guest_image::Error| QemuError::ImageLoad {
        image: image.to_owned(),
        source: Box::new(source),
    };
    let cache = ci_exec_guest_image::ImageCache::open(None).map_err(load)?;
    let manifest = cache
        .get(image)
        .map_err(load)?
        .ok_or_else(|| QemuError::ImageMissing {
            image: image.to_owned(),
        })?;
    Ok(ImageFiles {
        name: manifest.name,
        digest: manifest.digest,
        vmlinux: manifest.vmlinux,
        initrd: manifest.initrd,
        disk: manifest.disk,
        kernel_cmdline: manifest.kernel_cmdline,
        container_images: manifest.container_images,
        arch: manifest
            .arch
            .parse()
            .map_err(|reason: String| QemuError::ImageLoad {
                image: image.to_owned(),
                source: reason.into(),
            })?,
        current: true,
    })
}

fn from_manifest(path: &Path, image: &str) -> Result<ImageFiles, QemuError> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            return Err(QemuError::ImageMissing {
                image: image.to_owned(),
            });
        }
        Err(source) => {
            return Err(QemuError::ReadFile {
                path: path.to_owned(),
                source,
            });
        }
    };
    let files: ImageFiles = serde_json::from_str(&text).map_err(|source| QemuError::ImageLoad {
        image: image.to_owned(),
        source: Box::new(source),
    })?;
    for file in [&files.vmlinux, &files.initrd, &files.disk] {
        if !file.is_file() {
            return Err(QemuError::ImageMissing {
                image: format!("{image}` (file `{}` is missing", file.display()),
            });
        }
    }
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_manifest_path_says_how_to_build_one() {
        let error = resolve("/nonexistent/image").expect_err("missing");
        assert!(error.to_string().contains("ci-exec image build"), "{error}");
    }

    #[test]
    fn a_manifest_is_read_and_its_files_checked() {
        let directory = tempfile::tempdir().expect("tempdir");
        let root = directory.path();
        for file in ["vmlinux", "initrd", "disk.qcow2"] {
            std::fs::write(root.join(file), b"x").expect("write");
        }
        let manifest = serde_json::json!({
            "name": "test", "digest": "d", "kernel_cmdline": "console=ttyS0",
            "vmlinux": root.join("vmlinux"), "initrd": root.join("initrd"),
            "disk": root.join("disk.qcow2"), "extra": 1,
        });
        std::fs::write(root.join("manifest.json"), manifest.to_string()).expect("write");
        let files = resolve(&root.display().to_string()).expect("resolve");
        assert_eq!(files.digest, "d");
        std::fs::remove_file(root.join("initrd")).expect("remove");
        let error = resolve(&root.display().to_string()).expect_err("initrd missing");
        assert!(error.to_string().contains("initrd"), "{error}");
    }
}
