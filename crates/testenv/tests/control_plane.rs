//! The harness against its real control plane: storage, controllers, RBAC,
//! CRD schemas and the audit log all behave like a cluster's.

use std::collections::BTreeMap;
use std::future::Future;
use std::time::{Duration, Instant};

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Secret};
use k8s_openapi::api::rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef, Subject};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::api::{Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use serde_json::json;
use testenv::{ControlPlane, ServiceAccountIdentity};

/// Generous bound for controller work; it usually takes a second or two.
const CONTROLLER_TIMEOUT: Duration = Duration::from_secs(60);

fn meta(name: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.to_string()),
        ..ObjectMeta::default()
    }
}

fn config_map(name: &str) -> ConfigMap {
    ConfigMap {
        metadata: meta(name),
        data: Some(BTreeMap::from([("key".to_string(), "value".to_string())])),
        ..ConfigMap::default()
    }
}

/// Polls `condition` every 250 ms until it holds or `timeout` passes.
async fn eventually<F, Fut>(timeout: Duration, mut condition: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if condition().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn status_code<T: std::fmt::Debug>(result: Result<T, kube::Error>) -> u16 {
    match result {
        Err(kube::Error::Api(status)) => status.code,
        other => panic!("expected an API error status, got {other:?}"),
    }
}

/// Grants ServiceAccount `identity` the verbs on configmaps in its namespace.
async fn grant_config_maps(
    admin: &kube::Client,
    identity: &ServiceAccountIdentity,
    verbs: &[&str],
) {
    let namespace = identity.namespace();
    let name = format!("{}-configmaps", identity.name());
    let role = Role {
        metadata: meta(&name),
        rules: Some(vec![PolicyRule {
            api_groups: Some(vec![String::new()]),
            resources: Some(vec!["configmaps".to_string()]),
            verbs: verbs.iter().map(|v| v.to_string()).collect(),
            ..PolicyRule::default()
        }]),
    };
    let binding = RoleBinding {
        metadata: meta(&name),
        role_ref: RoleRef {
            api_group: Some("rbac.authorization.k8s.io".to_string()),
            kind: "Role".to_string(),
            name: name.clone(),
        },
        subjects: Some(vec![Subject {
            kind: "ServiceAccount".to_string(),
            name: identity.name().to_string(),
            namespace: Some(namespace.to_string()),
            ..Subject::default()
        }]),
    };
    Api::<Role>::namespaced(admin.clone(), namespace)
        .create(&PostParams::default(), &role)
        .await
        .expect("creating Role");
    Api::<RoleBinding>::namespaced(admin.clone(), namespace)
        .create(&PostParams::default(), &binding)
        .await
        .expect("creating RoleBinding");
}

#[tokio::test]
async fn secret_with_binary_data_reads_back_identical() {
    let control_plane = ControlPlane::shared();
    let namespace = control_plane.create_namespace("secret").await;
    let secrets: Api<Secret> = Api::namespaced(control_plane.client().await, &namespace);

    // Every byte value, including NUL and invalid UTF-8.
    let payload: Vec<u8> = (0..=255u8).rev().chain(0..=255u8).collect();
    let secret = Secret {
        metadata: meta("binary"),
        data: Some(BTreeMap::from([(
            "payload.bin".to_string(),
            ByteString(payload.clone()),
        )])),
        ..Secret::default()
    };
    secrets
        .create(&PostParams::default(), &secret)
        .await
        .expect("creating Secret");

    let read = secrets.get("binary").await.expect("reading Secret");
    let data = read.data.expect("Secret data");
    assert_eq!(data["payload.bin"].0, payload);
}

#[tokio::test]
async fn dependents_of_a_deleted_owner_are_garbage_collected() {
    let control_plane = ControlPlane::shared();
    let namespace = control_plane.create_namespace("gc").await;
    let config_maps: Api<ConfigMap> = Api::namespaced(control_plane.client().await, &namespace);

    let owner = config_maps
        .create(&PostParams::default(), &config_map("owner"))
        .await
        .expect("creating owner");
    let mut dependent = config_map("dependent");
    dependent.metadata.owner_references = Some(vec![OwnerReference {
        api_version: "v1".to_string(),
        kind: "ConfigMap".to_string(),
        name: "owner".to_string(),
        uid: owner.metadata.uid.clone().expect("owner uid"),
        ..OwnerReference::default()
    }]);
    config_maps
        .create(&PostParams::default(), &dependent)
        .await
        .expect("creating dependent");

    config_maps
        .delete("owner", &DeleteParams::background())
        .await
        .expect("deleting owner");

    let collected = eventually(CONTROLLER_TIMEOUT, || async {
        matches!(config_maps.get_opt("dependent").await, Ok(None))
    })
    .await;
    assert!(collected, "dependent ConfigMap was not garbage collected");
}

#[tokio::test]
async fn namespace_deletion_completes() {
    let control_plane = ControlPlane::shared();
    let client = control_plane.client().await;
    let namespace = control_plane.create_namespace("doomed").await;
    // Content the namespace controller has to delete first, including a
    // custom resource so that CRD discovery is part of the cleanup.
    Api::<ConfigMap>::namespaced(client.clone(), &namespace)
        .create(&PostParams::default(), &config_map("content"))
        .await
        .expect("creating ConfigMap");
    Api::<DynamicObject>::namespaced_with(client.clone(), &namespace, &bundle_resource())
        .create(
            &PostParams::default(),
            &DynamicObject::new("content", &bundle_resource()).data(json!({"spec": {}})),
        )
        .await
        .expect("creating Bundle");

    let namespaces: Api<Namespace> = Api::all(client);
    namespaces
        .delete(&namespace, &DeleteParams::default())
        .await
        .expect("deleting namespace");

    let gone = eventually(CONTROLLER_TIMEOUT, || async {
        matches!(namespaces.get_opt(&namespace).await, Ok(None))
    })
    .await;
    assert!(gone, "namespace {namespace} was not finalized");
}

#[tokio::test]
async fn service_account_gets_exactly_what_its_role_grants() {
    let control_plane = ControlPlane::shared();
    let admin = control_plane.client().await;
    let namespace = control_plane.create_namespace("rbac").await;
    let identity = control_plane
        .service_account(&namespace, "reader")
        .await
        .expect("service account");
    grant_config_maps(&admin, &identity, &["get", "list"]).await;
    Api::<ConfigMap>::namespaced(admin.clone(), &namespace)
        .create(&PostParams::default(), &config_map("visible"))
        .await
        .expect("creating ConfigMap");

    // Go through the kubeconfig file, as a subprocess of a test would.
    let path = std::env::temp_dir().join(format!(
        "testenv-rbac-{}-{namespace}.kubeconfig",
        std::process::id()
    ));
    identity
        .write_kubeconfig(&path)
        .expect("writing kubeconfig");
    let kubeconfig = Kubeconfig::read_from(&path).expect("reading kubeconfig");
    std::fs::remove_file(&path).expect("removing kubeconfig");
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .expect("loading kubeconfig");
    assert_eq!(config.default_namespace, namespace);
    let client = kube::Client::try_from(config).expect("client");

    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), &namespace);
    let listed = config_maps
        .list(&Default::default())
        .await
        .expect("list allowed");
    assert_eq!(listed.items.len(), 1);
    config_maps.get("visible").await.expect("get allowed");

    assert_eq!(
        status_code(
            config_maps
                .create(&PostParams::default(), &config_map("forbidden"))
                .await
        ),
        403
    );
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &namespace);
    assert_eq!(status_code(secrets.list(&Default::default()).await), 403);
    let elsewhere: Api<ConfigMap> = Api::namespaced(client, "default");
    assert_eq!(status_code(elsewhere.list(&Default::default()).await), 403);
}

fn bundle_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("fleet.cattle.io", "v1alpha1", "Bundle"),
        "bundles",
    )
}

#[tokio::test]
async fn fleet_bundle_is_accepted_and_unknown_fields_are_pruned() {
    let control_plane = ControlPlane::shared();
    let namespace = control_plane.create_namespace("bundle").await;
    let bundles: Api<DynamicObject> =
        Api::namespaced_with(control_plane.client().await, &namespace, &bundle_resource());

    let resources = json!([{
        "name": "configmap.yaml",
        "content": "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: demo\ndata:\n  a: b\n",
    }]);
    let targets = json!([{
        "name": "dev",
        "clusterSelector": {"matchLabels": {"env": "dev"}},
    }]);
    let bundle = DynamicObject::new("demo", &bundle_resource()).data(json!({
        "spec": {
            "defaultNamespace": "demo",
            "resources": resources,
            "targets": targets,
            "notInFleetSchema": "dropped",
        }
    }));
    bundles
        .create(&PostParams::default(), &bundle)
        .await
        .expect("creating Bundle");

    let read = bundles.get("demo").await.expect("reading Bundle");
    let spec = &read.data["spec"];
    assert_eq!(spec["resources"], resources);
    assert_eq!(spec["targets"], targets);
    assert_eq!(spec["defaultNamespace"], "demo");
    assert!(
        spec.get("notInFleetSchema").is_none(),
        "unknown field survived: {spec}"
    );
}

#[tokio::test]
async fn audit_log_attributes_writes_to_the_service_account() {
    let control_plane = ControlPlane::shared();
    let admin = control_plane.client().await;
    let namespace = control_plane.create_namespace("audit").await;
    let (client, identity) = control_plane
        .service_account_client(&namespace, "writer")
        .await
        .expect("service account client");
    grant_config_maps(&admin, &identity, &["get", "create"]).await;
    let username = identity.username();
    assert_eq!(
        username,
        format!("system:serviceaccount:{namespace}:writer")
    );

    let config_maps: Api<ConfigMap> = Api::namespaced(client, &namespace);
    // A read first: the policy must not record it.
    assert_eq!(status_code(config_maps.get("written").await), 404);
    config_maps
        .create(&PostParams::default(), &config_map("written"))
        .await
        .expect("creating ConfigMap as the service account");

    // Events are written right after the response, so allow a moment.
    let mut writes = Vec::new();
    let found = eventually(Duration::from_secs(10), || {
        writes = control_plane
            .writes_by(&username)
            .expect("reading audit log");
        std::future::ready(!writes.is_empty())
    })
    .await;
    assert!(found, "no audit event for {username}");

    assert_eq!(writes.len(), 1, "exactly one write expected: {writes:#?}");
    let event = &writes[0];
    assert_eq!(event.verb, "create");
    assert_eq!(event.stage, "ResponseComplete");
    assert_eq!(event.code(), Some(201));
    let object = event.object_ref.as_ref().expect("objectRef");
    assert_eq!(object.resource.as_deref(), Some("configmaps"));
    assert_eq!(object.namespace.as_deref(), Some(namespace.as_str()));
    assert_eq!(object.name.as_deref(), Some("written"));

    // The admin's own writes in this test are attributed to the admin.
    let admin_writes = control_plane.writes_by("admin").expect("reading audit log");
    assert!(admin_writes.iter().any(|e| {
        e.verb == "create"
            && e.object_ref.as_ref().and_then(|o| o.resource.as_deref()) == Some("rolebindings")
            && e.object_ref.as_ref().and_then(|o| o.namespace.as_deref())
                == Some(namespace.as_str())
    }));
}
