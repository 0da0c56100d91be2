//! What a listener knows about a connection before and after reading from
//! it: addresses, the original destination (sidecars), and once this proxy
//! has terminated TLS, the SNI and the peer's verified identity.

use std::net::SocketAddr;
use std::sync::Arc;

use meshgate_identity::SpiffeId;
use meshgate_telemetry::metrics::Lv;

/// A peer's verified SPIFFE identity, with the forms the request path
/// reads prepared once per connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub id: SpiffeId,
    /// `spiffe://td/ns/x/sa/y`: metric labels and access logs.
    pub uri: Lv,
    /// `td/ns/x/sa/y`: how AuthorizationPolicy writes principals.
    pub principal: Box<str>,
    /// `x/y`: how AuthorizationPolicy writes service accounts.
    pub service_account: Box<str>,
    /// The peer's namespace as a label, when it is of our trust domain.
    pub namespace: Option<Lv>,
}

impl Peer {
    /// `trust_domain` is this proxy's own: a peer of another trust domain
    /// has no namespace here.
    pub fn new(id: SpiffeId, trust_domain: &str) -> Peer {
        let uri = id.to_string();
        Peer {
            principal: Box::from(uri.trim_start_matches("spiffe://")),
            uri: Lv::from(uri.as_str()),
            service_account: format!("{}/{}", id.namespace(), id.service_account()).into(),
            namespace: (id.trust_domain() == trust_domain).then(|| Lv::from(id.namespace())),
            id,
        }
    }
}

/// TLS this proxy terminated on a connection.
#[derive(Debug, Clone, Default)]
pub struct Terminated {
    pub sni: Option<Arc<str>>,
    /// The client certificate's SPIFFE identity (mutual TLS).
    pub peer: Option<Arc<Peer>>,
    /// Gateways: the `x-forwarded-client-cert` that describes the client's
    /// certificate (Envoy's SANITIZE_SET, as Istio configures gateways).
    pub client_cert: Option<http::HeaderValue>,
}

/// One downstream connection.
#[derive(Debug, Clone)]
pub struct Conn {
    pub remote: SocketAddr,
    pub local: SocketAddr,
    /// The port routes match on: a Gateway server's port, or for a sidecar
    /// the port the application was connecting to.
    pub port: u16,
    /// Sidecars: where the application was connecting (SO_ORIGINAL_DST).
    pub original_dst: Option<SocketAddr>,
    /// Sidecars: the host a CONNECT request named, when the tunnel's
    /// destination is known by name only.
    pub connect_host: Option<Arc<str>>,
    /// Sidecars: an explicit-proxy client, whose requests name their port
    /// in the URI.
    pub explicit: bool,
    /// Sidecars: captured on its way in to the workload (15006), not out.
    pub inbound: bool,
    /// Sidecars: made to a listener the Sidecar has the proxy bind
    /// (captureMode NONE): its port is the port, and there is no original
    /// destination to fall back on.
    pub bound: bool,
    pub tls: Option<Terminated>,
}

impl Conn {
    /// A connection as it was accepted, before anything is read.
    pub fn accepted(remote: SocketAddr, local: SocketAddr, port: u16) -> Conn {
        Conn {
            remote,
            local,
            port,
            original_dst: None,
            connect_host: None,
            explicit: false,
            inbound: false,
            bound: false,
            tls: None,
        }
    }

    pub fn peer(&self) -> Option<&Peer> {
        self.tls.as_ref().and_then(|t| t.peer.as_deref())
    }

    pub fn sni(&self) -> Option<&str> {
        self.tls.as_ref().and_then(|t| t.sni.as_deref())
    }

    /// The downstream's local address as Envoy logs it: where the
    /// application was connecting, for captured traffic.
    pub fn downstream_local(&self) -> SocketAddr {
        self.original_dst.unwrap_or(self.local)
    }
}
