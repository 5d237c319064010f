//! The result store: one JSON record per result key, with stdout, stderr and artifacts as
//! content-addressed blobs beside it.
//!
//! Layout under the store root (default `$XDG_DATA_HOME/ci-exec/results`):
//! ```text
//! blobs/sha256/<hex>         content, written once, shared by every record that names it
//! ok/<key>.json              the newest successful run of a key: what replay uses
//! failed/<key>-<unix>.json   failed runs, kept for inspection, never replayed
//! cache/<repo>.tar           the /var/run/ci/cache tree of a repository's last successful run
//! locks/<repo>.lock          held while a job of that repository runs
//! tmp/                       staging; a crash leaves files here, never half-written records
//! ```
//! Every file is written to `tmp/`, synced, then renamed into place, and a record is written
//! only after all its blobs: a record that exists is complete.

use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::JobError;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlobRef {
    pub sha256: String,
    pub size: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Artifact {
    /// Relative to `/var/run/ci/artifacts/`.
    pub path: String,
    pub sha256: String,
    pub size: u64,
    pub mode: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepTiming {
    pub name: String,
    pub exit_code: i32,
    pub ms: u64,
}

/// One run of a job, as recorded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResultRecord {
    pub format: u32,
    pub key: String,
    pub exit_code: i32,
    pub created_unix: u64,
    pub driver: String,
    /// The driver's base environment (the guest image digest), when it has one.
    #[serde(default)]
    pub environment_digest: Option<String>,
    /// The test's container image (`CONTAINERIMAGE`), when the test ran in one.
    pub image: Option<String>,
    pub host: String,
    pub ci_exec_version: String,
    pub commit: String,
    pub tree: String,
    pub stdout: BlobRef,
    pub stderr: BlobRef,
    pub artifacts: Vec<Artifact>,
    pub steps: Vec<StepTiming>,
    /// The repository the run was of: its shared identity (`github.com/owner/name`) when it
    /// has one, else a digest of its path. Retention keeps results per repository.
    #[serde(default)]
    pub repository: Option<String>,
    /// The target run in place of `test` (a scheduled one), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// The producing executor's signature over [`ResultRecord::signed_bytes`], added when
    /// the record is published.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<RecordSignature>,
}

/// An Ed25519 signature of a record by the executor that produced it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordSignature {
    /// The signer's public key, `name:base64` (as Nix writes trusted keys).
    pub signer: String,
    /// Base64 of the 64-byte signature.
    pub signature: String,
}

impl ResultRecord {
    pub fn succeeded(&self) -> bool {
        self.exit_code == 0
    }

    /// What a signature covers: every field of the record but the signature itself, each
    /// length-prefixed (as the result key is) so that no two records share a byte stream.
    /// Written field by field rather than as JSON, so that a reader of another version, which
    /// serialises differently, still checks the same bytes.
    pub fn signed_bytes(&self) -> Vec<u8> {
        let mut out = b"ci-exec result record v1\0".to_vec();
        let mut field = |value: &[u8]| {
            out.extend_from_slice(&(value.len() as u64).to_le_bytes());
            out.extend_from_slice(value);
        };
        let optional = |value: &Option<String>| match value {
            Some(value) => format!("={value}"),
            None => "\0none".to_owned(),
        };
        field(&self.format.to_le_bytes());
        field(self.key.as_bytes());
        field(&self.exit_code.to_le_bytes());
        field(&self.created_unix.to_le_bytes());
        field(self.driver.as_bytes());
        field(optional(&self.environment_digest).as_bytes());
        field(optional(&self.image).as_bytes());
        field(self.host.as_bytes());
        field(self.ci_exec_version.as_bytes());
        field(self.commit.as_bytes());
        field(self.tree.as_bytes());
        field(optional(&self.repository).as_bytes());
        field(optional(&self.target).as_bytes());
        for blob in [&self.stdout, &self.stderr] {
            field(blob.sha256.as_bytes());
            field(&blob.size.to_le_bytes());
        }
        field(&(self.artifacts.len() as u64).to_le_bytes());
        for artifact in &self.artifacts {
            field(artifact.path.as_bytes());
            field(artifact.sha256.as_bytes());
            field(&artifact.size.to_le_bytes());
            field(&artifact.mode.to_le_bytes());
        }
        field(&(self.steps.len() as u64).to_le_bytes());
        for step in &self.steps {
            field(step.name.as_bytes());
            field(&step.exit_code.to_le_bytes());
            field(&step.ms.to_le_bytes());
        }
        out
    }

    /// Every blob the record names, as (sha256, size): stdout, stderr, then the artifacts.
    pub fn blobs(&self) -> impl Iterator<Item = (&str, u64)> {
        [&self.stdout, &self.stderr]
            .into_iter()
            .map(|blob| (blob.sha256.as_str(), blob.size))
            .chain(self.artifacts.iter().map(|a| (a.sha256.as_str(), a.size)))
    }
}

/// A damaged or incomplete record found while verifying it before replay.
#[derive(Debug, thiserror::Error)]
#[error("blob `{sha256}` of result `{key}` is {problem}")]
pub struct Damage {
    pub key: String,
    pub sha256: String,
    pub problem: &'static str,
}

#[derive(Debug, Clone)]
pub struct ResultStore {
    root: PathBuf,
}

impl ResultStore {
    /// The store at `root`, or at `$CI_EXEC_RESULTS` / `$XDG_DATA_HOME/ci-exec/results`.
    pub fn open(root: Option<PathBuf>) -> Result<ResultStore, JobError> {
        let root = root
            .or_else(|| std::env::var_os("CI_EXEC_RESULTS").map(PathBuf::from))
            .or_else(|| dirs::data_dir().map(|dir| dir.join("ci-exec").join("results")))
            .unwrap_or_else(|| std::env::temp_dir().join("ci-exec-results"));
        for sub in ["blobs/sha256", "ok", "failed", "cache", "locks", "tmp"] {
            let dir = root.join(sub);
            fs::create_dir_all(&dir).map_err(|source| JobError::Io {
                action: "create the result store directory",
                path: dir,
                source,
            })?;
        }
        Ok(ResultStore { root })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn blob_path(&self, sha256: &str) -> PathBuf {
        self.root.join("blobs/sha256").join(sha256)
    }

    /// Writes `data` atomically to `path` through `tmp/`.
    fn write_atomic(&self, path: &Path, data: &[u8]) -> Result<(), JobError> {
        let tmp = self.root.join("tmp").join(format!(
            "{}-{}",
            std::process::id(),
            path.file_name().and_then(|n| n.to_str()).unwrap_or("file")
        ));
        let result = (|| {
            let mut file = File::create(&tmp)?;
            file.write_all(data)?;
            file.sync_all()?;
            fs::rename(&tmp, path)
        })();
        result.map_err(|source| {
            let _ = fs::remove_file(&tmp);
            JobError::Io {
                action: "write",
                path: path.to_owned(),
                source,
            }
        })
    }

    /// Stores `data` under its sha256 and returns the reference.
    pub fn put_blob(&self, data: &[u8]) -> Result<BlobRef, JobError> {
        let sha256 = hex::encode(Sha256::digest(data));
        let path = self.blob_path(&sha256);
        // An existing blob is trusted only when it still holds what its name says: a damaged
        // one (the reason a replay was refused) is replaced.
        let intact = fs::read(&path).is_ok_and(|existing| existing == data);
        if !intact {
            self.write_atomic(&path, data)?;
        }
        Ok(BlobRef {
            sha256,
            size: data.len() as u64,
        })
    }

    pub fn read_blob(&self, sha256: &str) -> Result<Vec<u8>, JobError> {
        let path = self.blob_path(sha256);
        fs::read(&path).map_err(|source| JobError::Io {
            action: "read",
            path,
            source,
        })
    }

    /// Saves a record: successful ones become the key's replayable result, failed ones are
    /// kept apart for inspection.
    pub fn put_record(&self, record: &ResultRecord) -> Result<PathBuf, JobError> {
        let path = if record.succeeded() {
            self.root.join("ok").join(format!("{}.json", record.key))
        } else {
            self.root
                .join("failed")
                .join(format!("{}-{}.json", record.key, record.created_unix))
        };
        let json = serde_json::to_vec_pretty(record).map_err(|source| JobError::DamagedRecord {
            path: path.clone(),
            source,
        })?;
        self.write_atomic(&path, &json)?;
        Ok(path)
    }

    /// The replayable result of `key`, if one was recorded.
    pub fn get(&self, key: &str) -> Result<Option<ResultRecord>, JobError> {
        let path = self.root.join("ok").join(format!("{key}.json"));
        match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|source| JobError::DamagedRecord { path, source }),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(JobError::Io {
                action: "read",
                path,
                source,
            }),
        }
    }

    /// Checks that every blob of `record` is present with its recorded hash and size.
    pub fn verify(&self, record: &ResultRecord) -> Result<(), Damage> {
        for (sha256, size) in record.blobs() {
            self.check_blob(sha256, size).map_err(|problem| Damage {
                key: record.key.clone(),
                sha256: sha256.to_owned(),
                problem,
            })?;
        }
        Ok(())
    }

    /// Whether blob `sha256` is present with that hash and `size`; otherwise what is wrong.
    pub fn check_blob(&self, sha256: &str, size: u64) -> Result<(), &'static str> {
        let mut file = File::open(self.blob_path(sha256)).map_err(|_| "missing")?;
        let (digest, total) = hash_reader(&mut file).map_err(|_| "unreadable")?;
        if total != size || digest != sha256 {
            return Err("corrupted");
        }
        Ok(())
    }

    /// The file holding blob `sha256` (which may be absent), to stream it elsewhere.
    pub fn blob_file(&self, sha256: &str) -> PathBuf {
        self.blob_path(sha256)
    }

    /// Streams `reader` into the store as blob `sha256`, keeping it only when it is exactly
    /// `size` bytes with that hash: a download is never trusted for what it says it is.
    pub fn import_blob(
        &self,
        sha256: &str,
        size: u64,
        reader: &mut dyn Read,
    ) -> Result<(), ImportError> {
        let path = self.blob_path(sha256);
        let tmp = self.root.join("tmp").join(format!(
            "{}-{}-import",
            std::process::id(),
            &sha256[..sha256.len().min(16)]
        ));
        let result = (|| {
            let mut file = File::create(&tmp).map_err(|source| ImportError::Write {
                path: tmp.clone(),
                source,
            })?;
            let mut hasher = Sha256::new();
            let mut total = 0u64;
            let mut buffer = vec![0; 1 << 16];
            loop {
                let n = reader.read(&mut buffer).map_err(ImportError::Read)?;
                if n == 0 {
                    break;
                }
                total += n as u64;
                if total > size {
                    return Err(ImportError::Mismatch {
                        sha256: sha256.into(),
                    });
                }
                hasher.update(&buffer[..n]);
                file.write_all(&buffer[..n])
                    .map_err(|source| ImportError::Write {
                        path: tmp.clone(),
                        source,
                    })?;
            }
            if total != size || hex::encode(hasher.finalize()) != sha256 {
                return Err(ImportError::Mismatch {
                    sha256: sha256.into(),
                });
            }
            file.sync_all().map_err(|source| ImportError::Write {
                path: tmp.clone(),
                source,
            })?;
            fs::rename(&tmp, &path).map_err(|source| ImportError::Write {
                path: path.clone(),
                source,
            })
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result
    }

    /// Moves the replayable record of `key` aside, to `damaged/` (after it failed to parse
    /// or [`ResultStore::verify`] found it damaged), so the job runs and records anew while
    /// the bad record stays for inspection. Returns where it went.
    pub fn quarantine(&self, key: &str) -> Result<PathBuf, JobError> {
        let path = self.root.join("ok").join(format!("{key}.json"));
        let dir = self.root.join("damaged");
        fs::create_dir_all(&dir).map_err(|source| JobError::Io {
            action: "create",
            path: dir.clone(),
            source,
        })?;
        let moved = dir.join(format!("{key}-{}.json", unix_now()));
        match fs::rename(&path, &moved) {
            Err(error) if error.kind() != std::io::ErrorKind::NotFound => Err(JobError::Io {
                action: "move aside the damaged record",
                path,
                source: error,
            }),
            _ => Ok(moved),
        }
    }

    /// Every record, successful and failed, newest first.
    pub fn list(&self) -> Result<Vec<ResultRecord>, JobError> {
        let mut records = Vec::new();
        for sub in ["ok", "failed"] {
            let dir = self.root.join(sub);
            let entries = fs::read_dir(&dir).map_err(|source| JobError::Io {
                action: "list",
                path: dir.clone(),
                source,
            })?;
            for entry in entries.flatten() {
                let path = entry.path();
                if path.extension().is_some_and(|e| e == "json")
                    && let Ok(bytes) = fs::read(&path)
                    && let Ok(record) = serde_json::from_slice::<ResultRecord>(&bytes)
                {
                    records.push(record);
                }
            }
        }
        records.sort_by_key(|record| std::cmp::Reverse(record.created_unix));
        Ok(records)
    }

    /// Finds a record by key or unique key prefix (successful first).
    pub fn find(&self, prefix: &str) -> Result<ResultRecord, JobError> {
        let unknown = || JobError::UnknownResult {
            key: prefix.to_owned(),
        };
        if prefix.is_empty() {
            return Err(unknown());
        }
        let matching: Vec<ResultRecord> = self
            .list()?
            .into_iter()
            .filter(|r| r.key.starts_with(prefix))
            .collect();
        matching
            .iter()
            .find(|r| r.succeeded())
            .or(matching.first())
            .cloned()
            .ok_or_else(unknown)
    }

    /// Removes records older than `older_than_secs` (all when zero) and every blob no
    /// remaining record names. Returns (records removed, bytes freed).
    pub fn prune(&self, older_than_secs: u64) -> Result<(usize, u64), JobError> {
        let now = unix_now();
        let mut removed = 0;
        let mut keep = std::collections::HashSet::new();
        for sub in ["ok", "failed"] {
            let dir = self.root.join(sub);
            for entry in fs::read_dir(&dir).into_iter().flatten().flatten() {
                let path = entry.path();
                let record = fs::read(&path)
                    .ok()
                    .and_then(|b| serde_json::from_slice::<ResultRecord>(&b).ok());
                match record {
                    Some(r) if now.saturating_sub(r.created_unix) < older_than_secs => {
                        keep.insert(r.stdout.sha256);
                        keep.insert(r.stderr.sha256);
                        keep.extend(r.artifacts.into_iter().map(|a| a.sha256));
                    }
                    _ => {
                        if fs::remove_file(&path).is_ok() {
                            removed += 1;
                        }
                    }
                }
            }
        }
        let mut freed = 0;
        let blobs = self.root.join("blobs/sha256");
        for entry in fs::read_dir(&blobs).into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !keep.contains(&name) {
                let size = entry.metadata().map(|m| m.len()).unwrap_or(0);
                if fs::remove_file(entry.path()).is_ok() {
                    freed += size;
                }
            }
        }
        for entry in fs::read_dir(self.root.join("tmp"))
            .into_iter()
            .flatten()
            .flatten()
        {
            let _ = fs::remove_file(entry.path());
        }
        Ok((removed, freed))
    }

    /// Applies the retention policy: per repository and target, the successful results `keep` names
    /// stay, failed runs stay for [`FAILED_KEPT_SECS`] (or `keep`'s age, if longer), and the
    /// blobs no remaining record names go, once they are an hour old (a blob younger than
    /// that may belong to a run that is still recording). Returns (records, bytes) removed.
    pub fn retain(&self, keep: Keep) -> Result<(usize, u64), JobError> {
        let now = unix_now();
        // Runs are ordered by their record's whole-second creation time, then by the file's
        // modification time: two runs within a second must not lose the newer one.
        type Runs = Vec<((u64, SystemTime), PathBuf)>;
        let mut successful: std::collections::BTreeMap<String, Runs> = Default::default();
        let mut doomed = Vec::new();
        let mut kept = std::collections::HashSet::new();
        for sub in ["ok", "failed"] {
            for entry in fs::read_dir(self.root.join(sub))
                .into_iter()
                .flatten()
                .flatten()
            {
                let path = entry.path();
                let Some(record) = fs::read(&path)
                    .ok()
                    .and_then(|bytes| serde_json::from_slice::<ResultRecord>(&bytes).ok())
                else {
                    continue;
                };
                let age = now.saturating_sub(record.created_unix);
                if record.succeeded() {
                    let job = format!(
                        "{}\0{}",
                        record.repository.as_deref().unwrap_or_default(),
                        record.target.as_deref().unwrap_or("test")
                    );
                    let written = entry
                        .metadata()
                        .and_then(|metadata| metadata.modified())
                        .unwrap_or(SystemTime::UNIX_EPOCH);
                    successful
                        .entry(job)
                        .or_default()
                        .push(((record.created_unix, written), path));
                    continue;
                }
                let failed_for = match keep {
                    Keep::For(secs) => secs.max(FAILED_KEPT_SECS),
                    Keep::Latest(_) => FAILED_KEPT_SECS,
                };
                if age < failed_for {
                    kept.extend(record.blobs().map(|(sha, _)| sha.to_owned()));
                } else {
                    doomed.push(path);
                }
            }
        }
        for mut runs in successful.into_values() {
            runs.sort_by_key(|(order, _)| std::cmp::Reverse(*order));
            // Runs indistinguishable from the last one kept stay too.
            let last_kept = match keep {
                Keep::Latest(count) => runs.get(count.max(1) - 1).map(|(order, _)| *order),
                Keep::For(_) => None,
            };
            for (index, ((created, written), path)) in runs.into_iter().enumerate() {
                let stays = match keep {
                    Keep::Latest(count) => index < count || Some((created, written)) == last_kept,
                    Keep::For(secs) => now.saturating_sub(created) < secs,
                };
                if stays {
                    if let Ok(Some(record)) = fs::read(&path)
                        .map(|bytes| serde_json::from_slice::<ResultRecord>(&bytes).ok())
                    {
                        kept.extend(record.blobs().map(|(sha, _)| sha.to_owned()));
                    }
                } else {
                    doomed.push(path);
                }
            }
        }
        let removed = doomed
            .iter()
            .filter(|path| fs::remove_file(path).is_ok())
            .count();
        let mut freed = 0;
        let settled = SystemTime::now() - std::time::Duration::from_secs(3600);
        for entry in fs::read_dir(self.root.join("blobs/sha256"))
            .into_iter()
            .flatten()
            .flatten()
        {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Ok(metadata) = entry.metadata() else {
                continue;
            };
            let old = metadata.modified().is_ok_and(|time| time < settled);
            if old && !kept.contains(&name) && fs::remove_file(entry.path()).is_ok() {
                freed += metadata.len();
            }
        }
        Ok((removed, freed))
    }

    fn cache_path(&self, repository: &str) -> PathBuf {
        self.root.join("cache").join(format!("{repository}.tar"))
    }

    /// The saved `/var/run/ci/cache` archive of a repository, if any.
    pub fn get_cache(&self, repository: &str) -> Option<Vec<u8>> {
        fs::read(self.cache_path(repository)).ok()
    }

    pub fn put_cache(&self, repository: &str, archive: &[u8]) -> Result<(), JobError> {
        self.write_atomic(&self.cache_path(repository), archive)
    }
}

/// How long failed runs stay for inspection: three days.
pub const FAILED_KEPT_SECS: u64 = 3 * 24 * 3600;

/// What [`ResultStore::retain`] keeps of each repository's successful results.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Keep {
    /// The newest `n` (by default one: the seed's "by default this is only once").
    Latest(usize),
    /// Those younger than this many seconds.
    For(u64),
}

impl Default for Keep {
    fn default() -> Keep {
        Keep::Latest(1)
    }
}

impl std::str::FromStr for Keep {
    type Err = String;

    /// `3` keeps the three newest results of each repository; `7d`, `12h` keep those younger.
    fn from_str(text: &str) -> Result<Keep, String> {
        let text = text.trim();
        if let Ok(count) = text.parse::<usize>() {
            return match count {
                0 => Err("`0` would keep nothing to replay; the least is `1`".into()),
                count => Ok(Keep::Latest(count)),
            };
        }
        humantime::parse_duration(text)
            .map(|age| Keep::For(age.as_secs()))
            .map_err(|_| format!("`{text}` is neither a count (`3`) nor an age (`7d`, `12h`)"))
    }
}

/// Why [`ResultStore::import_blob`] stored nothing.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("the content of blob `{sha256}` does not match its name")]
    Mismatch { sha256: String },
    #[error("failed to read the blob")]
    Read(#[source] std::io::Error),
    #[error("failed to write `{}`", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The sha256 (lowercase hex) and length of everything `reader` yields.
pub fn hash_reader(reader: &mut dyn Read) -> std::io::Result<(String, u64)> {
    let mut hasher = Sha256::new();
    let mut buffer = vec![0; 1 << 16];
    let mut total = 0u64;
    loop {
        let n = reader.read(&mut buffer)?;
        if n == 0 {
            break;
        }
        total += n as u64;
        hasher.update(&buffer[..n]);
    }
    Ok((hex::encode(hasher.finalize()), total))
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(store: &ResultStore, key: &str, exit_code: i32) -> ResultRecord {
        let stdout = store.put_blob(b"out\x00\xff").expect("blob");
        let stderr = store.put_blob(b"err").expect("blob");
        let art = store.put_blob(b"artifact").expect("blob");
        ResultRecord {
            format: crate::key::FORMAT_VERSION,
            key: key.into(),
            exit_code,
            created_unix: unix_now(),
            driver: "native".into(),
            environment_digest: None,
            image: None,
            host: "h".into(),
            ci_exec_version: "0".into(),
            commit: "c".into(),
            tree: "t".into(),
            stdout,
            stderr,
            artifacts: vec![Artifact {
                path: "a.txt".into(),
                sha256: art.sha256,
                size: art.size,
                mode: 0o644,
            }],
            steps: vec![],
            repository: Some("example.com/r".into()),
            target: None,
            signature: None,
        }
    }

    #[test]
    fn round_trip_verify_and_damage() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = ResultStore::open(Some(dir.path().to_owned())).expect("open");
        let r = record(&store, "abc", 0);
        store.put_record(&r).expect("put");
        let got = store.get("abc").expect("get").expect("present");
        assert_eq!(got, r);
        store.verify(&got).expect("intact");
        assert_eq!(
            store.read_blob(&r.stdout.sha256).expect("read"),
            b"out\x00\xff"
        );

        std::fs::write(store.blob_path(&r.artifacts[0].sha256), b"tampered").expect("write");
        let damage = store.verify(&got).expect_err("damaged");
        assert_eq!(damage.problem, "corrupted");
        let moved = store.quarantine("abc").expect("quarantine");
        assert!(moved.exists(), "{}", moved.display());
        assert!(store.get("abc").expect("get").is_none());
        // Recording the same content again repairs the damaged blob.
        store.put_blob(b"artifact").expect("blob");
        store.verify(&got).expect("repaired");
    }

    #[test]
    fn failed_runs_are_listed_but_never_replayable() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = ResultStore::open(Some(dir.path().to_owned())).expect("open");
        store.put_record(&record(&store, "bad", 1)).expect("put");
        assert!(store.get("bad").expect("get").is_none());
        assert_eq!(store.list().expect("list").len(), 1);
        assert_eq!(store.find("ba").expect("find").exit_code, 1);
        assert!(matches!(
            store.find("zz"),
            Err(JobError::UnknownResult { .. })
        ));
    }

    #[test]
    fn prune_removes_records_and_unreferenced_blobs() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = ResultStore::open(Some(dir.path().to_owned())).expect("open");
        store.put_record(&record(&store, "k", 0)).expect("put");
        store.put_blob(b"orphan").expect("blob");
        let (removed, freed) = store.prune(3600).expect("prune");
        assert_eq!((removed, freed), (0, 6));
        let (removed, _) = store.prune(0).expect("prune");
        assert_eq!(removed, 1);
        assert_eq!(
            fs::read_dir(dir.path().join("blobs/sha256"))
                .expect("dir")
                .count(),
            0
        );
    }

    #[test]
    fn retention_keeps_the_newest_result_of_each_repository() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = ResultStore::open(Some(dir.path().to_owned())).expect("open");
        let mut old = record(&store, "old", 0);
        old.created_unix -= 100;
        old.stdout = store
            .put_blob(b"only the old run printed this")
            .expect("blob");
        store.put_record(&old).expect("put");
        store.put_record(&record(&store, "new", 0)).expect("put");
        let mut nightly = record(&store, "nightly", 0);
        nightly.target = Some("nightly".into());
        nightly.created_unix -= 10;
        store.put_record(&nightly).expect("put");
        let mut other = record(&store, "other", 0);
        other.repository = Some("example.com/other".into());
        other.created_unix -= 1000;
        store.put_record(&other).expect("put");
        let mut failed = record(&store, "failed", 1);
        failed.created_unix -= FAILED_KEPT_SECS + 1;
        store.put_record(&failed).expect("put");
        // Every blob is older than the hour that protects a run still recording.
        let old_time = SystemTime::now() - std::time::Duration::from_secs(7200);
        for entry in fs::read_dir(dir.path().join("blobs/sha256")).expect("dir") {
            File::options()
                .write(true)
                .open(entry.expect("entry").path())
                .and_then(|file| file.set_modified(old_time))
                .expect("age the blob");
        }

        let (removed, freed) = store.retain(Keep::default()).expect("retain");
        assert_eq!(
            removed, 2,
            "the older result of the repository and the stale failure"
        );
        assert_eq!(freed, b"only the old run printed this".len() as u64);
        assert!(store.get("old").expect("get").is_none());
        store
            .verify(&store.get("new").expect("get").expect("kept"))
            .expect("intact");
        assert!(
            store.get("other").expect("get").is_some(),
            "another repository's newest"
        );

        assert!(
            store.get("nightly").expect("get").is_some(),
            "another target's newest"
        );
        assert_eq!(
            store.retain(Keep::For(5)).expect("retain").0,
            2,
            "other and nightly are older than 5 s"
        );
    }

    #[test]
    fn retention_keeps_the_later_of_two_runs_in_the_same_second() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = ResultStore::open(Some(dir.path().to_owned())).expect("open");
        let first = record(&store, "first", 0);
        let mut second = record(&store, "second", 0);
        second.created_unix = first.created_unix;
        store.put_record(&first).expect("put");
        let path = dir.path().join("ok/first.json");
        let earlier = SystemTime::now() - std::time::Duration::from_millis(500);
        File::options()
            .write(true)
            .open(&path)
            .and_then(|file| file.set_modified(earlier))
            .expect("first written earlier");
        store.put_record(&second).expect("put");
        store.retain(Keep::default()).expect("retain");
        assert!(store.get("second").expect("get").is_some(), "the later run");
        assert!(store.get("first").expect("get").is_none());
    }

    #[test]
    fn keep_reads_counts_and_ages() {
        assert_eq!("3".parse(), Ok(Keep::Latest(3)));
        assert_eq!("7d".parse(), Ok(Keep::For(7 * 86400)));
        assert_eq!("12h".parse(), Ok(Keep::For(12 * 3600)));
        assert!("0".parse::<Keep>().is_err());
        assert!("soon".parse::<Keep>().is_err());
    }

    #[test]
    fn an_import_keeps_only_content_that_matches_its_name() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = ResultStore::open(Some(dir.path().to_owned())).expect("open");
        let good = store.put_blob(b"payload").expect("blob");
        fs::remove_file(store.blob_file(&good.sha256)).expect("remove");
        let error = store
            .import_blob(&good.sha256, good.size, &mut &b"poisoned"[..])
            .expect_err("mismatch");
        assert!(matches!(error, ImportError::Mismatch { .. }), "{error}");
        assert_eq!(store.check_blob(&good.sha256, good.size), Err("missing"));
        store
            .import_blob(&good.sha256, good.size, &mut &b"payload"[..])
            .expect("import");
        assert_eq!(store.check_blob(&good.sha256, good.size), Ok(()));
        assert_eq!(
            fs::read_dir(dir.path().join("tmp")).expect("tmp").count(),
            0
        );
    }

    /// A full disk while recording leaves no record and no staging file behind.
    #[test]
    fn disk_full_while_recording_leaves_nothing_half_written() {
        let full = Path::new("/dev/full");
        if !ci_exec_prerequisite::require_that(
            "disk_full_while_recording_leaves_nothing_half_written",
            full.exists(),
            "/dev/full is not available",
            "run the tests where /dev/full exists (any Linux with devtmpfs)",
        ) {
            return;
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let store = ResultStore::open(Some(dir.path().to_owned())).expect("open");
        // The staging file is a link to /dev/full, so every write to it fails with ENOSPC,
        // exactly as on a full disk.
        let staged = dir
            .path()
            .join(format!("tmp/{}-k.json", std::process::id()));
        std::os::unix::fs::symlink(full, &staged).expect("symlink");
        let target = dir.path().join("ok/k.json");
        let error = store
            .write_atomic(&target, &vec![7u8; 1 << 20])
            .expect_err("ENOSPC");
        assert!(error.to_string().contains("failed to write"), "{error}");
        assert!(!target.exists(), "no record may appear");
        assert!(!staged.exists(), "staging file removed");
    }
}
