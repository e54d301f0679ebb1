//! Secure by default, on the real control plane: no confused deputy, secret
//! values never leave Secret objects except into the Bundle asked for,
//! Fleet-native delivery through `downstreamResources`, and content hygiene.

mod support;

use std::time::Duration;

use base64::Engine as _;
use fleet_handshake::api::{Bundle, FleetHandshake, SyncStatus};
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::core::{ApiResource, DynamicObject, GroupVersionKind};
use kube::{Api, Client, ResourceExt};
use serde_json::json;
use support::*;

const CONSENT: &str = "riverpointtechnology.com/handshake-allowed-namespaces";

/// The forms in which a value could leak: as is, base64-encoded as it sits
/// in a Secret's `data`, and as the byte list `Debug` prints for bytes.
fn leak_forms(value: &str) -> [String; 3] {
    let bytes = format!("{:?}", value.as_bytes());
    [
        value.to_string(),
        base64::engine::general_purpose::STANDARD.encode(value),
        bytes
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string(),
    ]
}

fn assert_absent(haystack: &str, value: &str, place: &str) {
    for form in leak_forms(value) {
        assert!(
            !haystack.contains(&form),
            "{place} contains the secret value ({form})"
        );
    }
}

async fn secret_with(
    client: &Client,
    namespace: &str,
    name: &str,
    value: &str,
    consent: Option<&str>,
) -> Secret {
    let mut secret: Secret = serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": namespace},
        "type": "Opaque",
        "stringData": {"token": value},
    }))
    .unwrap();
    if let Some(consent) = consent {
        secret.metadata.annotations = Some([(CONSENT.to_string(), consent.to_string())].into());
    }
    replace_secret(client, &secret).await
}

fn handshake(
    name: &str,
    secret: &str,
    secret_namespace: &str,
    extra: serde_json::Value,
) -> FleetHandshake {
    let mut spec = json!({
        "secretName": secret, "secretNamespace": secret_namespace,
        "targetNamespace": "apps", "targets": [{"clusterSelector": {}}],
    });
    spec.as_object_mut()
        .unwrap()
        .extend(extra.as_object().cloned().unwrap_or_default());
    serde_json::from_value(json!({
        "apiVersion": "riverpointtechnology.com/v1alpha1", "kind": "FleetHandshake",
        "metadata": {"name": name}, "spec": spec,
    }))
    .unwrap()
}

/// Handshakes `embedded` and `copied` reading Secret `app` of `source`,
/// one for each delivery mode.
async fn create_both_deliveries(handshakes: &Api<FleetHandshake>, source: &str) {
    for (name, delivery) in [("embedded", "Embedded"), ("copied", "DownstreamResources")] {
        handshakes
            .create(
                &PostParams::default(),
                &handshake(name, "app", source, json!({ "delivery": delivery })),
            )
            .await
            .unwrap();
    }
}

/// Everything of the Bundles in `namespace`, as text.
async fn all_bundles_text(client: &Client, namespace: &str) -> String {
    let bundles = Api::<Bundle>::namespaced(client.clone(), namespace)
        .list(&ListParams::default())
        .await
        .unwrap();
    serde_json::to_string(&bundles.items).unwrap()
}

/// A tenant who may manage handshakes and read Bundles in `workspace`, and
/// nothing else.
async fn tenant(scenario: &Scenario) -> Client {
    let workspace = &scenario.workspace;
    let role: Role = serde_json::from_value(json!({
        "metadata": {"name": "tenant", "namespace": workspace},
        "rules": [
            {"apiGroups": ["riverpointtechnology.com"], "resources": ["fleethandshakes"], "verbs": ["get", "list", "watch", "create", "update", "patch", "delete"]},
            {"apiGroups": ["fleet.cattle.io"], "resources": ["bundles"], "verbs": ["get", "list", "watch"]},
        ],
    }))
    .unwrap();
    Api::<Role>::namespaced(scenario.admin.clone(), workspace)
        .create(&PostParams::default(), &role)
        .await
        .unwrap();
    let binding: RoleBinding = serde_json::from_value(json!({
        "metadata": {"name": "tenant", "namespace": workspace},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "tenant"},
        "subjects": [{"kind": "ServiceAccount", "name": "tenant", "namespace": workspace}],
    }))
    .unwrap();
    Api::<RoleBinding>::namespaced(scenario.admin.clone(), workspace)
        .create(&PostParams::default(), &binding)
        .await
        .unwrap();
    let (client, _) = scenario
        .control_plane
        .service_account_client(workspace, "tenant")
        .await
        .expect("a tenant identity");
    client
}

#[tokio::test]
async fn a_tenant_cannot_pull_another_namespaces_secret_through_a_handshake() {
    let scenario = Scenario::new(Setup::default()).await;
    let (admin, workspace, team_a) = (&scenario.admin, &scenario.workspace, &scenario.source);
    let tenant = tenant(&scenario).await;
    let canary = "canary-team-a-7d1f0c";
    secret_with(admin, team_a, "db", canary, None).await;
    secret_with(
        admin,
        team_a,
        "shared",
        "shared-value",
        Some("fleet-local, other"),
    )
    .await;
    let denied = Api::<Secret>::namespaced(tenant.clone(), team_a)
        .get("db")
        .await;
    assert!(
        matches!(&denied, Err(kube::Error::Api(status)) if status.code == 403),
        "the tenant cannot read team-a's Secrets directly"
    );

    let handshakes: Api<FleetHandshake> = Api::namespaced(tenant.clone(), workspace);
    let attempts = [
        ("plain", handshake("plain", "db", team_a, json!({}))),
        (
            "embedded",
            handshake(
                "embedded",
                "db",
                team_a,
                json!({"delivery": "Embedded", "copyLabels": true, "copyAnnotations": true}),
            ),
        ),
        (
            "downstream",
            handshake(
                "downstream",
                "db",
                team_a,
                json!({"delivery": "DownstreamResources"}),
            ),
        ),
        (
            "other-consent",
            handshake("other-consent", "shared", team_a, json!({})),
        ),
        (
            "no-target-ns",
            handshake("no-target-ns", "db", team_a, json!({"targetNamespace": ""})),
        ),
    ];
    for (name, attempt) in &attempts {
        handshakes
            .create(&PostParams::default(), attempt)
            .await
            .expect("the tenant may create handshakes");
        let refused = scenario.status_becomes(name, SyncStatus::Error).await;
        assert_eq!(
            condition(&refused, "Ready"),
            ("False", "SourceNotAllowed"),
            "{name}"
        );
        assert!(
            get_bundle(admin, workspace, name).await.is_none(),
            "{name} got a Bundle"
        );
    }

    // Approval cannot be carried over: consent for the workspace makes `db`
    // usable, then pointing the approved handshake at another Secret, or
    // withdrawing consent, withdraws the delivery.
    secret_with(admin, team_a, "db", canary, Some(workspace)).await;
    scenario.status_becomes("plain", SyncStatus::Pending).await;
    let approved = get_bundle(admin, workspace, "plain")
        .await
        .expect("the consented Secret is delivered");
    assert_eq!(
        delivered_value(&delivered_secret(&approved), "token").as_deref(),
        Some(canary)
    );
    secret_with(admin, team_a, "other", "other-team-a-value", None).await;
    handshakes
        .patch(
            "plain",
            &PatchParams::default(),
            &Patch::Merge(&json!({"spec": {"secretName": "other"}})),
        )
        .await
        .unwrap();
    scenario.status_becomes("plain", SyncStatus::Error).await;
    scenario.bundle_gone("plain").await;
    handshakes
        .patch(
            "plain",
            &PatchParams::default(),
            &Patch::Merge(&json!({"spec": {"secretName": "db"}})),
        )
        .await
        .unwrap();
    scenario.status_becomes("plain", SyncStatus::Pending).await;
    Api::<Secret>::namespaced(admin.clone(), team_a)
        .patch(
            "db",
            &PatchParams::default(),
            &Patch::Merge(&json!({"metadata": {"annotations": {CONSENT: null}}})),
        )
        .await
        .unwrap();
    let withdrawn = scenario.status_becomes("plain", SyncStatus::Error).await;
    assert_eq!(
        condition(&withdrawn, "Ready"),
        ("False", "SourceNotAllowed")
    );
    scenario.bundle_gone("plain").await;

    let readable = all_bundles_text(&tenant, workspace).await;
    assert_absent(&readable, canary, "a Bundle the tenant can read");
    assert_absent(
        &readable,
        "other-team-a-value",
        "a Bundle the tenant can read",
    );
    let copies = Api::<Secret>::namespaced(admin.clone(), workspace)
        .list(&ListParams::default())
        .await
        .unwrap();
    assert_absent(
        &serde_json::to_string(&copies.items).unwrap(),
        canary,
        "a Secret in the workspace",
    );
}

#[tokio::test]
async fn an_operator_grant_allows_exactly_its_pair_of_namespaces() {
    let control_plane = testenv::ControlPlane::shared();
    let admin = control_plane.client().await;
    // The grant names the namespaces, so they are created first.
    let workspace = control_plane.create_namespace("granted").await;
    let source = control_plane.create_namespace("grantor").await;
    let elsewhere = control_plane.create_namespace("not-granted").await;
    let identity = operator_identity(
        control_plane,
        Grant::Namespaces(&[&workspace, &source, &elsewhere]),
        &[],
    )
    .await;
    let watched = format!("{workspace},{source},{elsewhere}");
    let grant = format!("{workspace}={source}");
    let _operator = Operator::start(
        &identity,
        &["--namespace", &watched, "--allow-source", &grant],
    )
    .await;

    secret_with(&admin, &source, "granted", "granted-value", None).await;
    secret_with(&admin, &elsewhere, "not-granted", "not-granted-value", None).await;
    let handshakes: Api<FleetHandshake> = Api::namespaced(admin.clone(), &workspace);
    handshakes
        .create(
            &PostParams::default(),
            &handshake("granted", "granted", &source, json!({})),
        )
        .await
        .unwrap();
    handshakes
        .create(
            &PostParams::default(),
            &handshake("not-granted", "not-granted", &elsewhere, json!({})),
        )
        .await
        .unwrap();
    let status_of = |name: &'static str| {
        let admin = admin.clone();
        let workspace = workspace.clone();
        async move {
            get_handshake(&admin, &workspace, name)
                .await
                .and_then(|handshake| handshake.status)
                .and_then(|status| status.status)
        }
    };
    eventually("the granted pair to be delivered", WAIT, || async {
        (status_of("granted").await == Some(SyncStatus::Pending)).then_some(())
    })
    .await;
    eventually("the other pair to be refused", WAIT, || async {
        (status_of("not-granted").await == Some(SyncStatus::Error)).then_some(())
    })
    .await;
    assert!(
        get_bundle(&admin, &workspace, "not-granted")
            .await
            .is_none()
    );
}

#[tokio::test]
async fn secret_values_never_reach_logs_events_status_or_metrics() {
    let scenario = Scenario::new(Setup {
        secret_copies: true,
        ..Setup::default()
    })
    .await;
    let (admin, workspace, source) = (&scenario.admin, &scenario.workspace, &scenario.source);
    let canary = "canary-3f9a2be1-never-log-me";
    let rotated = "canary-rotated-5c0d77aa";
    secret_with(admin, source, "app", canary, Some(workspace)).await;
    let handshakes: Api<FleetHandshake> = Api::namespaced(admin.clone(), workspace);
    // Every path: delivered both ways, rotated, refused and missing.
    create_both_deliveries(&handshakes, source).await;
    scenario
        .status_becomes("embedded", SyncStatus::Pending)
        .await;
    scenario.status_becomes("copied", SyncStatus::Pending).await;
    secret_with(admin, source, "app", rotated, Some(workspace)).await;
    scenario
        .bundle_matching("embedded", "the rotated value", |bundle| {
            delivered_value(&delivered_secret(bundle), "token").as_deref() == Some(rotated)
        })
        .await;
    secret_with(admin, source, "app", rotated, None).await;
    scenario.status_becomes("embedded", SyncStatus::Error).await;
    Api::<Secret>::namespaced(admin.clone(), source)
        .delete("app", &DeleteParams::default())
        .await
        .unwrap();
    scenario
        .status_becomes("embedded", SyncStatus::Missing)
        .await;
    tokio::time::sleep(Duration::from_secs(2)).await;

    let logs = scenario.operator.logs();
    assert!(logs.contains("TRACE"), "the operator ran at trace level");
    let statuses =
        serde_json::to_string(&handshakes.list(&ListParams::default()).await.unwrap().items)
            .unwrap();
    let events = Api::<DynamicObject>::namespaced_with(
        admin.clone(),
        workspace,
        &ApiResource::from_gvk(&GroupVersionKind::gvk("events.k8s.io", "v1", "Event")),
    )
    .list(&ListParams::default())
    .await
    .unwrap();
    let events_text = serde_json::to_string(&events.items).unwrap();
    assert!(
        events_text.contains("SourceMissing"),
        "events were recorded: {events_text}"
    );
    for value in [canary, rotated] {
        assert_absent(&logs, value, "the operator log");
        assert_absent(&statuses, value, "a handshake");
        assert_absent(&events_text, value, "an event");
        assert_absent(&scenario.operator.metrics(), value, "the metrics");
    }
}

#[tokio::test]
async fn downstream_resources_delivery_keeps_data_in_secret_objects() {
    let scenario = Scenario::new(Setup {
        secret_copies: true,
        ..Setup::default()
    })
    .await;
    let (admin, workspace, source) = (&scenario.admin, &scenario.workspace, &scenario.source);
    let value = "downstream-value-81c2";
    secret_with(admin, source, "app", value, Some(workspace)).await;
    let handshakes: Api<FleetHandshake> = Api::namespaced(admin.clone(), workspace);
    let applied = handshakes
        .create(
            &PostParams::default(),
            &handshake(
                "app",
                "app",
                source,
                json!({"delivery": "DownstreamResources"}),
            ),
        )
        .await
        .unwrap();
    scenario.status_becomes("app", SyncStatus::Pending).await;

    let bundle = get_bundle(admin, workspace, "app").await.unwrap();
    assert!(bundle.spec.resources.is_empty());
    assert_eq!(
        serde_json::to_value(&bundle.spec.downstream_resources).unwrap(),
        json!([{"kind": "Secret", "name": "app"}])
    );
    assert_eq!(bundle.spec.extra["defaultNamespace"], "apps");
    assert_absent(
        &serde_json::to_string(&bundle).unwrap(),
        value,
        "the Bundle",
    );

    let copies: Api<Secret> = Api::namespaced(admin.clone(), workspace);
    let copy = copies.get("app").await.expect("the copy Fleet reads");
    assert_eq!(copy.data.as_ref().unwrap()["token"].0, value.as_bytes());
    assert!(
        copy.owner_references()
            .iter()
            .any(|owner| Some(&owner.uid) == applied.metadata.uid.as_ref())
    );
    assert!(
        copy.annotations().get(CONSENT).is_none(),
        "only name, type and data are copied"
    );

    // Rotation reaches the copy; a hand edit of the copy is repaired.
    secret_with(admin, source, "app", "rotated-81c2", Some(workspace)).await;
    let rotated = eventually("the copy to follow the source", WAIT, || async {
        copies
            .get_opt("app")
            .await
            .unwrap()
            .filter(|copy| copy.data.as_ref().unwrap()["token"].0 == b"rotated-81c2")
    })
    .await;
    copies
        .patch(
            "app",
            &PatchParams::default(),
            &Patch::Merge(&json!({"stringData": {"token": "tampered"}})),
        )
        .await
        .unwrap();
    eventually("the tampered copy to be repaired", WAIT, || async {
        copies
            .get_opt("app")
            .await
            .unwrap()
            .filter(|copy| copy.resource_version() != rotated.resource_version())
            .filter(|copy| copy.data.as_ref().unwrap()["token"].0 == b"rotated-81c2")
    })
    .await;

    // Switching to embedded delivery removes the copy.
    handshakes
        .patch(
            "app",
            &PatchParams::default(),
            &Patch::Merge(&json!({"spec": {"delivery": "Embedded"}})),
        )
        .await
        .unwrap();
    scenario
        .bundle_matching("app", "the embedded Bundle", |bundle| {
            bundle.spec.downstream_resources.is_empty() && bundle.spec.resources.len() == 1
        })
        .await;
    eventually("the copy to be removed", WAIT, || async {
        copies.get_opt("app").await.unwrap().is_none().then_some(())
    })
    .await;
}

#[tokio::test]
async fn downstream_resources_delivery_from_the_same_namespace_needs_no_copy_and_respects_foreign_secrets()
 {
    let scenario = Scenario::new(Setup {
        secret_copies: true,
        operator_args: &["--default-delivery", "DownstreamResources"],
    })
    .await;
    let (admin, workspace, source) = (&scenario.admin, &scenario.workspace, &scenario.source);
    let handshakes: Api<FleetHandshake> = Api::namespaced(admin.clone(), workspace);

    secret_with(admin, workspace, "local", "local-value", None).await;
    handshakes
        .create(
            &PostParams::default(),
            &handshake("local", "local", workspace, json!({})),
        )
        .await
        .unwrap();
    scenario.status_becomes("local", SyncStatus::Pending).await;
    let bundle = get_bundle(admin, workspace, "local").await.unwrap();
    assert_eq!(
        serde_json::to_value(&bundle.spec.downstream_resources).unwrap(),
        json!([{"kind": "Secret", "name": "local"}]),
        "the operator default applies"
    );
    let source_secret = Api::<Secret>::namespaced(admin.clone(), workspace)
        .get("local")
        .await
        .unwrap();
    assert!(
        source_secret.owner_references().is_empty(),
        "the source itself is referenced, not copied"
    );

    // A workspace Secret of the copy's name that is not ours is left alone.
    let foreign = secret_with(admin, workspace, "clash", "foreign-value", None).await;
    secret_with(admin, source, "clash", "source-value", Some(workspace)).await;
    handshakes
        .create(
            &PostParams::default(),
            &handshake("clash", "clash", source, json!({})),
        )
        .await
        .unwrap();
    let blocked = scenario.status_becomes("clash", SyncStatus::Error).await;
    assert_eq!(condition(&blocked, "Ready"), ("False", "CopyConflict"));
    assert!(
        get_bundle(admin, workspace, "clash").await.is_none(),
        "no Bundle names a Secret that is not ours"
    );
    let after = Api::<Secret>::namespaced(admin.clone(), workspace)
        .get("clash")
        .await
        .unwrap();
    assert_eq!(after.resource_version(), foreign.resource_version());
}

#[tokio::test]
async fn source_metadata_is_copied_only_when_asked_and_never_client_bookkeeping() {
    let scenario = Scenario::new(Setup::default()).await;
    let (admin, workspace, source) = (&scenario.admin, &scenario.workspace, &scenario.source);
    let secret: Secret = serde_json::from_value(json!({
        "metadata": {
            "name": "labelled", "namespace": source,
            "labels": {"team": "payments"},
            "annotations": {
                CONSENT: workspace,
                "kubectl.kubernetes.io/last-applied-configuration": "{\"data\":{\"token\":\"bGVha2Vk\"}}",
                "owner": "payments-team",
            },
        },
        "stringData": {"token": "value"},
    }))
    .unwrap();
    Api::<Secret>::namespaced(admin.clone(), source)
        .create(&PostParams::default(), &secret)
        .await
        .unwrap();
    let handshakes: Api<FleetHandshake> = Api::namespaced(admin.clone(), workspace);
    handshakes
        .create(
            &PostParams::default(),
            &handshake("bare", "labelled", source, json!({})),
        )
        .await
        .unwrap();
    handshakes
        .create(
            &PostParams::default(),
            &handshake(
                "dressed",
                "labelled",
                source,
                json!({"copyLabels": true, "copyAnnotations": true}),
            ),
        )
        .await
        .unwrap();
    scenario.status_becomes("bare", SyncStatus::Pending).await;
    scenario
        .status_becomes("dressed", SyncStatus::Pending)
        .await;

    let bare = delivered_secret(&get_bundle(admin, workspace, "bare").await.unwrap());
    assert_eq!(
        bare["metadata"],
        json!({"name": "labelled", "namespace": "apps"})
    );
    let dressed = delivered_secret(&get_bundle(admin, workspace, "dressed").await.unwrap());
    assert_eq!(
        dressed["metadata"],
        json!({"name": "labelled", "namespace": "apps", "labels": {"team": "payments"}, "annotations": {"owner": "payments-team"}})
    );
}

/// Permissions that no request names as its verb, each checked elsewhere:
/// `create` when a server-side apply patch creates the object (the request's
/// verb is `patch`), and `fleethandshakes/finalizers` `update` by the
/// OwnerReferencesPermissionEnforcement admission plugin when an owner
/// reference sets `blockOwnerDeletion`.
const NOT_A_REQUEST_VERB: [(&str, &str, &str); 3] = [
    ("fleet.cattle.io", "bundles", "create"),
    ("", "secrets", "create"),
    (
        "riverpointtechnology.com",
        "fleethandshakes/finalizers",
        "update",
    ),
];

/// (API group, resource[/subresource], verb) triples granted by the shipped
/// ClusterRoles.
fn shipped_permissions() -> std::collections::BTreeSet<(String, String, String)> {
    let text = std::fs::read_to_string(repo_root().join("deploy/rbac.yaml")).unwrap();
    let mut granted = std::collections::BTreeSet::new();
    for document in serde_yaml_ng::Deserializer::from_str(&text) {
        let role: k8s_openapi::api::rbac::v1::ClusterRole =
            serde::Deserialize::deserialize(document).unwrap();
        for rule in role.rules.unwrap_or_default() {
            for group in rule.api_groups.iter().flatten() {
                for resource in rule.resources.iter().flatten() {
                    for verb in &rule.verbs {
                        granted.insert((group.clone(), resource.clone(), verb.clone()));
                    }
                }
            }
        }
    }
    granted
}

#[tokio::test]
async fn the_shipped_rbac_is_exactly_what_the_operator_uses() {
    let scenario = Scenario::new(Setup {
        secret_copies: true,
        ..Setup::default()
    })
    .await;
    let (admin, workspace, source) = (&scenario.admin, &scenario.workspace, &scenario.source);
    let handshakes: Api<FleetHandshake> = Api::namespaced(admin.clone(), workspace);
    secret_with(admin, source, "app", "rbac-value", Some(workspace)).await;
    create_both_deliveries(&handshakes, source).await;
    // Every path twice, so repeated events are recorded as a series.
    for _ in 0..2 {
        scenario
            .status_becomes("embedded", SyncStatus::Pending)
            .await;
        scenario.status_becomes("copied", SyncStatus::Pending).await;
        Api::<Secret>::namespaced(admin.clone(), source)
            .delete("app", &DeleteParams::default())
            .await
            .unwrap();
        scenario
            .status_becomes("embedded", SyncStatus::Missing)
            .await;
        scenario.status_becomes("copied", SyncStatus::Missing).await;
        secret_with(admin, source, "app", "rbac-value", Some(workspace)).await;
    }
    scenario.status_becomes("copied", SyncStatus::Pending).await;
    tokio::time::sleep(Duration::from_secs(2)).await;

    let requests = scenario
        .control_plane
        .requests_by(&scenario.operator_user)
        .unwrap();
    let denied: Vec<_> = requests
        .iter()
        .filter(|request| request.code() == Some(403))
        .collect();
    assert!(
        denied.is_empty(),
        "the shipped RBAC lacks permissions: {denied:#?}"
    );
    let used: std::collections::BTreeSet<(String, String, String)> = requests
        .iter()
        .filter_map(|request| {
            let object = request.object_ref.as_ref()?;
            let resource = match &object.subresource {
                Some(subresource) => format!("{}/{subresource}", object.resource.as_deref()?),
                None => object.resource.clone()?,
            };
            Some((
                object.api_group.clone().unwrap_or_default(),
                resource,
                request.verb.clone(),
            ))
        })
        .collect();
    let mut granted = shipped_permissions();
    for (group, resource, verb) in NOT_A_REQUEST_VERB {
        assert!(granted.remove(&(group.to_string(), resource.to_string(), verb.to_string())));
    }
    let unused: Vec<_> = granted.difference(&used).collect();
    let ungranted: Vec<_> = used.difference(&granted).collect();
    assert!(
        unused.is_empty(),
        "the shipped RBAC grants more than is used: {unused:?}"
    );
    assert!(
        ungranted.is_empty(),
        "requests outside the shipped RBAC: {ungranted:?}"
    );
}
