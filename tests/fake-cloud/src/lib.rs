//! Fakes of the Hetzner Cloud, DigitalOcean and Fly Machines APIs on loopback.
pub mod openapi;
