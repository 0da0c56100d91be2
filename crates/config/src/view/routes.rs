//! Listeners and routes: a sidecar's outbound ports (HTTP routed by Host,
//! TLS by SNI, registered TCP ports) and a gateway's servers, each with the
//! VirtualService rules (or default routes) that apply on it.

use std::collections::{BTreeSet, HashMap};

use super::select::{
    gateway_listen_port, gateway_ref_matches, gateways_for, peer_authentication_for,
    sidecar_imports, sidecar_imports_port, vs_bound_to_mesh,
};
use super::{
    DownstreamTls, Listener, MirrorView, OUTBOUND_CAPTURE_PORT, RouteAction, RouteDestination,
    RouteView,
};
use crate::MeshSettings;
use crate::model::networking::{
    Destination, Gateway, Headers, HttpMatchRequest, HttpRoute, L4MatchAttributes, Server,
    ServerTlsMode, Sidecar, VirtualService,
};
use crate::model::{Config, Resource};
use crate::registry::{
    Protocol, Registry, Service, Workload, exported_to, host_matches, hosts_overlap, resolve_host,
};

impl RouteView {
    /// A `tcp` route (matched by destination, not by SNI or request).
    pub fn is_tcp(&self) -> bool {
        self.tcp_subnets.is_some()
    }

    /// A route with Istio's defaults for everything but its action.
    fn new(listener_port: u32, host: &str, action: RouteAction) -> RouteView {
        RouteView {
            listener_port,
            host: host.to_owned(),
            matches: Vec::new(),
            action,
            virtual_service: None,
            rule: "default".to_owned(),
            rule_index: None,
            sni_hosts: Vec::new(),
            tcp_subnets: None,
            rewrite: None,
            headers: None,
            timeout: None,
            retries: None,
            fault: None,
            cors_policy: None,
            mirrors: Vec::new(),
        }
    }
}

impl Listener {
    /// One of a sidecar's outbound ports (all reached through 15001).
    fn outbound(port: u32, protocol: Protocol, hosts: Vec<String>, origin: String) -> Listener {
        Listener {
            port,
            bind_port: OUTBOUND_CAPTURE_PORT,
            protocol,
            hosts,
            tls: if protocol.is_tls() {
                DownstreamTls::SniPassthrough
            } else {
                DownstreamTls::None
            },
            peer_authentication: None,
            origin,
        }
    }
}

pub(super) fn sidecar_routes(
    vses: &[Resource<VirtualService>],
    registry: &Registry,
    mesh: &MeshSettings,
    w: &Workload,
    sidecar: Option<&Resource<Sidecar>>,
    listeners: &mut Vec<Listener>,
    routes: &mut Vec<RouteView>,
) {
    listeners.push(Listener::outbound(
        OUTBOUND_CAPTURE_PORT,
        Protocol::Unsupported,
        vec!["*".to_owned()],
        "virtualOutbound (captured and explicit-proxy traffic)".to_owned(),
    ));
    let services: Vec<&Service> = registry
        .visible_from(&w.namespace)
        .filter(|s| sidecar_imports(sidecar, s, &w.namespace))
        .collect();
    // An egress listener with a `port` imports its hosts on that port only.
    let port_scoped = sidecar.is_some_and(|sc| sc.spec.egress.iter().any(|e| e.port.is_some()));
    let scoped: Vec<Service> = if port_scoped {
        services
            .iter()
            .map(|s| Service {
                ports: s
                    .ports
                    .iter()
                    .filter(|p| sidecar_imports_port(sidecar, s, p.number, &w.namespace))
                    .cloned()
                    .collect(),
                ..(*s).clone()
            })
            .collect()
    } else {
        Vec::new()
    };
    let services: Vec<&Service> = if port_scoped {
        scoped.iter().collect()
    } else {
        services
    };
    let mut ports: BTreeSet<u32> = BTreeSet::new();
    for s in &services {
        ports.extend(
            s.ports
                .iter()
                .filter(|p| p.protocol.is_http())
                .map(|p| p.number),
        );
    }
    let mesh_vs: Vec<&Resource<VirtualService>> = vses
        .iter()
        .filter(|vs| {
            vs_bound_to_mesh(&vs.spec)
                && exported_to(&vs.spec.export_to, &vs.meta.namespace, &w.namespace)
        })
        .collect();
    let by_host = VsByHost::new(&mesh_vs, mesh);
    for port in ports {
        let mut hosts = Vec::new();
        for s in services
            .iter()
            .filter(|s| s.port(port).is_some_and(|p| p.protocol.is_http()))
        {
            hosts.push(s.hostname.clone());
            let vs = by_host.find(&s.hostname);
            let before = routes.len();
            if let Some(vs) = vs {
                vs_http_routes(
                    registry,
                    mesh,
                    w,
                    vs,
                    port,
                    &s.hostname,
                    |m| m.gateways.is_empty() || m.gateways.iter().any(|g| g == "mesh"),
                    routes,
                );
            }
            if routes.len() == before {
                routes.push(default_route(port, s));
            }
        }
        listeners.push(Listener::outbound(
            port,
            Protocol::Http,
            hosts,
            format!("0.0.0.0_{port} (via virtualOutbound)"),
        ));
    }
    sidecar_tls_routes(registry, mesh, w, &services, &mesh_vs, listeners, routes);
    // Plain TCP ports of registered services: known to the mesh, so
    // REGISTRY_ONLY lets them through (to the original destination).
    let mut tcp_ports: BTreeSet<u32> = BTreeSet::new();
    for s in &services {
        tcp_ports.extend(
            s.ports
                .iter()
                .filter(|p| {
                    !p.protocol.is_http() && !p.protocol.is_tls() && p.protocol != Protocol::Udp
                })
                .map(|p| p.number),
        );
    }
    for port in tcp_ports {
        if listeners.iter().any(|l| l.port == port) {
            continue;
        }
        let on_port: Vec<&&Service> = services.iter().filter(|s| s.port(port).is_some()).collect();
        for s in &on_port {
            let vs = by_host.find(&s.hostname);
            if let Some(vs) = vs {
                let applies = |m: &L4MatchAttributes| {
                    (m.gateways.is_empty() || m.gateways.iter().any(|g| g == "mesh"))
                        && (m.source_namespace.is_empty() || m.source_namespace == w.namespace)
                        && m.source_labels
                            .iter()
                            .all(|(k, v)| w.labels.get(k) == Some(v))
                };
                tcp_routes(registry, mesh, w, vs, port, &s.addresses, applies, routes);
            }
        }
        listeners.push(Listener::outbound(
            port,
            Protocol::Tcp,
            on_port.iter().map(|s| s.hostname.clone()).collect(),
            format!(
                "0.0.0.0_{port} TCP (via virtualOutbound, by tcp routes, else to the original destination)"
            ),
        ));
    }
}

/// The routes of one VirtualService's `tcp` rules on `port` (`applies`
/// filters matches by gateway and source). A rule matches the
/// destinations in its matches' `destinationSubnets`, else
/// `default_subnets` (the host's addresses), else any destination.
#[allow(clippy::too_many_arguments)]
fn tcp_routes(
    registry: &Registry,
    mesh: &MeshSettings,
    w: &Workload,
    vs: &Resource<VirtualService>,
    port: u32,
    default_subnets: &[String],
    applies: impl Fn(&L4MatchAttributes) -> bool,
    routes: &mut Vec<RouteView>,
) {
    for (i, rule) in vs.spec.tcp.iter().enumerate() {
        let matches: Vec<&L4MatchAttributes> = rule
            .matches
            .iter()
            .filter(|m| m.port.is_none_or(|p| p == port) && applies(m))
            .collect();
        if !rule.matches.is_empty() && matches.is_empty() {
            continue;
        }
        let mut subnets: Vec<String> = matches
            .iter()
            .flat_map(|m| m.destination_subnets.iter().cloned())
            .collect();
        if subnets.is_empty() || matches.iter().any(|m| m.destination_subnets.is_empty()) {
            subnets = default_subnets.to_vec();
        }
        let dests = l4_destinations(registry, mesh, w, vs, &rule.route, port);
        let host = vs.spec.hosts.first().cloned().unwrap_or_default();
        routes.push(RouteView {
            virtual_service: Some(vs.meta.full_name()),
            rule: format!("#{i}"),
            rule_index: Some(i),
            tcp_subnets: Some(subnets),
            ..RouteView::new(port, &host, RouteAction::Route(dests))
        });
    }
}

/// TCP Gateway servers (and TLS servers that terminate): `tcp` rules of
/// the VirtualServices bound to the gateway whose hosts the server covers.
fn gateway_tcp_routes(
    bound: &BoundVses<'_>,
    registry: &Registry,
    mesh: &MeshSettings,
    w: &Workload,
    gw: &Resource<Gateway>,
    server: &Server,
    routes: &mut Vec<RouteView>,
) {
    for vs in bound.of(gw).iter().copied().filter(|vs| {
        exported_to(&vs.spec.export_to, &vs.meta.namespace, &gw.meta.namespace)
            && vs.spec.hosts.iter().any(|h| {
                let h = resolve_host(h, &vs.meta.namespace, mesh);
                server_hosts_cover(server, &gw.meta.namespace, &vs.meta.namespace, &h)
            })
    }) {
        let applies = |m: &L4MatchAttributes| match_bound_here(&m.gateways, &vs.meta.namespace, gw);
        tcp_routes(
            registry,
            mesh,
            w,
            vs,
            server.port.number,
            &[],
            applies,
            routes,
        );
    }
}

/// The mesh VirtualServices by host: the first (in their order) whose
/// hosts cover a name, in constant time for exact hosts (10,000 hosts stay
/// cheap); wildcard hosts are tried in turn.
struct VsByHost<'a> {
    list: &'a [&'a Resource<VirtualService>],
    exact: HashMap<String, usize>,
    wildcard: Vec<(String, usize)>,
}

impl<'a> VsByHost<'a> {
    fn new(list: &'a [&'a Resource<VirtualService>], mesh: &MeshSettings) -> Self {
        let mut exact = HashMap::new();
        let mut wildcard = Vec::new();
        for (i, vs) in list.iter().enumerate() {
            for h in &vs.spec.hosts {
                let host = resolve_host(h, &vs.meta.namespace, mesh).to_ascii_lowercase();
                if host.starts_with('*') {
                    wildcard.push((host, i));
                } else {
                    exact.entry(host).or_insert(i);
                }
            }
        }
        VsByHost {
            list,
            exact,
            wildcard,
        }
    }

    fn find(&self, name: &str) -> Option<&'a Resource<VirtualService>> {
        let exact = self.exact.get(&name.to_ascii_lowercase()).copied();
        let wild = self
            .wildcard
            .iter()
            .filter(|(pattern, _)| host_matches(pattern, name))
            .map(|(_, i)| *i)
            .min();
        exact.into_iter().chain(wild).min().map(|i| self.list[i])
    }
}

/// TLS ports (HTTPS/TLS service ports): VirtualService `tls` rules bound to
/// the mesh first, then one SNI route per service host to itself.
fn sidecar_tls_routes(
    registry: &Registry,
    mesh: &MeshSettings,
    w: &Workload,
    services: &[&Service],
    mesh_vs: &[&Resource<VirtualService>],
    listeners: &mut Vec<Listener>,
    routes: &mut Vec<RouteView>,
) {
    let mut ports: BTreeSet<u32> = BTreeSet::new();
    for s in services {
        ports.extend(
            s.ports
                .iter()
                .filter(|p| p.protocol.is_tls())
                .map(|p| p.number),
        );
    }
    for port in ports {
        let mut hosts = Vec::new();
        for vs in mesh_vs {
            for (i, rule) in vs.spec.tls.iter().enumerate() {
                let sni: Vec<String> = rule
                    .matches
                    .iter()
                    .filter(|m| m.port.is_none_or(|p| p == port))
                    .filter(|m| m.gateways.is_empty() || m.gateways.iter().any(|g| g == "mesh"))
                    .flat_map(|m| m.sni_hosts.iter().cloned())
                    .collect();
                hosts.extend(sni.iter().cloned());
                routes.extend(tls_route(registry, mesh, w, vs, i, port, sni));
            }
        }
        for s in services
            .iter()
            .filter(|s| s.port(port).is_some_and(|p| p.protocol.is_tls()))
        {
            hosts.push(s.hostname.clone());
            routes.push(RouteView {
                sni_hosts: vec![s.hostname.clone()],
                ..default_route(port, s)
            });
        }
        listeners.push(Listener::outbound(
            port,
            Protocol::Tls,
            hosts,
            format!("0.0.0.0_{port} (via virtualOutbound)"),
        ));
    }
}

fn default_route(port: u32, s: &Service) -> RouteView {
    let to_itself = RouteDestination {
        host: s.hostname.clone(),
        port,
        subset: String::new(),
        weight: 100,
        headers: None,
    };
    RouteView::new(port, &s.hostname, RouteAction::Route(vec![to_itself]))
}

/// VirtualService `tls` rule `i` on `port`: the SNI names of its matches
/// that apply here to its destinations (`None` when no name applies).
fn tls_route(
    registry: &Registry,
    mesh: &MeshSettings,
    w: &Workload,
    vs: &Resource<VirtualService>,
    i: usize,
    port: u32,
    sni: Vec<String>,
) -> Option<RouteView> {
    let host = sni.first()?.clone();
    let rule = vs.spec.tls.get(i)?;
    let dests = l4_destinations(registry, mesh, w, vs, &rule.route, port);
    Some(RouteView {
        virtual_service: Some(vs.meta.full_name()),
        rule: format!("#{i}"),
        rule_index: Some(i),
        sni_hosts: sni,
        ..RouteView::new(port, &host, RouteAction::Route(dests))
    })
}

/// Adds the routes of one VirtualService's `http` rules that apply on
/// `port` for this proxy (`applies` filters per-match `gateways`).
#[allow(clippy::too_many_arguments)]
fn vs_http_routes(
    registry: &Registry,
    mesh: &MeshSettings,
    w: &Workload,
    vs: &Resource<VirtualService>,
    port: u32,
    host: &str,
    applies: impl Fn(&HttpMatchRequest) -> bool,
    routes: &mut Vec<RouteView>,
) {
    for (i, rule) in vs.spec.http.iter().enumerate() {
        let matches: Vec<HttpMatchRequest> = rule
            .matches
            .iter()
            .filter(|m| m.port.is_none_or(|p| p == port) && applies(m))
            .cloned()
            .collect();
        if !rule.matches.is_empty() && matches.is_empty() {
            continue;
        }
        routes.push(RouteView {
            matches,
            virtual_service: Some(vs.meta.full_name()),
            rule: if rule.name.is_empty() {
                format!("#{i}")
            } else {
                rule.name.clone()
            },
            rule_index: Some(i),
            rewrite: rule.rewrite.clone(),
            headers: rule.headers.clone(),
            timeout: rule.timeout,
            retries: rule.retries.clone(),
            fault: rule.fault.clone(),
            cors_policy: rule.cors_policy.clone(),
            mirrors: mirrors(registry, mesh, w, &vs.meta.namespace, rule, port),
            ..RouteView::new(port, host, route_action(registry, mesh, w, vs, rule, port))
        });
    }
}

fn route_action(
    registry: &Registry,
    mesh: &MeshSettings,
    w: &Workload,
    vs: &Resource<VirtualService>,
    rule: &HttpRoute,
    listener_port: u32,
) -> RouteAction {
    if let Some(r) = &rule.redirect {
        return RouteAction::Redirect(r.clone());
    }
    if let Some(d) = &rule.direct_response {
        return RouteAction::DirectResponse(d.clone());
    }
    RouteAction::Route(route_destinations(
        registry,
        mesh,
        w,
        &vs.meta.namespace,
        rule.route
            .iter()
            .map(|rd| (&rd.destination, rd.weight, rd.headers.as_ref())),
        listener_port,
    ))
}

/// A rule's mirrors: `mirror` (with `mirrorPercentage`, or the older
/// `mirrorPercent`) and each of `mirrors`; 100% unless a percentage is set.
fn mirrors(
    registry: &Registry,
    mesh: &MeshSettings,
    w: &Workload,
    vs_namespace: &str,
    rule: &HttpRoute,
    listener_port: u32,
) -> Vec<MirrorView> {
    let legacy = rule.mirror.iter().map(|d| {
        let pct = rule
            .mirror_percentage
            .map(|p| p.value)
            .or(rule.mirror_percent.map(f64::from));
        (d, pct)
    });
    let listed = rule
        .mirrors
        .iter()
        .map(|m| (&m.destination, m.percentage.map(|p| p.value)));
    legacy
        .chain(listed)
        .filter_map(|(d, pct)| {
            let mut one = route_destinations(
                registry,
                mesh,
                w,
                vs_namespace,
                std::iter::once((d, None, None)),
                listener_port,
            );
            one.pop().map(|destination| MirrorView {
                destination,
                percent: pct.unwrap_or(100.0),
            })
        })
        .collect()
}

/// A `tls` or `tcp` rule's destinations (no header changes at L4).
fn l4_destinations(
    registry: &Registry,
    mesh: &MeshSettings,
    w: &Workload,
    vs: &Resource<VirtualService>,
    route: &[crate::model::networking::RouteDestination],
    port: u32,
) -> Vec<RouteDestination> {
    route_destinations(
        registry,
        mesh,
        w,
        &vs.meta.namespace,
        route.iter().map(|rd| (&rd.destination, rd.weight, None)),
        port,
    )
}

/// A rule's destinations with hosts resolved (short names relative to the
/// VirtualService's namespace), ports chosen, and weights normalised (a
/// single destination gets all the traffic).
fn route_destinations<'a>(
    registry: &Registry,
    mesh: &MeshSettings,
    w: &Workload,
    vs_namespace: &str,
    route: impl ExactSizeIterator<Item = (&'a Destination, Option<u32>, Option<&'a Headers>)>,
    listener_port: u32,
) -> Vec<RouteDestination> {
    let single = route.len() == 1;
    route
        .map(|(d, weight, headers)| {
            let host = resolve_host(&d.host, vs_namespace, mesh);
            let port = destination_port(
                registry,
                &w.namespace,
                &host,
                d.port.map(|p| p.number),
                listener_port,
            );
            RouteDestination {
                host,
                port,
                subset: d.subset.clone(),
                weight: if single { 100 } else { weight.unwrap_or(0) },
                headers: headers.cloned(),
            }
        })
        .collect()
}

/// Destination port: the explicit one, else the service's only port, else
/// the port the request arrived on.
pub fn destination_port(
    registry: &Registry,
    from_ns: &str,
    host: &str,
    explicit: Option<u32>,
    listener_port: u32,
) -> u32 {
    if let Some(p) = explicit.filter(|p| *p != 0) {
        return p;
    }
    match registry.lookup(host, from_ns).map(|s| s.ports.as_slice()) {
        Some([only]) => only.number,
        _ => listener_port,
    }
}

/// The VirtualServices each Gateway binds (`gateways`, as
/// [`vs_bound_to_gateway`] reads them), by the Gateway's namespace and
/// name, in order: a Gateway's servers walk only their own VirtualServices
/// (a walk of all of them per server was quadratic: 10,000 Gateways of one
/// host each).
struct BoundVses<'a> {
    by_gateway: HashMap<(&'a str, &'a str), Vec<&'a Resource<VirtualService>>>,
}

impl<'a> BoundVses<'a> {
    fn new(vses: &'a [Resource<VirtualService>]) -> Self {
        let mut by_gateway: HashMap<_, Vec<&Resource<VirtualService>>> = HashMap::new();
        for vs in vses {
            for g in &vs.spec.gateways {
                let key = match g.split_once('/') {
                    Some((ns, name)) => (ns, name),
                    None if g == "mesh" => continue,
                    None => (vs.meta.namespace.as_str(), g.as_str()),
                };
                let list = by_gateway.entry(key).or_default();
                // Named twice (`g` and `ns/g`): listed once.
                if !list.last().is_some_and(|last| std::ptr::eq(*last, vs)) {
                    list.push(vs);
                }
            }
        }
        BoundVses { by_gateway }
    }

    fn of(&self, gw: &'a Resource<Gateway>) -> &[&'a Resource<VirtualService>] {
        let key = (gw.meta.namespace.as_str(), gw.meta.name.as_str());
        self.by_gateway.get(&key).map_or(&[], Vec::as_slice)
    }
}

pub(super) fn gateway_routes(
    config: &Config,
    vses: &[Resource<VirtualService>],
    registry: &Registry,
    mesh: &MeshSettings,
    w: &Workload,
    listeners: &mut Vec<Listener>,
    routes: &mut Vec<RouteView>,
) {
    let bound = BoundVses::new(vses);
    let bound_unmerged = BoundVses::new(&config.virtual_services);
    for gw in gateways_for(config, w) {
        for (si, server) in gw.spec.servers.iter().enumerate() {
            let protocol = Protocol::parse(&server.port.protocol);
            let (bind_port, _) = gateway_listen_port(registry, w, server.port.number);
            let tls = match &server.tls {
                Some(t) if protocol.is_tls() => DownstreamTls::Server(Box::new(t.clone())),
                None if protocol.is_tls() => DownstreamTls::SniPassthrough,
                _ if protocol.is_http() => DownstreamTls::MeshAuto,
                _ => DownstreamTls::None,
            };
            let pa = peer_authentication_for(config, w, Some(server.port.number), mesh);
            listeners.push(Listener {
                port: server.port.number,
                bind_port,
                protocol,
                hosts: server.hosts.clone(),
                tls,
                peer_authentication: Some(pa),
                origin: format!(
                    "Gateway {} server {}",
                    gw.meta.full_name(),
                    if server.name.is_empty() {
                        format!("#{si}")
                    } else {
                        server.name.clone()
                    }
                ),
            });
            if gateway_server_is_passthrough(server) {
                if server
                    .tls
                    .as_ref()
                    .is_some_and(|t| t.mode == ServerTlsMode::AutoPassthrough)
                {
                    auto_passthrough_routes(config, registry, mesh, w, gw, server, routes);
                } else {
                    gateway_tls_routes(&bound_unmerged, registry, mesh, w, gw, server, routes);
                }
                continue;
            }
            if !gateway_server_is_http(server) {
                gateway_tcp_routes(&bound, registry, mesh, w, gw, server, routes);
                continue;
            }
            for vs in bound.of(gw).iter().copied().filter(|vs| {
                exported_to(&vs.spec.export_to, &vs.meta.namespace, &gw.meta.namespace)
            }) {
                for host in &vs.spec.hosts {
                    let host = resolve_host(host, &vs.meta.namespace, mesh);
                    if !server_hosts_cover(server, &gw.meta.namespace, &vs.meta.namespace, &host) {
                        continue;
                    }
                    let applies = |m: &HttpMatchRequest| {
                        match_bound_here(&m.gateways, &vs.meta.namespace, gw)
                    };
                    vs_http_routes(
                        registry,
                        mesh,
                        w,
                        vs,
                        server.port.number,
                        &host,
                        applies,
                        routes,
                    );
                }
            }
        }
    }
}

/// AUTO_PASSTHROUGH: no VirtualService; the client names the cluster in
/// its SNI (`outbound_.<port>_.<subset>_.<host>`, as Istio's mesh mTLS
/// does) and its TLS goes through untouched, to every service the server's
/// hosts cover, on each of its ports and DestinationRule subsets.
fn auto_passthrough_routes(
    config: &Config,
    registry: &Registry,
    mesh: &MeshSettings,
    w: &Workload,
    gw: &Resource<Gateway>,
    server: &Server,
    routes: &mut Vec<RouteView>,
) {
    let port = server.port.number;
    let drs = super::select::DrIndex::new(config, mesh);
    // A wildcard host names no one cluster; resolution NONE gives a
    // gateway no endpoints.
    let routable = |s: &Service| {
        let no_endpoints = matches!(
            s.source,
            crate::registry::ServiceSource::ServiceEntry { .. }
        ) && s.resolution == crate::model::networking::Resolution::None;
        !s.hostname.starts_with('*') && !no_endpoints
    };
    for s in registry.visible_from(&gw.meta.namespace).filter(|s| {
        routable(s) && server_hosts_cover(server, &gw.meta.namespace, &s.namespace, &s.hostname)
    }) {
        let dr = drs.find(&gw.meta.namespace, Some(w), &s.hostname, &s.namespace, mesh);
        let subsets = std::iter::once(String::new()).chain(
            dr.into_iter()
                .flat_map(|d| d.spec.subsets.iter().map(|x| x.name.clone())),
        );
        for subset in subsets {
            for p in &s.ports {
                let sni = format!("outbound_.{}_.{subset}_.{}", p.number, s.hostname);
                let destination = RouteDestination {
                    host: s.hostname.clone(),
                    port: p.number,
                    subset: subset.clone(),
                    weight: 100,
                    headers: None,
                };
                routes.push(RouteView {
                    rule: "auto-passthrough".to_owned(),
                    sni_hosts: vec![sni.clone()],
                    ..RouteView::new(port, &sni, RouteAction::Route(vec![destination]))
                });
            }
        }
    }
}

/// A match's `gateways` (empty: the VirtualService's) include this one.
fn match_bound_here(gateways: &[String], vs_namespace: &str, gw: &Resource<Gateway>) -> bool {
    gateways.is_empty()
        || gateways
            .iter()
            .any(|g| gateway_ref_matches(g, vs_namespace, gw))
}

/// HTTPS/TLS servers in PASSTHROUGH mode route by SNI with `tls` routes.
pub fn gateway_server_is_passthrough(server: &Server) -> bool {
    Protocol::parse(&server.port.protocol).is_tls()
        && server.tls.as_ref().is_none_or(|t| {
            matches!(
                t.mode,
                ServerTlsMode::Passthrough | ServerTlsMode::AutoPassthrough
            )
        })
}

/// `tls` rules of VirtualServices bound to a passthrough Gateway server.
fn gateway_tls_routes(
    bound: &BoundVses<'_>,
    registry: &Registry,
    mesh: &MeshSettings,
    w: &Workload,
    gw: &Resource<Gateway>,
    server: &Server,
    routes: &mut Vec<RouteView>,
) {
    let port = server.port.number;
    for vs in bound
        .of(gw)
        .iter()
        .copied()
        .filter(|vs| exported_to(&vs.spec.export_to, &vs.meta.namespace, &gw.meta.namespace))
    {
        for (i, rule) in vs.spec.tls.iter().enumerate() {
            let sni: Vec<String> = rule
                .matches
                .iter()
                .filter(|m| m.port.is_none_or(|p| p == port))
                .filter(|m| match_bound_here(&m.gateways, &vs.meta.namespace, gw))
                .flat_map(|m| m.sni_hosts.iter())
                .filter(|h| server_hosts_cover(server, &gw.meta.namespace, &vs.meta.namespace, h))
                .cloned()
                .collect();
            routes.extend(tls_route(registry, mesh, w, vs, i, port, sni));
        }
    }
}

/// HTTP routes apply to HTTP servers and to TLS-terminating HTTPS servers.
pub fn gateway_server_is_http(server: &Server) -> bool {
    let protocol = Protocol::parse(&server.port.protocol);
    protocol.is_http()
        || (protocol == Protocol::Https
            && server.tls.as_ref().is_some_and(|t| {
                !matches!(
                    t.mode,
                    ServerTlsMode::Passthrough | ServerTlsMode::AutoPassthrough
                )
            }))
}

/// Does a Gateway server's `hosts` (`[ns/]host`) admit a VirtualService host
/// from `vs_ns`?
pub fn server_hosts_cover(server: &Server, gw_ns: &str, vs_ns: &str, host: &str) -> bool {
    server.hosts.iter().any(|h| {
        let (ns, pattern) = h.split_once('/').unwrap_or(("*", h));
        let ns_ok = match ns {
            "*" => true,
            "." => vs_ns == gw_ns,
            other => other == vs_ns,
        };
        ns_ok && hosts_overlap(pattern, host)
    })
}
