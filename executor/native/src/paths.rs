//! Names and paths: what may become a directory under the namespace, and how a task's mounts
//! appear inside its directory.

use std::path::{Component, Path, PathBuf};

use ci_exec_driver::{DriverError, Mount};

use crate::error::NativeError;

/// Why `name` cannot name a directory of the namespace, if it cannot.
fn name_problem(name: &str) -> Option<&'static str> {
    if name.is_empty() {
        Some("it is empty")
    } else if name.len() > 128 {
        Some("it is longer than 128 characters")
    } else if name.starts_with('.') {
        Some("it starts with `.`")
    } else if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
    {
        Some("use only letters, digits, `_`, `.` and `-`")
    } else {
        None
    }
}

pub fn check_task_id(id: &str) -> Result<(), DriverError> {
    match name_problem(id) {
        Some(reason) => Err(DriverError::InvalidTask {
            task: id.to_owned(),
            reason: format!("bad task id: {reason}"),
        }),
        None => Ok(()),
    }
}

pub fn check_volume_name(name: &str) -> Result<(), DriverError> {
    match name_problem(name) {
        Some(reason) => Err(DriverError::InvalidVolume {
            volume: name.to_owned(),
            reason: format!("bad volume name: {reason}"),
        }),
        None => Ok(()),
    }
}

/// `path` as plain relative components; `..`, `.`-only, root-relative prefixes are refused.
fn plain_relative(path: &str) -> Option<PathBuf> {
    let trimmed = path.trim_start_matches('/');
    let mut clean = PathBuf::new();
    for component in Path::new(trimmed).components() {
        match component {
            Component::Normal(part) => clean.push(part),
            Component::CurDir => {}
            Component::ParentDir | Component::RootDir | Component::Prefix(_) => return None,
        }
    }
    (!clean.as_os_str().is_empty()).then_some(clean)
}

/// A path inside a volume, as `VolumeFiles::read_file` takes it.
pub fn volume_relative(volume: &str, path: &str) -> Result<PathBuf, DriverError> {
    if path.starts_with('/') {
        return Err(DriverError::InvalidVolume {
            volume: volume.to_owned(),
            reason: format!("path `{path}` must be relative to the volume's root"),
        });
    }
    plain_relative(path).ok_or_else(|| DriverError::InvalidVolume {
        volume: volume.to_owned(),
        reason: format!("path `{path}` leaves the volume or names nothing"),
    })
}

/// Makes each mount visible inside `dir` (the task's working directory): mount path `/data`
/// becomes the symlink `dir/data` to the volume's directory, since host processes cannot be
/// given their own root. Volumes are created on demand.
pub fn link_mounts(
    task: &str,
    dir: &Path,
    volumes_root: &Path,
    mounts: &[Mount],
) -> Result<(), DriverError> {
    for mount in mounts {
        check_volume_name(&mount.volume)?;
        mount.check(task)?;
        let relative = plain_relative(&mount.path).ok_or_else(|| DriverError::InvalidTask {
            task: task.to_owned(),
            reason: format!(
                "mount path `{}` of volume `{}` leaves the task directory or names nothing",
                mount.path, mount.volume
            ),
        })?;
        let volume_dir = volumes_root.join(&mount.volume);
        create_dir(&volume_dir).map_err(|error| error.into_driver("create a volume"))?;
        let link = dir.join(&relative);
        if let Some(parent) = link.parent() {
            create_dir(parent).map_err(|error| error.into_driver("mount a volume"))?;
        }
        std::os::unix::fs::symlink(&volume_dir, &link)
            .map_err(|source| NativeError::Link {
                volume: mount.volume.clone(),
                path: link.clone(),
                source,
            })
            .map_err(|error| error.into_driver("mount a volume"))?;
    }
    Ok(())
}

pub fn create_dir(path: &Path) -> Result<(), NativeError> {
    std::fs::create_dir_all(path).map_err(|source| NativeError::CreateDir {
        path: path.to_owned(),
        source,
    })
}

/// Removes `path` and everything under it; a missing path is fine.
pub fn remove_all(path: &Path) -> Result<(), NativeError> {
    match std::fs::remove_dir_all(path) {
        Ok(()) => Ok(()),
        Err(source) if source.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(NativeError::Remove {
            path: path.to_owned(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for good in ["a", "task-1", "A_b.c", "x".repeat(128).as_str()] {
            assert!(name_problem(good).is_none(), "`{good}`");
        }
        for bad in [
            "",
            ".",
            "..",
            ".hidden",
            "a/b",
            "a b",
            "é",
            "x".repeat(129).as_str(),
        ] {
            assert!(name_problem(bad).is_some(), "`{bad}`");
        }
    }

    #[test]
    fn volume_paths_reject_traversal() {
        assert_eq!(
            volume_relative("v", "a/./b").expect("ok"),
            PathBuf::from("a/b")
        );
        for bad in ["", ".", "../x", "a/../../x", "/etc/passwd", "a/.."] {
            let error = volume_relative("v", bad).expect_err(bad);
            assert!(
                matches!(error, DriverError::InvalidVolume { .. }),
                "`{bad}`: {error}"
            );
        }
        assert_eq!(
            volume_relative("v", "../x").expect_err("..").to_string(),
            "invalid volume `v`: path `../x` leaves the volume or names nothing"
        );
    }

    #[test]
    fn mounts_become_links_in_the_task_directory() {
        let root = tempfile::tempdir().expect("tempdir");
        let dir = root.path().join("task");
        create_dir(&dir).expect("dir");
        let mounts = [
            Mount {
                volume: "data".into(),
                path: "/data".into(),
            },
            Mount {
                volume: "cache".into(),
                path: "/var/cache/x".into(),
            },
        ];
        link_mounts("t", &dir, &root.path().join("volumes"), &mounts).expect("link");
        std::fs::write(dir.join("data/f"), "x").expect("write through link");
        assert_eq!(
            std::fs::read(root.path().join("volumes/data/f")).expect("read"),
            b"x"
        );
        assert!(root.path().join("volumes/cache").is_dir());
        assert!(dir.join("var/cache/x").is_dir());
        let escape = [Mount {
            volume: "data".into(),
            path: "/../../etc".into(),
        }];
        let error =
            link_mounts("t", &dir, &root.path().join("volumes"), &escape).expect_err("traversal");
        assert!(matches!(error, DriverError::InvalidTask { .. }), "{error}");
    }
}
