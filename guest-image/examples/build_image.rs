//! Builds an image into the cache without the CLI (used by `.ci/setup-image.sh` and the
//! benchmarks): `build_image <mk> <ci-exec-init> [default|cloud-init|ubuntu-noble] [arm64] [--force]`
//! (`arm64`: the image for aarch64, from aarch64 binaries).

use ci_exec_guest_image::{Arch, BuildOptions, ImageCache, Reporter, UBUNTU_IMAGE, Variant};
use std::time::Instant;

struct Steps(Instant);

impl Reporter for Steps {
    fn step(&self, name: &str) {
        eprintln!("[{:6.1}s] {name}", self.0.elapsed().as_secs_f64());
    }
}

fn main() {
    let arguments: Vec<String> = std::env::args().skip(1).collect();
    let (Some(mk), Some(init)) = (arguments.first(), arguments.get(1)) else {
        eprintln!(
            "usage: build_image <mk> <ci-exec-init> [default|cloud-init|ubuntu-noble] [arm64] [--force]"
        );
        std::process::exit(2);
    };
    let mut options = BuildOptions::new(mk.into(), init.into());
    if arguments.iter().any(|argument| argument == "cloud-init") {
        options.variant = Variant::CloudInit;
    }
    if arguments.iter().any(|argument| argument == UBUNTU_IMAGE) {
        options = BuildOptions::ubuntu(mk.into(), init.into());
    }
    if arguments.iter().any(|argument| argument == "arm64") {
        options.set_arch(Arch::Aarch64);
    }
    options.force = arguments.iter().any(|argument| argument == "--force");
    let result = ImageCache::open(None)
        .and_then(|cache| cache.build_default(&options, &Steps(Instant::now())));
    match result {
        Ok(manifest) => match serde_json::to_string_pretty(&manifest) {
            Ok(json) => println!("{json}"),
            Err(error) => eprintln!("error: {error}"),
        },
        Err(error) => {
            eprintln!("error: {error}");
            let mut source = std::error::Error::source(&error);
            while let Some(cause) = source {
                eprintln!("caused by: {cause}");
                source = cause.source();
            }
            std::process::exit(1);
        }
    }
}
