//! One QEMU process: its command line, its start (cold, or warm from a saved state), the QMP
//! and QGA sessions to it, and its end.
//!
//! QEMU is started by a dedicated thread that stays blocked in `wait()` for as long as the VM
//! lives, with `PR_SET_PDEATHSIG`: the signal fires when the *thread* that forked dies, so a
//! tokio worker that might retire must not be the parent. QEMU gets its own process group, so
//! a Ctrl-C reaches ci-exec (which stops tasks and the VM in order), not QEMU directly.

use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use ci_exec_guest_image::Arch;
use serde_json::{Value, json};
use tokio::sync::{Mutex, watch};

use crate::QemuError;
use crate::accel::Accel;
use crate::control::{self, ControlClient};
use crate::error::ProtocolError;
use crate::qga::{ExecStatus, QgaClient};
use crate::qmp::QmpClient;
use crate::run_dir::{GUEST_SHARE, RunDir, SHARE_TAG};

/// 9p message size: throughput grows with it (≈40× from 8 KiB to 512 KiB, DESIGN.md §3).
pub const MSIZE: u32 = 512 * 1024;
/// How long one guest-agent command may take before the client re-syncs.
pub const AGENT_TIMEOUT: Duration = Duration::from_secs(30);
const MONITOR_TIMEOUT: Duration = Duration::from_secs(30);
/// `PATH` for commands the driver itself runs in the guest.
pub const GUEST_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The files of a guest image the VM boots from.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
pub struct ImageFiles {
    pub name: String,
    pub digest: String,
    pub vmlinux: PathBuf,
    pub initrd: PathBuf,
    /// qcow2 base; never written.
    pub disk: PathBuf,
    pub kernel_cmdline: String,
    /// Container images preloaded in the guest's podman storage.
    #[serde(default)]
    pub container_images: Vec<String>,
    /// The guest's architecture (manifests from before aarch64 images are x86_64).
    #[serde(default = "x86_64")]
    pub arch: Arch,
    /// Resolved by catalog name (the cache's current build) rather than pinned by path: only
    /// then does saving its warm state remove the states of the name's other builds.
    #[serde(skip)]
    pub current: bool,
}

fn x86_64() -> Arch {
    Arch::X86_64
}

/// What to start.
#[derive(Debug, Clone)]
pub struct MachineSpec {
    pub qemu_binary: String,
    pub accel: Accel,
    pub memory_mb: u64,
    pub cpus: u64,
    pub image: ImageFiles,
    /// Sockets, console log, pid file and the share live here.
    pub run_dir: RunDir,
    /// The disk this VM writes: a fresh qcow2 overlay over `backing`.
    pub overlay: PathBuf,
    /// The image's base disk, or a warm state's disk.
    pub backing: PathBuf,
    /// A saved state to start from (`-incoming`), instead of booting.
    pub incoming: Option<PathBuf>,
    /// Guest RAM in a file (a warm state's), instead of anonymous memory.
    pub ram_file: Option<RamFile>,
    /// The saved state's guest serves the control port (it greeted before it was saved, so
    /// a restored VM does not greet again).
    pub incoming_control_version: u32,
    /// A virtio NIC on QEMU's user-mode network (NAT to whatever the host reaches, DNS
    /// relayed to the host's resolver); without it the guest has only a loopback.
    pub network: bool,
    /// The second disk (`/dev/vdb`): a repository's warm state, or an empty placeholder
    /// (made here when the file does not exist).
    pub state_disk: PathBuf,
    /// Mount the state disk for podman's storage at prepare (`Some(fresh)`: format it first).
    pub repository_state: Option<bool>,
}

/// Guest RAM backed by a file. The VM that saves a warm state maps it shared, so the file
/// holds the guest's memory when the VM stops, and saves with `x-ignore-shared` (the state
/// then holds only device state: a few hundred KiB instead of every used page, ~166 MB for a
/// booted 2 GB guest). VMs started from it map it private: pages load lazily from the host's
/// page cache as the guest touches them, shared between VMs until written, and the file is
/// never written again (QEMU's "private destination RAM with x-ignore-shared").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RamFile {
    pub path: PathBuf,
    pub shared: bool,
}

impl MachineSpec {
    /// QEMU's arguments (without the program). Devices must stay identical between the VM that
    /// saves a warm state and the VMs that start from it: only paths may differ.
    pub fn arguments(&self) -> Vec<OsString> {
        let run = &self.run_dir;
        let mut arguments: Vec<OsString> = Vec::new();
        let arch = self.image.arch;
        let cpu = match (self.accel, arch) {
            (Accel::Kvm | Accel::Hvf, _) => "host",
            (Accel::Tcg, Arch::X86_64) => "max",
            // QEMU's own advice for TCG: the architected pointer-authentication algorithm
            // (QARMA) costs more to emulate than everything else the CPU does on a return.
            (Accel::Tcg, Arch::Aarch64) => "max,pauth-impdef=on",
        };
        // x86_64: microvm, whose devices sit on virtio-mmio. aarch64: `virt`, with the same
        // devices on PCI, where they are found in slot order (its virtio-mmio slots are probed
        // from the top, which would turn the root disk into `vdb`); `gic-version=max` is the
        // host's GIC under KVM and GICv3 (more than 8 vCPUs) under TCG.
        let (mut machine, bus) = match arch {
            Arch::X86_64 => (
                "microvm,pit=on,pic=off,rtc=on,isa-serial=on".to_owned(),
                "device",
            ),
            Arch::Aarch64 => ("virt,gic-version=max".to_owned(), "pci"),
        };
        let device = |kind: &str| format!("{kind}-{bus}");
        if let Some(ram) = &self.ram_file {
            machine.push_str(",memory-backend=ram");
            arguments.extend(
                [
                    "-object".to_owned(),
                    format!(
                        "memory-backend-file,id=ram,size={}M,mem-path={},share={}",
                        self.memory_mb,
                        // QEMU's option syntax escapes a comma by doubling it.
                        ram.path.display().to_string().replace(',', ",,"),
                        if ram.shared { "on" } else { "off" }
                    ),
                ]
                .map(OsString::from),
            );
        }
        let mut push = |items: &[&str]| arguments.extend(items.iter().map(OsString::from));
        push(&[
            "-name",
            "ci-exec",
            "-accel",
            self.accel.as_str(),
            "-machine",
            &machine,
            "-cpu",
            cpu,
            "-m",
            &self.memory_mb.to_string(),
            "-smp",
            &self.cpus.to_string(),
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
        ]);
        if self.network {
            // User-mode networking needs no privilege and no host setup: the guest is
            // 10.0.2.15 behind QEMU's NAT, its gateway 10.0.2.2, its resolver 10.0.2.3.
            push(&[
                "-netdev",
                "user,id=net,ipv6=off",
                "-device",
                &format!("{},netdev=net", device("virtio-net")),
            ]);
        } else {
            push(&["-nic", "none"]);
        }
        let path = |path: &Path| path.display().to_string();
        push(&["-kernel", &path(&self.image.vmlinux)]);
        push(&["-initrd", &path(&self.image.initrd)]);
        push(&["-append", &self.image.kernel_cmdline]);
        push(&[
            "-chardev",
            &format!("file,id=console,path={}", path(&run.console_log())),
            "-serial",
            "chardev:console",
        ]);
        push(&[
            "-drive",
            &format!(
                "id=root,if=none,format=qcow2,cache=unsafe,discard=unmap,file={}",
                path(&self.overlay)
            ),
            "-device",
            &format!("{},drive=root", device("virtio-blk")),
        ]);
        push(&[
            "-drive",
            &format!(
                "id=state,if=none,format=qcow2,cache=unsafe,discard=unmap,file={}",
                path(&self.state_disk)
            ),
            "-device",
            &format!("{},drive=state", device("virtio-blk")),
        ]);
        push(&[
            "-chardev",
            &format!(
                "socket,id=qga,path={},server=on,wait=off",
                path(&run.qga_socket())
            ),
            "-device",
            // Port 0 (reserved for a console) and our two: the guest sets up two virtqueues per
            // port at boot, 64 for the default 31 ports (25 ms of a TCG boot, measured).
            &format!("{},max_ports=3", device("virtio-serial")),
            "-device",
            "virtserialport,chardev=qga,name=org.qemu.guest_agent.0",
        ]);
        // QEMU connects to the driver (`server=off`), so the port's host end is connected for
        // the VM's whole life and the guest's reader blocks rather than spins.
        push(&[
            "-chardev",
            &format!(
                "socket,id=control,path={},server=off",
                path(&run.control_socket())
            ),
            "-device",
            &format!("virtserialport,chardev=control,name={}", control::PORT),
        ]);
        push(&[
            "-fsdev",
            &format!(
                "local,id=share,path={},security_model=none",
                path(&run.share())
            ),
            "-device",
            &format!("{},fsdev=share,mount_tag={SHARE_TAG}", device("virtio-9p")),
        ]);
        push(&[
            "-qmp",
            &format!("unix:{},server=on,wait=off", path(&run.qmp_socket())),
        ]);
        if self.incoming.is_some() {
            // The migration capabilities must be set first: `migrate-incoming` follows on QMP.
            push(&["-incoming", "defer"]);
        }
        arguments
    }
}

/// Kernel arguments that make the guest boot and run faster, each measured under TCG here
/// (`initcall_debug` for the slow initcalls; see benches/RESULTS-qemu.md). The guest is a
/// throwaway, single-tenant sandbox, so hardening that only protects the guest kernel from
/// the guest's own processes is not worth its cost here.
pub const FAST_KERNEL_ARGUMENTS: &[&str] = &[
    // Speculative-execution mitigations (return thunks, retpolines, …): every `ret` and
    // indirect branch through a thunk is costly to emulate. Host isolation does not rest on
    // the guest's own mitigations.
    "mitigations=off",
    // Debian zeroes every page on allocation; the kernel already zeroes what user space gets.
    "init_on_alloc=0",
    // Self-tests of every crypto algorithm registered at boot.
    "cryptomgr.notests",
    // Making the kernel's text and rodata read-only rewrites its page tables and then walks
    // them all for writable+executable mappings: 0.3 s of a TCG boot (measured from printk
    // times). The VM is the isolation boundary, not the guest kernel's self-protection.
    "rodata=off",
    // Boot-time steps no CI guest needs, about 0.25 s of a TCG boot together (`initcall_debug`
    // times; 2.53 → 2.34 s to the agent's start for the last five, medians of 7 boots): the tracefs
    // interfaces to kprobe events (0.1 s) and to block I/O tracing (40 ms); self-tests of key
    // derivation (35 ms) and BLAKE2s (12 ms) that `cryptomgr.notests` does not cover; parsing the
    // X.509 certificates that verify module signatures (20 ms; unverified modules load, tainting
    // the kernel, as the initramfs's already do); `/dev/cpu/*/msr` (8 ms); and the VGA arbiter of a
    // machine without VGA (16 ms). The last two do not exist on arm64, where the list is
    // harmless.
    "initcall_blacklist=init_kprobe_trace,init_blk_tracer,crypto_kdf108_init,blake2s_mod_init,\
     load_system_certificate_list,msr_init,vga_arb_device_init",
];

/// [`FAST_KERNEL_ARGUMENTS`] that only x86_64 guests understand.
pub const FAST_X86_KERNEL_ARGUMENTS: &[&str] = &[
    // microvm has one UART; probing four costs port I/O exits.
    "8250.nr_uarts=1",
    // Four-level paging: TCG walks the guest's page tables on every TLB miss, and a 5-level
    // walk (`-cpu max` offers LA57) is one step longer. 2.45 → 2.35 s to the agent's start
    // (medians of 6 boots); a VM's memory is nowhere near the 128 TiB four levels map.
    "no5lvl",
];

/// Appends [`FAST_KERNEL_ARGUMENTS`] (and for x86_64 [`FAST_X86_KERNEL_ARGUMENTS`]) to
/// `cmdline`, keeping any the image already sets.
pub fn fast_kernel_cmdline(cmdline: &str, arch: Arch) -> String {
    let arguments: Vec<String> = cmdline.split_whitespace().map(str::to_owned).collect();
    let x86: &[&str] = match arch {
        Arch::X86_64 => FAST_X86_KERNEL_ARGUMENTS,
        Arch::Aarch64 => &[],
    };
    let extra: Vec<String> = FAST_KERNEL_ARGUMENTS
        .iter()
        .chain(x86)
        .filter(|wanted| {
            let name = wanted.split('=').next().unwrap_or(wanted);
            !arguments
                .iter()
                .any(|argument| argument.split('=').next() == Some(name))
        })
        .map(|argument| (*argument).to_owned())
        .collect();
    with_kernel_arguments(arguments, extra)
}

/// Kernel arguments that make a TCG guest boot on a busy host: under TCG the guest's TSC
/// runs at the host's rate, but calibrating it against the emulated PIT fails when the host is
/// loaded (measured here: the boot hangs at "tsc: Unable to calibrate against PIT" at load
/// 11 on 2 cores). So the frequency is given (`tsc_early_khz`, the host's), the clocksource
/// watchdog that would distrust it under jittery emulated timers is off (`tsc=reliable`), and
/// so is the IO-APIC timer check (`no_timer_check`). Arguments already present are kept.
pub fn tcg_kernel_cmdline(cmdline: &str, host_tsc_khz: Option<u64>) -> String {
    let arguments: Vec<String> = cmdline.split_whitespace().map(str::to_owned).collect();
    let has = |arguments: &[String], name: &str| {
        arguments
            .iter()
            .any(|argument| argument.split('=').next() == Some(name))
    };
    let mut extra = Vec::new();
    if let Some(khz) = host_tsc_khz
        && !has(&arguments, "tsc_early_khz")
    {
        extra.push(format!("tsc_early_khz={khz}"));
    }
    if !has(&arguments, "tsc") {
        extra.push("tsc=reliable".to_owned());
    }
    if !has(&arguments, "no_timer_check") {
        extra.push("no_timer_check".to_owned());
    }
    with_kernel_arguments(arguments, extra)
}

/// `arguments` with `extra` added to the kernel's part of the command line: arguments after
/// `--` go to init, so `extra` goes before it.
fn with_kernel_arguments(mut arguments: Vec<String>, extra: Vec<String>) -> String {
    let position = arguments
        .iter()
        .position(|argument| argument == "--")
        .unwrap_or(arguments.len());
    arguments.splice(position..position, extra);
    arguments.join(" ")
}

/// The host's TSC frequency in kHz, from `/proc/cpuinfo` (x86 only).
pub fn host_tsc_khz() -> Option<u64> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    let flags = cpuinfo.lines().find(|line| line.starts_with("flags"))?;
    if !flags.split_whitespace().any(|flag| flag == "constant_tsc") {
        return None;
    }
    let mhz: f64 = cpuinfo
        .lines()
        .find(|line| line.starts_with("cpu MHz"))?
        .split(':')
        .nth(1)?
        .trim()
        .parse()
        .ok()?;
    Some((mhz * 1000.0) as u64)
}

/// A running VM with its monitor and agent sessions.
#[derive(Debug)]
pub struct Machine {
    run_dir: RunDir,
    pid: i32,
    exit: watch::Receiver<Option<String>>,
    qmp: Mutex<QmpClient>,
    qga: Mutex<QgaClient>,
    control: Mutex<ControlClient>,
    /// Prepare requests sent right after a restore, whose answers are still to be read.
    sent_early: Mutex<Option<Vec<String>>>,
    /// The control protocol version the guest's init answers with (0: it does not, and the
    /// agent does that work).
    control_version: u32,
    /// Started from a saved state rather than booted.
    restored: bool,
    /// Guest RAM is a shared file mapping: a saved state leaves it out.
    shared_ram: bool,
    /// It has a NIC on QEMU's user-mode network, configured by [`Machine::prepare_guest`].
    network: bool,
    /// Its second disk is a repository's state, mounted by [`Machine::prepare_guest`]
    /// (`Some(fresh)`).
    repository_state: Option<bool>,
    /// The saved state's template of the default test image for crun ([`crate::oci`]); none
    /// when a repository's saved state (its own image store) is mounted.
    oci: Option<crate::oci::Template>,
    /// The saved state's fresh root filesystem for the first crun task is still unused.
    premounted_root: std::sync::atomic::AtomicBool,
    version: String,
}

impl Machine {
    /// Starts QEMU for `spec` and waits until the guest agent answers (or `boot_timeout`).
    pub async fn start(spec: &MachineSpec, boot_timeout: Duration) -> Result<Machine, QemuError> {
        create_overlay(&spec.backing, &spec.overlay).await?;
        if !spec.state_disk.exists() {
            crate::repository::create_empty(&spec.state_disk).await?;
        }
        for stale in [spec.run_dir.qmp_socket(), spec.run_dir.qga_socket()] {
            let _ = std::fs::remove_file(stale);
        }
        let _ = std::fs::remove_file(spec.run_dir.console_log());
        let listener = ControlClient::listen(&spec.run_dir.control_socket()).map_err(|source| {
            QemuError::Control {
                stage: "listen".to_owned(),
                source,
            }
        })?;
        let (pid, exit) = spawn(
            &spec.qemu_binary,
            spec.arguments(),
            &spec.run_dir.qemu_log(),
        )?;
        let pid_file = spec.run_dir.pid_file();
        std::fs::write(&pid_file, pid.to_string()).map_err(|source| QemuError::WriteFile {
            path: pid_file,
            source,
        })?;
        let started = Machine::connect(spec, pid, exit.clone(), listener, boot_timeout).await;
        match started {
            Ok(machine) => Ok(machine),
            Err(error) => {
                // SAFETY: kill has no memory-safety preconditions; `pid` is our child.
                unsafe { libc::kill(pid, libc::SIGKILL) };
                Err(error)
            }
        }
    }

    async fn connect(
        spec: &MachineSpec,
        pid: i32,
        exit: watch::Receiver<Option<String>>,
        listener: tokio::net::UnixListener,
        boot_timeout_after: Duration,
    ) -> Result<Machine, QemuError> {
        let started = Instant::now();
        let deadline = Instant::now() + boot_timeout_after;
        let run = &spec.run_dir;
        let stage = if spec.incoming.is_some() {
            "restore"
        } else {
            "boot"
        };
        let qmp_socket = run.qmp_socket();
        let mut qmp = loop {
            check_alive(&exit, run, stage)?;
            if qmp_socket.exists() {
                match QmpClient::connect(&qmp_socket, MONITOR_TIMEOUT).await {
                    Ok(client) => break client,
                    Err(ProtocolError::Connect { .. }) => {}
                    Err(source) => {
                        check_alive(&exit, run, stage)?;
                        return Err(QemuError::Monitor {
                            stage: "connect".to_owned(),
                            source,
                        });
                    }
                }
            }
            if Instant::now() > deadline {
                return Err(boot_timeout(run, boot_timeout_after));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        let version = qmp.version().to_owned();
        // QEMU made its chardev connections before its monitor listened.
        let mut control = tokio::time::timeout(
            MONITOR_TIMEOUT,
            ControlClient::accept(&listener, spec.incoming_control_version),
        )
        .await
        .map_err(|_| QemuError::Control {
            stage: "accept".to_owned(),
            source: ProtocolError::Timeout {
                peer: "control",
                command: "connect".to_owned(),
                after: MONITOR_TIMEOUT,
            },
        })?
        .map_err(|source| QemuError::Control {
            stage: "accept".to_owned(),
            source,
        })?;
        drop(listener);
        let _ = std::fs::remove_file(run.control_socket());
        tracing::debug!(elapsed = ?started.elapsed(), "monitor connected");
        if let Some(state) = &spec.incoming {
            let restore = |source| QemuError::Monitor {
                stage: "restore".to_owned(),
                source,
            };
            if spec.ram_file.is_some() {
                qmp.execute(
                    "migrate-set-capabilities",
                    ignore_shared_capability(),
                    MONITOR_TIMEOUT,
                )
                .await
                .map_err(restore)?;
            }
            let uri = format!("exec:cat {}", shell_quote(&state.display().to_string()));
            qmp.execute("migrate-incoming", json!({ "uri": uri }), MONITOR_TIMEOUT)
                .await
                .map_err(restore)?;
        }
        if spec.incoming.is_some() {
            loop {
                check_alive(&exit, run, stage)?;
                let status = qmp
                    .execute("query-status", Value::Null, MONITOR_TIMEOUT)
                    .await
                    .map_err(|source| QemuError::Monitor {
                        stage: "restore".to_owned(),
                        source,
                    })?;
                match status["status"].as_str() {
                    Some("running") => break,
                    // The state was saved from a stopped VM: restoring it leaves it paused.
                    Some("paused") => {
                        qmp.execute("cont", Value::Null, MONITOR_TIMEOUT)
                            .await
                            .map_err(|source| QemuError::Monitor {
                                stage: "restore".to_owned(),
                                source,
                            })?;
                    }
                    Some("inmigrate") | Some("prelaunch") => {}
                    Some(other) => {
                        return Err(QemuError::WarmSave {
                            reason: format!("restored VM is `{other}`, not running"),
                        });
                    }
                    None => {}
                }
                if Instant::now() > deadline {
                    return Err(boot_timeout(run, boot_timeout_after));
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            tracing::debug!(elapsed = ?started.elapsed(), "restored VM running");
        }
        // A restored guest is known to serve the control port: ask it to set the clock and
        // mount the share now, while the agent is woken below (each takes ~0.1 s of a guest
        // whose code TCG must translate afresh after a restore), and read the answers in
        // `prepare_guest`.
        let mut sent_early = None;
        if spec.incoming.is_some() && control.serves() {
            let requests = prepare_requests();
            control
                .send(&requests)
                .await
                .map_err(|source| QemuError::Control {
                    stage: "prepare".to_owned(),
                    source,
                })?;
            sent_early = Some(requests);
        }
        let mut qga = QgaClient::connect(&run.qga_socket())
            .await
            .map_err(|source| QemuError::Agent {
                stage: "connect".to_owned(),
                source,
            })?;
        loop {
            check_alive(&exit, run, stage)?;
            let attempt_deadline = (Instant::now() + Duration::from_millis(500)).min(deadline);
            match qga.sync(Duration::from_millis(500), attempt_deadline).await {
                Ok(()) => break,
                Err(ProtocolError::Timeout { .. }) if Instant::now() < deadline => {}
                Err(ProtocolError::Timeout { .. }) => {
                    return Err(boot_timeout(run, boot_timeout_after));
                }
                Err(source) => {
                    // The agent's socket breaks when QEMU exits (a guest panic, with
                    // `-no-reboot`), usually before its exit status reaches us: wait for that
                    // briefly, so that the error is the exit with the console's last lines.
                    let mut exited = exit.clone();
                    let _ = tokio::time::timeout(
                        Duration::from_secs(2),
                        exited.wait_for(|status| status.is_some()),
                    )
                    .await;
                    check_alive(&exit, run, stage)?;
                    return Err(QemuError::Agent {
                        stage: stage.to_owned(),
                        source,
                    });
                }
            }
        }
        tracing::debug!(elapsed = ?started.elapsed(), "guest agent answered");
        // The guest greets when its init opens the port, which it does before starting the
        // agent: by now the greeting has come, unless the init does not serve the port.
        let control_version = control.await_hello(Duration::from_millis(500)).await;
        Ok(Machine {
            run_dir: run.clone(),
            pid,
            exit,
            qmp: Mutex::new(qmp),
            qga: Mutex::new(qga),
            control: Mutex::new(control),
            sent_early: Mutex::new(sent_early),
            control_version,
            restored: spec.incoming.is_some(),
            shared_ram: spec.ram_file.as_ref().is_some_and(|ram| ram.shared),
            network: spec.network,
            repository_state: spec.repository_state,
            oci: spec
                .incoming
                .as_deref()
                .and_then(Path::parent)
                // A repository's saved storage mounted over the image's hides what the
                // template's root filesystem is made of.
                .filter(|_| spec.repository_state != Some(false))
                .and_then(crate::oci::Template::load),
            premounted_root: std::sync::atomic::AtomicBool::new(true),
            version,
        })
    }

    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Whether this VM was restored from a saved state (a warm start) rather than booted.
    pub fn restored(&self) -> bool {
        self.restored
    }

    /// Whether the guest's init serves the control port (clock, share mount, and the
    /// `--follow` helper that streams stdin).
    pub fn serves_control(&self) -> bool {
        self.control_version > 0
    }

    /// The control protocol version the guest's init serves (0: none).
    pub fn control_version(&self) -> u32 {
        self.control_version
    }

    /// Whether the guest's init can wrap tasks itself (`ci-exec-init --task`, control 2).
    pub fn runs_task_helper(&self) -> bool {
        self.control_version >= 2
    }

    /// QEMU's version, from the QMP greeting.
    pub fn version(&self) -> &str {
        &self.version
    }

    pub fn is_running(&self) -> bool {
        self.exit.borrow().is_none()
    }

    /// Errors with the console's last lines if QEMU has exited.
    pub fn check_alive(&self, stage: &'static str) -> Result<(), QemuError> {
        check_alive(&self.exit, &self.run_dir, stage)
    }

    /// The last `lines` lines of the serial console.
    pub fn console_tail(&self, lines: usize) -> String {
        console_tail(&self.run_dir.console_log(), lines)
    }

    /// Runs `script` with `/bin/sh -c` as root in the guest, waits for it and returns its exit
    /// code, stdout and stderr. For the driver's own short commands, not for tasks.
    pub async fn sh(&self, script: &str, timeout: Duration) -> Result<ExecStatus, QemuError> {
        let pid = self
            .exec(
                "/bin/sh",
                &["-c".to_owned(), script.to_owned()],
                &[format!("PATH={GUEST_PATH}"), "HOME=/root".to_owned()],
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
                return Err(QemuError::Agent {
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

    /// Like [`Machine::sh`], but a non-zero exit is an error.
    pub async fn sh_ok(&self, script: &str, timeout: Duration) -> Result<ExecStatus, QemuError> {
        let status = self.sh(script, timeout).await?;
        if status.shell_code() != 0 {
            return Err(QemuError::GuestCommand {
                command: script.to_owned(),
                code: status.shell_code(),
                stderr: String::from_utf8_lossy(&status.stderr).trim().to_owned(),
            });
        }
        Ok(status)
    }

    /// Starts `path` in the guest with exactly `env`; returns the guest pid.
    pub async fn exec(
        &self,
        path: &str,
        arguments: &[String],
        env: &[String],
        capture_output: bool,
    ) -> Result<i64, QemuError> {
        self.check_alive("exec")?;
        self.qga
            .lock()
            .await
            .exec(path, arguments, env, capture_output, AGENT_TIMEOUT)
            .await
            .map_err(|source| QemuError::Agent {
                stage: format!("starting `{path}`"),
                source,
            })
    }

    pub async fn exec_status(&self, pid: i64) -> Result<ExecStatus, QemuError> {
        self.check_alive("exec")?;
        self.qga
            .lock()
            .await
            .exec_status(pid, AGENT_TIMEOUT)
            .await
            .map_err(|source| QemuError::Agent {
                stage: format!("status of guest pid {pid}"),
                source,
            })
    }

    /// Sets the guest clock to the host's (a restored VM wakes with the time it was saved at)
    /// and mounts the share: through the control port, else through the agent.
    pub async fn prepare_guest(&self) -> Result<(), QemuError> {
        self.prepare_share_and_clock().await?;
        // One guest command for both: each costs a round trip through the agent.
        let mut script = Vec::new();
        // A restored guest was configured before its state was saved (`warm::create`).
        if self.network && !self.restored {
            script.push(NETWORK_SETUP.to_owned());
        }
        match self.repository_state {
            // The saved state has the fresh run's mark (`warm::create`).
            Some(true) if self.restored => {}
            Some(fresh) => script.push(crate::repository::mount_script(fresh)),
            None => {}
        }
        if !script.is_empty() {
            self.sh_ok(&script.join(" && "), AGENT_TIMEOUT).await?;
        }
        Ok(())
    }

    /// The template that runs tasks of the default test image with crun, if this guest has one.
    pub fn oci(&self) -> Option<&crate::oci::Template> {
        self.oci.as_ref()
    }

    /// Whether the caller is the first to run on the saved state's fresh root filesystem
    /// ([`crate::oci`]); each VM has one.
    pub fn take_premounted_root(&self) -> bool {
        self.premounted_root
            .swap(false, std::sync::atomic::Ordering::SeqCst)
    }

    /// Whether the guest has an outbound network.
    pub fn has_network(&self) -> bool {
        self.network
    }

    async fn prepare_share_and_clock(&self) -> Result<(), QemuError> {
        if self.control_version > 0 {
            let mut client = self.control.lock().await;
            let early = self.sent_early.lock().await.take();
            let result = async {
                let requests = match early {
                    Some(requests) => requests,
                    None => {
                        let requests = prepare_requests();
                        client.send(&requests).await?;
                        requests
                    }
                };
                client.answers(&requests, AGENT_TIMEOUT).await
            }
            .await;
            return result.map_err(|source| QemuError::Control {
                stage: "prepare".to_owned(),
                source,
            });
        }
        let now = since_epoch();
        let script = format!(
            "date -u -s @{}.{:09} >/dev/null; mkdir -p {GUEST_SHARE} && \
             mount -t 9p -o {} {SHARE_TAG} {GUEST_SHARE}",
            now.as_secs(),
            now.subsec_nanos(),
            share_mount_options()
        );
        self.sh_ok(&script, AGENT_TIMEOUT).await?;
        Ok(())
    }

    /// `[ path -nt reference ]` in the guest, asked of its init without starting a program;
    /// `None` when the init cannot answer (an older image).
    pub async fn newer(&self, path: &str, reference: &str) -> Result<Option<bool>, QemuError> {
        if self.control_version < crate::control::NEWER_VERSION {
            return Ok(None);
        }
        self.control
            .lock()
            .await
            .ask(
                &crate::control::newer_request(path, reference),
                AGENT_TIMEOUT,
            )
            .await
            .map(Some)
            .map_err(|source| QemuError::Control {
                stage: format!("is `{path}` newer than `{reference}`"),
                source,
            })
    }

    /// Saves the running VM's state to `state`; the VM ends stopped (`postmigrate`).
    pub async fn save_state(&self, state: &Path) -> Result<(), QemuError> {
        let mut qmp = self.qmp.lock().await;
        let monitor = |stage: &str| {
            let stage = stage.to_owned();
            move |source| QemuError::Monitor { stage, source }
        };
        if self.shared_ram {
            qmp.execute(
                "migrate-set-capabilities",
                ignore_shared_capability(),
                MONITOR_TIMEOUT,
            )
            .await
            .map_err(monitor("migrate-set-capabilities"))?;
        }
        // `exec:` migration is throttled to 32 MiB/s by default; a file has no reason to be.
        qmp.execute(
            "migrate-set-parameters",
            json!({ "max-bandwidth": 64u64 << 30 }),
            MONITOR_TIMEOUT,
        )
        .await
        .map_err(monitor("migrate-set-parameters"))?;
        // Not stopped first: migration stops the VM itself at completion, with its disks
        // flushed, and a state saved from a running VM restores running. One saved after
        // `stop` restores `paused` and needs a `cont` (the "restored VM is `paused`" failures).
        let uri = format!("exec:cat > {}", shell_quote(&state.display().to_string()));
        qmp.execute("migrate", json!({ "uri": uri }), MONITOR_TIMEOUT)
            .await
            .map_err(monitor("migrate"))?;
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let progress = qmp
                .execute("query-migrate", Value::Null, MONITOR_TIMEOUT)
                .await
                .map_err(monitor("query-migrate"))?;
            match progress["status"].as_str() {
                Some("completed") => return Ok(()),
                Some("failed") | Some("cancelled") => {
                    return Err(QemuError::WarmSave {
                        reason: progress["error-desc"]
                            .as_str()
                            .unwrap_or("migration failed")
                            .to_owned(),
                    });
                }
                _ => {}
            }
            if Instant::now() > deadline {
                return Err(QemuError::WarmSave {
                    reason: "migration did not complete within 120 s".to_owned(),
                });
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Asks QEMU to quit, then kills it if it has not exited within a few seconds.
    pub async fn shutdown(&self) {
        if self.is_running() {
            let mut qmp = self.qmp.lock().await;
            if let Err(error) = qmp
                .execute("quit", Value::Null, Duration::from_secs(2))
                .await
            {
                tracing::debug!(%error, "qmp quit");
            }
        }
        if !self.wait_exit(Duration::from_secs(5)).await {
            // SAFETY: kill has no memory-safety preconditions; `pid` is our child.
            unsafe { libc::kill(self.pid, libc::SIGKILL) };
            self.wait_exit(Duration::from_secs(5)).await;
        }
        let _ = std::fs::remove_file(self.run_dir.pid_file());
    }
}

impl Machine {
    /// Waits up to `timeout` for QEMU to exit; returns whether it has.
    async fn wait_exit(&self, timeout: Duration) -> bool {
        let mut exit = self.exit.clone();
        tokio::time::timeout(timeout, async {
            exit.wait_for(|status| status.is_some()).await.is_ok()
        })
        .await
        .unwrap_or(false)
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        if self.is_running() {
            // SAFETY: kill has no memory-safety preconditions; `pid` is our child.
            unsafe { libc::kill(self.pid, libc::SIGKILL) };
        }
    }
}

fn check_alive(
    exit: &watch::Receiver<Option<String>>,
    run: &RunDir,
    stage: &'static str,
) -> Result<(), QemuError> {
    if let Some(status) = exit.borrow().as_ref() {
        let mut console = console_tail(&run.console_log(), 20);
        let qemu_log = std::fs::read_to_string(run.qemu_log()).unwrap_or_default();
        if !qemu_log.trim().is_empty() {
            console.push_str("\nqemu: ");
            console.push_str(qemu_log.trim());
        }
        return Err(QemuError::QemuExited {
            stage,
            status: status.clone(),
            console,
        });
    }
    Ok(())
}

fn boot_timeout(run: &RunDir, after: Duration) -> QemuError {
    QemuError::BootTimeout {
        after,
        console: console_tail(&run.console_log(), 20),
    }
}

/// The last `lines` lines of a console log, without terminal escapes.
pub fn console_tail(path: &Path, lines: usize) -> String {
    let Ok(bytes) = std::fs::read(path) else {
        return "(no console output)".to_owned();
    };
    let text = String::from_utf8_lossy(&bytes);
    let kept: Vec<&str> = text
        .lines()
        .map(|line| line.trim_end_matches('\r'))
        .filter(|line| !line.trim().is_empty())
        .collect();
    let start = kept.len().saturating_sub(lines);
    let tail = kept[start..].join("\n");
    if tail.is_empty() {
        "(no console output)".to_owned()
    } else {
        tail.chars()
            .filter(|c| *c == '\n' || !c.is_control())
            .collect()
    }
}

fn since_epoch() -> Duration {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
}

fn share_mount_options() -> String {
    format!("trans=virtio,version=9p2000.L,msize={MSIZE},cache=none")
}

/// The control requests that set the guest clock to now and mount the share.
/// Configures the guest's NIC for QEMU's user-mode network (no DHCP client in the guest: the
/// addresses are QEMU's fixed ones). Idempotent, so it also serves a restored VM whose saved
/// state had it done already.
pub const NETWORK_SETUP: &str = "ip link set eth0 up && ip addr replace 10.0.2.15/24 dev eth0 && \
     ip route replace default via 10.0.2.2 && \
     printf 'nameserver 10.0.2.3\n' > /etc/resolv.conf";

fn prepare_requests() -> Vec<String> {
    vec![
        control::time_request(since_epoch()),
        control::mount_request(SHARE_TAG, GUEST_SHARE, &share_mount_options()),
    ]
}

/// `x-ignore-shared`: RAM in a shared file mapping is not part of the migration stream.
fn ignore_shared_capability() -> Value {
    json!({ "capabilities": [{ "capability": "x-ignore-shared", "state": true }] })
}

/// Quotes `text` for a POSIX shell.
pub fn shell_quote(text: &str) -> String {
    if !text.is_empty()
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/._-=:,@+%".contains(&b))
    {
        return text.to_owned();
    }
    format!("'{}'", text.replace('\'', r"'\''"))
}

/// `qemu-img create -f qcow2 -F qcow2 -b base overlay`: a fresh copy-on-write disk.
pub async fn create_overlay(base: &Path, overlay: &Path) -> Result<(), QemuError> {
    let _ = std::fs::remove_file(overlay);
    qemu_img(
        &["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"],
        &[base.as_os_str(), overlay.as_os_str()],
    )
    .await
}

/// Runs `qemu-img ARGUMENTS… PATHS…`; its failure carries its stderr.
pub async fn qemu_img(arguments: &[&str], paths: &[&std::ffi::OsStr]) -> Result<(), QemuError> {
    let output = tokio::process::Command::new("qemu-img")
        .args(arguments)
        .args(paths)
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(|source| QemuError::Spawn {
            program: "qemu-img".to_owned(),
            source,
        })?;
    if !output.status.success() {
        return Err(QemuError::ToolFailed {
            program: format!(
                "qemu-img {}",
                arguments.first().copied().unwrap_or_default()
            ),
            status: output.status.to_string(),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        });
    }
    Ok(())
}

/// Starts QEMU from a thread that waits for it; returns its pid and a channel that gets its
/// exit status.
fn spawn(
    program: &str,
    arguments: Vec<OsString>,
    log: &Path,
) -> Result<(i32, watch::Receiver<Option<String>>), QemuError> {
    let log_file = std::fs::File::create(log).map_err(|source| QemuError::WriteFile {
        path: log.to_owned(),
        source,
    })?;
    let log_clone = log_file
        .try_clone()
        .map_err(|source| QemuError::WriteFile {
            path: log.to_owned(),
            source,
        })?;
    tracing::debug!(program, ?arguments, "starting qemu");
    let (exit_sender, exit) = watch::channel(None);
    let (pid_sender, pid_receiver) = std::sync::mpsc::channel();
    let program = program.to_owned();
    let spawned = std::thread::Builder::new()
        .name("qemu-wait".to_owned())
        .spawn(move || {
            let mut command = std::process::Command::new(&program);
            command
                .args(&arguments)
                .stdin(Stdio::null())
                .stdout(log_file)
                .stderr(log_clone)
                .process_group(0);
            // SAFETY: getpid has no preconditions.
            let parent = unsafe { libc::getpid() };
            // SAFETY: only async-signal-safe calls (prctl, getppid, _exit) run between fork and
            // exec.
            unsafe {
                command.pre_exec(move || {
                    // Linux only (macOS has no parent-death signal; the check below remains).
                    #[cfg(target_os = "linux")]
                    if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    if libc::getppid() != parent {
                        libc::_exit(1);
                    }
                    Ok(())
                });
            }
            match command.spawn() {
                Err(error) => {
                    let _ = pid_sender.send(Err(error));
                }
                Ok(mut child) => {
                    let _ = pid_sender.send(Ok(child.id() as i32));
                    let status = match child.wait() {
                        Ok(status) => status.to_string(),
                        Err(error) => format!("unknown ({error})"),
                    };
                    let _ = exit_sender.send(Some(status));
                }
            }
        });
    let spawn_error = |source| QemuError::Spawn {
        program: "qemu".to_owned(),
        source,
    };
    spawned.map_err(spawn_error)?;
    let pid = pid_receiver
        .recv()
        .map_err(|_| spawn_error(std::io::Error::other("spawner thread ended")))?
        .map_err(|source| QemuError::Spawn {
            program: "qemu".to_owned(),
            source,
        })?;
    Ok((pid, exit))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(incoming: Option<PathBuf>) -> MachineSpec {
        MachineSpec {
            qemu_binary: "qemu-system-x86_64".to_owned(),
            accel: Accel::Tcg,
            memory_mb: 2048,
            cpus: 2,
            image: ImageFiles {
                name: "debian-bookworm".to_owned(),
                digest: "abc".to_owned(),
                vmlinux: PathBuf::from("/images/vmlinux"),
                initrd: PathBuf::from("/images/initrd"),
                disk: PathBuf::from("/images/disk.qcow2"),
                kernel_cmdline: "console=ttyS0 quiet".to_owned(),
                container_images: Vec::new(),
                arch: Arch::X86_64,
                current: true,
            },
            run_dir: RunDir::new(PathBuf::from("/run/q/ns")),
            overlay: PathBuf::from("/run/q/ns/overlay.qcow2"),
            backing: PathBuf::from("/images/disk.qcow2"),
            ram_file: incoming.as_ref().map(|state| RamFile {
                path: state.with_file_name("ram"),
                shared: false,
            }),
            incoming,
            incoming_control_version: 0,
            network: false,
            state_disk: PathBuf::from("/run/q/ns/state.qcow2"),
            repository_state: None,
        }
    }

    fn joined(spec: &MachineSpec) -> String {
        spec.arguments()
            .iter()
            .map(|argument| argument.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ")
    }

    #[test]
    fn command_line_has_every_device() {
        let line = joined(&spec(None));
        for expected in [
            "-accel tcg",
            "-machine microvm,pit=on",
            "-cpu max",
            "-m 2048",
            "-smp 2",
            "-kernel /images/vmlinux",
            "-initrd /images/initrd",
            "-append console=ttyS0 quiet",
            "file=/run/q/ns/overlay.qcow2",
            "virtio-serial-device,max_ports=3",
            "virtserialport,chardev=qga,name=org.qemu.guest_agent.0",
            "socket,id=qga,path=/run/q/ns/qga.sock,server=on,wait=off",
            "local,id=share,path=/run/q/ns/share,security_model=none",
            "virtio-9p-device,fsdev=share,mount_tag=ci",
            "-qmp unix:/run/q/ns/qmp.sock,server=on,wait=off",
            "socket,id=control,path=/run/q/ns/ctl.sock,server=off",
            "virtserialport,chardev=control,name=org.ci-exec.control.0",
            "-nic none",
        ] {
            assert!(line.contains(expected), "`{expected}` missing from {line}");
        }
        assert!(!line.contains("-incoming"));
    }

    #[test]
    fn an_aarch64_guest_gets_the_virt_machine_with_its_devices_on_pci() {
        let mut spec = spec(None);
        spec.image.arch = Arch::Aarch64;
        spec.network = true;
        let line = joined(&spec);
        for expected in [
            "-machine virt,gic-version=max",
            "-cpu max,pauth-impdef=on",
            "virtio-blk-pci,drive=root",
            "virtio-blk-pci,drive=state",
            "virtio-serial-pci,max_ports=3",
            "virtio-9p-pci,fsdev=share,mount_tag=ci",
            "virtio-net-pci,netdev=net",
        ] {
            assert!(line.contains(expected), "`{expected}` missing from {line}");
        }
        // No virtio-mmio device (`virtio-blk-device,…`) is left.
        assert!(!line.contains("-device,"), "{line}");
        assert!(!line.contains("microvm"), "{line}");
        spec.accel = Accel::Kvm;
        assert!(joined(&spec).contains("-cpu host "));
    }

    #[test]
    fn warm_start_maps_the_saved_ram_privately_and_defers_incoming() {
        let line = joined(&spec(Some(PathBuf::from("/cache/warm/k/state"))));
        assert!(
            line.starts_with(
                "-object memory-backend-file,id=ram,size=2048M,mem-path=/cache/warm/k/ram,share=off "
            ),
            "{line}"
        );
        assert!(line.contains("microvm,pit=on,pic=off,rtc=on,isa-serial=on,memory-backend=ram"));
        assert!(line.ends_with(" -incoming defer"), "{line}");
    }

    #[test]
    fn tcg_arguments_are_added_once_and_before_init_arguments() {
        assert_eq!(
            tcg_kernel_cmdline("root=/dev/vda quiet", Some(2445432)),
            "root=/dev/vda quiet tsc_early_khz=2445432 tsc=reliable no_timer_check"
        );
        assert_eq!(
            tcg_kernel_cmdline("tsc=unstable no_timer_check -- init-arg", None),
            "tsc=unstable no_timer_check -- init-arg"
        );
        assert_eq!(
            tcg_kernel_cmdline("a -- b", Some(1)),
            "a tsc_early_khz=1 tsc=reliable no_timer_check -- b"
        );
    }

    #[test]
    fn fast_arguments_are_added_unless_the_image_sets_them() {
        let line = fast_kernel_cmdline("root=/dev/vda mitigations=auto -- init-arg", Arch::X86_64);
        assert!(
            line.starts_with("root=/dev/vda mitigations=auto "),
            "{line}"
        );
        assert!(!line.contains("mitigations=off"), "{line}");
        assert!(line.contains(" init_on_alloc=0 "), "{line}");
        assert!(line.ends_with(" -- init-arg"), "{line}");
        for argument in FAST_KERNEL_ARGUMENTS {
            assert!(!argument.contains(char::is_whitespace), "{argument:?}");
        }
        assert!(line.contains(",load_system_certificate_list,"), "{line}");
        assert!(line.contains(" no5lvl "), "{line}");
        let arm = fast_kernel_cmdline("console=ttyAMA0", Arch::Aarch64);
        assert!(arm.contains(" mitigations=off"), "{arm}");
        for x86 in FAST_X86_KERNEL_ARGUMENTS {
            assert!(!arm.contains(x86), "{x86} in {arm}");
        }
    }

    #[test]
    fn shell_quote_table() {
        for (input, expected) in [
            ("plain", "plain"),
            ("/a/b.c", "/a/b.c"),
            ("", "''"),
            ("a b", "'a b'"),
            ("it's", r"'it'\''s'"),
            ("$HOME", "'$HOME'"),
        ] {
            assert_eq!(shell_quote(input), expected, "{input}");
        }
    }

    #[test]
    fn console_tail_keeps_the_last_lines() {
        let directory = tempfile::tempdir().expect("tempdir");
        let path = directory.path().join("console.log");
        std::fs::write(&path, "one\r\ntwo\n\nthree\x1b[0m\nfour\n").expect("write");
        assert_eq!(console_tail(&path, 2), "three[0m\nfour");
        assert_eq!(
            console_tail(&directory.path().join("none"), 2),
            "(no console output)"
        );
    }
}
