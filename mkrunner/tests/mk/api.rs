//! The library API as ci-exec uses it: read an mkfile without running it, plan a target,
//! and build through a runner of our own.

use std::sync::Mutex;

use mkrunner::{BuildOptions, Command, HostRunner, Mkfile, Outcome, Runner, RunnerError};

const CI_MKFILE: &str = "\
ARTIFACTS=/var/run/ci/artifacts/report.txt /var/run/ci/artifacts/log.txt
IMAGE=debian
test:V: build
	echo testing
build:V:
	echo building
/var/run/ci/env/CONTAINERIMAGE: base-image
	echo $IMAGE > $target
base-image:VQ:
	echo image
/var/run/ci/artifacts/%: out/%
	cp $prereq $target
post-test:VE:
	echo done
";

#[test]
fn reads_targets_attributes_and_variables_without_running() {
    let directory = tempfile::tempdir().expect("a temporary directory");
    let path = directory.path().join("mkfile");
    std::fs::write(&path, CI_MKFILE).expect("write the mkfile");
    let mkfile =
        Mkfile::parse_file(&path, &[("IMAGE".to_string(), "alpine".to_string())]).expect("parses");
    assert!(mkfile.has_target("post-test"));
    assert!(mkfile.has_target("/var/run/ci/env/CONTAINERIMAGE"));
    assert!(
        !mkfile.has_target("/var/run/ci/artifacts/%"),
        "metarules are not explicit"
    );
    assert!(!mkfile.has_target("deploy"));
    assert_eq!(
        mkfile.variable("ARTIFACTS"),
        Some(vec![
            "/var/run/ci/artifacts/report.txt".to_string(),
            "/var/run/ci/artifacts/log.txt".to_string()
        ])
    );
    assert_eq!(mkfile.variable("IMAGE"), Some(vec!["alpine".to_string()]));
    assert_eq!(mkfile.default_targets(), ["test".to_string()]);
    let base = mkfile.rules_for("base-image");
    assert_eq!(base.len(), 1);
    assert!(base[0].attributes.is_virtual && base[0].attributes.quiet);
    let meta: Vec<&str> = mkfile
        .rules()
        .filter(|rule| rule.is_meta)
        .map(|rule| rule.target.as_str())
        .collect();
    assert_eq!(meta, ["/var/run/ci/artifacts/%"]);
    assert_eq!(
        mkfile.targets(),
        [
            "test",
            "build",
            "/var/run/ci/env/CONTAINERIMAGE",
            "base-image",
            "post-test"
        ]
    );
}

#[test]
fn plans_without_running() {
    let mkfile = Mkfile::parse_str("mkfile", CI_MKFILE, &[]).expect("parses");
    let plan = mkfile
        .plan(&["test"], &BuildOptions::default(), &HostRunner)
        .expect("plans");
    let echoes: Vec<&str> = plan.jobs().iter().map(|job| job.echo.as_str()).collect();
    assert_eq!(echoes, ["echo building\n", "echo testing\n"]);
    assert_eq!(plan.jobs()[1].prereqs, ["build"]);
}

/// Runs on the host, and records what it was asked to run.
struct Recording {
    commands: Mutex<Vec<Command>>,
}

impl Runner for Recording {
    fn run(&self, command: &Command) -> Result<Outcome, RunnerError> {
        if let Ok(mut commands) = self.commands.lock() {
            commands.push(command.clone());
        }
        HostRunner.run(command)
    }
}

#[test]
fn builds_through_the_runner_it_is_given() {
    let directory = tempfile::tempdir().expect("a temporary directory");
    let text = "\
NAME=world
out.txt:
	echo hello $NAME > $target
";
    std::fs::write(directory.path().join("mkfile"), text).expect("write the mkfile");
    let mkfile = Mkfile::parse_file(&directory.path().join("mkfile"), &[]).expect("parses");
    let runner = Recording {
        commands: Mutex::new(Vec::new()),
    };
    let mut output = Vec::new();
    let report = mkfile
        .build(&[], &BuildOptions::default(), &runner, &mut output)
        .expect("builds");
    assert_eq!(
        String::from_utf8_lossy(&output),
        "echo hello world > out.txt\n"
    );
    assert_eq!(report.jobs.len(), 1);
    let content = std::fs::read_to_string(directory.path().join("out.txt")).expect("made");
    assert_eq!(content, "hello world\n");
    let commands = runner.commands.lock().expect("not poisoned");
    assert_eq!(commands.len(), 1);
    assert_eq!(commands[0].argv, ["sh", "-e"]);
    assert_eq!(
        commands[0].stdin.as_deref(),
        Some("echo hello $NAME > $target\n")
    );
    let environment = |name: &str| {
        commands[0]
            .environment
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.clone())
    };
    assert_eq!(environment("target").as_deref(), Some("out.txt"));
    assert_eq!(environment("NAME").as_deref(), Some("world"));
    drop(commands);

    // A second build finds it up to date and runs nothing.
    let mut output = Vec::new();
    mkfile
        .build(&[], &BuildOptions::default(), &runner, &mut output)
        .expect("builds");
    assert_eq!(
        String::from_utf8_lossy(&output),
        "mk: 'out.txt' is up to date\n"
    );
    assert_eq!(runner.commands.lock().expect("not poisoned").len(), 1);
}

#[test]
fn failed_recipe_is_an_error_with_the_status() {
    let mkfile = Mkfile::parse_str("mkfile", "all:V:\n\texit 4\n", &[]).expect("parses");
    let mut output = Vec::new();
    let error = mkfile
        .build(&[], &BuildOptions::default(), &HostRunner, &mut output)
        .expect_err("fails");
    assert!(
        matches!(&error, mkrunner::Error::RecipeFailed { status, .. } if status == "exit(4)"),
        "{error:?}"
    );
}

#[test]
fn parse_errors_render_with_a_caret() {
    let error = Mkfile::parse_str("ci.mk", "ok=1\nbad:Z:\n", &[]).expect_err("fails");
    assert_eq!(error.to_string(), "unknown attribute `Z`");
    assert_eq!(
        error.render(),
        "mk: error: unknown attribute `Z`\n --> ci.mk:2:5\n  |\n2 | bad:Z:\n  |     ^\n"
    );
}

#[test]
fn includes_and_recipes_resolve_against_the_mkfile_directory() {
    let directory = tempfile::tempdir().expect("a temporary directory");
    std::fs::write(directory.path().join("vars.mk"), "WHO=include\n").expect("write");
    std::fs::write(
        directory.path().join("mkfile"),
        "<vars.mk\nout:\n\techo $WHO > out\n",
    )
    .expect("write the mkfile");
    let mkfile = Mkfile::parse_file(&directory.path().join("mkfile"), &[]).expect("parses");
    assert!(mkfile.warnings().is_empty(), "{:?}", mkfile.warnings());
    assert_eq!(mkfile.variable("WHO"), Some(vec!["include".to_string()]));
    let mut output = Vec::new();
    mkfile
        .build(&[], &BuildOptions::default(), &HostRunner, &mut output)
        .expect("builds");
    let made = std::fs::read_to_string(directory.path().join("out")).expect("made in place");
    assert_eq!(made, "include\n");
}

/// Regression: the planner recursed once per dependency level, so a 20,000-rule chain
/// overflowed an 8 MiB stack (the `mk` binary and the library hid it behind a 256 MiB
/// thread). It keeps the levels on a heap stack now: a 100,000-rule chain plans on the
/// 2 MiB stack `std::thread::spawn` gives.
#[test]
fn a_100000_rule_chain_plans_on_a_default_thread_stack() {
    const LINKS: usize = 100_000;
    let mut text = String::new();
    for link in 0..LINKS {
        text.push_str(&format!("t{link}:V: t{}\n", link + 1));
    }
    text.push_str(&format!("t{LINKS}:V:\n\techo end\n"));
    let planned = std::thread::spawn(move || {
        let mkfile = Mkfile::parse_str("mkfile", &text, &[]).expect("parses");
        let plan = mkfile
            .plan(&["t0"], &BuildOptions::default(), &HostRunner)
            .expect("plans");
        plan.jobs().len()
    })
    .join()
    .expect("the planner does not overflow its stack");
    assert_eq!(planned, 1);
}
