//! The differential suite: every case runs with our `mk` and with Debian's 9base mk, each in
//! a fresh copy (times included) of one directory the setup ran in once, and the two must
//! agree on standard output, exit status and the files left behind (names and contents).
//!
//! Cases live in `tests/cases/*.case`, several to a file:
//!
//! ```text
//! === name of the case
//! --- args            (optional: one argument per line; `''` is an empty argument)
//! --- env             (optional: NAME=value lines, added to a clean environment)
//! --- setup           (optional: sh script run once, before both copies are made)
//! --- mkfile          (the mkfile, verbatim)
//! ```
//!
//! Without 9base the suite skips with a message, except under `CI=true`, where it fails:
//! `.ci/setup-mkrunner.sh` installs it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

const REFERENCE_MK: &str = "/usr/lib/plan9/bin/mk";

#[derive(Debug, Default, Clone)]
struct Case {
    name: String,
    file: String,
    args: Vec<String>,
    env: Vec<(String, String)>,
    setup: String,
    mkfile: String,
}

fn parse_cases(file: &str, text: &str) -> Vec<Case> {
    let mut cases = Vec::new();
    let mut current: Option<Case> = None;
    let mut section = String::new();
    for line in text.split_inclusive('\n') {
        if let Some(name) = line.strip_prefix("=== ") {
            cases.extend(current.take());
            current = Some(Case {
                name: name.trim().to_string(),
                file: file.to_string(),
                ..Case::default()
            });
            section.clear();
            continue;
        }
        if let Some(name) = line.strip_prefix("--- ") {
            section = name.trim().to_string();
            continue;
        }
        let Some(case) = current.as_mut() else {
            continue;
        };
        match section.as_str() {
            "args" => match line.trim_end_matches('\n') {
                "" => {}
                // An argument cannot be an empty line, so `''` stands for one.
                "''" => case.args.push(String::new()),
                argument => case.args.push(argument.to_string()),
            },
            "env" => {
                if let Some((name, value)) = line.trim_end_matches('\n').split_once('=') {
                    case.env.push((name.to_string(), value.to_string()));
                }
            }
            "setup" => case.setup.push_str(line),
            "mkfile" => case.mkfile.push_str(line),
            "" => {}
            other => panic!("{file}: case `{}`: unknown section `{other}`", case.name),
        }
    }
    cases.extend(current);
    cases
}

#[derive(Debug, PartialEq, Eq)]
struct Observed {
    stdout: String,
    status: Option<i32>,
    files: BTreeMap<String, String>,
}

fn snapshot(directory: &Path, prefix: &Path, files: &mut BTreeMap<String, String>) {
    let Ok(entries) = std::fs::read_dir(directory) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let relative = path
            .strip_prefix(prefix)
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        if path.is_dir() {
            files.insert(format!("{relative}/"), String::new());
            snapshot(&path, prefix, files);
        } else {
            let content = std::fs::read(&path)
                .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
                .unwrap_or_else(|error| format!("<unreadable: {error}>"));
            files.insert(relative, content);
        }
    }
}

fn search_path() -> String {
    format!(
        "{}:/usr/local/bin:/usr/bin:/bin",
        std::env::var("PATH").unwrap_or_default()
    )
}

/// Write the mkfile and run the setup once, in a directory both programs then get a copy
/// of: a setup run once per program could straddle a second boundary in one run and not
/// in the other, and mk, which compares whole seconds, would rightly answer differently.
fn prepare(case: &Case) -> tempfile::TempDir {
    let directory = tempfile::tempdir().expect("a temporary directory");
    let root = directory.path();
    std::fs::write(root.join("mkfile"), &case.mkfile).expect("write the mkfile");
    if !case.setup.is_empty() {
        let status = Command::new("sh")
            .arg("-ec")
            .arg(&case.setup)
            .current_dir(root)
            .env_clear()
            .env("PATH", search_path())
            .status()
            .expect("run the setup script");
        assert!(
            status.success(),
            "{}: setup of `{}` failed",
            case.file,
            case.name
        );
    }
    directory
}

/// A fresh copy of the prepared directory, modification times included (`cp -a`).
fn copy_of(prepared: &Path) -> tempfile::TempDir {
    let directory = tempfile::tempdir().expect("a temporary directory");
    let status = Command::new("cp")
        .arg("-a")
        .arg(prepared.join("."))
        .arg(directory.path())
        .status()
        .expect("run cp");
    assert!(status.success(), "cp -a {} failed", prepared.display());
    directory
}

fn run_case(mk: &Path, case: &Case, prepared: &Path) -> Observed {
    let directory = copy_of(prepared);
    let root = directory.path();
    let path = search_path();
    let output = Command::new(mk)
        .args(&case.args)
        .current_dir(root)
        .env_clear()
        .env("PATH", &path)
        .env("HOME", root)
        .envs(case.env.iter().map(|(k, v)| (k, v)))
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run mk");
    let root_text = root.display().to_string();
    let canonical = std::fs::canonicalize(root)
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| root_text.clone());
    let normalise = |text: &str| text.replace(&canonical, "$DIR").replace(&root_text, "$DIR");
    let mut files = BTreeMap::new();
    snapshot(root, root, &mut files);
    let files = files
        .into_iter()
        .map(|(name, content)| (name, normalise(&content)))
        .collect();
    Observed {
        stdout: normalise(&String::from_utf8_lossy(&output.stdout)),
        status: output.status.code(),
        files,
    }
}

fn all_cases() -> Vec<Case> {
    let directory = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/cases");
    let mut paths: Vec<PathBuf> = std::fs::read_dir(&directory)
        .expect("tests/cases exists")
        .flatten()
        .map(|entry| entry.path())
        .filter(|path| path.extension().is_some_and(|e| e == "case"))
        .collect();
    paths.sort();
    let mut cases = Vec::new();
    for path in paths {
        let text = std::fs::read_to_string(&path).expect("read a case file");
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
        cases.extend(parse_cases(&name.unwrap_or_default(), &text));
    }
    cases
}

#[test]
fn ours_and_9base_agree() {
    if !Path::new(REFERENCE_MK).exists() {
        let message = format!(
            "9base mk is not installed at `{REFERENCE_MK}`: run `apt-get install -y 9base` \
             (or `.ci/setup-mkrunner.sh`)"
        );
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("{message}");
        }
        eprintln!("skipping the differential suite: {message}");
        return;
    }
    let ours = PathBuf::from(env!("CARGO_BIN_EXE_mk"));
    let cases = all_cases();
    assert!(cases.len() >= 100, "only {} cases", cases.len());
    let filter = std::env::var("MK_CASE").ok();
    let mut failures = Vec::new();
    let mut ran = 0;
    for case in &cases {
        if filter
            .as_ref()
            .is_some_and(|f| !case.name.contains(f.as_str()))
        {
            continue;
        }
        ran += 1;
        let prepared = prepare(case);
        let reference = run_case(Path::new(REFERENCE_MK), case, prepared.path());
        let observed = run_case(&ours, case, prepared.path());
        if reference != observed {
            failures.push(format!(
                "{}: `{}`\n  9base: {reference:?}\n  ours:  {observed:?}",
                case.file, case.name
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {ran} cases differ:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn case_files_parse() {
    let cases = all_cases();
    let mut names = std::collections::HashSet::new();
    for case in &cases {
        assert!(
            names.insert(&case.name),
            "duplicate case name `{}`",
            case.name
        );
    }
}
