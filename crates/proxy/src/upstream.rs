//! Upstream clusters: where a routed request goes. Each cluster owns its
//! endpoint source (DNS, static addresses), load balancer, outlier
//! detection, circuit breaker, TLS settings and a pool of keep-alive
//! connections, all built once when config is applied.

pub mod dns;
mod multiplex;
mod outlier;
mod pool;
pub mod tls;
mod tunnel;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http::Request;
use meshgate_config::model::networking::SimpleLb;
use meshgate_telemetry::ResponseFlags;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use self::dns::Resolver;
pub use self::outlier::Outlier;
use self::outlier::{Health, Report};
pub use self::pool::{Answer, Lease};
use self::pool::{Pool, PoolError, PoolSettings};
use self::tls::UpstreamTls;
use crate::body::Body;
use crate::route::Unanswered;

/// Where a cluster's endpoints come from.
#[derive(Debug, Clone)]
pub enum Endpoints {
    /// Resolve these names by DNS (all addresses, or the first with
    /// `first_only` for DNS_ROUND_ROBIN), at their ports.
    Dns {
        names: Vec<DnsName>,
        first_only: bool,
    },
    /// Fixed addresses (STATIC, or a local endpoints map).
    Static(Vec<SocketAddr>),
    /// Wherever the request's URI points (the PassthroughCluster: the
    /// original destination, or the host an explicit-proxy client named).
    FromUri,
    /// The request's host resolved by DNS, at this port (DYNAMIC_DNS).
    RequestHost { port: u16 },
    /// The workload's own port the request's URI names, dialled from
    /// 127.0.0.6 (an `inbound|PORT||` cluster).
    Inbound,
    /// A unix socket by name (`/path`, `@abstract`): a Sidecar ingress
    /// `defaultEndpoint`.
    Unix(Arc<str>),
}

/// A name a DNS cluster resolves, at a port, with what DNS last answered
/// for it.
#[derive(Debug)]
pub struct DnsName {
    pub name: Arc<str>,
    pub port: u16,
    /// The addresses DNS last gave: used while a lookup runs and when one
    /// fails, as Envoy keeps a STRICT_DNS cluster's hosts; dropped when DNS
    /// answers that the name has none.
    kept: arc_swap::ArcSwapOption<Vec<IpAddr>>,
    /// A lookup runs in the background (one at a time per name).
    refreshing: std::sync::atomic::AtomicBool,
}

impl DnsName {
    pub fn new(name: Arc<str>, port: u16) -> DnsName {
        DnsName {
            name,
            port,
            kept: arc_swap::ArcSwapOption::empty(),
            refreshing: std::sync::atomic::AtomicBool::new(false),
        }
    }
}

impl Clone for DnsName {
    fn clone(&self) -> DnsName {
        let copy = DnsName::new(self.name.clone(), self.port);
        copy.kept.store(self.kept.load_full());
        copy
    }
}

/// What a unix socket endpoint is tracked as (it has no address).
const UNIX_ENDPOINT: SocketAddr = SocketAddr::new(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), 0);

/// Why an upstream request failed, with Envoy's response flag.
#[derive(Debug, Clone, thiserror::Error)]
pub enum UpstreamError {
    /// No endpoint: DNS failed or every endpoint is ejected (503, UH).
    #[error("no healthy upstream: {0}")]
    NoHealthyUpstream(String),
    /// Could not connect or handshake (503, UF).
    #[error(
        "upstream connect error or disconnect/reset before headers. reset reason: connection failure, transport failure reason: {0}"
    )]
    ConnectFailure(String),
    /// The connection broke after it was made (503, UC).
    #[error(
        "upstream connect error or disconnect/reset before headers. reset reason: connection termination: {0}"
    )]
    Reset(String),
    /// The upstream reset the stream before answering (HTTP/2 RST_STREAM;
    /// 503, UR).
    #[error(
        "upstream connect error or disconnect/reset before headers. reset reason: remote reset"
    )]
    RemoteReset,
    /// The upstream refused the stream, not acting on the request (HTTP/2
    /// REFUSED_STREAM; 503, UR).
    #[error(
        "upstream connect error or disconnect/reset before headers. reset reason: remote refused stream reset"
    )]
    RefusedStream,
    /// Circuit breaker open (503, UO).
    #[error("upstream connect error or disconnect/reset before headers. reset reason: overflow")]
    Overflow,
    /// One attempt took longer than the route's `perTryTimeout` (504, UT).
    #[error("upstream request timeout")]
    PerTryTimeout,
    /// The route's `timeout` passed (504, UT).
    #[error("upstream request timeout")]
    Timeout,
    /// No response within the stream idle timeout, where the route sets no
    /// timeout (504, SI).
    #[error("stream timeout")]
    StreamIdle,
    /// The downstream stopped sending its request body for the stream idle
    /// timeout (408, SI: the client's fault).
    #[error("stream timeout")]
    RequestIdle,
}

impl UpstreamError {
    pub fn flag(&self) -> ResponseFlags {
        match self {
            UpstreamError::NoHealthyUpstream(_) => ResponseFlags::NO_HEALTHY_UPSTREAM,
            UpstreamError::ConnectFailure(_) => ResponseFlags::UPSTREAM_CONNECTION_FAILURE,
            UpstreamError::Reset(_) => ResponseFlags::UPSTREAM_CONNECTION_TERMINATION,
            UpstreamError::RemoteReset | UpstreamError::RefusedStream => {
                ResponseFlags::UPSTREAM_REMOTE_RESET
            }
            UpstreamError::Overflow => ResponseFlags::UPSTREAM_OVERFLOW,
            UpstreamError::PerTryTimeout | UpstreamError::Timeout => {
                ResponseFlags::UPSTREAM_REQUEST_TIMEOUT
            }
            UpstreamError::StreamIdle | UpstreamError::RequestIdle => {
                ResponseFlags::STREAM_IDLE_TIMEOUT
            }
        }
    }

    /// Who is at fault: the upstream, except for the circuit breaker,
    /// which is this proxy's own limit (DestinationRule connectionPool).
    pub fn fault(&self) -> crate::error::Fault {
        match self {
            UpstreamError::Overflow => crate::error::Fault::Config,
            UpstreamError::RequestIdle => crate::error::Fault::Downstream,
            _ => crate::error::Fault::Upstream,
        }
    }

    /// How the attempt ended, for the route's retry policy.
    pub fn unanswered(&self) -> Unanswered {
        match self {
            UpstreamError::ConnectFailure(_) => Unanswered::ConnectFailure,
            UpstreamError::Reset(_) | UpstreamError::RemoteReset | UpstreamError::PerTryTimeout => {
                Unanswered::Reset
            }
            UpstreamError::RefusedStream => Unanswered::RefusedStream,
            UpstreamError::NoHealthyUpstream(_)
            | UpstreamError::Overflow
            | UpstreamError::Timeout
            | UpstreamError::StreamIdle
            | UpstreamError::RequestIdle => Unanswered::Final,
        }
    }

    /// The status the downstream gets.
    pub fn status(&self) -> http::StatusCode {
        match self {
            UpstreamError::PerTryTimeout | UpstreamError::Timeout | UpstreamError::StreamIdle => {
                http::StatusCode::GATEWAY_TIMEOUT
            }
            UpstreamError::RequestIdle => http::StatusCode::REQUEST_TIMEOUT,
            _ => http::StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// Envoy's `%RESPONSE_CODE_DETAILS%`.
    pub fn details(&self) -> &'static str {
        match self {
            UpstreamError::NoHealthyUpstream(_) => "no_healthy_upstream",
            UpstreamError::ConnectFailure(_) => {
                "upstream_reset_before_response_started{connection_failure}"
            }
            UpstreamError::Reset(_) => {
                "upstream_reset_before_response_started{connection_termination}"
            }
            UpstreamError::RemoteReset => "upstream_reset_before_response_started{remote_reset}",
            UpstreamError::RefusedStream => {
                "upstream_reset_before_response_started{remote_refused_stream_reset}"
            }
            UpstreamError::Overflow => "upstream_reset_before_response_started{overflow}",
            UpstreamError::PerTryTimeout => "upstream_per_try_timeout",
            UpstreamError::Timeout => "response_timeout",
            UpstreamError::StreamIdle | UpstreamError::RequestIdle => "stream_idle_timeout",
        }
    }

    /// The body of the local reply, as Envoy words it.
    pub fn body(&self) -> String {
        match self {
            UpstreamError::NoHealthyUpstream(_) => "no healthy upstream".to_owned(),
            e => e.to_string(),
        }
    }

    /// Envoy's `%UPSTREAM_TRANSPORT_FAILURE_REASON%`.
    pub fn transport_failure(&self) -> Option<&str> {
        match self {
            UpstreamError::ConnectFailure(m) => Some(m),
            _ => None,
        }
    }
}

/// What a `consistentHash` load balancer hashes (Envoy's hash policy).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HashOn {
    Header(http::header::HeaderName),
    /// A cookie; with a `ttl`, a request without it gets one made (and the
    /// response sets it), as Envoy does.
    Cookie {
        name: String,
        ttl: Option<Duration>,
        path: String,
    },
    SourceIp,
    QueryParameter(String),
}

/// A hash cookie made for a request that had none (a request extension):
/// the request hashes on it, and the response sets it.
#[derive(Debug, Clone)]
pub struct GeneratedCookie(pub String);

/// The downstream's address, carried to the load balancer as a request
/// extension (never sent).
#[derive(Debug, Clone, Copy)]
pub struct DownstreamAddr(pub SocketAddr);

/// Why a connection to the cluster could not be made.
#[derive(Debug, thiserror::Error)]
enum ConnectError {
    #[error("{0}")]
    NoEndpoint(String),
    #[error("{0}")]
    Failed(String),
}

#[derive(Debug, Default)]
struct EndpointState {
    health: Health,
    active: usize,
}

/// Everything the connector needs; shared with the cluster.
#[derive(Debug)]
struct ClusterCore {
    name: Arc<str>,
    endpoints: Endpoints,
    resolver: Resolver,
    tls: Option<UpstreamTls>,
    /// An HTTP/2 cluster's TLS (ALPN http/1.1) for its HTTP/1.1 upgrades
    /// (see `ClusterSettings::h1_upgrades`).
    tls_h1: Option<Arc<rustls::ClientConfig>>,
    connect_timeout: Duration,
    lb: SimpleLb,
    /// `consistentHash`: the same key goes to the same endpoint. What few
    /// clusters set is boxed: a gateway keeps thousands of clusters.
    hash: Option<Box<HashOn>>,
    outlier: Option<Box<Outlier>>,
    keepalive: Option<Box<Keepalive>>,
    locality: Option<Box<Locality>>,
    rr: AtomicU32,
    state: Mutex<HashMap<SocketAddr, EndpointState>>,
    /// A DNS cluster's endpoints now: its names' addresses as DNS last
    /// answered (none before the first answer, or when DNS says there are
    /// none). Requests choose among them without waiting on DNS.
    resolved: arc_swap::ArcSwapOption<Vec<SocketAddr>>,
    /// When (ms after `born`) a request next looks the names up again, in
    /// the background.
    refresh_due: AtomicU64,
    born: Instant,
}

/// How often a DNS cluster in use looks its names up again (answers the
/// resolver has cached for their TTL come at once, so Envoy's
/// `respect_dns_ttl`, within a second).
const DNS_REFRESH_MS: u64 = 1000;

/// What a retry's pick passes over while something else is eligible
/// (Envoy's retry predicates, as Istio sets them).
#[derive(Debug, Clone, Copy, Default)]
pub struct Avoid<'a> {
    /// Endpoints earlier attempts went to (previous hosts:
    /// `retryIgnorePreviousHosts`).
    pub hosts: &'a [SocketAddr],
    /// Endpoints whose priorities (localities) are passed over (previous
    /// priorities: `retryRemoteLocalities`).
    pub priorities_of: &'a [SocketAddr],
}

/// How a request's endpoint is found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Choice {
    /// Chosen for the request, before the pool: it takes a connection to
    /// this endpoint.
    At(SocketAddr),
    /// Where the request's URI points (original destination, each
    /// request's host, the workload, a unix socket): the connection
    /// resolves and picks.
    ByConnection,
    /// A DNS cluster that has no answer yet: resolve, then choose.
    Unresolved,
}

/// Locality load balancing: endpoints' priorities for failover (names'
/// pass to their addresses) and `distribute` weights.
#[derive(Debug)]
struct Locality {
    by_name: HashMap<String, u8>,
    by_addr: Mutex<HashMap<SocketAddr, u8>>,
    weight_by_name: HashMap<String, u32>,
    weights: Mutex<HashMap<SocketAddr, u32>>,
}

impl Locality {
    fn of(p: Priorities) -> Option<Box<Locality>> {
        let none = p.by_addr.is_empty()
            && p.by_name.is_empty()
            && p.weight_by_addr.is_empty()
            && p.weight_by_name.is_empty();
        (!none).then(|| {
            Box::new(Locality {
                by_name: p.by_name,
                by_addr: Mutex::new(p.by_addr),
                weight_by_name: p.weight_by_name,
                weights: Mutex::new(p.weight_by_addr),
            })
        })
    }

    /// A name's addresses take its priority and weight.
    fn learn(&self, name: &str, addrs: &[SocketAddr]) {
        if let (Some(p), Ok(mut by_addr)) = (self.by_name.get(name), self.by_addr.lock()) {
            by_addr.extend(addrs.iter().map(|a| (*a, *p)));
        }
        if let (Some(w), Ok(mut weights)) = (self.weight_by_name.get(name), self.weights.lock()) {
            weights.extend(addrs.iter().map(|a| (*a, *w)));
        }
    }
}

/// Why a lookup gave no address.
#[derive(Debug)]
enum DnsFailure {
    /// DNS answered: the name has no address.
    NoAddress(String),
    /// No answer: the server failed, was silent or unreachable.
    Failed(String),
}

impl DnsFailure {
    fn message(&self) -> &str {
        match self {
            DnsFailure::NoAddress(m) | DnsFailure::Failed(m) => m,
        }
    }

    fn into_message(self) -> String {
        match self {
            DnsFailure::NoAddress(m) | DnsFailure::Failed(m) => m,
        }
    }
}

impl ClusterCore {
    /// `host`'s addresses, within the connect timeout: resolving is part
    /// of connecting, and a silent DNS server must not hold a request
    /// longer than a silent endpoint would.
    async fn lookup(&self, host: &str) -> Result<Vec<IpAddr>, String> {
        self.lookup_answer(host)
            .await
            .map_err(DnsFailure::into_message)
    }

    /// `lookup`, telling a name DNS says has no address from a lookup
    /// that failed.
    async fn lookup_answer(&self, host: &str) -> Result<Vec<IpAddr>, DnsFailure> {
        let answer = tokio::time::timeout(self.connect_timeout, self.resolver.lookup(host)).await;
        let failure = match answer {
            Ok(Ok(ips)) => return Ok(ips),
            Ok(Err(e @ dns::DnsError::NoAddresses { .. })) => DnsFailure::NoAddress(e.to_string()),
            Ok(Err(e)) => DnsFailure::Failed(e.to_string()),
            Err(_) => DnsFailure::Failed(format!("DNS lookup of {host} timed out")),
        };
        tracing::warn!(cluster = %self.name, host = %host, error = %failure.message(), "DNS resolution failed");
        Err(failure)
    }

    /// A DNS cluster's name's addresses. The first time, a lookup within
    /// the connect timeout. After, a connection never waits on DNS (Envoy
    /// resolves a STRICT_DNS cluster in the background): an answer the
    /// resolver has cached comes at once, else the kept addresses are used
    /// while a lookup runs in the background, and they stay when DNS
    /// fails. Only DNS saying the name has no address drops them.
    async fn resolve(self: &Arc<Self>, index: usize, dns: &DnsName) -> Result<Vec<IpAddr>, String> {
        let Some(kept) = dns.kept.load_full() else {
            let ips = self.lookup(&dns.name).await?;
            dns.kept.store(Some(Arc::new(ips.clone())));
            return Ok(ips);
        };
        let lookup = self.resolver.lookup(&dns.name);
        let mut lookup = std::pin::pin!(lookup);
        // Polled once: a cached answer is ready at once.
        let answer = std::future::poll_fn(|cx| Poll::Ready(lookup.as_mut().poll(cx))).await;
        match answer {
            Poll::Ready(Ok(ips)) => {
                if *kept != ips {
                    dns.kept.store(Some(Arc::new(ips.clone())));
                }
                Ok(ips)
            }
            Poll::Ready(Err(e @ dns::DnsError::NoAddresses { .. })) => {
                dns.kept.store(None);
                Err(e.to_string())
            }
            Poll::Ready(Err(_)) | Poll::Pending => {
                self.refresh(index);
                Ok(kept.as_ref().clone())
            }
        }
    }

    /// Looks the `index`th DNS name up in the background, unless a lookup
    /// of it already runs, and keeps (or drops) what DNS answers.
    fn refresh(self: &Arc<Self>, index: usize) {
        let Endpoints::Dns { names, .. } = &self.endpoints else {
            return;
        };
        if names[index].refreshing.swap(true, Ordering::AcqRel) {
            return;
        }
        let core = self.clone();
        tokio::spawn(async move {
            let Endpoints::Dns { names, .. } = &core.endpoints else {
                return;
            };
            let dns = &names[index];
            match core.lookup_answer(&dns.name).await {
                Ok(ips) => {
                    if dns.kept.load().as_deref() != Some(&ips) {
                        dns.kept.store(Some(Arc::new(ips)));
                        core.rebuild_resolved();
                    }
                }
                Err(DnsFailure::NoAddress(_)) => {
                    dns.kept.store(None);
                    core.rebuild_resolved();
                }
                // Kept, as Envoy keeps its hosts (warned in `lookup_answer`).
                Err(DnsFailure::Failed(_)) => {}
            }
            dns.refreshing.store(false, Ordering::Release);
        });
    }

    async fn addresses(
        self: &Arc<Self>,
        uri: Option<&http::Uri>,
    ) -> Result<Vec<SocketAddr>, String> {
        match &self.endpoints {
            Endpoints::FromUri | Endpoints::Inbound => {
                let uri = uri.ok_or("no destination")?;
                let host = uri.host().ok_or("no host in the request")?;
                let port = uri.port_u16().unwrap_or(80);
                let ips = self.lookup(host).await?;
                Ok(ips
                    .into_iter()
                    .map(|ip| SocketAddr::new(ip, port))
                    .collect())
            }
            Endpoints::RequestHost { port } => {
                let uri = uri.ok_or("no request host")?;
                let host = uri.host().ok_or("no host in the request")?;
                let ips = self.lookup(host).await?;
                Ok(ips
                    .into_iter()
                    .map(|ip| SocketAddr::new(ip, *port))
                    .collect())
            }
            Endpoints::Unix(_) => Ok(vec![UNIX_ENDPOINT]),
            Endpoints::Static(addrs) if addrs.is_empty() => Err("cluster has no endpoints".into()),
            Endpoints::Static(addrs) => Ok(addrs.clone()),
            Endpoints::Dns { names, .. } => {
                // Each name's answer is kept (`resolve`); the cluster's
                // endpoints are made of what is kept.
                let mut last_err = String::new();
                for (index, dns) in names.iter().enumerate() {
                    if let Err(e) = self.resolve(index, dns).await {
                        last_err = e;
                    }
                }
                match self.rebuild_resolved() {
                    Some(out) => Ok(out.as_ref().clone()),
                    None => Err(last_err),
                }
            }
        }
    }

    /// The DNS names' kept addresses, as one list for requests to choose
    /// from (after a lookup); none when no name has an address.
    fn rebuild_resolved(&self) -> Option<Arc<Vec<SocketAddr>>> {
        let Endpoints::Dns { names, first_only } = &self.endpoints else {
            return None;
        };
        let mut out = Vec::new();
        for dns in names {
            let Some(ips) = dns.kept.load_full() else {
                continue;
            };
            let take = if *first_only { 1 } else { ips.len() };
            let addrs: Vec<SocketAddr> = ips
                .iter()
                .take(take)
                .map(|ip| SocketAddr::new(*ip, dns.port))
                .collect();
            if let Some(locality) = &self.locality {
                locality.learn(&dns.name, &addrs);
            }
            out.extend(addrs);
        }
        if let Some(now) = self.resolved.load_full().filter(|now| **now == out) {
            return Some(now);
        }
        let out = (!out.is_empty()).then(|| Arc::new(out));
        self.resolved.store(out.clone());
        out
    }

    /// A DNS cluster's names are looked up again in the background when
    /// their time has come (a request's load on a warm cluster: one clock
    /// read).
    fn refresh_when_due(self: &Arc<Self>) {
        let Endpoints::Dns { names, .. } = &self.endpoints else {
            return;
        };
        let now = u64::try_from(self.born.elapsed().as_millis()).unwrap_or(u64::MAX);
        let due = self.refresh_due.load(Ordering::Relaxed);
        if now < due
            || self
                .refresh_due
                .compare_exchange(
                    due,
                    now + DNS_REFRESH_MS,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_err()
        {
            return;
        }
        for index in 0..names.len() {
            self.refresh(index);
        }
    }

    /// The endpoint for a request, chosen before it takes a connection, as
    /// Envoy's load balancer picks a host per request: by the request's
    /// hash key if the cluster hashes, else by the load-balancing policy;
    /// what `avoid` names only when nothing else is left.
    fn choose(
        self: &Arc<Self>,
        key: Option<u64>,
        avoid: Avoid<'_>,
    ) -> Result<Choice, ConnectError> {
        let resolved;
        let hosts: &[SocketAddr] = match &self.endpoints {
            Endpoints::Static(addrs) if addrs.is_empty() => {
                return Err(ConnectError::NoEndpoint("cluster has no endpoints".into()));
            }
            Endpoints::Static(addrs) => addrs,
            Endpoints::Dns { .. } => {
                resolved = self.resolved.load();
                let Some(hosts) = resolved.as_deref() else {
                    return Ok(Choice::Unresolved);
                };
                self.refresh_when_due();
                hosts
            }
            _ => return Ok(Choice::ByConnection),
        };
        let picked = match key {
            Some(key) => self.pick_hashed(hosts, key, avoid),
            None => self.pick(hosts, avoid),
        };
        picked
            .map(Choice::At)
            .ok_or_else(|| ConnectError::NoEndpoint("no endpoint".into()))
    }

    /// Whether requests are counted at their endpoints: where there are
    /// several to choose from (least request compares them; one
    /// endpoint's count is the cluster's).
    fn counts_requests(&self) -> bool {
        match &self.endpoints {
            Endpoints::Static(addrs) => addrs.len() > 1,
            Endpoints::Dns { .. } => self.resolved.load().as_ref().is_some_and(|h| h.len() > 1),
            _ => false,
        }
    }

    #[cfg(test)]
    fn is_ejected(&self, addr: SocketAddr) -> bool {
        let now = Instant::now();
        self.state
            .lock()
            .is_ok_and(|state| state.get(&addr).is_some_and(|s| s.health.is_ejected(now)))
    }

    /// A new upstream connection's socket options: no Nagle delay (the
    /// proxy writes whole messages), the cluster's keepalive.
    fn tune(&self, tcp: &TcpStream) {
        let _ = tcp.set_nodelay(true);
        if let Some(k) = &self.keepalive {
            k.apply(tcp);
        }
    }

    /// How many endpoints outlier detection's limits count: the cluster's
    /// now, or those it has seen where each request names its own.
    fn endpoint_count(&self, state: &HashMap<SocketAddr, EndpointState>) -> usize {
        match &self.endpoints {
            Endpoints::Static(addrs) => addrs.len(),
            Endpoints::Dns { .. } => self.resolved.load().as_ref().map_or(0, |r| r.len()),
            _ => state.len(),
        }
        .max(1)
    }

    /// `distribute`: a random endpoint by its weight, when weights are set
    /// and any endpoint left has one.
    fn pick_weighted(&self, pool: &[SocketAddr]) -> Option<SocketAddr> {
        let weights = self.locality.as_ref()?.weights.lock().ok()?;
        if weights.is_empty() {
            return None;
        }
        let weight = |a: &SocketAddr| u64::from(weights.get(a).copied().unwrap_or(0));
        let total: u64 = pool.iter().map(weight).sum();
        if total == 0 {
            return None;
        }
        let mut at = fastrand::u64(..total);
        pool.iter().copied().find(|a| {
            let w = weight(a);
            if at < w {
                true
            } else {
                at -= w;
                false
            }
        })
    }

    /// Locality failover: of the endpoints left, those of the best
    /// priority (all of them without locality load balancing).
    fn first_priority(&self, pool: Vec<SocketAddr>) -> Vec<SocketAddr> {
        let Some(Ok(by_addr)) = self.locality.as_ref().map(|l| l.by_addr.lock()) else {
            return pool;
        };
        if by_addr.is_empty() {
            return pool;
        }
        let priority = |a: &SocketAddr| by_addr.get(a).copied().unwrap_or(0);
        let best = pool.iter().map(priority).min().unwrap_or(0);
        pool.into_iter().filter(|a| priority(a) == best).collect()
    }

    /// The endpoints a pick is made among: those outlier detection has
    /// not ejected (`Outlier::eligible`), outside the priorities `avoid` passes over while another
    /// priority has one, of the best priority left, without the hosts
    /// `avoid` names unless no other is left (Envoy's previous-hosts
    /// predicate re-picks within the priority and at last takes a host
    /// tried before).
    fn eligible(
        &self,
        state: &HashMap<SocketAddr, EndpointState>,
        addrs: &[SocketAddr],
        avoid: Avoid<'_>,
    ) -> Vec<SocketAddr> {
        let pool = match &self.outlier {
            Some(od) => {
                let now = Instant::now();
                od.eligible(addrs, |a| {
                    state.get(a).is_some_and(|s| s.health.is_ejected(now))
                })
            }
            None => addrs.to_vec(),
        };
        let pool = self.first_priority(self.other_priorities(pool, avoid));
        if avoid.hosts.is_empty() || pool.iter().all(|a| avoid.hosts.contains(a)) {
            return pool;
        }
        pool.into_iter()
            .filter(|a| !avoid.hosts.contains(a))
            .collect()
    }

    /// Of `pool`, those whose priority no endpoint in
    /// `avoid.priorities_of` has, if any (else all).
    fn other_priorities(&self, pool: Vec<SocketAddr>, avoid: Avoid<'_>) -> Vec<SocketAddr> {
        if avoid.priorities_of.is_empty() {
            return pool;
        }
        let Some(Ok(by_addr)) = self.locality.as_ref().map(|l| l.by_addr.lock()) else {
            return pool;
        };
        let priority = |a: &SocketAddr| by_addr.get(a).copied().unwrap_or(0);
        let tried: Vec<u8> = avoid.priorities_of.iter().map(priority).collect();
        let rest: Vec<SocketAddr> = pool
            .iter()
            .copied()
            .filter(|a| !tried.contains(&priority(a)))
            .collect();
        if rest.is_empty() { pool } else { rest }
    }

    /// The endpoint for a hash key: of those eligible, the one ranking
    /// highest for the key (rendezvous hashing: a key moves only when its
    /// endpoint goes away; a retry takes the next one).
    fn pick_hashed(&self, addrs: &[SocketAddr], key: u64, avoid: Avoid<'_>) -> Option<SocketAddr> {
        use std::hash::{Hash, Hasher};
        if let [only] = addrs
            && self.outlier.is_none()
        {
            return Some(*only);
        }
        let state = self.state.lock().ok()?;
        let pool = self.eligible(&state, addrs, avoid);
        pool.into_iter().max_by_key(|a| {
            let mut h = std::collections::hash_map::DefaultHasher::new();
            (key, a).hash(&mut h);
            h.finish()
        })
    }

    /// Picks one of the eligible endpoints by the load-balancing policy.
    /// One endpoint without outlier detection is taken without a lock.
    fn pick(&self, addrs: &[SocketAddr], avoid: Avoid<'_>) -> Option<SocketAddr> {
        if let [only] = addrs
            && self.outlier.is_none()
        {
            return Some(*only);
        }
        let state = self.state.lock().ok()?;
        let pool = self.eligible(&state, addrs, avoid);
        if let Some(picked) = self.pick_weighted(&pool) {
            return Some(picked);
        }
        match (self.lb, pool.len()) {
            (_, 0) => None,
            (_, 1) => Some(pool[0]),
            (SimpleLb::RoundRobin, n) => {
                Some(pool[self.rr.fetch_add(1, Ordering::Relaxed) as usize % n])
            }
            (SimpleLb::Random, n) => Some(pool[fastrand::usize(..n)]),
            // LEAST_REQUEST (Istio's default): the better of two random choices.
            (_, n) => {
                let (a, b) = (pool[fastrand::usize(..n)], pool[fastrand::usize(..n)]);
                let load = |x: &SocketAddr| state.get(x).map_or(0, |s| s.active);
                Some(if load(&b) < load(&a) { b } else { a })
            }
        }
    }

    /// Counts what an attempt at `addr` came to (`Outlier::count`), and
    /// ejects the endpoint when a count reaches its threshold and the
    /// cluster may lose one more; whether it is ejected now.
    fn observe(&self, addr: SocketAddr, report: Report) -> bool {
        let Some(od) = &self.outlier else {
            return false;
        };
        let Ok(mut state) = self.state.lock() else {
            return false;
        };
        let now = Instant::now();
        let health = &mut state.entry(addr).or_default().health;
        if !od.count(health, report, now) || health.is_ejected(now) {
            return health.is_ejected(now);
        }
        let ejected = state.values().filter(|s| s.health.is_ejected(now)).count();
        if !od.may_eject(ejected, self.endpoint_count(&state)) {
            return false;
        }
        let Some(s) = state.get_mut(&addr) else {
            return false;
        };
        od.eject(&mut s.health, now, self.born);
        tracing::warn!(
            cluster = %self.name,
            endpoint = %addr,
            after = %report,
            times = s.health.times_ejected,
            "endpoint ejected by outlier detection"
        );
        true
    }

    /// An attempt at `addr` that got no response, as Envoy's router
    /// reports it to outlier detection: a reset or a closed connection, a
    /// timeout. A connect failure is counted where it happens; the circuit
    /// breaker, a downstream that stopped sending and no endpoint at all
    /// are not the endpoint's doing.
    fn observe_unanswered(&self, addr: SocketAddr, error: &UpstreamError) {
        if self.outlier.is_none() {
            return;
        }
        let report = match error {
            UpstreamError::Reset(_) | UpstreamError::RemoteReset | UpstreamError::RefusedStream => {
                Report::Reset
            }
            UpstreamError::PerTryTimeout | UpstreamError::Timeout => Report::TimedOut,
            UpstreamError::NoHealthyUpstream(_)
            | UpstreamError::ConnectFailure(_)
            | UpstreamError::Overflow
            | UpstreamError::StreamIdle
            | UpstreamError::RequestIdle => return,
        };
        self.observe(addr, report);
    }

    fn track(&self, addr: SocketAddr, delta: isize) {
        if let Ok(mut state) = self.state.lock() {
            let s = state.entry(addr).or_default();
            s.active = s.active.saturating_add_signed(delta);
        }
    }
}

/// A connection to one endpoint, plain or TLS.
pub enum UpstreamStream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
    /// A Sidecar ingress `defaultEndpoint` on a unix socket.
    Unix(tokio::net::UnixStream),
}

impl std::fmt::Debug for UpstreamStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            UpstreamStream::Plain(_) => "Plain",
            UpstreamStream::Tls(_) => "Tls",
            UpstreamStream::Unix(_) => "Unix",
        })
    }
}

/// A connection to one of a cluster's endpoints; it counts as the
/// endpoint's while it is open (least request load balancing).
#[derive(Debug)]
pub struct Conn {
    stream: UpstreamStream,
    addr: SocketAddr,
    core: Arc<ClusterCore>,
    /// A TCP proxy's connection counts as one of its endpoint's active
    /// requests while it lasts (an HTTP request counts itself).
    counted: bool,
}

impl Drop for Conn {
    fn drop(&mut self) {
        if self.counted {
            self.core.track(self.addr, -1);
        }
    }
}

impl Conn {
    /// The endpoint's address; a unix socket has none to report.
    fn endpoint(&self) -> Option<SocketAddr> {
        match self.stream {
            UpstreamStream::Unix(_) => None,
            _ => Some(self.addr),
        }
    }
}

macro_rules! delegate_io {
    ($self:ident, $s:ident => $e:expr) => {
        match &mut $self.get_mut().stream {
            UpstreamStream::Plain($s) => {
                let $s = Pin::new($s);
                $e
            }
            UpstreamStream::Tls(boxed) => {
                let $s = Pin::new(&mut **boxed);
                $e
            }
            UpstreamStream::Unix($s) => {
                let $s = Pin::new($s);
                $e
            }
        }
    };
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        delegate_io!(self, s => s.poll_read(cx, buf))
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        delegate_io!(self, s => s.poll_write(cx, buf))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        delegate_io!(self, s => s.poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        delegate_io!(self, s => s.poll_shutdown(cx))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        delegate_io!(self, s => s.poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        match &self.stream {
            UpstreamStream::Plain(s) => s.is_write_vectored(),
            UpstreamStream::Tls(s) => s.is_write_vectored(),
            UpstreamStream::Unix(s) => s.is_write_vectored(),
        }
    }
}

impl ClusterCore {
    /// A new connection for a request to `uri`, to the endpoint chosen for
    /// it (else resolves and load-balances): connects and handshakes
    /// within the connect timeout. `h1`: for HTTP/1.1 (an HTTP/2 cluster's
    /// upgrades offer ALPN http/1.1).
    async fn connect(
        self: &Arc<Self>,
        uri: &http::Uri,
        h1: bool,
        chosen: Option<SocketAddr>,
    ) -> Result<Conn, ConnectError> {
        if let Endpoints::Unix(path) = &self.endpoints {
            return self.connect_unix(path).await;
        }
        let addr = match chosen {
            Some(addr) => addr,
            None => {
                let addrs = self
                    .addresses(Some(uri))
                    .await
                    .map_err(ConnectError::NoEndpoint)?;
                self.pick(&addrs, Avoid::default())
                    .ok_or_else(|| ConnectError::NoEndpoint("no endpoint".into()))?
            }
        };
        // Envoy's connect timeout covers the TLS handshake too.
        let deadline = tokio::time::Instant::now() + self.connect_timeout;
        let dial = async {
            match self.endpoints {
                Endpoints::Inbound => dial_inbound(addr).await,
                _ => TcpStream::connect(addr).await,
            }
        };
        let tcp = match tokio::time::timeout_at(deadline, dial).await {
            Ok(Ok(tcp)) => tcp,
            Ok(Err(e)) => {
                self.observe(addr, Report::ConnectFailed);
                return Err(ConnectError::Failed(format!("delayed connect error: {e}")));
            }
            Err(_) => {
                self.observe(addr, Report::ConnectFailed);
                return Err(ConnectError::Failed("connect timeout".into()));
            }
        };
        self.tune(&tcp);
        let stream = match &self.tls {
            None => UpstreamStream::Plain(tcp),
            Some(tls) => {
                let config = match &self.tls_h1 {
                    Some(h1_config) if h1 => h1_config,
                    _ => &tls.config,
                };
                match handshake(config, request_sni(tls, uri), tcp, deadline).await {
                    Ok(stream) => stream,
                    Err(reason) => {
                        self.observe(addr, Report::ConnectFailed);
                        return Err(ConnectError::Failed(format!("TLS_error: {reason}")));
                    }
                }
            }
        };
        Ok(Conn {
            stream,
            addr,
            core: self.clone(),
            counted: false,
        })
    }

    async fn connect_unix(self: &Arc<Self>, path: &str) -> Result<Conn, ConnectError> {
        let stream = match tokio::time::timeout(self.connect_timeout, crate::unix::connect(path))
            .await
        {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Err(ConnectError::Failed(format!("delayed connect error: {e}"))),
            Err(_) => return Err(ConnectError::Failed("connect timeout".into())),
        };
        Ok(Conn {
            stream: UpstreamStream::Unix(stream),
            addr: UNIX_ENDPOINT,
            core: self.clone(),
            counted: false,
        })
    }

    /// Outlier detection sees the response's head; false when it ejected
    /// the endpoint (its connections are then let go).
    fn keeps_endpoint(
        &self,
        addr: SocketAddr,
        status: http::StatusCode,
        headers: &http::HeaderMap,
    ) -> bool {
        if self.outlier.is_none() {
            return true;
        }
        // One lock: the count and the state after it.
        !self.observe(addr, Report::Status(outlier::status_of(status, headers)))
    }
}

/// Connects to the workload's own `addr` from 127.0.0.6 (`::6`), as
/// Envoy's inbound passthrough: istio-init's rules let that source out of
/// the proxy's uid, where any other would be captured again.
async fn dial_inbound(addr: SocketAddr) -> std::io::Result<TcpStream> {
    let (socket, source) = if addr.is_ipv4() {
        (
            tokio::net::TcpSocket::new_v4()?,
            IpAddr::from([127, 0, 0, 6]),
        )
    } else {
        (
            tokio::net::TcpSocket::new_v6()?,
            IpAddr::from([0, 0, 0, 0, 0, 0, 0, 6]),
        )
    };
    socket.bind(SocketAddr::new(source, 0))?;
    socket.connect(addr).await
}

/// The SNI for one connection: the cluster's, or with `auto_sni` (a
/// wildcard DYNAMIC_DNS host) the request's host, as Envoy's auto SNI.
fn request_sni(tls: &UpstreamTls, uri: &http::Uri) -> rustls::pki_types::ServerName<'static> {
    uri.host()
        .filter(|_| tls.auto_sni)
        .and_then(|h| rustls::pki_types::ServerName::try_from(h.to_owned()).ok())
        .unwrap_or_else(|| tls.sni.clone())
}

/// The TLS handshake with an upstream, by `deadline`. (HTTP/2 is the
/// cluster's setting; its ALPN offers only what the cluster speaks.)
async fn handshake(
    config: &Arc<rustls::ClientConfig>,
    sni: rustls::pki_types::ServerName<'static>,
    tcp: TcpStream,
    deadline: tokio::time::Instant,
) -> Result<UpstreamStream, String> {
    let connector = tokio_rustls::TlsConnector::from(config.clone());
    match tokio::time::timeout_at(deadline, connector.connect(sni, tcp)).await {
        Ok(Ok(s)) => Ok(UpstreamStream::Tls(Box::new(s))),
        Ok(Err(e)) => Err(meshgate_identity::tls::handshake_error_reason(&e)),
        Err(_) => Err("handshake timeout".to_owned()),
    }
}

/// Settings of one cluster, from its DestinationRule (or defaults).
#[derive(Debug, Clone)]
pub struct ClusterSettings {
    pub name: Arc<str>,
    pub endpoints: Endpoints,
    pub tls: Option<UpstreamTls>,
    pub h2: bool,
    /// An HTTP/2 cluster that sends HTTP/1.1 upgrades (WebSocket) on
    /// HTTP/1.1 connections, made with this TLS config (ALPN http/1.1):
    /// meshgate peers speak HTTP/2 by default, and an upgrade has no
    /// HTTP/2 form between them.
    pub h1_upgrades: Option<Arc<rustls::ClientConfig>>,
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_requests_per_connection: Option<u32>,
    /// `connectionPool.tcp.maxConnectionDuration`.
    pub max_connection_duration: Option<Duration>,
    /// `connectionPool.tcp.tcpKeepalive`.
    pub keepalive: Option<Keepalive>,
    /// `retryBudget`, else `connectionPool.http.maxRetries`.
    pub retry_limit: Option<RetryLimit>,
    /// `tunnel`: TCP goes through a CONNECT tunnel to this `host:port`.
    pub tunnel: Option<Arc<str>>,
    /// Circuit breaker: requests in flight beyond this get 503 UO.
    pub max_in_flight: usize,
    pub lb: SimpleLb,
    pub hash: Option<HashOn>,
    pub outlier: Option<Outlier>,
    /// Locality failover: endpoints' priorities (lower first), by address
    /// (STATIC) or by name (DNS, given to each address it resolves to).
    pub priorities: Priorities,
}

/// Envoy's retry circuit breaker: how many retries a cluster may have in
/// flight at once (beyond it a request ends with what it has, UO).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RetryLimit {
    /// `maxRetries`.
    Max(usize),
    /// `retryBudget`: `percent` of the requests in flight, and at least
    /// `min` (`minRetryConcurrency`).
    Budget { percent: f64, min: usize },
}

/// A retry counted in flight until dropped (none where the cluster has no
/// limit).
#[derive(Debug, Default)]
pub struct RetryPermit<'a>(Option<&'a AtomicUsize>);

impl Drop for RetryPermit<'_> {
    fn drop(&mut self) {
        if let Some(count) = self.0 {
            count.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// `tcpKeepalive`: SO_KEEPALIVE on each connection the cluster makes,
/// with the probes' idle time, interval and count where set (the kernel's
/// defaults otherwise), as Envoy's `upstream_connection_options`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Keepalive {
    pub time: Option<Duration>,
    pub interval: Option<Duration>,
    pub probes: Option<u32>,
}

impl Keepalive {
    fn apply(&self, tcp: &TcpStream) {
        // The kernel counts in seconds, from 1.
        let secs = |d: Duration| d.max(Duration::from_secs(1));
        let mut k = socket2::TcpKeepalive::new();
        if let Some(t) = self.time {
            k = k.with_time(secs(t));
        }
        if let Some(i) = self.interval {
            k = k.with_interval(secs(i));
        }
        if let Some(n) = self.probes {
            k = k.with_retries(n);
        }
        if let Err(e) = socket2::SockRef::from(tcp).set_tcp_keepalive(&k) {
            tracing::warn!(error = %e, "could not set TCP keepalive on an upstream connection");
        }
    }
}

/// Endpoints' locality priorities; empty when locality load balancing is off.
#[derive(Debug, Clone, Default)]
pub struct Priorities {
    pub by_addr: HashMap<SocketAddr, u8>,
    pub by_name: HashMap<String, u8>,
    /// `distribute`: endpoints' weights (by address, or by name).
    pub weight_by_addr: HashMap<SocketAddr, u32>,
    pub weight_by_name: HashMap<String, u32>,
}

/// A cluster ready to take requests.
#[derive(Debug)]
pub struct Cluster {
    core: Arc<ClusterCore>,
    h2: bool,
    /// The pool, made on the cluster's first request: a gateway with
    /// thousands of hosts keeps no pool for those nobody calls.
    pool: std::sync::OnceLock<Pool>,
    /// HTTP/1.1 connections for an HTTP/2 cluster's upgrades
    /// (`h1_upgrades`).
    upgrade_pool: Option<Box<std::sync::OnceLock<Pool>>>,
    idle_timeout: Duration,
    in_flight: AtomicUsize,
    max_in_flight: usize,
    /// `maxRequestsPerConnection`: a connection carries at most this
    /// many requests (1: none is kept).
    max_requests_per_connection: Option<u32>,
    /// `maxConnectionDuration`: a connection takes new requests this long.
    max_connection_duration: Option<Duration>,
    retry_limit: Option<RetryLimit>,
    /// Retries in flight, where there is a limit.
    retries: AtomicUsize,
    tunnel: Option<Arc<str>>,
    /// Its connections do not depend on a request's authority (see
    /// `pool_authority`).
    one_pool_key: bool,
    /// HTTP/2 whose connections do not depend on a request's authority:
    /// one connection carries all its requests, as Envoy's pool.
    shared_h2: bool,
}

/// Keeps the in-flight count right however a request ends.
struct InFlight<'a>(&'a AtomicUsize);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A request counted as active at its endpoint (for least request) until
/// its response's head comes or it fails.
struct Active<'a>(&'a ClusterCore, &'a SocketAddr);

impl<'a> Active<'a> {
    fn new(core: &'a ClusterCore, addr: &'a SocketAddr) -> Self {
        core.track(*addr, 1);
        Active(core, addr)
    }
}

impl Drop for Active<'_> {
    fn drop(&mut self) {
        self.0.track(*self.1, -1);
    }
}

/// What a cluster is doing now, for the inspection port's `/clusters`.
#[derive(Debug, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ClusterStatus {
    pub name: String,
    /// Where endpoints come from: `dns host:port`, `static ip:port`, or
    /// `original destination`.
    pub endpoints: Vec<String>,
    /// Its endpoints now, and any other that carried requests, with
    /// their outlier state.
    pub hosts: Vec<HostStatus>,
    pub requests_in_flight: usize,
}

#[derive(Debug, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HostStatus {
    pub address: String,
    pub active_requests: usize,
    pub consecutive_5xx: u32,
    pub consecutive_gateway_errors: u32,
    pub consecutive_local_origin_failures: u32,
    pub ejected: bool,
    pub times_ejected: u32,
}

impl Cluster {
    /// The cluster's configured endpoints and its hosts' state now.
    pub fn status(&self) -> ClusterStatus {
        let c = &self.core;
        let endpoints = match &c.endpoints {
            Endpoints::Dns { names, .. } => names
                .iter()
                .map(|n| format!("dns {}:{}", n.name, n.port))
                .collect(),
            Endpoints::Static(addrs) => addrs.iter().map(|a| format!("static {a}")).collect(),
            Endpoints::FromUri => vec!["original destination".to_owned()],
            Endpoints::Inbound => vec!["the workload, from 127.0.0.6".to_owned()],
            Endpoints::Unix(name) => vec![format!("unix://{name}")],
            Endpoints::RequestHost { port } => vec![format!("each request's host, port {port}")],
        };
        let now = Instant::now();
        let in_flight = self.in_flight.load(Ordering::Relaxed);
        // The endpoints requests choose from now, and any other that
        // carried requests.
        let resolved = c.resolved.load_full();
        let current: &[SocketAddr] = match &c.endpoints {
            Endpoints::Static(addrs) => addrs,
            _ => resolved.as_deref().map_or(&[], Vec::as_slice),
        };
        let state = c
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let addrs: std::collections::BTreeSet<SocketAddr> =
            current.iter().chain(state.keys()).copied().collect();
        let hosts = addrs
            .into_iter()
            .map(|addr| {
                let s = state.get(&addr);
                HostStatus {
                    address: addr.to_string(),
                    // One endpoint: the cluster's count is its own.
                    active_requests: match current {
                        [only] if *only == addr => in_flight,
                        _ => s.map_or(0, |s| s.active),
                    },
                    consecutive_5xx: s.map_or(0, |s| s.health.consecutive_5xx),
                    consecutive_gateway_errors: s.map_or(0, |s| s.health.consecutive_gateway),
                    consecutive_local_origin_failures: s
                        .map_or(0, |s| s.health.consecutive_local_origin),
                    ejected: s.is_some_and(|s| s.health.is_ejected(now)),
                    times_ejected: s.map_or(0, |s| s.health.times_ejected),
                }
            })
            .collect();
        drop(state);
        ClusterStatus {
            name: c.name.to_string(),
            endpoints,
            hosts,
            requests_in_flight: in_flight,
        }
    }

    pub fn new(s: ClusterSettings, resolver: Resolver) -> Cluster {
        let h2 = s.h2;
        // The cluster chooses each request's endpoint, and the connection
        // does not depend on the request's authority (which, where the
        // endpoints are the request's, names where to go, and otherwise may
        // be the SNI).
        let fixed_connections = matches!(
            s.endpoints,
            Endpoints::Dns { .. } | Endpoints::Static(_) | Endpoints::Unix(_)
        ) && s.tls.as_ref().is_none_or(|t| !t.auto_sni);
        let upgrade_pool = (h2 && s.h1_upgrades.is_some()).then(Box::default);
        let core = Arc::new(ClusterCore {
            name: s.name,
            endpoints: s.endpoints,
            resolver,
            tls: s.tls,
            tls_h1: s.h1_upgrades.filter(|_| h2),
            connect_timeout: s.connect_timeout,
            lb: s.lb,
            hash: s.hash.map(Box::new),
            outlier: s.outlier.map(Box::new),
            keepalive: s.keepalive.map(Box::new),
            locality: Locality::of(s.priorities),
            rr: AtomicU32::new(0),
            state: Mutex::new(HashMap::new()),
            resolved: arc_swap::ArcSwapOption::empty(),
            refresh_due: AtomicU64::new(DNS_REFRESH_MS),
            born: Instant::now(),
        });
        Cluster {
            core,
            h2,
            pool: std::sync::OnceLock::new(),
            upgrade_pool,
            idle_timeout: s.idle_timeout,
            in_flight: AtomicUsize::new(0),
            max_in_flight: s.max_in_flight,
            max_requests_per_connection: s.max_requests_per_connection.filter(|n| *n > 0),
            max_connection_duration: s.max_connection_duration,
            retry_limit: s.retry_limit,
            retries: AtomicUsize::new(0),
            tunnel: s.tunnel,
            one_pool_key: !h2 && fixed_connections,
            shared_h2: h2 && fixed_connections,
        }
    }

    /// The authority to put in an upstream request's URI when the cluster
    /// connects the same way whatever the request's authority is (fixed
    /// endpoints, one SNI, HTTP/1.1, whose request line carries only the
    /// path): connections are then the cluster's, as in Envoy: one idle
    /// list for all its requests, under a short key, instead of one per
    /// host name a client writes. `None`: the request's own.
    pub fn pool_authority(&self) -> Option<http::uri::Authority> {
        self.one_pool_key
            .then(|| http::uri::Authority::from_static("cluster"))
    }

    /// The pool for a request (made on first use): an HTTP/2 cluster's
    /// upgrades (HTTP/1.1 requests) have their own.
    fn pool(&self, version: http::Version) -> &Pool {
        let (pool, h2) = match &self.upgrade_pool {
            Some(upgrades) if version == http::Version::HTTP_11 => (&**upgrades, false),
            _ => (&self.pool, self.h2),
        };
        pool.get_or_init(|| {
            Pool::new(PoolSettings {
                h2,
                one_key: h2 && self.shared_h2,
                keep: self.max_requests_per_connection != Some(1),
                idle_timeout: self.idle_timeout,
                max_requests: self.max_requests_per_connection,
                max_age: self.max_connection_duration,
            })
        })
    }

    pub fn name(&self) -> &Arc<str> {
        &self.core.name
    }

    /// `consistentHash.httpCookie` with a `ttl`, and a request without the
    /// cookie: a new value, and the `Set-Cookie` the response carries.
    pub fn cookie_to_make(&self, headers: &http::HeaderMap) -> Option<(String, http::HeaderValue)> {
        let Some(HashOn::Cookie {
            name,
            ttl: Some(ttl),
            path,
        }) = self.core.hash.as_deref()
        else {
            return None;
        };
        let present = headers
            .get_all(http::header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .any(|c| {
                c.trim()
                    .strip_prefix(name.as_str())
                    .is_some_and(|r| r.starts_with('='))
            });
        if present {
            return None;
        }
        let value = format!("{:016x}", fastrand::u64(..));
        let path = if path.is_empty() {
            String::new()
        } else {
            format!("; Path={path}")
        };
        let set = format!(
            "{name}=\"{value}\"; Max-Age={}{path}; HttpOnly",
            ttl.as_secs()
        );
        Some((value, http::HeaderValue::from_str(&set).ok()?))
    }

    /// HTTP/2 to an upstream that may refuse a stream without acting on it
    /// (REFUSED_STREAM): a retry of one needs a copy of the request.
    /// Between meshgate peers none is refused (the client keeps to the
    /// server's stream limit; a draining gateway lets open streams end).
    pub fn may_refuse_streams(&self) -> bool {
        self.h2 && self.upgrade_pool.is_none()
    }

    /// Its load balancer hashes requests (`consistentHash`).
    pub fn hashes(&self) -> bool {
        self.core.hash.is_some()
    }

    /// Its load balancer hashes the downstream's address (`useSourceIp`).
    pub fn hashes_source_ip(&self) -> bool {
        self.core.hash.as_deref() == Some(&HashOn::SourceIp)
    }

    /// HTTP/2 toward the upstream (HTTP2/GRPC ports, `h2UpgradePolicy`,
    /// meshgate peers).
    pub fn is_h2(&self) -> bool {
        self.h2
    }

    /// HTTP/2, but an HTTP/1.1 upgrade goes on HTTP/1.1 (`h1_upgrades`).
    pub fn upgrades_on_h1(&self) -> bool {
        self.upgrade_pool.is_some()
    }

    pub fn is_tls(&self) -> bool {
        self.core.tls.is_some()
    }

    /// Opens a plain TCP connection to an endpoint (TLS passthrough: the
    /// client's own TLS goes through untouched).
    pub async fn connect_tcp(&self) -> Result<(TcpStream, SocketAddr), UpstreamError> {
        let (tcp, addr) = self.dial().await?;
        self.core.observe(addr, Report::Connected);
        Ok((tcp, addr))
    }

    /// A TCP connection to one of the cluster's endpoints, by its load
    /// balancer.
    async fn dial(&self) -> Result<(TcpStream, SocketAddr), UpstreamError> {
        let core = &self.core;
        let addrs = core
            .addresses(None)
            .await
            .map_err(UpstreamError::NoHealthyUpstream)?;
        let addr = core
            .pick(&addrs, Avoid::default())
            .ok_or_else(|| UpstreamError::NoHealthyUpstream("no endpoint".into()))?;
        self.connect_tcp_to(addr).await
    }

    /// Opens a connection for a `tcp` route to one of the cluster's
    /// endpoints, with the cluster's TLS when it has any (ISTIO_MUTUAL to a
    /// mesh endpoint, origination per DestinationRule). Returns it with the
    /// endpoint and the local address.
    pub async fn connect_stream(
        &self,
    ) -> Result<(Conn, SocketAddr, Option<SocketAddr>), UpstreamError> {
        let core = &self.core;
        let deadline = tokio::time::Instant::now() + core.connect_timeout;
        let (tcp, addr) = self.dial().await?;
        let local = tcp.local_addr().ok();
        core.track(addr, 1);
        let stream = match &core.tls {
            None => UpstreamStream::Plain(tcp),
            Some(tls) => match handshake(&tls.config, tls.sni.clone(), tcp, deadline).await {
                Ok(stream) => stream,
                Err(reason) => {
                    core.track(addr, -1);
                    core.observe(addr, Report::ConnectFailed);
                    return Err(UpstreamError::ConnectFailure(format!(
                        "TLS_error: {reason}"
                    )));
                }
            },
        };
        core.observe(addr, Report::Connected);
        let conn = Conn {
            stream,
            addr,
            core: core.clone(),
            counted: true,
        };
        Ok((conn, addr, local))
    }

    /// The first address of `host` by the cluster's resolver.
    pub async fn resolve(&self, host: &str) -> Option<IpAddr> {
        self.core
            .resolver
            .lookup(host)
            .await
            .ok()?
            .into_iter()
            .next()
    }

    /// Opens a plain TCP connection to the workload's own address for a
    /// connection captured on its way in (see `dial_inbound`).
    pub async fn connect_tcp_inbound(
        &self,
        addr: SocketAddr,
    ) -> Result<(TcpStream, SocketAddr), UpstreamError> {
        let fail = |e: std::io::Error| {
            UpstreamError::ConnectFailure(format!("delayed connect error: {e}"))
        };
        match tokio::time::timeout(self.core.connect_timeout, dial_inbound(addr)).await {
            Ok(Ok(tcp)) => {
                let _ = tcp.set_nodelay(true);
                Ok((tcp, addr))
            }
            Ok(Err(e)) => Err(fail(e)),
            Err(_) => Err(UpstreamError::ConnectFailure("connect timeout".into())),
        }
    }

    /// Opens a plain TCP connection to one address (the original
    /// destination, for PassthroughCluster).
    pub async fn connect_tcp_to(
        &self,
        addr: SocketAddr,
    ) -> Result<(TcpStream, SocketAddr), UpstreamError> {
        let core = &self.core;
        match tokio::time::timeout(core.connect_timeout, TcpStream::connect(addr)).await {
            Ok(Ok(tcp)) => {
                core.tune(&tcp);
                Ok((tcp, addr))
            }
            Ok(Err(e)) => {
                core.observe(addr, Report::ConnectFailed);
                Err(UpstreamError::ConnectFailure(format!(
                    "delayed connect error: {e}"
                )))
            }
            Err(_) => {
                core.observe(addr, Report::ConnectFailed);
                Err(UpstreamError::ConnectFailure("connect timeout".into()))
            }
        }
    }

    /// Where the request goes: an endpoint chosen now where the cluster
    /// chooses (static or DNS endpoints), else wherever its connection
    /// picks; not to what `avoid` names (a retry's: where earlier attempts
    /// went) while something else is eligible. A DNS
    /// cluster without an answer yet resolves first (boxed: once per
    /// cluster, and its state would make every request's future larger).
    pub async fn endpoint(
        &self,
        req: &Request<Body>,
        avoid: Avoid<'_>,
    ) -> Result<Option<SocketAddr>, UpstreamError> {
        let core = &self.core;
        let key = core.hash.as_deref().and_then(|on| hash_key(on, req));
        let mut choice = core.choose(key, avoid);
        if choice.as_ref().is_ok_and(|c| *c == Choice::Unresolved) {
            Box::pin(core.addresses(None))
                .await
                .map_err(UpstreamError::NoHealthyUpstream)?;
            choice = core.choose(key, avoid);
        }
        match choice {
            Ok(Choice::At(addr)) => Ok(Some(addr)),
            Ok(Choice::ByConnection | Choice::Unresolved) => Ok(None),
            Err(ConnectError::NoEndpoint(m) | ConnectError::Failed(m)) => {
                Err(UpstreamError::NoHealthyUpstream(m))
            }
        }
    }

    /// Sends one request (one attempt) to the endpoint `endpoint` chose
    /// for it (`None`: its connection picks). The URI's authority is the connection pool's key and
    /// HTTP/2's `:authority`; the Host header is set by the caller. The
    /// answer's body carries its connection back to the pool when it ends.
    /// A request no connection could be made for comes back with the
    /// error.
    ///
    /// An async block, not an async fn (as the pool's sends and the
    /// forwarding path's): an async fn's state holds its arguments twice,
    /// as passed and as moved into its body, and a request is 336 bytes
    /// in every level of every request's future, copied as each is made.
    #[expect(
        clippy::manual_async_fn,
        reason = "an async fn's state holds its arguments twice"
    )]
    pub fn send_to(
        &self,
        req: Request<Body>,
        endpoint: Option<SocketAddr>,
    ) -> impl Future<Output = Result<Answer, Failure>> + Send + '_ {
        async move {
            if self.in_flight.fetch_add(1, Ordering::Relaxed) >= self.max_in_flight {
                self.in_flight.fetch_sub(1, Ordering::Relaxed);
                return Err(UpstreamError::Overflow.into());
            }
            let _guard = InFlight(&self.in_flight);
            let endpoint = &endpoint;
            let _active = endpoint
                .as_ref()
                .filter(|_| self.core.counts_requests())
                .map(|addr| Active::new(&self.core, addr));
            let pool = self.pool(req.version());
            let sent = if pool.is_h2() {
                pool.send_h2(&self.core, req, endpoint).await
            } else {
                pool.send_h1(&self.core, req, endpoint).await
            };
            sent.map_err(|e| {
                let upstream = e.upstream().or(*endpoint);
                let mut failure = classify(e);
                if let Some(addr) = upstream {
                    self.core.observe_unanswered(addr, &failure.error);
                }
                failure.upstream = upstream;
                failure
            })
        }
    }

    /// Outlier detection hears that an attempt at `addr` timed out before
    /// its response (the per-try or the route timeout): a 504, as Envoy's
    /// router reports a local timeout.
    pub fn timed_out(&self, addr: SocketAddr) {
        self.core.observe_unanswered(addr, &UpstreamError::Timeout);
    }

    /// Through the tunnel the cluster's DestinationRule asks for, when it
    /// asks for one: `io` is a new connection to one of its endpoints (a
    /// forward proxy). Within the connect timeout.
    pub async fn open_tunnel<S>(&self, io: &mut S) -> Result<(), UpstreamError>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let Some(authority) = &self.tunnel else {
            return Ok(());
        };
        tokio::time::timeout(self.core.connect_timeout, tunnel::open(io, authority))
            .await
            .unwrap_or_else(|_| {
                Err(UpstreamError::ConnectFailure(
                    "tunnel: the proxy did not answer CONNECT in time".into(),
                ))
            })
    }

    /// One more retry in flight, if the cluster's limit allows it.
    pub fn retry_permit(&self) -> Option<RetryPermit<'_>> {
        let Some(limit) = self.retry_limit else {
            return Some(RetryPermit(None));
        };
        let allowed = match limit {
            RetryLimit::Max(n) => n,
            RetryLimit::Budget { percent, min } => {
                let active = self.in_flight.load(Ordering::Relaxed) as f64;
                ((active * percent / 100.0) as usize).max(min)
            }
        };
        if self.retries.fetch_add(1, Ordering::Relaxed) >= allowed {
            self.retries.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        Some(RetryPermit(Some(&self.retries)))
    }

    /// `endpoint`, then `send_to` it: a request no route retries.
    pub async fn send(&self, req: Request<Body>) -> Result<Answer, Failure> {
        let endpoint = self.endpoint(&req, Avoid::default()).await?;
        self.send_to(req, endpoint).await
    }
}

/// Why an attempt got no response, its request if it never left (a
/// connect failure: a retry sends it again instead of a copy), and the
/// endpoint it went to where one was chosen or connected to.
#[derive(Debug)]
pub struct Failure {
    pub error: UpstreamError,
    pub unsent: Option<Box<Request<Body>>>,
    pub upstream: Option<SocketAddr>,
}

impl From<UpstreamError> for Failure {
    fn from(error: UpstreamError) -> Self {
        Failure {
            error,
            unsent: None,
            upstream: None,
        }
    }
}

fn classify(e: PoolError) -> Failure {
    let e = match e {
        PoolError::Connect(ConnectError::NoEndpoint(m), unsent) => {
            let error = UpstreamError::NoHealthyUpstream(m);
            return Failure {
                error,
                unsent,
                upstream: None,
            };
        }
        PoolError::Connect(ConnectError::Failed(m), unsent) => {
            let error = UpstreamError::ConnectFailure(m);
            return Failure {
                error,
                unsent,
                upstream: None,
            };
        }
        PoolError::Send(e, _) => e,
        PoolError::Stream(multiplex::SendError::Body(crate::body::BodyError::Idle(_)), _) => {
            return UpstreamError::RequestIdle.into();
        }
        PoolError::Stream(multiplex::SendError::Stream(e), _) if e.is_reset() && e.is_remote() => {
            // Only a RST_STREAM says the upstream refused this stream; a
            // GOAWAY also ends streams it may have acted on.
            return if e.reason() == Some(h2::Reason::REFUSED_STREAM) {
                UpstreamError::RefusedStream
            } else {
                UpstreamError::RemoteReset
            }
            .into();
        }
        PoolError::Stream(e, _) => return UpstreamError::Reset(error_chain(&e)).into(),
    };
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(&e);
    while let Some(s) = source {
        if let Some(crate::body::BodyError::Idle(_)) = s.downcast_ref() {
            return UpstreamError::RequestIdle.into();
        }
        source = s.source();
    }
    UpstreamError::Reset(error_chain(&e)).into()
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// The hash of what `on` names in the request; `None` when it is absent.
fn hash_key(on: &HashOn, req: &Request<Body>) -> Option<u64> {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    match on {
        HashOn::Header(name) => req.headers().get(name)?.as_bytes().hash(&mut h),
        HashOn::SourceIp => req
            .extensions()
            .get::<DownstreamAddr>()?
            .0
            .ip()
            .hash(&mut h),
        HashOn::QueryParameter(name) => req
            .uri()
            .query()?
            .split('&')
            .find_map(|kv| kv.strip_prefix(name.as_str())?.strip_prefix('='))?
            .hash(&mut h),
        HashOn::Cookie { .. } if req.extensions().get::<GeneratedCookie>().is_some() => {
            req.extensions().get::<GeneratedCookie>()?.0.hash(&mut h)
        }
        HashOn::Cookie { name, .. } => req
            .headers()
            .get_all(http::header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .find_map(|c| c.trim().strip_prefix(name.as_str())?.strip_prefix('='))?
            .trim_matches('"')
            .hash(&mut h),
    }
    Some(h.finish())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{KeepAliveServer, keepalive_server};
    use meshgate_config::model::networking::OutlierDetection;

    fn core(lb: SimpleLb, outlier: Option<Outlier>) -> ClusterCore {
        ClusterCore {
            name: Arc::from("c"),
            endpoints: Endpoints::Static(addrs()),
            resolver: Resolver::new(Some("127.0.0.1:53".parse().unwrap())).unwrap(),
            tls: None,
            tls_h1: None,
            connect_timeout: Duration::from_secs(1),
            lb,
            hash: None,
            outlier: outlier.map(Box::new),
            keepalive: None,
            locality: None,
            rr: AtomicU32::new(0),
            state: Mutex::new(HashMap::new()),
            resolved: arc_swap::ArcSwapOption::empty(),
            refresh_due: AtomicU64::new(0),
            born: Instant::now(),
        }
    }

    #[test]
    fn a_hash_key_keeps_its_endpoint_until_it_goes_away() {
        let c = core(SimpleLb::RoundRobin, None);
        let all = addrs();
        let picks: Vec<SocketAddr> = (0..50u64)
            .map(|k| c.pick_hashed(&all, k, Avoid::default()).unwrap())
            .collect();
        for (k, p) in picks.iter().enumerate() {
            assert_eq!(
                c.pick_hashed(&all, k as u64, Avoid::default()),
                Some(*p),
                "stable"
            );
        }
        let spread: std::collections::HashSet<_> = picks.iter().collect();
        assert!(spread.len() > 1, "keys spread over endpoints");
        // One endpoint leaves: only its keys move.
        let gone = all[0];
        let rest: Vec<SocketAddr> = all[1..].to_vec();
        for (k, p) in picks.iter().enumerate() {
            let now = c.pick_hashed(&rest, k as u64, Avoid::default()).unwrap();
            if *p != gone {
                assert_eq!(now, *p, "key {k} stays");
            }
        }
    }

    /// A retry's `Avoid` of these hosts.
    fn hosts(tried: &[SocketAddr]) -> Avoid<'_> {
        Avoid {
            hosts: tried,
            priorities_of: &[],
        }
    }

    fn addrs() -> Vec<SocketAddr> {
        (1..=3)
            .map(|i| SocketAddr::from(([127, 0, 0, i], 80)))
            .collect()
    }

    #[tokio::test]
    async fn round_robin_cycles() {
        let c = core(SimpleLb::RoundRobin, None);
        let a = addrs();
        let picked: Vec<SocketAddr> = (0..6)
            .map(|_| c.pick(&a, Avoid::default()).unwrap())
            .collect();
        assert_eq!(picked, [a[0], a[1], a[2], a[0], a[1], a[2]]);
    }

    #[tokio::test]
    async fn least_request_prefers_the_idle_endpoint() {
        let c = core(SimpleLb::LeastRequest, None);
        let a = addrs()[..2].to_vec();
        c.track(a[0], 5);
        // Two random choices: whenever both are seen, the idle one wins.
        let idle = (0..50)
            .filter(|_| c.pick(&a, Avoid::default()) == Some(a[1]))
            .count();
        assert!(
            idle > 15,
            "{idle}/50: the idle endpoint wins about 3 times in 4"
        );
    }

    /// A DestinationRule's `outlierDetection` with `maxEjectionPercent:
    /// 100` and what `f` sets.
    fn outlier(f: impl FnOnce(&mut OutlierDetection)) -> Outlier {
        let mut od = OutlierDetection {
            max_ejection_percent: Some(100),
            ..OutlierDetection::default()
        };
        f(&mut od);
        Outlier::compile(&od)
    }

    #[tokio::test]
    async fn outlier_detection_ejects_after_consecutive_errors() {
        let c = core(
            SimpleLb::RoundRobin,
            Some(outlier(|od| od.consecutive_5xx_errors = Some(3))),
        );
        let a = addrs();
        let status = |s| Report::Status(s);
        for _ in 0..2 {
            c.observe(a[0], status(500));
        }
        c.observe(a[0], status(200)); // a success resets the count
        for _ in 0..3 {
            c.observe(a[0], status(503));
        }
        let picked: Vec<SocketAddr> = (0..6)
            .filter_map(|_| c.pick(&a, Avoid::default()))
            .collect();
        assert!(
            !picked.contains(&a[0]),
            "ejected endpoint still picked: {picked:?}"
        );
        for x in &a[1..] {
            for _ in 0..3 {
                c.observe(*x, status(500));
            }
        }
        // Everything ejected: Istio turns Envoy's panic threshold off
        // (minHealthPercent 0), so there is no endpoint (503 UH).
        assert_eq!(c.pick(&a, Avoid::default()), None);
    }

    #[tokio::test]
    async fn below_min_health_percent_requests_go_to_every_endpoint() {
        let od = outlier(|od| {
            od.consecutive_5xx_errors = Some(1);
            od.min_health_percent = Some(50);
        });
        let c = core(SimpleLb::RoundRobin, Some(od));
        let a = addrs();
        c.observe(a[0], Report::Status(500));
        let picked: Vec<SocketAddr> = (0..6)
            .filter_map(|_| c.pick(&a, Avoid::default()))
            .collect();
        assert!(!picked.contains(&a[0]), "2 of 3 healthy: {picked:?}");
        c.observe(a[1], Report::Status(500));
        let picked: Vec<SocketAddr> = (0..6)
            .filter_map(|_| c.pick(&a, Avoid::default()))
            .collect();
        assert_eq!(
            picked,
            [a[0], a[1], a[2], a[0], a[1], a[2]],
            "panic: all of them"
        );
    }

    #[tokio::test]
    async fn max_ejection_percent_counts_the_endpoint_to_be_ejected() {
        // Istio's default 10 %: of three endpoints, none may go.
        let c = core(
            SimpleLb::RoundRobin,
            Some(Outlier::compile(&OutlierDetection {
                consecutive_5xx_errors: Some(1),
                ..OutlierDetection::default()
            })),
        );
        let a = addrs();
        c.observe(a[0], Report::Status(500));
        assert!(!c.is_ejected(a[0]));
        // 50 %: one of three (33 %), not two (67 %).
        let c = core(
            SimpleLb::RoundRobin,
            Some(outlier(|od| {
                od.consecutive_5xx_errors = Some(1);
                od.max_ejection_percent = Some(50);
            })),
        );
        c.observe(a[0], Report::Status(500));
        c.observe(a[1], Report::Status(500));
        assert!(c.is_ejected(a[0]) && !c.is_ejected(a[1]));
    }

    #[tokio::test]
    async fn only_an_endpoints_own_failures_count_against_it() {
        let c = core(
            SimpleLb::RoundRobin,
            Some(outlier(|od| od.consecutive_5xx_errors = Some(1))),
        );
        let a = addrs();
        let not_its_doing = [
            UpstreamError::Overflow,
            UpstreamError::RequestIdle,
            UpstreamError::StreamIdle,
            UpstreamError::NoHealthyUpstream("none".into()),
            // Counted where the connect failed, not again.
            UpstreamError::ConnectFailure("refused".into()),
        ];
        for e in &not_its_doing {
            c.observe_unanswered(a[0], e);
        }
        assert!(!c.is_ejected(a[0]));
        c.observe_unanswered(a[0], &UpstreamError::RemoteReset);
        assert!(c.is_ejected(a[0]), "a reset is a 5xx");
        let gateway_errors = outlier(|od| {
            od.consecutive_5xx_errors = Some(0);
            od.consecutive_gateway_errors = Some(1);
        });
        let c = core(SimpleLb::RoundRobin, Some(gateway_errors));
        c.observe_unanswered(a[1], &UpstreamError::PerTryTimeout);
        assert!(c.is_ejected(a[1]), "a timeout is a gateway error");
    }

    fn settings(endpoints: Endpoints, h2: bool, hash: Option<HashOn>) -> ClusterSettings {
        ClusterSettings {
            name: Arc::from("c"),
            endpoints,
            tls: None,
            h2,
            h1_upgrades: None,
            connect_timeout: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(1),
            max_requests_per_connection: None,
            max_connection_duration: None,
            keepalive: None,
            retry_limit: None,
            tunnel: None,
            max_in_flight: 1,
            lb: SimpleLb::RoundRobin,
            hash,
            outlier: None,
            priorities: Priorities::default(),
        }
    }

    /// A cluster as the proxy makes it (its resolver is never asked).
    fn cluster(s: ClusterSettings) -> Cluster {
        Cluster::new(
            s,
            Resolver::new(Some("127.0.0.1:53".parse().unwrap())).unwrap(),
        )
    }

    #[test]
    fn one_pool_key_only_where_the_authority_picks_nothing() {
        let dns = || Endpoints::Dns {
            names: vec![DnsName::new(Arc::from("a.example"), 443)],
            first_only: false,
        };
        let shared = |s| cluster(s).pool_authority().is_some();
        assert!(shared(settings(dns(), false, None)));
        assert!(shared(settings(Endpoints::Static(addrs()), false, None)));
        // `:authority` is the request's.
        assert!(!shared(settings(dns(), true, None)));
        // The cluster chooses a hashed request's endpoint as any other's.
        assert!(shared(settings(dns(), false, Some(HashOn::SourceIp))));
        // The request's authority is where it goes.
        assert!(!shared(settings(Endpoints::FromUri, false, None)));
        assert!(!shared(settings(
            Endpoints::RequestHost { port: 80 },
            false,
            None
        )));
        assert!(!shared(settings(Endpoints::Inbound, false, None)));
    }

    #[tokio::test]
    async fn retries_in_flight_are_held_to_the_limit_or_the_budget() {
        let limited = |limit| {
            cluster(ClusterSettings {
                retry_limit: Some(limit),
                ..settings(Endpoints::Static(addrs()), false, None)
            })
        };
        let c = limited(RetryLimit::Max(2));
        let (a, b) = (c.retry_permit(), c.retry_permit());
        assert!(a.is_some() && b.is_some() && c.retry_permit().is_none());
        drop(a);
        assert!(
            c.retry_permit().is_some(),
            "a finished retry gives its place back"
        );
        // 50 % of four requests in flight, at least one.
        let c = limited(RetryLimit::Budget {
            percent: 50.0,
            min: 1,
        });
        let one = c.retry_permit();
        assert!(
            one.is_some() && c.retry_permit().is_none(),
            "the floor: one"
        );
        c.in_flight.store(4, Ordering::Relaxed);
        let two = c.retry_permit();
        assert!(two.is_some() && c.retry_permit().is_none(), "two of four");
        // No limit: nothing is counted.
        let c = cluster(settings(Endpoints::Static(addrs()), false, None));
        let all: Vec<_> = (0..100).map(|_| c.retry_permit()).collect();
        assert!(all.iter().all(Option::is_some));
    }

    #[tokio::test]
    async fn circuit_breaker_overflows_with_uo() {
        let cluster = cluster(ClusterSettings {
            max_in_flight: 0,
            ..settings(Endpoints::Static(addrs()), false, None)
        });
        let err = cluster
            .send(Request::new(Body::empty()))
            .await
            .unwrap_err()
            .error;
        assert_eq!(err.flag(), ResponseFlags::UPSTREAM_OVERFLOW);
        assert_eq!(
            err.to_string(),
            "upstream connect error or disconnect/reset before headers. reset reason: overflow"
        );
    }

    fn get(addr: SocketAddr) -> Request<Body> {
        let mut req = Request::new(Body::empty());
        *req.uri_mut() = format!("http://{addr}/").parse().unwrap();
        req.headers_mut()
            .insert(http::header::HOST, http::HeaderValue::from_static("up"));
        req
    }

    async fn read_all(answer: Answer) -> bytes::Bytes {
        use http_body_util::BodyExt;
        let body = Body::incoming(answer.response.into_body(), Duration::from_secs(5))
            .leased(answer.lease);
        body.collect().await.unwrap().to_bytes()
    }

    #[tokio::test]
    async fn a_connection_is_reused_after_its_body_ends_and_closed_when_dropped_before() {
        let KeepAliveServer { addr, accepted, .. } = keepalive_server("hello").await;
        let cluster = cluster(settings(Endpoints::Static(vec![addr]), false, None));
        for _ in 0..3 {
            let answer = cluster.send(get(addr)).await.unwrap();
            assert_eq!(answer.upstream, Some(addr));
            assert_eq!(read_all(answer).await, "hello");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1, "one connection, reused");
        // Unread: the connection cannot carry another request.
        drop(cluster.send(get(addr)).await.unwrap());
        assert_eq!(
            read_all(cluster.send(get(addr)).await.unwrap()).await,
            "hello"
        );
        assert_eq!(accepted.load(Ordering::SeqCst), 2, "a new connection");
    }

    /// Envoy's load balancer picks a host for every request, and keeps
    /// connections per host: round robin alternates over two endpoints,
    /// each reusing its own connection.
    #[tokio::test]
    async fn each_request_picks_its_endpoint_and_reuses_a_connection_to_it() {
        let (a, b) = (keepalive_server("a").await, keepalive_server("b").await);
        let cluster = cluster(ClusterSettings {
            max_in_flight: 64,
            ..settings(Endpoints::Static(vec![a.addr, b.addr]), false, None)
        });
        let mut bodies = Vec::new();
        for _ in 0..6 {
            let mut req = get(a.addr);
            *req.uri_mut() = "http://cluster/".parse().unwrap();
            bodies.push(read_all(cluster.send(req).await.unwrap()).await);
        }
        assert!(
            bodies == ["a", "b", "a", "b", "a", "b"] || bodies == ["b", "a", "b", "a", "b", "a"],
            "{bodies:?}"
        );
        assert_eq!(a.accepted.load(Ordering::SeqCst), 1);
        assert_eq!(b.accepted.load(Ordering::SeqCst), 1);
    }

    /// A retry's pick passes over the endpoints tried before while
    /// another is eligible, by policy and by hash; with none left, any.
    #[test]
    fn a_retry_picks_an_endpoint_not_tried_before() {
        let a = addrs();
        for lb in [
            SimpleLb::RoundRobin,
            SimpleLb::Random,
            SimpleLb::LeastRequest,
        ] {
            let c = core(lb, None);
            for _ in 0..20 {
                assert_eq!(c.pick(&a, hosts(&a[..2])), Some(a[2]));
                assert!(c.pick(&a, hosts(&a[1..2])).is_some_and(|p| p != a[1]));
                assert!(c.pick(&a, hosts(&a)).is_some());
            }
        }
        let c = core(SimpleLb::RoundRobin, None);
        for key in 0..20 {
            let first = c.pick_hashed(&a, key, Avoid::default()).unwrap();
            let next = c.pick_hashed(&a, key, hosts(&[first])).unwrap();
            assert_ne!(next, first);
            // The same next one every time: the key's second choice.
            assert_eq!(c.pick_hashed(&a, key, hosts(&[first])), Some(next));
        }
    }

    /// `retryRemoteLocalities`: the priorities (localities) of the
    /// endpoints named are passed over while another has an endpoint;
    /// previous hosts alone stay within the best priority.
    #[test]
    fn a_retry_leaves_the_tried_localities_when_asked() {
        let a = addrs();
        let mut c = core(SimpleLb::RoundRobin, None);
        c.locality = Locality::of(Priorities {
            by_addr: HashMap::from([(a[0], 0), (a[1], 0), (a[2], 1)]),
            ..Priorities::default()
        });
        for _ in 0..6 {
            assert!(c.pick(&a, Avoid::default()).is_some_and(|p| p != a[2]));
            assert_eq!(c.pick(&a, hosts(&a[..2])).map(|p| p != a[2]), Some(true));
            let elsewhere = Avoid {
                hosts: &a[..1],
                priorities_of: &a[..1],
            };
            assert_eq!(c.pick(&a, elsewhere), Some(a[2]));
        }
        // Every priority tried: the best again.
        let all = Avoid {
            hosts: &[],
            priorities_of: &a,
        };
        assert!(c.pick(&a, all).is_some_and(|p| p != a[2]));
    }

    #[tokio::test]
    async fn an_idle_connection_is_closed_after_the_idle_timeout() {
        let KeepAliveServer {
            addr,
            accepted,
            mut closed,
        } = keepalive_server("hello").await;
        let cluster = cluster(ClusterSettings {
            idle_timeout: Duration::from_millis(200),
            ..settings(Endpoints::Static(vec![addr]), false, None)
        });
        assert_eq!(
            read_all(cluster.send(get(addr)).await.unwrap()).await,
            "hello"
        );
        let closed = tokio::time::timeout(Duration::from_secs(10), closed.recv()).await;
        assert!(
            matches!(closed, Ok(Some(()))),
            "the pool closed its idle connection"
        );
        assert_eq!(
            read_all(cluster.send(get(addr)).await.unwrap()).await,
            "hello"
        );
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn max_requests_per_connection_one_keeps_no_connection() {
        let KeepAliveServer { addr, accepted, .. } = keepalive_server("hello").await;
        let cluster = cluster(ClusterSettings {
            max_requests_per_connection: Some(1),
            ..settings(Endpoints::Static(vec![addr]), false, None)
        });
        for _ in 0..3 {
            assert_eq!(
                read_all(cluster.send(get(addr)).await.unwrap()).await,
                "hello"
            );
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn http2_requests_share_one_connection() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                let service = hyper::service::service_fn(|_req| async {
                    Ok::<_, std::convert::Infallible>(http::Response::new(Body::full("h2")))
                });
                tokio::spawn(
                    hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                        .serve_connection(hyper_util::rt::TokioIo::new(s), service),
                );
            }
        });
        let cluster = cluster(ClusterSettings {
            max_in_flight: 64,
            ..settings(Endpoints::Static(vec![addr]), true, None)
        });
        let req = || {
            let mut r = get(addr);
            *r.version_mut() = http::Version::HTTP_2;
            r
        };
        let (a, b) = tokio::join!(cluster.send(req()), cluster.send(req()));
        assert_eq!(read_all(a.unwrap()).await, "h2");
        assert_eq!(read_all(b.unwrap()).await, "h2");
        assert_eq!(read_all(cluster.send(req()).await.unwrap()).await, "h2");
        assert_eq!(accepted.load(Ordering::SeqCst), 1, "one HTTP/2 connection");
    }

    /// A response body in 64 KiB frames, then a trailer.
    struct Large(usize);

    impl hyper::body::Body for Large {
        type Data = bytes::Bytes;
        type Error = std::convert::Infallible;

        fn poll_frame(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Result<hyper::body::Frame<bytes::Bytes>, Self::Error>>>
        {
            let frame = match self.0 {
                usize::MAX => None,
                0 => {
                    self.0 = usize::MAX;
                    let mut t = http::HeaderMap::new();
                    t.insert("grpc-status", http::HeaderValue::from_static("0"));
                    Some(Ok(hyper::body::Frame::trailers(t)))
                }
                left => {
                    let n = left.min(64 * 1024);
                    self.0 -= n;
                    Some(Ok(hyper::body::Frame::data(bytes::Bytes::from(vec![
                        b'b';
                        n
                    ]))))
                }
            };
            std::task::Poll::Ready(frame)
        }
    }

    /// Bodies larger than every HTTP/2 window, both ways, on one stream: the
    /// client gives the window back as it reads, waits for the server's as
    /// it sends, and the response's trailer comes through.
    #[tokio::test]
    async fn http2_bodies_larger_than_the_windows_go_both_ways() {
        use http_body_util::BodyExt;
        const UP: usize = 3 * 1024 * 1024;
        const DOWN: usize = 7 * 1024 * 1024;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (s, _) = listener.accept().await.unwrap();
            let service = hyper::service::service_fn(|req: Request<hyper::body::Incoming>| async {
                let got = req.into_body().collect().await.unwrap().to_bytes();
                assert_eq!(got.len(), UP);
                Ok::<_, std::convert::Infallible>(http::Response::new(Large(DOWN)))
            });
            hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                .serve_connection(hyper_util::rt::TokioIo::new(s), service)
                .await
                .unwrap();
        });
        let cluster = cluster(settings(Endpoints::Static(vec![addr]), true, None));
        let mut req = get(addr);
        *req.method_mut() = http::Method::POST;
        *req.version_mut() = http::Version::HTTP_2;
        *req.body_mut() = Body::full(vec![b'a'; UP]);
        let answer = cluster.send(req).await.unwrap();
        let body = Body::incoming(answer.response.into_body(), Duration::from_secs(5));
        let whole = tokio::time::timeout(Duration::from_secs(10), body.collect())
            .await
            .expect("the body within the bound")
            .unwrap();
        assert_eq!(
            whole.trailers().map(|t| t["grpc-status"].clone()),
            Some("0".parse().unwrap())
        );
        assert_eq!(whole.to_bytes().len(), DOWN);
    }

    /// A peer that never opens its window to a request body: the stream
    /// is reset after the wait's bound, and the request fails, instead of
    /// waiting for ever (time runs ahead while nothing else can happen).
    #[tokio::test(start_paused = true)]
    async fn http2_body_that_the_peer_never_takes_is_given_up() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (s, _) = listener.accept().await.unwrap();
            let service = hyper::service::service_fn(|_req: Request<hyper::body::Incoming>| {
                std::future::pending::<Result<http::Response<Body>, std::convert::Infallible>>()
            });
            let _ = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                .initial_stream_window_size(0)
                .serve_connection(hyper_util::rt::TokioIo::new(s), service)
                .await;
        });
        let cluster = cluster(settings(Endpoints::Static(vec![addr]), true, None));
        let mut req = get(addr);
        *req.method_mut() = http::Method::POST;
        *req.version_mut() = http::Version::HTTP_2;
        // More than the 64 KiB a stream may send before the peer's
        // settings arrive.
        *req.body_mut() = Body::full(vec![b'n'; 100_000]);
        let sent = tokio::time::timeout(Duration::from_secs(3600), cluster.send(req)).await;
        let error = sent.expect("an answer before the hour").unwrap_err().error;
        assert_eq!(error.flag(), ResponseFlags::UPSTREAM_CONNECTION_TERMINATION);
    }

    /// The header blocks of the HEADERS frames a client sends on one
    /// plain HTTP/2 connection, read off the wire; each is answered 200.
    async fn h2_header_blocks(listener: tokio::net::TcpListener) -> Vec<Vec<u8>> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut s, _) = listener.accept().await.unwrap();
        // The server's SETTINGS (empty).
        s.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0]).await.unwrap();
        let mut preface = [0u8; 24];
        s.read_exact(&mut preface).await.unwrap();
        let mut blocks = Vec::new();
        let mut head = [0u8; 9];
        while s.read_exact(&mut head).await.is_ok() {
            let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
            let mut payload = vec![0u8; len];
            s.read_exact(&mut payload).await.unwrap();
            match (head[3], head[4]) {
                // SETTINGS, not an ACK: acknowledged.
                (4, 0) => s.write_all(&[0, 0, 0, 4, 1, 0, 0, 0, 0]).await.unwrap(),
                // HEADERS: `:status: 200` (static index 8), ending the stream.
                (1, _) => {
                    blocks.push(payload);
                    let mut answer = vec![0, 0, 1, 1, 0x5];
                    answer.extend_from_slice(&head[5..9]);
                    answer.push(0x88);
                    s.write_all(&answer).await.unwrap();
                }
                _ => {}
            }
        }
        blocks
    }

    /// Each `x-request-id` goes never-indexed, but after the first request
    /// its name goes by index into the connection's table, not as a
    /// literal every time (`pool::name_request_id`).
    #[tokio::test]
    async fn http2_request_ids_name_the_connections_first_one() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(h2_header_blocks(listener));
        let cluster = cluster(settings(Endpoints::Static(vec![addr]), true, None));
        for id in ["id-one", "id-two", "id-three"] {
            let mut req = get(addr);
            *req.version_mut() = http::Version::HTTP_2;
            let mut id = http::HeaderValue::from_static(id);
            id.set_sensitive(true);
            req.headers_mut().insert(crate::http::X_REQUEST_ID, id);
            let answer = cluster.send(req).await.unwrap();
            assert_eq!(answer.response.status(), 200);
        }
        drop(cluster);
        let blocks = tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(blocks.len(), 3);
        for block in &blocks[1..] {
            // The pseudo-headers are indexed now (1xxxxxxx); next comes the
            // id, never indexed (0001xxxx), its name an index (not 0000:
            // a literal).
            let field = block.iter().find(|b| *b & 0x80 == 0).copied();
            assert_eq!(field.map(|b| b & 0xf0), Some(0x10), "{block:02x?}");
            assert_ne!(field, Some(0x10), "name sent as a literal: {block:02x?}");
        }
    }
}
