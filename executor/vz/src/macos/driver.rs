//! [`VzDriver`]: the driver contract over one lazily started vz VM, as the qemu driver does it
//! over a QEMU process: the same share layout (`tasks/<id>/` with stdin, stdout, stderr, exit;
//! `volumes/<name>/`), the same task files for the guest's `ci-exec-init --task` wrapper
//! ([`ci_exec_qemu::guest`]), the same output readers ([`ci_exec_qemu::output`]); the share is
//! virtiofs and the agent and control port are on vsock.
//!
//! Compile-checked only (clippy for `aarch64-apple-darwin` on Linux); it has not run on a Mac.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use ci_exec_driver::{
    Container, ContainerStatus, Driver, DriverError, FollowLogs, JobSupport, LogSink, MkSource,
    Sandbox, SandboxExec, SandboxOutput, Task, Volume, VolumeFiles,
};
use ci_exec_qemu::control::{self, ControlClient};
use ci_exec_qemu::guest::{self, Runner};
use ci_exec_qemu::qga::{ExecStatus, QgaClient};
use ci_exec_qemu::run_dir::GUEST_SHARE;
use ci_exec_qemu::{AGENT_TIMEOUT, ProtocolError, output};
use tokio::io::AsyncWriteExt;
use tokio::sync::Mutex;

use super::vm::{Vm, host_limits};
use crate::disk::{self, CloneFile, RawDisks, SystemClone};
use crate::image::{self, VzImage};
use crate::share::{RunDir, read_exit, stream_stdin, write_task_files};
use crate::spec::{self, SHARE_TAG, VmSpec};
use crate::transport::{self, Connector, VsockStream};
use crate::warm::WarmState;
use crate::{VzConfig, VzError};

const DRIVER: &str = "vz";
/// The test image of jobs whose mkfile names none: the guest images preload it.
const DEFAULT_TEST_IMAGE: &str = "localhost/ci-exec/base:latest";
/// How often `status` may ask the agent whether a wrapper died without writing its exit code.
const AGENT_POLL_INTERVAL: Duration = Duration::from_millis(250);

fn backend(action: impl Into<String>, error: VzError) -> DriverError {
    DriverError::backend(DRIVER, action, error)
}

/// The vz driver: one VM per instance, started on first use.
#[derive(Debug)]
pub struct VzDriver {
    config: VzConfig,
    cloner: Box<dyn CloneFile>,
    /// Held from the first start until `close`: tells later runs this namespace is alive.
    owner: std::sync::Mutex<Option<ci_exec_driver::leftovers::OwnerLock>>,
    guest: Mutex<Option<Arc<Guest>>>,
    containers: Mutex<HashMap<String, Arc<TaskHandle>>>,
    sandboxes: AtomicU64,
}

impl VzDriver {
    /// A driver for `config`. Cheap: nothing starts until the first task.
    pub fn new(config: VzConfig) -> Self {
        VzDriver {
            config,
            cloner: Box::new(SystemClone),
            owner: std::sync::Mutex::new(None),
            guest: Mutex::new(None),
            containers: Mutex::new(HashMap::new()),
            sandboxes: AtomicU64::new(0),
        }
    }

    fn run(&self) -> RunDir {
        RunDir::new(self.config.run_dir())
    }

    /// Starts the VM if it does not run yet (restored from a saved state when one exists)
    /// and returns it, with the share mounted and the clock set.
    async fn guest(&self) -> Result<Arc<Guest>, VzError> {
        let mut slot = self.guest.lock().await;
        if let Some(guest) = slot.as_ref() {
            guest.check_running("run")?;
            return Ok(guest.clone());
        }
        let image = image::resolve(&self.config.image)?;
        // What killed runs left in generated namespaces goes now: nobody will close those, and
        // their VMs died with them (the framework runs a VM inside its owner's process tree).
        ci_exec_driver::leftovers::sweep_abandoned(
            &self.config.run_root(),
            ci_exec_driver::leftovers::SWEEP_MIN_AGE,
            |dir, _| std::fs::remove_dir_all(dir).map(|()| true),
        );
        let run = self.run();
        run.create()?;
        {
            let mut owner = self.owner.lock().unwrap_or_else(PoisonError::into_inner);
            if owner.is_none() {
                let lock = ci_exec_driver::leftovers::lock_owner(run.path(), true)
                    .map_err(|source| VzError::CreateDir {
                        path: run.path().to_owned(),
                        source,
                    })?
                    .ok_or_else(|| VzError::NamespaceLocked {
                        namespace: self.config.namespace.clone(),
                    })?;
                *owner = Some(lock);
            }
        }
        let raw = RawDisks::new(self.config.disk_cache()).get(&image).await?;
        let files = run.files();
        let spec = VmSpec::new(&self.config, &image, &files, &host_limits())?;
        let started = Instant::now();
        let guest = if self.config.warm {
            self.start_warm(&image, &spec, &raw).await?
        } else {
            self.start_cold(&spec, &raw, None).await?
        };
        guest.prepare().await?;
        tracing::debug!(elapsed = ?started.elapsed(), restored = guest.restored, "vz VM ready");
        let guest = Arc::new(guest);
        *slot = Some(guest.clone());
        Ok(guest)
    }

    /// Boots from a fresh clone of `raw`; with `save`, saves the booted guest's state there
    /// for later warm starts (a failed save is logged, the VM carries on).
    async fn start_cold(
        &self,
        spec: &VmSpec,
        raw: &Path,
        save: Option<&WarmState>,
    ) -> Result<Guest, VzError> {
        let root = &spec.disks[0].path;
        disk::clone_root_disk(self.cloner.as_ref(), raw, root)?;
        let vm = Vm::new(spec)?;
        vm.start().await?;
        let guest = Guest::connect(vm, spec, false, self.config.boot_timeout).await?;
        let Some(state) = save else {
            return Ok(guest);
        };
        match guest.vm.save_restore_support() {
            Ok(()) => {}
            Err(reason) => {
                tracing::info!(%reason, "vz: no warm VM state; every VM boots cold");
                return Ok(guest);
            }
        }
        // The guest's vsock connections end before the save (its init accepts again after
        // EOF): a saved state holds no connection of this VM's host side.
        let Guest {
            vm, agent, control, ..
        } = guest;
        drop(agent);
        drop(control);
        if let Err(error) = save_state(&vm, self.cloner.as_ref(), root, state).await {
            tracing::warn!(
                "cannot save a warm vz VM state ({}); this VM carries on as booted",
                ci_exec_driver::error_chain(&error)
            );
            let _ = state.discard();
        }
        // Saved or not, the VM goes on (a failed pause leaves it running: nothing to resume).
        if let Err(error) = vm.resume().await {
            tracing::debug!(%error, "resuming the VM after saving its state");
        }
        Guest::connect(vm, spec, false, self.config.boot_timeout).await
    }

    /// Restores the saved state of this image and shape when there is one, else boots cold
    /// and saves one; any failure of the saved state falls back to a cold boot.
    async fn start_warm(
        &self,
        image: &VzImage,
        spec: &VmSpec,
        raw: &Path,
    ) -> Result<Guest, VzError> {
        let state = WarmState::for_vm(&self.config.state_cache(), image, spec);
        // Drivers of one process that start at once wait for the first to save the state.
        static SAVING: Mutex<()> = Mutex::const_new(());
        let saving = SAVING.lock().await;
        if !state.is_ready() {
            let guest = self.start_cold(spec, raw, Some(&state)).await;
            drop(saving);
            return guest;
        }
        drop(saving);
        match self.restore(spec, &state).await {
            Ok(guest) => Ok(guest),
            Err(error) => {
                tracing::warn!(
                    state = %state.dir().display(),
                    "warm vz start failed ({}); discarding the saved state and booting cold",
                    ci_exec_driver::error_chain(&error)
                );
                let _ = state.discard();
                self.start_cold(spec, raw, None).await
            }
        }
    }

    async fn restore(&self, spec: &VmSpec, state: &WarmState) -> Result<Guest, VzError> {
        disk::clone_root_disk(self.cloner.as_ref(), &state.disk(), &spec.disks[0].path)?;
        let vm = Vm::new(spec)?;
        if let Err(reason) = vm.save_restore_support() {
            return Err(crate::entitlement::framework_error(
                "restore the VM state",
                reason.clone(),
            ));
        }
        vm.restore(&state.state()).await?;
        // A restored VM is paused.
        vm.resume().await?;
        Guest::connect(vm, spec, true, self.config.boot_timeout).await
    }

    fn volume_path(&self, name: &str) -> Result<PathBuf, DriverError> {
        guest::check_name(name).map_err(|reason| DriverError::InvalidVolume {
            volume: name.to_owned(),
            reason,
        })?;
        Ok(self.run().volume(name))
    }

    fn ensure_volume(&self, name: &str) -> Result<PathBuf, DriverError> {
        let path = self.volume_path(name)?;
        std::fs::create_dir_all(&path).map_err(|source| {
            backend(
                format!("create volume `{name}`"),
                VzError::CreateDir {
                    path: path.clone(),
                    source,
                },
            )
        })?;
        // Tasks in the guest may run as any user: the volume is theirs to write.
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o777));
        Ok(path)
    }
}

/// Writes the task's files on the share and starts the guest's wrapper for it (`env` is the
/// command's whole environment); returns the task's directory and the wrapper's guest pid.
/// The task's volumes exist already.
async fn start_task(
    run: &RunDir,
    guest: &Guest,
    task: &Task,
    env: &BTreeMap<String, String>,
    runner: Runner<'_>,
) -> Result<(PathBuf, i64), DriverError> {
    let (dir, stream) = write_task_files(run, task, env, runner)
        .await
        .map_err(|error| backend(format!("prepare task `{}`", task.id), error))?;
    let pid = guest
        .exec(
            guest::TASK_HELPER,
            &["--task".to_owned(), guest::guest_task_dir(&task.id)],
            &guest::wrapper_env(),
            false,
        )
        .await
        .map_err(|error| backend(format!("start task `{}`", task.id), error))?;
    if let Some(reader) = stream {
        tokio::spawn(stream_stdin(reader, dir.clone()));
    }
    Ok((dir, pid))
}

/// Saves `vm`'s state and a clone of its root disk as `state`: the vsock connections are
/// closed by then (the guest's init accepts again after EOF), and the VM ends paused.
async fn save_state(
    vm: &Vm,
    cloner: &dyn CloneFile,
    root: &Path,
    state: &WarmState,
) -> Result<(), VzError> {
    let (disk, saved) = state.begin()?;
    vm.pause().await?;
    // Paused, the guest writes nothing more: the disk clone matches the saved memory.
    disk::clone_root_disk(cloner, root, &disk)?;
    vm.save(&saved).await?;
    state.publish(&disk, &saved)
}

/// A started VM with its agent and control connections.
#[derive(Debug)]
struct Guest {
    vm: Vm,
    agent: Mutex<QgaClient<VsockStream>>,
    control: Mutex<ControlClient<VsockStream>>,
    console_log: PathBuf,
    network: bool,
    restored: bool,
}

/// Connections to one VM's vsock ports, for [`transport`].
struct VmConnector<'a> {
    vm: &'a Vm,
    console_log: &'a Path,
}

#[async_trait]
impl Connector for VmConnector<'_> {
    async fn connect(&self, port: u32) -> Result<VsockStream, VzError> {
        self.vm.connect(port).await
    }

    fn check_running(&self, stage: &str) -> Result<(), VzError> {
        if self.vm.is_alive() {
            Ok(())
        } else {
            Err(VzError::Stopped {
                stage: stage.to_owned(),
                console: self.console_tail(),
            })
        }
    }

    fn console_tail(&self) -> String {
        ci_exec_qemu::machine::console_tail(self.console_log, 20)
    }
}

impl Guest {
    /// Connects to the agent (waiting for the guest to serve it) and to the control port.
    async fn connect(
        vm: Vm,
        spec: &VmSpec,
        restored: bool,
        boot_timeout: Duration,
    ) -> Result<Guest, VzError> {
        let connector = VmConnector {
            vm: &vm,
            console_log: &spec.console_log,
        };
        let agent = transport::connect_agent(&connector, boot_timeout).await?;
        let control = transport::connect_control(&connector, AGENT_TIMEOUT).await?;
        Ok(Guest {
            agent: Mutex::new(agent),
            control: Mutex::new(control),
            console_log: spec.console_log.clone(),
            network: spec.network,
            restored,
            vm,
        })
    }

    fn check_running(&self, stage: &str) -> Result<(), VzError> {
        VmConnector {
            vm: &self.vm,
            console_log: &self.console_log,
        }
        .check_running(stage)
    }

    /// Sets the guest clock (a restored guest wakes with the time it was saved at), mounts
    /// the share over virtiofs, and configures the NIC when there is one.
    async fn prepare(&self) -> Result<(), VzError> {
        let since_epoch = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let requests = vec![
            control::time_request(since_epoch),
            control::mountfs_request("virtiofs", SHARE_TAG, GUEST_SHARE, ""),
        ];
        {
            let mut control = self.control.lock().await;
            let sent = async {
                control.send(&requests).await?;
                control.answers(&requests, AGENT_TIMEOUT).await
            }
            .await;
            sent.map_err(|source| VzError::Control {
                stage: "prepare".to_owned(),
                source,
            })?;
        }
        if self.network {
            self.sh_ok(spec::NETWORK_SETUP, AGENT_TIMEOUT).await?;
        }
        Ok(())
    }

    async fn exec(
        &self,
        path: &str,
        arguments: &[String],
        env: &[String],
        capture_output: bool,
    ) -> Result<i64, VzError> {
        self.check_running("exec")?;
        self.agent
            .lock()
            .await
            .exec(path, arguments, env, capture_output, AGENT_TIMEOUT)
            .await
            .map_err(|source| VzError::Agent {
                stage: format!("starting `{path}`"),
                source,
            })
    }

    async fn exec_status(&self, pid: i64) -> Result<ExecStatus, VzError> {
        self.check_running("exec")?;
        self.agent
            .lock()
            .await
            .exec_status(pid, AGENT_TIMEOUT)
            .await
            .map_err(|source| VzError::Agent {
                stage: format!("status of guest pid {pid}"),
                source,
            })
    }

    /// Runs `script` with `/bin/sh -c` as root in the guest and waits for it.
    async fn sh(&self, script: &str, timeout: Duration) -> Result<ExecStatus, VzError> {
        let pid = self
            .exec(
                "/bin/sh",
                &["-c".to_owned(), script.to_owned()],
                &guest::wrapper_env(),
                true,
            )
            .await?;
        let deadline = Instant::now() + timeout;
        let mut interval = Duration::from_millis(1);
        loop {
            let status = self.exec_status(pid).await?;
            if status.exited {
                return Ok(status);
            }
            if Instant::now() > deadline {
                return Err(VzError::Agent {
                    stage: format!("`{script}`"),
                    source: ProtocolError::Timeout {
                        peer: "qga",
                        command: "guest-exec-status".to_owned(),
                        after: timeout,
                    },
                });
            }
            tokio::time::sleep(interval).await;
            interval = (interval * 2).min(Duration::from_millis(20));
        }
    }

    async fn sh_ok(&self, script: &str, timeout: Duration) -> Result<ExecStatus, VzError> {
        let status = self.sh(script, timeout).await?;
        if status.shell_code() != 0 {
            return Err(VzError::GuestCommand {
                command: script.to_owned(),
                code: status.shell_code(),
                stderr: String::from_utf8_lossy(&status.stderr).trim().to_owned(),
            });
        }
        Ok(status)
    }
}

#[async_trait]
impl Driver for VzDriver {
    fn name(&self) -> &'static str {
        DRIVER
    }

    fn namespace(&self) -> &str {
        &self.config.namespace
    }

    /// The guest image's digest, as for the qemu driver: the same image gives the same
    /// results on either (and an aarch64 image has its own digest).
    async fn environment_digest(&self) -> Result<String, DriverError> {
        let image = image::resolve(&self.config.image)
            .map_err(|error| backend("find its guest image", error))?;
        Ok(image.digest)
    }

    fn job_support(&self) -> JobSupport {
        JobSupport {
            mk: MkSource::BaseOs,
            test_in_container: true,
            default_test_image: DEFAULT_TEST_IMAGE.to_owned(),
            shares_host_run_dir: false,
        }
    }

    async fn create_volume(
        &self,
        name: &str,
        _size_bytes: u64,
    ) -> Result<Box<dyn Volume>, DriverError> {
        let path = self.ensure_volume(name)?;
        Ok(Box::new(VzVolume {
            name: name.to_owned(),
            path,
        }))
    }

    async fn run_container(&self, task: Task) -> Result<Box<dyn Container>, DriverError> {
        guest::check_task(&task)?;
        let mut containers = self.containers.lock().await;
        if let Some(existing) = containers.get(&task.id) {
            return Ok(Box::new(VzContainer {
                handle: existing.clone(),
            }));
        }
        let guest = self
            .guest()
            .await
            .map_err(|error| backend("start the VM", error))?;
        if task.network == Some(true) && !guest.network {
            return Err(DriverError::InvalidTask {
                task: task.id.clone(),
                reason: "it asks for the network, and this VM has none (`vz:network=false`)"
                    .to_owned(),
            });
        }
        let name = ci_exec_driver::resource_name(&self.config.namespace, &task.id);
        let runner = if task.image.is_empty() {
            Runner::GuestOs
        } else {
            Runner::PodmanRun {
                image: &task.image,
                name: &name,
            }
        };
        for mount in &task.mounts {
            self.ensure_volume(&mount.volume)?;
        }
        let (dir, pid) = start_task(&self.run(), &guest, &task, &task.env, runner).await?;
        let handle = Arc::new(TaskHandle {
            id: task.id.clone(),
            dir,
            guest,
            pid,
            podman_name: (!task.image.is_empty()).then_some(name),
            polled: Mutex::new(Polled::default()),
        });
        containers.insert(task.id.clone(), handle.clone());
        Ok(Box::new(VzContainer { handle }))
    }

    async fn close(&self) -> Result<(), DriverError> {
        self.containers.lock().await.clear();
        if let Some(guest) = self.guest.lock().await.take()
            && let Err(error) = guest.vm.stop().await
        {
            tracing::warn!(
                "stopping the vz VM: {}",
                ci_exec_driver::error_chain(&error)
            );
        }
        let run = self.run();
        let removed = match std::fs::remove_dir_all(run.path()) {
            Ok(()) => Ok(()),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(backend(
                "remove the namespace's run directory",
                VzError::Remove {
                    path: run.path().to_owned(),
                    source,
                },
            )),
        };
        self.owner
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        removed
    }

    fn as_volume_files(&self) -> Option<&dyn VolumeFiles> {
        Some(self)
    }

    fn as_sandbox(&self) -> Option<&dyn SandboxExec> {
        Some(self)
    }
}

#[async_trait]
impl VolumeFiles for VzDriver {
    async fn read_file(&self, volume: &str, path: &str) -> Result<Vec<u8>, DriverError> {
        let root = self.volume_path(volume)?;
        let relative = ci_exec_driver::volume_relative_path(volume, path)?;
        let file = root.join(relative);
        match tokio::fs::read(&file).await {
            Ok(bytes) => Ok(bytes),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                Err(DriverError::FileNotFound {
                    volume: volume.to_owned(),
                    path: path.to_owned(),
                })
            }
            Err(source) => Err(backend(
                format!("read `{path}` from volume `{volume}`"),
                VzError::ReadFile { path: file, source },
            )),
        }
    }
}

/// A started task's state, shared by every handle to it.
#[derive(Debug)]
struct TaskHandle {
    id: String,
    dir: PathBuf,
    guest: Arc<Guest>,
    /// The wrapper's guest pid.
    pid: i64,
    podman_name: Option<String>,
    polled: Mutex<Polled>,
}

#[derive(Debug, Default)]
struct Polled {
    exit: Option<i32>,
    agent_asked: Option<Instant>,
}

impl TaskHandle {
    async fn status(&self) -> Result<ContainerStatus, DriverError> {
        let mut polled = self.polled.lock().await;
        if let Some(code) = polled.exit {
            return Ok(ContainerStatus::Exited { code });
        }
        if let Some(code) = read_exit(&self.dir) {
            polled.exit = Some(code);
            return Ok(ContainerStatus::Exited { code });
        }
        let poll = |error| backend(format!("poll task `{}`", self.id), error);
        if polled
            .agent_asked
            .is_some_and(|asked| asked.elapsed() < AGENT_POLL_INTERVAL)
        {
            self.guest.check_running("poll").map_err(poll)?;
            return Ok(ContainerStatus::Running);
        }
        polled.agent_asked = Some(Instant::now());
        let status = self.guest.exec_status(self.pid).await.map_err(poll)?;
        if status.exited {
            // The wrapper writes `exit` before it ends; read again, then fall back to how the
            // wrapper itself ended (killed before it could write).
            let code = read_exit(&self.dir).unwrap_or_else(|| status.shell_code());
            polled.exit = Some(code);
            return Ok(ContainerStatus::Exited { code });
        }
        Ok(ContainerStatus::Running)
    }

    async fn stop(&self) -> Result<(), DriverError> {
        if self.status().await?.is_done() {
            return Ok(());
        }
        let kill = format!(
            "kill -KILL {pid} 2>/dev/null; kill -KILL -- -{pid} 2>/dev/null; true",
            pid = self.pid
        );
        let script = match &self.podman_name {
            Some(name) => format!(
                "/usr/bin/podman --network-backend=cni rm --force --time=0 {name} >/dev/null 2>&1; {kill}"
            ),
            None => kill,
        };
        self.guest
            .sh(&script, AGENT_TIMEOUT)
            .await
            .map_err(|error| backend(format!("stop task `{}`", self.id), error))?;
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut interval = Duration::from_millis(1);
        while !self.status().await?.is_done() {
            if Instant::now() > deadline {
                return Err(DriverError::Timeout {
                    task: self.id.clone(),
                    after: Duration::from_secs(30),
                });
            }
            tokio::time::sleep(interval).await;
            interval = (interval * 2).min(Duration::from_millis(20));
        }
        Ok(())
    }
}

#[derive(Debug)]
struct VzContainer {
    handle: Arc<TaskHandle>,
}

#[async_trait]
impl Container for VzContainer {
    fn id(&self) -> &str {
        &self.handle.id
    }

    async fn status(&self) -> Result<ContainerStatus, DriverError> {
        self.handle.status().await
    }

    async fn logs(&self, stdout: LogSink<'_>, stderr: LogSink<'_>) -> Result<(), DriverError> {
        output::logs(&self.handle.dir, stdout, stderr).await
    }

    async fn cleanup(&self) -> Result<(), DriverError> {
        self.handle.stop().await?;
        match std::fs::remove_dir_all(&self.handle.dir) {
            Ok(()) => Ok(()),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(backend(
                format!("remove task `{}`", self.handle.id),
                VzError::Remove {
                    path: self.handle.dir.clone(),
                    source,
                },
            )),
        }
    }

    fn as_follow(&self) -> Option<&dyn FollowLogs> {
        Some(self)
    }
}

#[async_trait]
impl FollowLogs for VzContainer {
    async fn follow(&self, stdout: LogSink<'_>, stderr: LogSink<'_>) -> Result<(), DriverError> {
        let handle = &self.handle;
        output::follow(&handle.dir, stdout, stderr, || async {
            Ok(handle.status().await?.is_done())
        })
        .await
    }
}

#[derive(Debug)]
struct VzVolume {
    name: String,
    path: PathBuf,
}

#[async_trait]
impl Volume for VzVolume {
    fn name(&self) -> &str {
        &self.name
    }

    async fn cleanup(&self) -> Result<(), DriverError> {
        match std::fs::remove_dir_all(&self.path) {
            Ok(()) => Ok(()),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(backend(
                format!("remove volume `{}`", self.name),
                VzError::Remove {
                    path: self.path.clone(),
                    source,
                },
            )),
        }
    }
}

#[async_trait]
impl SandboxExec for VzDriver {
    async fn start_sandbox(&self, task: Task) -> Result<Box<dyn Sandbox>, DriverError> {
        let mut probe = Task::new(task.id.clone(), ["true"]);
        probe.mounts = task.mounts.clone();
        guest::check_task(&probe)?;
        let guest = self
            .guest()
            .await
            .map_err(|error| backend("start the VM", error))?;
        for mount in &task.mounts {
            self.ensure_volume(&mount.volume)?;
        }
        let serial = self.sandboxes.fetch_add(1, Ordering::Relaxed);
        let container = if task.image.is_empty() {
            None
        } else {
            let name = ci_exec_driver::resource_name(
                &self.config.namespace,
                &format!("{}-sandbox{serial}", task.id),
            );
            // The container idles until `exec`s arrive; output goes to the exec'd commands.
            let mut keeper =
                Task::new(format!("{}-sandbox{serial}-start", task.id), ["2147483647"]);
            keeper.image = task.image.clone();
            keeper.mounts = task.mounts.clone();
            keeper.user = task.user.clone();
            keeper.workdir = task.workdir.clone();
            keeper.privileged = task.privileged;
            keeper.limits = task.limits;
            keeper.network = task.network;
            let runner = Runner::PodmanStart {
                image: &task.image,
                name: &name,
            };
            let (dir, pid) = start_task(&self.run(), &guest, &keeper, &task.env, runner).await?;
            let handle = TaskHandle {
                id: keeper.id.clone(),
                dir: dir.clone(),
                guest: guest.clone(),
                pid,
                podman_name: None,
                polled: Mutex::new(Polled::default()),
            };
            let code = wait(&handle).await?;
            if code != 0 {
                let stderr = std::fs::read_to_string(dir.join("stderr")).unwrap_or_default();
                return Err(backend(
                    format!("start sandbox container `{name}` of image `{}`", task.image),
                    VzError::GuestCommand {
                        command: "podman run --detach".to_owned(),
                        code,
                        stderr: stderr.trim().to_owned(),
                    },
                ));
            }
            let _ = std::fs::remove_dir_all(&dir);
            Some(name)
        };
        Ok(Box::new(VzSandbox {
            run: self.run(),
            guest,
            task,
            container,
            serial,
            execs: AtomicU64::new(0),
        }))
    }
}

async fn wait(handle: &TaskHandle) -> Result<i32, DriverError> {
    let mut interval = Duration::from_millis(1);
    loop {
        if let ContainerStatus::Exited { code } = handle.status().await? {
            return Ok(code);
        }
        tokio::time::sleep(interval).await;
        interval = (interval * 2).min(Duration::from_millis(25));
    }
}

/// The VM itself (no image) or a long-lived podman container in it.
#[derive(Debug)]
struct VzSandbox {
    run: RunDir,
    guest: Arc<Guest>,
    task: Task,
    container: Option<String>,
    serial: u64,
    execs: AtomicU64,
}

#[async_trait]
impl Sandbox for VzSandbox {
    async fn exec(
        &self,
        command: &[String],
        env: &BTreeMap<String, String>,
        stdout: LogSink<'_>,
        stderr: LogSink<'_>,
    ) -> Result<SandboxOutput, DriverError> {
        let number = self.execs.fetch_add(1, Ordering::Relaxed);
        let mut step = Task::new(
            format!("{}-sandbox{}-exec{number}", self.task.id, self.serial),
            command.iter().cloned(),
        );
        guest::check_task(&step)?;
        step.mounts = self.task.mounts.clone();
        step.user = self.task.user.clone();
        step.workdir = self.task.workdir.clone();
        step.network = self.task.network;
        let mut all_env = self.task.env.clone();
        all_env.extend(
            env.iter()
                .map(|(name, value)| (name.clone(), value.clone())),
        );
        let (runner, exec_env) = match &self.container {
            None => (Runner::GuestOs, all_env),
            Some(name) => (Runner::PodmanExec { name }, env.clone()),
        };
        let (dir, pid) = start_task(&self.run, &self.guest, &step, &exec_env, runner).await?;
        let handle = TaskHandle {
            id: step.id.clone(),
            dir: dir.clone(),
            guest: self.guest.clone(),
            pid,
            podman_name: None,
            polled: Mutex::new(Polled::default()),
        };
        output::follow(&dir, &mut *stdout, &mut *stderr, || async {
            Ok(handle.status().await?.is_done())
        })
        .await?;
        let code = wait(&handle).await?;
        let _ = stdout.flush().await;
        let _ = stderr.flush().await;
        let _ = std::fs::remove_dir_all(&dir);
        Ok(SandboxOutput { exit_code: code })
    }

    async fn cleanup(&self) -> Result<(), DriverError> {
        if let Some(name) = &self.container
            && self.guest.check_running("cleanup").is_ok()
        {
            self.guest
                .sh(
                    &format!(
                        "/usr/bin/podman --network-backend=cni rm --force --time=0 {name} >/dev/null 2>&1; true"
                    ),
                    AGENT_TIMEOUT,
                )
                .await
                .map_err(|error| backend(format!("remove sandbox `{name}`"), error))?;
        }
        Ok(())
    }
}
