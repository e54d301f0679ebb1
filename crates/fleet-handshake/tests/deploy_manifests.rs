//! The shipped manifests (`deploy/`) on the real control plane: every
//! document is accepted by the API server as written (schema validation,
//! strict field validation, RBAC checks), and what is stored installs the
//! operator safely and consistently with the binary.
//!
//! The control plane has no kubelet, scheduler or Deployment controller, so
//! the Deployment is only stored, never started. How its pod would be
//! admitted is checked with a dry-run create of the pod template instead.

mod support;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::process::Command;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Container, Pod, Probe, Service, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{DynamicObject, Patch, PatchParams, PostParams};
use kube::core::GroupVersionKind;
use kube::discovery::{self, Scope};
use kube::{Api, Client, ResourceExt};
use serde::Deserialize as _;
use support::{COPIES_ROLE, OPERATOR_ROLE, TEST_MANAGER, repo_root};
use testenv::ControlPlane;

/// In the order an installation applies them: the CRD and ClusterRoles
/// before the objects that use them.
const MANIFESTS: [&str; 3] = [
    "deploy/crd.yaml",
    "deploy/rbac.yaml",
    "deploy/operator.yaml",
];
const NAMESPACE: &str = "fleet-handshake-system";
const NAME: &str = "fleet-handshake";

/// Every non-empty YAML document of a file under the repository root.
fn documents(file: &str) -> Vec<DynamicObject> {
    let text = std::fs::read_to_string(repo_root().join(file))
        .unwrap_or_else(|error| panic!("reading {file}: {error}"));
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|document| {
            serde_json::Value::deserialize(document)
                .unwrap_or_else(|error| panic!("{file} is not valid YAML: {error}"))
        })
        // A document of comments only (such as a header) is null.
        .filter(|value| !value.is_null())
        .map(|value| {
            serde_json::from_value(value)
                .unwrap_or_else(|error| panic!("{file} holds a non-object document: {error}"))
        })
        .collect()
}

/// Server-side applies `object` as written, resolving its kind through
/// discovery, and returns what the API server stored.
async fn apply(client: &Client, file: &str, object: &DynamicObject) -> DynamicObject {
    let types = object
        .types
        .as_ref()
        .unwrap_or_else(|| panic!("a document of {file} has no apiVersion or kind"));
    let name = object.name_any();
    let what = format!("{file}: {} {name}", types.kind);
    let gvk = GroupVersionKind::try_from(types).unwrap_or_else(|error| panic!("{what}: {error}"));
    let (resource, capabilities) = discovery::pinned_kind(client, &gvk)
        .await
        .unwrap_or_else(|error| panic!("{what}: the API server does not serve this kind: {error}"));
    let api: Api<DynamicObject> = match capabilities.scope {
        Scope::Namespaced => {
            // Without one, `kubectl apply` would use whatever namespace the
            // current context has.
            let namespace = object
                .namespace()
                .unwrap_or_else(|| panic!("{what}: a namespaced object must name its namespace"));
            Api::namespaced_with(client.clone(), &namespace, &resource)
        }
        Scope::Cluster => {
            assert!(
                object.namespace().is_none(),
                "{what}: a cluster-scoped object names a namespace"
            );
            Api::all_with(client.clone(), &resource)
        }
    };
    // Strict: a misspelt or misplaced field is an error rather than being
    // dropped silently.
    let params = PatchParams::apply(TEST_MANAGER).force().validation_strict();
    api.patch(&name, &params, &Patch::Apply(object))
        .await
        .unwrap_or_else(|error| panic!("{what} was rejected: {error}"))
}

/// The port of the default `--metrics-addr`, as `fleet-handshake run --help`
/// prints it.
fn default_metrics_port() -> u16 {
    let output = Command::new(env!("CARGO_BIN_EXE_fleet-handshake"))
        .args(["run", "--help"])
        .env_remove("FLEET_HANDSHAKE_METRICS_ADDR")
        .output()
        .expect("running fleet-handshake run --help");
    assert!(output.status.success(), "run --help failed: {output:?}");
    let help = String::from_utf8(output.stdout).expect("help text is UTF-8");
    let mut lines = help
        .lines()
        .skip_while(|line| !line.trim_start().starts_with("--metrics-addr"));
    assert!(lines.next().is_some(), "no --metrics-addr in:\n{help}");
    // The option's text ends where the next option starts.
    let default = lines
        .take_while(|line| !line.trim_start().starts_with('-'))
        .find_map(|line| {
            line.trim()
                .strip_prefix("[default: ")?
                .strip_suffix(']')
                .map(str::to_string)
        })
        .unwrap_or_else(|| panic!("--metrics-addr shows no default in:\n{help}"));
    default
        .parse::<SocketAddr>()
        .unwrap_or_else(|error| panic!("default --metrics-addr {default:?}: {error}"))
        .port()
}

/// The container port a probe or Service refers to, by number or name.
fn resolve_port(container: &Container, port: &IntOrString) -> i32 {
    match port {
        IntOrString::Int(number) => *number,
        IntOrString::String(name) => {
            container
                .ports
                .iter()
                .flatten()
                .find(|port| port.name.as_deref() == Some(name))
                .unwrap_or_else(|| panic!("the container has no port named {name}"))
                .container_port
        }
    }
}

/// The path and container port of an HTTP probe.
fn http_probe(container: &Container, probe: Option<&Probe>, which: &str) -> (String, i32) {
    let get = probe
        .and_then(|probe| probe.http_get.as_ref())
        .unwrap_or_else(|| panic!("the container has no HTTP {which} probe"));
    (
        get.path.clone().unwrap_or_default(),
        resolve_port(container, &get.port),
    )
}

#[tokio::test]
async fn the_shipped_manifests_are_accepted_and_install_the_operator_safely() {
    let control_plane = ControlPlane::shared();
    let admin = control_plane.client().await;

    for file in MANIFESTS {
        let objects = documents(file);
        assert!(!objects.is_empty(), "{file} holds no objects");
        for object in &objects {
            apply(&admin, file, object).await;
        }
    }

    // RBAC: the API server does not check that a roleRef exists (an admin
    // may bind a role before creating it), so check it here.
    let shipped_roles: BTreeSet<String> = documents("deploy/rbac.yaml")
        .iter()
        .map(|object| {
            assert_eq!(object.types.as_ref().unwrap().kind, "ClusterRole");
            object.name_any()
        })
        .collect();
    assert_eq!(
        shipped_roles,
        BTreeSet::from([OPERATOR_ROLE.to_string(), COPIES_ROLE.to_string()])
    );
    let binding = Api::<ClusterRoleBinding>::all(admin.clone())
        .get(NAME)
        .await
        .expect("reading the stored ClusterRoleBinding");
    assert_eq!(
        binding.role_ref.api_group.as_deref(),
        Some("rbac.authorization.k8s.io")
    );
    assert_eq!(binding.role_ref.kind, "ClusterRole");
    assert!(
        shipped_roles.contains(&binding.role_ref.name),
        "the ClusterRoleBinding refers to {}, which deploy/rbac.yaml does not define",
        binding.role_ref.name
    );
    assert_eq!(
        binding.role_ref.name, OPERATOR_ROLE,
        "cluster-wide mode binds the operator role only"
    );
    Api::<ClusterRole>::all(admin.clone())
        .get(&binding.role_ref.name)
        .await
        .expect("the bound ClusterRole is stored");
    let subjects = binding.subjects.clone().unwrap_or_default();
    assert_eq!(subjects.len(), 1, "one subject: {subjects:?}");
    assert_eq!(subjects[0].kind, "ServiceAccount");
    assert_eq!(subjects[0].name, NAME);
    assert_eq!(subjects[0].namespace.as_deref(), Some(NAMESPACE));
    Api::<ServiceAccount>::namespaced(admin.clone(), NAMESPACE)
        .get(NAME)
        .await
        .expect("the bound ServiceAccount is stored");
    // The Secret-copies role writes Secrets; a plain apply must not grant it.
    for object in documents("deploy/operator.yaml") {
        if let Some(role) = object.data.pointer("/roleRef/name") {
            assert_ne!(
                role, COPIES_ROLE,
                "deploy/operator.yaml binds {COPIES_ROLE}"
            );
        }
    }

    // The Deployment as stored (defaults filled in by the API server).
    let deployment = Api::<Deployment>::namespaced(admin.clone(), NAMESPACE)
        .get(NAME)
        .await
        .expect("reading the stored Deployment");
    let spec = deployment.spec.as_ref().expect("a Deployment spec");
    // No leader election yet: never two instances at once.
    assert_eq!(spec.replicas, Some(1));
    assert_eq!(
        spec.strategy
            .as_ref()
            .and_then(|strategy| strategy.type_.as_deref()),
        Some("Recreate")
    );
    let pod = spec.template.spec.as_ref().expect("a pod template spec");
    assert_eq!(pod.service_account_name.as_deref(), Some(NAME));
    assert_eq!(pod.automount_service_account_token, Some(true));
    assert_eq!(pod.containers.len(), 1);
    let container = &pod.containers[0];
    assert_eq!(container.args.as_deref(), Some(&["run".to_string()][..]));

    let security = container
        .security_context
        .as_ref()
        .expect("a container securityContext");
    let run_as_non_root = security.run_as_non_root.or_else(|| {
        pod.security_context
            .as_ref()
            .and_then(|context| context.run_as_non_root)
    });
    assert_eq!(
        run_as_non_root,
        Some(true),
        "the container runs as non-root"
    );
    assert_eq!(
        security.read_only_root_filesystem,
        Some(true),
        "the root filesystem is read-only"
    );
    assert_eq!(security.allow_privilege_escalation, Some(false));
    let dropped = security
        .capabilities
        .as_ref()
        .and_then(|capabilities| capabilities.drop.clone())
        .unwrap_or_default();
    assert!(dropped.iter().any(|capability| capability == "ALL"));

    // The container serves on the binary's default port: nothing overrides
    // --metrics-addr, and the metrics port is that default.
    let env = container.env.clone().unwrap_or_default();
    assert!(
        !env.iter()
            .any(|var| var.name == "FLEET_HANDSHAKE_METRICS_ADDR"),
        "the Deployment overrides the metrics address"
    );
    assert!(
        !container
            .args
            .iter()
            .flatten()
            .any(|arg| arg.starts_with("--metrics-addr"))
    );
    let metrics_port = resolve_port(container, &IntOrString::String("metrics".into()));
    assert_eq!(
        i32::from(default_metrics_port()),
        metrics_port,
        "the metrics port differs from the default of --metrics-addr"
    );
    assert_eq!(
        http_probe(container, container.liveness_probe.as_ref(), "liveness"),
        ("/healthz".to_string(), metrics_port)
    );
    assert_eq!(
        http_probe(container, container.readiness_probe.as_ref(), "readiness"),
        ("/readyz".to_string(), metrics_port)
    );
    let pod_name = env
        .iter()
        .find(|var| var.name == "POD_NAME")
        .and_then(|var| var.value_from.as_ref())
        .and_then(|source| source.field_ref.as_ref())
        .map(|field| field.field_path.as_str());
    assert_eq!(pod_name, Some("metadata.name"), "POD_NAME names the pod");
    assert!(env.iter().any(
        |var| var.name == "FLEET_HANDSHAKE_LOG_FORMAT" && var.value.as_deref() == Some("json")
    ));

    // The metrics Service reaches that port on the operator's pods.
    let service = Api::<Service>::namespaced(admin.clone(), NAMESPACE)
        .get("fleet-handshake-metrics")
        .await
        .expect("reading the stored metrics Service");
    let service_spec = service.spec.as_ref().expect("a Service spec");
    let labels = spec
        .template
        .metadata
        .as_ref()
        .and_then(|meta| meta.labels.as_ref());
    for (key, value) in service_spec.selector.iter().flatten() {
        assert_eq!(
            labels.and_then(|labels| labels.get(key)),
            Some(value),
            "the Service selects pods the Deployment does not make"
        );
    }
    let service_port = &service_spec.ports.as_ref().expect("Service ports")[0];
    assert_eq!(
        resolve_port(
            container,
            service_port.target_port.as_ref().expect("a targetPort")
        ),
        metrics_port
    );

    // The pod the Deployment would create is admitted in its namespace: the
    // ServiceAccount exists, and the restricted Pod Security Standard that
    // the Namespace enforces accepts it.
    let pods: Api<Pod> = Api::namespaced(admin.clone(), NAMESPACE);
    let dry_run = PostParams {
        dry_run: true,
        ..PostParams::default()
    };
    let mut template_pod = Pod {
        metadata: spec.template.metadata.clone().unwrap_or_default(),
        spec: spec.template.spec.clone(),
        ..Pod::default()
    };
    template_pod.metadata.name = Some("fleet-handshake-admission-check".into());
    pods.create(&dry_run, &template_pod)
        .await
        .expect("the Deployment's pod is admitted");
    // And that admission really enforces: a privileged variant is refused.
    let mut privileged = template_pod.clone();
    privileged.spec.as_mut().unwrap().containers[0]
        .security_context
        .as_mut()
        .unwrap()
        .allow_privilege_escalation = Some(true);
    let refused = pods
        .create(&dry_run, &privileged)
        .await
        .expect_err("Pod Security admission refuses privilege escalation");
    assert!(
        refused.to_string().contains("PodSecurity"),
        "refused for another reason: {refused}"
    );
}
