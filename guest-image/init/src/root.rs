//! Stage 2: PID 1 on the root filesystem.

use crate::cmdline::Cmdline;
use crate::system;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const AGENT: &str = "/usr/sbin/qemu-ga";
const AGENT_PORT: &str = "org.qemu.guest_agent.0";
const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

pub fn run() -> ! {
    // SAFETY: an empty environment is set before any thread exists.
    unsafe {
        std::env::set_var("PATH", PATH);
        std::env::set_var("HOME", "/root");
        std::env::set_var("LANG", "C.UTF-8");
    }
    crate::modules::adopt_background();
    mount_everything();
    let cmdline = Cmdline::parse(&std::fs::read_to_string("/proc/cmdline").unwrap_or_default());

    let hostname = cmdline.hostname.clone().or_else(|| {
        std::fs::read_to_string("/etc/hostname")
            .ok()
            .map(|name| name.trim().to_owned())
            .filter(|name| !name.is_empty())
    });
    if let Some(hostname) = hostname {
        report(system::set_hostname(&hostname));
    }
    report(system::loopback_up());

    block_signals();
    // Its own thread, started before the agent: the host may send its first request as soon
    // as the agent answers. The thread inherits the blocked signal mask, as it should.
    let vsock = cmdline.vsock;
    let _ = std::thread::Builder::new()
        .name("control".to_owned())
        .spawn(move || {
            if vsock {
                crate::control::serve_vsock();
            } else {
                crate::control::serve(Duration::from_secs(5));
            }
        });
    let mut agent = None;
    if cmdline.agent && vsock {
        agent = start_agent(AgentPort::Vsock);
    } else if cmdline.agent {
        name_virtio_ports(Duration::from_secs(5));
        agent = start_agent(AgentPort::VirtioSerial);
    }
    println!(
        "ci-exec-init: ready after {:.2} s of uptime",
        system::uptime()
    );
    let port = if vsock {
        AgentPort::Vsock
    } else {
        AgentPort::VirtioSerial
    };
    supervise(agent, cmdline.agent.then_some(port))
}

fn report(result: std::io::Result<()>) {
    if let Err(error) = result {
        eprintln!("ci-exec-init: warning: {error}");
    }
}

fn mount_everything() {
    let nosuid_nodev_noexec = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    let mounts: [(&str, &str, &str, libc::c_ulong, &str); 10] = [
        ("proc", "/proc", "proc", nosuid_nodev_noexec, ""),
        ("sysfs", "/sys", "sysfs", nosuid_nodev_noexec, ""),
        ("devtmpfs", "/dev", "devtmpfs", libc::MS_NOSUID, "mode=0755"),
        (
            "devpts",
            "/dev/pts",
            "devpts",
            libc::MS_NOSUID | libc::MS_NOEXEC,
            "gid=5,mode=0620,ptmxmode=0666",
        ),
        (
            "tmpfs",
            "/dev/shm",
            "tmpfs",
            libc::MS_NOSUID | libc::MS_NODEV,
            "mode=1777",
        ),
        ("mqueue", "/dev/mqueue", "mqueue", nosuid_nodev_noexec, ""),
        (
            "tmpfs",
            "/run",
            "tmpfs",
            libc::MS_NOSUID | libc::MS_NODEV,
            "mode=0755",
        ),
        (
            "tmpfs",
            "/tmp",
            "tmpfs",
            libc::MS_NOSUID | libc::MS_NODEV,
            "mode=1777",
        ),
        (
            "cgroup2",
            "/sys/fs/cgroup",
            "cgroup2",
            nosuid_nodev_noexec,
            "nsdelegate",
        ),
        (
            "securityfs",
            "/sys/kernel/security",
            "securityfs",
            nosuid_nodev_noexec,
            "",
        ),
    ];
    for (source, target, fstype, flags, data) in mounts {
        report(system::mount_once(source, target, fstype, flags, data));
    }
    for (link, target) in [
        ("/dev/fd", "/proc/self/fd"),
        ("/dev/stdin", "/proc/self/fd/0"),
        ("/dev/stdout", "/proc/self/fd/1"),
        ("/dev/stderr", "/proc/self/fd/2"),
    ] {
        let _ = std::os::unix::fs::symlink(target, link);
    }
    for directory in ["/run/lock", "/run/user", "/var/log"] {
        let _ = std::fs::create_dir_all(directory);
    }
    // Tools such as podman read utmp-era files and lock dirs under /run; a fresh tmpfs has none.
    let _ = std::fs::write("/run/utmp", b"");
}

/// Makes `/dev/virtio-ports/<name>` links, as udev would, waiting for the agent's port.
fn name_virtio_ports(timeout: Duration) {
    let deadline = Instant::now() + timeout;
    let _ = std::fs::create_dir_all("/dev/virtio-ports");
    loop {
        if let Ok(entries) = std::fs::read_dir("/sys/class/virtio-ports") {
            for entry in entries.flatten() {
                let device = entry.file_name();
                let Ok(name) = std::fs::read_to_string(entry.path().join("name")) else {
                    continue;
                };
                let name = name.trim();
                if name.is_empty() || name.contains('/') {
                    continue;
                }
                let link = Path::new("/dev/virtio-ports").join(name);
                if !link.exists() {
                    let _ = std::os::unix::fs::symlink(Path::new("..").join(&device), &link);
                }
            }
        }
        if Path::new("/dev/virtio-ports").join(AGENT_PORT).exists() {
            return;
        }
        if Instant::now() >= deadline {
            eprintln!(
                "ci-exec-init: warning: no virtio-serial port named `{AGENT_PORT}` (add one to the VM to use the guest agent)"
            );
            return;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Where the guest agent talks to the host.
#[derive(Debug, Clone, Copy)]
enum AgentPort {
    /// The virtio-serial port [`AGENT_PORT`]: qemu-ga when the image has it, else ours.
    VirtioSerial,
    /// vsock port [`crate::agent::VSOCK_PORT`]: always ours.
    Vsock,
}

fn start_agent(where_to: AgentPort) -> Option<Child> {
    let port = Path::new("/dev/virtio-ports").join(AGENT_PORT);
    // A root filesystem without qemu-ga (a stock cloud image) gets ours, and so does vsock.
    let mut command = if let AgentPort::Vsock = where_to {
        let mut command = Command::new("/proc/self/exe");
        command
            .arg0("ci-exec-init")
            .arg("--agent")
            .arg(format!("vsock:{}", crate::agent::VSOCK_PORT));
        command
    } else if !port.exists() {
        return None;
    } else if Path::new(AGENT).exists() {
        let mut command = Command::new(AGENT);
        command
            .arg("--method=virtio-serial")
            .arg(format!("--path={}", port.display()));
        command
    } else {
        let mut command = Command::new("/proc/self/exe");
        command.arg0("ci-exec-init").arg("--agent").arg(&port);
        command
    };
    command.stdin(Stdio::null()).current_dir("/");
    // SAFETY: only async-signal-safe calls (sigprocmask, setsid) between fork and exec.
    unsafe {
        command.pre_exec(|| {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
            libc::setsid();
            Ok(())
        });
    }
    match command.spawn() {
        Ok(child) => Some(child),
        Err(error) => {
            eprintln!("ci-exec-init: error: start `{AGENT}`: {error}");
            None
        }
    }
}

const HANDLED: [libc::c_int; 6] = [
    libc::SIGCHLD,
    libc::SIGTERM,
    libc::SIGINT,
    libc::SIGUSR1,
    libc::SIGUSR2,
    libc::SIGPWR,
];

fn signal_set() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data, initialised by sigemptyset before use.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for signal in HANDLED {
            libc::sigaddset(&mut set, signal);
        }
        set
    }
}

fn block_signals() {
    let set = signal_set();
    // SAFETY: `set` is initialised; blocking is process-wide before any thread starts.
    unsafe { libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
}

/// Reaps orphans, restarts the agent if it dies, and powers off on request (busybox's signal
/// convention: SIGTERM reboots, SIGUSR1/SIGUSR2/SIGPWR halt or power off).
fn supervise(mut agent: Option<Child>, wanted: Option<AgentPort>) -> ! {
    let set = signal_set();
    let mut last_start = Instant::now();
    loop {
        // SAFETY: `set` is initialised and its signals are blocked.
        let signal = unsafe { libc::sigwaitinfo(&set, std::ptr::null_mut()) };
        match signal {
            libc::SIGCHLD => {
                let mut agent_died = false;
                loop {
                    let mut status = 0;
                    // SAFETY: waitpid with a valid status pointer.
                    let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
                    if pid <= 0 {
                        break;
                    }
                    if agent.as_ref().is_some_and(|child| child.id() as i32 == pid) {
                        agent_died = true;
                    }
                }
                if agent_died && let Some(port) = wanted {
                    eprintln!("ci-exec-init: warning: the guest agent exited; restarting it");
                    if last_start.elapsed() < Duration::from_secs(1) {
                        std::thread::sleep(Duration::from_secs(1));
                    }
                    agent = start_agent(port);
                    last_start = Instant::now();
                }
            }
            libc::SIGTERM | libc::SIGINT => shut_down(true),
            libc::SIGUSR1 | libc::SIGUSR2 | libc::SIGPWR => shut_down(false),
            _ => {}
        }
    }
}

fn shut_down(restart: bool) -> ! {
    println!(
        "ci-exec-init: {}",
        if restart {
            "restarting"
        } else {
            "powering off"
        }
    );
    // SAFETY: signalling every other process; PID 1 is exempt from kill(-1).
    unsafe { libc::kill(-1, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline {
        // SAFETY: waitpid with a null status pointer.
        let pid = unsafe { libc::waitpid(-1, std::ptr::null_mut(), libc::WNOHANG) };
        if pid < 0 {
            break;
        }
        if pid == 0 {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    // SAFETY: as above.
    unsafe { libc::kill(-1, libc::SIGKILL) };
    let error = system::power_off(restart);
    eprintln!("ci-exec-init: error: {error}");
    std::process::exit(1);
}
