//! Renders the desired Bundle of a handshake from its source Secret, and,
//! for `DownstreamResources` delivery of a Secret from another namespace, the
//! copy of that Secret Fleet reads in the Bundle's namespace.
//!
//! Pure and deterministic: the same handshake and Secret always give the
//! same objects, byte for byte, so comparing desired with observed state is
//! meaningful and the operator never writes without a change.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::ObjectMeta;
use kube::{Resource, ResourceExt};
use serde::Serialize;

use crate::api::{
    Bundle, BundleResource, BundleSpec, DeliveryMode, DownstreamResource, FleetHandshake,
    FleetHandshakeSpec,
};
use crate::authorize::ALLOWED_NAMESPACES_ANNOTATION;

/// Label on every Bundle we manage; the Bundle watch selects on it.
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
/// Value of [`MANAGED_BY_LABEL`].
pub const MANAGED_BY: &str = "fleet-handshake";
/// Label naming the handshake a Bundle belongs to.
pub const HANDSHAKE_LABEL: &str = "riverpointtechnology.com/fleethandshake";

/// Why a Bundle cannot be rendered.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RenderError {
    /// The handshake has not been stored by the API server yet (no uid,
    /// name or namespace), so no owner reference can point to it.
    #[error("the handshake has no {0} yet")]
    MissingMetadata(&'static str),
}

/// The Secret as it is written into the Bundle: only the fields that define
/// its content, never server-managed metadata.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct SecretManifest<'a> {
    api_version: &'static str,
    kind: &'static str,
    metadata: ManifestMetadata<'a>,
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    type_: Option<&'a str>,
    data: BTreeMap<&'a str, &'a ByteString>,
    #[serde(skip_serializing_if = "Option::is_none")]
    immutable: Option<bool>,
}

#[derive(Serialize)]
struct ManifestMetadata<'a> {
    name: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    namespace: Option<&'a str>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    labels: BTreeMap<&'a str, &'a str>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    annotations: BTreeMap<&'a str, &'a str>,
}

/// Source metadata a handshake asked to copy (`copyLabels`,
/// `copyAnnotations`); empty unless asked.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CopiedMetadata {
    /// Labels to set on the delivered Secret.
    pub labels: BTreeMap<String, String>,
    /// Annotations to set on the delivered Secret.
    pub annotations: BTreeMap<String, String>,
}

/// Annotation prefixes never copied: client bookkeeping (which can hold a
/// full earlier copy of the Secret, data included) and our own policy.
const NEVER_COPIED_ANNOTATION_PREFIXES: [&str; 1] = ["kubectl.kubernetes.io/"];

impl CopiedMetadata {
    /// What `spec` asks to copy from `source`.
    pub fn from_source(spec: &FleetHandshakeSpec, source: &Secret) -> Self {
        let labels = match spec.copy_labels {
            Some(true) => source.metadata.labels.clone().unwrap_or_default(),
            _ => BTreeMap::new(),
        };
        let annotations = match spec.copy_annotations {
            Some(true) => source
                .metadata
                .annotations
                .iter()
                .flatten()
                .filter(|(key, _)| {
                    key.as_str() != ALLOWED_NAMESPACES_ANNOTATION
                        && !NEVER_COPIED_ANNOTATION_PREFIXES
                            .iter()
                            .any(|prefix| key.starts_with(prefix))
                })
                .map(|(key, value)| (key.clone(), value.clone()))
                .collect(),
            _ => BTreeMap::new(),
        };
        Self {
            labels,
            annotations,
        }
    }
}

/// Name of the single Bundle resource that carries the Secret manifest.
pub fn resource_name(secret_name: &str) -> String {
    format!("{secret_name}.json")
}

/// The Secret manifest (JSON text) a target cluster receives.
///
/// `stringData` is folded into `data` the way the API server does on write
/// (a `stringData` key wins over the same `data` key), so a Secret object
/// that was never stored renders like its stored form.
pub fn secret_manifest(
    source: &Secret,
    target_namespace: Option<&str>,
    copied: &CopiedMetadata,
) -> String {
    let data = folded_data(source);
    let manifest = SecretManifest {
        api_version: "v1",
        kind: "Secret",
        metadata: ManifestMetadata {
            name: source.metadata.name.as_deref().unwrap_or_default(),
            namespace: target_namespace.filter(|namespace| !namespace.is_empty()),
            labels: borrowed(&copied.labels),
            annotations: borrowed(&copied.annotations),
        },
        type_: source.type_.as_deref(),
        data: data
            .iter()
            .map(|(key, value)| (key.as_str(), value))
            .collect(),
        immutable: source.immutable,
    };
    let mut text =
        serde_json::to_string_pretty(&manifest).expect("a Secret manifest always serializes");
    text.push('\n');
    text
}

/// Longest label value the API server accepts.
const LABEL_VALUE_MAX: usize = 63;

/// The Secret's `data` with `stringData` folded in, as the API server
/// stores it (a `stringData` key wins over the same `data` key).
fn folded_data(source: &Secret) -> BTreeMap<String, ByteString> {
    let mut data = source.data.clone().unwrap_or_default();
    data.extend(
        source
            .string_data
            .iter()
            .flatten()
            .map(|(key, value)| (key.clone(), ByteString(value.clone().into_bytes()))),
    );
    data
}

fn borrowed(map: &BTreeMap<String, String>) -> BTreeMap<&str, &str> {
    map.iter()
        .map(|(key, value)| (key.as_str(), value.as_str()))
        .collect()
}

/// The delivery a handshake uses: its own choice, else the operator's.
pub fn effective_delivery(spec: &FleetHandshakeSpec, default: DeliveryMode) -> DeliveryMode {
    spec.delivery.unwrap_or(default)
}

/// Labels that mark a Bundle as rendered for `handshake_name`. A name longer
/// than a label value may be (names go up to 253 characters) gets no name
/// label; the owner reference still ties the Bundle to its handshake.
pub fn bundle_labels(handshake_name: &str) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::from([(MANAGED_BY_LABEL.to_string(), MANAGED_BY.to_string())]);
    if handshake_name.len() <= LABEL_VALUE_MAX {
        labels.insert(HANDSHAKE_LABEL.to_string(), handshake_name.to_string());
    }
    labels
}

/// Name, namespace and controller owner reference of the objects rendered
/// for a handshake.
struct Owner<'a> {
    name: &'a str,
    namespace: &'a str,
    reference: OwnerReference,
}

impl<'a> Owner<'a> {
    fn of(handshake: &'a FleetHandshake) -> Result<Self, RenderError> {
        let name = handshake
            .metadata
            .name
            .as_deref()
            .ok_or(RenderError::MissingMetadata("name"))?;
        let namespace = handshake
            .metadata
            .namespace
            .as_deref()
            .ok_or(RenderError::MissingMetadata("namespace"))?;
        // Garbage collection in foreground mode waits for owned objects.
        let reference = OwnerReference {
            block_owner_deletion: Some(true),
            ..handshake
                .controller_owner_ref(&())
                .ok_or(RenderError::MissingMetadata("uid"))?
        };
        Ok(Self {
            name,
            namespace,
            reference,
        })
    }

    fn metadata(&self, name: &str) -> ObjectMeta {
        ObjectMeta {
            name: Some(name.to_string()),
            namespace: Some(self.namespace.to_string()),
            labels: Some(bundle_labels(self.name)),
            owner_references: Some(vec![self.reference.clone()]),
            ..ObjectMeta::default()
        }
    }
}

/// The Bundle that delivers `source` as the handshake asks.
///
/// `Embedded`: one resource `<secretName>.json` holding the Secret manifest.
/// `DownstreamResources`: no resources; the Bundle names the Secret (the
/// source itself, or the copy from [`render_copy`]) and sends it to
/// `targetNamespace` as the default namespace.
pub fn render_bundle(
    handshake: &FleetHandshake,
    source: &Secret,
    delivery: DeliveryMode,
) -> Result<Bundle, RenderError> {
    let owner = Owner::of(handshake)?;
    let spec = &handshake.spec;
    let target_namespace = spec
        .target_namespace
        .as_deref()
        .filter(|namespace| !namespace.is_empty());
    let bundle_spec = match delivery {
        DeliveryMode::Embedded => BundleSpec {
            resources: vec![BundleResource {
                name: resource_name(&spec.secret_name),
                content: secret_manifest(
                    source,
                    target_namespace,
                    &CopiedMetadata::from_source(spec, source),
                ),
                encoding: String::new(),
            }],
            targets: spec.targets.clone(),
            ..BundleSpec::default()
        },
        DeliveryMode::DownstreamResources => BundleSpec {
            downstream_resources: vec![DownstreamResource {
                kind: "Secret".to_string(),
                name: spec.secret_name.clone(),
            }],
            targets: spec.targets.clone(),
            extra: target_namespace
                .map(|namespace| {
                    (
                        "defaultNamespace".to_string(),
                        serde_json::Value::from(namespace),
                    )
                })
                .into_iter()
                .collect(),
            ..BundleSpec::default()
        },
    };
    Ok(Bundle {
        metadata: owner.metadata(owner.name),
        spec: bundle_spec,
        status: None,
    })
}

/// For `DownstreamResources` delivery of a Secret from another namespace:
/// the copy Fleet reads in the handshake's namespace (same name as the
/// source, since Fleet delivers it under its own name). Only name, type and
/// data are copied, as Fleet itself copies no more. `None` when no copy is
/// needed.
pub fn render_copy(
    handshake: &FleetHandshake,
    source: &Secret,
    delivery: DeliveryMode,
) -> Result<Option<Secret>, RenderError> {
    let owner = Owner::of(handshake)?;
    let same_namespace = source.metadata.namespace.as_deref() == Some(owner.namespace);
    if delivery != DeliveryMode::DownstreamResources || same_namespace {
        return Ok(None);
    }
    Ok(Some(Secret {
        metadata: owner.metadata(&handshake.spec.secret_name),
        type_: source.type_.clone(),
        data: Some(folded_data(source)),
        ..Secret::default()
    }))
}

/// Whether the observed copy holds exactly the desired data and type, and
/// carries our labels and owner reference.
pub fn copy_is_up_to_date(desired: &Secret, observed: &Secret) -> bool {
    desired.data.as_ref().unwrap_or(&BTreeMap::new())
        == observed.data.as_ref().unwrap_or(&BTreeMap::new())
        && desired.type_ == observed.type_
        && metadata_present(desired, observed)
}

/// Whether `object` is controlled by `handshake` (a controller owner
/// reference with the handshake's uid). An object of the same name that is
/// not is someone else's and must never be overwritten.
pub fn is_controlled_by<K: Resource>(object: &K, handshake: &FleetHandshake) -> bool {
    let Some(uid) = handshake.metadata.uid.as_deref() else {
        return false;
    };
    object
        .owner_references()
        .iter()
        .any(|owner| owner.controller == Some(true) && owner.uid == uid)
}

/// Whether the observed Bundle already carries everything the desired one
/// sets. Fields the API server or Fleet add (defaults such as
/// `targetCustomizationMode`, status, other owners' labels) do not count as
/// a difference; a changed or removed field that we set does.
pub fn is_up_to_date(desired: &Bundle, observed: &Bundle) -> bool {
    let spec_contained = match (
        serde_json::to_value(&desired.spec),
        serde_json::to_value(&observed.spec),
    ) {
        (Ok(desired), Ok(observed)) => json_contained(&desired, &observed),
        _ => false,
    };
    metadata_present(desired, observed) && spec_contained
}

/// The observed object carries every label and owner reference we set.
fn metadata_present<K: Resource>(desired: &K, observed: &K) -> bool {
    let labels_present = desired
        .labels()
        .iter()
        .all(|(key, value)| observed.labels().get(key) == Some(value));
    let owners_present = desired
        .owner_references()
        .iter()
        .all(|owner| observed.owner_references().contains(owner));
    labels_present && owners_present
}

/// `desired` is contained in `observed`: every object key of `desired` is
/// present with a contained value; arrays must have the same length and be
/// contained element by element (lists we set are replaced whole by an
/// apply, so an extra element is a difference); scalars must be equal.
fn json_contained(desired: &serde_json::Value, observed: &serde_json::Value) -> bool {
    use serde_json::Value;
    match (desired, observed) {
        (Value::Object(desired), Value::Object(observed)) => desired.iter().all(|(key, value)| {
            observed
                .get(key)
                .is_some_and(|observed| json_contained(value, observed))
        }),
        (Value::Array(desired), Value::Array(observed)) => {
            desired.len() == observed.len()
                && desired
                    .iter()
                    .zip(observed)
                    .all(|(desired, observed)| json_contained(desired, observed))
        }
        (desired, observed) => desired == observed,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use k8s_openapi::ByteString;
    use k8s_openapi::api::core::v1::Secret;
    use serde_json::{Value, json};

    use super::*;
    use crate::api::{BundleTarget, FleetHandshakeSpec};

    const UID: &str = "6f2c1e7a-0d3b-4c55-9a51-2f5f3e0c9b11";

    fn handshake_with(target_namespace: Option<&str>, targets: Value) -> FleetHandshake {
        let mut spec = json!({
            "secretName": "my-secret",
            "secretNamespace": "default",
            "targets": targets,
        });
        if let Some(namespace) = target_namespace {
            spec["targetNamespace"] = json!(namespace);
        }
        serde_json::from_value(json!({
            "apiVersion": "riverpointtechnology.com/v1alpha1",
            "kind": "FleetHandshake",
            "metadata": {
                "name": "my-handshake",
                "namespace": "fleet-default",
                "uid": UID,
                "generation": 3,
                "resourceVersion": "4711",
            },
            "spec": spec,
        }))
        .expect("a valid handshake")
    }

    fn handshake() -> FleetHandshake {
        handshake_with(
            Some("test"),
            json!([{"clusterSelector": {"matchLabels": {"env": "dev"}}}]),
        )
    }

    fn secret(value: Value) -> Secret {
        serde_json::from_value(value).expect("a valid Secret")
    }

    /// A stored Secret carrying every kind of server-managed and
    /// user-managed metadata that must not travel downstream.
    fn loaded_source() -> Secret {
        secret(json!({
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {
                "name": "my-secret",
                "namespace": "default",
                "generateName": "my-",
                "uid": "0a0a0a0a-1111-2222-3333-444444444444",
                "resourceVersion": "99",
                "generation": 1,
                "creationTimestamp": "2024-05-01T10:00:00Z",
                "labels": {"team": "payments"},
                "annotations": {
                    "kubectl.kubernetes.io/last-applied-configuration":
                        "{\"apiVersion\":\"v1\",\"data\":{\"password\":\"c2VjcmV0\"}}",
                    "note": "hello",
                },
                "finalizers": ["example.com/keep"],
                "ownerReferences": [{
                    "apiVersion": "apps/v1",
                    "kind": "Deployment",
                    "name": "owner",
                    "uid": "9d9d9d9d-0000-0000-0000-000000000000",
                    "controller": true,
                }],
                "managedFields": [{
                    "manager": "kubectl",
                    "operation": "Apply",
                    "apiVersion": "v1",
                    "fieldsType": "FieldsV1",
                    "fieldsV1": {"f:data": {"f:password": {}}},
                }],
            },
            "type": "Opaque",
            "data": {"password": "c2VjcmV0", "user": "YWRtaW4="},
        }))
    }

    fn render(handshake: &FleetHandshake, source: &Secret) -> Bundle {
        render_bundle(handshake, source, DeliveryMode::Embedded).expect("renders")
    }

    /// The single resource's content, parsed.
    fn manifest_of(bundle: &Bundle) -> Value {
        assert_eq!(bundle.spec.resources.len(), 1, "exactly one resource");
        serde_json::from_str(&bundle.spec.resources[0].content).expect("content is JSON")
    }

    fn keys(value: &Value) -> BTreeSet<&str> {
        value
            .as_object()
            .expect("an object")
            .keys()
            .map(String::as_str)
            .collect()
    }

    fn set(items: &[&'static str]) -> BTreeSet<&'static str> {
        items.iter().copied().collect()
    }

    fn decode(value: &Value) -> Vec<u8> {
        serde_json::from_value::<ByteString>(value.clone())
            .expect("base64")
            .0
    }

    fn bytes(data: &[(&str, &[u8])]) -> BTreeMap<String, ByteString> {
        data.iter()
            .map(|(key, value)| (key.to_string(), ByteString(value.to_vec())))
            .collect()
    }

    fn plain_secret(data: BTreeMap<String, ByteString>) -> Secret {
        Secret {
            metadata: ObjectMeta {
                name: Some("my-secret".to_string()),
                namespace: Some("default".to_string()),
                ..ObjectMeta::default()
            },
            data: Some(data),
            ..Secret::default()
        }
    }

    fn wire(bundle: &Bundle) -> Value {
        serde_json::to_value(bundle).expect("serializes")
    }

    /// Applies `edit` to the JSON form of `bundle`.
    fn edited(bundle: &Bundle, edit: impl FnOnce(&mut Value)) -> Bundle {
        let mut value = serde_json::to_value(bundle).expect("serializes");
        edit(&mut value);
        serde_json::from_value(value).expect("still a Bundle")
    }

    // ---- metadata -------------------------------------------------------

    #[test]
    fn bundle_takes_name_and_namespace_of_the_handshake() {
        let bundle = render(&handshake(), &loaded_source());
        assert_eq!(bundle.metadata.name.as_deref(), Some("my-handshake"));
        assert_eq!(bundle.metadata.namespace.as_deref(), Some("fleet-default"));
        assert!(bundle.status.is_none());
        // Nothing server-managed is copied from the handshake.
        assert!(bundle.metadata.uid.is_none());
        assert!(bundle.metadata.resource_version.is_none());
        assert!(bundle.metadata.generation.is_none());
        assert!(bundle.metadata.annotations.is_none());
    }

    #[test]
    fn bundle_is_labelled_as_managed_for_the_handshake() {
        let bundle = render(&handshake(), &loaded_source());
        let expected = BTreeMap::from([
            (
                "app.kubernetes.io/managed-by".to_string(),
                "fleet-handshake".to_string(),
            ),
            (
                "riverpointtechnology.com/fleethandshake".to_string(),
                "my-handshake".to_string(),
            ),
        ]);
        assert_eq!(bundle.metadata.labels, Some(expected));
    }

    #[test]
    fn bundle_has_exactly_one_controller_owner_reference_to_the_handshake() {
        let bundle = render(&handshake(), &loaded_source());
        let owners = bundle.owner_references();
        assert_eq!(owners.len(), 1);
        let owner = &owners[0];
        assert_eq!(owner.api_version, "riverpointtechnology.com/v1alpha1");
        assert_eq!(owner.kind, "FleetHandshake");
        assert_eq!(owner.name, "my-handshake");
        assert_eq!(owner.uid, UID);
        assert_eq!(owner.controller, Some(true));
        assert_eq!(owner.block_owner_deletion, Some(true));
        // The wire form as the API server receives it.
        let wire = serde_json::to_value(&bundle).unwrap();
        assert_eq!(
            wire["metadata"]["ownerReferences"],
            json!([{
                "apiVersion": "riverpointtechnology.com/v1alpha1",
                "kind": "FleetHandshake",
                "name": "my-handshake",
                "uid": UID,
                "controller": true,
                "blockOwnerDeletion": true,
            }])
        );
    }

    #[test]
    fn bundle_wire_form_has_fleet_group_and_kind() {
        let wire = serde_json::to_value(render(&handshake(), &loaded_source())).unwrap();
        assert_eq!(wire["apiVersion"], "fleet.cattle.io/v1alpha1");
        assert_eq!(wire["kind"], "Bundle");
        assert_eq!(
            keys(&wire),
            set(&["apiVersion", "kind", "metadata", "spec"])
        );
        assert_eq!(keys(&wire["spec"]), set(&["resources", "targets"]));
    }

    #[test]
    fn rendering_needs_uid_name_and_namespace() {
        let source = loaded_source();

        let mut no_uid = handshake();
        no_uid.metadata.uid = None;
        assert_eq!(
            render_bundle(&no_uid, &source, DeliveryMode::Embedded).unwrap_err(),
            RenderError::MissingMetadata("uid")
        );

        let mut no_name = handshake();
        no_name.metadata.name = None;
        assert_eq!(
            render_bundle(&no_name, &source, DeliveryMode::Embedded).unwrap_err(),
            RenderError::MissingMetadata("name")
        );

        let mut no_namespace = handshake();
        no_namespace.metadata.namespace = None;
        assert_eq!(
            render_bundle(&no_namespace, &source, DeliveryMode::Embedded).unwrap_err(),
            RenderError::MissingMetadata("namespace")
        );

        assert_eq!(
            RenderError::MissingMetadata("uid").to_string(),
            "the handshake has no uid yet"
        );
    }

    // ---- the resource ---------------------------------------------------

    #[test]
    fn one_plain_json_resource_named_after_the_secret() {
        let bundle = render(&handshake(), &loaded_source());
        assert_eq!(bundle.spec.resources.len(), 1);
        let resource = &bundle.spec.resources[0];
        assert_eq!(resource.name, "my-secret.json");
        assert_eq!(resource.encoding, "");
        assert!(resource.content.ends_with('\n'));
        // The plain encoding is written explicitly, so that a changed
        // encoding is noticed and repaired.
        let wire = serde_json::to_value(&bundle).unwrap();
        assert_eq!(
            keys(&wire["spec"]["resources"][0]),
            set(&["name", "content", "encoding"])
        );
        assert_eq!(resource_name("a.b-c"), "a.b-c.json");
    }

    #[test]
    fn resource_name_follows_spec_secret_name_manifest_name_follows_source() {
        let mut handshake = handshake();
        handshake.spec.secret_name = "from-spec".to_string();
        let mut source = loaded_source();
        source.metadata.name = Some("from-source".to_string());
        let bundle = render(&handshake, &source);
        assert_eq!(bundle.spec.resources[0].name, "from-spec.json");
        assert_eq!(manifest_of(&bundle)["metadata"]["name"], "from-source");
    }

    #[test]
    fn content_is_the_secret_and_nothing_else() {
        let bundle = render(&handshake(), &loaded_source());
        let manifest = manifest_of(&bundle);
        assert_eq!(
            keys(&manifest),
            set(&["apiVersion", "kind", "metadata", "type", "data"])
        );
        assert_eq!(manifest["apiVersion"], "v1");
        assert_eq!(manifest["kind"], "Secret");
        assert_eq!(keys(&manifest["metadata"]), set(&["name", "namespace"]));
        assert_eq!(manifest["metadata"]["name"], "my-secret");
        assert_eq!(manifest["metadata"]["namespace"], "test");
        assert_eq!(manifest["type"], "Opaque");
        assert_eq!(keys(&manifest["data"]), set(&["password", "user"]));
        assert_eq!(decode(&manifest["data"]["password"]), b"secret");
        assert_eq!(decode(&manifest["data"]["user"]), b"admin");
        // Base64 on the wire, exactly as the API server spells it.
        assert_eq!(manifest["data"]["password"], "c2VjcmV0");

        let content = &bundle.spec.resources[0].content;
        for leaked in [
            "resourceVersion",
            "uid",
            "managedFields",
            "ownerReferences",
            "creationTimestamp",
            "labels",
            "annotations",
            "last-applied-configuration",
            "generateName",
            "finalizers",
            "payments",
            "Deployment",
            "kubectl",
            "2024-05-01",
        ] {
            assert!(!content.contains(leaked), "{leaked} leaked into {content}");
        }
    }

    #[test]
    fn content_parses_as_a_kubernetes_secret() {
        let bundle = render(&handshake(), &loaded_source());
        let copy: Secret =
            serde_json::from_str(&bundle.spec.resources[0].content).expect("a Secret");
        assert_eq!(copy.metadata.name.as_deref(), Some("my-secret"));
        assert_eq!(copy.metadata.namespace.as_deref(), Some("test"));
        assert_eq!(copy.type_.as_deref(), Some("Opaque"));
        assert_eq!(
            copy.data,
            Some(bytes(&[("password", b"secret"), ("user", b"admin")]))
        );
        assert_eq!(copy.immutable, None);
        assert_eq!(copy.string_data, None);
        assert_eq!(copy.metadata.labels, None);
        assert_eq!(copy.metadata.annotations, None);
    }

    #[test]
    fn namespace_is_left_out_when_target_namespace_is_unset_or_empty() {
        for target_namespace in [None, Some("")] {
            let handshake = handshake_with(target_namespace, json!([{"clusterName": "local"}]));
            let manifest = manifest_of(&render(&handshake, &loaded_source()));
            assert_eq!(
                keys(&manifest["metadata"]),
                set(&["name"]),
                "target namespace {target_namespace:?}"
            );
            // The source's namespace never leaks as a fallback.
            assert!(manifest["metadata"].get("namespace").is_none());
        }
        assert_eq!(
            secret_manifest(&loaded_source(), Some(""), &CopiedMetadata::default()),
            secret_manifest(&loaded_source(), None, &CopiedMetadata::default())
        );
    }

    #[test]
    fn type_is_left_out_when_the_source_has_none() {
        let manifest: Value = serde_json::from_str(&secret_manifest(
            &plain_secret(bytes(&[("k", b"v")])),
            None,
            &CopiedMetadata::default(),
        ))
        .unwrap();
        assert_eq!(
            keys(&manifest),
            set(&["apiVersion", "kind", "metadata", "data"])
        );
    }

    // ---- edge cases -----------------------------------------------------

    #[test]
    fn empty_data_renders_as_an_empty_map() {
        for source in [
            plain_secret(BTreeMap::new()),
            Secret {
                data: None,
                ..plain_secret(BTreeMap::new())
            },
        ] {
            let manifest: Value = serde_json::from_str(&secret_manifest(
                &source,
                Some("test"),
                &CopiedMetadata::default(),
            ))
            .unwrap();
            assert_eq!(
                manifest["data"],
                json!({}),
                "data must be present and empty"
            );
        }
    }

    #[test]
    fn every_byte_value_survives() {
        let all_bytes: Vec<u8> = (0..=255).collect();
        let mut reversed = all_bytes.clone();
        reversed.reverse();
        let source = plain_secret(bytes(&[
            ("all", &all_bytes),
            ("reversed", &reversed),
            ("nul", &[0]),
            ("invalid-utf8", &[0xc3, 0x28, 0xff, 0xfe]),
        ]));
        let manifest = manifest_of(&render(&handshake(), &source));
        assert_eq!(decode(&manifest["data"]["all"]), all_bytes);
        assert_eq!(decode(&manifest["data"]["reversed"]), reversed);
        assert_eq!(decode(&manifest["data"]["nul"]), vec![0]);
        assert_eq!(
            decode(&manifest["data"]["invalid-utf8"]),
            vec![0xc3, 0x28, 0xff, 0xfe]
        );
    }

    #[test]
    fn string_data_only_is_folded_into_data() {
        let source = secret(json!({
            "metadata": {"name": "my-secret"},
            "stringData": {"username": "admin", "password": "s3cr3t"},
        }));
        let manifest = manifest_of(&render(&handshake(), &source));
        assert!(manifest.get("stringData").is_none());
        assert_eq!(keys(&manifest["data"]), set(&["password", "username"]));
        assert_eq!(decode(&manifest["data"]["username"]), b"admin");
        assert_eq!(decode(&manifest["data"]["password"]), b"s3cr3t");
    }

    #[test]
    fn string_data_wins_over_the_same_data_key() {
        let source = secret(json!({
            "metadata": {"name": "my-secret"},
            "data": {"password": "b2xk", "kept": "a2VwdA=="},
            "stringData": {"password": "new", "added": "yes"},
        }));
        let manifest = manifest_of(&render(&handshake(), &source));
        assert_eq!(keys(&manifest["data"]), set(&["added", "kept", "password"]));
        assert_eq!(decode(&manifest["data"]["password"]), b"new");
        assert_eq!(decode(&manifest["data"]["kept"]), b"kept");
        assert_eq!(decode(&manifest["data"]["added"]), b"yes");
    }

    #[test]
    fn stored_and_unstored_forms_render_alike() {
        let unstored = secret(json!({
            "metadata": {"name": "my-secret"},
            "stringData": {"password": "secret"},
        }));
        let stored = secret(json!({
            "metadata": {"name": "my-secret"},
            "data": {"password": "c2VjcmV0"},
        }));
        assert_eq!(
            secret_manifest(&unstored, Some("test"), &CopiedMetadata::default()),
            secret_manifest(&stored, Some("test"), &CopiedMetadata::default())
        );
    }

    #[test]
    fn very_long_keys_are_kept_whole() {
        let long_key = "k".repeat(240) + ".example.conf";
        assert_eq!(long_key.len(), 253);
        let source = plain_secret(bytes(&[(long_key.as_str(), b"value")]));
        let manifest = manifest_of(&render(&handshake(), &source));
        assert_eq!(keys(&manifest["data"]), BTreeSet::from([long_key.as_str()]));
        assert_eq!(decode(&manifest["data"][&long_key]), b"value");
    }

    #[test]
    fn immutable_is_copied_only_when_set() {
        for (immutable, expected) in [
            (Some(true), Some(json!(true))),
            (Some(false), Some(json!(false))),
            (None, None),
        ] {
            let source = Secret {
                immutable,
                ..plain_secret(bytes(&[("k", b"v")]))
            };
            let manifest: Value =
                serde_json::from_str(&secret_manifest(&source, None, &CopiedMetadata::default()))
                    .unwrap();
            assert_eq!(manifest.get("immutable").cloned(), expected);
        }
    }

    #[test]
    fn tls_secrets_keep_type_and_keys() {
        let source = secret(json!({
            "metadata": {"name": "ingress-cert"},
            "type": "kubernetes.io/tls",
            "data": {
                "tls.crt": "LS0tLS1CRUdJTiBDRVJUSUZJQ0FURS0tLS0t",
                "tls.key": "LS0tLS1CRUdJTiBQUklWQVRFIEtFWS0tLS0t",
                "ca.crt": "Y2E=",
            },
        }));
        let manifest = manifest_of(&render(&handshake(), &source));
        assert_eq!(manifest["type"], "kubernetes.io/tls");
        assert_eq!(
            keys(&manifest["data"]),
            set(&["ca.crt", "tls.crt", "tls.key"])
        );
        assert_eq!(
            decode(&manifest["data"]["tls.crt"]),
            b"-----BEGIN CERTIFICATE-----"
        );
        assert_eq!(
            decode(&manifest["data"]["tls.key"]),
            b"-----BEGIN PRIVATE KEY-----"
        );
    }

    #[test]
    fn dockerconfigjson_secrets_keep_type_and_content() {
        let config = r#"{"auths":{"registry.example.com":{"auth":"dXNlcjpwYXNz"}}}"#;
        let source = secret(json!({
            "metadata": {"name": "pull-secret"},
            "type": "kubernetes.io/dockerconfigjson",
            "stringData": {".dockerconfigjson": config},
        }));
        let manifest = manifest_of(&render(&handshake(), &source));
        assert_eq!(manifest["type"], "kubernetes.io/dockerconfigjson");
        assert_eq!(keys(&manifest["data"]), set(&[".dockerconfigjson"]));
        assert_eq!(
            decode(&manifest["data"][".dockerconfigjson"]),
            config.as_bytes()
        );
    }

    #[test]
    fn template_syntax_and_unicode_are_kept_verbatim() {
        let template = "{{ .Values.password }} {{- include \"x\" . }} ${HOME} %s";
        let unicode = "pässwörd 🔑 密码 \u{0}\u{202e}";
        let source = secret(json!({
            "metadata": {"name": "my-secret"},
            "stringData": {"template": template, "unicode": unicode},
        }));
        let bundle = render(&handshake(), &source);
        let manifest = manifest_of(&bundle);
        assert_eq!(decode(&manifest["data"]["template"]), template.as_bytes());
        assert_eq!(decode(&manifest["data"]["unicode"]), unicode.as_bytes());
        // Values are base64 in the manifest, so Fleet's Helm templating of
        // the generated chart never sees a `{{`.
        assert!(!bundle.spec.resources[0].content.contains("{{"));
    }

    // ---- determinism ----------------------------------------------------

    #[test]
    fn rendering_twice_is_byte_identical() {
        let handshake = handshake();
        let source = loaded_source();
        let first = serde_json::to_vec(&render(&handshake, &source)).unwrap();
        let second = serde_json::to_vec(&render(&handshake, &source)).unwrap();
        assert_eq!(first, second);
    }

    #[test]
    fn insertion_order_of_keys_does_not_matter() {
        let keys: Vec<String> = (0..200).map(|index| format!("key-{index:03}")).collect();
        let entry = |key: &String| (key.clone(), ByteString(key.as_bytes().to_vec()));
        let forward: BTreeMap<_, _> = keys.iter().map(entry).collect();
        let backward: BTreeMap<_, _> = keys.iter().rev().map(entry).collect();
        let forward_text = keys
            .iter()
            .map(|key| format!("\"{key}\":\"{key}\""))
            .collect::<Vec<_>>()
            .join(",");
        let backward_text = keys
            .iter()
            .rev()
            .map(|key| format!("\"{key}\":\"{key}\""))
            .collect::<Vec<_>>()
            .join(",");
        let from_text = |text: &str| -> Secret {
            serde_json::from_str(&format!(
                r#"{{"metadata":{{"name":"my-secret"}},"stringData":{{{text}}}}}"#
            ))
            .unwrap()
        };

        // Targets with the same fields written in different orders.
        let targets_a: Vec<BundleTarget> = serde_json::from_str(
            r#"[{"clusterName":"a","helm":{"releaseName":"x","takeOwnership":true},"namespaceLabels":{"b":"2","a":"1"}}]"#,
        )
        .unwrap();
        let targets_b: Vec<BundleTarget> = serde_json::from_str(
            r#"[{"namespaceLabels":{"a":"1","b":"2"},"helm":{"takeOwnership":true,"releaseName":"x"},"clusterName":"a"}]"#,
        )
        .unwrap();
        let mut handshake_a = handshake();
        handshake_a.spec.targets = targets_a;
        let mut handshake_b = handshake();
        handshake_b.spec.targets = targets_b;

        let rendered = [
            render(&handshake_a, &plain_secret(forward)),
            render(&handshake_b, &plain_secret(backward)),
            render(&handshake_a, &from_text(&forward_text)),
            render(&handshake_b, &from_text(&backward_text)),
        ]
        .map(|bundle| serde_json::to_vec(&bundle).unwrap());
        for other in &rendered[1..] {
            assert_eq!(&rendered[0], other);
        }
        // The keys come out sorted.
        let manifest = manifest_of(&serde_json::from_slice(&rendered[0]).unwrap());
        let listed: Vec<&str> = manifest["data"]
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        let mut sorted = listed.clone();
        sorted.sort_unstable();
        assert_eq!(listed.len(), 200);
        assert_eq!(listed, sorted);
    }

    // ---- targets --------------------------------------------------------

    #[test]
    fn targets_are_copied_verbatim_including_unknown_fleet_fields() {
        let targets = json!([
            {
                "name": "dev",
                "clusterSelector": {
                    "matchLabels": {"env": "dev"},
                    "matchExpressions": [{"key": "tier", "operator": "In", "values": ["a", "b"]}],
                },
                "helm": {"releaseName": "x", "takeOwnership": true, "values": {"nested": [1, 2.5, null, "s"]}},
                "namespaceLabels": {"team": "payments"},
                "namespaceAnnotations": {"note": "kept"},
                "keepResources": true,
                "correctDrift": {"enabled": true, "force": false, "keepFailHistory": true},
                "defaultNamespace": "apps",
                "serviceAccount": "deployer",
                "someFutureFleetField": {"deeply": {"nested": ["value"]}},
            },
            {"clusterName": "local"},
            {"clusterGroup": "prod", "doNotDeploy": true},
            {"clusterGroupSelector": {"matchLabels": {"region": "eu"}}},
            {"clusterSelector": {}},
        ]);
        let handshake = handshake_with(Some("test"), targets.clone());
        let bundle = render(&handshake, &loaded_source());
        let wire = serde_json::to_value(&bundle).unwrap();
        assert_eq!(wire["spec"]["targets"], targets);
        assert_eq!(bundle.spec.targets, handshake.spec.targets);
        // And back through a read from the API server.
        let reread: Bundle = serde_json::from_value(wire).unwrap();
        assert_eq!(serde_json::to_value(&reread.spec.targets).unwrap(), targets);
    }

    // ---- is_controlled_by -----------------------------------------------

    fn with_owners(owners: Value) -> Bundle {
        serde_json::from_value(json!({
            "apiVersion": "fleet.cattle.io/v1alpha1",
            "kind": "Bundle",
            "metadata": {"name": "my-handshake", "namespace": "fleet-default", "ownerReferences": owners},
            "spec": {},
        }))
        .unwrap()
    }

    fn owner(uid: &str, controller: Option<bool>) -> Value {
        let mut owner = json!({
            "apiVersion": "riverpointtechnology.com/v1alpha1",
            "kind": "FleetHandshake",
            "name": "my-handshake",
            "uid": uid,
        });
        if let Some(controller) = controller {
            owner["controller"] = json!(controller);
        }
        owner
    }

    #[test]
    fn rendered_bundle_is_controlled_by_its_handshake() {
        let handshake = handshake();
        assert!(is_controlled_by(
            &render(&handshake, &loaded_source()),
            &handshake
        ));
    }

    #[test]
    fn controlled_only_by_a_controller_reference_with_the_same_uid() {
        let handshake = handshake();
        assert!(is_controlled_by(
            &with_owners(json!([owner(UID, Some(true))])),
            &handshake
        ));
        // Among other, non-controller owners.
        assert!(is_controlled_by(
            &with_owners(json!([owner("other", Some(false)), owner(UID, Some(true))])),
            &handshake
        ));
        assert!(!is_controlled_by(
            &with_owners(json!([owner(UID, Some(false))])),
            &handshake
        ));
        assert!(!is_controlled_by(
            &with_owners(json!([owner(UID, None)])),
            &handshake
        ));
        assert!(!is_controlled_by(
            &with_owners(json!([owner("another-uid", Some(true))])),
            &handshake
        ));
        assert!(!is_controlled_by(&with_owners(json!([])), &handshake));
        let mut unowned = with_owners(json!([]));
        unowned.metadata.owner_references = None;
        assert!(!is_controlled_by(&unowned, &handshake));
    }

    #[test]
    fn a_handshake_without_uid_controls_nothing() {
        let mut handshake = handshake();
        handshake.metadata.uid = None;
        assert!(!is_controlled_by(
            &with_owners(json!([owner(UID, Some(true))])),
            &handshake
        ));
        assert!(!is_controlled_by(
            &with_owners(json!([owner("", Some(true))])),
            &handshake
        ));
    }

    // ---- is_up_to_date --------------------------------------------------

    fn desired() -> Bundle {
        render(
            &handshake_with(
                Some("test"),
                json!([
                    {"clusterSelector": {"matchLabels": {"env": "dev"}}, "helm": {"releaseName": "x"}},
                    {"clusterName": "local"},
                ]),
            ),
            &loaded_source(),
        )
    }

    #[test]
    fn identical_bundle_is_up_to_date() {
        let desired = desired();
        assert!(is_up_to_date(&desired, &desired.clone()));
        assert!(is_up_to_date(&desired, &edited(&desired, |_| {})));
    }

    #[test]
    fn server_and_fleet_additions_do_not_count() {
        let desired = desired();
        let observed = edited(&desired, |bundle| {
            let metadata = &mut bundle["metadata"];
            metadata["uid"] = json!("b-uid");
            metadata["resourceVersion"] = json!("123");
            metadata["generation"] = json!(2);
            metadata["creationTimestamp"] = json!("2024-05-01T10:00:00Z");
            metadata["labels"]["fleet.cattle.io/commit"] = json!("abc");
            metadata["annotations"] = json!({"fleet.cattle.io/agent": "x"});
            metadata["finalizers"] = json!(["fleet.cattle.io/bundle-finalizer"]);
            metadata["ownerReferences"]
                .as_array_mut()
                .unwrap()
                .push(owner("someone-else", Some(false)));
            metadata["managedFields"] = json!([{
                "manager": "fleet-handshake",
                "operation": "Apply",
                "apiVersion": "fleet.cattle.io/v1alpha1",
                "fieldsType": "FieldsV1",
                "fieldsV1": {"f:spec": {}},
            }]);
            let spec = &mut bundle["spec"];
            spec["targetCustomizationMode"] = json!("FirstMatch");
            spec["defaultNamespace"] = json!("default");
            spec["targets"][1]["namespace"] = json!("defaulted");
            bundle["status"] = json!({
                "observedGeneration": 2,
                "summary": {"desiredReady": 1, "ready": 1},
                "display": {"readyClusters": "1/1"},
            });
        });
        assert_ne!(wire(&observed), wire(&desired));
        assert!(is_up_to_date(&desired, &observed));
    }

    #[test]
    fn fields_we_never_set_are_not_compared() {
        // A server-side apply of the desired Bundle would not remove fields
        // another manager owns, so they must not make it look outdated
        // (otherwise every reconcile would re-apply).
        let desired = desired();
        let observed = edited(&desired, |bundle| {
            bundle["spec"]["paused"] = json!(true);
        });
        assert!(is_up_to_date(&desired, &observed));
    }

    #[test]
    fn changes_to_what_we_set_count() {
        let desired = desired();
        type Edit = Box<dyn FnOnce(&mut Value)>;
        let cases: Vec<(&str, Edit)> = vec![
            (
                "resource content changed",
                Box::new(|b| b["spec"]["resources"][0]["content"] = json!("{}\n")),
            ),
            (
                "resource renamed",
                Box::new(|b| b["spec"]["resources"][0]["name"] = json!("other.json")),
            ),
            (
                "extra resource",
                Box::new(|b| {
                    b["spec"]["resources"]
                        .as_array_mut()
                        .unwrap()
                        .push(json!({"name": "extra.yaml", "content": "a: b"}))
                }),
            ),
            (
                "resources removed",
                Box::new(|b| {
                    b["spec"].as_object_mut().unwrap().remove("resources");
                }),
            ),
            (
                "target selector changed",
                Box::new(|b| {
                    b["spec"]["targets"][0]["clusterSelector"]["matchLabels"]["env"] = json!("prod")
                }),
            ),
            (
                "unknown target field changed",
                Box::new(|b| b["spec"]["targets"][0]["helm"]["releaseName"] = json!("y")),
            ),
            (
                "target added",
                Box::new(|b| {
                    b["spec"]["targets"]
                        .as_array_mut()
                        .unwrap()
                        .push(json!({"clusterName": "extra"}))
                }),
            ),
            (
                "target removed",
                Box::new(|b| {
                    b["spec"]["targets"].as_array_mut().unwrap().pop();
                }),
            ),
            (
                "targets reordered",
                Box::new(|b| b["spec"]["targets"].as_array_mut().unwrap().reverse()),
            ),
            (
                "managed-by label removed",
                Box::new(|b| {
                    b["metadata"]["labels"]
                        .as_object_mut()
                        .unwrap()
                        .remove(MANAGED_BY_LABEL);
                }),
            ),
            (
                "handshake label changed",
                Box::new(|b| b["metadata"]["labels"][HANDSHAKE_LABEL] = json!("other")),
            ),
            (
                "all labels removed",
                Box::new(|b| {
                    b["metadata"].as_object_mut().unwrap().remove("labels");
                }),
            ),
            (
                "owner reference removed",
                Box::new(|b| b["metadata"]["ownerReferences"] = json!([])),
            ),
            (
                "owner reference no longer controller",
                Box::new(|b| b["metadata"]["ownerReferences"][0]["controller"] = json!(false)),
            ),
        ];
        for (what, edit) in cases {
            let observed = edited(&desired, edit);
            assert!(!is_up_to_date(&desired, &observed), "{what}");
        }
    }

    #[test]
    fn a_changed_source_makes_the_bundle_outdated() {
        let handshake = handshake();
        let before = render(&handshake, &loaded_source());
        let mut changed = loaded_source();
        changed
            .data
            .as_mut()
            .unwrap()
            .insert("password".to_string(), ByteString(b"rotated".to_vec()));
        let after = render(&handshake, &changed);
        assert!(!is_up_to_date(&after, &before));
        // Metadata changes on the source alone change nothing.
        let mut relabelled = loaded_source();
        relabelled.metadata.resource_version = Some("100".to_string());
        relabelled.metadata.labels = Some(BTreeMap::from([("a".to_string(), "b".to_string())]));
        assert!(is_up_to_date(&render(&handshake, &relabelled), &before));
        assert_eq!(wire(&render(&handshake, &relabelled)), wire(&before));
    }

    #[test]
    fn a_changed_spec_makes_the_bundle_outdated() {
        let before = render(&handshake(), &loaded_source());
        let mut moved = handshake();
        moved.spec = FleetHandshakeSpec {
            target_namespace: Some("elsewhere".to_string()),
            ..moved.spec.clone()
        };
        assert!(!is_up_to_date(&render(&moved, &loaded_source()), &before));
    }

    #[test]
    fn a_name_too_long_for_a_label_value_gets_no_name_label() {
        let long = "a".repeat(64);
        let labels = bundle_labels(&long);
        assert_eq!(
            labels.get(MANAGED_BY_LABEL).map(String::as_str),
            Some(MANAGED_BY)
        );
        assert!(!labels.contains_key(HANDSHAKE_LABEL));
        let fits = "a".repeat(63);
        assert_eq!(bundle_labels(&fits).get(HANDSHAKE_LABEL), Some(&fits));
    }

    #[test]
    fn an_encoding_set_by_someone_else_is_a_difference() {
        let desired =
            render_bundle(&handshake(), &loaded_source(), DeliveryMode::Embedded).unwrap();
        let mut observed = desired.clone();
        observed.spec.resources[0].encoding = "base64".to_string();
        assert!(!is_up_to_date(&desired, &observed));
        let wire = serde_json::to_value(&desired.spec).unwrap();
        assert_eq!(
            wire["resources"][0]["encoding"],
            json!(""),
            "the plain encoding is written explicitly"
        );
    }
}
