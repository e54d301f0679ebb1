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
// Each `printcolumn(...)` repeats `type_ = "string"`; that is not a duplicate.
#[allow(clippy::duplicated_attributes)]
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

    /// How the Secret travels to the clusters. `Embedded`: its manifest is
    /// written into the Bundle (the original operator's way). `DownstreamResources`:
    /// the Bundle only names it and Fleet (v0.16 or later) copies the Secret
    /// object itself, so its data never leaves Secret objects. Unset: the
    /// operator's default (`--default-delivery`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delivery: Option<DeliveryMode>,

    /// Copy the source Secret's labels into the delivered manifest
    /// (`Embedded` delivery; Fleet's `downstreamResources` copies no labels).
    /// Off by default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub copy_labels: Option<bool>,

    /// Copy the source Secret's annotations into the delivered manifest,
    /// except `kubectl.kubernetes.io/*` and this operator's own (`Embedded`
    /// delivery; Fleet's `downstreamResources` copies no annotations). Off by
    /// default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub copy_annotations: Option<bool>,
}

/// How a Secret travels from the management cluster to the targets.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum DeliveryMode {
    /// The Secret manifest is embedded in the Bundle's resources.
    #[default]
    Embedded,
    /// The Bundle lists the Secret in `downstreamResources`; Fleet copies it.
    DownstreamResources,
}

impl std::str::FromStr for DeliveryMode {
    type Err = String;

    /// Parses the spelling used in the spec (`Embedded`,
    /// `DownstreamResources`), for the command line.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "Embedded" => Ok(DeliveryMode::Embedded),
            "DownstreamResources" => Ok(DeliveryMode::DownstreamResources),
            other => Err(format!(
                "unknown delivery mode {other:?}: expected Embedded or DownstreamResources"
            )),
        }
    }
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

#[cfg(test)]
mod tests {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    use kube::{CustomResourceExt, Resource};
    use serde_json::{Value, json};

    use super::*;

    const SELECTOR: &str = include_str!("../../tests/fixtures/handshake-selector.yaml");
    const CLUSTER_NAME: &str = include_str!("../../tests/fixtures/handshake-cluster-name.yaml");
    const FLEET_OPTIONS: &str = include_str!("../../tests/fixtures/handshake-fleet-options.yaml");

    /// The fixture as typed object and as the untyped JSON a user wrote.
    fn load(yaml: &str) -> (FleetHandshake, Value) {
        let typed: FleetHandshake = serde_yaml_ng::from_str(yaml).expect("fixture parses");
        let untyped: Value = serde_yaml_ng::from_str(yaml).expect("fixture is YAML");
        (typed, untyped)
    }

    /// Deserializing and serializing again loses nothing, spec or object.
    fn assert_lossless(typed: &FleetHandshake, untyped: &Value) {
        assert_eq!(serde_json::to_value(&typed.spec).unwrap(), untyped["spec"]);
        assert_eq!(&serde_json::to_value(typed).unwrap(), untyped);
        // And through YAML, the way `kubectl get -o yaml` shows it.
        let yaml = serde_yaml_ng::to_string(typed).unwrap();
        let again: FleetHandshake = serde_yaml_ng::from_str(&yaml).unwrap();
        assert_eq!(again.spec, typed.spec);
        assert_eq!(again.metadata, typed.metadata);
        assert_eq!(again.status, typed.status);
    }

    #[test]
    fn selector_sample_round_trips() {
        let (handshake, original) = load(SELECTOR);
        assert_eq!(handshake.metadata.name.as_deref(), Some("my-handshake"));
        assert_eq!(
            handshake.metadata.namespace.as_deref(),
            Some("fleet-default")
        );
        assert_eq!(handshake.spec.secret_name, "my-secret");
        assert_eq!(handshake.spec.secret_namespace.as_deref(), Some("default"));
        assert_eq!(handshake.spec.target_namespace.as_deref(), Some("test"));
        assert_eq!(handshake.spec.targets.len(), 1);
        let target = &handshake.spec.targets[0];
        let selector = target
            .cluster_selector
            .as_ref()
            .expect("a cluster selector");
        assert_eq!(
            selector.match_labels,
            Some([("env".to_string(), "dev".to_string())].into())
        );
        assert_eq!(selector.match_expressions, None);
        assert_eq!(target.cluster_name, None);
        assert!(target.extra.is_empty());
        assert!(target.has_criteria());
        assert_eq!(handshake.status, None);
        assert_lossless(&handshake, &original);
    }

    #[test]
    fn cluster_name_sample_round_trips() {
        let (handshake, original) = load(CLUSTER_NAME);
        assert_eq!(handshake.metadata.namespace.as_deref(), Some("fleet-local"));
        assert_eq!(handshake.spec.targets.len(), 1);
        let target = &handshake.spec.targets[0];
        assert_eq!(target.cluster_name.as_deref(), Some("local"));
        assert_eq!(target.cluster_selector, None);
        assert!(target.has_criteria());
        assert_lossless(&handshake, &original);
    }

    #[test]
    fn fleet_options_on_targets_round_trip() {
        let (handshake, original) = load(FLEET_OPTIONS);
        let spec = &handshake.spec;
        assert_eq!(spec.secret_name, "registry-credentials");
        assert_eq!(spec.secret_namespace, None);
        assert_eq!(spec.target_namespace, None);
        assert_eq!(spec.targets.len(), 3);

        let production = &spec.targets[0];
        assert_eq!(production.name.as_deref(), Some("production"));
        let expressions = production
            .cluster_selector
            .as_ref()
            .and_then(|selector| selector.match_expressions.as_ref())
            .expect("match expressions");
        assert_eq!(expressions[0].key, "region");
        assert_eq!(expressions[0].operator, "In");
        assert_eq!(
            expressions[0].values,
            Some(vec!["eu-west".to_string(), "eu-central".to_string()])
        );
        let extra_keys: Vec<&str> = production.extra.keys().map(String::as_str).collect();
        assert_eq!(
            extra_keys,
            [
                "correctDrift",
                "defaultNamespace",
                "helm",
                "keepResources",
                "namespaceAnnotations",
                "namespaceLabels",
            ]
        );
        assert_eq!(
            production.extra["helm"],
            json!({"releaseName": "registry-credentials", "takeOwnership": true, "maxHistory": 2})
        );
        assert_eq!(production.extra["keepResources"], json!(true));

        let staging = &spec.targets[1];
        assert_eq!(staging.cluster_group.as_deref(), Some("staging"));
        assert_eq!(staging.do_not_deploy, Some(true));
        assert!(staging.extra.is_empty());

        let edge = &spec.targets[2];
        assert!(edge.cluster_group_selector.is_some());
        assert_eq!(edge.extra["serviceAccount"], json!("fleet-deployer"));

        assert_lossless(&handshake, &original);
        assert_eq!(
            serde_json::to_value(&spec.targets).unwrap(),
            original["spec"]["targets"]
        );
    }

    #[test]
    fn optional_fields_are_omitted_not_nulled() {
        let spec = FleetHandshakeSpec {
            secret_name: "s".to_string(),
            secret_namespace: None,
            target_namespace: None,
            targets: vec![BundleTarget {
                cluster_name: Some("local".to_string()),
                ..BundleTarget::default()
            }],
            delivery: None,
            copy_labels: None,
            copy_annotations: None,
        };
        assert_eq!(
            serde_json::to_value(&spec).unwrap(),
            json!({"secretName": "s", "targets": [{"clusterName": "local"}]})
        );
        // An empty secretNamespace (allowed by the original operator) is kept
        // as written.
        let empty: FleetHandshakeSpec = serde_json::from_value(json!({
            "secretName": "s", "secretNamespace": "", "targets": [{"clusterName": "local"}],
        }))
        .unwrap();
        assert_eq!(empty.secret_namespace.as_deref(), Some(""));
    }

    #[test]
    fn spec_without_required_fields_is_rejected() {
        assert!(serde_json::from_value::<FleetHandshakeSpec>(json!({"targets": []})).is_err());
        assert!(serde_json::from_value::<FleetHandshakeSpec>(json!({"secretName": "s"})).is_err());
    }

    #[test]
    fn status_round_trips_and_accepts_the_bare_status_word() {
        let status: FleetHandshakeStatus =
            serde_json::from_value(json!({"status": "Synced"})).unwrap();
        assert_eq!(status.status, Some(SyncStatus::Synced));
        assert!(status.conditions.is_empty());
        assert_eq!(
            serde_json::to_value(&status).unwrap(),
            json!({"status": "Synced"})
        );

        let full = json!({
            "status": "Pending",
            "observedGeneration": 3,
            "readyClusters": "1/2",
            "conditions": [{
                "type": "Ready",
                "status": "False",
                "reason": "InProgress",
                "message": "Ready on 1/2 clusters.",
                "observedGeneration": 3,
                "lastTransitionTime": "2024-05-01T10:00:00Z",
            }],
        });
        let status: FleetHandshakeStatus = serde_json::from_value(full.clone()).unwrap();
        assert_eq!(status.status, Some(SyncStatus::Pending));
        assert_eq!(serde_json::to_value(&status).unwrap(), full);
        assert_eq!(
            serde_json::to_value(FleetHandshakeStatus::default()).unwrap(),
            json!({})
        );
    }

    #[test]
    fn status_words_are_spelled_as_on_the_wire() {
        for (word, text) in [
            (SyncStatus::Pending, "Pending"),
            (SyncStatus::Missing, "Missing"),
            (SyncStatus::Synced, "Synced"),
            (SyncStatus::Error, "Error"),
        ] {
            assert_eq!(word.as_str(), text);
            assert_eq!(serde_json::to_value(word).unwrap(), json!(text));
            assert_eq!(
                serde_json::from_value::<SyncStatus>(json!(text)).unwrap(),
                word
            );
        }
    }

    #[test]
    fn resource_identity_matches_the_original_operator() {
        assert_eq!(FleetHandshake::group(&()), "riverpointtechnology.com");
        assert_eq!(FleetHandshake::version(&()), "v1alpha1");
        assert_eq!(FleetHandshake::kind(&()), "FleetHandshake");
        assert_eq!(FleetHandshake::plural(&()), "fleethandshakes");
        assert_eq!(
            FleetHandshake::api_version(&()),
            "riverpointtechnology.com/v1alpha1"
        );
    }

    // ---- the CRD --------------------------------------------------------

    fn crd() -> Value {
        serde_json::to_value(FleetHandshake::crd()).unwrap()
    }

    #[test]
    fn crd_identity_scope_and_subresources() {
        let crd = crd();
        assert_eq!(
            crd["metadata"]["name"],
            "fleethandshakes.riverpointtechnology.com"
        );
        let spec = &crd["spec"];
        assert_eq!(spec["group"], "riverpointtechnology.com");
        assert_eq!(spec["scope"], "Namespaced");
        assert_eq!(spec["names"]["kind"], "FleetHandshake");
        assert_eq!(spec["names"]["plural"], "fleethandshakes");
        assert_eq!(spec["names"]["singular"], "fleethandshake");
        assert_eq!(spec["names"]["shortNames"], json!(["fhs"]));
        let versions = spec["versions"].as_array().unwrap();
        assert_eq!(versions.len(), 1);
        let version = &versions[0];
        assert_eq!(version["name"], "v1alpha1");
        assert_eq!(version["served"], true);
        assert_eq!(version["storage"], true);
        assert_eq!(version["subresources"], json!({"status": {}}));
    }

    #[test]
    fn crd_printer_columns() {
        let crd = crd();
        let columns = crd["spec"]["versions"][0]["additionalPrinterColumns"]
            .as_array()
            .unwrap();
        let column = |name: &str| {
            columns
                .iter()
                .position(|column| column["name"] == name)
                .unwrap_or_else(|| panic!("no {name} column"))
        };
        let order = ["Secret", "Target Namespace", "Status", "Age"].map(column);
        assert!(order.is_sorted(), "columns out of order: {columns:?}");
        let path = |name: &str| columns[column(name)]["jsonPath"].clone();
        assert_eq!(path("Secret"), ".spec.secretName");
        assert_eq!(path("Target Namespace"), ".spec.targetNamespace");
        assert_eq!(path("Status"), ".status.status");
        assert_eq!(path("Age"), ".metadata.creationTimestamp");
        assert_eq!(columns[column("Age")]["type"], "date");
        assert_eq!(path("Clusters"), ".status.readyClusters");
    }

    #[test]
    fn crd_schema_validates_the_spec() {
        let crd = crd();
        let schema = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"];
        assert_eq!(schema["required"], json!(["spec"]));
        let spec = &schema["properties"]["spec"];
        assert_eq!(spec["required"], json!(["secretName", "targets"]));
        let properties = &spec["properties"];
        assert_eq!(
            properties.as_object().unwrap().keys().collect::<Vec<_>>(),
            [
                "copyAnnotations",
                "copyLabels",
                "delivery",
                "secretName",
                "secretNamespace",
                "targetNamespace",
                "targets"
            ]
        );
        assert_eq!(properties["secretName"]["minLength"], 1);
        assert_eq!(properties["secretName"]["maxLength"], 253);
        assert!(properties["secretName"]["pattern"].is_string());

        let targets = &properties["targets"];
        assert_eq!(targets["type"], "array");
        assert_eq!(targets["minItems"], 1);
        let items = &targets["items"];
        assert_eq!(items["type"], "object");
        assert_eq!(items["x-kubernetes-preserve-unknown-fields"], true);
        for typed in [
            "name",
            "clusterName",
            "clusterSelector",
            "clusterGroup",
            "clusterGroupSelector",
            "doNotDeploy",
        ] {
            assert!(items["properties"].get(typed).is_some(), "{typed} is typed");
        }
        assert_eq!(
            items["properties"]["clusterSelector"]["properties"]["matchLabels"]["type"],
            "object"
        );
        // The flattened `extra` map is not part of the schema.
        assert!(items["properties"].get("extra").is_none());
        assert!(items.get("additionalProperties").is_none());

        let conditions = &schema["properties"]["status"]["properties"]["conditions"];
        assert_eq!(conditions["x-kubernetes-list-type"], "map");
        assert_eq!(conditions["x-kubernetes-list-map-keys"], json!(["type"]));
        assert_eq!(
            schema["properties"]["status"]["properties"]["status"]["enum"],
            json!(["Pending", "Missing", "Synced", "Error"])
        );
    }

    #[test]
    fn crd_schema_is_structural() {
        // The API server refuses references and untyped nodes (outside
        // preserve-unknown-fields) in a CRD schema.
        fn walk(node: &Value, path: &str) {
            match node {
                Value::Object(map) => {
                    for forbidden in ["$ref", "$defs", "definitions", "allOf", "oneOf", "anyOf"] {
                        assert!(!map.contains_key(forbidden), "{forbidden} at {path}");
                    }
                    for (key, value) in map {
                        walk(value, &format!("{path}/{key}"));
                    }
                }
                Value::Array(items) => {
                    for (index, value) in items.iter().enumerate() {
                        walk(value, &format!("{path}/{index}"));
                    }
                }
                _ => {}
            }
        }
        let crd = crd();
        walk(&crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"], "");
    }

    #[test]
    fn crd_is_a_valid_custom_resource_definition() {
        let crd: CustomResourceDefinition = serde_json::from_value(crd()).unwrap();
        assert_eq!(crd.spec.group, "riverpointtechnology.com");
    }

    #[test]
    fn checked_in_crd_is_current() {
        let checked_in = include_str!("../../../../deploy/crd.yaml");
        let generated = crate::crd::crd_yaml().unwrap();
        assert!(
            checked_in == generated,
            "deploy/crd.yaml is stale: regenerate it with `fleet-handshake crd > deploy/crd.yaml`"
        );
    }
}
