//! In-VM measurements of the qemu driver: a task round trip in the guest OS vs under podman,
//! 9p throughput for a 200 MB file each way, and host memory of an idle VM.
//! Run: `cargo bench -p ci-exec-qemu --bench vm -- [RUNS]` (medians of RUNS, default 5).

use std::time::{Duration, Instant};

use ci_exec_driver::{Driver, Task, wait_for_exit};
use ci_exec_qemu::{QemuConfig, QemuDriver};

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

/// The proportional set size of process `pid` in kB (shared pages count by their share), or "?".
fn pss_kb(pid: i32) -> String {
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
    rollup
        .lines()
        .find_map(|line| line.strip_prefix("Pss:"))
        .and_then(|value| value.split_whitespace().next())
        .unwrap_or("?")
        .to_owned()
}

async fn task(driver: &QemuDriver, id: String, image: &str, script: &str) -> (Duration, String) {
    let started = Instant::now();
    let container = driver
        .run_container(
            Task::new(id, ["sh", "-c", script])
                .image(image)
                .mount("bench", "/data"),
        )
        .await
        .expect("run_container");
    let code = wait_for_exit(container.as_ref(), Duration::from_millis(5), None)
        .await
        .expect("wait");
    let took = started.elapsed();
    let mut stdout = Vec::new();
    let mut stderr = Vec::new();
    container
        .logs(&mut stdout, &mut stderr)
        .await
        .expect("logs");
    assert_eq!(code, 0, "`{script}`: {}", String::from_utf8_lossy(&stderr));
    container.cleanup().await.expect("cleanup");
    (took, String::from_utf8_lossy(&stderr).into_owned())
}

fn rate(stderr: &str) -> String {
    stderr
        .lines()
        .find(|line| line.contains("copied"))
        .and_then(|line| line.rsplit(", ").next())
        .unwrap_or("?")
        .to_owned()
}

#[tokio::main]
async fn main() {
    let runs: usize = std::env::args()
        .skip(1)
        .find_map(|argument| argument.parse().ok())
        .unwrap_or(5);
    let driver = QemuDriver::new(QemuConfig::new(format!("bench-{}", std::process::id())));
    let started = Instant::now();
    let machine = driver.machine().await.expect("boot");
    let boot = started.elapsed();
    let pss_idle = pss_kb(machine.pid());
    let image = "localhost/ci-exec/base:latest";

    let mut guest = Vec::new();
    let mut podman = Vec::new();
    for run in 0..runs {
        guest.push(task(&driver, format!("g{run}"), "", "true").await.0);
        podman.push(task(&driver, format!("p{run}"), image, "true").await.0);
    }
    let (guest, podman) = (median(guest), median(podman));

    let mut write = Vec::new();
    let mut read = Vec::new();
    let mut write_rate = String::new();
    let mut read_rate = String::new();
    for run in 0..runs {
        let (took, stderr) = task(
            &driver,
            format!("w{run}"),
            "",
            "dd if=/dev/zero of=/data/big bs=1M count=200 conv=fsync",
        )
        .await;
        write.push(took);
        write_rate = rate(&stderr);
        let (took, stderr) = task(
            &driver,
            format!("r{run}"),
            "",
            "dd if=/data/big of=/dev/null bs=1M",
        )
        .await;
        read.push(took);
        read_rate = rate(&stderr);
    }
    let mb_per_s = |took: Duration| 200.0 / took.saturating_sub(guest).as_secs_f64();

    let pss_busy = pss_kb(machine.pid());

    println!("| measure (median of {runs}) | value |");
    println!("|---|---|");
    println!("| VM start in this process (warm if a state exists) | {boot:.2?} |");
    println!("| task `true`, guest OS | {guest:.2?} |");
    println!("| task `true`, podman in the guest | {podman:.2?} |");
    println!(
        "| podman overhead | {:.2?} ({:.1}x the guest-OS task) |",
        podman.saturating_sub(guest),
        podman.as_secs_f64() / guest.as_secs_f64()
    );
    println!(
        "| 9p write 200 MB guest→host | {:.0} MB/s (dd: {write_rate}) |",
        mb_per_s(median(write))
    );
    println!(
        "| 9p read 200 MB host→guest | {:.0} MB/s (dd: {read_rate}) |",
        mb_per_s(median(read))
    );
    println!("| host memory (PSS) of the VM, idle right after its start | {pss_idle} kB |");
    println!("| host memory (PSS) of the VM after these tasks | {pss_busy} kB |");
    driver.close().await.expect("close");
}
