//! meshgate's certificate authority: a self-signed root that issues SPIFFE
//! workload certificates the way istiod does (empty subject, one critical URI
//! SAN, serverAuth + clientAuth, backdated NotBefore, 24h by default).

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls_pki_types::CertificateDer;
use time::OffsetDateTime;

use crate::cert::CertInfo;
use crate::{Error, SpiffeId};

/// Istio's default workload certificate lifetime.
pub const DEFAULT_WORKLOAD_TTL: Duration = Duration::from_secs(24 * 3600);
/// Istio's maximum workload certificate lifetime (90 days).
pub const MAX_WORKLOAD_TTL: Duration = Duration::from_secs(90 * 24 * 3600);
/// Root lifetime: 10 years.
const ROOT_TTL: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// NotBefore is backdated so that small clock skew between proxies does not
/// reject a fresh certificate (istiod uses 2 minutes).
const BACKDATE: Duration = Duration::from_secs(120);

pub const ROOT_CERT_FILE: &str = "root-cert.pem";
pub const ROOT_KEY_FILE: &str = "root-key.pem";
/// Istio's mounted-certificate layout.
pub const CERT_CHAIN_FILE: &str = "cert-chain.pem";
pub const KEY_FILE: &str = "key.pem";

/// A certificate, its private key and the root it chains to, as PEM.
#[derive(Clone)]
pub struct IssuedIdentity {
    pub cert_chain_pem: String,
    pub key_pem: String,
    pub root_pem: String,
}

impl std::fmt::Debug for IssuedIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IssuedIdentity")
            .field("key_pem", &"<redacted>")
            .finish_non_exhaustive()
    }
}

impl IssuedIdentity {
    /// Writes `cert-chain.pem`, `key.pem` (0600) and `root-cert.pem` into
    /// `dir`, each replaced atomically so a watching proxy never reads half a file.
    pub fn write_to(&self, dir: &Path) -> Result<(), Error> {
        std::fs::create_dir_all(dir).map_err(|e| Error::File(dir.to_owned(), e.to_string()))?;
        write_atomic(&dir.join(ROOT_CERT_FILE), self.root_pem.as_bytes(), 0o644)?;
        write_atomic(&dir.join(KEY_FILE), self.key_pem.as_bytes(), 0o600)?;
        // The chain last: a watcher that sees it change finds a matching key.
        write_atomic(
            &dir.join(CERT_CHAIN_FILE),
            self.cert_chain_pem.as_bytes(),
            0o644,
        )
    }
}

/// A whole duration as Go writes one in flags: `2400h`, `90m`, `30s`.
fn go_duration(d: Duration) -> String {
    let secs = d.as_secs();
    match secs {
        s if s > 0 && s % 3600 == 0 => format!("{}h", s / 3600),
        s if s > 0 && s % 60 == 0 => format!("{}m", s / 60),
        s if d.subsec_nanos() == 0 => format!("{s}s"),
        _ => format!("{}ms", d.as_millis()),
    }
}

fn write_atomic(path: &Path, data: &[u8], mode: u32) -> Result<(), Error> {
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    let err = |e: std::io::Error| Error::File(path.to_owned(), e.to_string());
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(err)?;
    f.write_all(data).and_then(|()| f.sync_all()).map_err(err)?;
    std::fs::rename(&tmp, path).map_err(err)
}

/// A root CA held in memory.
pub struct CertificateAuthority {
    trust_domain: String,
    root_der: CertificateDer<'static>,
    root_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateAuthority")
            .field("trust_domain", &self.trust_domain)
            .finish_non_exhaustive()
    }
}

fn random_serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    fastrand::fill(&mut bytes);
    bytes[0] &= 0x7f; // positive
    bytes[0] |= 0x01; // no leading zero byte
    SerialNumber::from_slice(&bytes)
}

fn rc(e: rcgen::Error) -> Error {
    Error::Certificate(e.to_string())
}

impl CertificateAuthority {
    /// A new root in memory (for the all-in-one local run and for tests).
    pub fn generate(trust_domain: &str) -> Result<Self, Error> {
        if SpiffeId::new(trust_domain, "a", "b").is_err() {
            return Err(Error::Certificate(format!(
                "invalid trust domain \"{trust_domain}\""
            )));
        }
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(rc)?;
        let now = OffsetDateTime::now_utc();
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, trust_domain);
        // A unique name per root: two roots with one name make a chain
        // built against the wrong one fail as "bad signature" instead of
        // "unknown issuer", which misleads whoever reads the error.
        dn.push(
            DnType::CommonName,
            format!("meshgate root CA {:08x}", fastrand::u32(..)),
        );
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.not_before = now - BACKDATE;
        params.not_after = now + ROOT_TTL;
        params.serial_number = Some(random_serial());
        let cert = params.self_signed(&key).map_err(rc)?;
        Ok(CertificateAuthority {
            trust_domain: trust_domain.to_owned(),
            root_der: cert.der().clone(),
            root_pem: cert.pem(),
            issuer: Issuer::new(params, key),
        })
    }

    /// Creates a root in `dir`: `root-cert.pem` and `root-key.pem` (0600).
    /// Refuses to replace an existing CA unless `force`.
    pub fn init(dir: &Path, trust_domain: &str, force: bool) -> Result<Self, Error> {
        let key_path = dir.join(ROOT_KEY_FILE);
        if !force && (key_path.exists() || dir.join(ROOT_CERT_FILE).exists()) {
            return Err(Error::AlreadyExists(dir.to_owned()));
        }
        let ca = Self::generate(trust_domain)?;
        std::fs::create_dir_all(dir).map_err(|e| Error::File(dir.to_owned(), e.to_string()))?;
        write_atomic(&key_path, ca.issuer.key().serialize_pem().as_bytes(), 0o600)?;
        write_atomic(&dir.join(ROOT_CERT_FILE), ca.root_pem.as_bytes(), 0o644)?;
        Ok(ca)
    }

    /// Loads a root written by [`CertificateAuthority::init`]. The trust
    /// domain is read back from the root's subject organization.
    pub fn load(dir: &Path) -> Result<Self, Error> {
        let read = |name: &str| -> Result<(PathBuf, String), Error> {
            let p = dir.join(name);
            let text = std::fs::read_to_string(&p).map_err(|e| {
                let why = match e.kind() {
                    std::io::ErrorKind::NotFound => format!(
                        "no CA here (make one with `meshgate ca init --dir {}`)",
                        dir.display()
                    ),
                    _ => e.to_string(),
                };
                Error::File(p.clone(), why)
            })?;
            Ok((p, text))
        };
        let (cert_path, root_pem) = read(ROOT_CERT_FILE)?;
        let (key_path, key_pem) = read(ROOT_KEY_FILE)?;
        let key = KeyPair::from_pem(&key_pem).map_err(|e| Error::File(key_path, e.to_string()))?;
        let root_der = crate::cert::parse_certs(&root_pem)?.remove(0);
        let info = CertInfo::parse(&root_der)?;
        if !info.is_ca {
            return Err(Error::File(cert_path, "not a CA certificate".into()));
        }
        let trust_domain = info.organization.ok_or_else(|| {
            Error::File(
                cert_path.clone(),
                "root has no organization (trust domain)".into(),
            )
        })?;
        let issuer = Issuer::from_ca_cert_pem(&root_pem, key)
            .map_err(|e| Error::File(cert_path, e.to_string()))?;
        Ok(CertificateAuthority {
            trust_domain,
            root_der,
            root_pem,
            issuer,
        })
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    pub fn root_pem(&self) -> &str {
        &self.root_pem
    }

    pub fn root_der(&self) -> &CertificateDer<'static> {
        &self.root_der
    }

    fn check_request(&self, id: &SpiffeId, ttl: Duration) -> Result<(), Error> {
        if id.trust_domain() != self.trust_domain {
            return Err(Error::Refused(format!(
                "{id} is in trust domain \"{}\", this CA issues for \"{}\"",
                id.trust_domain(),
                self.trust_domain
            )));
        }
        if ttl.is_zero() || ttl > MAX_WORKLOAD_TTL {
            return Err(Error::Refused(format!(
                "ttl {} must be between 1s and 90 days (2160h)",
                go_duration(ttl)
            )));
        }
        Ok(())
    }

    /// Certificate parameters for a workload, as istiod issues them.
    pub fn workload_params(id: &SpiffeId, ttl: Duration) -> Result<CertificateParams, Error> {
        let now = OffsetDateTime::now_utc();
        let mut params = CertificateParams::default();
        // Empty subject: rcgen then marks the SAN extension critical (RFC 5280 4.2.1.6).
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(id.to_string().try_into().map_err(rc)?)];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.not_before = now - BACKDATE;
        params.not_after = now + ttl;
        params.serial_number = Some(random_serial());
        params.use_authority_key_identifier_extension = true;
        Ok(params)
    }

    /// Issues a certificate and a new private key for `id`.
    pub fn issue(&self, id: &SpiffeId, ttl: Duration) -> Result<IssuedIdentity, Error> {
        self.check_request(id, ttl)?;
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(rc)?;
        let cert = Self::workload_params(id, ttl)?
            .signed_by(&key, &self.issuer)
            .map_err(rc)?;
        Ok(IssuedIdentity {
            cert_chain_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            root_pem: self.root_pem.clone(),
        })
    }

    /// A serving certificate for DNS names (the control plane's admission
    /// webhooks, which the API server calls by Service name and verifies
    /// against this root), with a new key.
    pub fn issue_dns(&self, names: &[String], ttl: Duration) -> Result<IssuedIdentity, Error> {
        let now = OffsetDateTime::now_utc();
        let mut params = CertificateParams::new(names.to_vec()).map_err(rc)?;
        params.distinguished_name = DistinguishedName::new();
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.not_before = now - BACKDATE;
        params.not_after = now + ttl;
        params.serial_number = Some(random_serial());
        params.use_authority_key_identifier_extension = true;
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(rc)?;
        let cert = params.signed_by(&key, &self.issuer).map_err(rc)?;
        Ok(IssuedIdentity {
            cert_chain_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            root_pem: self.root_pem.clone(),
        })
    }

    /// Signs a CSR for `id` (the identity the caller was authenticated as).
    /// The CSR must ask for exactly that identity and nothing else; only its
    /// public key is used, every other field comes from us.
    pub fn sign_csr(&self, csr_pem: &str, id: &SpiffeId, ttl: Duration) -> Result<String, Error> {
        self.check_request(id, ttl)?;
        let csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| Error::Malformed(format!("bad CSR: {e}")))?;
        let requested: Vec<String> = csr
            .params
            .subject_alt_names
            .iter()
            .map(|san| match san {
                SanType::URI(u) => u.as_str().to_owned(),
                SanType::DnsName(d) => format!("DNS:{}", d.as_str()),
                other => format!("{other:?}"),
            })
            .collect();
        if requested != [id.to_string()] {
            return Err(Error::Refused(format!(
                "CSR asks for {requested:?}; the token authorizes only {id}"
            )));
        }
        let cert = Self::workload_params(id, ttl)?
            .signed_by(&csr.public_key, &self.issuer)
            .map_err(rc)?;
        Ok(cert.pem())
    }

    /// A CSR for `id` with a new key: what a proxy sends to `ca serve`.
    pub fn csr_for(id: &SpiffeId) -> Result<(String, KeyPair), Error> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(rc)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(id.to_string().try_into().map_err(rc)?)];
        let csr = params.serialize_request(&key).map_err(rc)?;
        Ok((csr.pem().map_err(rc)?, key))
    }
}

#[cfg(test)]
pub(crate) mod testing {
    //! Certificates that break one rule each, for rejection tests.
    use super::*;

    pub(crate) fn custom(
        ca: &CertificateAuthority,
        sans: Vec<SanType>,
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    ) -> IssuedIdentity {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateAuthority::workload_params(
            &SpiffeId::new("cluster.local", "x", "y").unwrap(),
            DEFAULT_WORKLOAD_TTL,
        )
        .unwrap();
        params.subject_alt_names = sans;
        params.not_before = not_before;
        params.not_after = not_after;
        if params.subject_alt_names.is_empty() {
            params.distinguished_name.push(DnType::CommonName, "no-san");
        }
        let cert = params.signed_by(&key, &ca.issuer).unwrap();
        IssuedIdentity {
            cert_chain_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            root_pem: ca.root_pem.clone(),
        }
    }
}
