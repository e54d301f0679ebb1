//! The I/O shell: watches, the reconcile loop and its wiring.
//!
//! Every decision is made by the pure modules (`render`, `status`); this
//! module reads the API server, hands what it saw to them, and writes back
//! only what differs.

mod reconcile;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use kube::core::PartialObjectMeta;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use kube::{Api, Client, ResourceExt};
use tracing::{info, warn};

use crate::api::{Bundle, DeliveryMode, FleetHandshake, FleetHandshakeStatus};
use crate::authorize::SourcePolicy;
use crate::render::{MANAGED_BY, MANAGED_BY_LABEL};
use crate::telemetry::Metrics;

pub use reconcile::Error;

/// The one field manager for every write this operator makes.
pub const FIELD_MANAGER: &str = "fleet-handshake";

/// How the operator runs, as set on the command line.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Namespaces to watch; empty means the whole cluster.
    pub namespaces: Vec<String>,
    /// Re-check every handshake this often even without events, so a missed
    /// watch event cannot leave a copy stale for long.
    pub resync_interval: Duration,
    /// Longest wait between retries of a failing handshake.
    pub max_backoff: Duration,
    /// Which source Secrets handshakes may read.
    pub source_policy: SourcePolicy,
    /// Delivery for handshakes that do not choose one.
    pub default_delivery: DeliveryMode,
}

/// State shared by all reconciles.
pub struct Context {
    client: Client,
    recorder: Recorder,
    metrics: Arc<Metrics>,
    settings: Settings,
    /// Consecutive failures per handshake, for exponential backoff.
    failures: Mutex<HashMap<ObjectRef<FleetHandshake>, u32>>,
    /// Statuses written but possibly not yet seen in the cache.
    written_statuses: Mutex<HashMap<ObjectRef<FleetHandshake>, WrittenStatus>>,
}

/// A status this operator wrote, and the handshake version it was computed
/// from.
struct WrittenStatus {
    computed_from: Option<String>,
    status: FleetHandshakeStatus,
}

impl Context {
    fn new(client: Client, metrics: Arc<Metrics>, settings: Settings) -> Self {
        let reporter = Reporter {
            controller: FIELD_MANAGER.to_string(),
            instance: std::env::var("POD_NAME").ok(),
        };
        Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            metrics,
            settings,
            failures: Mutex::default(),
            written_statuses: Mutex::default(),
        }
    }

    fn backoff(&self, handshake: &FleetHandshake) -> Duration {
        let mut failures = self.failures.lock().expect("backoff map lock");
        let count = failures.entry(ObjectRef::from_obj(handshake)).or_insert(0);
        *count = count.saturating_add(1);
        retry_delay(*count, self.settings.max_backoff)
    }

    /// The handshake's current status as far as we know. A reconcile woken
    /// by our own Bundle write can run before the cache has the status we
    /// just wrote; comparing with the cached copy then would write the same
    /// status (and record the same event) again. While the cache still holds
    /// the version we computed from, the status we wrote is the current one;
    /// once it holds any other version, that version includes our write.
    /// (Our write's own watch event brings such a version, so entries live
    /// only until the next reconcile of the handshake.)
    fn current_status(&self, handshake: &FleetHandshake) -> Option<FleetHandshakeStatus> {
        let key = ObjectRef::from_obj(handshake);
        let mut written = self.written_statuses.lock().expect("status map lock");
        match written.get(&key) {
            Some(entry) if entry.computed_from == handshake.metadata.resource_version => {
                Some(entry.status.clone())
            }
            Some(_) => {
                written.remove(&key);
                handshake.status.clone()
            }
            None => handshake.status.clone(),
        }
    }

    fn remember_written_status(&self, handshake: &FleetHandshake, status: FleetHandshakeStatus) {
        self.written_statuses
            .lock()
            .expect("status map lock")
            .insert(
                ObjectRef::from_obj(handshake),
                WrittenStatus {
                    computed_from: handshake.metadata.resource_version.clone(),
                    status,
                },
            );
    }

    fn forget_failures(&self, handshake: &FleetHandshake) {
        self.failures
            .lock()
            .expect("backoff map lock")
            .remove(&ObjectRef::from_obj(handshake));
    }
}

/// Delay before retry number `failures` (1-based): 1s, 2s, 4s, ... capped.
fn retry_delay(failures: u32, max: Duration) -> Duration {
    let exponent = failures.saturating_sub(1).min(16);
    Duration::from_secs(1u64 << exponent).min(max)
}

/// Runs the controller until a shutdown signal. One controller per watched
/// namespace in namespace-scoped mode, one for the whole cluster otherwise.
pub async fn run(
    client: Client,
    metrics: Arc<Metrics>,
    settings: Settings,
    ready: Arc<std::sync::atomic::AtomicBool>,
) {
    let context = Arc::new(Context::new(client.clone(), metrics, settings.clone()));
    // One scope per watched namespace, or one for the whole cluster.
    let scopes: Vec<Option<String>> = if settings.namespaces.is_empty() {
        vec![None]
    } else {
        settings.namespaces.iter().cloned().map(Some).collect()
    };
    let secret_apis: Vec<Api<PartialObjectMeta<Secret>>> = scopes
        .iter()
        .map(|scope| scoped_api(&client, scope.as_deref()))
        .collect();
    let controllers: Vec<Controller<FleetHandshake>> = scopes
        .iter()
        .map(|scope| controller_for(&client, scope.as_deref(), &secret_apis))
        .collect();
    tokio::spawn(mark_ready_when_synced(
        controllers.iter().map(Controller::store).collect(),
        ready,
    ));
    let controllers = controllers.into_iter().map(|controller| {
        controller
            .shutdown_on_signal()
            .run(
                reconcile::reconcile,
                reconcile::error_policy,
                context.clone(),
            )
            .for_each(|result| async move {
                if let Err(error) = result {
                    warn!(%error, "controller event failed");
                }
            })
    });
    futures::future::join_all(controllers).await;
    info!("controller stopped");
}

/// Flags readiness once every scope's handshake cache holds its first list.
async fn mark_ready_when_synced(
    stores: Vec<Store<FleetHandshake>>,
    ready: Arc<std::sync::atomic::AtomicBool>,
) {
    for store in stores {
        // The store's readiness signal wakes only its most recent waiter, and
        // the controller itself waits on it too; polling again now and then
        // avoids waiting forever.
        loop {
            match tokio::time::timeout(Duration::from_millis(250), store.wait_until_ready()).await {
                Ok(Ok(())) => break,
                Ok(Err(_)) => return,
                Err(_) => continue,
            }
        }
    }
    info!("handshake caches synced");
    ready.store(true, std::sync::atomic::Ordering::Relaxed);
}

/// The controller for one scope: handshakes and our Bundles in `namespace`
/// (or everywhere), Secrets in `secret_apis`.
///
/// Our Bundles and Secret copies (labelled as ours) are watched to repair
/// them; they and source Secrets are watched by metadata only and without a cache:
/// no Secret data is ever held, and each event is only mapped to the
/// handshakes it concerns.
fn controller_for(
    client: &Client,
    namespace: Option<&str>,
    secret_apis: &[Api<PartialObjectMeta<Secret>>],
) -> Controller<FleetHandshake> {
    let handshakes: Api<FleetHandshake> = scoped_api(client, namespace);
    let bundles: Api<PartialObjectMeta<Bundle>> = scoped_api(client, namespace);
    let copies: Api<PartialObjectMeta<Secret>> = scoped_api(client, namespace);
    let ours = watcher::Config::default().labels(&format!("{MANAGED_BY_LABEL}={MANAGED_BY}"));
    let controller = Controller::new(handshakes, watcher::Config::default())
        .owns(bundles, ours.clone())
        .owns(copies, ours);
    let store = controller.store();
    secret_apis.iter().fold(controller, |controller, secrets| {
        let store = store.clone();
        controller.watches(secrets.clone(), watcher::Config::default(), move |secret| {
            handshakes_reading(
                &store,
                &secret.namespace().unwrap_or_default(),
                &secret.name_any(),
            )
        })
    })
}

/// An API for `namespace`, or for every namespace when there is none.
fn scoped_api<K>(client: &Client, namespace: Option<&str>) -> Api<K>
where
    K: kube::Resource<Scope = kube::core::NamespaceResourceScope>,
    K::DynamicType: Default,
{
    match namespace {
        Some(namespace) => Api::namespaced(client.clone(), namespace),
        None => Api::all(client.clone()),
    }
}

/// The handshakes whose source is the Secret `namespace`/`name`.
fn handshakes_reading(
    store: &Store<FleetHandshake>,
    namespace: &str,
    name: &str,
) -> Vec<ObjectRef<FleetHandshake>> {
    store
        .state()
        .into_iter()
        .filter(|handshake| reconcile::source_of(handshake) == (namespace, name))
        .map(|handshake| ObjectRef::from_obj(&*handshake))
        .collect()
}

/// What a successful reconcile asks of the scheduler.
fn resync(settings: &Settings) -> Action {
    Action::requeue(settings.resync_interval)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_delay_doubles_and_caps() {
        let max = Duration::from_secs(300);
        let delays: Vec<u64> = (1..=10).map(|n| retry_delay(n, max).as_secs()).collect();
        assert_eq!(delays, [1, 2, 4, 8, 16, 32, 64, 128, 256, 300]);
        assert_eq!(retry_delay(u32::MAX, max), max);
    }
}
