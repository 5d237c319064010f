//! Lookup throughput and latency of the orchestrator (issue 16): 100 concurrent clients, each
//! on its own keep-alive connection, sending authenticated `HEAD`s of result keys — half
//! present, half absent — for a few seconds; the baseline, in the same run, is the same load
//! on `/status`, which touches neither authentication nor the database.
//!
//! `cargo bench -p ci-exec-remote --bench lookup [-- SECONDS]`

use std::sync::Barrier;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use ci_exec_job::store::{ResultRecord, ResultStore, unix_now};
use ci_exec_remote::client::{ClientOptions, Orchestrator, Published};
use ci_exec_remote::identity::ExecutorKey;
use ci_exec_remote::server::storage::{Credential, Storage};
use ci_exec_remote::server::{ServeOptions, Server};

const CLIENTS: usize = 100;
const REPO: &str = "example.com/bench/lookup";

fn main() {
    let seconds: u64 = std::env::args()
        .skip(1)
        .find_map(|arg| arg.parse().ok())
        .unwrap_or(5);
    let data = tempfile::tempdir().expect("tempdir");
    let (ready, url) = std::sync::mpsc::channel();
    let options = ServeOptions {
        listen: "127.0.0.1:0".parse().expect("address"),
        data: data.path().to_owned(),
        tls: None,
        keep_days: None,
        max_blob_bytes: 1 << 20,
        oidc: None,
        public_read: Vec::new(),
    };
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Runtime::new().expect("runtime");
        runtime.block_on(async move {
            let server = Server::bind(&options).await.expect("bind");
            ready.send(server.url()).expect("send");
            server.run(std::future::pending()).await;
        });
    });
    let url: String = url.recv().expect("server");
    let storage = Storage::open(data.path()).expect("storage");
    let token = ci_exec_remote::server::auth::new_token().expect("token");
    storage
        .add_grant(Credential::Token(&token), REPO, true)
        .expect("grant");

    // 200 published results to look up.
    let executor = tempfile::tempdir().expect("tempdir");
    let store = ResultStore::open(Some(executor.path().to_owned())).expect("store");
    let key = ExecutorKey::generate("bench").expect("key");
    let client = Orchestrator::new(ClientOptions {
        url: url.clone(),
        token: Some(token.clone()),
        repository: REPO.into(),
        ..ClientOptions::default()
    })
    .expect("client");
    let present: Vec<String> = (0..200u32)
        .map(|i| {
            let record = record(&store, i);
            assert_eq!(
                client.publish(&record, &store, &key).expect("publish"),
                Published::Created
            );
            record.key
        })
        .collect();
    let absent: Vec<String> = (0..200u32)
        .map(|i| {
            hex::encode(<sha2::Sha256 as sha2::Digest>::digest(format!(
                "absent {i}"
            )))
        })
        .collect();

    let duration = Duration::from_secs(seconds);
    let status = load(&url, duration, None, &|_| "/status".to_owned());
    let lookups = load(&url, duration, Some(&token), &|i| {
        let key = if i % 2 == 0 {
            &present[i / 2 % present.len()]
        } else {
            &absent[i / 2 % absent.len()]
        };
        format!("/{REPO}/results/{key}")
    });
    println!(
        "### Lookups ({}, {} cores, {CLIENTS} clients, {seconds} s each)",
        humantime_date(),
        std::thread::available_parallelism().map_or(0, usize::from)
    );
    println!();
    println!("Command: `cargo bench -p ci-exec-remote --bench lookup -- {seconds}`");
    println!();
    println!("| load | requests/s | p50 | p99 | max |");
    println!("|---|---|---|---|---|");
    for (name, result) in [
        ("`HEAD /status` (no auth, no database)", &status),
        (
            "`HEAD` of result keys, bearer token, half present",
            &lookups,
        ),
    ] {
        println!(
            "| {name} | {:.0} | {:.2} ms | {:.2} ms | {:.2} ms |",
            result.per_second, result.p50_ms, result.p99_ms, result.max_ms
        );
    }
    println!();
    println!(
        "Authenticated lookups run at {:.2}x the throughput of the baseline; p99 {:.2}x.",
        lookups.per_second / status.per_second,
        lookups.p99_ms / status.p99_ms
    );
}

struct Load {
    per_second: f64,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
}

fn load(
    url: &str,
    duration: Duration,
    token: Option<&str>,
    path: &(dyn Fn(usize) -> String + Sync),
) -> Load {
    let stop = AtomicBool::new(false);
    let start = Barrier::new(CLIENTS + 1);
    let mut latencies: Vec<Duration> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..CLIENTS)
            .map(|client| {
                let (stop, start) = (&stop, &start);
                scope.spawn(move || {
                    let agent: ureq::Agent = ureq::Agent::config_builder()
                        .http_status_as_error(false)
                        .build()
                        .into();
                    let mut latencies = Vec::new();
                    start.wait();
                    let mut i = client;
                    while !stop.load(Ordering::Relaxed) {
                        let mut request = agent.head(format!("{url}{}", path(i)));
                        if let Some(token) = token {
                            request = request.header("Authorization", format!("Bearer {token}"));
                        }
                        let began = Instant::now();
                        let response = request.call().expect("request");
                        assert!(matches!(response.status().as_u16(), 200 | 404));
                        latencies.push(began.elapsed());
                        i += CLIENTS;
                    }
                    latencies
                })
            })
            .collect();
        start.wait();
        std::thread::sleep(duration);
        stop.store(true, Ordering::Relaxed);
        handles
            .into_iter()
            .flat_map(|handle| handle.join().expect("client"))
            .collect()
    });
    latencies.sort();
    let at = |fraction: f64| {
        let index = ((latencies.len() as f64 * fraction) as usize).min(latencies.len() - 1);
        latencies[index].as_secs_f64() * 1000.0
    };
    Load {
        per_second: latencies.len() as f64 / duration.as_secs_f64(),
        p50_ms: at(0.50),
        p99_ms: at(0.99),
        max_ms: at(1.0),
    }
}

fn record(store: &ResultStore, i: u32) -> ResultRecord {
    let stdout = store
        .put_blob(format!("output {i}\n").as_bytes())
        .expect("blob");
    let stderr = store.put_blob(b"").expect("blob");
    ResultRecord {
        format: ci_exec_job::key::FORMAT_VERSION,
        key: hex::encode(<sha2::Sha256 as sha2::Digest>::digest(format!(
            "present {i}"
        ))),
        exit_code: 0,
        created_unix: unix_now(),
        driver: "native".into(),
        environment_digest: None,
        image: None,
        host: "bench".into(),
        ci_exec_version: "0".into(),
        commit: "c".into(),
        tree: "t".into(),
        stdout,
        stderr,
        artifacts: vec![],
        steps: vec![],
        repository: Some(REPO.into()),
        target: None,
        signature: None,
    }
}

fn humantime_date() -> String {
    let now = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
    now[..10].to_owned()
}
