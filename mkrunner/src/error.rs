//! Errors and just-style diagnostics.

use std::fmt::Write as _;
use std::path::PathBuf;

use crate::exec::RunnerError;

/// Where in an mkfile something went wrong, with the text of that line for the caret display.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    /// The file name as mk was given it (`mkfile`, an include, `command line args`).
    pub file: String,
    /// 1-based line.
    pub line: usize,
    /// 1-based column, in characters.
    pub column: usize,
    /// The text of that line, without its newline.
    pub source_line: String,
}

impl std::fmt::Display for Location {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(formatter, "{}:{}:{}", self.file, self.line, self.column)
    }
}

/// Everything that makes mk stop. `Display` is the one-line message (lower-case, no `mk:`
/// prefix, so it composes in an error chain); [`Error::render`] gives the full diagnostic.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read mkfile `{}`", path.display())]
    ReadMkfile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("missing closing quote `{quote}`")]
    MissingClosingQuote { quote: char, location: Location },
    #[error("missing closing `{terminator}` after a backquote")]
    MissingClosingBackquote {
        terminator: char,
        location: Location,
    },
    #[error("missing `}}` in variable substitution")]
    MissingClosingBrace { location: Location },
    #[error("expected one of `:`, `=` or `<`")]
    ExpectedRuleOrAssignment { location: Location },
    #[error("more than one variable on the left side of an assignment")]
    MultipleVariables { location: Location },
    #[error("no target or variable on the left side of `{separator}`")]
    EmptyLeftSide { separator: char, location: Location },
    #[error("unknown attribute `{attribute}`")]
    UnknownAttribute { attribute: char, location: Location },
    #[error("missing trailing `:` after the attributes")]
    MissingTrailingColon { location: Location },
    #[error("missing include file name after `<`")]
    MissingIncludeFile { location: Location },
    #[error("missing include program after `<|`")]
    MissingIncludeProgram { location: Location },
    #[error("include program `{command}` failed")]
    IncludeProgramFailed { command: String, location: Location },
    #[error("includes nest more than {limit} deep at `{name}` (does it include itself?)")]
    IncludesTooDeep {
        name: String,
        limit: usize,
        location: Location,
    },
    #[error("cannot run `{command}`")]
    Command {
        command: String,
        location: Location,
        #[source]
        source: Box<RunnerError>,
    },
    #[error("bad regular expression `{pattern}`")]
    BadRegex {
        pattern: String,
        location: Location,
        #[source]
        source: Box<regex::Error>,
    },
    #[error("nothing to mk: the mkfile has no rule without `%` and no target was given")]
    NothingToMk,
    #[error("`{name}` names a member of a file that is not an archive")]
    NotAnArchive { name: String },
    #[error("`NPROC` is `{value}`: mk can run at most {most} jobs at once")]
    BadNproc { value: String, most: i32 },
    #[error("cycle in graph detected at target `{target}`")]
    Cycle { target: String },
    #[error("ambiguous recipes for `{target}`: {}", rules.join(", "))]
    Ambiguous { target: String, rules: Vec<String> },
    #[error("don't know how to make `{target}` in `{directory}`")]
    DontKnowHow { target: String, directory: String },
    #[error("no recipe to make `{target}`")]
    NoRecipe { target: String },
    #[error(
        "recipe for `{targets}` failed with {status}: `{recipe}`{}",
        deleted_note(deleted)
    )]
    RecipeFailed {
        targets: String,
        /// The recipe shortened as mk shortens it (first words, `...`, last word).
        recipe: String,
        status: String,
        deleted: Vec<String>,
    },
    #[error("cannot start the recipe for `{targets}`")]
    StartRecipe {
        targets: String,
        #[source]
        source: RunnerError,
    },
    #[error("cannot touch `{path}`")]
    Touch {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

fn deleted_note(deleted: &[String]) -> String {
    if deleted.is_empty() {
        String::new()
    } else {
        let names: Vec<String> = deleted.iter().map(|name| format!("`{name}`")).collect();
        format!(", deleted {}", names.join(" "))
    }
}

impl Error {
    /// Where in the mkfile the error is, when it is tied to a line.
    pub fn location(&self) -> Option<&Location> {
        match self {
            Error::MissingClosingQuote { location, .. }
            | Error::MissingClosingBackquote { location, .. }
            | Error::MissingClosingBrace { location }
            | Error::ExpectedRuleOrAssignment { location }
            | Error::MultipleVariables { location }
            | Error::EmptyLeftSide { location, .. }
            | Error::UnknownAttribute { location, .. }
            | Error::MissingTrailingColon { location }
            | Error::MissingIncludeFile { location }
            | Error::MissingIncludeProgram { location }
            | Error::IncludeProgramFailed { location, .. }
            | Error::IncludesTooDeep { location, .. }
            | Error::Command { location, .. }
            | Error::BadRegex { location, .. } => Some(location),
            _ => None,
        }
    }

    /// `mk: error: message: cause…` on one line.
    pub fn one_line(&self) -> String {
        let mut line = format!("mk: error: {self}");
        let mut source = std::error::Error::source(self);
        while let Some(cause) = source {
            let _ = write!(line, ": {cause}");
            source = cause.source();
        }
        line
    }

    /// The full diagnostic as casey/just prints it: the one-line message, then
    /// ` --> file:line:column`, the source line and a caret under the column.
    pub fn render(&self) -> String {
        let mut out = self.one_line();
        out.push('\n');
        if let Some(location) = self.location() {
            let number = location.line.to_string();
            let gutter = " ".repeat(number.len());
            let _ = writeln!(out, "{gutter}--> {location}");
            let _ = writeln!(out, "{gutter} |");
            let _ = writeln!(out, "{number} | {}", location.source_line);
            let caret_pad: String = location
                .source_line
                .chars()
                .take(location.column.saturating_sub(1))
                .map(|c| if c == '\t' { '\t' } else { ' ' })
                .collect();
            let _ = writeln!(out, "{gutter} | {caret_pad}^");
        }
        out
    }
}

/// A problem mk reports and then carries on from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Warning {
    pub message: String,
    pub location: Option<Location>,
}

impl Warning {
    /// `mk: warning: …` plus the location line when there is one.
    pub fn render(&self) -> String {
        match &self.location {
            Some(location) => format!("mk: warning: {}\n --> {location}\n", self.message),
            None => format!("mk: warning: {}\n", self.message),
        }
    }
}
