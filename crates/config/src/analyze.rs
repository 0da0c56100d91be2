//! Cross-resource analyzers in the manner of `istioctl analyze`: the same
//! codes, levels and message texts, so an operator's knowledge (and
//! istio.io's documentation for each code) carries over.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use crate::MeshSettings;
use crate::diag::{Diagnostic, Level, Origin};
use crate::model::common::IntOrString;
use crate::model::networking::{ClientTlsMode, ClientTlsSettings, Gateway, TrafficPolicy};
use crate::model::security::AuthzAction;
use crate::model::{Config, Labels, Resource, labels_match};
use crate::registry::{
    Protocol, ProxyKind, Registry, Service, ServiceSource, exported_to, host_matches,
    hosts_overlap, resolve_host,
};
use crate::view::vs_bound_to_mesh;

mod jwt;

/// Runs every analyzer. Diagnostics come back sorted by file and line.
pub fn analyze(config: &Config, mesh: &MeshSettings) -> Vec<Diagnostic> {
    let registry = crate::registry::build(config, mesh);
    let mut out = Vec::new();
    virtual_service_references(config, &registry, mesh, &mut out);
    virtual_service_rules(config, &mut out);
    conflicting_mesh_hosts(config, mesh, &mut out);
    gateway_host_coverage(config, mesh, &mut out);
    gateway_selectors_and_ports(config, &registry, &mut out);
    conflicting_gateways(config, &mut out);
    sidecar_selectors(config, &registry, &mut out);
    destination_rules(config, &registry, mesh, &mut out);
    authorization_policies(config, mesh, &mut out);
    service_port_names(config, &mut out);
    conflicting_entry_protocols(config, &mut out);
    duplicate_gateway_certificates(config, &mut out);
    delegates(config, &mut out);
    not_implemented(config, &mut out);
    service_entry_addresses(config, mesh, &mut out);
    subsets_without_effect_on_gateways(config, &mut out);
    duplicate_entry_hosts(config, &mut out);
    jwt::analyze(config, mesh, &mut out);
    out.sort_by(|a, b| {
        (&a.origin.file, a.origin.line, a.level, a.code).cmp(&(
            &b.origin.file,
            b.origin.line,
            b.level,
            b.code,
        ))
    });
    out
}

/// MG0005: Istio fields meshgate reads but does not act on yet, so an
/// operator is told rather than surprised. Each names what happens instead.
fn not_implemented(config: &Config, out: &mut Vec<Diagnostic>) {
    let mut warn = |meta: &crate::model::Meta, field: String, what: &str| {
        out.push(Diagnostic::new(
            Level::Warning,
            "MG0005",
            Origin::at_field(meta, &field),
            format!("{field}: meshgate does not implement {what}"),
        ));
    };
    use crate::model::networking::CaptureMode;
    for dr in &config.destination_rules {
        let policies = dr
            .spec
            .traffic_policy
            .iter()
            .map(|tp| ("spec.trafficPolicy".to_owned(), tp));
        let subsets = dr.spec.subsets.iter().enumerate().filter_map(|(i, s)| {
            let tp = s.traffic_policy.as_ref()?;
            Some((format!("spec.subsets[{i}].trafficPolicy"), tp))
        });
        for (path, tp) in policies.chain(subsets) {
            traffic_policy_gaps(tp, &path, &mut |field, what| warn(&dr.meta, field, what));
        }
    }
    for sc in &config.sidecars {
        for (i, e) in sc.spec.egress.iter().enumerate() {
            let unix = e.bind.starts_with("unix://");
            let none = e.capture_mode == Some(CaptureMode::None);
            if e.port.is_none() && (none || !e.bind.is_empty()) {
                warn(
                    &sc.meta,
                    format!("spec.egress[{i}]"),
                    "bind or captureMode NONE on an egress listener without a port: it binds nothing, and captured traffic is routed by its port",
                );
            } else if !e.bind.is_empty() && !unix && !none {
                warn(
                    &sc.meta,
                    format!("spec.egress[{i}].bind"),
                    "bind on a captured egress listener: captured traffic is routed by its port, whatever address it was going to",
                );
            }
        }
        for (i, ing) in sc.spec.ingress.iter().enumerate() {
            let none = ing.capture_mode == Some(CaptureMode::None);
            if none && ing.default_endpoint.is_empty() {
                warn(
                    &sc.meta,
                    format!("spec.ingress[{i}]"),
                    "captureMode NONE without a defaultEndpoint: the listener would forward to itself, so it binds nothing",
                );
            } else if !ing.bind.is_empty() && !none {
                warn(
                    &sc.meta,
                    format!("spec.ingress[{i}].bind"),
                    "bind on a captured ingress listener: captured traffic is served by its port, whatever address it was going to",
                );
            }
        }
    }
}

/// The DestinationRule fields meshgate reads and does not act on, each
/// with what happens instead.
fn traffic_policy_gaps(tp: &TrafficPolicy, path: &str, warn: &mut dyn FnMut(String, &str)) {
    let mut at = |field: &str, what: &str| warn(format!("{path}.{field}"), what);
    if tp.tunnel.as_ref().is_some_and(|t| t.protocol == "POST") {
        at(
            "tunnel.protocol",
            "POST tunnels: the tunnel is asked for with CONNECT",
        );
    }
    if tp.proxy_protocol.is_some() {
        at(
            "proxyProtocol",
            "the PROXY protocol: no PROXY header is sent upstream",
        );
    }
    let ports = tp.port_level_settings.iter().enumerate().map(|(i, p)| {
        (
            format!("portLevelSettings[{i}]."),
            p.load_balancer.as_ref(),
            p.connection_pool.as_ref(),
        )
    });
    let levels = std::iter::once((
        String::new(),
        tp.load_balancer.as_ref(),
        tp.connection_pool.as_ref(),
    ));
    for (prefix, lb, pool) in levels.chain(ports) {
        if lb.is_some_and(|lb| lb.warmup.is_some() || lb.warmup_duration_secs.is_some()) {
            at(
                &format!("{prefix}loadBalancer"),
                "warmup (slow start): a new endpoint gets its full share of requests at once",
            );
        }
        let http = pool.and_then(|p| p.http.as_ref());
        if pool
            .and_then(|p| p.tcp.as_ref())
            .is_some_and(|t| t.max_connections.is_some())
        {
            at(
                &format!("{prefix}connectionPool.tcp.maxConnections"),
                "a limit on connections: with http1MaxPendingRequests it limits HTTP/1.1 requests in flight (503 UO beyond), but more connections than this may be open",
            );
        }
        if http.is_some_and(|h| h.max_concurrent_streams.is_some()) {
            at(
                &format!("{prefix}connectionPool.http.maxConcurrentStreams"),
                "a stream limit of its own: an HTTP/2 connection takes as many streams as the upstream's SETTINGS allow",
            );
        }
        if http.is_some_and(|h| h.use_client_protocol == Some(true)) {
            at(
                &format!("{prefix}connectionPool.http.useClientProtocol"),
                "the client's protocol upstream: requests go as HTTP/1.1 unless the port's protocol or h2UpgradePolicy says HTTP/2",
            );
        }
    }
}

/// IST0134: a ServiceEntry without addresses has a TCP (or unset
/// protocol) port, one message per such port, unless the mesh allocates
/// addresses (DNS capture with auto-allocation).
fn service_entry_addresses(config: &Config, mesh: &MeshSettings, out: &mut Vec<Diagnostic>) {
    if mesh.dns_auto_allocate {
        return;
    }
    for se in config
        .service_entries
        .iter()
        .filter(|se| se.spec.addresses.is_empty() && se.spec.allocated_addresses.is_empty())
    {
        for (i, port) in se.spec.ports.iter().enumerate() {
            if port.protocol.is_empty() || port.protocol.eq_ignore_ascii_case("TCP") {
                out.push(Diagnostic::new(
                    Level::Warning,
                    "IST0134",
                    Origin::at_field(&se.meta, &format!("spec.ports[{i}]")),
                    "ServiceEntry addresses are required for this protocol.".to_owned(),
                ));
            }
        }
    }
}

/// IST0173: a subset whose labels (with the service's selector) match no
/// pod, in any namespace, as Istio's analyzer. Deployments count by their
/// pod template. meshgate reads no Nodes: a non-empty topology label
/// (region, zone, subzone, hostname) is taken to match; an empty one never
/// does (Istio adds no empty ones).
fn subsets_select_pods(
    config: &Config,
    registry: &Registry,
    dr: &Resource<crate::model::networking::DestinationRule>,
    host: &str,
    out: &mut Vec<Diagnostic>,
) {
    const TOPOLOGY: [&str; 6] = [
        "topology.kubernetes.io/region",
        "topology.kubernetes.io/zone",
        "topology.istio.io/subzone",
        "kubernetes.io/hostname",
        "topology.istio.io/cluster",
        "topology.istio.io/network",
    ];
    let Some(service) = registry.lookup(host, &dr.meta.namespace) else {
        return;
    };
    for subset in &dr.spec.subsets {
        let mut wanted = service.selector.clone().unwrap_or_default();
        wanted.extend(subset.labels.clone());
        let selects = |pod: &Labels| {
            wanted.iter().all(|(k, v)| {
                if TOPOLOGY.contains(&k.as_str()) {
                    !v.is_empty()
                } else {
                    pod.get(k) == Some(v)
                }
            })
        };
        if !config.workloads.iter().any(|w| selects(&w.spec.pod_labels)) {
            out.push(Diagnostic::new(
                Level::Error,
                "IST0173",
                Origin::of(&dr.meta),
                format!(
                    "The Subset {} defined in the DestinationRule does not select any pods. Which may lead to 503 UH (NoHealthyUpstream).",
                    subset.name
                ),
            ));
        }
    }
}

/// IST0140: a gateway-bound rule routes to a host without a subset while
/// another VirtualService for that host routes by subset, which the
/// gateway's requests never go through. Hosts compare as written, as
/// Istio's analyzer does.
fn subsets_without_effect_on_gateways(config: &Config, out: &mut Vec<Diagnostic>) {
    // VirtualServices with a subset destination to one of their own hosts.
    let by_subset: Vec<(&Resource<crate::model::networking::VirtualService>, &str)> = config
        .virtual_services
        .iter()
        .flat_map(|vs| {
            vs.spec
                .http
                .iter()
                .flat_map(|r| r.route.iter())
                .filter(|d| {
                    !d.destination.subset.is_empty() && vs.spec.hosts.contains(&d.destination.host)
                })
                .map(move |d| (vs, d.destination.host.as_str()))
        })
        .collect();
    for vs in config
        .virtual_services
        .iter()
        .filter(|vs| !vs.spec.gateways.is_empty())
    {
        for (i, rule) in vs.spec.http.iter().enumerate() {
            for (j, d) in rule.route.iter().enumerate() {
                if !d.destination.subset.is_empty() {
                    continue;
                }
                for (other, _) in by_subset.iter().filter(|(_, h)| *h == d.destination.host) {
                    out.push(Diagnostic::new(
                        Level::Warning,
                        "IST0140",
                        Origin::at_field(
                            &vs.meta,
                            &format!("spec.http[{i}].route[{j}].destination.host"),
                        ),
                        format!(
                            "Subset in virtual service {} has no effect on ingress gateway {} requests",
                            other.meta.full_name(),
                            vs.meta.full_name()
                        ),
                    ));
                }
            }
        }
    }
}

/// MG0006: a host defined by several ServiceEntries of one namespace.
/// The first (in file order) is the one a lookup finds; the others'
/// ports, endpoints and resolution go unused for it.
fn duplicate_entry_hosts(config: &Config, out: &mut Vec<Diagnostic>) {
    let mut first: BTreeMap<(&str, &str), &Resource<crate::model::networking::ServiceEntry>> =
        BTreeMap::new();
    for se in &config.service_entries {
        for (i, h) in se.spec.hosts.iter().enumerate() {
            match first.get(&(se.meta.namespace.as_str(), h.as_str())) {
                Some(earlier) if earlier.meta.name != se.meta.name => {
                    out.push(Diagnostic::new(
                        Level::Warning,
                        "MG0006",
                        Origin::at_field(&se.meta, &format!("spec.hosts[{i}]")),
                        format!(
                            "host {h} is already defined by ServiceEntry {}: meshgate uses that one for it; merge them into one ServiceEntry",
                            earlier.meta.full_name()
                        ),
                    ));
                }
                Some(_) => {}
                None => {
                    first.insert((se.meta.namespace.as_str(), h.as_str()), se);
                }
            }
        }
    }
}

/// MG0004: a `delegate` naming no delegate VirtualService (one without
/// hosts) exported to the root's namespace. Istio only logs this; the rule
/// then routes nothing.
fn delegates(config: &Config, out: &mut Vec<Diagnostic>) {
    for vs in &config.virtual_services {
        for (i, rule) in vs.spec.http.iter().enumerate() {
            let Some(d) = &rule.delegate else { continue };
            let ns = if d.namespace.is_empty() {
                &vs.meta.namespace
            } else {
                &d.namespace
            };
            let target = config
                .virtual_services
                .iter()
                .find(|t| t.meta.name == d.name && &t.meta.namespace == ns);
            let problem = match target {
                None => "does not exist",
                Some(t) if !crate::view::is_delegate(&t.spec) => {
                    "has hosts, so it is not a delegate"
                }
                Some(t) if !exported_to(&t.spec.export_to, ns, &vs.meta.namespace) => {
                    "is not exported to this namespace"
                }
                Some(_) => continue,
            };
            out.push(Diagnostic::new(
                Level::Warning,
                "MG0004",
                Origin::at_field(&vs.meta, &format!("spec.http[{i}].delegate")),
                format!(
                    "delegate VirtualService {ns}/{} {problem}: this rule routes nothing",
                    d.name
                ),
            ));
        }
    }
}

/// Go's `%q` for the ASCII strings these messages carry.
fn q(s: &str) -> String {
    format!("{s:?}")
}

/// Go's `%v` for a slice.
fn v<T: std::fmt::Display>(items: &[T]) -> String {
    format!(
        "[{}]",
        items
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(" ")
    )
}

fn selector_string(labels: &Labels) -> String {
    labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

fn any_workload_matches(config: &Config, namespace: Option<&str>, selector: &Labels) -> bool {
    config.workloads.iter().any(|w| {
        namespace.is_none_or(|ns| w.meta.namespace == ns)
            && labels_match(selector, &w.spec.pod_labels)
    })
}

// === VirtualService references: IST0101 (gateway, host, host:port, subset), IST0112 ===

fn virtual_service_references(
    config: &Config,
    registry: &Registry,
    mesh: &MeshSettings,
    out: &mut Vec<Diagnostic>,
) {
    // Built once: built per destination it made the check quadratic.
    let drs = crate::view::DrIndex::new(config, mesh);
    let gateways = gateways_by_name(config);
    for vs in &config.virtual_services {
        let ns = &vs.meta.namespace;
        let gateway_refs =
            vs.spec
                .gateways
                .iter()
                .enumerate()
                .map(|(i, g)| (format!("spec.gateways[{i}]"), g))
                .chain(vs.spec.http.iter().enumerate().flat_map(|(i, r)| {
                    r.matches.iter().enumerate().flat_map(move |(j, m)| {
                        m.gateways.iter().enumerate().map(move |(k, g)| {
                            (format!("spec.http[{i}].match[{j}].gateways[{k}]"), g)
                        })
                    })
                }));
        for (path, g) in gateway_refs {
            if g == "mesh" {
                continue;
            }
            if is_internal_gateway(g) {
                out.push(Diagnostic::new(
                    Level::Warning,
                    "IST0165",
                    Origin::at_field(&vs.meta, &path),
                    format!(
                        "Gateway reference in VirtualService {} is to an implementation-generated internal Gateway: {g}.",
                        vs.meta.full_name()
                    ),
                ));
                continue;
            }
            let (gns, gname) = g.split_once('/').unwrap_or((ns.as_str(), g.as_str()));
            let found = gateways.contains_key(&(gns, gname));
            if !found {
                out.push(Diagnostic::new(
                    Level::Error,
                    "IST0101",
                    Origin::at_field(&vs.meta, &path),
                    format!("Referenced gateway not found: {}", q(g)),
                ));
            }
        }

        let dests = vs
            .spec
            .http
            .iter()
            .enumerate()
            .flat_map(|(i, r)| {
                r.route
                    .iter()
                    .enumerate()
                    .map(move |(j, d)| {
                        (
                            format!("spec.http[{i}].route[{j}].destination"),
                            &d.destination,
                        )
                    })
                    .chain(
                        r.mirror
                            .iter()
                            .map(move |m| (format!("spec.http[{i}].mirror"), m)),
                    )
                    .chain(r.mirrors.iter().enumerate().map(move |(j, m)| {
                        (
                            format!("spec.http[{i}].mirrors[{j}].destination"),
                            &m.destination,
                        )
                    }))
            })
            .chain(vs.spec.tls.iter().enumerate().flat_map(|(i, r)| {
                r.route.iter().enumerate().map(move |(j, d)| {
                    (
                        format!("spec.tls[{i}].route[{j}].destination"),
                        &d.destination,
                    )
                })
            }))
            .chain(vs.spec.tcp.iter().enumerate().flat_map(|(i, r)| {
                r.route.iter().enumerate().map(move |(j, d)| {
                    (
                        format!("spec.tcp[{i}].route[{j}].destination"),
                        &d.destination,
                    )
                })
            }));
        for (path, d) in dests {
            let mirror = path.contains("mirror");
            let host = resolve_host(&d.host, ns, mesh);
            let found = destination_service(registry, ns, &vs.spec.export_to, &host);
            // The subset is the DestinationRule's business, whether or not
            // the host is known (as istioctl's separate analyzers).
            let (dr_host, dr_ns) = found.map_or((host.as_str(), ns.as_str()), |s| {
                (s.hostname.as_str(), s.namespace.as_str())
            });
            if !d.subset.is_empty() {
                let dr = drs.find(ns, None, dr_host, dr_ns, mesh);
                let has = dr.is_some_and(|dr| dr.spec.subsets.iter().any(|s| s.name == d.subset));
                if !has {
                    out.push(Diagnostic::new(
                        Level::Error,
                        "IST0101",
                        Origin::at_field(&vs.meta, &format!("{path}.subset")),
                        format!(
                            "Referenced {} not found: {}",
                            if mirror {
                                "mirror+subset in destinationrule"
                            } else {
                                "host+subset in destinationrule"
                            },
                            q(&format!("{}+{}", d.host, d.subset))
                        ),
                    ));
                }
            }
            let Some(svc) = found else {
                out.push(Diagnostic::new(
                    Level::Error,
                    "IST0101",
                    Origin::at_field(&vs.meta, &format!("{path}.host")),
                    format!(
                        "Referenced {} not found: {}",
                        if mirror { "mirror host" } else { "host" },
                        q(&d.host)
                    ),
                ));
                continue;
            };
            match d.port.map(|p| p.number).filter(|n| *n != 0) {
                Some(port) if svc.port(port).is_none() => out.push(Diagnostic::new(
                    Level::Error,
                    "IST0101",
                    Origin::at_field(&vs.meta, &format!("{path}.port")),
                    format!(
                        "Referenced host:port not found: {}",
                        q(&format!("{}:{port}", d.host))
                    ),
                )),
                None if svc.ports.len() > 1 => {
                    let ports: Vec<u32> = svc.ports.iter().map(|p| p.number).collect();
                    out.push(Diagnostic::new(
                        Level::Error,
                        "IST0112",
                        Origin::at_field(&vs.meta, &path),
                        format!(
                            "This VirtualService routes to a service {} that exposes multiple ports {}. Specifying a port in the destination is required to disambiguate.",
                            q(&d.host),
                            v(&ports)
                        ),
                    ));
                }
                _ => {}
            }
        }
    }
}

// === IST0130 / IST0131: unreachable rules ===

fn virtual_service_rules(config: &Config, out: &mut Vec<Diagnostic>) {
    for vs in &config.virtual_services {
        let http: Vec<RuleMatches<'_>> = vs
            .spec
            .http
            .iter()
            .enumerate()
            .map(|(i, r)| RuleMatches {
                label: if r.name.is_empty() {
                    format!("#{i}")
                } else {
                    q(&r.name)
                },
                path: format!("spec.http[{i}]"),
                matches: r
                    .matches
                    .iter()
                    .enumerate()
                    .map(|(j, m)| {
                        // Compared without its name, as istioctl does.
                        let key = HttpMatchRequestKey(m);
                        let label = if m.name.is_empty() {
                            format!("#{j}")
                        } else {
                            q(&m.name)
                        };
                        (
                            label,
                            serde_json::to_string(&key).unwrap_or_default(),
                            Some(m),
                        )
                    })
                    .collect(),
            })
            .collect();
        let l4 = |kind: &str, rules: Vec<Vec<String>>| -> Vec<RuleMatches<'_>> {
            rules
                .into_iter()
                .enumerate()
                .map(|(i, keys)| RuleMatches {
                    label: format!("#{i}"),
                    path: format!("spec.{kind}[{i}]"),
                    matches: keys
                        .into_iter()
                        .enumerate()
                        .map(|(j, k)| (format!("#{j}"), k, None))
                        .collect(),
                })
                .collect()
        };
        let tcp = l4(
            "tcp",
            vs.spec
                .tcp
                .iter()
                .map(|r| r.matches.iter().map(json).collect())
                .collect(),
        );
        let tls = l4(
            "tls",
            vs.spec
                .tls
                .iter()
                .map(|r| r.matches.iter().map(json).collect())
                .collect(),
        );
        for rules in [http, tcp, tls] {
            unreachable_rules(&vs.meta, &rules, out);
        }
    }
}

/// One rule's matches for the unreachable-rule analysis: labels as
/// istioctl prints them, a comparison key, and (HTTP) the match itself.
struct RuleMatches<'a> {
    label: String,
    path: String,
    matches: Vec<(
        String,
        String,
        Option<&'a crate::model::networking::HttpMatchRequest>,
    )>,
}

/// An HTTP match as compared: everything but its name.
struct HttpMatchRequestKey<'a>(&'a crate::model::networking::HttpMatchRequest);

impl serde::Serialize for HttpMatchRequestKey<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = self.0.clone();
        m.name.clear();
        m.serialize(s)
    }
}

/// A match as JSON, for comparison.
fn json<T: serde::Serialize>(m: &T) -> String {
    serde_json::to_string(m).unwrap_or_default()
}

/// IST0130 and IST0131 as istioctl's validation finds them: rules after a
/// rule without matches, rules whose every match came before, matches
/// that repeat an earlier one, and (HTTP) prefix matches an earlier,
/// shorter prefix already covers.
fn unreachable_rules(
    meta: &crate::model::Meta,
    rules: &[RuleMatches<'_>],
    out: &mut Vec<Diagnostic>,
) {
    let mut seen: BTreeMap<&str, usize> = BTreeMap::new();
    let mut catch_all: Option<usize> = None;
    let mut prefixed: Vec<Overlap> = Vec::new();
    for (i, rule) in rules.iter().enumerate() {
        let unreachable = |reason: &str| {
            Diagnostic::new(
                Level::Warning,
                "IST0130",
                Origin::at_field(meta, &rule.path),
                format!("VirtualService rule {} not used ({reason}).", rule.label),
            )
        };
        if rule.matches.is_empty() {
            if catch_all.is_some() {
                out.push(unreachable("only the last rule can have no matches"));
            }
            catch_all = Some(i);
            continue;
        }
        let mut duplicates = 0;
        for (j, (label, key, http)) in rule.matches.iter().enumerate() {
            if catch_all.is_some() {
                out.push(unreachable("route without matches defined before"));
                continue;
            }
            if let Some(&dup) = seen.get(key.as_str()) {
                duplicates += 1;
                out.push(ineffective(
                    meta,
                    &format!("{}.match[{j}]", rule.path),
                    &rule.label,
                    label,
                    &rules[dup].label,
                ));
                continue;
            }
            seen.insert(key, i);
            if let Some(o) = http.and_then(|m| {
                Overlap::of(m, &rule.label, label, &format!("{}.match[{j}]", rule.path))
            }) {
                prefixed.push(o);
            }
        }
        if duplicates == rule.matches.len() {
            out.push(unreachable("all matches used by prior rules"));
        }
    }
    for (a, earlier) in prefixed.iter().enumerate() {
        for later in &prefixed[a + 1..] {
            if later.prefix != earlier.prefix && earlier.covers(later) {
                out.push(ineffective(
                    meta,
                    &later.path,
                    &later.rule,
                    &format!("{} of prefix {}", later.label, later.prefix),
                    &format!(
                        "{} of prefix {} on {}",
                        earlier.label, earlier.prefix, earlier.rule
                    ),
                ));
            }
        }
    }
}

fn ineffective(
    meta: &crate::model::Meta,
    path: &str,
    rule: &str,
    m: &str,
    dup: &str,
) -> Diagnostic {
    Diagnostic::new(
        Level::Info,
        "IST0131",
        Origin::at_field(meta, path),
        format!(
            "VirtualService rule {rule} match {m} is not used (duplicate/overlapping match in rule {dup})."
        ),
    )
}

/// A prefix match as istioctl compares them for overlap: the prefix, the
/// port, and `exact:`/`prefix:` forms of method (GET by default),
/// authority, headers, query parameters and absent headers.
struct Overlap {
    rule: String,
    label: String,
    path: String,
    prefix: String,
    port: u32,
    method: String,
    authority: String,
    headers: BTreeMap<String, String>,
    query: BTreeMap<String, String>,
    without: BTreeMap<String, String>,
}

impl Overlap {
    fn of(
        m: &crate::model::networking::HttpMatchRequest,
        rule: &str,
        label: &str,
        path: &str,
    ) -> Option<Overlap> {
        let prefix = m.uri.as_ref()?.prefix.clone().filter(|p| !p.is_empty())?;
        let form = |s: Option<&crate::model::networking::StringMatch>| match s {
            Some(s) if s.exact.as_deref().is_some_and(|e| !e.is_empty()) => {
                format!("exact:{}", s.exact.as_deref().unwrap_or_default())
            }
            Some(s) if s.prefix.as_deref().is_some_and(|p| !p.is_empty()) => {
                format!("prefix:{}", s.prefix.as_deref().unwrap_or_default())
            }
            _ => String::new(),
        };
        let forms = |map: &BTreeMap<String, crate::model::networking::StringMatch>| {
            map.iter()
                .map(|(k, v)| (k.clone(), form(Some(v))))
                .collect()
        };
        let method = match form(m.method.as_ref()) {
            f if f.is_empty() => "exact:GET".to_owned(),
            f => f,
        };
        Some(Overlap {
            rule: rule.to_owned(),
            label: label.to_owned(),
            path: path.to_owned(),
            prefix,
            port: m.port.unwrap_or(0),
            method,
            authority: form(m.authority.as_ref()),
            headers: forms(&m.headers),
            query: forms(&m.query_params),
            without: forms(&m.without_headers),
        })
    }

    /// Does this (earlier) match take every request `later` would?
    fn covers(&self, later: &Overlap) -> bool {
        let field = |a: &str, b: &str| a == b || a.starts_with(b);
        let maps = |a: &BTreeMap<String, String>, b: &BTreeMap<String, String>| {
            a.len() == b.len() && a.iter().all(|(k, v)| b.get(k).is_some_and(|w| field(v, w)))
        };
        later.prefix.starts_with(&self.prefix)
            && later.port == self.port
            && field(&self.method, &later.method)
            && field(&self.authority, &later.authority)
            && maps(&self.headers, &later.headers)
            && maps(&self.query, &later.query)
            && maps(&self.without, &later.without)
    }
}

// === IST0109: two mesh VirtualServices for one host ===

/// As istioctl: each mesh VirtualService's hosts, scoped by where it is
/// exported (`*` for everywhere, else each namespace); a host that two of
/// them define in one scope, or in a namespace scope and (overlapping) in
/// the `*` scope, is reported once per VirtualService.
fn conflicting_mesh_hosts(config: &Config, mesh: &MeshSettings, out: &mut Vec<Diagnostic>) {
    type Vs = Resource<crate::model::networking::VirtualService>;
    let mut scoped: BTreeMap<(String, String), Vec<&Vs>> = BTreeMap::new();
    for vs in config
        .virtual_services
        .iter()
        .filter(|vs| vs_bound_to_mesh(&vs.spec))
    {
        let ns = &vs.meta.namespace;
        let export = &vs.spec.export_to;
        let scopes: BTreeSet<String> = if export.is_empty() || export.iter().any(|e| e == "*") {
            BTreeSet::from(["*".to_owned()])
        } else {
            export
                .iter()
                .map(|e| if e == "." { ns.clone() } else { e.clone() })
                .collect()
        };
        for scope in scopes {
            for h in &vs.spec.hosts {
                scoped
                    .entry((scope.clone(), resolve_host(h, ns, mesh)))
                    .or_default()
                    .push(vs);
            }
        }
    }
    // The hosts exported everywhere, which every namespace's hosts are
    // checked against: a name finds its own by an index and scans only the
    // wildcards (a scan of every host per host was quadratic).
    let everywhere: Vec<(&str, &Vec<&Vs>)> = scoped
        .iter()
        .filter(|((scope, _), _)| scope == "*")
        .map(|((_, host), list)| (host.as_str(), list))
        .collect();
    let mut by_name: HashMap<String, Vec<usize>> = HashMap::new();
    let mut wildcards = Vec::new();
    for (i, (host, _)) in everywhere.iter().enumerate() {
        if host.starts_with('*') {
            wildcards.push(i);
        } else {
            by_name
                .entry(host.to_ascii_lowercase())
                .or_default()
                .push(i);
        }
    }
    let overlapping = |host: &str| -> Vec<usize> {
        if host.starts_with('*') {
            return (0..everywhere.len()).collect();
        }
        let mut found: Vec<usize> = by_name
            .get(&host.to_ascii_lowercase())
            .into_iter()
            .flatten()
            .chain(&wildcards)
            .copied()
            .collect();
        // In host order, as a scan finds them.
        found.sort_unstable();
        found
    };
    let mut reported = BTreeSet::new();
    for ((scope, host), list) in &scoped {
        let mut list = list.clone();
        if scope != "*" {
            for i in overlapping(host) {
                let (other_host, more) = everywhere[i];
                if hosts_overlap(host, other_host) {
                    list.extend(more.iter());
                }
            }
        }
        if list.len() < 2 {
            continue;
        }
        let mut names: Vec<String> = list.iter().map(|vs| vs.meta.full_name()).collect();
        names.sort();
        let names = names.join(",");
        for vs in &list {
            if !reported.insert(vs.meta.full_name()) {
                continue;
            }
            out.push(Diagnostic::new(
                Level::Error,
                "IST0109",
                Origin::at_field(&vs.meta, "metadata.name"),
                format!(
                    "The VirtualServices {names} associated with mesh gateway define the same host {scope}/{host} which can lead to undefined behavior. This can be fixed by merging the conflicting VirtualServices into a single resource."
                ),
            ));
        }
    }
}

/// The service a VirtualService's destination names, as istioctl finds it:
/// one exported everywhere, else one exported to every namespace the
/// VirtualService is exported to (its own without `exportTo`), else a
/// wildcard host covering it, exported everywhere or to the
/// VirtualService's namespace.
fn destination_service<'r>(
    registry: &'r Registry,
    vs_ns: &str,
    vs_export_to: &[String],
    host: &str,
) -> Option<&'r Service> {
    let everywhere = |s: &Service| s.export_to.is_empty() || s.export_to.iter().any(|e| e == "*");
    // By the registry's index: a scan per destination was quadratic.
    let named = || registry.named(host);
    if let Some(s) = named().find(|s| everywhere(s)) {
        return Some(s);
    }
    let scopes: Vec<&str> = if vs_export_to.is_empty() {
        vec![vs_ns]
    } else {
        vs_export_to
            .iter()
            .map(|e| if e == "." { vs_ns } else { e.as_str() })
            .collect()
    };
    if let Some(s) = named().find(|s| {
        scopes
            .iter()
            .any(|ns| exported_to(&s.export_to, &s.namespace, ns))
    }) {
        return Some(s);
    }
    let bare = host.trim_start_matches('*');
    registry.wildcard_services().find(|s| {
        (everywhere(s) || exported_to(&s.export_to, &s.namespace, vs_ns))
            && bare.ends_with(s.hostname.trim_start_matches('*'))
    })
}

/// Gateways by namespace and name, in config order: a VirtualService's
/// every gateway reference looked up without a scan of every Gateway.
fn gateways_by_name(config: &Config) -> HashMap<(&str, &str), Vec<&Resource<Gateway>>> {
    let mut by_name: HashMap<(&str, &str), Vec<&Resource<Gateway>>> = HashMap::new();
    for g in &config.gateways {
        by_name
            .entry((g.meta.namespace.as_str(), g.meta.name.as_str()))
            .or_default()
            .push(g);
    }
    by_name
}

/// A Gateway that an implementation generated from a Kubernetes Gateway
/// (`NS/NAME~istio-autogenerated-k8s-gateway~...`): not for VirtualServices
/// to name (IST0165).
fn is_internal_gateway(reference: &str) -> bool {
    let name = reference.split_once('/').map_or(reference, |(_, n)| n);
    name.contains("~istio-autogenerated-k8s-gateway~")
}

// === IST0138: one certificate on several Gateways ===

/// As istioctl: a Gateway and another whose selector includes its own
/// (every Gateway, for an empty selector) with a TLS server each presenting
/// the same certificate (credentialName, or certificate and key files).
fn duplicate_gateway_certificates(config: &Config, out: &mut Vec<Diagnostic>) {
    use crate::model::networking::ServerTlsSettings;
    let same = |a: &ServerTlsSettings, b: &ServerTlsSettings| match (
        a.credential_name.is_empty(),
        b.credential_name.is_empty(),
    ) {
        (false, false) => a.credential_name == b.credential_name,
        (true, true) => {
            !a.server_certificate.is_empty()
                && a.server_certificate == b.server_certificate
                && !a.private_key.is_empty()
                && a.private_key == b.private_key
        }
        _ => false,
    };
    // Only gateways that share a certificate are compared: every pair
    // was quadratic (10,000 Gateways: 100 million pairs, two names each).
    let mut by_certificate: HashMap<(&str, &str, &str), BTreeSet<usize>> = HashMap::new();
    for (i, g) in config.gateways.iter().enumerate() {
        for tls in g.spec.servers.iter().filter_map(|s| s.tls.as_ref()) {
            let key = if tls.credential_name.is_empty() {
                (
                    "",
                    tls.server_certificate.as_str(),
                    tls.private_key.as_str(),
                )
            } else {
                (tls.credential_name.as_str(), "", "")
            };
            by_certificate.entry(key).or_default().insert(i);
        }
    }
    let mut sharing: Vec<BTreeSet<usize>> = vec![BTreeSet::new(); config.gateways.len()];
    for group in by_certificate.values().filter(|g| g.len() > 1) {
        for &i in group {
            sharing[i].extend(group.iter().filter(|&&j| j != i));
        }
    }
    for (a, sharing) in config.gateways.iter().zip(&sharing) {
        for b in sharing.iter().map(|&j| &config.gateways[j]).filter(|b| {
            b.meta.full_name() != a.meta.full_name()
                && a.spec
                    .selector
                    .iter()
                    .all(|(k, v)| b.spec.selector.get(k) == Some(v))
        }) {
            for sa in a.spec.servers.iter().filter_map(|s| s.tls.as_ref()) {
                for sb in b.spec.servers.iter().filter_map(|s| s.tls.as_ref()) {
                    if same(sa, sb) {
                        out.push(Diagnostic::new(
                            Level::Warning,
                            "IST0138",
                            Origin::at_field(&a.meta, "metadata.name"),
                            format!(
                                "Duplicate certificate in multiple gateways {} may cause 404s if clients re-use HTTP2 connections.",
                                v(&[a.meta.full_name(), b.meta.full_name()])
                            ),
                        ));
                    }
                }
            }
        }
    }
}

// === IST0177: one host and port, two protocols ===

/// As istioctl: ServiceEntries (in one export scope, or one scope and `*`)
/// that give one host and port different protocols; each reported once.
fn conflicting_entry_protocols(config: &Config, out: &mut Vec<Diagnostic>) {
    type Se = Resource<crate::model::networking::ServiceEntry>;
    /// (export scope, host, port) → each entry's (protocol, ServiceEntry).
    type Index<'a> = BTreeMap<(String, String, u32), Vec<(String, &'a Se)>>;
    let mut index: Index<'_> = BTreeMap::new();
    for se in &config.service_entries {
        let ns = &se.meta.namespace;
        let export = &se.spec.export_to;
        let scopes: BTreeSet<String> = if export.is_empty() || export.iter().any(|e| e == "*") {
            BTreeSet::from(["*".to_owned()])
        } else {
            export
                .iter()
                .map(|e| if e == "." { ns.clone() } else { e.clone() })
                .collect()
        };
        for scope in &scopes {
            for h in &se.spec.hosts {
                for p in &se.spec.ports {
                    index
                        .entry((scope.clone(), h.clone(), p.number))
                        .or_default()
                        .push((p.protocol.to_ascii_uppercase(), se));
                }
            }
        }
    }
    let mut reported = BTreeSet::new();
    for ((scope, host, port), entries) in &index {
        let mut entries = entries.clone();
        if scope != "*"
            && let Some(all) = index.get(&("*".to_owned(), host.clone(), *port))
        {
            entries.extend(all.iter().cloned());
        }
        let protocols: BTreeSet<&str> = entries.iter().map(|(p, _)| p.as_str()).collect();
        if protocols.len() < 2 {
            continue;
        }
        let names: BTreeSet<String> = entries.iter().map(|(_, se)| se.meta.full_name()).collect();
        let names = names.into_iter().collect::<Vec<_>>().join(", ");
        let protocols = protocols.into_iter().collect::<Vec<_>>().join(", ");
        for (_, se) in &entries {
            if !reported.insert(se.meta.full_name()) {
                continue;
            }
            out.push(Diagnostic::new(
                Level::Warning,
                "IST0177",
                Origin::at_field(&se.meta, "metadata.name"),
                format!(
                    "Multiple ServiceEntries ({names}) define the same host {} and port {port} with conflicting protocols ({protocols}).",
                    q(host)
                ),
            ));
        }
    }
}

// === IST0118 / IST0150: Service port names ===

/// Ports where Istio cannot tell the protocol from the name (or
/// `appProtocol`): it sniffs them (IST0118, Info). For an ExternalName
/// Service such a port, or one named `tcp`, is IST0150. Kubernetes' system
/// namespaces, Istio's own Services (labelled `istio` or `release: istio`)
/// and managed gateways are skipped.
fn service_port_names(config: &Config, out: &mut Vec<Diagnostic>) {
    const WELL_KNOWN_TCP: [u32; 4] = [25, 53, 3306, 27017];
    const MANAGED: [&str; 3] = [
        "istio.io-gateway-controller",
        "istio.io-mesh-controller",
        "istio.io-eastwest-controller",
    ];
    // Kubernetes' own namespaces are not the user's to rename.
    const SYSTEM: [&str; 4] = [
        "kube-system",
        "kube-public",
        "kube-node-lease",
        "local-path-storage",
    ];
    for svc in &config.services {
        let labels = &svc.meta.labels;
        if SYSTEM.contains(&svc.meta.namespace.as_str())
            || labels.contains_key("istio")
            || labels.get("release").is_some_and(|r| r == "istio")
            || labels
                .get("gateway.istio.io/managed")
                .is_some_and(|m| MANAGED.contains(&m.as_str()))
        {
            continue;
        }
        let external_name = svc.spec.type_.as_deref() == Some("ExternalName");
        for (i, p) in svc.spec.ports.iter().enumerate() {
            let udp = p.protocol.as_deref() == Some("UDP");
            let protocol = Protocol::from_kube_port(&p.name, p.app_protocol.as_deref());
            let sniffed =
                !udp && protocol == Protocol::Unsupported && !WELL_KNOWN_TCP.contains(&p.port);
            let tcp_named_external = p.name == "tcp" && external_name;
            if !(sniffed || tcp_named_external) {
                continue;
            }
            let origin = Origin::at_field(&svc.meta, &format!("spec.ports[{i}]"));
            out.push(if external_name {
                Diagnostic::new(
                    Level::Warning,
                    "IST0150",
                    origin,
                    "Port name for ExternalName service is invalid. Proxy may prevent tcp named ports and unmatched traffic for ports serving TCP protocol from being forwarded correctly".to_owned(),
                )
            } else {
                let target = p.target_port.as_ref().map_or_else(|| "0".to_owned(), ToString::to_string);
                Diagnostic::new(
                    Level::Info,
                    "IST0118",
                    origin,
                    format!(
                        "Port name {} (port: {}, targetPort: {target}) doesn't follow the naming convention of Istio port.",
                        p.name, p.port
                    ),
                )
            });
        }
    }
}

// === IST0132: no host of the VirtualService is on the Gateway ===

/// As istioctl: for each gateway a VirtualService names, IST0132 when none
/// of the gateway's server hosts (those exported to the VirtualService's
/// namespace) overlaps any of its hosts; a gateway that does not exist has
/// no hosts (and IST0101 too).
fn gateway_host_coverage(config: &Config, _mesh: &MeshSettings, out: &mut Vec<Diagnostic>) {
    let gateways = gateways_by_name(config);
    for vs in &config.virtual_services {
        for (i, g) in vs.spec.gateways.iter().enumerate() {
            if g == "mesh" || is_internal_gateway(g) {
                continue;
            }
            let (gns, gname) = g
                .split_once('/')
                .unwrap_or((vs.meta.namespace.as_str(), g.as_str()));
            let gateway_hosts: Vec<&str> = gateways
                .get(&(gns, gname))
                .into_iter()
                .flatten()
                .flat_map(|gw| gw.spec.servers.iter().flat_map(|s| s.hosts.iter()))
                .filter_map(|h| match h.split_once('/') {
                    Some((ns, host)) => {
                        let ns = if ns == "." { gns } else { ns };
                        (ns == "*" || ns == vs.meta.namespace).then_some(host)
                    }
                    None => Some(h.as_str()),
                })
                .collect();
            let covered = gateway_hosts
                .iter()
                .any(|gh| vs.spec.hosts.iter().any(|vh| hosts_overlap(gh, vh)));
            if !covered {
                out.push(Diagnostic::new(
                    Level::Warning,
                    "IST0132",
                    Origin::at_field(&vs.meta, &format!("spec.gateways[{i}]")),
                    format!(
                        "one or more host {} defined in VirtualService {} not found in Gateway {gns}/{gname}.",
                        v(&vs.spec.hosts),
                        vs.meta.full_name(),
                    ),
                ));
            }
        }
    }
}

// === Gateways: IST0101 selector, IST0162 port not on Service ===

fn gateway_selectors_and_ports(config: &Config, registry: &Registry, out: &mut Vec<Diagnostic>) {
    for gw in &config.gateways {
        if !any_workload_matches(config, None, &gw.spec.selector) {
            out.push(Diagnostic::new(
                Level::Error,
                "IST0101",
                Origin::at_field(&gw.meta, "spec.selector"),
                format!(
                    "Referenced selector not found: {}",
                    q(&selector_string(&gw.spec.selector))
                ),
            ));
            continue;
        }
        // As istioctl: the ports of the Services that select the gateway's
        // pods, by target port (the port the proxy listens on), and their
        // service ports that map to a target.
        let mut listens = BTreeSet::new();
        for w in registry
            .workloads
            .iter()
            .filter(|w| labels_match(&gw.spec.selector, &w.labels))
        {
            for svc in registry.services_of(w) {
                for p in &svc.ports {
                    match &p.target_port {
                        Some(IntOrString::Int(t)) if *t != 0 => {
                            listens.insert(*t);
                            listens.insert(p.number);
                        }
                        _ => {
                            listens.insert(p.number);
                        }
                    }
                }
            }
        }
        for (i, server) in gw.spec.servers.iter().enumerate() {
            if !listens.contains(&server.port.number) {
                out.push(Diagnostic::new(
                    Level::Warning,
                    "IST0162",
                    Origin::at_field(&gw.meta, &format!("spec.servers[{i}].port")),
                    format!(
                        "The gateway is listening on a target port (port {}) that is not defined in the Service associated with its workload instances (Pod selector {}). If you need to access the gateway port through the gateway Service, it will not be available.",
                        server.port.number,
                        selector_string(&gw.spec.selector)
                    ),
                ));
            }
        }
    }
}

// === IST0145: two Gateways, same workloads and port, a host in common ===

/// As istioctl: Gateways whose selectors are the same (or one's contains
/// the other's and a pod has both) conflict on a port where a server of one
/// names a host, with the same bind, that a server of the other names. One
/// message per server, listing every gateway it conflicts with.
fn conflicting_gateways(config: &Config, out: &mut Vec<Diagnostic>) {
    let same_pods = |a: &Labels, b: &Labels| {
        let (sa, sb) = (selector_string(a), selector_string(b));
        sa == sb
            || ((sa.contains(&sb) || sb.contains(&sa))
                && config.workloads.iter().any(|w| {
                    labels_match(a, &w.spec.pod_labels) && labels_match(b, &w.spec.pod_labels)
                }))
    };
    // Only gateways with a server on the same port, bind and a same host
    // are compared: every pair was quadratic (10,000 Gateways: minutes).
    let mut by_server: HashMap<(u32, &str, &str), BTreeSet<usize>> = HashMap::new();
    for (i, g) in config.gateways.iter().enumerate() {
        for server in &g.spec.servers {
            for host in &server.hosts {
                let key = (server.port.number, server.bind.as_str(), host.as_str());
                by_server.entry(key).or_default().insert(i);
            }
        }
    }
    for a in &config.gateways {
        for server in &a.spec.servers {
            let bind = server.bind.as_str();
            let candidates: BTreeSet<usize> = server
                .hosts
                .iter()
                .filter_map(|h| by_server.get(&(server.port.number, bind, h.as_str())))
                .flatten()
                .copied()
                .collect();
            let mut with: Vec<String> = candidates
                .iter()
                .map(|&j| &config.gateways[j])
                .filter(|b| b.meta.full_name() != a.meta.full_name())
                .filter(|b| same_pods(&a.spec.selector, &b.spec.selector))
                .filter(|b| {
                    b.spec.servers.iter().any(|other| {
                        other.port.number == server.port.number
                            && other.bind == bind
                            && other.hosts.iter().any(|h| server.hosts.contains(h))
                    })
                })
                .map(|b| b.meta.full_name())
                .collect();
            if with.is_empty() {
                continue;
            }
            with.sort();
            out.push(Diagnostic::new(
                Level::Error,
                "IST0145",
                Origin::of(&a.meta),
                format!(
                    "Conflict with gateways {} (workload selector {}, port {}, hosts {}).",
                    with.join(","),
                    selector_string(&a.spec.selector),
                    server.port.number,
                    server.hosts.join(",")
                ),
            ));
        }
    }
}

// === Sidecars: IST0101 selector, IST0110, IST0111 ===

/// A namespace labelled `istio.io/dataplane-mode: ambient` and not for
/// sidecar injection (`istio-injection: enabled` or `istio.io/rev`).
fn namespace_in_ambient_mode(config: &Config, ns: &str) -> bool {
    config
        .namespaces
        .iter()
        .find(|n| n.meta.name == ns)
        .is_some_and(|n| {
            let l = &n.meta.labels;
            l.get("istio-injection").is_none_or(|v| v != "enabled")
                && l.get("istio.io/rev").is_none_or(String::is_empty)
                && l.get("istio.io/dataplane-mode")
                    .is_some_and(|v| v == "ambient")
        })
}

fn sidecar_selectors(config: &Config, registry: &Registry, out: &mut Vec<Diagnostic>) {
    let mut no_selector: BTreeMap<&str, Vec<&Resource<crate::model::networking::Sidecar>>> =
        BTreeMap::new();
    for sc in &config.sidecars {
        match sc
            .spec
            .workload_selector
            .as_ref()
            .filter(|s| !s.labels.is_empty())
        {
            None => no_selector.entry(&sc.meta.namespace).or_default().push(sc),
            Some(sel) if !any_workload_matches(config, Some(&sc.meta.namespace), &sel.labels) => {
                out.push(Diagnostic::new(
                    Level::Error,
                    "IST0101",
                    Origin::at_field(&sc.meta, "spec.workloadSelector"),
                    format!(
                        "Referenced selector not found: {}",
                        q(&selector_string(&sel.labels))
                    ),
                ));
            }
            Some(_) => {}
        }
    }
    let ineffective = |sc: &Resource<crate::model::networking::Sidecar>, why: &str| {
        Diagnostic::new(
            Level::Warning,
            "IST0167",
            Origin::of(&sc.meta),
            format!("The policy has no impact: {why}."),
        )
    };
    let mut reported = BTreeSet::new();
    for (ns, list) in &no_selector {
        // No sidecar runs in an ambient namespace.
        if namespace_in_ambient_mode(config, ns) {
            for sc in list {
                reported.insert(sc.meta.full_name());
                out.push(ineffective(
                    sc,
                    "namespace is in ambient mode, the policy has no impact",
                ));
            }
        }
    }
    for (ns, list) in no_selector
        .iter()
        .filter(|(ns, l)| l.len() > 1 && !namespace_in_ambient_mode(config, ns))
    {
        let names: Vec<String> = list.iter().map(|s| s.meta.name.clone()).collect();
        for sc in list {
            out.push(Diagnostic::new(
                Level::Error,
                "IST0111",
                Origin::of(&sc.meta),
                format!("The Sidecars {} in namespace {} have no workload selector, which can lead to undefined behavior.", v(&names), q(ns)),
            ));
        }
    }
    for w in &registry.workloads {
        let selecting: Vec<_> =
            config
                .sidecars
                .iter()
                .filter(|sc| {
                    sc.meta.namespace == w.namespace
                        && sc.spec.workload_selector.as_ref().is_some_and(|s| {
                            !s.labels.is_empty() && labels_match(&s.labels, &w.labels)
                        })
                })
                .collect();
        let ambient = w
            .annotations
            .get("ambient.istio.io/redirection")
            .is_some_and(|v| v == "enabled");
        if ambient {
            for sc in selecting {
                if reported.insert(sc.meta.full_name()) {
                    out.push(ineffective(
                        sc,
                        "selected workload is in ambient mode, the policy has no impact",
                    ));
                }
            }
            continue;
        }
        if selecting.len() > 1 {
            let names: Vec<String> = selecting.iter().map(|s| s.meta.name.clone()).collect();
            for sc in selecting {
                out.push(Diagnostic::new(
                    Level::Error,
                    "IST0110",
                    Origin::of(&sc.meta),
                    format!(
                        "The Sidecars {} in namespace {} select the same workload pod {}, which can lead to undefined behavior.",
                        v(&names),
                        q(&w.namespace),
                        q(&w.name)
                    ),
                ));
            }
        }
    }
}

// === DestinationRules: IST0128, IST0129, IST0174; gateway NONE resolution ===

fn missing_ca(tls: &ClientTlsSettings, has_selector: bool) -> bool {
    matches!(tls.mode, ClientTlsMode::Simple | ClientTlsMode::Mutual)
        && tls.ca_certificates.is_empty()
        && tls.insecure_skip_verify != Some(true)
        && (!has_selector || tls.credential_name.is_empty())
}

fn destination_rules(
    config: &Config,
    registry: &Registry,
    mesh: &MeshSettings,
    out: &mut Vec<Diagnostic>,
) {
    // An exact name is found by the registry's index, and only the
    // wildcard services (few) are scanned for it: a scan of every service
    // per DestinationRule was quadratic (10,000 hosts: 100 million matches).
    let known = |host: &str| {
        if host.starts_with('*') {
            registry
                .services
                .iter()
                .any(|s| host_matches(host, &s.hostname) || host_matches(&s.hostname, host))
        } else {
            registry.lookup_any(host).is_some()
                || registry
                    .wildcard_services()
                    .any(|w| host_matches(&w.hostname, host))
        }
    };
    for dr in &config.destination_rules {
        let host = resolve_host(&dr.spec.host, &dr.meta.namespace, mesh);
        let has_selector = dr.spec.workload_selector.is_some();
        if let Some(tp) = &dr.spec.traffic_policy {
            if let Some(tls) = tp.tls.as_ref().filter(|t| missing_ca(t, has_selector)) {
                out.push(Diagnostic::new(
                    Level::Warning,
                    "IST0128",
                    Origin::of(&dr.meta),
                    format!(
                        "DestinationRule {} in namespace {} has TLS mode set to {} but no caCertificates are set to validate server identity for host: {}",
                        dr.meta.full_name(),
                        dr.meta.namespace,
                        tls.mode.as_str(),
                        dr.spec.host
                    ),
                ));
            }
            for (i, pl) in tp.port_level_settings.iter().enumerate() {
                if let Some(tls) = pl.tls.as_ref().filter(|t| missing_ca(t, has_selector)) {
                    out.push(Diagnostic::new(
                        Level::Warning,
                        "IST0129",
                        Origin::at_field(&dr.meta, &format!("spec.trafficPolicy.portLevelSettings[{i}]")),
                        format!(
                            "DestinationRule {} in namespace {} has TLS mode set to {} but no caCertificates are set to validate server identity for host: {} at port number:{}",
                            dr.meta.full_name(),
                            dr.meta.namespace,
                            tls.mode.as_str(),
                            dr.spec.host,
                            pl.port.map_or(0, |p| p.number)
                        ),
                    ));
                }
            }
        }
        if !known(&host) {
            out.push(Diagnostic::new(
                Level::Warning,
                "IST0174",
                Origin::at_field(&dr.meta, "spec.host"),
                format!("The host {} defined in the DestinationRule does not match any services in the mesh.", dr.spec.host),
            ));
            continue;
        }
        subsets_select_pods(config, registry, dr, &host, out);
    }

    // A gateway cannot forward to a ServiceEntry with resolution NONE (Istio
    // gives it no endpoints); meshgate refuses it up front.
    for w in registry
        .workloads
        .iter()
        .filter(|w| w.proxy == ProxyKind::Gateway)
    {
        let view = crate::view::proxy_view(config, registry, mesh, w);
        for c in view
            .clusters
            .iter()
            .filter(|c| c.resolution == crate::view::ClusterResolution::OriginalDst)
        {
            let Some(route) = view.routes.iter().find(|r| match &r.action {
                crate::view::RouteAction::Route(d) => d.iter().any(|d| d.cluster_name() == c.name),
                _ => false,
            }) else {
                continue;
            };
            let Some(vs) = config
                .virtual_services
                .iter()
                .find(|vs| Some(vs.meta.full_name()) == route.virtual_service)
            else {
                continue;
            };
            let se_name = registry
                .lookup(&c.host, &w.namespace)
                .and_then(|s| match &s.source {
                    ServiceSource::ServiceEntry { name } => Some(format!("{}/{name}", s.namespace)),
                    ServiceSource::Kubernetes { .. } => None,
                });
            out.push(Diagnostic {
                level: Level::Error,
                code: Some("MG0002"),
                origin: Origin::of(&vs.meta),
                message: format!(
                    "gateway {}/{} routes to {} but ServiceEntry {} has resolution NONE, which gives a gateway no endpoints; use resolution DNS or STATIC",
                    w.namespace,
                    w.name,
                    c.host,
                    se_name.unwrap_or_default()
                ),
            });
        }
    }
}

// === AuthorizationPolicies: IST0127, IST0101 namespace, CUSTOM ===

/// Istio's namespace patterns in a policy: `*`, `prefix*`, `*suffix`, or
/// the name.
fn namespace_matches(pattern: &str, ns: &str) -> bool {
    if pattern == "*" {
        return true;
    }
    match (pattern.strip_prefix('*'), pattern.strip_suffix('*')) {
        (Some(suffix), _) => ns.ends_with(suffix),
        (None, Some(prefix)) => ns.starts_with(prefix),
        (None, None) => ns.eq_ignore_ascii_case(pattern),
    }
}

fn authorization_policies(config: &Config, mesh: &MeshSettings, out: &mut Vec<Diagnostic>) {
    let namespaces: BTreeSet<&str> = config
        .namespaces
        .iter()
        .map(|n| n.meta.name.as_str())
        .chain(
            config
                .metas()
                .filter(|m| m.kind.namespaced())
                .map(|m| m.namespace.as_str()),
        )
        .collect();
    let workloads = crate::registry::workloads(config, mesh);
    for ap in &config.authorization_policies {
        // A namespace-wide policy where no pod of the mesh runs (the root
        // namespace's applies mesh-wide).
        let selectorless = ap
            .spec
            .selector
            .as_ref()
            .is_none_or(|s| s.match_labels.is_empty());
        if selectorless
            && ap.meta.namespace != mesh.root_namespace
            && !workloads
                .iter()
                .any(|w| w.namespace == ap.meta.namespace && w.proxy != ProxyKind::None)
        {
            out.push(Diagnostic::new(
                Level::Warning,
                "IST0127",
                Origin::of(&ap.meta),
                "No matching workloads for this resource with the following labels: ".to_owned(),
            ));
        }
        if let Some(sel) = ap
            .spec
            .selector
            .as_ref()
            .filter(|s| !s.match_labels.is_empty())
        {
            // In the root namespace a selector applies in every namespace.
            let scope = if ap.meta.namespace == mesh.root_namespace {
                None
            } else {
                Some(ap.meta.namespace.as_str())
            };
            if !any_workload_matches(config, scope, &sel.match_labels) {
                out.push(Diagnostic::new(
                    Level::Warning,
                    "IST0127",
                    Origin::at_field(&ap.meta, "spec.selector"),
                    format!(
                        "No matching workloads for this resource with the following labels: {}",
                        selector_string(&sel.match_labels)
                    ),
                ));
            }
        }
        for (i, rule) in ap.spec.rules.iter().flatten().enumerate() {
            for (j, from) in rule.from.iter().enumerate() {
                for (k, ns) in from
                    .source
                    .namespaces
                    .iter()
                    .chain(&from.source.not_namespaces)
                    .enumerate()
                {
                    // `*`, `prefix*` and `*suffix` match names, as Istio.
                    let matched = namespaces.iter().any(|n| namespace_matches(ns, n));
                    if !matched {
                        out.push(Diagnostic::new(
                            Level::Error,
                            "IST0101",
                            Origin::at_field(
                                &ap.meta,
                                &format!("spec.rules[{i}].from[{j}].source.namespaces[{k}]"),
                            ),
                            format!("Referenced namespace not found: {}", q(ns)),
                        ));
                    }
                }
            }
        }
        if ap.spec.action == AuthzAction::Custom {
            out.push(Diagnostic {
                level: Level::Warning,
                code: Some("MG0001"),
                origin: Origin::at_field(&ap.meta, "spec.action"),
                message: format!(
                    "CUSTOM authorization (provider {}) is not supported by meshgate: requests this policy selects are denied so that nothing passes unchecked",
                    ap.spec.provider.as_ref().map_or("", |p| p.name.as_str())
                ),
            });
        }
    }
}

#[cfg(test)]
mod tests;
