//! A small builder for running our `mk` in a fresh directory and checking what it did.

use std::path::PathBuf;
use std::process::Command;

pub fn ours() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_mk"))
}

/// `Test::new().mkfile("…").args(["x"]).stderr("…").status(1)`.
#[derive(Debug)]
pub struct Test {
    directory: tempfile::TempDir,
    args: Vec<String>,
}

#[derive(Debug)]
pub struct Run {
    pub stdout: String,
    pub stderr: String,
    pub status: Option<i32>,
}

impl Test {
    pub fn new() -> Self {
        Test {
            directory: tempfile::tempdir().expect("a temporary directory"),
            args: Vec::new(),
        }
    }

    pub fn mkfile(self, text: &str) -> Self {
        self.file("mkfile", text)
    }

    pub fn file(self, name: &str, text: &str) -> Self {
        std::fs::write(self.directory.path().join(name), text).expect("write a test file");
        self
    }

    pub fn args<const N: usize>(mut self, args: [&str; N]) -> Self {
        self.args = args.iter().map(|a| a.to_string()).collect();
        self
    }

    pub fn directory(&self) -> &std::path::Path {
        self.directory.path()
    }

    pub fn run(&self) -> Run {
        let output = Command::new(ours())
            .args(&self.args)
            .current_dir(self.directory.path())
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .output()
            .expect("run mk");
        let directory = std::fs::canonicalize(self.directory.path()).expect("canonical path");
        let clean = |bytes: &[u8]| {
            String::from_utf8_lossy(bytes).replace(&directory.display().to_string(), "$DIR")
        };
        Run {
            stdout: clean(&output.stdout),
            stderr: clean(&output.stderr),
            status: output.status.code(),
        }
    }
}
