//! The HTTP/2 client: requests on a shared connection, through `h2`
//! directly. hyper's client hands each request to a task of its own over
//! a channel, spawns another per request to wait for the answer, and sends
//! the answer back over a oneshot; here the request's own future sends its
//! head and awaits its answer, and only a request whose body has more to
//! come spawns a task, to stream it. The connection's settings are hyper's
//! defaults, as before.

use std::future::poll_fn;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use h2::client::SendRequest;
use http::header::{self, HeaderMap, HeaderName};
use http::{Request, Response};
use http_body_util::BodyExt as _;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::oneshot;

use crate::body::{Body, BodyError, PeerBody};

/// Receive windows, frame and buffer sizes: hyper's client defaults.
const CONN_WINDOW: u32 = 5 * 1024 * 1024;
const STREAM_WINDOW: u32 = 2 * 1024 * 1024;
const MAX_FRAME: u32 = 16 * 1024;
const MAX_SEND_BUFFER: usize = 1024 * 1024;
const MAX_HEADER_LIST: u32 = 16 * 1024;
/// Streams opened before the server's SETTINGS say how many it takes.
const INITIAL_SEND_STREAMS: usize = 100;
/// Streams this side may reset for the peer's errors before it gives the
/// connection up (hyper's default).
const LOCAL_ERROR_RESETS: usize = 1024;

/// How long a request body waits for the peer to open its window before
/// the stream is reset: the body's own stream idle timeout (which bounds
/// the waits for it), else Envoy's default.
const WINDOW_WAIT: Duration = Duration::from_secs(300);

/// Headers HTTP/2 forbids (RFC 9113 §8.2.2); h2 refuses a request with
/// one. The forwarding path drops them (`forward.rs`), but a route's
/// header operations may set one again.
const CONNECTION_HEADERS: [HeaderName; 5] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// An open connection: where requests go, and whether it has ended.
#[derive(Debug, Clone)]
pub(super) struct Handle {
    pub(super) sender: SendRequest<Bytes>,
    closed: Arc<AtomicBool>,
}

impl Handle {
    pub(super) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Relaxed)
    }
}

/// Why a request on an HTTP/2 connection got no answer.
#[derive(Debug, thiserror::Error)]
pub(super) enum SendError {
    #[error(transparent)]
    Stream(#[from] h2::Error),
    /// Reading the request's body failed (and the stream was reset).
    #[error("the request body failed: {0}")]
    Body(BodyError),
}

/// Speaks HTTP/2 on `io` (the caller bounds the wait); the connection is
/// driven by a task of its own until it ends.
pub(super) async fn handshake<T>(io: T) -> Result<Handle, h2::Error>
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (sender, connection) = h2::client::Builder::new()
        .initial_max_send_streams(INITIAL_SEND_STREAMS)
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONN_WINDOW)
        .max_frame_size(MAX_FRAME)
        .max_header_list_size(MAX_HEADER_LIST)
        .max_send_buffer_size(MAX_SEND_BUFFER)
        .max_local_error_reset_streams(Some(LOCAL_ERROR_RESETS))
        .enable_push(false)
        .handshake::<T, Bytes>(io)
        .await?;
    let closed = Arc::new(AtomicBool::new(false));
    let ended = closed.clone();
    // Boxed: the connection's state is large, and is moved once here
    // instead of into and around the task.
    tokio::spawn(Box::pin(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "upstream connection closed");
        }
        ended.store(true, Ordering::Relaxed);
    }));
    Ok(Handle { sender, closed })
}

/// Sends `req` on a connection that `ready` said can open a stream, and
/// waits for the answer's head.
pub(super) async fn send(
    sender: &mut SendRequest<Bytes>,
    req: Request<Body>,
) -> Result<Response<PeerBody>, SendError> {
    let (mut head, body) = req.into_parts();
    strip_connection_headers(&mut head.headers);
    let end = hyper::body::Body::is_end_stream(&body);
    let (response, stream) = sender.send_request(Request::from_parts(head, ()), end)?;
    let failed = (!end).then(|| {
        let (tx, rx) = oneshot::channel();
        tokio::spawn(pipe(body, stream, tx));
        rx
    });
    match response.await {
        Ok(resp) => {
            let length = resp
                .headers()
                .get(header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok()?.parse().ok());
            Ok(resp.map(|s| PeerBody::Stream(s, length)))
        }
        Err(e) => Err(match failed.and_then(|mut rx| rx.try_recv().ok()) {
            Some(body_error) => SendError::Body(body_error),
            None => SendError::Stream(e),
        }),
    }
}

/// Waits until the connection can open one more stream.
pub(super) async fn ready(sender: &mut SendRequest<Bytes>) -> Result<(), h2::Error> {
    poll_fn(|cx| sender.poll_ready(cx)).await
}

/// Removes what HTTP/2 forbids; most requests have none of it, and one pass
/// over their names says so.
fn strip_connection_headers(headers: &mut HeaderMap) {
    if !headers
        .keys()
        .any(|k| k == header::TE || CONNECTION_HEADERS.contains(k))
    {
        return;
    }
    // `te: trailers` is the one TE HTTP/2 allows (gRPC sends it).
    if headers.get(header::TE).is_some_and(|te| te != "trailers") {
        headers.remove(header::TE);
    }
    // The names `Connection` lists are this connection's too.
    if let Some(listed) = headers.remove(header::CONNECTION)
        && let Ok(listed) = listed.to_str()
    {
        for name in listed.split(',') {
            headers.remove(name.trim());
        }
    }
    for h in &CONNECTION_HEADERS[1..] {
        headers.remove(h);
    }
}

/// Streams a request's body up, as the peer's flow control allows. A body
/// that fails resets the stream (CANCEL), after saying why on `failed`; a
/// stream the peer resets stops the copy.
async fn pipe(
    mut body: Body,
    mut stream: h2::SendStream<Bytes>,
    failed: oneshot::Sender<BodyError>,
) {
    let window_wait = body.idle_limit().unwrap_or(WINDOW_WAIT);
    loop {
        let frame = tokio::select! {
            biased;
            _ = poll_fn(|cx| stream.poll_reset(cx)) => return,
            frame = body.frame() => frame,
        };
        let sent = match frame {
            None => stream.send_data(Bytes::new(), true),
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => {
                    let end = hyper::body::Body::is_end_stream(&body);
                    match send_data(&mut stream, data, end, window_wait).await {
                        Ok(()) if !end => continue,
                        other => other,
                    }
                }
                Err(frame) => match frame.into_trailers() {
                    Ok(trailers) => stream.send_trailers(trailers),
                    Err(_) => continue,
                },
            },
            Some(Err(e)) => {
                let _ = failed.send(e);
                stream.send_reset(h2::Reason::CANCEL);
                return;
            }
        };
        if let Err(e) = sent {
            tracing::debug!(error = %e, "request body not sent");
        }
        return;
    }
}

/// Sends `data` in pieces the peer's window takes.
async fn send_data(
    stream: &mut h2::SendStream<Bytes>,
    mut data: Bytes,
    end: bool,
    window_wait: Duration,
) -> Result<(), h2::Error> {
    if data.is_empty() {
        // An empty last frame still ends the stream.
        return if end {
            stream.send_data(data, true)
        } else {
            Ok(())
        };
    }
    while !data.is_empty() {
        stream.reserve_capacity(data.len());
        let window = tokio::time::timeout(window_wait, poll_fn(|cx| stream.poll_capacity(cx)));
        let granted = match window.await {
            Ok(Some(granted)) => granted?,
            Ok(None) => return Err(h2::Reason::STREAM_CLOSED.into()),
            Err(_) => {
                stream.send_reset(h2::Reason::CANCEL);
                return Err(h2::Reason::CANCEL.into());
            }
        };
        if granted > 0 {
            let piece = data.split_to(granted.min(data.len()));
            stream.send_data(piece, end && data.is_empty())?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use http::HeaderValue;

    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn what_http2_forbids_is_removed_and_the_rest_kept() {
        let mut h = headers(&[
            ("connection", "keep-alive, x-hop"),
            ("x-hop", "1"),
            ("keep-alive", "timeout=5"),
            ("upgrade", "websocket"),
            ("te", "gzip"),
            ("accept", "*/*"),
        ]);
        strip_connection_headers(&mut h);
        assert_eq!(h, headers(&[("accept", "*/*")]));

        let grpc = headers(&[("te", "trailers"), ("content-type", "application/grpc")]);
        let mut kept = grpc.clone();
        strip_connection_headers(&mut kept);
        assert_eq!(kept, grpc);
    }
}
