//! Renders the desired Bundle of a handshake from its source Secret.
//!
//! Pure and deterministic: the same handshake and Secret always give the
//! same Bundle, byte for byte, so comparing desired with observed state is
//! meaningful and the operator never writes without a change.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::ObjectMeta;
use kube::{Resource, ResourceExt};
use serde::Serialize;

use crate::api::{Bundle, BundleResource, BundleSpec, FleetHandshake};

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
pub fn secret_manifest(source: &Secret, target_namespace: Option<&str>) -> String {
    let string_data: BTreeMap<&str, ByteString> = source
        .string_data
        .iter()
        .flatten()
        .map(|(key, value)| (key.as_str(), ByteString(value.clone().into_bytes())))
        .collect();
    let mut data: BTreeMap<&str, &ByteString> = source
        .data
        .iter()
        .flatten()
        .map(|(key, value)| (key.as_str(), value))
        .collect();
    data.extend(string_data.iter().map(|(key, value)| (*key, value)));

    let manifest = SecretManifest {
        api_version: "v1",
        kind: "Secret",
        metadata: ManifestMetadata {
            name: source.metadata.name.as_deref().unwrap_or_default(),
            namespace: target_namespace.filter(|namespace| !namespace.is_empty()),
        },
        type_: source.type_.as_deref(),
        data,
        immutable: source.immutable,
    };
    let mut text =
        serde_json::to_string_pretty(&manifest).expect("a Secret manifest always serializes");
    text.push('\n');
    text
}

/// Labels that mark a Bundle as rendered for `handshake_name`.
pub fn bundle_labels(handshake_name: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (MANAGED_BY_LABEL.to_string(), MANAGED_BY.to_string()),
        (HANDSHAKE_LABEL.to_string(), handshake_name.to_string()),
    ])
}

/// The Bundle that delivers `source` as the handshake asks.
pub fn render_bundle(handshake: &FleetHandshake, source: &Secret) -> Result<Bundle, RenderError> {
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
    let owner = handshake
        .controller_owner_ref(&())
        .ok_or(RenderError::MissingMetadata("uid"))?;
    let secret_name = &handshake.spec.secret_name;

    let resource = BundleResource {
        name: resource_name(secret_name),
        content: secret_manifest(source, handshake.spec.target_namespace.as_deref()),
        encoding: String::new(),
    };
    Ok(Bundle {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            namespace: Some(namespace.to_string()),
            labels: Some(bundle_labels(name)),
            owner_references: Some(vec![owner]),
            ..ObjectMeta::default()
        },
        spec: BundleSpec {
            resources: vec![resource],
            targets: handshake.spec.targets.clone(),
            ..BundleSpec::default()
        },
        status: None,
    })
}

/// Whether `bundle` is controlled by `handshake` (a controller owner
/// reference with the handshake's uid). A Bundle of the same name that is not
/// is someone else's and must never be overwritten.
pub fn is_controlled_by(bundle: &Bundle, handshake: &FleetHandshake) -> bool {
    let Some(uid) = handshake.metadata.uid.as_deref() else {
        return false;
    };
    bundle
        .owner_references()
        .iter()
        .any(|owner| owner.controller == Some(true) && owner.uid == uid)
}

/// Whether the observed Bundle already carries everything the desired one
/// sets. Fields the API server or Fleet add (defaults such as
/// `targetCustomizationMode`, status, other owners' labels) do not count as
/// a difference; a changed or removed field that we set does.
pub fn is_up_to_date(desired: &Bundle, observed: &Bundle) -> bool {
    let labels_present = desired
        .labels()
        .iter()
        .all(|(key, value)| observed.labels().get(key) == Some(value));
    let owners_present = desired
        .owner_references()
        .iter()
        .all(|owner| observed.owner_references().contains(owner));
    let spec_contained = match (
        serde_json::to_value(&desired.spec),
        serde_json::to_value(&observed.spec),
    ) {
        (Ok(desired), Ok(observed)) => json_contained(&desired, &observed),
        _ => false,
    };
    labels_present && owners_present && spec_contained
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
