//! A cluster's keep-alive connections (Envoy's connection pools): idle
//! HTTP/1.1 connections by pool key and endpoint, the newest taken first,
//! or one shared HTTP/2 connection per key and endpoint. The cluster
//! chooses a request's endpoint before it comes here (or leaves it to the
//! connection where the request's URI names it).
//!
//! Made for the data path: a request on a warm pool takes a lock, pops a
//! connection and sends; no task, timer or channel of the pool's own. An
//! HTTP/1.1 connection goes back when its response body has ended (the
//! `Lease` the body carries), and is closed when the body is dropped
//! before its end. A request that a reused connection closed before it was
//! sent goes out on another one; anything else is the caller's to retry.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use http::{Method, Request, Response, StatusCode, Uri};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;

use super::multiplex::{self, SendError};
use super::{ClusterCore, ConnectError};
use crate::body::{Body, PeerBody};

/// The pool's maps are looked up on every request; their keys (request
/// authorities) can come from clients, so a seeded hash of good quality,
/// a few times cheaper than SipHash.
type Keyed = foldhash::quality::RandomState;

/// What a key keeps per endpoint: the endpoint the cluster chose for the
/// request, or `None` where the connection picks it. (The cluster's own
/// endpoints, not a client's words: the fast hash.)
type ByEndpoint<T> = HashMap<EndpointKey, T, foldhash::fast::RandomState>;

/// An endpoint as a map key, hashed in one word where it is IPv4 (a
/// `SocketAddr`'s own hash writes each part, a few times the work, on
/// every request).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct EndpointKey(Option<SocketAddr>);

impl std::hash::Hash for EndpointKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        match self.0 {
            None => state.write_u8(0),
            Some(SocketAddr::V4(a)) => {
                state.write_u64(u64::from(a.ip().to_bits()) << 16 | u64::from(a.port()));
            }
            Some(SocketAddr::V6(a)) => {
                state.write_u128(a.ip().to_bits());
                state.write_u16(a.port());
            }
        }
    }
}

/// Retries of a request that a reused connection closed before it was
/// sent; after these the request takes a new connection.
const STALE_TRIES: u32 = 3;

/// Why a request got no response.
#[derive(Debug)]
pub(super) enum PoolError {
    /// No connection; the request, never sent, comes back (filled in by
    /// `send`) so that a retry needs no copy of it.
    Connect(ConnectError, Option<Box<Request<Body>>>),
    /// The connection failed while the request was out, or on a new
    /// connection before it; the endpoint it was out to, if known.
    Send(hyper::Error, Option<SocketAddr>),
    /// The same on an HTTP/2 connection, or its request body failed.
    Stream(SendError, Option<SocketAddr>),
}

impl PoolError {
    fn connect(e: ConnectError) -> Self {
        PoolError::Connect(e, None)
    }

    /// A connect error takes back the request that never left.
    fn unsent(self, req: Request<Body>) -> Self {
        match self {
            PoolError::Connect(e, _) => PoolError::Connect(e, Some(Box::new(req))),
            other => other,
        }
    }

    /// The endpoint a sent request failed at (connect failures are
    /// counted against theirs where they happen).
    pub(super) fn upstream(&self) -> Option<SocketAddr> {
        match self {
            PoolError::Connect(..) => None,
            PoolError::Send(_, at) | PoolError::Stream(_, at) => *at,
        }
    }
}

/// A response, the endpoint it came from (none for a unix socket), and its
/// connection's way back to the pool.
#[derive(Debug)]
pub struct Answer {
    pub response: Response<PeerBody>,
    pub upstream: Option<SocketAddr>,
    pub lease: Lease,
}

/// What the pool keeps for a cluster and how.
#[derive(Debug, Clone, Copy)]
pub(super) struct PoolSettings {
    pub h2: bool,
    /// HTTP/2: one connection for every request, whatever its authority
    /// (the cluster's endpoints and SNI do not depend on it).
    pub one_key: bool,
    /// Connections are kept between requests (`maxRequestsPerConnection`
    /// is not 1).
    pub keep: bool,
    pub idle_timeout: Duration,
    /// A connection is not reused after this many requests.
    pub max_requests: Option<u32>,
    /// `maxConnectionDuration`: a connection takes no new request this
    /// long after it was made, and closes when its last one ends.
    pub max_age: Option<Duration>,
}

impl PoolSettings {
    /// A connection made at `born` is past `max_age`.
    fn expired(&self, born: Instant) -> bool {
        self.max_age.is_some_and(|age| born.elapsed() >= age)
    }
}

#[derive(Debug)]
pub(super) struct Pool {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    settings: PoolSettings,
    idle: Mutex<HashMap<Arc<str>, ByEndpoint<Vec<Idle>>, Keyed>>,
    /// HTTP/2: one connection per key and endpoint.
    multiplexed: Mutex<HashMap<Arc<str>, ByEndpoint<Arc<Slot>>, Keyed>>,
    /// HTTP/2 with one key (`PoolSettings::one_key`): its slots.
    single: Mutex<ByEndpoint<Arc<Slot>>>,
}

/// An HTTP/1.1 connection, between its requests or lent to one.
#[derive(Debug)]
struct H1 {
    sender: http1::SendRequest<Body>,
    key: Arc<str>,
    /// The endpoint it was made for (`None`: its connector picked one).
    chosen: Option<SocketAddr>,
    upstream: Option<SocketAddr>,
    served: u32,
    born: Instant,
}

#[derive(Debug)]
struct Idle {
    conn: H1,
    since: Instant,
}

/// A key's HTTP/2 connection, if it has one. Requests take a handle to
/// it under a plain lock, never held across an await (an async lock costs
/// every request a semaphore); dialing has a lock of its own, held while
/// it connects, so concurrent first requests share one connection.
#[derive(Debug, Default)]
struct Slot {
    conn: Mutex<Option<H2>>,
    dialing: tokio::sync::Mutex<()>,
}

/// A handle to a slot's connection: the sender, its endpoint, whether it
/// was made before, and whether this is its first request.
type Checkout = (multiplex::Handle, Option<SocketAddr>, bool, bool);

impl Slot {
    fn held(&self) -> std::sync::MutexGuard<'_, Option<H2>> {
        self.conn
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A handle to the open connection, counted as one more request on it.
    fn checkout(&self, settings: &PoolSettings, reused: bool) -> Option<Checkout> {
        let mut held = self.held();
        if held.as_ref().is_some_and(|c| settings.expired(c.born)) {
            // Its streams end on it; new ones go to a new connection.
            *held = None;
        }
        let c = held.as_mut().filter(|c| !c.conn.is_closed())?;
        c.served += 1;
        c.last_used = Instant::now();
        let out = (c.conn.clone(), c.upstream, reused, c.served == 1);
        // Its last request: new requests open another connection.
        if !settings.keep || settings.max_requests.is_some_and(|n| c.served >= n) {
            *held = None;
        }
        Some(out)
    }
}

#[derive(Debug)]
struct H2 {
    conn: multiplex::Handle,
    upstream: Option<SocketAddr>,
    served: u32,
    last_used: Instant,
    born: Instant,
}

/// An HTTP/1.1 connection lent to one response: back to its pool when the
/// body ends (`release`), closed when the lease is dropped.
#[derive(Debug, Default)]
pub struct Lease(Option<Box<Loan>>);

#[derive(Debug)]
struct Loan {
    pool: Arc<Shared>,
    conn: H1,
}

impl Lease {
    /// The body ended: the connection can carry the next request once
    /// its task has finished this one (nearly always already; else it
    /// goes back when it has, as when the upstream answered before the
    /// request body was all sent, or is closed if that takes longer than
    /// the idle timeout).
    pub fn release(&mut self) {
        let Some(loan) = self.0.take() else {
            return;
        };
        let Loan { pool, mut conn } = *loan;
        if conn.sender.is_ready() {
            pool.put(conn);
        } else {
            tokio::spawn(async move {
                let limit = pool.settings.idle_timeout;
                if let Ok(Ok(())) = tokio::time::timeout(limit, conn.sender.ready()).await {
                    pool.put(conn);
                }
            });
        }
    }

    pub fn is_held(&self) -> bool {
        self.0.is_some()
    }
}

impl Pool {
    /// Needs the runtime: it starts the idle sweep.
    pub(super) fn new(settings: PoolSettings) -> Pool {
        let shared = Arc::new(Shared {
            settings,
            idle: Mutex::new(HashMap::default()),
            multiplexed: Mutex::new(HashMap::default()),
            single: Mutex::new(HashMap::default()),
        });
        if settings.keep {
            // Often enough to close an idle connection that expired too.
            let every = settings
                .max_age
                .map_or(settings.idle_timeout, |age| age.min(settings.idle_timeout));
            sweep(Arc::downgrade(&shared), every);
        }
        Pool { shared }
    }

    /// Whether `send_h2` or `send_h1` sends this pool's requests. The
    /// caller awaits the one itself rather than a function that chooses:
    /// each request's future has one level fewer, copied whole as it is
    /// made.
    pub(super) fn is_h2(&self) -> bool {
        self.shared.settings.h2
    }

    /// Sends one request on a connection of the pool (or a new one) to
    /// `endpoint`, or where the connector picks (`None`). The URI's
    /// authority is the pool key and tells the connector the host. (An
    /// async block, as `Cluster::send`: the request is kept once.)
    #[expect(
        clippy::manual_async_fn,
        reason = "an async fn's state holds its arguments twice"
    )]
    pub(super) fn send_h1<'a>(
        &'a self,
        core: &'a Arc<ClusterCore>,
        mut req: Request<Body>,
        endpoint: &'a Option<SocketAddr>,
    ) -> impl Future<Output = Result<Answer, PoolError>> + Send + 'a {
        async move {
            let uri = req.uri().clone();
            let key = uri.authority().map_or("", |a| a.as_str());
            let connect = req.method() == Method::CONNECT;
            *req.uri_mut() = request_target(&uri, connect);
            let mut stale = 0;
            loop {
                let pooled = (stale < STALE_TRIES)
                    .then(|| self.shared.take(key, *endpoint))
                    .flatten();
                let reused = pooled.is_some();
                let mut conn = match pooled {
                    Some(conn) => conn,
                    // Boxed: connecting (DNS, TCP, TLS) is rare on a warm pool,
                    // and its state would make every request's future larger
                    // (and every move of it longer).
                    None => match Box::pin(self.connect_h1(core, &uri, key, *endpoint)).await {
                        Ok(conn) => conn,
                        Err(e) => {
                            *req.uri_mut() = uri;
                            return Err(e.unsent(req));
                        }
                    },
                };
                if reused && !ready(&mut conn.sender, core.connect_timeout).await {
                    stale += 1;
                    continue;
                }
                match conn.sender.try_send_request(req).await {
                    Ok(response) => return Ok(self.lend(core, conn, response, connect)),
                    Err(mut e) => match e.take_message() {
                        Some(unsent) if reused => {
                            stale += 1;
                            req = unsent;
                        }
                        _ => return Err(PoolError::Send(e.into_error(), conn.upstream)),
                    },
                }
            }
        }
    }

    /// The answer, and the connection lent to its body when it can carry
    /// another request after it.
    fn lend(
        &self,
        core: &ClusterCore,
        mut conn: H1,
        response: Response<Incoming>,
        connect: bool,
    ) -> Answer {
        conn.served += 1;
        let upstream = conn.upstream;
        let status = response.status();
        let settings = &self.shared.settings;
        // An upgraded connection, or a CONNECT tunnel, is the caller's now.
        let tunnel = status == StatusCode::SWITCHING_PROTOCOLS || (connect && status.is_success());
        let reusable = settings.keep
            && settings.max_requests.is_none_or(|n| conn.served < n)
            && !tunnel
            && upstream.is_none_or(|a| core.keeps_endpoint(a, status, response.headers()));
        let lease = if reusable {
            Lease(Some(Box::new(Loan {
                pool: self.shared.clone(),
                conn,
            })))
        } else {
            Lease::default()
        };
        Answer {
            response: response.map(PeerBody::Hyper),
            upstream,
            lease,
        }
    }

    async fn connect_h1(
        &self,
        core: &Arc<ClusterCore>,
        uri: &Uri,
        key: &str,
        chosen: Option<SocketAddr>,
    ) -> Result<H1, PoolError> {
        let conn = core
            .connect(uri, true, chosen)
            .await
            .map_err(PoolError::connect)?;
        let upstream = conn.endpoint();
        let (sender, connection) = http1::Builder::new()
            .handshake(TokioIo::new(conn))
            .await
            .map_err(|e| PoolError::Send(e, None))?;
        tokio::spawn(async move {
            if let Err(e) = connection.with_upgrades().await {
                tracing::debug!(error = %e, "upstream connection closed");
            }
        });
        Ok(H1 {
            sender,
            key: Arc::from(key),
            chosen,
            upstream,
            served: 0,
            born: Instant::now(),
        })
    }

    /// `send_h1` on the key's shared HTTP/2 connection to the endpoint.
    #[expect(
        clippy::manual_async_fn,
        reason = "an async fn's state holds its arguments twice"
    )]
    pub(super) fn send_h2<'a>(
        &'a self,
        core: &'a Arc<ClusterCore>,
        mut req: Request<Body>,
        endpoint: &'a Option<SocketAddr>,
    ) -> impl Future<Output = Result<Answer, PoolError>> + Send + 'a {
        async move {
            // One key: its slots are at hand, not looked up by name.
            let slot = &if self.shared.settings.one_key {
                slot_of(&self.shared.single, *endpoint)
            } else {
                let key = req.uri().authority().map_or("", |a| a.as_str());
                self.shared.slot(key, *endpoint)
            };
            let mut stale = 0;
            // Nothing the request or an error holds is kept across an await
            // after the send: each request's future is as large as its largest
            // state, and it is copied whole as it is made.
            loop {
                let (mut conn, upstream, reused, first) =
                    match self.checkout_h2(core, slot, req.uri(), endpoint).await {
                        Ok(checked_out) => checked_out,
                        Err(e) => return Err(e.unsent(req)),
                    };
                if first {
                    name_request_id(&mut req);
                }
                // A connection that ended (or was told to go away) since it
                // was last used: the request has not left, so it takes
                // another.
                if let Err(e) = multiplex::ready(&mut conn.sender).await {
                    if reused && stale < STALE_TRIES {
                        stale += 1;
                        forget(slot, None);
                        continue;
                    }
                    return Err(PoolError::Stream(e.into(), upstream));
                }
                let response = multiplex::send(&mut conn.sender, req)
                    .await
                    .map_err(|e| PoolError::Stream(e, upstream))?;
                if let Some(a) = upstream
                    && !core.keeps_endpoint(a, response.status(), response.headers())
                {
                    forget(slot, Some(a));
                }
                return Ok(Answer {
                    response,
                    upstream,
                    lease: Lease::default(),
                });
            }
        }
    }

    /// The key's shared connection (made now if there is none or it
    /// closed): a handle to it, its endpoint, whether it was made before,
    /// and whether this is its first request.
    async fn checkout_h2(
        &self,
        core: &Arc<ClusterCore>,
        slot: &Slot,
        uri: &Uri,
        endpoint: &Option<SocketAddr>,
    ) -> Result<Checkout, PoolError> {
        let settings = &self.shared.settings;
        if let Some(out) = slot.checkout(settings, true) {
            return Ok(out);
        }
        let _dialing = slot.dialing.lock().await;
        // Another request may have connected while this one waited.
        if let Some(out) = slot.checkout(settings, true) {
            return Ok(out);
        }
        let c = Box::pin(connect_h2(core, uri, *endpoint)).await?;
        *slot.held() = Some(c);
        slot.checkout(settings, false).ok_or_else(|| {
            PoolError::connect(ConnectError::Failed("HTTP/2 connection closed".into()))
        })
    }
}

/// Lets the first request on an HTTP/2 connection add its `x-request-id`
/// to the connection's HPACK table. Every id is sent never-indexed
/// (`http.rs`), and with none in the table its name went as a literal too,
/// Huffman-coded on one side and decoded (and allocated) on the other for
/// every request; with this one entry, later ids name it by index. Only
/// the first: each added id would lengthen the chain of same-named entries
/// that every later id is compared with.
fn name_request_id(req: &mut Request<Body>) {
    if let Some(id) = req.headers_mut().get_mut(crate::http::X_REQUEST_ID) {
        id.set_sensitive(false);
    }
}

/// Dials and speaks HTTP/2 within the connect timeout.
async fn connect_h2(
    core: &Arc<ClusterCore>,
    uri: &Uri,
    endpoint: Option<SocketAddr>,
) -> Result<H2, PoolError> {
    let conn = core
        .connect(uri, false, endpoint)
        .await
        .map_err(PoolError::connect)?;
    let upstream = conn.endpoint();
    let conn = match tokio::time::timeout(core.connect_timeout, multiplex::handshake(conn)).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => return Err(PoolError::Stream(e.into(), None)),
        Err(_) => {
            return Err(PoolError::connect(ConnectError::Failed(
                "HTTP/2 handshake timeout".into(),
            )));
        }
    };
    Ok(H2 {
        conn,
        upstream,
        served: 0,
        last_used: Instant::now(),
        born: Instant::now(),
    })
}

/// Drops the slot's connection when it has closed, or when it goes to
/// `ejected` (an endpoint outlier detection ejected).
fn forget(slot: &Slot, ejected: Option<SocketAddr>) {
    let mut held = slot.held();
    if held
        .as_ref()
        .is_some_and(|c| c.conn.is_closed() || (ejected.is_some() && c.upstream == ejected))
    {
        *held = None;
    }
}

/// A reused HTTP/1.1 connection is ready for the next request once its
/// connection task has finished the last one (at once, nearly always);
/// false when it closed instead.
async fn ready(sender: &mut http1::SendRequest<Body>, limit: Duration) -> bool {
    if sender.is_ready() {
        return true;
    }
    matches!(
        tokio::time::timeout(limit, sender.ready()).await,
        Ok(Ok(()))
    )
}

/// What an HTTP/1.1 request line carries: the path (origin form), or for
/// CONNECT the authority.
fn request_target(uri: &Uri, connect: bool) -> Uri {
    let mut parts = http::uri::Parts::default();
    if connect {
        parts.authority = uri.authority().cloned();
    } else {
        parts.path_and_query = Some(
            uri.path_and_query()
                .cloned()
                .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/")),
        );
    }
    Uri::from_parts(parts).unwrap_or_default()
}

impl Shared {
    /// The newest idle connection of `key` to `endpoint` that is still
    /// open.
    fn take(&self, key: &str, endpoint: Option<SocketAddr>) -> Option<H1> {
        let mut idle = self.idle.lock().ok()?;
        let list = idle.get_mut(key)?.get_mut(&EndpointKey(endpoint))?;
        let timeout = self.settings.idle_timeout;
        while let Some(i) = list.pop() {
            if !i.conn.sender.is_closed()
                && i.since.elapsed() < timeout
                && !self.settings.expired(i.conn.born)
            {
                return Some(i.conn);
            }
        }
        None
    }

    fn put(&self, conn: H1) {
        if conn.sender.is_closed() || self.settings.expired(conn.born) {
            return;
        }
        let since = Instant::now();
        let Ok(mut idle) = self.idle.lock() else {
            return;
        };
        let endpoints = match idle.get_mut(&*conn.key) {
            Some(endpoints) => endpoints,
            None => idle.entry(conn.key.clone()).or_default(),
        };
        endpoints
            .entry(EndpointKey(conn.chosen))
            .or_default()
            .push(Idle { conn, since });
    }

    /// The slot of `key` and `endpoint`.
    fn slot(&self, key: &str, endpoint: Option<SocketAddr>) -> Arc<Slot> {
        let mut slots = self
            .multiplexed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let endpoints = match slots.get_mut(key) {
            Some(endpoints) => endpoints,
            None => slots.entry(Arc::from(key)).or_default(),
        };
        endpoints.entry(EndpointKey(endpoint)).or_default().clone()
    }

    /// Closes connections idle for the idle timeout, and forgets keys
    /// left without any.
    fn evict(&self) {
        let timeout = self.settings.idle_timeout;
        let now = Instant::now();
        if let Ok(mut idle) = self.idle.lock() {
            idle.retain(|_, endpoints| {
                endpoints.retain(|_, list| {
                    list.retain(|i| {
                        !i.conn.sender.is_closed()
                            && now - i.since < timeout
                            && !self.settings.expired(i.conn.born)
                    });
                    !list.is_empty()
                });
                !endpoints.is_empty()
            });
        }
        let keeps = |slots: &mut ByEndpoint<Arc<Slot>>| {
            slots.retain(|_, slot| keeps_h2(slot, now, &self.settings));
            !slots.is_empty()
        };
        if let Ok(mut slots) = self.multiplexed.lock() {
            slots.retain(|_, endpoints| keeps(endpoints));
        }
        if let Ok(mut single) = self.single.lock() {
            keeps(&mut single);
        }
    }
}

/// The slot of `endpoint` among a key's `slots`.
fn slot_of(slots: &Mutex<ByEndpoint<Arc<Slot>>>, endpoint: Option<SocketAddr>) -> Arc<Slot> {
    let mut slots = slots
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    slots.entry(EndpointKey(endpoint)).or_default().clone()
}

/// Drops a slot's HTTP/2 connection if it closed or idled for `timeout`;
/// whether the slot still holds one (or is connecting now).
fn keeps_h2(slot: &Slot, now: Instant, settings: &PoolSettings) -> bool {
    if slot.dialing.try_lock().is_err() {
        // Connecting now.
        return true;
    }
    let mut held = slot.held();
    if held.as_ref().is_some_and(|c| {
        c.conn.is_closed() || now - c.last_used >= settings.idle_timeout || settings.expired(c.born)
    }) {
        *held = None;
    }
    held.is_some()
}

/// Every `idle_timeout` (at least every 100 ms), closes the connections
/// idle that long, until the pool is gone.
fn sweep(pool: Weak<Shared>, idle_timeout: Duration) {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    let every = idle_timeout.max(Duration::from_millis(100));
    runtime.spawn(async move {
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        loop {
            tick.tick().await;
            match pool.upgrade() {
                Some(shared) => shared.evict(),
                None => return,
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_request_line_carries_the_path_or_connects_authority() {
        let uri: Uri = "http://cluster/a/b?c=d".parse().unwrap();
        assert_eq!(request_target(&uri, false), "/a/b?c=d");
        let bare: Uri = "http://cluster".parse().unwrap();
        assert_eq!(request_target(&bare, false), "/");
        let tunnel: Uri = "http://example.com:443".parse().unwrap();
        assert_eq!(request_target(&tunnel, true).to_string(), "example.com:443");
    }
}
