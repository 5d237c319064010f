//! The orchestrator's storage, under `--data DIR`:
//!
//! ```text
//! orchestrator.sqlite  grants (tokens, certificates), result records, blob membership, keys
//! cas/<sha256>         blob content, shared by every repository that uploaded it
//! tmp/                 uploads being received; never read, cleared by gc
//! ```
//!
//! Records and grants live in SQLite (rusqlite, `bundled`: no system library to match) rather
//! than redb: redb locks its file to one process, and `ci-exec token create` or `serve gc`
//! must work on the data directory of a running server. WAL with `synchronous=FULL` makes each
//! committed transaction durable, so a killed server keeps every result it acknowledged and
//! never half of one. A blob is synced and renamed into `cas/` before a record naming it can
//! be committed: a record that exists has its blobs.

use std::collections::HashSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use rusqlite::{Connection, OptionalExtension as _, params};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use ci_exec_job::store::{ResultRecord, unix_now};

/// A blob or an unfinished upload younger than this is never collected: its record may still
/// be on its way.
const SETTLE_SECS: u64 = 3600;

const SCHEMA: &str = "
    CREATE TABLE IF NOT EXISTS grants (
        digest TEXT PRIMARY KEY, id TEXT NOT NULL, repository TEXT NOT NULL,
        publish INTEGER NOT NULL, created_unix INTEGER NOT NULL);
    CREATE TABLE IF NOT EXISTS results (
        repository TEXT NOT NULL, key TEXT NOT NULL, record TEXT NOT NULL,
        published_unix INTEGER NOT NULL, publisher TEXT NOT NULL,
        PRIMARY KEY (repository, key));
    CREATE TABLE IF NOT EXISTS members (
        repository TEXT NOT NULL, sha256 TEXT NOT NULL, added_unix INTEGER NOT NULL,
        PRIMARY KEY (repository, sha256));
    CREATE INDEX IF NOT EXISTS members_by_blob ON members (sha256);
    CREATE TABLE IF NOT EXISTS keys (
        repository TEXT NOT NULL, public_key TEXT NOT NULL, publisher TEXT NOT NULL,
        PRIMARY KEY (repository, public_key));
    CREATE TABLE IF NOT EXISTS bindings (
        id TEXT PRIMARY KEY, issuer TEXT NOT NULL, subject TEXT NOT NULL, owner TEXT NOT NULL,
        repository TEXT NOT NULL, created_unix INTEGER NOT NULL, UNIQUE (issuer, subject));
    CREATE TABLE IF NOT EXISTS used_token_ids (
        issuer TEXT NOT NULL, jti TEXT NOT NULL, expires_unix INTEGER NOT NULL,
        PRIMARY KEY (issuer, jti));
    CREATE TABLE IF NOT EXISTS sessions (
        digest TEXT PRIMARY KEY, id TEXT NOT NULL, repository TEXT NOT NULL,
        publish INTEGER NOT NULL, scope TEXT, created_unix INTEGER NOT NULL,
        expires_unix INTEGER NOT NULL);
";

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("failed to {action} the orchestrator database")]
    Database {
        action: &'static str,
        #[source]
        source: rusqlite::Error,
    },
    #[error("failed to {action} `{}`", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn db(action: &'static str) -> impl FnOnce(rusqlite::Error) -> StorageError {
    move |source| StorageError::Database { action, source }
}

/// What a token or a client certificate may do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    pub repository: String,
    pub publish: bool,
    pub created_unix: u64,
    /// A short, non-secret name for logs and records: the first 12 hex digits of the digest
    /// (`oidc-…` for a CI identity's binding).
    pub id: String,
    /// `None`: the repository's trusted scope (what tokens, certificates and CI runs of
    /// protected refs read and write). `Some("pr/12")`: a scope of its own, which it writes
    /// and reads besides the trusted one — a pull request never puts a result in front of the
    /// default branch.
    #[serde(default)]
    pub scope: Option<String>,
}

impl Grant {
    /// Where this grant's results are stored: the repository, or `repository@scope`.
    pub fn write_namespace(&self) -> String {
        namespace(&self.repository, self.scope.as_deref())
    }

    /// Where it looks results up, in order: the trusted scope first, then its own.
    pub fn read_namespaces(&self) -> Vec<String> {
        let mut namespaces = vec![self.repository.clone()];
        if self.scope.is_some() {
            namespaces.push(self.write_namespace());
        }
        namespaces
    }
}

/// The storage name of `repository`'s `scope`. `@` never occurs in a repository name, so a
/// scope can never be mistaken for another repository.
pub fn namespace(repository: &str, scope: Option<&str>) -> String {
    match scope {
        None => repository.to_owned(),
        Some(scope) => format!("{repository}@{scope}"),
    }
}

/// A repository bound to a CI platform's identity: tokens of `issuer` whose repository (or
/// project) id is `subject` and whose owner (or namespace) id is `owner` act for `repository`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Binding {
    pub id: String,
    pub issuer: String,
    pub subject: String,
    pub owner: String,
    pub repository: String,
    pub created_unix: u64,
}

/// A result as the orchestrator holds it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Published {
    /// The record exactly as it was uploaded (what `GET` returns, byte for byte).
    pub record: String,
    pub published_unix: u64,
    /// The [`Grant::id`] that published it.
    pub publisher: String,
}

/// The outcome of [`Storage::publish`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Publish {
    Created,
    /// The same bytes were already published: nothing changed.
    Identical,
    /// Another record holds the key: results are write-once.
    Conflict,
    /// The record names a blob the repository has not uploaded.
    MissingBlob(String),
}

#[derive(Debug)]
pub struct Storage {
    /// One connection: every statement is short, and SQLite serialises writers anyway.
    connection: Mutex<Connection>,
    root: PathBuf,
}

impl Storage {
    pub fn open(root: &Path) -> Result<Storage, StorageError> {
        for dir in [root.to_owned(), root.join("cas"), root.join("tmp")] {
            fs::create_dir_all(&dir).map_err(|source| StorageError::Io {
                action: "create",
                path: dir,
                source,
            })?;
        }
        let connection = Connection::open(root.join("orchestrator.sqlite")).map_err(db("open"))?;
        connection
            .busy_timeout(std::time::Duration::from_secs(10))
            .map_err(db("open"))?;
        connection
            .pragma_update(None, "journal_mode", "WAL")
            .and_then(|()| connection.pragma_update(None, "synchronous", "FULL"))
            .and_then(|()| connection.execute_batch(SCHEMA))
            .map_err(db("set up"))?;
        Ok(Storage {
            connection: Mutex::new(connection),
            root: root.to_owned(),
        })
    }

    fn connection(&self) -> std::sync::MutexGuard<'_, Connection> {
        // A panic while holding the lock leaves no half-done transaction (SQLite rolls it
        // back), so a poisoned lock is still usable.
        self.connection
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn blob_path(&self, sha256: &str) -> PathBuf {
        self.root.join("cas").join(sha256)
    }

    /// A fresh file name under `tmp/` for an upload.
    pub fn upload_path(&self) -> PathBuf {
        let mut nonce = [0u8; 12];
        let _ = getrandom::fill(&mut nonce);
        self.root.join("tmp").join(hex::encode(nonce))
    }

    /// Records a new grant: `credential` is a bearer token or a certificate's DER.
    pub fn add_grant(
        &self,
        credential: Credential<'_>,
        repository: &str,
        publish: bool,
    ) -> Result<Grant, StorageError> {
        let grant = Grant {
            repository: repository.to_owned(),
            publish,
            created_unix: unix_now(),
            id: credential.id(),
            scope: None,
        };
        self.connection()
            .execute(
                "INSERT OR REPLACE INTO grants (digest, id, repository, publish, created_unix)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
                params![
                    credential.digest(),
                    grant.id,
                    grant.repository,
                    grant.publish,
                    grant.created_unix
                ],
            )
            .map_err(db("write"))?;
        Ok(grant)
    }

    pub fn grant(&self, credential: Credential<'_>) -> Result<Option<Grant>, StorageError> {
        self.connection()
            .prepare_cached(
                "SELECT id, repository, publish, created_unix FROM grants WHERE digest = ?1",
            )
            .and_then(|mut statement| {
                statement
                    .query_row([credential.digest()], grant_of_row)
                    .optional()
            })
            .map_err(db("read"))
    }

    /// Every grant, for `ci-exec token list`.
    pub fn grants(&self) -> Result<Vec<Grant>, StorageError> {
        let connection = self.connection();
        let mut statement = connection
            .prepare(
                "SELECT id, repository, publish, created_unix FROM grants ORDER BY created_unix",
            )
            .map_err(db("read"))?;
        statement
            .query_map([], grant_of_row)
            .and_then(|rows| rows.collect())
            .map_err(db("read"))
    }

    /// Removes the grants whose id starts with `id`; returns how many.
    pub fn revoke(&self, id: &str) -> Result<usize, StorageError> {
        if id.is_empty() {
            return Ok(0);
        }
        let mut connection = self.connection();
        let transaction = connection.transaction().map_err(db("write"))?;
        let mut removed = 0;
        for table in ["grants", "bindings", "sessions"] {
            removed += transaction
                .execute(
                    &format!("DELETE FROM {table} WHERE substr(id, 1, length(?1)) = ?1"),
                    [id],
                )
                .map_err(db("write"))?;
        }
        transaction.commit().map_err(db("commit to"))?;
        Ok(removed)
    }

    /// Binds `repository` to a CI identity (see [`Binding`]); replaces an earlier binding of
    /// the same issuer and subject.
    pub fn bind(
        &self,
        issuer: &str,
        subject: &str,
        owner: &str,
        repository: &str,
    ) -> Result<Binding, StorageError> {
        let digest = hex::encode(Sha256::digest(format!("{issuer}\0{subject}").as_bytes()));
        let binding = Binding {
            id: format!("oidc-{}", &digest[..12]),
            issuer: issuer.to_owned(),
            subject: subject.to_owned(),
            owner: owner.to_owned(),
            repository: repository.to_owned(),
            created_unix: unix_now(),
        };
        self.connection()
            .execute(
                "INSERT OR REPLACE INTO bindings (id, issuer, subject, owner, repository, created_unix)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![
                    binding.id,
                    binding.issuer,
                    binding.subject,
                    binding.owner,
                    binding.repository,
                    binding.created_unix
                ],
            )
            .map_err(db("write"))?;
        Ok(binding)
    }

    /// The binding of `issuer`'s repository or project id `subject`.
    pub fn binding(&self, issuer: &str, subject: &str) -> Result<Option<Binding>, StorageError> {
        self.connection()
            .prepare_cached(
                "SELECT id, issuer, subject, owner, repository, created_unix FROM bindings
                 WHERE issuer = ?1 AND subject = ?2",
            )
            .and_then(|mut statement| {
                statement
                    .query_row([issuer, subject], binding_of_row)
                    .optional()
            })
            .map_err(db("read"))
    }

    /// Every binding, for `ci-exec token list`.
    pub fn bindings(&self) -> Result<Vec<Binding>, StorageError> {
        let connection = self.connection();
        let mut statement = connection
            .prepare(
                "SELECT id, issuer, subject, owner, repository, created_unix FROM bindings
                 ORDER BY created_unix",
            )
            .map_err(db("read"))?;
        statement
            .query_map([], binding_of_row)
            .and_then(|rows| rows.collect())
            .map_err(db("read"))
    }

    /// Records that `issuer`'s token `jti` was used; `false` when it already was. Ids are
    /// kept until their token expires (a token cannot be presented after that anyway).
    pub fn use_token_id(
        &self,
        issuer: &str,
        jti: &str,
        expires_unix: u64,
    ) -> Result<bool, StorageError> {
        let connection = self.connection();
        connection
            .execute(
                "DELETE FROM used_token_ids WHERE expires_unix < ?1",
                [unix_now().saturating_sub(SETTLE_SECS)],
            )
            .map_err(db("write"))?;
        let inserted = connection
            .execute(
                "INSERT OR IGNORE INTO used_token_ids (issuer, jti, expires_unix) VALUES (?1, ?2, ?3)",
                params![issuer, jti, expires_unix],
            )
            .map_err(db("write"))?;
        Ok(inserted == 1)
    }

    /// Stores a session token (only its digest) standing for `grant` until `expires_unix`.
    pub fn add_session(
        &self,
        token: &str,
        grant: &Grant,
        expires_unix: u64,
    ) -> Result<(), StorageError> {
        let connection = self.connection();
        connection
            .execute("DELETE FROM sessions WHERE expires_unix < ?1", [unix_now()])
            .map_err(db("write"))?;
        connection
            .execute(
                "INSERT INTO sessions (digest, id, repository, publish, scope, created_unix, expires_unix)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![
                    Credential::Token(token).digest(),
                    grant.id,
                    grant.repository,
                    grant.publish,
                    grant.scope,
                    grant.created_unix,
                    expires_unix
                ],
            )
            .map_err(db("write"))?;
        Ok(())
    }

    /// The grant of an unexpired session token.
    pub fn session(&self, token: &str) -> Result<Option<Grant>, StorageError> {
        self.connection()
            .prepare_cached(
                "SELECT id, repository, publish, created_unix, scope FROM sessions
                 WHERE digest = ?1 AND expires_unix >= ?2",
            )
            .and_then(|mut statement| {
                statement
                    .query_row(
                        params![Credential::Token(token).digest(), unix_now()],
                        |row| {
                            Ok(Grant {
                                id: row.get(0)?,
                                repository: row.get(1)?,
                                publish: row.get(2)?,
                                created_unix: row.get(3)?,
                                scope: row.get(4)?,
                            })
                        },
                    )
                    .optional()
            })
            .map_err(db("read"))
    }

    pub fn result(&self, repository: &str, key: &str) -> Result<Option<Published>, StorageError> {
        self.connection()
            .prepare_cached(
                "SELECT record, published_unix, publisher FROM results
                 WHERE repository = ?1 AND key = ?2",
            )
            .and_then(|mut statement| {
                statement
                    .query_row([repository, key], |row| {
                        Ok(Published {
                            record: row.get(0)?,
                            published_unix: row.get(1)?,
                            publisher: row.get(2)?,
                        })
                    })
                    .optional()
            })
            .map_err(db("read"))
    }

    pub fn is_member(&self, repository: &str, sha256: &str) -> Result<bool, StorageError> {
        let member = self
            .connection()
            .prepare_cached("SELECT 1 FROM members WHERE repository = ?1 AND sha256 = ?2")
            .and_then(|mut statement| statement.exists([repository, sha256]))
            .map_err(db("read"))?;
        Ok(member && self.blob_path(sha256).is_file())
    }

    /// Moves a received, checked upload into `cas/` and makes it the repository's.
    pub fn add_blob(
        &self,
        repository: &str,
        sha256: &str,
        upload: &Path,
    ) -> Result<(), StorageError> {
        let path = self.blob_path(sha256);
        let io = |action, path: &Path| {
            let path = path.to_owned();
            move |source| StorageError::Io {
                action,
                path,
                source,
            }
        };
        fs::File::open(upload)
            .and_then(|file| file.sync_all())
            .map_err(io("sync", upload))?;
        fs::rename(upload, &path).map_err(io("store", &path))?;
        fs::File::open(self.root.join("cas"))
            .and_then(|dir| dir.sync_all())
            .map_err(io("sync", &self.root.join("cas")))?;
        self.connection()
            .execute(
                "INSERT OR REPLACE INTO members (repository, sha256, added_unix) VALUES (?1, ?2, ?3)",
                params![repository, sha256, unix_now()],
            )
            .map_err(db("write"))?;
        Ok(())
    }

    /// Publishes `record` (already checked: key, signature, success) as `raw`, write-once,
    /// and trusts its signer for the repository from now on.
    pub fn publish(
        &self,
        repository: &str,
        record: &ResultRecord,
        raw: &str,
        signer: &str,
        publisher: &Grant,
    ) -> Result<Publish, StorageError> {
        let mut connection = self.connection();
        let transaction = connection.transaction().map_err(db("write"))?;
        let existing: Option<String> = transaction
            .query_row(
                "SELECT record FROM results WHERE repository = ?1 AND key = ?2",
                [repository, &record.key],
                |row| row.get(0),
            )
            .optional()
            .map_err(db("read"))?;
        if let Some(existing) = existing {
            return Ok(if existing == raw {
                Publish::Identical
            } else {
                Publish::Conflict
            });
        }
        for (sha256, _) in record.blobs() {
            let member = transaction
                .query_row(
                    "SELECT 1 FROM members WHERE repository = ?1 AND sha256 = ?2",
                    [repository, sha256],
                    |_| Ok(()),
                )
                .optional()
                .map_err(db("read"))?;
            if member.is_none() || !self.blob_path(sha256).is_file() {
                return Ok(Publish::MissingBlob(sha256.to_owned()));
            }
        }
        transaction
            .execute(
                "INSERT INTO results (repository, key, record, published_unix, publisher)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
                params![repository, record.key, raw, unix_now(), publisher.id],
            )
            .and_then(|_| {
                transaction.execute(
                    "INSERT OR IGNORE INTO keys (repository, public_key, publisher)
                     VALUES (?1, ?2, ?3)",
                    params![repository, signer, publisher.id],
                )
            })
            .map_err(db("write"))?;
        transaction.commit().map_err(db("commit to"))?;
        Ok(Publish::Created)
    }

    /// Trusts `signer` for `repository` on behalf of `publisher` (a connected executor that
    /// proved it holds the key).
    pub fn trust_key(
        &self,
        repository: &str,
        signer: &str,
        publisher: &Grant,
    ) -> Result<(), StorageError> {
        self.connection()
            .execute(
                "INSERT OR IGNORE INTO keys (repository, public_key, publisher) VALUES (?1, ?2, ?3)",
                params![repository, signer, publisher.id],
            )
            .map_err(db("write"))?;
        Ok(())
    }

    /// The keys trusted for `namespace`: those that signed results published by a grant or
    /// CI binding that still exists.
    pub fn trusted_keys(&self, namespace: &str) -> Result<Vec<String>, StorageError> {
        let connection = self.connection();
        let mut statement = connection
            .prepare_cached(
                "SELECT DISTINCT public_key FROM keys
                 WHERE repository = ?1 AND (publisher IN (SELECT id FROM grants)
                     OR publisher IN (SELECT id FROM bindings))
                 ORDER BY public_key",
            )
            .map_err(db("read"))?;
        statement
            .query_map([namespace], |row| row.get(0))
            .and_then(|rows| rows.collect())
            .map_err(db("read"))
    }

    /// Drops results published more than `keep_days` ago, then the blobs and memberships no
    /// remaining result names (once settled), and stale uploads. Returns (results, blobs)
    /// removed.
    pub fn collect_garbage(&self, keep_days: u64) -> Result<(usize, usize), StorageError> {
        self.collect_garbage_at(keep_days, unix_now())
    }

    pub fn collect_garbage_at(
        &self,
        keep_days: u64,
        now: u64,
    ) -> Result<(usize, usize), StorageError> {
        let horizon = now.saturating_sub(keep_days.saturating_mul(86400));
        let mut referenced: HashSet<String> = HashSet::new();
        let dropped_results;
        {
            let mut connection = self.connection();
            let transaction = connection.transaction().map_err(db("write"))?;
            dropped_results = transaction
                .execute("DELETE FROM results WHERE published_unix < ?1", [horizon])
                .map_err(db("write"))?;
            {
                let mut statement = transaction
                    .prepare("SELECT record FROM results")
                    .map_err(db("read"))?;
                let records = statement
                    .query_map([], |row| row.get::<_, String>(0))
                    .map_err(db("read"))?;
                for raw in records {
                    let raw = raw.map_err(db("read"))?;
                    if let Ok(record) = serde_json::from_str::<ResultRecord>(&raw) {
                        referenced.extend(record.blobs().map(|(sha, _)| sha.to_owned()));
                    }
                }
                let mut members = transaction
                    .prepare("SELECT repository, sha256, added_unix FROM members")
                    .map_err(db("read"))?;
                let rows: Vec<(String, String, u64)> = members
                    .query_map([], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))
                    .and_then(|rows| rows.collect())
                    .map_err(db("read"))?;
                for (repository, sha256, added) in rows {
                    if referenced.contains(&sha256) {
                        continue;
                    }
                    if now.saturating_sub(added) < SETTLE_SECS {
                        referenced.insert(sha256);
                        continue;
                    }
                    transaction
                        .execute(
                            "DELETE FROM members WHERE repository = ?1 AND sha256 = ?2",
                            [&repository, &sha256],
                        )
                        .map_err(db("write"))?;
                }
            }
            transaction.commit().map_err(db("commit to"))?;
        }
        let mut dropped_blobs = 0;
        for (dir, is_blob) in [
            (self.root.join("cas"), true),
            (self.root.join("tmp"), false),
        ] {
            for entry in fs::read_dir(&dir).into_iter().flatten().flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                let settled = entry
                    .metadata()
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|time| time.duration_since(std::time::UNIX_EPOCH).ok())
                    .is_some_and(|time| now.saturating_sub(time.as_secs()) >= SETTLE_SECS);
                let unused = !is_blob || !referenced.contains(&name);
                if settled && unused && fs::remove_file(entry.path()).is_ok() && is_blob {
                    dropped_blobs += 1;
                }
            }
        }
        Ok((dropped_results, dropped_blobs))
    }
}

fn binding_of_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<Binding> {
    Ok(Binding {
        id: row.get(0)?,
        issuer: row.get(1)?,
        subject: row.get(2)?,
        owner: row.get(3)?,
        repository: row.get(4)?,
        created_unix: row.get(5)?,
    })
}

fn grant_of_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<Grant> {
    Ok(Grant {
        id: row.get(0)?,
        repository: row.get(1)?,
        publish: row.get(2)?,
        created_unix: row.get(3)?,
        scope: None,
    })
}

/// What identifies a caller to [`Storage::grant`].
#[derive(Debug, Clone, Copy)]
pub enum Credential<'a> {
    Token(&'a str),
    /// A client certificate's DER bytes.
    Certificate(&'a [u8]),
}

impl Credential<'_> {
    /// The table key: only digests are stored, so a stolen database holds no usable token.
    fn digest(&self) -> String {
        match self {
            Credential::Token(token) => hex::encode(Sha256::digest(token.as_bytes())),
            Credential::Certificate(der) => format!("cert:{}", hex::encode(Sha256::digest(der))),
        }
    }

    fn id(&self) -> String {
        let digest = self.digest();
        let hex = digest.strip_prefix("cert:").unwrap_or(&digest);
        let prefix = if matches!(self, Credential::Certificate(_)) {
            "cert-"
        } else {
            ""
        };
        format!("{prefix}{}", &hex[..12])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ci_exec_job::store::BlobRef;

    fn record(key: &str, sha256: &str) -> ResultRecord {
        let blob = BlobRef {
            sha256: sha256.to_owned(),
            size: 4,
        };
        ResultRecord {
            format: ci_exec_job::key::FORMAT_VERSION,
            key: key.to_owned(),
            exit_code: 0,
            created_unix: 1,
            driver: "native".into(),
            environment_digest: None,
            image: None,
            host: "h".into(),
            ci_exec_version: "0".into(),
            commit: "c".into(),
            tree: "t".into(),
            stdout: blob.clone(),
            stderr: blob,
            artifacts: vec![],
            steps: vec![],
            repository: Some("example.com/r".into()),
            target: None,
            signature: None,
        }
    }

    fn upload(storage: &Storage, repository: &str, content: &[u8]) -> String {
        let sha = hex::encode(Sha256::digest(content));
        let path = storage.upload_path();
        fs::write(&path, content).expect("upload");
        storage.add_blob(repository, &sha, &path).expect("add");
        sha
    }

    #[test]
    fn gc_drops_old_results_then_the_blobs_nothing_names() {
        let dir = tempfile::tempdir().expect("tempdir");
        let storage = Storage::open(dir.path()).expect("open");
        let grant = storage
            .add_grant(Credential::Token("t"), "example.com/r", true)
            .expect("grant");
        let sha = upload(&storage, "example.com/r", b"blob");
        let key = "ab".repeat(32);
        let published = storage
            .publish("example.com/r", &record(&key, &sha), "{}", "k:x", &grant)
            .expect("publish");
        assert_eq!(published, Publish::Created);
        assert_eq!(
            storage
                .publish("example.com/r", &record(&key, &sha), "{ }", "k:x", &grant)
                .expect("publish"),
            Publish::Conflict
        );
        let missing = record(&"cd".repeat(32), &"ef".repeat(32));
        assert!(matches!(
            storage.publish("example.com/r", &missing, "{}", "k:x", &grant),
            Ok(Publish::MissingBlob(_))
        ));

        // Within the retention and right now: nothing goes.
        assert_eq!(storage.collect_garbage(30).expect("gc"), (0, 0));
        // Two days on, with one day kept: the result, its membership and its blob go.
        let later = unix_now() + 2 * 86400;
        assert_eq!(storage.collect_garbage_at(1, later).expect("gc"), (1, 1));
        assert!(
            storage
                .result("example.com/r", &key)
                .expect("read")
                .is_none()
        );
        assert!(!storage.is_member("example.com/r", &sha).expect("read"));
        assert_eq!(
            fs::read_dir(dir.path().join("cas")).expect("cas").count(),
            0
        );
    }

    #[test]
    fn revoking_a_grant_withdraws_the_keys_it_published_with() {
        let dir = tempfile::tempdir().expect("tempdir");
        let storage = Storage::open(dir.path()).expect("open");
        let grant = storage
            .add_grant(Credential::Token("secret"), "example.com/r", true)
            .expect("grant");
        storage
            .trust_key("example.com/r", "laptop:AAAA", &grant)
            .expect("trust");
        assert_eq!(
            storage.trusted_keys("example.com/r").expect("keys"),
            ["laptop:AAAA"]
        );
        assert!(
            storage
                .trusted_keys("example.com/other")
                .expect("keys")
                .is_empty()
        );
        assert_eq!(storage.revoke(&grant.id[..6]).expect("revoke"), 1);
        assert!(
            storage
                .trusted_keys("example.com/r")
                .expect("keys")
                .is_empty()
        );
        assert!(
            storage
                .grant(Credential::Token("secret"))
                .expect("grant")
                .is_none()
        );
    }
}
