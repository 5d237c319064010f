//! `ci-exec test` end to end: the example repositories of `tests/examples/`, run by the real
//! binary on each driver, then replayed; and every bad input the issue lists.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const BINARY: &str = env!("CARGO_BIN_EXE_ci-exec");

/// A throwaway repository made from an example, with its own result store.
struct Repo {
    dir: tempfile::TempDir,
    store: tempfile::TempDir,
}

impl Repo {
    fn empty() -> Repo {
        Repo {
            dir: tempfile::tempdir().expect("tempdir"),
            store: tempfile::tempdir().expect("tempdir"),
        }
    }

    fn example(name: &str) -> Repo {
        let repo = Repo::empty();
        let source = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/examples")
            .join(name);
        copy_dir(&source, repo.path());
        repo.git(&["init", "-q"]);
        repo.commit("example");
        repo
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn git(&self, args: &[&str]) {
        let status = Command::new("git")
            .args([
                "-c",
                "user.name=t",
                "-c",
                "user.email=t@t",
                "-c",
                "init.defaultBranch=main",
            ])
            .args(args)
            .current_dir(self.path())
            .status()
            .expect("git runs");
        assert!(status.success(), "git {args:?}");
    }

    fn commit(&self, message: &str) {
        self.git(&["add", "-A"]);
        self.git(&["commit", "-qm", message]);
    }

    fn write(&self, name: &str, content: &str) {
        std::fs::write(self.path().join(name), content).expect("write");
    }

    /// `ci-exec test --driver=DRIVER ARGS…` in this repository.
    fn test(&self, driver: &str, args: &[&str], env: &[(&str, &str)]) -> Output {
        let mut command = Command::new(BINARY);
        command
            .arg("test")
            .arg(format!("--driver={}", dsn(driver)))
            .args(args)
            .current_dir(self.path())
            .env("CI_EXEC_RESULTS", self.store.path())
            .env("NO_COLOR", "1")
            .env_remove("CI_EXEC_DRIVER")
            .env_remove("CI_EXEC_ENV");
        for (name, value) in env {
            command.env(name, value);
        }
        command.output().expect("ci-exec runs")
    }
}

fn copy_dir(from: &Path, to: &Path) {
    for entry in std::fs::read_dir(from).expect("example exists") {
        let entry = entry.expect("entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("type").is_dir() {
            std::fs::create_dir_all(&target).expect("mkdir");
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).expect("copy");
        }
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn assert_exit(output: &Output, code: i32) {
    assert_eq!(
        output.status.code(),
        Some(code),
        "stdout:\n{}\nstderr:\n{}",
        text(&output.stdout),
        text(&output.stderr)
    );
}

/// The DSN of a test's driver name: `qemu_ubuntu` is the qemu driver booting the Ubuntu image,
/// `qemu_ubuntu_cloud` booting Canonical's cloud image (a stand-in in its format, in CI),
/// `qemu_arm64` the aarch64 image under qemu-system-aarch64, `qemu_alpine_cloud` Alpine's
/// cloud image (a stand-in in its format, in CI).
fn dsn(driver: &str) -> String {
    match driver {
        "qemu_ubuntu" => "qemu:image=ubuntu-noble".to_owned(),
        "qemu_ubuntu_cloud" => "qemu:image=ubuntu-24.04".to_owned(),
        "qemu_arm64" => "qemu:image=debian-bookworm-arm64".to_owned(),
        "qemu_alpine_cloud" => "qemu:image=alpine-3.22".to_owned(),
        other => other.to_owned(),
    }
}

/// Whether `driver` can run here. Missing prerequisites fail under `CI=true` and skip (with
/// the reason) elsewhere.
fn available(driver: &str) -> bool {
    let missing = match driver {
        "native" => {
            let mk = Path::new(BINARY).with_file_name("mk");
            (!mk.is_file()).then(|| {
                format!(
                    "`{}` is missing: build it with `cargo build -p mkrunner`",
                    mk.display()
                )
            })
        }
        "qemu" => qemu_missing("debian-bookworm", ".ci/setup-image.sh"),
        "qemu_ubuntu" => qemu_missing("ubuntu-noble", ".ci/setup-test-images.sh"),
        "qemu_ubuntu_cloud" => qemu_missing("ubuntu-24.04", ".ci/setup-test-images.sh"),
        "qemu_arm64" => qemu_missing("debian-bookworm-arm64", ".ci/setup-test-images.sh"),
        "qemu_alpine_cloud" => qemu_missing("alpine-3.22", ".ci/setup-test-images.sh"),
        "docker" | "podman" => engine_missing(driver),
        other => Some(format!("no prerequisite check for driver `{other}`")),
    };
    ci_exec_prerequisite::require(
        &format!("the job tests on `{driver}`"),
        missing,
        "bash .ci/run installs and starts every driver's prerequisites",
    )
}

fn qemu_missing(image: &str, setup: &str) -> Option<String> {
    let list = Command::new(BINARY)
        .args(["image", "list", "--json"])
        .output()
        .ok()?;
    let images: serde_json::Value = serde_json::from_slice(&list.stdout).unwrap_or_default();
    let built = images
        .as_array()
        .is_some_and(|images| images.iter().any(|built| built["name"] == image));
    (!built).then(|| format!("no guest image `{image}`: run `bash {setup}`"))
}

/// Whether the engine answers and runs its base image (`.ci/setup-docker.sh` starts both
/// engines and exports `DOCKER_HOST` and `CI_EXEC_DOCKER_IMAGE`).
fn engine_missing(driver: &str) -> Option<String> {
    let output = Command::new(BINARY)
        .args(["run", &format!("--driver={driver}"), "--", "true"])
        .output()
        .ok()?;
    (!output.status.success()).then(|| {
        format!(
            "`ci-exec run --driver={driver} -- true` failed ({}): run `bash .ci/setup-docker.sh`",
            text(&output.stderr).trim()
        )
    })
}

/// One test per listed driver for a job case. Every case runs on native; qemu runs one case per
/// example repository (each qemu run boots a VM, and CI's time is shared); docker and podman
/// run the replay case.
macro_rules! job_test {
    ($name:ident, [$($driver:ident),+], |$arg:ident| $body:block) => {
        mod $name {
            use super::*;

            fn case($arg: &str) $body

            $(
                #[test]
                fn $driver() {
                    if available(stringify!($driver)) {
                        case(stringify!($driver));
                    }
                }
            )+
        }
    };
}

job_test!(
    hello_runs_then_replays_byte_exact,
    [
        native,
        qemu,
        docker,
        podman,
        qemu_ubuntu,
        qemu_ubuntu_cloud,
        qemu_alpine_cloud,
        qemu_arm64
    ],
    |driver| {
        let repo = Repo::example("hello");
        let first = repo.test(driver, &[], &[]);
        assert_exit(&first, 0);
        assert!(
            text(&first.stdout).contains("hello from mk test"),
            "{}",
            text(&first.stdout)
        );
        assert!(
            text(&first.stderr).contains("==> mk test"),
            "{}",
            text(&first.stderr)
        );

        let second = repo.test(driver, &[], &[]);
        assert_exit(&second, 0);
        assert_eq!(second.stdout, first.stdout, "replayed stdout is byte-exact");
        assert!(
            text(&second.stderr).contains("==> replaying result"),
            "{}",
            text(&second.stderr)
        );
        assert!(!text(&second.stderr).contains("==> mk test"), "nothing ran");

        let forced = repo.test(driver, &["--no-replay"], &[]);
        assert_exit(&forced, 0);
        assert!(
            text(&forced.stderr).contains("==> mk test"),
            "--no-replay runs"
        );
    }
);

job_test!(
    artifacts_are_collected_and_the_cache_survives,
    [
        native,
        qemu,
        qemu_ubuntu,
        qemu_ubuntu_cloud,
        qemu_alpine_cloud,
        qemu_arm64
    ],
    |driver| {
        let repo = Repo::example("artifacts-cache");
        let artifacts = repo.path().join("collected");
        let report = repo.path().join("report.json");
        let args = ["--artifacts", "collected", "--report", "report.json"];
        let first = repo.test(driver, &args, &[]);
        assert_exit(&first, 0);
        assert!(
            text(&first.stdout).contains("cache empty"),
            "{}",
            text(&first.stdout)
        );
        assert_eq!(
            std::fs::read(artifacts.join("result.txt")).expect("artifact"),
            b"built\n"
        );
        assert_eq!(
            std::fs::read(artifacts.join("data.bin")).expect("artifact"),
            b"\0\x01\x02binary\xff"
        );
        let json: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&report).expect("report")).expect("json");
        assert_eq!(json["replayed"], false);
        assert_eq!(json["exit_code"], 0);
        assert_eq!(
            json["artifacts"].as_array().map(Vec::len),
            Some(2),
            "{json}"
        );

        let second = repo.test(driver, &["--no-replay"], &[]);
        assert_exit(&second, 0);
        assert!(
            text(&second.stdout).contains("cache restored: run 1"),
            "{}",
            text(&second.stdout)
        );
        let fresh = repo.test(driver, &["--no-replay", "--fresh"], &[]);
        assert!(
            text(&fresh.stdout).contains("cache empty"),
            "--fresh ignores the cache"
        );

        // A replay restores the artifacts too.
        std::fs::remove_dir_all(&artifacts).expect("rm");
        let replay = repo.test(driver, &args, &[]);
        assert_exit(&replay, 0);
        assert!(artifacts.join("data.bin").is_file());
        let json: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&report).expect("report")).expect("json");
        assert_eq!(json["replayed"], true);
    }
);

job_test!(
    a_failing_test_exits_1_and_is_never_replayed,
    [native, qemu],
    |driver| {
        let repo = Repo::example("failing");
        let first = repo.test(driver, &[], &[]);
        assert_exit(&first, 1);
        assert!(
            text(&first.stderr).contains("expected 2, got 3"),
            "{}",
            text(&first.stderr)
        );
        let second = repo.test(driver, &[], &[]);
        assert_exit(&second, 1);
        assert!(
            !text(&second.stderr).contains("replaying"),
            "{}",
            text(&second.stderr)
        );
    }
);

job_test!(
    a_damaged_result_is_discarded_and_the_job_runs,
    [native],
    |driver| {
        let repo = Repo::example("hello");
        assert_exit(&repo.test(driver, &[], &[]), 0);
        // Corrupt every blob the result names: replay must refuse it.
        for blob in walk(&repo.store.path().join("blobs")) {
            std::fs::write(&blob, b"tampered").expect("write");
        }
        let output = repo.test(driver, &[], &[]);
        assert_exit(&output, 0);
        let stderr = text(&output.stderr);
        assert!(stderr.contains("warning: blob"), "{stderr}");
        assert!(
            stderr.contains("==> mk test"),
            "the job ran for real: {stderr}"
        );
        assert!(text(&output.stdout).contains("hello from mk test"));
    }
);

job_test!(
    env_files_and_inputs_reach_the_test_but_the_host_env_does_not,
    [native, qemu],
    |driver| {
        let repo = Repo::example("env-files");
        let host = [("HOST_ONLY", "leaked"), ("INPUT", "one")];
        let first = repo.test(driver, &["--env", "INPUT"], &host);
        assert_exit(&first, 0);
        let stdout = text(&first.stdout);
        assert!(
            stdout.contains("GREETING=[hello from an env file]"),
            "{stdout}"
        );
        assert!(
            stdout.contains("CONTAINERIMAGE=[localhost/ci-exec/base:latest]"),
            "{stdout}"
        );
        assert!(stdout.contains("HOST_ONLY=[unset]"), "{stdout}");
        assert!(stdout.contains("INPUT=[one]"), "{stdout}");
        // A declared input is part of the key: a new value runs again.
        let changed = repo.test(driver, &["--env", "INPUT"], &[("INPUT", "two")]);
        assert_exit(&changed, 0);
        assert!(text(&changed.stdout).contains("INPUT=[two]"));
        let same = repo.test(driver, &[], &[("CI_EXEC_ENV", "INPUT"), ("INPUT", "two")]);
        assert!(
            text(&same.stderr).contains("replaying"),
            "CI_EXEC_ENV declares inputs too"
        );
    }
);

job_test!(
    secrets_are_masked_live_and_in_the_record,
    [native, qemu],
    |driver| {
        let repo = Repo::example("secrets");
        let secret = [("API_TOKEN", "s3cr3t-value")];
        let first = repo.test(driver, &["--secret", "API_TOKEN"], &secret);
        assert_exit(&first, 0);
        let stdout = text(&first.stdout);
        assert!(stdout.contains("token is ***"), "{stdout}");
        assert!(!stdout.contains("s3cr3t"), "{stdout}");
        // Not hashed: another value replays the same result, still masked.
        let other = repo.test(
            driver,
            &["--secret", "API_TOKEN"],
            &[("API_TOKEN", "another")],
        );
        assert!(
            text(&other.stderr).contains("replaying"),
            "{}",
            text(&other.stderr)
        );
        assert!(!text(&other.stdout).contains("s3cr3t"));
        let store = walk(repo.store.path());
        for file in store {
            let bytes = std::fs::read(&file).expect("read");
            assert!(
                !text(&bytes).contains("s3cr3t"),
                "secret stored in {}",
                file.display()
            );
        }
        let missing = repo.test(driver, &["--secret", "API_TOKEN"], &[]);
        assert_exit(&missing, 2);
        assert!(text(&missing.stderr).contains("`API_TOKEN` is declared as a secret"));
    }
);

job_test!(
    only_the_committed_tree_reaches_the_job,
    [native],
    |driver| {
        let repo = Repo::example("hello");
        repo.write("mkfile", "test:V:\n\techo dirty work tree\n");
        repo.write("untracked", "x");
        let output = repo.test(driver, &[], &[]);
        assert_exit(&output, 0);
        assert!(text(&output.stdout).contains("hello from mk test"));
        assert!(!text(&output.stdout).contains("dirty"));
    }
);

job_test!(binary_output_replays_byte_exact, [native], |driver| {
    let repo = Repo::empty();
    repo.git(&["init", "-q"]);
    repo.write(
        "mkfile",
        "test:VQ:\n\tprintf '\\000\\377\\r\\n'\n\thead -c 300000 /dev/zero | tr '\\000' 'x'\n\tprintf 'err\\001' >&2\n",
    );
    repo.commit("binary");
    let first = repo.test(driver, &[], &[]);
    assert_exit(&first, 0);
    assert!(first.stdout.starts_with(b"\0\xff\r\n"));
    assert_eq!(first.stdout.len(), 4 + 300_000);
    let second = repo.test(driver, &[], &[]);
    assert!(text(&second.stderr).contains("replaying"));
    assert_eq!(second.stdout, first.stdout);
    // Recorded stderr holds only the job's own bytes; replay writes them between its own lines.
    let replayed_stderr = text(&second.stderr);
    let job_stderr = replayed_stderr
        .split_once('\n')
        .map(|(_, rest)| rest)
        .and_then(|rest| {
            rest.strip_suffix(&format!(
                "==> passed (replayed result {})\n",
                &key_of(&second)
            ))
        })
        .expect("replay lines around the recorded stderr");
    assert_eq!(job_stderr, "err\u{1}");
});

job_test!(
    two_jobs_at_once_in_one_repository_both_work,
    [native],
    |driver| {
        let repo = Repo::example("hello");
        let (a, b) = std::thread::scope(|scope| {
            let a = scope.spawn(|| repo.test(driver, &["--no-replay"], &[]));
            let b = scope.spawn(|| repo.test(driver, &["--no-replay"], &[]));
            (a.join().expect("a"), b.join().expect("b"))
        });
        assert_exit(&a, 0);
        assert_exit(&b, 0);
    }
);

job_test!(
    a_truncated_record_is_moved_aside_and_the_job_runs,
    [native],
    |driver| {
        let repo = Repo::example("hello");
        assert_exit(&repo.test(driver, &[], &[]), 0);
        let ok = repo.store.path().join("ok");
        for record in walk(&ok) {
            let json = std::fs::read(&record).expect("record");
            std::fs::write(&record, &json[..json.len() / 2]).expect("truncate");
        }
        let output = repo.test(driver, &[], &[]);
        assert_exit(&output, 0);
        let stderr = text(&output.stderr);
        assert!(stderr.contains("is damaged"), "{stderr}");
        assert!(
            stderr.contains("==> mk test"),
            "the job ran for real: {stderr}"
        );
        assert_eq!(
            walk(&repo.store.path().join("damaged")).len(),
            1,
            "moved aside"
        );
        let again = repo.test(driver, &[], &[]);
        assert!(
            text(&again.stderr).contains("replaying"),
            "a new record was made"
        );
    }
);

job_test!(
    mkfile_commands_never_run_on_the_host,
    [qemu, docker, podman],
    |driver| {
        let host = tempfile::tempdir().expect("tempdir");
        let marker = |name: &str| host.path().join("never").join(name);
        let repo = Repo::empty();
        repo.git(&["init", "-q"]);
        repo.write(
            "mkfile",
            &format!(
                "X=`{{mkdir -p {dir} && touch {backquote} && echo computed-where-the-job-runs}}\n\
                 <|mkdir -p {dir} && touch {include} && echo Y=from-an-include\n\
                 ARTIFACTS=/var/run/ci/artifacts/x-$X\n\
                 test:V:\n\techo X=$X Y=$Y\n\
                 /var/run/ci/artifacts/x-$X:\n\techo $Y > $target\n",
                dir = marker("").display(),
                backquote = marker("backquote").display(),
                include = marker("include").display(),
            ),
        );
        repo.commit("commands");
        let output = repo.test(driver, &["--artifacts", "out"], &[]);
        assert_exit(&output, 0);
        assert!(
            !host.path().join("never").exists(),
            "the mkfile's commands ran on the host"
        );
        let stdout = text(&output.stdout);
        assert!(
            stdout.contains("X=computed-where-the-job-runs Y=from-an-include"),
            "{stdout}"
        );
        assert_eq!(
            std::fs::read(repo.path().join("out/x-computed-where-the-job-runs"))
                .expect("the artifact the guest's plan named"),
            b"from-an-include\n"
        );
    }
);

job_test!(the_guest_image_digest_is_in_the_key, [qemu], |_driver| {
    // The same image under another digest (a rebuilt image) must not replay the first result.
    let repo = Repo::example("hello");
    let images = tempfile::tempdir().expect("tempdir");
    let current = Command::new(BINARY)
        .args(["image", "path", "--json"])
        .output()
        .expect("image path");
    // `image path --json` holds every field a pinned `image=DIR` manifest needs.
    let mut manifest: serde_json::Value =
        serde_json::from_slice(&current.stdout).expect("image path --json");
    let real = manifest["digest"].as_str().expect("digest").to_owned();
    manifest["digest"] = serde_json::Value::from("0".repeat(64));
    manifest["name"] = serde_json::Value::from("key-test");
    std::fs::write(
        images.path().join("manifest.json"),
        serde_json::to_vec(&manifest).expect("json"),
    )
    .expect("write manifest");

    let first = repo.test("qemu", &["--report", "first.json"], &[]);
    assert_exit(&first, 0);
    let other = format!("qemu:warm=false,image={}", images.path().display());
    let second = repo.test(&other, &["--report", "second.json"], &[]);
    assert_exit(&second, 0);
    assert!(
        !text(&second.stderr).contains("replaying"),
        "another image replayed the first result: {}",
        text(&second.stderr)
    );
    let report = |name: &str| -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(repo.path().join(name)).expect("report"))
            .expect("json")
    };
    assert_eq!(report("first.json")["environment"], real.as_str());
    assert_eq!(
        report("second.json")["environment"],
        "0".repeat(64).as_str()
    );
    assert_ne!(report("first.json")["key"], report("second.json")["key"]);
});

/// An HTTP server on every host address that answers each request with `body`, for as long
/// as it lives: what a repository's setup downloads. Returns its port.
struct HostServer {
    port: u16,
}

impl HostServer {
    fn start(body: &'static str) -> HostServer {
        use std::io::{Read as _, Write as _};
        let listener = std::net::TcpListener::bind("0.0.0.0:0").expect("bind");
        let port = listener.local_addr().expect("address").port();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let mut stream = stream;
                // The whole request head, however it was split: closing a socket with unread
                // bytes sends a reset, which can overtake the response (bash's printf writes
                // a request in pieces).
                let mut request = Vec::new();
                let mut chunk = [0u8; 4096];
                while !request.windows(4).any(|window| window == b"\r\n\r\n") {
                    match stream.read(&mut chunk) {
                        Ok(0) | Err(_) => break,
                        Ok(read) => request.extend_from_slice(&chunk[..read]),
                    }
                }
                let _ = write!(
                    stream,
                    "HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                );
                let _ = stream.shutdown(std::net::Shutdown::Write);
            }
        });
        HostServer { port }
    }
}

/// A shell line that fetches `http://$SERVER/` with bash's /dev/tcp (no curl in a minimal
/// image) and prints the body, or `unreachable`. mk passes recipes to the shell as written.
/// A connection that opens but yields no body prints `empty response`.
const FETCH: &str = "bash -c 'exec 3<>/dev/tcp/${SERVER%:*}/${SERVER#*:} && printf \"GET / HTTP/1.0\\r\\n\\r\\n\" >&3 && body=$(sed \"1,/^\\r$/d\" <&3) && echo \"${body:-empty response}\"' 2>/dev/null || echo unreachable";

job_test!(
    a_repository_shaped_like_a_real_one_builds_its_test_image_online,
    [qemu, qemu_ubuntu],
    |driver| {
        // base-image builds a test image with `podman build` on podman's default network
        // (its RUN downloads from a server on the host); the image's ENV PATH puts its tool
        // on the path; an env file names the image; a cache target and an artifact.
        let server = HostServer::start("downloaded-by-run\n");
        let repo = Repo::empty();
        repo.git(&["init", "-q"]);
        repo.write(
            "Containerfile",
            "FROM localhost/ci-exec/base:latest\n\
             ARG SERVER\n\
             RUN mkdir -p /opt/tool && printf '#!/bin/sh\\necho tool ran\\n' > /opt/tool/thetool && chmod +x /opt/tool/thetool\n\
             RUN bash -c 'exec 3<>/dev/tcp/${SERVER%:*}/${SERVER#*:} && printf \"GET / HTTP/1.0\\r\\n\\r\\n\" >&3 && sed \"1,/^\\r$/d\" <&3 > /opt/tool/fetched'\n\
             ENV PATH=/opt/tool:$PATH\n",
        );
        repo.write(
            "mkfile",
            "prepare-runtime:V: base-image\n\ttrue\n\
             base-image:V:\n\tpodman build -q --build-arg SERVER=$SERVER -t localhost/tool:1 .\n\
             /var/run/ci/env/CONTAINERIMAGE: base-image\n\techo localhost/tool:1 > $target\n\
             /var/run/ci/cache/deps:\n\tmkdir -p $target && date > $target/stamp\n\
             test:V:\n\tthetool\n\tcat /opt/tool/fetched\n\techo \"PATH=$PATH\"\n\
             /var/run/ci/artifacts/report.txt:\n\tthetool > $target 2>&1 || echo \"from the base OS\" > $target\n",
        );
        repo.commit("a real-shaped repository");
        let address = format!("10.0.2.2:{}", server.port);
        let output = repo.test(
            driver,
            &["--env", "SERVER", "--artifacts", "out"],
            &[("SERVER", &address)],
        );
        assert_exit(&output, 0);
        let stdout = text(&output.stdout);
        assert!(stdout.contains("tool ran\n"), "{stdout}");
        assert!(stdout.contains("downloaded-by-run\n"), "{stdout}");
        assert!(
            stdout.contains("PATH=/opt/ci-exec/bin:/opt/tool:/usr/local/sbin"),
            "the image's PATH, our tools in front: {stdout}"
        );
        assert!(repo.path().join("out/report.txt").is_file());
    }
);

job_test!(
    the_base_os_is_online_and_the_test_offline_unless_the_mkfile_declares_it,
    [qemu, qemu_ubuntu, qemu_ubuntu_cloud],
    |driver| {
        let server = HostServer::start("reached\n");
        let address = format!("10.0.2.2:{}", server.port);
        let repo = Repo::empty();
        repo.git(&["init", "-q"]);
        let mkfile = |declaration: &str| {
            format!(
                "{declaration}prepare-runtime:V:\n\techo \"setup: $({FETCH})\"\n\
                 test:V:\n\techo \"test: $({FETCH})\"\n"
            )
        };
        repo.write("mkfile", &mkfile(""));
        repo.commit("offline test");
        repo.write("mkfile", &mkfile("TEST_NETWORK=on\n"));
        repo.commit("online test");
        let env = [("SERVER", address.as_str())];
        // `--rev` tests a revision that is not checked out.
        let offline = repo.test(driver, &["--env", "SERVER", "--rev", "HEAD~1"], &env);
        assert_exit(&offline, 0);
        let stdout = text(&offline.stdout);
        assert!(stdout.contains("setup: reached"), "{stdout}");
        assert!(stdout.contains("test: unreachable"), "{stdout}");
        let online = repo.test(driver, &["--env", "SERVER"], &env);
        assert_exit(&online, 0);
        assert!(
            text(&online.stdout).contains("test: reached"),
            "{}{}",
            text(&online.stdout),
            text(&online.stderr)
        );
        let none = repo.test(
            driver,
            &["--env", "SERVER", "--offline", "--no-replay"],
            &env,
        );
        assert_exit(&none, 0);
        let stdout = text(&none.stdout);
        assert!(
            stdout.contains("setup: unreachable") && stdout.contains("test: unreachable"),
            "{stdout}"
        );
    }
);

job_test!(
    a_busybox_base_image_runs_the_job_with_our_static_mk_at_another_revision,
    [docker],
    |driver| {
        // Our static mk is uploaded: a dynamically linked one would not start where there is
        // no libc. `--rev` picks a commit that is not checked out.
        let repo = Repo::empty();
        repo.git(&["init", "-q"]);
        repo.write(
            "mkfile",
            "prepare-runtime:V:\n\techo setup on $(uname -s)\ntest:V:\n\techo first revision\n",
        );
        repo.commit("first");
        repo.write("mkfile", "test:V:\n\techo second revision\n");
        repo.commit("second");
        let dsn = format!("{driver}:image={BUSYBOX_IMAGE}");
        let first = repo.test(&dsn, &["--rev", "HEAD^"], &[]);
        assert_exit(&first, 0);
        let stdout = text(&first.stdout);
        assert!(
            stdout.contains("setup on Linux") && stdout.contains("first revision"),
            "{stdout}"
        );
        let head = repo.test(&dsn, &[], &[]);
        assert_exit(&head, 0);
        assert!(text(&head.stdout).contains("second revision"));
        let unknown = repo.test(&dsn, &["--rev", "no-such-branch"], &[]);
        assert_exit(&unknown, 2);
        assert!(text(&unknown.stderr).contains("revision `no-such-branch` names no commit"));
    }
);

job_test!(
    a_second_run_starts_from_the_repositorys_warm_state_and_fresh_does_not,
    [qemu],
    |driver| {
        let mkfile = "prepare-runtime:V: base-image\n\ttrue\n\
                      base-image:V:\n\t(podman image exists localhost/kept:1 && echo state: warm) || echo state: cold\n\
                      \tpodman build -q -t localhost/kept:1 .\n\
                      test:V:\n\ttrue\n";
        let repository = || {
            let repo = Repo::empty();
            repo.git(&["init", "-q"]);
            repo.write(
                "Containerfile",
                "FROM localhost/ci-exec/base:latest\nRUN echo built > /built\n",
            );
            repo.write("mkfile", mkfile);
            repo.commit("warm state");
            repo
        };
        let repo = repository();
        let state = |output: &Output| {
            let stdout = text(&output.stdout);
            assert_exit(output, 0);
            // mk echoes the recipe line too: look for the answer alone on its line.
            if stdout.lines().any(|line| line == "state: warm") {
                "warm"
            } else {
                "cold"
            }
        };
        assert_eq!(state(&repo.test(driver, &[], &[])), "cold");
        assert_eq!(state(&repo.test(driver, &["--no-replay"], &[])), "warm");
        assert_eq!(
            state(&repo.test(driver, &["--no-replay", "--fresh"], &[])),
            "cold"
        );
        // Another repository never sees it.
        let other = repository();
        assert_eq!(state(&other.test(driver, &[], &[])), "cold");
        // A failed run keeps nothing of what it did.
        repo.write(
            "mkfile",
            &mkfile.replace("test:V:\n\ttrue", "test:V:\n\tfalse"),
        );
        repo.commit("failing");
        assert_exit(&repo.test(driver, &["--fresh"], &[]), 1);
        repo.write("mkfile", &format!("# again\n{mkfile}"));
        repo.commit("passing again");
        assert_eq!(
            state(&repo.test(driver, &[], &[])),
            "warm",
            "the last kept state stays"
        );
        let listing = Command::new(BINARY)
            .args(["cache", "list", "--json"])
            .output()
            .expect("cache list");
        let states: serde_json::Value = serde_json::from_slice(&listing.stdout).expect("json");
        assert!(
            states.as_array().is_some_and(|states| states.len() >= 2),
            "{states}"
        );
    }
);

/// A base image with nothing but a static busybox (`.ci/setup-docker.sh` imports it).
const BUSYBOX_IMAGE: &str = "localhost/ci-exec/busybox:latest";

/// The 12-character key prefix a replay names on stderr.
fn key_of(output: &Output) -> String {
    let stderr = text(&output.stderr);
    let start = stderr.find("replaying result ").expect("replay line") + "replaying result ".len();
    stderr[start..start + 12].to_owned()
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            files.extend(walk(&path));
        } else {
            files.push(path);
        }
    }
    files
}

// Bad input: each fails before any work with exit 2 and a line saying how to fix it.

#[test]
fn not_a_git_repository() {
    let repo = Repo::empty();
    let output = repo.test("native", &[], &[]);
    assert_exit(&output, 2);
    let stderr = text(&output.stderr);
    assert!(
        stderr.contains("is not inside a git repository"),
        "{stderr}"
    );
    assert!(stderr.contains("hint:"), "{stderr}");
}

#[test]
fn empty_repository() {
    let repo = Repo::empty();
    repo.git(&["init", "-q"]);
    let output = repo.test("native", &[], &[]);
    assert_exit(&output, 2);
    assert!(
        text(&output.stderr).contains("has no commits yet"),
        "{}",
        text(&output.stderr)
    );
}

#[test]
fn no_mkfile() {
    let repo = Repo::empty();
    repo.git(&["init", "-q"]);
    repo.write("README", "x");
    repo.commit("no mkfile");
    let output = repo.test("native", &[], &[]);
    assert_exit(&output, 2);
    assert!(
        text(&output.stderr).contains("no `mkfile` is committed"),
        "{}",
        text(&output.stderr)
    );
}

#[test]
fn uncommitted_mkfile_is_not_seen() {
    let repo = Repo::empty();
    repo.git(&["init", "-q"]);
    repo.write("README", "x");
    repo.commit("no mkfile");
    repo.write("mkfile", "test:V:\n\techo hi\n");
    let output = repo.test("native", &[], &[]);
    assert_exit(&output, 2);
    assert!(text(&output.stderr).contains("uncommitted files are ignored"));
}

#[test]
fn mkfile_without_test() {
    let repo = Repo::empty();
    repo.git(&["init", "-q"]);
    repo.write("mkfile", "build:V:\n\techo hi\n");
    repo.commit("no test");
    let output = repo.test("native", &[], &[]);
    assert_exit(&output, 2);
    assert!(
        text(&output.stderr).contains("has no `test` target"),
        "{}",
        text(&output.stderr)
    );
}

#[test]
fn mkfile_syntax_error_prints_mks_diagnostic() {
    let repo = Repo::empty();
    repo.git(&["init", "-q"]);
    repo.write("mkfile", "test:V:\n\techo hi\nfoo bar\n");
    repo.commit("bad");
    let output = repo.test("native", &[], &[]);
    assert_exit(&output, 2);
    let stderr = text(&output.stderr);
    assert!(
        stderr.starts_with("error: cannot read the mkfile\ncaused by: mk: error:"),
        "{stderr}"
    );
    assert!(stderr.contains("mkfile:3"), "{stderr}");
}

#[test]
fn unknown_driver() {
    let repo = Repo::example("hello");
    let output = repo.test("nosuch", &[], &[]);
    assert_exit(&output, 2);
    assert!(
        text(&output.stderr).contains("nosuch"),
        "{}",
        text(&output.stderr)
    );
}

#[test]
fn results_list_and_show() {
    if !available("native") {
        return;
    }
    let repo = Repo::example("hello");
    assert_exit(&repo.test("native", &["--report", "r.json"], &[]), 0);
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(repo.path().join("r.json")).expect("report"))
            .expect("json");
    let key = report["key"].as_str().expect("key").to_owned();
    let results = |args: &[&str]| {
        Command::new(BINARY)
            .arg("results")
            .args(args)
            .env("CI_EXEC_RESULTS", repo.store.path())
            .output()
            .expect("runs")
    };
    let list = results(&["list", "--json"]);
    assert_exit(&list, 0);
    let records: serde_json::Value = serde_json::from_slice(&list.stdout).expect("json");
    assert_eq!(records[0]["key"], key);
    let show = results(&["show", &key[..8]]);
    assert_exit(&show, 0);
    assert!(text(&show.stdout).contains(&key));
    assert_exit(&results(&["show", "ffffffff"]), 2);
    assert_exit(&results(&["prune", "--all"]), 0);
    let list = results(&["list", "--json"]);
    assert_eq!(text(&list.stdout).trim(), "[]");
}

#[path = "job/remote.rs"]
mod remote;

#[path = "job/ci.rs"]
mod ci;

/// The fake Kubernetes API server (pods on the Docker engine of `.ci/setup-docker.sh`) on a
/// runtime of its own, with a kubeconfig for it; `None` when no engine is reachable.
fn fake_kube() -> Option<&'static (ci_exec_fake_kube::FakeKube, PathBuf)> {
    static FAKE: std::sync::OnceLock<Option<(ci_exec_fake_kube::FakeKube, PathBuf)>> =
        std::sync::OnceLock::new();
    FAKE.get_or_init(|| {
        let host = std::env::var("DOCKER_HOST")
            .ok()
            .filter(|host| !host.is_empty())
            .or_else(|| {
                Path::new("/run/ci-exec/docker.sock")
                    .exists()
                    .then(|| "unix:///run/ci-exec/docker.sock".to_owned())
            })?;
        let (sender, receiver) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Runtime::new().expect("runtime");
            runtime.block_on(async move {
                let options = ci_exec_fake_kube::FakeOptions {
                    namespaces: vec!["ci".to_owned()],
                    tokens: vec!["job-token".to_owned()],
                    docker_host: Some(host),
                    ..ci_exec_fake_kube::FakeOptions::default()
                };
                let _ = sender.send(ci_exec_fake_kube::FakeKube::start(options).await.ok());
                std::future::pending::<()>().await;
            });
        });
        let fake = receiver.recv().ok()??;
        let directory =
            std::env::temp_dir().join(format!("ci-exec-job-kube-{}", std::process::id()));
        std::fs::create_dir_all(&directory).ok()?;
        let kubeconfig = fake
            .write_kubeconfig(&directory.join("kubeconfig"), "ci", "job-token")
            .ok()?;
        Some((fake, kubeconfig))
    })
    .as_ref()
}

/// `ci-exec test --driver=k8s`: the base-OS steps and `mk test` run as pods of the fake API
/// server (each a real container on Docker), sharing the source through a PVC; then the
/// result replays.
#[test]
fn hello_runs_on_k8s_against_the_fake_api_server() {
    let fake = fake_kube();
    let missing = match fake {
        None => Some(
            "no Docker engine for the fake API server's pods: run `bash .ci/setup-docker.sh`"
                .to_owned(),
        ),
        Some(_) => engine_missing("docker"),
    };
    if !ci_exec_prerequisite::require(
        "the job tests on `k8s`",
        missing,
        "bash .ci/run installs and starts every driver's prerequisites",
    ) {
        return;
    }
    let Some((_, kubeconfig)) = fake else { return };
    let image = std::env::var("CI_EXEC_DOCKER_IMAGE")
        .unwrap_or_else(|_| "localhost/ci-exec/base:latest".to_owned());
    let dsn = format!("k8s://ci?kubeconfig={}&image={image}", kubeconfig.display());
    let repo = Repo::example("hello");
    let first = hello_first_run(&repo, &dsn, &[], "k8s", "job-token");
    assert_replays(&repo, &dsn, &[], &first);
}

/// The hello example's first run on `dsn`: it passes, says it ran on `driver`, and its output
/// does not show `secret`.
fn hello_first_run(
    repo: &Repo,
    dsn: &str,
    env: &[(&str, &str)],
    driver: &str,
    secret: &str,
) -> Output {
    let first = repo.test(dsn, &[], env);
    assert_exit(&first, 0);
    assert!(
        text(&first.stdout).contains("hello from mk test"),
        "{}",
        text(&first.stdout)
    );
    assert!(
        text(&first.stderr).contains(&format!("on `{driver}`")),
        "{}",
        text(&first.stderr)
    );
    assert!(
        !text(&first.stderr).contains(secret),
        "{}",
        text(&first.stderr)
    );
    first
}

/// A second run of `first`'s inputs replays its stdout byte for byte.
fn assert_replays(repo: &Repo, dsn: &str, env: &[(&str, &str)], first: &Output) {
    let second = repo.test(dsn, &[], env);
    assert_exit(&second, 0);
    assert_eq!(second.stdout, first.stdout, "replayed stdout is byte-exact");
    assert!(
        text(&second.stderr).contains("==> replaying result"),
        "{}",
        text(&second.stderr)
    );
}

/// The fake Fly Machines API (machines are containers on the Docker engine of
/// `.ci/setup-docker.sh`) on a runtime of its own; `None` when no engine answers.
fn fake_fly() -> Option<&'static ci_exec_fake_cloud::FakeCloud> {
    static FAKE: std::sync::OnceLock<Option<ci_exec_fake_cloud::FakeCloud>> =
        std::sync::OnceLock::new();
    FAKE.get_or_init(|| {
        let (sender, receiver) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Runtime::new().expect("runtime");
            runtime.block_on(async move {
                let fake = ci_exec_fake_cloud::FakeCloud::start(
                    ci_exec_fake_cloud::Api::Fly,
                    ci_exec_fake_cloud::FakeOptions::default(),
                )
                .await;
                let _ = sender.send(fake.ok());
                std::future::pending::<()>().await;
            });
        });
        receiver.recv().ok()?
    })
    .as_ref()
}

/// `ci-exec test --driver=fly`: the base-OS steps and `mk test` run as Fly Machines of the
/// fake API (each a real container on Docker running our agent), sharing the source through
/// the namespace's Fly volume; then the result replays.
#[test]
fn hello_runs_on_fly_against_the_fake_api() {
    let fake = fake_fly();
    let missing = match fake {
        None => Some(
            "no Docker engine for the fake Fly API's machines: run `bash .ci/setup-docker.sh`"
                .to_owned(),
        ),
        Some(_) => ci_exec_guest_image::binaries::locate_static("ci-exec-init")
            .is_none()
            .then(|| {
                "no static ci-exec-init (the machines' agent): run `bash .ci/setup-fly.sh`"
                    .to_owned()
            }),
    };
    if !ci_exec_prerequisite::require(
        "the job tests on `fly`",
        missing,
        "bash .ci/run installs and starts every driver's prerequisites",
    ) {
        return;
    }
    let Some(fake) = fake else { return };
    let image = std::env::var("CI_EXEC_DOCKER_IMAGE")
        .unwrap_or_else(|_| "localhost/ci-exec/base:latest".to_owned());
    let dsn = format!(
        "fly://ci?token=fake-cloud-token&endpoint={}",
        fake.endpoint()
    );
    let repo = Repo::example("hello");
    let env = [("CI_EXEC_DOCKER_IMAGE", image.as_str())];
    let first = hello_first_run(&repo, &dsn, &env, "fly", "fake-cloud-token");
    // A named namespace keeps its volumes (here the app's Fly volume), not its machines.
    assert!(
        fake.fly_machines().is_empty(),
        "every machine is deleted: {:?}",
        fake.fly_machines()
    );
    assert_replays(&repo, &dsn, &env, &first);
    let closed = Command::new(BINARY)
        .args(["driver", "close", &format!("--driver={dsn}")])
        .output()
        .expect("ci-exec runs");
    assert_exit(&closed, 0);
    assert!(
        fake.fly_apps().is_empty(),
        "`driver close` deletes the app: {:?}",
        fake.fly_apps()
    );
    assert_eq!(fake.violations(), Vec::<String>::new());
}
