//! The job flow over the recording fake driver: the step sequence, env files, artifacts,
//! cache, secrets and the failure paths, with no VM, container or host process.

use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use ci_exec_driver::fake::{Answer, FakeDriver, Reply, TaskCall};
use ci_exec_driver::{DriverError, JobSupport, MkSource};

use super::*;

const FULL_MKFILE: &str = "\
test:V:
\techo testing
prepare-runtime:V: base-image
\ttrue
base-image:V:
\ttrue
/var/run/ci/env/CONTAINERIMAGE: base-image
\techo localhost/built:1 > $target
/var/run/ci/artifacts/report.txt:
\techo report > $target
/var/run/ci/cache/deps:
\tmkdir -p $target
post-test:V:
\techo done
";

/// A committed repository holding `mkfile`.
struct Repo {
    dir: tempfile::TempDir,
}

impl Repo {
    fn new(mkfile: &str) -> Repo {
        let dir = tempfile::tempdir().expect("tempdir");
        let repo = git2::Repository::init(dir.path()).expect("git init");
        std::fs::write(dir.path().join("mkfile"), mkfile).expect("write mkfile");
        let mut index = repo.index().expect("index");
        index.add_path(Path::new("mkfile")).expect("add");
        index.write().expect("write index");
        let tree = repo
            .find_tree(index.write_tree().expect("tree"))
            .expect("find tree");
        let signature = git2::Signature::now("test", "test@example.com").expect("signature");
        repo.commit(Some("HEAD"), &signature, &signature, "init", &tree, &[])
            .expect("commit");
        Repo { dir }
    }

    fn options(&self) -> JobOptions {
        JobOptions {
            path: self.dir.path().to_owned(),
            ..JobOptions::default()
        }
    }
}

/// A writer whose bytes the test reads afterwards.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Captured {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap_or_else(PoisonError::into_inner)).into_owned()
    }
}

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

struct Screen {
    stdout: Captured,
    stderr: Captured,
    status: Captured,
}

impl Screen {
    fn new() -> (Screen, Terminal) {
        let screen = Screen {
            stdout: Captured::default(),
            stderr: Captured::default(),
            status: Captured::default(),
        };
        let terminal = Terminal {
            stdout: Box::new(screen.stdout.clone()),
            stderr: Box::new(screen.stderr.clone()),
            status: Box::new(screen.status.clone()),
        };
        (screen, terminal)
    }
}

fn tar_of(files: &[(&str, &str)]) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    for (name, content) in files {
        let mut header = tar::Header::new_gnu();
        header.set_size(content.len() as u64);
        header.set_mode(0o644);
        header.set_entry_type(tar::EntryType::Regular);
        builder
            .append_data(&mut header, name, content.as_bytes())
            .expect("append");
    }
    builder.into_inner().expect("tar")
}

/// Answers the flow's helper steps as a base OS would, and `mk` steps with `mk TARGET`-named
/// output; `overrides` decides first.
fn base_os(overrides: impl Fn(&TaskCall) -> Option<Answer> + Send + Sync + 'static) -> FakeDriver {
    FakeDriver::new(move |call| {
        if let Some(answer) = overrides(call) {
            return answer;
        }
        let line = call.line();
        let reply = if line.contains("cd /var/run/ci/env/ && tar -c") {
            Reply::ok().stdout(tar_of(&[("./CONTAINERIMAGE", "localhost/built:1\n")]))
        } else if line.contains("cd /var/run/ci/artifacts/ && tar -c") {
            Reply::ok().stdout(tar_of(&[("./report.txt", "report\n")]))
        } else if line.contains("cd /var/run/ci/cache/ && tar -c") {
            Reply::ok().stdout(tar_of(&[("./deps/lock", "v1\n")]))
        } else if is_test(call) {
            Reply::ok().stdout("ran test\n")
        } else if let Some(targets) = line.strip_prefix("mk ") {
            Reply::ok().stdout(format!("ran {targets}\n"))
        } else {
            Reply::ok()
        };
        Answer::Reply(reply)
    })
}

fn store() -> (tempfile::TempDir, ResultStore) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = ResultStore::open(Some(dir.path().to_owned())).expect("store");
    (dir, store)
}

/// The `mk test` step, in the test image or the base OS.
fn is_test(call: &TaskCall) -> bool {
    call.command.last().map(String::as_str) == Some("test")
}

fn lines(driver: &FakeDriver) -> Vec<String> {
    driver.calls().iter().map(TaskCall::line).collect()
}

#[tokio::test]
async fn a_job_runs_its_steps_in_order_and_records_env_files_artifacts_and_cache() {
    let repo = Repo::new(FULL_MKFILE);
    let (_dir, store) = store();
    let driver = base_os(|_| None);
    let job = PreparedJob::prepare(repo.options()).expect("prepare");
    let bound = job.bind(&driver, None).await.expect("bind");
    let (screen, terminal) = Screen::new();
    let report = bound.run(&store, terminal).await.expect("run");
    assert_eq!(report.exit_code, 0);
    assert_eq!(report.environment.as_deref(), Some("fake:environment-1"));
    assert_eq!(report.image.as_deref(), Some("localhost/built:1"));
    let called = lines(&driver);
    let steps: Vec<&str> = called
        .iter()
        .map(|line| {
            if line.starts_with("sh -c mkdir -p /var/run/ci/env") {
                // The base OS has our mk: the unpacking shares it with the test image.
                assert!(
                    line.ends_with("cp \"$(command -v mk)\" /opt/ci-exec/bin/mk"),
                    "{line}"
                );
                "unpack"
            } else if line.contains("cp \"$(command -v mk)\"") {
                "install mk"
            } else if line.contains("/var/run/ci/env/ && tar") {
                "read env"
            } else if line.contains("/var/run/ci/artifacts/ && tar") {
                "collect artifacts"
            } else if line.contains("/var/run/ci/cache/ && tar") {
                "save cache"
            } else if line.ends_with(" sh test") {
                "mk test (in the test image)"
            } else {
                line.as_str()
            }
        })
        .collect();
    assert_eq!(
        steps,
        [
            "unpack",
            "mk prepare-runtime",
            "mk /var/run/ci/env/CONTAINERIMAGE",
            "read env",
            "mk test (in the test image)",
            "mk /var/run/ci/artifacts/report.txt",
            "collect artifacts",
            "mk /var/run/ci/cache/deps",
            "save cache",
            "mk post-test",
        ]
    );
    let calls = driver.calls();
    let test = calls.iter().find(|call| is_test(call)).expect("mk test");
    assert_eq!(test.image, "localhost/built:1");
    assert_eq!(
        test.env.get("CONTAINERIMAGE").map(String::as_str),
        Some("localhost/built:1")
    );
    // The image's own PATH stays; our tools directory goes in front of it.
    assert!(!test.env.contains_key("PATH"), "{:?}", test.env);
    assert!(
        test.line().contains(&format!("PATH=\"{TOOLS_PATH}:")),
        "{}",
        test.line()
    );
    assert_eq!(test.workdir.as_deref(), Some(SOURCE_PATH));
    // Base-OS steps run image-less, in the source directory.
    let prepare = calls
        .iter()
        .find(|call| call.line() == "mk prepare-runtime")
        .expect("prepare");
    assert_eq!(prepare.image, "");
    assert_eq!(prepare.workdir.as_deref(), Some(SOURCE_PATH));
    assert_eq!(
        report
            .artifacts
            .iter()
            .map(|a| a.path.as_str())
            .collect::<Vec<_>>(),
        ["report.txt"]
    );
    assert!(
        screen.stdout.text().contains("ran test\n"),
        "{}",
        screen.stdout.text()
    );
    assert!(
        screen.status.text().contains("==> mk test"),
        "{}",
        screen.status.text()
    );

    // The next run restores the saved cache before `prepare-runtime`; replay is skipped.
    let driver = base_os(|_| None);
    let mut options = repo.options();
    options.no_replay = true;
    let job = PreparedJob::prepare(options).expect("prepare");
    let bound = job.bind(&driver, None).await.expect("bind");
    let (_screen, terminal) = Screen::new();
    bound.run(&store, terminal).await.expect("run");
    let calls = driver.calls();
    let restore = calls
        .iter()
        .position(|call| call.line().contains("tar -x -f - -C /var/run/ci/cache/"))
        .expect("restore cache step");
    let prepare = calls
        .iter()
        .position(|call| call.line() == "mk prepare-runtime")
        .expect("prepare");
    assert!(restore < prepare);
    let archive = calls[restore]
        .stdin
        .clone()
        .expect("cache archive on stdin");
    assert!(String::from_utf8_lossy(&archive).contains("v1"));

    // `--fresh` does not.
    let driver = base_os(|_| None);
    let mut options = repo.options();
    options.no_replay = true;
    options.fresh = true;
    let job = PreparedJob::prepare(options).expect("prepare");
    let bound = job.bind(&driver, None).await.expect("bind");
    let (_screen, terminal) = Screen::new();
    bound.run(&store, terminal).await.expect("run");
    assert!(
        !lines(&driver)
            .iter()
            .any(|line| line.contains("-C /var/run/ci/cache/"))
    );
}

#[tokio::test]
async fn a_recorded_success_is_replayed_byte_for_byte() {
    let repo = Repo::new("test:V:\n\techo hi\n");
    let (_dir, store) = store();
    let driver = base_os(|call| {
        (is_test(call)).then(|| Answer::Reply(Reply::ok().stdout("out\n").stderr("err\n")))
    });
    let job = PreparedJob::prepare(repo.options()).expect("prepare");
    let bound = job.bind(&driver, None).await.expect("bind");
    let (_screen, terminal) = Screen::new();
    bound.run(&store, terminal).await.expect("run");
    let tasks = driver.calls().len();
    let (screen, mut terminal) = Screen::new();
    let report = bound
        .replay(&store, &mut terminal)
        .expect("replay")
        .expect("a result");
    assert!(report.replayed);
    assert_eq!(screen.stdout.text(), "out\n");
    assert_eq!(screen.stderr.text(), "err\n");
    assert_eq!(driver.calls().len(), tasks, "a replay runs nothing");
}

#[tokio::test]
async fn secrets_are_masked_live_and_in_the_record() {
    const NAME: &str = "CI_EXEC_FLOW_TEST_SECRET";
    // SAFETY: this test alone reads or writes this variable, and only through std::env.
    unsafe { std::env::set_var(NAME, "hunter2-secret") };
    let repo = Repo::new("test:V:\n\techo $CI_EXEC_FLOW_TEST_SECRET\n");
    let (_dir, store) = store();
    let driver = base_os(|call| {
        (is_test(call)).then(|| {
            let secret = call.env.get(NAME).cloned().unwrap_or_default();
            Answer::Reply(Reply::ok().stdout(format!("token {secret} ok\n")))
        })
    });
    let mut options = repo.options();
    options.secrets = vec![NAME.to_owned()];
    let job = PreparedJob::prepare(options).expect("prepare");
    let bound = job.bind(&driver, None).await.expect("bind");
    let (screen, terminal) = Screen::new();
    bound.run(&store, terminal).await.expect("run");
    assert_eq!(screen.stdout.text(), "token *** ok\n");
    let record = store.get(bound.key()).expect("get").expect("recorded");
    let recorded = store.read_blob(&record.stdout.sha256).expect("blob");
    assert_eq!(recorded, b"token *** ok\n");
    // The secret reached the task, and is not an input of the key.
    let test = driver.calls().into_iter().find(is_test).expect("test");
    assert_eq!(
        test.env.get(NAME).map(String::as_str),
        Some("hunter2-secret")
    );
}

#[tokio::test]
async fn a_failing_step_stops_the_job_and_is_never_replayed() {
    let repo = Repo::new(FULL_MKFILE);
    let (_dir, store) = store();
    let driver = base_os(|call| {
        (call.line() == "mk prepare-runtime").then(|| Answer::Reply(Reply::exit(3).stderr("no\n")))
    });
    let job = PreparedJob::prepare(repo.options()).expect("prepare");
    let bound = job.bind(&driver, None).await.expect("bind");
    let (screen, terminal) = Screen::new();
    let report = bound.run(&store, terminal).await.expect("run");
    assert_eq!(report.exit_code, 3);
    assert!(!driver.calls().iter().any(is_test));
    assert_eq!(screen.stderr.text(), "no\n");
    assert!(
        store.get(bound.key()).expect("get").is_none(),
        "a failure is not replayable"
    );
    assert_eq!(store.list().expect("list").len(), 1, "but it is kept");
}

#[tokio::test]
async fn a_driver_failure_is_an_infrastructure_error() {
    let repo = Repo::new("test:V:\n\ttrue\n");
    let (_dir, store) = store();
    let driver = base_os(|call| {
        (is_test(call)).then(|| {
            Answer::Fail(DriverError::backend(
                "fake",
                "boot the VM",
                "no accelerator",
            ))
        })
    });
    let job = PreparedJob::prepare(repo.options()).expect("prepare");
    let bound = job.bind(&driver, None).await.expect("bind");
    let (_screen, terminal) = Screen::new();
    let error = bound
        .run(&store, terminal)
        .await
        .expect_err("driver failure");
    assert!(
        matches!(&error, JobError::Driver { step, .. } if step == "mk test"),
        "{error}"
    );
    assert!(!error.is_usage());
    assert!(
        store.list().expect("list").is_empty(),
        "nothing is recorded"
    );
}

#[tokio::test]
async fn an_interrupted_job_records_nothing_and_frees_the_repository() {
    let repo = Repo::new("test:V:\n\tsleep 1000\n");
    let (_dir, store) = store();
    let driver = base_os(|call| (is_test(call)).then_some(Answer::Hang));
    let job = PreparedJob::prepare(repo.options()).expect("prepare");
    let bound = job.bind(&driver, None).await.expect("bind");
    let (_screen, terminal) = Screen::new();
    // What Ctrl-C does in the CLI: the run's future is dropped.
    let interrupted =
        tokio::time::timeout(Duration::from_millis(300), bound.run(&store, terminal)).await;
    assert!(
        interrupted.is_err(),
        "the hanging step never ends by itself"
    );
    assert!(store.list().expect("list").is_empty());
    let driver = base_os(|_| None);
    let bound = job.bind(&driver, None).await.expect("bind");
    let (_screen, terminal) = Screen::new();
    let report = tokio::time::timeout(Duration::from_secs(10), bound.run(&store, terminal))
        .await
        .expect("the repository lock was released")
        .expect("run");
    assert_eq!(report.exit_code, 0);
}

#[tokio::test]
async fn mkfiles_that_run_commands_are_planned_in_the_base_os() {
    let repo = Repo::new("ARTIFACTS=`{echo /var/run/ci/artifacts/computed}\ntest:V:\n\ttrue\n");
    let (_dir, store) = store();
    let outline = "mk-outline 1\ntarget\ttest\ntarget\tprepare-runtime\nvariable\tARTIFACTS\t/var/run/ci/artifacts/computed\n";
    let driver = base_os(move |call| {
        (call.line() == "mk --outline ARTIFACTS,TEST_NETWORK")
            .then(|| Answer::Reply(Reply::ok().stdout(outline)))
    });
    let job = PreparedJob::prepare(repo.options()).expect("prepare");
    assert_eq!(job.plan, HostPlan::NeedsCommands);
    let bound = job.bind(&driver, None).await.expect("bind");
    let (screen, terminal) = Screen::new();
    bound.run(&store, terminal).await.expect("run");
    let called = lines(&driver);
    let plan = called
        .iter()
        .position(|line| line == "mk --outline ARTIFACTS,TEST_NETWORK")
        .expect("planned");
    let prepare = called
        .iter()
        .position(|line| line == "mk prepare-runtime")
        .expect("prepared");
    assert!(plan < prepare, "{called:?}");
    assert!(
        called
            .iter()
            .any(|line| line == "mk /var/run/ci/artifacts/computed"),
        "{called:?}"
    );
    assert!(
        !screen.stdout.text().contains("mk-outline"),
        "the outline is data, not output"
    );

    // A base OS whose mk cannot outline stops the job as a usage problem.
    let driver = base_os(|call| {
        (call.line() == "mk --outline ARTIFACTS,TEST_NETWORK")
            .then(|| Answer::Reply(Reply::exit(1)))
    });
    let bound = job.bind(&driver, None).await.expect("bind");
    let (_screen, terminal) = Screen::new();
    let error = bound.run(&store, terminal).await.expect_err("no outline");
    assert!(
        matches!(error, JobError::OutlineFailed { code: 1 }),
        "{error}"
    );
    assert!(error.is_usage());
}

#[tokio::test]
async fn damaged_records_are_moved_aside_and_the_job_runs_again() {
    let repo = Repo::new("test:V:\n\ttrue\n");
    let (dir, store) = store();
    let driver = base_os(|_| None);
    let job = PreparedJob::prepare(repo.options()).expect("prepare");
    let bound = job.bind(&driver, None).await.expect("bind");
    let (_screen, terminal) = Screen::new();
    bound.run(&store, terminal).await.expect("run");
    let record = dir.path().join("ok").join(format!("{}.json", bound.key()));
    let json = std::fs::read(&record).expect("record");
    std::fs::write(&record, &json[..json.len() / 2]).expect("truncate");
    let (screen, mut terminal) = Screen::new();
    assert!(
        bound
            .replay(&store, &mut terminal)
            .expect("replay")
            .is_none()
    );
    assert!(
        screen.status.text().contains("is damaged"),
        "{}",
        screen.status.text()
    );
    assert!(!record.exists());
    let moved: Vec<_> = std::fs::read_dir(dir.path().join("damaged"))
        .expect("damaged")
        .collect();
    assert_eq!(moved.len(), 1);
    let (_screen, terminal) = Screen::new();
    bound.run(&store, terminal).await.expect("run again");
    assert!(store.get(bound.key()).expect("get").is_some());
}

#[tokio::test]
async fn the_key_follows_the_base_environment_and_the_mk_the_job_brings() {
    let repo = Repo::new("test:V:\n\ttrue\n");
    let job = PreparedJob::prepare(repo.options()).expect("prepare");
    let one = base_os(|_| None).environment("image-a");
    let two = base_os(|_| None).environment("image-b");
    let key_one = job.bind(&one, None).await.expect("bind").key().to_owned();
    assert_ne!(key_one, job.bind(&two, None).await.expect("bind").key());
    assert_eq!(key_one, job.bind(&one, None).await.expect("bind").key());

    let upload = JobSupport {
        mk: MkSource::Upload,
        test_in_container: true,
        default_test_image: String::new(),
        shares_host_run_dir: false,
    };
    let uploading = base_os(|_| None).support(upload);
    let error = job.bind(&uploading, None).await.expect_err("no mk");
    assert!(
        matches!(error, JobError::NoMk { upload: true, .. }),
        "{error}"
    );
    assert!(error.is_usage());
    let tools = tempfile::tempdir().expect("tempdir");
    let mk = tools.path().join("mk");
    std::fs::write(&mk, "mk v1").expect("write");
    let v1 = job
        .bind(&uploading, Some(mk.clone()))
        .await
        .expect("bind")
        .key()
        .to_owned();
    std::fs::write(&mk, "mk v2").expect("write");
    let v2 = job
        .bind(&uploading, Some(mk.clone()))
        .await
        .expect("bind")
        .key()
        .to_owned();
    assert_ne!(v1, v2, "another mk, another key");

    // The uploaded mk is what the base-OS steps find first on their PATH.
    let (_dir, store) = store();
    let bound = job.bind(&uploading, Some(mk)).await.expect("bind");
    let (_screen, terminal) = Screen::new();
    bound.run(&store, terminal).await.expect("run");
    let calls = uploading.calls();
    let upload = calls
        .iter()
        .find(|call| call.line().contains("tar -x -f - -C /opt/ci-exec/bin"))
        .expect("upload step");
    assert!(
        upload
            .stdin
            .as_ref()
            .is_some_and(|tar| String::from_utf8_lossy(tar).contains("mk v2"))
    );
    let test = calls.iter().find(|call| is_test(call)).expect("test");
    assert_eq!(test.image, "", "the driver's own base image");
    assert!(!test.env.contains_key("PATH"));
    let upload_step = calls
        .iter()
        .position(|call| call.line().contains("-C /opt/ci-exec/bin"))
        .expect("upload");
    let base_path = &calls[upload_step].env["PATH"];
    assert!(
        base_path.starts_with(TOOLS_PATH),
        "base-OS steps find the uploaded mk: {base_path}"
    );
}

#[tokio::test]
async fn host_drivers_run_the_test_in_the_base_os_with_a_private_run_dir() {
    let repo = Repo::new("test:V:\n\ttrue\n/var/run/ci/env/CONTAINERIMAGE:\n\techo x > $target\n");
    let host = JobSupport {
        mk: MkSource::Host,
        test_in_container: false,
        default_test_image: String::new(),
        shares_host_run_dir: true,
    };
    let driver = base_os(|_| None).support(host);
    let tools = tempfile::tempdir().expect("tempdir");
    let mk = tools.path().join("mk");
    std::fs::write(&mk, "mk").expect("write");
    let job = PreparedJob::prepare(repo.options()).expect("prepare");
    let bound = job.bind(&driver, Some(mk)).await.expect("bind");
    let (_dir, store) = store();
    let (screen, terminal) = Screen::new();
    let report = bound.run(&store, terminal).await.expect("run");
    assert_eq!(report.exit_code, 0);
    let calls = driver.calls();
    assert!(calls.iter().all(|call| call.image.is_empty()));
    assert!(
        calls.iter().all(|call| call.command[0] == "unshare"),
        "{:?}",
        lines(&driver)
    );
    let test = calls
        .iter()
        .find(|call| call.line().ends_with(" mk test"))
        .expect("test");
    assert!(test.env["PATH"].starts_with(&tools.path().display().to_string()));
    assert!(
        screen
            .status
            .text()
            .contains("`CONTAINERIMAGE=localhost/built:1` is not used"),
        "{}",
        screen.status.text()
    );
}

#[tokio::test]
async fn base_os_steps_are_online_and_the_test_offline_unless_declared() {
    let run = |mkfile: &'static str, offline: bool| async move {
        let repo = Repo::new(mkfile);
        let (_dir, store) = store();
        let driver = base_os(|_| None);
        let mut options = repo.options();
        options.offline = offline;
        let job = PreparedJob::prepare(options).expect("prepare");
        let bound = job.bind(&driver, None).await.expect("bind");
        let (_screen, terminal) = Screen::new();
        bound.run(&store, terminal).await.expect("run");
        let calls = driver.calls();
        let prepare = calls
            .iter()
            .find(|call| call.line() == "mk prepare-runtime")
            .expect("prepare")
            .network;
        let test = calls
            .iter()
            .find(|call| is_test(call))
            .expect("test")
            .network;
        (prepare, test)
    };
    let plain = "prepare-runtime:V:\n\ttrue\ntest:V:\n\ttrue\n";
    let declared = "TEST_NETWORK=on\nprepare-runtime:V:\n\ttrue\ntest:V:\n\ttrue\n";
    assert_eq!(run(plain, false).await, (Some(true), Some(false)));
    assert_eq!(run(declared, false).await, (Some(true), Some(true)));
    assert_eq!(
        run(declared, true).await,
        (Some(false), Some(false)),
        "--offline"
    );

    let repo = Repo::new("TEST_NETWORK=sometimes\ntest:V:\n\ttrue\n");
    let error = PreparedJob::prepare(repo.options()).expect_err("bad declaration");
    assert!(matches!(error, JobError::BadDeclaration { .. }), "{error}");
    assert!(error.is_usage());
}

#[tokio::test]
async fn the_repository_state_is_asked_for_and_kept_only_after_success() {
    let repo = Repo::new("test:V:\n\ttrue\n");
    let (_dir, store) = store();
    let job = PreparedJob::prepare(repo.options()).expect("prepare");
    let driver = base_os(|_| None);
    let bound = job.bind(&driver, None).await.expect("bind");
    let (_screen, terminal) = Screen::new();
    bound.run(&store, terminal).await.expect("run");
    let calls = driver.state_calls();
    assert_eq!(calls.len(), 2, "{calls:?}");
    assert!(
        calls[0].starts_with("use ") && calls[0].ends_with(" fresh=false"),
        "{calls:?}"
    );
    assert_eq!(calls[1], "keep");

    let failing = base_os(|call| is_test(call).then(|| Answer::Reply(Reply::exit(1))));
    let mut options = repo.options();
    options.fresh = true;
    let job = PreparedJob::prepare(options).expect("prepare");
    let bound = job.bind(&failing, None).await.expect("bind");
    let (_screen, terminal) = Screen::new();
    bound.run(&store, terminal).await.expect("run");
    let calls = failing.state_calls();
    assert_eq!(calls.len(), 1, "a failed run keeps nothing: {calls:?}");
    assert!(calls[0].ends_with(" fresh=true"), "--fresh: {calls:?}");
}

#[tokio::test]
async fn a_scheduled_target_runs_in_place_of_test_under_its_own_key() {
    let mkfile = format!("{FULL_MKFILE}nightly:V:\n\techo nightly\n");
    let repo = Repo::new(&mkfile);
    let (_dir, store) = store();
    let driver = base_os(|_| None);
    let test_job = PreparedJob::prepare(repo.options()).expect("prepare");
    let test_key = test_job
        .bind(&driver, None)
        .await
        .expect("bind")
        .key()
        .to_owned();
    let nightly = PreparedJob::prepare(JobOptions {
        target: Some("nightly".into()),
        ..repo.options()
    })
    .expect("prepare");
    let bound = nightly.bind(&driver, None).await.expect("bind");
    assert_ne!(bound.key(), test_key, "a target is an input of the key");
    let (_screen, terminal) = Screen::new();
    let report = bound.run(&store, terminal).await.expect("run");
    assert_eq!(report.exit_code, 0);
    let ran = lines(&driver);
    assert!(
        ran.iter().any(|line| line.ends_with("sh nightly")),
        "{ran:#?}"
    );
    assert!(
        !ran.iter().any(|line| line.ends_with("sh test")),
        "{ran:#?}"
    );

    let missing = PreparedJob::prepare(JobOptions {
        target: Some("weekly".into()),
        ..repo.options()
    })
    .expect_err("no such target");
    assert!(
        missing.to_string().contains("no `weekly` target"),
        "{missing}"
    );
}

#[tokio::test]
async fn the_schedule_is_built_in_the_base_os_and_read_back() {
    let mkfile =
        "test:V:\n\techo test\n/var/run/ci/crontab:\n\techo '0 3 * * * nightly' > $target\n";
    let repo = Repo::new(mkfile);
    let driver = base_os(|call| {
        call.line().contains("tar -c -f - crontab").then(|| {
            Answer::Reply(Reply::ok().stdout(tar_of(&[("crontab", "0 3 * * * nightly\n")])))
        })
    });
    let job = PreparedJob::prepare(repo.options()).expect("prepare");
    let bound = job.bind(&driver, None).await.expect("bind");
    let (_screen, terminal) = Screen::new();
    let schedule = bound.schedule(terminal).await.expect("schedule");
    assert_eq!(schedule.as_deref(), Some("0 3 * * * nightly\n"));
    let ran = lines(&driver);
    assert!(
        ran.iter().any(|line| line == "mk /var/run/ci/crontab"),
        "{ran:#?}"
    );
    assert!(
        !ran.iter().any(|line| line.ends_with("sh test")),
        "the schedule runs no test"
    );

    let plain = Repo::new("test:V:\n\ttrue\n");
    let driver = base_os(|_| None);
    let job = PreparedJob::prepare(plain.options()).expect("prepare");
    let bound = job.bind(&driver, None).await.expect("bind");
    let (_screen, terminal) = Screen::new();
    assert_eq!(bound.schedule(terminal).await.expect("schedule"), None);
    assert!(
        driver.calls().is_empty(),
        "no crontab target, nothing started"
    );
}
