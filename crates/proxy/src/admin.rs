//! Istio's agent ports: `/healthz/ready` (15021, and 15020) and
//! `/stats/prometheus` (15090, and 15020 as the merged endpoint). Readiness
//! is a set of pending tasks, each held by a drop guard, and the workload
//! certificate: an expired one makes the proxy unready, saying why.

use std::collections::BTreeSet;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use meshgate_identity::WorkloadIdentity;
use meshgate_telemetry::Metrics;
use tokio::net::TcpListener;

use crate::body::{Body, local_response, text};
use crate::drain::Drain;
use crate::listener::{accept_loop, serve_http};

/// Not ready while any task is pending, or the certificate has expired.
#[derive(Debug, Clone, Default)]
pub struct Readiness(
    Arc<Mutex<BTreeSet<String>>>,
    Arc<Mutex<Option<Arc<WorkloadIdentity>>>>,
);

/// Holds readiness back until dropped.
#[derive(Debug)]
pub struct BlockReady {
    readiness: Readiness,
    name: String,
}

impl Readiness {
    pub fn register(&self, name: &str) -> BlockReady {
        if let Ok(mut p) = self.0.lock() {
            p.insert(name.to_owned());
        }
        BlockReady {
            readiness: self.clone(),
            name: name.to_owned(),
        }
    }

    /// Readiness follows this certificate from now on.
    pub fn watch_certificate(&self, identity: Arc<WorkloadIdentity>) {
        if let Ok(mut i) = self.1.lock() {
            *i = Some(identity);
        }
    }

    /// `Ok` when ready, else the pending tasks (and an expired certificate).
    pub fn check(&self) -> Result<(), Vec<String>> {
        let mut pending = self
            .0
            .lock()
            .map(|p| p.iter().cloned().collect::<Vec<_>>())
            .unwrap_or_default();
        if let Some(id) = self.identity().filter(|id| id.expired()) {
            let why = id
                .renewal_error()
                .map_or_else(String::new, |e| format!(": renewal failing: {e}"));
            pending.push(format!("certificate expired{why}"));
        }
        if pending.is_empty() {
            Ok(())
        } else {
            Err(pending)
        }
    }

    /// `/healthz/ready`: the status and the text that says why.
    pub fn report(&self) -> (StatusCode, String) {
        match self.check() {
            Ok(()) => match self.identity().and_then(|id| id.renewal_error()) {
                // Still valid: ready, but say what will go wrong.
                Some(e) => (
                    StatusCode::OK,
                    format!("ready; certificate renewal failing: {e}\n"),
                ),
                None => (StatusCode::OK, "ready\n".to_owned()),
            },
            Err(pending) => (
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready, pending: {}\n", pending.join(", ")),
            ),
        }
    }

    fn identity(&self) -> Option<Arc<WorkloadIdentity>> {
        self.1.lock().ok().and_then(|i| i.clone())
    }
}

impl BlockReady {
    /// The task is done.
    pub fn done(self) {
        if let Ok(p) = self.readiness.0.lock()
            && p.len() == 1
            && p.contains(&self.name)
        {
            tracing::info!("proxy ready");
        }
    }
}

impl Drop for BlockReady {
    fn drop(&mut self) {
        if let Ok(mut p) = self.readiness.0.lock() {
            p.remove(&self.name);
        }
    }
}

/// What an admin port serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdminRole {
    /// 15020: metrics and readiness.
    Agent,
    /// 15090: metrics.
    Prometheus,
    /// 15021: readiness.
    Health,
    /// 15000: the inspection port (`inspect.rs`), loopback only.
    Inspect,
}

fn respond(
    role: AdminRole,
    metrics: &Metrics,
    ready: &Readiness,
    req: &Request<Incoming>,
) -> Response<Body> {
    let path = req.uri().path();
    let serves_metrics = matches!(role, AdminRole::Agent | AdminRole::Prometheus);
    let serves_health = matches!(role, AdminRole::Agent | AdminRole::Health);
    match path {
        "/stats/prometheus" | "/metrics" if serves_metrics => local_response(
            StatusCode::OK,
            meshgate_telemetry::metrics::CONTENT_TYPE,
            metrics.encode(),
        ),
        "/healthz/ready" if serves_health => {
            let (status, body) = ready.report();
            text(status, body)
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

/// Serves one admin port until the task is dropped. Admin ports keep
/// answering while the proxy drains (readiness says so).
pub async fn serve(
    listener: TcpListener,
    role: AdminRole,
    metrics: Arc<Metrics>,
    ready: Readiness,
) {
    let never = Drain::default();
    accept_loop(listener, |tcp, _| {
        let (metrics, ready, never) = (metrics.clone(), ready.clone(), never.clone());
        let answers = metrics.clone();
        let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
            let resp = respond(role, &answers, &ready, &req);
            async move { Ok::<_, Infallible>(resp) }
        });
        tokio::spawn(async move {
            let timeouts = crate::listener::Timeouts::default();
            let _ = serve_http(tcp, svc, &never, &timeouts, &metrics).await;
        });
    })
    .await;
}

/// Binds an admin port.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_waits_for_every_guard() {
        let r = Readiness::default();
        let a = r.register("listeners");
        let b = r.register("certificate");
        assert_eq!(
            r.check(),
            Err(vec!["certificate".to_owned(), "listeners".to_owned()])
        );
        drop(b);
        assert_eq!(r.check(), Err(vec!["listeners".to_owned()]));
        drop(a);
        assert_eq!(r.check(), Ok(()));
    }
}
