//! Kubeconfig files for the admin and for service accounts.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use base64::Engine;
use kube::config::{KubeConfigOptions, Kubeconfig};
use serde_json::json;

use crate::fsutil;
use crate::pki;

/// Name of the kubeconfig cluster extension in which a harness-started control
/// plane records where its audit log is, so a process that reuses the control
/// plane through `FLEET_HANDSHAKE_TEST_KUBECONFIG` can still read the audit log.
pub(crate) const EXTENSION_NAME: &str = "testenv.fleet-handshake.io";

/// How to reach and trust an apiserver, independent of the identity used.
#[derive(Debug, Clone)]
pub(crate) struct Endpoint {
    /// `https://host:port`.
    pub server: String,
    /// PEM bundle of trusted CAs; `None` means the system roots.
    pub ca_pem: Option<String>,
    /// Skip TLS verification; only ever true for a reused kubeconfig that
    /// asked for it.
    pub insecure: bool,
    /// Name to verify the serving certificate against, if not the host.
    pub tls_server_name: Option<String>,
}

impl Endpoint {
    /// Recovers the endpoint from a client configuration, e.g. one loaded
    /// from a reused kubeconfig.
    pub(crate) fn from_config(config: &kube::Config) -> Self {
        let server = config.cluster_url.to_string();
        Self {
            server: server.trim_end_matches('/').to_string(),
            ca_pem: config.root_cert.as_deref().map(pki::der_certs_to_pem),
            insecure: config.accept_invalid_certs,
            tls_server_name: config.tls_server_name.clone(),
        }
    }
}

/// Data recorded in the [`EXTENSION_NAME`] cluster extension.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Extension {
    /// Audit log of the apiserver.
    pub audit_log_path: Option<PathBuf>,
}

/// Renders a single-context kubeconfig that authenticates with `token`.
pub(crate) fn render(
    endpoint: &Endpoint,
    user: &str,
    token: &str,
    namespace: &str,
    extension: Option<&Extension>,
) -> Result<String> {
    let mut cluster = json!({ "server": endpoint.server });
    if let Some(ca) = &endpoint.ca_pem {
        cluster["certificate-authority-data"] =
            json!(base64::engine::general_purpose::STANDARD.encode(ca));
    }
    if endpoint.insecure {
        cluster["insecure-skip-tls-verify"] = json!(true);
    }
    if let Some(name) = &endpoint.tls_server_name {
        cluster["tls-server-name"] = json!(name);
    }
    if let Some(extension) = extension {
        cluster["extensions"] = json!([{ "name": EXTENSION_NAME, "extension": extension }]);
    }
    let context = "fleet-handshake-testenv";
    let doc = json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{ "name": context, "cluster": cluster }],
        "users": [{ "name": user, "user": { "token": token } }],
        "contexts": [{
            "name": context,
            "context": { "cluster": context, "user": user, "namespace": namespace },
        }],
        "current-context": context,
    });
    serde_yaml_ng::to_string(&doc).context("serialising kubeconfig")
}

/// Writes a kubeconfig readable only by the owner, since it holds a token.
pub(crate) fn write(path: &Path, yaml: &str) -> Result<()> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    fsutil::write_private(path, yaml.as_bytes())
}

/// Builds a client configuration from kubeconfig YAML, exactly as a process
/// given that file would, so the files written are exercised by every test.
pub(crate) async fn config_from_yaml(yaml: &str) -> Result<kube::Config> {
    let kubeconfig = Kubeconfig::from_yaml(yaml).context("parsing generated kubeconfig")?;
    kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .context("loading generated kubeconfig")
}

/// Reads the [`EXTENSION_NAME`] extension of the current context's cluster.
pub(crate) fn read_extension(kubeconfig: &Kubeconfig) -> Option<Extension> {
    let context_name = kubeconfig.current_context.as_deref()?;
    let context = kubeconfig
        .contexts
        .iter()
        .find(|c| c.name == context_name)?
        .context
        .as_ref()?;
    let cluster = kubeconfig
        .clusters
        .iter()
        .find(|c| c.name == context.cluster)?
        .cluster
        .as_ref()?;
    let extension = cluster
        .extensions
        .as_ref()?
        .iter()
        .find(|e| e.name == EXTENSION_NAME)?;
    serde_json::from_value(extension.extension.clone()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn rendered_kubeconfig_loads_with_ca_token_and_extension() {
        let pki = pki::Pki::generate().unwrap();
        let endpoint = Endpoint {
            server: "https://127.0.0.1:6443".into(),
            ca_pem: Some(pki.ca_cert_pem.clone()),
            insecure: false,
            tls_server_name: None,
        };
        let extension = Extension {
            audit_log_path: Some(PathBuf::from("/somewhere/audit.log")),
        };
        let yaml = render(&endpoint, "admin", "secret-token", "ns1", Some(&extension)).unwrap();

        let config = config_from_yaml(&yaml).await.unwrap();
        assert_eq!(config.cluster_url.to_string(), "https://127.0.0.1:6443/");
        assert_eq!(config.default_namespace, "ns1");
        assert_eq!(
            config.root_cert.as_deref(),
            Some(&pki::pem_certs_to_der(&pki.ca_cert_pem).unwrap()[..])
        );
        assert!(config.auth_info.token.is_some());

        let parsed = Kubeconfig::from_yaml(&yaml).unwrap();
        assert_eq!(
            read_extension(&parsed).unwrap().audit_log_path,
            extension.audit_log_path
        );

        let round_trip = Endpoint::from_config(&config);
        assert_eq!(round_trip.server, endpoint.server);
        assert_eq!(
            round_trip
                .ca_pem
                .as_deref()
                .map(|p| p.replace("\r\n", "\n")),
            Some(pki.ca_cert_pem.replace("\r\n", "\n"))
        );
    }
}
