//! Property test: the parser never panics, whatever the input, and every error it returns
//! renders a diagnostic whose location is inside the input.

use mkrunner::{Mkfile, ParseOptions, Source};
use proptest::prelude::*;

/// A runner that refuses to start anything, so arbitrary backquotes and `<|` lines cannot
/// run commands on the test machine.
struct Refuse;

impl mkrunner::Runner for Refuse {
    fn run(&self, _: &mkrunner::Command) -> Result<mkrunner::Outcome, mkrunner::RunnerError> {
        Err(mkrunner::RunnerError::EmptyCommand)
    }
}

fn parse(text: &str) -> Result<Mkfile, mkrunner::Error> {
    let options = ParseOptions {
        sources: vec![Source::Text {
            name: "mkfile".to_string(),
            text: text.to_string(),
        }],
        directory: std::env::temp_dir().join("mkrunner-fuzz-no-such-directory"),
        environment: vec![("X".to_string(), "a b".to_string())],
        assignments: Vec::new(),
        mkflags: String::new(),
        mkargs: String::new(),
    };
    Mkfile::parse(&options, &Refuse)
}

fn mkfile_like() -> impl Strategy<Value = String> {
    let pieces = prop::sample::select(vec![
        "a",
        "b.o",
        "%",
        "&",
        ":",
        "::",
        "=",
        "<",
        "<|",
        "$",
        "${",
        "}",
        "$X",
        "${X:a=b}",
        "${X:%.c=%.o}",
        "'",
        "\"",
        "\\",
        "\\\n",
        "#",
        "`",
        "`{",
        " ",
        "\t",
        "\n",
        "\n\t",
        "V",
        "Q",
        "R",
        "P",
        "U",
        "é",
        "\r",
        "(",
        ")",
        "[",
    ]);
    prop::collection::vec(pieces, 0..40).prop_map(|pieces| pieces.concat())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn parser_never_panics_on_mkfile_like_text(text in mkfile_like()) {
        if let Err(error) = parse(&text) {
            let rendered = error.render();
            prop_assert!(rendered.starts_with("mk: error: "));
            if let Some(location) = error.location() {
                prop_assert!(location.line >= 1);
                prop_assert!(location.line <= text.split('\n').count() + 1);
            }
        }
    }

    #[test]
    fn parser_never_panics_on_arbitrary_text(text in any::<String>()) {
        let _ = parse(&text);
    }

    #[test]
    fn parser_never_panics_on_arbitrary_bytes(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
        let _ = parse(&String::from_utf8_lossy(&bytes));
    }
}

fn rules_like() -> impl Strategy<Value = String> {
    let line = (
        prop::sample::select(vec![
            "a",
            "b",
            "c",
            "a b",
            "%.o",
            "x%",
            "&",
            "'(.*)\\.o'",
            "all",
        ]),
        prop::sample::select(vec![":", ":V:", ":Q:", ":R:", ":N:", ":VE:", ":D:", ":n:"]),
        prop::sample::select(vec![
            "", " a", " b c", " %.c", " a.o", " \\1.c", " all", " x.o",
        ]),
        prop::sample::select(vec!["\n", "\n\techo $target\n", "\n\techo $stem\n"]),
    )
        .prop_map(|(head, attributes, prereqs, recipe)| {
            format!("{head}{attributes}{prereqs}{recipe}")
        });
    prop::collection::vec(line, 0..8).prop_map(|lines| lines.concat())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(500))]

    /// Planning (graph, ambiguity, cycles, the out-of-date walk) never panics either.
    #[test]
    fn planning_never_panics(text in rules_like()) {
        if let Ok(mkfile) = parse(&text) {
            let options = mkrunner::BuildOptions::default();
            let _ = mkfile.plan(&["all"], &options, &Refuse);
            let _ = mkfile.plan(&["a.o", "b"], &options, &Refuse);
        }
    }
}
