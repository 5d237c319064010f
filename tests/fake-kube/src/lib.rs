//! A fake Kubernetes API server on loopback, for the `k8s` driver's tests: no API server can
//! run on the machines that test ci-exec.
//!
//! It speaks the documented wire format for exactly what the driver (and `kubectl create`,
//! `logs -f`, `attach`) uses: Pods and PersistentVolumeClaims with label selectors,
//! `pods/log` with `follow` and `stream`, `pods/attach` over WebSocket (`v5.channel.k8s.io`
//! and `v4.channel.k8s.io`), NetworkPolicies (deny-all only), discovery. Every body it receives
//! or returns is checked against the Kubernetes OpenAPI ([`openapi`]); a violation is a `422`
//! (received) or a `500` (returned), so a test fails.
//!
//! Each pod's container runs for real on the local Docker engine, through the `docker` driver
//! (the same code path as `--driver=docker`); each PVC is a Docker volume.
//!
//! It is not a scheduler, a kubelet or an API server: no other resources, no admission, no
//! field selectors, no patch.

mod engine;
pub mod openapi;
mod server;

pub use server::{FakeKube, FakeOptions, Requests};
