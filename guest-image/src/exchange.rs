//! The directory that mmdebstrap's hooks and the builder hand files through.
//!
//! As root it is the build's own scratch directory. As a normal user mmdebstrap runs in unshare
//! mode, where the hooks' root is the first of the user's subordinate ids: that id cannot
//! reach a cache under a `0700` home, nor write a directory the user owns. So the hooks get a
//! world-writable directory of their own under `/var/tmp` (large files, unlike a tmpfs `/tmp`),
//! reachable by both, and the hook script leaves everything in it removable by the user.

use crate::{Error, host};
use std::path::{Path, PathBuf};

pub(crate) struct Exchange {
    path: PathBuf,
    /// Removed on drop; `None` when the exchange is the build directory itself.
    temporary: Option<tempfile::TempDir>,
}

impl Exchange {
    /// The exchange for a build in `work`.
    pub(crate) fn new(work: &Path) -> Result<Self, Error> {
        if is_root() {
            return Ok(Self {
                path: work.to_owned(),
                temporary: None,
            });
        }
        check_unshare_prerequisites()?;
        let parent = ["/var/tmp"]
            .map(PathBuf::from)
            .into_iter()
            .find(|directory| directory.is_dir())
            .unwrap_or_else(std::env::temp_dir);
        let temporary = tempfile::Builder::new()
            .prefix("ci-exec-image.")
            .tempdir_in(&parent)
            .map_err(|source| Error::CreateDirectory {
                path: parent.clone(),
                source,
            })?;
        let path = temporary.path().to_owned();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o777)).map_err(
            |source| Error::Write {
                path: path.clone(),
                source,
            },
        )?;
        Ok(Self {
            path,
            temporary: Some(temporary),
        })
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Moves `from` (in the exchange) to `to`, owned by the user who builds: a copy when they
    /// differ in owner or filesystem, a rename otherwise.
    pub(crate) fn take(&self, from: &Path, to: &Path) -> Result<(), Error> {
        if !from.exists() {
            return Err(Error::MissingOutput {
                path: from.to_owned(),
            });
        }
        if from == to {
            // As root the exchange is the build directory: nothing to move.
        } else if self.temporary.is_some() || std::fs::rename(from, to).is_err() {
            std::fs::copy(from, to).map_err(|source| Error::Write {
                path: to.to_owned(),
                source,
            })?;
        }
        // Whatever mode the hook left, the cached file is the user's and read-only to others.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(to, std::fs::Permissions::from_mode(0o644)).map_err(|source| {
            Error::Write {
                path: to.to_owned(),
                source,
            }
        })?;
        if from != to {
            let _ = std::fs::remove_file(from);
        }
        Ok(())
    }
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// What mmdebstrap's unshare mode needs, checked up front so the error names the fix.
fn check_unshare_prerequisites() -> Result<(), Error> {
    host::find(host::NEWUIDMAP)?;
    host::find(host::NEWGIDMAP)?;
    // SAFETY: getuid has no preconditions.
    let uid = unsafe { libc::getuid() };
    let user = user_name(uid).unwrap_or_else(|| uid.to_string());
    for file in ["/etc/subuid", "/etc/subgid"] {
        let text = std::fs::read_to_string(file).unwrap_or_default();
        if !has_range(&text, &user, uid) {
            return Err(Error::NoSubordinateIds {
                user,
                file: PathBuf::from(file),
            });
        }
    }
    Ok(())
}

/// Whether a subuid/subgid file gives `user` (by name or number) a range.
fn has_range(text: &str, user: &str, uid: u32) -> bool {
    let uid = uid.to_string();
    text.lines()
        .filter_map(|line| line.split(':').next())
        .any(|owner| owner == user || owner == uid)
}

/// The login name of `uid`, through NSS as mmdebstrap's own lookup does.
fn user_name(uid: u32) -> Option<String> {
    let mut buffer = vec![0 as libc::c_char; 16 * 1024];
    // SAFETY: zeroed `passwd` is a valid out-parameter; the pointers it receives point into
    // `buffer`, which outlives their use below.
    let mut entry: libc::passwd = unsafe { std::mem::zeroed() };
    let mut found: *mut libc::passwd = std::ptr::null_mut();
    let status = unsafe {
        libc::getpwuid_r(
            uid,
            &mut entry,
            buffer.as_mut_ptr(),
            buffer.len(),
            &mut found,
        )
    };
    if status != 0 || found.is_null() || entry.pw_name.is_null() {
        return None;
    }
    // SAFETY: getpwuid_r succeeded, so `pw_name` is a NUL-terminated string inside `buffer`.
    let name = unsafe { std::ffi::CStr::from_ptr(entry.pw_name) };
    Some(name.to_string_lossy().into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subordinate_ranges_match_by_name_or_number() {
        let text = "alice:100000:65536\n1001:165536:65536\n";
        assert!(has_range(text, "alice", 1000));
        assert!(has_range(text, "bob", 1001));
        assert!(!has_range(text, "carol", 1002));
        assert!(!has_range("", "alice", 1000));
    }
}
