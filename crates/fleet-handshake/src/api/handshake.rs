//! The `FleetHandshake` custom resource, `riverpointtechnology.com/v1alpha1`.
//!
//! The group, kind and spec field names are those of the original operator:
//! objects written for it must apply and work unchanged.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::fleet::BundleTarget;

/// Asks the operator to deliver one Secret to the Fleet clusters matched by
/// `targets`, by maintaining a Fleet Bundle of the same name and namespace.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "riverpointtechnology.com",
    version = "v1alpha1",
    kind = "FleetHandshake",
    plural = "fleethandshakes",
    shortname = "fhs",
    namespaced,
    status = "FleetHandshakeStatus",
    doc = "Delivers a Secret to Fleet-managed clusters through a Fleet Bundle of the same name.",
    printcolumn(
        name = "Secret",
        type_ = "string",
        json_path = ".spec.secretName",
        description = "Source Secret"
    ),
    printcolumn(
        name = "Target Namespace",
        type_ = "string",
        json_path = ".spec.targetNamespace",
        description = "Namespace of the copies downstream"
    ),
    printcolumn(
        name = "Status",
        type_ = "string",
        json_path = ".status.status",
        description = "Pending, Missing, Synced or Error"
    ),
    printcolumn(
        name = "Clusters",
        type_ = "string",
        json_path = ".status.readyClusters",
        description = "Ready clusters out of matched clusters, as Fleet reports"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct FleetHandshakeSpec {
    /// Name of the source Secret.
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
    )]
    pub secret_name: String,

    /// Namespace of the source Secret; defaults to the handshake's own
    /// namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(max = 63),
        regex(pattern = r"^$|^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub secret_namespace: Option<String>,

    /// Namespace the Secret is written to on each target cluster; when unset,
    /// Fleet's default applies (the target's `defaultNamespace`, else
    /// `default`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(max = 63),
        regex(pattern = r"^$|^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub target_namespace: Option<String>,

    /// Fleet BundleTargets, copied verbatim into the Bundle: which clusters
    /// receive the Secret, and Fleet deployment options per target. The
    /// first target that matches a cluster wins.
    #[schemars(length(min = 1))]
    pub targets: Vec<BundleTarget>,
}

/// The one-word state kept from the original operator.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum SyncStatus {
    /// The Bundle is written; Fleet has not yet reported delivery to every
    /// matched cluster.
    Pending,
    /// The source Secret does not exist; no copy is being delivered.
    Missing,
    /// The Bundle matches the source and Fleet reports it ready on every
    /// matched cluster.
    Synced,
    /// The handshake cannot be served; the `Ready` condition says why.
    Error,
}

impl SyncStatus {
    /// The wire spelling, for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            SyncStatus::Pending => "Pending",
            SyncStatus::Missing => "Missing",
            SyncStatus::Synced => "Synced",
            SyncStatus::Error => "Error",
        }
    }
}

/// Observed state of a handshake. Deterministic: it changes only when what
/// the operator observed changes, so writing it never triggers more work.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FleetHandshakeStatus {
    /// `Pending`, `Missing`, `Synced` or `Error` (as in the original operator).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<SyncStatus>,
    /// The spec generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready` (everything delivered), `BundleApplied` (the Bundle matches the
    /// source) and `Delivered` (Fleet's report), each with reason and message.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// Ready clusters out of matched clusters, as Fleet reports them ("n/m").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_clusters: Option<String>,
}
