//! `fake-kube [NAMESPACE…]`: runs the fake API server until killed, its pods on the Docker
//! engine of `DOCKER_HOST`, and prints the path of a kubeconfig for it (token `fake-kube`).
//! For trying `--driver=k8s` and `kubectl` by hand.

use ci_exec_fake_kube::{FakeKube, FakeOptions};

#[tokio::main]
async fn main() -> Result<(), String> {
    let mut namespaces: Vec<String> = std::env::args().skip(1).collect();
    if namespaces.is_empty() {
        namespaces.push("default".to_owned());
    }
    let options = FakeOptions {
        namespaces: namespaces.clone(),
        // No authentication: client-go (kubectl) sends no bearer token over plain HTTP.
        tokens: Vec::new(),
        docker_host: std::env::var("DOCKER_HOST").ok(),
        ..FakeOptions::default()
    };
    let fake = FakeKube::start(options).await?;
    let path = std::env::temp_dir().join(format!("fake-kube-{}.kubeconfig", std::process::id()));
    fake.write_kubeconfig(&path, &namespaces[0], "fake-kube")
        .map_err(|error| error.to_string())?;
    println!("{}", path.display());
    std::future::pending::<()>().await;
    Ok(())
}
