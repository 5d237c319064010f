//! The uncompressed kernel a VM boots directly: the `vmlinux` inside an x86 bzImage (for PVH
//! direct boot), or an arm64 `Image` (what `qemu-system-aarch64 -kernel` and Apple's
//! `VZLinuxBootLoader` load; the latter takes no compressed kernel).

use crate::{Error, host};
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

/// Writes the ELF kernel contained in the bzImage `kernel` to `vmlinux`.
///
/// The boot protocol header says where the compressed payload sits (`payload_offset`,
/// `payload_length`, relative to the protected-mode code after the setup sectors). Debian's
/// kernels compress it with xz and the x86 BCJ filter, which pure-Rust decoders lack, so that
/// goes to the host's `xz`; Ubuntu's use zstd, which `ruzstd` decodes here.
///
/// An arm64 kernel is written as it is when it is an uncompressed `Image` (Debian's arm64
/// `vmlinuz` is), or gunzipped (by the host's `gzip`) when it is an `Image.gz`.
pub fn extract_vmlinux(kernel: &Path, vmlinux: &Path) -> Result<(), Error> {
    let image = std::fs::read(kernel).map_err(|source| Error::Read {
        path: kernel.to_owned(),
        source,
    })?;
    let not_bzimage = |reason| Error::NotBzImage {
        path: kernel.to_owned(),
        reason,
    };
    if is_arm64_image(&image) {
        return std::fs::write(vmlinux, &image).map_err(|source| Error::Write {
            path: vmlinux.to_owned(),
            source,
        });
    }
    if image.starts_with(GZIP_MAGIC) {
        decompress_with(host::GZIP, &["--decompress", "--stdout"], &image, vmlinux)?;
        let unpacked = std::fs::read(vmlinux).map_err(|source| Error::Read {
            path: vmlinux.to_owned(),
            source,
        })?;
        if !is_arm64_image(&unpacked) {
            return Err(not_bzimage("a gzip file that is not an arm64 Image"));
        }
        return Ok(());
    }
    let payload = payload(&image).map_err(not_bzimage)?;
    if payload.starts_with(XZ_MAGIC) {
        decompress_with(
            host::XZ,
            &["--decompress", "--stdout", "--single-stream"],
            payload,
            vmlinux,
        )?;
    } else if payload.starts_with(ZSTD_MAGIC) {
        decompress_zstd(payload, kernel, vmlinux)?;
    } else {
        return Err(not_bzimage("payload is neither xz- nor zstd-compressed"));
    }
    let mut magic = [0; 4];
    let read = std::fs::File::open(vmlinux)
        .and_then(|mut file| std::io::Read::read_exact(&mut file, &mut magic));
    if read.is_err() || &magic != b"\x7fELF" {
        return Err(not_bzimage("payload did not decompress to an ELF image"));
    }
    Ok(())
}

const XZ_MAGIC: &[u8] = &[0xfd, b'7', b'z', b'X', b'Z', 0];
const GZIP_MAGIC: &[u8] = &[0x1f, 0x8b];

/// Whether `image` is an arm64 Linux `Image`: the boot header's magic `ARM\x64` at 0x38
/// (Documentation/arch/arm64/booting.rst).
fn is_arm64_image(image: &[u8]) -> bool {
    image.get(0x38..0x3c) == Some(b"ARM\x64".as_slice())
}
const ZSTD_MAGIC: &[u8] = &[0x28, 0xb5, 0x2f, 0xfd];

fn create(vmlinux: &Path) -> Result<std::fs::File, Error> {
    std::fs::File::create(vmlinux).map_err(|source| Error::Write {
        path: vmlinux.to_owned(),
        source,
    })
}

/// Runs the host's `tool` (`xz`, `gzip`) with `arguments` on `payload`, into `vmlinux`.
fn decompress_with(
    tool: host::Tool,
    arguments: &[&str],
    payload: &[u8],
    vmlinux: &Path,
) -> Result<(), Error> {
    let program = host::find(tool)?;
    let mut child = Command::new(&program)
        .args(arguments)
        .stdin(Stdio::piped())
        .stdout(create(vmlinux)?)
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| Error::Spawn {
            program: tool.name.to_owned(),
            source,
        })?;
    let mut stdin = child.stdin.take();
    let written = std::thread::scope(|scope| {
        let writer = scope.spawn(move || stdin.as_mut().map(|stdin| stdin.write_all(payload)));
        writer.join()
    });
    let output = child.wait_with_output().map_err(|source| Error::Spawn {
        program: tool.name.to_owned(),
        source,
    })?;
    // xz stops reading after the stream; a broken pipe on the trailing bytes is expected.
    if let Ok(Some(Err(error))) = written
        && error.kind() != std::io::ErrorKind::BrokenPipe
    {
        return Err(Error::Write {
            path: vmlinux.to_owned(),
            source: error,
        });
    }
    if !output.status.success() {
        return Err(Error::CommandFailed {
            command: format!("{} {}", tool.name, arguments.join(" ")),
            status: output.status,
            stderr_tail: String::from_utf8_lossy(&output.stderr).into_owned(),
        });
    }
    Ok(())
}

/// Decodes the payload's one zstd frame; the bytes after it (the kernel's build appends the
/// uncompressed size) are not zstd and are left alone.
fn decompress_zstd(payload: &[u8], kernel: &Path, vmlinux: &Path) -> Result<(), Error> {
    let decompress = |reason| Error::Decompress {
        path: kernel.to_owned(),
        reason,
    };
    let mut decoder = ruzstd::decoding::StreamingDecoder::new(payload)
        .map_err(|error| decompress(format!("not a zstd frame: {error}")))?;
    let mut output = std::io::BufWriter::new(create(vmlinux)?);
    std::io::copy(&mut decoder, &mut output)
        .and_then(|_| output.flush())
        .map_err(|error| decompress(format!("zstd: {error}")))?;
    Ok(())
}

/// The compressed payload of a bzImage (boot protocol 2.08 or later).
fn payload(image: &[u8]) -> Result<&[u8], &'static str> {
    if image.len() < 0x250 || &image[0x202..0x206] != b"HdrS" {
        return Err("no `HdrS` boot header");
    }
    let version = u16::from_le_bytes([image[0x206], image[0x207]]);
    if version < 0x0208 {
        return Err("boot protocol older than 2.08 has no payload fields");
    }
    let setup_sectors = match image[0x1f1] {
        0 => 4,
        sectors => usize::from(sectors),
    };
    let read_u32 = |offset: usize| {
        u32::from_le_bytes([
            image[offset],
            image[offset + 1],
            image[offset + 2],
            image[offset + 3],
        ]) as usize
    };
    let start = (setup_sectors + 1) * 512 + read_u32(0x248);
    let end = start + read_u32(0x24c);
    image.get(start..end).ok_or("payload lies outside the file")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_bzimage(payload_bytes: &[u8]) -> Vec<u8> {
        let mut image = vec![0u8; 0x1000];
        image[0x1f1] = 1;
        image[0x202..0x206].copy_from_slice(b"HdrS");
        image[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
        image[0x248..0x24c].copy_from_slice(&0x10u32.to_le_bytes());
        image[0x24c..0x250].copy_from_slice(&(payload_bytes.len() as u32).to_le_bytes());
        image.truncate(1024 + 0x10);
        image.extend_from_slice(payload_bytes);
        image.extend_from_slice(&[0xaa; 4]);
        image
    }

    #[test]
    fn finds_payload_from_header() {
        let image = fake_bzimage(b"payload!");
        assert_eq!(payload(&image), Ok(&b"payload!"[..]));
    }

    #[test]
    fn rejects_files_without_boot_header() {
        assert_eq!(payload(&[0; 0x300]), Err("no `HdrS` boot header"));
        let mut image = fake_bzimage(b"x");
        image[0x24c..0x250].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(payload(&image), Err("payload lies outside the file"));
    }

    /// Wraps `compressed` in a bzImage, extracts it, and returns the vmlinux written.
    fn extract_wrapped(compressed: &[u8]) -> Result<Vec<u8>, Error> {
        let directory = tempfile::tempdir().expect("tempdir");
        let kernel = directory.path().join("vmlinuz");
        std::fs::write(&kernel, fake_bzimage(compressed)).expect("write kernel");
        let vmlinux = directory.path().join("vmlinux");
        extract_vmlinux(&kernel, &vmlinux)?;
        Ok(std::fs::read(&vmlinux).expect("read"))
    }

    fn elf() -> Vec<u8> {
        b"\x7fELF-not-really-but-starts-like-one".repeat(100)
    }

    #[test]
    fn extracts_elf_from_xz_payload_with_trailing_bytes() {
        let mut xz = Command::new("xz")
            .args(["--compress", "--stdout", "--check=crc32"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("xz is a prerequisite of these tests");
        xz.stdin
            .take()
            .expect("stdin")
            .write_all(&elf())
            .expect("write");
        let compressed = xz.wait_with_output().expect("xz output").stdout;
        assert_eq!(extract_wrapped(&compressed).expect("extract"), elf());
    }

    #[test]
    fn extracts_elf_from_zstd_payload_with_trailing_size() {
        let mut compressed = ruzstd::encoding::compress_to_vec(
            &elf()[..],
            ruzstd::encoding::CompressionLevel::Fastest,
        );
        compressed.extend_from_slice(&(elf().len() as u32).to_le_bytes());
        assert_eq!(extract_wrapped(&compressed).expect("extract"), elf());
    }

    #[test]
    fn a_corrupt_zstd_payload_is_an_error_naming_the_kernel() {
        let mut compressed = ruzstd::encoding::compress_to_vec(
            &elf()[..],
            ruzstd::encoding::CompressionLevel::Fastest,
        );
        compressed.truncate(compressed.len() / 2);
        let error = extract_wrapped(&compressed).expect_err("a truncated frame cannot decode");
        assert!(error.to_string().contains("vmlinuz"), "{error}");
    }

    fn arm64_image() -> Vec<u8> {
        let mut image = vec![0_u8; 4096];
        image[0x38..0x3c].copy_from_slice(b"ARM\x64");
        image[1000..1010].copy_from_slice(b"kernel txt");
        image
    }

    #[test]
    fn an_arm64_image_is_kept_as_it_is_and_a_gzipped_one_unpacked() {
        let directory = tempfile::tempdir().expect("tempdir");
        let kernel = directory.path().join("vmlinuz");
        let vmlinux = directory.path().join("vmlinux");
        std::fs::write(&kernel, arm64_image()).expect("write");
        extract_vmlinux(&kernel, &vmlinux).expect("plain Image");
        assert_eq!(std::fs::read(&vmlinux).expect("read"), arm64_image());

        let gzip = Command::new("gzip")
            .arg("--stdout")
            .arg(&vmlinux)
            .output()
            .expect("gzip is a prerequisite of these tests");
        std::fs::write(&kernel, &gzip.stdout).expect("write");
        std::fs::remove_file(&vmlinux).expect("remove");
        extract_vmlinux(&kernel, &vmlinux).expect("Image.gz");
        assert_eq!(std::fs::read(&vmlinux).expect("read"), arm64_image());

        // A gzip file that holds something else is refused, naming the kernel.
        let other = Command::new("sh")
            .args(["-c", "echo not a kernel | gzip"])
            .output()
            .expect("gzip");
        std::fs::write(&kernel, &other.stdout).expect("write");
        let error = extract_vmlinux(&kernel, &vmlinux).expect_err("not an Image");
        assert!(error.to_string().contains("not an arm64 Image"), "{error}");
    }
}
