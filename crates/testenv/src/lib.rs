//! A real Kubernetes control plane for integration tests and demos.
//!
//! [`ControlPlane`] runs etcd, kube-apiserver and kube-controller-manager as
//! local processes on loopback ports — no containers, no kubelet, no nodes.
//! Objects are stored, validated (including CRD schemas and pruning),
//! authorised by RBAC, garbage collected and audited exactly as on a real
//! cluster; Pods are never run.
//!
//! The executables are built once from the repository's `testenv/` Go module
//! and cached per user ([`Binaries`]); Fleet's CRDs come from the Fleet Go
//! module ([`fleet_crd_file`]).
//!
//! ```no_run
//! # async fn example() -> anyhow::Result<()> {
//! use k8s_openapi::api::core::v1::ConfigMap;
//! use kube::api::Api;
//!
//! let control_plane = testenv::ControlPlane::shared();
//! let namespace = control_plane.create_namespace("my-test").await;
//! let config_maps: Api<ConfigMap> =
//!     Api::namespaced(control_plane.client().await, &namespace);
//! # let _ = config_maps;
//! # Ok(())
//! # }
//! ```
//!
//! Environment variables:
//!
//! - `FLEET_HANDSHAKE_TEST_KUBECONFIG` ([`KUBECONFIG_ENV`]): reuse a running
//!   control plane (e.g. from `testenv up`) in [`ControlPlane::shared`].
//! - `FLEET_HANDSHAKE_CONTROLPLANE_BIN` ([`BIN_DIR_ENV`]): directory with
//!   prebuilt `etcd`, `kube-apiserver` and `kube-controller-manager`.
//! - `FLEET_HANDSHAKE_FLEET_CRDS` ([`FLEET_CRDS_ENV`]): Fleet's `crds.yaml`,
//!   instead of fetching it with `go mod download`.
//! - `XDG_CACHE_HOME`: base of the binary cache (default `~/.cache`).
//!
//! Linux only: child processes are tied to the parent's life with
//! `PR_SET_PDEATHSIG`.

#![warn(missing_docs)]

mod audit;
mod binaries;
mod control_plane;
mod crds;
mod fsutil;
mod kubeconfig;
mod pki;
mod process;
mod state;

pub use audit::{AuditEvent, AuditObjectRef, AuditResponseStatus, AuditUser};
pub use binaries::{BIN_DIR_ENV, Binaries, cache_key, cache_root, go_module_dir};
pub use control_plane::{
    ControlPlane, KUBECONFIG_ENV, Options, ServiceAccountIdentity, project_crd_path,
};
pub use crds::{CrdSource, FLEET_CRDS_ENV, FLEET_MODULE, FLEET_VERSION, fleet_crd_file};
pub use state::{Startup, StateDir};

/// Root of the repository this crate was built in (two levels above the
/// crate's manifest), where `testenv/` and `deploy/` live.
fn repository_root() -> std::path::PathBuf {
    let manifest_dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest_dir
        .parent()
        .and_then(std::path::Path::parent)
        .unwrap_or(manifest_dir)
        .to_path_buf()
}
