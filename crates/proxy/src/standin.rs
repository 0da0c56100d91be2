//! Local stand-ins for the outside world, for offline runs (`meshgate up
//! --stand-in`) and tests: a CA, an HTTPS server that answers like the
//! external API, and a DNS server that resolves the external names to it.
//! They are real servers (TLS, DNS over UDP and TCP), not mocks.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use hickory_resolver::proto::op::{Message, MessageType, OpCode, ResponseCode};
use hickory_resolver::proto::rr::rdata::{A, AAAA};
use hickory_resolver::proto::rr::{RData, Record, RecordType};
use http::{Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use meshgate_config::registry::host_matches;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::ServerConfig;
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, UdpSocket};

/// What the real `GET https://jsonplaceholder.typicode.com/todos/1` returns.
pub const TODO_1: &str = "{\n  \"userId\": 1,\n  \"id\": 1,\n  \"title\": \"delectus aut autem\",\n  \"completed\": false\n}";

#[derive(Debug, thiserror::Error)]
pub enum StandinError {
    #[error("stand-in certificate: {0}")]
    Cert(String),
    #[error("stand-in listen on {0}: {1}")]
    Bind(SocketAddr, std::io::Error),
}

fn rc(e: impl std::fmt::Display) -> StandinError {
    StandinError::Cert(e.to_string())
}

/// A throwaway CA for the stand-in servers; gateways trust it through
/// `caCertificates` or an extra-roots file.
pub struct StandinCa {
    issuer: Issuer<'static, KeyPair>,
    pub root_pem: String,
}

impl std::fmt::Debug for StandinCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StandinCa")
    }
}

impl StandinCa {
    pub fn new(name: &str) -> Result<Self, StandinError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(rc)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(
            DnType::CommonName,
            format!("{name} {:08x}", fastrand::u32(..)),
        );
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key).map_err(rc)?;
        Ok(StandinCa {
            root_pem: cert.pem(),
            issuer: Issuer::new(params, key),
        })
    }

    /// A server certificate for these DNS names, as (chain, key).
    pub fn server_cert(
        &self,
        names: &[String],
    ) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), StandinError> {
        let (cert, key) = self.issue(names)?;
        Ok((
            vec![cert.der().clone()],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        ))
    }

    /// A server certificate and key for these DNS names, as PEM (for files
    /// a Gateway's `serverCertificate`/`privateKey` point at).
    pub fn server_cert_pem(&self, names: &[String]) -> Result<(String, String), StandinError> {
        let (cert, key) = self.issue(names)?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    fn issue(&self, names: &[String]) -> Result<(rcgen::Certificate, KeyPair), StandinError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(rc)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = names
            .iter()
            .map(|n| Ok(SanType::DnsName(n.as_str().try_into().map_err(rc)?)))
            .collect::<Result<_, StandinError>>()?;
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        let cert = params.signed_by(&key, &self.issuer).map_err(rc)?;
        Ok((cert, key))
    }

    /// A stand-in CA from a CA certificate and key the user has (PEM), so
    /// gateways trust the stand-ins through roots they already have.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, StandinError> {
        let key = KeyPair::from_pem(key_pem).map_err(rc)?;
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key).map_err(rc)?;
        Ok(StandinCa {
            issuer,
            root_pem: cert_pem.to_owned(),
        })
    }

    /// A TLS server config for whatever host a client asks for by SNI:
    /// a `given` certificate whose names cover it, else one this CA issues
    /// for that name on first use. A client without SNI gets
    /// `default_name`'s. With `client_ca` (PEM), a client must present a
    /// certificate that chains to it (an API that wants mutual TLS).
    pub fn any_host_config(
        self: &Arc<Self>,
        default_name: &str,
        given: Vec<HostCert>,
        client_ca: Option<&str>,
    ) -> Result<Arc<ServerConfig>, StandinError> {
        let builder = ServerConfig::builder_with_provider(meshgate_identity::tls::provider())
            .with_safe_default_protocol_versions()
            .map_err(rc)?;
        let builder = match client_ca {
            Some(pem) => {
                let mut roots = rustls::RootCertStore::empty();
                for cert in meshgate_identity::cert::parse_certs(pem).map_err(rc)? {
                    roots.add(cert).map_err(rc)?;
                }
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    Arc::new(roots),
                    meshgate_identity::tls::provider(),
                )
                .build()
                .map_err(rc)?;
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let mut cfg = builder.with_cert_resolver(Arc::new(AnyHost {
            ca: self.clone(),
            default_name: default_name.to_ascii_lowercase(),
            given,
            issued: Mutex::default(),
        }));
        cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Arc::new(cfg))
    }

    /// A TLS server config presenting a certificate for `names`.
    pub fn server_config(&self, names: &[String]) -> Result<Arc<ServerConfig>, StandinError> {
        let (chain, key) = self.server_cert(names)?;
        let mut cfg = ServerConfig::builder_with_provider(meshgate_identity::tls::provider())
            .with_safe_default_protocol_versions()
            .map_err(rc)?
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .map_err(rc)?;
        cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Arc::new(cfg))
    }
}

/// A certificate the user gave for some hosts (`*.x` covers `a.x`).
#[derive(Debug)]
pub struct HostCert {
    pub names: Vec<String>,
    pub key: Arc<CertifiedKey>,
}

impl HostCert {
    pub fn from_pem(
        names: Vec<String>,
        chain_pem: &str,
        key_pem: &str,
    ) -> Result<Self, StandinError> {
        let chain = meshgate_identity::cert::parse_certs(chain_pem).map_err(rc)?;
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(rc)?;
        let key = meshgate_identity::tls::certified_key(chain, key).map_err(rc)?;
        Ok(HostCert {
            names,
            key: Arc::new(key),
        })
    }
}

/// At most this many certificates issued on demand (each SNI a client
/// makes up would otherwise cost memory).
const MAX_ISSUED: usize = 1024;

/// Serving certificates by SNI: given ones, else issued and kept.
#[derive(Debug)]
struct AnyHost {
    ca: Arc<StandinCa>,
    default_name: String,
    given: Vec<HostCert>,
    issued: Mutex<HashMap<String, Arc<CertifiedKey>>>,
}

impl rustls::server::ResolvesServerCert for AnyHost {
    fn resolve(&self, hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let name = hello
            .server_name()
            .map_or_else(|| self.default_name.clone(), str::to_ascii_lowercase);
        if let Some(c) = self
            .given
            .iter()
            .find(|c| c.names.iter().any(|n| host_matches(n, &name)))
        {
            return Some(c.key.clone());
        }
        let mut issued = self.issued.lock().ok()?;
        if let Some(key) = issued.get(&name) {
            return Some(key.clone());
        }
        if issued.len() >= MAX_ISSUED {
            return None;
        }
        let (chain, key) = self.ca.server_cert(std::slice::from_ref(&name)).ok()?;
        let key = Arc::new(meshgate_identity::tls::certified_key(chain, key).ok()?);
        issued.insert(name, key.clone());
        Some(key)
    }
}

/// What the HTTPS stand-in saw. Requests for `/hold` are answered only
/// when a test releases them (`release_held`), or after 30 s: a request in
/// flight for as long as a test needs one.
#[derive(Debug, Clone)]
pub struct Seen(
    Arc<Mutex<Vec<SeenRequest>>>,
    Arc<tokio::sync::Semaphore>,
    Arc<tokio::sync::Notify>,
    /// Whether requests are kept (`Seen::default`, for tests to read).
    bool,
);

impl Default for Seen {
    fn default() -> Self {
        Seen(
            Arc::default(),
            Arc::new(tokio::sync::Semaphore::new(0)),
            Arc::default(),
            true,
        )
    }
}

impl Seen {
    /// Keeps no request: `meshgate stand-in` runs for as long as `up` or a
    /// benchmark does, and nobody reads what it saw.
    pub fn unrecorded() -> Self {
        Seen {
            3: false,
            ..Seen::default()
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeenRequest {
    pub sni: Option<String>,
    pub host: Option<String>,
    pub path: String,
    /// The `x-forwarded-for` the proxies passed on.
    pub forwarded_for: Option<String>,
    /// The `x-forwarded-client-cert` the proxies passed on.
    pub client_cert: Option<String>,
    /// Bytes of request body.
    pub body: usize,
}

impl Seen {
    pub fn all(&self) -> Vec<SeenRequest> {
        self.0.lock().map(|v| v.clone()).unwrap_or_default()
    }

    /// What was seen once there are `n` requests, or after `limit`.
    pub async fn wait_for(&self, n: usize, limit: std::time::Duration) -> Vec<SeenRequest> {
        let wait = async {
            loop {
                let notified = self.2.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                if self.all().len() >= n {
                    return;
                }
                notified.await;
            }
        };
        let _ = tokio::time::timeout(limit, wait).await;
        self.all()
    }

    /// Lets `n` held `/hold` requests be answered.
    pub fn release_held(&self, n: usize) {
        self.1.add_permits(n);
    }
}

/// What the stand-in answers: the real API's bodies for its real paths,
/// `/status/N` that status, and for every other path a JSON echo of what it
/// received (method, path, query, headers, SNI, client certificate), so a
/// test or a user sees what the proxies sent. The echo is made only for
/// the paths that answer with it (`answers_echo`).
fn answer(path: &str, echo: Option<&serde_json::Value>) -> Response<Full<Bytes>> {
    let (status, body) = match echo {
        None => (StatusCode::OK, Bytes::from_static(TODO_1.as_bytes())),
        Some(echo) => {
            let status = path
                .strip_prefix("/status/")
                .and_then(|c| c.parse::<u16>().ok())
                .and_then(|c| StatusCode::from_u16(c).ok())
                .unwrap_or(StatusCode::OK);
            let mut text = serde_json::to_string_pretty(echo).unwrap_or_default();
            text.push('\n');
            (status, Bytes::from(text))
        }
    };
    let mut r = Response::new(Full::new(body));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json; charset=utf-8"),
    );
    r
}

/// Whether the answer to `path` is the request's echo: all but the todo's.
fn answers_echo(path: &str) -> bool {
    !matches!(path, "/todos/1" | "/hold")
}

/// The longest `/delay/MS` waits.
const MAX_DELAY_MS: u64 = 60_000;

/// The echo of one request.
fn echo_of(
    req: &Request<Incoming>,
    sni: Option<&str>,
    client: Option<&ClientCert>,
) -> serde_json::Value {
    let headers: serde_json::Map<String, serde_json::Value> = req
        .headers()
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_owned(),
                String::from_utf8_lossy(v.as_bytes()).into(),
            )
        })
        .collect();
    serde_json::json!({
        "method": req.method().as_str(),
        "path": req.uri().path(),
        "query": req.uri().query(),
        "headers": headers,
        "sni": sni,
        "clientCertificate": client.map(|c| serde_json::json!({
            "subject": c.subject,
            "uriSans": c.uri_sans,
            "dnsSans": c.dns_sans,
        })),
    })
}

/// The client certificate a connection presented.
#[derive(Debug, Clone)]
struct ClientCert {
    subject: String,
    uri_sans: Vec<String>,
    dns_sans: Vec<String>,
}

impl ClientCert {
    fn of(certs: Option<&[CertificateDer<'_>]>) -> Option<Self> {
        let info = meshgate_identity::cert::CertInfo::parse(certs?.first()?).ok()?;
        Some(ClientCert {
            subject: info.subject,
            uri_sans: info.uri_sans,
            dns_sans: info.dns_sans,
        })
    }

    fn describe(&self) -> String {
        let mut names = self.uri_sans.clone();
        names.extend(self.dns_sans.iter().cloned());
        match (self.subject.is_empty(), names.is_empty()) {
            (false, _) => self.subject.clone(),
            (true, false) => names.join(","),
            (true, true) => "(no subject)".to_owned(),
        }
    }
}

/// `/upgrade` with `Connection: upgrade`: answers 101 and echoes every byte
/// back on the upgraded connection (a stand-in for a WebSocket server).
fn echo_upgrade(req: &mut Request<Incoming>) -> Option<Response<Full<Bytes>>> {
    let proto = req.headers().get(header::UPGRADE)?.clone();
    if req.uri().path() != "/upgrade" {
        return None;
    }
    let on = hyper::upgrade::on(req);
    tokio::spawn(async move {
        let Ok(upgraded) = on.await else { return };
        let (mut r, mut w) = tokio::io::split(TokioIo::new(upgraded));
        let _ = tokio::io::copy(&mut r, &mut w).await;
    });
    let mut r = Response::new(Full::new(Bytes::new()));
    *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    r.headers_mut().insert(
        header::CONNECTION,
        http::HeaderValue::from_static("upgrade"),
    );
    r.headers_mut().insert(header::UPGRADE, proto);
    Some(r)
}

/// Serves HTTPS on `listener` until dropped, answering like the external API.
pub async fn serve_https(listener: TcpListener, tls: Arc<ServerConfig>, seen: Seen) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        let (acceptor, seen) = (acceptor.clone(), seen.clone());
        tokio::spawn(async move {
            let stream = match acceptor.accept(tcp).await {
                Ok(s) => s,
                Err(e) => {
                    tracing::info!(error = %e, "stand-in connection refused in the TLS handshake");
                    return;
                }
            };
            let sni = stream.get_ref().1.server_name().map(str::to_owned);
            let client = ClientCert::of(stream.get_ref().1.peer_certificates());
            tracing::info!(
                sni = %sni.as_deref().unwrap_or("-"),
                client_cert = %client
                    .as_ref()
                    .map_or_else(|| "-".to_owned(), ClientCert::describe),
                "stand-in connection"
            );
            let svc = hyper::service::service_fn(move |mut req: Request<Incoming>| {
                let path = req.uri().path().to_owned();
                // Made only for the answers that carry it.
                let echo =
                    answers_echo(&path).then(|| echo_of(&req, sni.as_deref(), client.as_ref()));
                let upgrade = echo_upgrade(&mut req);
                let header = |name: header::HeaderName| {
                    req.headers()
                        .get(name)
                        .and_then(|h| h.to_str().ok())
                        .map(str::to_owned)
                };
                let host =
                    header(header::HOST).or_else(|| req.uri().authority().map(|a| a.to_string()));
                let (forwarded_for, client_cert) = if seen.3 {
                    (
                        header(header::HeaderName::from_static("x-forwarded-for")),
                        header(header::HeaderName::from_static("x-forwarded-client-cert")),
                    )
                } else {
                    (None, None)
                };
                let (seen, sni, hold) = (seen.clone(), sni.clone(), seen.1.clone());
                async move {
                    let body = http_body_util::BodyExt::collect(req.into_body())
                        .await
                        .map(|b| b.to_bytes().len())
                        .unwrap_or(0);
                    tracing::info!(sni = %sni.as_deref().unwrap_or("-"), host = %host.as_deref().unwrap_or("-"), %path, "stand-in request");
                    if seen.3
                        && let Ok(mut v) = seen.0.lock()
                    {
                        v.push(SeenRequest {
                            sni,
                            host,
                            path: path.clone(),
                            forwarded_for,
                            client_cert,
                            body,
                        });
                        seen.2.notify_waiters();
                    }
                    if let Some(resp) = upgrade {
                        return Ok(resp);
                    }
                    if path == "/hold"
                        && let Ok(Ok(permit)) =
                            tokio::time::timeout(std::time::Duration::from_secs(30), hold.acquire())
                                .await
                    {
                        permit.forget();
                    }
                    if let Some(ms) = path
                        .strip_prefix("/delay/")
                        .and_then(|m| m.parse::<u64>().ok())
                    {
                        tokio::time::sleep(std::time::Duration::from_millis(ms.min(MAX_DELAY_MS)))
                            .await;
                    }
                    Ok::<_, Infallible>(answer(&path, echo.as_ref()))
                }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection_with_upgrades(TokioIo::new(stream), svc)
                .await;
        });
    }
}

/// Serves the same answers over plain HTTP (a stand-in for a plaintext
/// service, e.g. the original destination of ALLOW_ANY traffic).
pub async fn serve_http(listener: TcpListener) {
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(|req: Request<Incoming>| {
                let path = req.uri().path().to_owned();
                let echo = answers_echo(&path).then(|| echo_of(&req, None, None));
                tracing::info!(%path, "stand-in plain HTTP request");
                async move { Ok::<_, Infallible>(answer(&path, echo.as_ref())) }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(tcp), svc)
                .await;
        });
    }
}

/// A DNS server for a fixed set of names (A and AAAA), TTL 30s; other names
/// get NXDOMAIN.
#[derive(Debug, Clone, Default)]
pub struct DnsZone {
    names: HashMap<String, Vec<IpAddr>>,
    /// The answer for every other name (offline runs: a name outside the
    /// config still resolves, so the mesh's policy is what refuses it).
    fallback: Option<IpAddr>,
    /// Answers' TTL in seconds (none: 30).
    ttl: Option<u32>,
}

impl DnsZone {
    /// Answers live `secs` in resolvers' caches.
    pub fn with_ttl(mut self, secs: u32) -> Self {
        self.ttl = Some(secs);
        self
    }

    /// Answers `name` with `ip`; a `*.example.com` name answers every name
    /// under example.com (not example.com itself), as a wildcard record.
    pub fn insert(&mut self, name: &str, ip: IpAddr) {
        self.names
            .entry(name.trim_end_matches('.').to_ascii_lowercase())
            .or_default()
            .push(ip);
    }

    /// Answers every name the zone does not have with `ip`.
    pub fn with_fallback(mut self, ip: IpAddr) -> Self {
        self.fallback = Some(ip);
        self
    }

    /// The addresses for `name`: its own, else the nearest wildcard's,
    /// else the fallback.
    fn lookup(&self, name: &str) -> Option<Vec<IpAddr>> {
        // Names under the cluster domain are the registry's: one it does
        // not have is NXDOMAIN (as cluster DNS), so resolvers go on down
        // their search path.
        let in_cluster = name == "cluster.local" || name.ends_with(".cluster.local");
        self.lookup_named(name)
            .cloned()
            .or_else(|| self.fallback.filter(|_| !in_cluster).map(|ip| vec![ip]))
    }

    fn lookup_named(&self, name: &str) -> Option<&Vec<IpAddr>> {
        if let Some(ips) = self.names.get(name) {
            return Some(ips);
        }
        let mut rest = name;
        while let Some((_, parent)) = rest.split_once('.') {
            if let Some(ips) = self.names.get(&format!("*.{parent}")) {
                return Some(ips);
            }
            rest = parent;
        }
        None
    }

    /// Answers one query message.
    pub fn respond(&self, query: &[u8]) -> Option<Vec<u8>> {
        let q = Message::from_vec(query).ok()?;
        let mut resp = Message::new(q.metadata.id, MessageType::Response, OpCode::Query);
        resp.metadata.authoritative = true;
        resp.metadata.recursion_desired = q.metadata.recursion_desired;
        let mut known = false;
        for query in &q.queries {
            let name = query
                .name()
                .to_ascii()
                .trim_end_matches('.')
                .to_ascii_lowercase();
            if let Some(ips) = self.lookup(&name) {
                known = true;
                for ip in &ips {
                    let rdata = match (ip, query.query_type()) {
                        (IpAddr::V4(v4), RecordType::A) => RData::A(A(*v4)),
                        (IpAddr::V6(v6), RecordType::AAAA) => RData::AAAA(AAAA(*v6)),
                        _ => continue,
                    };
                    let ttl = self.ttl.unwrap_or(30);
                    resp.add_answer(Record::from_rdata(query.name().clone(), ttl, rdata));
                }
            }
            resp.add_query(query.clone());
        }
        if !known {
            resp.metadata.response_code = ResponseCode::NXDomain;
        }
        resp.to_vec().ok()
    }
}

/// Serves DNS over UDP and TCP on `addr` (port 0 picks one); returns the
/// bound address. Runs until the runtime ends.
pub async fn serve_dns(addr: SocketAddr, zone: DnsZone) -> Result<SocketAddr, StandinError> {
    let mut server = DnsServer::start(addr, zone).await?;
    // Detached: without its abort handles it runs until the runtime ends.
    server.tasks.clear();
    Ok(server.addr)
}

/// A DNS stand-in that stops answering when dropped.
#[derive(Debug)]
pub struct DnsServer {
    pub addr: SocketAddr,
    zone: Arc<arc_swap::ArcSwap<DnsZone>>,
    tasks: Vec<tokio::task::AbortHandle>,
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl DnsServer {
    /// Serves DNS over UDP and TCP on `addr` (port 0 picks one).
    pub async fn start(addr: SocketAddr, zone: DnsZone) -> Result<DnsServer, StandinError> {
        serve_dns_tasks(addr, zone).await
    }

    /// Answers from `zone` from now on.
    pub fn set_zone(&self, zone: DnsZone) {
        self.zone.store(Arc::new(zone));
    }
}

async fn serve_dns_tasks(addr: SocketAddr, zone: DnsZone) -> Result<DnsServer, StandinError> {
    // TCP on the same port, for truncated answers and TCP-only clients. With
    // port 0 the port UDP got may be taken for TCP (another connection's
    // ephemeral port): then try another.
    let mut attempt = 0;
    let (udp, tcp) = loop {
        attempt += 1;
        let udp = UdpSocket::bind(addr)
            .await
            .map_err(|e| StandinError::Bind(addr, e))?;
        let bound = udp.local_addr().map_err(|e| StandinError::Bind(addr, e))?;
        match TcpListener::bind(bound).await {
            Ok(tcp) => break (udp, tcp),
            Err(e) if addr.port() != 0 || attempt == 20 => {
                return Err(StandinError::Bind(bound, e));
            }
            Err(_) => {}
        }
    };
    let bound = udp.local_addr().map_err(|e| StandinError::Bind(addr, e))?;
    let zone = Arc::new(arc_swap::ArcSwap::from_pointee(zone));
    let z = zone.clone();
    let udp_task = tokio::spawn(async move {
        let mut buf = vec![0u8; 4096];
        loop {
            let Ok((n, peer)) = udp.recv_from(&mut buf).await else {
                continue;
            };
            if let Some(out) = z.load().respond(&buf[..n]) {
                let _ = udp.send_to(&out, peer).await;
            }
        }
    });
    let served = zone.clone();
    let tcp_task = tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = tcp.accept().await else {
                continue;
            };
            let z = served.clone();
            tokio::spawn(async move {
                let mut len = [0u8; 2];
                while s.read_exact(&mut len).await.is_ok() {
                    let mut msg = vec![0u8; usize::from(u16::from_be_bytes(len))];
                    if s.read_exact(&mut msg).await.is_err() {
                        return;
                    }
                    let Some(out) = z.load().respond(&msg) else {
                        return;
                    };
                    let Ok(n) = u16::try_from(out.len()) else {
                        return;
                    };
                    if s.write_all(&n.to_be_bytes()).await.is_err()
                        || s.write_all(&out).await.is_err()
                    {
                        return;
                    }
                }
            });
        }
    });
    Ok(DnsServer {
        addr: bound,
        zone,
        tasks: vec![udp_task.abort_handle(), tcp_task.abort_handle()],
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_resolver::proto::op::Query;
    use hickory_resolver::proto::rr::Name;

    fn ask(zone: &DnsZone, name: &str) -> (ResponseCode, Vec<String>) {
        let mut q = Message::new(7, MessageType::Query, OpCode::Query);
        q.add_query(Query::query(Name::from_ascii(name).unwrap(), RecordType::A));
        let resp = Message::from_vec(&zone.respond(&q.to_vec().unwrap()).unwrap()).unwrap();
        let ips = resp.answers.iter().map(|r| r.data.to_string()).collect();
        (resp.metadata.response_code, ips)
    }

    #[test]
    fn a_wildcard_name_answers_every_name_under_it_but_not_itself() {
        let mut zone = DnsZone::default();
        zone.insert("*.example.com", "10.0.0.1".parse().unwrap());
        zone.insert("exact.example.com", "10.0.0.2".parse().unwrap());
        let ok = |ip: &str| (ResponseCode::NoError, vec![ip.to_owned()]);
        assert_eq!(ask(&zone, "a.example.com."), ok("10.0.0.1"));
        assert_eq!(ask(&zone, "deep.a.example.com."), ok("10.0.0.1"));
        assert_eq!(ask(&zone, "exact.example.com."), ok("10.0.0.2"));
        assert_eq!(ask(&zone, "example.com.").0, ResponseCode::NXDomain);
        assert_eq!(ask(&zone, "a.example.org.").0, ResponseCode::NXDomain);
        // With a fallback, every other name resolves to it.
        let zone = zone.with_fallback("10.0.0.254".parse().unwrap());
        assert_eq!(ask(&zone, "a.example.org."), ok("10.0.0.254"));
        // ... except names under the cluster domain (NXDOMAIN, as cluster
        // DNS answers a Service that does not exist).
        assert_eq!(
            ask(&zone, "nope.default.svc.cluster.local.").0,
            ResponseCode::NXDomain
        );
        assert_eq!(ask(&zone, "exact.example.com."), ok("10.0.0.2"));
    }
}
