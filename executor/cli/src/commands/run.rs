//! `ci-exec run`: one task through any driver, as `docker run` would run it.

use std::io::Write as _;
use std::os::fd::AsFd as _;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use ci_exec_driver::{
    Container, Driver, DriverConfig, Stdin, Task, generate_namespace, wait_for_exit,
};
use tokio::io::{AsyncWrite, AsyncWriteExt as _};

use crate::drivers::new_driver;
use crate::exit::{CliError, INFRASTRUCTURE, INTERRUPTED};

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// The driver DSN: `NAME`, `NAME://NAMESPACE?K=V&…` or `NAME:K=V,…`. A run in a generated
    /// namespace removes everything it made; a named namespace keeps its volumes
    #[arg(long, env = "CI_EXEC_DRIVER", value_name = "DSN")]
    driver: String,
    /// Container image (drivers without images run in their own OS and ignore it)
    #[arg(long, default_value = "")]
    image: String,
    /// Set an environment variable; `-e NAME` copies NAME from this environment
    #[arg(short = 'e', long = "env", value_name = "NAME=VALUE")]
    env: Vec<String>,
    /// Mount volume NAME of the namespace at PATH (created on demand)
    #[arg(short = 'v', long = "volume", value_name = "NAME:/PATH")]
    volumes: Vec<String>,
    /// Forward our stdin to the task
    #[arg(short = 'i', long)]
    interactive: bool,
    /// Working directory of the command
    #[arg(short = 'w', long = "workdir", value_name = "DIR")]
    workdir: Option<String>,
    /// Give the task outbound network (the qemu driver's tasks have none otherwise)
    #[arg(long, conflicts_with = "offline")]
    network: bool,
    /// Run the task with no network but a loopback (docker, podman and native tasks have
    /// their engine's or the host's otherwise)
    #[arg(long)]
    offline: bool,
    /// The command and its arguments (after `--`)
    #[arg(
        required = true,
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "COMMAND"
    )]
    command: Vec<String>,
}

pub async fn run(args: RunArgs) -> anyhow::Result<u8> {
    let config = DriverConfig::parse(&args.driver)?;
    let task = build_task(&args, &|name| std::env::var(name).ok())?;
    let driver = new_driver(&config).await?;
    let outcome = run_task(&*driver, task).await;
    // A generated namespace holds only what this run made: remove all of it.
    if !config.namespace_given
        && let Err(error) = driver.close().await
    {
        tracing::warn!("cannot close namespace `{}`: {error}", config.namespace);
    }
    outcome
}

enum Ended {
    Exited(i32),
    Interrupted,
}

async fn run_task(driver: &dyn Driver, task: Task) -> anyhow::Result<u8> {
    let id = task.id.clone();
    // The driver's errors name the command and say what failed; no context needed.
    let container = driver.run_container(task).await?;
    let ended = tokio::select! {
        result = stream_until_exit(&*container) => result.map(Ended::Exited),
        () = interrupted() => Ok(Ended::Interrupted),
    };
    if let Err(error) = container.cleanup().await {
        tracing::warn!("cannot remove task `{id}`: {error}");
    }
    match ended? {
        Ended::Exited(code) => Ok(u8::try_from(code).unwrap_or(INFRASTRUCTURE)),
        Ended::Interrupted => {
            eprintln!("ci-exec: interrupted; task `{id}` stopped and removed");
            Ok(INTERRUPTED)
        }
    }
}

async fn stream_until_exit(container: &dyn Container) -> anyhow::Result<i32> {
    let mut stdout = Direct::new(std::io::stdout().as_fd())?;
    let mut stderr = Direct::new(std::io::stderr().as_fd())?;
    match container.as_follow() {
        Some(follow) => follow.follow(&mut stdout, &mut stderr).await?,
        None => {
            wait_for_exit(container, Duration::from_millis(200), None).await?;
            container.logs(&mut stdout, &mut stderr).await?;
        }
    }
    stdout.flush().await?;
    stderr.flush().await?;
    Ok(wait_for_exit(container, Duration::from_millis(50), None).await?)
}

/// Our stdout or stderr, written directly (no buffering, no blocking-pool thread per write as
/// `tokio::io::stdout` uses): the task's bytes go out as they arrive, and a run spawns no
/// helper threads (per-task overhead, benches/native). A write blocks while a slow reader
/// drains the pipe, which is the back-pressure a `run` wants.
struct Direct(std::fs::File);

impl Direct {
    fn new(fd: std::os::fd::BorrowedFd<'_>) -> std::io::Result<Direct> {
        Ok(Direct(std::fs::File::from(fd.try_clone_to_owned()?)))
    }
}

impl AsyncWrite for Direct {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Poll::Ready(self.get_mut().0.write(buf))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// Resolves on Ctrl-C or SIGTERM.
pub(crate) async fn interrupted() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = terminate => {}
    }
}

fn build_task(args: &RunArgs, host_env: &dyn Fn(&str) -> Option<String>) -> Result<Task, CliError> {
    let mut task = Task::new(
        format!("run-{}", &generate_namespace()[3..]),
        args.command.clone(),
    )
    .image(args.image.clone());
    for item in &args.env {
        match item.split_once('=') {
            Some((name, value)) if valid_env_name(name) => {
                task.env.insert(name.to_owned(), value.to_owned());
            }
            None if valid_env_name(item) => {
                if let Some(value) = host_env(item) {
                    task.env.insert(item.clone(), value);
                }
            }
            _ => {
                return Err(CliError::usage(format!(
                    "invalid `-e {item}`: write `-e NAME=VALUE` (or `-e NAME` to copy it from \
                     this environment)"
                )));
            }
        }
    }
    for item in &args.volumes {
        let (name, path) = item.split_once(':').ok_or_else(|| {
            CliError::usage(format!("invalid `-v {item}`: write `-v NAME:/PATH`"))
        })?;
        if name.is_empty() || name.contains('/') || name.starts_with('.') {
            return Err(CliError::usage(format!(
                "invalid `-v {item}`: `{name}` is not a volume name; `-v` mounts a named volume \
                 of the namespace (`-v data:/data`), not a host directory"
            )));
        }
        if !path.starts_with('/') {
            return Err(CliError::usage(format!(
                "invalid `-v {item}`: the mount path `{path}` must be absolute, e.g. `-v {name}:/{name}`"
            )));
        }
        task = task.mount(name, path);
    }
    if let Some(workdir) = &args.workdir {
        task = task.workdir(workdir.clone());
    }
    if args.interactive {
        task = task.stdin(Stdin::stream(tokio::io::stdin()));
    }
    if args.network || args.offline {
        task = task.network(args.network);
    }
    Ok(task)
}

fn valid_env_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with(|c: char| c.is_ascii_digit())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(env: &[&str], volumes: &[&str]) -> RunArgs {
        RunArgs {
            driver: "native".into(),
            image: String::new(),
            env: env.iter().map(|item| (*item).to_owned()).collect(),
            volumes: volumes.iter().map(|item| (*item).to_owned()).collect(),
            interactive: false,
            workdir: None,
            network: false,
            offline: false,
            command: vec!["true".into()],
        }
    }

    fn host(name: &str) -> Option<String> {
        (name == "FROM_HOST").then(|| "host value".to_owned())
    }

    #[test]
    fn env_and_volumes_build_the_task() {
        let task = build_task(
            &args(
                &["A=1", "B=x=y", "FROM_HOST", "UNSET_ON_HOST"],
                &["data:/data"],
            ),
            &host,
        )
        .expect("task");
        assert_eq!(task.env.get("A").map(String::as_str), Some("1"));
        assert_eq!(task.env.get("B").map(String::as_str), Some("x=y"));
        assert_eq!(
            task.env.get("FROM_HOST").map(String::as_str),
            Some("host value")
        );
        assert!(!task.env.contains_key("UNSET_ON_HOST"));
        assert_eq!(task.mounts.len(), 1);
        assert!(task.id.starts_with("run-"));
    }

    #[test]
    fn bad_arguments_say_how_to_fix_them() {
        let cases: &[(&[&str], &[&str], &str)] = &[
            (
                &["=1"],
                &[],
                "invalid `-e =1`: write `-e NAME=VALUE` (or `-e NAME` to copy it from this environment)",
            ),
            (
                &["1A=x"],
                &[],
                "invalid `-e 1A=x`: write `-e NAME=VALUE` (or `-e NAME` to copy it from this environment)",
            ),
            (&[], &["data"], "invalid `-v data`: write `-v NAME:/PATH`"),
            (
                &[],
                &["/srv:/data"],
                "invalid `-v /srv:/data`: `/srv` is not a volume name; `-v` mounts a named volume of the namespace (`-v data:/data`), not a host directory",
            ),
            (
                &[],
                &["data:rel"],
                "invalid `-v data:rel`: the mount path `rel` must be absolute, e.g. `-v data:/data`",
            ),
        ];
        for (env, volumes, expected) in cases {
            let error = build_task(&args(env, volumes), &host).expect_err("bad input");
            assert_eq!(error.message, *expected);
            assert_eq!(error.code, crate::exit::USAGE);
        }
    }
}
