//! Envoy's connection idle timeout (the HTTP connection manager's
//! `idle_timeout`, 1 h by default): a downstream HTTP connection with no
//! request in flight for that long is closed gracefully (GOAWAY on HTTP/2).
//! Without it an HTTP/2 client could hold a connection, and its file
//! descriptor, forever. A request is in flight from the moment it arrives
//! until its response body has been sent.
//!
//! On HTTP/1.1 the same watcher bounds the wait for a request's head
//! (Envoy's `request_headers_timeout`, which Envoy leaves off; meshgate
//! keeps a 30 s bound so that a client sending a head byte by byte cannot
//! hold a connection for the hour): from the connection's start, and from
//! the first bytes read after a response, the head must be complete in
//! time. A kept-alive connection that sends nothing waits for the idle
//! timeout, as in Envoy.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use hyper::body::{Body, Frame, SizeHint};
use hyper::service::Service;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

/// One connection's requests in flight, and since when it has had none.
/// Requests only count; the watcher (`quiet`) wakes at deadlines and
/// reads the count, so a request costs no timer and no wake-up.
#[derive(Debug)]
pub struct Activity {
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    in_flight: usize,
    idle_since: Instant,
    /// With no request in flight: since when a request's head has been
    /// arriving (HTTP/1.1 only; `Watched` sets it).
    head_since: Option<Instant>,
}

/// Why a connection with nothing in flight is to be closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quiet {
    /// No request for the idle timeout.
    Idle,
    /// A request's head not complete within the header timeout.
    HeadTimeout,
}

impl Activity {
    pub fn new() -> Arc<Activity> {
        let now = Instant::now();
        Arc::new(Activity {
            state: Mutex::new(State {
                in_flight: 0,
                idle_since: now,
                // A new connection owes its first request's head.
                head_since: Some(now),
            }),
        })
    }

    fn start(self: &Arc<Self>) -> InFlight {
        if let Ok(mut s) = self.state.lock() {
            s.in_flight += 1;
            s.head_since = None;
        }
        InFlight(self.clone())
    }

    /// Bytes of a new request arrived (HTTP/1.1): its head is due.
    fn head_arriving(&self) {
        if let Ok(mut s) = self.state.lock()
            && s.in_flight == 0
            && s.head_since.is_none()
        {
            s.head_since = Some(Instant::now());
        }
    }

    /// HTTP/2: heads come in frames, bounded by the codec; only the idle
    /// timeout applies.
    fn no_heads(&self) {
        if let Ok(mut s) = self.state.lock() {
            s.head_since = None;
        }
    }

    /// Returns when no request has been in flight for `idle`, or a head has
    /// been arriving for longer than `head`. The watcher is not woken when a
    /// head starts (that would cost every request a timer); it looks again
    /// every `head / 2` while nothing is in flight, so a head is cut between
    /// `head` and 1.5 `head` after its first bytes. While requests are in
    /// flight it looks every `head` (the soonest either could be due).
    pub async fn quiet(&self, idle: Duration, head: Duration) -> Quiet {
        loop {
            let now = Instant::now();
            let next = match self
                .state
                .lock()
                .ok()
                .map(|s| (s.in_flight, s.idle_since, s.head_since))
            {
                Some((0, since, started)) => {
                    if let Some(started) = started
                        && started + head <= now
                    {
                        return Quiet::HeadTimeout;
                    }
                    if since + idle <= now {
                        return Quiet::Idle;
                    }
                    let head_due =
                        started.map_or(now + head / 2, |s| (s + head).min(now + head / 2));
                    (since + idle).min(head_due)
                }
                _ => now + idle.min(head),
            };
            tokio::time::sleep_until(next).await;
        }
    }
}

/// Holds its connection busy until dropped.
#[derive(Debug)]
pub struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Ok(mut s) = self.0.state.lock() {
            s.in_flight = s.in_flight.saturating_sub(1);
            if s.in_flight == 0 {
                s.idle_since = Instant::now();
            }
        }
    }
}

/// A service whose requests count as activity until their responses end.
#[derive(Debug, Clone)]
pub struct Tracked<S> {
    inner: S,
    activity: Arc<Activity>,
}

impl<S> Tracked<S> {
    pub fn new(inner: S, activity: Arc<Activity>) -> Self {
        Tracked { inner, activity }
    }
}

impl<S, Req, B> Service<Req> for Tracked<S>
where
    S: Service<Req, Response = http::Response<B>>,
{
    type Response = http::Response<TrackedBody<B>>;
    type Error = S::Error;
    type Future = TrackedFuture<S::Future>;

    fn call(&self, req: Req) -> Self::Future {
        TrackedFuture {
            guard: Some(self.activity.start()),
            inner: self.inner.call(req),
        }
    }
}

pin_project_lite::pin_project! {
    /// A response on its way: the request is in flight.
    pub struct TrackedFuture<F> {
        #[pin]
        inner: F,
        guard: Option<InFlight>,
    }
}

impl<F, B, E> Future for TrackedFuture<F>
where
    F: Future<Output = Result<http::Response<B>, E>>,
{
    type Output = Result<http::Response<TrackedBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let response = ready!(this.inner.poll(cx))?;
        let guard = this.guard.take();
        Poll::Ready(Ok(response.map(|inner| TrackedBody { inner, guard })))
    }
}

pin_project_lite::pin_project! {
    /// A response body being sent: the request is still in flight.
    pub struct TrackedBody<B> {
        #[pin]
        inner: B,
        guard: Option<InFlight>,
    }
}

impl<B: Body> Body for TrackedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let frame = ready!(this.inner.poll_frame(cx));
        if !matches!(frame, Some(Ok(_))) {
            *this.guard = None;
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// HTTP/2's connection preface: a connection that starts with it is
/// HTTP/2 (prior knowledge, or ALPN `h2`).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

pin_project_lite::pin_project! {
    /// A downstream connection's reads, telling its `Activity` when a
    /// request's head starts to arrive (HTTP/1.1; on HTTP/2 it stops
    /// looking once it has seen the preface).
    pub struct Watched<I> {
        #[pin]
        inner: I,
        activity: Arc<Activity>,
        preface: Preface,
    }
}

/// What the connection's first bytes said.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Preface {
    /// This many bytes of the HTTP/2 preface so far.
    Matching(usize),
    /// Not the preface: HTTP/1.1, whose heads are watched.
    Http1,
    /// The preface: HTTP/2.
    Http2,
}

impl<I> Watched<I> {
    pub fn new(inner: I, activity: Arc<Activity>) -> Self {
        Watched {
            inner,
            activity,
            preface: Preface::Matching(0),
        }
    }
}

impl<I: AsyncRead> AsyncRead for Watched<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.project();
        let before = buf.filled().len();
        ready!(this.inner.poll_read(cx, buf))?;
        let read = &buf.filled()[before..];
        if read.is_empty() {
            return Poll::Ready(Ok(()));
        }
        if let Preface::Matching(at) = *this.preface {
            let n = read.len().min(H2_PREFACE.len() - at);
            *this.preface = if read[..n] != H2_PREFACE[at..at + n] {
                Preface::Http1
            } else if at + n == H2_PREFACE.len() {
                this.activity.no_heads();
                Preface::Http2
            } else {
                Preface::Matching(at + n)
            };
        }
        if *this.preface == Preface::Http1 {
            this.activity.head_arriving();
        }
        Poll::Ready(Ok(()))
    }
}

impl<I: AsyncWrite> AsyncWrite for Watched<I> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.project().inner.poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.project().inner.poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A header timeout longer than any of these tests.
    const HOUR: Duration = Duration::from_secs(3600);

    #[tokio::test(start_paused = true)]
    async fn idle_only_without_requests_in_flight() {
        let activity = Activity::new();
        let limit = Duration::from_secs(60);
        let start = Instant::now();
        let busy = activity.start();
        let idle = tokio::spawn({
            let a = activity.clone();
            async move { a.quiet(limit, HOUR).await }
        });
        tokio::time::sleep(Duration::from_secs(600)).await;
        assert!(!idle.is_finished(), "a request is in flight");
        drop(busy);
        idle.await.unwrap();
        assert_eq!(start.elapsed(), Duration::from_secs(660));
    }

    #[tokio::test(start_paused = true)]
    async fn the_limit_counts_from_the_last_request() {
        let activity = Activity::new();
        let limit = Duration::from_secs(60);
        let start = Instant::now();
        let idle = tokio::spawn({
            let a = activity.clone();
            async move { a.quiet(limit, HOUR).await }
        });
        // Short requests now and then, never 60 s apart.
        for _ in 0..5 {
            tokio::time::sleep(Duration::from_secs(50)).await;
            drop(activity.start());
        }
        assert!(!idle.is_finished(), "never quiet for 60 s");
        idle.await.unwrap();
        assert_eq!(start.elapsed(), Duration::from_secs(250 + 60));
    }

    #[tokio::test(start_paused = true)]
    async fn a_head_that_never_finishes_is_cut_a_quiet_keep_alive_is_not() {
        let activity = Activity::new();
        let (idle, head) = (Duration::from_secs(3600), Duration::from_secs(30));
        let watcher = |a: &Arc<Activity>| {
            let a = a.clone();
            tokio::spawn(async move { a.quiet(idle, head).await })
        };
        // A request came and went; then nothing for 10 minutes: kept.
        drop(activity.start());
        let kept = watcher(&activity);
        tokio::time::sleep(Duration::from_secs(600)).await;
        assert!(!kept.is_finished(), "a quiet keep-alive connection is kept");

        // The next head starts arriving and never ends.
        let start = Instant::now();
        activity.head_arriving();
        assert_eq!(kept.await.unwrap(), Quiet::HeadTimeout);
        let waited = start.elapsed();
        assert!(waited >= head && waited <= head * 3 / 2, "{waited:?}");

        // Nothing at all on a new connection: its first head is due too.
        let fresh = Activity::new();
        let start = Instant::now();
        assert_eq!(watcher(&fresh).await.unwrap(), Quiet::HeadTimeout);
        assert_eq!(start.elapsed(), head);

        // HTTP/2: no head timeout, the idle timeout only.
        let h2 = Activity::new();
        h2.no_heads();
        let start = Instant::now();
        assert_eq!(watcher(&h2).await.unwrap(), Quiet::Idle);
        assert_eq!(start.elapsed(), idle);
    }

    #[tokio::test]
    async fn the_preface_tells_http2_from_http1() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        for (first, h2) in [
            (&b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0"[..], true),
            (b"POST / HTTP/1.1\r\n", false),
            (b"GET / HTTP/1.1\r\n", false),
        ] {
            let activity = Activity::new();
            let (mut client, server) = tokio::io::duplex(64);
            let mut watched = Watched::new(server, activity.clone());
            drop(activity.start());
            // Byte by byte, as a split preface would come.
            for b in first {
                client.write_all(&[*b]).await.unwrap();
                let mut one = [0u8; 1];
                watched.read_exact(&mut one).await.unwrap();
            }
            let head_due = activity.state.lock().unwrap().head_since.is_some();
            assert_eq!(head_due, !h2, "{:?}", String::from_utf8_lossy(first));
        }
    }
}
