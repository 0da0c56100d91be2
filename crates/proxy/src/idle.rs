//! Envoy's connection idle timeout (the HTTP connection manager's
//! `idle_timeout`, 1 h by default): a downstream HTTP connection with no
//! request in flight for that long is closed gracefully (GOAWAY on HTTP/2).
//! Without it an HTTP/2 client could hold a connection, and its file
//! descriptor, forever. A request is in flight from the moment it arrives
//! until its response body has been sent.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use hyper::body::{Body, Frame, SizeHint};
use hyper::service::Service;
use tokio::time::Instant;

/// One connection's requests in flight, and since when it has had none.
/// Requests only count; the watcher (`idle_for`) wakes at deadlines and
/// reads the count, so a request costs no timer and no wake-up.
#[derive(Debug)]
pub struct Activity {
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    in_flight: usize,
    idle_since: Instant,
}

impl Activity {
    pub fn new() -> Arc<Activity> {
        Arc::new(Activity {
            state: Mutex::new(State {
                in_flight: 0,
                idle_since: Instant::now(),
            }),
        })
    }

    fn start(self: &Arc<Self>) -> InFlight {
        if let Ok(mut s) = self.state.lock() {
            s.in_flight += 1;
        }
        InFlight(self.clone())
    }

    /// When no request has been in flight for `limit`: exactly then if the
    /// connection went quiet, checked again `limit` later while busy (the
    /// soonest it could have been quiet that long).
    pub async fn idle_for(&self, limit: Duration) {
        loop {
            let idle_since = self
                .state
                .lock()
                .ok()
                .and_then(|s| (s.in_flight == 0).then_some(s.idle_since));
            let deadline = match idle_since {
                Some(since) if since + limit <= Instant::now() => return,
                Some(since) => since + limit,
                None => Instant::now() + limit,
            };
            tokio::time::sleep_until(deadline).await;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn idle_only_without_requests_in_flight() {
        let activity = Activity::new();
        let limit = Duration::from_secs(60);
        let start = Instant::now();
        let busy = activity.start();
        let idle = tokio::spawn({
            let a = activity.clone();
            async move { a.idle_for(limit).await }
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
            async move { a.idle_for(limit).await }
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
}
