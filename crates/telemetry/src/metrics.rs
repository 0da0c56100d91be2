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

use prometheus_client::encoding::EncodeLabelSet;
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

/// Istio's standard label set, fields in Istio's order.
#[derive(Debug, Clone, Eq, EncodeLabelSet)]
pub struct IstioLabels {
    pub reporter: &'static str,
    pub source_workload: Lv,
    pub source_canonical_service: Lv,
    pub source_canonical_revision: Lv,
    pub source_workload_namespace: Lv,
    pub source_principal: Lv,
    pub source_app: Lv,
    pub source_version: Lv,
    pub source_cluster: Lv,
    pub destination_workload: Lv,
    pub destination_workload_namespace: Lv,
    pub destination_principal: Lv,
    pub destination_app: Lv,
    pub destination_version: Lv,
    pub destination_service: Lv,
    pub destination_canonical_service: Lv,
    pub destination_canonical_revision: Lv,
    pub destination_service_name: Lv,
    pub destination_service_namespace: Lv,
    pub destination_cluster: Lv,
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
        self.source_principal.hash(state);
        self.destination_service.hash(state);
        self.response_code.hash(state);
        self.response_flags.hash(state);
        self.request_protocol.hash(state);
    }
}

/// Equality as derived, faster: the values are shared, so two equal label
/// sets nearly always hold the same pointers, compared before the text
/// (derived, every request compared the text of all of them), and the
/// labels that differ most often go first.
impl PartialEq for IstioLabels {
    fn eq(&self, o: &Self) -> bool {
        fn lv(a: &Lv, b: &Lv) -> bool {
            Arc::ptr_eq(a, b) || **a == **b
        }
        fn st(a: &'static str, b: &'static str) -> bool {
            std::ptr::eq(a, b) || a == b
        }
        // Named one by one (no `..`): a new label cannot be left out.
        let IstioLabels {
            reporter,
            source_workload,
            source_canonical_service,
            source_canonical_revision,
            source_workload_namespace,
            source_principal,
            source_app,
            source_version,
            source_cluster,
            destination_workload,
            destination_workload_namespace,
            destination_principal,
            destination_app,
            destination_version,
            destination_service,
            destination_canonical_service,
            destination_canonical_revision,
            destination_service_name,
            destination_service_namespace,
            destination_cluster,
            request_protocol,
            response_code,
            grpc_response_status,
            response_flags,
            connection_security_policy,
        } = self;
        *response_code == o.response_code
            && *response_flags == o.response_flags
            && lv(destination_service, &o.destination_service)
            && lv(source_principal, &o.source_principal)
            && st(reporter, o.reporter)
            && st(request_protocol, o.request_protocol)
            && st(grpc_response_status, o.grpc_response_status)
            && st(connection_security_policy, o.connection_security_policy)
            && lv(source_workload, &o.source_workload)
            && lv(source_canonical_service, &o.source_canonical_service)
            && lv(source_canonical_revision, &o.source_canonical_revision)
            && lv(source_workload_namespace, &o.source_workload_namespace)
            && lv(source_app, &o.source_app)
            && lv(source_version, &o.source_version)
            && lv(source_cluster, &o.source_cluster)
            && lv(destination_workload, &o.destination_workload)
            && lv(
                destination_workload_namespace,
                &o.destination_workload_namespace,
            )
            && lv(destination_principal, &o.destination_principal)
            && lv(destination_app, &o.destination_app)
            && lv(destination_version, &o.destination_version)
            && lv(
                destination_canonical_service,
                &o.destination_canonical_service,
            )
            && lv(
                destination_canonical_revision,
                &o.destination_canonical_revision,
            )
            && lv(destination_service_name, &o.destination_service_name)
            && lv(
                destination_service_namespace,
                &o.destination_service_namespace,
            )
            && lv(destination_cluster, &o.destination_cluster)
    }
}

/// The TCP metrics' labels: Istio's set without response and gRPC codes.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TcpLabels {
    pub reporter: &'static str,
    pub source_workload: Lv,
    pub source_canonical_service: Lv,
    pub source_canonical_revision: Lv,
    pub source_workload_namespace: Lv,
    pub source_principal: Lv,
    pub source_app: Lv,
    pub source_version: Lv,
    pub source_cluster: Lv,
    pub destination_workload: Lv,
    pub destination_workload_namespace: Lv,
    pub destination_principal: Lv,
    pub destination_app: Lv,
    pub destination_version: Lv,
    pub destination_service: Lv,
    pub destination_canonical_service: Lv,
    pub destination_canonical_revision: Lv,
    pub destination_service_name: Lv,
    pub destination_service_namespace: Lv,
    pub destination_cluster: Lv,
    pub request_protocol: &'static str,
    pub response_flags: ResponseFlags,
    pub connection_security_policy: &'static str,
}

impl From<&IstioLabels> for TcpLabels {
    fn from(l: &IstioLabels) -> Self {
        TcpLabels {
            reporter: l.reporter,
            source_workload: l.source_workload.clone(),
            source_canonical_service: l.source_canonical_service.clone(),
            source_canonical_revision: l.source_canonical_revision.clone(),
            source_workload_namespace: l.source_workload_namespace.clone(),
            source_principal: l.source_principal.clone(),
            source_app: l.source_app.clone(),
            source_version: l.source_version.clone(),
            source_cluster: l.source_cluster.clone(),
            destination_workload: l.destination_workload.clone(),
            destination_workload_namespace: l.destination_workload_namespace.clone(),
            destination_principal: l.destination_principal.clone(),
            destination_app: l.destination_app.clone(),
            destination_version: l.destination_version.clone(),
            destination_service: l.destination_service.clone(),
            destination_canonical_service: l.destination_canonical_service.clone(),
            destination_canonical_revision: l.destination_canonical_revision.clone(),
            destination_service_name: l.destination_service_name.clone(),
            destination_service_namespace: l.destination_service_namespace.clone(),
            destination_cluster: l.destination_cluster.clone(),
            request_protocol: "tcp",
            response_flags: l.response_flags,
            connection_security_policy: l.connection_security_policy,
        }
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
    /// A path refused by normalization (400).
    downstream_rq_failed_path_normalization,
    /// A request refused as malformed (400).
    downstream_cx_protocol_error,
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
    series: RwLock<HashMap<IstioLabels, Arc<RequestSeries>, BuildHasherDefault<FxHasher>>>,
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
        for &b in chunks.remainder() {
            self.add(u64::from(b));
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
        let s = self.series(labels);
        s.requests.inc();
        s.duration.observe(duration_ms);
        s.request_bytes.observe(request_bytes as f64);
        s.response_bytes.observe(response_bytes as f64);
    }

    fn series(&self, labels: &IstioLabels) -> Arc<RequestSeries> {
        // A poisoned lock only means another thread panicked mid-insert;
        // the map itself is still consistent.
        if let Some(s) = self
            .series
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(labels)
        {
            return s.clone();
        }
        let s = Arc::new(RequestSeries {
            requests: self.requests.get_or_create(labels).clone(),
            duration: self.request_duration.get_or_create(labels).clone(),
            request_bytes: self.request_bytes.get_or_create(labels).clone(),
            response_bytes: self.response_bytes.get_or_create(labels).clone(),
        });
        self.series
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(labels.clone())
            .or_insert(s)
            .clone()
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

    /// Prometheus text exposition format 0.0.4 (what `/stats/prometheus` serves).
    /// Counts one refused or cut connection or request.
    pub fn refused(&self, reason: Refused) {
        self.refused.get_or_create(&RefusedLabels { reason }).inc();
    }

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
            source_workload: Arc::from("curl-egress-tst-gateway"),
            source_canonical_service: Arc::from("curl-egress-tst-gateway"),
            source_canonical_revision: Arc::from("latest"),
            source_workload_namespace: Arc::from("curl-egress-tst"),
            source_principal: Arc::from(
                "spiffe://cluster.local/ns/curl-egress-tst/sa/curl-egress-tst",
            ),
            source_app: u.clone(),
            source_version: u.clone(),
            source_cluster: u.clone(),
            destination_workload: u.clone(),
            destination_workload_namespace: u.clone(),
            destination_principal: u.clone(),
            destination_app: u.clone(),
            destination_version: u.clone(),
            destination_service: Arc::from("jsonplaceholder.typicode.com"),
            destination_canonical_service: u.clone(),
            destination_canonical_revision: Arc::from("latest"),
            destination_service_name: Arc::from("jsonplaceholder.typicode.com"),
            destination_service_namespace: Arc::from("curl-external-tst"),
            destination_cluster: u,
            request_protocol: "http",
            response_code: code,
            grpc_response_status: "",
            response_flags: ResponseFlags::NONE,
            connection_security_policy: "unknown",
        }
    }

    #[test]
    fn label_sets_are_equal_by_value_and_every_label_counts() {
        // Equal text in different allocations.
        assert_eq!(labels(200), labels(200));
        let changes: [fn(&mut IstioLabels); 25] = [
            |l| l.reporter = "destination",
            |l| l.source_workload = Arc::from("other"),
            |l| l.source_canonical_service = Arc::from("other"),
            |l| l.source_canonical_revision = Arc::from("other"),
            |l| l.source_workload_namespace = Arc::from("other"),
            |l| l.source_principal = Arc::from("other"),
            |l| l.source_app = Arc::from("other"),
            |l| l.source_version = Arc::from("other"),
            |l| l.source_cluster = Arc::from("other"),
            |l| l.destination_workload = Arc::from("other"),
            |l| l.destination_workload_namespace = Arc::from("other"),
            |l| l.destination_principal = Arc::from("other"),
            |l| l.destination_app = Arc::from("other"),
            |l| l.destination_version = Arc::from("other"),
            |l| l.destination_service = Arc::from("other"),
            |l| l.destination_canonical_service = Arc::from("other"),
            |l| l.destination_canonical_revision = Arc::from("other"),
            |l| l.destination_service_name = Arc::from("other"),
            |l| l.destination_service_namespace = Arc::from("other"),
            |l| l.destination_cluster = Arc::from("other"),
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
