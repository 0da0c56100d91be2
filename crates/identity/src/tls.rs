//! rustls configs for mesh mTLS, built once per identity (and per expected
//! peer set) and reused for every connection: the certificate comes from a
//! resolver that reads the live identity, so rotation needs no new config.

use std::sync::{Arc, OnceLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::sign::CertifiedKey;
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, OtherError,
    ServerConfig, SignatureScheme,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, TrustAnchor, UnixTime};

use crate::Error;
use crate::source::WorkloadIdentity;
use crate::spiffe::{SpiffeError, SpiffeId};

/// The process-wide crypto provider (aws-lc-rs).
pub fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
        .clone()
}

const VERSIONS: &[&rustls::SupportedProtocolVersion] =
    &[&rustls::version::TLS13, &rustls::version::TLS12];

/// Root certificates a peer must chain to.
#[derive(Debug, Clone)]
pub struct TrustBundle {
    anchors: Vec<TrustAnchor<'static>>,
    certs: Vec<CertificateDer<'static>>,
}

impl TrustBundle {
    pub fn new(certs: Vec<CertificateDer<'static>>) -> Result<Self, Error> {
        let anchors = certs
            .iter()
            .map(|c| {
                webpki::anchor_from_trusted_cert(c)
                    .map(|a| a.to_owned())
                    .map_err(|e| Error::Certificate(format!("unusable root certificate: {e}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(TrustBundle { anchors, certs })
    }

    pub fn from_pem(pem: &str) -> Result<Self, Error> {
        Self::new(crate::cert::parse_certs(pem)?)
    }

    pub fn certs(&self) -> &[CertificateDer<'static>] {
        &self.certs
    }
}

/// Why a peer's identity was refused (after its chain verified).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeerIdentityError {
    #[error("peer certificate has no URI SAN, so no SPIFFE identity")]
    NoUriSan,
    #[error("peer certificate has {} URI SANs ({}); a mesh identity has exactly one", .0.len(), .0.join(", "))]
    SeveralUriSans(Vec<String>),
    #[error("peer identity is not a SPIFFE ID: {0}")]
    NotSpiffe(#[from] SpiffeError),
    #[error("peer {got} is in trust domain \"{}\", expected \"{want}\"", got.trust_domain())]
    WrongTrustDomain { got: SpiffeId, want: String },
    #[error("peer identity {got} is not the expected {}", expected.iter().map(ToString::to_string).collect::<Vec<_>>().join(" or "))]
    Unexpected {
        got: SpiffeId,
        expected: Vec<SpiffeId>,
    },
}

/// Which peers to accept once their chain is verified.
#[derive(Debug, Clone)]
pub enum PeerPolicy {
    /// Any identity in this trust domain (a server accepting mesh clients).
    TrustDomain(String),
    /// One of these identities (secure naming: a client checking its server).
    OneOf(Vec<SpiffeId>),
}

impl PeerPolicy {
    fn check(&self, id: SpiffeId) -> Result<SpiffeId, PeerIdentityError> {
        match self {
            PeerPolicy::TrustDomain(td) if id.trust_domain() != td => {
                Err(PeerIdentityError::WrongTrustDomain {
                    got: id,
                    want: td.clone(),
                })
            }
            PeerPolicy::OneOf(expected) if !expected.contains(&id) => {
                Err(PeerIdentityError::Unexpected {
                    got: id,
                    expected: expected.clone(),
                })
            }
            _ => Ok(id),
        }
    }
}

/// The SPIFFE identity in a verified end-entity certificate.
pub fn spiffe_id_of(cert: &CertificateDer<'_>) -> Result<SpiffeId, PeerIdentityError> {
    let ee = webpki::EndEntityCert::try_from(cert).map_err(|_| PeerIdentityError::NoUriSan)?;
    let uris: Vec<&str> = ee.valid_uri_names().collect();
    match uris.as_slice() {
        [] => Err(PeerIdentityError::NoUriSan),
        [one] => Ok(one.parse()?),
        many => Err(PeerIdentityError::SeveralUriSans(
            many.iter().map(|s| (*s).to_owned()).collect(),
        )),
    }
}

/// The peer's SPIFFE ID from a finished handshake's certificates (the data
/// path calls this once per connection).
pub fn peer_identity(certs: Option<&[CertificateDer<'_>]>) -> Option<SpiffeId> {
    certs
        .and_then(|c| c.first())
        .and_then(|c| spiffe_id_of(c).ok())
}

/// A readable reason for a failed handshake: rustls prints its `Other`
/// certificate errors with `Debug`, so dig out our own message.
pub fn handshake_error_reason(e: &std::io::Error) -> String {
    let inner = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>());
    match inner {
        Some(rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(o)))) => {
            format!("invalid peer certificate: {o}")
        }
        Some(other) => other.to_string(),
        None => e.to_string(),
    }
}

fn map_webpki(e: webpki::Error) -> rustls::Error {
    let ce = match e {
        webpki::Error::UnknownIssuer => CertificateError::UnknownIssuer,
        webpki::Error::CertExpired { .. } => CertificateError::Expired,
        webpki::Error::CertNotValidYet { .. } => CertificateError::NotValidYet,
        webpki::Error::InvalidSignatureForPublicKey => CertificateError::BadSignature,
        webpki::Error::RequiredEkuNotFoundContext(_) => CertificateError::InvalidPurpose,
        webpki::Error::CertRevoked => CertificateError::Revoked,
        other => CertificateError::Other(OtherError(Arc::new(Error::Certificate(format!(
            "{other:?}"
        ))))),
    };
    rustls::Error::InvalidCertificate(ce)
}

fn identity_error(e: PeerIdentityError) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(e))))
}

/// Verifies chains against the identity's live trust bundle, then the SPIFFE
/// identity against the policy. One type serves both directions.
#[derive(Debug)]
struct SpiffeVerifier {
    identity: Arc<WorkloadIdentity>,
    policy: PeerPolicy,
    algs: WebPkiSupportedAlgorithms,
    /// As a server: a client may present no certificate at all.
    client_optional: bool,
}

impl SpiffeVerifier {
    fn new(identity: Arc<WorkloadIdentity>, policy: PeerPolicy) -> Self {
        SpiffeVerifier {
            identity,
            policy,
            algs: provider().signature_verification_algorithms,
            client_optional: false,
        }
    }

    fn verify(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        usage: webpki::KeyUsage,
    ) -> Result<(), rustls::Error> {
        let trust = self.identity.trust();
        let ee = webpki::EndEntityCert::try_from(end_entity).map_err(map_webpki)?;
        ee.verify_for_usage(
            self.algs.all,
            &trust.anchors,
            intermediates,
            now,
            usage,
            None,
            None,
        )
        .map_err(map_webpki)?;
        let id = spiffe_id_of(end_entity).map_err(identity_error)?;
        self.policy.check(id).map(|_| ()).map_err(identity_error)
    }
}

impl ServerCertVerifier for SpiffeVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        // Secure naming: the SPIFFE ID decides, not the SNI/host name.
        self.verify(
            end_entity,
            intermediates,
            now,
            webpki::KeyUsage::server_auth(),
        )
        .map(|()| ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

impl ClientCertVerifier for SpiffeVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // Mesh clients have one certificate; no hints needed.
        &[]
    }

    fn client_auth_mandatory(&self) -> bool {
        !self.client_optional
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.verify(
            end_entity,
            intermediates,
            now,
            webpki::KeyUsage::client_auth(),
        )
        .map(|()| ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// Presents the identity's current certificate on every handshake.
#[derive(Debug)]
struct IdentityResolver(Arc<WorkloadIdentity>);

impl rustls::server::ResolvesServerCert for IdentityResolver {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.0.certified()
    }
}

impl rustls::client::ResolvesClientCert for IdentityResolver {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        self.0.certified()
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// Builds a rustls `CertifiedKey` from PEM chain and key.
pub fn certified_key(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<CertifiedKey, Error> {
    let signing = provider()
        .key_provider
        .load_private_key(key)
        .map_err(|e| Error::Certificate(format!("unusable private key: {e}")))?;
    let ck = CertifiedKey::new(chain, signing);
    ck.keys_match()
        .map_err(|e| Error::Certificate(format!("certificate and key do not match: {e}")))?;
    Ok(ck)
}

/// Server side of mesh mTLS: presents the workload certificate and requires
/// a client certificate from the mesh (same trust domain).
pub fn mesh_server_config(
    identity: &Arc<WorkloadIdentity>,
    alpn: &[&[u8]],
) -> Result<Arc<ServerConfig>, Error> {
    mesh_server(identity, alpn, false, None)
}

/// Like [`mesh_server_config`], but a client may also present no
/// certificate (the control plane's port: certificate requests come with a
/// token, config streams with the proxy's certificate).
/// Clients that ask for one of `named`'s DNS names by SNI (Istio's agents
/// dial the control plane's Service name) are given that certificate.
pub fn server_config_optional_client_auth(
    identity: &Arc<WorkloadIdentity>,
    alpn: &[&[u8]],
    named: Option<NamedCert>,
) -> Result<Arc<ServerConfig>, Error> {
    mesh_server(identity, alpn, true, named)
}

/// A certificate for DNS names, presented when a client's SNI is one of
/// them.
#[derive(Debug, Clone)]
pub struct NamedCert(pub Arc<crate::source::DnsCert>);

fn mesh_server(
    identity: &Arc<WorkloadIdentity>,
    alpn: &[&[u8]],
    client_optional: bool,
    named: Option<NamedCert>,
) -> Result<Arc<ServerConfig>, Error> {
    let verifier = SpiffeVerifier {
        client_optional,
        ..SpiffeVerifier::new(
            identity.clone(),
            PeerPolicy::TrustDomain(identity.id().trust_domain().to_owned()),
        )
    };
    let mut cfg = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(VERSIONS)
        .map_err(|e| Error::Certificate(e.to_string()))?
        .with_client_cert_verifier(Arc::new(verifier))
        .with_cert_resolver(Arc::new(NamedOrIdentity {
            named,
            identity: IdentityResolver(identity.clone()),
        }));
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(cfg))
}

#[derive(Debug)]
struct NamedOrIdentity {
    named: Option<NamedCert>,
    identity: IdentityResolver,
}

impl rustls::server::ResolvesServerCert for NamedOrIdentity {
    fn resolve(&self, hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let asked = hello.server_name();
        match &self.named {
            Some(NamedCert(n))
                if asked
                    .is_some_and(|sni| n.names().iter().any(|x| x.eq_ignore_ascii_case(sni))) =>
            {
                Some(n.certified())
            }
            _ => self.identity.0.certified(),
        }
    }
}

/// A TLS server presenting a [`DnsCert`](crate::source::DnsCert) (renewed
/// in place) and asking no client certificate: the control plane's
/// admission webhooks.
pub fn dns_server_config(
    cert: Arc<crate::source::DnsCert>,
    alpn: &[&[u8]],
) -> Result<Arc<ServerConfig>, Error> {
    let mut cfg = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(VERSIONS)
        .map_err(|e| Error::Certificate(e.to_string()))?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(DnsResolver(cert)));
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(cfg))
}

#[derive(Debug)]
struct DnsResolver(Arc<crate::source::DnsCert>);

impl rustls::server::ResolvesServerCert for DnsResolver {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.certified())
    }
}

/// A TLS server with the workload certificate and no client authentication
/// (the CA server, where callers authenticate with a token).
pub fn server_config_without_client_auth(
    identity: &Arc<WorkloadIdentity>,
    alpn: &[&[u8]],
) -> Result<Arc<ServerConfig>, Error> {
    let mut cfg = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(VERSIONS)
        .map_err(|e| Error::Certificate(e.to_string()))?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(IdentityResolver(identity.clone())));
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(cfg))
}

/// Client side of mesh mTLS: presents the workload certificate and accepts
/// only a server whose SPIFFE ID is one of `expected` (secure naming). Build
/// once per upstream, not per connection.
pub fn mesh_client_config(
    identity: &Arc<WorkloadIdentity>,
    expected: Vec<SpiffeId>,
    alpn: &[&[u8]],
) -> Result<Arc<ClientConfig>, Error> {
    let verifier = SpiffeVerifier::new(identity.clone(), PeerPolicy::OneOf(expected));
    let mut cfg = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(VERSIONS)
        .map_err(|e| Error::Certificate(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_cert_resolver(Arc::new(IdentityResolver(identity.clone())));
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    cfg.resumption = LazySessionCache::resumption();
    Ok(Arc::new(cfg))
}

/// A client session cache (rustls's own, 256 tickets) allocated only when
/// the first session is stored. rustls's default allocates its tables with
/// every config, ~14 KiB; a proxy builds a config per upstream cluster, most
/// of which never connect (10,000 hosts cost 140 MiB).
#[derive(Debug, Default)]
pub struct LazySessionCache(OnceLock<rustls::client::ClientSessionMemoryCache>);

impl LazySessionCache {
    /// rustls's default resumption (sessions and tickets) over this cache.
    pub fn resumption() -> rustls::client::Resumption {
        rustls::client::Resumption::store(Arc::new(Self::default()))
    }

    fn cache(&self) -> &rustls::client::ClientSessionMemoryCache {
        self.0
            .get_or_init(|| rustls::client::ClientSessionMemoryCache::new(256))
    }
}

impl rustls::client::ClientSessionStore for LazySessionCache {
    fn set_kx_hint(&self, server: ServerName<'static>, group: rustls::NamedGroup) {
        self.cache().set_kx_hint(server, group);
    }

    fn kx_hint(&self, server: &ServerName<'_>) -> Option<rustls::NamedGroup> {
        self.0.get()?.kx_hint(server)
    }

    fn set_tls12_session(
        &self,
        server: ServerName<'static>,
        value: rustls::client::Tls12ClientSessionValue,
    ) {
        self.cache().set_tls12_session(server, value);
    }

    fn tls12_session(
        &self,
        server: &ServerName<'_>,
    ) -> Option<rustls::client::Tls12ClientSessionValue> {
        self.0.get()?.tls12_session(server)
    }

    fn remove_tls12_session(&self, server: &ServerName<'static>) {
        if let Some(cache) = self.0.get() {
            cache.remove_tls12_session(server);
        }
    }

    fn insert_tls13_ticket(
        &self,
        server: ServerName<'static>,
        value: rustls::client::Tls13ClientSessionValue,
    ) {
        self.cache().insert_tls13_ticket(server, value);
    }

    fn take_tls13_ticket(
        &self,
        server: &ServerName<'static>,
    ) -> Option<rustls::client::Tls13ClientSessionValue> {
        self.0.get()?.take_tls13_ticket(server)
    }
}

/// A client that verifies the server's SPIFFE ID against a trust bundle but
/// presents no certificate (a proxy bootstrapping from the CA server).
pub fn bootstrap_client_config(
    trust: TrustBundle,
    expected: SpiffeId,
) -> Result<Arc<ClientConfig>, Error> {
    let identity = WorkloadIdentity::trust_only(expected.clone(), trust);
    let verifier = SpiffeVerifier::new(identity, PeerPolicy::OneOf(vec![expected]));
    let cfg = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(VERSIONS)
        .map_err(|e| Error::Certificate(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    Ok(Arc::new(cfg))
}

/// A client that verifies the server by DNS name against the roots in
/// `roots_pem` (the Web PKI way; istiod's serving certificate names
/// `istiod.istio-system.svc`), presenting no certificate.
pub fn dns_client_config(roots_pem: &str, alpn: &[&[u8]]) -> Result<Arc<ClientConfig>, Error> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in crate::cert::parse_certs(roots_pem)? {
        roots
            .add(cert)
            .map_err(|e| Error::Certificate(format!("root certificate: {e}")))?;
    }
    let mut cfg = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(VERSIONS)
        .map_err(|e| Error::Certificate(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(cfg))
}
