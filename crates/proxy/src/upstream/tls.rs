//! TLS toward upstreams: origination per DestinationRule (SIMPLE, MUTUAL:
//! verify the server against the configured CA or the system's roots and
//! against the expected names) and mesh mutual TLS (ISTIO_MUTUAL: SPIFFE).
//! Configs are built when config is applied, once per distinct set of
//! inputs (`ClientConfigs`), and shared by the clusters that have them.

use std::path::Path;
use std::sync::Arc;

use meshgate_config::model::networking::ClientTlsMode;
use meshgate_config::view::ClusterTls;
use meshgate_identity::tls::{mesh_client_config, provider};
use meshgate_identity::{SpiffeId, WorkloadIdentity};
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};

#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    #[error("{path}: {reason}")]
    File { path: String, reason: String },
    #[error("no trusted roots: the system has no CA bundle and no caCertificates was given")]
    NoRoots,
    #[error("{0}")]
    Rustls(String),
    #[error("ISTIO_MUTUAL toward {0} needs a workload identity")]
    NoIdentity(String),
    #[error("invalid SNI \"{0}\"")]
    Sni(String),
}

/// TLS for one cluster: the config and the SNI to send.
#[derive(Debug, Clone)]
pub struct UpstreamTls {
    pub config: Arc<ClientConfig>,
    pub sni: ServerName<'static>,
    /// The SNI (and the name verified) is each request's host: a wildcard
    /// host's cluster (DYNAMIC_DNS) has no one name.
    pub auto_sni: bool,
    /// For logs: `SIMPLE`, `MUTUAL`, `ISTIO_MUTUAL`.
    pub mode: ClientTlsMode,
}

/// Roots for origination when a DestinationRule gives no caCertificates:
/// the operating system's bundle plus any extra roots the operator adds.
#[derive(Debug, Clone)]
pub struct DefaultRoots {
    store: Arc<RootCertStore>,
    /// Tells one set of roots from another (a reload keeps a cluster only
    /// if the roots it trusts are the same).
    digest: u64,
}

impl DefaultRoots {
    pub fn load(extra: &[std::path::PathBuf]) -> Result<Self, TlsSetupError> {
        let mut store = RootCertStore::empty();
        let native = rustls_native_certs::load_native_certs();
        for cert in native.certs {
            let _ = store.add(cert);
        }
        for path in extra {
            for cert in read_certs(path)? {
                store.add(cert).map_err(|e| TlsSetupError::File {
                    path: path.display().to_string(),
                    reason: e.to_string(),
                })?;
            }
        }
        Ok(DefaultRoots::of(store))
    }

    fn of(store: RootCertStore) -> Self {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        for anchor in &store.roots {
            anchor.subject.as_ref().hash(&mut h);
            anchor.subject_public_key_info.as_ref().hash(&mut h);
        }
        DefaultRoots {
            store: Arc::new(store),
            digest: h.finish(),
        }
    }

    pub fn digest(&self) -> u64 {
        self.digest
    }
}

impl DefaultRoots {
    /// Exactly these roots (no system bundle): hermetic tests.
    pub fn only(certs: Vec<CertificateDer<'static>>) -> Result<Self, TlsSetupError> {
        let mut store = RootCertStore::empty();
        for cert in certs {
            store.add(cert).map_err(rustls_err)?;
        }
        Ok(DefaultRoots::of(store))
    }
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsSetupError> {
    let err = |reason: String| TlsSetupError::File {
        path: path.display().to_string(),
        reason,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| err(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| err(e.to_string()))?;
    if certs.is_empty() {
        return Err(err("no PEM certificate".into()));
    }
    Ok(certs)
}

type Der<'a> = CertificateDer<'a>;
type Dss = DigitallySignedStruct;
type Signature = Result<HandshakeSignatureValid, rustls::Error>;

/// Checks an upstream's certificate: the chain with webpki and the name
/// against any of the expected names (subjectAltNames), not just the SNI;
/// or, with `insecureSkipVerify`, nothing about the certificate. The
/// signatures over the handshake are always checked.
#[derive(Debug)]
struct Verifier {
    /// `None`: insecureSkipVerify.
    chain: Option<Arc<WebPkiServerVerifier>>,
    names: Vec<ServerName<'static>>,
}

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &Der<'_>,
        intermediates: &[Der<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(chain) = &self.chain else {
            return Ok(ServerCertVerified::assertion());
        };
        let verify = |name| chain.verify_server_cert(end_entity, intermediates, name, ocsp, now);
        if self.names.is_empty() {
            return verify(server_name);
        }
        let mut last = None;
        for name in &self.names {
            match verify(name) {
                Ok(v) => return Ok(v),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or(rustls::Error::General("no expected names".into())))
    }

    fn verify_tls12_signature(&self, m: &[u8], c: &Der<'_>, d: &Dss) -> Signature {
        let algorithms = provider().signature_verification_algorithms;
        rustls::crypto::verify_tls12_signature(m, c, d, &algorithms)
    }

    fn verify_tls13_signature(&self, m: &[u8], c: &Der<'_>, d: &Dss) -> Signature {
        let algorithms = provider().signature_verification_algorithms;
        rustls::crypto::verify_tls13_signature(m, c, d, &algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

fn rustls_err(e: impl std::fmt::Display) -> TlsSetupError {
    TlsSetupError::Rustls(e.to_string())
}

/// The client configs of one snapshot build, by what they are built from.
/// Clusters differ mostly by SNI, which is per connection; a rustls config
/// carries its own session cache (allocated on first use: see
/// `LazySessionCache`), shared by the clusters that share it. Sharing is safe: the
/// key holds everything that decides verification and the client
/// certificate, so a session is resumed only under the settings it was
/// made with.
#[derive(Debug, Default)]
pub struct ClientConfigs(std::collections::HashMap<ConfigKey, Arc<ClientConfig>>);

#[derive(Debug, PartialEq, Eq, Hash)]
struct ConfigKey {
    mode: ClientTlsMode,
    insecure_skip_verify: bool,
    ca_certificates: String,
    expected_identities: Vec<String>,
    client_cert: Option<(String, String)>,
    h2: bool,
}

/// Builds the TLS settings of one cluster from its view; `None` for
/// plaintext. The config comes from `configs` when another cluster of this
/// build has the same inputs.
pub fn build(
    tls: &ClusterTls,
    client_cert: Option<(&str, &str)>,
    h2: bool,
    ctx: (
        &DefaultRoots,
        Option<&Arc<WorkloadIdentity>>,
        &mut ClientConfigs,
    ),
    host: &str,
) -> Result<Option<UpstreamTls>, TlsSetupError> {
    if tls.mode == ClientTlsMode::Disable {
        return Ok(None);
    }
    let (roots, identity, configs) = ctx;
    // A wildcard host: each connection names (and verifies) the request's
    // host; the wildcard's parent stands in until then.
    let auto_sni = tls.sni.starts_with("*.");
    let sni_name = tls.sni.trim_start_matches("*.");
    let sni = ServerName::try_from(sni_name.to_owned())
        .map_err(|_| TlsSetupError::Sni(tls.sni.clone()))?;
    // A certificate is verified for the name each connection sends (the
    // SNI), so expecting just that name adds nothing: such clusters (one
    // per external host, SNI = host) share one config instead of a ~1 KB
    // config each.
    let names: &[String] = match &tls.expected_identities[..] {
        [only]
            if !auto_sni
                && only.eq_ignore_ascii_case(sni_name)
                && matches!(tls.mode, ClientTlsMode::Simple | ClientTlsMode::Mutual) =>
        {
            &[]
        }
        names => names,
    };
    let key = ConfigKey {
        mode: tls.mode,
        insecure_skip_verify: tls.insecure_skip_verify,
        ca_certificates: tls.ca_certificates.clone(),
        expected_identities: names.to_vec(),
        client_cert: client_cert.map(|(c, k)| (c.to_owned(), k.to_owned())),
        h2,
    };
    let config = match configs.0.get(&key) {
        Some(config) => config.clone(),
        None => {
            let names = (names, roots, identity);
            let config = client_config(tls, client_cert, h2, names, host)?;
            configs.0.insert(key, config.clone());
            config
        }
    };
    Ok(Some(UpstreamTls {
        config,
        sni,
        auto_sni,
        mode: tls.mode,
    }))
}

/// One client config: verification (mesh SPIFFE, or the chain and the
/// expected names: none, the connection's SNI), the client certificate,
/// ALPN.
fn client_config(
    tls: &ClusterTls,
    client_cert: Option<(&str, &str)>,
    h2: bool,
    (names, roots, identity): (&[String], &DefaultRoots, Option<&Arc<WorkloadIdentity>>),
    host: &str,
) -> Result<Arc<ClientConfig>, TlsSetupError> {
    let alpn: &[&[u8]] = if h2 { &[b"h2"] } else { &[b"http/1.1"] };
    let config = match tls.mode {
        // Plaintext never gets here (`build` returns first).
        ClientTlsMode::Disable => return Err(TlsSetupError::Rustls("no TLS".into())),
        ClientTlsMode::IstioMutual => {
            let identity = identity.ok_or_else(|| TlsSetupError::NoIdentity(host.to_owned()))?;
            let expected: Vec<SpiffeId> = tls
                .expected_identities
                .iter()
                .filter_map(|s| s.parse().ok())
                .collect();
            // The cluster's protocol decides, as for any upstream (Istio
            // does not upgrade HTTP/1.1 between mesh peers by default).
            mesh_client_config(identity, expected, alpn).map_err(rustls_err)?
        }
        ClientTlsMode::Simple | ClientTlsMode::Mutual => {
            let builder = ClientConfig::builder_with_provider(provider())
                .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
                .map_err(rustls_err)?;
            let chain = if tls.insecure_skip_verify {
                None
            } else {
                let store = if tls.ca_certificates.is_empty() {
                    if roots.store.is_empty() {
                        return Err(TlsSetupError::NoRoots);
                    }
                    roots.store.clone()
                } else {
                    let mut store = RootCertStore::empty();
                    for c in read_certs(Path::new(&tls.ca_certificates))? {
                        store.add(c).map_err(rustls_err)?;
                    }
                    Arc::new(store)
                };
                let webpki = WebPkiServerVerifier::builder_with_provider(store, provider())
                    .build()
                    .map_err(rustls_err)?;
                Some(webpki)
            };
            let names = names
                .iter()
                .filter_map(|n| ServerName::try_from(n.clone()).ok())
                .collect();
            let verifier = Arc::new(Verifier { chain, names });
            let builder = builder
                .dangerous()
                .with_custom_certificate_verifier(verifier);
            let mut cfg = match (tls.mode, client_cert) {
                (ClientTlsMode::Mutual, Some((cert, key))) => {
                    let chain = read_certs(Path::new(cert))?;
                    let key =
                        PrivateKeyDer::from_pem_file(key).map_err(|e| TlsSetupError::File {
                            path: key.to_owned(),
                            reason: e.to_string(),
                        })?;
                    builder
                        .with_client_auth_cert(chain, key)
                        .map_err(rustls_err)?
                }
                _ => builder.with_no_client_auth(),
            };
            cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
            cfg.resumption = meshgate_identity::tls::LazySessionCache::resumption();
            Arc::new(cfg)
        }
    };
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn simple(sni: &str, names: &[&str]) -> ClusterTls {
        ClusterTls {
            mode: ClientTlsMode::Simple,
            auto: false,
            sni: sni.to_owned(),
            expected_identities: names.iter().map(|n| (*n).to_owned()).collect(),
            trust: "system roots".to_owned(),
            ca_certificates: String::new(),
            client_certificate: String::new(),
            private_key: String::new(),
            insecure_skip_verify: false,
        }
    }

    fn roots() -> DefaultRoots {
        let ca = crate::standin::StandinCa::new("test roots").unwrap();
        DefaultRoots::only(meshgate_identity::cert::parse_certs(&ca.root_pem).unwrap()).unwrap()
    }

    #[test]
    fn clusters_share_a_config_only_when_everything_that_verifies_is_the_same() {
        let (roots, mut configs) = (roots(), ClientConfigs::default());
        let mut build = |tls: &ClusterTls, h2: bool| {
            build(tls, None, h2, (&roots, None, &mut configs), "h")
                .unwrap()
                .unwrap()
        };
        // Two hosts verified by the same name set share; the SNI is per
        // connection and stays each cluster's own.
        let a = build(&simple("a.example", &["a.example", "b.example"]), false);
        let b = build(&simple("b.example", &["a.example", "b.example"]), false);
        assert!(Arc::ptr_eq(&a.config, &b.config));
        assert_eq!(a.sni, ServerName::try_from("a.example").unwrap());
        assert_eq!(b.sni, ServerName::try_from("b.example").unwrap());
        // Other names to verify, another ALPN, skipping verification: never
        // the same config (a session resumes without verifying again).
        let other_names = build(&simple("a.example", &["a.example"]), false);
        let h2 = build(&simple("a.example", &["a.example", "b.example"]), true);
        let mut insecure = simple("a.example", &["a.example", "b.example"]);
        insecure.insecure_skip_verify = true;
        let insecure = build(&insecure, false);
        for other in [&other_names, &h2, &insecure] {
            assert!(!Arc::ptr_eq(&a.config, &other.config));
        }
    }

    /// Clusters whose one expected name is their SNI (an external host per
    /// cluster, `sni` = host) share one config; each connection is still
    /// verified for its own SNI.
    #[tokio::test]
    async fn clusters_expecting_only_their_sni_share_a_config_and_verify_it() {
        let ca = crate::standin::StandinCa::new("test roots").unwrap();
        let roots = DefaultRoots::only(meshgate_identity::cert::parse_certs(&ca.root_pem).unwrap())
            .unwrap();
        let mut configs = ClientConfigs::default();
        let mut build = |sni: &str| {
            build(
                &simple(sni, &[sni]),
                None,
                false,
                (&roots, None, &mut configs),
                "h",
            )
            .unwrap()
            .unwrap()
        };
        let (a, b) = (build("a.example"), build("b.example"));
        assert!(Arc::ptr_eq(&a.config, &b.config));
        assert_eq!(configs.0.len(), 1);

        let server = ca.server_config(&["a.example".to_owned()]).unwrap();
        let handshake = |tls: UpstreamTls| {
            let server = server.clone();
            async move {
                let (client_io, server_io) = tokio::io::duplex(64 * 1024);
                let acceptor = tokio_rustls::TlsAcceptor::from(server);
                let serve = tokio::spawn(async move { acceptor.accept(server_io).await.is_ok() });
                let connector = tokio_rustls::TlsConnector::from(tls.config.clone());
                let client = connector.connect(tls.sni.clone(), client_io).await;
                let _ = serve.await;
                client.map(|_| ()).map_err(|e| e.to_string())
            }
        };
        assert_eq!(handshake(a).await, Ok(()));
        let refused = handshake(b).await.unwrap_err();
        assert!(refused.contains("not valid for name"), "{refused}");
    }
}
