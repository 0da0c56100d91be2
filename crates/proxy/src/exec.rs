//! The executor hyper spawns its per-request tasks with.

use std::future::Future;

/// Spawns hyper's tasks boxed. hyper hands a task over by value, and a
/// task's type is as large as its largest state: the HTTP/2 client's is an
/// enum whose largest variant is the whole connection (~1.5 KB) while the
/// one spawned per request waits for a response (~100 B); the HTTP/2
/// server's holds the request's whole future (kilobytes). Spawned as they
/// are, each is copied several times on its way into its task and again as
/// the task finishes; boxed at once, a pointer is.
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
