//! Finding our static guest binaries (`mk`, `ci-exec-init`) on this machine.

use std::path::{Path, PathBuf};

/// The command that builds both guest binaries from the workspace.
pub const BUILD_HINT: &str =
    "cargo build --release --target x86_64-unknown-linux-musl -p mkrunner -p ci-exec-guest-init";

/// Looks for the static binary `name` (`mk` or `ci-exec-init`): in `$CI_EXEC_GUEST_BIN`, beside
/// the running executable, in cargo's musl output directories relative to it (so a `ci-exec`
/// from `target/release` finds `target/x86_64-unknown-linux-musl/release/mk`), then in
/// `/usr/local/lib/ci-exec` and `/usr/lib/ci-exec`.
pub fn locate(name: &str) -> Option<PathBuf> {
    candidates(name).find(|path| path.is_file())
}

/// Like [`locate`], but only a statically linked executable is taken: a dynamically linked
/// `mk` (the one `cargo build --release` puts beside `ci-exec`) does not start in a busybox or
/// musl container image ("exec …: no such file or directory").
pub fn locate_static(name: &str) -> Option<PathBuf> {
    candidates(name).find(|path| {
        path.is_file()
            && std::fs::read(path)
                .is_ok_and(|bytes| crate::host::elf_static_problem(&bytes).is_none())
    })
}

fn candidates(name: &str) -> impl Iterator<Item = PathBuf> {
    let mut candidates = Vec::new();
    if let Some(directory) = std::env::var_os("CI_EXEC_GUEST_BIN") {
        candidates.push(PathBuf::from(directory));
    }
    if let Ok(executable) = std::env::current_exe()
        && let Some(directory) = executable.parent()
    {
        candidates.extend(cargo_directories(directory));
    }
    candidates.push(PathBuf::from("/usr/local/lib/ci-exec"));
    candidates.push(PathBuf::from("/usr/lib/ci-exec"));
    let name = name.to_owned();
    candidates
        .into_iter()
        .map(move |directory| directory.join(&name))
}

/// `dir` itself and, walking up to the cargo target directory, its musl release directory.
fn cargo_directories(directory: &Path) -> Vec<PathBuf> {
    let mut directories = vec![directory.to_owned()];
    for ancestor in directory.ancestors().skip(1).take(3) {
        directories.push(ancestor.join("x86_64-unknown-linux-musl").join("release"));
    }
    directories
}

#[cfg(test)]
mod tests {
    #[test]
    fn cargo_layouts_are_searched() {
        let directories = super::cargo_directories(std::path::Path::new("/repo/target/debug/deps"));
        assert!(directories.contains(&"/repo/target/x86_64-unknown-linux-musl/release".into()));
    }
}
