//! Executor keys: each executor signs the results it publishes with an Ed25519 key kept in its
//! state directory, and a replaying executor checks the signature against the keys it trusts.
//! Asymmetric, as Nix signs its binary caches: a reader that can check a record cannot forge one
//! (a shared HMAC key, as Turborepo's, would let every reader sign).

use std::fs;
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use ci_exec_job::store::{RecordSignature, ResultRecord};
use ed25519_dalek::{Signer as _, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("failed to {action} executor key `{}`", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("executor key `{}` is damaged", path.display())]
    Damaged { path: PathBuf },
    #[error("`{text}` is not a public key (expected `name:base64` of 32 bytes)")]
    BadPublicKey { text: String },
    #[error("the system's random source failed")]
    Random(#[source] getrandom::Error),
}

/// Why a record's signature is not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureProblem {
    #[error("it is not signed")]
    Unsigned,
    #[error("its signer `{signer}` is not a trusted key")]
    Untrusted { signer: String },
    #[error("its signature does not match its content")]
    Invalid,
}

/// A public key as `name:base64`, the form `ci-exec key show` prints and
/// `CI_EXEC_TRUSTED_KEYS` takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicKey {
    pub name: String,
    key: VerifyingKey,
}

impl PublicKey {
    pub fn parse(text: &str) -> Result<PublicKey, KeyError> {
        let bad = || KeyError::BadPublicKey {
            text: text.to_owned(),
        };
        let (name, encoded) = text.trim().rsplit_once(':').ok_or_else(bad)?;
        let bytes: [u8; 32] = BASE64
            .decode(encoded)
            .ok()
            .and_then(|bytes| bytes.try_into().ok())
            .ok_or_else(bad)?;
        let key = VerifyingKey::from_bytes(&bytes).map_err(|_| bad())?;
        if name.is_empty() || name.contains(char::is_whitespace) {
            return Err(bad());
        }
        Ok(PublicKey {
            name: name.to_owned(),
            key,
        })
    }

    /// A list separated by commas, spaces or newlines (`CI_EXEC_TRUSTED_KEYS`).
    pub fn parse_list(text: &str) -> Result<Vec<PublicKey>, KeyError> {
        text.split(|c: char| c == ',' || c.is_whitespace())
            .filter(|item| !item.is_empty())
            .map(PublicKey::parse)
            .collect()
    }
}

impl std::fmt::Display for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.name, BASE64.encode(self.key.as_bytes()))
    }
}

/// This executor's signing key.
pub struct ExecutorKey {
    name: String,
    signing: SigningKey,
}

impl std::fmt::Debug for ExecutorKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the secret half.
        write!(f, "ExecutorKey({})", self.public())
    }
}

#[derive(Serialize, Deserialize)]
struct KeyFile {
    name: String,
    /// Base64 of the 32-byte Ed25519 seed.
    secret: String,
}

impl ExecutorKey {
    /// Where the key lives: `$CI_EXEC_KEY`, or `executor-key.json` in ci-exec's state
    /// directory (`$XDG_DATA_HOME/ci-exec`), beside the result store.
    pub fn default_path() -> PathBuf {
        std::env::var_os("CI_EXEC_KEY")
            .map(PathBuf::from)
            .or_else(|| dirs::data_dir().map(|dir| dir.join("ci-exec").join("executor-key.json")))
            .unwrap_or_else(|| std::env::temp_dir().join("ci-exec-executor-key.json"))
    }

    /// The key at `path`, created on first use (readable by its owner only) and named after
    /// this host.
    pub fn load_or_create(path: &Path) -> Result<ExecutorKey, KeyError> {
        match fs::read(path) {
            Ok(bytes) => {
                let damaged = || KeyError::Damaged {
                    path: path.to_owned(),
                };
                let file: KeyFile = serde_json::from_slice(&bytes).map_err(|_| damaged())?;
                let seed: [u8; 32] = BASE64
                    .decode(&file.secret)
                    .ok()
                    .and_then(|bytes| bytes.try_into().ok())
                    .ok_or_else(damaged)?;
                Ok(ExecutorKey {
                    name: file.name,
                    signing: SigningKey::from_bytes(&seed),
                })
            }
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                let key = ExecutorKey::generate(&default_name())?;
                key.save(path)?;
                Ok(key)
            }
            Err(source) => Err(KeyError::Io {
                action: "read",
                path: path.to_owned(),
                source,
            }),
        }
    }

    pub fn generate(name: &str) -> Result<ExecutorKey, KeyError> {
        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed).map_err(KeyError::Random)?;
        Ok(ExecutorKey {
            name: name.to_owned(),
            signing: SigningKey::from_bytes(&seed),
        })
    }

    fn save(&self, path: &Path) -> Result<(), KeyError> {
        let io = |action, source| KeyError::Io {
            action,
            path: path.to_owned(),
            source,
        };
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).map_err(|source| io("create the directory of", source))?;
        }
        let json = serde_json::to_vec_pretty(&KeyFile {
            name: self.name.clone(),
            secret: BASE64.encode(self.signing.to_bytes()),
        })
        .map_err(|source| io("encode", source.into()))?;
        // `create_new`: two executors starting at once must not each write a key and sign
        // with the one that lost.
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(|source| io("create", source))?;
        file.write_all(&json)
            .and_then(|()| file.sync_all())
            .map_err(|source| io("write", source))
    }

    pub fn public(&self) -> PublicKey {
        PublicKey {
            name: self.name.clone(),
            key: self.signing.verifying_key(),
        }
    }

    /// Base64 of the signature of `message`.
    pub fn sign_bytes(&self, message: &[u8]) -> String {
        BASE64.encode(self.signing.sign(message).to_bytes())
    }

    /// Signs `record` (over [`ResultRecord::signed_bytes`]) in place.
    pub fn sign(&self, record: &mut ResultRecord) {
        record.signature = None;
        let signature = self.signing.sign(&record.signed_bytes());
        record.signature = Some(RecordSignature {
            signer: self.public().to_string(),
            signature: BASE64.encode(signature.to_bytes()),
        });
    }
}

/// Checks that `record` is signed by one of `trusted` and that the signature covers its content.
pub fn verify(record: &ResultRecord, trusted: &[PublicKey]) -> Result<(), SignatureProblem> {
    let signature = record
        .signature
        .as_ref()
        .ok_or(SignatureProblem::Unsigned)?;
    let signer = PublicKey::parse(&signature.signer).map_err(|_| SignatureProblem::Invalid)?;
    if !trusted.iter().any(|key| key.key == signer.key) {
        return Err(SignatureProblem::Untrusted {
            signer: signature.signer.clone(),
        });
    }
    verify_signature(record, &signer)
}

/// Checks only that `record`'s signature is valid for the key it names, `signer`.
pub fn verify_signature(record: &ResultRecord, signer: &PublicKey) -> Result<(), SignatureProblem> {
    let signature = record
        .signature
        .as_ref()
        .ok_or(SignatureProblem::Unsigned)?;
    let bytes: [u8; 64] = BASE64
        .decode(&signature.signature)
        .ok()
        .and_then(|bytes| bytes.try_into().ok())
        .ok_or(SignatureProblem::Invalid)?;
    signer
        .key
        .verify_strict(
            &record.signed_bytes(),
            &ed25519_dalek::Signature::from_bytes(&bytes),
        )
        .map_err(|_| SignatureProblem::Invalid)
}

/// Whether `signature` (base64) is `signer`'s signature of `message`.
pub fn verify_bytes(message: &[u8], signature: &str, signer: &PublicKey) -> bool {
    BASE64
        .decode(signature)
        .ok()
        .and_then(|bytes| <[u8; 64]>::try_from(bytes).ok())
        .is_some_and(|bytes| {
            signer
                .key
                .verify_strict(message, &ed25519_dalek::Signature::from_bytes(&bytes))
                .is_ok()
        })
}

/// The public key a record names as its signer, if it names a well-formed one.
pub fn signer_of(record: &ResultRecord) -> Option<PublicKey> {
    PublicKey::parse(&record.signature.as_ref()?.signer).ok()
}

/// `ci-exec-<hostname>`.
fn default_name() -> String {
    let host = fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|name| name.trim().to_owned())
        .ok()
        .filter(|name| !name.is_empty() && !name.contains(char::is_whitespace))
        .unwrap_or_else(|| "executor".into());
    format!("ci-exec-{host}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use ci_exec_job::store::BlobRef;

    pub(crate) fn record() -> ResultRecord {
        let blob = |sha: &str| BlobRef {
            sha256: sha.repeat(64),
            size: 3,
        };
        ResultRecord {
            format: ci_exec_job::key::FORMAT_VERSION,
            key: "ab".repeat(32),
            exit_code: 0,
            created_unix: 1,
            driver: "native".into(),
            environment_digest: None,
            image: None,
            host: "h".into(),
            ci_exec_version: "0".into(),
            commit: "c".into(),
            tree: "t".into(),
            stdout: blob("a"),
            stderr: blob("b"),
            artifacts: vec![],
            steps: vec![],
            repository: Some("example.com/r".into()),
            target: None,
            signature: None,
        }
    }

    #[test]
    fn a_signed_record_verifies_and_any_change_breaks_it() {
        let key = ExecutorKey::generate("laptop").expect("key");
        let other = ExecutorKey::generate("laptop").expect("key");
        let mut signed = record();
        assert_eq!(
            verify(&signed, &[key.public()]),
            Err(SignatureProblem::Unsigned)
        );
        key.sign(&mut signed);
        assert_eq!(verify(&signed, &[other.public(), key.public()]), Ok(()));
        assert!(matches!(
            verify(&signed, &[other.public()]),
            Err(SignatureProblem::Untrusted { .. })
        ));

        type Change = fn(&mut ResultRecord);
        let changes: [Change; 5] = [
            |r| r.exit_code = 1,
            |r| r.stdout.sha256 = "c".repeat(64),
            |r| r.key = "cd".repeat(32),
            |r| r.repository = None,
            |r| r.stderr.size += 1,
        ];
        for change in changes {
            let mut tampered = signed.clone();
            change(&mut tampered);
            assert_eq!(
                verify(&tampered, &[key.public()]),
                Err(SignatureProblem::Invalid)
            );
        }
    }

    #[test]
    fn public_keys_round_trip_and_bad_ones_are_refused() {
        let key = ExecutorKey::generate("ci-runner-1").expect("key");
        let text = key.public().to_string();
        assert!(text.starts_with("ci-runner-1:"), "{text}");
        assert_eq!(PublicKey::parse(&text).expect("parse"), key.public());
        let list = PublicKey::parse_list(&format!("{text}, {text}\n")).expect("list");
        assert_eq!(list.len(), 2);
        for bad in [
            "",
            "name",
            "name:",
            "name:AAAA",
            ":x",
            "a b:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
        ] {
            assert!(PublicKey::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_key_file_is_created_once_private_and_reloaded() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("state/executor-key.json");
        let first = ExecutorKey::load_or_create(&path).expect("create");
        let again = ExecutorKey::load_or_create(&path).expect("load");
        assert_eq!(first.public(), again.public());
        let mode = fs::metadata(&path).expect("stat").permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o600
        );
        fs::write(&path, b"{}").expect("damage");
        assert!(matches!(
            ExecutorKey::load_or_create(&path),
            Err(KeyError::Damaged { .. })
        ));
    }
}
