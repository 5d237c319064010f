//! `ci-exec`: parses the command line and hands it to the command modules. Everything else
//! lives in the libraries (`ci-exec-driver`, the drivers, `ci-exec-job`).

mod commands;
mod drivers;
mod exit;

use clap::Parser;

/// Hermetic, local-first CI: run a repository's mk targets in a cached VM and replay results.
#[derive(Debug, Parser)]
#[command(name = "ci-exec", version, about, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: commands::Command,
}

fn main() {
    // clap exits 2 on a usage error and 0 for --help / --version.
    let cli = Cli::parse();
    if cli.command.only_prints() {
        exit::end_quietly_on_closed_output();
    }
    exit::init_logging();
    // `run` writes its output straight to fds 1 and 2, so nothing of it waits in the runtime;
    // the other commands write through tokio's stdout, whose last writes the runtime's
    // blocking threads finish when it is dropped.
    let reads_stdin = matches!(cli.command, commands::Command::Run(_));
    let code = match commands::runtime(&cli.command) {
        Ok(runtime) => {
            let code = match runtime.block_on(commands::dispatch(cli.command)) {
                Ok(code) => code,
                Err(error) => exit::report(&error),
            };
            if reads_stdin {
                // Dropping the runtime would join its blocking threads, and one may sit in a
                // read of our stdin (`run -i`) long after the task has finished.
                runtime.shutdown_background();
            }
            code
        }
        Err(error) => {
            exit::report(&anyhow::Error::new(error).context("cannot start the async runtime"))
        }
    };
    std::process::exit(i32::from(code));
}
