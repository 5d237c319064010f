//! The driver's ssh key pair and the wait for a server's sshd.
//!
//! The key is generated with `ed25519-dalek` and written in OpenSSH's formats by `ssh-key`;
//! the private half lives in a file of mode 0600 (in a private temp dir for an ephemeral key,
//! in the user's state dir for a pool's key), which `ssh` reads through the docker driver.

use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ed25519_dalek::SigningKey;
use ssh_key::private::{Ed25519Keypair, KeypairData};
use ssh_key::{LineEnding, PrivateKey};
use tokio::io::AsyncReadExt as _;

/// An ed25519 key pair whose private half is in a file.
#[derive(Debug)]
pub(crate) struct KeyFile {
    path: PathBuf,
    /// `ssh-ed25519 AAAA… comment`, as the providers take it.
    pub(crate) public: String,
    /// Removes the private key when an ephemeral key pair is dropped.
    _dir: Option<tempfile::TempDir>,
}

impl KeyFile {
    /// A new key pair, its private half in a private temp dir removed on drop.
    pub(crate) fn ephemeral(comment: &str) -> io::Result<KeyFile> {
        let dir = tempfile::Builder::new().prefix("ci-exec-ssh-").tempdir()?;
        let path = dir.path().join("id_ed25519");
        let key = generate(comment)?;
        write_private(&path, &key)?;
        KeyFile::describe(path, &key, Some(dir))
    }

    /// The key pair kept at `path` (a pool's), made there first if there is none.
    pub(crate) fn persistent(path: &Path, comment: &str) -> io::Result<KeyFile> {
        let key = match std::fs::read_to_string(path) {
            Ok(text) => PrivateKey::from_openssh(text).map_err(io::Error::other)?,
            Err(error) if error.kind() == io::ErrorKind::NotFound => {
                if let Some(parent) = path.parent() {
                    std::fs::create_dir_all(parent)?;
                }
                let key = generate(comment)?;
                write_private(path, &key)?;
                key
            }
            Err(error) => return Err(error),
        };
        KeyFile::describe(path.to_owned(), &key, None)
    }

    fn describe(
        path: PathBuf,
        key: &PrivateKey,
        dir: Option<tempfile::TempDir>,
    ) -> io::Result<KeyFile> {
        let public = key.public_key();
        Ok(KeyFile {
            path,
            public: public.to_openssh().map_err(io::Error::other)?,
            _dir: dir,
        })
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }
}

fn generate(comment: &str) -> io::Result<PrivateKey> {
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed).map_err(io::Error::other)?;
    let signing = SigningKey::from_bytes(&seed);
    let keypair =
        Ed25519Keypair::from_bytes(&signing.to_keypair_bytes()).map_err(io::Error::other)?;
    PrivateKey::new(KeypairData::Ed25519(keypair), comment).map_err(io::Error::other)
}

fn write_private(path: &Path, key: &PrivateKey) -> io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let text = key.to_openssh(LineEnding::LF).map_err(io::Error::other)?;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(text.as_bytes())
}

/// Waits until something at `address` answers with an SSH banner (`SSH-2.0-…`), or `timeout`
/// passes. A port that accepts and says nothing (a booting server's firewall, a proxy) is not
/// ready yet.
pub(crate) async fn wait_for_sshd(address: &str, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    let mut interval = Duration::from_millis(50);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if banner(address, left.min(Duration::from_secs(5))).await {
            return true;
        }
        if Instant::now() + interval >= deadline {
            return false;
        }
        tokio::time::sleep(interval).await;
        interval = (interval * 2).min(Duration::from_secs(2));
    }
}

async fn banner(address: &str, patience: Duration) -> bool {
    let attempt = async {
        let mut stream = tokio::net::TcpStream::connect(address).await.ok()?;
        let mut start = [0u8; 4];
        stream.read_exact(&mut start).await.ok()?;
        Some(&start == b"SSH-")
    };
    tokio::time::timeout(patience, attempt)
        .await
        .ok()
        .flatten()
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_openssh_ed25519_and_private_halves_are_0600() {
        use std::os::unix::fs::PermissionsExt as _;
        let key = KeyFile::ephemeral("ci-test").unwrap();
        assert!(key.public.starts_with("ssh-ed25519 AAAA"), "{}", key.public);
        assert!(key.public.ends_with(" ci-test"));
        let mode = std::fs::metadata(key.path()).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let text = std::fs::read_to_string(key.path()).unwrap();
        assert!(text.starts_with("-----BEGIN OPENSSH PRIVATE KEY-----"));
        let path = key.path().to_owned();
        drop(key);
        assert!(!path.exists(), "an ephemeral key leaves nothing behind");

        let dir = tempfile::tempdir().unwrap();
        let kept = dir.path().join("pool/id_ed25519");
        let first = KeyFile::persistent(&kept, "pool").unwrap();
        let again = KeyFile::persistent(&kept, "pool").unwrap();
        assert_eq!(first.public, again.public);
    }
}
