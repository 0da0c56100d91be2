//! Reading certificates: PEM files, validity, URI SANs.

use std::path::Path;
use std::time::{Duration, SystemTime};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

use crate::Error;

/// What the mesh needs to know about one certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    pub uri_sans: Vec<String>,
    pub dns_sans: Vec<String>,
    pub is_ca: bool,
    /// The subject as text (`CN=..., O=...`; empty for mesh certificates).
    pub subject: String,
    /// Subject organization (our roots carry the trust domain there).
    pub organization: Option<String>,
    /// The serial number in hex, as `istioctl proxy-config secret` shows it.
    pub serial: String,
}

impl CertInfo {
    pub fn parse(der: &CertificateDer<'_>) -> Result<Self, Error> {
        let (_, cert) = X509Certificate::from_der(der)
            .map_err(|e| Error::Certificate(format!("cannot parse certificate: {e}")))?;
        let to_time = |t: x509_parser::time::ASN1Time| {
            let secs = t.timestamp();
            if secs >= 0 {
                SystemTime::UNIX_EPOCH + Duration::from_secs(secs.unsigned_abs())
            } else {
                SystemTime::UNIX_EPOCH
            }
        };
        let mut uri_sans = Vec::new();
        let mut dns_sans = Vec::new();
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for name in &san.value.general_names {
                match name {
                    GeneralName::URI(u) => uri_sans.push((*u).to_owned()),
                    GeneralName::DNSName(d) => dns_sans.push((*d).to_owned()),
                    _ => {}
                }
            }
        }
        Ok(CertInfo {
            not_before: to_time(cert.validity().not_before),
            not_after: to_time(cert.validity().not_after),
            uri_sans,
            dns_sans,
            is_ca: cert.is_ca(),
            subject: cert.subject().to_string(),
            organization: cert
                .subject()
                .iter_organization()
                .next()
                .and_then(|o| o.as_str().ok())
                .map(str::to_owned),
            serial: cert
                .raw_serial()
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect(),
        })
    }

    /// When to renew a certificate received at `received`: at `fraction` of
    /// its remaining lifetime (Istio uses 0.5), moved by up to ±`jitter` of
    /// it so that a fleet does not renew at once. Counted from receipt, not
    /// NotBefore, because NotBefore is backdated.
    pub fn refresh_at(&self, received: SystemTime, fraction: f64, jitter: f64) -> SystemTime {
        let life = self.not_after.duration_since(received).unwrap_or_default();
        let j = (fastrand::f64() * 2.0 - 1.0) * jitter;
        received + life.mul_f64((fraction + j).clamp(0.05, 0.95))
    }
}

/// Reads every certificate in a PEM file.
pub fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, Error> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| Error::File(path.to_owned(), e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Error::File(path.to_owned(), e.to_string()))?;
    if certs.is_empty() {
        return Err(Error::File(
            path.to_owned(),
            "no PEM certificate found".into(),
        ));
    }
    Ok(certs)
}

/// Parses every certificate in PEM text.
/// The PEM certificates in `pem`, one string each.
pub fn split_pem(pem: &str) -> Vec<String> {
    const END: &str = "-----END CERTIFICATE-----";
    pem.split_inclusive(END)
        .map(str::trim_start)
        .filter(|c| c.ends_with(END))
        .map(|c| format!("{c}\n"))
        .collect()
}

pub fn parse_certs(pem: &str) -> Result<Vec<CertificateDer<'static>>, Error> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Error::Certificate(format!("bad PEM: {e}")))?;
    if certs.is_empty() {
        return Err(Error::Certificate("no PEM certificate found".into()));
    }
    Ok(certs)
}

/// Reads a private key from a PEM file (PKCS#8, SEC1 or PKCS#1).
pub fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, Error> {
    PrivateKeyDer::from_pem_file(path)
        .map_err(|e| Error::File(path.to_owned(), format!("no usable private key: {e}")))
}

/// Encodes DER certificates as PEM.
pub fn to_pem(certs: &[CertificateDer<'_>]) -> String {
    let mut out = String::new();
    for c in certs {
        out.push_str("-----BEGIN CERTIFICATE-----\n");
        let b64 = base64_encode(c.as_ref());
        for chunk in b64.as_bytes().chunks(64) {
            out.push_str(std::str::from_utf8(chunk).unwrap_or_default());
            out.push('\n');
        }
        out.push_str("-----END CERTIFICATE-----\n");
    }
    out
}

/// Standard base64 with padding.
pub fn base64_encode(data: &[u8]) -> String {
    const TABLE: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(TABLE[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_known_vectors() {
        for (input, want) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64_encode(input.as_bytes()), want);
        }
    }
}

#[cfg(test)]
mod refresh_tests {
    use super::*;

    #[test]
    fn refresh_is_near_half_of_the_remaining_life() {
        let received = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let info = CertInfo {
            not_before: received - Duration::from_secs(120),
            not_after: received + Duration::from_secs(1000),
            uri_sans: vec![],
            dns_sans: vec![],
            is_ca: false,
            subject: String::new(),
            organization: None,
            serial: String::new(),
        };
        for _ in 0..100 {
            let at = info
                .refresh_at(received, 0.5, 0.01)
                .duration_since(received)
                .unwrap();
            assert!((490..=510).contains(&at.as_secs()), "{at:?}");
        }
    }
}
