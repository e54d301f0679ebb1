//! Decides whether a handshake may read its source Secret.
//!
//! Without this check anyone allowed to create a handshake could name any
//! Secret of the cluster (kube-system's included) and have it copied into a
//! Bundle they can read and send anywhere. The rule: a handshake may read a
//! Secret of its own namespace; a Secret elsewhere only when the Secret
//! itself names the handshake's namespace in an annotation, or when the
//! operator's configuration grants that pair of namespaces.
//!
//! The decision is made on the very Secret object whose data is then used
//! (one read), so a Secret update cannot slip between check and use, and it
//! is made again on every reconcile, so editing the handshake or withdrawing
//! consent takes effect at once.

use std::collections::BTreeMap;

/// Annotation on a source Secret: comma-separated namespaces whose
/// handshakes may read it, or `*` for all.
pub const ALLOWED_NAMESPACES_ANNOTATION: &str =
    "riverpointtechnology.com/handshake-allowed-namespaces";

/// An operator-level grant: handshakes in `handshake_namespace` (or any,
/// when `*`) may read Secrets in `source_namespace`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SourceGrant {
    /// Namespace of the handshakes, or `*`.
    pub handshake_namespace: String,
    /// Namespace of the Secrets they may read.
    pub source_namespace: String,
}

impl std::str::FromStr for SourceGrant {
    type Err = String;

    /// Parses `HANDSHAKE_NAMESPACE=SOURCE_NAMESPACE`, e.g.
    /// `fleet-default=default`.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let (handshake_namespace, source_namespace) = text
            .split_once('=')
            .map(|(handshake, source)| (handshake.trim(), source.trim()))
            .filter(|(handshake, source)| !handshake.is_empty() && !source.is_empty() && *source != "*")
            .ok_or_else(|| {
                format!("invalid source grant {text:?}: expected HANDSHAKE_NAMESPACE=SOURCE_NAMESPACE (the first may be *)")
            })?;
        Ok(SourceGrant {
            handshake_namespace: handshake_namespace.to_string(),
            source_namespace: source_namespace.to_string(),
        })
    }
}

/// The operator's source rules.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SourcePolicy {
    /// Grants from the operator's configuration.
    pub grants: Vec<SourceGrant>,
    /// Namespaces the operator watches; empty means all. A source outside
    /// them is never read (the operator would not see its changes).
    pub watched_namespaces: Vec<String>,
}

impl SourcePolicy {
    /// Whether a Secret in `source_namespace` may be read at all, before
    /// looking at it. `Err` explains why not.
    pub fn check_namespace(
        &self,
        handshake_namespace: &str,
        source_namespace: &str,
    ) -> Result<(), String> {
        if self.watched_namespaces.is_empty()
            || self
                .watched_namespaces
                .iter()
                .any(|watched| watched == source_namespace)
        {
            return Ok(());
        }
        Err(format!(
            "Secrets in namespace {source_namespace} are not watched by the operator (watched: {}); handshakes in {handshake_namespace} cannot use them.",
            self.watched_namespaces.join(", ")
        ))
    }

    /// Whether a handshake in `handshake_namespace` may use the Secret in
    /// `source_namespace` that carries `annotations`. `Err` explains why not,
    /// naming only namespaces (never Secret content).
    pub fn check_source(
        &self,
        handshake_namespace: &str,
        source_namespace: &str,
        annotations: Option<&BTreeMap<String, String>>,
    ) -> Result<(), String> {
        self.check_namespace(handshake_namespace, source_namespace)?;
        if handshake_namespace == source_namespace {
            return Ok(());
        }
        let granted = self.grants.iter().any(|grant| {
            grant.source_namespace == source_namespace
                && (grant.handshake_namespace == "*"
                    || grant.handshake_namespace == handshake_namespace)
        });
        let consented = annotations
            .and_then(|annotations| annotations.get(ALLOWED_NAMESPACES_ANNOTATION))
            .is_some_and(|allowed| {
                allowed
                    .split(',')
                    .map(str::trim)
                    .any(|namespace| namespace == "*" || namespace == handshake_namespace)
            });
        if granted || consented {
            return Ok(());
        }
        Err(format!(
            "The source Secret is in namespace {source_namespace}, and handshakes in {handshake_namespace} may only read it when the Secret lists {handshake_namespace} in its {ALLOWED_NAMESPACES_ANNOTATION} annotation or the operator grants {handshake_namespace}={source_namespace}."
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn annotations(value: &str) -> BTreeMap<String, String> {
        BTreeMap::from([(ALLOWED_NAMESPACES_ANNOTATION.to_string(), value.to_string())])
    }

    #[test]
    fn the_own_namespace_is_always_allowed() {
        let policy = SourcePolicy::default();
        assert_eq!(
            policy.check_source("fleet-default", "fleet-default", None),
            Ok(())
        );
    }

    #[test]
    fn another_namespace_needs_consent_or_a_grant() {
        let policy = SourcePolicy::default();
        let denied = policy
            .check_source("fleet-default", "kube-system", None)
            .unwrap_err();
        assert!(
            denied.contains("kube-system") && denied.contains(ALLOWED_NAMESPACES_ANNOTATION),
            "{denied}"
        );
        let unrelated = BTreeMap::from([("other".to_string(), "fleet-default".to_string())]);
        assert!(
            policy
                .check_source("fleet-default", "kube-system", Some(&unrelated))
                .is_err()
        );
    }

    #[test]
    fn the_annotation_names_namespaces_exactly() {
        let policy = SourcePolicy::default();
        for value in ["fleet-default", "a, fleet-default ,b", "*", "x,*"] {
            assert_eq!(
                policy.check_source("fleet-default", "team-a", Some(&annotations(value))),
                Ok(()),
                "{value}"
            );
        }
        for value in [
            "",
            "fleet-local",
            "fleet-default-2",
            "fleet",
            "fleet-*",
            "FLEET-DEFAULT",
        ] {
            assert!(
                policy
                    .check_source("fleet-default", "team-a", Some(&annotations(value)))
                    .is_err(),
                "{value:?} must not allow fleet-default"
            );
        }
    }

    #[test]
    fn operator_grants_match_both_namespaces() {
        let policy = SourcePolicy {
            grants: vec![
                "fleet-default=default".parse().unwrap(),
                "*=shared".parse().unwrap(),
            ],
            watched_namespaces: vec![],
        };
        assert_eq!(
            policy.check_source("fleet-default", "default", None),
            Ok(())
        );
        assert_eq!(policy.check_source("fleet-local", "shared", None), Ok(()));
        assert!(policy.check_source("fleet-local", "default", None).is_err());
        assert!(
            policy
                .check_source("fleet-default", "kube-system", None)
                .is_err()
        );
    }

    #[test]
    fn unwatched_source_namespaces_are_refused_even_with_consent() {
        let policy = SourcePolicy {
            grants: vec![],
            watched_namespaces: vec!["fleet-default".to_string(), "team-a".to_string()],
        };
        assert_eq!(policy.check_namespace("fleet-default", "team-a"), Ok(()));
        let refused = policy
            .check_source("fleet-default", "team-b", Some(&annotations("*")))
            .unwrap_err();
        assert!(refused.contains("not watched"), "{refused}");
    }

    #[test]
    fn grants_parse_strictly() {
        assert_eq!(
            "fleet-default=default".parse(),
            Ok(SourceGrant {
                handshake_namespace: "fleet-default".to_string(),
                source_namespace: "default".to_string()
            })
        );
        for bad in [
            "",
            "fleet-default",
            "=default",
            "fleet-default=",
            "a=*",
            " =default",
            "a= *",
            "a= ",
        ] {
            assert!(bad.parse::<SourceGrant>().is_err(), "{bad:?}");
        }
    }
}
