//! Word splitting and variable expansion, as mk does them when it reads a line.
//!
//! mk expands variables in rule heads and assignments at parse time (recipes are left to
//! the shell). A line becomes a list of words: quotes group, `$name`, `${name}` and
//! `${name:A%B=C%D}` substitute lists, and a word that touches a list is glued to its first
//! and last element, as rc does.

use std::collections::{HashMap, HashSet};

/// The names mk sets for each recipe; they are never imported from the environment.
pub const INTERNAL_VARIABLES: &[&str] = &[
    "target",
    "stem",
    "prereq",
    "pid",
    "nproc",
    "newprereq",
    "alltarget",
    "newmember",
    "stem0",
    "stem1",
    "stem2",
    "stem3",
    "stem4",
    "stem5",
    "stem6",
    "stem7",
    "stem8",
    "stem9",
];

/// Whose quoting rules mk reads a line with: the shell of the file it is in (`MKSHELL`).
///
/// Under sh, `'…'`, `"…"` and `\x` quote. Under rc only `'…'` quotes, a doubled `''`
/// inside stands for one `'`, and `"` and `\` are ordinary characters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Quoting {
    #[default]
    Sh,
    Rc,
}

impl Quoting {
    /// The quoting of a shell command line: rc's when the program's name starts with `rc`
    /// (as mk's `rcmatchname` decides), sh's for anything else.
    pub fn of_shell(shell: &[String]) -> Quoting {
        let program = shell.first().map_or("", String::as_str);
        let name = program.rsplit('/').next().unwrap_or(program);
        if name.starts_with("rc") {
            Quoting::Rc
        } else {
            Quoting::Sh
        }
    }

    /// Whether `c` opens a quoted or escaped token under these rules.
    pub fn is_quote(self, c: char) -> bool {
        match self {
            Quoting::Sh => matches!(c, '\\' | '\'' | '"'),
            Quoting::Rc => c == '\'',
        }
    }
}

/// True for a character that may appear in a variable name.
pub fn is_word_char(c: char) -> bool {
    c > ' ' && !"!\"#$%&'()*+,-./:;<=>?@[\\]^`{|}~".contains(c)
}

/// mk's variable table: values are word lists; the sets record how each name was set.
#[derive(Debug, Clone, Default)]
pub struct Variables {
    values: HashMap<String, Vec<String>>,
    /// Assigned in an mkfile or on the command line (the echo of a recipe expands only these).
    assigned: HashSet<String>,
    /// Marked `U` (`NAME=U=value`): not exported to recipes.
    not_exported: HashSet<String>,
    /// Set on the command line: later assignments in the mkfile do not change them.
    overridden: HashSet<String>,
}

impl Variables {
    /// The value of `name`, if it is set at all.
    pub fn get(&self, name: &str) -> Option<&Vec<String>> {
        self.values.get(name)
    }

    /// Set `name` without marking it as assigned by an mkfile (environment, built-ins).
    pub fn set(&mut self, name: &str, value: Vec<String>) {
        self.values.insert(name.to_string(), value);
    }

    pub(crate) fn mark_assigned(&mut self, name: &str) {
        self.assigned.insert(name.to_string());
    }

    pub(crate) fn mark_not_exported(&mut self, name: &str) {
        self.not_exported.insert(name.to_string());
    }

    pub(crate) fn is_overridden(&self, name: &str) -> bool {
        self.overridden.contains(name)
    }

    pub(crate) fn mark_overridden(&mut self, name: &str) {
        self.overridden.insert(name.to_string());
    }

    /// True when the mkfile or the command line assigned `name`.
    pub fn is_assigned(&self, name: &str) -> bool {
        self.assigned.contains(name)
    }

    /// True when `name` is exported to recipes.
    pub fn is_exported(&self, name: &str) -> bool {
        !self.not_exported.contains(name) && !INTERNAL_VARIABLES.contains(&name)
    }

    /// Every variable, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (&String, &Vec<String>)> {
        self.values.iter()
    }

    /// The value when at least one of its words is non-empty, as `$name` sees it.
    fn non_empty(&self, name: &str) -> Option<&Vec<String>> {
        self.values
            .get(name)
            .filter(|words| words.iter().any(|word| !word.is_empty()))
    }
}

/// A problem found while expanding one line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExpandProblem {
    /// A quote opened at this byte offset is never closed (fatal).
    MissingClosingQuote { offset: usize },
    /// `${name:…` at this offset has no closing `}` (fatal).
    MissingClosingBrace { offset: usize },
    /// `$` at this offset is not followed by a name; mk drops the `$` and goes on.
    MissingVariableName { offset: usize },
    /// `${name` at this offset is followed by something other than `}` or `:`; dropped.
    BadVariableName { offset: usize, name: String },
}

impl ExpandProblem {
    /// Whether mk stops on this problem (the others are warnings).
    pub fn is_fatal(&self) -> bool {
        matches!(
            self,
            ExpandProblem::MissingClosingQuote { .. } | ExpandProblem::MissingClosingBrace { .. }
        )
    }
}

/// Expands lines against a variable table, collecting warnings.
#[derive(Debug)]
pub struct Expander<'a> {
    variables: &'a Variables,
    quoting: Quoting,
    /// Non-fatal problems seen so far.
    pub warnings: Vec<ExpandProblem>,
}

impl<'a> Expander<'a> {
    /// An expander with sh's quoting.
    pub fn new(variables: &'a Variables) -> Self {
        Expander::with_quoting(variables, Quoting::Sh)
    }

    pub fn with_quoting(variables: &'a Variables, quoting: Quoting) -> Self {
        Expander {
            variables,
            quoting,
            warnings: Vec::new(),
        }
    }

    /// Split `text` into words, expanding variables. Like mk's `stow`, an empty result is one
    /// empty word, and an empty quoted word ends the list.
    pub fn words(&mut self, text: &str) -> Result<Vec<String>, ExpandProblem> {
        self.words_at(text, 0)
    }

    fn words_at(&mut self, text: &str, base: usize) -> Result<Vec<String>, ExpandProblem> {
        let mut out = Vec::new();
        let mut position = 0;
        while position < text.len() {
            match self.next_word(text, &mut position, base)? {
                Some(words) => out.extend(words),
                None => break,
            }
        }
        if out.is_empty() {
            out.push(String::new());
        }
        Ok(out)
    }

    fn next_word(
        &mut self,
        text: &str,
        position: &mut usize,
        base: usize,
    ) -> Result<Option<Vec<String>>, ExpandProblem> {
        let bytes = text.as_bytes();
        let mut words: Vec<String> = Vec::new();
        let mut current = String::new();
        let mut empty;
        'restart: loop {
            words.clear();
            while *position < bytes.len() && (bytes[*position] == b' ' || bytes[*position] == b'\t')
            {
                *position += 1;
            }
            empty = true;
            while let Some(c) = text[*position..].chars().next() {
                let start = *position;
                *position += c.len_utf8();
                match c {
                    ' ' | '\t' | '\n' => break,
                    '\\' | '\'' | '"' if self.quoting.is_quote(c) => {
                        empty = false;
                        *position = expand_quote(text, *position, c, self.quoting, &mut current)
                            .ok_or(ExpandProblem::MissingClosingQuote {
                                offset: base + start,
                            })?;
                    }
                    '$' => {
                        let value = self.substitute(text, position, base)?;
                        match value {
                            None => {
                                if empty {
                                    continue 'restart;
                                }
                            }
                            Some(mut value) => {
                                empty = false;
                                if !current.is_empty()
                                    && let Some(first) = value.first_mut()
                                {
                                    first.insert_str(0, &current);
                                    current.clear();
                                }
                                let mut value = value.into_iter();
                                match (words.last_mut(), value.next()) {
                                    (Some(last), Some(first)) => last.push_str(&first),
                                    (None, Some(first)) => words.push(first),
                                    (_, None) => {}
                                }
                                words.extend(value);
                            }
                        }
                    }
                    _ => {
                        empty = false;
                        current.push(c);
                    }
                }
            }
            break;
        }
        let _ = empty;
        if !current.is_empty() {
            match words.last_mut() {
                Some(last) => last.push_str(&current),
                None => words.push(current),
            }
        }
        Ok(if words.is_empty() { None } else { Some(words) })
    }

    /// Expand the variable reference after a `$` at `*position` (which points past the `$`).
    fn substitute(
        &mut self,
        text: &str,
        position: &mut usize,
        base: usize,
    ) -> Result<Option<Vec<String>>, ExpandProblem> {
        let dollar = *position - 1;
        if text[*position..].starts_with('{') {
            *position += 1;
            let Some(name) = variable_name(text, position) else {
                self.warnings.push(ExpandProblem::MissingVariableName {
                    offset: base + dollar,
                });
                return Ok(None);
            };
            let rest = &text[*position..];
            if rest.starts_with('}') {
                *position += 1;
                return Ok(self.lookup(&name));
            }
            if !rest.starts_with(':') {
                self.warnings.push(ExpandProblem::BadVariableName {
                    offset: base + dollar,
                    name,
                });
                return Ok(None);
            }
            let pattern_start = *position + 1;
            let Some(end) = char_in_with(&text[pattern_start..], "}", self.quoting)
                .map(|end| end + pattern_start)
            else {
                return Err(ExpandProblem::MissingClosingBrace {
                    offset: base + dollar,
                });
            };
            *position = end + 1;
            return match self.variables.get(&name) {
                None => Ok(Some(vec![name])),
                Some(value) => {
                    let value = value.clone();
                    self.substitute_pattern(&value, &text[pattern_start..end], base + pattern_start)
                        .map(Some)
                }
            };
        }
        match variable_name(text, position) {
            None => {
                self.warnings.push(ExpandProblem::MissingVariableName {
                    offset: base + dollar,
                });
                Ok(None)
            }
            Some(name) => Ok(self.lookup(&name)),
        }
    }

    fn lookup(&self, name: &str) -> Option<Vec<String>> {
        // plan9port's mk also swallows the blanks after a variable that expands to nothing;
        // 9base's does not, and 9base is the reference.
        self.variables.non_empty(name).cloned()
    }

    /// `${name:A%B=C%D}`: each word that starts with one of A and ends with one of B becomes
    /// C, the middle, and D; other words pass through.
    fn substitute_pattern(
        &mut self,
        value: &[String],
        pattern: &str,
        base: usize,
    ) -> Result<Vec<String>, ExpandProblem> {
        let end = pattern.len();
        let (a, mut cursor) = self.extract(pattern, 0, "=%&", base)?;
        let (mut b, mut c, mut d) = (None, None, None);
        let is_percent =
            |cursor: usize| matches!(pattern.as_bytes().get(cursor), Some(b'%' | b'&'));
        if is_percent(cursor) {
            let (words, next) = self.extract(pattern, cursor + 1, "=", base)?;
            b = words;
            cursor = next;
        }
        if pattern.as_bytes().get(cursor) == Some(&b'=') {
            let (words, next) = self.extract(pattern, cursor + 1, "&%", base)?;
            c = words;
            cursor = next;
        }
        let keep_middle = is_percent(cursor);
        if keep_middle {
            d = Some(self.words_at(&pattern[cursor + 1..], base + cursor + 1)?);
        } else if cursor < end {
            d = Some(self.words_at(&pattern[cursor..], base + cursor)?);
        }
        let mut out = Vec::new();
        for word in value {
            let mut produced: Vec<String> = Vec::new();
            if let Some((start, middle)) = sub_match(word, a.as_deref(), b.as_deref()) {
                if let Some(c) = &c {
                    produced.extend(c.iter().cloned());
                }
                if keep_middle && middle > 0 {
                    let middle = &word[start..start + middle as usize];
                    match produced.last_mut() {
                        Some(last) => last.push_str(middle),
                        None => produced.push(middle.to_string()),
                    }
                }
                if let Some(d) = &d
                    && !d[0].is_empty()
                {
                    match produced.last_mut() {
                        Some(last) => {
                            last.push_str(&d[0]);
                            produced.extend(d[1..].iter().cloned());
                        }
                        None => produced.extend(d.iter().cloned()),
                    }
                }
            }
            if produced.is_empty() {
                produced.push(word.clone());
            }
            out.extend(produced);
        }
        Ok(out)
    }

    /// mk's `extractpat`: the words before the first unescaped character of `terminators`.
    fn extract(
        &mut self,
        pattern: &str,
        start: usize,
        terminators: &str,
        base: usize,
    ) -> Result<(Option<Vec<String>>, usize), ExpandProblem> {
        let rest = &pattern[start..];
        match char_in_with(rest, terminators, self.quoting) {
            Some(0) => Ok((None, start)),
            Some(offset) => Ok((
                Some(self.words_at(&rest[..offset], base + start)?),
                start + offset,
            )),
            None => Ok((Some(self.words_at(rest, base + start)?), pattern.len())),
        }
    }
}

/// Match `word` against prefix alternatives `a` and suffix alternatives `b`; on a match,
/// returns where the middle starts and its length (which may be negative when they overlap).
fn sub_match(word: &str, a: Option<&[String]>, b: Option<&[String]>) -> Option<(usize, isize)> {
    let mut prefix = 0;
    if let Some(a) = a {
        prefix = a.iter().find(|p| word.starts_with(p.as_str()))?.len();
    }
    let mut middle = (word.len() - prefix) as isize;
    if let Some(b) = b {
        let suffix = b
            .iter()
            .find(|s| s.len() <= word.len() && word.ends_with(s.as_str()))?;
        middle -= suffix.len() as isize;
    }
    Some((prefix, middle))
}

/// Read a variable name at `*position`; `None` (position unchanged) if there is none.
fn variable_name(text: &str, position: &mut usize) -> Option<String> {
    let name: String = text[*position..]
        .chars()
        .take_while(|&c| is_word_char(c))
        .collect();
    if name.is_empty() {
        return None;
    }
    *position += name.len();
    Some(name)
}

/// Copy a quoted token into `out`. `position` points past the opening `quote`; returns the
/// position after the token, or `None` when a quote is never closed.
fn expand_quote(
    text: &str,
    mut position: usize,
    quote: char,
    quoting: Quoting,
    out: &mut String,
) -> Option<usize> {
    let mut chars = text[position..].chars();
    if quoting == Quoting::Rc {
        while let Some(c) = chars.next() {
            position += c.len_utf8();
            if c == '\'' {
                if !text[position..].starts_with('\'') {
                    return Some(position);
                }
                chars.next();
                position += 1;
            }
            out.push(c);
        }
        return None;
    }
    if quote == '\\' {
        if let Some(c) = chars.next() {
            out.push(c);
            position += c.len_utf8();
        }
        return Some(position);
    }
    while let Some(c) = chars.next() {
        position += c.len_utf8();
        if c == quote {
            return Some(position);
        }
        out.push(c);
        if c == '\\'
            && let Some(next) = chars.next()
        {
            position += next.len_utf8();
            out.push(next);
        }
    }
    None
}

/// Find the first character of `set` in `text` that is not escaped, quoted, or inside a
/// `${…}`. Returns its byte offset. An unclosed quote ends the search with `None`.
pub fn char_in(text: &str, set: &str) -> Option<usize> {
    char_in_with(text, set, Quoting::Sh)
}

/// [`char_in`] under the given shell's quoting.
pub fn char_in_with(text: &str, set: &str, quoting: Quoting) -> Option<usize> {
    let bytes = text.as_bytes();
    let mut in_braces = false;
    let mut index = 0;
    while index < bytes.len() {
        let c = text[index..].chars().next()?;
        let mut width = c.len_utf8();
        match c {
            '\\' if quoting == Quoting::Sh => {
                if let Some(next) = text[index + 1..].chars().next() {
                    width += next.len_utf8();
                }
            }
            '\'' | '"' if quoting.is_quote(c) => {
                let close = skip_quoted(text, index + 1, c, quoting)?;
                index = close + 1;
                continue;
            }
            '$' => {
                if bytes.get(index + 1) == Some(&b'{') {
                    in_braces = true;
                }
            }
            '}' => {
                if in_braces {
                    in_braces = false;
                } else if set.contains('}') {
                    return Some(index);
                }
            }
            _ => {
                if !in_braces && set.contains(c) {
                    return Some(index);
                }
            }
        }
        index += width;
    }
    None
}

/// The offset of the quote that closes one opened before `start`, skipping escapes.
fn skip_quoted(text: &str, mut index: usize, quote: char, quoting: Quoting) -> Option<usize> {
    while index < text.len() {
        let c = text[index..].chars().next()?;
        if c == quote {
            if quoting == Quoting::Rc && text[index + 1..].starts_with('\'') {
                index += 2;
                continue;
            }
            return Some(index);
        }
        if quoting == Quoting::Rc {
            index += c.len_utf8();
            continue;
        }
        index += c.len_utf8();
        if c == '\\'
            && let Some(next) = text[index..].chars().next()
        {
            index += next.len_utf8();
        }
    }
    None
}

/// The text mk echoes for a recipe: `$name` and `${name}` are replaced when the name is one
/// mk set (assigned in the mkfile or internal), and quoted strings are copied untouched.
pub fn echo_text(recipe: &str, lookup: &dyn Fn(&str) -> Option<String>) -> String {
    echo_text_with(recipe, lookup, Quoting::Sh)
}

/// [`echo_text`] for a recipe whose shell quotes as `quoting` says.
pub fn echo_text_with(
    recipe: &str,
    lookup: &dyn Fn(&str) -> Option<String>,
    quoting: Quoting,
) -> String {
    let mut out = String::with_capacity(recipe.len());
    let mut index = 0;
    while let Some(c) = recipe[index..].chars().next() {
        if c == '$' {
            let name_start = index + 1;
            let braced = recipe[name_start..].starts_with('{');
            let (name_from, name_end, mut resume) = if braced {
                let inner = name_start + 1;
                match recipe[inner..].find('}') {
                    Some(close) => (inner, inner + close, inner + close + 1),
                    None => (inner, recipe.len(), recipe.len()),
                }
            } else {
                let length: usize = recipe[name_start..]
                    .chars()
                    .take_while(|&c| is_word_char(c))
                    .map(char::len_utf8)
                    .sum();
                (name_start, name_start + length, name_start + length)
            };
            // mk's `vexpand` steps over a `}` that ends a plain `$name` too, so the echo of
            // `@{cd dir; mk $target}` loses its `}` when `$target` is expanded (9base,
            // plan9port and 9front all do this; the shell still gets the whole recipe).
            if !braced && recipe[name_end..].starts_with('}') {
                resume += 1;
            }
            match lookup(&recipe[name_from..name_end]) {
                Some(value) => out.push_str(&value),
                None => out.push_str(&recipe[index..resume]),
            }
            index = resume;
            continue;
        }
        out.push(c);
        index += c.len_utf8();
        index = copy_quoted(recipe, index, c, quoting, &mut out);
    }
    out
}

/// mk's `copyq`: after a quote character, copy through its closing quote. A backquote runs
/// to the next backquote under sh, to the next `}` under rc (`` `{command} ``).
fn copy_quoted(
    text: &str,
    mut index: usize,
    quote: char,
    quoting: Quoting,
    out: &mut String,
) -> usize {
    let copy_single = |index: &mut usize, quote: char, out: &mut String| {
        while let Some(c) = text[*index..].chars().next() {
            *index += c.len_utf8();
            out.push(c);
            if c == quote {
                break;
            }
        }
    };
    let (closing, quotes): (char, &[char]) = match quoting {
        Quoting::Sh => ('`', &['\'', '"']),
        Quoting::Rc => ('}', &['\'']),
    };
    if quotes.contains(&quote) {
        copy_single(&mut index, quote, out);
    } else if quote == '`' {
        while let Some(c) = text[index..].chars().next() {
            index += c.len_utf8();
            out.push(c);
            if c == closing {
                break;
            }
            if quotes.contains(&c) {
                copy_single(&mut index, c, out);
            }
        }
    }
    index
}

/// Match `name` against a `%`/`&` pattern; returns the stem. `&` stems contain no `.` or `/`.
pub fn match_pattern(name: &str, pattern: &str) -> Option<String> {
    let percent = pattern.find(['%', '&'])?;
    let (prefix, rest) = pattern.split_at(percent);
    let suffix = &rest[1..];
    if !name.starts_with(prefix) || name.len() < prefix.len() + suffix.len() {
        return None;
    }
    if !name[prefix.len()..].ends_with(suffix) {
        return None;
    }
    let stem = &name[prefix.len()..name.len() - suffix.len()];
    if rest.starts_with('&') && stem.contains(['.', '/']) {
        return None;
    }
    Some(stem.to_string())
}

/// Replace every `%` and `&` in `template` with `stem`.
pub fn substitute_stem(stem: &str, template: &str) -> String {
    let mut out = String::with_capacity(template.len() + stem.len());
    for c in template.chars() {
        if c == '%' || c == '&' {
            out.push_str(stem);
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn variables(pairs: &[(&str, &[&str])]) -> Variables {
        let mut variables = Variables::default();
        for (name, value) in pairs {
            variables.set(name, value.iter().map(|s| s.to_string()).collect());
        }
        variables
    }

    #[test]
    fn words_table() {
        let vars = variables(&[
            ("A", &["a1", "a2"]),
            ("B", &["b"]),
            ("E", &[""]),
            ("SRC", &["x.c", "y.c", "z.h"]),
        ]);
        let cases: &[(&str, &[&str])] = &[
            ("", &[""]),
            ("a b  c", &["a", "b", "c"]),
            ("'a b' c", &["a b", "c"]),
            ("\"a b\"c", &["a bc"]),
            ("a\\ b", &["a b"]),
            ("x$A", &["xa1", "a2"]),
            ("$A-y", &["a1", "a2-y"]),
            ("$A$B", &["a1", "a2b"]),
            ("${B}c", &["bc"]),
            ("$E x", &["x"]),
            ("p$E q", &["p", "q"]),
            ("$UNSET", &[""]),
            ("'' x", &[""]),
            ("${SRC:%.c=%.o}", &["x.o", "y.o", "z.h"]),
            ("${SRC:x%=w%}", &["w.c", "y.c", "z.h"]),
            ("${SRC:x=q}", &["q", "y.c", "z.h"]),
            ("${NOPE:a=b}", &["NOPE"]),
            ("a$/b", &["a/b"]),
        ];
        for (input, expected) in cases {
            let mut expander = Expander::new(&vars);
            let got = expander.words(input).expect("expands");
            assert_eq!(got, *expected, "input {input:?}");
        }
    }

    #[test]
    fn rc_words_table() {
        let vars = variables(&[("D", &["\"astro\""])]);
        let cases: &[(&str, &[&str])] = &[
            ("'it''s' x", &["it's", "x"]),
            ("\"a b\"", &["\"a", "b\""]),
            ("a\\b", &["a\\b"]),
            ("'-DD='$D", &["-DD=\"astro\""]),
            ("'a:b'", &["a:b"]),
        ];
        for (input, expected) in cases {
            let mut expander = Expander::with_quoting(&vars, Quoting::Rc);
            let got = expander.words(input).expect("expands");
            assert_eq!(got, *expected, "input {input:?}");
        }
        assert_eq!(char_in_with("\"a:b\"", ":", Quoting::Rc), Some(2));
        assert_eq!(char_in_with("'a''b:'c:", ":", Quoting::Rc), Some(8));
    }

    #[test]
    fn echo_drops_a_brace_after_an_expanded_name() {
        let lookup = |name: &str| (name == "target").then(|| "t".to_string());
        let cases: &[(&str, Quoting, &str)] = &[
            ("@{cd d; mk $target}", Quoting::Sh, "@{cd d; mk t"),
            ("{$other}", Quoting::Sh, "{$other}"),
            ("${target}}", Quoting::Sh, "t}"),
            ("`{echo $target} $target", Quoting::Rc, "`{echo $target} t"),
            (
                "`{echo $target} $target",
                Quoting::Sh,
                "`{echo $target} $target",
            ),
        ];
        for (recipe, quoting, expected) in cases {
            assert_eq!(
                echo_text_with(recipe, &lookup, *quoting),
                *expected,
                "{recipe:?}"
            );
        }
    }

    #[test]
    fn unclosed_quote_is_fatal() {
        let vars = Variables::default();
        let mut expander = Expander::new(&vars);
        assert_eq!(
            expander.words("a 'b"),
            Err(ExpandProblem::MissingClosingQuote { offset: 2 })
        );
    }

    #[test]
    fn char_in_table() {
        let cases: &[(&str, &str, Option<usize>)] = &[
            ("a: b", ":=<", Some(1)),
            ("'a:b'=c", ":=<", Some(5)),
            ("a\\:b:c", ":", Some(4)),
            ("${x:a=b}=c", "=", Some(8)),
            ("abc", ":", None),
        ];
        for (text, set, expected) in cases {
            assert_eq!(char_in(text, set), *expected, "{text:?}");
        }
    }

    #[test]
    fn match_pattern_table() {
        assert_eq!(match_pattern("foo.o", "%.o").as_deref(), Some("foo"));
        assert_eq!(match_pattern("a/b.o", "&.o"), None);
        assert_eq!(match_pattern("x.o", "x%.o").as_deref(), Some(""));
        assert_eq!(match_pattern("x", "x%.o"), None);
        assert_eq!(substitute_stem("s", "%.c %"), "s.c s");
    }
}
