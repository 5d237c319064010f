//! `fake-cloud hetzner|digitalocean`: runs a fake of that API until killed, its servers the test
//! sshd of `.ci/setup-docker.sh` (`CI_EXEC_TEST_SSH_ADDRESS`, `_USER`, `_AUTHORIZED_KEYS`), and
//! prints a `--driver=` for it (token `fake-cloud-token`). For trying the drivers by hand.

use ci_exec_fake_cloud::{Api, FakeCloud, SshTestHost};

#[tokio::main]
async fn main() -> Result<(), String> {
    let (api, name) = match std::env::args().nth(1).as_deref() {
        Some("hetzner") | None => (Api::Hetzner, "hetzner"),
        Some("digitalocean") => (Api::DigitalOcean, "digitalocean"),
        Some(other) => return Err(format!("unknown API `{other}`: hetzner or digitalocean")),
    };
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
