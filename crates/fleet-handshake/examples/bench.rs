//! Benchmark: the operator's memory and latency on a real control plane.
//!
//! Run it with `cargo run --release -p fleet-handshake --example bench`
//! (`-- --help` lists the sizes). It starts the test control plane, runs the
//! `fleet-handshake` binary as a subprocess with the admin kubeconfig,
//! watching the whole cluster, and prints figures; it asserts nothing,
//! because timings on a shared machine are too noisy to gate on. What it
//! measures and how to read it: `docs/benchmarks.md`.
//!
//! The operator is a separate process so that its resident memory can be
//! read from `/proc` without the benchmark's own objects mixed in.

use std::future::Future;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};
use clap::Parser;
use fleet_handshake::api::{Bundle, FleetHandshake, SyncStatus};
use fleet_handshake::render::{MANAGED_BY, MANAGED_BY_LABEL};
use futures::{StreamExt as _, TryStreamExt as _};
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::api::events::v1::Event;
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client, ResourceExt};
use serde_json::{Value, json};
use testenv::{ControlPlane, Options};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// How many creations are in flight at once: enough to keep the API server
/// busy during setup without queueing hundreds of requests on 2 cores.
const CONCURRENCY: usize = 16;
/// The handshake whose source is rotated before each memory reading; its
/// Bundle changing proves the Secret watch has caught up with every event
/// sent before the rotation.
const SENTINEL: &str = "bench-sentinel";
/// Variables `cargo run` sets for the program it runs (besides
/// `CARGO_PKG_*`), which must not reach a nested build.
const RUN_VARIABLES: &[&str] = &[
    "CARGO_MANIFEST_DIR",
    "CARGO_MANIFEST_PATH",
    "CARGO_CRATE_NAME",
    "CARGO_BIN_NAME",
    "CARGO_PRIMARY_PACKAGE",
    "CARGO_RUSTC_CURRENT_DIR",
    "OUT_DIR",
];
/// Upper bound for any single wait; everything normally takes seconds.
const WAIT: Duration = Duration::from_secs(120);

#[derive(Parser)]
#[command(about = "Measures fleet-handshake's memory and latency on a local control plane")]
struct Args {
    /// Secrets no handshake refers to, created to show that memory does not
    /// grow with the cluster's Secrets.
    #[arg(long, default_value_t = 2000)]
    unrelated_secrets: usize,
    /// Size of each unrelated Secret's data, in KiB.
    #[arg(long, default_value_t = 8)]
    secret_kib: usize,
    /// Handshakes to create, each with its own small source Secret.
    #[arg(long, default_value_t = 200)]
    handshakes: usize,
    /// Rotations of one source Secret to time.
    #[arg(long, default_value_t = 20)]
    rotations: usize,
    /// Operator binary to run; by default it is built with the benchmark's
    /// own profile, so the figures never come from a stale binary.
    #[arg(long)]
    operator: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let binary = match &args.operator {
        Some(path) => path.clone(),
        None => build_operator()?,
    };
    println!(
        "starting the control plane (the first run ever builds it from source with Go, \
         about 9 minutes on 2 cores)"
    );
    let control_plane = ControlPlane::start(Options::default())
        .await
        .context("starting the control plane")?;
    let outcome = measure(&args, &control_plane, &binary).await;
    // The operator is already stopped (it dies with its handle); stop the
    // control plane whatever the outcome, then report.
    control_plane.stop().context("stopping the control plane")?;
    println!("operator and control plane stopped");
    let report = outcome?;
    print_environment(&args);
    report.print();
    Ok(())
}

/// Builds the operator binary with the profile this benchmark was built
/// with and returns its path. A no-op when it is up to date; asking Cargo
/// for the path also respects any target directory the user chose.
fn build_operator() -> Result<PathBuf> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml");
    let mut command = std::process::Command::new(cargo);
    command
        .args(["build", "--bin", "fleet-handshake"])
        .args(["--message-format", "json-render-diagnostics"])
        .arg("--manifest-path")
        .arg(&manifest)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    if !cfg!(debug_assertions) {
        command.arg("--release");
    }
    // `cargo run` gives this process the package's variables. Build scripts
    // (ring's, for one) ask to rerun when such a variable changes, and Cargo
    // compares them with its own environment, so passing them on would
    // rebuild half the dependency tree on every run.
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy();
        if key.starts_with("CARGO_PKG_") || RUN_VARIABLES.contains(&key.as_ref()) {
            command.env_remove(key.as_ref());
        }
    }
    println!("building the operator binary (cargo build --bin fleet-handshake)");
    let output = command.output().context("running cargo build")?;
    ensure!(
        output.status.success(),
        "building the operator failed; build it yourself with \
         `cargo build --release -p fleet-handshake` and pass --operator <path>"
    );
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .find(|message| {
            message["reason"] == "compiler-artifact"
                && message["target"]["name"] == "fleet-handshake"
                && message["target"]["kind"] == json!(["bin"])
        })
        .and_then(|message| message["executable"].as_str().map(PathBuf::from))
        .context("cargo did not report the fleet-handshake executable")
}

// ---- the measurements ----------------------------------------------------

/// Runs every measurement against `control_plane` and collects the figures.
async fn measure(args: &Args, control_plane: &ControlPlane, binary: &Path) -> Result<Report> {
    let client = control_plane.client().await;
    let namespace = control_plane.create_namespace("bench").await;
    let mut bench = Bench::new(client, &namespace);
    let mut report = Report::default();
    let launcher = Launcher::new(binary, control_plane.kubeconfig_path())?;

    let mut operator = launcher.start().await?;
    bench.create_sentinel().await?;
    let baseline = bench.settle(&operator).await?;
    report.memory("fresh start, empty cluster", &baseline, None);

    let bytes = bench.create_unrelated(args).await?;
    let crowded = bench.settle(&operator).await?;
    report.memory(
        &format!(
            "after {} unrelated Secrets ({}) appeared",
            args.unrelated_secrets,
            mib(bytes as u64 / 1024)
        ),
        &crowded,
        Some(&baseline),
    );

    // A real operator usually starts on a cluster that already holds its
    // Secrets, which it then receives as one initial list, not as events.
    operator.stop().await;
    operator = launcher.start().await?;
    bench.tally = Tally::default();
    let restarted = bench.settle(&operator).await?;
    report.memory(
        &format!(
            "fresh start, {} unrelated Secrets present",
            args.unrelated_secrets
        ),
        &restarted,
        Some(&baseline),
    );

    let delivery = bench.deliver_handshakes(args.handshakes).await?;
    let managing = bench.settle(&operator).await?;
    report.delivery(args.handshakes, &delivery);
    report.memory(
        &format!("after {} handshakes delivered", args.handshakes),
        &managing,
        Some(&restarted),
    );
    report.per_handshake(args.handshakes, &restarted, &managing);

    let rotations = bench.rotate_repeatedly(args.rotations).await?;
    report.rotations(&rotations);
    report.metrics(&operator.metrics().await?, &bench.tally);
    report.events(bench.handshake_events().await?, args.handshakes + 1);
    operator.stop().await;
    if let Some(log) = launcher.log_summary() {
        report.row("operator log", log);
    }
    Ok(report)
}

/// The objects the benchmark creates, and what it changed since the
/// operator last started.
struct Bench {
    secrets: Api<Secret>,
    handshakes: Api<FleetHandshake>,
    bundles: Api<Bundle>,
    events: Api<Event>,
    sentinel_rotations: u64,
    tally: Tally,
}

/// Changes the benchmark made that each call for exactly one operator write.
#[derive(Default)]
struct Tally {
    /// Each new handshake needs one Bundle and one status write.
    handshakes: u64,
    /// Each rotation of a source needs one Bundle write.
    rotations: u64,
}

/// Timings of [`Bench::deliver_handshakes`].
struct Delivery {
    created: Duration,
    bundles: Duration,
    statuses: Duration,
}

impl Bench {
    fn new(client: Client, namespace: &str) -> Self {
        Self {
            secrets: Api::namespaced(client.clone(), namespace),
            handshakes: Api::namespaced(client.clone(), namespace),
            bundles: Api::namespaced(client.clone(), namespace),
            events: Api::namespaced(client, namespace),
            sentinel_rotations: 0,
            tally: Tally::default(),
        }
    }

    /// The handshake rotated by [`Bench::settle`], delivered once.
    async fn create_sentinel(&mut self) -> Result<()> {
        create_secret(&self.secrets, SENTINEL, "value", b"0".to_vec()).await?;
        create_handshake(&self.handshakes, SENTINEL, SENTINEL).await?;
        self.wait_for_value(SENTINEL, b"0", Duration::from_millis(100))
            .await?;
        Ok(())
    }

    /// Lets the operator catch up, then reads its memory: rotates the
    /// sentinel's source, waits until the Bundle carries the new value
    /// (every earlier Secret event has then been handled), and waits for
    /// the resident size to stop moving.
    async fn settle(&mut self, operator: &Operator) -> Result<Memory> {
        self.sentinel_rotations += 1;
        let value = format!("settle-{}", self.sentinel_rotations).into_bytes();
        self.rotate(SENTINEL, &value).await?;
        self.wait_for_value(SENTINEL, &value, Duration::from_millis(100))
            .await?;
        operator.steady_memory().await
    }

    /// Creates the unrelated Secrets and returns their total data size.
    async fn create_unrelated(&self, args: &Args) -> Result<usize> {
        let size = args.secret_kib * 1024;
        let started = Instant::now();
        let secrets = &self.secrets;
        for_each_concurrently(args.unrelated_secrets, |index| async move {
            let name = format!("unrelated-{index:05}");
            create_secret(secrets, &name, "blob", filler(index as u64, size)).await
        })
        .await?;
        println!(
            "created {} unrelated Secrets of {} KiB in {:.1?}",
            args.unrelated_secrets,
            args.secret_kib,
            started.elapsed()
        );
        Ok(size * args.unrelated_secrets)
    }

    /// Creates `count` source Secrets (untimed), then `count` handshakes, and
    /// times until every Bundle exists and every status says `Pending`.
    async fn deliver_handshakes(&mut self, count: usize) -> Result<Delivery> {
        let (secrets, handshakes) = (&self.secrets, &self.handshakes);
        for_each_concurrently(count, |index| async move {
            create_secret(secrets, &source_name(index), "value", b"initial".to_vec()).await
        })
        .await?;
        let started = Instant::now();
        for_each_concurrently(count, |index| async move {
            create_handshake(handshakes, &handshake_name(index), &source_name(index)).await
        })
        .await?;
        let created = started.elapsed();
        self.tally.handshakes += count as u64;
        let bundles = poll("every Bundle", Duration::from_millis(100), || async {
            Ok((self.count_bundles().await? >= count).then(|| started.elapsed()))
        })
        .await?;
        let statuses = poll(
            "every status Pending",
            Duration::from_millis(100),
            || async { Ok((self.count_pending().await? >= count).then(|| started.elapsed())) },
        )
        .await?;
        println!("{count} handshakes delivered in {statuses:.1?}");
        Ok(Delivery {
            created,
            bundles,
            statuses,
        })
    }

    /// Occurrences of Events about handshakes in the namespace (repeats
    /// of one Event are counted in its series).
    async fn handshake_events(&self) -> Result<u64> {
        let events = self.events.list(&ListParams::default()).await?;
        Ok(events
            .items
            .iter()
            .filter(|event| {
                event
                    .regarding
                    .as_ref()
                    .and_then(|object| object.kind.as_deref())
                    == Some("FleetHandshake")
            })
            .map(|event| {
                event
                    .series
                    .as_ref()
                    .map_or(1, |series| series.count as u64)
            })
            .sum())
    }

    /// Bundles of the benchmark's handshakes (the sentinel's left out).
    async fn count_bundles(&self) -> Result<usize> {
        let ours = ListParams::default().labels(&format!("{MANAGED_BY_LABEL}={MANAGED_BY}"));
        let bundles = self.bundles.list_metadata(&ours).await?;
        Ok(bundles
            .items
            .iter()
            .filter(|bundle| bundle.name_any() != SENTINEL)
            .count())
    }

    /// Handshakes whose status is `Pending` for their current generation.
    async fn count_pending(&self) -> Result<usize> {
        let handshakes = self.handshakes.list(&ListParams::default()).await?;
        Ok(handshakes
            .items
            .iter()
            .filter(|handshake| handshake.name_any() != SENTINEL)
            .filter(|handshake| {
                handshake.status.as_ref().is_some_and(|status| {
                    status.status == Some(SyncStatus::Pending)
                        && status.observed_generation == handshake.metadata.generation
                })
            })
            .count())
    }

    /// Rotates the first handshake's source `times` times and returns how
    /// long each took to reach its Bundle.
    async fn rotate_repeatedly(&mut self, times: usize) -> Result<Vec<Duration>> {
        let (source, handshake) = (source_name(0), handshake_name(0));
        let mut latencies = Vec::with_capacity(times);
        for rotation in 1..=times {
            let value = format!("rotation-{rotation}").into_bytes();
            let started = Instant::now();
            self.rotate(&source, &value).await?;
            self.wait_for_value(&handshake, &value, Duration::from_millis(10))
                .await?;
            latencies.push(started.elapsed());
            // Lets the follow-up reconcile (caused by the Bundle write)
            // finish, so rotations do not overlap.
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        Ok(latencies)
    }

    /// Sets the `value` key of Secret `name`, as an administrator rotating a
    /// credential would.
    async fn rotate(&mut self, name: &str, value: &[u8]) -> Result<()> {
        let data = json!({"data": {"value": ByteString(value.to_vec())}});
        self.secrets
            .patch(name, &PatchParams::default(), &Patch::Merge(&data))
            .await
            .with_context(|| format!("rotating Secret {name}"))?;
        self.tally.rotations += 1;
        Ok(())
    }

    /// Polls Bundle `name` every `interval` until it delivers `value`.
    async fn wait_for_value(&self, name: &str, value: &[u8], interval: Duration) -> Result<()> {
        poll(
            &format!("Bundle {name} to carry the new value"),
            interval,
            || async {
                let bundle = self.bundles.get_opt(name).await?;
                Ok(bundle
                    .filter(|bundle| delivered_value(bundle).as_deref() == Some(value))
                    .map(|_| ()))
            },
        )
        .await
    }
}

fn source_name(index: usize) -> String {
    format!("source-{index:04}")
}

fn handshake_name(index: usize) -> String {
    format!("handshake-{index:04}")
}

/// Runs `create(0..count)` with [`CONCURRENCY`] in flight.
async fn for_each_concurrently<F, Fut>(count: usize, create: F) -> Result<()>
where
    F: Fn(usize) -> Fut,
    Fut: Future<Output = Result<()>>,
{
    futures::stream::iter(0..count)
        .map(Ok)
        .try_for_each_concurrent(CONCURRENCY, create)
        .await
}

async fn create_secret(secrets: &Api<Secret>, name: &str, key: &str, value: Vec<u8>) -> Result<()> {
    let secret: Secret = serde_json::from_value(json!({
        "metadata": {"name": name},
        "type": "Opaque",
        "data": {key: ByteString(value)},
    }))?;
    secrets
        .create(&PostParams::default(), &secret)
        .await
        .with_context(|| format!("creating Secret {name}"))?;
    Ok(())
}

/// A handshake delivering Secret `source` to every cluster of its
/// workspace; nothing here runs Fleet, so it stays `Pending`.
async fn create_handshake(
    handshakes: &Api<FleetHandshake>,
    name: &str,
    source: &str,
) -> Result<()> {
    let handshake: FleetHandshake = serde_json::from_value(json!({
        "apiVersion": "riverpointtechnology.com/v1alpha1",
        "kind": "FleetHandshake",
        "metadata": {"name": name},
        "spec": {"secretName": source, "targets": [{"clusterSelector": {}}]},
    }))?;
    handshakes
        .create(&PostParams::default(), &handshake)
        .await
        .with_context(|| format!("creating handshake {name}"))?;
    Ok(())
}

/// The `value` key of the Secret manifest a Bundle carries.
fn delivered_value(bundle: &Bundle) -> Option<Vec<u8>> {
    let manifest: Value = serde_json::from_str(&bundle.spec.resources.first()?.content).ok()?;
    let encoded = manifest["data"].get("value")?.clone();
    serde_json::from_value::<ByteString>(encoded)
        .ok()
        .map(|bytes| bytes.0)
}

/// `size` pseudo-random bytes, different for each `seed`, so no layer can
/// make the unrelated Secrets cheaper by noticing they are alike.
fn filler(seed: u64, size: usize) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..size)
        .map(|_| {
            // xorshift64: fast and good enough for filler.
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

/// Polls `check` every `interval` until it yields a value; fails after
/// [`WAIT`] naming what was awaited.
async fn poll<T, F, Fut>(what: &str, interval: Duration, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<T>>>,
{
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(value) = check()
            .await
            .with_context(|| format!("waiting for {what}"))?
        {
            return Ok(value);
        }
        if Instant::now() >= deadline {
            bail!("timed out after {WAIT:?} waiting for {what}");
        }
        tokio::time::sleep(interval).await;
    }
}

// ---- the operator process ------------------------------------------------

/// Starts the operator binary, cluster-wide, as the admin.
struct Launcher {
    binary: PathBuf,
    kubeconfig: PathBuf,
    log_path: PathBuf,
}

impl Launcher {
    fn new(binary: &Path, kubeconfig: &Path) -> Result<Self> {
        let log_path =
            std::env::temp_dir().join(format!("fleet-handshake-bench-{}.log", std::process::id()));
        std::fs::File::create(&log_path)
            .with_context(|| format!("creating {}", log_path.display()))?;
        Ok(Self {
            binary: binary.to_path_buf(),
            kubeconfig: kubeconfig.to_path_buf(),
            log_path,
        })
    }

    /// Starts `fleet-handshake run` and waits until its caches are synced.
    async fn start(&self) -> Result<Operator> {
        let metrics_address = free_address()?;
        let log = std::fs::OpenOptions::new()
            .append(true)
            .open(&self.log_path)?;
        let mut command = tokio::process::Command::new(&self.binary);
        command
            .arg("run")
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(["--metrics-addr", &metrics_address.to_string()])
            .args(["--log-level", "warn"])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true);
        // The operator reads its flags from the environment too; settings
        // left there (e.g. for the tests) must not change what is measured.
        command.env_remove("KUBECONFIG");
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("FLEET_HANDSHAKE_") {
                command.env_remove(key);
            }
        }
        let child = command
            .spawn()
            .with_context(|| format!("starting {}", self.binary.display()))?;
        let mut operator = Operator {
            child,
            metrics_address,
            log_path: self.log_path.clone(),
        };
        operator.wait_until_ready().await?;
        Ok(operator)
    }

    /// Says how much the operator logged at `warn` and above, and where;
    /// removes the log when it is empty.
    fn log_summary(&self) -> Option<String> {
        let text = std::fs::read_to_string(&self.log_path).ok()?;
        let lines = text.lines().count();
        if lines == 0 {
            let _ = std::fs::remove_file(&self.log_path);
            return None;
        }
        Some(format!("{lines} lines at {}", self.log_path.display()))
    }
}

/// A running operator; killed when dropped.
struct Operator {
    child: tokio::process::Child,
    metrics_address: SocketAddr,
    log_path: PathBuf,
}

/// Resident memory of the operator, in KiB, as the kernel reports it.
struct Memory {
    /// `VmRSS`: resident now.
    rss: u64,
    /// `VmHWM`: the most ever resident.
    peak: u64,
}

impl Operator {
    async fn wait_until_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "the operator exited with {status}; log:\n{}",
                    std::fs::read_to_string(&self.log_path).unwrap_or_default()
                );
            }
            if let Ok((200, _)) = http_get(self.metrics_address, "/readyz").await {
                return Ok(());
            }
            ensure!(
                Instant::now() < deadline,
                "the operator did not become ready"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn memory(&self) -> Result<Memory> {
        let pid = self.child.id().context("the operator has exited")?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        let field = |name: &str| -> Result<u64> {
            status
                .lines()
                .find_map(|line| line.strip_prefix(name))
                .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
                .with_context(|| format!("no {name} in /proc/{pid}/status"))
        };
        Ok(Memory {
            rss: field("VmRSS:")?,
            peak: field("VmHWM:")?,
        })
    }

    /// The resident size once it has stopped moving: two seconds without a
    /// change of more than 64 KiB, or whatever it is after 20 seconds.
    async fn steady_memory(&self) -> Result<Memory> {
        const SAMPLES: usize = 8;
        let mut recent = Vec::new();
        for _ in 0..80 {
            tokio::time::sleep(Duration::from_millis(250)).await;
            recent.push(self.memory()?.rss);
            let window = &recent[recent.len().saturating_sub(SAMPLES)..];
            let spread = window.iter().max().unwrap_or(&0) - window.iter().min().unwrap_or(&0);
            if window.len() == SAMPLES && spread <= 64 {
                break;
            }
        }
        self.memory()
    }

    async fn metrics(&self) -> Result<String> {
        let (code, body) = http_get(self.metrics_address, "/metrics").await?;
        ensure!(code == 200, "GET /metrics answered {code}");
        Ok(body)
    }

    /// Kills the operator and waits until it is gone, so that it holds no
    /// memory or CPU while the next one runs.
    async fn stop(mut self) {
        let _ = self.child.kill().await;
    }
}

fn free_address() -> Result<SocketAddr> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

/// A minimal HTTP/1.0 GET, enough for the operator's health and metrics.
async fn http_get(address: SocketAddr, path: &str) -> Result<(u16, String)> {
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(address).await?;
        let request = format!("GET {path} HTTP/1.0\r\nHost: {address}\r\n\r\n");
        stream.write_all(request.as_bytes()).await?;
        let mut response = String::new();
        stream.read_to_string(&mut response).await?;
        anyhow::Ok(response)
    };
    let response = tokio::time::timeout(Duration::from_secs(5), exchange).await??;
    let code = response
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .context("a malformed HTTP response")?;
    let body = response.split_once("\r\n\r\n").map(|(_, body)| body);
    Ok((code, body.unwrap_or_default().to_string()))
}

// ---- the report ------------------------------------------------------------

/// Figures in the order they were measured, as (what, figure) rows.
#[derive(Default)]
struct Report {
    rows: Vec<(String, String)>,
}

impl Report {
    fn row(&mut self, what: impl Into<String>, figure: impl Into<String>) {
        self.rows.push((what.into(), figure.into()));
    }

    /// One memory reading, with its growth over `since` if given.
    fn memory(&mut self, when: &str, memory: &Memory, since: Option<&Memory>) {
        let growth = since.map_or(String::new(), |since| {
            format!(" ({})", signed_mib(memory.rss as i64 - since.rss as i64))
        });
        self.row(
            format!("RSS, {when}"),
            format!(
                "{}{growth}, peak so far {}",
                mib(memory.rss),
                mib(memory.peak)
            ),
        );
    }

    fn delivery(&mut self, count: usize, delivery: &Delivery) {
        let each = delivery.statuses / count.max(1) as u32;
        self.row(
            format!("deliver {count} handshakes, until all Pending"),
            format!("{:.2?} total, {each:.1?} per handshake", delivery.statuses),
        );
        self.row(
            "  of which: creating them (client side)",
            format!("{:.2?}", delivery.created),
        );
        self.row(
            "  of which: until every Bundle existed",
            format!("{:.2?}", delivery.bundles),
        );
    }

    fn per_handshake(&mut self, count: usize, before: &Memory, after: &Memory) {
        let growth = after.rss as i64 - before.rss as i64;
        self.row(
            "RSS growth per handshake",
            format!("{:.1} KiB", growth as f64 / count.max(1) as f64),
        );
    }

    fn rotations(&mut self, latencies: &[Duration]) {
        let mut sorted = latencies.to_vec();
        sorted.sort();
        let (Some(median), Some(max)) = (sorted.get(sorted.len() / 2), sorted.last()) else {
            return;
        };
        self.row(
            format!("rotation to Bundle, {} rotations", sorted.len()),
            format!("median {median:.1?}, max {max:.1?}, min {:.1?}", sorted[0]),
        );
    }

    /// The operator's counters since its last start, beside what the
    /// benchmark changed in that time.
    fn metrics(&mut self, text: &str, tally: &Tally) {
        for name in [
            "fleet_handshake_reconciliations_total",
            "fleet_handshake_object_writes_total",
            "fleet_handshake_status_writes_total",
        ] {
            for (series, value) in samples(text, name) {
                self.row(series, value);
            }
        }
        self.row(
            "changes needing a Bundle write",
            format!(
                "{} ({} new handshakes + {} rotations, sentinel's included)",
                tally.handshakes + tally.rotations,
                tally.handshakes,
                tally.rotations
            ),
        );
        self.row(
            "changes needing a status write",
            format!("{} (new handshakes)", tally.handshakes),
        );
    }

    /// Events are writes too; one is due each time a status word changes,
    /// here once per handshake (sentinel included) going to `Pending`.
    fn events(&mut self, occurrences: u64, expected: usize) {
        self.row(
            "Events about handshakes",
            format!("{occurrences} (status word changes: {expected})"),
        );
    }

    fn print(&self) {
        let width = self
            .rows
            .iter()
            .map(|(what, _)| what.len())
            .max()
            .unwrap_or(0);
        println!();
        for (what, figure) in &self.rows {
            println!("{what:<width$}  {figure}");
        }
    }
}

/// The samples of metric `name` as (series, value), e.g.
/// (`fleet_handshake_reconciliations_total{result="ok"}`, `412`).
fn samples(text: &str, name: &str) -> Vec<(String, String)> {
    text.lines()
        .filter(|line| line.starts_with(name))
        .filter_map(|line| line.rsplit_once(' '))
        .map(|(series, value)| (series.to_string(), value.to_string()))
        .collect()
}

fn print_environment(args: &Args) {
    let cores = std::thread::available_parallelism().map_or(0, |cores| cores.get());
    let profile = if cfg!(debug_assertions) {
        "debug (figures not representative; use --release)"
    } else {
        "release"
    };
    println!();
    println!(
        "environment: {cores} cores available, {profile} build; etcd, kube-apiserver, \
         kube-controller-manager, the operator and this benchmark share them"
    );
    println!(
        "sizes: --unrelated-secrets {} --secret-kib {} --handshakes {} --rotations {}",
        args.unrelated_secrets, args.secret_kib, args.handshakes, args.rotations
    );
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

fn signed_mib(kib: i64) -> String {
    format!("{:+.1} MiB", kib as f64 / 1024.0)
}
