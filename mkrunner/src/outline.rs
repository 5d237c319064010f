//! A parsed mkfile's outline as text: its explicit targets and the values of the variables a
//! caller asks for. `mk --outline NAME,…` prints it, so a program that must not run an mkfile's
//! commands itself (ci-exec, whose mkfiles come from the repositories it tests) learns what the
//! mkfile defines from the `mk` that runs where those commands may run.
//!
//! The format is line-based and versioned by its first line; fields are separated by tabs and
//! escaped (`\\`, `\t`, `\n`), so any target or word survives the round trip.

use std::collections::BTreeMap;

use crate::Mkfile;

const HEADER: &str = "mk-outline 1";

/// What an mkfile defines, as [`Outline::render`] prints it and [`Outline::parse`] reads it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Outline {
    /// The explicit targets, each once, in the order they first appear.
    pub targets: Vec<String>,
    /// The asked-for variables that are set, with their words.
    pub variables: BTreeMap<String, Vec<String>>,
}

impl Outline {
    /// The outline of `mkfile`, with the values of `variables` that are set.
    pub fn of(mkfile: &Mkfile, variables: &[&str]) -> Outline {
        Outline {
            targets: mkfile.targets().into_iter().map(str::to_owned).collect(),
            variables: variables
                .iter()
                .filter_map(|&name| Some((name.to_owned(), mkfile.variable(name)?)))
                .collect(),
        }
    }

    pub fn render(&self) -> String {
        let mut text = format!("{HEADER}\n");
        for target in &self.targets {
            text.push_str("target\t");
            text.push_str(&escape(target));
            text.push('\n');
        }
        for (name, words) in &self.variables {
            text.push_str("variable\t");
            text.push_str(&escape(name));
            for word in words {
                text.push('\t');
                text.push_str(&escape(word));
            }
            text.push('\n');
        }
        text
    }

    /// Reads what [`Outline::render`] wrote; the error says what is wrong in one line.
    pub fn parse(text: &str) -> Result<Outline, String> {
        let mut lines = text.lines();
        match lines.next() {
            Some(HEADER) => {}
            Some(other) => return Err(format!("expected `{HEADER}`, found `{other}`")),
            None => return Err("the outline is empty".to_owned()),
        }
        let mut outline = Outline::default();
        for line in lines {
            let mut fields = line.split('\t').map(unescape);
            match (fields.next().transpose()?.as_deref(), fields.next()) {
                (Some("target"), Some(target)) => outline.targets.push(target?),
                (Some("variable"), Some(name)) => {
                    let words = fields.collect::<Result<Vec<_>, _>>()?;
                    outline.variables.insert(name?, words);
                }
                _ => return Err(format!("unexpected outline line `{line}`")),
            }
        }
        Ok(outline)
    }
}

fn escape(text: &str) -> String {
    text.replace('\\', "\\\\")
        .replace('\t', "\\t")
        .replace('\n', "\\n")
}

fn unescape(field: &str) -> Result<String, String> {
    let mut text = String::with_capacity(field.len());
    let mut chars = field.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            text.push(c);
            continue;
        }
        match chars.next() {
            Some('\\') => text.push('\\'),
            Some('t') => text.push('\t'),
            Some('n') => text.push('\n'),
            _ => return Err(format!("bad escape in outline field `{field}`")),
        }
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outlines_survive_the_round_trip() {
        let outline = Outline {
            targets: vec![
                "test".into(),
                "/var/run/ci/env/A".into(),
                "odd\\name".into(),
            ],
            variables: BTreeMap::from([
                ("ARTIFACTS".into(), vec!["a b".into(), "tab\there".into()]),
                ("EMPTY".into(), Vec::new()),
                ("LINES".into(), vec!["one\ntwo".into(), String::new()]),
            ]),
        };
        assert_eq!(Outline::parse(&outline.render()), Ok(outline));
    }

    #[test]
    fn outlines_of_mkfiles_list_explicit_targets_and_set_variables() {
        let mkfile = Mkfile::parse_str(
            "mkfile",
            "A=x y\ntest:V: b\n\ttrue\n%.o: %.c\n\tcc $stem.c\nb:\n\ttouch b\n",
            &[],
        )
        .expect("parse");
        let outline = Outline::of(&mkfile, &["A", "UNSET"]);
        assert_eq!(outline.targets, ["test", "b"]);
        assert_eq!(
            outline.variables,
            BTreeMap::from([("A".to_owned(), vec!["x".to_owned(), "y".to_owned()])])
        );
    }

    #[test]
    fn damaged_outlines_are_errors() {
        assert!(Outline::parse("").is_err());
        assert!(Outline::parse("mk-outline 9\n").is_err());
        assert!(Outline::parse("mk-outline 1\nrule\tx\n").is_err());
        assert!(Outline::parse("mk-outline 1\ntarget\tbad\\q\n").is_err());
    }
}
