use std::io::Read;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use bollard::models::{ContainerCreateBody, HostConfig, Mount as BackendMount, MountType};
use bollard::query_parameters::DownloadFromContainerOptionsBuilder;
use futures_util::TryStreamExt;

use ci_exec_driver::{DriverError, Volume, VolumeFiles, resource_name};

use crate::DockerDriver;
use crate::driver::{Inner, Role, status_code};

/// Where a volume appears inside the helper container that reads files out of it.
const READER_MOUNT: &str = "/ci-exec-volume";

/// A volume of the namespace, named `{namespace}-{name}` on the engine.
#[derive(Debug)]
pub struct DockerVolume {
    inner: Arc<Inner>,
    name: String,
    backend_name: String,
}

impl DockerVolume {
    pub(crate) fn new(inner: Arc<Inner>, name: String, backend_name: String) -> Self {
        DockerVolume {
            inner,
            name,
            backend_name,
        }
    }

    /// The volume's name on the engine.
    pub fn backend_name(&self) -> &str {
        &self.backend_name
    }
}

#[async_trait]
impl Volume for DockerVolume {
    fn name(&self) -> &str {
        &self.name
    }

    async fn cleanup(&self) -> Result<(), DriverError> {
        self.inner.remove_volume(&self.backend_name).await
    }
}

/// Reads a file out of a volume through the archive API: a helper container mounts the volume
/// (created, never started) and the daemon streams the file as a tar. Works the same on a
/// remote daemon, where the volume's directory is out of reach.
#[async_trait]
impl VolumeFiles for DockerDriver {
    async fn read_file(&self, volume: &str, path: &str) -> Result<Vec<u8>, DriverError> {
        let inner = &self.inner;
        let invalid = |reason: String| DriverError::InvalidVolume {
            volume: volume.to_owned(),
            reason,
        };
        let relative = ci_exec_driver::volume_relative_path(volume, path)?;
        let backend_name = resource_name(inner.namespace(), volume);
        let docker = inner.docker().await?;
        match docker.inspect_volume(&backend_name).await {
            Ok(_) => {}
            Err(error) if status_code(&error) == Some(404) => {
                return Err(invalid(format!(
                    "no such volume in namespace `{}`",
                    inner.namespace()
                )));
            }
            Err(source) => {
                return Err(inner.backend(format!("inspect volume `{backend_name}`"), source));
            }
        }

        let reader = reader_name(inner.namespace());
        let body = ContainerCreateBody {
            image: Some(inner.config.image.clone()),
            cmd: Some(vec!["true".to_owned()]),
            entrypoint: Some(Vec::new()),
            labels: Some(inner.labels(volume, Some(Role::VolumeReader))),
            host_config: Some(HostConfig {
                mounts: Some(vec![BackendMount {
                    target: Some(READER_MOUNT.to_owned()),
                    source: Some(backend_name.clone()),
                    typ: Some(MountType::VOLUME),
                    read_only: Some(true),
                    ..BackendMount::default()
                }]),
                ..HostConfig::default()
            }),
            ..ContainerCreateBody::default()
        };
        if !inner.create_container(&reader, &body).await? {
            return Err(inner.backend(
                format!("create volume reader container `{reader}`"),
                crate::EngineProblem::NameTaken,
            ));
        }

        let inside = format!("{READER_MOUNT}/{}", relative.display());
        let options = DownloadFromContainerOptionsBuilder::new()
            .path(&inside)
            .build();
        let archive: Result<Vec<u8>, _> = docker
            .download_from_container(&reader, Some(options))
            .map_ok(|chunk| chunk.to_vec())
            .try_concat()
            .await;
        let removed = inner.remove_container(&reader).await;
        let archive = match archive {
            Ok(archive) => archive,
            Err(error) if status_code(&error) == Some(404) => {
                return Err(DriverError::FileNotFound {
                    volume: volume.to_owned(),
                    path: path.to_owned(),
                });
            }
            Err(source) => {
                return Err(inner.backend(
                    format!("read `{path}` from volume `{backend_name}`"),
                    source,
                ));
            }
        };
        removed?;
        first_file(&archive).map_err(|problem| match problem {
            ArchiveProblem::NotAFile(kind) => invalid(format!("`{path}` is a {kind}, not a file")),
            ArchiveProblem::Malformed(source) => inner.backend(
                format!("unpack `{path}` from volume `{backend_name}`"),
                source,
            ),
        })
    }
}

/// A unique name for a volume reader: concurrent reads must not collide.
fn reader_name(namespace: &str) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.subsec_nanos());
    format!(
        "{namespace}-volume-reader-{}-{nanos:x}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

#[derive(Debug)]
enum ArchiveProblem {
    NotAFile(&'static str),
    Malformed(std::io::Error),
}

/// The contents of the archive's first entry, which must be a regular file.
fn first_file(archive: &[u8]) -> Result<Vec<u8>, ArchiveProblem> {
    let mut archive = tar::Archive::new(archive);
    let mut entries = archive.entries().map_err(ArchiveProblem::Malformed)?;
    let mut entry = entries
        .next()
        .ok_or_else(|| {
            ArchiveProblem::Malformed(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the daemon sent an empty archive",
            ))
        })?
        .map_err(ArchiveProblem::Malformed)?;
    let kind = entry.header().entry_type();
    if kind.is_dir() {
        return Err(ArchiveProblem::NotAFile("directory"));
    }
    if kind.is_symlink() || kind.is_hard_link() {
        return Err(ArchiveProblem::NotAFile("link"));
    }
    if !kind.is_file() {
        return Err(ArchiveProblem::NotAFile("special file"));
    }
    let mut contents = Vec::with_capacity(usize::try_from(entry.size()).unwrap_or(0));
    entry
        .read_to_end(&mut contents)
        .map_err(ArchiveProblem::Malformed)?;
    Ok(contents)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn archive(build: impl FnOnce(&mut tar::Builder<Vec<u8>>)) -> Vec<u8> {
        let mut builder = tar::Builder::new(Vec::new());
        build(&mut builder);
        builder.into_inner().unwrap()
    }

    #[test]
    fn the_first_regular_file_is_returned_byte_exact() {
        let bytes = archive(|builder| {
            let mut header = tar::Header::new_gnu();
            header.set_size(4);
            header.set_entry_type(tar::EntryType::Regular);
            header.set_cksum();
            builder
                .append_data(&mut header, "out.bin", &[0u8, 255, 10, 13][..])
                .unwrap();
        });
        assert_eq!(first_file(&bytes).unwrap(), vec![0, 255, 10, 13]);
    }

    #[test]
    fn a_directory_is_not_a_file() {
        let bytes = archive(|builder| {
            let mut header = tar::Header::new_gnu();
            header.set_entry_type(tar::EntryType::Directory);
            header.set_size(0);
            header.set_cksum();
            builder
                .append_data(&mut header, "dir/", std::io::empty())
                .unwrap();
        });
        assert!(matches!(
            first_file(&bytes),
            Err(ArchiveProblem::NotAFile("directory"))
        ));
    }

    #[test]
    fn reader_names_differ() {
        assert_ne!(reader_name("ns"), reader_name("ns"));
    }
}
