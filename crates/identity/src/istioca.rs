//! Istio's certificate API, `istio.v1.auth.IstioCertificateService/
//! CreateCertificate` (gRPC over HTTP/2), both ways: the control plane
//! answers Istio's agents with it, and a meshgate proxy takes its
//! certificate from istiod with it, so meshgate proxies join a running
//! Istio mesh's trust.
//!
//! The caller authenticates as istio-agent does: `authorization: Bearer
//! <service-account token>` metadata (checked by the server's
//! [`Authenticator`]), or, for a renewal, its current mesh certificate.
//! The answer is the chain leaf first, the root last (Istio's order).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::uri::PathAndQuery;
use hyper::body::Incoming;
use tokio::net::TcpStream;
use tonic::metadata::MetadataValue;
use tonic::{Code, Status};
use tonic_prost::ProstCodec;

use crate::ca::{CertificateAuthority, DEFAULT_WORKLOAD_TTL};
use crate::caserver::Authenticator;
use crate::{Error, SpiffeId};

/// The gRPC method's path.
pub const PATH: &str = "/istio.v1.auth.IstioCertificateService/CreateCertificate";
/// Istio's own CA port and address inside a cluster.
pub const ISTIOD_SERVER_NAME: &str = "istiod.istio-system.svc";
/// The cluster a request comes from (istio-agent's `ClusterID` metadata);
/// istiod's default.
const CLUSTER_ID: &str = "Kubernetes";
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// `istio.v1.auth.IstioCertificateRequest` (security/v1alpha1/ca.proto).
/// Field 4, `metadata`, is left out: the identity comes from the caller's
/// credentials, never from what it says about itself.
#[derive(Clone, PartialEq, prost::Message)]
pub struct IstioCertificateRequest {
    /// The PEM CSR.
    #[prost(string, tag = "1")]
    pub csr: String,
    /// Requested lifetime in seconds; 0 for the CA's default.
    #[prost(int64, tag = "3")]
    pub validity_duration: i64,
}

/// `istio.v1.auth.IstioCertificateResponse`: PEM certificates, leaf first,
/// root last.
#[derive(Clone, PartialEq, prost::Message)]
pub struct IstioCertificateResponse {
    #[prost(string, repeated, tag = "1")]
    pub cert_chain: Vec<String>,
}

// === Server ===

/// Answers one CreateCertificate call; `peer` is the caller's verified
/// mesh identity, if it presented a certificate.
pub async fn handle<A: Authenticator>(
    ca: Arc<CertificateAuthority>,
    auth: Arc<A>,
    peer: Option<SpiffeId>,
    req: http::Request<Incoming>,
) -> http::Response<tonic::body::Body> {
    let service = Signer { ca, auth, peer };
    tonic::server::Grpc::new(ProstCodec::default())
        .unary(service, req)
        .await
}

struct Signer<A> {
    ca: Arc<CertificateAuthority>,
    auth: Arc<A>,
    peer: Option<SpiffeId>,
}

impl<A: Authenticator> tower_service::Service<tonic::Request<IstioCertificateRequest>>
    for Signer<A>
{
    type Response = tonic::Response<IstioCertificateResponse>;
    type Error = Status;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Status>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Status>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: tonic::Request<IstioCertificateRequest>) -> Self::Future {
        let (ca, auth, peer) = (self.ca.clone(), self.auth.clone(), self.peer.clone());
        Box::pin(async move {
            sign(&ca, auth.as_ref(), peer, req)
                .await
                .map(tonic::Response::new)
        })
    }
}

async fn sign<A: Authenticator>(
    ca: &CertificateAuthority,
    auth: &A,
    peer: Option<SpiffeId>,
    req: tonic::Request<IstioCertificateRequest>,
) -> Result<IstioCertificateResponse, Status> {
    let token = req
        .metadata()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_owned);
    let id = match (token, peer) {
        (Some(t), _) => match auth.authenticate(&t).await {
            Ok(Some((ns, sa))) => SpiffeId::new(ca.trust_domain(), &ns, &sa)
                .map_err(|e| Status::permission_denied(e.to_string()))?,
            Ok(None) => return Err(Status::unauthenticated("unknown or invalid token")),
            Err(e) => {
                return Err(Status::unavailable(format!(
                    "cannot check the token now: {e}"
                )));
            }
        },
        // A renewal: the caller's current certificate says who it is.
        (None, Some(peer)) => peer,
        (None, None) => {
            return Err(Status::unauthenticated(
                "no bearer token and no client certificate",
            ));
        }
    };
    let msg = req.into_inner();
    let ttl = u64::try_from(msg.validity_duration)
        .ok()
        .filter(|s| *s > 0)
        .map_or(DEFAULT_WORKLOAD_TTL, Duration::from_secs);
    match ca.sign_csr(&msg.csr, &id, ttl) {
        Ok(chain) => {
            tracing::info!(identity = %id, ttl_s = ttl.as_secs(), protocol = "istio", "certificate issued");
            let mut cert_chain: Vec<String> = crate::cert::split_pem(&chain);
            cert_chain.push(ca.root_pem().to_owned());
            Ok(IstioCertificateResponse { cert_chain })
        }
        Err(e) => {
            tracing::warn!(identity = %id, error = %e, protocol = "istio", "certificate refused");
            Err(Status::new(Code::InvalidArgument, e.to_string()))
        }
    }
}

// === Client ===

/// What an Istio CA answered: the chain to present and the root it ends in.
#[derive(Debug)]
pub struct Issued {
    pub cert_chain: String,
    pub root_cert: String,
}

/// Asks the Istio CA at `addr` (istiod's 15012) to sign `csr_pem`,
/// authenticated by `token`. The server's certificate must chain to
/// `root_pem` (the `istio-ca-root-cert` ConfigMap) and name `server_name`.
pub async fn request_certificate(
    addr: &str,
    server_name: &str,
    token: &str,
    root_pem: &str,
    csr_pem: &str,
    ttl: Duration,
) -> Result<Issued, Error> {
    let remote = |e: String| Error::CaServer(format!("{addr} (Istio CA): {e}"));
    let tls = tokio_rustls::TlsConnector::from(crate::tls::dns_client_config(root_pem, &[b"h2"])?);
    let name = rustls_pki_types::ServerName::try_from(server_name.to_owned())
        .map_err(|e| remote(format!("server name {server_name}: {e}")))?;
    let connect = async {
        let tcp = TcpStream::connect(addr)
            .await
            .map_err(|e| remote(e.to_string()))?;
        tls.connect(name, tcp)
            .await
            .map_err(|e| remote(format!("TLS: {}", crate::tls::handshake_error_reason(&e))))
    };
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, connect)
        .await
        .map_err(|_| remote("connect timed out".to_owned()))??;
    let (sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .map_err(|e| remote(e.to_string()))?;
    tokio::spawn(conn);

    let origin =
        http::Uri::try_from(format!("https://{server_name}")).map_err(|e| remote(e.to_string()))?;
    let mut client = tonic::client::Grpc::with_origin(H2(sender), origin);
    let mut request = tonic::Request::new(IstioCertificateRequest {
        csr: csr_pem.to_owned(),
        validity_duration: i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX),
    });
    let bearer = MetadataValue::try_from(format!("Bearer {token}"))
        .map_err(|_| remote("the token is not a valid header value".to_owned()))?;
    request.metadata_mut().insert("authorization", bearer);
    request
        .metadata_mut()
        .insert("clusterid", MetadataValue::from_static(CLUSTER_ID));
    request.set_timeout(REQUEST_TIMEOUT);
    let call = async {
        client.ready().await.map_err(|e| remote(e.to_string()))?;
        client
            .unary(
                request,
                PathAndQuery::from_static(PATH),
                ProstCodec::default(),
            )
            .await
            .map_err(|s| remote(format!("{:?}: {}", s.code(), s.message())))
    };
    let response: tonic::Response<IstioCertificateResponse> =
        tokio::time::timeout(REQUEST_TIMEOUT, call)
            .await
            .map_err(|_| remote("no answer in time".to_owned()))??;
    issued(response.into_inner().cert_chain).map_err(remote)
}

/// Splits Istio's answer into the chain (leaf and intermediates) and root.
fn issued(mut certs: Vec<String>) -> Result<Issued, String> {
    if certs.len() < 2 {
        return Err(format!(
            "expected the leaf and the root, got {} certificate(s)",
            certs.len()
        ));
    }
    let root_cert = certs.pop().unwrap_or_default();
    Ok(Issued {
        cert_chain: certs.concat(),
        root_cert,
    })
}

/// hyper's HTTP/2 sender as the service tonic's client calls.
struct H2(hyper::client::conn::http2::SendRequest<tonic::body::Body>);

impl tower_service::Service<http::Request<tonic::body::Body>> for H2 {
    type Response = http::Response<Incoming>;
    type Error = hyper::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, hyper::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), hyper::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        Box::pin(self.0.send_request(req))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_certificate_of_an_answer_is_the_root() {
        let got = issued(vec!["leaf\n".into(), "mid\n".into(), "root\n".into()]).unwrap();
        assert_eq!(got.cert_chain, "leaf\nmid\n");
        assert_eq!(got.root_cert, "root\n");
        assert!(issued(vec!["leaf\n".into()]).is_err());
    }

    #[test]
    fn messages_use_istios_field_numbers() {
        use prost::Message;
        let req = IstioCertificateRequest {
            csr: "x".into(),
            validity_duration: 60,
        };
        // Field 1 (string "x"), field 3 (varint 60), as ca.proto.
        assert_eq!(req.encode_to_vec(), [0x0a, 1, b'x', 0x18, 60]);
    }
}
