//! The kernel command line, as far as ci-exec's init reads it.

use std::collections::BTreeMap;

/// Settings read from `/proc/cmdline`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cmdline {
    /// `root=`: the root block device; a whole disk that has partitions means the first of
    /// them with an `/etc/os-release` (a cloud image's root is not always partition 1).
    pub root: String,
    /// `rootfstype=`.
    pub root_fstype: String,
    /// `rootflags=`: data passed to mount(2).
    pub root_flags: String,
    /// `ro` (last of `ro`/`rw` wins).
    pub read_only: bool,
    /// `rootwait=` in seconds (a bare `rootwait` means the default).
    pub root_wait_seconds: u64,
    /// `ci.init=`: what the initramfs stage executes on the new root.
    pub init: String,
    /// `ci.hostname=`.
    pub hostname: Option<String>,
    /// `ci.agent=0` disables starting qemu-ga.
    pub agent: bool,
    /// `ci.transport=vsock`: the guest agent and the control port listen on vsock (ports
    /// 1024 and 1025) instead of using virtio-serial ports; Apple's Virtualization.framework
    /// (the `vz` driver) has vsock and no named serial ports.
    pub vsock: bool,
    /// `ci.install=1`: the initramfs stage copies this init and the files under its
    /// `/ci-exec-root/` onto the root filesystem before switching to it (a stock cloud image,
    /// which has neither).
    pub install: bool,
    /// `module.param=value` words, grouped by module (dashes folded to underscores), so that
    /// `virtio_mmio.device=…` reaches a modular virtio_mmio as modprobe would pass it.
    pub module_parameters: BTreeMap<String, Vec<String>>,
}

impl Default for Cmdline {
    fn default() -> Self {
        Self {
            root: "/dev/vda".to_owned(),
            root_fstype: "ext4".to_owned(),
            root_flags: String::new(),
            read_only: false,
            root_wait_seconds: 10,
            init: "/sbin/ci-exec-init".to_owned(),
            hostname: None,
            agent: true,
            vsock: false,
            install: false,
            module_parameters: BTreeMap::new(),
        }
    }
}

impl Cmdline {
    pub fn parse(text: &str) -> Self {
        let mut cmdline = Self::default();
        for word in split_words(text) {
            let (key, value) = match word.split_once('=') {
                Some((key, value)) => (key, Some(value)),
                None => (word.as_str(), None),
            };
            match (key, value) {
                ("root", Some(value)) => cmdline.root = value.to_owned(),
                ("rootfstype", Some(value)) => cmdline.root_fstype = value.to_owned(),
                ("rootflags", Some(value)) => cmdline.root_flags = value.to_owned(),
                ("ro", None) => cmdline.read_only = true,
                ("rw", None) => cmdline.read_only = false,
                ("rootwait", Some(value)) => {
                    if let Ok(seconds) = value.parse() {
                        cmdline.root_wait_seconds = seconds;
                    }
                }
                ("ci.init", Some(value)) => cmdline.init = value.to_owned(),
                ("ci.hostname", Some(value)) => cmdline.hostname = Some(value.to_owned()),
                ("ci.agent", Some(value)) => cmdline.agent = value != "0",
                ("ci.install", Some(value)) => cmdline.install = value != "0",
                ("ci.transport", Some(value)) => cmdline.vsock = value == "vsock",
                (key, Some(value)) => {
                    if let Some((module, parameter)) = key.split_once('.')
                        && !module.is_empty()
                        && !parameter.is_empty()
                    {
                        cmdline
                            .module_parameters
                            .entry(module.replace('-', "_"))
                            .or_default()
                            .push(format!("{parameter}={value}"));
                    }
                }
                _ => {}
            }
        }
        cmdline
    }

    /// The parameter string for `finit_module` of `module`.
    pub fn parameters_for(&self, module: &str) -> String {
        self.module_parameters
            .get(&module.replace('-', "_"))
            .map(|parameters| parameters.join(" "))
            .unwrap_or_default()
    }
}

/// Splits on whitespace, keeping double-quoted runs together (the kernel's own rule).
fn split_words(text: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut quoted = false;
    for character in text.chars() {
        match character {
            '"' => quoted = !quoted,
            character if character.is_whitespace() && !quoted => {
                if !word.is_empty() {
                    words.push(std::mem::take(&mut word));
                }
            }
            character => word.push(character),
        }
    }
    if !word.is_empty() {
        words.push(word);
    }
    words
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_root_and_ci_settings() {
        let cmdline = Cmdline::parse(
            "console=ttyS0 root=/dev/vdb rootfstype=ext4 ro ci.init=/sbin/init ci.hostname=box rootwait=3 ci.agent=0 ci.install=1\n",
        );
        assert!(cmdline.install);
        assert_eq!(cmdline.root, "/dev/vdb");
        assert!(cmdline.read_only);
        assert_eq!(cmdline.init, "/sbin/init");
        assert_eq!(cmdline.hostname.as_deref(), Some("box"));
        assert_eq!(cmdline.root_wait_seconds, 3);
        assert!(!cmdline.agent);
        assert!(!cmdline.vsock);
        assert!(Cmdline::parse("console=hvc0 ci.transport=vsock").vsock);
        assert!(!Cmdline::parse("ci.transport=virtio-serial").vsock);
    }

    #[test]
    fn defaults_when_empty() {
        assert_eq!(Cmdline::parse(""), Cmdline::default());
    }

    #[test]
    fn groups_module_parameters_like_modprobe() {
        let cmdline = Cmdline::parse(
            "virtio_mmio.device=512@0xfeb00e00:12 virtio-mmio.device=512@0xfeb00c00:11 rw quiet \"a.b=c d\"",
        );
        assert_eq!(
            cmdline.parameters_for("virtio_mmio"),
            "device=512@0xfeb00e00:12 device=512@0xfeb00c00:11"
        );
        assert_eq!(cmdline.parameters_for("a"), "b=c d");
        assert_eq!(cmdline.parameters_for("ext4"), "");
    }
}
