//! What every listener of one proxy shares: the config snapshot, drain
//! state, telemetry, and the mesh TLS it terminates.

use std::sync::Arc;

use arc_swap::ArcSwap;
use meshgate_identity::WorkloadIdentity;
use meshgate_identity::tls::mesh_server_config;
use meshgate_telemetry::{AccessLog, Metrics};

use crate::drain::Drain;
use crate::snapshot::{Role, Snapshot};

#[derive(Debug, thiserror::Error)]
#[error("mesh TLS setup: {0}")]
pub struct MeshTlsError(String);

/// One proxy (a sidecar or a gateway).
#[derive(Debug)]
pub struct Proxy {
    pub state: ArcSwap<Snapshot>,
    /// Graceful shutdown: listeners and connections watch it.
    pub drain: Drain,
    pub metrics: Arc<Metrics>,
    pub access_log: Arc<AccessLog>,
    pub role: Role,
    /// Mutual TLS from mesh peers (built once: the certificate inside is
    /// read per handshake from the live identity, so rotation needs no
    /// rebuild).
    pub mesh_tls: Arc<rustls::ServerConfig>,
    /// Peers of this trust domain have a namespace.
    pub trust_domain: Arc<str>,
    /// This proxy's own SPIFFE ID (`By=` of x-forwarded-client-cert).
    pub identity: Arc<str>,
    pub timeouts: crate::listener::Timeouts,
    /// Downstream connections open at once, at most (`--max-connections`;
    /// none: no limit, as Istio's default).
    pub max_connections: Option<usize>,
}

impl Proxy {
    pub fn new(
        snapshot: Snapshot,
        identity: &Arc<WorkloadIdentity>,
        metrics: Arc<Metrics>,
        access_log: Arc<AccessLog>,
    ) -> Result<Proxy, MeshTlsError> {
        let mesh = mesh_server_config(identity, &[b"h2", b"http/1.1"])
            .map_err(|e| MeshTlsError(e.to_string()))?;
        Ok(Proxy {
            role: snapshot.role,
            state: ArcSwap::from_pointee(snapshot),
            drain: Drain::default(),
            metrics,
            access_log,
            mesh_tls: mesh,
            trust_domain: Arc::from(identity.id().trust_domain()),
            identity: Arc::from(identity.id().to_string().as_str()),
            timeouts: crate::listener::Timeouts::default(),
            max_connections: None,
        })
    }

    /// Reports `meshgate_egress_requests_total` and appends the downstream
    /// address to `x-forwarded-for` (Envoy's `use_remote_address`, which
    /// Istio sets on gateways only).
    pub fn is_gateway(&self) -> bool {
        self.role == Role::Gateway
    }
}
