//! One module per subcommand. To add one: a module here, a variant of [`Command`], an arm in
//! [`dispatch`]. Each returns the process's exit code, or an error that `exit` prints.

#[cfg(feature = "qemu")]
mod cache;
mod daemon;
mod doctor;
mod driver;
mod drivers;
mod image;
mod init;
mod key;
mod results;
mod run;
mod schedule;
mod serve;
mod test;
mod token;

use clap::Subcommand;

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run one command through any driver, streaming its output, exiting with its exit code
    Run(run::RunArgs),
    /// Inspect or clean up one driver configuration
    #[command(subcommand)]
    Driver(driver::DriverCommand),
    /// List every driver with its DSN parameters
    Drivers(drivers::DriversArgs),
    /// Run the repository's mk job (`mk prepare-runtime`, `mk test`, artifacts) hermetically,
    /// or replay its recorded result
    Test(test::TestArgs),
    /// Check the qemu driver on this host: accelerator and why, QEMU, guest image, podman
    Doctor(doctor::DoctorArgs),
    /// Build, list, locate or prune guest images
    #[command(subcommand)]
    Image(image::ImageCommand),
    /// List, show or prune recorded results
    #[command(subcommand)]
    Results(results::ResultsCommand),
    /// Run in the background: serve results, run each registered repository's schedule
    #[command(subcommand)]
    Daemon(daemon::DaemonCommand),
    /// Print the repository's schedule (`/var/run/ci/crontab`, built in the base OS)
    Schedule(schedule::ScheduleArgs),
    /// Serve results to other executors: the orchestrator (`serve gc` drops old ones)
    Serve(serve::ServeArgs),
    /// Write the CI stub that runs `ci-exec test` on GitHub Actions or GitLab CI
    Init(init::InitArgs),
    /// Create, list or revoke the orchestrator's per-repository tokens and CI bindings
    #[command(subcommand)]
    Token(token::TokenCommand),
    /// Show this executor's signing key
    #[command(subcommand)]
    Key(key::KeyCommand),
    /// List or prune the per-repository warm states (podman images and layer cache)
    #[cfg(feature = "qemu")]
    #[command(subcommand)]
    Cache(cache::CacheCommand),
}

impl Command {
    /// Commands whose only effect is what they print: a reader that goes away (`| head -1`)
    /// may simply end them, as it ends `ls`. The others manage VMs, containers and files,
    /// which a signal must not cut short: they ignore a closed output.
    pub fn only_prints(&self) -> bool {
        match self {
            Command::Drivers(_) | Command::Results(_) | Command::Doctor(_) | Command::Key(_) => {
                true
            }
            Command::Token(command) => matches!(command, token::TokenCommand::List { .. }),
            #[cfg(feature = "qemu")]
            Command::Cache(_) => true,
            Command::Driver(command) => matches!(command, driver::DriverCommand::Show { .. }),
            Command::Image(command) => !matches!(command, image::ImageCommand::Build { .. }),
            Command::Run(_)
            | Command::Test(_)
            | Command::Serve(_)
            | Command::Schedule(_)
            | Command::Daemon(_)
            | Command::Init(_) => false,
        }
    }
}

/// The async runtime `command` runs on. `run` takes a single-threaded one: it only waits on
/// one task, and starting worker threads is a measurable part of its per-task overhead
/// (benches/native). Everything else gets the multi-threaded default.
pub fn runtime(command: &Command) -> std::io::Result<tokio::runtime::Runtime> {
    match command {
        Command::Run(_) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build(),
        _ => tokio::runtime::Runtime::new(),
    }
}

pub async fn dispatch(command: Command) -> anyhow::Result<u8> {
    match command {
        Command::Run(args) => run::run(args).await,
        Command::Driver(command) => driver::run(command).await,
        Command::Drivers(args) => drivers::run(&args),
        Command::Test(args) => test::run(args).await,
        Command::Results(command) => results::run(command),
        Command::Image(command) => image::run(command),
        Command::Doctor(args) => doctor::run(args).await,
        Command::Serve(args) => serve::run(args).await,
        Command::Schedule(args) => schedule::run(args).await,
        Command::Daemon(command) => daemon::run(command).await,
        Command::Init(args) => init::run(args),
        Command::Token(command) => token::run(command),
        Command::Key(command) => key::run(command),
        #[cfg(feature = "qemu")]
        Command::Cache(command) => cache::run(command),
    }
}
