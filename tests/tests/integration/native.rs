//! Native-driver behaviour the generic suite cannot observe: its directories, limits,
//! adoption of another process's task, and the sandbox.

use std::collections::BTreeMap;
use std::time::Duration;

use ci_exec_driver::{Driver, DriverError, Limits, Task, wait_for_exit};
use ci_exec_native::NativeDriver;
use ci_exec_tests::{Output, unique_namespace};

fn driver(state: &std::path::Path) -> NativeDriver {
    NativeDriver::with_state_dir(&unique_namespace("native"), state)
}

#[tokio::test]
async fn close_removes_the_namespace_directory() {
    let state = tempfile::tempdir().expect("tempdir");
    let native = driver(state.path());
    let task = Task::new("t", ["sh", "-c", "echo x > data/f"]).mount("data", "/data");
    let container = native.run_container(task).await.expect("run");
    assert_eq!(Output::of(&*container).await.code, 0);
    assert!(native.root().join("volumes/data/f").is_file());
    native.close().await.expect("close");
    assert!(!native.root().exists());
    assert_eq!(std::fs::read_dir(state.path()).expect("state").count(), 0);
}

#[tokio::test]
async fn memory_limit_applies_to_the_process() {
    let state = tempfile::tempdir().expect("tempdir");
    let native = driver(state.path());
    let mut task = Task::new("limited", ["sh", "-c", "ulimit -v"]);
    task.limits = Limits {
        memory_bytes: 512 * 1024 * 1024,
        cpu_shares: 512,
    };
    let output = Output::of(&*native.run_container(task).await.expect("run")).await;
    assert_eq!(
        output.stdout_text().trim(),
        "524288",
        "{}",
        output.stderr_text()
    );
    native.close().await.expect("close");
}

#[tokio::test]
async fn a_later_driver_adopts_the_task_instead_of_rerunning_it() {
    let state = tempfile::tempdir().expect("tempdir");
    let namespace = unique_namespace("adopt");
    let first = NativeDriver::with_state_dir(&namespace, state.path());
    let container = first
        .run_container(Task::new("once", ["sh", "-c", "echo ran-once"]))
        .await
        .expect("run");
    assert_eq!(Output::of(&*container).await.stdout_text(), "ran-once\n");
    let second = NativeDriver::with_state_dir(&namespace, state.path());
    let again = second
        .run_container(Task::new("once", ["sh", "-c", "echo ran-twice"]))
        .await
        .expect("adopt");
    assert_eq!(Output::of(&*again).await.stdout_text(), "ran-once\n");
    second.close().await.expect("close");
}

#[tokio::test]
async fn bad_ids_and_volume_names_are_rejected_before_anything_runs() {
    let state = tempfile::tempdir().expect("tempdir");
    let native = driver(state.path());
    let error = native
        .run_container(Task::new("../escape", ["true"]))
        .await
        .expect_err("bad id");
    assert_eq!(
        error.to_string(),
        "invalid task `../escape`: bad task id: it starts with `.`"
    );
    let error = native
        .create_volume("a/b", 0)
        .await
        .expect_err("bad volume");
    assert_eq!(
        error.to_string(),
        "invalid volume `a/b`: bad volume name: use only letters, digits, `_`, `.` and `-`"
    );
    let error = native
        .run_container(Task::new("t", ["true"]).mount("data", "/../../etc"))
        .await
        .expect_err("mount escape");
    assert!(matches!(error, DriverError::InvalidTask { .. }), "{error}");
    let error = native
        .run_container(Task::new("t", Vec::<String>::new()))
        .await
        .expect_err("empty command");
    assert_eq!(error.to_string(), "invalid task `t`: the command is empty");
    // Nothing was left behind by the failed starts.
    assert!(!native.root().join("tasks/t").exists());
    native.close().await.expect("close");
}

#[tokio::test]
async fn sandbox_runs_commands_in_one_environment() {
    let state = tempfile::tempdir().expect("tempdir");
    let native = driver(state.path());
    let sandbox = native
        .as_sandbox()
        .expect("native has sandboxes")
        .start_sandbox(
            Task::new("box", ["unused"])
                .env("BASE", "b")
                .mount("work", "/work"),
        )
        .await
        .expect("start");
    let mut stdout = Vec::new();
    let mut stderr = Vec::new();
    let extra = BTreeMap::from([("EXTRA".to_owned(), "e".to_owned())]);
    let output = sandbox
        .exec(
            &[
                "sh".into(),
                "-c".into(),
                "echo $BASE$EXTRA > work/f; echo err >&2; exit 3".into(),
            ],
            &extra,
            &mut stdout,
            &mut stderr,
        )
        .await
        .expect("exec");
    assert_eq!(output.exit_code, 3);
    assert_eq!(stderr, b"err\n");
    let mut stdout = Vec::new();
    let output = sandbox
        .exec(
            &["cat".into(), "work/f".into()],
            &BTreeMap::new(),
            &mut stdout,
            &mut Vec::new(),
        )
        .await
        .expect("exec");
    assert_eq!(
        (output.exit_code, stdout.as_slice()),
        (0, b"be\n".as_slice())
    );
    let missing = sandbox
        .exec(
            &["no-such-x".into()],
            &BTreeMap::new(),
            &mut Vec::new(),
            &mut Vec::new(),
        )
        .await
        .expect_err("missing program");
    assert!(
        matches!(missing, DriverError::ProgramNotFound { .. }),
        "{missing}"
    );
    sandbox.cleanup().await.expect("cleanup");
    sandbox.cleanup().await.expect("cleanup twice");
    native.close().await.expect("close");
}

#[tokio::test]
async fn killed_by_signal_reports_128_plus_signal() {
    let state = tempfile::tempdir().expect("tempdir");
    let native = driver(state.path());
    let container = native
        .run_container(Task::new("sig", ["sh", "-c", "kill -TERM $$"]))
        .await
        .expect("run");
    let code = wait_for_exit(
        &*container,
        Duration::from_millis(20),
        Some(Duration::from_secs(60)),
    )
    .await
    .expect("exit");
    assert_eq!(code, 128 + 15);
    native.close().await.expect("close");
}
