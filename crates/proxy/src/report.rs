//! Reports, written by drop guards: an HTTP request is reported when its
//! response body ends (or is abandoned), a TCP connection when it closes,
//! however either ends, so an early error still writes the metric and the
//! access-log line.

use std::sync::Arc;
use std::time::Instant;

use meshgate_telemetry::{EgressLabels, IstioLabels, LogEntry, Refused, ResponseFlags, TcpLabels};

use crate::labels::DestinationLabels;
use crate::proxy::Proxy;
use crate::snapshot::Snapshot;

/// One HTTP request's report, written when dropped.
#[derive(Debug)]
pub struct HttpReport {
    pub proxy: Arc<Proxy>,
    pub start: Instant,
    pub labels: IstioLabels,
    pub egress: Option<EgressLabels>,
    pub entry: Option<Box<LogEntry>>,
    /// Body bytes (the access log's `BYTES_RECEIVED` and `BYTES_SENT`).
    pub request_bytes: u64,
    /// The request body's bytes as they went upstream, when it had one:
    /// replaces `request_bytes` (a chunked body has no Content-Length).
    pub request_counter: Option<Arc<crate::body::Progress>>,
    pub response_bytes: u64,
    /// The request's and the response's header bytes: Istio's
    /// `istio_request_bytes` and `istio_response_bytes` count headers and
    /// body (`request.total_size`, `response.total_size`).
    pub header_bytes: (u64, u64),
}

impl HttpReport {
    /// The stream idle timeout cut the response after it started.
    pub fn stream_idle(&mut self) {
        self.cut(ResponseFlags::STREAM_IDLE_TIMEOUT, "stream_idle_timeout");
    }

    /// The route's timeout cut the response after it started (Envoy resets
    /// the stream: UT, `response_timeout`).
    pub fn route_timeout(&mut self) {
        self.cut(ResponseFlags::UPSTREAM_REQUEST_TIMEOUT, "response_timeout");
    }

    /// The upstream reset the stream after the response started.
    pub fn upstream_reset(&mut self) {
        self.cut(
            ResponseFlags::UPSTREAM_CONNECTION_TERMINATION,
            "upstream_reset_after_response_started{connection_termination}",
        );
    }

    /// The response was cut after it started: its flag in the metrics and
    /// the log, and why in the log (the status already sent stays).
    fn cut(&mut self, flag: ResponseFlags, details: &str) {
        self.labels.response_flags = self.labels.response_flags.with(flag);
        if let Some(e) = self.entry.as_mut() {
            e.response_flags = e.response_flags.with(flag);
            e.response_code_details = Some(details.to_owned());
        }
    }
}

impl Drop for HttpReport {
    fn drop(&mut self) {
        if let Some(c) = &self.request_counter {
            self.request_bytes = c.bytes();
        }
        let elapsed = self.start.elapsed();
        let m = &self.proxy.metrics;
        m.record_request(
            &self.labels,
            elapsed.as_secs_f64() * 1000.0,
            self.request_bytes + self.header_bytes.0,
            self.response_bytes + self.header_bytes.1,
        );
        if let Some(e) = &self.egress {
            m.record_egress(e);
        }
        if self
            .labels
            .response_flags
            .contains(ResponseFlags::STREAM_IDLE_TIMEOUT)
        {
            m.refused(Refused::downstream_rq_idle_timeout);
        }
        if let Some(mut entry) = self.entry.take() {
            entry.bytes_sent = self.response_bytes;
            entry.bytes_received = self.request_bytes;
            entry.duration = elapsed.as_millis() as u64;
            self.proxy.access_log.write(&entry);
        }
    }
}

/// One TCP connection's report (Istio's TCP metrics and a `"- - -"` log
/// line), written when dropped.
#[derive(Debug)]
pub struct TcpReport<'a> {
    proxy: &'a Proxy,
    snap: &'a Snapshot,
    start: Instant,
    pub destination: DestinationLabels,
    pub flags: ResponseFlags,
    pub log: LogEntry,
    /// Bytes from the downstream, and to it.
    pub received: u64,
    pub sent: u64,
    /// On its way in to the workload (15006), with the peer's identity
    /// when it had one: reported as the destination.
    pub inbound: Option<Option<Arc<crate::conn::Peer>>>,
}

impl<'a> TcpReport<'a> {
    pub fn start(
        proxy: &'a Proxy,
        snap: &'a Snapshot,
        destination: DestinationLabels,
        log: LogEntry,
    ) -> Self {
        TcpReport {
            proxy,
            snap,
            start: Instant::now(),
            destination,
            flags: ResponseFlags::NONE,
            log,
            received: 0,
            sent: 0,
            inbound: None,
        }
    }
}

impl Drop for TcpReport<'_> {
    fn drop(&mut self) {
        let istio = match &self.inbound {
            Some(peer) => {
                self.snap
                    .inbound_labels(peer.as_deref(), &self.destination, (0, self.flags, "tcp"))
            }
            None => self
                .snap
                .istio_labels(&self.destination, 0, self.flags, "tcp"),
        };
        let labels = TcpLabels::from(&istio);
        let m = &self.proxy.metrics;
        m.tcp_opened.get_or_create(&labels).inc();
        m.tcp_received_bytes
            .get_or_create(&labels)
            .inc_by(self.received);
        m.tcp_sent_bytes.get_or_create(&labels).inc_by(self.sent);
        m.tcp_closed.get_or_create(&labels).inc();
        self.log.response_flags = self.flags;
        self.log.bytes_received = self.received;
        self.log.bytes_sent = self.sent;
        self.log.duration = self.start.elapsed().as_millis() as u64;
        self.proxy.access_log.write(&self.log);
    }
}
