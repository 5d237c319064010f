//! The first stage: turn mkfile text into logical lines and recipe bodies.
//!
//! As mk's `assline` does, a logical line drops blank lines and `#` comments, joins lines
//! ended by a backslash, keeps quoted text (quotes included) intact for the expander, and
//! replaces a `` `command` `` with the command's output. A recipe body is every following
//! line that starts with a blank (which is dropped) or a `#` (which is kept).

use crate::error::{Error, Location};
use crate::expand::Quoting;

/// One logical line of an mkfile, with a map back to where its characters came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogicalLine {
    /// The assembled text, quotes kept, continuations removed.
    pub text: String,
    /// The line the logical line starts on (1-based).
    pub line: usize,
    /// `(offset in text, line, column)` at each point where the mapping jumps.
    spans: Vec<(usize, usize, usize)>,
    /// Where the next character continues the last span from.
    expected: Option<(usize, usize)>,
}

impl LogicalLine {
    fn new(line: usize) -> Self {
        LogicalLine {
            text: String::new(),
            line,
            spans: Vec::new(),
            expected: None,
        }
    }

    fn push(&mut self, c: char, line: usize, column: usize) {
        if self.expected != Some((line, column)) {
            self.spans.push((self.text.len(), line, column));
        }
        self.expected = Some((line, column + 1));
        self.text.push(c);
    }

    fn push_generated(&mut self, text: &str, line: usize, column: usize) {
        // Generated text all maps to where it was generated: one span per character would be
        // wasteful, so record a span that never "continues".
        self.spans.push((self.text.len(), line, column));
        self.text.push_str(text);
        self.spans.push((self.text.len(), line, column));
        self.expected = None;
    }

    /// The `(line, column)` a byte offset of `text` came from.
    pub fn position(&self, offset: usize) -> (usize, usize) {
        let index = self.spans.partition_point(|&(start, _, _)| start <= offset);
        match index.checked_sub(1).map(|i| self.spans[i]) {
            Some((start, line, column)) => {
                let end = offset.min(self.text.len());
                let delta = self.text.get(start..end).map_or(0, |s| s.chars().count());
                (line, column + delta)
            }
            None => (self.line, 1),
        }
    }
}

/// Reads one mkfile's text.
#[derive(Debug)]
pub struct Lexer<'a> {
    file: &'a str,
    text: &'a str,
    position: usize,
    line: usize,
    column: usize,
    /// The quoting of the file's current shell; `MKSHELL=` in the file changes it.
    pub quoting: Quoting,
}

/// Runs a backquoted command for the lexer and returns its output.
pub type Backquote<'r> = dyn FnMut(&str, Location) -> Result<String, Error> + 'r;

impl<'a> Lexer<'a> {
    pub fn new(file: &'a str, text: &'a str) -> Self {
        Lexer {
            file,
            text,
            position: 0,
            line: 1,
            column: 1,
            quoting: Quoting::Sh,
        }
    }

    /// The file name diagnostics use.
    pub fn file(&self) -> &str {
        self.file
    }

    /// A location with the text of `line` for display.
    pub fn location(&self, line: usize, column: usize) -> Location {
        Location {
            file: self.file.to_string(),
            line,
            column,
            source_line: self
                .text
                .lines()
                .nth(line.saturating_sub(1))
                .unwrap_or("")
                .trim_end_matches('\r')
                .to_string(),
        }
    }

    fn peek(&self) -> Option<char> {
        self.text[self.position..].chars().next()
    }

    fn bump(&mut self) -> Option<char> {
        let c = self.peek()?;
        self.position += c.len_utf8();
        if c == '\n' {
            self.line += 1;
            self.column = 1;
        } else {
            self.column += 1;
        }
        Some(c)
    }

    /// The next character, joining backslash-newline: dropped when `elide`, else a blank.
    fn next_rune(&mut self, elide: bool) -> Option<(char, usize, usize)> {
        loop {
            let (line, column) = (self.line, self.column);
            let c = self.bump()?;
            if c == '\\' {
                let rest = &self.text[self.position..];
                let skip = if rest.starts_with('\n') {
                    Some(1)
                } else if rest.starts_with("\r\n") {
                    Some(2)
                } else {
                    None
                };
                if let Some(skip) = skip {
                    for _ in 0..skip {
                        self.bump();
                    }
                    if elide {
                        continue;
                    }
                    return Some((' ', line, column));
                }
            }
            return Some((c, line, column));
        }
    }

    /// The next logical line, or `None` at the end of the text.
    pub fn logical_line(
        &mut self,
        backquote: &mut Backquote<'_>,
    ) -> Result<Option<LogicalLine>, Error> {
        let mut out = LogicalLine::new(self.line);
        while let Some((c, line, column)) = self.next_rune(true) {
            if out.text.is_empty() {
                out.line = line;
            }
            match c {
                '\r' => {}
                '\n' => {
                    if !out.text.is_empty() {
                        return Ok(Some(out));
                    }
                }
                '\\' | '\'' | '"' if self.quoting.is_quote(c) => {
                    out.push(c, line, column);
                    self.escaped_token(&mut out, c, line, column)?;
                }
                '`' => self.backquote(&mut out, line, column, backquote)?,
                '#' => {
                    let mut last = '#';
                    loop {
                        match self.bump() {
                            None => return Ok(finish(out)),
                            Some('\n') => break,
                            Some('\r') => {}
                            Some(other) => last = other,
                        }
                    }
                    // A comment that ends in a backslash continues the line, as in mk.
                    if last != '\\' && !out.text.is_empty() {
                        return Ok(Some(out));
                    }
                }
                _ => out.push(c, line, column),
            }
        }
        Ok(finish(out))
    }

    /// Copy a quoted or escaped token, quotes included.
    fn escaped_token(
        &mut self,
        out: &mut LogicalLine,
        quote: char,
        line: usize,
        column: usize,
    ) -> Result<(), Error> {
        if quote == '\\' {
            let (l, c) = (self.line, self.column);
            let mut next = self.bump();
            if next == Some('\r') {
                next = self.bump();
            }
            if let Some(next) = next {
                out.push(next, l, c);
            }
            return Ok(());
        }
        while let Some((c, l, col)) = self.next_rune(false) {
            out.push(c, l, col);
            if c == quote {
                // Under rc a doubled quote stands for one and the string goes on.
                if self.quoting == Quoting::Rc && self.peek() == Some('\'') {
                    let (l, col) = (self.line, self.column);
                    self.bump();
                    out.push('\'', l, col);
                    continue;
                }
                return Ok(());
            }
            if c == '\\' && self.quoting == Quoting::Sh {
                let (l, col) = (self.line, self.column);
                let mut next = self.bump();
                if next == Some('\r') {
                    next = self.bump();
                }
                match next {
                    Some(next) => out.push(next, l, col),
                    None => break,
                }
            }
        }
        Err(Error::MissingClosingQuote {
            quote,
            location: self.location(line, column),
        })
    }

    fn backquote(
        &mut self,
        out: &mut LogicalLine,
        line: usize,
        column: usize,
        run: &mut Backquote<'_>,
    ) -> Result<(), Error> {
        while matches!(self.peek(), Some(' ' | '\t')) {
            self.bump();
        }
        let terminator = if self.peek() == Some('{') {
            self.bump();
            while matches!(self.peek(), Some(' ' | '\t')) {
                self.bump();
            }
            '}'
        } else {
            '`'
        };
        let mut command = LogicalLine::new(line);
        while let Some((c, l, col)) = self.next_rune(false) {
            if c == terminator {
                command.text.push('\n');
                let output = run(&command.text, self.location(line, column))?;
                out.push_generated(&output, line, column);
                return Ok(());
            }
            if c == '\n' {
                break;
            }
            command.push(c, l, col);
            if self.quoting.is_quote(c) {
                self.escaped_token(&mut command, c, l, col)?;
            }
        }
        Err(Error::MissingClosingBackquote {
            terminator,
            location: self.location(line, column),
        })
    }

    /// The recipe that follows a rule head: lines starting with a blank or `#`.
    pub fn recipe(&mut self) -> String {
        let mut body = String::new();
        loop {
            match self.peek() {
                Some('#') => {}
                Some(' ' | '\t') => {
                    self.bump();
                }
                _ => return body,
            }
            let rest = &self.text[self.position..];
            let length = rest.find('\n').map_or(rest.len(), |i| i + 1);
            body.push_str(&rest[..length]);
            self.position += length;
            if rest[..length].ends_with('\n') {
                self.line += 1;
                self.column = 1;
            } else {
                self.column += rest[..length].chars().count();
            }
        }
    }
}

fn finish(out: LogicalLine) -> Option<LogicalLine> {
    if out.text.is_empty() { None } else { Some(out) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(text: &str) -> Vec<(String, usize)> {
        let mut lexer = Lexer::new("mkfile", text);
        let mut no_commands =
            |_: &str, _: Location| -> Result<String, Error> { Ok("OUT".to_string()) };
        let mut out = Vec::new();
        while let Some(line) = lexer.logical_line(&mut no_commands).expect("lexes") {
            let recipe = if line.text.contains(':') {
                lexer.recipe()
            } else {
                String::new()
            };
            out.push((format!("{}|{}", line.text, recipe), line.line));
        }
        out
    }

    #[test]
    fn logical_lines_table() {
        let cases: &[(&str, &[(&str, usize)])] = &[
            ("a=b\n", &[("a=b|", 1)]),
            ("\n\na=b", &[("a=b|", 3)]),
            ("a=b # c\nd=e\n", &[("a=b |", 1), ("d=e|", 2)]),
            ("a=x\\\ny\n", &[("a=xy|", 1)]),
            ("a='x # y'\n", &[("a='x # y'|", 1)]),
            ("a=x # c \\\ny\n", &[("a=x y|", 1)]),
            (
                "a:\n\techo 1\n  echo 2\n# c\nb=c\n",
                &[("a:|echo 1\n echo 2\n# c\n", 1), ("b=c|", 5)],
            ),
            ("a:\n\techo\n\nb:\n", &[("a:|echo\n", 1), ("b:|", 4)]),
            ("v=`echo`x\n", &[("v=OUTx|", 1)]),
            ("v=`{echo}\n", &[("v=OUT|", 1)]),
            ("a=\\#b\n", &[("a=\\#b|", 1)]),
            ("a=b\r\n", &[("a=b|", 1)]),
        ];
        for (text, expected) in cases {
            let got = lines(text);
            let expected: Vec<(String, usize)> =
                expected.iter().map(|(s, n)| (s.to_string(), *n)).collect();
            assert_eq!(got, expected, "input {text:?}");
        }
    }

    #[test]
    fn unclosed_quote_points_at_the_quote() {
        let mut lexer = Lexer::new("mkfile", "a=b\nc='d\n");
        let mut run = |_: &str, _: Location| -> Result<String, Error> { Ok(String::new()) };
        lexer.logical_line(&mut run).expect("first line");
        match lexer.logical_line(&mut run) {
            Err(Error::MissingClosingQuote { location, .. }) => {
                assert_eq!((location.line, location.column), (2, 3));
            }
            other => panic!("expected a missing quote, got {other:?}"),
        }
    }

    #[test]
    fn positions_follow_continuations() {
        let mut lexer = Lexer::new("mkfile", "a: b\\\n  c\n");
        let mut run = |_: &str, _: Location| -> Result<String, Error> { Ok(String::new()) };
        let line = lexer
            .logical_line(&mut run)
            .expect("lexes")
            .expect("a line");
        assert_eq!(line.text, "a: b  c");
        assert_eq!(line.position(0), (1, 1));
        assert_eq!(line.position(6), (2, 3));
    }
}
