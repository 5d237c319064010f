//! `ci-exec key`: this executor's signing key.

use ci_exec_remote::identity::ExecutorKey;

use crate::exit::SUCCESS;

#[derive(Debug, clap::Subcommand)]
pub enum KeyCommand {
    /// Print this executor's public key, `name:base64` (created on first use), for other
    /// executors' `CI_EXEC_TRUSTED_KEYS`
    Show,
}

pub fn run(command: KeyCommand) -> anyhow::Result<u8> {
    match command {
        KeyCommand::Show => {
            let path = ExecutorKey::default_path();
            let key = ExecutorKey::load_or_create(&path)?;
            println!("{}", key.public());
        }
    }
    Ok(SUCCESS)
}
