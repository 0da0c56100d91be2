//! The inspection port (Envoy's admin port, 15000; loopback only, as
//! Istio binds it): what a running proxy actually runs, the answers
//! `istioctl proxy-config` reads from Envoy.
//!
//! - `/server_info`: version, workload, identity, state, uptime, config
//! - `/config_dump`: the proxy view it runs (listeners, routes, clusters,
//!   policies) and its certificate
//! - `/listeners`, `/clusters` (endpoints and their outlier state now),
//!   `/certs`, `/stats/prometheus`

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use meshgate_config::view::ProxyView;
use meshgate_identity::WorkloadIdentity;
use serde_json::{Value, json};
use tokio::net::TcpListener;

use crate::body::{Body, local_response, text};
use crate::drain::Drain;
use crate::listener::{accept_loop, serve_http};
use crate::proxy::Proxy;

/// Sets the process's log filter (`None`: tells the current one); returns
/// the filter in force.
pub type LogFilter = Arc<dyn Fn(Option<&str>) -> Result<String, String> + Send + Sync>;

/// What the inspection port reads.
#[derive(Clone)]
pub struct Inspect {
    pub proxy: Arc<Proxy>,
    pub identity: Arc<WorkloadIdentity>,
    pub workload: String,
    pub started: Instant,
    /// Where the running config came from (`files`, or the control
    /// plane's version), updated on every apply.
    pub config: Arc<ArcSwap<String>>,
    /// `/logging`: the log filter, changed while running.
    pub log_filter: Option<LogFilter>,
}

impl std::fmt::Debug for Inspect {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inspect")
            .field("workload", &self.workload)
            .finish_non_exhaustive()
    }
}

const INDEX: &str = "meshgate inspection port\n\
/server_info    version, workload, identity, state, uptime, config\n\
/config_dump    the proxy view this proxy runs, and its certificate\n\
/listeners      listeners\n\
/clusters       clusters: endpoints and their outlier state now\n\
/certs          the workload certificate\n\
/logging        the log filter; POST /logging?level=debug (or a filter) changes it\n\
/stats          metrics, one `name{labels}: value` line each (?filter=TEXT keeps lines containing it)\n\
/stats/prometheus  metrics\n";

/// Serves the port until the task is dropped.
pub async fn serve(listener: TcpListener, inspect: Inspect) {
    let never = Drain::default();
    accept_loop(listener, |tcp, _| {
        let (inspect, never) = (inspect.clone(), never.clone());
        let answers = inspect.clone();
        let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
            let resp = respond(&answers, &req);
            async move { Ok::<_, Infallible>(resp) }
        });
        tokio::spawn(async move {
            let timeouts = crate::listener::Timeouts::default();
            let _ = serve_http(tcp, svc, &never, &timeouts, &inspect.proxy.metrics).await;
        });
    })
    .await;
}

fn respond(i: &Inspect, req: &Request<Incoming>) -> Response<Body> {
    let snap = i.proxy.state.load();
    match req.uri().path() {
        "/" => text(StatusCode::OK, INDEX),
        "/server_info" => json_response(&json!({
            "version": concat!("meshgate ", env!("CARGO_PKG_VERSION")),
            "workload": i.workload,
            "identity": i.identity.id().to_string(),
            "state": if i.proxy.drain.is_draining() { "DRAINING" } else { "LIVE" },
            "uptimeSeconds": i.started.elapsed().as_secs(),
            "config": i.config.load().as_str(),
        })),
        "/config_dump" => json_response(&json!({
            "config": i.config.load().as_str(),
            "view": snap.full_view(),
            "certificate": certificate(&i.identity),
        })),
        "/listeners" => json_response(&listeners(&snap.view)),
        "/clusters" => {
            let clusters: Vec<_> = snap
                .clusters
                .iter()
                .flatten()
                .map(|c| c.cluster.status())
                .collect();
            json_response(&json!(clusters))
        }
        "/certs" => json_response(&certificate(&i.identity)),
        "/logging" => logging(i, req),
        "/stats" => text(
            StatusCode::OK,
            stats(&i.proxy.metrics.encode(), req.uri().query()),
        ),
        "/stats/prometheus" | "/metrics" => local_response(
            StatusCode::OK,
            meshgate_telemetry::metrics::CONTENT_TYPE,
            i.proxy.metrics.encode(),
        ),
        _ => text(StatusCode::NOT_FOUND, "not found; see /\n"),
    }
}

/// `GET /logging`: the filter; `POST /logging?level=F`: sets it (as
/// Envoy's admin port, and `istioctl proxy-config log --level`).
fn logging(i: &Inspect, req: &Request<Incoming>) -> Response<Body> {
    let Some(set) = &i.log_filter else {
        return text(StatusCode::NOT_FOUND, "no log filter here\n");
    };
    let level = req.uri().query().and_then(|q| {
        q.split('&')
            .find_map(|kv| kv.strip_prefix("level="))
            .map(|v| {
                v.replace("%2C", ",")
                    .replace("%3D", "=")
                    .replace("%3d", "=")
            })
    });
    let new = match (req.method(), &level) {
        (&http::Method::POST, Some(l)) => Some(l.as_str()),
        (&http::Method::POST, None) => {
            return text(StatusCode::BAD_REQUEST, "give ?level=LEVEL or a filter\n");
        }
        _ => None,
    };
    match set(new) {
        Ok(current) => text(StatusCode::OK, format!("{current}\n")),
        Err(e) => text(StatusCode::BAD_REQUEST, format!("{e}\n")),
    }
}

/// The workload certificate as `istioctl proxy-config secret` shows one.
fn certificate(identity: &WorkloadIdentity) -> Value {
    let secs = |t: SystemTime| t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    match identity.info() {
        Some(info) => json!({
            "identity": identity.id().to_string(),
            "uriSans": info.uri_sans,
            "serialNumber": info.serial,
            "notBefore": secs(info.not_before),
            "notAfter": secs(info.not_after),
            "expiresInSeconds": info
                .not_after
                .duration_since(SystemTime::now())
                .map_or(0, |d| d.as_secs()),
            "renewalError": identity.renewal_error().map(|e| e.to_string()),
        }),
        None => json!({ "identity": identity.id().to_string(), "certificate": null }),
    }
}

/// The metrics as Envoy's `/stats` lists them: one sample per line,
/// `name{labels}: value`, sorted; `filter=TEXT` keeps the lines with TEXT.
fn stats(prometheus: &str, query: Option<&str>) -> String {
    let filter = query
        .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("filter=")))
        .unwrap_or("");
    let mut lines: Vec<String> = prometheus
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.rsplit_once(' '))
        .map(|(name, value)| format!("{name}: {value}"))
        .filter(|l| l.contains(filter))
        .collect();
    lines.sort();
    let mut out = lines.join("\n");
    out.push('\n');
    out
}

fn json_response(v: &Value) -> Response<Body> {
    let mut body = serde_json::to_string_pretty(v).unwrap_or_default();
    body.push('\n');
    local_response(StatusCode::OK, "application/json", body)
}

/// Every listener the proxy serves: the mesh's ports (redirected to it or
/// a Gateway's servers), then those its Sidecar has it bind itself
/// (captureMode NONE, unix sockets), with where they are bound.
fn listeners(view: &ProxyView) -> Value {
    let sidecar = view.sidecar.as_deref().unwrap_or_default();
    let bound = view.bound_listeners.iter().map(|b| {
        json!({
            "port": b.port,
            "bind": b.bind,
            "protocol": b.protocol,
            "direction": if b.inbound { "inbound" } else { "outbound" },
            "origin": format!("Sidecar {sidecar} {}", if b.inbound { "ingress" } else { "egress" }),
        })
    });
    let mesh = view.listeners.iter().map(|l| json!(l));
    Value::Array(mesh.chain(bound).collect())
}
