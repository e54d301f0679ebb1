//! Wire types: our `FleetHandshake` CRD and the subset of Fleet's `Bundle`
//! that the operator writes and reads. No behaviour lives here.

pub mod fleet;
pub mod handshake;

pub use fleet::{
    Bundle, BundleResource, BundleSpec, BundleStatus, BundleSummary, BundleTarget,
    DownstreamResource,
};
pub use handshake::{
    DeliveryMode, FleetHandshake, FleetHandshakeSpec, FleetHandshakeStatus, SyncStatus,
};
