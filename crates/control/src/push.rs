//! The control plane's port (istiod's 15012): certificate requests,
//! authenticated by token, and config streams, authenticated by the proxy's
//! mesh certificate, on one TLS listener. See docs/config-protocol.md.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, Limited, StreamBody};
use hyper::body::Frame;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use meshgate_identity::caserver::{self, Authenticator};
use meshgate_identity::istioca;
use meshgate_identity::source::DnsCert;
use meshgate_identity::tls::NamedCert;
use meshgate_identity::{CertificateAuthority, Source, SpiffeId, WorkloadIdentity};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::compile::{ScopedPush, Snapshot};
use crate::run::State;

pub const CONFIG_PATH: &str = "/v1/config";
pub const STATUS_PATH: &str = "/v1/config/status";
/// A line on a quiet stream, so a proxy can tell a live control plane from
/// a dead connection (it gives up after three missed beats).
pub const HEARTBEAT: Duration = Duration::from_secs(15);
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// A proxy that reads nothing for this long is dropped (its stream would
/// otherwise hold old versions in memory).
const SEND_TIMEOUT: Duration = Duration::from_secs(30);
const MAX_STATUS_BODY: usize = 64 * 1024;
/// The lifetime of the certificates for the control plane's Service names
/// (webhooks, and this port for Istio's agents); renewed at half of it.
pub const SERVICE_CERT_TTL: Duration = Duration::from_secs(30 * 24 * 3600);

type Body = BoxBody<Bytes, Infallible>;

/// One line of a config stream.
#[derive(Debug, Serialize, Deserialize)]
pub struct Push {
    /// The version, or none for a heartbeat.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u64>,
    /// The documents this proxy sees, as one YAML stream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<String>,
}

/// What a proxy says after applying (or refusing) a version.
#[derive(Debug, Serialize, Deserialize)]
pub struct Applied {
    pub workload: String,
    pub version: u64,
    /// Why the proxy refused the version (it keeps its last good config).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// What the control plane knows of each proxy, by workload (`ns/name`).
#[derive(Debug, Default)]
pub struct Proxies(Mutex<BTreeMap<String, ProxyStatus>>);

#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ProxyStatus {
    pub identity: String,
    pub connected: bool,
    pub sent: Option<u64>,
    pub applied: Option<u64>,
    pub error: Option<String>,
}

impl Proxies {
    fn update(&self, workload: &str, f: impl FnOnce(&mut ProxyStatus)) {
        if let Ok(mut map) = self.0.lock() {
            f(map.entry(workload.to_owned()).or_default());
        }
    }

    /// Drops disconnected proxies whose pod is not `live` any more.
    fn prune(&self, live: impl Fn(&str) -> bool) {
        if let Ok(mut map) = self.0.lock() {
            map.retain(|w, s| s.connected || live(w));
        }
    }

    /// Every proxy's status, for `/debug/syncz`.
    pub fn all(&self) -> BTreeMap<String, ProxyStatus> {
        self.0.lock().map(|m| m.clone()).unwrap_or_default()
    }
}

/// Everything a connection on the port needs.
struct Shared<A> {
    ca: Arc<CertificateAuthority>,
    auth: Arc<A>,
    state: watch::Receiver<Arc<State>>,
    proxies: Arc<Proxies>,
}

/// Serves the port until the task is dropped. The server presents the CA
/// server's identity (`.../ns/istio-system/sa/meshgate-ca`), as `ca serve`.
pub async fn serve<A: Authenticator>(
    listener: TcpListener,
    ca: Arc<CertificateAuthority>,
    auth: A,
    state: watch::Receiver<Arc<State>>,
    proxies: Arc<Proxies>,
    service_names: &[String],
) -> Result<(), meshgate_identity::Error> {
    let own = caserver::ca_identity(ca.trust_domain())?;
    let identity = WorkloadIdentity::start(
        own,
        Source::InProcess {
            ca: ca.clone(),
            ttl: meshgate_identity::ca::DEFAULT_WORKLOAD_TTL,
        },
    )
    .await?;
    // Istio's agents dial the Service by name and verify that name.
    let named = NamedCert(DnsCert::start(
        ca.clone(),
        service_names.to_vec(),
        SERVICE_CERT_TTL,
    )?);
    let tls = tokio_rustls::TlsAcceptor::from(
        meshgate_identity::tls::server_config_optional_client_auth(
            &identity,
            &[b"h2", b"http/1.1"],
            Some(named),
        )?,
    );
    let shared = Arc::new(Shared {
        ca,
        auth: Arc::new(auth),
        state,
        proxies,
    });
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let (tls, shared, identity) = (tls.clone(), shared.clone(), identity.clone());
        tokio::spawn(async move {
            let _keep = identity;
            let Ok(Ok(stream)) = tokio::time::timeout(HANDSHAKE_TIMEOUT, tls.accept(tcp)).await
            else {
                return;
            };
            let peer =
                meshgate_identity::tls::peer_identity(stream.get_ref().1.peer_certificates());
            let svc = hyper::service::service_fn(move |req| {
                let (shared, peer) = (shared.clone(), peer.clone());
                async move { Ok::<_, Infallible>(route(&shared, peer, req).await) }
            });
            // HTTP/2 for Istio's gRPC certificate API, HTTP/1.1 for
            // meshgate's own.
            let mut builder = auto::Builder::new(TokioExecutor::new());
            builder
                .http1()
                .timer(TokioTimer::new())
                .header_read_timeout(HANDSHAKE_TIMEOUT);
            builder.http2().timer(TokioTimer::new());
            let _ = builder.serve_connection(TokioIo::new(stream), svc).await;
        });
    }
}

async fn route<A: Authenticator>(
    shared: &Shared<A>,
    peer: Option<SpiffeId>,
    req: Request<Incoming>,
) -> Response<Body> {
    match (req.method(), req.uri().path()) {
        (_, caserver::PATH) => caserver::handle(&shared.ca, shared.auth.as_ref(), req)
            .await
            .map(BodyExt::boxed),
        (&Method::POST, istioca::PATH) => {
            let resp = istioca::handle(shared.ca.clone(), shared.auth.clone(), peer, req).await;
            grpc_body(resp).await
        }
        (&Method::GET, CONFIG_PATH) => stream(shared, peer, &req),
        (&Method::POST, STATUS_PATH) => status(shared, peer, req).await,
        _ => text(StatusCode::NOT_FOUND, "unknown path"),
    }
}

/// Checks that the caller is the workload it names: the proxy's
/// certificate must be the pod's service account in the pod's namespace.
fn authorize(
    state: &State,
    peer: Option<&SpiffeId>,
    workload: &str,
) -> Result<(), (StatusCode, String)> {
    let refuse = |status, why: &str| Err((status, why.to_owned()));
    let Some(peer) = peer else {
        return refuse(
            StatusCode::UNAUTHORIZED,
            "a config stream needs the proxy's mesh certificate",
        );
    };
    let Some(snapshot) = &state.snapshot else {
        return refuse(StatusCode::SERVICE_UNAVAILABLE, "no config yet");
    };
    let Some((ns, name)) = workload.split_once('/') else {
        return refuse(StatusCode::BAD_REQUEST, "workload must be NAMESPACE/NAME");
    };
    let pod = snapshot
        .config
        .workloads
        .iter()
        .find(|w| w.meta.namespace == ns && w.meta.name == name);
    let Some(pod) = pod else {
        // The pod may not have reached the control plane yet: retry.
        return refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            &format!("no workload {workload} yet"),
        );
    };
    let sa = pod
        .spec
        .pod
        .service_account_name
        .as_deref()
        .unwrap_or("default");
    if peer.namespace() != ns || peer.service_account() != sa {
        return refuse(
            StatusCode::FORBIDDEN,
            &format!("{peer} is not workload {workload} (service account {ns}/{sa})"),
        );
    }
    Ok(())
}

fn stream<A>(
    shared: &Shared<A>,
    peer: Option<SpiffeId>,
    req: &Request<Incoming>,
) -> Response<Body> {
    let workload = query(req, "workload").unwrap_or_default();
    if let Err((status, why)) = authorize(&shared.state.borrow(), peer.as_ref(), &workload) {
        return text(status, &why);
    }
    let (mut tx, body) = http_body_util::channel::Channel::<Bytes, Infallible>::new(4);
    let mut state = shared.state.clone();
    let proxies = shared.proxies.clone();
    let identity = peer.map(|p| p.to_string()).unwrap_or_default();
    proxies.update(&workload, |s| {
        s.identity = identity;
        s.connected = true;
    });
    tracing::info!(%workload, "proxy connected");
    tokio::spawn(async move {
        let mut sent: Option<u64> = None;
        loop {
            let next = {
                let current = state.borrow_and_update().snapshot.clone();
                current.map(|s| (s.version, scoped_push(&s, &workload)))
            };
            // Unchanged for this proxy: nothing to send.
            if let Some((version, push)) = next.filter(|(_, p)| sent != Some(p.hash)) {
                if !send(&mut tx, push.line.clone()).await {
                    break;
                }
                sent = Some(push.hash);
                proxies.update(&workload, |s| s.sent = Some(version));
            }
            match tokio::time::timeout(HEARTBEAT, state.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => break,
                Err(_) => {
                    let beat = line(&Push {
                        version: None,
                        config: None,
                    });
                    if !send(&mut tx, Bytes::from(beat)).await {
                        break;
                    }
                }
            }
        }
        proxies.update(&workload, |s| s.connected = false);
        tracing::info!(%workload, "proxy disconnected");
        // Forget the proxies that are gone with their pods.
        if let Some(snapshot) = state.borrow().snapshot.clone() {
            proxies.prune(|w| snapshot.workload(w).is_some());
        }
    });
    let mut resp = Response::new(body.boxed());
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/x-ndjson"),
    );
    resp
}

/// Sends one line; false when the proxy is gone or reads nothing.
async fn send(tx: &mut http_body_util::channel::Sender<Bytes, Infallible>, line: Bytes) -> bool {
    matches!(
        tokio::time::timeout(SEND_TIMEOUT, tx.send_data(line)).await,
        Ok(Ok(()))
    )
}

async fn status<A>(
    shared: &Shared<A>,
    peer: Option<SpiffeId>,
    req: Request<Incoming>,
) -> Response<Body> {
    let body = match Limited::new(req.into_body(), MAX_STATUS_BODY)
        .collect()
        .await
    {
        Ok(b) => b.to_bytes(),
        Err(e) => return text(StatusCode::BAD_REQUEST, &format!("cannot read body: {e}")),
    };
    let applied: Applied = match serde_json::from_slice(&body) {
        Ok(a) => a,
        Err(e) => return text(StatusCode::BAD_REQUEST, &format!("bad JSON: {e}")),
    };
    if let Err((status, why)) = authorize(&shared.state.borrow(), peer.as_ref(), &applied.workload)
    {
        return text(status, &why);
    }
    match &applied.error {
        None => {
            tracing::info!(workload = %applied.workload, version = applied.version, "proxy applied config")
        }
        Some(e) => {
            tracing::warn!(workload = %applied.workload, version = applied.version, error = %e, "proxy refused config")
        }
    }
    shared.proxies.update(&applied.workload, |s| {
        s.applied = applied
            .error
            .is_none()
            .then_some(applied.version)
            .or(s.applied);
        s.error = applied.error.clone();
    });
    text(StatusCode::OK, "ok")
}

/// The push for `workload`, made once per snapshot and shared by every
/// stream that sees the same: the proxies of one namespace, apart from
/// those whose Sidecar trims what they import (scope.rs).
fn scoped_push(snapshot: &Snapshot, workload: &str) -> Arc<ScopedPush> {
    use std::hash::{Hash, Hasher};
    let key = snapshot.scope_key(workload);
    let mut cache = match snapshot.pushes.lock() {
        Ok(c) => c,
        Err(poisoned) => poisoned.into_inner(),
    };
    if let Some(p) = cache.get(&key) {
        return p.clone();
    }
    let yaml = snapshot.yaml_for(workload);
    let mut h = std::collections::hash_map::DefaultHasher::new();
    yaml.hash(&mut h);
    let push = Arc::new(ScopedPush {
        hash: h.finish(),
        line: Bytes::from(line(&Push {
            version: Some(snapshot.version),
            config: Some(yaml),
        })),
    });
    cache.insert(key, push.clone());
    push
}

/// A gRPC answer in this port's body type: the message, then the trailers
/// that carry `grpc-status`; or, for a refusal, nothing after the headers.
async fn grpc_body(resp: Response<tonic::body::Body>) -> Response<Body> {
    let (parts, body) = resp.into_parts();
    let (data, trailers) = match body.collect().await {
        Ok(c) => {
            let trailers = c.trailers().cloned();
            (c.to_bytes(), trailers)
        }
        Err(_) => (Bytes::new(), None),
    };
    let body = match trailers {
        Some(t) => {
            let frames = [Ok(Frame::data(data)), Ok(Frame::trailers(t))];
            StreamBody::new(futures_util::stream::iter(frames)).boxed()
        }
        // A refusal is "trailers-only": the status in the headers, which
        // must end the stream (HEADERS with END_STREAM, as gRPC clients
        // other than tonic insist).
        None => http_body_util::Empty::new().boxed(),
    };
    Response::from_parts(parts, body)
}

fn line(push: &Push) -> String {
    let mut s = serde_json::to_string(push).unwrap_or_default();
    s.push('\n');
    s
}

fn query(req: &Request<Incoming>, key: &str) -> Option<String> {
    req.uri().query()?.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == key).then(|| v.replace("%2F", "/").replace("%2f", "/"))
    })
}

fn text(status: StatusCode, body: &str) -> Response<Body> {
    let mut resp = Response::new(Full::new(Bytes::from(format!("{body}\n"))).boxed());
    *resp.status_mut() = status;
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn syncz_forgets_disconnected_proxies_of_pods_that_are_gone() {
        let proxies = Proxies::default();
        for w in ["a/gone", "a/stays", "a/connected"] {
            proxies.update(w, |s| s.connected = w == "a/connected");
        }
        proxies.prune(|w| w == "a/stays");
        let left: Vec<String> = proxies.all().into_keys().collect();
        assert_eq!(left, ["a/connected", "a/stays"]);
    }
}
