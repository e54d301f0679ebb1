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
    /// The Secret copy for `DownstreamResources` delivery would overwrite a
    /// Secret that is not ours.
    CopyConflict { secret: String },
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
            // Fixing a typo must not first remove the Secret everywhere, so an
            // existing Bundle is kept as it was; its delivery is not tracked.
            State::unknown(
                "NotUpdated",
                "The Bundle, if any, is left as it was while the spec is invalid.".to_string(),
            ),
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
        Observation::CopyConflict { secret } => (
            SyncStatus::Error,
            State::no(
                "CopyConflict",
                format!(
                    "Secret {secret} exists and is not owned by this handshake, so the copy that Fleet's downstreamResources needs cannot be written; it is left untouched."
                ),
            ),
            not_delivered("Nothing is delivered while another Secret holds the copy's name."),
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
    // While Fleet catches up with a new Bundle generation, the last figures
    // it reported stay visible (the Clusters column does not blank out).
    let last_reported = fleet
        .and_then(|fleet| fleet.summary.as_ref())
        .map(|summary| format!("{}/{}", summary.ready, summary.desired_ready));
    let waiting = || {
        (
            SyncStatus::Pending,
            State::unknown(
                "WaitingForFleet",
                "Fleet has not yet processed the current Bundle.".to_string(),
            ),
            last_reported.clone(),
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

#[cfg(test)]
mod tests {
    use k8s_openapi::jiff::Timestamp;
    use serde_json::json;

    use super::*;
    use crate::api::BundleSummary;
    use crate::api::fleet::NonReadyResource;

    fn at(second: i64) -> Time {
        Time(Timestamp::from_second(second).expect("a valid time"))
    }

    const T0: i64 = 1_700_000_000;

    fn summary(desired_ready: i64, ready: i64) -> BundleSummary {
        BundleSummary {
            desired_ready,
            ready,
            ..BundleSummary::default()
        }
    }

    fn fleet(observed_generation: Option<i64>, summary: Option<BundleSummary>) -> BundleStatus {
        BundleStatus {
            observed_generation,
            summary,
            ..BundleStatus::default()
        }
    }

    fn applied(fleet: Option<BundleStatus>) -> Observation {
        Observation::Applied {
            bundle: "fleet-default/my-handshake".to_string(),
            bundle_generation: Some(2),
            fleet,
        }
    }

    fn synced() -> Observation {
        applied(Some(fleet(Some(2), Some(summary(2, 2)))))
    }

    fn compute(observation: &Observation) -> FleetHandshakeStatus {
        compute_status(Some(5), observation, None, &at(T0))
    }

    fn condition<'a>(status: &'a FleetHandshakeStatus, type_: &str) -> &'a Condition {
        let matching: Vec<&Condition> = status
            .conditions
            .iter()
            .filter(|condition| condition.type_ == type_)
            .collect();
        assert_eq!(matching.len(), 1, "exactly one {type_} condition");
        matching[0]
    }

    /// `(status, reason)` of a condition.
    fn state<'a>(status: &'a FleetHandshakeStatus, type_: &str) -> (&'a str, &'a str) {
        let condition = condition(status, type_);
        (condition.status.as_str(), condition.reason.as_str())
    }

    fn message<'a>(status: &'a FleetHandshakeStatus, type_: &str) -> &'a str {
        condition(status, type_).message.as_str()
    }

    /// Checks the shape every status has: the three conditions in order,
    /// each with the generation and a reason.
    fn assert_well_formed(status: &FleetHandshakeStatus, generation: Option<i64>) {
        let types: Vec<&str> = status
            .conditions
            .iter()
            .map(|condition| condition.type_.as_str())
            .collect();
        assert_eq!(types, [READY, BUNDLE_APPLIED, DELIVERED]);
        assert_eq!(status.observed_generation, generation);
        for condition in &status.conditions {
            assert_eq!(
                condition.observed_generation, generation,
                "{}",
                condition.type_
            );
            assert!(!condition.reason.is_empty());
            assert!(!condition.message.is_empty(), "{}", condition.type_);
            assert!(["True", "False", "Unknown"].contains(&condition.status.as_str()));
        }
    }

    // ---- every observation ----------------------------------------------

    #[test]
    fn invalid_spec() {
        let explanation = "spec.targets[0] has no clusterName.";
        let status = compute(&Observation::InvalidSpec {
            message: explanation.to_string(),
        });
        assert_well_formed(&status, Some(5));
        assert_eq!(status.status, Some(SyncStatus::Error));
        assert_eq!(state(&status, READY), ("False", "InvalidSpec"));
        assert_eq!(message_of_ready(&status), explanation);
        assert_eq!(state(&status, BUNDLE_APPLIED), ("False", "InvalidSpec"));
        assert_eq!(message(&status, BUNDLE_APPLIED), explanation);
        assert_eq!(
            message(&status, DELIVERED),
            "The Bundle, if any, is left as it was while the spec is invalid."
        );
        assert_eq!(state(&status, DELIVERED), ("Unknown", "NotUpdated"));
        assert_eq!(status.ready_clusters, None);
    }

    fn message_of_ready(status: &FleetHandshakeStatus) -> &str {
        message(status, READY)
    }

    #[test]
    fn source_not_allowed() {
        let status = compute(&Observation::SourceNotAllowed {
            message: "Secret kube-system/x may not be read from fleet-default.".to_string(),
        });
        assert_well_formed(&status, Some(5));
        assert_eq!(status.status, Some(SyncStatus::Error));
        assert_eq!(state(&status, READY), ("False", "SourceNotAllowed"));
        assert_eq!(
            state(&status, BUNDLE_APPLIED),
            ("False", "SourceNotAllowed")
        );
        assert_eq!(state(&status, DELIVERED), ("False", "NotDelivered"));
        assert_eq!(
            message_of_ready(&status),
            "Secret kube-system/x may not be read from fleet-default."
        );
        assert_eq!(status.ready_clusters, None);
    }

    #[test]
    fn source_missing() {
        let status = compute(&Observation::SourceMissing {
            namespace: "default".to_string(),
            name: "my-secret".to_string(),
        });
        assert_well_formed(&status, Some(5));
        assert_eq!(status.status, Some(SyncStatus::Missing));
        assert_eq!(state(&status, READY), ("False", "SourceMissing"));
        assert_eq!(state(&status, BUNDLE_APPLIED), ("False", "SourceMissing"));
        assert_eq!(state(&status, DELIVERED), ("False", "NotDelivered"));
        assert_eq!(
            message(&status, BUNDLE_APPLIED),
            "Secret default/my-secret does not exist; the Bundle was removed so no stale copy is delivered."
        );
        assert_eq!(message_of_ready(&status), message(&status, BUNDLE_APPLIED));
        assert_eq!(status.ready_clusters, None);
    }

    #[test]
    fn bundle_conflict() {
        let status = compute(&Observation::BundleConflict {
            bundle: "fleet-default/my-handshake".to_string(),
        });
        assert_well_formed(&status, Some(5));
        assert_eq!(status.status, Some(SyncStatus::Error));
        assert_eq!(state(&status, READY), ("False", "BundleConflict"));
        assert_eq!(state(&status, BUNDLE_APPLIED), ("False", "BundleConflict"));
        assert_eq!(state(&status, DELIVERED), ("False", "NotDelivered"));
        assert!(message_of_ready(&status).starts_with(
            "Bundle fleet-default/my-handshake exists and is not owned by this handshake"
        ));
        assert_eq!(status.ready_clusters, None);
    }

    #[test]
    fn api_failure() {
        let status = compute(&Observation::ApiFailure {
            message: "reading Bundle failed: Forbidden (403)".to_string(),
        });
        assert_well_formed(&status, Some(5));
        assert_eq!(status.status, Some(SyncStatus::Error));
        assert_eq!(state(&status, READY), ("False", "ApiError"));
        assert_eq!(state(&status, BUNDLE_APPLIED), ("Unknown", "ApiError"));
        assert_eq!(state(&status, DELIVERED), ("Unknown", "ApiError"));
        assert_eq!(
            message_of_ready(&status),
            "reading Bundle failed: Forbidden (403)"
        );
        assert_eq!(status.ready_clusters, None);
    }

    #[test]
    fn applied_and_delivered_everywhere() {
        let status = compute(&synced());
        assert_well_formed(&status, Some(5));
        assert_eq!(status.status, Some(SyncStatus::Synced));
        assert_eq!(state(&status, READY), ("True", "Synced"));
        assert_eq!(state(&status, BUNDLE_APPLIED), ("True", "BundleApplied"));
        assert_eq!(state(&status, DELIVERED), ("True", "AllClustersReady"));
        assert_eq!(
            message(&status, BUNDLE_APPLIED),
            "Bundle fleet-default/my-handshake matches the source Secret."
        );
        assert_eq!(message(&status, DELIVERED), "Delivered to 2/2 clusters.");
        assert_eq!(message_of_ready(&status), "Delivered to 2/2 clusters.");
        assert_eq!(status.ready_clusters.as_deref(), Some("2/2"));
    }

    #[test]
    fn conditions_carry_the_generation_and_none_when_unknown() {
        for generation in [Some(1), Some(42), None] {
            let status = compute_status(generation, &synced(), None, &at(T0));
            assert_well_formed(&status, generation);
        }
    }

    #[test]
    fn first_status_stamps_every_condition_with_now() {
        let status = compute(&synced());
        for condition in &status.conditions {
            assert_eq!(
                condition.last_transition_time,
                at(T0),
                "{}",
                condition.type_
            );
        }
    }

    #[test]
    fn wire_form_has_the_original_status_word_and_condition_fields() {
        let status = compute(&synced());
        let wire = serde_json::to_value(&status).unwrap();
        assert_eq!(wire["status"], "Synced");
        assert_eq!(wire["observedGeneration"], 5);
        assert_eq!(wire["readyClusters"], "2/2");
        assert_eq!(
            wire["conditions"][0],
            json!({
                "type": "Ready",
                "status": "True",
                "reason": "Synced",
                "message": "Delivered to 2/2 clusters.",
                "observedGeneration": 5,
                "lastTransitionTime": "2023-11-14T22:13:20Z",
            })
        );
        let back: FleetHandshakeStatus = serde_json::from_value(wire).unwrap();
        assert_eq!(back, status);
        for word in [
            SyncStatus::Pending,
            SyncStatus::Missing,
            SyncStatus::Synced,
            SyncStatus::Error,
        ] {
            assert_eq!(serde_json::to_value(word).unwrap(), json!(word.as_str()));
        }
    }

    // ---- delivery -------------------------------------------------------

    /// `(status word, Delivered reason, Ready reason, readyClusters)`.
    fn delivery(
        bundle_generation: Option<i64>,
        fleet: Option<BundleStatus>,
    ) -> (SyncStatus, String, String, Option<String>) {
        let status = compute(&Observation::Applied {
            bundle: "fleet-default/my-handshake".to_string(),
            bundle_generation,
            fleet,
        });
        assert_well_formed(&status, Some(5));
        assert_eq!(state(&status, BUNDLE_APPLIED), ("True", "BundleApplied"));
        (
            status.status.unwrap(),
            condition(&status, DELIVERED).reason.clone(),
            condition(&status, READY).reason.clone(),
            status.ready_clusters,
        )
    }

    #[test]
    fn no_fleet_status_is_waiting_for_fleet() {
        let status = compute(&applied(None));
        assert_eq!(status.status, Some(SyncStatus::Pending));
        assert_eq!(state(&status, DELIVERED), ("Unknown", "WaitingForFleet"));
        assert_eq!(state(&status, READY), ("False", "WaitingForFleet"));
        assert_eq!(
            message_of_ready(&status),
            "Fleet has not yet processed the current Bundle."
        );
        assert_eq!(status.ready_clusters, None);

        // A status without a summary is no report either.
        let (word, delivered, _, clusters) = delivery(Some(2), Some(fleet(Some(2), None)));
        assert_eq!(
            (word, delivered.as_str(), clusters),
            (SyncStatus::Pending, "WaitingForFleet", None)
        );
    }

    #[test]
    fn fleet_behind_the_bundle_generation_is_waiting() {
        // Even a summary that says all is ready describes an older Bundle.
        let (word, delivered, ready, clusters) =
            delivery(Some(3), Some(fleet(Some(2), Some(summary(2, 2)))));
        assert_eq!(word, SyncStatus::Pending);
        assert_eq!(delivered, "WaitingForFleet");
        assert_eq!(ready, "WaitingForFleet");
        assert_eq!(
            clusters.as_deref(),
            Some("2/2"),
            "the last report stays visible"
        );

        // Caught up (or ahead) counts as current.
        for observed in [3, 4] {
            let (word, delivered, _, _) =
                delivery(Some(3), Some(fleet(Some(observed), Some(summary(2, 2)))));
            assert_eq!(word, SyncStatus::Synced, "observed {observed}");
            assert_eq!(delivered, "AllClustersReady");
        }
    }

    #[test]
    fn missing_generations_trust_the_summary() {
        for (bundle_generation, observed) in [(Some(3), None), (None, Some(1)), (None, None)] {
            let (word, delivered, _, clusters) = delivery(
                bundle_generation,
                Some(fleet(observed, Some(summary(1, 1)))),
            );
            assert_eq!(
                word,
                SyncStatus::Synced,
                "{bundle_generation:?} {observed:?}"
            );
            assert_eq!(delivered, "AllClustersReady");
            assert_eq!(clusters.as_deref(), Some("1/1"));
        }
    }

    #[test]
    fn no_matching_clusters() {
        let status = compute(&applied(Some(fleet(Some(2), Some(summary(0, 0))))));
        assert_eq!(status.status, Some(SyncStatus::Pending));
        assert_eq!(state(&status, DELIVERED), ("False", "NoMatchingClusters"));
        assert_eq!(state(&status, READY), ("False", "NoMatchingClusters"));
        assert!(
            message_of_ready(&status).starts_with("No Fleet cluster in this namespace matches")
        );
        assert_eq!(status.ready_clusters.as_deref(), Some("0/0"));
    }

    #[test]
    fn delivery_failed_names_the_clusters_and_nothing_else() {
        let fleet_detail = "helm error: cannot patch Secret with data password=hunter2";
        let status = compute(&applied(Some(BundleStatus {
            observed_generation: Some(2),
            conditions: vec![Condition {
                type_: "Ready".to_string(),
                status: "False".to_string(),
                reason: "Error".to_string(),
                message: fleet_detail.to_string(),
                observed_generation: Some(2),
                last_transition_time: at(T0 - 60),
            }],
            summary: Some(BundleSummary {
                desired_ready: 3,
                ready: 1,
                err_applied: 1,
                wait_applied: 1,
                non_ready_resources: vec![
                    NonReadyResource {
                        name: "downstream-a".to_string(),
                        bundle_state: "ErrApplied".to_string(),
                        message: fleet_detail.to_string(),
                    },
                    NonReadyResource {
                        name: "downstream-b".to_string(),
                        bundle_state: "WaitApplied".to_string(),
                        message: fleet_detail.to_string(),
                    },
                ],
                ..BundleSummary::default()
            }),
            extra: [("display".to_string(), json!({"message": fleet_detail}))]
                .into_iter()
                .collect(),
        })));
        assert_well_formed(&status, Some(5));
        assert_eq!(status.status, Some(SyncStatus::Error));
        assert_eq!(state(&status, DELIVERED), ("False", "DeliveryFailed"));
        assert_eq!(state(&status, READY), ("False", "DeliveryFailed"));
        assert_eq!(
            message(&status, DELIVERED),
            "Fleet failed to apply on 1 of 3 clusters. Not ready: downstream-a (ErrApplied), downstream-b (WaitApplied)."
        );
        assert_eq!(message_of_ready(&status), message(&status, DELIVERED));
        assert_eq!(status.ready_clusters.as_deref(), Some("1/3"));
        let everything = serde_json::to_string(&status).unwrap();
        assert!(!everything.contains("hunter2"));
        assert!(!everything.contains("helm error"));
    }

    #[test]
    fn delivery_failed_without_details() {
        let status = compute(&applied(Some(fleet(
            Some(2),
            Some(BundleSummary {
                err_applied: 2,
                ..summary(2, 0)
            }),
        ))));
        assert_eq!(status.status, Some(SyncStatus::Error));
        assert_eq!(
            message(&status, DELIVERED),
            "Fleet failed to apply on 2 of 2 clusters."
        );
    }

    #[test]
    fn partially_ready_is_in_progress() {
        let status = compute(&applied(Some(fleet(
            Some(2),
            Some(BundleSummary {
                wait_applied: 1,
                non_ready_resources: vec![NonReadyResource {
                    name: "downstream-c".to_string(),
                    bundle_state: "WaitApplied".to_string(),
                    message: "agent is busy".to_string(),
                }],
                ..summary(3, 2)
            }),
        ))));
        assert_eq!(status.status, Some(SyncStatus::Pending));
        assert_eq!(state(&status, DELIVERED), ("False", "InProgress"));
        assert_eq!(state(&status, READY), ("False", "InProgress"));
        assert_eq!(
            message(&status, DELIVERED),
            "Ready on 2/3 clusters. Not ready: downstream-c (WaitApplied)."
        );
        assert_eq!(status.ready_clusters.as_deref(), Some("2/3"));

        let bare = compute(&applied(Some(fleet(Some(2), Some(summary(4, 0))))));
        assert_eq!(bare.status, Some(SyncStatus::Pending));
        assert_eq!(message(&bare, DELIVERED), "Ready on 0/4 clusters.");
        assert_eq!(bare.ready_clusters.as_deref(), Some("0/4"));
    }

    #[test]
    fn summary_parsed_from_fleet_json_maps_like_the_typed_one() {
        let fleet: BundleStatus = serde_json::from_value(json!({
            "observedGeneration": 2,
            "summary": {
                "desiredReady": 2,
                "ready": 1,
                "errApplied": 1,
                "nonReadyResources": [
                    {"name": "c1", "bundleState": "ErrApplied", "message": "boom"}
                ],
            },
            "display": {"readyClusters": "1/2", "state": "ErrApplied"},
            "resourcesSha256Sum": "abc",
        }))
        .unwrap();
        let status = compute(&applied(Some(fleet)));
        assert_eq!(status.status, Some(SyncStatus::Error));
        assert_eq!(
            message(&status, DELIVERED),
            "Fleet failed to apply on 1 of 2 clusters. Not ready: c1 (ErrApplied)."
        );
        assert_eq!(status.ready_clusters.as_deref(), Some("1/2"));
    }

    // ---- lastTransitionTime and determinism -----------------------------

    fn every_observation() -> Vec<Observation> {
        vec![
            Observation::InvalidSpec {
                message: "bad".to_string(),
            },
            Observation::SourceNotAllowed {
                message: "no".to_string(),
            },
            Observation::SourceMissing {
                namespace: "default".to_string(),
                name: "my-secret".to_string(),
            },
            Observation::BundleConflict {
                bundle: "fleet-default/my-handshake".to_string(),
            },
            Observation::ApiFailure {
                message: "reading Bundle failed: Forbidden (403)".to_string(),
            },
            applied(None),
            applied(Some(fleet(Some(1), Some(summary(2, 2))))),
            applied(Some(fleet(Some(2), Some(summary(0, 0))))),
            synced(),
            applied(Some(fleet(
                Some(2),
                Some(BundleSummary {
                    err_applied: 1,
                    ..summary(2, 1)
                }),
            ))),
            applied(Some(fleet(Some(2), Some(summary(2, 1))))),
        ]
    }

    #[test]
    fn recomputing_an_unchanged_observation_changes_nothing() {
        for observation in every_observation() {
            let first = compute_status(Some(5), &observation, None, &at(T0));
            let second = compute_status(Some(5), &observation, Some(&first), &at(T0 + 3600));
            assert_eq!(second, first, "{observation:?}");
            // Also after the status went through the API server.
            let stored: FleetHandshakeStatus =
                serde_json::from_value(serde_json::to_value(&first).unwrap()).unwrap();
            let third = compute_status(Some(5), &observation, Some(&stored), &at(T0 + 7200));
            assert_eq!(third, stored, "{observation:?}");
        }
    }

    #[test]
    fn a_new_generation_with_the_same_state_keeps_transition_times() {
        let first = compute_status(Some(5), &synced(), None, &at(T0));
        let second = compute_status(Some(6), &synced(), Some(&first), &at(T0 + 60));
        assert_well_formed(&second, Some(6));
        for condition in &second.conditions {
            assert_eq!(
                condition.last_transition_time,
                at(T0),
                "{}",
                condition.type_
            );
        }
    }

    #[test]
    fn transition_time_kept_when_only_the_reason_changes() {
        // Delivered: False/InProgress -> False/DeliveryFailed.
        let in_progress = applied(Some(fleet(Some(2), Some(summary(2, 1)))));
        let failed = applied(Some(fleet(
            Some(2),
            Some(BundleSummary {
                err_applied: 1,
                ..summary(2, 1)
            }),
        )));
        let first = compute_status(Some(5), &in_progress, None, &at(T0));
        let second = compute_status(Some(5), &failed, Some(&first), &at(T0 + 60));
        assert_eq!(second.status, Some(SyncStatus::Error));
        assert_eq!(state(&second, DELIVERED), ("False", "DeliveryFailed"));
        assert_eq!(state(&second, READY), ("False", "DeliveryFailed"));
        for condition in &second.conditions {
            assert_eq!(
                condition.last_transition_time,
                at(T0),
                "{}",
                condition.type_
            );
        }
    }

    #[test]
    fn transition_time_is_now_for_conditions_whose_status_changed() {
        // Delivered: Unknown/WaitingForFleet -> True; Ready False -> True;
        // BundleApplied stays True.
        let first = compute_status(Some(5), &applied(None), None, &at(T0));
        let second = compute_status(Some(5), &synced(), Some(&first), &at(T0 + 60));
        assert_eq!(
            condition(&second, BUNDLE_APPLIED).last_transition_time,
            at(T0)
        );
        assert_eq!(
            condition(&second, DELIVERED).last_transition_time,
            at(T0 + 60)
        );
        assert_eq!(condition(&second, READY).last_transition_time, at(T0 + 60));

        // And back: the source disappears. Every status flips.
        let third = compute_status(
            Some(5),
            &Observation::SourceMissing {
                namespace: "default".to_string(),
                name: "my-secret".to_string(),
            },
            Some(&second),
            &at(T0 + 120),
        );
        for condition in &third.conditions {
            assert_eq!(
                condition.last_transition_time,
                at(T0 + 120),
                "{}",
                condition.type_
            );
        }

        // Unknown -> False is a change too.
        let api = compute_status(
            Some(5),
            &Observation::ApiFailure {
                message: "x".to_string(),
            },
            None,
            &at(T0),
        );
        let after = compute_status(
            Some(5),
            &Observation::InvalidSpec {
                message: "y".to_string(),
            },
            Some(&api),
            &at(T0 + 1),
        );
        assert_eq!(condition(&after, READY).last_transition_time, at(T0));
        assert_eq!(
            condition(&after, BUNDLE_APPLIED).last_transition_time,
            at(T0 + 1)
        );
        // Delivered stays Unknown (the reason changes): no transition.
        assert_eq!(condition(&after, DELIVERED).last_transition_time, at(T0));
    }

    #[test]
    fn transition_time_is_taken_only_from_the_same_condition_type() {
        // A previous status where only Ready is known, and True.
        let previous = FleetHandshakeStatus {
            status: Some(SyncStatus::Synced),
            observed_generation: Some(5),
            conditions: vec![Condition {
                type_: READY.to_string(),
                status: "True".to_string(),
                reason: "Synced".to_string(),
                message: "old".to_string(),
                observed_generation: Some(4),
                last_transition_time: at(T0 - 1000),
            }],
            ready_clusters: Some("2/2".to_string()),
        };
        let status = compute_status(Some(5), &synced(), Some(&previous), &at(T0));
        assert_eq!(
            condition(&status, READY).last_transition_time,
            at(T0 - 1000)
        );
        // BundleApplied and Delivered are True too, but new.
        assert_eq!(
            condition(&status, BUNDLE_APPLIED).last_transition_time,
            at(T0)
        );
        assert_eq!(condition(&status, DELIVERED).last_transition_time, at(T0));
        // Old message and generation are not carried over.
        assert_eq!(message_of_ready(&status), "Delivered to 2/2 clusters.");
        assert_eq!(condition(&status, READY).observed_generation, Some(5));
    }

    #[test]
    fn unrelated_previous_conditions_are_dropped() {
        let mut previous = compute(&synced());
        previous.conditions.push(Condition {
            type_: "SomethingElse".to_string(),
            status: "True".to_string(),
            reason: "Old".to_string(),
            message: "from an older operator".to_string(),
            observed_generation: Some(1),
            last_transition_time: at(T0 - 1),
        });
        let status = compute_status(Some(5), &synced(), Some(&previous), &at(T0 + 1));
        assert_well_formed(&status, Some(5));
        assert_ne!(status, previous);
    }
}
