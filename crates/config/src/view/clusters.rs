//! Upstream clusters: for each route destination, the service it names,
//! where its endpoints are, which DestinationRule applies, and the TLS the
//! proxy originates toward it.

use std::collections::BTreeMap;

use super::select::{DrIndex, effective_policy};
use super::{
    ClusterEndpoints, ClusterResolution, ClusterTls, ClusterView, HostPort, RouteDestination,
    WorkloadInfo,
};
use crate::MeshSettings;
use crate::model::common::IntOrString;
use crate::model::labels_match;
use crate::model::networking::{ClientTlsMode, ClientTlsSettings, LocalityFailover, Resolution};
use crate::registry::{Protocol, Registry, Service, ServiceSource, Workload};

pub(super) fn cluster_view(
    drs: &DrIndex<'_>,
    registry: &Registry,
    mesh: &MeshSettings,
    w: &Workload,
    d: &RouteDestination,
) -> ClusterView {
    let service = registry.lookup(&d.host, &w.namespace);
    let dr = service.and_then(|s| drs.find(&w.namespace, Some(w), &s.hostname, &s.namespace, mesh));
    let policy = dr
        .map(|dr| effective_policy(&dr.spec, d.port, &d.subset))
        .unwrap_or_default();
    let tls = cluster_tls(policy.tls.as_ref(), service, d);
    let port = u16::try_from(d.port).unwrap_or(0);
    ClusterView {
        name: d.cluster_name(),
        host: d.host.clone(),
        port: d.port,
        subset: d.subset.clone(),
        in_registry: service.is_some(),
        origin: service.map(origin).unwrap_or_default(),
        service_namespace: service.map(|s| s.namespace.clone()).unwrap_or_default(),
        service_name: match service.map(|s| &s.source) {
            Some(ServiceSource::Kubernetes { name }) => name.clone(),
            _ => d.host.clone(),
        },
        resolution: service.map_or(ClusterResolution::NotInRegistry, resolution),
        endpoints: service.map_or(ClusterEndpoints::None, |s| {
            let setting = policy
                .load_balancer
                .as_ref()
                .and_then(|lb| lb.locality_lb_setting.as_ref());
            let rank = locality_lb(&policy).then(|| Rank {
                locality: locality_of(&w.labels),
                labels: &w.labels,
                failover: setting.map_or(&[][..], |l| l.failover.as_slice()),
                failover_priority: setting.map_or(&[][..], |l| l.failover_priority.as_slice()),
                distribute: setting.map_or(&[][..], |l| l.distribute.as_slice()),
            });
            endpoints(s, port, rank.as_ref())
        }),
        protocol: service
            .and_then(|s| s.port(d.port))
            .map_or(Protocol::Unsupported, |p| p.protocol),
        tls,
        destination_rule: dr.map(|d| d.meta.full_name()),
        policy,
        destination_workload: service.and_then(|s| only_workload(registry, s)),
    }
}

fn origin(s: &Service) -> String {
    match &s.source {
        ServiceSource::ServiceEntry { name } => format!("ServiceEntry {}/{name}", s.namespace),
        ServiceSource::Kubernetes { name } => format!("Service {}/{name}", s.namespace),
    }
}

fn resolution(s: &Service) -> ClusterResolution {
    if matches!(s.source, ServiceSource::Kubernetes { .. }) {
        return ClusterResolution::Kubernetes;
    }
    match s.resolution {
        Resolution::None => ClusterResolution::OriginalDst,
        Resolution::Static => ClusterResolution::Static,
        Resolution::Dns => ClusterResolution::Dns,
        Resolution::DnsRoundRobin => ClusterResolution::DnsRoundRobin,
        Resolution::DynamicDns => ClusterResolution::DynamicDns,
    }
}

/// Where the proxy connects for `port` of a service: a Kubernetes Service
/// by its name at the target port, STATIC endpoints by address, DNS
/// endpoints (or the host itself) by name; each endpoint at its port of
/// that name, else the service port's target, else the port.
fn endpoints(service: &Service, port: u16, rank: Option<&Rank<'_>>) -> ClusterEndpoints {
    let mut out = endpoints_ranked(service, port, rank);
    if let Some(rank) = rank {
        let localities: Vec<&str> = service
            .endpoints
            .iter()
            .map(|e| e.locality.as_str())
            .collect();
        if let ClusterEndpoints::Static(list) | ClusterEndpoints::Dns { names: list, .. } = &mut out
            && list.len() == localities.len()
            && let Some(weights) = rank.distributed(&localities)
        {
            for (hp, w) in list.iter_mut().zip(weights) {
                hp.weight = Some(w);
                hp.priority = 0;
            }
        }
    }
    out
}

fn endpoints_ranked(service: &Service, port: u16, rank: Option<&Rank<'_>>) -> ClusterEndpoints {
    let service_port = service.port(u32::from(port));
    let target = service_port.and_then(|p| match &p.target_port {
        Some(IntOrString::Int(n)) => u16::try_from(*n).ok(),
        _ => None,
    });
    let port_name = service_port.map(|p| p.name.as_str()).unwrap_or_default();
    let endpoint_port = |ports: &BTreeMap<String, u32>| {
        ports
            .get(port_name)
            .and_then(|p| u16::try_from(*p).ok())
            .or(target)
            .unwrap_or(port)
    };
    let at = |host: &str, port: u16| HostPort {
        host: host.to_owned(),
        port,
        priority: 0,
        weight: None,
    };
    let at_endpoint = |e: &crate::model::networking::WorkloadEntry| HostPort {
        priority: rank.map_or(0, |r| r.priority(e)),
        ..at(&e.address, endpoint_port(&e.ports))
    };
    match (&service.source, service.resolution) {
        // The Service's name resolves to its pods (headless, as `up`'s DNS
        // answers): they listen on the target port, as Istio's endpoints.
        (ServiceSource::Kubernetes { .. }, _) => ClusterEndpoints::Dns {
            names: vec![at(&service.hostname, target.unwrap_or(port))],
            first_only: false,
        },
        (_, Resolution::DynamicDns) => ClusterEndpoints::RequestHost {
            port: target.unwrap_or(port),
        },
        (_, Resolution::Static) => {
            ClusterEndpoints::Static(service.endpoints.iter().map(at_endpoint).collect())
        }
        (_, res) => {
            let names = if service.endpoints.is_empty() {
                vec![at(&service.hostname, target.unwrap_or(port))]
            } else {
                service.endpoints.iter().map(at_endpoint).collect()
            };
            ClusterEndpoints::Dns {
                names,
                first_only: res == Resolution::DnsRoundRobin,
            }
        }
    }
}

/// Istio's locality failover applies with outlier detection, unless the
/// DestinationRule's `localityLbSetting` turns it off.
fn locality_lb(policy: &super::EffectivePolicy) -> bool {
    let enabled = policy
        .load_balancer
        .as_ref()
        .and_then(|lb| lb.locality_lb_setting.as_ref())
        .and_then(|l| l.enabled)
        != Some(false);
    enabled && policy.outlier_detection.is_some()
}

/// A workload's locality (`region/zone/subzone`): its `istio-locality`
/// label (dots for slashes, as label values allow), else its topology
/// labels.
fn locality_of(labels: &crate::model::Labels) -> String {
    if let Some(l) = labels.get("istio-locality") {
        return l.replace('.', "/");
    }
    let part = |k: &str| labels.get(k).map_or("", String::as_str);
    let parts = [
        part("topology.kubernetes.io/region"),
        part("topology.kubernetes.io/zone"),
        part("topology.istio.io/subzone"),
    ];
    parts.join("/").trim_end_matches('/').to_owned()
}

/// What endpoints are ranked by for failover: the proxy's locality and
/// labels, and the DestinationRule's `failover` and `failoverPriority`.
struct Rank<'a> {
    locality: String,
    labels: &'a crate::model::Labels,
    failover: &'a [LocalityFailover],
    failover_priority: &'a [String],
    distribute: &'a [crate::model::networking::LocalityDistribute],
}

impl Rank<'_> {
    /// `distribute` for the proxy's locality: each endpoint's weight, its
    /// locality's share split evenly among that locality's endpoints (0
    /// where no `to` names it). `None` when no `from` covers the proxy.
    fn distributed(&self, localities: &[&str]) -> Option<Vec<u32>> {
        let rule = self
            .distribute
            .iter()
            .find(|d| locality_matches(&d.from, &self.locality))?;
        let share = |l: &str| {
            rule.to
                .iter()
                .find(|(pattern, _)| locality_matches(pattern, l))
                .map(|(pattern, w)| (pattern.as_str(), *w))
        };
        let per_pattern = |p: &str| {
            localities
                .iter()
                .filter(|l| share(l).is_some_and(|(q, _)| q == p))
                .count()
                .max(1) as u32
        };
        Some(
            localities
                .iter()
                .map(|l| share(l).map_or(0, |(p, w)| w * 1000 / per_pattern(p)))
                .collect(),
        )
    }

    /// With `failoverPriority`, the labels the endpoint shares with the
    /// proxy, in order (all: 0, one fewer: 1, ...); else by locality.
    fn priority(&self, e: &crate::model::networking::WorkloadEntry) -> u8 {
        if self.failover_priority.is_empty() {
            return locality_priority(&self.locality, &e.locality, self.failover);
        }
        let value = |labels: &crate::model::Labels, locality: &str, key: &str| {
            labels.get(key).cloned().or_else(|| {
                let i = match key {
                    "topology.kubernetes.io/region" => 0,
                    "topology.kubernetes.io/zone" => 1,
                    "topology.istio.io/subzone" => 2,
                    _ => return None,
                };
                locality
                    .split('/')
                    .nth(i)
                    .filter(|v| !v.is_empty())
                    .map(str::to_owned)
            })
        };
        let shared = self
            .failover_priority
            .iter()
            .take_while(|k| {
                let mine = value(self.labels, &self.locality, k);
                mine.is_some() && mine == value(&e.labels, &e.locality, k)
            })
            .count();
        u8::try_from(self.failover_priority.len() - shared).unwrap_or(u8::MAX)
    }
}

/// A locality pattern (`region/zone/subzone`, `*` from a level on)
/// covering a locality.
fn locality_matches(pattern: &str, locality: &str) -> bool {
    let mut have = locality.split('/');
    for want in pattern.split('/') {
        if want == "*" {
            return true;
        }
        if have.next() != Some(want) {
            return false;
        }
    }
    true
}

/// How much of the proxy's locality an endpoint's shares (0 all, 1
/// region and zone, 2 region), level by level as Istio compares them; in
/// another region, 3 for the region `failover` names for the proxy's, 4
/// for the rest. An unknown (empty) region shares nothing.
fn locality_priority(proxy: &str, endpoint: &str, failover: &[LocalityFailover]) -> u8 {
    let level = |s: &str, i: usize| s.split('/').nth(i).unwrap_or("").to_owned();
    let (mine, theirs) = (level(proxy, 0), level(endpoint, 0));
    if mine.is_empty() || mine != theirs {
        let named = failover.iter().any(|f| f.from == mine && f.to == theirs);
        return if named { 3 } else { 4 };
    }
    if level(proxy, 1) != level(endpoint, 1) {
        return 2;
    }
    u8::from(level(proxy, 2) != level(endpoint, 2))
}

/// The workload behind a mesh service, when exactly one backs it.
fn only_workload(registry: &Registry, s: &Service) -> Option<WorkloadInfo> {
    let selector = s.selector.as_ref().filter(|sel| !sel.is_empty())?;
    let mut selected = registry
        .workloads
        .iter()
        .filter(|w| w.namespace == s.namespace && labels_match(selector, &w.labels));
    match (selected.next(), selected.next()) {
        (Some(one), None) => Some(WorkloadInfo::of(one)),
        _ => None,
    }
}

/// Upstream TLS for a cluster: the DestinationRule's settings when it has
/// any, else auto mutual TLS toward mesh endpoints, else plaintext.
pub fn cluster_tls(
    dr_tls: Option<&ClientTlsSettings>,
    service: Option<&Service>,
    d: &RouteDestination,
) -> ClusterTls {
    let istio_sni = format!("outbound_.{}_.{}_.{}", d.port, d.subset, d.host);
    let accounts = service
        .map(|s| s.service_accounts.clone())
        .unwrap_or_default();
    match dr_tls {
        Some(t) => {
            let (sni, expected, trust) = match t.mode {
                ClientTlsMode::IstioMutual => (
                    if t.sni.is_empty() {
                        istio_sni
                    } else {
                        t.sni.clone()
                    },
                    if t.subject_alt_names.is_empty() {
                        accounts
                    } else {
                        t.subject_alt_names.clone()
                    },
                    "mesh CA".to_owned(),
                ),
                ClientTlsMode::Simple | ClientTlsMode::Mutual => (
                    if t.sni.is_empty() {
                        d.host.clone()
                    } else {
                        t.sni.clone()
                    },
                    if t.subject_alt_names.is_empty() {
                        vec![d.host.clone()]
                    } else {
                        t.subject_alt_names.clone()
                    },
                    if t.ca_certificates.is_empty() {
                        "system roots".to_owned()
                    } else {
                        t.ca_certificates.clone()
                    },
                ),
                ClientTlsMode::Disable => (String::new(), Vec::new(), String::new()),
            };
            let files = matches!(t.mode, ClientTlsMode::Simple | ClientTlsMode::Mutual);
            ClusterTls {
                mode: t.mode,
                auto: false,
                sni,
                expected_identities: expected,
                trust,
                ca_certificates: if files {
                    t.ca_certificates.clone()
                } else {
                    String::new()
                },
                client_certificate: match t.mode {
                    ClientTlsMode::Mutual => t.client_certificate.clone(),
                    ClientTlsMode::IstioMutual => "workload certificate".to_owned(),
                    _ => String::new(),
                },
                private_key: if t.mode == ClientTlsMode::Mutual {
                    t.private_key.clone()
                } else {
                    String::new()
                },
                insecure_skip_verify: t.insecure_skip_verify == Some(true),
            }
        }
        None if service.is_some_and(|s| s.mesh_endpoints) => ClusterTls {
            mode: ClientTlsMode::IstioMutual,
            auto: true,
            sni: istio_sni,
            expected_identities: accounts,
            trust: "mesh CA".to_owned(),
            ca_certificates: String::new(),
            client_certificate: "workload certificate".to_owned(),
            private_key: String::new(),
            insecure_skip_verify: false,
        },
        None => ClusterTls {
            mode: ClientTlsMode::Disable,
            auto: false,
            sni: String::new(),
            expected_identities: Vec::new(),
            trust: String::new(),
            ca_certificates: String::new(),
            client_certificate: String::new(),
            private_key: String::new(),
            insecure_skip_verify: false,
        },
    }
}

#[cfg(test)]
mod locality_tests {
    use super::{LocalityFailover, locality_priority};

    #[test]
    fn endpoints_rank_by_the_locality_they_share() {
        let me = "us-east/zone-a/rack-1";
        let none: &[LocalityFailover] = &[];
        assert_eq!(locality_priority(me, "us-east/zone-a/rack-1", none), 0);
        assert_eq!(locality_priority(me, "us-east/zone-a/rack-2", none), 1);
        assert_eq!(locality_priority(me, "us-east/zone-b", none), 2);
        assert_eq!(locality_priority(me, "us-west/zone-a", none), 4);
        assert_eq!(locality_priority(me, "", none), 4);
        assert_eq!(locality_priority("", "us-east", none), 4);
        assert_eq!(
            locality_priority("us-east/zone-a", "us-east/zone-a", none),
            0
        );
        // `failover`: the named region before the others.
        let to_west = [LocalityFailover {
            from: "us-east".to_owned(),
            to: "us-west".to_owned(),
        }];
        assert_eq!(locality_priority(me, "us-west/zone-a", &to_west), 3);
        assert_eq!(locality_priority(me, "eu-central/zone-a", &to_west), 4);
    }

    #[test]
    fn distribute_splits_a_localitys_weight_among_its_endpoints() {
        use crate::model::networking::LocalityDistribute;
        let mine = crate::model::Labels::new();
        let rule = [LocalityDistribute {
            from: "us-east/*".to_owned(),
            to: [("us-east/*".to_owned(), 80), ("us-west/*".to_owned(), 20)]
                .into_iter()
                .collect(),
        }];
        let rank = |me: &str| super::Rank {
            locality: me.to_owned(),
            labels: &mine,
            failover: &[],
            failover_priority: &[],
            distribute: &rule,
        };
        let eps = ["us-east/a", "us-east/b", "us-west/a", "eu/a"];
        assert_eq!(
            rank("us-east/z").distributed(&eps),
            Some(vec![40_000, 40_000, 20_000, 0])
        );
        assert_eq!(rank("eu/z").distributed(&eps), None, "no rule from eu");
    }

    #[test]
    fn failover_priority_ranks_by_the_labels_shared_in_order() {
        use crate::model::networking::WorkloadEntry;
        let mine: crate::model::Labels = [("tier".to_owned(), "gold".to_owned())]
            .into_iter()
            .collect();
        let keys = [
            "topology.kubernetes.io/region".to_owned(),
            "tier".to_owned(),
        ];
        let rank = super::Rank {
            locality: "us-east/zone-a".to_owned(),
            labels: &mine,
            failover: &[],
            failover_priority: &keys,
            distribute: &[],
        };
        let ep = |locality: &str, tier: &str| WorkloadEntry {
            locality: locality.to_owned(),
            labels: [("tier".to_owned(), tier.to_owned())].into_iter().collect(),
            ..WorkloadEntry::default()
        };
        assert_eq!(rank.priority(&ep("us-east/zone-b", "gold")), 0);
        assert_eq!(rank.priority(&ep("us-east/zone-a", "silver")), 1);
        assert_eq!(
            rank.priority(&ep("us-west", "gold")),
            2,
            "in order: region first"
        );
    }
}
