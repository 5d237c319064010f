//! qcow2 disks: converting the built ext4 image, and per-run overlays.

use crate::{Error, Reporter, host};
use std::path::Path;
use std::process::Command;

/// Creates `overlay`, a qcow2 whose reads fall through to `base` (qcow2) and whose writes stay
/// in `overlay`: every run boots one, so the cached base is never written.
pub fn create_overlay(base: &Path, overlay: &Path) -> Result<(), Error> {
    let qemu_img = host::find(host::QEMU_IMG)?;
    let mut command = Command::new(qemu_img);
    command
        .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
        .arg(base)
        .arg(overlay);
    host::output(command).map(drop)
}

/// Converts a disk image (`raw`, or a `qcow2` with its backing chain) to a standalone qcow2;
/// zero clusters are left out, so the file holds only what the filesystem uses.
pub fn convert_to_qcow2(
    source: &Path,
    source_format: &str,
    qcow2: &Path,
    reporter: &dyn Reporter,
) -> Result<(), Error> {
    let qemu_img = host::find(host::QEMU_IMG)?;
    let mut command = Command::new(qemu_img);
    command
        .args(["convert", "-f", source_format, "-O", "qcow2"])
        .arg(source)
        .arg(qcow2);
    host::run(command, reporter)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlay_points_at_its_base() {
        if !ci_exec_prerequisite::require_that(
            "overlay_points_at_its_base",
            host::find(host::QEMU_IMG).is_ok(),
            "qemu-img is not installed",
            "apt-get install qemu-utils (.ci/setup-image.sh does)",
        ) {
            return;
        }
        let directory = tempfile::tempdir().expect("tempdir");
        let raw = directory.path().join("disk.raw");
        std::fs::write(&raw, vec![0u8; 1 << 20]).expect("write raw");
        let base = directory.path().join("base.qcow2");
        convert_to_qcow2(&raw, "raw", &base, &crate::SilentReporter).expect("convert");
        let overlay = directory.path().join("overlay.qcow2");
        create_overlay(&base, &overlay).expect("overlay");
        let mut info = Command::new("qemu-img");
        info.args(["info", "--output=json"]).arg(&overlay);
        let info: serde_json::Value =
            serde_json::from_slice(&host::output(info).expect("qemu-img info")).expect("json");
        assert_eq!(info["backing-filename"], base.display().to_string());
        assert_eq!(info["backing-filename-format"], "qcow2");
    }
}
