//! cloud-init NoCloud seeds, built in-process: a small FAT12 image labelled `CIDATA` holding
//! `meta-data`, `user-data` (a typed `#cloud-config`) and optionally `network-config`.
//! cloud-init finds it by label on any attached disk. This crate writes seeds; it does not boot
//! guests or talk to cloud-init.
//!
//! The YAML files are written as JSON (pretty-printed): JSON is valid YAML, cloud-init parses it
//! unchanged, and it needs no YAML emitter.
//!
//! ```
//! use ci_exec_cloud_init::{CloudConfig, MetaData, Seed, WriteFile};
//! let seed = Seed {
//!     meta_data: MetaData::new("run-42", "ci-guest"),
//!     user_data: CloudConfig {
//!         write_files: vec![WriteFile::new("/etc/motd", "hello\n")],
//!         runcmd: vec!["touch /run/ready".into()],
//!         ..CloudConfig::default()
//!     },
//!     network_config: None,
//! };
//! let image: Vec<u8> = seed.to_image().unwrap();
//! assert_eq!(&image[510..512], &[0x55, 0xaa]);
//! ```

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::{Cursor, Write};
use std::path::{Path, PathBuf};

/// The filesystem label cloud-init's NoCloud source looks for.
pub const LABEL: &str = "CIDATA";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("failed to format the `CIDATA` FAT image")]
    Format(#[source] std::io::Error),

    #[error("failed to write `{file}` into the seed image")]
    WriteEntry {
        file: &'static str,
        #[source]
        source: std::io::Error,
    },

    #[error("failed to serialise `{file}`")]
    Serialise {
        file: &'static str,
        #[source]
        source: serde_json::Error,
    },

    #[error(
        "seed contents are too large for a FAT12 seed ({bytes} bytes; keep seeds under 16 MiB)"
    )]
    TooLarge { bytes: usize },

    #[error("failed to write seed image `{path}`")]
    WriteImage {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A NoCloud seed: the three files cloud-init reads.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Seed {
    pub meta_data: MetaData,
    pub user_data: CloudConfig,
    pub network_config: Option<NetworkConfig>,
}

/// `meta-data`. A new `instance_id` makes cloud-init run its once-per-instance modules again.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetaData {
    #[serde(rename = "instance-id")]
    pub instance_id: String,
    #[serde(
        rename = "local-hostname",
        skip_serializing_if = "String::is_empty",
        default
    )]
    pub local_hostname: String,
}

impl MetaData {
    pub fn new(instance_id: impl Into<String>, hostname: impl Into<String>) -> Self {
        Self {
            instance_id: instance_id.into(),
            local_hostname: hostname.into(),
        }
    }
}

/// `user-data` as `#cloud-config`: the modules ci-exec uses, typed. Empty fields are omitted.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CloudConfig {
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub hostname: Option<String>,
    /// `users`; when set, list `"default"` too to keep the distribution's default user.
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub users: Vec<User>,
    /// Keys for the default user.
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub ssh_authorized_keys: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub write_files: Vec<WriteFile>,
    /// Runs early on every boot, before networking.
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub bootcmd: Vec<Command>,
    /// Runs once per instance, late in boot.
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub runcmd: Vec<Command>,
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub packages: Vec<String>,
    #[serde(skip_serializing_if = "std::ops::Not::not", default)]
    pub package_update: bool,
    /// fstab-style entries: `[device, mount point, type, options, dump, pass]`.
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub mounts: Vec<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub power_state: Option<PowerState>,
}

/// An entry of `users`: either the literal `"default"` or a user definition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum User {
    /// The distribution's default user (`"default"`).
    Default(String),
    Named(NamedUser),
}

impl User {
    pub fn default_user() -> Self {
        User::Default("default".to_owned())
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NamedUser {
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub groups: Option<String>,
    /// e.g. `ALL=(ALL) NOPASSWD:ALL`.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub sudo: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub shell: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub ssh_authorized_keys: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub lock_passwd: Option<bool>,
}

/// An entry of `write_files`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WriteFile {
    pub path: String,
    pub content: String,
    /// Octal string, e.g. `"0755"`.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub permissions: Option<String>,
    /// `user:group`.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub owner: Option<String>,
    /// `b64` when `content` is base64.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub encoding: Option<String>,
    #[serde(skip_serializing_if = "std::ops::Not::not", default)]
    pub append: bool,
    /// Write after packages and users exist (so `owner` may name a new user).
    #[serde(skip_serializing_if = "std::ops::Not::not", default)]
    pub defer: bool,
}

impl WriteFile {
    pub fn new(path: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            path: path.into(),
            content: content.into(),
            ..Self::default()
        }
    }

    pub fn permissions(mut self, octal: &str) -> Self {
        self.permissions = Some(octal.to_owned());
        self
    }
}

/// A `runcmd`/`bootcmd` entry: a shell string, or an argv run without a shell.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Command {
    Shell(String),
    Argv(Vec<String>),
}

impl From<&str> for Command {
    fn from(script: &str) -> Self {
        Command::Shell(script.to_owned())
    }
}

impl From<Vec<String>> for Command {
    fn from(argv: Vec<String>) -> Self {
        Command::Argv(argv)
    }
}

/// `power_state`: what to do once cloud-init has finished.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PowerState {
    /// `poweroff`, `reboot` or `halt`.
    pub mode: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub message: Option<String>,
    /// `now` or `+minutes`.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub delay: Option<String>,
}

/// `network-config`, version 2 (netplan-style), ethernets only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkConfig {
    pub version: u8,
    pub ethernets: BTreeMap<String, Ethernet>,
}

impl NetworkConfig {
    /// DHCP on every interface whose name matches `pattern` (e.g. `en*`).
    pub fn dhcp(pattern: &str) -> Self {
        let ethernet = Ethernet {
            matcher: Some(Match {
                name: Some(pattern.to_owned()),
                macaddress: None,
            }),
            dhcp4: Some(true),
            ..Ethernet::default()
        };
        Self {
            version: 2,
            ethernets: BTreeMap::from([("all".to_owned(), ethernet)]),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ethernet {
    #[serde(rename = "match", skip_serializing_if = "Option::is_none", default)]
    pub matcher: Option<Match>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub dhcp4: Option<bool>,
    /// CIDR addresses, e.g. `10.0.2.15/24`.
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub addresses: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub gateway4: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub nameservers: Option<Nameservers>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Match {
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub macaddress: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Nameservers {
    pub addresses: Vec<String>,
}

impl Seed {
    /// The files of the seed, by name, as cloud-init will read them.
    pub fn files(&self) -> Result<Vec<(&'static str, Vec<u8>)>, Error> {
        let yaml = |file: &'static str,
                    value: &dyn erased::Json,
                    header: &str|
         -> Result<Vec<u8>, Error> {
            let mut text = header.as_bytes().to_vec();
            text.extend(
                value
                    .to_json()
                    .map_err(|source| Error::Serialise { file, source })?,
            );
            text.push(b'\n');
            Ok(text)
        };
        let mut files = vec![
            ("meta-data", yaml("meta-data", &self.meta_data, "")?),
            (
                "user-data",
                yaml("user-data", &self.user_data, "#cloud-config\n")?,
            ),
        ];
        if let Some(network) = &self.network_config {
            files.push(("network-config", yaml("network-config", network, "")?));
        }
        Ok(files)
    }

    /// The seed as a FAT12 image labelled `CIDATA`. The same seed gives the same bytes
    /// (fixed volume id and timestamps), so seeds can be cached by content.
    pub fn to_image(&self) -> Result<Vec<u8>, Error> {
        let files = self.files()?;
        let content: usize = files.iter().map(|(_, bytes)| bytes.len()).sum();
        if content > 16 << 20 {
            return Err(Error::TooLarge { bytes: content });
        }
        // FAT12 tops out near 32 MiB; room for the contents twice over plus metadata.
        let size = (content * 2 + (512 << 10))
            .max(1 << 20)
            .next_multiple_of(512);
        let mut image = Cursor::new(vec![0u8; size]);
        let mut label = [b' '; 11];
        label[..LABEL.len()].copy_from_slice(LABEL.as_bytes());
        fatfs::format_volume(
            &mut image,
            fatfs::FormatVolumeOptions::new()
                .fat_type(fatfs::FatType::Fat12)
                .volume_label(label)
                .volume_id(0x4349_4441),
        )
        .map_err(Error::Format)?;
        image.set_position(0);
        {
            let filesystem = fatfs::FileSystem::new(&mut image, fatfs::FsOptions::new())
                .map_err(Error::Format)?;
            for (name, bytes) in &files {
                let root = filesystem.root_dir();
                let write = || -> std::io::Result<()> {
                    let mut file = root.create_file(name)?;
                    file.truncate()?;
                    file.write_all(bytes)?;
                    file.flush()
                };
                write().map_err(|source| Error::WriteEntry { file: name, source })?;
                drop(root);
            }
            filesystem.unmount().map_err(Error::Format)?;
        }
        Ok(image.into_inner())
    }

    /// Writes the image to `path` (via a temporary file and a rename).
    pub fn write_image(&self, path: &Path) -> Result<(), Error> {
        let image = self.to_image()?;
        let temporary = path.with_extension(format!("tmp-{}", std::process::id()));
        let write =
            std::fs::write(&temporary, &image).and_then(|()| std::fs::rename(&temporary, path));
        write.map_err(|source| {
            let _ = std::fs::remove_file(&temporary);
            Error::WriteImage {
                path: path.to_owned(),
                source,
            }
        })
    }
}

/// Object-safe JSON serialisation for the three file types.
mod erased {
    pub trait Json {
        fn to_json(&self) -> Result<Vec<u8>, serde_json::Error>;
    }

    impl<T: serde::Serialize> Json for T {
        fn to_json(&self) -> Result<Vec<u8>, serde_json::Error> {
            serde_json::to_vec_pretty(self)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn sample() -> Seed {
        Seed {
            meta_data: MetaData::new("ci-exec-1", "guest"),
            user_data: CloudConfig {
                users: vec![
                    User::default_user(),
                    User::Named(NamedUser {
                        name: "ci".into(),
                        sudo: Some("ALL=(ALL) NOPASSWD:ALL".into()),
                        ssh_authorized_keys: vec!["ssh-ed25519 AAAA test".into()],
                        ..NamedUser::default()
                    }),
                ],
                write_files: vec![
                    WriteFile::new("/etc/ci-exec/marker", "it works\n").permissions("0644"),
                ],
                runcmd: vec![
                    "echo done > /run/done".into(),
                    Command::Argv(vec!["touch".into(), "/run/argv".into()]),
                ],
                packages: vec!["qemu-guest-agent".into()],
                mounts: vec![vec![
                    "ci".into(),
                    "/mnt/ci".into(),
                    "9p".into(),
                    "trans=virtio".into(),
                ]],
                ..CloudConfig::default()
            },
            network_config: Some(NetworkConfig::dhcp("en*")),
        }
    }

    #[test]
    fn user_data_is_cloud_config_with_only_set_fields() {
        let files = sample().files().expect("files");
        let user_data = String::from_utf8(files[1].1.clone()).expect("utf-8");
        assert!(user_data.starts_with("#cloud-config\n{"), "{user_data}");
        let value: serde_json::Value =
            serde_json::from_str(user_data.trim_start_matches("#cloud-config\n")).expect("json");
        assert_eq!(value["users"][0], "default");
        assert_eq!(value["users"][1]["sudo"], "ALL=(ALL) NOPASSWD:ALL");
        assert_eq!(value["write_files"][0]["permissions"], "0644");
        assert!(value["write_files"][0].get("append").is_none());
        assert_eq!(value["runcmd"][1][0], "touch");
        assert!(value.get("package_update").is_none());
        assert!(value.get("bootcmd").is_none());
        let meta: serde_json::Value = serde_json::from_slice(&files[0].1).expect("meta-data json");
        assert_eq!(meta["instance-id"], "ci-exec-1");
        assert_eq!(meta["local-hostname"], "guest");
        let network: serde_json::Value = serde_json::from_slice(&files[2].1).expect("network json");
        assert_eq!(network["ethernets"]["all"]["match"]["name"], "en*");
    }

    #[test]
    fn image_is_fat12_labelled_cidata_with_the_files() {
        let seed = sample();
        let image = seed.to_image().expect("image");
        let filesystem =
            fatfs::FileSystem::new(Cursor::new(image), fatfs::FsOptions::new()).expect("mount");
        assert_eq!(filesystem.fat_type(), fatfs::FatType::Fat12);
        assert_eq!(filesystem.volume_label(), "CIDATA");
        for (name, expected) in seed.files().expect("files") {
            let mut contents = Vec::new();
            filesystem
                .root_dir()
                .open_file(name)
                .expect(name)
                .read_to_end(&mut contents)
                .expect("read");
            assert_eq!(contents, expected, "{name}");
        }
    }

    #[test]
    fn same_seed_gives_same_bytes() {
        assert_eq!(
            sample().to_image().expect("first"),
            sample().to_image().expect("second")
        );
    }

    #[test]
    fn network_config_is_optional() {
        let mut seed = sample();
        seed.network_config = None;
        let names: Vec<&str> = seed
            .files()
            .expect("files")
            .into_iter()
            .map(|(name, _)| name)
            .collect();
        assert_eq!(names, ["meta-data", "user-data"]);
    }

    #[test]
    fn host_tools_accept_the_image() {
        let directory = tempfile::tempdir().expect("tempdir");
        let path = directory.path().join("seed.img");
        sample().write_image(&path).expect("write");
        let blkid = std::process::Command::new("blkid")
            .args(["-p", "-o", "export"])
            .arg(&path)
            .output();
        let Ok(blkid) = blkid else {
            let _ = ci_exec_prerequisite::require(
                "host_tools_accept_the_image",
                Some("blkid is not installed".to_owned()),
                "apt-get install util-linux (.ci/setup-image.sh does)",
            );
            return;
        };
        let output = String::from_utf8_lossy(&blkid.stdout);
        assert!(output.contains("LABEL=CIDATA"), "{output}");
        assert!(output.contains("TYPE=vfat"), "{output}");
        if let Ok(fsck) = std::process::Command::new("fsck.vfat")
            .args(["-n"])
            .arg(&path)
            .output()
        {
            assert!(
                fsck.status.success(),
                "{}",
                String::from_utf8_lossy(&fsck.stdout)
            );
        }
    }
}
