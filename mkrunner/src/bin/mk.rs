//! `mk`: Plan 9 mk on the command line. Parses flags and hands everything to the library.

use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use mkrunner::{BuildOptions, HostRunner, Mkfile, ParseOptions, Source};

const USAGE: &str = "usage: mk [-f file] [-n] [-a] [-e] [-t] [-k] [-i] [-s] [-w files] [targets ...]\n       mk [-f file] --outline NAME,... [assignments ...]";

fn main() -> ExitCode {
    let arguments: Vec<String> = std::env::args_os()
        .skip(1)
        .map(|argument| argument.to_string_lossy().into_owned())
        .collect();
    let mut options = BuildOptions::default();
    let mut files: Vec<String> = Vec::new();
    let mut flags: Vec<String> = Vec::new();
    // Our extension (9base has no long options): print the mkfile's outline instead of
    // building, with the values of the listed variables (`mkrunner::outline`).
    let mut outline: Option<Vec<String>> = None;
    let mut index = 0;
    while index < arguments.len() && arguments[index].starts_with('-') {
        let argument = &arguments[index];
        if argument == "--outline" {
            index += 1;
            let Some(names) = arguments.get(index) else {
                return usage("`--outline` needs a comma-separated list of variable names");
            };
            outline = Some(
                names
                    .split(',')
                    .filter(|name| !name.is_empty())
                    .map(str::to_owned)
                    .collect(),
            );
            index += 1;
            continue;
        }
        flags.push(argument.clone());
        match argument.as_bytes().get(1) {
            Some(b'a') => options.all = true,
            Some(b'd') => {}
            Some(b'e') => options.explain = true,
            Some(b'f') => {
                index += 1;
                let Some(file) = arguments.get(index) else {
                    return usage("`-f` needs a file name");
                };
                files.push(file.clone());
                flags.push(file.clone());
            }
            Some(b'i') => options.make_intermediates = true,
            Some(b'k') => options.keep_going = true,
            Some(b'n') => options.dry_run = true,
            Some(b's') => options.separately = true,
            Some(b't') => options.touch = true,
            Some(b'u') => {}
            Some(b'w') => {
                let names = if argument.len() > 2 {
                    argument[2..].to_string()
                } else {
                    index += 1;
                    match arguments.get(index) {
                        Some(names) => names.clone(),
                        None => return usage("`-w` needs file names"),
                    }
                };
                options.assume_modified.extend(
                    names
                        .split([' ', ',', '\n'])
                        .filter(|name| !name.is_empty())
                        .map(str::to_string),
                );
            }
            _ => return usage(&format!("unknown flag `{argument}`")),
        }
        index += 1;
    }
    let rest = &arguments[index..];
    let (assignments, targets): (Vec<String>, Vec<String>) = rest
        .iter()
        .cloned()
        .partition(|argument| argument.contains('='));
    let mut mkflags = flags.join(" ");
    for assignment in &assignments {
        if !mkflags.is_empty() {
            mkflags.push(' ');
        }
        mkflags.push_str(assignment);
    }
    let sources = if files.is_empty() {
        if std::fs::metadata("mkfile").is_ok() {
            vec![Source::File(PathBuf::from("mkfile"))]
        } else {
            Vec::new()
        }
    } else {
        files
            .into_iter()
            .map(|f| Source::File(PathBuf::from(f)))
            .collect()
    };
    let parse_options = ParseOptions {
        sources,
        directory: PathBuf::from("."),
        environment: mkrunner::process_environment(),
        assignments,
        mkflags,
        mkargs: targets.join(" "),
    };
    let mkfile = match Mkfile::parse(&parse_options, &HostRunner) {
        Ok(mkfile) => mkfile,
        Err(error) => return fail(&error),
    };
    for warning in mkfile.warnings() {
        eprint!("{}", warning.render());
    }
    if let Some(names) = outline {
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        let text = mkrunner::Outline::of(&mkfile, &names).render();
        return match std::io::stdout().lock().write_all(text.as_bytes()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(_) => ExitCode::FAILURE,
        };
    }
    let stdout = std::io::stdout();
    let mut output = stdout.lock();
    let result = mkfile.build(&targets, &options, &HostRunner, &mut output);
    let _ = output.flush();
    match result {
        Ok(report) => {
            for warning in &report.warnings {
                eprint!("{}", warning.render());
            }
            for error in &report.errors {
                eprint!("{}", error.render());
            }
            ExitCode::SUCCESS
        }
        Err(error) => fail(&error),
    }
}

fn fail(error: &mkrunner::Error) -> ExitCode {
    eprint!("{}", error.render());
    ExitCode::FAILURE
}

fn usage(problem: &str) -> ExitCode {
    eprintln!("mk: error: {problem}\n{USAGE}");
    ExitCode::FAILURE
}
