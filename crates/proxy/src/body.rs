//! The one body type of the data path (requests sent upstream, responses
//! sent downstream and reported when they end, the admin ports' answers),
//! and the one builder of responses the proxy makes itself.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Response, StatusCode};
use hyper::body::{Frame, Incoming, SizeHint};
use tokio::sync::mpsc;
use tokio::time::{Instant, Sleep};

use crate::report::HttpReport;
use crate::upstream::Lease;

/// A body: nothing, bytes we have, or a peer's body streamed through;
/// with a report attached (a downstream response), it counts the bytes
/// and writes the report when it ends or is dropped.
#[derive(Debug, Default)]
pub struct Body {
    kind: Kind,
    /// Boxed: a report is large, and a body is moved several times on its
    /// way through hyper (each move copied the report).
    report: Option<Box<HttpReport>>,
    idle: Option<IdleTimer>,
    /// Mirrors' copies of the data, made as it passes.
    tees: Vec<Tee>,
    /// Counts the data bytes that pass and marks the end (a request
    /// body's, for its report and the route's timeout).
    counted: Option<Arc<Progress>>,
    /// An upstream response's connection, back to its pool at the end.
    lease: Lease,
}

/// A streamed request body's progress: the bytes that went upstream, and
/// when it ended (the request has then been received: Envoy's route
/// timeout starts there).
#[derive(Debug, Default)]
pub struct Progress {
    bytes: std::sync::atomic::AtomicU64,
    ended: std::sync::OnceLock<Instant>,
    end: tokio::sync::Notify,
    /// The data kept as it passes, for a retry to send again (`keep`).
    keeping: AtomicBool,
    kept: std::sync::Mutex<Kept>,
}

/// A request body's data kept for its retries, while it fits the limit
/// (Envoy buffers a request it may retry, up to its buffer limit).
#[derive(Debug, Default)]
struct Kept {
    data: Vec<Bytes>,
    size: usize,
    limit: usize,
    /// Larger than the limit, or with trailers: not kept.
    lost: bool,
}

impl Progress {
    /// The data bytes that passed.
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// When the body ended, if it has.
    pub fn ended_at(&self) -> Option<Instant> {
        self.ended.get().copied()
    }

    /// When the body ended; waits for it.
    pub async fn ended(&self) -> Instant {
        loop {
            let notified = self.end.notified();
            if let Some(at) = self.ended_at() {
                return at;
            }
            notified.await;
        }
    }

    /// Keeps the data that passes from now (none has yet), up to `limit`
    /// bytes, for `replay`.
    pub fn keep(&self, limit: usize) {
        if let Ok(mut kept) = self.kept.lock() {
            kept.limit = limit;
        }
        self.keeping.store(true, Ordering::Relaxed);
    }

    /// The whole body again, if it has ended and all of it was kept.
    pub fn replay(&self) -> Option<Body> {
        self.ended_at()?;
        let kept = self.kept.lock().ok()?;
        if !self.keeping.load(Ordering::Relaxed) || kept.lost {
            return None;
        }
        let mut whole = bytes::BytesMut::with_capacity(kept.size);
        for chunk in &kept.data {
            whole.extend_from_slice(chunk);
        }
        Some(Body::full(whole.freeze()))
    }

    fn passed(&self, frame: &Frame<Bytes>) {
        let data = frame.data_ref();
        self.bytes
            .fetch_add(data.map_or(0, |d| d.len() as u64), Ordering::Relaxed);
        if self.keeping.load(Ordering::Relaxed)
            && let Ok(mut kept) = self.kept.lock()
            && !kept.lost
        {
            match data {
                Some(d) if kept.size + d.len() <= kept.limit => {
                    kept.size += d.len();
                    kept.data.push(d.clone());
                }
                _ => {
                    kept.lost = true;
                    kept.data = Vec::new();
                }
            }
        }
    }

    fn finish(&self) {
        if self.ended.set(Instant::now()).is_ok() {
            self.end.notify_waiters();
        }
    }
}

/// The sending side of a mirrored body. The copy never holds the request
/// up: when the mirror falls `MIRROR_FRAMES` frames behind, or the body
/// breaks, the copy is marked broken and ends with an error.
#[derive(Debug)]
struct Tee {
    tx: mpsc::Sender<Bytes>,
    broken: Arc<AtomicBool>,
    /// The whole body was copied.
    done: bool,
}

impl Drop for Tee {
    /// A body dropped before its end leaves the copy cut, not complete.
    fn drop(&mut self) {
        if !self.done {
            self.broken.store(true, Ordering::Relaxed);
        }
    }
}

/// Frames a mirror may fall behind the request before its copy is cut.
const MIRROR_FRAMES: usize = 64;

/// Envoy's stream idle timeout inside a streamed body: a peer that sends
/// nothing for `limit` ends the body with an error; and its route timeout
/// (`deadline`), which bounds the whole response, not only its head. The
/// timer is made on the first wait, so a body that arrives at once costs
/// nothing.
#[derive(Debug)]
struct IdleTimer {
    limit: Duration,
    deadline: Option<Instant>,
    sleep: Option<Pin<Box<Sleep>>>,
}

/// Why a body ended before its end.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error(transparent)]
    Peer(#[from] hyper::Error),
    /// An HTTP/2 stream of meshgate's client broke.
    #[error(transparent)]
    Stream(#[from] h2::Error),
    /// The peer sent nothing for this long.
    #[error("stream idle timeout: nothing for {0:?}")]
    Idle(Duration),
    /// The route's timeout passed before the body's end.
    #[error("route timeout: the response did not end in time")]
    Timeout,
    /// A mirror's copy fell behind the request or the request broke.
    #[error("the mirrored body was cut")]
    MirrorCut,
}

#[derive(Debug, Default)]
enum Kind {
    #[default]
    Empty,
    Full(Option<Bytes>),
    Incoming(Incoming),
    /// An upstream's answer on an HTTP/2 stream (`upstream::multiplex`),
    /// and what its `content-length` leaves to come.
    Stream(h2::RecvStream, Option<u64>),
    /// A copy of another body (a mirror's).
    Copy {
        rx: mpsc::Receiver<Bytes>,
        broken: Arc<AtomicBool>,
    },
    /// The peer's body broke; the error is returned on the next poll.
    Failed(Option<BodyError>),
}

impl Body {
    pub fn empty() -> Body {
        Body::default()
    }

    pub fn full(bytes: impl Into<Bytes>) -> Body {
        let bytes = bytes.into();
        let kind = if bytes.is_empty() {
            Kind::Empty
        } else {
            Kind::Full(Some(bytes))
        };
        Body {
            kind,
            report: None,
            idle: None,
            tees: Vec::new(),
            counted: None,
            lease: Lease::default(),
        }
    }

    /// A peer's body, streamed through; it fails if the peer sends
    /// nothing for `idle` (the stream idle timeout).
    pub fn incoming(body: impl Into<PeerBody>, idle: Duration) -> Body {
        let kind = match body.into() {
            PeerBody::Hyper(b) => Kind::Incoming(b),
            PeerBody::Stream(s, left) => Kind::Stream(s, left),
        };
        Body {
            kind,
            report: None,
            idle: Some(IdleTimer {
                limit: idle,
                deadline: None,
                sleep: None,
            }),
            tees: Vec::new(),
            counted: None,
            lease: Lease::default(),
        }
    }

    /// The stream idle timeout of a peer's body.
    pub fn idle_limit(&self) -> Option<Duration> {
        self.idle.as_ref().map(|t| t.limit)
    }

    /// A peer's body that must end by `deadline` (a route's timeout) or
    /// is cut.
    pub fn until(mut self, deadline: Option<Instant>) -> Body {
        if let Some(timer) = self.idle.as_mut() {
            timer.deadline = deadline;
        }
        self
    }

    /// An upstream response's body: its connection goes back to the pool
    /// when the body ends (now, if it has nothing to send).
    pub fn leased(mut self, mut lease: Lease) -> Body {
        if self.kind.is_end_stream() {
            lease.release();
        } else {
            self.lease = lease;
        }
        self
    }

    /// Counts the data bytes that pass, and the end, into `progress`.
    pub fn counted(mut self, progress: Arc<Progress>) -> Body {
        self.counted = Some(progress);
        self
    }

    /// A copy of this body's data for a mirror, made as the data passes.
    pub fn copy(&mut self) -> Body {
        let (tx, rx) = mpsc::channel(MIRROR_FRAMES);
        let broken = Arc::new(AtomicBool::new(false));
        self.tees.push(Tee {
            tx,
            broken: broken.clone(),
            done: self.kind.is_end_stream(),
        });
        Body {
            kind: Kind::Copy { rx, broken },
            ..Body::default()
        }
    }

    /// The body reports the request when it ends.
    pub fn reported(mut self, report: HttpReport) -> Body {
        self.report = Some(Box::new(report));
        self
    }
}

impl hyper::body::Body for Body {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        let polled = match &mut this.kind {
            Kind::Empty => Poll::Ready(None),
            Kind::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            Kind::Incoming(b) => {
                let polled = Pin::new(b).poll_frame(cx);
                this.peer_frame(polled.map(|f| f.map(|f| f.map_err(BodyError::Peer))), cx)
            }
            Kind::Stream(s, left) => {
                let polled = poll_stream(s, left, cx);
                this.peer_frame(polled, cx)
            }
            Kind::Copy { rx, broken } => match rx.poll_recv(cx) {
                Poll::Ready(Some(b)) => Poll::Ready(Some(Ok(Frame::data(b)))),
                Poll::Ready(None) if broken.load(Ordering::Relaxed) => {
                    Poll::Ready(Some(Err(BodyError::MirrorCut)))
                }
                Poll::Ready(None) => Poll::Ready(None),
                Poll::Pending => Poll::Pending,
            },
            Kind::Failed(e) => Poll::Ready(e.take().map(Err)),
        };
        if let Some(progress) = &this.counted {
            match &polled {
                Poll::Ready(Some(Ok(frame))) => {
                    progress.passed(frame);
                    if this.kind.is_end_stream() {
                        progress.finish();
                    }
                }
                Poll::Ready(None) => progress.finish(),
                _ => {}
            }
        }
        if !this.tees.is_empty() {
            // At the end (hyper may stop polling at the last byte it was
            // told of), dropping a sender ends its copy.
            let ended = matches!(polled, Poll::Ready(None)) || this.kind.is_end_stream();
            this.tees.retain_mut(|tee| {
                let keep = match &polled {
                    Poll::Ready(Some(Ok(frame))) => frame
                        .data_ref()
                        .is_none_or(|d| tee.tx.try_send(d.clone()).is_ok()),
                    Poll::Ready(Some(Err(_))) => false,
                    Poll::Ready(None) | Poll::Pending => true,
                };
                tee.done = keep && ended;
                keep && !ended
            });
        }
        if let (Poll::Ready(Some(Ok(_))), Some(timer)) = (&polled, this.idle.as_mut())
            && timer.restart().is_err()
        {
            // A body that never waits is cut here: the frame goes, the
            // rest does not.
            this.kind = Kind::Failed(Some(BodyError::Timeout));
        }
        if this.lease.is_held()
            && match &polled {
                Poll::Ready(None) => true,
                Poll::Ready(Some(Ok(_))) => this.kind.is_end_stream(),
                _ => false,
            }
        {
            this.lease.release();
        }
        if let Some(report) = this.report.as_mut() {
            match &polled {
                Poll::Ready(Some(Ok(frame))) => {
                    report.response_bytes += frame.data_ref().map_or(0, |d| d.len() as u64);
                }
                Poll::Ready(Some(Err(e))) => {
                    // Cut mid-response: reported as Envoy does, the status
                    // already sent kept.
                    match e {
                        BodyError::Idle(_) => report.stream_idle(),
                        BodyError::Timeout => report.route_timeout(),
                        BodyError::Peer(_) | BodyError::Stream(_) | BodyError::MirrorCut => {
                            report.upstream_reset();
                        }
                    }
                    drop(this.report.take());
                }
                Poll::Ready(None) => drop(this.report.take()),
                Poll::Pending => {}
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.kind.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.kind.size_hint()
    }
}

impl Kind {
    fn is_end_stream(&self) -> bool {
        match self {
            Kind::Empty => true,
            Kind::Full(b) => b.is_none(),
            Kind::Incoming(b) => hyper::body::Body::is_end_stream(b),
            Kind::Stream(s, _) => s.is_end_stream(),
            Kind::Copy { .. } => false,
            Kind::Failed(e) => e.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Kind::Empty => SizeHint::with_exact(0),
            Kind::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            Kind::Incoming(b) => hyper::body::Body::size_hint(b),
            Kind::Stream(_, Some(left)) => SizeHint::with_exact(*left),
            Kind::Stream(_, None) | Kind::Copy { .. } | Kind::Failed(_) => SizeHint::default(),
        }
    }
}

impl Body {
    /// A frame (or the wait for one) of a peer's body. A cut: first let the
    /// connection flush what it holds (the status line, the body so far),
    /// then fail, or the client would see nothing at all of a response
    /// already logged.
    fn peer_frame(
        &mut self,
        polled: Poll<Option<Result<Frame<Bytes>, BodyError>>>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match polled {
            Poll::Ready(Some(Err(e))) => {
                self.kind = Kind::Failed(Some(e));
                cx.waker().wake_by_ref();
                Poll::Pending
            }
            Poll::Ready(frame) => Poll::Ready(frame),
            Poll::Pending => self.idle.as_mut().map_or(Poll::Pending, |t| t.poll(cx)),
        }
    }
}

/// The next frame of an HTTP/2 stream: data (its window given back to the
/// peer as it is taken), then trailers.
fn poll_stream(
    s: &mut h2::RecvStream,
    left: &mut Option<u64>,
    cx: &mut Context<'_>,
) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
    match s.poll_data(cx) {
        Poll::Ready(Some(Ok(data))) => {
            // h2 checks the length against `content-length` itself.
            let _ = s.flow_control().release_capacity(data.len());
            if let Some(left) = left {
                *left = left.saturating_sub(data.len() as u64);
            }
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
        Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e.into()))),
        Poll::Ready(None) => {}
        Poll::Pending => return Poll::Pending,
    }
    match s.poll_trailers(cx) {
        Poll::Ready(Ok(t)) => Poll::Ready(t.map(|t| Ok(Frame::trailers(t)))),
        Poll::Ready(Err(e)) => Poll::Ready(Some(Err(e.into()))),
        Poll::Pending => Poll::Pending,
    }
}

/// A peer's body as its connection hands it over: hyper's (HTTP/1.1
/// connections and the listeners), or a stream of meshgate's HTTP/2 client
/// with what its `content-length` says.
#[derive(Debug)]
pub enum PeerBody {
    Hyper(Incoming),
    Stream(h2::RecvStream, Option<u64>),
}

impl From<Incoming> for PeerBody {
    fn from(b: Incoming) -> Self {
        PeerBody::Hyper(b)
    }
}

impl IdleTimer {
    /// When the body fails if nothing comes from `now` on.
    fn due(&self, now: Instant) -> Instant {
        let idle = now + self.limit;
        self.deadline.map_or(idle, |d| d.min(idle))
    }

    /// Waits on the timer (made now if it is the first wait).
    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let due = self.due(Instant::now());
        let sleep = self
            .sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(due)));
        match sleep.as_mut().poll(cx) {
            Poll::Ready(()) if self.deadline.is_some_and(|d| d <= sleep.deadline()) => {
                Poll::Ready(Some(Err(BodyError::Timeout)))
            }
            Poll::Ready(()) => Poll::Ready(Some(Err(BodyError::Idle(self.limit)))),
            Poll::Pending => Poll::Pending,
        }
    }

    /// Something arrived: the peer has `limit` again, within the deadline;
    /// past the deadline, an error.
    fn restart(&mut self) -> Result<(), BodyError> {
        // Never waited and no deadline: nothing to move (no clock read).
        if self.sleep.is_none() && self.deadline.is_none() {
            return Ok(());
        }
        let now = Instant::now();
        if self.deadline.is_some_and(|d| d <= now) {
            return Err(BodyError::Timeout);
        }
        let due = self.due(now);
        if let Some(sleep) = self.sleep.as_mut() {
            sleep.as_mut().reset(due);
        }
        Ok(())
    }
}

/// A response made by the proxy (`server: meshgate`), plain text unless
/// `content_type` says otherwise.
pub fn local_response(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Body> {
    let mut resp = Response::new(Body::full(body));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(header::SERVER, HeaderValue::from_static("meshgate"));
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}

/// A plain-text response made by the proxy.
pub fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    local_response(status, "text/plain", body)
}

#[cfg(test)]
mod tests {
    use http_body_util::BodyExt;

    use super::*;

    #[tokio::test]
    async fn a_copy_gets_what_passed_and_is_cut_when_the_body_is_dropped_early() {
        let mut body = Body::full("hello mirror");
        let copy = body.copy();
        let sent = body.collect().await.unwrap().to_bytes();
        assert_eq!(copy.collect().await.unwrap().to_bytes(), sent);

        let mut unread = Body::full("never read");
        let cut = unread.copy();
        drop(unread);
        assert!(matches!(cut.collect().await, Err(BodyError::MirrorCut)));
    }

    /// A body kept for retries comes again whole once it has ended, and
    /// not at all when it outgrew the limit or never ended.
    #[tokio::test]
    async fn a_kept_body_is_replayed_whole_and_only_whole() {
        let kept = |text: &'static str, limit: usize| {
            let progress = Arc::new(Progress::default());
            progress.keep(limit);
            (Body::full(text).counted(progress.clone()), progress)
        };
        let (body, progress) = kept("sent once, sent again", 64);
        assert!(progress.replay().is_none(), "not before its end");
        let sent = body.collect().await.unwrap().to_bytes();
        let again = progress.replay().unwrap().collect().await.unwrap();
        assert_eq!(again.to_bytes(), sent);
        assert!(progress.replay().is_some(), "as often as asked");

        let (body, progress) = kept("longer than the limit", 8);
        body.collect().await.unwrap();
        assert!(progress.replay().is_none());

        let unkept = Arc::new(Progress::default());
        Body::full("never asked to be kept")
            .counted(unkept.clone())
            .collect()
            .await
            .unwrap();
        assert!(unkept.replay().is_none());
    }
}
