//! The host's TSC frequency, for guests under TCG.
//!
//! Under TCG a guest's TSC ticks at the host's rate, but the `microvm` machine has nothing to
//! calibrate it against (no PC speaker gate for the PIT, no HPET, no ACPI PM timer): Debian's
//! kernel then marks the TSC unstable and hangs waiting for jiffies. Telling it the rate with
//! `tsc_early_khz=` lets it boot. Measured on the machine that builds the image, which is the
//! machine that boots it (the cache is local).

/// `tsc_early_khz=<rate>` for this host, or `None` where there is no TSC to measure. With the
/// kernel's tick rate (`CONFIG_HZ`) also `lpj=<TSC cycles per tick>`: the boot CPU derives its
/// delay loop from the TSC, but every other CPU calibrates its own by timing loops, 0.1 s of a
/// TCG boot each; `lpj` gives them the value (the delay loop counts TSC cycles).
pub fn tcg_kernel_arguments(kernel_hz: Option<u64>) -> Option<String> {
    tsc_khz().map(|khz| with_loops_per_jiffy(khz, kernel_hz))
}

fn with_loops_per_jiffy(khz: u64, kernel_hz: Option<u64>) -> String {
    match kernel_hz.filter(|hz| *hz > 0) {
        Some(hz) => format!("tsc_early_khz={khz} lpj={}", khz * 1000 / hz),
        None => format!("tsc_early_khz={khz}"),
    }
}

/// `CONFIG_HZ` from a kernel's `config-<release>` file.
pub fn kernel_hz(config: &str) -> Option<u64> {
    config
        .lines()
        .find_map(|line| line.strip_prefix("CONFIG_HZ="))
        .and_then(|value| value.trim().parse().ok())
}

#[cfg(target_arch = "x86_64")]
fn tsc_khz() -> Option<u64> {
    use std::time::{Duration, Instant};
    // Take the median of a few short measurements so one preempted sample does not skew it.
    let mut samples: Vec<u64> = (0..5)
        .filter_map(|_| {
            let started = Instant::now();
            // SAFETY: rdtsc has no preconditions on x86_64.
            let first = unsafe { core::arch::x86_64::_rdtsc() };
            std::thread::sleep(Duration::from_millis(20));
            // SAFETY: as above.
            let last = unsafe { core::arch::x86_64::_rdtsc() };
            let micros = started.elapsed().as_micros() as u64;
            (micros > 0).then(|| last.saturating_sub(first) * 1000 / micros)
        })
        .collect();
    samples.sort_unstable();
    // Rounded to MHz: a stable value across builds on the same host.
    samples
        .get(samples.len() / 2)
        .map(|khz| (khz + 500) / 1000 * 1000)
        .filter(|khz| *khz > 0)
}

#[cfg(not(target_arch = "x86_64"))]
fn tsc_khz() -> Option<u64> {
    None
}

#[cfg(test)]
mod tests {
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn measures_a_plausible_rate() {
        let argument = super::tcg_kernel_arguments(None).expect("x86_64 has a TSC");
        let khz: u64 = argument
            .trim_start_matches("tsc_early_khz=")
            .parse()
            .expect("number");
        assert!((100_000..10_000_000).contains(&khz), "{argument}");
    }

    #[test]
    fn loops_per_jiffy_follow_the_tick_rate() {
        assert_eq!(
            super::with_loops_per_jiffy(2_445_000, Some(250)),
            "tsc_early_khz=2445000 lpj=9780000"
        );
        assert_eq!(
            super::with_loops_per_jiffy(2_445_000, None),
            "tsc_early_khz=2445000"
        );
        assert_eq!(
            super::kernel_hz("# CONFIG_HZ_100 is not set\nCONFIG_HZ_250=y\nCONFIG_HZ=250\n"),
            Some(250)
        );
        assert_eq!(super::kernel_hz("CONFIG_HZ_250=y\n"), None);
    }
}
