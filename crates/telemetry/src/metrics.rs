//! Istio-standard metrics (`istio_requests_total`, the three histograms and
//! the four TCP metrics) with the label set in Istio's emission order, plus
//! `meshgate_egress_requests_total`, which attributes every external call to
//! the verified identity that made it.
//!
//! Label values are `Arc<str>` prepared when config is applied, so recording
//! a request clones pointers and allocates nothing.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::{Arc, PoisonError, RwLock};

use prometheus_client::encoding::{EncodeLabel, EncodeLabelSet, LabelSetEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::ResponseFlags;

/// Envoy's default histogram buckets (Istio sets none of its own), in ms or bytes.
pub const ENVOY_BUCKETS: [f64; 19] = [
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
    60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
];

pub type Lv = Arc<str>;

/// Istio's `source_*` / `destination_*` values for one workload. A label
/// set holds these as one shared pointer per side, so reporting a request
/// clones a few pointers, not one per label.
#[derive(Debug, Clone, Hash, PartialEq, Eq)]
pub struct WorkloadLabels {
    pub workload: Lv,
    pub namespace: Lv,
    pub principal: Lv,
    pub app: Lv,
    pub version: Lv,
    pub canonical_service: Lv,
    pub canonical_revision: Lv,
    pub cluster: Lv,
}

/// Istio's value for what is not known: one shared string (a gateway
/// with thousands of hosts holds it in most of every host's labels).
pub fn unknown() -> Lv {
    static UNKNOWN: std::sync::LazyLock<Lv> = std::sync::LazyLock::new(|| Arc::from("unknown"));
    UNKNOWN.clone()
}

impl WorkloadLabels {
    /// `unknown` all through, shared.
    pub fn shared_unknown() -> Arc<Self> {
        static UNKNOWN: std::sync::LazyLock<Arc<WorkloadLabels>> =
            std::sync::LazyLock::new(|| Arc::new(WorkloadLabels::unknown()));
        UNKNOWN.clone()
    }

    /// `unknown` all through, but the revision: `latest`.
    pub fn unknown() -> Self {
        static LATEST: std::sync::LazyLock<Lv> = std::sync::LazyLock::new(|| Arc::from("latest"));
        WorkloadLabels {
            workload: unknown(),
            namespace: unknown(),
            principal: unknown(),
            app: unknown(),
            version: unknown(),
            canonical_service: unknown(),
            canonical_revision: LATEST.clone(),
            cluster: unknown(),
        }
    }
}

/// Istio's standard label set. Encoded in Istio's order (`encode_labels`):
/// the source's eight, then the destination's, then the request's.
#[derive(Debug, Clone, Eq)]
pub struct IstioLabels {
    pub reporter: &'static str,
    pub source: Arc<WorkloadLabels>,
    pub destination_workload: Arc<WorkloadLabels>,
    pub destination_service: Lv,
    pub destination_service_name: Lv,
    pub destination_service_namespace: Lv,
    pub request_protocol: &'static str,
    pub response_code: u16,
    pub grpc_response_status: &'static str,
    pub response_flags: ResponseFlags,
    pub connection_security_policy: &'static str,
}

/// Hashes the labels that tell one request's series from another's most
/// often, not all twenty-five: every request looks its series up, and equal
/// label sets still hash alike (equality compares them all; the shared
/// values compare by pointer first).
impl std::hash::Hash for IstioLabels {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.reporter.hash(state);
        self.source.principal.hash(state);
        self.destination_service.hash(state);
        self.response_code.hash(state);
        self.response_flags.hash(state);
        self.request_protocol.hash(state);
    }
}

/// Equality as derived, faster: the values are shared, so two equal label
/// sets nearly always hold the same pointers, compared before the text,
/// and the labels that differ most often go first.
impl PartialEq for IstioLabels {
    fn eq(&self, o: &Self) -> bool {
        // Named one by one (no `..`): a new label cannot be left out.
        let IstioLabels {
            reporter,
            source,
            destination_workload,
            destination_service,
            destination_service_name,
            destination_service_namespace,
            request_protocol,
            response_code,
            grpc_response_status,
            response_flags,
            connection_security_policy,
        } = self;
        *response_code == o.response_code
            && *response_flags == o.response_flags
            && shared_eq(destination_service, &o.destination_service)
            && st(reporter, o.reporter)
            && st(request_protocol, o.request_protocol)
            && st(grpc_response_status, o.grpc_response_status)
            && st(connection_security_policy, o.connection_security_policy)
            && shared_eq(source, &o.source)
            && shared_eq(destination_workload, &o.destination_workload)
            && shared_eq(destination_service_name, &o.destination_service_name)
            && shared_eq(
                destination_service_namespace,
                &o.destination_service_namespace,
            )
    }
}

/// Equal values behind shared pointers: the same pointer, or equal values.
fn shared_eq<T: PartialEq + ?Sized>(a: &Arc<T>, b: &Arc<T>) -> bool {
    Arc::ptr_eq(a, b) || **a == **b
}

fn st(a: &'static str, b: &'static str) -> bool {
    std::ptr::eq(a, b) || a == b
}

impl EncodeLabelSet for IstioLabels {
    fn encode(&self, encoder: &mut LabelSetEncoder<'_>) -> std::fmt::Result {
        encode_labels(self, encoder)?;
        ("request_protocol", self.request_protocol).encode(encoder.encode_label())?;
        ("response_code", self.response_code).encode(encoder.encode_label())?;
        ("grpc_response_status", self.grpc_response_status).encode(encoder.encode_label())?;
        ("response_flags", self.response_flags).encode(encoder.encode_label())?;
        (
            "connection_security_policy",
            self.connection_security_policy,
        )
            .encode(encoder.encode_label())
    }
}

/// The reporter's, the source's and the destination's labels, in
/// Istio's order.
fn encode_labels(l: &IstioLabels, encoder: &mut LabelSetEncoder<'_>) -> std::fmt::Result {
    let (s, d) = (&*l.source, &*l.destination_workload);
    let labels: [(&str, &str); 20] = [
        ("reporter", l.reporter),
        ("source_workload", &s.workload),
        ("source_canonical_service", &s.canonical_service),
        ("source_canonical_revision", &s.canonical_revision),
        ("source_workload_namespace", &s.namespace),
        ("source_principal", &s.principal),
        ("source_app", &s.app),
        ("source_version", &s.version),
        ("source_cluster", &s.cluster),
        ("destination_workload", &d.workload),
        ("destination_workload_namespace", &d.namespace),
        ("destination_principal", &d.principal),
        ("destination_app", &d.app),
        ("destination_version", &d.version),
        ("destination_service", &l.destination_service),
        ("destination_canonical_service", &d.canonical_service),
        ("destination_canonical_revision", &d.canonical_revision),
        ("destination_service_name", &l.destination_service_name),
        (
            "destination_service_namespace",
            &l.destination_service_namespace,
        ),
        ("destination_cluster", &d.cluster),
    ];
    for label in &labels {
        label.encode(encoder.encode_label())?;
    }
    Ok(())
}

/// The TCP metrics' labels: Istio's set without the response and gRPC
/// codes.
#[derive(Debug, Clone, Hash, PartialEq, Eq)]
pub struct TcpLabels(IstioLabels);

impl From<&IstioLabels> for TcpLabels {
    fn from(l: &IstioLabels) -> Self {
        TcpLabels(IstioLabels {
            request_protocol: "tcp",
            response_code: 0,
            grpc_response_status: "",
            ..l.clone()
        })
    }
}

impl EncodeLabelSet for TcpLabels {
    fn encode(&self, encoder: &mut LabelSetEncoder<'_>) -> std::fmt::Result {
        let l = &self.0;
        encode_labels(l, encoder)?;
        ("request_protocol", l.request_protocol).encode(encoder.encode_label())?;
        ("response_flags", l.response_flags).encode(encoder.encode_label())?;
        ("connection_security_policy", l.connection_security_policy).encode(encoder.encode_label())
    }
}

/// Who made an egress call and what happened to it.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EgressLabels {
    /// The caller's verified SPIFFE ID, or `unknown` for plaintext.
    pub source_principal: Lv,
    pub source_workload_namespace: Lv,
    /// The downstream hop: `mutual_tls` or `none`.
    pub connection_security_policy: &'static str,
    pub destination_service_name: Lv,
    pub response_code: u16,
    /// The authorization decision: `allow`, `deny` or `audit`.
    pub decision: &'static str,
}

/// What a listener refused or cut, by the Envoy counter that counts the
/// same event (Envoy keeps one counter per listener; meshgate one family
/// per proxy).
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusedLabels {
    pub reason: Refused,
}

/// `istio_build`'s labels: which component, which version (the mesh
/// dashboard's versions panel).
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    component: &'static str,
    tag: &'static str,
}

#[derive(
    Debug, Clone, Copy, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelValue,
)]
#[allow(non_camel_case_types)]
pub enum Refused {
    /// No first byte, or no whole ClientHello, within 15 s.
    downstream_pre_cx_timeout,
    /// A TLS handshake not finished within 15 s.
    downstream_cx_transport_socket_connect_timeout,
    /// An HTTP connection closed after the idle timeout.
    downstream_cx_idle_timeout,
    /// A request or response cut by the stream idle timeout.
    downstream_rq_idle_timeout,
    /// An HTTP/1.1 request head not complete within its timeout.
    downstream_rq_header_timeout,
    /// A path refused by normalization (400).
    downstream_rq_failed_path_normalization,
    /// A request refused as malformed (400).
    downstream_cx_protocol_error,
    /// A connection closed unread: the proxy's connection limit was reached.
    downstream_global_cx_overflow,
}

/// Bucket bounds as Envoy writes them: `le="1800000"`, where the encoder
/// writes `le="1.8e+06"`.
fn envoy_bucket_bounds(text: &str) -> String {
    const LE: &str = "le=\"";
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find(LE) {
        let (head, tail) = rest.split_at(i + LE.len());
        out.push_str(head);
        let end = tail.find('"').unwrap_or(tail.len());
        let bound = &tail[..end];
        match bound.parse::<f64>() {
            Ok(v) if bound.contains('e') && v.fract() == 0.0 && v.abs() < 1e15 => {
                out.push_str(&format!("{v:.0}"));
            }
            _ => out.push_str(bound),
        }
        rest = &tail[end..];
    }
    out.push_str(rest);
    out
}

fn histogram() -> Histogram {
    Histogram::new(ENVOY_BUCKETS)
}

type HistogramFamily = Family<IstioLabels, Histogram, fn() -> Histogram>;

/// Every metric a proxy exports.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub requests: Family<IstioLabels, Counter>,
    pub request_duration: HistogramFamily,
    pub request_bytes: HistogramFamily,
    pub response_bytes: HistogramFamily,
    pub tcp_sent_bytes: Family<TcpLabels, Counter>,
    pub tcp_received_bytes: Family<TcpLabels, Counter>,
    pub tcp_opened: Family<TcpLabels, Counter>,
    pub tcp_closed: Family<TcpLabels, Counter>,
    pub egress_requests: Family<EgressLabels, Counter>,
    refused: Family<RefusedLabels, Counter>,
    /// The four request metrics of each label set, so a request looks its
    /// labels up once (with a cheap hash) instead of once per family.
    series: RwLock<HashMap<IstioLabels, RequestSeries, BuildHasherDefault<FxHasher>>>,
    /// The same for `meshgate_egress_requests_total` (the family's own map
    /// hashes every label with SipHash).
    egress_series: RwLock<HashMap<EgressLabels, Counter, BuildHasherDefault<FxHasher>>>,
}

/// Handles to one label set's request metrics (they share the families'
/// storage: what is recorded here is what `/stats/prometheus` shows).
#[derive(Debug)]
struct RequestSeries {
    requests: Counter,
    duration: Histogram,
    request_bytes: Histogram,
    response_bytes: Histogram,
}

/// The Firefox/rustc hash: a multiply and a rotate per word. Label values
/// are our own strings, not attacker-chosen keys, so no DoS-resistant hash
/// is needed here.
#[derive(Default)]
struct FxHasher(u64);

impl Hasher for FxHasher {
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            let mut w = [0u8; 8];
            w.copy_from_slice(c);
            self.add(u64::from_le_bytes(w));
        }
        // The tail (at most 7 bytes) as one word, not a word per byte; its
        // length in the last byte, so "a" and "a\0" differ.
        let tail = chunks.remainder();
        if !tail.is_empty() {
            let mut w = [0u8; 8];
            w[..tail.len()].copy_from_slice(tail);
            w[7] = tail.len() as u8;
            self.add(u64::from_le_bytes(w));
        }
    }
    fn write_u8(&mut self, i: u8) {
        self.add(u64::from(i));
    }
    fn write_u16(&mut self, i: u16) {
        self.add(u64::from(i));
    }
    fn write_usize(&mut self, i: usize) {
        self.add(i as u64);
    }
    fn finish(&self) -> u64 {
        self.0
    }
}

impl FxHasher {
    fn add(&mut self, w: u64) {
        self.0 = (self.0.rotate_left(5) ^ w).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let requests = Family::<IstioLabels, Counter>::default();
        let request_duration: HistogramFamily = Family::new_with_constructor(histogram);
        let request_bytes: HistogramFamily = Family::new_with_constructor(histogram);
        let response_bytes: HistogramFamily = Family::new_with_constructor(histogram);
        let tcp_sent_bytes = Family::<TcpLabels, Counter>::default();
        let tcp_received_bytes = Family::<TcpLabels, Counter>::default();
        let tcp_opened = Family::<TcpLabels, Counter>::default();
        let tcp_closed = Family::<TcpLabels, Counter>::default();
        let egress_requests = Family::<EgressLabels, Counter>::default();
        let refused = Family::<RefusedLabels, Counter>::default();
        // Counters are registered without `_total`: the encoder appends it.
        registry.register(
            "istio_requests",
            "Total number of requests",
            requests.clone(),
        );
        registry.register(
            "istio_request_duration_milliseconds",
            "Duration of requests in milliseconds",
            request_duration.clone(),
        );
        registry.register(
            "istio_request_bytes",
            "Sizes of requests in bytes",
            request_bytes.clone(),
        );
        registry.register(
            "istio_response_bytes",
            "Sizes of responses in bytes",
            response_bytes.clone(),
        );
        registry.register(
            "istio_tcp_sent_bytes",
            "Bytes sent during response over a TCP connection",
            tcp_sent_bytes.clone(),
        );
        registry.register(
            "istio_tcp_received_bytes",
            "Bytes received during request over a TCP connection",
            tcp_received_bytes.clone(),
        );
        registry.register(
            "istio_tcp_connections_opened",
            "TCP connections opened",
            tcp_opened.clone(),
        );
        registry.register(
            "istio_tcp_connections_closed",
            "TCP connections closed",
            tcp_closed.clone(),
        );
        // As istio-agent reports its proxy: always 1, the version in `tag`.
        let build = Family::<BuildLabels, Gauge>::default();
        build
            .get_or_create(&BuildLabels {
                component: "proxy",
                tag: env!("CARGO_PKG_VERSION"),
            })
            .set(1);
        registry.register("istio_build", "Istio component build info", build);
        registry.register(
            "meshgate_egress_requests",
            "Requests through the egress gateway by verified caller identity and authorization decision",
            egress_requests.clone(),
        );
        registry.register(
            "meshgate_downstream_refused",
            "Downstream connections and requests refused or cut, by the Envoy counter of the same event",
            refused.clone(),
        );
        Metrics {
            registry,
            requests,
            request_duration,
            request_bytes,
            response_bytes,
            tcp_sent_bytes,
            tcp_received_bytes,
            tcp_opened,
            tcp_closed,
            egress_requests,
            refused,
            series: RwLock::default(),
            egress_series: RwLock::default(),
        }
    }

    /// Records one finished HTTP request.
    pub fn record_request(
        &self,
        labels: &IstioLabels,
        duration_ms: f64,
        request_bytes: u64,
        response_bytes: u64,
    ) {
        let record = |s: &RequestSeries| {
            s.requests.inc();
            s.duration.observe(duration_ms);
            s.request_bytes.observe(request_bytes as f64);
            s.response_bytes.observe(response_bytes as f64);
        };
        // A poisoned lock only means another thread panicked mid-insert;
        // the map itself is still consistent.
        if let Some(s) = self
            .series
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(labels)
        {
            record(s);
            return;
        }
        let s = RequestSeries {
            requests: self.requests.get_or_create(labels).clone(),
            duration: self.request_duration.get_or_create(labels).clone(),
            request_bytes: self.request_bytes.get_or_create(labels).clone(),
            response_bytes: self.response_bytes.get_or_create(labels).clone(),
        };
        record(&s);
        self.series
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(labels.clone())
            .or_insert(s);
    }

    /// Counts one request through the egress gateway.
    pub fn record_egress(&self, labels: &EgressLabels) {
        if let Some(c) = self
            .egress_series
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(labels)
        {
            c.inc();
            return;
        }
        let c = self.egress_requests.get_or_create(labels).clone();
        c.inc();
        self.egress_series
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(labels.clone())
            .or_insert(c);
    }

    /// Counts one refused or cut connection or request.
    pub fn refused(&self, reason: Refused) {
        self.refused.get_or_create(&RefusedLabels { reason }).inc();
    }

    /// Prometheus text exposition format 0.0.4 (what `/stats/prometheus` serves).
    pub fn encode(&self) -> String {
        let mut out = String::with_capacity(16 * 1024);
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry);
        envoy_bucket_bounds(&out)
    }
}

/// Content type of [`Metrics::encode`].
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn labels(code: u16) -> IstioLabels {
        let u: Lv = Arc::from("unknown");
        IstioLabels {
            reporter: "source",
            source: Arc::new(WorkloadLabels {
                workload: Arc::from("curl-egress-tst-gateway"),
                canonical_service: Arc::from("curl-egress-tst-gateway"),
                canonical_revision: Arc::from("latest"),
                namespace: Arc::from("curl-egress-tst"),
                principal: Arc::from(
                    "spiffe://cluster.local/ns/curl-egress-tst/sa/curl-egress-tst",
                ),
                app: u.clone(),
                version: u.clone(),
                cluster: u.clone(),
            }),
            destination_workload: Arc::new(WorkloadLabels {
                canonical_revision: Arc::from("latest"),
                ..WorkloadLabels::unknown()
            }),
            destination_service: Arc::from("jsonplaceholder.typicode.com"),
            destination_service_name: Arc::from("jsonplaceholder.typicode.com"),
            destination_service_namespace: Arc::from("curl-external-tst"),
            request_protocol: "http",
            response_code: code,
            grpc_response_status: "",
            response_flags: ResponseFlags::NONE,
            connection_security_policy: "unknown",
        }
    }

    fn other() -> Lv {
        Arc::from("other")
    }

    fn src(l: &mut IstioLabels) -> &mut WorkloadLabels {
        Arc::make_mut(&mut l.source)
    }

    fn dst(l: &mut IstioLabels) -> &mut WorkloadLabels {
        Arc::make_mut(&mut l.destination_workload)
    }

    #[test]
    fn label_sets_are_equal_by_value_and_every_label_counts() {
        // Equal text in different allocations.
        assert_eq!(labels(200), labels(200));
        let changes: [fn(&mut IstioLabels); 25] = [
            |l| l.reporter = "destination",
            |l| src(l).workload = other(),
            |l| src(l).canonical_service = other(),
            |l| src(l).canonical_revision = other(),
            |l| src(l).namespace = other(),
            |l| src(l).principal = other(),
            |l| src(l).app = other(),
            |l| src(l).version = other(),
            |l| src(l).cluster = other(),
            |l| dst(l).workload = other(),
            |l| dst(l).namespace = other(),
            |l| dst(l).principal = other(),
            |l| dst(l).app = other(),
            |l| dst(l).version = other(),
            |l| l.destination_service = other(),
            |l| dst(l).canonical_service = other(),
            |l| dst(l).canonical_revision = other(),
            |l| l.destination_service_name = other(),
            |l| l.destination_service_namespace = other(),
            |l| dst(l).cluster = other(),
            |l| l.request_protocol = "grpc",
            |l| l.response_code = 503,
            |l| l.grpc_response_status = "14",
            |l| l.response_flags = ResponseFlags::UPSTREAM_OVERFLOW,
            |l| l.connection_security_policy = "mutual_tls",
        ];
        for (i, change) in changes.iter().enumerate() {
            let mut other = labels(200);
            change(&mut other);
            assert_ne!(labels(200), other, "label {i}");
        }
    }

    #[test]
    fn bucket_bounds_are_written_as_envoy_writes_them() {
        let m = Metrics::new();
        m.record_request(&labels(200), 1.0, 0, 0);
        let text = m.encode();
        assert!(text.contains("le=\"1800000\""), "{text}");
        assert!(text.contains("le=\"0.5\""), "{text}");
        assert!(!text.contains("e+0"), "{text}");
        assert_eq!(envoy_bucket_bounds("x{le=\"+Inf\"} 1"), "x{le=\"+Inf\"} 1");
    }

    #[test]
    fn istio_build_says_the_proxy_version() {
        let text = Metrics::new().encode();
        assert!(text.contains("# TYPE istio_build gauge"), "{text}");
        assert!(
            text.contains(&format!(
                "istio_build{{component=\"proxy\",tag=\"{}\"}} 1",
                env!("CARGO_PKG_VERSION")
            )),
            "{text}"
        );
    }

    #[test]
    fn tcp_labels_are_istio_labels_without_the_codes() {
        let m = Metrics::new();
        let tcp = TcpLabels::from(&labels(200));
        m.tcp_opened.get_or_create(&tcp).inc();
        let text = m.encode();
        let line = text
            .lines()
            .find(|l| l.starts_with("istio_tcp_connections_opened_total{"))
            .expect("counter line");
        let keys: Vec<&str> = line
            .split(['{', ','])
            .skip(1)
            .filter_map(|kv| kv.split_once('=').map(|(k, _)| k))
            .collect();
        assert_eq!(keys.len(), 23, "{line}");
        assert_eq!(keys[0], "reporter");
        assert_eq!(keys[5], "source_principal");
        assert_eq!(keys[19], "destination_cluster");
        assert_eq!(
            keys[20..],
            [
                "request_protocol",
                "response_flags",
                "connection_security_policy"
            ]
        );
        assert!(line.contains("request_protocol=\"tcp\""), "{line}");
        assert!(line.ends_with("} 1"), "{line}");
    }

    #[test]
    fn labels_in_istio_order_and_envoy_buckets() {
        let m = Metrics::new();
        m.record_request(&labels(200), 12.5, 100, 2000);
        m.record_request(&labels(200), 0.2, 0, 10);
        let text = m.encode();
        let line = text
            .lines()
            .find(|l| l.starts_with("istio_requests_total{"))
            .expect("counter line");
        let keys: Vec<&str> = line
            .trim_start_matches("istio_requests_total{")
            .split(",")
            .filter_map(|kv| kv.split_once('=').map(|(k, _)| k))
            .collect();
        assert_eq!(
            keys,
            [
                "reporter",
                "source_workload",
                "source_canonical_service",
                "source_canonical_revision",
                "source_workload_namespace",
                "source_principal",
                "source_app",
                "source_version",
                "source_cluster",
                "destination_workload",
                "destination_workload_namespace",
                "destination_principal",
                "destination_app",
                "destination_version",
                "destination_service",
                "destination_canonical_service",
                "destination_canonical_revision",
                "destination_service_name",
                "destination_service_namespace",
                "destination_cluster",
                "request_protocol",
                "response_code",
                "grpc_response_status",
                "response_flags",
                "connection_security_policy"
            ]
        );
        assert!(line.ends_with("} 2"), "{line}");
        assert!(text.contains("le=\"0.5\"} 1"), "{text}");
        // The largest bound prints as Envoy prints it (not `3.6e+06`).
        assert!(text.contains("le=\"3600000\"} 2"), "{text}");
        assert!(
            text.contains("istio_request_duration_milliseconds_count{"),
            "{text}"
        );
    }
}
