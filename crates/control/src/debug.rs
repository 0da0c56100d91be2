//! The control plane's monitoring port: readiness, what it would push, and
//! what each proxy has, as istiod's `/ready`, `/debug/configz`,
//! `/debug/config_dump?proxyID=` and `/debug/syncz`. `/debug/*` answers
//! only connections from loopback.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::push::Proxies;
use crate::run::State;

/// Serves until the process ends; each connection on its own task.
pub async fn serve(
    listener: TcpListener,
    state: watch::Receiver<Arc<State>>,
    proxies: Arc<Proxies>,
) {
    loop {
        let Ok((stream, peer)) = listener.accept().await else {
            // Out of descriptors or similar: let the next accept retry.
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            continue;
        };
        let (state, proxies) = (state.clone(), proxies.clone());
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let state = state.borrow().clone();
                let proxies = proxies.clone();
                // The config and every proxy's state are for operators at
                // the pod (`kubectl port-forward` arrives on loopback), not
                // for everyone who can reach the readiness probe.
                let local = peer.ip().is_loopback();
                async move { Ok::<_, Infallible>(answer(&req, &state, &proxies, local)) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

fn answer(
    req: &Request<Incoming>,
    state: &State,
    proxies: &Proxies,
    local: bool,
) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    if path.starts_with("/debug/") && !local {
        return text(
            StatusCode::FORBIDDEN,
            "debug endpoints answer on loopback only (kubectl port-forward)\n".into(),
        );
    }
    match path {
        "/ready" => match &state.snapshot {
            Some(_) => text(StatusCode::OK, "ready\n".into()),
            None => text(
                StatusCode::SERVICE_UNAVAILABLE,
                "not synced with the API server\n".into(),
            ),
        },
        "/debug/configz" => {
            let body = json!({
                "version": state.snapshot.as_ref().map(|s| s.version),
                "config": state.snapshot.as_ref().map(|s| s.config.as_ref()),
                "warnings": state.snapshot.as_ref().map(|s| s.warnings.iter().map(ToString::to_string).collect::<Vec<_>>()),
                "rejected": state.rejected.iter().map(ToString::to_string).collect::<Vec<_>>(),
            });
            json(&body)
        }
        // What one proxy is sent (istiod's config_dump?proxyID=).
        "/debug/config_dump" => {
            let proxy = req.uri().query().and_then(|q| {
                q.split('&')
                    .find_map(|kv| kv.strip_prefix("proxyID="))
                    .map(|v| v.replace("%2F", "/").replace("%2f", "/"))
            });
            match (proxy, &state.snapshot) {
                (None, _) => text(
                    StatusCode::BAD_REQUEST,
                    "name the proxy: ?proxyID=NAMESPACE/POD\n".into(),
                ),
                (Some(_), None) => text(StatusCode::SERVICE_UNAVAILABLE, "no config yet\n".into()),
                (Some(p), Some(s)) => {
                    let mut resp = text(StatusCode::OK, s.yaml_for(&p));
                    resp.headers_mut().insert(
                        http::header::CONTENT_TYPE,
                        http::HeaderValue::from_static("application/yaml"),
                    );
                    resp
                }
            }
        }
        // Which version each proxy was sent and applied, as istiod's.
        "/debug/syncz" => json(&json!({
            "version": state.snapshot.as_ref().map(|s| s.version),
            "proxies": proxies.all(),
        })),
        _ => text(StatusCode::NOT_FOUND, "not found\n".into()),
    }
}

fn json(body: &serde_json::Value) -> Response<Full<Bytes>> {
    let mut resp = text(StatusCode::OK, format!("{body:#}\n"));
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    resp
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp
}
