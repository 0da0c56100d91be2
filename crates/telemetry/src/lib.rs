//! meshgate telemetry: Istio's standard metrics with Istio's label set and
//! order, meshgate's egress attribution metric, and access logs in Istio's
//! default format.

pub mod accesslog;
mod flags;
pub mod metrics;

pub use accesslog::{AccessLog, AccessLogFormat, LogEntry};
pub use flags::ResponseFlags;
pub use metrics::{EgressLabels, IstioLabels, Metrics, Refused, TcpLabels, WorkloadLabels};
