//! One reconcile of one handshake, as separate steps: dereference, validate,
//! render, apply, status.

use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{DeleteParams, Patch, PatchParams, Preconditions};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use kube::{Api, Resource, ResourceExt};
use serde_json::json;
use tracing::{debug, info, instrument, warn};

use super::{Context, FIELD_MANAGER, resync};
use crate::api::{Bundle, FleetHandshake, FleetHandshakeStatus, SyncStatus};
use crate::render::{self, RenderError, is_controlled_by, is_up_to_date};
use crate::status::{Observation, READY, compute_status};

/// How often a handshake blocked by someone else's Bundle or Secret looks
/// again (that object is not watched, since it is not ours).
const CONFLICT_RECHECK: Duration = Duration::from_secs(10);

/// A failed step of a reconcile. Messages name the step and the API
/// server's reason, never object content: an API error about a Bundle can
/// quote the Bundle, and the Bundle holds Secret data.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading an object failed.
    #[error("reading {what} failed: {}", describe(.source))]
    Read {
        what: &'static str,
        source: kube::Error,
    },
    /// Applying the Bundle failed.
    #[error("applying Bundle failed: {}", describe(.source))]
    ApplyBundle { source: kube::Error },
    /// Applying the Secret copy failed.
    #[error("applying the Secret copy failed: {}", describe(.source))]
    ApplyCopy { source: kube::Error },
    /// Deleting a Bundle or Secret copy failed.
    #[error("deleting {what} failed: {}", describe(.source))]
    Delete {
        what: &'static str,
        source: kube::Error,
    },
    /// Writing the handshake's status failed.
    #[error("writing status failed: {}", describe(.source))]
    WriteStatus { source: kube::Error },
    /// The handshake cannot be rendered yet.
    #[error("rendering Bundle failed: {0}")]
    Render(#[from] RenderError),
}

impl Error {
    /// Short label for metrics.
    pub fn step(&self) -> &'static str {
        match self {
            Error::Read { .. } => "read",
            Error::ApplyBundle { .. } => "apply",
            Error::ApplyCopy { .. } => "apply-copy",
            Error::Delete { .. } => "delete",
            Error::WriteStatus { .. } => "status",
            Error::Render(_) => "render",
        }
    }
}

/// The API server's verdict without its free-text message, which may quote
/// the object that was sent.
fn describe(error: &kube::Error) -> String {
    match error {
        kube::Error::Api(status) => format!("{} ({})", status.reason, status.code),
        kube::Error::HyperError(_) | kube::Error::Service(_) => {
            "the API server could not be reached".to_string()
        }
        _ => "unexpected client error".to_string(),
    }
}

/// Namespace and name of the Secret a handshake reads. An empty
/// `secretNamespace` (as the original operator allowed) means the
/// handshake's own namespace.
pub fn source_of(handshake: &FleetHandshake) -> (&str, &str) {
    let namespace = handshake
        .spec
        .secret_namespace
        .as_deref()
        .filter(|namespace| !namespace.is_empty())
        .or(handshake.metadata.namespace.as_deref())
        .unwrap_or_default();
    (namespace, handshake.spec.secret_name.as_str())
}

#[instrument(skip_all, fields(handshake = %handshake.name_any(), namespace = handshake.namespace().unwrap_or_default()))]
pub async fn reconcile(
    handshake: Arc<FleetHandshake>,
    context: Arc<Context>,
) -> Result<Action, Error> {
    if handshake.metadata.deletion_timestamp.is_some() {
        // Garbage collection removes the Bundle through its owner reference.
        return Ok(Action::await_change());
    }
    let started = Instant::now();
    let outcome = sync(&handshake, &context).await;
    let observation = match &outcome {
        Ok(observation) => observation.clone(),
        Err(error) => Observation::ApiFailure {
            message: error.to_string(),
        },
    };
    let status_written = write_status(&handshake, &observation, &context).await;
    context
        .metrics
        .observe_reconcile(started.elapsed(), outcome.as_ref().err().map(Error::step));
    let observation = outcome?;
    status_written?;
    context.forget_failures(&handshake);
    Ok(match observation {
        // Look again soon, so the handshake takes over promptly once the
        // other object is gone.
        Observation::BundleConflict { .. } | Observation::CopyConflict { .. } => {
            Action::requeue(CONFLICT_RECHECK.min(context.settings.resync_interval))
        }
        _ => resync(&context.settings),
    })
}

pub fn error_policy(
    handshake: Arc<FleetHandshake>,
    error: &Error,
    context: Arc<Context>,
) -> Action {
    let delay = context.backoff(&handshake);
    warn!(handshake = %handshake.name_any(), namespace = handshake.namespace().unwrap_or_default(), %error, retry_in = ?delay, "reconcile failed");
    Action::requeue(delay)
}

/// Brings the Bundle (and, for `DownstreamResources` delivery, the Secret
/// copy) in line with the source Secret; returns what was seen.
async fn sync(handshake: &FleetHandshake, context: &Context) -> Result<Observation, Error> {
    if let Some(message) = invalid_spec(handshake) {
        return Ok(Observation::InvalidSpec { message });
    }
    let namespace = handshake.namespace().unwrap_or_default();
    let name = handshake.name_any();
    let (source_namespace, source_name) = source_of(handshake);
    let policy = &context.settings.source_policy;
    let workspace = Workspace {
        bundles: Api::namespaced(context.client.clone(), &namespace),
        secrets: Api::namespaced(context.client.clone(), &namespace),
        context,
    };

    let observed = workspace
        .bundles
        .get_opt(&name)
        .await
        .map_err(|source| Error::Read {
            what: "Bundle",
            source,
        })?;
    if let Some(observed) = &observed
        && !is_controlled_by(observed, handshake)
    {
        return Ok(Observation::BundleConflict {
            bundle: format!("{namespace}/{name}"),
        });
    }

    if let Err(message) = policy.check_namespace(&namespace, source_namespace) {
        workspace.withdraw(observed.as_ref(), handshake).await?;
        return Ok(Observation::SourceNotAllowed { message });
    }
    // One read gives both the consent annotation and the data, so a Secret
    // update cannot slip between the check and the use.
    let source = Api::<Secret>::namespaced(context.client.clone(), source_namespace)
        .get_opt(source_name)
        .await
        .map_err(|source| Error::Read {
            what: "source Secret",
            source,
        })?;
    let Some(source) = source else {
        // The copy must not outlive its source: remove the Bundle, and Fleet
        // removes the Secret from every target cluster.
        workspace.withdraw(observed.as_ref(), handshake).await?;
        return Ok(Observation::SourceMissing {
            namespace: source_namespace.to_string(),
            name: source_name.to_string(),
        });
    };
    if is_controlled_by(&source, handshake) {
        return Ok(Observation::InvalidSpec {
            message: format!(
                "Secret {source_namespace}/{source_name} is the copy this handshake maintains, not a source; name the original Secret."
            ),
        });
    }
    if let Err(message) = policy.check_source(
        &namespace,
        source_namespace,
        source.metadata.annotations.as_ref(),
    ) {
        workspace.withdraw(observed.as_ref(), handshake).await?;
        return Ok(Observation::SourceNotAllowed { message });
    }

    let delivery = render::effective_delivery(&handshake.spec, context.settings.default_delivery);
    // The copy goes first, so that Fleet finds it when the Bundle names it.
    let copy = render::render_copy(handshake, &source, delivery)?;
    if let Some(copy) = &copy
        && !workspace.ensure_copy(copy, handshake).await?
    {
        // The Bundle may already name that Secret; Fleet must not deliver
        // someone else's Secret in our place.
        workspace.withdraw(observed.as_ref(), handshake).await?;
        return Ok(Observation::CopyConflict {
            secret: format!("{namespace}/{}", copy.name_any()),
        });
    }
    let desired = render::render_bundle(handshake, &source, delivery)?;
    let current = match &observed {
        Some(observed) if is_up_to_date(&desired, observed) => {
            debug!("Bundle is up to date");
            observed.clone()
        }
        _ => {
            let applied = workspace
                .bundles
                .patch(
                    &name,
                    &PatchParams::apply(FIELD_MANAGER).force(),
                    &Patch::Apply(&desired),
                )
                .await
                .map_err(|source| Error::ApplyBundle { source })?;
            context.metrics.object_written("apply");
            info!(bundle = %name, "Bundle applied");
            applied
        }
    };
    let keep = copy.as_ref().map(ResourceExt::name_any);
    workspace
        .remove_stale_copies(observed.as_ref(), keep.as_deref(), handshake)
        .await?;
    Ok(Observation::Applied {
        bundle: format!("{namespace}/{name}"),
        bundle_generation: current.metadata.generation,
        fleet: current.status,
    })
}

/// The handshake's namespace: where its Bundle and Secret copies live.
struct Workspace<'a> {
    bundles: Api<Bundle>,
    secrets: Api<Secret>,
    context: &'a Context,
}

impl Workspace<'_> {
    /// Stops delivery: deletes our Bundle (Fleet then removes the Secret from
    /// every target cluster) and our Secret copies.
    async fn withdraw(
        &self,
        observed: Option<&Bundle>,
        handshake: &FleetHandshake,
    ) -> Result<(), Error> {
        let Some(observed) = observed else {
            return Ok(());
        };
        self.delete(&self.bundles, observed, "Bundle").await?;
        self.remove_stale_copies(Some(observed), None, handshake)
            .await
    }

    /// Writes the Secret copy unless it is up to date. `false` when a Secret
    /// of that name exists and is not ours (it is left untouched).
    async fn ensure_copy(
        &self,
        desired: &Secret,
        handshake: &FleetHandshake,
    ) -> Result<bool, Error> {
        let name = desired.name_any();
        let observed = self
            .secrets
            .get_opt(&name)
            .await
            .map_err(|source| Error::Read {
                what: "Secret copy",
                source,
            })?;
        match observed {
            Some(observed) if !is_controlled_by(&observed, handshake) => Ok(false),
            Some(observed) if render::copy_is_up_to_date(desired, &observed) => Ok(true),
            _ => {
                self.secrets
                    .patch(
                        &name,
                        &PatchParams::apply(FIELD_MANAGER).force(),
                        &Patch::Apply(desired),
                    )
                    .await
                    .map_err(|source| Error::ApplyCopy { source })?;
                self.context.metrics.object_written("apply-copy");
                info!(secret = %name, "Secret copy applied");
                Ok(true)
            }
        }
    }

    /// Deletes our copies that the observed Bundle named and that are no
    /// longer wanted (delivery changed, source renamed, delivery withdrawn).
    async fn remove_stale_copies(
        &self,
        observed: Option<&Bundle>,
        keep: Option<&str>,
        handshake: &FleetHandshake,
    ) -> Result<(), Error> {
        let named = observed
            .map(|bundle| bundle.spec.downstream_resources.as_slice())
            .unwrap_or_default()
            .iter()
            .filter(|resource| resource.kind == "Secret" && Some(resource.name.as_str()) != keep);
        for resource in named {
            let copy = self
                .secrets
                .get_metadata_opt(&resource.name)
                .await
                .map_err(|source| Error::Read {
                    what: "Secret copy",
                    source,
                })?;
            if let Some(copy) = copy.filter(|copy| is_controlled_by(copy, handshake)) {
                self.delete(&self.secrets, &copy, "Secret copy").await?;
            }
        }
        Ok(())
    }

    /// Deletes `object`, only if it is still the object we looked at.
    async fn delete<K, O>(&self, api: &Api<K>, object: &O, what: &'static str) -> Result<(), Error>
    where
        K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
        O: Resource,
    {
        let params = DeleteParams {
            preconditions: Some(Preconditions {
                uid: object.meta().uid.clone(),
                resource_version: None,
            }),
            ..DeleteParams::background()
        };
        match api.delete(&object.name_any(), &params).await {
            Ok(_) => {
                self.context.metrics.object_written("delete");
                info!(name = %object.name_any(), what, "deleted: delivery withdrawn");
                Ok(())
            }
            Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
            Err(source) => Err(Error::Delete { what, source }),
        }
    }
}

/// Spec problems the CRD schema cannot express.
fn invalid_spec(handshake: &FleetHandshake) -> Option<String> {
    if handshake.spec.targets.is_empty() {
        return Some("spec.targets is empty: the Secret would reach no cluster.".to_string());
    }
    let without_criteria: Vec<String> = handshake
        .spec
        .targets
        .iter()
        .enumerate()
        .filter(|(_, target)| !target.has_criteria())
        .map(|(index, _)| index.to_string())
        .collect();
    (!without_criteria.is_empty()).then(|| {
        format!(
            "spec.targets[{}] has no clusterName, clusterSelector, clusterGroup or clusterGroupSelector, so Fleet would match no cluster with it.",
            without_criteria.join(", ")
        )
    })
}

/// Writes the status if it differs from the stored one, and records an event
/// when the status word changes.
async fn write_status(
    handshake: &FleetHandshake,
    observation: &Observation,
    context: &Context,
) -> Result<(), Error> {
    let previous = context.current_status(handshake);
    let now = Time(k8s_openapi::jiff::Timestamp::now());
    let status = compute_status(
        handshake.metadata.generation,
        observation,
        previous.as_ref(),
        &now,
    );
    if previous.as_ref() == Some(&status) {
        return Ok(());
    }
    let api: Api<FleetHandshake> = Api::namespaced(
        context.client.clone(),
        &handshake.namespace().unwrap_or_default(),
    );
    let patch = json!({
        "apiVersion": FleetHandshake::api_version(&()),
        "kind": FleetHandshake::kind(&()),
        "status": status,
    });
    api.patch_status(
        &handshake.name_any(),
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await
    .map_err(|source| Error::WriteStatus { source })?;
    context.metrics.status_written();
    context.remember_written_status(handshake, status.clone());
    if previous.and_then(|status| status.status) != status.status {
        publish_event(handshake, &status, context).await;
    }
    Ok(())
}

/// Records the new state as a Kubernetes event; failure to record is logged,
/// not retried (events are best effort).
async fn publish_event(
    handshake: &FleetHandshake,
    status: &FleetHandshakeStatus,
    context: &Context,
) {
    let Some(word) = status.status else { return };
    let ready = status
        .conditions
        .iter()
        .find(|condition| condition.type_ == READY);
    let event = Event {
        type_: match word {
            SyncStatus::Error | SyncStatus::Missing => EventType::Warning,
            SyncStatus::Pending | SyncStatus::Synced => EventType::Normal,
        },
        reason: ready
            .map(|condition| condition.reason.clone())
            .unwrap_or_else(|| word.as_str().to_string()),
        note: ready.map(|condition| condition.message.clone()),
        action: "Reconcile".to_string(),
        secondary: None,
    };
    info!(status = word.as_str(), reason = %event.reason, "status changed");
    if let Err(error) = context
        .recorder
        .publish(&event, &handshake.object_ref(&()))
        .await
    {
        warn!(error = %describe(&error), "recording event failed");
    }
}
