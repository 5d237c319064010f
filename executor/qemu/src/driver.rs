//! [`QemuDriver`]: the driver contract over one lazily booted VM.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use ci_exec_driver::{
    Container, ContainerStatus, Driver, DriverError, FollowLogs, JobSupport, LogSink, MkSource,
    RepositoryState, Sandbox, SandboxExec, SandboxOutput, Stdin, Task, Volume, VolumeFiles,
};
use ci_exec_guest_image::Arch;
use tokio::io::AsyncWriteExt;
use tokio::sync::Mutex;

use crate::accel::{self, AccelVerdict};
use crate::guest::{self, Runner, StdinSource};
use crate::machine::{AGENT_TIMEOUT, Machine, MachineSpec, RamFile};
use crate::run_dir::RunDir;
use crate::{ProtocolError, QemuConfig, QemuError, image, output, repository, warm};

const DRIVER: &str = "qemu";
/// The test image of jobs whose mkfile names none: our guest images preload it.
pub const DEFAULT_TEST_IMAGE: &str = "localhost/ci-exec/base:latest";

fn backend(action: impl Into<String>, error: QemuError) -> DriverError {
    DriverError::backend(DRIVER, action, error)
}

/// The qemu driver: one VM per instance, booted on first use.
#[derive(Debug)]
pub struct QemuDriver {
    config: QemuConfig,
    run: RunDir,
    /// Held from the first boot until `close`: tells later runs this namespace is alive.
    owner: std::sync::Mutex<Option<ci_exec_driver::leftovers::OwnerLock>>,
    machine: Mutex<Option<Arc<Machine>>>,
    containers: Mutex<HashMap<String, Arc<TaskHandle>>>,
    sandboxes: AtomicU64,
    /// The repository state the job asked for, before the VM boots.
    repository: std::sync::Mutex<Option<repository::Request>>,
    /// Once booted with one: (repository, image digest, whether its disk started empty), and
    /// whether the job asked to keep it.
    attached: std::sync::Mutex<Option<(String, String, bool)>>,
    keep: std::sync::atomic::AtomicBool,
}

impl QemuDriver {
    /// A driver for `config`. Cheap: nothing starts until the first task.
    pub fn new(config: QemuConfig) -> Self {
        let run = RunDir::new(config.run_dir());
        QemuDriver {
            config,
            run,
            owner: std::sync::Mutex::new(None),
            machine: Mutex::new(None),
            containers: Mutex::new(HashMap::new()),
            sandboxes: AtomicU64::new(0),
            repository: std::sync::Mutex::new(None),
            attached: std::sync::Mutex::new(None),
            keep: std::sync::atomic::AtomicBool::new(false),
        }
    }

    pub fn config(&self) -> &QemuConfig {
        &self.config
    }

    /// The accelerator for a guest of `arch`: another architecture than the host's is always
    /// emulated (TCG); asking for hardware acceleration of it is an error.
    pub async fn accel_for(&self, arch: Arch) -> Result<AccelVerdict, QemuError> {
        if arch != Arch::host() {
            if let crate::accel::AccelChoice::Fixed(accel) = self.config.accel
                && accel != crate::accel::Accel::Tcg
            {
                return Err(QemuError::InvalidParameter {
                    parameter: "accel".to_owned(),
                    reason: format!(
                        "`{accel}` cannot run an {arch} guest on this {} host: use `accel=tcg` \
                         (or leave `accel` out), or an image for {}",
                        Arch::host(),
                        Arch::host()
                    ),
                });
            }
            return Ok(AccelVerdict {
                accel: crate::accel::Accel::Tcg,
                reason: format!(
                    "an {arch} guest on an {} host is emulated (TCG)",
                    Arch::host()
                ),
            });
        }
        Ok(accel::choose(
            self.config.accel,
            &self.config.qemu_binary_for(arch),
            &self.config.cache_dir,
        )
        .await)
    }

    /// Boots the VM if it is not running yet (warm when a saved state exists) and returns it.
    pub async fn machine(&self) -> Result<Arc<Machine>, QemuError> {
        let mut slot = self.machine.lock().await;
        if let Some(machine) = slot.as_ref() {
            machine.check_alive("run")?;
            return Ok(machine.clone());
        }
        let mut image = image::resolve(&self.config.image)?;
        let verdict = self.accel_for(image.arch).await?;
        image.kernel_cmdline =
            crate::machine::fast_kernel_cmdline(&image.kernel_cmdline, image.arch);
        if verdict.accel == crate::accel::Accel::Tcg && image.arch == Arch::X86_64 {
            image.kernel_cmdline = crate::machine::tcg_kernel_cmdline(
                &image.kernel_cmdline,
                crate::machine::host_tsc_khz(),
            );
        }
        tracing::debug!(accel = %verdict.accel, reason = %verdict.reason, "accelerator");
        // What killed runs left in generated namespaces goes now: nobody will close those.
        crate::run_dir::sweep_abandoned(&self.config.run_root);
        self.run.create(&self.config.namespace)?;
        {
            let mut owner = self.owner.lock().unwrap_or_else(PoisonError::into_inner);
            if owner.is_none() {
                *owner = Some(self.run.lock_owner(&self.config.namespace)?);
            }
        }
        let request = self
            .repository
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let fresh = repository::prepare_disk(
            &self.config.cache_dir,
            &image.digest,
            request.as_ref(),
            &self.run.state_disk(),
        )
        .await?;
        if let Some(request) = &request {
            *self.attached.lock().unwrap_or_else(PoisonError::into_inner) =
                Some((request.key.clone(), image.digest.clone(), fresh));
        }
        let spec = MachineSpec {
            qemu_binary: self.config.qemu_binary_for(image.arch),
            accel: verdict.accel,
            memory_mb: self.config.memory_mb,
            cpus: self.config.cpus,
            backing: image.disk.clone(),
            image,
            run_dir: self.run.clone(),
            overlay: self.run.overlay(),
            incoming: None,
            ram_file: None,
            incoming_control_version: 0,
            network: self.config.network,
            state_disk: self.run.state_disk(),
            repository_state: request.is_some().then_some(fresh),
        };
        let started = std::time::Instant::now();
        let machine = if self.config.warm {
            self.start_warm(&spec).await?
        } else {
            Machine::start(&spec, self.config.boot_timeout).await?
        };
        let agent_ready = started.elapsed();
        machine.prepare_guest().await?;
        tracing::debug!(
            ?agent_ready,
            share_mounted = ?started.elapsed(),
            warm = self.config.warm,
            "VM ready"
        );
        let machine = Arc::new(machine);
        *slot = Some(machine.clone());
        Ok(machine)
    }

    async fn start_warm(&self, spec: &MachineSpec) -> Result<Machine, QemuError> {
        let state = warm::state_dir(&self.config.cache_dir, spec);
        // Drivers of one process that start at once wait for the first to save the state
        // instead of each booting cold to save their own.
        static CREATING: Mutex<()> = Mutex::const_new(());
        // A state that could not be saved is not tried again by this process.
        static FAILED: std::sync::Mutex<Vec<PathBuf>> = std::sync::Mutex::new(Vec::new());
        let creating = CREATING.lock().await;
        let failed_before = FAILED
            .lock()
            .map(|failed| failed.contains(&state))
            .unwrap_or(false);
        if failed_before {
            drop(creating);
            return Machine::start(spec, self.config.boot_timeout).await;
        }
        if !warm::is_ready(&state) {
            let scratch = RunDir::new(self.run.path().join("warmup"));
            if let Err(error) = warm::create(spec, &scratch, &state, self.config.boot_timeout).await
            {
                tracing::warn!(%error, "cannot save a warm VM state; booting cold");
                if let Ok(mut failed) = FAILED.lock() {
                    failed.push(state.clone());
                }
                drop(creating);
                return Machine::start(spec, self.config.boot_timeout).await;
            }
        }
        drop(creating);
        let warm_spec = MachineSpec {
            backing: state.join("disk.qcow2"),
            incoming: Some(state.join("state")),
            ram_file: Some(RamFile {
                path: state.join("ram"),
                shared: false,
            }),
            incoming_control_version: warm::control_version(&state),
            ..spec.clone()
        };
        match Machine::start(&warm_spec, self.config.boot_timeout).await {
            Ok(machine) => Ok(machine),
            Err(error) => {
                tracing::warn!(%error, state = %state.display(), "warm start failed; discarding the saved state and booting cold");
                let _ = std::fs::remove_dir_all(&state);
                Machine::start(spec, self.config.boot_timeout).await
            }
        }
    }

    /// Removes the leftovers of namespace `namespace` under `run_root` (a killed run's qemu,
    /// sockets, overlay, volumes), without a driver instance.
    pub fn remove_leftovers(run_root: &Path, namespace: &str) -> Result<(), QemuError> {
        match crate::run_dir::leftovers(run_root, namespace) {
            Some(run) => run.remove_leftovers(),
            None => Ok(()),
        }
    }

    fn volume_path(&self, name: &str) -> Result<PathBuf, DriverError> {
        guest::check_name(name).map_err(|reason| DriverError::InvalidVolume {
            volume: name.to_owned(),
            reason,
        })?;
        Ok(self.run.volume(name))
    }

    fn ensure_volume(&self, name: &str) -> Result<PathBuf, DriverError> {
        let path = self.volume_path(name)?;
        std::fs::create_dir_all(&path).map_err(|source| {
            backend(
                format!("create volume `{name}`"),
                QemuError::CreateDir {
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

    /// Writes the task's files and starts its wrapper; returns the wrapper's guest pid.
    async fn start_task(
        &self,
        machine: &Machine,
        task: &Task,
        env: &BTreeMap<String, String>,
        runner: Runner<'_>,
    ) -> Result<(PathBuf, i64), DriverError> {
        for mount in &task.mounts {
            self.ensure_volume(&mount.volume)?;
        }
        let stdin = match &task.stdin {
            None => HostStdin::None,
            // Streamed as it arrives when the guest has the helper that follows a growing
            // file; else spooled whole first (an image older than the control port).
            Some(stdin @ Stdin::Stream(_)) if machine.serves_control() => {
                match stdin.take_reader() {
                    Some(reader) => HostStdin::Stream(reader),
                    None => HostStdin::Whole(Vec::new()),
                }
            }
            Some(stdin) => {
                let mut bytes = Vec::new();
                if let Some(mut reader) = stdin.take_reader() {
                    tokio::io::copy(&mut reader, &mut bytes)
                        .await
                        .map_err(|source| {
                            DriverError::backend(
                                DRIVER,
                                format!("read stdin of task `{}`", task.id),
                                source,
                            )
                        })?;
                }
                HostStdin::Whole(bytes)
            }
        };
        start_wrapper(&self.run, machine, task, env, runner, stdin).await
    }
}

/// A task's stdin on the host side.
enum HostStdin {
    None,
    Whole(Vec<u8>),
    Stream(Box<dyn tokio::io::AsyncRead + Send + Unpin>),
}

/// Appends what `reader` gives to `path` as it comes, then makes `end`: the guest's
/// `--follow` helper copies the file to the task until `end` exists.
async fn stream_stdin(
    mut reader: Box<dyn tokio::io::AsyncRead + Send + Unpin>,
    path: PathBuf,
    end: PathBuf,
) {
    use tokio::io::AsyncReadExt;
    let copied = async {
        let mut file = tokio::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .await?;
        let mut buffer = vec![0u8; 64 * 1024];
        loop {
            let read = reader.read(&mut buffer).await?;
            if read == 0 {
                return Ok::<(), std::io::Error>(());
            }
            file.write_all(&buffer[..read]).await?;
            file.flush().await?;
        }
    }
    .await;
    if let Err(error) = copied {
        // The task sees its input end here; the task itself reports what that means.
        tracing::warn!(%error, path = %path.display(), "streaming stdin to the guest");
    }
    if let Err(error) = tokio::fs::write(&end, b"").await {
        tracing::warn!(%error, path = %end.display(), "ending the guest's stdin");
    }
}

/// Writes a task's files into its directory on the share and starts its wrapper as a session
/// leader (so stopping it kills its whole process group); returns the directory and the
/// wrapper's guest pid.
async fn start_wrapper(
    run: &RunDir,
    machine: &Machine,
    task: &Task,
    env: &BTreeMap<String, String>,
    runner: Runner<'_>,
    stdin: HostStdin,
) -> Result<(PathBuf, i64), DriverError> {
    let dir = run.task(&task.id);
    let prepare = |error: QemuError| backend(format!("prepare task `{}`", task.id), error);
    std::fs::create_dir_all(&dir).map_err(|source| {
        prepare(QemuError::CreateDir {
            path: dir.clone(),
            source,
        })
    })?;
    for stale in ["exit", "pid", "stdin.end"] {
        let _ = std::fs::remove_file(dir.join(stale));
    }
    let source = match &stdin {
        HostStdin::None => StdinSource::None,
        HostStdin::Whole(_) => StdinSource::File,
        HostStdin::Stream(_) => StdinSource::Follow,
    };
    // The guest's own static wrapper when its init has one, else a shell script that does the
    // same with `setsid`, `sh` and `env` (each exec costs tens of milliseconds under TCG).
    let guest_dir = guest::guest_task_dir(&task.id);
    let (wrapper, program, arguments) = if machine.runs_task_helper() {
        (
            ("task", guest::task_spec(task, env, runner, source)),
            guest::TASK_HELPER,
            vec!["--task".to_owned(), guest_dir],
        )
    } else {
        let script = guest::task_script(task, env, runner, source);
        (
            ("run.sh", script.into_bytes()),
            "/usr/bin/setsid",
            vec![
                "-w".to_owned(),
                "/bin/sh".to_owned(),
                format!("{guest_dir}/run.sh"),
            ],
        )
    };
    let mut files = vec![("stdout", Vec::new()), ("stderr", Vec::new()), wrapper];
    if let Runner::Crun {
        name,
        template,
        premounted,
        ..
    } = runner
    {
        // The bundle is the task's directory on the share.
        let volumes: Vec<(String, String)> = task
            .mounts
            .iter()
            .map(|mount| (guest::guest_volume_dir(&mount.volume), mount.path.clone()))
            .collect();
        let config = template.config(
            task,
            env,
            &volumes,
            &crate::oci::Template::root(name, premounted),
        );
        files.push(("config.json", config.to_string().into_bytes()));
    }
    let mut stream = None;
    match stdin {
        HostStdin::None => {}
        HostStdin::Whole(bytes) => files.push(("stdin", bytes)),
        HostStdin::Stream(reader) => {
            files.push(("stdin", Vec::new()));
            stream = Some(reader);
        }
    }
    for (name, contents) in files {
        let path = dir.join(name);
        std::fs::write(&path, contents)
            .map_err(|source| prepare(QemuError::WriteFile { path, source }))?;
    }
    let pid = machine
        .exec(program, &arguments, &guest::wrapper_env(), false)
        .await
        .map_err(|error| backend(format!("start task `{}`", task.id), error))?;
    if let Some(reader) = stream {
        tokio::spawn(stream_stdin(
            reader,
            dir.join("stdin"),
            dir.join("stdin.end"),
        ));
    }
    Ok((dir, pid))
}

#[async_trait]
impl Driver for QemuDriver {
    fn name(&self) -> &'static str {
        DRIVER
    }

    fn namespace(&self) -> &str {
        &self.config.namespace
    }

    /// The guest image's digest (kernel, initramfs, root disk and the preloaded test image):
    /// the same `image=` rebuilt from other packages gives another digest.
    async fn environment_digest(&self) -> Result<String, DriverError> {
        let image = image::resolve(&self.config.image)
            .map_err(|error| backend("find its guest image", error))?;
        Ok(image.digest)
    }

    fn job_support(&self) -> JobSupport {
        JobSupport {
            mk: MkSource::BaseOs,
            // A publisher's cloud image (`ubuntu-24.04`, `alpine-3.22`) boots as published,
            // without podman: its `mk test` runs in the guest OS, as its `prepare-runtime`
            // does. The images built here preload the default test image into podman.
            test_in_container: image::resolve(&self.config.image)
                .map_or(true, |image| !image.container_images.is_empty()),
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
        Ok(Box::new(QemuVolume {
            name: name.to_owned(),
            path,
        }))
    }

    async fn run_container(&self, task: Task) -> Result<Box<dyn Container>, DriverError> {
        guest::check_task(&task)?;
        let mut containers = self.containers.lock().await;
        if let Some(existing) = containers.get(&task.id) {
            return Ok(Box::new(QemuContainer {
                handle: existing.clone(),
            }));
        }
        let machine = self
            .machine()
            .await
            .map_err(|error| backend("boot the VM", error))?;
        if task.network == Some(true) && !machine.has_network() {
            return Err(DriverError::InvalidTask {
                task: task.id.clone(),
                reason: "it asks for the network, and this VM has none (`qemu:network=false`)"
                    .to_owned(),
            });
        }
        let name = ci_exec_driver::resource_name(&self.config.namespace, &task.id);
        let runner = match machine.oci() {
            _ if task.image.is_empty() => Runner::GuestOs,
            Some(template) if template.fits(&task) => Runner::Crun {
                image: &task.image,
                name: &name,
                template,
                premounted: machine.take_premounted_root(),
            },
            _ => Runner::PodmanRun {
                image: &task.image,
                name: &name,
            },
        };
        let (dir, pid) = self.start_task(&machine, &task, &task.env, runner).await?;
        let handle = Arc::new(TaskHandle {
            id: task.id.clone(),
            dir,
            machine,
            pid,
            podman_name: (!task.image.is_empty()).then_some(name),
            exit: Mutex::new(Polled::default()),
        });
        containers.insert(task.id.clone(), handle.clone());
        Ok(Box::new(QemuContainer { handle }))
    }

    async fn close(&self) -> Result<(), DriverError> {
        self.containers.lock().await.clear();
        if let Some(machine) = self.machine.lock().await.take() {
            machine.shutdown().await;
        }
        let attached = self
            .attached
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some((key, digest, fresh)) = attached
            && self.keep.swap(false, Ordering::Relaxed)
        {
            match repository::save(
                &self.config.cache_dir,
                &digest,
                &key,
                &self.run.state_disk(),
                fresh,
            )
            .await
            {
                Ok(saved) => tracing::debug!(saved = %saved.display(), "repository state kept"),
                Err(error) => tracing::warn!("cannot keep the repository's warm state: {error}"),
            }
        }
        let removed = self
            .run
            .remove_leftovers()
            .map_err(|error| backend("remove the namespace's run directory", error));
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

    fn as_repository_state(&self) -> Option<&dyn RepositoryState> {
        Some(self)
    }
}

#[async_trait]
impl RepositoryState for QemuDriver {
    fn use_state(&self, key: &str, fresh: bool) -> Result<(), DriverError> {
        let booted = self
            .machine
            .try_lock()
            .map_or(true, |machine| machine.is_some());
        if booted {
            return Err(DriverError::InvalidTask {
                task: "repository state".to_owned(),
                reason: "the VM already runs: ask for the state before the first task".to_owned(),
            });
        }
        // Old and excess states go before a new one is made.
        repository::prune(
            &self.config.cache_dir,
            repository::MAX_AGE,
            repository::MAX_BYTES,
            false,
        );
        *self
            .repository
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(repository::Request {
            key: key.to_owned(),
            fresh,
        });
        Ok(())
    }

    async fn keep_state(&self) -> Result<(), DriverError> {
        let machine = self.machine.lock().await.clone();
        let fresh = self
            .attached
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
            .map(|(_, _, fresh)| *fresh);
        let (Some(machine), Some(fresh)) = (machine, fresh) else {
            return Ok(());
        };
        if fresh {
            // Most fresh runs build no image: the init answers that without a guest shell.
            let (images, mark) = repository::FRESH_CHANGE;
            match machine.newer(images, mark).await {
                Ok(Some(false)) => return Ok(()),
                Ok(_) => {}
                Err(error) => tracing::debug!(%error, "asking whether podman's images changed"),
            }
        }
        // Copying podman's storage takes a while under TCG: give it the boot's patience.
        let status = machine
            .sh_ok(
                &repository::keep_script(fresh),
                self.config.boot_timeout.max(AGENT_TIMEOUT),
            )
            .await
            .map_err(|error| backend("put the repository state away", error))?;
        if String::from_utf8_lossy(&status.stdout).contains("kept") {
            self.keep.store(true, Ordering::Relaxed);
        }
        Ok(())
    }
}

#[async_trait]
impl VolumeFiles for QemuDriver {
    async fn read_file(&self, volume: &str, path: &str) -> Result<Vec<u8>, DriverError> {
        let root = self.volume_path(volume)?;
        let relative = Path::new(path);
        if relative
            .components()
            .any(|part| !matches!(part, std::path::Component::Normal(_)))
        {
            return Err(DriverError::InvalidVolume {
                volume: volume.to_owned(),
                reason: format!("path `{path}` must stay inside the volume"),
            });
        }
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
                QemuError::ReadFile { path: file, source },
            )),
        }
    }
}

/// A started task's state, shared by every handle to it.
#[derive(Debug)]
struct TaskHandle {
    id: String,
    dir: PathBuf,
    machine: Arc<Machine>,
    /// The wrapper's guest pid.
    pid: i64,
    podman_name: Option<String>,
    exit: Mutex<Polled>,
}

/// What polling a task has learnt.
#[derive(Debug, Default)]
struct Polled {
    exit: Option<i32>,
    /// When the guest agent was last asked about the wrapper.
    agent_asked: Option<std::time::Instant>,
    /// Since when the agent has not answered a status question in time (none: it answers).
    agent_silent_since: Option<std::time::Instant>,
}

/// How often `status` may ask the guest agent whether a wrapper died without writing its
/// exit code. Each question wakes the agent in the guest, which under TCG costs the task CPU;
/// the exit file on the share answers the common case for free.
const AGENT_POLL_INTERVAL: Duration = Duration::from_millis(250);

/// How long the guest agent may go without answering status questions before the task is
/// reported as failed. One unanswered question is not a dead task: under TCG, with other VMs
/// on the same cores, a guest can stall past one question's timeout and recover; the exit file
/// on the share still tells when the task ends.
const AGENT_SILENCE_LIMIT: Duration = Duration::from_secs(300);

impl TaskHandle {
    async fn status(&self) -> Result<ContainerStatus, DriverError> {
        let mut polled = self.exit.lock().await;
        if let Some(code) = polled.exit {
            return Ok(ContainerStatus::Exited { code });
        }
        if let Some(code) = read_exit(&self.dir) {
            polled.exit = Some(code);
            return Ok(ContainerStatus::Exited { code });
        }
        if polled
            .agent_asked
            .is_some_and(|asked| asked.elapsed() < AGENT_POLL_INTERVAL)
        {
            // Between questions, a dead VM still shows at once.
            self.machine
                .check_alive("poll")
                .map_err(|error| backend(format!("poll task `{}`", self.id), error))?;
            return Ok(ContainerStatus::Running);
        }
        polled.agent_asked = Some(std::time::Instant::now());
        let status = match self.machine.exec_status(self.pid).await {
            Ok(status) => {
                polled.agent_silent_since = None;
                status
            }
            Err(QemuError::Agent {
                source: ProtocolError::Timeout { .. },
                ..
            }) if polled
                .agent_silent_since
                .get_or_insert_with(std::time::Instant::now)
                .elapsed()
                < AGENT_SILENCE_LIMIT =>
            {
                tracing::debug!(task = %self.id, "guest agent slow to answer; polling on");
                return Ok(ContainerStatus::Running);
            }
            Err(error) => return Err(backend(format!("poll task `{}`", self.id), error)),
        };
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
        // The wrapper is the leader of its own session and process group (`setsid`), with the
        // pid the agent gave us. Kill it first (it may not have called setsid yet), then its
        // group (the command it started).
        let kill = format!(
            "kill -KILL {pid} 2>/dev/null; kill -KILL -- -{pid} 2>/dev/null; true",
            pid = self.pid
        );
        let script = match &self.podman_name {
            Some(name) => format!(
                "{}; /usr/bin/podman --network-backend=cni rm --force --time=0 {name} >/dev/null 2>&1; {kill}",
                crate::oci::kill_script(name)
            ),
            None => kill,
        };
        self.machine
            .sh(&script, AGENT_TIMEOUT)
            .await
            .map_err(|error| backend(format!("stop task `{}`", self.id), error))?;
        // The agent reaps the killed wrapper a moment later: a stopped task must read as done.
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let mut interval = Duration::from_millis(1);
        while !self.status().await?.is_done() {
            if std::time::Instant::now() > deadline {
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

fn read_exit(dir: &Path) -> Option<i32> {
    std::fs::read_to_string(dir.join("exit"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

#[derive(Debug)]
struct QemuContainer {
    handle: Arc<TaskHandle>,
}

#[async_trait]
impl Container for QemuContainer {
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
                QemuError::Remove {
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
impl FollowLogs for QemuContainer {
    async fn follow(&self, stdout: LogSink<'_>, stderr: LogSink<'_>) -> Result<(), DriverError> {
        let handle = &self.handle;
        output::follow(&handle.dir, stdout, stderr, || async {
            Ok(handle.status().await?.is_done())
        })
        .await
    }
}

#[derive(Debug)]
struct QemuVolume {
    name: String,
    path: PathBuf,
}

#[async_trait]
impl Volume for QemuVolume {
    fn name(&self) -> &str {
        &self.name
    }

    async fn cleanup(&self) -> Result<(), DriverError> {
        match std::fs::remove_dir_all(&self.path) {
            Ok(()) => Ok(()),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(backend(
                format!("remove volume `{}`", self.name),
                QemuError::Remove {
                    path: self.path.clone(),
                    source,
                },
            )),
        }
    }
}

#[async_trait]
impl SandboxExec for QemuDriver {
    async fn start_sandbox(&self, task: Task) -> Result<Box<dyn Sandbox>, DriverError> {
        let mut probe = Task::new(task.id.clone(), ["true"]);
        probe.mounts = task.mounts.clone();
        guest::check_task(&probe)?;
        let machine = self
            .machine()
            .await
            .map_err(|error| backend("boot the VM", error))?;
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
            for mount in &task.mounts {
                self.ensure_volume(&mount.volume)?;
            }
            let (dir, pid) = start_wrapper(
                &self.run,
                &machine,
                &keeper,
                &task.env,
                Runner::PodmanStart {
                    image: &task.image,
                    name: &name,
                },
                HostStdin::None,
            )
            .await?;
            let handle = TaskHandle {
                id: keeper.id.clone(),
                dir: dir.clone(),
                machine: machine.clone(),
                pid,
                podman_name: None,
                exit: Mutex::new(Polled::default()),
            };
            let code = wait(&handle).await?;
            if code != 0 {
                let stderr = std::fs::read_to_string(dir.join("stderr")).unwrap_or_default();
                return Err(DriverError::backend(
                    DRIVER,
                    format!("start sandbox container `{name}` of image `{}`", task.image),
                    QemuError::GuestCommand {
                        command: "podman run --detach".to_owned(),
                        code,
                        stderr: stderr.trim().to_owned(),
                    },
                ));
            }
            let _ = std::fs::remove_dir_all(&dir);
            Some(name)
        };
        Ok(Box::new(QemuSandbox {
            driver_run: self.run.clone(),
            machine,
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
struct QemuSandbox {
    driver_run: RunDir,
    machine: Arc<Machine>,
    task: Task,
    container: Option<String>,
    serial: u64,
    execs: AtomicU64,
}

#[async_trait]
impl Sandbox for QemuSandbox {
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
        let mut all_env = self.task.env.clone();
        all_env.extend(
            env.iter()
                .map(|(name, value)| (name.clone(), value.clone())),
        );
        let (runner, exec_env) = match &self.container {
            None => (Runner::GuestOs, all_env),
            Some(name) => (Runner::PodmanExec { name }, env.clone()),
        };
        let (dir, pid) = start_wrapper(
            &self.driver_run,
            &self.machine,
            &step,
            &exec_env,
            runner,
            HostStdin::None,
        )
        .await?;
        let handle = TaskHandle {
            id: step.id.clone(),
            dir: dir.clone(),
            machine: self.machine.clone(),
            pid,
            podman_name: None,
            exit: Mutex::new(Polled::default()),
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
            && self.machine.is_running()
        {
            self.machine
                .sh(
                    &format!("/usr/bin/podman --network-backend=cni rm --force --time=0 {name} >/dev/null 2>&1; true"),
                    AGENT_TIMEOUT,
                )
                .await
                .map_err(|error| backend(format!("remove sandbox `{name}`"), error))?;
        }
        Ok(())
    }
}
