//! Logs, Prometheus metrics and the health/metrics HTTP server.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tracing_subscriber::EnvFilter;

/// Log line format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

/// Crates whose verbose levels can print request or response content (TLS
/// records, HTTP/2 frames, connection buffers, the API server's error
/// messages, which may quote the object sent). They are capped whatever the
/// configured filter says, because that content includes Secret data.
const PAYLOAD_LOGGING_CRATES: [&str; 6] = [
    "rustls",
    "h2",
    "hyper",
    "hyper_util",
    "tower",
    "kube_client",
];

/// Installs the global log subscriber. `filter` is an `EnvFilter` directive
/// such as `info` or `fleet_handshake=debug,kube=info`.
pub fn init_logging(filter: &str, format: LogFormat) -> anyhow::Result<()> {
    let filter =
        PAYLOAD_LOGGING_CRATES
            .iter()
            .try_fold(EnvFilter::try_new(filter)?, |filter, krate| {
                Ok::<_, anyhow::Error>(filter.add_directive(format!("{krate}=info").parse()?))
            })?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    }
    .map_err(|error| anyhow::anyhow!("installing the log subscriber: {error}"))
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OperationLabels {
    operation: &'static str,
}

/// The operator's metrics. Labels never carry object content.
pub struct Metrics {
    registry: Registry,
    reconciliations: Family<ResultLabels, Counter>,
    reconcile_duration: Histogram,
    object_writes: Family<OperationLabels, Counter>,
    status_writes: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("fleet_handshake");
        let reconciliations = Family::<ResultLabels, Counter>::default();
        registry.register(
            "reconciliations",
            "Reconciles by result (ok, or the failing step)",
            reconciliations.clone(),
        );
        let reconcile_duration = Histogram::new(exponential_buckets(0.005, 2.0, 12));
        registry.register(
            "reconcile_duration_seconds",
            "Time spent in one reconcile",
            reconcile_duration.clone(),
        );
        let object_writes = Family::<OperationLabels, Counter>::default();
        registry.register(
            "object_writes",
            "Writes of Bundles and Secret copies by operation (apply, apply-copy, delete)",
            object_writes.clone(),
        );
        let status_writes = Counter::default();
        registry.register(
            "status_writes",
            "Handshake status writes",
            status_writes.clone(),
        );
        Self {
            registry,
            reconciliations,
            reconcile_duration,
            object_writes,
            status_writes,
        }
    }
}

impl Metrics {
    /// Records one reconcile; `failed_step` is `None` on success.
    pub fn observe_reconcile(&self, elapsed: Duration, failed_step: Option<&'static str>) {
        self.reconcile_duration.observe(elapsed.as_secs_f64());
        self.reconciliations
            .get_or_create(&ResultLabels {
                result: failed_step.unwrap_or("ok"),
            })
            .inc();
    }

    /// Records one write of a Bundle.
    pub fn object_written(&self, operation: &'static str) {
        self.object_writes
            .get_or_create(&OperationLabels { operation })
            .inc();
    }

    /// Records one write of a handshake status.
    pub fn status_written(&self) {
        self.status_writes.inc();
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)
            .expect("writing metrics to a String cannot fail");
        text
    }
}

#[derive(Clone)]
struct Health {
    metrics: Arc<Metrics>,
    ready: Arc<AtomicBool>,
}

/// Serves `/metrics`, `/healthz` (alive) and `/readyz` (caches synced) until
/// the process ends.
pub async fn serve(
    address: SocketAddr,
    metrics: Arc<Metrics>,
    ready: Arc<AtomicBool>,
) -> anyhow::Result<()> {
    let app = Router::new()
        .route("/metrics", get(metrics_text))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readiness))
        .with_state(Health { metrics, ready });
    let listener = tokio::net::TcpListener::bind(address).await?;
    tracing::info!(address = %listener.local_addr()?, "serving metrics and health");
    axum::serve(listener, app).await?;
    Ok(())
}

async fn metrics_text(State(health): State<Health>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        health.metrics.encode(),
    )
}

async fn readiness(State(health): State<Health>) -> impl IntoResponse {
    if health.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ready")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "caches not synced")
    }
}
