//! Errors of the data path, each saying who is at fault (pingora's shape):
//! the operator reading a log line learns whether the client, the upstream
//! or this proxy's config is to blame.

use std::time::Duration;

use crate::plan::Refusal;
use crate::upstream::UpstreamError;

/// Who caused a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The client: bad bytes, too slow, gone.
    Downstream,
    /// The upstream: unreachable, refused, reset, too slow.
    Upstream,
    /// This proxy's config: no route, denied, a limit reached.
    Config,
}

impl Fault {
    pub fn as_str(self) -> &'static str {
        match self {
            Fault::Downstream => "downstream",
            Fault::Upstream => "upstream",
            Fault::Config => "config",
        }
    }
}

/// Why a downstream connection ended early.
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    #[error("reading from the client: {0}")]
    Read(#[source] std::io::Error),
    #[error("no data from the client within {0:?}")]
    Idle(Duration),
    #[error("the client closed the connection before {0}")]
    Closed(&'static str),
    #[error("not a TLS ClientHello")]
    NotClientHello,
    #[error("ClientHello larger than a TLS record")]
    HelloTooLarge,
    #[error("TLS handshake failed: {0}")]
    Handshake(String),
    #[error("TLS handshake not finished within {0:?}")]
    HandshakeTimeout(Duration),
    #[error("{0}")]
    Refused(#[from] Refusal),
    #[error("HTTP: {0}")]
    Http(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("{0}")]
    Upstream(#[from] UpstreamError),
    #[error("cannot resolve {0}")]
    Resolve(String),
    /// The plan closes the connection (no route, black hole, denied).
    #[error("closed: {0}")]
    NotForwarded(crate::plan::TcpReason),
}

impl ConnError {
    pub fn fault(&self) -> Fault {
        match self {
            ConnError::Refused(_) | ConnError::NotForwarded(_) => Fault::Config,
            ConnError::Upstream(e) => e.fault(),
            ConnError::Resolve(_) => Fault::Upstream,
            _ => Fault::Downstream,
        }
    }
}
