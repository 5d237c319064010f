//! `fake-cloud hetzner|digitalocean|fly`: runs a fake of that API until killed and prints a
//! `--driver=` for it (token `fake-cloud-token`). For trying the drivers by hand and for
//! `benches/cloud/bench.sh`. The Hetzner and DigitalOcean servers are the test sshd of
//! `.ci/setup-docker.sh` (`CI_EXEC_TEST_SSH_ADDRESS`, `_USER`, `_AUTHORIZED_KEYS`); Fly's
//! machines are containers on the Docker engine of `DOCKER_HOST`.

use ci_exec_fake_cloud::{Api, FakeCloud, FakeOptions, SshTestHost};

#[tokio::main]
async fn main() -> Result<(), String> {
    let (api, name) = match std::env::args().nth(1).as_deref() {
        Some("hetzner") | None => (Api::Hetzner, "hetzner"),
        Some("digitalocean") => (Api::DigitalOcean, "digitalocean"),
        Some("fly") => (Api::Fly, "fly"),
        Some(other) => {
            return Err(format!(
                "unknown API `{other}`: hetzner, digitalocean or fly"
            ));
        }
    };
    if api == Api::Fly {
        let fake = FakeCloud::start(api, FakeOptions::default())
            .await
            .map_err(|error| error.to_string())?;
        println!(
            "--driver=fly:token=fake-cloud-token,endpoint={}",
            fake.endpoint()
        );
        std::future::pending::<()>().await;
        return Ok(());
    }
    let host = SshTestHost::from_env()?;
    let fake = FakeCloud::start(api, host.options())
        .await
        .map_err(|error| error.to_string())?;
    println!(
        "--driver={name}:token=fake-cloud-token,endpoint={},ssh_user={}",
        fake.endpoint(),
        host.user
    );
    std::future::pending::<()>().await;
    Ok(())
}
