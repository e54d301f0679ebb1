//! Cluster-wide mode on its own control plane (one per test binary), so no
//! other test's operator watches the same objects: the operator bound by a
//! ClusterRoleBinding, watching every namespace, including namespaces
//! created after it started.

mod support;

use fleet_handshake::api::{FleetHandshake, SyncStatus};
use kube::Api;
use kube::api::PostParams;
use serde_json::json;
use support::*;
use testenv::ControlPlane;

#[tokio::test]
async fn a_cluster_wide_operator_serves_every_namespace() {
    let control_plane = ControlPlane::shared();
    let admin = control_plane.client().await;
    let identity = operator_identity(control_plane, Grant::Cluster, &[]).await;
    let _operator = Operator::start(&identity, &[]).await;

    // Namespaces created after the operator started.
    let workspace = control_plane.create_namespace("late-workspace").await;
    let source = control_plane.create_namespace("late-source").await;
    put_secret(&admin, &workspace, "local", &[("key", "local-value")]).await;
    put_secret(&admin, &source, "remote", &[("key", "remote-value")]).await;
    let handshakes: Api<FleetHandshake> = Api::namespaced(admin.clone(), &workspace);
    for (name, secret, namespace) in [
        ("local", "local", &workspace),
        ("remote", "remote", &source),
    ] {
        let handshake: FleetHandshake = serde_json::from_value(json!({
            "apiVersion": "riverpointtechnology.com/v1alpha1", "kind": "FleetHandshake",
            "metadata": {"name": name},
            "spec": {"secretName": secret, "secretNamespace": namespace, "targetNamespace": "apps",
                     "targets": [{"clusterGroup": "all"}]},
        }))
        .unwrap();
        handshakes
            .create(&PostParams::default(), &handshake)
            .await
            .unwrap();
    }

    let status_of = |name: &'static str| {
        let (admin, workspace) = (admin.clone(), workspace.clone());
        async move {
            get_handshake(&admin, &workspace, name)
                .await
                .and_then(|handshake| handshake.status)
                .and_then(|status| status.status)
        }
    };
    eventually(
        "the same-namespace source to be delivered",
        WAIT,
        || async { (status_of("local").await == Some(SyncStatus::Pending)).then_some(()) },
    )
    .await;
    let bundle = get_bundle(&admin, &workspace, "local").await.unwrap();
    assert_eq!(
        delivered_value(&delivered_secret(&bundle), "key").as_deref(),
        Some("local-value")
    );
    // Without consent, the other namespace's Secret stays out, cluster-wide
    // access notwithstanding.
    eventually(
        "the other namespace's source to be refused",
        WAIT,
        || async { (status_of("remote").await == Some(SyncStatus::Error)).then_some(()) },
    )
    .await;
    assert!(get_bundle(&admin, &workspace, "remote").await.is_none());
}
