//! What every listener shares (sidecar, gateway, admin): the accept loop
//! with backoff, reading the first bytes of a connection without losing
//! them, and serving HTTP/1.1 and HTTP/2 on a connection until it ends or
//! the proxy drains.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::body::Incoming;
use hyper::service::Service;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

use crate::drain::{Closing, Drain};
use crate::error::ConnError;
use crate::idle::{Activity, Quiet, Tracked, Watched};
use crate::tls_hello::{Hello, MAX_HELLO, parse_client_hello};
use meshgate_telemetry::{Metrics, Refused};

/// How long a downstream may take before the proxy gives up on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// To send its first bytes, and a whole ClientHello (Envoy's listener
    /// filter timeout, 15 s).
    pub first_byte: Duration,
    /// To finish a TLS handshake once it started (15 s, as Envoy's).
    pub handshake: Duration,
    /// For a response to start where the route sets no timeout (Envoy's
    /// stream idle timeout, 5 min).
    pub stream_idle: Duration,
    /// With no request in flight, before an HTTP connection is closed
    /// (Envoy's connection idle timeout, 1 h).
    pub idle: Duration,
    /// For an HTTP/1.1 request's head to arrive once it started (or once
    /// the connection opened): 30 s (Envoy's `request_headers_timeout`,
    /// off in Envoy; see `idle.rs`).
    pub request_headers: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            first_byte: Duration::from_secs(15),
            handshake: Duration::from_secs(15),
            stream_idle: Duration::from_secs(300),
            idle: Duration::from_secs(3600),
            request_headers: Duration::from_secs(30),
        }
    }
}

/// Envoy's default limit on request headers (`max_request_headers_kb`):
/// more gets 431.
pub const MAX_REQUEST_HEADERS: usize = 60 * 1024;

const BACKOFF_MIN: Duration = Duration::from_millis(5);
const BACKOFF_MAX: Duration = Duration::from_secs(1);

/// A listening socket connections are accepted from (TCP or unix).
pub trait Acceptor {
    type Stream;
    type Peer;
    fn accept(&self) -> impl Future<Output = io::Result<(Self::Stream, Self::Peer)>> + Send;
}

impl Acceptor for TcpListener {
    type Stream = TcpStream;
    type Peer = SocketAddr;
    async fn accept(&self) -> io::Result<(TcpStream, SocketAddr)> {
        let (tcp, remote) = TcpListener::accept(self).await?;
        let _ = tcp.set_nodelay(true);
        Ok((tcp, remote))
    }
}

impl Acceptor for tokio::net::UnixListener {
    type Stream = tokio::net::UnixStream;
    type Peer = ();
    async fn accept(&self) -> io::Result<(tokio::net::UnixStream, ())> {
        let (s, _) = tokio::net::UnixListener::accept(self).await?;
        Ok((s, ()))
    }
}

/// Accepts connections until the task is dropped, handing each to `serve`
/// (which spawns what it needs). Accept errors (out of file descriptors,
/// mostly) back off exponentially instead of spinning.
pub async fn accept_loop<L, F>(listener: L, mut serve: F)
where
    L: Acceptor,
    F: FnMut(L::Stream, L::Peer),
{
    let mut backoff = BACKOFF_MIN;
    loop {
        match listener.accept().await {
            Ok((stream, remote)) => {
                backoff = BACKOFF_MIN;
                serve(stream, remote);
            }
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?backoff, "accept failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
    }
}

/// The downstream HTTP server (HTTP/1.1 and HTTP/2, TLS or h2c). The
/// connection's watcher (`idle.rs`) bounds the wait for an HTTP/1.1 head,
/// not hyper's header read timer: that one is armed and dropped for every
/// request. HTTP/2 streams are spawned boxed (`BoxingExecutor`); HTTP/1.1
/// keeps each request's future in its connection's state, allocated once.
fn http_server() -> hyper_util::server::conn::auto::Builder<crate::exec::BoxingExecutor> {
    let mut b = hyper_util::server::conn::auto::Builder::new(crate::exec::BoxingExecutor);
    b.http1()
        .header_read_timeout(None)
        .max_buf_size(MAX_REQUEST_HEADERS);
    b.http2()
        .timer(hyper_util::rt::TokioTimer::new())
        .max_header_list_size(MAX_REQUEST_HEADERS as u32);
    b
}

/// Serves HTTP on `io` until the client is done; when the proxy drains, or
/// no request has been in flight for the idle timeout (or an HTTP/1.1 head
/// took longer than its timeout), the connection finishes its requests in
/// flight and closes.
pub async fn serve_http<I, S, B>(
    io: I,
    service: S,
    drain: &Drain,
    timeouts: &Timeouts,
    metrics: &Metrics,
) -> Result<(), ConnError>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: Service<http::Request<Incoming>, Response = http::Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let server = http_server();
    let activity = Activity::new();
    let io = Watched::new(io, activity.clone());
    let service = Tracked::new(service, activity.clone());
    crate::drain::serve_until_drained(
        drain,
        server.serve_connection_with_upgrades(TokioIo::new(io), service),
        |c| c.graceful_shutdown(),
        async {
            match activity
                .quiet(timeouts.idle, timeouts.request_headers)
                .await
            {
                Quiet::Idle => {
                    metrics.refused(Refused::downstream_cx_idle_timeout);
                    Closing::Graceful
                }
                // As hyper's own header timeout: nothing to finish.
                Quiet::HeadTimeout => {
                    metrics.refused(Refused::downstream_rq_header_timeout);
                    Closing::Now
                }
            }
        },
    )
    .await
    .map_err(ConnError::Http)
}

/// A connection whose first bytes were read to decide what it is; reading
/// from it returns those bytes first, so nothing is lost to whatever
/// serves it next.
#[derive(Debug)]
pub struct Sniffed<S> {
    buf: Vec<u8>,
    pos: usize,
    inner: S,
}

impl<S: AsyncRead + Unpin> Sniffed<S> {
    pub fn new(inner: S) -> Self {
        Sniffed {
            buf: Vec::new(),
            pos: 0,
            inner,
        }
    }

    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// Reads more bytes into the buffer, within `limit` from `start`.
    async fn fill(
        &mut self,
        start: Instant,
        limit: Duration,
        what: &'static str,
    ) -> Result<(), ConnError> {
        let mut chunk = [0u8; 4096];
        let read = tokio::time::timeout_at(start + limit, self.inner.read(&mut chunk)).await;
        match read {
            Err(_) => Err(ConnError::Idle(limit)),
            Ok(Err(e)) => Err(ConnError::Read(e)),
            Ok(Ok(0)) => Err(ConnError::Closed(what)),
            Ok(Ok(n)) => {
                self.buf.extend_from_slice(&chunk[..n]);
                Ok(())
            }
        }
    }

    /// Whether the client starts with a TLS handshake record; `None` when
    /// it closes without sending anything.
    pub async fn starts_with_tls(&mut self, limit: Duration) -> Result<Option<bool>, ConnError> {
        if self.buf.is_empty() {
            match self.fill(Instant::now(), limit, "sending anything").await {
                Err(ConnError::Closed(_)) => return Ok(None),
                other => other?,
            }
        }
        Ok(Some(self.buf[0] == 0x16))
    }

    /// Reads until the ClientHello is whole (one TLS record at most, within
    /// `limit` in all) and returns its SNI.
    pub async fn client_hello(&mut self, limit: Duration) -> Result<Option<String>, ConnError> {
        let start = Instant::now();
        loop {
            match parse_client_hello(&self.buf) {
                Hello::Complete(sni) => return Ok(sni),
                Hello::NotTls => return Err(ConnError::NotClientHello),
                Hello::Partial if self.buf.len() >= MAX_HELLO => {
                    return Err(ConnError::HelloTooLarge);
                }
                Hello::Partial => self.fill(start, limit, "the ClientHello").await?,
            }
        }
    }

    /// Bytes read so far (all of them are still to be read by the next
    /// reader).
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.pos
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Sniffed<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.pos < this.buf.len() {
            let n = out.remaining().min(this.buf.len() - this.pos);
            out.put_slice(&this.buf[this.pos..this.pos + n]);
            this.pos += n;
            if this.pos == this.buf.len() {
                // Replayed: give the memory back.
                this.buf = Vec::new();
                this.pos = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, out)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Sniffed<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}
