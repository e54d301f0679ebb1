//! Shared test support: runs the real `fleet-handshake` binary against the
//! real control plane, as a ServiceAccount bound to the shipped RBAC.

#![allow(dead_code)] // each test binary uses its own part of this module

use std::future::Future;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use fleet_handshake::api::{Bundle, FleetHandshake, SyncStatus};
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, RoleBinding};
use kube::api::{Patch, PatchParams};
use kube::{Api, Client};
use serde_json::json;
use testenv::{ControlPlane, ServiceAccountIdentity};

/// Field manager of writes made by the tests themselves.
pub const TEST_MANAGER: &str = "integration-test";

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Polls `check` until it returns `Some`, or panics after `timeout` saying
/// what was awaited.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Name of the shipped ClusterRole every installation binds.
pub const OPERATOR_ROLE: &str = "fleet-handshake";
/// Name of the shipped ClusterRole for Secret copies (`DownstreamResources`).
pub const COPIES_ROLE: &str = "fleet-handshake-secret-copies";

/// Applies the shipped ClusterRoles (`deploy/rbac.yaml`) as the admin.
pub async fn apply_shipped_cluster_roles(admin: &Client) {
    let text = std::fs::read_to_string(repo_root().join("deploy/rbac.yaml"))
        .expect("reading deploy/rbac.yaml");
    let roles: Api<ClusterRole> = Api::all(admin.clone());
    for document in serde_yaml_ng::Deserializer::from_str(&text) {
        let role: ClusterRole =
            serde::Deserialize::deserialize(document).expect("deploy/rbac.yaml holds ClusterRoles");
        roles
            .patch(
                role.metadata
                    .name
                    .as_deref()
                    .expect("the ClusterRole has a name"),
                &PatchParams::apply(TEST_MANAGER).force(),
                &Patch::Apply(&role),
            )
            .await
            .expect("applying a shipped ClusterRole");
    }
}

/// How the operator under test is granted the shipped ClusterRoles.
pub enum Grant<'a> {
    /// RoleBindings to the operator role in these namespaces only
    /// (namespace-scoped mode).
    Namespaces(&'a [&'a str]),
    /// One ClusterRoleBinding to the operator role (cluster-wide mode).
    Cluster,
}

/// A ServiceAccount holding exactly the shipped RBAC: the operator role as
/// `grant` says, and the Secret-copies role in `copy_namespaces`.
pub async fn operator_identity(
    control_plane: &ControlPlane,
    grant: Grant<'_>,
    copy_namespaces: &[&str],
) -> ServiceAccountIdentity {
    let admin = control_plane.client().await;
    apply_shipped_cluster_roles(&admin).await;
    let home = control_plane.create_namespace("operator").await;
    let identity = control_plane
        .service_account(&home, "fleet-handshake")
        .await
        .expect("creating the operator's ServiceAccount");
    let subject = json!([{"kind": "ServiceAccount", "name": identity.name(), "namespace": identity.namespace()}]);
    let role_ref = |role: &str| json!({"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role});
    let bind_in = |namespace: &str, role: &str| {
        let binding: RoleBinding = serde_json::from_value(json!({
            "metadata": {"name": format!("{role}-{home}"), "namespace": namespace},
            "roleRef": role_ref(role), "subjects": subject,
        }))
        .expect("a valid RoleBinding");
        let api = Api::<RoleBinding>::namespaced(admin.clone(), namespace);
        async move {
            api.create(&Default::default(), &binding)
                .await
                .expect("binding a ClusterRole in a namespace");
        }
    };
    match grant {
        Grant::Namespaces(namespaces) => {
            for namespace in namespaces {
                bind_in(namespace, OPERATOR_ROLE).await;
            }
        }
        Grant::Cluster => {
            let binding: ClusterRoleBinding = serde_json::from_value(json!({
                "metadata": {"name": format!("{OPERATOR_ROLE}-{home}")},
                "roleRef": role_ref(OPERATOR_ROLE), "subjects": subject,
            }))
            .expect("a valid ClusterRoleBinding");
            Api::<ClusterRoleBinding>::all(admin.clone())
                .create(&Default::default(), &binding)
                .await
                .expect("binding the ClusterRole cluster-wide");
        }
    }
    for namespace in copy_namespaces {
        bind_in(namespace, COPIES_ROLE).await;
    }
    identity
}

/// The operator binary, running as a subprocess.
pub struct Operator {
    child: Option<Child>,
    log_path: PathBuf,
    kubeconfig_path: PathBuf,
    metrics_address: SocketAddr,
    args: Vec<String>,
}

impl Operator {
    /// Starts `fleet-handshake run` as `identity` with `args`, logging at
    /// trace level to a file, and waits until its caches are synced.
    pub async fn start(identity: &ServiceAccountIdentity, args: &[&str]) -> Operator {
        let dir = std::env::temp_dir().join(format!(
            "fleet-handshake-test-{}-{}",
            identity.namespace(),
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).expect("creating the operator's test directory");
        let kubeconfig_path = dir.join("kubeconfig");
        identity
            .write_kubeconfig(&kubeconfig_path)
            .expect("writing the operator's kubeconfig");
        let mut operator = Operator {
            child: None,
            log_path: dir.join("operator.log"),
            kubeconfig_path,
            metrics_address: free_address(),
            args: args.iter().map(|arg| arg.to_string()).collect(),
        };
        operator.spawn().await;
        operator
    }

    async fn spawn(&mut self) {
        self.metrics_address = free_address();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .expect("opening the operator log");
        let child = Command::new(env!("CARGO_BIN_EXE_fleet-handshake"))
            .arg("run")
            .arg("--kubeconfig")
            .arg(&self.kubeconfig_path)
            .arg("--metrics-addr")
            .arg(self.metrics_address.to_string())
            .args(["--log-level", "trace"])
            .args(&self.args)
            .env_remove("KUBECONFIG")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("duplicating the log handle"))
            .stderr(log)
            .spawn()
            .expect("starting fleet-handshake");
        self.child = Some(child);
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while http_get(self.metrics_address, "/readyz").is_none_or(|(code, _)| code != 200) {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                panic!("the operator exited with {status}; log:\n{}", self.logs());
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the operator did not become ready; log:\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Stops the operator (SIGKILL, as a crash or eviction would).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops and starts the operator with the same identity and arguments.
    pub async fn restart(&mut self) {
        self.stop();
        self.spawn().await;
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|child| matches!(child.try_wait(), Ok(None)))
    }

    /// Everything the operator has logged so far, across restarts.
    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// The operator's Prometheus metrics text.
    pub fn metrics(&self) -> String {
        http_get(self.metrics_address, "/metrics")
            .map(|(_, body)| body)
            .unwrap_or_default()
    }

    /// The value of one metric sample line (`name{labels}`), 0 when absent.
    pub fn metric(&self, sample: &str) -> f64 {
        self.metrics()
            .lines()
            .find_map(|line| line.strip_prefix(sample)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or(0.0)
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        self.stop();
        // The directory holds a ServiceAccount token and a trace log; keep it
        // only when a failing test may need the log.
        if !std::thread::panicking()
            && let Some(dir) = self.log_path.parent()
        {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

fn free_address() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("finding a free loopback port")
}

/// A minimal HTTP/1.0 GET, enough for the operator's health and metrics.
fn http_get(address: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&address, Duration::from_secs(2)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {address}\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let code = response.split_whitespace().nth(1)?.parse().ok()?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_string())?;
    Some((code, body))
}

/// Reads a handshake, `None` when absent.
pub async fn get_handshake(client: &Client, namespace: &str, name: &str) -> Option<FleetHandshake> {
    Api::<FleetHandshake>::namespaced(client.clone(), namespace)
        .get_opt(name)
        .await
        .expect("reading a handshake")
}

/// Reads a Bundle, `None` when absent.
pub async fn get_bundle(client: &Client, namespace: &str, name: &str) -> Option<Bundle> {
    Api::<Bundle>::namespaced(client.clone(), namespace)
        .get_opt(name)
        .await
        .expect("reading a Bundle")
}

/// Creates or replaces an object from YAML text as the admin (server-side
/// apply with the tests' field manager).
pub async fn apply_yaml<K>(client: &Client, namespace: &str, yaml: &str) -> K
where
    K: kube::Resource<DynamicType = (), Scope = kube::core::NamespaceResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + serde::Serialize
        + std::fmt::Debug,
{
    let object: K = serde_yaml_ng::from_str(yaml).expect("parsing test YAML");
    let name = object.meta().name.clone().expect("test objects have names");
    Api::<K>::namespaced(client.clone(), namespace)
        .patch(
            &name,
            &PatchParams::apply(TEST_MANAGER).force(),
            &Patch::Apply(&object),
        )
        .await
        .expect("applying test YAML")
}

/// A Secret with string values, applied as the admin.
pub async fn put_secret(
    client: &Client,
    namespace: &str,
    name: &str,
    values: &[(&str, &str)],
) -> Secret {
    let string_data: serde_json::Map<String, serde_json::Value> = values
        .iter()
        .map(|(key, value)| (key.to_string(), json!(value)))
        .collect();
    let secret: Secret = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": name, "namespace": namespace},
        "type": "Opaque",
        "stringData": string_data,
    }))
    .expect("a valid Secret");
    replace_secret(client, &secret).await
}

/// Creates `secret` as the admin, replacing any Secret of its name whole
/// (an apply would keep keys set by an earlier apply).
pub async fn replace_secret(client: &Client, secret: &Secret) -> Secret {
    let namespace = secret
        .metadata
        .namespace
        .as_deref()
        .expect("test Secrets name their namespace");
    let name = secret
        .metadata
        .name
        .as_deref()
        .expect("test Secrets have names");
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let _ = api.delete(name, &Default::default()).await;
    api.create(&Default::default(), secret)
        .await
        .expect("creating a Secret")
}

/// The Secret manifest carried by a Bundle's single resource, parsed.
pub fn delivered_secret(bundle: &Bundle) -> serde_json::Value {
    assert_eq!(
        bundle.spec.resources.len(),
        1,
        "the Bundle carries exactly one resource"
    );
    serde_json::from_str(&bundle.spec.resources[0].content)
        .expect("the resource is a JSON manifest")
}

/// Decoded value of `key` in a delivered Secret manifest.
pub fn delivered_value(manifest: &serde_json::Value, key: &str) -> Option<String> {
    use k8s_openapi::ByteString;
    let encoded = manifest["data"].get(key)?.clone();
    let bytes: ByteString = serde_json::from_value(encoded).ok()?;
    String::from_utf8(bytes.0).ok()
}

pub const WAIT: Duration = Duration::from_secs(30);

/// Options of a [`Scenario`].
#[derive(Default)]
pub struct Setup {
    /// Also bind the Secret-copies role in the workspace.
    pub secret_copies: bool,
    /// Extra `fleet-handshake run` arguments.
    pub operator_args: &'static [&'static str],
}

/// A workspace namespace (like `fleet-default`) and a source namespace (like
/// `default`), with an operator watching both as a ServiceAccount that holds
/// exactly the shipped RBAC there.
pub struct Scenario {
    pub control_plane: &'static ControlPlane,
    pub admin: Client,
    pub workspace: String,
    pub source: String,
    pub operator: Operator,
    pub operator_user: String,
}

impl Scenario {
    pub async fn new(setup: Setup) -> Scenario {
        let control_plane = ControlPlane::shared();
        let admin = control_plane.client().await;
        let workspace = control_plane.create_namespace("workspace").await;
        let source = control_plane.create_namespace("source").await;
        let copy_namespaces: &[&str] = if setup.secret_copies {
            &[&workspace]
        } else {
            &[]
        };
        let identity = operator_identity(
            control_plane,
            Grant::Namespaces(&[&workspace, &source]),
            copy_namespaces,
        )
        .await;
        let watched = format!("{workspace},{source}");
        let mut args = vec!["--namespace", watched.as_str()];
        args.extend(setup.operator_args.iter().copied());
        let operator = Operator::start(&identity, &args).await;
        Scenario {
            control_plane,
            admin,
            workspace,
            source,
            operator,
            operator_user: identity.username(),
        }
    }

    /// An example from `examples/`, moved into this scenario's namespaces.
    pub fn example(&self, file: &str) -> String {
        std::fs::read_to_string(repo_root().join("examples").join(file))
            .expect("reading an example")
            .replace("fleet-default", &self.workspace)
            .replace("namespace: default", &format!("namespace: {}", self.source))
            .replace(
                "secretNamespace: default",
                &format!("secretNamespace: {}", self.source),
            )
    }

    pub async fn apply_example_secret(&self) -> Secret {
        apply_yaml(&self.admin, &self.source, &self.example("secret.yaml")).await
    }

    pub async fn apply_example_handshake(&self, file: &str) -> FleetHandshake {
        apply_yaml(&self.admin, &self.workspace, &self.example(file)).await
    }

    /// Waits until the handshake's status word is `word` for its current
    /// generation, and returns it.
    pub async fn status_becomes(&self, name: &str, word: SyncStatus) -> FleetHandshake {
        eventually(
            &format!("handshake {name} to be {word:?}"),
            WAIT,
            || async {
                get_handshake(&self.admin, &self.workspace, name)
                    .await
                    .filter(|handshake| {
                        handshake.status.as_ref().is_some_and(|status| {
                            status.status == Some(word)
                                && status.observed_generation == handshake.metadata.generation
                        })
                    })
            },
        )
        .await
    }

    pub async fn bundle_matching(
        &self,
        name: &str,
        what: &str,
        check: impl Fn(&Bundle) -> bool,
    ) -> Bundle {
        eventually(what, WAIT, || async {
            get_bundle(&self.admin, &self.workspace, name)
                .await
                .filter(|bundle| check(bundle))
        })
        .await
    }

    pub async fn bundle_gone(&self, name: &str) {
        eventually(&format!("Bundle {name} to be gone"), WAIT, || async {
            get_bundle(&self.admin, &self.workspace, name)
                .await
                .is_none()
                .then_some(())
        })
        .await
    }
}

pub fn condition<'a>(handshake: &'a FleetHandshake, type_: &str) -> (&'a str, &'a str) {
    let condition = handshake
        .status
        .as_ref()
        .and_then(|status| {
            status
                .conditions
                .iter()
                .find(|condition| condition.type_ == type_)
        })
        .unwrap_or_else(|| panic!("condition {type_} is missing"));
    (condition.status.as_str(), condition.reason.as_str())
}
