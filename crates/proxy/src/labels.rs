//! Istio's metric labels: the source workload's (this proxy's) and each
//! destination's, prepared when a snapshot is built so that reporting a
//! request clones pointers and allocates nothing.

use std::sync::Arc;

use meshgate_config::view::{ClusterView, WorkloadInfo};
use meshgate_telemetry::metrics::Lv;
use meshgate_telemetry::{IstioLabels, ResponseFlags};

use crate::snapshot::Snapshot;

/// Istio's default cluster name for metrics (`CLUSTER_ID`).
pub const CLUSTER_ID: &str = "Kubernetes";

pub use meshgate_telemetry::WorkloadLabels;
pub use meshgate_telemetry::metrics::unknown;

/// A workload's labels: Istio's canonical service/revision rules over its
/// pod labels.
pub fn workload_labels(w: &WorkloadInfo) -> WorkloadLabels {
    let l = &w.labels;
    let get = |keys: &[&str]| keys.iter().find_map(|k| l.get(*k)).map(String::as_str);
    WorkloadLabels {
        workload: Arc::from(w.name.as_str()),
        namespace: Arc::from(w.namespace.as_str()),
        principal: Arc::from(w.spiffe_id.as_str()),
        app: Arc::from(get(&["app"]).unwrap_or("unknown")),
        version: Arc::from(get(&["version"]).unwrap_or("unknown")),
        canonical_service: Arc::from(
            get(&[
                "service.istio.io/canonical-name",
                "app.kubernetes.io/name",
                "app",
            ])
            .unwrap_or(&w.name),
        ),
        canonical_revision: Arc::from(
            get(&[
                "service.istio.io/canonical-revision",
                "app.kubernetes.io/version",
                "version",
            ])
            .unwrap_or("latest"),
        ),
        cluster: Arc::from(CLUSTER_ID),
    }
}

/// Destination labels of one cluster (or of a name, when nothing was
/// routed).
#[derive(Debug, Clone)]
pub struct DestinationLabels {
    /// Shared: most destinations' is `unknown` all through.
    pub workload: Arc<WorkloadLabels>,
    pub service: Lv,
    pub service_name: Lv,
    pub service_namespace: Lv,
}

impl DestinationLabels {
    /// A cluster's labels; `string` shares equal strings between them.
    pub fn of(c: &ClusterView, string: &mut impl FnMut(&str) -> Lv) -> Self {
        DestinationLabels {
            workload: c
                .destination_workload
                .as_ref()
                .map_or_else(WorkloadLabels::shared_unknown, |w| {
                    Arc::new(workload_labels(w))
                }),
            service: string(&c.host),
            service_name: string(&c.service_name),
            service_namespace: if c.service_namespace.is_empty() {
                unknown()
            } else {
                string(&c.service_namespace)
            },
        }
    }

    /// This workload, serving a port of `service` (`name.ns.svc.…`) on
    /// the way in.
    pub fn inbound(workload: &Arc<WorkloadLabels>, service: Option<&str>) -> Self {
        let mut parts = service.unwrap_or_default().split('.');
        let mut part = || {
            parts
                .next()
                .filter(|p| !p.is_empty())
                .map_or_else(unknown, Arc::from)
        };
        DestinationLabels {
            workload: workload.clone(),
            service: service.map_or_else(unknown, Arc::from),
            service_name: part(),
            service_namespace: part(),
        }
    }

    /// A destination known only by name (a host, `BlackHoleCluster`).
    pub fn named(name: Lv) -> Self {
        DestinationLabels {
            workload: WorkloadLabels::shared_unknown(),
            service: name.clone(),
            service_name: name,
            service_namespace: unknown(),
        }
    }
}

impl Snapshot {
    /// This workload as the destination of a connection to `port`, and
    /// the Service that port serves.
    pub fn inbound_destination(&self, port: u16) -> DestinationLabels {
        let service = self.view.inbound_ports.get(&u32::from(port));
        DestinationLabels::inbound(&self.source, service.and_then(|p| p.service.as_deref()))
    }

    /// Istio's labels for a connection on its way in to this workload
    /// (`reporter="destination"`): the peer its certificate names, when
    /// it had one, is the source; this workload the destination.
    /// `destination` is this workload (and the Service of the port, when
    /// the port is one a Service names).
    pub fn inbound_labels(
        &self,
        peer: Option<&crate::conn::Peer>,
        destination: &DestinationLabels,
        (code, flags, protocol): (u16, ResponseFlags, &'static str),
    ) -> IstioLabels {
        let source = match peer {
            Some(p) => Arc::new(WorkloadLabels {
                namespace: p.namespace.clone().unwrap_or_else(unknown),
                principal: p.uri.clone(),
                ..WorkloadLabels::unknown()
            }),
            None => WorkloadLabels::shared_unknown(),
        };
        let mut labels = labels_of(&source, destination, code, flags, protocol);
        labels.reporter = "destination";
        labels.connection_security_policy = if peer.is_some() { "mutual_tls" } else { "none" };
        labels
    }

    /// Istio's labels for one request or connection this proxy reports
    /// (`reporter="source"`: the proxy's workload is the source).
    pub fn istio_labels(
        &self,
        dest: &DestinationLabels,
        code: u16,
        flags: ResponseFlags,
        protocol: &'static str,
    ) -> IstioLabels {
        labels_of(&self.source, dest, code, flags, protocol)
    }
}

/// Istio's label set for a source and a destination (`reporter="source"`).
fn labels_of(
    source: &Arc<WorkloadLabels>,
    dest: &DestinationLabels,
    code: u16,
    flags: ResponseFlags,
    protocol: &'static str,
) -> IstioLabels {
    IstioLabels {
        reporter: "source",
        source: source.clone(),
        destination_workload: dest.workload.clone(),
        destination_service: dest.service.clone(),
        destination_service_name: dest.service_name.clone(),
        destination_service_namespace: dest.service_namespace.clone(),
        request_protocol: protocol,
        response_code: code,
        grpc_response_status: "",
        response_flags: flags,
        connection_security_policy: "unknown",
    }
}
