//! The native driver: each task is a host process in its own process group, with a per-task
//! directory as its working directory, output written straight to files (so logs are byte-exact,
//! readable after exit and from another process), and volumes as directories of the namespace.
//!
//! State lives under `{state_dir}/{namespace}/` (`state_dir` defaults to
//! `~/.local/state/ci-exec/native`): `tasks/{id}/` (`stdout`, `stderr`, `exit`, `pid`, `work/`),
//! `volumes/{name}/`, `sandboxes/{id}/`. `close` kills every recorded process group and removes
//! that directory, in this process or a later one, which is how a killed run is cleaned up.
//! Every driver using the directory holds a shared lock on its `owner.lock`; in generated
//! namespaces, which nobody can name in `driver close`, the next native run does that cleanup
//! once no live process holds the lock (`ci_exec_driver::leftovers`).
//!
//! It is not a sandbox: tasks run as the calling user on the host and see its file system.
//! Only the environment is hermetic — a task gets exactly its own variables, plus a default
//! `PATH` when it sets none. Mount path `/data` appears as `./data` in the task's directory,
//! since a host process cannot be given its own root.

mod error;
mod paths;
mod process;
mod sandbox;
mod task;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError};

use async_trait::async_trait;
use ci_exec_driver::leftovers::{self, OwnerLock};
use ci_exec_driver::{
    Container, Driver, DriverConfig, DriverError, JobSupport, MkSource, Sandbox, SandboxExec, Task,
    Volume, VolumeFiles,
};
use tokio::sync::Mutex;

pub use error::NativeError;
pub use process::DEFAULT_PATH;
pub use sandbox::NativeSandbox;
pub use task::NativeContainer;

use crate::paths::{check_task_id, check_volume_name, create_dir, remove_all, volume_relative};
use crate::task::TaskState;

/// The driver's name in a DSN.
pub const NAME: &str = "native";

/// Runs tasks as host processes in one namespace.
#[derive(Debug, Clone)]
pub struct NativeDriver {
    inner: Arc<Inner>,
}

#[derive(Debug)]
pub(crate) struct Inner {
    namespace: String,
    /// `{state_dir}/{namespace}`.
    root: PathBuf,
    tasks: Mutex<HashMap<String, Arc<TaskState>>>,
    /// Held from the first write to `root` until `close`: tells later runs it is in use.
    owner: std::sync::Mutex<Option<OwnerLock>>,
}

impl Inner {
    /// Before the first write to the namespace directory: removes what killed runs left in
    /// generated namespaces beside it, creates it, and takes its shared owner lock.
    pub(crate) fn claim(&self) -> Result<(), DriverError> {
        let mut owner = self.owner.lock().unwrap_or_else(PoisonError::into_inner);
        if owner.is_some() {
            return Ok(());
        }
        if let Some(state_dir) = self.root.parent() {
            leftovers::sweep_abandoned(state_dir, leftovers::SWEEP_MIN_AGE, |dir, had_lock| {
                // Without a lock file the directory predates owner locks: live tasks in it
                // may belong to an older `ci-exec` that still runs.
                if !had_lock && recorded_groups(dir).iter().any(process::PidRecord::alive) {
                    return Ok(false);
                }
                remove_namespace(dir).map(|()| true)
            });
        }
        create_dir(&self.root)
            .map_err(|error| error.into_driver(format!("create namespace `{}`", self.namespace)))?;
        match leftovers::lock_owner(&self.root, false) {
            Ok(Some(lock)) => {
                *owner = Some(lock);
                Ok(())
            }
            Ok(None) => Err(NativeError::NamespaceRemoved
                .into_driver(format!("use namespace `{}`", self.namespace))),
            Err(source) => Err(NativeError::CreateDir {
                path: self.root.join(leftovers::OWNER_LOCK),
                source,
            }
            .into_driver(format!("lock namespace `{}`", self.namespace))),
        }
    }
}

/// The process groups recorded under namespace directory `root`: its tasks and sandboxes,
/// whichever process started them.
fn recorded_groups(root: &Path) -> Vec<process::PidRecord> {
    ["tasks", "sandboxes"]
        .iter()
        .filter_map(|kind| std::fs::read_dir(root.join(kind)).ok())
        .flat_map(|entries| entries.flatten())
        .filter_map(|entry| {
            std::fs::read_to_string(entry.path().join(task::PID))
                .ok()
                .and_then(|text| process::PidRecord::decode(&text))
        })
        .collect()
}

/// Kills every process group recorded under namespace directory `root` and removes it.
fn remove_namespace(root: &Path) -> Result<(), NativeError> {
    for group in recorded_groups(root) {
        group.kill_group();
    }
    remove_all(root)
}

impl NativeDriver {
    /// The driver for a resolved `native` DSN.
    pub fn new(config: &DriverConfig) -> Result<NativeDriver, DriverError> {
        let state_dir = config
            .str("state_dir")
            .map(PathBuf::from)
            .ok_or_else(|| NativeError::NoStateDir.into_driver("find its state directory"))?;
        Ok(Self::with_state_dir(&config.namespace, &state_dir))
    }

    /// The driver for `namespace`, keeping its state under `state_dir/namespace`.
    pub fn with_state_dir(namespace: &str, state_dir: &Path) -> NativeDriver {
        NativeDriver {
            inner: Arc::new(Inner {
                namespace: namespace.to_owned(),
                root: state_dir.join(namespace),
                tasks: Mutex::new(HashMap::new()),
                owner: std::sync::Mutex::new(None),
            }),
        }
    }

    /// The namespace's directory.
    pub fn root(&self) -> &Path {
        &self.inner.root
    }

    fn tasks_dir(&self) -> PathBuf {
        self.inner.root.join("tasks")
    }

    fn volumes_dir(&self) -> PathBuf {
        self.inner.root.join("volumes")
    }

    fn container(&self, state: Arc<TaskState>) -> Box<dyn Container> {
        Box::new(NativeContainer {
            state,
            driver: Arc::clone(&self.inner),
        })
    }
}

#[async_trait]
impl Driver for NativeDriver {
    fn name(&self) -> &'static str {
        NAME
    }

    fn namespace(&self) -> &str {
        &self.inner.namespace
    }

    async fn create_volume(
        &self,
        name: &str,
        _size_bytes: u64,
    ) -> Result<Box<dyn Volume>, DriverError> {
        check_volume_name(name)?;
        self.inner.claim()?;
        let dir = self.volumes_dir().join(name);
        create_dir(&dir).map_err(|error| error.into_driver(format!("create volume `{name}`")))?;
        Ok(Box::new(NativeVolume {
            name: name.to_owned(),
            dir,
        }))
    }

    async fn run_container(&self, task: Task) -> Result<Box<dyn Container>, DriverError> {
        check_task_id(&task.id)?;
        let mut tasks = self.inner.tasks.lock().await;
        if let Some(state) = tasks.get(&task.id) {
            return Ok(self.container(Arc::clone(state)));
        }
        self.inner.claim()?;
        let dir = self.tasks_dir().join(&task.id);
        if dir.exists() {
            // Started by an earlier process in this namespace: the same id gives that task.
            if let Some(state) = TaskState::adopt(&task.id, dir.clone()) {
                let state = Arc::new(state);
                tasks.insert(task.id.clone(), Arc::clone(&state));
                return Ok(self.container(state));
            }
            // A directory without a pid file: a start that crashed half-way. Start afresh.
            remove_all(&dir).map_err(|error| error.into_driver("remove a half-started task"))?;
        }
        let id = task.id.clone();
        let state = Arc::new(TaskState::spawn(task, dir, &self.volumes_dir()).await?);
        tasks.insert(id, Arc::clone(&state));
        Ok(self.container(state))
    }

    /// The host's OS release and architecture, e.g. `native:debian-12/x86_64`.
    ///
    /// What a job sees on the host is the whole machine, which nothing cheap can hash; the OS
    /// release and architecture are what a repository's `prepare-runtime` and test tools
    /// depend on most, and change when the host is upgraded or replaced. The `mk` the job
    /// runs is hashed by the job itself (it is a tool ci-exec supplies). The kernel release
    /// is left out: it changes with every security update without changing what a job sees.
    async fn environment_digest(&self) -> Result<String, DriverError> {
        let release = std::fs::read_to_string("/etc/os-release")
            .or_else(|_| std::fs::read_to_string("/usr/lib/os-release"))
            .unwrap_or_default();
        Ok(format!(
            "native:{}/{}",
            os_release_identity(&release),
            std::env::consts::ARCH
        ))
    }

    fn job_support(&self) -> JobSupport {
        JobSupport {
            mk: MkSource::Host,
            test_in_container: false,
            default_test_image: String::new(),
            shares_host_run_dir: true,
        }
    }

    async fn close(&self) -> Result<(), DriverError> {
        let owned: Vec<_> = self.inner.tasks.lock().await.drain().collect();
        let mut first_error = None;
        for (_, state) in owned {
            if let Err(error) = state.remove().await {
                tracing::warn!("{error}");
                first_error.get_or_insert(error);
            }
        }
        // With the leftovers of other processes (a killed `ci-exec run`, a crashed job).
        let removed = remove_namespace(&self.inner.root);
        self.inner
            .owner
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Err(error) = removed {
            let error = error.into_driver(format!("close namespace `{}`", self.inner.namespace));
            tracing::warn!("{error}");
            first_error.get_or_insert(error);
        }
        match first_error {
            Some(error) => Err(error),
            None => Ok(()),
        }
    }

    fn as_volume_files(&self) -> Option<&dyn VolumeFiles> {
        Some(self)
    }

    fn as_sandbox(&self) -> Option<&dyn SandboxExec> {
        Some(self)
    }
}

#[async_trait]
impl VolumeFiles for NativeDriver {
    async fn read_file(&self, volume: &str, path: &str) -> Result<Vec<u8>, DriverError> {
        check_volume_name(volume)?;
        let relative = volume_relative(volume, path)?;
        let volume_dir = self.volumes_dir().join(volume);
        let not_found = || DriverError::FileNotFound {
            volume: volume.to_owned(),
            path: path.to_owned(),
        };
        let (Ok(volume_dir), Ok(file)) = (
            volume_dir.canonicalize(),
            volume_dir.join(&relative).canonicalize(),
        ) else {
            return Err(not_found());
        };
        // A symlink a task left in the volume must not lead out of it.
        if !file.starts_with(&volume_dir) {
            return Err(DriverError::InvalidVolume {
                volume: volume.to_owned(),
                reason: format!("path `{path}` leads out of the volume through a symlink"),
            });
        }
        tokio::fs::read(&file)
            .await
            .map_err(|source| match source.kind() {
                std::io::ErrorKind::NotFound => not_found(),
                _ => NativeError::Read { path: file, source }
                    .into_driver(format!("read `{path}` from volume `{volume}`")),
            })
    }
}

#[async_trait]
impl SandboxExec for NativeDriver {
    async fn start_sandbox(&self, task: Task) -> Result<Box<dyn Sandbox>, DriverError> {
        self.inner.claim()?;
        Ok(Box::new(NativeSandbox::start(
            Arc::clone(&self.inner),
            task,
        )?))
    }
}

/// A directory of the namespace.
#[derive(Debug)]
pub struct NativeVolume {
    name: String,
    dir: PathBuf,
}

#[async_trait]
impl Volume for NativeVolume {
    fn name(&self) -> &str {
        &self.name
    }

    async fn cleanup(&self) -> Result<(), DriverError> {
        remove_all(&self.dir)
            .map_err(|error| error.into_driver(format!("remove volume `{}`", self.name)))
    }
}

/// `ID-VERSION_ID` of an os-release file (`debian-12`), `unknown` when it says nothing; a
/// rolling release without `VERSION_ID` is its `ID` alone.
fn os_release_identity(release: &str) -> String {
    let field = |name: &str| {
        release.lines().find_map(|line| {
            let value = line.strip_prefix(name)?.strip_prefix('=')?;
            Some(value.trim().trim_matches(['"', '\'']).to_owned())
        })
    };
    match (field("ID"), field("VERSION_ID")) {
        (Some(id), Some(version)) => format!("{id}-{version}"),
        (Some(id), None) => id,
        _ => "unknown".to_owned(),
    }
}

#[cfg(test)]
mod identity_tests {
    use super::os_release_identity;

    #[test]
    fn os_release_gives_id_and_version() {
        let debian =
            "PRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\nVERSION_ID=\"12\"\nID=debian\n";
        assert_eq!(os_release_identity(debian), "debian-12");
        assert_eq!(os_release_identity("ID=arch\n"), "arch");
        assert_eq!(os_release_identity(""), "unknown");
        assert_eq!(
            os_release_identity("ID_LIKE=debian\nID='alpine'\nVERSION_ID=3.22.1\n"),
            "alpine-3.22.1"
        );
    }
}
