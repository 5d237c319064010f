//! `server_type=auto` / `size=auto`: the smallest machine of the seeds' tables (seed `001_…`)
//! that fits a task's limits.

use ci_exec_driver::Limits;

const GB: u64 = 1024 * 1024 * 1024;
const MB: u64 = 1024 * 1024;

/// CPUs a task asks for: Docker's `cpu_shares` count 1024 per full CPU.
fn cpus(limits: &Limits) -> f64 {
    limits.cpu_shares as f64 / 1024.0
}

/// Hetzner's server type for `limits`.
pub fn hetzner_server_type(limits: &Limits) -> &'static str {
    let (memory, cpus) = (limits.memory_bytes, cpus(limits));
    if memory > 16 * GB || cpus > 8.0 {
        "cx53"
    } else if memory > 8 * GB || cpus > 4.0 {
        "cx43"
    } else if memory > 4 * GB || cpus > 2.0 {
        "cx33"
    } else {
        "cx23"
    }
}

/// DigitalOcean's droplet size for `limits`.
pub fn digitalocean_size(limits: &Limits) -> &'static str {
    let (memory, cpus) = (limits.memory_bytes, cpus(limits));
    if memory > 8 * GB || cpus > 4.0 {
        "s-8vcpu-16gb"
    } else if memory > 4 * GB || cpus > 2.0 {
        "s-4vcpu-8gb"
    } else if memory > 2 * GB || cpus > 1.0 {
        "s-2vcpu-4gb"
    } else if memory > GB {
        "s-2vcpu-2gb"
    } else if memory > 512 * MB {
        "s-1vcpu-2gb"
    } else {
        "s-1vcpu-1gb"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(cpus: u64, memory_mb: u64) -> Limits {
        Limits {
            cpu_shares: cpus * 1024,
            memory_bytes: memory_mb * MB,
        }
    }

    #[test]
    fn hetzner_table() {
        let cases = [
            (limits(0, 0), "cx23"),
            (limits(2, 4096), "cx23"),
            (limits(3, 0), "cx33"),
            (limits(0, 4097), "cx33"),
            (limits(5, 0), "cx43"),
            (limits(0, 8 * 1024 + 1), "cx43"),
            (limits(9, 0), "cx53"),
            (limits(0, 16 * 1024 + 1), "cx53"),
        ];
        for (limits, want) in cases {
            assert_eq!(hetzner_server_type(&limits), want, "{limits:?}");
        }
    }

    #[test]
    fn digitalocean_table() {
        let cases = [
            (limits(0, 0), "s-1vcpu-1gb"),
            (limits(1, 512), "s-1vcpu-1gb"),
            (limits(0, 513), "s-1vcpu-2gb"),
            (limits(0, 1025), "s-2vcpu-2gb"),
            (limits(2, 0), "s-2vcpu-4gb"),
            (limits(0, 2049), "s-2vcpu-4gb"),
            (limits(3, 0), "s-4vcpu-8gb"),
            (limits(0, 8 * 1024 + 1), "s-8vcpu-16gb"),
            (limits(5, 0), "s-8vcpu-16gb"),
        ];
        for (limits, want) in cases {
            assert_eq!(digitalocean_size(&limits), want, "{limits:?}");
        }
    }
}
