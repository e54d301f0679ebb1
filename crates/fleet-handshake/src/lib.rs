//! fleet-handshake: delivers Secrets from a Rancher/Fleet management cluster
//! to downstream clusters by maintaining Fleet Bundles.
//!
//! The pure core (`api`, `render`, `status`) has no I/O; `controller` is the
//! thin shell that talks to the API server; `telemetry` serves logs, metrics
//! and health.

pub mod api;
pub mod authorize;
pub mod controller;
pub mod crd;
pub mod render;
pub mod status;
pub mod telemetry;
