//! `ci-exec doctor`: can this host run the qemu driver, and how (accelerator and why, QEMU
//! version, guest image, podman in the guest).

use ci_exec_driver::DriverConfig;

use crate::exit::{CliError, INFRASTRUCTURE, SUCCESS};

#[derive(Debug, clap::Args)]
pub struct DoctorArgs {
    /// The qemu driver configuration to check
    #[arg(
        long,
        env = "CI_EXEC_DRIVER",
        value_name = "DSN",
        default_value = "qemu"
    )]
    driver: String,
    /// Check the host only: do not boot a guest to ask it about podman
    #[arg(long)]
    no_boot: bool,
    /// Print the report as JSON
    #[arg(long)]
    json: bool,
}

pub async fn run(args: DoctorArgs) -> anyhow::Result<u8> {
    let config = DriverConfig::parse(&args.driver)?;
    if config.driver != "qemu" {
        return Err(CliError::usage(format!(
            "`doctor` checks the `qemu` driver, not `{}`",
            config.driver
        ))
        .into());
    }
    run_qemu(&config, &args).await
}

#[cfg(feature = "qemu")]
async fn run_qemu(config: &DriverConfig, args: &DoctorArgs) -> anyhow::Result<u8> {
    let qemu = ci_exec_qemu::QemuConfig::from_driver_config(config)?;
    let report = ci_exec_qemu::doctor::diagnose(&qemu, !args.no_boot).await;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        let line = |name: &str, check: &ci_exec_qemu::doctor::Check| {
            let mark = if check.ok { "ok  " } else { "FAIL" };
            println!("{mark} {name:<12} {}", check.detail);
        };
        line("qemu", &report.qemu_version);
        line("qemu-img", &report.qemu_img);
        println!(
            "ok   {:<12} {} ({})",
            "accelerator", report.accel.accel, report.accel.reason
        );
        line("image", &report.image);
        match &report.guest {
            Some(check) => line("guest", check),
            None => println!("-    {:<12} not booted", "guest"),
        }
        if let Some(check) = &report.podman {
            line("podman", check);
        }
        println!("     {:<12} {}", "warm states", report.warm_state_dir);
    }
    Ok(if report.ok() { SUCCESS } else { INFRASTRUCTURE })
}

#[cfg(not(feature = "qemu"))]
async fn run_qemu(_config: &DriverConfig, _args: &DoctorArgs) -> anyhow::Result<u8> {
    Err(
        CliError::infrastructure("the `qemu` driver is not built into this binary")
            .hint("build ci-exec with `--features qemu`")
            .into(),
    )
}
