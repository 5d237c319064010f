//! Golden tests of what mk prints on standard error, just-style, and its exit status.

use crate::harness::Test;

fn check(mkfile: &str, args: &[&str], expected_stderr: &str) {
    let mut test = Test::new().mkfile(mkfile);
    if let [target] = args {
        test = test.args([*target]);
    }
    let run = test.run();
    assert_eq!(run.stderr, expected_stderr, "mkfile:\n{mkfile}");
    assert_eq!(run.status, Some(1), "mkfile:\n{mkfile}");
}

#[test]
fn unknown_attribute_points_at_the_letter() {
    check(
        "all:VX: foo\n\techo\n",
        &[],
        "mk: error: unknown attribute `X`\n --> mkfile:1:6\n  |\n1 | all:VX: foo\n  |      ^\n",
    );
}

#[test]
fn unclosed_quote_points_at_the_quote() {
    check(
        "A=1\nX=\"abc\n",
        &[],
        "mk: error: missing closing quote `\"`\n --> mkfile:2:3\n  |\n2 | X=\"abc\n  |   ^\n",
    );
}

#[test]
fn unclosed_substitution_points_at_the_dollar() {
    check(
        "X=${A:a=b\n",
        &[],
        "mk: error: missing `}` in variable substitution\n --> mkfile:1:3\n  |\n1 | X=${A:a=b\n  |   ^\n",
    );
}

#[test]
fn attribute_error_in_a_value_with_equals() {
    check(
        "C=a=b\n",
        &[],
        "mk: error: unknown attribute `a`\n --> mkfile:1:3\n  |\n1 | C=a=b\n  |   ^\n",
    );
}

#[test]
fn missing_trailing_colon_points_at_the_end() {
    check(
        "all:V\n\techo\n",
        &[],
        "mk: error: missing trailing `:` after the attributes\n --> mkfile:1:6\n  |\n1 | all:V\n  |      ^\n",
    );
}

#[test]
fn line_without_separator() {
    check(
        "x=1\njust words\n",
        &[],
        "mk: error: expected one of `:`, `=` or `<`\n --> mkfile:2:1\n  |\n2 | just words\n  | ^\n",
    );
}

#[test]
fn error_in_a_continued_line_points_at_the_right_line() {
    check(
        "all:V: a \\\n   'b\n",
        &[],
        "mk: error: missing closing quote `'`\n --> mkfile:2:4\n  |\n2 |    'b\n  |    ^\n",
    );
}

#[test]
fn cycle() {
    check(
        "a: b\n\techo\nb: a\n\techo\n",
        &[],
        "mk: error: cycle in graph detected at target `a`\n",
    );
}

#[test]
fn dont_know_how_names_the_directory() {
    check(
        "all: nope\n\techo\n",
        &[],
        "mk: error: don't know how to make `nope` in `$DIR`\n",
    );
}

#[test]
fn failed_recipe_names_target_status_and_recipe() {
    check(
        "all:V:\n\texit 3\n",
        &[],
        "mk: error: recipe for `all` failed with exit(3): `exit 3`\n",
    );
}

#[test]
fn deleted_targets_are_listed() {
    check(
        "out:D:\n\ttouch out; false\n",
        &[],
        "mk: error: recipe for `out` failed with exit(1): `touch out; false`, deleted `out`\n",
    );
}

#[test]
fn ambiguous_recipes_list_both_rules() {
    check(
        "t:V: a\n\techo one\nt:V: b\n\techo two\na b:V:\n\techo\n",
        &[],
        "mk: error: ambiguous recipes for `t`: mkfile:1, mkfile:3\n",
    );
}

#[test]
fn include_program_failure() {
    check(
        "<|exit 1\n",
        &[],
        "mk: error: include program `exit 1` failed\n --> mkfile:1:1\n  |\n1 | <|exit 1\n  | ^\n",
    );
}

#[test]
fn nothing_to_mk() {
    check(
        "A=1\n",
        &[],
        "mk: error: nothing to mk: the mkfile has no rule without `%` and no target was given\n",
    );
}

#[test]
fn warnings_do_not_fail() {
    let run = Test::new().mkfile("X=$/\nall:V:\n\techo ok\n").run();
    assert_eq!(
        run.stderr,
        "mk: warning: missing variable name after `$`\n --> mkfile:1:3\n"
    );
    assert_eq!(run.stdout, "echo ok\nok\n");
    assert_eq!(run.status, Some(0));
}

#[test]
fn unknown_flag_prints_usage() {
    let run = Test::new().mkfile("all:V:\n\techo\n").args(["-z"]).run();
    assert!(
        run.stderr
            .starts_with("mk: error: unknown flag `-z`\nusage: mk"),
        "{}",
        run.stderr
    );
    assert_eq!(run.status, Some(1));
}

#[test]
fn non_utf8_environment_and_arguments_do_not_panic() {
    use std::os::unix::ffi::OsStrExt as _;
    let test = Test::new().mkfile("all:V:\n\techo ok\n");
    let output = std::process::Command::new(crate::harness::ours())
        .arg(std::ffi::OsStr::from_bytes(b"all"))
        .env("BAD", std::ffi::OsStr::from_bytes(b"\xff"))
        .current_dir(test.directory())
        .output()
        .expect("run mk");
    assert_eq!(String::from_utf8_lossy(&output.stdout), "echo ok\nok\n");
    assert_eq!(output.status.code(), Some(0));
}
