//! The host's TSC frequency, for guests under TCG.
//!
//! Under TCG a guest's TSC ticks at the host's rate, but the `microvm` machine has nothing to
//! calibrate it against (no PC speaker gate for the PIT, no HPET, no ACPI PM timer): Debian's
//! kernel then marks the TSC unstable and hangs waiting for jiffies. Telling it the rate with
//! `tsc_early_khz=` lets it boot. Measured on the machine that builds the image, which is the
//! machine that boots it (the cache is local).

/// `tsc_early_khz=<rate>` for this host, or `None` where there is no TSC to measure.
pub fn tcg_kernel_arguments() -> Option<String> {
    tsc_khz().map(|khz| format!("tsc_early_khz={khz}"))
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
        let argument = super::tcg_kernel_arguments().expect("x86_64 has a TSC");
        let khz: u64 = argument
            .trim_start_matches("tsc_early_khz=")
            .parse()
            .expect("number");
        assert!((100_000..10_000_000).contains(&khz), "{argument}");
    }
}
