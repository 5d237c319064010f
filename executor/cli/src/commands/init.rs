//! `ci-exec init github|gitlab`: the CI stub that runs `ci-exec test` in the repository's CI,
//! so a result a developer already produced for the same tree is replayed there instead of
//! run again.
//!
//! The stubs hold no secret: the job proves its repository with the platform's OIDC ID token
//! (GitHub: `id-token: write`, fetched by `ci-exec test` itself; GitLab: the `id_tokens:`
//! variable `CI_EXEC_ID_TOKEN`), whose audience is the orchestrator's URL. The workflow file
//! is in the committed tree, so it is part of the result key as the mkfile is (research §2:
//! a CI definition outside the key is how CREEP poisoned caches).

use std::path::{Path, PathBuf};

use crate::exit::{CliError, SUCCESS};

/// Where the stubs download `ci-exec` from: `{version}` is replaced by the pinned version.
/// A static x86_64 musl binary, as `cargo build --release --target x86_64-unknown-linux-musl
/// -p ci-exec` makes it; change it with `--release-url` to a mirror of your own.
pub const RELEASE_URL: &str = "https://github.com/ci-exec/ci-exec/releases/download/v{version}/ci-exec-x86_64-unknown-linux-musl";

/// Actions, pinned by full commit SHA (a tag can be moved; zizmor's `unpinned-uses`).
const CHECKOUT: &str = "actions/checkout@08c6903cd8c0fde910a37f88322edcfb5dd907a8 # v5.0.0";
const CACHE_RESTORE: &str =
    "actions/cache/restore@55cc8345863c7cc4c66a329aec7e433d2d1c52a9 # v6.1.0";
const CACHE_SAVE: &str = "actions/cache/save@55cc8345863c7cc4c66a329aec7e433d2d1c52a9 # v6.1.0";

#[derive(Debug, clap::Args)]
pub struct InitArgs {
    /// `github` (`.github/workflows/ci-exec.yml`) or `gitlab` (`.gitlab-ci.yml`)
    platform: Platform,
    /// The orchestrator's URL (`ci-exec serve`), also the audience of the job's ID token
    #[arg(long, value_name = "URL")]
    orchestrator: String,
    /// The ci-exec version the job installs (default: this one)
    #[arg(long, value_name = "VERSION", default_value = env!("CARGO_PKG_VERSION"))]
    pin: String,
    /// Where the job downloads ci-exec from; `{version}` stands for the version
    #[arg(long, value_name = "URL", default_value = RELEASE_URL)]
    release_url: String,
    /// The default branch: pushes to it publish to the trusted scope and save the cache
    #[arg(long, value_name = "NAME", default_value = "main")]
    branch: String,
    /// GitLab: no `image:` (a runner with the shell executor, or a self-hosted one)
    #[arg(long)]
    no_image: bool,
    /// Overwrite an existing file
    #[arg(long)]
    force: bool,
    /// The repository's root
    #[arg(long, value_name = "DIR", default_value = ".")]
    path: PathBuf,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum Platform {
    Github,
    Gitlab,
}

/// What `init` writes, for the given answers.
#[derive(Debug, Clone)]
pub struct Stub {
    pub orchestrator: String,
    pub version: String,
    pub release_url: String,
    pub branch: String,
    pub image: bool,
}

impl Stub {
    /// Checks every value that goes into the YAML: nothing in it may close a string or start
    /// a new key (the stub is written by hand-made text, not a YAML library).
    fn check(&self) -> Result<(), CliError> {
        let url_safe = |text: &str| {
            !text.is_empty()
                && text
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-._~:/?#[]@!&()*+,;=%{}".contains(&b))
        };
        let orchestrator = &self.orchestrator;
        if !(orchestrator.starts_with("https://") || orchestrator.starts_with("http://"))
            || !url_safe(orchestrator)
        {
            return Err(CliError::usage(format!(
                "`--orchestrator {orchestrator}` is not an http(s) URL"
            ))
            .hint("give the URL CI jobs reach `ci-exec serve` at, e.g. `https://ci.example.org`"));
        }
        let version_safe = |text: &str| {
            !text.is_empty()
                && text
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b".-+_".contains(&b))
        };
        if !version_safe(&self.version) {
            return Err(CliError::usage(format!(
                "`--pin {}` is not a version",
                self.version
            )));
        }
        if !self.release_url.starts_with("https://") || !url_safe(&self.release_url) {
            return Err(CliError::usage(format!(
                "`--release-url {}` is not an https URL",
                self.release_url
            ))
            .hint("the job downloads ci-exec over https; `{version}` stands for the version"));
        }
        if !version_safe(&self.branch.replace('/', "")) {
            return Err(CliError::usage(format!(
                "`--branch {}` is not a branch name",
                self.branch
            )));
        }
        Ok(())
    }

    fn url(&self) -> String {
        self.release_url.replace("{version}", &self.version)
    }

    pub fn github(&self) -> String {
        let orchestrator = self.orchestrator.trim_end_matches('/');
        format!(
            r#"# Written by `ci-exec init github`. It runs `ci-exec test`, which replays the result of
# this tree when one was already produced (on a developer's machine, say) and published to
# the orchestrator, and runs the job otherwise. No stored secret: `ci-exec test` asks GitHub
# for an OIDC ID token (audience {orchestrator}) and the orchestrator maps it to this
# repository by its numeric id. Only pushes to protected branches publish where `{branch}`
# reads; a pull request writes a scope of its own; a fork's pull request gets no token and
# runs the job without the orchestrator.
name: ci-exec
on:
  push:
    branches: [{branch}]
  pull_request:
  workflow_dispatch:
permissions: {{}}
concurrency:
  group: ci-exec-${{{{ github.ref }}}}
  cancel-in-progress: ${{{{ github.ref != 'refs/heads/{branch}' }}}}
jobs:
  test:
    runs-on: ubuntu-24.04
    timeout-minutes: 60
    permissions:
      contents: read
      id-token: write
    steps:
      - uses: {CHECKOUT}
        with:
          persist-credentials: false
      - name: Restore ci-exec's cache (guest images, warm states)
        uses: {CACHE_RESTORE}
        with:
          path: ~/.cache/ci-exec
          key: ci-exec-${{{{ runner.os }}}}-${{{{ hashFiles('mkfile') }}}}
          restore-keys: ci-exec-${{{{ runner.os }}}}-
      - name: Let the runner user open /dev/kvm (no-op without it; ci-exec falls back to TCG)
        run: |
          if [ -e /dev/kvm ]; then
            echo 'KERNEL=="kvm", GROUP="kvm", MODE="0666", OPTIONS+="static_node=kvm"' | sudo tee /etc/udev/rules.d/99-ci-exec-kvm.rules
            sudo udevadm control --reload-rules
            sudo udevadm trigger --name-match=kvm
          fi
      - name: Install ci-exec {version}
        env:
          CI_EXEC_VERSION: "{version}"
          CI_EXEC_URL: "{url}"
        run: |
          if ! ci-exec --version 2>/dev/null | grep -qx "ci-exec $CI_EXEC_VERSION"; then
            curl -fsSL --retry 3 "$CI_EXEC_URL" -o "$RUNNER_TEMP/ci-exec"
            chmod +x "$RUNNER_TEMP/ci-exec"
            echo "$RUNNER_TEMP" >> "$GITHUB_PATH"
          fi
      - name: Test (replayed when this tree's result exists, else run)
        env:
          CI_EXEC_ORCHESTRATOR: "{orchestrator}"
          CI_EXEC_REPO: github.com/${{{{ github.repository }}}}
        run: ci-exec test
      - name: Save ci-exec's cache (pushes to {branch} only)
        if: github.event_name == 'push' && github.ref == 'refs/heads/{branch}'
        uses: {CACHE_SAVE}
        with:
          path: ~/.cache/ci-exec
          key: ci-exec-${{{{ runner.os }}}}-${{{{ hashFiles('mkfile') }}}}-${{{{ github.run_id }}}}
"#,
            branch = self.branch,
            version = self.version,
            url = self.url(),
        )
    }

    pub fn gitlab(&self) -> String {
        let orchestrator = self.orchestrator.trim_end_matches('/');
        let image = if self.image {
            "  image: debian:bookworm-slim\n"
        } else {
            ""
        };
        let install = if self.image {
            "        apt-get update -qq && apt-get install -y -qq --no-install-recommends curl ca-certificates git\n"
        } else {
            ""
        };
        format!(
            r#"# Written by `ci-exec init gitlab`. It runs `ci-exec test`, which replays the result of
# this tree when one was already produced (on a developer's machine, say) and published to
# the orchestrator, and runs the job otherwise. No stored secret: the job's ID token
# (`id_tokens:`, audience {orchestrator}) proves which project it is, by numeric id. Only
# pipelines of protected branches publish where `{branch}` reads; a merge request writes a
# scope of its own. GitLab keeps the caches of protected and unprotected refs apart.
workflow:
  rules:
    - if: $CI_PIPELINE_SOURCE == "merge_request_event"
    - if: $CI_COMMIT_BRANCH && $CI_OPEN_MERGE_REQUESTS
      when: never
    - if: $CI_COMMIT_BRANCH

ci-exec:
{image}  timeout: 60 minutes
  id_tokens:
    CI_EXEC_ID_TOKEN:
      aud: "{orchestrator}"
  variables:
    CI_EXEC_VERSION: "{version}"
    CI_EXEC_URL: "{url}"
    CI_EXEC_ORCHESTRATOR: "{orchestrator}"
    CI_EXEC_REPO: $CI_SERVER_HOST/$CI_PROJECT_PATH
    XDG_CACHE_HOME: $CI_PROJECT_DIR/.cache
  cache:
    key:
      prefix: ci-exec
      files: [mkfile]
    paths: [.cache/ci-exec]
  before_script:
    - |
      if ! ci-exec --version 2>/dev/null | grep -qx "ci-exec $CI_EXEC_VERSION"; then
{install}        mkdir -p "$CI_PROJECT_DIR/.ci-exec-bin"
        curl -fsSL --retry 3 "$CI_EXEC_URL" -o "$CI_PROJECT_DIR/.ci-exec-bin/ci-exec"
        chmod +x "$CI_PROJECT_DIR/.ci-exec-bin/ci-exec"
        export PATH="$CI_PROJECT_DIR/.ci-exec-bin:$PATH"
      fi
  script:
    - ci-exec test
"#,
            branch = self.branch,
            version = self.version,
            url = self.url(),
        )
    }
}

pub fn run(args: InitArgs) -> anyhow::Result<u8> {
    let stub = Stub {
        orchestrator: args.orchestrator.clone(),
        version: args.pin.clone(),
        release_url: args.release_url.clone(),
        branch: args.branch.clone(),
        image: !args.no_image,
    };
    stub.check()?;
    let (relative, content) = match args.platform {
        Platform::Github => (".github/workflows/ci-exec.yml", stub.github()),
        Platform::Gitlab => (".gitlab-ci.yml", stub.gitlab()),
    };
    let path = args.path.join(relative);
    write(&path, &content, args.force)?;
    eprintln!("wrote `{}`", path.display());
    let next = match args.platform {
        Platform::Github => {
            "next: on the orchestrator, `ci-exec serve --oidc-issuer https://token.actions.githubusercontent.com --oidc-audience URL`, then `ci-exec token bind --repo github.com/OWNER/NAME --issuer https://token.actions.githubusercontent.com --id ID --owner-id ID` (`gh api repos/OWNER/NAME --jq '.id, .owner.id'`)"
        }
        Platform::Gitlab => {
            "next: on the orchestrator, `ci-exec serve --oidc-issuer https://gitlab.com --oidc-audience URL`, then `ci-exec token bind --repo gitlab.com/GROUP/NAME --issuer https://gitlab.com --id PROJECT_ID --owner-id NAMESPACE_ID`"
        }
    };
    eprintln!("{next}");
    Ok(SUCCESS)
}

fn write(path: &Path, content: &str, force: bool) -> anyhow::Result<()> {
    if path.exists() && !force {
        return Err(
            CliError::usage(format!("`{}` already exists", path.display()))
                .hint("pass `--force` to overwrite it")
                .into(),
        );
    }
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|error| {
            anyhow::Error::new(error).context(format!("cannot create `{}`", parent.display()))
        })?;
    }
    std::fs::write(path, content).map_err(|error| {
        anyhow::Error::new(error).context(format!("cannot write `{}`", path.display()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stub() -> Stub {
        Stub {
            orchestrator: "https://ci.example.org".into(),
            version: "1.2.3".into(),
            release_url: RELEASE_URL.into(),
            branch: "main".into(),
            image: true,
        }
    }

    #[test]
    fn values_that_could_break_the_yaml_are_refused() {
        for (field, value) in [
            ("orchestrator", "https://x\"\n  evil: 1"),
            ("orchestrator", "ftp://x"),
            ("version", "1.0 # x"),
            ("release_url", "http://plain.example.org/{version}"),
            ("branch", "main'"),
        ] {
            let mut stub = stub();
            match field {
                "orchestrator" => stub.orchestrator = value.into(),
                "version" => stub.version = value.into(),
                "release_url" => stub.release_url = value.into(),
                _ => stub.branch = value.into(),
            }
            assert!(stub.check().is_err(), "{field}: {value}");
        }
        assert!(stub().check().is_ok());
    }

    #[test]
    fn the_github_stub_pins_actions_by_sha_and_never_uses_pull_request_target() {
        let yaml = stub().github();
        for line in yaml.lines().filter(|line| line.contains("uses:")) {
            let reference = line.split('@').nth(1).unwrap_or_default();
            let sha = reference.split_whitespace().next().unwrap_or_default();
            assert!(
                sha.len() == 40 && sha.bytes().all(|b| b.is_ascii_hexdigit()),
                "{line}"
            );
        }
        assert!(!yaml.contains("pull_request_target"));
        assert!(yaml.contains("id-token: write") && yaml.contains("contents: read"));
        assert!(yaml.contains("ci-exec-x86_64-unknown-linux-musl"));
        assert!(yaml.contains("/v1.2.3/"));
    }
}
