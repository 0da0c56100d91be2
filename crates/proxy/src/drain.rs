//! Graceful shutdown, as Istio's proxies drain on SIGTERM: stop accepting,
//! let requests in flight finish (keep-alive connections are closed after
//! their current response), and exit once every connection is gone or the
//! drain duration (Istio's `terminationDrainDuration`, 5s) has passed.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
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

/// Serves an HTTP connection future until it ends; when draining starts,
/// or `idle` resolves, it is asked (`shutdown`) to finish its current
/// requests and close (after an idle shutdown, within 5 s: a client that
/// never answers the GOAWAY's ping does not keep it).
pub async fn serve_until_drained<C, E>(
    drain: &Drain,
    conn: C,
    shutdown: fn(Pin<&mut C>),
    idle: impl Future<Output = ()>,
) -> Result<(), E>
where
    C: Future<Output = Result<(), E>>,
{
    let mut conn = std::pin::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => r,
        () = drain.started() => {
            shutdown(conn.as_mut());
            conn.await
        }
        () = idle => {
            shutdown(conn.as_mut());
            tokio::time::timeout(IDLE_CLOSE_GRACE, conn).await.unwrap_or(Ok(()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
