//! `meshgate ca serve`: issues workload certificates over TLS from CSRs.
//!
//! Protocol (see docs/ca-protocol.md): `POST /v1/certificates` with
//! `Authorization: Bearer <token>` and JSON `{"csr": "<PEM>", "ttlSeconds": N}`.
//! The token maps to one namespace/service account; the CSR must ask for
//! exactly that SPIFFE ID. The answer is JSON
//! `{"certChain": "<PEM>", "rootCert": "<PEM>"}`. The private key never leaves
//! the proxy.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use serde::{Deserialize, Serialize};
use tokio::net::{TcpListener, TcpStream};

use crate::ca::{CertificateAuthority, DEFAULT_WORKLOAD_TTL};
use crate::source::{Source, WorkloadIdentity};
use crate::tls::{TrustBundle, bootstrap_client_config, server_config_without_client_auth};
use crate::{Error, SpiffeId};

pub const PATH: &str = "/v1/certificates";
/// The CA server's own identity, which clients verify.
pub const CA_NAMESPACE: &str = "istio-system";
pub const CA_SERVICE_ACCOUNT: &str = "meshgate-ca";
const MAX_BODY: usize = 64 * 1024;

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CertificateRequest {
    pub csr: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_seconds: Option<u64>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CertificateResponse {
    pub cert_chain: String,
    pub root_cert: String,
}

#[derive(Debug, Serialize, Deserialize)]
struct ErrorBody {
    error: String,
}

/// Bootstrap tokens: each maps to one namespace and service account.
#[derive(Debug, Clone, Default)]
pub struct TokenTable(HashMap<String, (String, String)>);

impl TokenTable {
    /// Parses lines of `<token> <namespace>/<serviceaccount>`; `#` starts a
    /// comment.
    pub fn parse(text: &str, file: &str) -> Result<Self, Error> {
        let mut map = HashMap::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let bad = |why: &str| {
                Error::Config(format!(
                    "{file}:{}: {why}: expected \"<token> <namespace>/<serviceaccount>\"",
                    i + 1
                ))
            };
            let mut parts = line.split_whitespace();
            let (Some(token), Some(who), None) = (parts.next(), parts.next(), parts.next()) else {
                return Err(bad("wrong number of fields"));
            };
            let (ns, sa) = who
                .split_once('/')
                .ok_or_else(|| bad("identity is not namespace/serviceaccount"))?;
            if map
                .insert(token.to_owned(), (ns.to_owned(), sa.to_owned()))
                .is_some()
            {
                return Err(bad("duplicate token"));
            }
        }
        Ok(TokenTable(map))
    }

    pub fn load(path: &Path) -> Result<Self, Error> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::File(path.to_owned(), e.to_string()))?;
        Self::parse(&text, &path.display().to_string())
    }
}

/// Who a bearer token says the caller is: a token file here, the
/// Kubernetes TokenReview API in `meshgate control`.
pub trait Authenticator: Send + Sync + 'static {
    /// `Ok(Some((namespace, service account)))` for a valid token,
    /// `Ok(None)` for an unknown or invalid one, `Err` when it cannot be
    /// checked now (a retry may succeed).
    fn authenticate(
        &self,
        token: &str,
    ) -> impl Future<Output = Result<Option<(String, String)>, String>> + Send;
}

impl Authenticator for TokenTable {
    async fn authenticate(&self, token: &str) -> Result<Option<(String, String)>, String> {
        Ok(self.0.get(token).cloned())
    }
}

/// The CA server's own SPIFFE ID for a trust domain.
pub fn ca_identity(trust_domain: &str) -> Result<SpiffeId, Error> {
    SpiffeId::new(trust_domain, CA_NAMESPACE, CA_SERVICE_ACCOUNT)
        .map_err(|e| Error::Config(e.to_string()))
}

/// Serves certificate requests on `listener` until the task is dropped.
pub async fn serve<A: Authenticator>(
    ca: Arc<CertificateAuthority>,
    tokens: A,
    listener: TcpListener,
) -> Result<(), Error> {
    let own_id = ca_identity(ca.trust_domain())?;
    let identity = WorkloadIdentity::start(
        own_id,
        Source::InProcess {
            ca: ca.clone(),
            ttl: DEFAULT_WORKLOAD_TTL,
        },
    )
    .await?;
    let tls = tokio_rustls::TlsAcceptor::from(server_config_without_client_auth(
        &identity,
        &[b"http/1.1"],
    )?);
    let tokens = Arc::new(tokens);
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                continue;
            }
        };
        let (tls, ca, tokens, identity) =
            (tls.clone(), ca.clone(), tokens.clone(), identity.clone());
        tokio::spawn(async move {
            let _keep = identity;
            let stream = match tls.accept(tcp).await {
                Ok(s) => s,
                Err(e) => {
                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                    return;
                }
            };
            let svc = hyper::service::service_fn(move |req| {
                let (ca, tokens) = (ca.clone(), tokens.clone());
                async move { Ok::<_, std::convert::Infallible>(handle(&ca, tokens.as_ref(), req).await) }
            });
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                .await
            {
                tracing::debug!(%peer, error = %e, "connection error");
            }
        });
    }
}

fn json<T: Serialize>(status: StatusCode, body: &T) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(
        serde_json::to_vec(body).unwrap_or_default(),
    )));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    resp
}

fn refuse(status: StatusCode, why: impl Into<String>) -> Response<Full<Bytes>> {
    let error = why.into();
    tracing::warn!(%status, %error, "certificate request refused");
    json(status, &ErrorBody { error })
}

/// Answers one certificate request (`POST /v1/certificates`); other paths
/// and methods get 404 / 405. Shared with the control plane's port.
pub async fn handle<A: Authenticator>(
    ca: &CertificateAuthority,
    tokens: &A,
    req: Request<Incoming>,
) -> Response<Full<Bytes>> {
    if req.uri().path() != PATH {
        return refuse(
            StatusCode::NOT_FOUND,
            format!("unknown path; use POST {PATH}"),
        );
    }
    if req.method() != Method::POST {
        return refuse(StatusCode::METHOD_NOT_ALLOWED, "use POST");
    }
    let token = req
        .headers()
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_owned);
    let who = match token {
        Some(t) => tokens.authenticate(&t).await,
        None => Ok(None),
    };
    let id = match who {
        Ok(Some((ns, sa))) => match SpiffeId::new(ca.trust_domain(), &ns, &sa) {
            Ok(id) => id,
            Err(e) => return refuse(StatusCode::FORBIDDEN, e.to_string()),
        },
        Ok(None) => {
            return refuse(
                StatusCode::UNAUTHORIZED,
                "missing or unknown bootstrap token",
            );
        }
        Err(e) => {
            return refuse(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("cannot check the token now: {e}"),
            );
        }
    };
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return refuse(StatusCode::BAD_REQUEST, format!("cannot read body: {e}")),
    };
    let request: CertificateRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return refuse(StatusCode::BAD_REQUEST, format!("bad JSON: {e}")),
    };
    let ttl = request
        .ttl_seconds
        .map_or(DEFAULT_WORKLOAD_TTL, Duration::from_secs);
    match ca.sign_csr(&request.csr, &id, ttl) {
        Ok(chain) => {
            tracing::info!(identity = %id, ?ttl, "certificate issued");
            json(
                StatusCode::OK,
                &CertificateResponse {
                    cert_chain: chain,
                    root_cert: ca.root_pem().to_owned(),
                },
            )
        }
        Err(e @ Error::Malformed(_)) => refuse(StatusCode::BAD_REQUEST, e.to_string()),
        Err(e) => refuse(StatusCode::FORBIDDEN, e.to_string()),
    }
}

/// Asks the CA server at `addr` to sign `csr_pem`. The server must present
/// the CA identity of the trust domain in `root_pem`.
pub async fn request_certificate(
    addr: &str,
    token: &str,
    root_pem: &str,
    csr_pem: &str,
    ttl: Duration,
) -> Result<CertificateResponse, Error> {
    let trust = TrustBundle::from_pem(root_pem)?;
    let td = crate::cert::CertInfo::parse(&trust.certs()[0])?
        .organization
        .ok_or_else(|| Error::Config("CA root has no organization (trust domain)".into()))?;
    let tls = tokio_rustls::TlsConnector::from(bootstrap_client_config(trust, ca_identity(&td)?)?);
    let remote = |e: String| Error::CaServer(format!("{addr}: {e}"));
    let tcp = TcpStream::connect(addr)
        .await
        .map_err(|e| remote(e.to_string()))?;
    let host = addr
        .rsplit_once(':')
        .map_or(addr, |(h, _)| h)
        .trim_matches(['[', ']']);
    let name = rustls_pki_types::ServerName::try_from(host.to_owned())
        .map_err(|e| remote(e.to_string()))?;
    let stream = tls
        .connect(name, tcp)
        .await
        .map_err(|e| remote(format!("TLS: {}", crate::tls::handshake_error_reason(&e))))?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| remote(e.to_string()))?;
    tokio::spawn(conn);
    let body = serde_json::to_vec(&CertificateRequest {
        csr: csr_pem.to_owned(),
        ttl_seconds: Some(ttl.as_secs()),
    })
    .map_err(|e| remote(e.to_string()))?;
    let req = Request::post(PATH)
        .header(http::header::HOST, addr)
        .header(http::header::AUTHORIZATION, format!("Bearer {token}"))
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| remote(e.to_string()))?;
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| remote(e.to_string()))?;
    let status = resp.status();
    let bytes = Limited::new(resp.into_body(), 1 << 20)
        .collect()
        .await
        .map_err(|e| remote(e.to_string()))?
        .to_bytes();
    if status != StatusCode::OK {
        let why = serde_json::from_slice::<ErrorBody>(&bytes).map_or_else(
            |_| String::from_utf8_lossy(&bytes).into_owned(),
            |b| b.error,
        );
        return Err(remote(format!("{status}: {why}")));
    }
    serde_json::from_slice(&bytes).map_err(|e| remote(format!("bad response: {e}")))
}
