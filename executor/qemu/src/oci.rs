//! The fast way into the default test image: podman's own container, run by crun.
//!
//! Under TCG a `podman run` costs ~2.5 s of guest CPU before the command starts (measured in
//! a warm guest: `podman run … true` 2.5 s, `crun run` of the same container 0.2–0.4 s): Go
//! start-up, libpod's database and locks, conmon. None of it varies between the tasks of a
//! job. So when the warm state is made, podman prepares the default test image once — `podman
//! image mount` (its root filesystem, kept mounted in the saved guest) and `podman create` +
//! `podman init` of a template container, whose OCI `config.json` is podman's complete answer
//! for that image (its `Config.Env`, working directory, capabilities, seccomp profile, masked
//! paths, mounts, namespaces). The host keeps that answer beside the saved state. A task of
//! that image then gets the template's config with its own command, environment, working
//! directory, volumes and network, a fresh overlay over the image's root filesystem, and is
//! run by `crun` — podman's OCI runtime — directly.
//!
//! Whenever podman's image store has changed since (a `podman build`, `pull`, `tag` or
//! `rmi` in the guest, or a repository's own storage mounted over it), the image the template
//! was made from may not be the one the name means any more, and the task falls back to
//! `podman run`: the check is the task script's first line.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use ci_exec_driver::Task;

use crate::machine::shell_quote;

/// Where the guest keeps what the warm state's preparation made.
const GUEST_DIR: &str = "/var/lib/ci-exec/oci";
/// The file beside the saved state on the host.
const HOST_FILE: &str = "oci.json";
/// podman's image list: rewritten (a new file) by every change to the image store.
const IMAGES_JSON: &str = "/var/lib/containers/storage/overlay-images/images.json";

/// The guest script that prepares `image` for crun and prints the template: the image's
/// root filesystem on the first line, then the template container's `config.json`. It also
/// mounts a fresh overlay of the image for the first task of every VM started from the saved
/// state (each gets its own copy of the disk), which then needs no `mkdir` or `mount`. Exits
/// non-zero (and the driver keeps using `podman run`) when the guest has no crun or no such
/// image.
pub fn prepare_script(image: &str) -> String {
    let image = shell_quote(image);
    format!(
        r#"set -e
command -v crun >/dev/null
P="podman --network-backend=cni --events-backend=none"
$P image exists {image}
rootfs=$($P image mount {image})
id=$($P create --network=none --cgroups=disabled --name ci-exec-oci-template {image} true)
$P init "$id" >/dev/null
mkdir -p {GUEST_DIR}/files
u=/run/containers/storage/overlay-containers/$id/userdata
cp "$u/hosts" "$u/hostname" "$u/.containerenv" {GUEST_DIR}/files/
config=$(cat /var/lib/containers/storage/overlay-containers/$id/userdata/config.json)
$P rm --force "$id" >/dev/null
n={GUEST_DIR}/next
mkdir -p $n/upper $n/work $n/root
mount -t overlay overlay -o "lowerdir=$rootfs,upperdir=$n/upper,workdir=$n/work" $n/root
touch {GUEST_DIR}/stamp
printf '%s\n%s\n' "$rootfs" "$config""#
    )
}

/// What the warm state's preparation made: the image, its mounted root filesystem in the
/// guest, and podman's OCI config of a container of it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Template {
    pub image: String,
    rootfs: String,
    config: Value,
}

impl Template {
    /// Reads [`prepare_script`]'s output.
    pub fn parse(image: &str, stdout: &[u8]) -> Option<Template> {
        let text = std::str::from_utf8(stdout).ok()?;
        let (rootfs, config) = text.split_once('\n')?;
        let config: Value = serde_json::from_str(config.trim()).ok()?;
        let rootfs = rootfs.trim();
        (rootfs.starts_with('/') && config.get("process").is_some()).then(|| Template {
            image: image.to_owned(),
            rootfs: rootfs.to_owned(),
            config,
        })
    }

    /// The template kept beside the saved state in `warm_dir`, if there is one.
    pub fn load(warm_dir: &Path) -> Option<Template> {
        let bytes = std::fs::read(warm_dir.join(HOST_FILE)).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    pub fn save(&self, warm_dir: &Path) -> std::io::Result<()> {
        std::fs::write(
            warm_dir.join(HOST_FILE),
            serde_json::to_vec(self).map_err(std::io::Error::other)?,
        )
    }

    /// Whether `task` can run from this template: its image, and nothing the template was
    /// not made for (another user, privileges, resource limits).
    pub fn fits(&self, task: &Task) -> bool {
        task.image == self.image
            && task.user.is_none()
            && !task.privileged
            && task.limits == ci_exec_driver::Limits::default()
    }

    /// The task's OCI config: the template's, with the task's command, environment (over the
    /// image's, as `podman run --env` does), working directory, volumes (`sources` are their
    /// guest directories) and network, on the root filesystem at `root`.
    pub fn config(
        &self,
        task: &Task,
        env: &BTreeMap<String, String>,
        volumes: &[(String, String)],
        root: &str,
    ) -> Value {
        let mut config = self.config.clone();
        config["root"] = json!({ "path": root });
        let process = &mut config["process"];
        process["args"] = json!(task.command);
        process["terminal"] = json!(false);
        let mut merged: Vec<String> = Vec::new();
        for entry in process["env"].as_array().into_iter().flatten() {
            if let Some(entry) = entry.as_str() {
                let name = entry.split('=').next().unwrap_or_default();
                if !env.contains_key(name) {
                    merged.push(entry.to_owned());
                }
            }
        }
        merged.extend(env.iter().map(|(name, value)| format!("{name}={value}")));
        process["env"] = json!(merged);
        if let Some(workdir) = &task.workdir {
            process["cwd"] = json!(workdir);
        }

        let files = format!("{GUEST_DIR}/files");
        let mut mounts: Vec<Value> = Vec::new();
        for mount in config["mounts"].as_array().into_iter().flatten() {
            let destination = mount["destination"].as_str().unwrap_or_default();
            let mut mount = mount.clone();
            match (mount["type"].as_str(), destination) {
                // The template container's own files, copied out before it was removed.
                (Some("bind"), "/etc/hosts" | "/etc/hostname" | "/run/.containerenv") => {
                    let name = destination.rsplit('/').next().unwrap_or_default();
                    mount["source"] = json!(format!("{files}/{name}"));
                }
                // A fresh tmpfs instead of the template's (podman's size and modes).
                (_, "/dev/shm") => {
                    mount = json!({
                        "destination": "/dev/shm",
                        "type": "tmpfs",
                        "source": "shm",
                        "options": ["rw", "nosuid", "noexec", "nodev", "mode=1777", "size=65536000"],
                    });
                }
                // Anything else of the template container's is gone with it.
                (Some("bind"), _)
                    if mount["source"]
                        .as_str()
                        .is_some_and(|source| source.contains("/overlay-containers/")) =>
                {
                    continue;
                }
                _ => {}
            }
            mounts.push(mount);
        }
        let online = task.network == Some(true);
        if online {
            // `--network=host`: the guest's namespace and name servers.
            mounts.push(json!({
                "destination": "/etc/resolv.conf",
                "type": "bind",
                "source": "/etc/resolv.conf",
                "options": ["bind", "rprivate"],
            }));
        }
        for (source, destination) in volumes {
            mounts.push(json!({
                "destination": destination,
                "type": "bind",
                "source": source,
                "options": ["rbind", "rprivate"],
            }));
        }
        config["mounts"] = json!(mounts);
        if online {
            if let Some(namespaces) = config["linux"]["namespaces"].as_array_mut() {
                namespaces.retain(|namespace| namespace["type"] != "network");
            }
            // Network sysctls belong to a namespace of the container's own (podman sets none
            // with `--network=host`; crun refuses them).
            if let Some(sysctls) = config["linux"]["sysctl"].as_object_mut() {
                sysctls.retain(|name, _| !name.starts_with("net."));
            }
        }
        config
    }

    /// The guest command line of a task whose `config.json` is in `bundle`, container `name`:
    /// a fresh overlay over the image, then `crun run`; `podman run` (`fallback`) when the
    /// image store changed since the template was made. crun's own errors (on stderr) go to a log too,
    /// so they are told apart from the container's exit status: as podman does, a command that cannot be found exits
    /// 127, one that cannot be run 126, any other failure of the runtime 125.
    pub fn command(
        &self,
        bundle: &str,
        name: &str,
        fallback: &[String],
        premounted: bool,
    ) -> Vec<String> {
        let root = Template::root(name, premounted);
        let work = format!("{GUEST_DIR}/tasks/{name}");
        let fallback: Vec<String> = fallback.iter().map(|word| shell_quote(word)).collect();
        let mount = if premounted {
            String::new()
        } else {
            format!(
                "mkdir -p {work}/upper {work}/work {root} && \
                 mount -t overlay overlay -o lowerdir={lower},upperdir={work}/upper,workdir={work}/work {root} || exit 125\n",
                lower = self.rootfs
            )
        };
        let script = format!(
            "if [ {IMAGES_JSON} -nt {GUEST_DIR}/stamp ] || ! [ -e {GUEST_DIR}/stamp ]; then exec {fallback}; fi\n\
             {mount}\
             crun --cgroup-manager=disabled --log={bundle}/crun.log run --bundle {bundle} {name}\n\
             s=$?\n\
             [ $s -ne 0 ] && [ -s {bundle}/crun.log ] || exit $s\n\
             IFS= read -r e < {bundle}/crun.log\n\
             case $e in *'not found in $PATH'*|*'No such file or directory'*) exit 127;; *'Permission denied'*) exit 126;; esac\n\
             exit 125",
            fallback = fallback.join(" "),
            bundle = shell_quote(bundle),
            name = shell_quote(name),
        );
        vec!["/bin/sh".to_owned(), "-c".to_owned(), script]
    }

    /// The root filesystem of container `name` in the guest: the one the saved state mounted
    /// when `premounted` (the VM's first such task), else its own.
    pub fn root(name: &str, premounted: bool) -> String {
        if premounted {
            format!("{GUEST_DIR}/next/root")
        } else {
            format!("{GUEST_DIR}/tasks/{name}/root")
        }
    }
}

/// Stops container `name` if crun runs it (for a task's stop).
pub fn kill_script(name: &str) -> String {
    let name = shell_quote(name);
    format!(
        "crun kill --all {name} KILL >/dev/null 2>&1; crun delete --force {name} >/dev/null 2>&1"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn template() -> Template {
        let config = json!({
            "process": {
                "args": ["true"],
                "env": ["PATH=/opt/tool:/usr/bin", "HOME=/root", "HOSTNAME=abc"],
                "cwd": "/srv",
            },
            "root": { "path": "/var/lib/containers/storage/overlay/x/merged" },
            "mounts": [
                { "destination": "/proc", "type": "proc", "source": "proc" },
                { "destination": "/etc/hosts", "type": "bind",
                  "source": "/run/containers/storage/overlay-containers/id/userdata/hosts" },
                { "destination": "/dev/shm", "type": "bind",
                  "source": "/var/lib/containers/storage/overlay-containers/id/userdata/shm" },
                { "destination": "/etc/other", "type": "bind",
                  "source": "/run/containers/storage/overlay-containers/id/userdata/other" },
            ],
            "linux": {
                "namespaces": [{ "type": "pid" }, { "type": "network" }],
                "sysctl": { "net.ipv4.ping_group_range": "0 0", "kernel.msgmax": "8192" },
            },
        });
        let output = format!("/merged/rootfs\n{config}\n");
        Template::parse("localhost/ci-exec/base:latest", output.as_bytes()).expect("parses")
    }

    #[test]
    fn a_tasks_config_keeps_the_images_environment_under_its_own() {
        let template = template();
        let mut task = Task::new("t", ["mk", "test"]).image("localhost/ci-exec/base:latest");
        task.workdir = Some("/src".into());
        assert!(template.fits(&task));
        let env = BTreeMap::from([("HOME".to_owned(), "/home/ci".to_owned())]);
        let volumes = [("/mnt/ci/volumes/src".to_owned(), "/src".to_owned())];
        let config = template.config(&task, &env, &volumes, "/root-of-t");
        assert_eq!(config["process"]["args"], json!(["mk", "test"]));
        assert_eq!(
            config["process"]["env"],
            json!(["PATH=/opt/tool:/usr/bin", "HOSTNAME=abc", "HOME=/home/ci"])
        );
        assert_eq!(config["process"]["cwd"], "/src");
        assert_eq!(config["root"]["path"], "/root-of-t");
        let mounts = config["mounts"].as_array().expect("mounts");
        let at = |destination: &str| {
            mounts
                .iter()
                .find(|mount| mount["destination"] == destination)
                .cloned()
        };
        assert_eq!(
            at("/etc/hosts").expect("hosts")["source"],
            "/var/lib/ci-exec/oci/files/hosts"
        );
        assert_eq!(at("/dev/shm").expect("shm")["type"], "tmpfs");
        assert!(
            at("/etc/other").is_none(),
            "the template's own files are gone"
        );
        assert_eq!(at("/src").expect("volume")["source"], "/mnt/ci/volumes/src");
        assert!(at("/etc/resolv.conf").is_none());
        assert_eq!(
            config["linux"]["namespaces"].as_array().map(Vec::len),
            Some(2)
        );
    }

    #[test]
    fn an_online_task_shares_the_guests_network() {
        let template = template();
        let task = Task::new("t", ["true"])
            .image("localhost/ci-exec/base:latest")
            .network(true);
        let config = template.config(&task, &BTreeMap::new(), &[], "/r");
        assert_eq!(config["linux"]["namespaces"], json!([{ "type": "pid" }]));
        assert_eq!(
            config["linux"]["sysctl"],
            json!({ "kernel.msgmax": "8192" })
        );
        assert!(
            config["mounts"]
                .as_array()
                .expect("mounts")
                .iter()
                .any(|mount| mount["destination"] == "/etc/resolv.conf")
        );
    }

    #[test]
    fn only_plain_tasks_of_the_image_fit() {
        let template = template();
        let task = Task::new("t", ["true"]).image("localhost/ci-exec/base:latest");
        assert!(template.fits(&task));
        assert!(!template.fits(&Task::new("t", ["true"]).image("alpine")));
        let mut privileged = Task::new("t", ["true"]).image("localhost/ci-exec/base:latest");
        privileged.privileged = true;
        assert!(!template.fits(&privileged));
        let mut user = task;
        user.user = Some("1000".into());
        assert!(!template.fits(&user));
    }

    #[test]
    fn the_command_falls_back_to_podman_when_the_store_changed() {
        let fallback = ["podman".to_owned(), "run".to_owned()];
        let premounted = template().command("/mnt/ci/tasks/t", "ns-t", &fallback, true);
        assert!(!premounted[2].contains("mount"), "{}", premounted[2]);
        let command = template().command("/mnt/ci/tasks/t", "ns-t", &fallback, false);
        let script = &command[2];
        assert!(
            script.starts_with(&format!("if [ {IMAGES_JSON} -nt ")),
            "{script}"
        );
        assert!(script.contains("then exec podman run; fi"), "{script}");
        assert!(script.contains("lowerdir=/merged/rootfs,"), "{script}");
        assert!(
            script.contains(
                "crun --cgroup-manager=disabled --log=/mnt/ci/tasks/t/crun.log run --bundle /mnt/ci/tasks/t ns-t\n"
            ),
            "{script}"
        );
    }
}
