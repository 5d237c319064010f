use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;

/// Bumped whenever the recipe changes what ends up in an image, so old builds stop being
/// "current" and results keyed on their digest are not confused with new ones.
pub const RECIPE_VERSION: u32 = 2;

/// A built (or downloaded and prepared) image, as recorded in `manifest.json` beside its files.
/// Paths are absolute; `disk` is a qcow2 base that is never written (boot an overlay of it,
/// see [`crate::create_overlay`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// `debian-bookworm`, `alpine-3.22`, …
    pub name: String,
    /// sha256 (hex) over everything that decides the image's content: recipe version, the
    /// resolved package versions, the kernel, and the sha256 of our `mk` and init binaries.
    /// The same inputs give the same digest; results are keyed on it.
    pub digest: String,
    /// The kernel as Debian ships it (bzImage).
    pub kernel: PathBuf,
    /// The same kernel uncompressed (ELF, boots with PVH: about 3× faster to start under TCG).
    pub vmlinux: PathBuf,
    /// Our initramfs (newc cpio, uncompressed).
    pub initrd: PathBuf,
    /// The root disk: qcow2, ext4 inside, never written.
    pub disk: PathBuf,
    /// What to pass as `-append`.
    pub kernel_cmdline: String,
    /// Guest OS packages and their versions (`dpkg-query`), plus `linux-image`.
    pub packages: BTreeMap<String, String>,
    pub recipe_version: u32,
    /// sha256 over the build request (recipe, package list, suite, architecture, binaries):
    /// decides whether a cached build is current without building again.
    pub inputs: String,
    /// `x86_64`.
    pub arch: String,
    /// The guest OS and its version, as its `os-release` names it (`Ubuntu 24.04.1 LTS`);
    /// empty in manifests written before it was recorded.
    #[serde(default)]
    pub os: String,
    /// Kernel release, e.g. `6.1.0-56-amd64`.
    pub kernel_release: String,
    /// Container images preloaded into the guest's podman storage.
    pub container_images: Vec<String>,
    /// How the image was made: `mmdebstrap` or `download`.
    pub source: String,
    /// RFC 3339 (UTC) build time; informational, not part of the digest.
    pub built_at: String,
    /// Sizes in bytes of the files above, for `image list`.
    pub disk_bytes: u64,
}
