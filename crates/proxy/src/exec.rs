//! The executor hyper's HTTP/2 server spawns its per-stream tasks with
//! (the HTTP/2 client is meshgate's own: `upstream/multiplex.rs`).

use std::future::Future;

/// Spawns hyper's tasks boxed. hyper hands a task over by value, and a
/// task's type is as large as its largest state: a stream's holds the
/// request's whole future (kilobytes). Spawned as it is, it is copied
/// several times on its way into its task and again as the task finishes;
/// boxed at once, a pointer is.
#[derive(Debug, Clone, Copy, Default)]
pub struct BoxingExecutor;

impl<F> hyper::rt::Executor<F> for BoxingExecutor
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, fut: F) {
        tokio::spawn(Box::pin(fut));
    }
}
