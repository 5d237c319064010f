//! The committed tree of HEAD (or of any revision), read from git objects — never from the work
//! tree, so uncommitted edits and untracked files cannot reach a job.

use std::path::{Path, PathBuf};

use git2::{ObjectType, Repository, TreeWalkMode, TreeWalkResult};

use crate::JobError;

/// What a job runs: one commit's tree, packed as a tar archive.
#[derive(Debug)]
pub struct Snapshot {
    /// The directory the job is about: the repository's work tree root, or the subdirectory
    /// (a project in a monorepo) whose subtree the job runs.
    pub root: PathBuf,
    pub commit: String,
    pub tree: String,
    /// The committed `mkfile` at the root of the tree.
    pub mkfile: Vec<u8>,
    /// Every file, directory and symlink of the tree, with git's modes and the commit time as
    /// mtime (so mk sees one consistent age for every source file).
    pub archive: Vec<u8>,
    /// Submodules are not part of the tree's objects; they are skipped with a warning.
    pub skipped_submodules: Vec<String>,
    /// The repository's `origin` remote URL, when it has one.
    pub origin: Option<String>,
}

impl Snapshot {
    /// Reads HEAD of the repository containing `path`.
    pub fn of_head(path: &Path) -> Result<Snapshot, JobError> {
        Snapshot::of_revision(path, None)
    }

    /// Reads revision `revision` (a branch, tag, sha or any `git rev-parse` expression that
    /// names a commit) of the repository containing `path`, or HEAD when it is `None`, without
    /// checking anything out.
    pub fn of_revision(path: &Path, revision: Option<&str>) -> Result<Snapshot, JobError> {
        let repo = Repository::discover(path).map_err(|source| JobError::NotARepository {
            path: path.to_owned(),
            source,
        })?;
        let root = repo.workdir().unwrap_or_else(|| repo.path()).to_path_buf();
        let read_tree = |source| JobError::ReadTree {
            path: root.clone(),
            source,
        };
        let commit = match revision {
            Some(revision) => repo
                .revparse_single(revision)
                .and_then(|object| object.peel_to_commit())
                .map_err(|source| JobError::UnknownRevision {
                    revision: revision.to_owned(),
                    path: root.clone(),
                    source,
                })?,
            None => match repo.head() {
                Ok(head) => head.peel_to_commit().map_err(read_tree)?,
                Err(error) if error.code() == git2::ErrorCode::UnbornBranch => {
                    return Err(JobError::NoCommits { path: root });
                }
                Err(error) => return Err(read_tree(error)),
            },
        };
        let mut tree = commit.tree().map_err(read_tree)?;
        // A subdirectory of the repository is a project of its own (a monorepo): its committed
        // subtree is the job's source, and only changes under it change the key.
        let subdirectory = subdirectory_of(&root, path);
        if let Some(sub) = &subdirectory {
            let entry = tree.get_path(sub).map_err(|_| JobError::NoMkfile {
                path: root.join(sub),
            })?;
            tree = repo.find_tree(entry.id()).map_err(|_| JobError::NoMkfile {
                path: root.join(sub),
            })?;
        }
        let root = match subdirectory {
            Some(sub) => root.join(sub),
            None => root.clone(),
        };
        let mkfile = match tree.get_name("mkfile") {
            Some(entry) if entry.kind() == Some(ObjectType::Blob) => {
                let blob = repo.find_blob(entry.id()).map_err(read_tree)?;
                blob.content().to_vec()
            }
            _ => return Err(JobError::NoMkfile { path: root }),
        };
        let mtime = u64::try_from(commit.time().seconds()).unwrap_or(0);
        let (archive, skipped_submodules) =
            archive_tree(&repo, &tree, mtime).map_err(|source| JobError::Archive {
                path: root.clone(),
                source,
            })?;
        let origin = repo
            .find_remote("origin")
            .ok()
            .and_then(|remote| remote.url().ok().map(str::to_owned));
        Ok(Snapshot {
            origin,
            commit: commit.id().to_string(),
            tree: tree.id().to_string(),
            root,
            mkfile,
            archive,
            skipped_submodules,
        })
    }
}

/// The name a repository is known by across clones and machines, from its `origin` URL:
/// scheme, user, port and `.git` dropped, host lower-cased (`git@github.com:Owner/Name.git`
/// → `github.com/Owner/Name`). `None` for a URL that names no remote host (a local path).
pub fn repository_identity(origin: &str) -> Option<String> {
    let origin = origin.trim();
    let (host, path) = if let Some((_, rest)) = origin.split_once("://") {
        if origin.starts_with("file://") {
            return None;
        }
        let (authority, path) = rest.split_once('/')?;
        (authority, path)
    } else if let Some((authority, path)) = origin.split_once(':') {
        // scp-like `user@host:path`; a Windows drive or a plain path is not a remote.
        if authority.contains('/') || authority.len() < 2 {
            return None;
        }
        (authority, path)
    } else {
        return None;
    };
    let host = host.rsplit_once('@').map_or(host, |(_, host)| host);
    let host = host.split_once(':').map_or(host, |(host, _)| host);
    let path = path.trim_matches('/');
    let path = path
        .strip_suffix(".git")
        .unwrap_or(path)
        .trim_end_matches('/');
    if host.is_empty() || path.is_empty() {
        return None;
    }
    let name = format!("{}/{path}", host.to_ascii_lowercase());
    valid_repository_name(&name).then_some(name)
}

/// A repository name as the orchestrator accepts it: `/`-separated segments of ASCII letters,
/// digits, `.`, `_` and `-`, none empty or starting with `.`, at most 255 bytes.
pub fn valid_repository_name(name: &str) -> bool {
    name.len() <= 255
        && !name.is_empty()
        && name.split('/').all(|segment| {
            !segment.is_empty()
                && !segment.starts_with('.')
                && segment
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        })
}

/// `path` relative to the work tree `root`, when it is a subdirectory of it.
fn subdirectory_of(root: &Path, path: &Path) -> Option<PathBuf> {
    let root = root.canonicalize().ok()?;
    let path = path.canonicalize().ok()?;
    let relative = path.strip_prefix(&root).ok()?;
    (!relative.as_os_str().is_empty()).then(|| relative.to_path_buf())
}

fn archive_tree(
    repo: &Repository,
    tree: &git2::Tree<'_>,
    mtime: u64,
) -> std::io::Result<(Vec<u8>, Vec<String>)> {
    let mut builder = tar::Builder::new(Vec::new());
    let mut skipped = Vec::new();
    let mut failure: Option<std::io::Error> = None;
    tree.walk(TreeWalkMode::PreOrder, |parent, entry| {
        let Ok(name) = entry.name() else {
            return TreeWalkResult::Skip;
        };
        let path = format!("{parent}{name}");
        let result = match entry.kind() {
            Some(ObjectType::Tree) => append(
                &mut builder,
                &path,
                tar::EntryType::Directory,
                0o755,
                mtime,
                &[],
                None,
            ),
            Some(ObjectType::Blob) => match repo.find_blob(entry.id()) {
                Ok(blob) => match entry.filemode() {
                    0o120000 => {
                        let target = String::from_utf8_lossy(blob.content()).into_owned();
                        append(
                            &mut builder,
                            &path,
                            tar::EntryType::Symlink,
                            0o777,
                            mtime,
                            &[],
                            Some(&target),
                        )
                    }
                    0o100755 => append(
                        &mut builder,
                        &path,
                        tar::EntryType::Regular,
                        0o755,
                        mtime,
                        blob.content(),
                        None,
                    ),
                    _ => append(
                        &mut builder,
                        &path,
                        tar::EntryType::Regular,
                        0o644,
                        mtime,
                        blob.content(),
                        None,
                    ),
                },
                Err(error) => Err(std::io::Error::other(error)),
            },
            Some(ObjectType::Commit) => {
                skipped.push(path);
                Ok(())
            }
            _ => Ok(()),
        };
        match result {
            Ok(()) => TreeWalkResult::Ok,
            Err(error) => {
                failure = Some(error);
                TreeWalkResult::Abort
            }
        }
    })
    .map_err(std::io::Error::other)?;
    if let Some(error) = failure {
        return Err(error);
    }
    Ok((builder.into_inner()?, skipped))
}

fn append(
    builder: &mut tar::Builder<Vec<u8>>,
    path: &str,
    kind: tar::EntryType,
    mode: u32,
    mtime: u64,
    content: &[u8],
    link: Option<&str>,
) -> std::io::Result<()> {
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(kind);
    header.set_mode(mode);
    header.set_mtime(mtime);
    header.set_size(content.len() as u64);
    header.set_uid(0);
    header.set_gid(0);
    match link {
        Some(target) => builder.append_link(&mut header, path, target),
        None => builder.append_data(&mut header, path, content),
    }
}

#[cfg(test)]
mod tests {
    use std::process::Command;

    use super::*;

    fn git(dir: &Path, args: &[&str]) {
        let status = Command::new("git")
            .args([
                "-c",
                "user.name=t",
                "-c",
                "user.email=t@t",
                "-c",
                "init.defaultBranch=main",
            ])
            .args(args)
            .current_dir(dir)
            .status()
            .expect("git runs");
        assert!(status.success(), "git {args:?}");
    }

    #[test]
    fn repository_identity_is_the_same_for_every_way_of_naming_origin() {
        let cases: &[(&str, Option<&str>)] = &[
            (
                "git@github.com:Owner/name.git",
                Some("github.com/Owner/name"),
            ),
            (
                "https://github.com/Owner/name",
                Some("github.com/Owner/name"),
            ),
            (
                "https://GitHub.com/Owner/name.git/",
                Some("github.com/Owner/name"),
            ),
            (
                "ssh://git@github.com:22/Owner/name.git",
                Some("github.com/Owner/name"),
            ),
            (
                "https://user:secret@gitlab.example.org/group/sub/project.git",
                Some("gitlab.example.org/group/sub/project"),
            ),
            ("/srv/git/project.git", None),
            ("file:///srv/git/project.git", None),
            ("../project", None),
            ("https://example.org/../etc", None),
            ("https://example.org/", None),
        ];
        for (origin, expected) in cases {
            assert_eq!(
                repository_identity(origin).as_deref(),
                *expected,
                "{origin}"
            );
        }
    }

    #[test]
    fn repository_names_refuse_path_tricks() {
        for bad in [
            "",
            "a//b",
            "../x",
            "a/./b",
            "a/.hidden",
            "a b",
            "a/b%2f",
            "a\\b",
            "/a",
        ] {
            assert!(!valid_repository_name(bad), "{bad:?}");
        }
        for good in ["github.com/o/r", "local/3f2a", "gitlab.com/g/s/p.rs-x_y"] {
            assert!(valid_repository_name(good), "{good:?}");
        }
    }

    fn entries(archive: &[u8]) -> Vec<(String, Vec<u8>, u32)> {
        let mut out = Vec::new();
        let mut reader = tar::Archive::new(archive);
        for entry in reader.entries().expect("tar") {
            let mut entry = entry.expect("entry");
            let path = entry.path().expect("path").display().to_string();
            let mode = entry.header().mode().expect("mode");
            let mut data = Vec::new();
            std::io::Read::read_to_end(&mut entry, &mut data).expect("read");
            out.push((path, data, mode));
        }
        out
    }

    #[test]
    fn snapshot_holds_only_committed_content() {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        git(d, &["init", "-q"]);
        std::fs::write(d.join("mkfile"), "test:V:\n\techo committed\n").expect("write");
        std::fs::create_dir(d.join("bin")).expect("mkdir");
        std::fs::write(d.join("bin/run"), "#!/bin/sh\n").expect("write");
        Command::new("chmod")
            .args(["+x", "bin/run"])
            .current_dir(d)
            .status()
            .expect("chmod");
        std::os::unix::fs::symlink("bin/run", d.join("link")).expect("symlink");
        git(d, &["add", "."]);
        git(d, &["commit", "-qm", "one"]);
        // Dirty the work tree: none of this may reach the snapshot.
        std::fs::write(d.join("mkfile"), "test:V:\n\techo dirty\n").expect("write");
        std::fs::write(d.join("untracked"), "x").expect("write");

        let snapshot = Snapshot::of_head(d).expect("snapshot");
        assert_eq!(snapshot.mkfile, b"test:V:\n\techo committed\n");
        let entries = entries(&snapshot.archive);
        let names: Vec<&str> = entries.iter().map(|(n, _, _)| n.as_str()).collect();
        assert!(names.contains(&"mkfile"), "{names:?}");
        assert!(!names.iter().any(|n| n.contains("untracked")), "{names:?}");
        let run = entries
            .iter()
            .find(|(n, _, _)| n == "bin/run")
            .expect("bin/run");
        assert_eq!(run.2 & 0o111, 0o111, "executable bit kept");
        assert_eq!(snapshot.tree.len(), 40);
    }

    #[test]
    fn a_subdirectory_is_a_project_of_its_own() {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        git(d, &["init", "-q"]);
        std::fs::create_dir_all(d.join("services/api")).expect("mkdir");
        std::fs::write(d.join("mkfile"), "test:V:\n\techo root\n").expect("write");
        std::fs::write(d.join("services/api/mkfile"), "test:V:\n\techo api\n").expect("write");
        std::fs::write(d.join("services/api/main.c"), "int main;\n").expect("write");
        git(d, &["add", "."]);
        git(d, &["commit", "-qm", "one"]);
        let api = Snapshot::of_head(&d.join("services/api")).expect("snapshot");
        assert_eq!(api.mkfile, b"test:V:\n\techo api\n");
        let names: Vec<String> = entries(&api.archive)
            .into_iter()
            .map(|(n, _, _)| n)
            .collect();
        assert_eq!(names, ["main.c", "mkfile"]);
        assert!(api.root.ends_with("services/api"));

        // A change outside the subtree keeps its tree id, and so its result key.
        std::fs::write(d.join("README"), "x").expect("write");
        git(d, &["add", "."]);
        git(d, &["commit", "-qm", "two"]);
        let again = Snapshot::of_head(&d.join("services/api")).expect("snapshot");
        assert_eq!(again.tree, api.tree);
        assert_ne!(Snapshot::of_head(d).expect("root").tree, api.tree);

        let error = Snapshot::of_head(&d.join("services")).expect_err("no mkfile there");
        assert!(error.to_string().contains("services"), "{error}");
    }

    #[test]
    fn errors_name_the_problem() {
        let dir = tempfile::tempdir().expect("tempdir");
        let error = Snapshot::of_head(dir.path()).expect_err("not a repo");
        assert!(matches!(error, JobError::NotARepository { .. }), "{error}");

        git(dir.path(), &["init", "-q"]);
        let error = Snapshot::of_head(dir.path()).expect_err("no commits");
        assert!(error.to_string().contains("has no commits yet"), "{error}");

        std::fs::write(dir.path().join("README"), "x").expect("write");
        git(dir.path(), &["add", "."]);
        git(dir.path(), &["commit", "-qm", "one"]);
        let error = Snapshot::of_head(dir.path()).expect_err("no mkfile");
        assert!(
            error.to_string().contains("no `mkfile` is committed"),
            "{error}"
        );
        assert!(error.is_usage());
    }
}
