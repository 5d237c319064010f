//! The guest's CPU architecture: x86_64 (the default on x86_64 hosts) or aarch64 (Apple
//! silicon under `vz`, arm64 Linux hosts, and x86_64 hosts under `qemu-system-aarch64`).

/// A guest architecture, spelled as Rust and QEMU spell it (`x86_64`, `aarch64`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    #[serde(rename = "x86_64")]
    X86_64,
    Aarch64,
}

impl Arch {
    /// The machine this program runs on (x86_64 for anything that is not aarch64).
    pub fn host() -> Self {
        if cfg!(target_arch = "aarch64") {
            Arch::Aarch64
        } else {
            Arch::X86_64
        }
    }

    /// `x86_64`, `aarch64`: manifests, `qemu-system-…` and Rust targets.
    pub fn name(self) -> &'static str {
        match self {
            Arch::X86_64 => "x86_64",
            Arch::Aarch64 => "aarch64",
        }
    }

    /// Debian's name: `amd64`, `arm64`.
    pub fn debian(self) -> &'static str {
        match self {
            Arch::X86_64 => "amd64",
            Arch::Aarch64 => "arm64",
        }
    }

    /// What an image name ends with: nothing for x86_64 (the names predate other
    /// architectures), `-arm64` for aarch64 on every host, so one name means one architecture.
    pub fn image_suffix(self) -> &'static str {
        match self {
            Arch::X86_64 => "",
            Arch::Aarch64 => "-arm64",
        }
    }

    /// The architecture an image name ends with, and the name without that suffix.
    pub fn split_image_name(name: &str) -> (&str, Arch) {
        match name.strip_suffix(Arch::Aarch64.image_suffix()) {
            Some(base) => (base, Arch::Aarch64),
            None => (name, Arch::X86_64),
        }
    }

    /// The Rust target our static guest binaries are built for.
    pub fn musl_target(self) -> &'static str {
        match self {
            Arch::X86_64 => "x86_64-unknown-linux-musl",
            Arch::Aarch64 => "aarch64-unknown-linux-musl",
        }
    }

    /// The ELF header's `e_machine` for this architecture.
    pub(crate) fn elf_machine(self) -> u16 {
        match self {
            Arch::X86_64 => 62,
            Arch::Aarch64 => 183,
        }
    }

    /// The console of QEMU's machine for the architecture: microvm's 8250 UART, `virt`'s
    /// PL011.
    pub fn serial_console(self) -> &'static str {
        match self {
            Arch::X86_64 => "ttyS0",
            Arch::Aarch64 => "ttyAMA0",
        }
    }

    /// The name binfmt_misc registers qemu-user under, for running this architecture's
    /// programs on a host of another one (what mmdebstrap needs for a foreign image).
    pub(crate) fn binfmt_name(self) -> &'static str {
        match self {
            Arch::X86_64 => "qemu-x86_64",
            Arch::Aarch64 => "qemu-aarch64",
        }
    }
}

impl std::fmt::Display for Arch {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str(self.name())
    }
}

impl std::str::FromStr for Arch {
    type Err = String;

    fn from_str(name: &str) -> Result<Self, String> {
        match name {
            "x86_64" | "amd64" => Ok(Arch::X86_64),
            "aarch64" | "arm64" => Ok(Arch::Aarch64),
            other => Err(format!(
                "unknown architecture `{other}` (known: x86_64, aarch64)"
            )),
        }
    }
}

/// The image a driver boots unless told: `debian-bookworm`, or `debian-bookworm-arm64` on an
/// aarch64 host.
pub fn default_image() -> String {
    format!("{}{}", crate::DEFAULT_IMAGE, Arch::host().image_suffix())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_in_both_spellings() {
        for arch in [Arch::X86_64, Arch::Aarch64] {
            assert_eq!(arch.name().parse::<Arch>(), Ok(arch));
            assert_eq!(arch.debian().parse::<Arch>(), Ok(arch));
            assert_eq!(
                serde_json::to_string(&arch).expect("json"),
                format!("\"{}\"", arch.name())
            );
        }
        let error = "riscv64".parse::<Arch>().expect_err("unknown");
        assert!(error.contains("x86_64, aarch64"), "{error}");
    }

    #[test]
    fn image_names_carry_the_architecture() {
        assert_eq!(
            Arch::split_image_name("debian-bookworm-arm64"),
            ("debian-bookworm", Arch::Aarch64)
        );
        assert_eq!(
            Arch::split_image_name("debian-bookworm"),
            ("debian-bookworm", Arch::X86_64)
        );
    }
}
