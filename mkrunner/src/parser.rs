//! The second stage: logical lines become assignments, includes and rules.
//!
//! Rule heads and assignments are expanded as they are read, in order, so a variable used in
//! a rule head has the value it has at that line (mk's behaviour, unlike make's).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::error::{Error, Location, Warning};
use crate::exec::{Command, Runner};
use crate::expand::{ExpandProblem, Expander, Quoting, Variables, char_in_with};
use crate::lexer::{Lexer, LogicalLine};

/// The attributes of a rule (`target:VQ: prereqs`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Attributes {
    /// `V`: the targets are not files; always out of date.
    pub is_virtual: bool,
    /// `Q`: do not echo the recipe.
    pub quiet: bool,
    /// `E`: run the recipe without `-e`, so a failing command does not stop it.
    pub continue_on_error: bool,
    /// `N`: a missing recipe is not an error; the target counts as made.
    pub no_recipe_ok: bool,
    /// `R`: the target is a regular expression.
    pub regex: bool,
    /// `D`: delete the targets when the recipe fails.
    pub delete_on_error: bool,
    /// `U`: the targets are considered updated whether or not the recipe changed them.
    pub update: bool,
    /// `n`: a metarule that does not apply to virtual targets.
    pub not_virtual: bool,
    /// `P`: decide out-of-date with this program instead of comparing times.
    pub program: Option<String>,
}

/// One rule for one target. A head with several targets gives one `Rule` per target,
/// sharing the recipe.
#[derive(Debug, Clone)]
pub struct Rule {
    /// The target this rule makes (a pattern for metarules).
    pub target: String,
    /// Every target of the head this rule came from (`$alltarget`).
    pub targets: Vec<String>,
    /// The prerequisites (patterns for metarules); empty when there are none.
    pub prereqs: Vec<String>,
    pub attributes: Attributes,
    /// The recipe text as the shell gets it (leading blank of each line dropped).
    pub recipe: String,
    /// True for `%`/`&` metarules and `:R:` rules.
    pub is_meta: bool,
    /// The file and line of the head.
    pub file: String,
    pub line: usize,
    /// The shell command the recipe runs with (`MKSHELL` when the rule was read).
    pub shell: Vec<String>,
    /// Identifies the recipe text: rules from one head share it (mk compares recipes by
    /// identity when it looks for ambiguity).
    pub(crate) recipe_id: usize,
    pub(crate) regex: Option<regex::Regex>,
}

impl Rule {
    pub(crate) fn has_effect(&self) -> bool {
        !self.recipe.is_empty() || !self.prereqs.is_empty()
    }
}

/// All rules, indexed the ways mk needs them.
#[derive(Debug, Clone, Default)]
pub struct RuleSet {
    pub(crate) rules: Vec<Rule>,
    /// Per target name, its explicit and meta rules in mk's chain order.
    pub(crate) by_target: HashMap<String, Vec<usize>>,
    /// Metarules in definition order.
    pub(crate) meta: Vec<usize>,
}

/// Parses mkfiles into a variable table and a rule set.
pub struct Parser<'r> {
    runner: &'r dyn Runner,
    directory: PathBuf,
    pub variables: Variables,
    pub rules: RuleSet,
    pub default_targets: Option<Vec<String>>,
    pub warnings: Vec<Warning>,
    shell: Vec<String>,
    recipes: usize,
    /// How many includes deep the text being read is.
    depth: usize,
}

impl std::fmt::Debug for Parser<'_> {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("Parser")
            .field("directory", &self.directory)
            .field("rules", &self.rules.rules.len())
            .finish_non_exhaustive()
    }
}

/// How deep includes may nest.
const MAX_INCLUDE_DEPTH: usize = 64;

enum Separator {
    Colon,
    Equals,
    Include,
    Pipe,
}

impl<'r> Parser<'r> {
    /// A parser whose includes and commands resolve relative to `directory`.
    pub fn new(runner: &'r dyn Runner, directory: PathBuf) -> Self {
        let mut parser = Parser {
            runner,
            directory,
            variables: Variables::default(),
            rules: RuleSet::default(),
            default_targets: None,
            warnings: Vec::new(),
            shell: vec!["sh".to_string()],
            recipes: 0,
            depth: 0,
        };
        parser.variables.set("MKSHELL", parser.shell.clone());
        parser
    }

    /// The environment a command sees: every exported variable, internal ones empty.
    pub fn environment(variables: &Variables) -> Vec<(String, String)> {
        let mut environment: Vec<(String, String)> = crate::expand::INTERNAL_VARIABLES
            .iter()
            .map(|name| (name.to_string(), String::new()))
            .collect();
        for (name, value) in variables.iter() {
            if variables.is_exported(name) {
                environment.push((name.clone(), value.join(" ")));
            }
        }
        environment
    }

    /// Parse a file; `name` is what diagnostics call it.
    pub fn parse_path(&mut self, name: &str, path: &Path) -> Result<(), Error> {
        let bytes = std::fs::read(path).map_err(|source| Error::ReadMkfile {
            path: path.to_path_buf(),
            source,
        })?;
        self.parse_text(name, &String::from_utf8_lossy(&bytes), false)
    }

    /// Parse mkfile text. `command_line` marks assignments that later ones cannot change.
    ///
    /// As mk(1) says, every file starts with sh: a file's `MKSHELL=` holds for the rest of
    /// that file only, and `$MKSHELL` is the includer's shell again after an include.
    pub fn parse_text(&mut self, name: &str, text: &str, command_line: bool) -> Result<(), Error> {
        let outer = std::mem::replace(&mut self.shell, vec!["sh".to_string()]);
        self.variables.set("MKSHELL", self.shell.clone());
        let result = self.parse_lines(name, text, command_line);
        self.variables.set("MKSHELL", outer.clone());
        self.shell = outer;
        result
    }

    /// The quoting rules of the shell in force.
    fn quoting(&self) -> Quoting {
        Quoting::of_shell(&self.shell)
    }

    fn parse_lines(&mut self, name: &str, text: &str, command_line: bool) -> Result<(), Error> {
        let mut lexer = Lexer::new(name, text);
        loop {
            lexer.quoting = self.quoting();
            let runner = self.runner;
            let directory = self.directory.clone();
            let shell = self.shell.clone();
            let variables = &self.variables;
            let mut backquote = |command: &str, location: Location| -> Result<String, Error> {
                let outcome = runner
                    .run(&Command {
                        argv: shell.clone(),
                        stdin: Some(command.to_string()),
                        environment: Self::environment(variables),
                        directory: directory.clone(),
                        capture_stdout: true,
                        targets: Vec::new(),
                    })
                    .map_err(|source| Error::Command {
                        command: command.trim_end().to_string(),
                        location,
                        source: Box::new(source),
                    })?;
                let mut output = String::from_utf8_lossy(&outcome.stdout).into_owned();
                if output.ends_with('\n') {
                    output.pop();
                }
                Ok(output)
            };
            let Some(line) = lexer.logical_line(&mut backquote)? else {
                return Ok(());
            };
            self.statement(&mut lexer, &line, command_line)?;
        }
    }

    fn location(&self, lexer: &Lexer<'_>, line: &LogicalLine, offset: usize) -> Location {
        let (number, column) = line.position(offset);
        lexer.location(number, column)
    }

    fn expand(
        &mut self,
        lexer: &Lexer<'_>,
        line: &LogicalLine,
        text: &str,
        base: usize,
    ) -> Result<Vec<String>, Error> {
        let mut expander = Expander::with_quoting(&self.variables, self.quoting());
        let result = expander.words(text);
        let warnings = std::mem::take(&mut expander.warnings);
        for warning in warnings {
            let (offset, message) = match warning {
                ExpandProblem::MissingVariableName { offset } => {
                    (offset, "missing variable name after `$`".to_string())
                }
                ExpandProblem::BadVariableName { offset, name } => {
                    (offset, format!("bad variable name `{name}` in `${{…}}`"))
                }
                _ => continue,
            };
            let location = self.location(lexer, line, base + offset);
            self.warnings.push(Warning {
                message,
                location: Some(location),
            });
        }
        result.map_err(|problem| match problem {
            ExpandProblem::MissingClosingBrace { offset } => Error::MissingClosingBrace {
                location: self.location(lexer, line, base + offset),
            },
            ExpandProblem::MissingClosingQuote { offset }
            | ExpandProblem::MissingVariableName { offset }
            | ExpandProblem::BadVariableName { offset, .. } => Error::MissingClosingQuote {
                quote: text[offset..].chars().next().unwrap_or('\''),
                location: self.location(lexer, line, base + offset),
            },
        })
    }

    fn statement(
        &mut self,
        lexer: &mut Lexer<'_>,
        line: &LogicalLine,
        command_line: bool,
    ) -> Result<(), Error> {
        let text = line.text.as_str();
        let quoting = self.quoting();
        let Some(at) = char_in_with(text, ":=<", quoting) else {
            return Err(Error::ExpectedRuleOrAssignment {
                location: self.location(lexer, line, 0),
            });
        };
        let mut separator = match text.as_bytes()[at] {
            b':' => Separator::Colon,
            b'=' => Separator::Equals,
            _ => Separator::Include,
        };
        let mut rest = at + 1;
        if matches!(separator, Separator::Include) && text[rest..].starts_with('|') {
            separator = Separator::Pipe;
            rest += 1;
        }
        let mut attributes = Attributes::default();
        let mut not_exported = false;
        match separator {
            Separator::Equals => {
                // mk's `termchars`: the quotes of the shell, `=` and blanks.
                let terminators = match quoting {
                    Quoting::Sh => "\"'= \t",
                    Quoting::Rc => "'= \t",
                };
                if let Some(end) =
                    char_in_with(&text[rest..], terminators, quoting).map(|i| i + rest)
                    && text.as_bytes()[end] == b'='
                {
                    for (offset, c) in text[rest..end].char_indices() {
                        if c != 'U' {
                            return Err(Error::UnknownAttribute {
                                attribute: c,
                                location: self.location(lexer, line, rest + offset),
                            });
                        }
                        not_exported = true;
                    }
                    rest = end + 1;
                }
            }
            Separator::Colon => {
                if let Some(first) = text[rest..].chars().next()
                    && first != ' '
                    && first != '\t'
                {
                    rest = self.rule_attributes(lexer, line, rest, &mut attributes)?;
                }
            }
            _ => {}
        }
        let head = self.expand(lexer, line, &text[..at], 0)?;
        let is_include = matches!(separator, Separator::Include | Separator::Pipe);
        if head[0].is_empty() && !is_include {
            return Err(Error::EmptyLeftSide {
                separator: text.as_bytes()[at] as char,
                location: self.location(lexer, line, at),
            });
        }
        let tail = self.expand(lexer, line, &text[rest..], rest)?;
        match separator {
            Separator::Include => self.include(lexer, line, &tail),
            Separator::Pipe => self.include_program(lexer, line, &tail),
            Separator::Colon => {
                let recipe = lexer.recipe();
                let file = lexer.file().to_string();
                self.add_rules(lexer, line, head, tail, recipe, attributes, file)
            }
            Separator::Equals => {
                if head.len() > 1 {
                    return Err(Error::MultipleVariables {
                        location: self.location(lexer, line, 0),
                    });
                }
                let name = &head[0];
                let set = if self.variables.is_overridden(name) {
                    command_line
                } else {
                    if command_line {
                        self.variables.mark_overridden(name);
                    }
                    true
                };
                if set {
                    if name == "MKSHELL" {
                        self.shell = tail.clone();
                    }
                    self.variables.set(name, tail);
                    self.variables.mark_assigned(name);
                }
                if not_exported {
                    self.variables.mark_not_exported(name);
                }
                Ok(())
            }
        }
    }

    /// Read `VQ…:` after the first colon; returns the offset after the closing colon.
    fn rule_attributes(
        &mut self,
        lexer: &Lexer<'_>,
        line: &LogicalLine,
        start: usize,
        attributes: &mut Attributes,
    ) -> Result<usize, Error> {
        let text = line.text.as_str();
        let mut offset = start;
        while let Some(c) = text[offset..].chars().next() {
            if c == ':' {
                return Ok(offset + 1);
            }
            let at = offset;
            offset += c.len_utf8();
            match c {
                'D' => attributes.delete_on_error = true,
                'E' => attributes.continue_on_error = true,
                'n' => attributes.not_virtual = true,
                'N' => attributes.no_recipe_ok = true,
                'Q' => attributes.quiet = true,
                'R' => attributes.regex = true,
                'U' => attributes.update = true,
                'V' => attributes.is_virtual = true,
                'P' => {
                    let Some(end) = text[offset..].find(':').map(|i| i + offset) else {
                        return Err(Error::MissingTrailingColon {
                            location: self.location(lexer, line, text.len()),
                        });
                    };
                    attributes.program = Some(text[offset..end].to_string());
                    offset = end;
                }
                other => {
                    return Err(Error::UnknownAttribute {
                        attribute: other,
                        location: self.location(lexer, line, at),
                    });
                }
            }
        }
        Err(Error::MissingTrailingColon {
            location: self.location(lexer, line, text.len()),
        })
    }

    /// Parses an included text one level deeper. 9base recurses without a limit and
    /// crashes on a file that includes itself; a limit gives a diagnostic instead (no real
    /// mkfile nests includes anywhere near it).
    fn parse_included(&mut self, name: &str, text: &str, location: Location) -> Result<(), Error> {
        if self.depth >= MAX_INCLUDE_DEPTH {
            return Err(Error::IncludesTooDeep {
                name: name.to_owned(),
                limit: MAX_INCLUDE_DEPTH,
                location,
            });
        }
        self.depth += 1;
        let result = self.parse_text(name, text, false);
        self.depth -= 1;
        result
    }

    fn include(
        &mut self,
        lexer: &Lexer<'_>,
        line: &LogicalLine,
        tail: &[String],
    ) -> Result<(), Error> {
        let name = tail.join(" ");
        if name.is_empty() {
            return Err(Error::MissingIncludeFile {
                location: self.location(lexer, line, 0),
            });
        }
        let path = self.directory.join(&name);
        match std::fs::read(&path) {
            Ok(bytes) => {
                let location = self.location(lexer, line, 0);
                self.parse_included(&name, &String::from_utf8_lossy(&bytes), location)
            }
            Err(error) => {
                self.warnings.push(Warning {
                    message: format!("skipping missing include file `{name}`: {error}"),
                    location: Some(self.location(lexer, line, 0)),
                });
                Ok(())
            }
        }
    }

    fn include_program(
        &mut self,
        lexer: &Lexer<'_>,
        line: &LogicalLine,
        tail: &[String],
    ) -> Result<(), Error> {
        let command = tail.join(" ");
        let location = self.location(lexer, line, 0);
        if command.is_empty() {
            return Err(Error::MissingIncludeProgram { location });
        }
        let mut argv = self.shell.clone();
        argv.push("-c".to_string());
        argv.push(command.clone());
        let outcome = self
            .runner
            .run(&Command {
                argv,
                stdin: None,
                environment: Self::environment(&self.variables),
                directory: self.directory.clone(),
                capture_stdout: true,
                targets: Vec::new(),
            })
            .map_err(|source| Error::Command {
                command: command.clone(),
                location: location.clone(),
                source: Box::new(source),
            })?;
        self.parse_included(
            &command,
            &String::from_utf8_lossy(&outcome.stdout),
            location.clone(),
        )?;
        if !outcome.status.success() {
            return Err(Error::IncludeProgramFailed { command, location });
        }
        Ok(())
    }

    #[expect(clippy::too_many_arguments, reason = "mirrors mk's addrules")]
    fn add_rules(
        &mut self,
        lexer: &Lexer<'_>,
        line: &LogicalLine,
        head: Vec<String>,
        tail: Vec<String>,
        recipe: String,
        attributes: Attributes,
        file: String,
    ) -> Result<(), Error> {
        if self.default_targets.is_none()
            && !attributes.regex
            && !head.iter().any(|target| target.contains(['%', '&']))
        {
            self.default_targets = Some(head.clone());
        }
        let prereqs = if tail[0].is_empty() { Vec::new() } else { tail };
        let quoting = self.quoting();
        self.recipes += 1;
        let recipe_id = self.recipes;
        for target in &head {
            let is_meta = attributes.regex || char_in_with(target, "%&", quoting).is_some();
            let regex = if attributes.regex {
                Some(compile_regex(target).map_err(|source| Error::BadRegex {
                    pattern: target.clone(),
                    location: self.location(lexer, line, 0),
                    source: Box::new(source),
                })?)
            } else {
                None
            };
            let rule = Rule {
                target: target.clone(),
                targets: head.clone(),
                prereqs: prereqs.clone(),
                attributes: attributes.clone(),
                recipe: recipe.clone(),
                is_meta,
                file: file.clone(),
                line: line.line,
                shell: self.shell.clone(),
                recipe_id,
                regex,
            };
            self.add_rule(rule);
        }
        Ok(())
    }

    fn add_rule(&mut self, rule: Rule) {
        let rules = &mut self.rules;
        let chain = rules.by_target.entry(rule.target.clone()).or_default();
        if let Some(&existing) = chain
            .iter()
            .find(|&&i| rules.rules[i].prereqs == rule.prereqs)
        {
            // mk reuses the rule with the same target and prerequisites, keeping its place.
            let old = &mut rules.rules[existing];
            let regex = old.regex.take();
            *old = Rule {
                regex: regex.or(rule.regex),
                ..rule
            };
            return;
        }
        let index = rules.rules.len();
        // mk's chain: the first rule, then the others newest first.
        if chain.is_empty() {
            chain.push(index);
        } else {
            chain.insert(1, index);
        }
        if rule.is_meta {
            rules.meta.push(index);
        }
        rules.rules.push(rule);
    }
}

/// Compile a Plan 9 regular expression with the `regex` crate. Plan 9 has no counted
/// repetition and `\` quotes any character, so braces and escapes are made literal.
/// (Plan 9 matches leftmost-longest, this crate leftmost-first: alternations whose
/// branches are prefixes of each other may capture differently.)
pub fn compile_regex(pattern: &str) -> Result<regex::Regex, regex::Error> {
    let mut translated = String::with_capacity(pattern.len() + 8);
    let mut chars = pattern.chars();
    let mut in_class = false;
    while let Some(c) = chars.next() {
        match c {
            '\\' => match chars.next() {
                Some(next) => translated.push_str(&regex::escape(&next.to_string())),
                None => translated.push_str("\\\\"),
            },
            '[' if !in_class => {
                in_class = true;
                translated.push('[');
                if let Some(next) = chars.clone().next()
                    && next == '^'
                {
                    chars.next();
                    translated.push('^');
                }
                if let Some(next) = chars.clone().next()
                    && next == ']'
                {
                    chars.next();
                    translated.push_str("\\]");
                }
            }
            ']' if in_class => {
                in_class = false;
                translated.push(']');
            }
            '[' | '&' | '~' if in_class => {
                translated.push('\\');
                translated.push(c);
            }
            '{' | '}' if !in_class => {
                translated.push('\\');
                translated.push(c);
            }
            _ => translated.push(c),
        }
    }
    regex::Regex::new(&translated)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exec::HostRunner;

    /// Each rule as `target:attributes:prereqs` (attributes as mk letters) and the recipe.
    fn summary(text: &str) -> Result<Vec<String>, String> {
        let runner = HostRunner;
        let mut parser = Parser::new(&runner, PathBuf::from("."));
        parser
            .parse_text("mkfile", text, false)
            .map_err(|error| error.to_string())?;
        Ok(parser
            .rules
            .rules
            .iter()
            .map(|rule| {
                let a = &rule.attributes;
                let letters: String = [
                    (a.is_virtual, 'V'),
                    (a.quiet, 'Q'),
                    (a.continue_on_error, 'E'),
                    (a.no_recipe_ok, 'N'),
                    (a.regex, 'R'),
                    (a.delete_on_error, 'D'),
                    (a.update, 'U'),
                    (a.not_virtual, 'n'),
                    (a.program.is_some(), 'P'),
                ]
                .iter()
                .filter(|(on, _)| *on)
                .map(|(_, letter)| *letter)
                .collect();
                let meta = if rule.is_meta { "meta " } else { "" };
                format!(
                    "{meta}{}:{letters}:{}|{}",
                    rule.target,
                    rule.prereqs.join(","),
                    rule.recipe
                )
            })
            .collect())
    }

    #[test]
    fn rules_table() {
        let cases: &[(&str, &[&str])] = &[
            ("a: b c\n\techo\n", &["a::b,c|echo\n"]),
            ("a b: c\n", &["a::c|", "b::c|"]),
            ("a:VQ: b\n\tx\n", &["a:VQ:b|x\n"]),
            ("a::b\n", &["a::b|"]),
            ("%.o: %.c\n\tcc\n", &["meta %.o::%.c|cc\n"]),
            ("&.x:\n", &["meta &.x::|"]),
            ("'(.*)\\.o':R: '\\1.c'\n", &["meta (.*)\\.o:R:\\1.c|"]),
            ("a:Pcmp -s: b\n", &["a:P:b|"]),
            ("X=p q\n$X: r\n", &["p::r|", "q::r|"]),
            ("a:DUEnN:\n", &["a:ENDUn:|"]),
            (
                "a: b\n\tone\n#c\n\ttwo\n\nc: d\n",
                &["a::b|one\n#c\ntwo\n", "c::d|"],
            ),
            ("a: x\n\tfirst\na: x\n\tsecond\n", &["a::x|second\n"]),
        ];
        for (text, expected) in cases {
            let expected: Vec<String> = expected.iter().map(|s| s.to_string()).collect();
            assert_eq!(summary(text), Ok(expected), "input {text:?}");
        }
    }

    #[test]
    fn errors_table() {
        let cases: &[(&str, &str)] = &[
            ("just words\n", "expected one of `:`, `=` or `<`"),
            ("a:X:\n", "unknown attribute `X`"),
            ("a:V\n", "missing trailing `:` after the attributes"),
            (
                "A B=1\n",
                "more than one variable on the left side of an assignment",
            ),
            (": a\n", "no target or variable on the left side of `:`"),
            ("=a\n", "no target or variable on the left side of `=`"),
            ("C=a=b\n", "unknown attribute `a`"),
            ("<\n", "missing include file name after `<`"),
            ("<|\n", "missing include program after `<|`"),
            ("X='a\n", "missing closing quote `'`"),
            ("X=${Y:a\n", "missing `}` in variable substitution"),
            ("'(':R:\n", "bad regular expression `(`"),
        ];
        for (text, expected) in cases {
            assert_eq!(summary(text), Err(expected.to_string()), "input {text:?}");
        }
    }

    #[test]
    fn assignments() {
        let runner = HostRunner;
        let mut parser = Parser::new(&runner, PathBuf::from("."));
        parser
            .parse_text("args", "O=cmd\n", true)
            .expect("command line parses");
        parser
            .parse_text("mkfile", "A=1 2\nO=file\nH=U=x\nB=$A-z\n", false)
            .expect("mkfile parses");
        let get = |name: &str| parser.variables.get(name).cloned();
        assert_eq!(get("A"), Some(vec!["1".to_string(), "2".to_string()]));
        assert_eq!(get("O"), Some(vec!["cmd".to_string()]));
        assert_eq!(get("B"), Some(vec!["1".to_string(), "2-z".to_string()]));
        assert!(!parser.variables.is_exported("H"));
        assert!(parser.variables.is_assigned("A"));
        assert_eq!(get("MKSHELL"), Some(vec!["sh".to_string()]));
    }
}

#[cfg(test)]
mod include_depth {
    use super::*;
    use crate::exec::HostRunner;

    /// Regression: a file that includes itself overflowed the stack (9base segfaults).
    #[test]
    fn a_file_that_includes_itself_is_a_diagnostic_even_on_a_small_stack() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("inc"), "X=1\n<inc\n").expect("write");
        let directory = dir.path().to_owned();
        let message = std::thread::Builder::new()
            .stack_size(2 << 20)
            .spawn(move || {
                let runner = HostRunner;
                let mut parser = Parser::new(&runner, directory);
                parser
                    .parse_text("mkfile", "<inc\nall:V:\n\ttrue\n", false)
                    .expect_err("too deep")
                    .to_string()
            })
            .expect("thread")
            .join()
            .expect("no overflow");
        assert!(
            message.contains("nest more than 64 deep at `inc`"),
            "{message}"
        );
    }
}
