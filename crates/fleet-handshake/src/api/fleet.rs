//! Fleet's `fleet.cattle.io/v1alpha1` Bundle, reduced to the fields this
//! operator writes or reads, with Fleet's exact JSON names.
//!
//! Every struct keeps the fields it does not name in `extra`, so a Bundle
//! read from the API server and a target copied from a handshake survive a
//! round trip unchanged (Fleet's deployment options are many and grow with
//! each release; copying them verbatim is the compatibility contract).

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Fields of an object that this operator does not model, kept verbatim.
pub type Extra = BTreeMap<String, Value>;

/// Spec of a Fleet Bundle: the manifests to deploy and where to deploy them.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "fleet.cattle.io",
    version = "v1alpha1",
    kind = "Bundle",
    namespaced,
    status = "BundleStatus",
    schema = "disabled"
)]
#[serde(rename_all = "camelCase")]
pub struct BundleSpec {
    /// Raw manifests; Fleet wraps them into a generated Helm chart.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub resources: Vec<BundleResource>,
    /// Where the Bundle goes; the first matching target wins.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub targets: Vec<BundleTarget>,
    /// Secrets and ConfigMaps of the Bundle's namespace that Fleet copies to
    /// each target cluster as they are (Fleet v0.14 and later).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub downstream_resources: Vec<DownstreamResource>,
    /// Everything else Fleet knows (deployment options, rollout, ...).
    #[serde(flatten)]
    pub extra: Extra,
}

/// One file of a Bundle.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct BundleResource {
    /// File name; Fleet keeps only names ending in `.yaml`, `.yml` or `.json`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    /// File content, encoded as `encoding` says.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub content: String,
    /// Empty for plain text, `base64` or `base64+gz`. Always written, so
    /// that an encoding set by someone else counts as a difference.
    #[serde(default)]
    pub encoding: String,
}

/// A Secret or ConfigMap that Fleet copies downstream as an object.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DownstreamResource {
    /// `Secret` or `ConfigMap`.
    pub kind: String,
    /// Name of the object in the Bundle's namespace.
    pub name: String,
}

/// Fleet's BundleTarget: cluster selection criteria plus inline deployment
/// options. Criteria set on one target are ANDed.
///
/// The commonly used fields are typed so our CRD validates them; every other
/// field of Fleet's type is accepted and copied verbatim.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-preserve-unknown-fields" = true))]
pub struct BundleTarget {
    /// Name of the target, used in Fleet's status and for customization.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Name of one Fleet Cluster (or its Rancher display name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster_name: Option<String>,
    /// Label selector over Fleet Clusters; `{}` matches every cluster.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster_selector: Option<LabelSelector>,
    /// Name of one Fleet ClusterGroup.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster_group: Option<String>,
    /// Label selector over Fleet ClusterGroups.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster_group_selector: Option<LabelSelector>,
    /// Matched clusters get nothing deployed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub do_not_deploy: Option<bool>,
    /// Fleet's other BundleTarget fields (deployment options such as
    /// `defaultNamespace`, `namespace`, `helm`, `keepResources`, ...).
    #[serde(flatten)]
    #[schemars(skip)]
    pub extra: Extra,
}

impl BundleTarget {
    /// True when the target names at least one selection criterion; Fleet
    /// matches nothing with a target that has none.
    pub fn has_criteria(&self) -> bool {
        self.cluster_name.is_some()
            || self.cluster_selector.is_some()
            || self.cluster_group.is_some()
            || self.cluster_group_selector.is_some()
    }
}

/// What Fleet reports about a Bundle.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct BundleStatus {
    /// Fleet's conditions; `Ready` is the one that summarizes delivery.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// Counts of BundleDeployments per state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub summary: Option<BundleSummary>,
    /// The Bundle generation Fleet last processed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Everything else Fleet reports.
    #[serde(flatten)]
    pub extra: Extra,
}

/// Fleet's per-state counts of a Bundle's BundleDeployments (one per matched
/// cluster).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct BundleSummary {
    /// Clusters the Bundle should reach.
    #[serde(default)]
    pub desired_ready: i64,
    /// Clusters where it is installed and ready.
    #[serde(default)]
    pub ready: i64,
    /// Clusters where it is installed but not ready.
    #[serde(default)]
    pub not_ready: i64,
    /// Clusters that have not picked it up yet.
    #[serde(default)]
    pub pending: i64,
    /// Clusters waiting for the agent to apply it.
    #[serde(default)]
    pub wait_applied: i64,
    /// Clusters where applying it failed.
    #[serde(default)]
    pub err_applied: i64,
    /// Clusters that run an older version of it.
    #[serde(default)]
    pub out_of_sync: i64,
    /// Clusters where its objects were changed by hand.
    #[serde(default)]
    pub modified: i64,
    /// Per-deployment detail for the clusters that are not ready.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub non_ready_resources: Vec<NonReadyResource>,
}

/// One BundleDeployment that is not ready, as Fleet lists it.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct NonReadyResource {
    /// BundleDeployment name (one per cluster).
    #[serde(default)]
    pub name: String,
    /// Fleet's state of it, e.g. `ErrApplied`, `WaitApplied`.
    #[serde(default)]
    pub bundle_state: String,
    /// Fleet's message, e.g. the Helm error.
    #[serde(default)]
    pub message: String,
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    /// A Bundle as Fleet stores it: with options, status fields and
    /// metadata this operator does not model.
    fn stored_bundle() -> Value {
        json!({
            "apiVersion": "fleet.cattle.io/v1alpha1",
            "kind": "Bundle",
            "metadata": {
                "name": "my-handshake",
                "namespace": "fleet-default",
                "uid": "b6a1d0f4-1111-2222-3333-444444444444",
                "resourceVersion": "812",
                "generation": 2,
                "creationTimestamp": "2024-05-01T10:00:00Z",
                "labels": {"app.kubernetes.io/managed-by": "fleet-handshake"},
                "finalizers": ["fleet.cattle.io/bundle-finalizer"],
            },
            "spec": {
                "resources": [{"name": "my-secret.json", "content": "{}\n"}],
                "targets": [
                    {"clusterSelector": {"matchLabels": {"env": "dev"}}, "helm": {"releaseName": "x"}},
                    {"clusterName": "local", "doNotDeploy": false},
                ],
                "targetCustomizationMode": "FirstMatch",
                "defaultNamespace": "default",
                "helm": {"maxHistory": 2},
                "rolloutStrategy": {"maxUnavailable": "100%"},
                "downstreamResources": [{"kind": "Secret", "name": "extra"}],
            },
            "status": {
                "conditions": [{
                    "type": "Ready",
                    "status": "True",
                    "reason": "",
                    "message": "",
                    "lastTransitionTime": "2024-05-01T10:01:00Z",
                }],
                "summary": {
                    "desiredReady": 2,
                    "ready": 1,
                    "waitApplied": 1,
                    "nonReadyResources": [{"name": "c1", "bundleState": "WaitApplied"}],
                },
                "observedGeneration": 2,
                "display": {"readyClusters": "1/2", "state": "WaitApplied"},
                "resourcesSha256Sum": "abc123",
                "maxNew": 50,
                "partitions": [{"name": "All", "count": 2}],
            },
        })
    }

    #[test]
    fn stored_bundle_round_trips_unchanged() {
        let original = stored_bundle();
        let bundle: Bundle = serde_json::from_value(original.clone()).unwrap();
        assert_eq!(bundle.spec.resources.len(), 1);
        assert_eq!(bundle.spec.targets.len(), 2);
        assert_eq!(
            bundle.spec.downstream_resources,
            vec![DownstreamResource {
                kind: "Secret".to_string(),
                name: "extra".to_string(),
            }]
        );
        assert_eq!(
            bundle
                .spec
                .extra
                .keys()
                .map(String::as_str)
                .collect::<Vec<_>>(),
            [
                "defaultNamespace",
                "helm",
                "rolloutStrategy",
                "targetCustomizationMode"
            ]
        );
        let status = bundle.status.as_ref().unwrap();
        assert_eq!(status.observed_generation, Some(2));
        let summary = status.summary.as_ref().unwrap();
        assert_eq!(
            (summary.desired_ready, summary.ready, summary.wait_applied),
            (2, 1, 1)
        );
        assert_eq!(summary.err_applied, 0);
        assert_eq!(summary.non_ready_resources[0].bundle_state, "WaitApplied");
        assert_eq!(summary.non_ready_resources[0].message, "");
        assert_eq!(status.extra["display"]["readyClusters"], "1/2");
        assert_eq!(bundle.spec.targets[1].do_not_deploy, Some(false));

        let mut expected = original;
        // Counts Fleet leaves out are written as zero, and the empty message
        // of a non-ready resource is written out.
        let summary = &mut expected["status"]["summary"];
        for count in ["notReady", "pending", "errApplied", "outOfSync", "modified"] {
            summary[count] = json!(0);
        }
        summary["nonReadyResources"][0]["message"] = json!("");
        // A resource without an encoding is written with the empty (plain)
        // encoding; everything else of the spec is exact.
        let mut spec = stored_bundle()["spec"].clone();
        for resource in spec["resources"].as_array_mut().unwrap() {
            resource
                .as_object_mut()
                .unwrap()
                .entry("encoding")
                .or_insert(json!(""));
        }
        expected["spec"] = spec.clone();
        assert_eq!(serde_json::to_value(&bundle).unwrap(), expected);
        assert_eq!(serde_json::to_value(&bundle.spec).unwrap(), spec);
    }

    #[test]
    fn empty_fields_are_left_out() {
        assert_eq!(
            serde_json::to_value(BundleSpec::default()).unwrap(),
            json!({})
        );
        assert_eq!(
            serde_json::to_value(BundleResource::default()).unwrap(),
            json!({"encoding": ""}),
            "the encoding is always written: empty means plain text"
        );
        assert_eq!(
            serde_json::to_value(BundleTarget::default()).unwrap(),
            json!({})
        );
        assert_eq!(
            serde_json::to_value(BundleStatus::default()).unwrap(),
            json!({})
        );
        let resource = BundleResource {
            name: "a.json".to_string(),
            content: "{}".to_string(),
            encoding: String::new(),
        };
        assert_eq!(
            serde_json::to_value(resource).unwrap(),
            json!({"name": "a.json", "content": "{}", "encoding": ""})
        );
    }

    #[test]
    fn empty_target_objects_are_kept() {
        // `clusterSelector: {}` selects every cluster; it must not vanish.
        let target: BundleTarget = serde_json::from_value(json!({"clusterSelector": {}})).unwrap();
        assert!(target.cluster_selector.is_some());
        assert!(target.has_criteria());
        assert_eq!(
            serde_json::to_value(&target).unwrap(),
            json!({"clusterSelector": {}})
        );
    }

    #[test]
    fn criteria() {
        let parse = |value: Value| serde_json::from_value::<BundleTarget>(value).unwrap();
        for with in [
            json!({"clusterName": "local"}),
            json!({"clusterSelector": {"matchLabels": {"a": "b"}}}),
            json!({"clusterGroup": "g"}),
            json!({"clusterGroupSelector": {}}),
        ] {
            assert!(parse(with.clone()).has_criteria(), "{with}");
        }
        for without in [
            json!({}),
            json!({"name": "only-a-name"}),
            json!({"doNotDeploy": true}),
            json!({"defaultNamespace": "x", "helm": {"releaseName": "r"}}),
        ] {
            assert!(!parse(without.clone()).has_criteria(), "{without}");
        }
    }

    #[test]
    fn bundle_identity() {
        use kube::Resource;
        assert_eq!(Bundle::api_version(&()), "fleet.cattle.io/v1alpha1");
        assert_eq!(Bundle::kind(&()), "Bundle");
        assert_eq!(Bundle::plural(&()), "bundles");
    }
}
