use std::path::PathBuf;

/// Everything that can go wrong building, fetching or caching a guest image.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("host tool `{tool}` not found on PATH (install it: {hint})")]
    MissingTool {
        tool: &'static str,
        hint: &'static str,
    },

    #[error(
        "user `{user}` has no range in `{file}`, which building as a normal user needs (mmdebstrap's unshare mode maps the guest's users onto it): add one with `sudo usermod --add-subuids 100000-165535 --add-subgids 100000-165535 {user}`, or build as root"
    )]
    NoSubordinateIds { user: String, file: PathBuf },

    #[error("cannot determine the cache directory: neither `XDG_CACHE_HOME` nor `HOME` is set")]
    NoCacheDirectory,

    #[error("failed to create directory `{path}`")]
    CreateDirectory {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("failed to read `{path}`")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("failed to write `{path}`")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("failed to remove `{path}`")]
    Remove {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("failed to move `{from}` to `{to}`")]
    Rename {
        from: PathBuf,
        to: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("failed to lock `{path}`")]
    Lock {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("manifest `{path}` is not valid (delete it, or run `ci-exec image prune`)")]
    ParseManifest {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },

    #[error(
        "`{path}` is not a static executable ({reason}); build it with `cargo build --release --target x86_64-unknown-linux-musl -p {package}`"
    )]
    NotStaticBinary {
        path: PathBuf,
        reason: &'static str,
        package: &'static str,
    },

    #[error("failed to start `{program}`")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },

    #[error("`{command}` failed with {status}{}", tail_suffix(.stderr_tail))]
    CommandFailed {
        command: String,
        status: std::process::ExitStatus,
        stderr_tail: String,
    },

    /// The build's own script stopped with a reason the user can act on.
    #[error("the image build failed: {reason}")]
    Build { reason: String },

    #[error("the image build did not produce `{path}`")]
    MissingOutput { path: PathBuf },

    #[error("kernel `{path}` is neither a bzImage nor an arm64 Image ({reason})")]
    NotBzImage { path: PathBuf, reason: &'static str },

    #[error("cannot decompress the kernel in `{path}`: {reason}")]
    Decompress { path: PathBuf, reason: String },

    #[error("module `{module}` needed in the initramfs was not found in `{path}`")]
    MissingModule { module: String, path: PathBuf },

    #[error("unknown image `{name}` (known: {known})")]
    UnknownImage { name: String, known: String },

    #[error("image `{name}` has no {arch} build in the catalog")]
    UnsupportedArch { name: String, arch: String },

    #[cfg(feature = "download")]
    #[error("failed to download `{url}`")]
    Download {
        url: String,
        #[source]
        source: Box<crate::download::DownloadError>,
    },

    #[error("checksum file `{url}` has no entry for `{file}`")]
    ChecksumNotListed { url: String, file: String },

    #[error(
        "`{url}` failed verification: expected {algorithm} {expected}, got {actual} (nothing was cached; retry, or check the mirror)"
    )]
    ChecksumMismatch {
        url: String,
        algorithm: &'static str,
        expected: String,
        actual: String,
    },

    #[error(
        "`{url}` was truncated: expected {expected} bytes, got {actual} (nothing was cached; retry)"
    )]
    Truncated {
        url: String,
        expected: u64,
        actual: u64,
    },

    #[error("cannot make cloud image `{name}` bootable: {reason}")]
    Prepare { name: String, reason: String },
}

fn tail_suffix(tail: &str) -> String {
    if tail.trim().is_empty() {
        String::new()
    } else {
        format!(":\n{}", tail.trim_end())
    }
}
