//! The `fleet-handshake` command: run the operator, or print its CRD.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use fleet_handshake::api::DeliveryMode;
use fleet_handshake::authorize::{SourceGrant, SourcePolicy};
use fleet_handshake::controller::{self, Settings};
use fleet_handshake::crd;
use fleet_handshake::telemetry::{self, LogFormat, Metrics};
use kube::config::{KubeConfigOptions, Kubeconfig};

#[derive(Parser)]
#[command(
    name = "fleet-handshake",
    version,
    about = "Delivers Secrets to Fleet-managed clusters through Fleet Bundles"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the operator.
    Run(RunArgs),
    /// Print the FleetHandshake CustomResourceDefinition as YAML.
    Crd,
}

#[derive(clap::Args)]
struct RunArgs {
    /// Kubeconfig file; without it, $KUBECONFIG, ~/.kube/config or the
    /// in-cluster service account are used.
    #[arg(long, env = "FLEET_HANDSHAKE_KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
    /// Watch only these namespaces (comma-separated or repeated); the
    /// operator then needs no cluster-wide access. Empty: all namespaces.
    #[arg(
        long = "namespace",
        env = "FLEET_HANDSHAKE_NAMESPACES",
        value_delimiter = ','
    )]
    namespaces: Vec<String>,
    /// Log filter: a level (`info`) or per-module directives
    /// (`fleet_handshake=debug,kube=info`).
    #[arg(long, env = "FLEET_HANDSHAKE_LOG", default_value = "info")]
    log_level: String,
    /// Log format.
    #[arg(
        long,
        env = "FLEET_HANDSHAKE_LOG_FORMAT",
        value_enum,
        default_value = "text"
    )]
    log_format: LogFormat,
    /// Address of the metrics and health server.
    #[arg(
        long,
        env = "FLEET_HANDSHAKE_METRICS_ADDR",
        default_value = "0.0.0.0:8080"
    )]
    metrics_addr: SocketAddr,
    /// Re-check every handshake at least this often, in seconds.
    #[arg(long, env = "FLEET_HANDSHAKE_RESYNC_SECONDS", default_value_t = 600)]
    resync_seconds: u64,
    /// Longest delay between retries of a failing handshake, in seconds.
    #[arg(
        long,
        env = "FLEET_HANDSHAKE_MAX_BACKOFF_SECONDS",
        default_value_t = 300
    )]
    max_backoff_seconds: u64,
    /// Let handshakes in one namespace read Secrets of another without the
    /// Secret's consent: `HANDSHAKE_NAMESPACE=SOURCE_NAMESPACE` (the first
    /// may be `*`); comma-separated or repeated. Without it, a Secret outside
    /// the handshake's namespace must list that namespace in its
    /// `riverpointtechnology.com/handshake-allowed-namespaces` annotation.
    #[arg(
        long = "allow-source",
        env = "FLEET_HANDSHAKE_ALLOW_SOURCES",
        value_delimiter = ','
    )]
    allow_sources: Vec<SourceGrant>,
    /// Delivery for handshakes that set no `spec.delivery`: `Embedded`
    /// (manifest in the Bundle, as the original operator) or
    /// `DownstreamResources` (Fleet copies the Secret object; Fleet v0.16+).
    #[arg(
        long,
        env = "FLEET_HANDSHAKE_DEFAULT_DELIVERY",
        default_value = "Embedded"
    )]
    default_delivery: DeliveryMode,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Crd => {
            print!("{}", crd::crd_yaml()?);
            Ok(())
        }
        Command::Run(args) => run(args).await,
    }
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    telemetry::init_logging(&args.log_level, args.log_format)?;
    let config = match &args.kubeconfig {
        Some(path) => {
            let kubeconfig = Kubeconfig::read_from(path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?
        }
        None => kube::Config::infer().await?,
    };
    let client = kube::Client::try_from(config)?;
    let metrics = Arc::new(Metrics::default());
    let ready = Arc::new(AtomicBool::new(false));
    let namespaces: Vec<String> = args
        .namespaces
        .into_iter()
        .filter(|namespace| !namespace.is_empty())
        .collect();
    let settings = Settings {
        source_policy: SourcePolicy {
            grants: args.allow_sources,
            watched_namespaces: namespaces.clone(),
        },
        default_delivery: args.default_delivery,
        namespaces,
        resync_interval: Duration::from_secs(args.resync_seconds),
        max_backoff: Duration::from_secs(args.max_backoff_seconds.max(1)),
    };
    tracing::info!(namespaces = ?settings.namespaces, "starting fleet-handshake");
    let server = tokio::spawn(telemetry::serve(
        args.metrics_addr,
        metrics.clone(),
        ready.clone(),
    ));
    tokio::select! {
        () = controller::run(client, metrics, settings, ready) => Ok(()),
        served = server => match served {
            Ok(Ok(())) => Ok(()),
            Ok(Err(error)) => Err(error.context("metrics server failed")),
            Err(error) => Err(anyhow::anyhow!("metrics server task failed: {error}")),
        },
    }
}
