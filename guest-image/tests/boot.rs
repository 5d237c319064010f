//! Boots the cached default image under QEMU (TCG here) and checks, through the real guest
//! agent, what the qemu driver relies on: PID 1 is ours, the mounts podman needs are there,
//! `mk` is on PATH, 9p is available, and podman runs the preloaded base image offline.
//!
//! Needs the image (`.ci/setup-image.sh` builds it) and `qemu-system-x86_64`: without them it
//! skips with a reason, except under `CI=true`, where it fails.

use ci_exec_guest_image::{DEFAULT_IMAGE, ImageCache, Manifest, create_overlay};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn prerequisites() -> Option<Manifest> {
    prerequisites_for(DEFAULT_IMAGE)
}

fn prerequisites_for(name: &str) -> Option<Manifest> {
    let missing = |reason: String| {
        let _ = ci_exec_prerequisite::require(
            "the guest image boot tests",
            Some(reason),
            "bash .ci/setup-image.sh && bash .ci/setup-test-images.sh",
        );
        None
    };
    if Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .is_err()
    {
        return missing("qemu-system-x86_64 not found (apt-get install qemu-system-x86)".into());
    }
    let cache = ImageCache::open(None).expect("open image cache");
    match cache.get(name).expect("read image cache") {
        Some(manifest) => Some(manifest),
        None => missing(format!(
            "image `{name}` is not built in `{}` (run `bash .ci/setup-image.sh`)",
            cache.root().display()
        )),
    }
}

/// A QEMU process killed on drop.
struct Vm {
    child: Child,
    console: PathBuf,
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Vm {
    fn boot(manifest: &Manifest, directory: &Path) -> Self {
        Self::boot_with(manifest, directory, &[])
    }

    /// Boots with extra QEMU arguments (e.g. a seed disk).
    fn boot_with(manifest: &Manifest, directory: &Path, extra: &[String]) -> Self {
        let overlay = directory.join("overlay.qcow2");
        create_overlay(&manifest.disk, &overlay).expect("create overlay");
        let console = directory.join("console.log");
        let socket = directory.join("qga.sock");
        let child = Command::new("qemu-system-x86_64")
            .args([
                "-M",
                "microvm,pit=on,pic=off,rtc=on",
                "-accel",
                "tcg",
                "-cpu",
                "max",
                "-m",
                "1024",
                "-smp",
                "1",
            ])
            .args(["-nodefaults", "-no-user-config", "-nographic", "-no-reboot"])
            .arg("-serial")
            .arg(format!("file:{}", console.display()))
            .arg("-kernel")
            .arg(&manifest.vmlinux)
            .arg("-initrd")
            .arg(&manifest.initrd)
            .arg("-append")
            .arg(&manifest.kernel_cmdline)
            .arg("-drive")
            .arg(format!(
                "id=root,file={},format=qcow2,if=none",
                overlay.display()
            ))
            .args(["-device", "virtio-blk-device,drive=root"])
            .args(["-device", "virtio-serial-device"])
            .arg("-chardev")
            .arg(format!(
                "socket,id=qga,path={},server=on,wait=off",
                socket.display()
            ))
            .args([
                "-device",
                "virtserialport,chardev=qga,name=org.qemu.guest_agent.0",
            ])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .expect("start qemu-system-x86_64");
        Self { child, console }
    }

    fn console(&self) -> String {
        std::fs::read_to_string(&self.console).unwrap_or_default()
    }
}

/// Just enough of the guest agent protocol: sync, then guest-exec and guest-exec-status.
struct Agent {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Agent {
    /// Connects and syncs, retrying until `deadline` (the guest may still be booting).
    fn connect(socket: &Path, vm: &mut Vm, deadline: Instant) -> Self {
        let mut id = 1000u64;
        loop {
            assert!(
                Instant::now() < deadline,
                "guest agent did not answer in time; console:\n{}",
                vm.console()
            );
            if let Ok(Some(status)) = vm.child.try_wait() {
                panic!("qemu exited ({status}); console:\n{}", vm.console());
            }
            id += 1;
            if let Ok(stream) = UnixStream::connect(socket) {
                stream
                    .set_read_timeout(Some(Duration::from_secs(2)))
                    .expect("timeout");
                let mut agent = Agent {
                    reader: BufReader::new(stream.try_clone().expect("clone")),
                    writer: stream,
                };
                let request =
                    format!("{{\"execute\":\"guest-sync\",\"arguments\":{{\"id\":{id}}}}}\n");
                if agent.writer.write_all(request.as_bytes()).is_ok()
                    && agent.wait_for(|reply| reply["return"] == id)
                {
                    agent
                        .writer
                        .set_read_timeout(Some(Duration::from_secs(30)))
                        .expect("timeout");
                    return agent;
                }
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn wait_for(&mut self, matches: impl Fn(&serde_json::Value) -> bool) -> bool {
        let mut line = String::new();
        loop {
            line.clear();
            match self.reader.read_line(&mut line) {
                Ok(0) | Err(_) => return false,
                Ok(_) => {
                    let reply = serde_json::from_str::<serde_json::Value>(
                        line.trim_start_matches('\u{ff}'),
                    );
                    if reply.is_ok_and(|reply| matches(&reply)) {
                        return true;
                    }
                }
            }
        }
    }

    fn call(&mut self, request: serde_json::Value) -> serde_json::Value {
        let mut text = request.to_string();
        text.push('\n');
        self.writer
            .write_all(text.as_bytes())
            .expect("send to agent");
        let mut line = String::new();
        self.reader.read_line(&mut line).expect("agent reply");
        let reply: serde_json::Value = serde_json::from_str(&line).expect("agent reply is JSON");
        assert!(
            reply.get("error").is_none(),
            "agent error for {request}: {reply}"
        );
        reply["return"].clone()
    }

    /// Runs `script` with `sh -c` in the guest; returns (exit code, stdout + stderr).
    fn run(&mut self, script: &str, timeout: Duration) -> (i64, String) {
        let started = self.call(serde_json::json!({
            "execute": "guest-exec",
            "arguments": {"path": "/bin/sh", "arg": ["-c", script], "capture-output": true}
        }));
        let pid = started["pid"].as_i64().expect("pid");
        let deadline = Instant::now() + timeout;
        loop {
            let status = self.call(
                serde_json::json!({"execute": "guest-exec-status", "arguments": {"pid": pid}}),
            );
            if status["exited"] == true {
                let decode = |field: &str| {
                    status[field]
                        .as_str()
                        .map(|data| String::from_utf8_lossy(&base64_decode(data)).into_owned())
                        .unwrap_or_default()
                };
                return (
                    status["exitcode"].as_i64().unwrap_or(-1),
                    decode("out-data") + &decode("err-data"),
                );
            }
            assert!(
                Instant::now() < deadline,
                "`{script}` did not finish within {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

fn base64_decode(text: &str) -> Vec<u8> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD
        .decode(text)
        .expect("agent sends valid base64")
}

#[test]
fn default_image_boots_to_agent_and_runs_podman_offline() {
    let Some(manifest) = prerequisites() else {
        return;
    };
    boots_to_agent_and_runs_podman_offline(&manifest);
}

/// Boots `manifest` and checks PID 1, the mounts, `mk`, 9p and podman with the preloaded image.
fn boots_to_agent_and_runs_podman_offline(manifest: &Manifest) {
    let directory = tempfile::tempdir().expect("tempdir");
    let mut vm = Vm::boot(manifest, directory.path());
    let booted = Instant::now();
    let mut agent = Agent::connect(
        &directory.path().join("qga.sock"),
        &mut vm,
        Instant::now() + Duration::from_secs(120),
    );
    eprintln!(
        "agent answered {:.1} s after qemu started",
        booted.elapsed().as_secs_f64()
    );

    let (code, output) = agent.run(
        "set -e; cat /proc/1/comm; mount | awk '{print $3, $5}'; grep -w 9p /proc/filesystems; \
         test -x /usr/local/bin/mk && echo mk-present; hostname",
        Duration::from_secs(60),
    );
    assert_eq!(code, 0, "{output}");
    assert!(output.starts_with("ci-exec-init\n"), "{output}");
    for mount in [
        "/dev/pts devpts",
        "/tmp tmpfs",
        "/run tmpfs",
        "/sys/fs/cgroup cgroup2",
        "/ ext4",
        "/dev/shm tmpfs",
    ] {
        assert!(
            output.lines().any(|line| line == mount),
            "missing `{mount}` in:\n{output}"
        );
    }
    assert!(output.contains("nodev\t9p"), "{output}");
    assert!(output.contains("mk-present\nci-exec\n"), "{output}");

    let (code, output) = agent.run(
        "podman images --format '{{.Repository}}:{{.Tag}}' && \
         podman run --rm --network=none localhost/ci-exec/base:latest sh -c 'echo hello from $(cat /etc/debian_version | cut -c1-2)'",
        Duration::from_secs(240),
    );
    assert_eq!(code, 0, "{output}\nconsole:\n{}", vm.console());
    assert!(output.contains("localhost/ci-exec/base:latest"), "{output}");
    assert!(output.contains("hello from 12"), "{output}");
}

/// Set in the child process that builds as the normal user: the cache directory to build in.
const BUILD_CHILD: &str = "CI_EXEC_TEST_BUILD_CACHE";

/// The normal user a root test run builds as (it needs ranges in /etc/subuid and /etc/subgid;
/// `.ci/setup-image.sh` creates `ci-exec-builder`).
const BUILD_USER: &str = "CI_EXEC_TEST_BUILD_USER";

/// A normal user builds the default image through mmdebstrap's unshare mode: every cached
/// file is theirs, nothing is left in the exchange directory, the digest matches root's build
/// of the same packages, and the image boots and runs podman offline.
#[test]
fn default_image_builds_as_a_normal_user() {
    if let Some(cache) = std::env::var_os(BUILD_CHILD) {
        build_into(Path::new(&cache));
        return;
    }
    let Some(root_manifest) = prerequisites() else {
        return;
    };
    let scratch = tempfile::Builder::new()
        .prefix("ci-exec-build-test.")
        .tempdir_in("/var/tmp")
        .expect("scratch directory in /var/tmp");
    let cache = scratch.path().join("cache");
    // SAFETY: geteuid has no preconditions.
    let uid = if unsafe { libc::geteuid() } != 0 {
        build_into(&cache);
        unsafe { libc::geteuid() }
    } else {
        let user = std::env::var(BUILD_USER).unwrap_or_else(|_| "ci-exec-builder".to_owned());
        let Some(uid) = user_id(&user) else {
            let _ = ci_exec_prerequisite::require(
                "default_image_builds_as_a_normal_user",
                Some(format!("no user `{user}` to build as")),
                &format!("set {BUILD_USER}, or run `bash .ci/setup-test-images.sh`"),
            );
            return;
        };
        build_as(&user, scratch.path(), &cache);
        uid
    };

    let manifest = ci_exec_guest_image::ImageCache::open(Some(cache.join("ci-exec/images")))
        .expect("open the user's cache")
        .get(DEFAULT_IMAGE)
        .expect("read the user's cache")
        .expect("the user's build left no current image");
    let mut not_theirs = Vec::new();
    owned_by_other(&cache, uid, &mut not_theirs);
    assert!(not_theirs.is_empty(), "not the user's: {not_theirs:?}");
    let left: Vec<_> = std::fs::read_dir("/var/tmp")
        .expect("list /var/tmp")
        .flatten()
        .filter(|entry| {
            entry
                .file_name()
                .to_string_lossy()
                .starts_with("ci-exec-image.")
        })
        .filter(|entry| {
            use std::os::unix::fs::MetadataExt;
            entry.metadata().is_ok_and(|metadata| metadata.uid() == uid)
        })
        .map(|entry| entry.path())
        .collect();
    assert!(
        left.is_empty(),
        "exchange directories left behind: {left:?}"
    );
    if manifest.packages == root_manifest.packages {
        assert_eq!(
            manifest.digest, root_manifest.digest,
            "same packages, same digest"
        );
    }
    boots_to_agent_and_runs_podman_offline(&manifest);
}

/// Builds the default image into `cache` as whoever runs this.
fn build_into(cache: &Path) {
    let binary = |name: &str| {
        ci_exec_guest_image::binaries::locate(name).unwrap_or_else(|| {
            panic!(
                "`{name}` not found: {}",
                ci_exec_guest_image::binaries::BUILD_HINT
            )
        })
    };
    let options = ci_exec_guest_image::BuildOptions::new(binary("mk"), binary("ci-exec-init"));
    ci_exec_guest_image::ImageCache::open(Some(cache.join("ci-exec/images")))
        .expect("open cache")
        .build_default(&options, &ci_exec_guest_image::TracingReporter)
        .expect("build as a normal user");
}

/// Runs this test again as `user`, from copies in `scratch` (the build tree may be under a
/// home the user cannot enter), building into `cache`.
fn build_as(user: &str, scratch: &Path, cache: &Path) {
    let bin = scratch.join("bin");
    std::fs::create_dir_all(&bin).expect("mkdir bin");
    let test = std::env::current_exe().expect("test executable");
    std::fs::copy(&test, bin.join("boot-test")).expect("copy the test executable");
    for name in ["mk", "ci-exec-init"] {
        let found = ci_exec_guest_image::binaries::locate(name).expect("guest binary");
        std::fs::copy(found, bin.join(name)).expect("copy a guest binary");
    }
    let chown = Command::new("chown")
        .arg("-R")
        .arg(format!("{user}:"))
        .arg(scratch)
        .status()
        .expect("run chown");
    assert!(chown.success(), "chown failed");
    let status = Command::new("runuser")
        .args(["-u", user, "--", "env"])
        .arg(format!("{BUILD_CHILD}={}", cache.display()))
        .arg(format!("CI_EXEC_GUEST_BIN={}", bin.display()))
        .arg(format!("HOME={}", scratch.display()))
        .arg(bin.join("boot-test"))
        .args([
            "--exact",
            "default_image_builds_as_a_normal_user",
            "--nocapture",
        ])
        .current_dir(scratch)
        .status()
        .expect("run the build as the normal user");
    assert!(status.success(), "the build as `{user}` failed: {status}");
}

fn user_id(user: &str) -> Option<u32> {
    let output = Command::new("id").args(["-u", user]).output().ok()?;
    if !output.status.success() {
        return None;
    }
    String::from_utf8_lossy(&output.stdout).trim().parse().ok()
}

fn owned_by_other(path: &Path, uid: u32, found: &mut Vec<PathBuf>) {
    use std::os::unix::fs::MetadataExt;
    let Ok(metadata) = std::fs::symlink_metadata(path) else {
        return;
    };
    if metadata.uid() != uid {
        found.push(path.to_owned());
    }
    if metadata.is_dir() {
        for entry in std::fs::read_dir(path).into_iter().flatten().flatten() {
            owned_by_other(&entry.path(), uid, found);
        }
    }
}

/// The real thing: Debian's cloud-init (in the `debian-bookworm-cloud-init` variant, booted with
/// systemd) reads a seed built by `ci-exec-cloud-init` from a virtio disk, and its `write_files`
/// and `runcmd` take effect. `runcmd` reports on the serial console, which the test polls.
#[test]
fn cloud_init_applies_our_nocloud_seed() {
    use ci_exec_cloud_init::{CloudConfig, MetaData, Seed, WriteFile};
    let Some(manifest) = prerequisites_for("debian-bookworm-cloud-init") else {
        return;
    };
    let directory = tempfile::tempdir().expect("tempdir");
    let seed = Seed {
        meta_data: MetaData::new("ci-exec-seed-test", "seeded"),
        user_data: CloudConfig {
            write_files: vec![WriteFile::new("/etc/ci-exec-seed-test", "written by write_files\n").permissions("0600")],
            runcmd: vec![
                "echo \"CI_EXEC_RUNCMD $(cat /etc/ci-exec-seed-test) mode=$(stat -c %a /etc/ci-exec-seed-test) host=$(hostname)\" > /dev/ttyS0"
                    .into(),
            ],
            ..CloudConfig::default()
        },
        network_config: None,
    };
    let seed_path = directory.path().join("seed.img");
    seed.write_image(&seed_path).expect("write seed");
    let vm = Vm::boot_with(
        &manifest,
        directory.path(),
        &[
            "-drive".to_owned(),
            format!(
                "id=seed,file={},format=raw,if=none,readonly=on",
                seed_path.display()
            ),
            "-device".to_owned(),
            "virtio-blk-device,drive=seed".to_owned(),
        ],
    );
    let started = Instant::now();
    let deadline = started + Duration::from_secs(900);
    let expected = "CI_EXEC_RUNCMD written by write_files mode=600 host=seeded";
    loop {
        let console = vm.console();
        if console.contains(expected) {
            eprintln!(
                "cloud-init ran our seed {:.1} s after qemu started",
                started.elapsed().as_secs_f64()
            );
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no `{expected}` on the console within 900 s:\n{console}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}
