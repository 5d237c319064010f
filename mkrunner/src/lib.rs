//! A Plan 9 mk(1): reads mkfiles, builds the dependency graph and runs recipes, behaving as
//! Debian's 9base mk does (stdout, exit status and files produced). It is also a library, so
//! ci-exec can read an mkfile (targets, attributes, variables) without running it, and run a
//! target through its own [`Runner`] (a VM guest, a container) instead of host processes.
//!
//! It is not make: no implicit rules, no `.PHONY`, recipes are passed to the shell whole
//! (mk expands only rule heads and assignments), and a tie in modification time counts as
//! out of date.
//!
//! The stages, one file each: [`lexer`] → [`parser`] → [`expand`] → [`graph`] → [`plan`]
//! → [`exec`]; errors in [`error`]. The grammar is in `GRAMMAR.md`.
//!
//! ```no_run
//! use mkrunner::{Mkfile, BuildOptions, HostRunner};
//! let mkfile = Mkfile::parse_file(std::path::Path::new("mkfile"), &[]).unwrap();
//! if mkfile.has_target("post-test") {
//!     let options = BuildOptions::default();
//!     let plan = mkfile.plan(&["post-test"], &options, &HostRunner).unwrap();
//!     for job in plan.jobs() { println!("would run: {}", job.echo) }
//!     let targets = vec!["post-test".to_string()];
//!     mkfile.build(&targets, &options, &HostRunner, &mut std::io::stdout()).unwrap();
//! }
//! ```

mod archive;
pub mod error;
pub mod exec;
pub mod expand;
pub mod graph;
pub mod lexer;
pub mod outline;
pub mod parser;
pub mod plan;

use std::path::{Path, PathBuf};

pub use error::{Error, Location, Warning};
pub use exec::{Command, HostRunner, Outcome, Runner, RunnerError, Status};
pub use expand::Variables;
pub use graph::COMMAND_LINE_TARGET;
pub use outline::Outline;
pub use parser::{Attributes, Rule};
pub use plan::{BuildOptions, BuildReport, Job, Plan};

/// Where mkfile text comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A file; diagnostics name it as given.
    File(PathBuf),
    /// Text already in memory, with the name diagnostics use.
    Text { name: String, text: String },
}

/// Everything that decides how an mkfile reads: the files, the directory includes and
/// commands resolve against, the environment and the command-line assignments.
#[derive(Debug, Clone)]
pub struct ParseOptions {
    /// Read in order, as several `-f` flags are.
    pub sources: Vec<Source>,
    /// The directory mk runs in: `<file` includes and commands resolve against it.
    pub directory: PathBuf,
    /// Imported as variables (one word each), and passed on to recipes.
    pub environment: Vec<(String, String)>,
    /// Command-line `NAME=value` arguments: parsed as mkfile lines, and later assignments
    /// in the mkfile do not change them.
    pub assignments: Vec<String>,
    /// `$MKFLAGS` and `$MKARGS` as mk sets them (the flags and the target arguments).
    pub mkflags: String,
    pub mkargs: String,
}

impl ParseOptions {
    /// Read `path`, in the directory that holds it, with this process's environment.
    pub fn for_file(path: &Path) -> Self {
        let directory = match path.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => parent.to_path_buf(),
            _ => PathBuf::from("."),
        };
        ParseOptions {
            sources: vec![Source::File(path.to_path_buf())],
            directory,
            environment: crate::process_environment(),
            assignments: Vec::new(),
            mkflags: String::new(),
            mkargs: String::new(),
        }
    }
}

/// A parsed mkfile: its rules and variables, ready to query, plan or build.
#[derive(Debug, Clone)]
pub struct Mkfile {
    variables: Variables,
    rules: parser::RuleSet,
    default_targets: Vec<String>,
    warnings: Vec<Warning>,
    directory: PathBuf,
}

impl Mkfile {
    /// Parse `path` with command-line assignments `variables` (as `mk NAME=value`),
    /// importing this process's environment; `<|command` includes and backquotes run on
    /// this host through [`HostRunner`].
    pub fn parse_file(path: &Path, variables: &[(String, String)]) -> Result<Mkfile, Error> {
        let mut options = ParseOptions::for_file(path);
        options.assignments = assignments(variables);
        Mkfile::parse(&options, &HostRunner)
    }

    /// Parse mkfile text held in memory; `name` is what diagnostics call it. Includes
    /// resolve against the current directory.
    pub fn parse_str(
        name: &str,
        text: &str,
        variables: &[(String, String)],
    ) -> Result<Mkfile, Error> {
        let options = ParseOptions {
            sources: vec![Source::Text {
                name: name.to_string(),
                text: text.to_string(),
            }],
            directory: PathBuf::from("."),
            environment: crate::process_environment(),
            assignments: assignments(variables),
            mkflags: String::new(),
            mkargs: String::new(),
        };
        Mkfile::parse(&options, &HostRunner)
    }

    /// Parse with full control; commands met while reading run through `runner`.
    pub fn parse(options: &ParseOptions, runner: &dyn Runner) -> Result<Mkfile, Error> {
        let mut parser = parser::Parser::new(runner, options.directory.clone());
        for (name, value) in &options.environment {
            if !expand::INTERNAL_VARIABLES.contains(&name.as_str()) {
                parser.variables.set(name, vec![value.clone()]);
            }
        }
        if !options.assignments.is_empty() {
            let mut text = String::new();
            for assignment in &options.assignments {
                text.push_str(assignment);
                text.push('\n');
            }
            parser.parse_text("command line args", &text, true)?;
        }
        // mk splits both into words as it splits a line (`stow`): under rc `$#MKFLAGS` counts
        // the flags, and no flags at all is one empty word.
        let mkflags = split_words(&parser.variables, &options.mkflags);
        let mkargs = split_words(&parser.variables, &options.mkargs);
        parser.variables.set("MKFLAGS", mkflags);
        parser.variables.set("MKARGS", mkargs);
        for source in &options.sources {
            match source {
                Source::File(path) => {
                    let name = path.to_string_lossy().into_owned();
                    let resolved = options.directory.join(path);
                    parser.parse_path(&name, &resolved)?;
                }
                Source::Text { name, text } => parser.parse_text(name, text, false)?,
            }
        }
        Ok(Mkfile {
            variables: parser.variables,
            rules: parser.rules,
            default_targets: parser.default_targets.unwrap_or_default(),
            warnings: parser.warnings,
            directory: options.directory.clone(),
        })
    }

    /// Every rule, in the order the mkfile defines them (one per target of each head).
    pub fn rules(&self) -> impl Iterator<Item = &Rule> {
        self.rules.rules.iter()
    }

    /// True when an explicit (non-meta) rule names `name` as a target.
    pub fn has_target(&self, name: &str) -> bool {
        self.rules
            .by_target
            .get(name)
            .is_some_and(|chain| chain.iter().any(|&i| !self.rules.rules[i].is_meta))
    }

    /// The explicit targets, each once, in the order they first appear.
    pub fn targets(&self) -> Vec<&str> {
        let mut seen = std::collections::HashSet::new();
        self.rules
            .rules
            .iter()
            .filter(|rule| !rule.is_meta && seen.insert(rule.target.as_str()))
            .map(|rule| rule.target.as_str())
            .collect()
    }

    /// The explicit rules for `target`, in the order mk considers them.
    pub fn rules_for(&self, target: &str) -> Vec<&Rule> {
        self.rules
            .by_target
            .get(target)
            .map(|chain| chain.iter().map(|&i| &self.rules.rules[i]).collect())
            .unwrap_or_default()
    }

    /// The value of a variable as a word list (`None` when it is not set at all).
    pub fn variable(&self, name: &str) -> Option<Vec<String>> {
        self.variables.get(name).cloned()
    }

    /// The whole variable table.
    pub fn variables(&self) -> &Variables {
        &self.variables
    }

    /// What `mk` with no target arguments makes: the targets of the first rule without
    /// `%`, `&` or `R`.
    pub fn default_targets(&self) -> &[String] {
        &self.default_targets
    }

    /// Problems mk reports and carries on from (missing include files, stray `$`).
    pub fn warnings(&self) -> &[Warning] {
        &self.warnings
    }

    /// The directory the mkfile was read in and recipes run in.
    pub fn directory(&self) -> &Path {
        &self.directory
    }
}

/// This process's environment; names and values that are not UTF-8 are converted lossily
/// rather than making mk panic.
pub fn process_environment() -> Vec<(String, String)> {
    std::env::vars_os()
        .map(|(name, value)| {
            (
                name.to_string_lossy().into_owned(),
                value.to_string_lossy().into_owned(),
            )
        })
        .collect()
}

/// Split command-line text into words as mk does; text with an unclosed quote is split at
/// blanks instead.
fn split_words(variables: &Variables, text: &str) -> Vec<String> {
    expand::Expander::new(variables)
        .words(text)
        .unwrap_or_else(|_| text.split_whitespace().map(str::to_string).collect())
}

fn assignments(variables: &[(String, String)]) -> Vec<String> {
    variables
        .iter()
        .map(|(name, value)| format!("{name}={value}"))
        .collect()
}
