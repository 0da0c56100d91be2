//! Graceful shutdown, as Istio's proxies drain on SIGTERM: stop accepting,
//! let requests in flight finish (keep-alive connections are closed after
//! their current response), and exit once every connection is gone or the
//! drain duration (Istio's `terminationDrainDuration`, 5s) has passed.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use tokio::sync::{Notify, watch};

/// Shared by a proxy's listeners and connections.
#[derive(Debug, Clone)]
pub struct Drain {
    draining: watch::Sender<bool>,
    inner: Arc<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    connections: AtomicUsize,
    all_closed: Notify,
}

/// Counts one open connection until dropped.
#[derive(Debug)]
pub struct ConnectionGuard(Arc<Inner>);

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        if self.0.connections.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.all_closed.notify_waiters();
        }
    }
}

impl Default for Drain {
    fn default() -> Self {
        Drain {
            draining: watch::Sender::new(false),
            inner: Arc::default(),
        }
    }
}

impl Drain {
    /// Registers a connection.
    pub fn connection(&self) -> ConnectionGuard {
        self.inner.connections.fetch_add(1, Ordering::AcqRel);
        ConnectionGuard(self.inner.clone())
    }

    /// Registers a connection unless `max` are open (Envoy's overload
    /// manager `global_downstream_max_connections`); `None`: no limit.
    pub fn admit(&self, max: Option<usize>) -> Option<ConnectionGuard> {
        let Some(max) = max else {
            return Some(self.connection());
        };
        self.inner
            .connections
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()?;
        Some(ConnectionGuard(self.inner.clone()))
    }

    pub fn open_connections(&self) -> usize {
        self.inner.connections.load(Ordering::Acquire)
    }

    /// Has draining started?
    pub fn is_draining(&self) -> bool {
        *self.draining.borrow()
    }

    /// Resolves when draining starts (at once if it has).
    pub fn started(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut rx = self.draining.subscribe();
        async move {
            let _ = rx.wait_for(|d| *d).await;
        }
    }

    /// Starts draining and waits until every connection has closed, or
    /// `limit` has passed. Returns the connections still open.
    pub async fn drain(&self, limit: Duration) -> usize {
        self.draining.send_replace(true);
        let closed = async {
            loop {
                // Registered before the check, so a close in between is seen.
                let notified = self.inner.all_closed.notified();
                if self.open_connections() == 0 {
                    return;
                }
                notified.await;
            }
        };
        let _ = tokio::time::timeout(limit, closed).await;
        self.open_connections()
    }
}

/// How long a connection closing for idleness may take to finish its
/// goodbye (Envoy's `drain_timeout`: between the first GOAWAY and closing).
const IDLE_CLOSE_GRACE: Duration = Duration::from_secs(5);

/// How a connection that `serve_until_drained`'s idle future ended closes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Closing {
    /// Asked to finish and close, within 5 s.
    Graceful,
    /// Closed at once (a client that never finished its request's head).
    Now,
}

/// Serves an HTTP connection future until it ends; when draining starts,
/// or `idle` resolves, it is asked (`shutdown`) to finish its current
/// requests and close (after an idle shutdown, within 5 s: a client that
/// never answers the GOAWAY's ping does not keep it), or closed at once.
pub async fn serve_until_drained<C, E>(
    drain: &Drain,
    conn: C,
    shutdown: fn(Pin<&mut C>),
    idle: impl Future<Output = Closing>,
) -> Result<(), E>
where
    C: Future<Output = Result<(), E>>,
{
    let mut conn = std::pin::pin!(conn);
    let started = drain.started();
    // Polled only when its own timer or channel woke it, not on each of
    // the connection's many wake-ups per request.
    let stop = PollWhenWoken::new(async {
        tokio::select! {
            () = started => Stop::Drain,
            how = idle => Stop::Idle(how),
        }
    });
    tokio::select! {
        biased;
        r = conn.as_mut() => r,
        stop = stop => {
            match stop {
                Stop::Drain => {
                    shutdown(conn.as_mut());
                    conn.await
                }
                Stop::Idle(Closing::Graceful) => {
                    shutdown(conn.as_mut());
                    tokio::time::timeout(IDLE_CLOSE_GRACE, conn).await.unwrap_or(Ok(()))
                }
                Stop::Idle(Closing::Now) => Ok(()),
            }
        }
    }
}

/// Why a connection is asked to close.
#[derive(Debug, Clone, Copy)]
enum Stop {
    Drain,
    Idle(Closing),
}

pin_project_lite::pin_project! {
    /// A future polled only after something it waits on woke it (or on the
    /// first poll): beside a busy future in one task, it costs an atomic
    /// load per wake-up of the task instead of a poll of its timers.
    struct PollWhenWoken<F> {
        #[pin]
        inner: F,
        flag: Arc<WakeFlag>,
        waker: Waker,
    }
}

/// Set when the inner future's waker is called; passes the wake-up on.
#[derive(Debug)]
struct WakeFlag {
    woken: AtomicBool,
    task: std::sync::Mutex<Option<Waker>>,
}

impl Wake for WakeFlag {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        let task = self.task.lock().ok().and_then(|t| t.clone());
        if let Some(task) = task {
            task.wake();
        }
    }
}

impl<F> PollWhenWoken<F> {
    fn new(inner: F) -> Self {
        let flag = Arc::new(WakeFlag {
            woken: AtomicBool::new(true),
            task: std::sync::Mutex::new(None),
        });
        PollWhenWoken {
            inner,
            waker: Waker::from(flag.clone()),
            flag,
        }
    }
}

impl<F: Future> Future for PollWhenWoken<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        if let Ok(mut task) = this.flag.task.lock()
            && !task.as_ref().is_some_and(|t| t.will_wake(cx.waker()))
        {
            *task = Some(cx.waker().clone());
        }
        if !this.flag.woken.swap(false, Ordering::AcqRel) {
            return Poll::Pending;
        }
        this.inner.poll(&mut Context::from_waker(this.waker))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A connection that wakes often never makes the idle timer poll, and
    /// the timer still ends it.
    #[tokio::test(start_paused = true)]
    async fn the_stop_future_is_polled_when_it_is_woken() {
        let polls = Arc::new(AtomicUsize::new(0));
        let counted = {
            let polls = polls.clone();
            let mut sleep = Box::pin(tokio::time::sleep(Duration::from_secs(60)));
            std::future::poll_fn(move |cx| {
                polls.fetch_add(1, Ordering::SeqCst);
                sleep.as_mut().poll(cx).map(|()| Closing::Graceful)
            })
        };
        let busy = async {
            // A connection woken 1,000 times.
            for _ in 0..1000 {
                tokio::task::yield_now().await;
            }
            std::future::pending::<Result<(), ()>>().await
        };
        let start = tokio::time::Instant::now();
        let served = serve_until_drained(&Drain::default(), busy, |_| {}, counted).await;
        assert_eq!(served, Ok(()), "closed by the idle timer, within the grace");
        assert_eq!(start.elapsed(), Duration::from_secs(60) + IDLE_CLOSE_GRACE);
        assert!(polls.load(Ordering::SeqCst) <= 3, "{polls:?} polls");
    }

    #[tokio::test]
    async fn drain_waits_for_connections_and_gives_up_at_the_limit() {
        let d = Drain::default();
        assert_eq!(d.drain(Duration::from_secs(5)).await, 0, "nothing open");

        let d = Drain::default();
        let g = d.connection();
        let started = d.started();
        let closer = tokio::spawn(async move {
            started.await;
            drop(g);
        });
        assert_eq!(d.drain(Duration::from_secs(5)).await, 0);
        closer.await.unwrap();

        let d = Drain::default();
        let _stuck = d.connection();
        assert_eq!(d.drain(Duration::from_millis(10)).await, 1);
    }
}
