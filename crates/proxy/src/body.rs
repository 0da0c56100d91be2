//! The one body type of the data path (requests sent upstream, responses
//! sent downstream and reported when they end, the admin ports' answers),
//! and the one builder of responses the proxy makes itself.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Response, StatusCode};
use hyper::body::{Frame, Incoming, SizeHint};

use crate::report::HttpReport;

/// A body: nothing, bytes we have, or a peer's body streamed through;
/// with a report attached (a downstream response), it counts the bytes
/// and writes the report when it ends or is dropped.
#[derive(Debug, Default)]
pub struct Body {
    kind: Kind,
    report: Option<HttpReport>,
}

#[derive(Debug, Default)]
enum Kind {
    #[default]
    Empty,
    Full(Option<Bytes>),
    Incoming(Incoming),
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
        Body { kind, report: None }
    }

    pub fn incoming(body: Incoming) -> Body {
        Body {
            kind: Kind::Incoming(body),
            report: None,
        }
    }

    /// The body reports the request when it ends.
    pub fn reported(mut self, report: HttpReport) -> Body {
        self.report = Some(report);
        self
    }
}

impl hyper::body::Body for Body {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let polled = match &mut this.kind {
            Kind::Empty => Poll::Ready(None),
            Kind::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            Kind::Incoming(b) => Pin::new(b).poll_frame(cx),
        };
        if let Some(report) = this.report.as_mut() {
            match &polled {
                Poll::Ready(Some(Ok(frame))) => {
                    report.response_bytes += frame.data_ref().map_or(0, |d| d.len() as u64);
                }
                Poll::Ready(Some(Err(_))) => {
                    // The upstream went away mid-response: reported as
                    // Envoy does (UC, the status already sent kept).
                    report.upstream_reset();
                    drop(this.report.take());
                }
                Poll::Ready(None) => drop(this.report.take()),
                Poll::Pending => {}
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Empty => true,
            Kind::Full(b) => b.is_none(),
            Kind::Incoming(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Empty => SizeHint::with_exact(0),
            Kind::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            Kind::Incoming(b) => b.size_hint(),
        }
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
