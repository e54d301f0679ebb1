//! Key material for one control plane: a throw-away CA, the apiserver's
//! serving certificate, the service-account signing key and bearer tokens.
//!
//! Everything is generated in-process so that a fresh machine needs no
//! `openssl` and each run gets its own trust root.

use std::io::Read;

use anyhow::{Context, Result};
use base64::Engine;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

/// Names the apiserver is reachable by: loopback for clients on this
/// machine, and the in-cluster names of the `kubernetes` Service (first IP of
/// the service range) so tokens and certificates look like a real cluster's.
const SERVING_NAMES: &[&str] = &[
    "127.0.0.1",
    "localhost",
    "10.0.0.1",
    "kubernetes",
    "kubernetes.default",
    "kubernetes.default.svc",
    "kubernetes.default.svc.cluster.local",
];

/// PEM-encoded material written into the run directory.
pub(crate) struct Pki {
    /// CA certificate that clients trust.
    pub ca_cert_pem: String,
    /// Serving certificate of kube-apiserver, signed by the CA.
    pub serving_cert_pem: String,
    /// Private key of the serving certificate.
    pub serving_key_pem: String,
    /// Private key that signs service-account tokens (ECDSA P-256, `ES256`).
    pub service_account_key_pem: String,
    /// Public half of [`Self::service_account_key_pem`], used to verify tokens.
    pub service_account_public_pem: String,
}

impl Pki {
    /// Generates a fresh CA, serving certificate and service-account key.
    ///
    /// ECDSA keys are used throughout: Kubernetes accepts them for serving
    /// and for service-account tokens, and generating them is instant even in
    /// unoptimised test builds (RSA generation is not).
    pub(crate) fn generate() -> Result<Self> {
        let ca_key = KeyPair::generate().context("generating CA key")?;
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "fleet-handshake-testenv-ca");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_cert = ca_params
            .self_signed(&ca_key)
            .context("self-signing CA certificate")?;
        let issuer = Issuer::from_params(&ca_params, &ca_key);

        let serving_key = KeyPair::generate().context("generating serving key")?;
        let mut serving_params = CertificateParams::new(
            SERVING_NAMES
                .iter()
                .map(|name| name.to_string())
                .collect::<Vec<_>>(),
        )?;
        serving_params
            .distinguished_name
            .push(DnType::CommonName, "kube-apiserver");
        serving_params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        serving_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let serving_cert = serving_params
            .signed_by(&serving_key, &issuer)
            .context("signing serving certificate")?;

        let sa_key = KeyPair::generate().context("generating service-account key")?;

        Ok(Self {
            ca_cert_pem: ca_cert.pem(),
            serving_cert_pem: serving_cert.pem(),
            serving_key_pem: serving_key.serialize_pem(),
            service_account_key_pem: sa_key.serialize_pem(),
            service_account_public_pem: sa_key.public_key_pem(),
        })
    }
}

/// Returns `N` random bytes from the kernel's CSPRNG.
fn random_bytes<const N: usize>() -> Result<[u8; N]> {
    let mut buf = [0u8; N];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .context("reading /dev/urandom")?;
    Ok(buf)
}

/// A random bearer token (256 bits, hex).
pub(crate) fn random_token() -> Result<String> {
    Ok(hex(&random_bytes::<32>()?))
}

/// A short random lowercase suffix usable in Kubernetes object names.
pub(crate) fn random_suffix() -> Result<String> {
    Ok(hex(&random_bytes::<4>()?))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Encodes DER certificates as one PEM bundle, the form kubeconfig files use.
pub(crate) fn der_certs_to_pem(certs: &[Vec<u8>]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut out = String::new();
    for der in certs {
        out.push_str("-----BEGIN CERTIFICATE-----\n");
        let encoded = b64.encode(der);
        for line in encoded.as_bytes().chunks(64) {
            // Base64 output is ASCII, so every chunk is valid UTF-8.
            out.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
            out.push('\n');
        }
        out.push_str("-----END CERTIFICATE-----\n");
    }
    out
}

/// Decodes every `CERTIFICATE` block of a PEM bundle into DER, the form
/// [`kube::Config::root_cert`] holds; the inverse of [`der_certs_to_pem`].
#[cfg(test)]
pub(crate) fn pem_certs_to_der(pem: &str) -> Result<Vec<Vec<u8>>> {
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut certs = Vec::new();
    let mut current: Option<String> = None;
    for line in pem.lines().map(str::trim) {
        match (line, current.as_mut()) {
            ("-----BEGIN CERTIFICATE-----", None) => current = Some(String::new()),
            ("-----END CERTIFICATE-----", Some(body)) => {
                certs.push(b64.decode(body.as_bytes()).context("decoding PEM body")?);
                current = None;
            }
            (_, Some(body)) => body.push_str(line),
            (_, None) => {}
        }
    }
    anyhow::ensure!(!certs.is_empty(), "no CERTIFICATE block in PEM data");
    Ok(certs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pem_round_trip() {
        let pki = Pki::generate().unwrap();
        let der = pem_certs_to_der(&pki.ca_cert_pem).unwrap();
        assert_eq!(der.len(), 1);
        assert_eq!(
            der_certs_to_pem(&der),
            pki.ca_cert_pem.replace("\r\n", "\n")
        );
    }

    #[test]
    fn tokens_are_distinct_hex() {
        let a = random_token().unwrap();
        let b = random_token().unwrap();
        assert_eq!(a.len(), 64);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }
}
