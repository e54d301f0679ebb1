//! The apiserver audit log: which requests each user made.
//!
//! The policy records, at `Metadata` level (who did what to which object,
//! never bodies): every request of a ServiceAccount (the identities tests
//! give to the code under test, so its exact use of the API can be compared
//! with the RBAC it ships), and the writes of everyone else. Long-running
//! requests (watches) are recorded when their response starts.

use std::path::Path;

use anyhow::{Context, Result};
use serde::Deserialize;

/// Audit policy passed to kube-apiserver.
pub(crate) const POLICY: &str = "\
apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: [RequestReceived]
rules:
- level: Metadata
  userGroups: [\"system:serviceaccounts\"]
- level: Metadata
  verbs: [create, update, patch, delete, deletecollection]
- level: None
";

/// Verbs that change state.
pub const WRITE_VERBS: [&str; 5] = ["create", "update", "patch", "delete", "deletecollection"];

/// One audited request.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AuditEvent {
    /// Unique ID of the request.
    #[serde(rename = "auditID")]
    pub audit_id: String,
    /// `ResponseComplete`; `ResponseStarted` for the start of a watch;
    /// `Panic` if the handler panicked.
    pub stage: String,
    /// Kubernetes verb, e.g. `get`, `list`, `watch`, `create`, `patch`.
    pub verb: String,
    /// Request path and query.
    #[serde(rename = "requestURI")]
    pub request_uri: String,
    /// Authenticated identity.
    pub user: AuditUser,
    /// Object the request was about, if any.
    #[serde(default)]
    pub object_ref: Option<AuditObjectRef>,
    /// HTTP status of the response, if any.
    #[serde(default)]
    pub response_status: Option<AuditResponseStatus>,
    /// User agent of the client.
    #[serde(default)]
    pub user_agent: Option<String>,
}

impl AuditEvent {
    /// HTTP status code of the response, if recorded.
    pub fn code(&self) -> Option<u16> {
        self.response_status.as_ref().and_then(|s| s.code)
    }

    /// Whether the request was answered with a 2xx status.
    pub fn succeeded(&self) -> bool {
        self.code().is_some_and(|c| (200..300).contains(&c))
    }
}

/// Identity of the requester.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct AuditUser {
    /// e.g. `system:serviceaccount:<namespace>:<name>`.
    #[serde(default)]
    pub username: String,
    /// Groups the user belongs to.
    #[serde(default)]
    pub groups: Vec<String>,
}

/// The object a request addressed.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AuditObjectRef {
    /// Plural resource name, e.g. `configmaps`.
    #[serde(default)]
    pub resource: Option<String>,
    /// Subresource, e.g. `status`.
    #[serde(default)]
    pub subresource: Option<String>,
    /// Namespace of the object.
    #[serde(default)]
    pub namespace: Option<String>,
    /// Name of the object (absent for collection requests such as create
    /// with `generateName`).
    #[serde(default)]
    pub name: Option<String>,
    /// API group; empty or absent for the core group.
    #[serde(default)]
    pub api_group: Option<String>,
    /// API version.
    #[serde(default)]
    pub api_version: Option<String>,
}

/// Outcome of a request.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct AuditResponseStatus {
    /// HTTP status code.
    #[serde(default)]
    pub code: Option<u16>,
}

/// Parses the JSON-lines audit log. A torn last line (the apiserver may be
/// writing it right now) is ignored; a malformed line elsewhere is an error.
pub(crate) fn read_events(path: &Path) -> Result<Vec<AuditEvent>> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        // The apiserver creates the file on its first audited request.
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(err) => return Err(err).with_context(|| format!("reading {}", path.display())),
    };
    let complete = text.ends_with('\n');
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let mut events = Vec::with_capacity(lines.len());
    for (index, line) in lines.iter().enumerate() {
        match serde_json::from_str(line) {
            Ok(event) => events.push(event),
            Err(_) if index + 1 == lines.len() && !complete => {}
            Err(err) => {
                return Err(err)
                    .with_context(|| format!("parsing line {} of {}", index + 1, path.display()));
            }
        }
    }
    Ok(events)
}

#[cfg(test)]
mod tests {
    use super::*;

    const LINE: &str = r#"{"kind":"Event","apiVersion":"audit.k8s.io/v1","level":"Metadata","auditID":"a1","stage":"ResponseComplete","requestURI":"/api/v1/namespaces/ns/configmaps?fieldManager=x","verb":"create","user":{"username":"system:serviceaccount:ns:sa","groups":["system:serviceaccounts"]},"sourceIPs":["127.0.0.1"],"userAgent":"kube","objectRef":{"resource":"configmaps","namespace":"ns","name":"cm","apiVersion":"v1"},"responseStatus":{"metadata":{},"code":201},"requestReceivedTimestamp":"2026-01-01T00:00:00.000000Z","stageTimestamp":"2026-01-01T00:00:00.000000Z"}"#;

    #[test]
    fn parses_events_and_ignores_torn_last_line() {
        let path = std::env::temp_dir().join(format!(
            "testenv-audit-{}-{}.log",
            std::process::id(),
            crate::pki::random_suffix().unwrap()
        ));
        std::fs::write(&path, format!("{LINE}\n{{\"kind\":\"Ev")).unwrap();
        let events = read_events(&path).unwrap();
        assert_eq!(events.len(), 1);
        let event = &events[0];
        assert_eq!(event.user.username, "system:serviceaccount:ns:sa");
        assert_eq!(event.verb, "create");
        assert!(event.succeeded());
        let object = event.object_ref.as_ref().unwrap();
        assert_eq!(object.resource.as_deref(), Some("configmaps"));
        assert_eq!(object.name.as_deref(), Some("cm"));

        std::fs::write(&path, format!("{{broken\n{LINE}\n")).unwrap();
        assert!(read_events(&path).is_err());
        std::fs::remove_file(&path).unwrap();
    }
}
