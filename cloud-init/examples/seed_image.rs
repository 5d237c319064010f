//! Writes a typical seed (`write_files`, `runcmd`, a user with a key) to the path given, for
//! `benches/image/run.sh` to time: `seed_image <output.img>`.

use ci_exec_cloud_init::{CloudConfig, MetaData, NamedUser, Seed, User, WriteFile};

fn main() {
    let Some(output) = std::env::args().nth(1) else {
        eprintln!("usage: seed_image <output.img>");
        std::process::exit(2);
    };
    let seed = Seed {
        meta_data: MetaData::new("bench", "ci-exec"),
        user_data: CloudConfig {
            users: vec![
                User::default_user(),
                User::Named(NamedUser {
                    name: "ci".into(),
                    ssh_authorized_keys: vec![
                        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBench ci@bench".into(),
                    ],
                    ..NamedUser::default()
                }),
            ],
            write_files: vec![WriteFile::new("/etc/ci-exec/bench", "x".repeat(64 << 10))],
            runcmd: vec!["systemctl enable --now qemu-guest-agent".into()],
            ..CloudConfig::default()
        },
        network_config: None,
    };
    if let Err(error) = seed.write_image(std::path::Path::new(&output)) {
        eprintln!("error: {error}");
        std::process::exit(1);
    }
}
