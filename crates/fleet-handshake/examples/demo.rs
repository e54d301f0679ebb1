//! A guided tour of fleet-handshake on a real, local Kubernetes control plane.
//!
//! Run it with `cargo run -p fleet-handshake --example demo`. It starts the
//! test control plane (etcd, kube-apiserver, kube-controller-manager; see
//! the `testenv` crate), runs the operator in this process, applies the
//! files in `examples/`, and shows the Bundle the operator writes, a Secret
//! rotation reaching it, and the handshake's status as Fleet reports
//! delivery. Everything is stopped again at the end.
//!
//! The demo follows the operator's own rule: Secret values are never
//! printed. Bundle content is shown with every value replaced by `***`, and
//! a rotation is reported by key name only.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context as _, Result, anyhow, bail};
use fleet_handshake::api::{Bundle, DeliveryMode, FleetHandshake, SyncStatus};
use fleet_handshake::authorize::SourcePolicy;
use fleet_handshake::controller::{self, Settings};
use fleet_handshake::telemetry::{self, LogFormat, Metrics};
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{Namespace, Secret};
use kube::api::{ObjectMeta, Patch, PatchParams, PostParams};
use kube::core::NamespaceResourceScope;
use kube::{Api, Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use testenv::{BIN_DIR_ENV, Binaries, ControlPlane, Options};

/// Field manager of the objects the demo applies, standing in for a user.
const DEMO_MANAGER: &str = "fleet-handshake-demo";
/// Field manager of the simulated Fleet status report.
const FLEET_SIMULATOR: &str = "fleet-simulator";
/// The Fleet workspace namespace the example handshake lives in.
const WORKSPACE: &str = "fleet-default";
/// The files the demo applies, relative to the repository root.
const SECRET_FILE: &str = "examples/secret.yaml";
const HANDSHAKE_FILE: &str = "examples/handshake-cluster-selector.yaml";
/// The password the rotation sets. Never printed, like any Secret value.
const ROTATED_PASSWORD: &str = "demo-password-2";
/// How long to wait for the operator to react; it normally takes well
/// under a second.
const WAIT: Duration = Duration::from_secs(60);
/// Sentinel shown in place of every Secret value.
const MASK: &str = "***";

#[tokio::main]
async fn main() -> Result<()> {
    step("Starting a local Kubernetes control plane");
    announce_binaries();
    let control_plane = ControlPlane::start(Options::default())
        .await
        .context("starting the control plane")?;
    // Logging starts only now: while the control plane boots, the client
    // logs every refused readiness probe as an error, which is expected
    // noise. Warnings only, so the operator's routine logging does not bury
    // the demo's own output.
    telemetry::init_logging("warn", LogFormat::Text)?;
    println!("control plane ready at {}", control_plane.server_url());
    println!("CRDs installed: Fleet's (Bundle, ...) and ours (FleetHandshake)");
    let client = control_plane.client().await;

    step("Starting the operator in this process");
    let ready = Arc::new(AtomicBool::new(false));
    let operator = tokio::spawn(controller::run(
        client.clone(),
        Arc::new(Metrics::default()),
        operator_settings(),
        ready.clone(),
    ));
    let outcome = tokio::select! {
        outcome = tour(&client, &ready) => outcome,
        interrupted = tokio::signal::ctrl_c() => match interrupted {
            Ok(()) => Err(anyhow!("interrupted")),
            Err(error) => Err(anyhow!(error).context("listening for Ctrl-C")),
        },
    };

    // Clean up whatever the outcome, then report it.
    step("Stopping the operator and the control plane");
    stop_operator(operator).await?;
    control_plane.stop().context("stopping the control plane")?;
    println!("control plane stopped");
    outcome
}

/// Cancels the operator task. Its writes are single requests, so
/// cancelling leaves nothing half-written.
async fn stop_operator(operator: tokio::task::JoinHandle<()>) -> Result<()> {
    operator.abort();
    match operator.await {
        Err(error) if !error.is_cancelled() => Err(anyhow!("the operator task failed: {error}")),
        _ => {
            println!("operator stopped");
            Ok(())
        }
    }
}

/// Says whether the control-plane binaries still have to be built, since
/// that takes minutes and would otherwise look like a hang.
fn announce_binaries() {
    if binaries_available() {
        println!("using the cached etcd, kube-apiserver and kube-controller-manager");
    } else {
        println!(
            "NOTE: this first run builds etcd, kube-apiserver and kube-controller-manager\n\
             from source with Go (about 8 minutes on 2 cores). The build is cached, so\n\
             later runs start in seconds."
        );
    }
}

/// Whether `ControlPlane::start` will find binaries without building.
fn binaries_available() -> bool {
    if std::env::var_os(BIN_DIR_ENV).is_some_and(|dir| !dir.is_empty()) {
        return true;
    }
    let cached = || -> Result<PathBuf> {
        Ok(testenv::cache_root()?.join(testenv::cache_key(&testenv::go_module_dir())?))
    };
    cached().is_ok_and(|dir| Binaries::from_dir(dir).is_ok())
}

/// The operator as `fleet-handshake run` starts it with default flags.
fn operator_settings() -> Settings {
    Settings {
        namespaces: Vec::new(),
        resync_interval: Duration::from_secs(600),
        max_backoff: Duration::from_secs(300),
        source_policy: SourcePolicy::default(),
        default_delivery: DeliveryMode::Embedded,
    }
}

/// The demo proper: apply, inspect, rotate, report delivery.
async fn tour(client: &Client, operator_ready: &AtomicBool) -> Result<()> {
    wait_for("the operator's caches to sync", || async {
        Ok(operator_ready.load(Ordering::Relaxed).then_some(()))
    })
    .await?;
    println!("operator running: all namespaces, default delivery Embedded, no source grants");

    step("Applying the example Secret and handshake");
    ensure_namespace(client, WORKSPACE).await?;
    let secret: Secret = apply_file(client, SECRET_FILE).await?;
    let handshake: FleetHandshake = apply_file(client, HANDSHAKE_FILE).await?;
    let namespace = handshake.namespace().unwrap_or_default();
    let name = handshake.name_any();
    let bundles: Api<Bundle> = Api::namespaced(client.clone(), &namespace);
    let handshakes: Api<FleetHandshake> = Api::namespaced(client.clone(), &namespace);

    step("The Bundle the operator wrote (Secret values masked)");
    let bundle = wait_for(&format!("Bundle {namespace}/{name}"), || async {
        Ok(bundles.get_opt(&name).await?)
    })
    .await?;
    print_bundle(&bundle)?;

    step("The handshake's status");
    let pending = wait_for_status(&handshakes, &name, None).await?;
    print_status(&pending);

    step("Rotating the Secret's password");
    rotate_password(client, &secret).await?;
    let rotated = wait_for("the Bundle to carry the new Secret data", || async {
        Ok(bundles
            .get_opt(&name)
            .await?
            .filter(|current| bundle_content(current) != bundle_content(&bundle)))
    })
    .await?;
    println!("the Bundle after the rotation (Secret values masked):");
    print_bundle(&rotated)?;
    println!(
        "changed keys: {}",
        describe_changes(&changed_keys(&bundle, &rotated)?)
    );

    step("Simulating Fleet's controller, which this built-in control plane does not run");
    report_delivery(&bundles, &rotated).await?;
    let synced = wait_for_status(&handshakes, &name, Some(SyncStatus::Synced)).await?;
    print_status(&synced);
    Ok(())
}

/// Creates `name` unless it exists (`default` always does).
async fn ensure_namespace(client: &Client, name: &str) -> Result<()> {
    let namespace = Namespace {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            ..ObjectMeta::default()
        },
        ..Namespace::default()
    };
    match Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &namespace)
        .await
    {
        Ok(_) => println!("created namespace {name}"),
        Err(kube::Error::Api(status)) if status.code == 409 => {}
        Err(error) => return Err(error).with_context(|| format!("creating namespace {name}")),
    }
    Ok(())
}

/// Server-side applies the object in repository file `relative`, as a user
/// would with `kubectl apply --server-side`.
async fn apply_file<K>(client: &Client, relative: &str) -> Result<K>
where
    K: Resource<DynamicType = (), Scope = NamespaceResourceScope>
        + Clone
        + DeserializeOwned
        + Serialize
        + std::fmt::Debug,
{
    let path = repository_root().join(relative);
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {relative}"))?;
    let object: K =
        serde_yaml_ng::from_str(&text).with_context(|| format!("parsing {relative}"))?;
    let (namespace, name) = (object.namespace(), object.name_any());
    let namespace = namespace.with_context(|| format!("{relative} names no namespace"))?;
    let applied = Api::<K>::namespaced(client.clone(), &namespace)
        .patch(
            &name,
            &PatchParams::apply(DEMO_MANAGER).force(),
            &Patch::Apply(&object),
        )
        .await
        .with_context(|| format!("applying {relative}"))?;
    println!("applied {relative}: {} {namespace}/{name}", K::kind(&()));
    Ok(applied)
}

/// The repository root, where `examples/` lives.
fn repository_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Sets a new password on the source Secret, as an administrator rotating a
/// credential would.
async fn rotate_password(client: &Client, secret: &Secret) -> Result<()> {
    let namespace = secret.namespace().unwrap_or_default();
    let name = secret.name_any();
    Api::<Secret>::namespaced(client.clone(), &namespace)
        .patch(
            &name,
            &PatchParams::default(),
            &Patch::Merge(json!({"stringData": {"password": ROTATED_PASSWORD}})),
        )
        .await
        .with_context(|| format!("patching Secret {namespace}/{name}"))?;
    println!("patched Secret {namespace}/{name} with a new password (value not shown)");
    Ok(())
}

/// Writes the Bundle status Fleet's controller would write once its agent
/// reported the Secret installed on the one matched cluster.
async fn report_delivery(bundles: &Api<Bundle>, bundle: &Bundle) -> Result<()> {
    let generation = bundle
        .metadata
        .generation
        .context("the Bundle has no generation")?;
    let report = json!({
        "status": {
            "observedGeneration": generation,
            "summary": {"desiredReady": 1, "ready": 1},
        }
    });
    bundles
        .patch_status(
            &bundle.name_any(),
            &PatchParams {
                field_manager: Some(FLEET_SIMULATOR.to_string()),
                ..PatchParams::default()
            },
            &Patch::Merge(&report),
        )
        .await
        .context("writing the simulated Fleet status")?;
    println!("patched Bundle status: observedGeneration {generation}, 1 of 1 clusters ready");
    Ok(())
}

/// Waits until the handshake has a status for its current generation (with
/// the word `word`, if given) and returns it.
async fn wait_for_status(
    handshakes: &Api<FleetHandshake>,
    name: &str,
    word: Option<SyncStatus>,
) -> Result<FleetHandshake> {
    let what = match word {
        Some(word) => format!("handshake {name} to be {}", word.as_str()),
        None => format!("a status on handshake {name}"),
    };
    wait_for(&what, || async {
        Ok(handshakes.get_opt(name).await?.filter(|handshake| {
            handshake.status.as_ref().is_some_and(|status| {
                status.observed_generation == handshake.metadata.generation
                    && status.status.is_some()
                    && word.is_none_or(|word| status.status == Some(word))
            })
        }))
    })
    .await
}

/// Polls `check` until it yields a value; fails after [`WAIT`] naming what
/// was awaited.
async fn wait_for<T, F, Fut>(what: &str, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<T>>>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Some(value) = check()
            .await
            .with_context(|| format!("waiting for {what}"))?
        {
            return Ok(value);
        }
        if tokio::time::Instant::now() >= deadline {
            bail!("timed out after {WAIT:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

// ---- showing objects without their secrets ------------------------------

/// Prints the Bundle as YAML: identity, ownership, spec with every Secret
/// value masked, and Fleet's status if any. Server bookkeeping (uid,
/// managedFields, ...) is left out for readability.
fn print_bundle(bundle: &Bundle) -> Result<()> {
    let mut shown = serde_json::to_value(bundle)?;
    let metadata = &bundle.metadata;
    shown["metadata"] = json!({
        "name": metadata.name,
        "namespace": metadata.namespace,
        "generation": metadata.generation,
        "labels": metadata.labels,
        "ownerReferences": metadata.owner_references,
    });
    if let Some(resources) = shown
        .pointer_mut("/spec/resources")
        .and_then(Value::as_array_mut)
    {
        for resource in resources {
            mask_resource(resource);
        }
    }
    print!("{}", serde_yaml_ng::to_string(&shown)?);
    Ok(())
}

/// Replaces a Bundle resource's content by the same manifest with masked
/// values. Content that is not a plain JSON manifest (another encoding, or
/// someone else's edit) is withheld entirely rather than risk showing it.
fn mask_resource(resource: &mut Value) {
    let content = resource["content"].as_str().unwrap_or_default();
    let plain = resource["encoding"].as_str().unwrap_or_default().is_empty();
    let masked = serde_json::from_str::<Value>(content)
        .ok()
        .filter(|_| plain)
        .and_then(|mut manifest| {
            mask_manifest(&mut manifest);
            serde_json::to_string_pretty(&manifest).ok()
        })
        .unwrap_or_else(|| format!("<{} bytes withheld>", content.len()));
    resource["content"] = Value::String(masked + "\n");
}

/// Masks every value of a Secret manifest's `data` and `stringData`.
fn mask_manifest(manifest: &mut Value) {
    for field in ["data", "stringData"] {
        if let Some(values) = manifest.get_mut(field).and_then(Value::as_object_mut) {
            values
                .values_mut()
                .for_each(|value| *value = Value::from(MASK));
        }
    }
}

/// The Bundle's resource contents, for noticing that the operator rewrote
/// them.
fn bundle_content(bundle: &Bundle) -> Vec<&str> {
    bundle
        .spec
        .resources
        .iter()
        .map(|resource| resource.content.as_str())
        .collect()
}

/// Decoded Secret data carried by the Bundle's (single) resource.
fn delivered_data(bundle: &Bundle) -> Result<BTreeMap<String, ByteString>> {
    let resource = bundle
        .spec
        .resources
        .first()
        .context("the Bundle carries no resource")?;
    let manifest: Value = serde_json::from_str(&resource.content)
        .context("the Bundle resource is not a JSON manifest")?;
    let data = manifest.get("data").cloned().unwrap_or_else(|| json!({}));
    serde_json::from_value(data).context("the manifest's data is not base64")
}

/// How one key of the delivered Secret differs after a rotation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Change {
    Changed,
    Added,
    Removed,
}

/// The keys whose values differ between two Bundles. Values are compared
/// here and never leave this function.
fn changed_keys(before: &Bundle, after: &Bundle) -> Result<BTreeMap<String, Change>> {
    let (before, after) = (delivered_data(before)?, delivered_data(after)?);
    let keys: BTreeSet<&String> = before.keys().chain(after.keys()).collect();
    Ok(keys
        .into_iter()
        .filter_map(|key| {
            let change = match (before.get(key), after.get(key)) {
                (Some(old), Some(new)) if old != new => Change::Changed,
                (None, Some(_)) => Change::Added,
                (Some(_), None) => Change::Removed,
                _ => return None,
            };
            Some((key.clone(), change))
        })
        .collect())
}

/// One line for the changes, by key name: `password`, `token (added)`.
fn describe_changes(changes: &BTreeMap<String, Change>) -> String {
    if changes.is_empty() {
        return "none".to_string();
    }
    changes
        .iter()
        .map(|(key, change)| match change {
            Change::Changed => key.clone(),
            Change::Added => format!("{key} (added)"),
            Change::Removed => format!("{key} (removed)"),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Prints the status word, the ready-clusters figure and each condition.
fn print_status(handshake: &FleetHandshake) {
    let Some(status) = &handshake.status else {
        println!("no status yet");
        return;
    };
    println!(
        "handshake {}/{}: status {}, readyClusters {}",
        handshake.namespace().unwrap_or_default(),
        handshake.name_any(),
        status.status.map_or("-", SyncStatus::as_str),
        status.ready_clusters.as_deref().unwrap_or("-"),
    );
    for condition in &status.conditions {
        println!(
            "  {:<14} {:<8} {:<18} {}",
            condition.type_, condition.status, condition.reason, condition.message
        );
    }
}

/// A heading for one stage of the demo.
fn step(title: &str) {
    println!("\n== {title}");
}
