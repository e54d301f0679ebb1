//! Starting and stopping control planes leaves no processes or files behind.

use std::net::{Ipv4Addr, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::Api;
use kube::config::Kubeconfig;
use testenv::{ControlPlane, CrdSource, Options, Startup, StateDir};

const WIDGET_CRD: &str = r#"
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: widgets.example.com
spec:
  group: example.com
  names: {kind: Widget, plural: widgets}
  scope: Namespaced
  versions:
  - name: v1
    served: true
    storage: true
    schema:
      openAPIV3Schema: {type: object, x-kubernetes-preserve-unknown-fields: true}
"#;

fn port_of(server: &str) -> u16 {
    server
        .rsplit(':')
        .next()
        .and_then(|port| port.trim_end_matches('/').parse().ok())
        .unwrap_or_else(|| panic!("no port in {server}"))
}

fn listening(port: u16) -> bool {
    TcpStream::connect_timeout(
        &(Ipv4Addr::LOCALHOST, port).into(),
        Duration::from_millis(500),
    )
    .is_ok()
}

fn wait_closed(port: u16, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while listening(port) {
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    true
}

#[tokio::test]
async fn stop_kills_processes_and_removes_the_run_dir() {
    let options = Options {
        fleet_crds: false,
        crds: vec![
            CrdSource::Yaml(WIDGET_CRD.to_string()),
            CrdSource::OptionalFile("/nonexistent/crd.yaml".into()),
        ],
        ..Options::default()
    };
    let control_plane = ControlPlane::start(options).await.expect("starting");
    let run_dir = control_plane.run_dir().expect("run dir").to_path_buf();
    let port = port_of(control_plane.server_url());
    assert!(run_dir.join("kube-apiserver.log").is_file());
    assert_eq!(
        control_plane.kubeconfig_path(),
        run_dir.join("kubeconfig").as_path()
    );

    let crds: Api<CustomResourceDefinition> = Api::all(control_plane.client().await);
    crds.get("widgets.example.com")
        .await
        .expect("inline CRD installed");
    assert!(
        crds.get_opt("bundles.fleet.cattle.io")
            .await
            .expect("listing CRDs")
            .is_none(),
        "Fleet CRDs were not requested"
    );

    control_plane.stop().expect("stopping");
    assert!(!run_dir.exists(), "{} left behind", run_dir.display());
    assert!(wait_closed(port, Duration::from_secs(5)));
}

/// The components die with the process that started them even when it is
/// SIGKILLed and no destructor runs.
#[test]
fn components_die_with_a_killed_supervisor() {
    let state_path = std::env::temp_dir().join(format!(
        "testenv-lifecycle-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock after 1970")
            .as_nanos()
    ));
    let state = StateDir::new(&state_path);
    let mut supervisor = Command::new(env!("CARGO_BIN_EXE_testenv"))
        .args(["up", "--foreground", "--state-dir"])
        .arg(&state_path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting testenv up --foreground");

    let deadline = Instant::now() + Duration::from_secs(300);
    let kubeconfig = loop {
        match state.startup() {
            Startup::Ready(path) => break path,
            Startup::Failed(err) => panic!("startup failed: {err}"),
            Startup::Pending => {}
        }
        if let Some(status) = supervisor.try_wait().expect("polling supervisor") {
            panic!("supervisor exited early ({status})");
        }
        assert!(Instant::now() < deadline, "control plane not ready in time");
        std::thread::sleep(Duration::from_millis(200));
    };
    let server = server_of(&kubeconfig);
    let port = port_of(&server);
    assert!(listening(port));
    assert_eq!(
        state.running_pid().expect("pid"),
        Some(supervisor.id() as i32)
    );

    supervisor.kill().expect("SIGKILL");
    supervisor.wait().expect("reaping supervisor");
    assert!(
        wait_closed(port, Duration::from_secs(10)),
        "kube-apiserver outlived its supervisor"
    );

    assert_eq!(state.running_pid().expect("pid"), None);
    state.clean().expect("cleaning up");
    assert!(!state.run_dir().exists());
    std::fs::remove_dir_all(&state_path).expect("removing state dir");
}

fn server_of(kubeconfig: &Path) -> String {
    let kubeconfig = Kubeconfig::read_from(kubeconfig).expect("reading kubeconfig");
    kubeconfig.clusters[0]
        .cluster
        .as_ref()
        .and_then(|cluster| cluster.server.clone())
        .expect("server")
}
