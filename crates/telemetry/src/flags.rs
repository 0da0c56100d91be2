//! Envoy's response flags: why a request or connection ended the way it
//! did, as `%RESPONSE_FLAGS%` prints them and Istio's `response_flags`
//! label carries them (`-` for none, else short names joined by commas in
//! Envoy's order).

use std::fmt;

use prometheus_client::encoding::{EncodeLabelValue, LabelValueEncoder};
use serde::{Serialize, Serializer};

/// A set of Envoy response flags.
#[derive(Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct ResponseFlags(u16);

/// The flags meshgate sets, in the order Envoy prints them.
const NAMES: [(ResponseFlags, &str); 13] = [
    (ResponseFlags::NO_HEALTHY_UPSTREAM, "UH"),
    (ResponseFlags::UPSTREAM_REQUEST_TIMEOUT, "UT"),
    (ResponseFlags::UPSTREAM_REMOTE_RESET, "UR"),
    (ResponseFlags::UPSTREAM_CONNECTION_FAILURE, "UF"),
    (ResponseFlags::UPSTREAM_CONNECTION_TERMINATION, "UC"),
    (ResponseFlags::UPSTREAM_OVERFLOW, "UO"),
    (ResponseFlags::NO_ROUTE_FOUND, "NR"),
    (ResponseFlags::DELAY_INJECTED, "DI"),
    (ResponseFlags::FAULT_INJECTED, "FI"),
    (ResponseFlags::UPSTREAM_RETRY_LIMIT_EXCEEDED, "URX"),
    (ResponseFlags::STREAM_IDLE_TIMEOUT, "SI"),
    (ResponseFlags::DOWNSTREAM_PROTOCOL_ERROR, "DPE"),
    (ResponseFlags::NO_CLUSTER_FOUND, "NC"),
];

impl ResponseFlags {
    /// `-`: nothing went wrong.
    pub const NONE: Self = ResponseFlags(0);
    /// UH: no healthy endpoint (DNS failed, every endpoint ejected), or a
    /// connection to BlackHoleCluster.
    pub const NO_HEALTHY_UPSTREAM: Self = ResponseFlags(1);
    /// UT: the route's timeout (or a per-try timeout) passed.
    pub const UPSTREAM_REQUEST_TIMEOUT: Self = ResponseFlags(1 << 1);
    /// UF: connecting (or the TLS handshake) to the upstream failed.
    pub const UPSTREAM_CONNECTION_FAILURE: Self = ResponseFlags(1 << 2);
    /// UC: the upstream connection broke before a response.
    pub const UPSTREAM_CONNECTION_TERMINATION: Self = ResponseFlags(1 << 3);
    /// UO: the circuit breaker is open.
    pub const UPSTREAM_OVERFLOW: Self = ResponseFlags(1 << 4);
    /// NR: no route for the request (or no filter chain for the SNI).
    pub const NO_ROUTE_FOUND: Self = ResponseFlags(1 << 5);
    /// DI: a fault delay was injected.
    pub const DELAY_INJECTED: Self = ResponseFlags(1 << 6);
    /// FI: a fault abort was injected.
    pub const FAULT_INJECTED: Self = ResponseFlags(1 << 7);
    /// URX: retries are used up and the last attempt failed.
    pub const UPSTREAM_RETRY_LIMIT_EXCEEDED: Self = ResponseFlags(1 << 8);
    /// DPE: the downstream request was malformed.
    pub const DOWNSTREAM_PROTOCOL_ERROR: Self = ResponseFlags(1 << 9);
    /// NC: the route names a cluster the proxy does not have.
    pub const NO_CLUSTER_FOUND: Self = ResponseFlags(1 << 10);
    /// SI: nothing moved on the stream for the stream idle timeout.
    pub const STREAM_IDLE_TIMEOUT: Self = ResponseFlags(1 << 11);
    /// UR: the upstream reset the request's stream before answering
    /// (HTTP/2 RST_STREAM, REFUSED_STREAM among them).
    pub const UPSTREAM_REMOTE_RESET: Self = ResponseFlags(1 << 12);

    /// Both sets.
    #[must_use]
    pub const fn with(self, other: Self) -> Self {
        ResponseFlags(self.0 | other.0)
    }

    pub const fn contains(self, other: Self) -> bool {
        self.0 & other.0 == other.0
    }

    pub const fn is_empty(self) -> bool {
        self.0 == 0
    }

    fn write(self, out: &mut impl fmt::Write) -> fmt::Result {
        if self.is_empty() {
            return out.write_str("-");
        }
        let mut first = true;
        for (flag, name) in NAMES {
            if self.contains(flag) {
                if !first {
                    out.write_char(',')?;
                }
                out.write_str(name)?;
                first = false;
            }
        }
        Ok(())
    }
}

impl fmt::Display for ResponseFlags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.write(f)
    }
}

impl fmt::Debug for ResponseFlags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.write(f)
    }
}

impl EncodeLabelValue for ResponseFlags {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), fmt::Error> {
        self.write(encoder)
    }
}

impl Serialize for ResponseFlags {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prints_as_envoy_does() {
        assert_eq!(ResponseFlags::NONE.to_string(), "-");
        assert_eq!(ResponseFlags::NO_ROUTE_FOUND.to_string(), "NR");
        let retried = ResponseFlags::UPSTREAM_RETRY_LIMIT_EXCEEDED
            .with(ResponseFlags::UPSTREAM_CONNECTION_FAILURE);
        assert_eq!(retried.to_string(), "UF,URX");
        let refused =
            ResponseFlags::UPSTREAM_REMOTE_RESET.with(ResponseFlags::UPSTREAM_REQUEST_TIMEOUT);
        assert_eq!(refused.to_string(), "UT,UR");
        assert!(retried.contains(ResponseFlags::UPSTREAM_CONNECTION_FAILURE));
        assert_eq!(
            serde_json::to_string(&ResponseFlags::NO_CLUSTER_FOUND).ok(),
            Some("\"NC\"".to_owned())
        );
    }
}
