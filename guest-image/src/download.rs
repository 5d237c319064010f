//! Downloading cloud images: fetch the publisher's checksum file, stream the image into a
//! temporary file while hashing it, and only rename it into the cache once size and digest
//! match. A failed or interrupted download leaves nothing in the cache.

use crate::{Error, Reporter};
use sha2::{Digest, Sha256, Sha512};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

/// Transport-level failures (the cache-level ones are [`Error`] variants).
#[derive(Debug, thiserror::Error)]
pub enum DownloadError {
    #[error("request failed")]
    Http(#[source] ureq::Error),
    #[error("reading the response body failed")]
    Body(#[source] std::io::Error),
    #[error("checksum file is not UTF-8 text")]
    ChecksumText,
}

/// A checksum as published: sha256 (64 hex digits) or sha512 (128, Alpine's `.sha512` files).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Checksum {
    Sha256(String),
    Sha512(String),
}

impl Checksum {
    fn from_hex(hex: &str) -> Option<Self> {
        if !hex.bytes().all(|byte| byte.is_ascii_hexdigit()) {
            return None;
        }
        match hex.len() {
            64 => Some(Checksum::Sha256(hex.to_ascii_lowercase())),
            128 => Some(Checksum::Sha512(hex.to_ascii_lowercase())),
            _ => None,
        }
    }

    fn algorithm(&self) -> &'static str {
        match self {
            Checksum::Sha256(_) => "sha256",
            Checksum::Sha512(_) => "sha512",
        }
    }

    fn expected(&self) -> &str {
        match self {
            Checksum::Sha256(hex) | Checksum::Sha512(hex) => hex,
        }
    }
}

/// Finds `file`'s digest in a `sha256sum`-style listing (`<hex>  <name>` or `<hex> *<name>`,
/// one per line). A listing with a single bare digest applies to whatever it sits beside.
pub fn parse_checksum_file(text: &str, file: &str) -> Option<Checksum> {
    let mut bare = Vec::new();
    for line in text
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
    {
        let mut words = line.split_whitespace();
        let Some(hex) = words.next() else { continue };
        match words.next() {
            Some(name) => {
                let name = name.trim_start_matches('*');
                if name == file || name.rsplit('/').next() == Some(file) {
                    return Checksum::from_hex(hex);
                }
            }
            None => bare.push(hex),
        }
    }
    match bare.as_slice() {
        [hex] => Checksum::from_hex(hex),
        _ => None,
    }
}

fn get(url: &str) -> Result<ureq::http::Response<ureq::Body>, Error> {
    ureq::get(url).call().map_err(|source| Error::Download {
        url: url.to_owned(),
        source: Box::new(DownloadError::Http(source)),
    })
}

/// Downloads `url` into `directory/file_name`, verified against the checksum file at
/// `checksum_url`, and returns the final path. Returns at once if a verified copy is there
/// (a `.verified` marker beside it records the digest it was checked against).
pub fn fetch_verified(
    url: &str,
    checksum_url: &str,
    directory: &Path,
    file_name: &str,
    reporter: &dyn Reporter,
) -> Result<PathBuf, Error> {
    std::fs::create_dir_all(directory).map_err(|source| Error::CreateDirectory {
        path: directory.to_owned(),
        source,
    })?;
    let checksum_text = get(checksum_url)?
        .body_mut()
        .read_to_string()
        .map_err(|_| Error::Download {
            url: checksum_url.to_owned(),
            source: Box::new(DownloadError::ChecksumText),
        })?;
    let checksum =
        parse_checksum_file(&checksum_text, file_name).ok_or_else(|| Error::ChecksumNotListed {
            url: checksum_url.to_owned(),
            file: file_name.to_owned(),
        })?;

    let final_path = directory.join(file_name);
    let marker = directory.join(format!("{file_name}.verified"));
    if final_path.exists()
        && std::fs::read_to_string(&marker).is_ok_and(|text| text.trim() == checksum.expected())
    {
        return Ok(final_path);
    }

    let partial = directory.join(format!(".partial-{file_name}-{}", std::process::id()));
    let result = download_to(url, &partial, &checksum, reporter);
    if let Err(error) = result {
        let _ = std::fs::remove_file(&partial);
        return Err(error);
    }
    std::fs::rename(&partial, &final_path).map_err(|source| Error::Rename {
        from: partial.clone(),
        to: final_path.clone(),
        source,
    })?;
    crate::cache::write_atomically(&marker, format!("{}\n", checksum.expected()).as_bytes())?;
    Ok(final_path)
}

fn download_to(
    url: &str,
    partial: &Path,
    checksum: &Checksum,
    reporter: &dyn Reporter,
) -> Result<(), Error> {
    let mut response = get(url)?;
    let total = response
        .headers()
        .get("content-length")
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<u64>().ok());
    reporter.transfer_started(url, total);
    let file = std::fs::File::create(partial).map_err(|source| Error::Write {
        path: partial.to_owned(),
        source,
    })?;
    let mut writer = std::io::BufWriter::with_capacity(1 << 20, file);
    let mut hasher = Hasher::new(checksum);
    let mut reader = response.body_mut().with_config().limit(u64::MAX).reader();
    let mut buffer = vec![0u8; 1 << 16];
    let mut done = 0u64;
    loop {
        let read = match reader.read(&mut buffer) {
            Ok(0) => break,
            Ok(read) => read,
            Err(error) => {
                reporter.transfer_finished();
                // A connection closed early shows up as a body error; say "truncated" when we
                // know how much was promised.
                if let Some(expected) = total
                    && done < expected
                {
                    return Err(Error::Truncated {
                        url: url.to_owned(),
                        expected,
                        actual: done,
                    });
                }
                return Err(Error::Download {
                    url: url.to_owned(),
                    source: Box::new(DownloadError::Body(error)),
                });
            }
        };
        hasher.update(&buffer[..read]);
        writer
            .write_all(&buffer[..read])
            .map_err(|source| Error::Write {
                path: partial.to_owned(),
                source,
            })?;
        done += read as u64;
        reporter.transfer_progress(done);
    }
    reporter.transfer_finished();
    if let Some(expected) = total
        && done != expected
    {
        return Err(Error::Truncated {
            url: url.to_owned(),
            expected,
            actual: done,
        });
    }
    let file = writer.into_inner().map_err(|error| Error::Write {
        path: partial.to_owned(),
        source: error.into_error(),
    })?;
    file.sync_all().map_err(|source| Error::Write {
        path: partial.to_owned(),
        source,
    })?;
    let actual = hasher.finish();
    if actual != checksum.expected() {
        return Err(Error::ChecksumMismatch {
            url: url.to_owned(),
            algorithm: checksum.algorithm(),
            expected: checksum.expected().to_owned(),
            actual,
        });
    }
    Ok(())
}

enum Hasher {
    Sha256(Sha256),
    Sha512(Sha512),
}

impl Hasher {
    fn new(checksum: &Checksum) -> Self {
        match checksum {
            Checksum::Sha256(_) => Hasher::Sha256(Sha256::new()),
            Checksum::Sha512(_) => Hasher::Sha512(Sha512::new()),
        }
    }

    fn update(&mut self, bytes: &[u8]) {
        match self {
            Hasher::Sha256(hasher) => hasher.update(bytes),
            Hasher::Sha512(hasher) => hasher.update(bytes),
        }
    }

    fn finish(self) -> String {
        match self {
            Hasher::Sha256(hasher) => hex::encode(hasher.finalize()),
            Hasher::Sha512(hasher) => hex::encode(hasher.finalize()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sha256sums_and_single_digest_files() {
        let sha = "a".repeat(64);
        let listing = format!(
            "{sha} *ubuntu-24.04-server-cloudimg-amd64.img\n{} other.img\n",
            "b".repeat(64)
        );
        assert_eq!(
            parse_checksum_file(&listing, "ubuntu-24.04-server-cloudimg-amd64.img"),
            Some(Checksum::Sha256(sha.clone()))
        );
        assert_eq!(parse_checksum_file(&listing, "missing.img"), None);
        let alpine = format!(
            "{}  nocloud_alpine-3.22.1-x86_64-bios-tiny-r0.qcow2\n",
            "C".repeat(128)
        );
        assert_eq!(
            parse_checksum_file(&alpine, "nocloud_alpine-3.22.1-x86_64-bios-tiny-r0.qcow2"),
            Some(Checksum::Sha512("c".repeat(128)))
        );
        assert_eq!(
            parse_checksum_file(&format!("{sha}\n"), "anything"),
            Some(Checksum::Sha256(sha))
        );
        assert_eq!(parse_checksum_file("nothex  file\n", "file"), None);
    }

    /// A loopback HTTP/1.1 server: each route is (path, declared Content-Length, body). A
    /// declared length above the body's makes a truncated response (the connection closes early).
    struct Server {
        address: String,
        handle: Option<std::thread::JoinHandle<()>>,
        stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    }

    impl Server {
        fn start(routes: Vec<(&'static str, usize, Vec<u8>)>) -> Self {
            use std::io::BufRead;
            let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind loopback");
            listener.set_nonblocking(true).expect("nonblocking");
            let address = format!("http://{}", listener.local_addr().expect("address"));
            let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
            let stopping = stop.clone();
            let handle = std::thread::spawn(move || {
                let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
                while !stopping.load(std::sync::atomic::Ordering::SeqCst)
                    && std::time::Instant::now() < deadline
                {
                    let Ok((stream, _)) = listener.accept() else {
                        std::thread::sleep(std::time::Duration::from_millis(2));
                        continue;
                    };
                    stream.set_nonblocking(false).expect("blocking");
                    let mut reader = std::io::BufReader::new(stream.try_clone().expect("clone"));
                    let mut request_line = String::new();
                    let _ = reader.read_line(&mut request_line);
                    let mut header = String::new();
                    while reader.read_line(&mut header).is_ok_and(|read| read > 2) {
                        header.clear();
                    }
                    let path = request_line
                        .split_whitespace()
                        .nth(1)
                        .unwrap_or_default()
                        .to_owned();
                    let mut stream = stream;
                    match routes.iter().find(|(route, _, _)| *route == path) {
                        Some((_, length, body)) => {
                            let head = format!(
                                "HTTP/1.1 200 OK\r\nContent-Length: {length}\r\nConnection: close\r\n\r\n"
                            );
                            let _ = stream.write_all(head.as_bytes());
                            let _ = stream.write_all(body);
                        }
                        None => {
                            let _ = stream.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
                        }
                    }
                }
            });
            Server {
                address,
                handle: Some(handle),
                stop,
            }
        }
    }

    impl Drop for Server {
        fn drop(&mut self) {
            self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
            if let Some(handle) = self.handle.take() {
                let _ = handle.join();
            }
        }
    }

    fn cache_files(directory: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(directory)
            .map(|entries| {
                entries
                    .flatten()
                    .map(|entry| entry.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
    }

    /// Fetches the server's `/disk.img`, checked against its `/SHA256SUMS`, into `directory`.
    fn fetch_from(server: &Server, directory: &Path) -> Result<PathBuf, Error> {
        fetch_verified(
            &format!("{}/disk.img", server.address),
            &format!("{}/SHA256SUMS", server.address),
            directory,
            "disk.img",
            &crate::SilentReporter,
        )
    }

    fn image_bytes() -> Vec<u8> {
        (0..300_000u32)
            .flat_map(|value| value.to_le_bytes())
            .collect()
    }

    #[test]
    fn good_download_is_verified_cached_and_reused() {
        let image = image_bytes();
        let sums = format!("{} *disk.img\n", hex::encode(Sha256::digest(&image)));
        let server = Server::start(vec![
            ("/disk.img", image.len(), image.clone()),
            ("/SHA256SUMS", sums.len(), sums.into_bytes()),
        ]);
        let directory = tempfile::tempdir().expect("tempdir");
        let path = fetch_from(&server, directory.path()).expect("download");
        assert_eq!(std::fs::read(&path).expect("read"), image);
        assert_eq!(
            cache_files(directory.path()),
            ["disk.img", "disk.img.verified"]
        );
        // A second fetch finds the verified copy and does not download the image again.
        std::fs::write(&path, &image).expect("touch");
        let again = fetch_from(&server, directory.path()).expect("cached");
        assert_eq!(again, path);
    }

    #[test]
    fn truncated_download_is_a_clear_error_and_leaves_nothing() {
        let image = image_bytes();
        let sums = format!("{}  disk.img\n", hex::encode(Sha256::digest(&image)));
        let server = Server::start(vec![
            ("/disk.img", image.len(), image[..image.len() / 3].to_vec()),
            ("/SHA256SUMS", sums.len(), sums.into_bytes()),
        ]);
        let directory = tempfile::tempdir().expect("tempdir");
        let error = fetch_from(&server, directory.path()).unwrap_err();
        let message = error.to_string();
        assert!(
            message.contains("was truncated: expected 1200000 bytes, got 400000"),
            "{message}"
        );
        assert!(
            cache_files(directory.path()).is_empty(),
            "{:?}",
            cache_files(directory.path())
        );
    }

    #[test]
    fn wrong_checksum_is_a_clear_error_and_leaves_nothing() {
        let image = image_bytes();
        let wrong = "0".repeat(64);
        let sums = format!("{wrong}  disk.img\n");
        let server = Server::start(vec![
            ("/disk.img", image.len(), image.clone()),
            ("/SHA256SUMS", sums.len(), sums.into_bytes()),
        ]);
        let directory = tempfile::tempdir().expect("tempdir");
        let error = fetch_from(&server, directory.path()).unwrap_err();
        let message = error.to_string();
        assert!(
            message.contains(&format!(
                "failed verification: expected sha256 {wrong}, got {}",
                hex::encode(Sha256::digest(&image))
            )),
            "{message}"
        );
        assert!(cache_files(directory.path()).is_empty());
    }

    #[test]
    fn checksum_file_without_the_image_is_a_clear_error() {
        let sums = format!("{}  other.img\n", "1".repeat(64));
        let server = Server::start(vec![("/SHA256SUMS", sums.len(), sums.into_bytes())]);
        let directory = tempfile::tempdir().expect("tempdir");
        let error = fetch_from(&server, directory.path()).unwrap_err();
        assert_eq!(
            error.to_string(),
            format!(
                "checksum file `{}/SHA256SUMS` has no entry for `disk.img`",
                server.address
            )
        );
        assert!(cache_files(directory.path()).is_empty());
    }
}
