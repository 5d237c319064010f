//! The image cache on disk:
//!
//! ```text
//! $XDG_CACHE_HOME/ci-exec/images/
//!   debian-bookworm/
//!     current -> 3f2a…(16 hex)        symlink, swapped atomically when a build finishes
//!     3f2a…/manifest.json vmlinuz vmlinux initrd.cpio disk.qcow2
//!   apt-archives/                     .deb files kept between builds
//!   downloads/                        verified cloud images
//!   .build-<name>-<pid>/              in-progress builds (removed on failure or by prune)
//!   .lock-<name>                      one build per image at a time
//! ```
//! A finished build is never modified: running VMs may have overlays backed by its disk.

#[cfg(feature = "download")]
use crate::cloud::{self, CloudOptions};
use crate::debian::{self, BuildOptions, Distribution};
use crate::manifest::{Manifest, RECIPE_VERSION};
use crate::{Error, Reporter};
#[cfg(feature = "download")]
use crate::{catalog, download, host};
use std::path::{Path, PathBuf};

/// The image cache. Cheap to open; every method reads the disk afresh.
#[derive(Debug, Clone)]
pub struct ImageCache {
    root: PathBuf,
}

/// What [`ImageCache::prune`] removed.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct PruneReport {
    pub removed: Vec<PathBuf>,
    pub freed_bytes: u64,
}

impl ImageCache {
    /// An empty scratch directory for building image `name`, private to this process.
    fn fresh_work_dir(&self, name: &str) -> Result<PathBuf, Error> {
        let work = self
            .root
            .join(format!(".build-{name}-{}", std::process::id()));
        remove_tree(&work)?;
        std::fs::create_dir_all(&work).map_err(|source| Error::CreateDirectory {
            path: work.clone(),
            source,
        })?;
        Ok(work)
    }

    /// Opens (creating it if needed) the cache at `dir`, or at the default
    /// `$XDG_CACHE_HOME/ci-exec/images` (`~/.cache/ci-exec/images`).
    pub fn open(dir: Option<PathBuf>) -> Result<Self, Error> {
        let root = match dir {
            Some(dir) => dir,
            None => default_directory()?,
        };
        std::fs::create_dir_all(&root).map_err(|source| Error::CreateDirectory {
            path: root.clone(),
            source,
        })?;
        Ok(Self { root })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The current build of image `name` (`debian-bookworm`), if there is one.
    pub fn get(&self, name: &str) -> Result<Option<Manifest>, Error> {
        let current = self.root.join(name).join("current");
        let Ok(directory) = std::fs::canonicalize(&current) else {
            return Ok(None);
        };
        let path = directory.join("manifest.json");
        if !path.exists() {
            return Ok(None);
        }
        read_manifest(&path).map(Some)
    }

    /// The current build of every image, by name.
    pub fn list(&self) -> Result<Vec<Manifest>, Error> {
        let entries = std::fs::read_dir(&self.root).map_err(|source| Error::Read {
            path: self.root.clone(),
            source,
        })?;
        let mut names: Vec<String> = entries
            .flatten()
            .filter(|entry| entry.path().join("current").exists())
            .filter_map(|entry| entry.file_name().to_str().map(str::to_owned))
            .collect();
        names.sort();
        let mut manifests = Vec::new();
        for name in names {
            if let Some(manifest) = self.get(&name)? {
                manifests.push(manifest);
            }
        }
        Ok(manifests)
    }

    /// True when `manifest` was built by this recipe from the request `options` describes.
    pub fn is_current(&self, manifest: &Manifest, options: &BuildOptions) -> Result<bool, Error> {
        let inputs = debian::inputs(options)?;
        Ok(manifest.recipe_version == RECIPE_VERSION
            && manifest.inputs == inputs.digest
            && [
                &manifest.kernel,
                &manifest.vmlinux,
                &manifest.initrd,
                &manifest.disk,
            ]
            .iter()
            .all(|path| path.exists()))
    }

    /// Builds the Debian image `options` describes (the default image unless its variant says
    /// otherwise) and makes it current; returns the existing build when it is already current
    /// and `options.force` is off.
    pub fn build_default(
        &self,
        options: &BuildOptions,
        reporter: &dyn Reporter,
    ) -> Result<Manifest, Error> {
        let name = options.image_name();
        let _lock = Lock::acquire(&self.root.join(format!(".lock-{name}")))?;
        let inputs = debian::inputs(options)?;
        if !options.force
            && let Some(existing) = self.get(&name)?
            && existing.inputs == inputs.digest
            && existing.recipe_version == RECIPE_VERSION
            && existing.disk.exists()
        {
            reporter.step(&format!(
                "image `{name}` is current ({})",
                short(&existing.digest)
            ));
            return Ok(existing);
        }
        let work = self.fresh_work_dir(&name)?;
        let result = debian::build(
            options,
            &inputs,
            &work,
            // One archive per distribution: each build copies its whole archive into the tree.
            &self.root.join(match (options.distribution, options.arch) {
                (Distribution::Debian, crate::Arch::X86_64) => "apt-archives".to_owned(),
                (Distribution::Debian, arch) => format!("apt-archives-{}", arch.debian()),
                (other, _) => format!("apt-archives-{}", other.name()),
            }),
            reporter,
        )
        .and_then(|manifest| self.install(manifest, &work, &name));
        // The work directory holds only intermediates now (or a failed build): never leave it.
        let cleanup = remove_tree(&work);
        let manifest = result?;
        cleanup?;
        Ok(manifest)
    }

    #[cfg(feature = "download")]
    /// Downloads (once, verified) the catalog image `name`, e.g. `ubuntu-24.04`, and makes it
    /// bootable with the kernel and initramfs of the default image, which must be built (see
    /// [`crate::cloud`]). Nothing boots and nothing is installed into the image here.
    pub fn fetch_cloud(
        &self,
        name: &str,
        options: &CloudOptions,
        reporter: &dyn Reporter,
    ) -> Result<Manifest, Error> {
        let image =
            catalog::lookup(name)?.resolve(std::env::consts::ARCH, options.mirror.as_deref())?;
        let base = self.get(crate::DEFAULT_IMAGE)?.ok_or_else(|| Error::Prepare {
            name: name.to_owned(),
            reason: format!(
                "it boots with the kernel of `{}`, which is not built: run `ci-exec image build {}` first",
                crate::DEFAULT_IMAGE,
                crate::DEFAULT_IMAGE
            ),
        })?;
        let _lock = Lock::acquire(&self.root.join(format!(".lock-{name}")))?;
        let mk = host::require_static(&options.mk_binary, "mkrunner", crate::Arch::host())?;
        reporter.step(&format!("downloading `{}`", image.url));
        let download = download::fetch_verified(
            &image.url,
            &image.checksum_url,
            &self.root.join("downloads"),
            &image.file_name,
            reporter,
        )?;
        let marker = download.with_file_name(format!("{}.verified", image.file_name));
        let verified = std::fs::read_to_string(&marker).map_err(|source| Error::Read {
            path: marker.clone(),
            source,
        })?;
        let inputs = debian::sha256_hex(
            serde_json::json!({
                "recipe_version": RECIPE_VERSION,
                "name": name,
                "file": image.file_name,
                "image_digest": verified.trim(),
                "base_digest": base.digest,
                "mk_sha256": debian::sha256_hex(&mk),
            })
            .to_string()
            .as_bytes(),
        );
        if !options.force
            && let Some(existing) = self.get(name)?
            && existing.inputs == inputs
            && existing.disk.exists()
        {
            return Ok(existing);
        }
        let work = self.fresh_work_dir(name)?;
        let result = cloud::assemble(&image, &download, &base, inputs, &mk, &work)
            .and_then(|manifest| self.install(manifest, &work, name));
        let cleanup = remove_tree(&work);
        let manifest = result?;
        cleanup?;
        Ok(manifest)
    }

    /// Moves a finished build's files from `work` into `<name>/<digest>/` and points `current`
    /// at it.
    fn install(&self, mut manifest: Manifest, work: &Path, name: &str) -> Result<Manifest, Error> {
        let image_directory = self.root.join(name);
        std::fs::create_dir_all(&image_directory).map_err(|source| Error::CreateDirectory {
            path: image_directory.clone(),
            source,
        })?;
        let build_name = short(&manifest.digest).to_owned();
        let final_directory = image_directory.join(&build_name);
        let existing_manifest = final_directory.join("manifest.json");
        if existing_manifest.exists()
            && read_manifest(&existing_manifest).is_ok_and(|old| old.digest == manifest.digest)
        {
            // Same digest, same content: keep the files running VMs may already use.
            point_current(&image_directory, &build_name)?;
            return read_manifest(&existing_manifest);
        }
        remove_tree(&final_directory)?;
        let staging = work.join("image");
        std::fs::create_dir_all(&staging).map_err(|source| Error::CreateDirectory {
            path: staging.clone(),
            source,
        })?;
        for path in [
            &mut manifest.kernel,
            &mut manifest.vmlinux,
            &mut manifest.initrd,
            &mut manifest.disk,
        ] {
            let file_name = path.file_name().map(PathBuf::from).unwrap_or_default();
            let staged = staging.join(&file_name);
            std::fs::rename(&*path, &staged).map_err(|source| Error::Rename {
                from: path.clone(),
                to: staged.clone(),
                source,
            })?;
            *path = final_directory.join(file_name);
        }
        write_manifest(&staging.join("manifest.json"), &manifest)?;
        std::fs::rename(&staging, &final_directory).map_err(|source| Error::Rename {
            from: staging.clone(),
            to: final_directory.clone(),
            source,
        })?;
        point_current(&image_directory, &build_name)?;
        Ok(manifest)
    }

    /// Removes builds that are no longer current and leftovers of interrupted builds. With
    /// `everything`, removes all images and the apt archive too.
    pub fn prune(&self, everything: bool) -> Result<PruneReport, Error> {
        let mut report = PruneReport::default();
        let entries = std::fs::read_dir(&self.root).map_err(|source| Error::Read {
            path: self.root.clone(),
            source,
        })?;
        for entry in entries.flatten() {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(rest) = name.strip_prefix(".build-") {
                let pid = rest
                    .rsplit('-')
                    .next()
                    .and_then(|pid| pid.parse::<i32>().ok());
                if pid.is_none_or(|pid| !process_alive(pid)) {
                    report.remove(&path)?;
                }
                continue;
            }
            if name.starts_with(".lock-") || !path.is_dir() {
                continue;
            }
            if everything {
                report.remove(&path)?;
                continue;
            }
            // Shared caches, not images: kept unless everything goes.
            if name == "apt-archives" || name == "downloads" {
                continue;
            }
            let current = std::fs::read_link(path.join("current")).ok();
            let Ok(builds) = std::fs::read_dir(&path) else {
                continue;
            };
            for build in builds.flatten() {
                let build_path = build.path();
                let is_build = build_path.join("manifest.json").exists() || build_path.is_dir();
                if is_build
                    && build.file_name() != "current"
                    && current.as_deref() != Some(Path::new(&build.file_name()))
                {
                    report.remove(&build_path)?;
                }
            }
        }
        Ok(report)
    }
}

impl PruneReport {
    fn remove(&mut self, path: &Path) -> Result<(), Error> {
        self.freed_bytes += tree_size(path);
        remove_tree(path)?;
        self.removed.push(path.to_owned());
        Ok(())
    }
}

/// `$XDG_CACHE_HOME/ci-exec/images`, else `$HOME/.cache/ci-exec/images`.
pub fn default_directory() -> Result<PathBuf, Error> {
    let base = match std::env::var_os("XDG_CACHE_HOME").filter(|value| !value.is_empty()) {
        Some(cache) => PathBuf::from(cache),
        None => std::env::var_os("HOME")
            .filter(|value| !value.is_empty())
            .map(|home| PathBuf::from(home).join(".cache"))
            .ok_or(Error::NoCacheDirectory)?,
    };
    Ok(base.join("ci-exec").join("images"))
}

pub(crate) fn short(digest: &str) -> &str {
    digest.get(..16).unwrap_or(digest)
}

pub(crate) fn read_manifest(path: &Path) -> Result<Manifest, Error> {
    let text = std::fs::read(path).map_err(|source| Error::Read {
        path: path.to_owned(),
        source,
    })?;
    serde_json::from_slice(&text).map_err(|source| Error::ParseManifest {
        path: path.to_owned(),
        source,
    })
}

pub(crate) fn write_manifest(path: &Path, manifest: &Manifest) -> Result<(), Error> {
    let mut text = serde_json::to_vec_pretty(manifest).map_err(|source| Error::ParseManifest {
        path: path.to_owned(),
        source,
    })?;
    text.push(b'\n');
    write_atomically(path, &text)
}

/// Writes via a temporary file in the same directory and a rename, so readers never see half.
pub(crate) fn write_atomically(path: &Path, contents: &[u8]) -> Result<(), Error> {
    let temporary = path.with_extension(format!("tmp-{}", std::process::id()));
    std::fs::write(&temporary, contents).map_err(|source| Error::Write {
        path: temporary.clone(),
        source,
    })?;
    std::fs::rename(&temporary, path).map_err(|source| Error::Rename {
        from: temporary,
        to: path.to_owned(),
        source,
    })
}

/// Points `<image_directory>/current` at `build_name` with a symlink swapped by rename.
pub(crate) fn point_current(image_directory: &Path, build_name: &str) -> Result<(), Error> {
    let current = image_directory.join("current");
    let temporary = image_directory.join(format!(".current-{}", std::process::id()));
    let _ = std::fs::remove_file(&temporary);
    std::os::unix::fs::symlink(build_name, &temporary).map_err(|source| Error::Write {
        path: temporary.clone(),
        source,
    })?;
    std::fs::rename(&temporary, &current).map_err(|source| Error::Rename {
        from: temporary,
        to: current,
        source,
    })
}

fn remove_tree(path: &Path) -> Result<(), Error> {
    match std::fs::symlink_metadata(path) {
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Ok(metadata) if !metadata.is_dir() => {
            std::fs::remove_file(path).map_err(|source| Error::Remove {
                path: path.to_owned(),
                source,
            })
        }
        _ => std::fs::remove_dir_all(path).map_err(|source| Error::Remove {
            path: path.to_owned(),
            source,
        }),
    }
}

fn tree_size(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(metadata) = std::fs::symlink_metadata(path) else {
        return 0;
    };
    if !metadata.is_dir() {
        return metadata.blocks() * 512;
    }
    std::fs::read_dir(path)
        .map(|entries| {
            entries
                .flatten()
                .map(|entry| tree_size(&entry.path()))
                .sum()
        })
        .unwrap_or(0)
}

fn process_alive(pid: i32) -> bool {
    // SAFETY: kill with signal 0 only checks for existence.
    unsafe { libc::kill(pid, 0) == 0 }
}

/// An exclusive flock held for the life of the value.
struct Lock {
    _file: std::fs::File,
}

impl Lock {
    fn acquire(path: &Path) -> Result<Self, Error> {
        use std::os::fd::AsRawFd;
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .map_err(|source| Error::Lock {
                path: path.to_owned(),
                source,
            })?;
        // SAFETY: flock on an fd we own; blocks until the other build finishes.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(Error::Lock {
                path: path.to_owned(),
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(Self { _file: file })
    }
}

/// Current UTC time as `YYYY-MM-DDTHH:MM:SSZ`.
pub(crate) fn now_rfc3339() -> String {
    let seconds = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|duration| duration.as_secs())
        .unwrap_or(0);
    let (days, rest) = (seconds / 86_400, seconds % 86_400);
    // Howard Hinnant's civil-from-days.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_index + 2) / 5 + 1;
    let month = if month_index < 10 {
        month_index + 3
    } else {
        month_index - 9
    };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn fake_build(cache: &ImageCache, name: &str, digest: &str) -> Manifest {
        let work = cache.root().join(format!("work-{digest}"));
        std::fs::create_dir_all(&work).expect("work");
        for file in ["vmlinuz", "vmlinux", "initrd.cpio", "disk.qcow2"] {
            std::fs::write(work.join(file), digest).expect("write");
        }
        let manifest = Manifest {
            name: name.to_owned(),
            digest: digest.to_owned(),
            kernel: work.join("vmlinuz"),
            vmlinux: work.join("vmlinux"),
            initrd: work.join("initrd.cpio"),
            disk: work.join("disk.qcow2"),
            kernel_cmdline: "root=/dev/vda".to_owned(),
            packages: BTreeMap::from([("podman".to_owned(), "4.3.1".to_owned())]),
            recipe_version: RECIPE_VERSION,
            inputs: "inputs".to_owned(),
            arch: "x86_64".to_owned(),
            os: "Debian GNU/Linux 12 (bookworm)".to_owned(),
            kernel_release: "6.1.0".to_owned(),
            container_images: vec![],
            source: "test".to_owned(),
            built_at: now_rfc3339(),
            disk_bytes: 1,
        };
        let installed = cache.install(manifest, &work, name).expect("install");
        std::fs::remove_dir_all(&work).expect("cleanup");
        installed
    }

    #[test]
    fn install_get_list_and_prune() {
        let directory = tempfile::tempdir().expect("tempdir");
        let cache = ImageCache::open(Some(directory.path().join("images"))).expect("open");
        assert_eq!(cache.get("debian-bookworm").expect("get"), None);

        let first = fake_build(&cache, "debian-bookworm", &"a".repeat(64));
        assert!(
            first.disk.starts_with(
                cache
                    .root()
                    .join("debian-bookworm")
                    .join("aaaaaaaaaaaaaaaa")
            )
        );
        assert_eq!(
            std::fs::read_to_string(&first.disk).expect("disk"),
            "a".repeat(64)
        );
        assert_eq!(
            cache.get("debian-bookworm").expect("get").as_ref(),
            Some(&first)
        );

        let second = fake_build(&cache, "debian-bookworm", &"b".repeat(64));
        assert_eq!(
            cache.get("debian-bookworm").expect("get").as_ref(),
            Some(&second)
        );
        // The old build stays until pruned: overlays may still be backed by it.
        assert!(first.disk.exists());
        fake_build(&cache, "alpine-3.22", &"c".repeat(64));
        let names: Vec<String> = cache
            .list()
            .expect("list")
            .into_iter()
            .map(|manifest| manifest.name)
            .collect();
        assert_eq!(names, ["alpine-3.22", "debian-bookworm"]);

        std::fs::create_dir_all(cache.root().join(".build-debian-bookworm-999999999"))
            .expect("stale");
        let report = cache.prune(false).expect("prune");
        assert_eq!(report.removed.len(), 2, "{report:?}");
        assert!(!first.disk.exists());
        assert!(second.disk.exists());

        cache.prune(true).expect("prune all");
        assert!(cache.list().expect("list").is_empty());
    }

    #[test]
    fn reinstalling_the_same_digest_keeps_existing_files() {
        let directory = tempfile::tempdir().expect("tempdir");
        let cache = ImageCache::open(Some(directory.path().to_owned())).expect("open");
        let first = fake_build(&cache, "debian-bookworm", &"d".repeat(64));
        let again = fake_build(&cache, "debian-bookworm", &"d".repeat(64));
        assert_eq!(first, again);
    }

    #[test]
    fn corrupt_manifest_is_a_clear_error() {
        let directory = tempfile::tempdir().expect("tempdir");
        let cache = ImageCache::open(Some(directory.path().to_owned())).expect("open");
        let build = directory.path().join("debian-bookworm").join("0123");
        std::fs::create_dir_all(&build).expect("mkdir");
        std::fs::write(build.join("manifest.json"), "{").expect("write");
        point_current(&directory.path().join("debian-bookworm"), "0123").expect("point");
        let error = cache.get("debian-bookworm").unwrap_err();
        assert!(error.to_string().starts_with("manifest `"), "{error}");
        assert!(
            error
                .to_string()
                .ends_with("is not valid (delete it, or run `ci-exec image prune`)")
        );
    }

    #[test]
    fn default_directory_follows_xdg() {
        // Read-only check on the process environment: whichever is set decides.
        let directory = default_directory();
        if let Some(cache) = std::env::var_os("XDG_CACHE_HOME").filter(|value| !value.is_empty()) {
            assert_eq!(
                directory.expect("dir"),
                PathBuf::from(cache).join("ci-exec/images")
            );
        } else if let Some(home) = std::env::var_os("HOME") {
            assert_eq!(
                directory.expect("dir"),
                PathBuf::from(home).join(".cache/ci-exec/images")
            );
        }
    }

    #[test]
    fn timestamps_are_rfc3339() {
        let now = now_rfc3339();
        assert_eq!(now.len(), 20, "{now}");
        assert!(now.starts_with("20") && now.ends_with('Z'), "{now}");
    }
}
