//! Starting, sharing, using and stopping a control plane.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, PostParams};
use kube::config::Kubeconfig;

use crate::audit::{self, AuditEvent};
use crate::binaries::Binaries;
use crate::crds::{self, CrdManifest, CrdSource};
use crate::fsutil::{self, FileLock};
use crate::kubeconfig::{self, Endpoint, Extension};
use crate::pki::{self, Pki};
use crate::process::{self, ManagedProcess};

/// Environment variable: path of a kubeconfig of an already running control
/// plane (e.g. one from `testenv up`). When set, [`ControlPlane::shared`]
/// connects to it instead of starting a new one.
pub const KUBECONFIG_ENV: &str = "FLEET_HANDSHAKE_TEST_KUBECONFIG";

/// Service CIDR of the cluster; its first address is the `kubernetes` Service.
const SERVICE_CLUSTER_IP_RANGE: &str = "10.0.0.0/24";
/// Issuer of service-account tokens, as on a typical cluster.
const SERVICE_ACCOUNT_ISSUER: &str = "https://kubernetes.default.svc.cluster.local";
/// Controllers kube-controller-manager runs: garbage collection and namespace
/// deletion are behaviour tests rely on; the service-account controllers give
/// every namespace its `default` ServiceAccount and fill token Secrets.
const CONTROLLERS: &str = "garbage-collector-controller,namespace-controller,\
                           serviceaccount-controller,serviceaccount-token-controller";
/// Lifetime of service-account tokens handed to tests; long enough for any
/// test run, short enough to be harmless if a kubeconfig leaks.
const SERVICE_ACCOUNT_TOKEN_SECONDS: i64 = 24 * 60 * 60;
/// Prefix of temporary run directories, also used to find stale ones.
const TEMP_PREFIX: &str = "fleet-handshake-testenv-";
/// How long a reused control plane may take to answer.
const REUSE_TIMEOUT: Duration = Duration::from_secs(20);
/// How many times startup is retried when a picked port was taken meanwhile.
const PORT_RETRIES: usize = 3;

/// How to start a control plane.
#[derive(Debug, Clone)]
pub struct Options {
    /// Whether to install Fleet's CRDs (all of them, from
    /// [`crate::fleet_crd_file`]).
    pub fleet_crds: bool,
    /// Further CRDs to install. The default holds the project's own CRD
    /// ([`project_crd_path`]) as an optional file.
    pub crds: Vec<CrdSource>,
    /// Directory for etcd data, certificates and logs. It is emptied at start
    /// and kept at stop. `None` uses a fresh temporary directory that is
    /// removed at stop (or, after a crash, by the next start).
    pub run_dir: Option<PathBuf>,
    /// Extra path to write the admin kubeconfig to; the run directory always
    /// holds one as `kubeconfig`.
    pub kubeconfig_path: Option<PathBuf>,
    /// Executables to run; `None` means [`Binaries::locate_or_build`].
    pub binaries: Option<Binaries>,
    /// Upper bound for the control plane to become ready, CRDs included.
    /// Building binaries is not counted.
    pub startup_timeout: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            fleet_crds: true,
            crds: vec![CrdSource::OptionalFile(project_crd_path())],
            run_dir: None,
            kubeconfig_path: None,
            binaries: None,
            startup_timeout: Duration::from_secs(180),
        }
    }
}

impl Options {
    /// Adds a CRD source.
    pub fn with_crd(mut self, source: CrdSource) -> Self {
        self.crds.push(source);
        self
    }

    /// Reads every CRD manifest, so that a bad file fails before any process
    /// starts.
    fn load_crds(&self) -> Result<Vec<CrdManifest>> {
        let mut sources = Vec::new();
        if self.fleet_crds {
            sources.push(CrdSource::File(crds::fleet_crd_file()?));
        }
        sources.extend(self.crds.iter().cloned());
        crds::load_all(&sources)
    }
}

/// The operator's CRD in this repository (`deploy/crd.yaml`).
pub fn project_crd_path() -> PathBuf {
    crate::repository_root().join("deploy").join("crd.yaml")
}

/// A running Kubernetes control plane: etcd, kube-apiserver and
/// kube-controller-manager on loopback ports, with RBAC, token authentication,
/// an audit log of all writes, and the requested CRDs installed.
///
/// Clients are bound to the tokio runtime they were created in, and every
/// `#[tokio::test]` has its own runtime, so this type hands out
/// configurations and fresh clients rather than one shared client.
///
/// Dropping (or [`ControlPlane::stop`]ping) a started control plane kills its
/// processes and removes its temporary directory. Processes also die with the
/// process that started them, however it ends.
#[derive(Debug)]
pub struct ControlPlane {
    config: kube::Config,
    endpoint: Endpoint,
    kubeconfig_path: PathBuf,
    audit_log_path: Option<PathBuf>,
    local: Option<Local>,
}

/// Parts that exist only when this process started the control plane.
#[derive(Debug)]
struct Local {
    run_dir: RunDir,
    processes: Mutex<Vec<ManagedProcess>>,
}

impl ControlPlane {
    /// Starts a new control plane and waits until it is ready and the CRDs
    /// are Established.
    ///
    /// Builds the binaries first if needed (see [`Binaries::locate_or_build`]).
    pub async fn start(options: Options) -> Result<Self> {
        let binaries = match options.binaries.clone() {
            Some(binaries) => binaries,
            None => tokio::task::spawn_blocking(Binaries::locate_or_build).await??,
        };
        let crd_options = options.clone();
        let crds = tokio::task::spawn_blocking(move || crd_options.load_crds()).await??;

        let mut attempt = 1;
        loop {
            let run_dir = match &options.run_dir {
                Some(path) => RunDir::provided(path)?,
                None => RunDir::temporary()?,
            };
            match Self::start_in(run_dir, &binaries, &options, &crds).await {
                Err(err)
                    if attempt < PORT_RETRIES
                        && format!("{err:#}").contains("address already in use") =>
                {
                    tracing::warn!("a picked port was taken meanwhile; starting again");
                    attempt += 1;
                }
                result => return result,
            }
        }
    }

    /// Uses an already running control plane through `kubeconfig` (for
    /// example one written by `testenv up`) and installs the CRDs of
    /// `options` on it. Only [`Options::fleet_crds`], [`Options::crds`] and
    /// [`Options::startup_timeout`] apply. Stopping it does nothing.
    ///
    /// The audit log is known if the kubeconfig was written by this crate.
    pub async fn connect(kubeconfig_path: &Path, options: Options) -> Result<Self> {
        let kubeconfig = Kubeconfig::read_from(kubeconfig_path)
            .with_context(|| format!("reading kubeconfig {}", kubeconfig_path.display()))?;
        let extension = kubeconfig::read_extension(&kubeconfig).unwrap_or_default();
        let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
            .await
            .with_context(|| format!("loading kubeconfig {}", kubeconfig_path.display()))?;
        let crd_options = options.clone();
        let crds = tokio::task::spawn_blocking(move || crd_options.load_crds()).await??;

        let client = kube::Client::try_from(config.clone())?;
        // A control plane being reused was ready when it was handed out; one
        // that does not answer soon has gone away, so fail fast.
        let deadline = Instant::now() + options.startup_timeout.min(REUSE_TIMEOUT);
        wait_until("kube-apiserver /readyz", deadline, &mut [], || {
            apiserver_ready(&client)
        })
        .await
        .with_context(|| {
            format!(
                "the control plane of {} does not answer (stopped? unset {KUBECONFIG_ENV} to start a fresh one)",
                kubeconfig_path.display()
            )
        })?;
        crds::install(&client, &crds, options.startup_timeout).await?;

        Ok(Self {
            endpoint: Endpoint::from_config(&config),
            config,
            kubeconfig_path: kubeconfig_path.to_path_buf(),
            audit_log_path: extension.audit_log_path,
            local: None,
        })
    }

    /// The control plane shared by all tests of this process, started on
    /// first use with [`Options::default`] — or, if `FLEET_HANDSHAKE_TEST_KUBECONFIG`
    /// is set, the one that kubeconfig points to (see [`ControlPlane::connect`]).
    ///
    /// Tests isolate themselves by namespace ([`ControlPlane::create_namespace`]).
    /// It may be called from any thread or async context; it blocks until the
    /// control plane is ready, which on a machine without cached binaries
    /// includes building them ([`Binaries::locate_or_build`]). The processes stop and the temporary directory
    /// is removed when the process exits.
    ///
    /// # Panics
    ///
    /// If the control plane cannot be started; every later call panics with
    /// the same message, so a broken environment fails each test fast.
    pub fn shared() -> &'static ControlPlane {
        static SHARED: OnceLock<std::result::Result<ControlPlane, String>> = OnceLock::new();

        extern "C" fn stop_shared_at_exit() {
            if let Some(Ok(control_plane)) = SHARED.get()
                && let Err(err) = control_plane.shutdown()
            {
                eprintln!("testenv: cleaning up the shared control plane: {err:#}");
            }
        }

        let shared = SHARED.get_or_init(|| {
            // A thread of its own, because the caller may be inside a runtime
            // (where blocking on another runtime panics); its runtime only
            // lives for startup since nothing here keeps a client.
            let started = std::thread::Builder::new()
                .name("testenv-start".into())
                .spawn(|| -> Result<ControlPlane> {
                    let runtime = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()?;
                    runtime.block_on(async {
                        match std::env::var_os(KUBECONFIG_ENV).filter(|v| !v.is_empty()) {
                            Some(path) => {
                                ControlPlane::connect(Path::new(&path), Options::default())
                                    .await
                                    .with_context(|| format!("using {KUBECONFIG_ENV}"))
                            }
                            None => ControlPlane::start(Options::default()).await,
                        }
                    })
                })
                .map_err(|err| format!("spawning the startup thread: {err}"))
                .and_then(|thread| {
                    thread
                        .join()
                        .map_err(|_| "the startup thread panicked".to_string())
                });
            match started {
                Ok(Ok(control_plane)) => {
                    if control_plane.local.is_some() {
                        // Statics are never dropped; without this the run
                        // directory would stay until the next start sweeps it.
                        // SAFETY: registering a plain extern "C" function.
                        unsafe { libc::atexit(stop_shared_at_exit) };
                    }
                    Ok(control_plane)
                }
                Ok(Err(err)) => Err(format!("{err:#}")),
                Err(err) => Err(err),
            }
        });
        match shared {
            Ok(control_plane) => control_plane,
            Err(err) => panic!("the shared test control plane is unavailable: {err}"),
        }
    }

    async fn start_in(
        run_dir: RunDir,
        binaries: &Binaries,
        options: &Options,
        crds: &[CrdManifest],
    ) -> Result<Self> {
        let started = Instant::now();
        let deadline = started + options.startup_timeout;
        let dir = run_dir.path.clone();
        let files = RunFiles::write(&dir)?;
        let [etcd_client, etcd_peer, apiserver_port, kcm_port] = process::free_ports()?;

        let endpoint = Endpoint {
            server: format!("https://127.0.0.1:{apiserver_port}"),
            ca_pem: Some(files.pki.ca_cert_pem.clone()),
            insecure: false,
            tls_server_name: None,
        };
        let extension = Extension {
            audit_log_path: Some(files.audit_log.clone()),
        };
        let admin_kubeconfig = kubeconfig::render(
            &endpoint,
            "admin",
            &files.admin_token,
            "default",
            Some(&extension),
        )?;
        kubeconfig::write(&files.admin_kubeconfig, &admin_kubeconfig)?;
        kubeconfig::write(
            &files.kcm_kubeconfig,
            &kubeconfig::render(
                &endpoint,
                "kube-controller-manager",
                &files.kcm_token,
                "default",
                None,
            )?,
        )?;
        let config = kubeconfig::config_from_yaml(&admin_kubeconfig).await?;
        let client = kube::Client::try_from(config.clone())?;

        let mut processes = Vec::new();
        let booted = async {
            processes.push(ManagedProcess::spawn(
                "etcd",
                &binaries.etcd(),
                &etcd_args(&dir, etcd_client, etcd_peer),
                dir.join("etcd.log"),
            )?);
            wait_until("etcd", deadline, &mut processes, || async move {
                Ok(tokio::task::spawn_blocking(move || process::etcd_healthy(etcd_client)).await?)
            })
            .await?;
            tracing::debug!(elapsed = ?started.elapsed(), "etcd healthy");

            processes.push(ManagedProcess::spawn(
                "kube-apiserver",
                &binaries.kube_apiserver(),
                &apiserver_args(&files, etcd_client, apiserver_port),
                dir.join("kube-apiserver.log"),
            )?);
            wait_until("kube-apiserver /readyz", deadline, &mut processes, || {
                apiserver_ready(&client)
            })
            .await?;
            tracing::debug!(elapsed = ?started.elapsed(), "kube-apiserver ready");

            processes.push(ManagedProcess::spawn(
                "kube-controller-manager",
                &binaries.kube_controller_manager(),
                &controller_manager_args(&files, kcm_port),
                dir.join("kube-controller-manager.log"),
            )?);
            // The `default` ServiceAccount appears once the controller manager
            // has connected, synced its informers and started its controllers.
            let service_accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), "default");
            wait_until("kube-controller-manager", deadline, &mut processes, || {
                let service_accounts = service_accounts.clone();
                async move { Ok(service_accounts.get_opt("default").await?.is_some()) }
            })
            .await?;
            tracing::debug!(elapsed = ?started.elapsed(), "kube-controller-manager running");

            let remaining = deadline.saturating_duration_since(Instant::now());
            crds::install(&client, crds, remaining).await?;
            for process in processes.iter_mut() {
                process.ensure_running()?;
            }
            if let Some(path) = &options.kubeconfig_path {
                kubeconfig::write(path, &admin_kubeconfig)?;
            }
            anyhow::Ok(())
        }
        .await;

        if let Err(err) = booted {
            for process in processes.iter_mut().rev() {
                process.kill();
            }
            // The data directory is large and useless; the logs are kept for
            // diagnosis (a temporary directory is swept by the next start).
            let _ = std::fs::remove_dir_all(dir.join("etcd"));
            return Err(err.context(format!(
                "starting the control plane failed; logs are in {}",
                dir.display()
            )));
        }

        tracing::info!(
            seconds = format!("{:.1}", started.elapsed().as_secs_f64()),
            server = %endpoint.server,
            kubeconfig = %files.admin_kubeconfig.display(),
            "control plane ready"
        );
        Ok(Self {
            config,
            endpoint,
            kubeconfig_path: options
                .kubeconfig_path
                .clone()
                .unwrap_or(files.admin_kubeconfig),
            audit_log_path: Some(files.audit_log),
            local: Some(Local {
                run_dir,
                processes: Mutex::new(processes),
            }),
        })
    }

    /// Client configuration with cluster-admin rights (group `system:masters`).
    pub fn config(&self) -> kube::Config {
        self.config.clone()
    }

    /// A new cluster-admin client bound to the calling tokio runtime.
    ///
    /// # Panics
    ///
    /// If no client can be built from [`ControlPlane::config`], which already
    /// worked during startup, or if called outside a tokio runtime.
    pub async fn client(&self) -> kube::Client {
        kube::Client::try_from(self.config()).expect("building a client from a working config")
    }

    /// Admin kubeconfig file, for subprocesses and humans.
    pub fn kubeconfig_path(&self) -> &Path {
        &self.kubeconfig_path
    }

    /// URL of kube-apiserver, e.g. `https://127.0.0.1:34567`.
    pub fn server_url(&self) -> &str {
        &self.endpoint.server
    }

    /// The apiserver's audit log (JSON lines), if known. Always known for a
    /// control plane started by this crate, including through
    /// `FLEET_HANDSHAKE_TEST_KUBECONFIG` pointing at a `testenv up` kubeconfig.
    pub fn audit_log_path(&self) -> Option<&Path> {
        self.audit_log_path.as_deref()
    }

    /// Directory with the data, certificates and logs, if started here.
    pub fn run_dir(&self) -> Option<&Path> {
        self.local
            .as_ref()
            .map(|local| local.run_dir.path.as_path())
    }

    /// Every event in the audit log so far, oldest first: each write
    /// request, and each request of a ServiceAccount (see
    /// [`ControlPlane::requests_by`]).
    ///
    /// The apiserver writes the event right after it responds, so poll when
    /// looking for a request that just returned.
    pub fn audit_events(&self) -> Result<Vec<AuditEvent>> {
        let path = self.audit_log_path.as_deref().context(
            "this control plane's audit log is unknown (reused kubeconfig not written by testenv)",
        )?;
        audit::read_events(path)
    }

    /// Write requests made so far by `username`, e.g.
    /// [`ServiceAccountIdentity::username`].
    pub fn writes_by(&self, username: &str) -> Result<Vec<AuditEvent>> {
        Ok(self
            .requests_by(username)?
            .into_iter()
            .filter(|event| crate::audit::WRITE_VERBS.contains(&event.verb.as_str()))
            .collect())
    }

    /// Every request made so far by ServiceAccount user `username` (reads
    /// included; for other users only writes are recorded).
    pub fn requests_by(&self, username: &str) -> Result<Vec<AuditEvent>> {
        Ok(self
            .audit_events()?
            .into_iter()
            .filter(|event| event.user.username == username)
            // A watch is recorded when its response starts and again when
            // it ends; count it once.
            .filter(|event| event.stage != "ResponseComplete" || event.verb != "watch")
            .collect())
    }

    /// Creates a namespace named `<prefix>-<random>` and returns its name.
    /// The prefix is lowercased and stripped of characters a namespace name
    /// cannot hold.
    ///
    /// # Panics
    ///
    /// If the namespace cannot be created.
    pub async fn create_namespace(&self, prefix: &str) -> String {
        let name = namespace_name(prefix).expect("generating a namespace name");
        let namespaces: Api<Namespace> = Api::all(self.client().await);
        let namespace = Namespace {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                ..ObjectMeta::default()
            },
            ..Namespace::default()
        };
        if let Err(err) = namespaces.create(&PostParams::default(), &namespace).await {
            panic!("creating namespace {name}: {err}");
        }
        name
    }

    /// Credentials for ServiceAccount `namespace/name`, created if missing,
    /// using a token from the TokenRequest API (valid for 24 hours). The
    /// account has no permissions beyond what RBAC objects grant it.
    pub async fn service_account(
        &self,
        namespace: &str,
        name: &str,
    ) -> Result<ServiceAccountIdentity> {
        let client = kube::Client::try_from(self.config())?;
        let api: Api<ServiceAccount> = Api::namespaced(client, namespace);
        let account = ServiceAccount {
            metadata: ObjectMeta {
                name: Some(name.to_string()),
                ..ObjectMeta::default()
            },
            ..ServiceAccount::default()
        };
        match api.create(&PostParams::default(), &account).await {
            Ok(_) => {}
            Err(kube::Error::Api(status)) if status.code == 409 => {}
            Err(err) => {
                return Err(err)
                    .with_context(|| format!("creating ServiceAccount {namespace}/{name}"));
            }
        }
        let request = TokenRequest {
            spec: Some(TokenRequestSpec {
                expiration_seconds: Some(SERVICE_ACCOUNT_TOKEN_SECONDS),
                ..TokenRequestSpec::default()
            }),
            ..TokenRequest::default()
        };
        let token = api
            .create_token_request(name, &PostParams::default(), &request)
            .await
            .with_context(|| format!("requesting a token for {namespace}/{name}"))?
            .status
            .and_then(|status| status.token)
            .context("TokenRequest answered without a token")?;
        Ok(ServiceAccountIdentity {
            namespace: namespace.to_string(),
            name: name.to_string(),
            token,
            endpoint: self.endpoint.clone(),
        })
    }

    /// A client acting as ServiceAccount `namespace/name` (see
    /// [`ControlPlane::service_account`]), bound to the calling runtime, with
    /// the identity for writing a kubeconfig or matching audit events.
    pub async fn service_account_client(
        &self,
        namespace: &str,
        name: &str,
    ) -> Result<(kube::Client, ServiceAccountIdentity)> {
        let identity = self.service_account(namespace, name).await?;
        let client = identity.client().await?;
        Ok((client, identity))
    }

    /// Kills the processes and removes the temporary run directory. Does
    /// nothing for a control plane reached through [`ControlPlane::connect`].
    pub fn stop(self) -> Result<()> {
        self.shutdown()
        // Drop runs shutdown again, which is then a no-op.
    }

    fn shutdown(&self) -> Result<()> {
        let Some(local) = &self.local else {
            return Ok(());
        };
        let mut processes = local
            .processes
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        // Dependents first, so nothing logs errors about a vanished etcd.
        for process in processes.iter_mut().rev() {
            process.kill();
        }
        processes.clear();
        local.run_dir.remove_if_temporary()
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        if let Err(err) = self.shutdown() {
            tracing::warn!("stopping the control plane: {err:#}");
        }
    }
}

/// Credentials of a ServiceAccount, from [`ControlPlane::service_account`].
pub struct ServiceAccountIdentity {
    namespace: String,
    name: String,
    token: String,
    endpoint: Endpoint,
}

impl std::fmt::Debug for ServiceAccountIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The token is a credential; keep it out of test output.
        f.debug_struct("ServiceAccountIdentity")
            .field("namespace", &self.namespace)
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl ServiceAccountIdentity {
    /// Namespace of the ServiceAccount.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// Name of the ServiceAccount.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// User name the apiserver sees (in RBAC and the audit log):
    /// `system:serviceaccount:<namespace>:<name>`.
    pub fn username(&self) -> String {
        format!("system:serviceaccount:{}:{}", self.namespace, self.name)
    }

    /// Kubeconfig YAML for this identity; its default namespace is the
    /// ServiceAccount's.
    pub fn kubeconfig_yaml(&self) -> Result<String> {
        kubeconfig::render(
            &self.endpoint,
            &format!("{}-{}", self.namespace, self.name),
            &self.token,
            &self.namespace,
            None,
        )
    }

    /// Writes [`Self::kubeconfig_yaml`] to `path` (mode 0600), e.g. for a
    /// subprocess started with `KUBECONFIG=<path>`.
    pub fn write_kubeconfig(&self, path: &Path) -> Result<()> {
        kubeconfig::write(path, &self.kubeconfig_yaml()?)
    }

    /// Client configuration for this identity.
    pub async fn config(&self) -> Result<kube::Config> {
        kubeconfig::config_from_yaml(&self.kubeconfig_yaml()?).await
    }

    /// A new client for this identity bound to the calling runtime.
    pub async fn client(&self) -> Result<kube::Client> {
        Ok(kube::Client::try_from(self.config().await?)?)
    }
}

/// Files of one run, written before any process starts.
struct RunFiles {
    pki: Pki,
    admin_token: String,
    kcm_token: String,
    ca_cert: PathBuf,
    serving_cert: PathBuf,
    serving_key: PathBuf,
    service_account_key: PathBuf,
    service_account_public: PathBuf,
    tokens: PathBuf,
    audit_policy: PathBuf,
    audit_log: PathBuf,
    admin_kubeconfig: PathBuf,
    kcm_kubeconfig: PathBuf,
    dir: PathBuf,
}

impl RunFiles {
    fn write(dir: &Path) -> Result<Self> {
        let pki_dir = dir.join("pki");
        std::fs::create_dir_all(&pki_dir)?;
        let files = Self {
            pki: Pki::generate()?,
            admin_token: pki::random_token()?,
            kcm_token: pki::random_token()?,
            ca_cert: pki_dir.join("ca.crt"),
            serving_cert: pki_dir.join("apiserver.crt"),
            serving_key: pki_dir.join("apiserver.key"),
            service_account_key: pki_dir.join("sa.key"),
            service_account_public: pki_dir.join("sa.pub"),
            tokens: pki_dir.join("tokens.csv"),
            audit_policy: dir.join("audit-policy.yaml"),
            audit_log: dir.join("audit.log"),
            admin_kubeconfig: dir.join("kubeconfig"),
            kcm_kubeconfig: dir.join("kube-controller-manager.kubeconfig"),
            dir: dir.to_path_buf(),
        };
        std::fs::write(&files.ca_cert, &files.pki.ca_cert_pem)?;
        std::fs::write(&files.serving_cert, &files.pki.serving_cert_pem)?;
        fsutil::write_private(&files.serving_key, files.pki.serving_key_pem.as_bytes())?;
        fsutil::write_private(
            &files.service_account_key,
            files.pki.service_account_key_pem.as_bytes(),
        )?;
        std::fs::write(
            &files.service_account_public,
            &files.pki.service_account_public_pem,
        )?;
        // The controller manager gets its own user name (with full rights,
        // since it does not use per-controller credentials) so its writes are
        // told apart from the admin's in the audit log.
        let tokens = format!(
            "{},admin,admin,\"system:masters\"\n\
             {},system:kube-controller-manager,system:kube-controller-manager,\"system:masters\"\n",
            files.admin_token, files.kcm_token
        );
        fsutil::write_private(&files.tokens, tokens.as_bytes())?;
        std::fs::write(&files.audit_policy, audit::POLICY)?;
        Ok(files)
    }
}

fn etcd_args(dir: &Path, client_port: u16, peer_port: u16) -> Vec<String> {
    let client = format!("http://127.0.0.1:{client_port}");
    let peer = format!("http://127.0.0.1:{peer_port}");
    vec![
        "--name=testenv".into(),
        format!("--data-dir={}", dir.join("etcd").display()),
        format!("--listen-client-urls={client}"),
        format!("--advertise-client-urls={client}"),
        format!("--listen-peer-urls={peer}"),
        format!("--initial-advertise-peer-urls={peer}"),
        format!("--initial-cluster=testenv={peer}"),
        // Durability is pointless for throw-away data and fsync dominates
        // etcd latency on most disks.
        "--unsafe-no-fsync".into(),
    ]
}

fn apiserver_args(files: &RunFiles, etcd_port: u16, port: u16) -> Vec<String> {
    let path = |p: &Path| p.display().to_string();
    vec![
        format!("--etcd-servers=http://127.0.0.1:{etcd_port}"),
        "--bind-address=127.0.0.1".into(),
        "--advertise-address=127.0.0.1".into(),
        format!("--secure-port={port}"),
        // Unused while serving certificates are given, but keeps the default
        // (/var/run/kubernetes) from being touched.
        format!("--cert-dir={}", path(&files.dir.join("apiserver-certs"))),
        format!("--tls-cert-file={}", path(&files.serving_cert)),
        format!("--tls-private-key-file={}", path(&files.serving_key)),
        format!("--token-auth-file={}", path(&files.tokens)),
        "--authorization-mode=RBAC".into(),
        format!("--service-account-issuer={SERVICE_ACCOUNT_ISSUER}"),
        format!(
            "--service-account-key-file={}",
            path(&files.service_account_public)
        ),
        format!(
            "--service-account-signing-key-file={}",
            path(&files.service_account_key)
        ),
        format!("--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}"),
        format!("--audit-policy-file={}", path(&files.audit_policy)),
        format!("--audit-log-path={}", path(&files.audit_log)),
        // Blocking mode writes each event before the next request proceeds,
        // so tests see their writes promptly and in order.
        "--audit-log-mode=blocking".into(),
        // API priority and fairness only matters under contention and costs
        // startup time and background writes.
        "--enable-priority-and-fairness=false".into(),
        "--profiling=false".into(),
    ]
}

fn controller_manager_args(files: &RunFiles, port: u16) -> Vec<String> {
    let path = |p: &Path| p.display().to_string();
    vec![
        format!("--kubeconfig={}", path(&files.kcm_kubeconfig)),
        format!("--controllers={CONTROLLERS}"),
        "--leader-elect=false".into(),
        "--use-service-account-credentials=false".into(),
        "--bind-address=127.0.0.1".into(),
        format!("--secure-port={port}"),
        format!("--cert-dir={}", path(&files.dir.join("kcm-certs"))),
        format!(
            "--service-account-private-key-file={}",
            path(&files.service_account_key)
        ),
        format!("--root-ca-file={}", path(&files.ca_cert)),
        "--profiling=false".into(),
    ]
}

/// Whether `/readyz` answers OK; errors (connection refused, 500 while
/// post-start hooks run) mean "not yet".
async fn apiserver_ready(client: &kube::Client) -> Result<bool> {
    let request = http::Request::get("/readyz").body(Vec::new())?;
    let body = client.request_text(request).await?;
    Ok(body.trim() == "ok")
}

/// Polls `probe` until it returns `Ok(true)`, failing early — with the log
/// tail — if a process exits, and at `deadline` with the last probe error and
/// the log tail of the newest process.
async fn wait_until<F, Fut>(
    what: &str,
    deadline: Instant,
    processes: &mut [ManagedProcess],
    mut probe: F,
) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<bool>>,
{
    let mut last_error = None;
    loop {
        for process in processes.iter_mut() {
            process.ensure_running()?;
        }
        match probe().await {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(err) => last_error = Some(err),
        }
        if Instant::now() >= deadline {
            let mut message = format!("{what} not ready in time");
            if let Some(err) = last_error {
                message.push_str(&format!("; last error: {err:#}"));
            }
            if let Some(process) = processes.last() {
                message.push_str(&format!(
                    "; last lines of {} ({}):\n{}",
                    process.log().display(),
                    process.name(),
                    fsutil::tail(process.log(), 30)
                ));
            }
            bail!(message);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `<prefix>-<8 hex chars>`, a valid namespace name (DNS label).
fn namespace_name(prefix: &str) -> Result<String> {
    let mut clean: String = prefix
        .chars()
        .map(|c| c.to_ascii_lowercase())
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    clean.truncate(50);
    let clean = clean.trim_matches('-');
    let suffix = pki::random_suffix()?;
    Ok(if clean.is_empty() {
        format!("test-{suffix}")
    } else {
        format!("{clean}-{suffix}")
    })
}

/// Where a control plane keeps its files.
///
/// A temporary directory `<tmp>/fleet-handshake-testenv-<pid>-<random>` is
/// paired with a sibling `.lock` file held (flock) for the directory's life;
/// since the kernel drops the lock when the owner dies, any start can safely
/// remove directories whose lock is free, cleaning up after killed test runs.
#[derive(Debug)]
struct RunDir {
    path: PathBuf,
    temporary_lock: Option<PathBuf>,
    _lock: FileLock,
}

impl RunDir {
    fn temporary() -> Result<Self> {
        sweep_stale_run_dirs();
        let name = format!(
            "{TEMP_PREFIX}{}-{}",
            std::process::id(),
            pki::random_suffix()?
        );
        let tmp = std::env::temp_dir();
        let lock_path = tmp.join(format!("{name}.lock"));
        let lock = FileLock::acquire(&lock_path)?;
        let path = tmp.join(name);
        std::fs::create_dir(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Self {
            path,
            temporary_lock: Some(lock_path),
            _lock: lock,
        })
    }

    /// A caller-chosen directory: locked against a second control plane
    /// using it at the same time, and emptied of a previous run's files.
    fn provided(path: &Path) -> Result<Self> {
        std::fs::create_dir_all(path).with_context(|| format!("creating {}", path.display()))?;
        let lock_path = path.join(".lock");
        let lock = FileLock::try_acquire(&lock_path)?.ok_or_else(|| {
            anyhow!(
                "{} is in use by another running control plane",
                path.display()
            )
        })?;
        for entry in std::fs::read_dir(path)? {
            let entry = entry?;
            if entry.file_name() == ".lock" {
                continue;
            }
            let entry_path = entry.path();
            if entry.file_type()?.is_dir() {
                std::fs::remove_dir_all(&entry_path)
            } else {
                std::fs::remove_file(&entry_path)
            }
            .with_context(|| format!("clearing {}", entry_path.display()))?;
        }
        Ok(Self {
            path: path.to_path_buf(),
            temporary_lock: None,
            _lock: lock,
        })
    }

    fn remove_if_temporary(&self) -> Result<()> {
        let Some(lock_path) = &self.temporary_lock else {
            return Ok(());
        };
        match std::fs::remove_dir_all(&self.path) {
            Ok(()) => {}
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
            Err(err) => {
                return Err(err).with_context(|| format!("removing {}", self.path.display()));
            }
        }
        let _ = std::fs::remove_file(lock_path);
        Ok(())
    }
}

/// Removes temporary run directories whose owner is gone. Best effort: a
/// failure here must not stop a test run.
fn sweep_stale_run_dirs() {
    let tmp = std::env::temp_dir();
    let Ok(entries) = std::fs::read_dir(&tmp) else {
        return;
    };
    for entry in entries.flatten() {
        let file_name = entry.file_name();
        let Some(name) = file_name.to_str() else {
            continue;
        };
        let Some(stem) = name
            .strip_prefix(TEMP_PREFIX)
            .and_then(|rest| rest.strip_suffix(".lock"))
        else {
            continue;
        };
        if let Ok(Some(_lock)) = FileLock::try_acquire(&entry.path()) {
            let dir = tmp.join(format!("{TEMP_PREFIX}{stem}"));
            tracing::debug!(dir = %dir.display(), "removing stale run directory");
            let _ = std::fs::remove_dir_all(&dir);
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespace_names_are_valid_labels() {
        let name = namespace_name("My_Test::Case").unwrap();
        assert!(name.starts_with("my-test--case-"), "{name}");
        assert!(name.len() <= 63);
        assert!(
            name.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        );
        assert!(namespace_name("___").unwrap().starts_with("test-"));
        assert_ne!(namespace_name("a").unwrap(), namespace_name("a").unwrap());
    }

    #[test]
    fn stale_temporary_run_dirs_are_swept_and_live_ones_kept() {
        let live = RunDir::temporary().unwrap();
        let stale_name = format!("{TEMP_PREFIX}0-{}", pki::random_suffix().unwrap());
        let stale_dir = std::env::temp_dir().join(&stale_name);
        let stale_lock = std::env::temp_dir().join(format!("{stale_name}.lock"));
        std::fs::create_dir(&stale_dir).unwrap();
        std::fs::write(&stale_lock, "").unwrap();

        sweep_stale_run_dirs();
        assert!(!stale_dir.exists());
        assert!(!stale_lock.exists());
        assert!(live.path.exists());

        live.remove_if_temporary().unwrap();
        assert!(!live.path.exists());
    }

    #[test]
    fn provided_run_dir_is_exclusive_and_cleared() {
        let dir = std::env::temp_dir().join(format!(
            "testenv-provided-{}-{}",
            std::process::id(),
            pki::random_suffix().unwrap()
        ));
        std::fs::create_dir_all(dir.join("old")).unwrap();
        std::fs::write(dir.join("old.log"), "x").unwrap();

        let run_dir = RunDir::provided(&dir).unwrap();
        assert!(!dir.join("old").exists());
        assert!(!dir.join("old.log").exists());
        assert!(RunDir::provided(&dir).is_err());
        run_dir.remove_if_temporary().unwrap();
        assert!(dir.exists(), "a provided directory is the caller's");
        drop(run_dir);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
