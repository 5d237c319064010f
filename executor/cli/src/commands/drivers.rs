//! `ci-exec drivers`: the registry, as a table or JSON.

use std::fmt::Write as _;

use ci_exec_driver::{DriverSpec, ParamSpec, drivers};

use crate::exit::SUCCESS;

#[derive(Debug, clap::Args)]
pub struct DriversArgs {
    /// Print JSON instead of a table
    #[arg(long)]
    json: bool,
}

pub fn run(args: &DriversArgs) -> anyhow::Result<u8> {
    if args.json {
        let list: Vec<_> = drivers().iter().map(driver_json).collect();
        println!("{}", serde_json::to_string_pretty(&list)?);
    } else {
        print!("{}", table());
    }
    Ok(SUCCESS)
}

fn driver_json(driver: &DriverSpec) -> serde_json::Value {
    let params: Vec<_> = driver.params.iter().map(param_json).collect();
    serde_json::json!({
        "name": driver.name,
        "description": driver.description,
        "available": driver.available,
        "params": params,
    })
}

fn param_json(param: &ParamSpec) -> serde_json::Value {
    serde_json::json!({
        "name": param.name,
        "type": param.kind.describe(),
        "default": param.default.value(),
        "env": param.env,
        "required": param.required,
        "secret": param.secret,
        "description": param.description,
    })
}

fn table() -> String {
    let mut text = String::from(
        "Every driver takes `NAME`, `NAME://NAMESPACE?KEY=VALUE&…` or `NAME:KEY=VALUE,…`;\n\
         `namespace=` names the namespace (generated when absent). DSN > env var > default.\n",
    );
    for driver in drivers() {
        let availability = if driver.available {
            ""
        } else {
            " (not yet available)"
        };
        let _ = write!(
            text,
            "\n{}{availability}  {}\n",
            driver.name, driver.description
        );
        if driver.params.is_empty() {
            text.push_str("  (no parameters)\n");
        }
        for param in driver.params {
            let mut notes = Vec::new();
            if param.required {
                notes.push("required".to_owned());
            }
            if param.secret {
                notes.push("secret".to_owned());
            }
            if let Some(default) = param.default.value() {
                notes.push(format!("default {default}"));
            }
            if let Some(env) = param.env {
                notes.push(format!("env {env}"));
            }
            let _ = writeln!(
                text,
                "  {:<15} {:<18} {}{}",
                param.name,
                param.kind.describe(),
                param.description,
                if notes.is_empty() {
                    String::new()
                } else {
                    format!(" [{}]", notes.join(", "))
                }
            );
        }
    }
    text
}
