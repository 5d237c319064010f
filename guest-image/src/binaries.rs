//! Finding our static guest binaries (`mk`, `ci-exec-init`) on this machine.

use std::path::{Path, PathBuf};

use crate::Arch;

/// The command that builds both guest binaries from the workspace.
pub const BUILD_HINT: &str =
    "cargo build --release --target x86_64-unknown-linux-musl -p mkrunner -p ci-exec-guest-init";

/// [`BUILD_HINT`] for `arch`'s guests (the aarch64 target links with rust-lld, set in the
/// workspace's `.cargo/config.toml`; `rustup target add` it first).
pub fn build_hint(arch: Arch) -> String {
    format!(
        "rustup target add {target} && cargo build --release --target {target} -p mkrunner -p ci-exec-guest-init",
        target = arch.musl_target()
    )
}

/// Looks for the static binary `name` (`mk` or `ci-exec-init`): in `$CI_EXEC_GUEST_BIN`, beside
/// the running executable, in cargo's musl output directories relative to it (so a `ci-exec`
/// from `target/release` finds `target/x86_64-unknown-linux-musl/release/mk`), then in
/// `/usr/local/lib/ci-exec` and `/usr/lib/ci-exec`.
pub fn locate(name: &str) -> Option<PathBuf> {
    locate_for(name, Arch::host())
}

/// [`locate`] for guests of `arch`: `$CI_EXEC_GUEST_BIN`, then cargo's output for the
/// architecture's musl target, then `/usr/local/lib/ci-exec/<arch>` and `/usr/lib/ci-exec/<arch>`;
/// the host's own architecture also finds the unsuffixed places [`locate`] documents. Only a
/// file built for `arch` is taken.
pub fn locate_for(name: &str, arch: Arch) -> Option<PathBuf> {
    candidates_for(name, arch).find(|path| {
        path.is_file()
            && (arch == Arch::host()
                || std::fs::read(path).is_ok_and(|bytes| {
                    crate::host::elf_static_problem(&bytes, arch)
                        .is_none_or(|problem| !problem.starts_with("not built for"))
                }))
    })
}

/// Like [`locate`], but only a statically linked executable is taken: a dynamically linked
/// `mk` (the one `cargo build --release` puts beside `ci-exec`) does not start in a busybox or
/// musl container image ("exec …: no such file or directory").
pub fn locate_static(name: &str) -> Option<PathBuf> {
    candidates(name).find(|path| {
        path.is_file()
            && std::fs::read(path)
                .is_ok_and(|bytes| crate::host::elf_static_problem(&bytes, Arch::host()).is_none())
    })
}

fn candidates(name: &str) -> impl Iterator<Item = PathBuf> {
    candidates_for(name, Arch::host())
}

fn candidates_for(name: &str, arch: Arch) -> impl Iterator<Item = PathBuf> {
    let mut candidates = Vec::new();
    if let Some(directory) = std::env::var_os("CI_EXEC_GUEST_BIN") {
        candidates.push(PathBuf::from(directory));
    }
    if let Ok(executable) = std::env::current_exe()
        && let Some(directory) = executable.parent()
    {
        candidates.extend(cargo_directories(directory, arch));
    }
    for system in ["/usr/local/lib/ci-exec", "/usr/lib/ci-exec"] {
        if arch == Arch::host() {
            candidates.push(PathBuf::from(system));
        }
        candidates.push(PathBuf::from(system).join(arch.name()));
    }
    let name = name.to_owned();
    candidates
        .into_iter()
        .map(move |directory| directory.join(&name))
}

/// `dir` itself (for the host's architecture) and, walking up to the cargo target directory,
/// its musl release directory for `arch`.
fn cargo_directories(directory: &Path, arch: Arch) -> Vec<PathBuf> {
    let mut directories = Vec::new();
    if arch == Arch::host() {
        directories.push(directory.to_owned());
    }
    for ancestor in directory.ancestors().skip(1).take(3) {
        directories.push(ancestor.join(arch.musl_target()).join("release"));
    }
    directories
}

#[cfg(test)]
mod tests {
    #[test]
    fn cargo_layouts_are_searched() {
        use crate::Arch;
        let deps = std::path::Path::new("/repo/target/debug/deps");
        let directories = super::cargo_directories(deps, Arch::X86_64);
        assert!(directories.contains(&"/repo/target/x86_64-unknown-linux-musl/release".into()));
        let directories = super::cargo_directories(deps, Arch::Aarch64);
        assert!(directories.contains(&"/repo/target/aarch64-unknown-linux-musl/release".into()));
        assert!(
            !directories
                .iter()
                .any(|directory| directory.ends_with("x86_64-unknown-linux-musl/release"))
        );
    }
}
