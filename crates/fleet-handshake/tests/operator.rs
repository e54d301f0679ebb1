//! The operator end to end on the real control plane: the original
//! operator's objects, Secret rotation and removal, Bundle repair, foreign
//! Bundles, Fleet's status, and restarts.

mod support;

use std::time::Duration;

use fleet_handshake::api::{Bundle, FleetHandshake, SyncStatus};
use k8s_openapi::api::core::v1::Secret;
use kube::api::{DeleteParams, Patch, PatchParams};
use kube::{Api, ResourceExt};
use serde_json::json;
use support::*;
use testenv::ControlPlane;

#[tokio::test]
async fn original_samples_apply_unchanged_and_render_their_bundles() {
    let scenario = Scenario::new(Setup::default()).await;
    scenario.apply_example_secret().await;
    for (file, name) in [
        ("handshake-cluster-selector.yaml", "my-secret-dev"),
        ("handshake-cluster-name.yaml", "my-secret-downstream-1"),
    ] {
        let applied = scenario.apply_example_handshake(file).await;
        let handshake = scenario.status_becomes(name, SyncStatus::Pending).await;
        assert_eq!(
            condition(&handshake, "BundleApplied"),
            ("True", "BundleApplied")
        );
        assert_eq!(
            condition(&handshake, "Delivered"),
            ("Unknown", "WaitingForFleet")
        );
        assert_eq!(condition(&handshake, "Ready").0, "False");

        let bundle = get_bundle(&scenario.admin, &scenario.workspace, name)
            .await
            .expect("the Bundle exists");
        let owner = &bundle.owner_references()[0];
        assert_eq!(
            (
                owner.uid.as_str(),
                owner.kind.as_str(),
                owner.controller,
                owner.block_owner_deletion
            ),
            (
                applied.uid().unwrap().as_str(),
                "FleetHandshake",
                Some(true),
                Some(true)
            )
        );
        assert_eq!(
            bundle.labels()["app.kubernetes.io/managed-by"],
            "fleet-handshake"
        );
        assert_eq!(bundle.spec.resources[0].name, "my-secret.json");
        let manifest = delivered_secret(&bundle);
        assert_eq!(
            manifest["metadata"],
            json!({"name": "my-secret", "namespace": "test"})
        );
        assert_eq!(manifest["type"], "Opaque");
        assert_eq!(
            delivered_value(&manifest, "password").as_deref(),
            Some("demo-password-1")
        );
        assert_eq!(
            delivered_value(&manifest, "username").as_deref(),
            Some("demo-user")
        );
        assert_eq!(
            serde_json::to_value(&bundle.spec.targets).unwrap(),
            serde_json::to_value(&applied.spec.targets).unwrap(),
            "targets are copied verbatim"
        );
    }
}

#[tokio::test]
async fn secret_rotation_reaches_the_bundle() {
    let scenario = Scenario::new(Setup::default()).await;
    scenario.apply_example_secret().await;
    scenario
        .apply_example_handshake("handshake-cluster-name.yaml")
        .await;
    let name = "my-secret-downstream-1";
    scenario
        .bundle_matching(name, "the first value", |bundle| {
            delivered_value(&delivered_secret(bundle), "password").as_deref()
                == Some("demo-password-1")
        })
        .await;

    let secrets: Api<Secret> = Api::namespaced(scenario.admin.clone(), &scenario.source);
    let rotation = json!({"stringData": {"password": "rotated-password-2", "token": "new-key"}});
    secrets
        .patch(
            "my-secret",
            &PatchParams::default(),
            &Patch::Merge(&rotation),
        )
        .await
        .expect("rotating the Secret");
    let bundle = scenario
        .bundle_matching(name, "the rotated value", |bundle| {
            delivered_value(&delivered_secret(bundle), "password").as_deref()
                == Some("rotated-password-2")
        })
        .await;
    assert_eq!(
        delivered_value(&delivered_secret(&bundle), "token").as_deref(),
        Some("new-key")
    );
}

#[tokio::test]
async fn a_deleted_source_withdraws_the_bundle_until_it_returns() {
    let scenario = Scenario::new(Setup::default()).await;
    scenario.apply_example_secret().await;
    scenario
        .apply_example_handshake("handshake-cluster-name.yaml")
        .await;
    let name = "my-secret-downstream-1";
    scenario.status_becomes(name, SyncStatus::Pending).await;

    Api::<Secret>::namespaced(scenario.admin.clone(), &scenario.source)
        .delete("my-secret", &DeleteParams::default())
        .await
        .expect("deleting the source");
    let handshake = scenario.status_becomes(name, SyncStatus::Missing).await;
    assert_eq!(condition(&handshake, "Ready"), ("False", "SourceMissing"));
    scenario.bundle_gone(name).await;

    scenario.apply_example_secret().await;
    scenario.status_becomes(name, SyncStatus::Pending).await;
    let bundle = get_bundle(&scenario.admin, &scenario.workspace, name)
        .await
        .expect("the Bundle is back");
    assert_eq!(
        delivered_value(&delivered_secret(&bundle), "password").as_deref(),
        Some("demo-password-1")
    );
}

#[tokio::test]
async fn deleting_the_handshake_garbage_collects_its_bundle() {
    let scenario = Scenario::new(Setup::default()).await;
    scenario.apply_example_secret().await;
    scenario
        .apply_example_handshake("handshake-cluster-selector.yaml")
        .await;
    let name = "my-secret-dev";
    scenario.status_becomes(name, SyncStatus::Pending).await;
    assert!(
        get_bundle(&scenario.admin, &scenario.workspace, name)
            .await
            .is_some()
    );

    Api::<FleetHandshake>::namespaced(scenario.admin.clone(), &scenario.workspace)
        .delete(name, &DeleteParams::default())
        .await
        .expect("deleting the handshake");
    scenario.bundle_gone(name).await;
}

#[tokio::test]
async fn a_hand_edited_or_deleted_bundle_is_repaired() {
    let scenario = Scenario::new(Setup::default()).await;
    scenario.apply_example_secret().await;
    scenario
        .apply_example_handshake("handshake-cluster-selector.yaml")
        .await;
    let name = "my-secret-dev";
    scenario.status_becomes(name, SyncStatus::Pending).await;
    let original = get_bundle(&scenario.admin, &scenario.workspace, name)
        .await
        .unwrap();

    let bundles: Api<Bundle> = Api::namespaced(scenario.admin.clone(), &scenario.workspace);
    let tampering = json!({"spec": {
        "resources": [{"name": "my-secret.json", "content": "{\"kind\":\"Secret\",\"apiVersion\":\"v1\",\"metadata\":{\"name\":\"my-secret\"},\"data\":{}}"}],
        "targets": [{"clusterSelector": {}}],
    }});
    bundles
        .patch(name, &PatchParams::default(), &Patch::Merge(&tampering))
        .await
        .expect("editing the Bundle by hand");
    let repaired = scenario
        .bundle_matching(name, "the edited Bundle to be repaired", |bundle| {
            bundle.spec.resources == original.spec.resources
                && bundle.spec.targets == original.spec.targets
        })
        .await;
    assert_ne!(repaired.resource_version(), original.resource_version());

    bundles
        .delete(name, &DeleteParams::default())
        .await
        .expect("deleting the Bundle by hand");
    let recreated = scenario
        .bundle_matching(name, "the deleted Bundle to be recreated", |bundle| {
            bundle.uid() != original.uid()
        })
        .await;
    assert_eq!(recreated.spec.resources, original.spec.resources);
}

#[tokio::test]
async fn a_foreign_bundle_of_the_same_name_is_left_alone() {
    let scenario = Scenario::new(Setup::default()).await;
    scenario.apply_example_secret().await;
    let name = "my-secret-dev";
    let foreign: Bundle = apply_yaml(
        &scenario.admin,
        &scenario.workspace,
        &format!(
            "apiVersion: fleet.cattle.io/v1alpha1\nkind: Bundle\nmetadata:\n  name: {name}\n  namespace: {}\n  labels:\n    from: gitrepo\nspec:\n  resources:\n    - name: app.yaml\n      content: 'kind: ConfigMap'\n  targets:\n    - clusterName: local\n",
            scenario.workspace
        ),
    )
    .await;
    scenario
        .apply_example_handshake("handshake-cluster-selector.yaml")
        .await;
    let handshake = scenario.status_becomes(name, SyncStatus::Error).await;
    assert_eq!(condition(&handshake, "Ready"), ("False", "BundleConflict"));

    // Give the operator time to (wrongly) act, then check nothing changed.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = get_bundle(&scenario.admin, &scenario.workspace, name)
        .await
        .unwrap();
    assert_eq!(after.resource_version(), foreign.resource_version());
    assert_eq!(after.spec.resources[0].name, "app.yaml");

    // Once the other Bundle is gone, the handshake takes the name.
    Api::<Bundle>::namespaced(scenario.admin.clone(), &scenario.workspace)
        .delete(name, &DeleteParams::default())
        .await
        .unwrap();
    scenario.status_becomes(name, SyncStatus::Pending).await;
}

#[tokio::test]
async fn fleet_delivery_status_drives_the_handshake_status() {
    let scenario = Scenario::new(Setup::default()).await;
    scenario.apply_example_secret().await;
    scenario
        .apply_example_handshake("handshake-cluster-selector.yaml")
        .await;
    let name = "my-secret-dev";
    scenario.status_becomes(name, SyncStatus::Pending).await;
    let bundle = get_bundle(&scenario.admin, &scenario.workspace, name)
        .await
        .unwrap();
    let generation = bundle.metadata.generation.unwrap();

    // Report as Fleet's controller does, through the status subresource.
    let bundles: Api<Bundle> = Api::namespaced(scenario.admin.clone(), &scenario.workspace);
    let report = |summary: serde_json::Value| json!({"status": {"observedGeneration": generation, "summary": summary}});
    bundles
        .patch_status(
            name,
            &PatchParams::default(),
            &Patch::Merge(&report(json!({"desiredReady": 2, "ready": 2}))),
        )
        .await
        .expect("reporting delivery");
    let handshake = scenario.status_becomes(name, SyncStatus::Synced).await;
    assert_eq!(condition(&handshake, "Ready"), ("True", "Synced"));
    assert_eq!(
        condition(&handshake, "Delivered"),
        ("True", "AllClustersReady")
    );
    assert_eq!(
        handshake.status.as_ref().unwrap().ready_clusters.as_deref(),
        Some("2/2")
    );

    let failing = json!({"desiredReady": 2, "ready": 1, "errApplied": 1,
        "nonReadyResources": [{"name": "downstream-2", "bundleState": "ErrApplied", "message": "helm install failed"}]});
    bundles
        .patch_status(
            name,
            &PatchParams::default(),
            &Patch::Merge(&report(failing)),
        )
        .await
        .expect("reporting a failure");
    let handshake = scenario.status_becomes(name, SyncStatus::Error).await;
    assert_eq!(
        condition(&handshake, "Delivered"),
        ("False", "DeliveryFailed")
    );
    assert_eq!(
        handshake.status.as_ref().unwrap().ready_clusters.as_deref(),
        Some("1/2")
    );

    bundles
        .patch_status(
            name,
            &PatchParams::default(),
            &Patch::Merge(&report(
                json!({"desiredReady": 0, "ready": 0, "errApplied": 0, "nonReadyResources": null}),
            )),
        )
        .await
        .expect("reporting no matching cluster");
    let handshake = scenario.status_becomes(name, SyncStatus::Pending).await;
    assert_eq!(
        condition(&handshake, "Delivered"),
        ("False", "NoMatchingClusters")
    );
}

#[tokio::test]
async fn invalid_specs_are_rejected_or_reported() {
    let scenario = Scenario::new(Setup::default()).await;
    let handshakes: Api<FleetHandshake> =
        Api::namespaced(scenario.admin.clone(), &scenario.workspace);
    let with_targets = |targets: serde_json::Value| -> FleetHandshake {
        serde_json::from_value(json!({
            "apiVersion": "riverpointtechnology.com/v1alpha1", "kind": "FleetHandshake",
            "metadata": {"name": "invalid"},
            "spec": {"secretName": "my-secret", "targets": targets},
        }))
        .unwrap()
    };
    let empty = handshakes
        .create(&Default::default(), &with_targets(json!([])))
        .await;
    assert!(
        matches!(&empty, Err(kube::Error::Api(status)) if status.code == 422),
        "empty targets are rejected by the schema: {empty:?}"
    );
    handshakes
        .create(
            &Default::default(),
            &with_targets(json!([{"name": "no-criteria"}])),
        )
        .await
        .expect("a target without criteria passes the schema");
    let handshake = scenario.status_becomes("invalid", SyncStatus::Error).await;
    assert_eq!(condition(&handshake, "Ready"), ("False", "InvalidSpec"));
    assert!(
        get_bundle(&scenario.admin, &scenario.workspace, "invalid")
            .await
            .is_none()
    );
}

#[tokio::test]
async fn a_restarted_operator_writes_nothing_for_unchanged_objects() {
    let mut scenario = Scenario::new(Setup::default()).await;
    scenario.apply_example_secret().await;
    scenario
        .apply_example_handshake("handshake-cluster-selector.yaml")
        .await;
    scenario
        .apply_example_handshake("handshake-cluster-name.yaml")
        .await;
    scenario
        .status_becomes("my-secret-dev", SyncStatus::Pending)
        .await;
    scenario
        .status_becomes("my-secret-downstream-1", SyncStatus::Pending)
        .await;
    // Let the audit log catch up with the last write.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = scenario
        .control_plane
        .writes_by(&scenario.operator_user)
        .unwrap()
        .len();
    assert!(
        before >= 4,
        "the first run wrote Bundles and statuses ({before} writes)"
    );

    scenario.operator.restart().await;
    // Both handshakes are reconciled right after the caches sync; wait for
    // the reconciles to be counted, then for any write to reach the log.
    eventually(
        "both handshakes to be reconciled after the restart",
        WAIT,
        || async {
            (scenario
                .operator
                .metric("fleet_handshake_reconciliations_total{result=\"ok\"}")
                >= 2.0)
                .then_some(())
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = scenario
        .control_plane
        .writes_by(&scenario.operator_user)
        .unwrap();
    assert_eq!(
        after.len(),
        before,
        "the restarted operator wrote: {:?}",
        &after[before..]
    );
    assert_eq!(
        scenario
            .operator
            .metric("fleet_handshake_status_writes_total"),
        0.0
    );
}

#[tokio::test]
async fn api_errors_are_reported_and_retried_without_a_crash() {
    let control_plane = ControlPlane::shared();
    let admin = control_plane.client().await;
    let workspace = control_plane.create_namespace("no-bundle-rights").await;
    // Grant the shipped rights, then take Bundle writes away again by
    // binding a narrower role: handshakes, status and Secrets only.
    let identity = control_plane
        .service_account(&workspace, "limited")
        .await
        .unwrap();
    let role: k8s_openapi::api::rbac::v1::Role = serde_json::from_value(json!({
        "metadata": {"name": "limited", "namespace": workspace},
        "rules": [
            {"apiGroups": ["riverpointtechnology.com"], "resources": ["fleethandshakes"], "verbs": ["get", "list", "watch"]},
            {"apiGroups": ["riverpointtechnology.com"], "resources": ["fleethandshakes/status"], "verbs": ["patch"]},
            {"apiGroups": ["fleet.cattle.io"], "resources": ["bundles"], "verbs": ["get", "list", "watch"]},
            {"apiGroups": [""], "resources": ["secrets"], "verbs": ["get", "list", "watch"]},
        ],
    }))
    .unwrap();
    Api::namespaced(admin.clone(), &workspace)
        .create(&Default::default(), &role)
        .await
        .unwrap();
    let binding: k8s_openapi::api::rbac::v1::RoleBinding = serde_json::from_value(json!({
        "metadata": {"name": "limited", "namespace": workspace},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "limited"},
        "subjects": [{"kind": "ServiceAccount", "name": "limited", "namespace": workspace}],
    }))
    .unwrap();
    Api::namespaced(admin.clone(), &workspace)
        .create(&Default::default(), &binding)
        .await
        .unwrap();
    let mut operator = Operator::start(
        &identity,
        &["--namespace", &workspace, "--max-backoff-seconds", "2"],
    )
    .await;

    put_secret(&admin, &workspace, "app", &[("key", "value")]).await;
    let handshake: FleetHandshake = serde_json::from_value(json!({
        "apiVersion": "riverpointtechnology.com/v1alpha1", "kind": "FleetHandshake",
        "metadata": {"name": "app"},
        "spec": {"secretName": "app", "targetNamespace": "apps", "targets": [{"clusterName": "one"}]},
    }))
    .unwrap();
    Api::<FleetHandshake>::namespaced(admin.clone(), &workspace)
        .create(&Default::default(), &handshake)
        .await
        .unwrap();
    let reported = eventually("the API error to be reported", WAIT, || async {
        get_handshake(&admin, &workspace, "app")
            .await
            .filter(|handshake| {
                handshake.status.as_ref().and_then(|status| status.status)
                    == Some(SyncStatus::Error)
            })
    })
    .await;
    assert_eq!(condition(&reported, "Ready"), ("False", "ApiError"));
    assert_eq!(
        condition(&reported, "BundleApplied"),
        ("Unknown", "ApiError")
    );
    let message = &reported.status.as_ref().unwrap().conditions[0].message;
    assert!(message.contains("Forbidden (403)"), "{message}");
    eventually("retries with backoff", WAIT, || async {
        (operator.metric("fleet_handshake_reconciliations_total{result=\"apply\"}") >= 3.0)
            .then_some(())
    })
    .await;
    assert!(operator.is_running(), "the operator survives API errors");
}

#[tokio::test]
async fn many_handshakes_at_once_get_one_status_write_and_one_event_each() {
    const COUNT: usize = 60;
    let scenario = Scenario::new(Setup::default()).await;
    scenario.apply_example_secret().await;
    let handshakes: Api<FleetHandshake> =
        Api::namespaced(scenario.admin.clone(), &scenario.workspace);
    let template: FleetHandshake =
        serde_yaml_ng::from_str(&scenario.example("handshake-cluster-name.yaml")).unwrap();
    let creations = (0..COUNT).map(|index| {
        let mut handshake = template.clone();
        handshake.metadata.name = Some(format!("burst-{index}"));
        let handshakes = handshakes.clone();
        async move {
            handshakes
                .create(&Default::default(), &handshake)
                .await
                .expect("creating a handshake")
        }
    });
    futures::future::join_all(creations).await;
    for index in 0..COUNT {
        scenario
            .status_becomes(&format!("burst-{index}"), SyncStatus::Pending)
            .await;
    }
    // Let every reconcile woken by the operator's own writes run.
    tokio::time::sleep(Duration::from_secs(3)).await;

    assert_eq!(
        scenario
            .operator
            .metric("fleet_handshake_status_writes_total"),
        COUNT as f64,
        "one status write per handshake"
    );
    let events = Api::<k8s_openapi::api::events::v1::Event>::namespaced(
        scenario.admin.clone(),
        &scenario.workspace,
    )
    .list(&Default::default())
    .await
    .unwrap();
    let recorded: usize = events
        .items
        .iter()
        .map(|event| {
            event
                .series
                .as_ref()
                .map_or(1, |series| series.count as usize)
        })
        .sum();
    assert_eq!(recorded, COUNT, "one event per handshake");
}
