//! Cloud images from their publishers (Alpine, Ubuntu): where to download each release for each
//! architecture, and where its checksum file is. Downloaded once and verified; they boot with
//! the default image's kernel and initramfs (see [`crate::ImageCache::fetch_cloud`]).

use crate::Error;

/// One downloadable image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CatalogEntry {
    /// `ubuntu-24.04`, `alpine-3.22`.
    pub name: &'static str,
    /// The publisher's download site; a mirror replaces it.
    pub base: &'static str,
    /// Path pattern under `base` with `{arch}` (the publisher's spelling, from `arches`).
    pub url: &'static str,
    /// Checksum file path pattern, same placeholders.
    pub checksum_url: &'static str,
    /// The OS and version, for `image list`.
    pub os: &'static str,
    /// (Rust's `std::env::consts::ARCH`, publisher's spelling, firmware) per supported arch.
    pub arches: &'static [(&'static str, &'static str, &'static str)],
    /// How the prepared image boots: `bios` or `uefi` (per arch, in `arches`).
    pub user: &'static str,
}

pub const CATALOG: &[CatalogEntry] = &[
    CatalogEntry {
        name: "ubuntu-24.04",
        base: "https://cloud-images.ubuntu.com",
        url: "/releases/24.04/release/ubuntu-24.04-server-cloudimg-{arch}.img",
        checksum_url: "/releases/24.04/release/SHA256SUMS",
        os: "Ubuntu 24.04 LTS (cloud image)",
        arches: &[("x86_64", "amd64", "bios"), ("aarch64", "arm64", "uefi")],
        user: "ubuntu",
    },
    CatalogEntry {
        name: "ubuntu-22.04",
        base: "https://cloud-images.ubuntu.com",
        url: "/releases/22.04/release/ubuntu-22.04-server-cloudimg-{arch}.img",
        checksum_url: "/releases/22.04/release/SHA256SUMS",
        os: "Ubuntu 22.04 LTS (cloud image)",
        arches: &[("x86_64", "amd64", "bios"), ("aarch64", "arm64", "uefi")],
        user: "ubuntu",
    },
    CatalogEntry {
        // The `tiny` variant: tiny-cloud instead of cloud-init (neither runs here: the image
        // boots our init, see `ImageCache::fetch_cloud`), the smallest of Alpine's builds.
        name: "alpine-3.22",
        base: "https://dl-cdn.alpinelinux.org/alpine",
        url: "/v3.22/releases/cloud/nocloud_alpine-3.22.1-{arch}-{firmware}-tiny-r0.qcow2",
        checksum_url: "/v3.22/releases/cloud/nocloud_alpine-3.22.1-{arch}-{firmware}-tiny-r0.qcow2.sha512",
        os: "Alpine Linux 3.22.1 (cloud image)",
        arches: &[("x86_64", "x86_64", "bios"), ("aarch64", "aarch64", "uefi")],
        user: "alpine",
    },
];

/// A catalog entry resolved for one architecture.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloudImage {
    pub name: String,
    pub url: String,
    pub checksum_url: String,
    /// The file name the checksum file lists.
    pub file_name: String,
    pub firmware: String,
    /// The image's default user (for `users: [default]` seeds).
    pub user: String,
    pub os: String,
}

impl CatalogEntry {
    /// The image for `arch`, from `mirror` (a URL the catalog's paths are appended to) or the
    /// publisher.
    pub fn resolve(&self, arch: &str, mirror: Option<&str>) -> Result<CloudImage, Error> {
        let (_, spelling, firmware) = self
            .arches
            .iter()
            .find(|(rust_arch, _, _)| *rust_arch == arch)
            .ok_or_else(|| Error::UnsupportedArch {
                name: self.name.to_owned(),
                arch: arch.to_owned(),
            })?;
        let base = mirror.unwrap_or(self.base).trim_end_matches('/');
        let fill = |pattern: &str| {
            base.to_owned()
                + &pattern
                    .replace("{arch}", spelling)
                    .replace("{firmware}", firmware)
        };
        let url = fill(self.url);
        let file_name = url.rsplit('/').next().unwrap_or_default().to_owned();
        Ok(CloudImage {
            name: self.name.to_owned(),
            url,
            checksum_url: fill(self.checksum_url),
            file_name,
            firmware: (*firmware).to_owned(),
            user: self.user.to_owned(),
            os: self.os.to_owned(),
        })
    }
}

/// The entry called `name`, or an error listing the known names.
pub fn lookup(name: &str) -> Result<&'static CatalogEntry, Error> {
    CATALOG
        .iter()
        .find(|entry| entry.name == name)
        .ok_or_else(|| Error::UnknownImage {
            name: name.to_owned(),
            known: CATALOG
                .iter()
                .map(|entry| format!("`{}`", entry.name))
                .collect::<Vec<_>>()
                .join(", ")
                + ", `debian-bookworm` (built locally)",
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_urls_per_arch() {
        let ubuntu = lookup("ubuntu-24.04")
            .expect("ubuntu")
            .resolve("x86_64", None)
            .expect("x86_64");
        assert_eq!(ubuntu.file_name, "ubuntu-24.04-server-cloudimg-amd64.img");
        assert!(ubuntu.checksum_url.ends_with("/SHA256SUMS"));
        let alpine = lookup("alpine-3.22")
            .expect("alpine")
            .resolve("aarch64", None)
            .expect("aarch64");
        assert_eq!(
            alpine.file_name,
            "nocloud_alpine-3.22.1-aarch64-uefi-tiny-r0.qcow2"
        );
        assert_eq!(alpine.checksum_url, format!("{}.sha512", alpine.url));
        assert_eq!(alpine.firmware, "uefi");
        let mirrored = lookup("ubuntu-24.04")
            .expect("ubuntu")
            .resolve("x86_64", Some("http://127.0.0.1:8080/ubuntu/"))
            .expect("mirror");
        assert_eq!(
            mirrored.url,
            "http://127.0.0.1:8080/ubuntu/releases/24.04/release/ubuntu-24.04-server-cloudimg-amd64.img"
        );
        assert_eq!(
            mirrored.checksum_url,
            "http://127.0.0.1:8080/ubuntu/releases/24.04/release/SHA256SUMS"
        );
    }

    #[test]
    fn unknown_names_and_arches_are_clear_errors() {
        let error = lookup("windows-11").unwrap_err().to_string();
        assert!(
            error.starts_with("unknown image `windows-11` (known: `ubuntu-24.04`"),
            "{error}"
        );
        let error = lookup("alpine-3.22")
            .expect("alpine")
            .resolve("riscv64", None)
            .unwrap_err()
            .to_string();
        assert_eq!(
            error,
            "image `alpine-3.22` has no riscv64 build in the catalog"
        );
    }
}
