//! `ci-exec driver show|close`: one driver configuration, resolved or cleaned up.

use std::fmt::Write as _;

use anyhow::Context as _;
use ci_exec_driver::{DriverConfig, ParamSource, REDACTED};

use crate::drivers::new_driver;
use crate::exit::{CliError, SUCCESS};

#[derive(Debug, clap::Subcommand)]
pub enum DriverCommand {
    /// Print the resolved configuration: every parameter with its value (secrets redacted)
    Show {
        /// The driver DSN: `NAME`, `NAME://NAMESPACE?K=V&…` or `NAME:K=V,…`
        #[arg(long, env = "CI_EXEC_DRIVER", value_name = "DSN")]
        driver: String,
        /// Print JSON: {"driver", "namespace", "params", "unknown"}
        #[arg(long)]
        json: bool,
    },
    /// Remove everything the namespace holds (tasks, volumes, VMs), e.g. after a crash
    Close {
        /// The driver DSN, naming the namespace: `NAME://NAMESPACE` or `NAME:namespace=…`
        #[arg(long, env = "CI_EXEC_DRIVER", value_name = "DSN")]
        driver: String,
    },
}

pub async fn run(command: DriverCommand) -> anyhow::Result<u8> {
    match command {
        DriverCommand::Show { driver, json } => {
            let config = DriverConfig::parse(&driver)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&config.to_json())?);
            } else {
                print!("{}", show_text(&config));
            }
            Ok(SUCCESS)
        }
        DriverCommand::Close { driver } => {
            let config = DriverConfig::parse(&driver)?;
            if !config.namespace_given {
                return Err(CliError::usage(format!(
                    "`driver close` needs the namespace to close: write \
                     `--driver={}://NAMESPACE`",
                    config.driver
                ))
                .into());
            }
            let driver = new_driver(&config).await?;
            driver.close().await.with_context(|| {
                format!(
                    "cannot close namespace `{}` of driver `{}`",
                    config.namespace, config.driver
                )
            })?;
            eprintln!(
                "closed namespace `{}` of driver `{}`",
                config.namespace, config.driver
            );
            Ok(SUCCESS)
        }
    }
}

fn show_text(config: &DriverConfig) -> String {
    let mut text = format!(
        "driver     {}\nnamespace  {}{}\n",
        config.driver,
        config.namespace,
        if config.namespace_given {
            ""
        } else {
            " (generated)"
        }
    );
    for param in config.params() {
        let value = match (&param.raw, param.spec.secret) {
            (None, _) => "(unset)",
            (Some(_), true) => REDACTED,
            (Some(raw), false) => raw.as_str(),
        };
        let source = match param.source {
            ParamSource::Dsn => "dsn".to_owned(),
            ParamSource::Env(variable) => format!("env {variable}"),
            ParamSource::Default => "default".to_owned(),
            ParamSource::Unset => "driver decides".to_owned(),
        };
        let _ = writeln!(text, "  {:<15} {value}  ({source})", param.spec.name);
    }
    for (name, value) in config.unknown() {
        let _ = writeln!(text, "  {name:<15} {value}  (unknown parameter, ignored)");
    }
    text
}
