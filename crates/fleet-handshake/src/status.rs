//! Computes a handshake's status from what one reconcile observed.
//!
//! Pure: the caller passes the previous status and the current time, so a
//! condition keeps its `lastTransitionTime` while its state is unchanged and
//! an unchanged observation always yields an identical status (no write, no
//! self-triggered reconcile).

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use crate::api::{BundleStatus, FleetHandshakeStatus, SyncStatus};

/// Condition that summarizes the handshake: the Secret is delivered.
pub const READY: &str = "Ready";
/// Condition: the Bundle exists and matches the source Secret.
pub const BUNDLE_APPLIED: &str = "BundleApplied";
/// Condition: Fleet reports the Bundle ready on every matched cluster.
pub const DELIVERED: &str = "Delivered";

/// What one reconcile found. Messages never contain Secret values.
#[derive(Clone, Debug, PartialEq)]
pub enum Observation {
    /// The spec cannot be served as written.
    InvalidSpec { message: String },
    /// The source Secret may not be read by this handshake.
    SourceNotAllowed { message: String },
    /// The source Secret does not exist; no Bundle is kept.
    SourceMissing { namespace: String, name: String },
    /// A Bundle of the handshake's name exists and is not ours.
    BundleConflict { bundle: String },
    /// A call to the API server failed; it is retried with backoff.
    ApiFailure { message: String },
    /// Our Bundle is in place; `fleet` is what Fleet reports about it.
    Applied {
        bundle: String,
        bundle_generation: Option<i64>,
        fleet: Option<BundleStatus>,
    },
}

/// The status a handshake of `generation` should have after `observation`.
pub fn compute_status(
    generation: Option<i64>,
    observation: &Observation,
    previous: Option<&FleetHandshakeStatus>,
    now: &Time,
) -> FleetHandshakeStatus {
    let (status, applied, delivered, ready_clusters) = assess(observation);
    let ready = match status {
        SyncStatus::Synced => State::yes("Synced", delivered.message.clone()),
        _ => {
            // The first condition that is not True explains why we are not ready.
            let cause = [&applied, &delivered]
                .into_iter()
                .find(|state| state.status != "True")
                .unwrap_or(&applied);
            State::no(cause.reason, cause.message.clone())
        }
    };
    let previous_conditions = previous
        .map(|status| status.conditions.as_slice())
        .unwrap_or_default();
    let conditions = [
        (READY, ready),
        (BUNDLE_APPLIED, applied),
        (DELIVERED, delivered),
    ]
    .into_iter()
    .map(|(type_, state)| state.into_condition(type_, generation, previous_conditions, now))
    .collect();
    FleetHandshakeStatus {
        status: Some(status),
        observed_generation: generation,
        conditions,
        ready_clusters,
    }
}

/// One condition's state before it gets a type and a time.
#[derive(Clone, Debug, PartialEq)]
struct State {
    status: &'static str,
    reason: &'static str,
    message: String,
}

impl State {
    fn yes(reason: &'static str, message: String) -> Self {
        Self {
            status: "True",
            reason,
            message,
        }
    }
    fn no(reason: &'static str, message: String) -> Self {
        Self {
            status: "False",
            reason,
            message,
        }
    }
    fn unknown(reason: &'static str, message: String) -> Self {
        Self {
            status: "Unknown",
            reason,
            message,
        }
    }

    fn into_condition(
        self,
        type_: &str,
        generation: Option<i64>,
        previous: &[Condition],
        now: &Time,
    ) -> Condition {
        let last_transition_time = previous
            .iter()
            .find(|condition| condition.type_ == type_ && condition.status == self.status)
            .map(|condition| condition.last_transition_time.clone())
            .unwrap_or_else(|| now.clone());
        Condition {
            type_: type_.to_string(),
            status: self.status.to_string(),
            reason: self.reason.to_string(),
            message: self.message,
            observed_generation: generation,
            last_transition_time,
        }
    }
}

/// The status word, the `BundleApplied` and `Delivered` states and the
/// ready-clusters figure for an observation.
fn assess(observation: &Observation) -> (SyncStatus, State, State, Option<String>) {
    let not_delivered = |message: &str| State::no("NotDelivered", message.to_string());
    match observation {
        Observation::InvalidSpec { message } => (
            SyncStatus::Error,
            State::no("InvalidSpec", message.clone()),
            not_delivered("Nothing is delivered while the spec is invalid."),
            None,
        ),
        Observation::SourceNotAllowed { message } => (
            SyncStatus::Error,
            State::no("SourceNotAllowed", message.clone()),
            not_delivered("Nothing is delivered from a source this handshake may not read."),
            None,
        ),
        Observation::SourceMissing { namespace, name } => (
            SyncStatus::Missing,
            State::no(
                "SourceMissing",
                format!(
                    "Secret {namespace}/{name} does not exist; the Bundle was removed so no stale copy is delivered."
                ),
            ),
            not_delivered("Nothing is delivered while the source Secret is missing."),
            None,
        ),
        Observation::BundleConflict { bundle } => (
            SyncStatus::Error,
            State::no(
                "BundleConflict",
                format!(
                    "Bundle {bundle} exists and is not owned by this handshake; it is left untouched. Delete or rename it, or rename the handshake."
                ),
            ),
            not_delivered("Nothing is delivered while another Bundle holds the name."),
            None,
        ),
        Observation::ApiFailure { message } => (
            SyncStatus::Error,
            State::unknown("ApiError", message.clone()),
            State::unknown(
                "ApiError",
                "Delivery state is unknown while the API server call fails.".to_string(),
            ),
            None,
        ),
        Observation::Applied {
            bundle,
            bundle_generation,
            fleet,
        } => {
            let applied = State::yes(
                "BundleApplied",
                format!("Bundle {bundle} matches the source Secret."),
            );
            let (status, delivered, ready_clusters) =
                assess_delivery(*bundle_generation, fleet.as_ref());
            (status, applied, delivered, ready_clusters)
        }
    }
}

/// Reads Fleet's report on our Bundle.
fn assess_delivery(
    bundle_generation: Option<i64>,
    fleet: Option<&BundleStatus>,
) -> (SyncStatus, State, Option<String>) {
    let waiting = || {
        (
            SyncStatus::Pending,
            State::unknown(
                "WaitingForFleet",
                "Fleet has not yet processed the current Bundle.".to_string(),
            ),
            None,
        )
    };
    let Some(fleet) = fleet else {
        return waiting();
    };
    let current = match (fleet.observed_generation, bundle_generation) {
        (Some(observed), Some(generation)) => observed >= generation,
        // Fleet versions that do not report observedGeneration: trust the summary.
        (None, _) | (_, None) => fleet.summary.is_some(),
    };
    let Some(summary) = fleet.summary.as_ref().filter(|_| current) else {
        return waiting();
    };
    let ready_clusters = Some(format!("{}/{}", summary.ready, summary.desired_ready));
    if summary.desired_ready == 0 {
        return (
            SyncStatus::Pending,
            State::no(
                "NoMatchingClusters",
                "No Fleet cluster in this namespace matches the targets (is the namespace a Fleet workspace?).".to_string(),
            ),
            ready_clusters,
        );
    }
    if summary.ready >= summary.desired_ready {
        return (
            SyncStatus::Synced,
            State::yes(
                "AllClustersReady",
                format!(
                    "Delivered to {}/{} clusters.",
                    summary.ready, summary.desired_ready
                ),
            ),
            ready_clusters,
        );
    }
    let failing: Vec<String> = summary
        .non_ready_resources
        .iter()
        .map(|resource| format!("{} ({})", resource.name, resource.bundle_state))
        .collect();
    let detail = if failing.is_empty() {
        String::new()
    } else {
        format!(" Not ready: {}.", failing.join(", "))
    };
    if summary.err_applied > 0 {
        return (
            SyncStatus::Error,
            State::no(
                "DeliveryFailed",
                format!(
                    "Fleet failed to apply on {} of {} clusters.{detail}",
                    summary.err_applied, summary.desired_ready
                ),
            ),
            ready_clusters,
        );
    }
    (
        SyncStatus::Pending,
        State::no(
            "InProgress",
            format!(
                "Ready on {}/{} clusters.{detail}",
                summary.ready, summary.desired_ready
            ),
        ),
        ready_clusters,
    )
}
