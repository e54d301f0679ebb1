//! Locating and installing CustomResourceDefinitions.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::wait::{await_condition, conditions};
use serde::Deserialize;

/// Go module that ships Fleet's CRDs.
pub const FLEET_MODULE: &str = "github.com/rancher/fleet";
/// Fleet release whose CRDs are installed; the proxy serves this version.
pub const FLEET_VERSION: &str = "v0.16.0";
/// Path of the CRD bundle inside the Fleet module.
const FLEET_CRD_FILE: &str = "charts/fleet-crd/templates/crds.yaml";

/// Environment variable naming Fleet's `crds.yaml` directly, for machines that
/// have the file but no Go toolchain.
pub const FLEET_CRDS_ENV: &str = "FLEET_HANDSHAKE_FLEET_CRDS";

/// Field manager for server-side apply of CRDs.
const FIELD_MANAGER: &str = "fleet-handshake-testenv";

/// Where CRD manifests come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CrdSource {
    /// A (multi-document) YAML file that must exist.
    File(PathBuf),
    /// A YAML file that is skipped if it does not exist (yet).
    OptionalFile(PathBuf),
    /// (Multi-document) YAML text.
    Yaml(String),
}

impl CrdSource {
    /// Reads the manifests; `Ok(None)` for a missing optional file.
    fn load(&self) -> Result<Option<(String, String)>> {
        match self {
            CrdSource::File(path) => read(path).map(Some),
            CrdSource::OptionalFile(path) if !path.exists() => {
                tracing::debug!(path = %path.display(), "optional CRD file absent, skipped");
                Ok(None)
            }
            CrdSource::OptionalFile(path) => read(path).map(Some),
            CrdSource::Yaml(text) => Ok(Some(("inline YAML".to_string(), text.clone()))),
        }
    }
}

fn read(path: &Path) -> Result<(String, String)> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading CRD file {}", path.display()))?;
    Ok((path.display().to_string(), text))
}

/// Path of Fleet's `crds.yaml` inside the Go module cache (downloading the
/// module through the Go module proxy if needed), or the file named by
/// `FLEET_HANDSHAKE_FLEET_CRDS`. The file is read in place, never copied.
pub fn fleet_crd_file() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os(FLEET_CRDS_ENV).filter(|v| !v.is_empty()) {
        let path = PathBuf::from(path);
        if !path.is_file() {
            bail!("{FLEET_CRDS_ENV}={} is not a file", path.display());
        }
        return Ok(path);
    }

    #[derive(Deserialize)]
    #[serde(rename_all = "PascalCase")]
    struct Download {
        dir: Option<PathBuf>,
        error: Option<String>,
    }

    let module = format!("{FLEET_MODULE}@{FLEET_VERSION}");
    crate::binaries::go_version(&format!(
        "to fetch Fleet's CRDs from the {module} module \
         (or set {FLEET_CRDS_ENV} to that module's {FLEET_CRD_FILE})"
    ))?;
    let out = Command::new("go")
        .args(["mod", "download", "-json", &module])
        // Outside any module, so the download cannot touch a go.mod/go.sum.
        .current_dir(std::env::temp_dir())
        .env("GOWORK", "off")
        .stdin(Stdio::null())
        .output()
        .context("running go mod download")?;
    let parsed: Option<Download> = serde_json::from_slice(&out.stdout).ok();
    match parsed {
        Some(Download {
            error: Some(err), ..
        }) => {
            bail!("go mod download {module} failed: {err}")
        }
        Some(Download { dir: Some(dir), .. }) if out.status.success() => {
            let file = dir.join(FLEET_CRD_FILE);
            if !file.is_file() {
                bail!("{module} has no {FLEET_CRD_FILE}");
            }
            Ok(file)
        }
        _ => bail!(
            "go mod download {module} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ),
    }
}

/// One CRD manifest, kept as raw JSON so applying it sends exactly what the
/// file says (no lossy round trip through typed structs).
#[derive(Debug, Clone)]
pub(crate) struct CrdManifest {
    pub name: String,
    pub body: serde_json::Value,
}

/// Splits multi-document YAML into CRD manifests, rejecting anything that is
/// not a CRD so a wrong file fails loudly instead of being half-applied.
pub(crate) fn parse_crds(origin: &str, text: &str) -> Result<Vec<CrdManifest>> {
    let mut crds = Vec::new();
    for (index, document) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let value = serde_json::Value::deserialize(document)
            .with_context(|| format!("parsing YAML document {index} of {origin}"))?;
        if value.is_null() {
            continue; // empty document, e.g. a leading `---`
        }
        let kind = value.get("kind").and_then(|k| k.as_str()).unwrap_or("");
        if kind != "CustomResourceDefinition" {
            bail!("document {index} of {origin} is a {kind:?}, not a CustomResourceDefinition");
        }
        let name = value
            .pointer("/metadata/name")
            .and_then(|n| n.as_str())
            .with_context(|| format!("CRD document {index} of {origin} has no metadata.name"))?
            .to_string();
        crds.push(CrdManifest { name, body: value });
    }
    Ok(crds)
}

/// Loads CRDs from every source, skipping absent optional files.
pub(crate) fn load_all(sources: &[CrdSource]) -> Result<Vec<CrdManifest>> {
    let mut crds = Vec::new();
    for source in sources {
        if let Some((origin, text)) = source.load()? {
            crds.extend(parse_crds(&origin, &text)?);
        }
    }
    Ok(crds)
}

/// Server-side applies `crds` (so re-running against a reused control plane
/// converges instead of conflicting) and waits until each is Established.
pub(crate) async fn install(
    client: &kube::Client,
    crds: &[CrdManifest],
    timeout: Duration,
) -> Result<()> {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let params = PatchParams::apply(FIELD_MANAGER).force();
    for crd in crds {
        api.patch(&crd.name, &params, &Patch::Apply(&crd.body))
            .await
            .with_context(|| format!("applying CRD {}", crd.name))?;
    }
    let waits = crds.iter().map(|crd| {
        let name = crd.name.clone();
        let api = api.clone();
        async move {
            tokio::time::timeout(
                timeout,
                await_condition(api, &name, conditions::is_crd_established()),
            )
            .await
            .with_context(|| format!("CRD {name} not Established within {timeout:?}"))?
            .with_context(|| format!("watching CRD {name}"))?;
            anyhow::Ok(())
        }
    });
    futures::future::try_join_all(waits).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const CRD: &str = r#"
---
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
      openAPIV3Schema: {type: object}
---
"#;

    #[test]
    fn parses_crds_and_skips_empty_documents() {
        let crds = parse_crds("test", CRD).unwrap();
        assert_eq!(crds.len(), 1);
        assert_eq!(crds[0].name, "widgets.example.com");
    }

    #[test]
    fn rejects_non_crd_documents() {
        let err = parse_crds("test", "apiVersion: v1\nkind: ConfigMap\n").unwrap_err();
        assert!(err.to_string().contains("ConfigMap"), "{err}");
    }

    #[test]
    fn missing_optional_file_is_skipped() {
        let sources = [CrdSource::OptionalFile(PathBuf::from(
            "/nonexistent/fleet-handshake/crd.yaml",
        ))];
        assert!(load_all(&sources).unwrap().is_empty());
        let required = [CrdSource::File(PathBuf::from(
            "/nonexistent/fleet-handshake/crd.yaml",
        ))];
        assert!(load_all(&required).is_err());
    }
}
