//! `ci-exec image`: build, list, locate and prune guest images (`ci-exec-guest-image`).

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Instant;

use ci_exec_guest_image::{
    Arch, BuildOptions, CloudOptions, DEFAULT_IMAGE, ImageCache, Kernel, Manifest, Reporter,
    UBUNTU_IMAGE, UBUNTU_MIRROR, binaries, catalog,
};

use crate::exit::{CliError, SUCCESS};

#[derive(Debug, clap::Subcommand)]
pub enum ImageCommand {
    /// Build the default Debian image (or its cloud-init variant) or the Ubuntu image, or
    /// download and prepare a catalog cloud image; does nothing when the cached image is current
    Build {
        /// `debian-bookworm`, `debian-bookworm-cloud-init`, `ubuntu-noble`, or a catalog name
        /// (`ubuntu-24.04`, `alpine-3.20`)
        #[arg(default_value = DEFAULT_IMAGE)]
        name: String,
        /// The guest's architecture, `x86_64` or `aarch64` (`arm64`): an aarch64 image's name
        /// ends with `-arm64`, which `--arch aarch64` adds (default: the name's, else x86_64).
        /// Building for another architecture than this machine's needs qemu-user
        /// (`apt-get install qemu-user-static binfmt-support arch-test`)
        #[arg(long, value_name = "ARCH")]
        arch: Option<Arch>,
        /// Our static `mk` (default: found beside this executable or in cargo's musl output)
        #[arg(long, value_name = "PATH", env = "CI_EXEC_MK")]
        mk: Option<PathBuf>,
        /// Our static guest init, `ci-exec-init` (found like `--mk`)
        #[arg(long, value_name = "PATH", env = "CI_EXEC_INIT")]
        init: Option<PathBuf>,
        /// Debian mirror URL or sources file (default: this host's Debian sources); for
        /// `ubuntu-noble`, an Ubuntu mirror URL (default: `--ubuntu-mirror`); for a cloud
        /// image (`ubuntu-24.04`, …), the URL that replaces its publisher's site
        #[arg(long, value_name = "URL|FILE")]
        mirror: Option<String>,
        /// The guest kernel of a Debian image: `ubuntu-kvm` (Ubuntu 22.04's kernel for virtual
        /// machines, the default on x86_64: it boots the guest about 0.6 s sooner under TCG) or
        /// `debian` (Debian's own, the default elsewhere)
        #[arg(long, value_name = "NAME")]
        kernel: Option<Kernel>,
        /// Ubuntu mirror URL, for the `ubuntu-kvm` kernel and the `ubuntu-noble` image
        #[arg(long, value_name = "URL", default_value = UBUNTU_MIRROR)]
        ubuntu_mirror: String,
        /// Extra guest packages
        #[arg(long = "package", value_name = "NAME")]
        packages: Vec<String>,
        /// Rebuild even if the cached image is current
        #[arg(long)]
        force: bool,
        /// Image cache directory (default: `$XDG_CACHE_HOME/ci-exec/images`)
        #[arg(long, value_name = "DIR", env = "CI_EXEC_IMAGE_CACHE")]
        cache: Option<PathBuf>,
        /// Print the manifest as JSON on stdout
        #[arg(long)]
        json: bool,
    },
    /// List cached images with their digests
    List {
        #[arg(long, value_name = "DIR", env = "CI_EXEC_IMAGE_CACHE")]
        cache: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Print the paths of one image's files (disk, kernel, initrd)
    Path {
        #[arg(default_value = DEFAULT_IMAGE)]
        name: String,
        #[arg(long, value_name = "DIR", env = "CI_EXEC_IMAGE_CACHE")]
        cache: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Remove superseded builds and interrupted downloads (everything with `--all`)
    Prune {
        #[arg(long)]
        all: bool,
        #[arg(long, value_name = "DIR", env = "CI_EXEC_IMAGE_CACHE")]
        cache: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
}

pub fn run(command: ImageCommand) -> anyhow::Result<u8> {
    match command {
        ImageCommand::Build {
            name,
            arch,
            mk,
            init,
            mirror,
            kernel,
            ubuntu_mirror,
            packages,
            force,
            cache,
            json,
        } => {
            let cache = open(cache)?;
            let reporter = TerminalReporter::new();
            let name = match arch {
                Some(arch) if Arch::split_image_name(&name).1 != arch => {
                    if arch == Arch::X86_64 {
                        return Err(CliError::usage(format!(
                            "image `{name}` is an {} image, not an x86_64 one",
                            Arch::split_image_name(&name).1
                        ))
                        .hint("drop `--arch` or the name's `-arm64`")
                        .into());
                    }
                    format!("{name}{}", arch.image_suffix())
                }
                _ => name,
            };
            let arch = Arch::split_image_name(&name).1;
            let mk = binary(mk, "mk", arch)?;
            let manifest = if catalog::lookup(&name).is_ok() {
                let mut options = CloudOptions::new(mk);
                options.force = force;
                options.mirror = mirror;
                cache.fetch_cloud(&name, &options, &reporter)
            } else {
                let Some(mut options) =
                    BuildOptions::for_image(&name, mk, binary(init, "ci-exec-init", arch)?)
                else {
                    let known: Vec<&str> =
                        catalog::CATALOG.iter().map(|entry| entry.name).collect();
                    return Err(CliError::usage(format!("unknown image `{name}`"))
                        .hint(format!(
                            "known images: {DEFAULT_IMAGE}, {DEFAULT_IMAGE}-cloud-init, \
                             {UBUNTU_IMAGE}, {}",
                            known.join(", ")
                        ))
                        .into());
                };
                options.mirror = mirror;
                options.kernel = kernel.unwrap_or(options.kernel);
                options.ubuntu_mirror = ubuntu_mirror;
                options.extra_packages = packages;
                options.force = force;
                cache.build_default(&options, &reporter)
            }?;
            reporter.finish();
            if json {
                print_json(serde_json::to_string_pretty(&manifest)?)?;
            } else {
                eprintln!(
                    "image `{}` ready: digest {} ({:.0} MB) in {:.1} s",
                    manifest.name,
                    short(&manifest.digest),
                    manifest.disk_bytes as f64 / 1e6,
                    reporter.started.elapsed().as_secs_f64()
                );
            }
        }
        ImageCommand::List { cache, json } => {
            let cache = open(cache)?;
            let images = cache.list()?;
            if json {
                print_json(serde_json::to_string_pretty(&images)?)?;
            } else if images.is_empty() {
                eprintln!(
                    "no images in `{}` (build one with `ci-exec image build`)",
                    cache.root().display()
                );
            } else {
                println!(
                    "{:<28}  {:<32}  {:<16}  {:>8}  {:<20}  SOURCE",
                    "NAME", "OS", "DIGEST", "SIZE", "BUILT"
                );
                for image in &images {
                    println!(
                        "{:<28}  {:<32}  {:<16}  {:>6.0}MB  {:<20}  {}",
                        image.name,
                        if image.os.is_empty() { "-" } else { &image.os },
                        short(&image.digest),
                        image.disk_bytes as f64 / 1e6,
                        image.built_at,
                        image.source
                    );
                }
            }
        }
        ImageCommand::Path { name, cache, json } => {
            let cache = open(cache)?;
            let manifest = found(&cache, &name)?;
            if json {
                print_json(serde_json::to_string_pretty(&serde_json::json!({
                    "name": manifest.name,
                    "digest": manifest.digest,
                    "disk": manifest.disk,
                    "kernel": manifest.kernel,
                    "vmlinux": manifest.vmlinux,
                    "initrd": manifest.initrd,
                    "kernel_cmdline": manifest.kernel_cmdline,
                    "container_images": manifest.container_images,
                }))?)?;
            } else {
                println!("disk     {}", manifest.disk.display());
                if !manifest.vmlinux.as_os_str().is_empty() {
                    println!("vmlinux  {}", manifest.vmlinux.display());
                    println!("kernel   {}", manifest.kernel.display());
                    println!("initrd   {}", manifest.initrd.display());
                    println!("cmdline  {}", manifest.kernel_cmdline);
                }
            }
        }
        ImageCommand::Prune { all, cache, json } => {
            let cache = open(cache)?;
            let report = cache.prune(all)?;
            if json {
                print_json(serde_json::to_string_pretty(&report)?)?;
            } else {
                for path in &report.removed {
                    eprintln!("removed {}", path.display());
                }
                eprintln!("freed {:.0} MB", report.freed_bytes as f64 / 1e6);
            }
        }
    }
    Ok(SUCCESS)
}

/// JSON on stdout; a closed pipe (`| head`) is not an error.
fn print_json(mut text: String) -> anyhow::Result<()> {
    use std::io::Write;
    text.push('\n');
    match std::io::stdout().lock().write_all(text.as_bytes()) {
        Err(error) if error.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        result => Ok(result?),
    }
}

fn open(cache: Option<PathBuf>) -> anyhow::Result<ImageCache> {
    Ok(ImageCache::open(cache)?)
}

fn found(cache: &ImageCache, name: &str) -> anyhow::Result<Manifest> {
    Ok(cache.get(name)?.ok_or_else(|| {
        CliError::usage(format!(
            "image `{name}` is not in the cache `{}`",
            cache.root().display()
        ))
        .hint(format!("build it with `ci-exec image build {name}`"))
    })?)
}

fn binary(given: Option<PathBuf>, name: &str, arch: Arch) -> Result<PathBuf, CliError> {
    given
        .or_else(|| binaries::locate_for(name, arch))
        .ok_or_else(|| {
            CliError::usage(format!(
                "cannot find the static {arch} guest binary `{name}`"
            ))
            .hint(format!(
                "build it with `{}`, or pass its path",
                binaries::build_hint(arch)
            ))
        })
}

fn short(digest: &str) -> &str {
    digest.get(..16).unwrap_or(digest)
}

/// Steps as `==> …` lines on stderr; downloads as a progress bar when stderr is a terminal.
struct TerminalReporter {
    started: Instant,
    bar: Mutex<Option<indicatif::ProgressBar>>,
    interactive: bool,
}

impl TerminalReporter {
    fn new() -> Self {
        Self {
            started: Instant::now(),
            bar: Mutex::new(None),
            interactive: std::io::stderr().is_terminal(),
        }
    }

    fn finish(&self) {
        self.transfer_finished();
    }
}

impl Reporter for TerminalReporter {
    fn step(&self, name: &str) {
        eprintln!(
            "==> [{:>5.1}s] {name}",
            self.started.elapsed().as_secs_f64()
        );
    }

    fn transfer_started(&self, what: &str, total: Option<u64>) {
        if !self.interactive {
            return;
        }
        let bar = match total {
            Some(total) => indicatif::ProgressBar::new(total),
            None => indicatif::ProgressBar::new_spinner(),
        };
        if let Ok(style) = indicatif::ProgressStyle::with_template(
            "{msg} {wide_bar} {bytes}/{total_bytes} {bytes_per_sec} {eta}",
        ) {
            bar.set_style(style);
        }
        bar.set_message(what.rsplit('/').next().unwrap_or(what).to_owned());
        if let Ok(mut slot) = self.bar.lock() {
            *slot = Some(bar);
        }
    }

    fn transfer_progress(&self, done: u64) {
        if let Ok(slot) = self.bar.lock()
            && let Some(bar) = slot.as_ref()
        {
            bar.set_position(done);
        }
    }

    fn transfer_finished(&self) {
        if let Ok(mut slot) = self.bar.lock()
            && let Some(bar) = slot.take()
        {
            bar.finish_and_clear();
        }
    }

    fn log(&self, line: &str) {
        tracing::debug!(target: "ci_exec::image", "{line}");
    }
}
