//! Semantic validation of single resources, as Istio's validating webhook
//! does it. Type and unknown-field errors are caught earlier, while parsing;
//! these are the rules a schema cannot express (one-of fields, value ranges,
//! combinations). Each problem is `(field path, message)`.

use std::collections::HashSet;
use std::net::IpAddr;

use crate::model::networking::{
    CaptureMode, ClientTlsMode, ClientTlsSettings, DestinationRule, Gateway, HttpRoute,
    IstioIngressListener, OutboundMode, Resolution, ServerTlsMode, ServiceEntry, Sidecar,
    StringMatch, TrafficPolicy, VirtualService,
};
use crate::model::security::{
    AuthorizationPolicy, AuthzAction, PeerAuthentication, RequestAuthentication,
};
use crate::model::{Config, Kind, Meta};

type Problems = Vec<(String, String)>;

/// Validates the resource most recently added for `kind`.
pub(crate) fn last_added(config: &Config, kind: Kind) -> Problems {
    let mut p = Problems::new();
    let meta = match kind {
        Kind::Namespace => config.namespaces.last().map(|r| &r.meta),
        Kind::ServiceAccount => config.service_accounts.last().map(|r| &r.meta),
        Kind::Service => config.services.last().map(|r| &r.meta),
        Kind::EndpointSlice => config.endpoint_slices.last().map(|r| &r.meta),
        Kind::Pod | Kind::Deployment => config.workloads.last().map(|r| &r.meta),
        Kind::ServiceEntry => config.service_entries.last().map(|r| {
            service_entry(&r.spec, &mut p);
            &r.meta
        }),
        Kind::VirtualService => config.virtual_services.last().map(|r| {
            virtual_service(&r.spec, &mut p);
            &r.meta
        }),
        Kind::DestinationRule => config.destination_rules.last().map(|r| {
            destination_rule(&r.spec, &mut p);
            &r.meta
        }),
        Kind::Gateway => config.gateways.last().map(|r| {
            gateway(&r.spec, &mut p);
            &r.meta
        }),
        Kind::Sidecar => config.sidecars.last().map(|r| {
            sidecar(&r.spec, &mut p);
            &r.meta
        }),
        Kind::AuthorizationPolicy => config.authorization_policies.last().map(|r| {
            authorization_policy(&r.spec, &mut p);
            &r.meta
        }),
        Kind::PeerAuthentication => config.peer_authentications.last().map(|r| {
            peer_authentication(&r.spec, &mut p);
            &r.meta
        }),
        Kind::RequestAuthentication => config.request_authentications.last().map(|r| {
            request_authentication(&r.spec, &mut p);
            &r.meta
        }),
    };
    if let Some(meta) = meta {
        metadata(meta, &mut p);
    }
    p
}

fn push(p: &mut Problems, path: impl Into<String>, msg: impl Into<String>) {
    p.push((path.into(), msg.into()));
}

fn metadata(meta: &Meta, p: &mut Problems) {
    if meta.name.is_empty() {
        push(p, "metadata", "required field \"name\" is missing");
    } else if !is_dns1123_subdomain(&meta.name) {
        push(
            p,
            "metadata.name",
            format!(
                "invalid name \"{}\": must be lowercase letters, digits, '-' or '.'",
                meta.name
            ),
        );
    }
    if meta.kind.namespaced() && !is_dns1123_label(&meta.namespace) {
        push(
            p,
            "metadata.namespace",
            format!("invalid namespace \"{}\"", meta.namespace),
        );
    }
}

pub(crate) fn is_dns1123_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

fn is_dns1123_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(is_dns1123_label)
}

/// A DNS name, optionally with a leading `*` label (`*.example.com`), or `*`.
fn wildcard_domain(host: &str) -> Result<(), String> {
    if host.is_empty() {
        return Err("empty host".into());
    }
    if host.len() > 255 {
        return Err(format!("host \"{host}\" is longer than 255 characters"));
    }
    let rest = match host.strip_prefix('*') {
        Some("") => return Ok(()),
        Some(r) => r.strip_prefix('.').ok_or_else(|| {
            format!("invalid host \"{host}\": a wildcard must be the whole first label")
        })?,
        None => host,
    };
    let ok = rest.split('.').all(|label| {
        !label.is_empty()
            && label.len() <= 63
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !label.starts_with('-')
            && !label.ends_with('-')
    });
    if ok {
        Ok(())
    } else {
        Err(format!("invalid host \"{host}\""))
    }
}

fn export_to(list: &[String], allow_tilde: bool, path: &str, p: &mut Problems) {
    let mut seen = HashSet::new();
    for (i, e) in list.iter().enumerate() {
        if !seen.insert(e) {
            push(
                p,
                format!("{path}[{i}]"),
                format!("duplicate exportTo entry \"{e}\""),
            );
        }
        let valid = e == "." || e == "*" || (e == "~" && allow_tilde) || is_dns1123_label(e);
        if !valid {
            push(
                p,
                format!("{path}[{i}]"),
                format!("invalid exportTo value \"{e}\""),
            );
        }
    }
    if list.len() > 1 && list.iter().any(|e| e == "*") {
        push(
            p,
            path,
            "exportTo \"*\" cannot be combined with other values",
        );
    }
    if list.len() > 1 && list.iter().any(|e| e == "~") {
        push(
            p,
            path,
            "exportTo \"~\" cannot be combined with other values",
        );
    }
}

fn port_number(n: u32, path: &str, p: &mut Problems) {
    if !(1..=65535).contains(&n) {
        push(
            p,
            path,
            format!("port number {n} must be in the range 1..65535"),
        );
    }
}

fn cidr_or_ip(s: &str) -> bool {
    s.parse::<IpAddr>().is_ok() || s.parse::<ipnet::IpNet>().is_ok()
}

fn string_match(m: &StringMatch, path: &str, p: &mut Problems) {
    let set = [m.exact.is_some(), m.prefix.is_some(), m.regex.is_some()]
        .iter()
        .filter(|b| **b)
        .count();
    if set > 1 {
        push(p, path, "only one of exact, prefix or regex may be set");
    }
    if let Some(re) = &m.regex
        && let Err(e) = regex::Regex::new(re)
    {
        push(
            p,
            format!("{path}.regex"),
            format!("invalid regex \"{re}\": {e}"),
        );
    }
}

// === ServiceEntry ===

fn service_entry(se: &ServiceEntry, p: &mut Problems) {
    if se.hosts.is_empty() {
        push(p, "spec", "required field \"hosts\" is missing");
    }
    for (i, h) in se.hosts.iter().enumerate() {
        if h == "*" {
            push(
                p,
                format!("spec.hosts[{i}]"),
                "invalid host \"*\": a ServiceEntry cannot match all hosts",
            );
        } else if let Err(e) = wildcard_domain(h) {
            push(p, format!("spec.hosts[{i}]"), e);
        }
        if matches!(se.resolution, Resolution::Dns) && se.endpoints.is_empty() && h.starts_with('*')
        {
            push(
                p,
                format!("spec.hosts[{i}]"),
                "wildcard host cannot be resolved by DNS when no endpoints are given",
            );
        }
    }
    for (i, a) in se.addresses.iter().enumerate() {
        if !cidr_or_ip(a) {
            push(
                p,
                format!("spec.addresses[{i}]"),
                format!("invalid address \"{a}\""),
            );
        } else if a.contains('/') && !matches!(se.resolution, Resolution::None | Resolution::Static)
        {
            push(
                p,
                format!("spec.addresses[{i}]"),
                "CIDR addresses are allowed only with resolution NONE or STATIC",
            );
        }
    }
    let mut numbers = HashSet::new();
    let mut names = HashSet::new();
    for (i, port) in se.ports.iter().enumerate() {
        let path = format!("spec.ports[{i}]");
        port_number(port.number, &format!("{path}.number"), p);
        if let Some(t) = port.target_port {
            port_number(t, &format!("{path}.targetPort"), p);
        }
        if port.name.is_empty() {
            push(p, &path, "required field \"name\" is missing");
        } else if !names.insert(&port.name) {
            push(
                p,
                format!("{path}.name"),
                format!("duplicate port name \"{}\"", port.name),
            );
        }
        if !numbers.insert(port.number) {
            push(
                p,
                format!("{path}.number"),
                format!("duplicate port number {}", port.number),
            );
        }
    }
    match se.resolution {
        Resolution::None if !se.endpoints.is_empty() => push(
            p,
            "spec.endpoints",
            "no endpoints may be given with resolution NONE",
        ),
        Resolution::DnsRoundRobin if se.endpoints.len() > 1 => push(
            p,
            "spec.endpoints",
            "resolution DNS_ROUND_ROBIN allows at most one endpoint",
        ),
        Resolution::DynamicDns if !se.endpoints.is_empty() || !se.addresses.is_empty() => push(
            p,
            "spec",
            "resolution DYNAMIC_DNS allows no addresses or endpoints",
        ),
        _ => {}
    }
    if se.workload_selector.is_some() && !se.endpoints.is_empty() {
        push(
            p,
            "spec",
            "only one of endpoints or workloadSelector may be set",
        );
    }
    for (i, ep) in se.endpoints.iter().enumerate() {
        let path = format!("spec.endpoints[{i}]");
        if ep.address.is_empty() {
            push(p, &path, "required field \"address\" is missing");
        } else if matches!(se.resolution, Resolution::Static)
            && ep.address.parse::<IpAddr>().is_err()
            && !ep.address.starts_with("unix://")
        {
            push(
                p,
                format!("{path}.address"),
                format!(
                    "address \"{}\" must be an IP with resolution STATIC",
                    ep.address
                ),
            );
        }
        for (name, n) in &ep.ports {
            port_number(*n, &format!("{path}.ports.{name}"), p);
            if !se.ports.iter().any(|sp| &sp.name == name) {
                push(
                    p,
                    format!("{path}.ports"),
                    format!("endpoint port \"{name}\" is not a port name of the ServiceEntry"),
                );
            }
        }
    }
    export_to(&se.export_to, true, "spec.exportTo", p);
}

// === VirtualService ===

fn virtual_service(vs: &VirtualService, p: &mut Problems) {
    // No hosts: a delegate, reachable only through a root's `delegate`.
    let delegate = vs.hosts.is_empty();
    if delegate {
        for (field, set) in [
            ("gateways", !vs.gateways.is_empty()),
            ("tls", !vs.tls.is_empty()),
            ("tcp", !vs.tcp.is_empty()),
        ] {
            if set {
                push(
                    p,
                    format!("spec.{field}"),
                    format!("a delegate VirtualService (one without hosts) cannot have {field}"),
                );
            }
        }
        for (i, route) in vs.http.iter().enumerate() {
            if route.delegate.is_some() {
                push(
                    p,
                    format!("spec.http[{i}].delegate"),
                    "delegate HTTP route cannot contain delegate",
                );
            }
        }
    }
    let mesh_bound = vs.gateways.is_empty() || vs.gateways.iter().any(|g| g == "mesh");
    let mut seen = HashSet::new();
    for (i, h) in vs.hosts.iter().enumerate() {
        let path = format!("spec.hosts[{i}]");
        if !seen.insert(h) {
            push(p, &path, format!("duplicate host \"{h}\""));
        }
        if h == "*" && mesh_bound {
            push(
                p,
                &path,
                "wildcard host \"*\" is not allowed for VirtualServices bound to the mesh",
            );
        } else if h.parse::<IpAddr>().is_ok() {
            if mesh_bound {
                push(
                    p,
                    &path,
                    format!("IP address \"{h}\" is allowed as a host only for gateways"),
                );
            }
        } else if let Err(e) = wildcard_domain(h) {
            push(p, &path, e);
        }
    }
    for (i, g) in vs.gateways.iter().enumerate() {
        let name = g.rsplit_once('/').map_or(g.as_str(), |(_, n)| n);
        if g != "mesh" && !is_dns1123_subdomain(name) {
            push(
                p,
                format!("spec.gateways[{i}]"),
                format!("invalid gateway name \"{g}\""),
            );
        }
    }
    if vs.http.is_empty() && vs.tls.is_empty() && vs.tcp.is_empty() {
        push(
            p,
            "spec",
            "at least one of http, tls or tcp routes is required",
        );
    }
    for (i, route) in vs.http.iter().enumerate() {
        http_route(route, &format!("spec.http[{i}]"), p);
    }
    for (i, route) in vs.tls.iter().enumerate() {
        let path = format!("spec.tls[{i}]");
        if route.matches.is_empty() {
            push(p, &path, "required field \"match\" is missing");
        }
        for (j, m) in route.matches.iter().enumerate() {
            if m.sni_hosts.is_empty() {
                push(
                    p,
                    format!("{path}.match[{j}]"),
                    "required field \"sniHosts\" is missing",
                );
            }
            for (k, sni) in m.sni_hosts.iter().enumerate() {
                if let Err(e) = wildcard_domain(sni) {
                    push(p, format!("{path}.match[{j}].sniHosts[{k}]"), e);
                }
            }
        }
        l4_routes(
            route.route.iter().map(|r| (&r.destination, r.weight)),
            &path,
            p,
        );
    }
    for (i, route) in vs.tcp.iter().enumerate() {
        let path = format!("spec.tcp[{i}]");
        for (j, m) in route.matches.iter().enumerate() {
            for (k, n) in m.destination_subnets.iter().enumerate() {
                if !cidr_or_ip(n) {
                    push(
                        p,
                        format!("{path}.match[{j}].destinationSubnets[{k}]"),
                        format!("invalid subnet \"{n}\": expected an IP address or CIDR"),
                    );
                }
            }
        }
        l4_routes(
            route.route.iter().map(|r| (&r.destination, r.weight)),
            &path,
            p,
        );
    }
    export_to(&vs.export_to, false, "spec.exportTo", p);
}

fn l4_routes<'a>(
    routes: impl Iterator<Item = (&'a crate::model::networking::Destination, Option<u32>)>,
    path: &str,
    p: &mut Problems,
) {
    let routes: Vec<_> = routes.collect();
    if routes.is_empty() {
        push(p, path, "required field \"route\" is missing");
    }
    destinations(&routes, path, p);
}

fn destinations(
    routes: &[(&crate::model::networking::Destination, Option<u32>)],
    path: &str,
    p: &mut Problems,
) {
    for (j, (d, _)) in routes.iter().enumerate() {
        let dpath = format!("{path}.route[{j}].destination");
        if d.host.is_empty() {
            push(p, &dpath, "required field \"host\" is missing");
        } else if d.host == "*" {
            // Istio takes `*.example.com` (a wildcard ServiceEntry's
            // cluster), never `*`.
            push(
                p,
                format!("{dpath}.host"),
                "destination host cannot be \"*\"",
            );
        } else if let Err(e) = wildcard_domain(&d.host) {
            push(p, format!("{dpath}.host"), e);
        }
        if let Some(port) = d.port {
            port_number(port.number, &format!("{dpath}.port.number"), p);
        }
    }
    if routes.len() > 1 {
        let total: u64 = routes.iter().map(|(_, w)| u64::from(w.unwrap_or(0))).sum();
        if total == 0 {
            push(
                p,
                format!("{path}.route"),
                "total weight of several destinations must be greater than 0",
            );
        }
    }
}

/// Istio's CORS checks: every origin matcher says how to match, methods
/// are HTTP methods, maxAge is whole seconds.
fn cors_policy(c: &crate::model::networking::CorsPolicy, path: &str, p: &mut Problems) {
    const METHODS: [&str; 9] = [
        "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
    ];
    for (i, o) in c.allow_origins.iter().enumerate() {
        let set = [&o.exact, &o.prefix, &o.regex]
            .iter()
            .any(|v| v.as_ref().is_some_and(|v| !v.is_empty()));
        if !set {
            push(
                p,
                format!("{path}.allowOrigins[{i}]"),
                "'' is not a valid match type for CORS allow origins",
            );
        }
    }
    for (i, m) in c.allow_methods.iter().enumerate() {
        if !METHODS.contains(&m.as_str()) {
            push(
                p,
                format!("{path}.allowMethods[{i}]"),
                format!("\"{m}\" is not a supported HTTP method"),
            );
        }
    }
    if c.max_age.is_some_and(|d| d.0.subsec_nanos() > 0) {
        push(
            p,
            format!("{path}.maxAge"),
            "max_age duration is accurate only to seconds precision",
        );
    }
}

fn http_route(route: &HttpRoute, path: &str, p: &mut Problems) {
    if let Some(c) = &route.cors_policy {
        cors_policy(c, &format!("{path}.corsPolicy"), p);
    }
    let actions = [
        !route.route.is_empty(),
        route.redirect.is_some(),
        route.direct_response.is_some(),
        route.delegate.is_some(),
    ]
    .iter()
    .filter(|b| **b)
    .count();
    if actions == 0 {
        push(
            p,
            path,
            "one of route, redirect, directResponse or delegate is required",
        );
    } else if actions > 1 {
        push(
            p,
            path,
            "only one of route, redirect, directResponse or delegate may be set",
        );
    }
    if route.rewrite.is_some() && route.redirect.is_some() {
        push(p, path, "rewrite cannot be combined with redirect");
    }
    if let Some(rw) = &route.rewrite {
        if !rw.uri.is_empty() && rw.uri_regex_rewrite.is_some() {
            push(
                p,
                format!("{path}.rewrite"),
                "only one of uri or uriRegexRewrite may be set",
            );
        }
        if let Some(rr) = &rw.uri_regex_rewrite
            && let Err(e) = regex::Regex::new(&rr.pattern)
        {
            push(
                p,
                format!("{path}.rewrite.uriRegexRewrite.match"),
                format!("invalid regex: {e}"),
            );
        }
    }
    if let Some(r) = &route.redirect {
        if r.port.is_some() && r.derive_port.is_some() {
            push(
                p,
                format!("{path}.redirect"),
                "only one of port or derivePort may be set",
            );
        }
        if let Some(code) = r.redirect_code
            && !matches!(code, 301 | 302 | 303 | 307 | 308)
        {
            push(
                p,
                format!("{path}.redirect.redirectCode"),
                format!("redirect code {code} must be one of 301, 302, 303, 307, 308"),
            );
        }
    }
    if let Some(dr) = &route.direct_response {
        if !(200..=599).contains(&dr.status) {
            push(
                p,
                format!("{path}.directResponse.status"),
                format!("status {} must be in the range 200..599", dr.status),
            );
        }
        if let Some(body) = &dr.body
            && body.string.is_some() == body.bytes.is_some()
        {
            push(
                p,
                format!("{path}.directResponse.body"),
                "exactly one of string or bytes is required",
            );
        }
    }
    if let Some(retries) = &route.retries
        && let Some(t) = retries.per_try_timeout
        && t.as_std() < std::time::Duration::from_millis(1)
    {
        push(
            p,
            format!("{path}.retries.perTryTimeout"),
            "perTryTimeout must be at least 1ms",
        );
    }
    if let Some(retries) = &route.retries
        && !retries.retry_on.is_empty()
    {
        // As Istio: each comma-separated piece as written, an Envoy retry
        // condition or a registered HTTP status.
        for policy in retries.retry_on.split(',') {
            if !RETRY_ON.contains(&policy) && !is_registered_status(policy) {
                push(
                    p,
                    format!("{path}.retries.retryOn"),
                    format!("{policy:?} is not a valid retryOn policy"),
                );
            }
        }
    }
    if let Some(fault) = &route.fault {
        if fault.delay.is_none() && fault.abort.is_none() {
            push(
                p,
                format!("{path}.fault"),
                "one of delay or abort is required",
            );
        }
        if let Some(abort) = &fault.abort
            && let Some(code) = abort.http_status
            && !(200..=599).contains(&code)
        {
            push(
                p,
                format!("{path}.fault.abort.httpStatus"),
                format!("httpStatus {code} must be in the range 200..599"),
            );
        }
        for (what, pct) in [
            ("delay", fault.delay.as_ref().and_then(|d| d.percentage)),
            ("abort", fault.abort.as_ref().and_then(|a| a.percentage)),
        ] {
            if let Some(pct) = pct
                && !(0.0..=100.0).contains(&pct.value)
            {
                push(
                    p,
                    format!("{path}.fault.{what}.percentage"),
                    "percentage must be in the range 0..100",
                );
            }
        }
    }
    for (j, m) in route.matches.iter().enumerate() {
        let mpath = format!("{path}.match[{j}]");
        for (field, sm) in [
            ("uri", &m.uri),
            ("scheme", &m.scheme),
            ("method", &m.method),
            ("authority", &m.authority),
        ] {
            if let Some(sm) = sm {
                string_match(sm, &format!("{mpath}.{field}"), p);
            }
        }
        for (field, map) in [
            ("headers", &m.headers),
            ("withoutHeaders", &m.without_headers),
            ("queryParams", &m.query_params),
        ] {
            for (k, sm) in map {
                if field != "queryParams" && k.bytes().any(|b| b.is_ascii_uppercase()) {
                    push(
                        p,
                        format!("{mpath}.{field}"),
                        format!("header name \"{k}\" must be lowercase"),
                    );
                }
                string_match(sm, &format!("{mpath}.{field}.{k}"), p);
            }
        }
        if let Some(port) = m.port {
            port_number(port, &format!("{mpath}.port"), p);
        }
    }
    let routes: Vec<_> = route
        .route
        .iter()
        .map(|r| (&r.destination, r.weight))
        .collect();
    destinations(&routes, path, p);
}

// === DestinationRule ===

fn destination_rule(dr: &DestinationRule, p: &mut Problems) {
    if dr.host.is_empty() {
        push(p, "spec", "required field \"host\" is missing");
    } else if let Err(e) = wildcard_domain(&dr.host) {
        push(p, "spec.host", e);
    }
    if let Some(tp) = &dr.traffic_policy {
        traffic_policy(tp, "spec.trafficPolicy", p);
    }
    let mut names = HashSet::new();
    for (i, s) in dr.subsets.iter().enumerate() {
        let path = format!("spec.subsets[{i}]");
        if s.name.is_empty() {
            push(p, &path, "required field \"name\" is missing");
        } else if !names.insert(&s.name) {
            push(
                p,
                format!("{path}.name"),
                format!("duplicate subset name \"{}\"", s.name),
            );
        }
        if let Some(tp) = &s.traffic_policy {
            traffic_policy(tp, &format!("{path}.trafficPolicy"), p);
        }
    }
    export_to(&dr.export_to, false, "spec.exportTo", p);
    if dr.workload_selector.is_some() && dr.export_to.iter().any(|e| e != ".") {
        push(
            p,
            "spec.exportTo",
            "a DestinationRule with a workloadSelector can only be exported to its own namespace (\".\")",
        );
    }
}

fn traffic_policy(tp: &TrafficPolicy, path: &str, p: &mut Problems) {
    if let Some(tls) = &tp.tls {
        client_tls(tls, &format!("{path}.tls"), p);
    }
    outlier_and_pool(tp.outlier_detection.as_ref(), path, p);
    if let Some(t) = &tp.tunnel {
        tunnel(t, &format!("{path}.tunnel"), p);
    }
    for (i, pl) in tp.port_level_settings.iter().enumerate() {
        let ppath = format!("{path}.portLevelSettings[{i}]");
        match pl.port {
            None => push(p, &ppath, "required field \"port\" is missing"),
            Some(port) => port_number(port.number, &format!("{ppath}.port.number"), p),
        }
        if let Some(tls) = &pl.tls {
            client_tls(tls, &format!("{ppath}.tls"), p);
        }
        outlier_and_pool(pl.outlier_detection.as_ref(), &ppath, p);
    }
}

/// As Istio's: CONNECT or POST, a host name or IP address, a port.
fn tunnel(t: &crate::model::networking::TunnelSettings, path: &str, p: &mut Problems) {
    if !matches!(t.protocol.as_str(), "" | "CONNECT" | "POST") {
        push(
            p,
            format!("{path}.protocol"),
            "tunnel protocol must be \"CONNECT\" or \"POST\"",
        );
    }
    if !is_dns1123_subdomain(&t.target_host) && t.target_host.parse::<std::net::IpAddr>().is_err() {
        push(
            p,
            format!("{path}.targetHost"),
            "tunnel target host must be a valid FQDN or IP address",
        );
    }
    port_number(t.target_port, &format!("{path}.targetPort"), p);
}

fn outlier_and_pool(
    od: Option<&crate::model::networking::OutlierDetection>,
    path: &str,
    p: &mut Problems,
) {
    if let Some(od) = od {
        // As Istio's validation: durations of at least 1ms, and a local
        // origin threshold only where those errors are counted apart.
        for (field, d) in [
            ("interval", od.interval),
            ("baseEjectionTime", od.base_ejection_time),
        ] {
            if d.is_some_and(|d| d.as_std() < std::time::Duration::from_millis(1)) {
                push(
                    p,
                    format!("{path}.outlierDetection.{field}"),
                    format!("{field} must be at least 1ms"),
                );
            }
        }
        if od.consecutive_local_origin_failures.is_some_and(|n| n > 0)
            && od.split_external_local_origin_errors != Some(true)
        {
            push(
                p,
                format!("{path}.outlierDetection.consecutiveLocalOriginFailures"),
                "consecutiveLocalOriginFailures is set but splitExternalLocalOriginErrors is not true",
            );
        }
        for (field, v) in [
            ("maxEjectionPercent", od.max_ejection_percent),
            ("minHealthPercent", od.min_health_percent),
        ] {
            if v.is_some_and(|v| v > 100) {
                push(
                    p,
                    format!("{path}.outlierDetection.{field}"),
                    format!("{field} must be in the range 0..100"),
                );
            }
        }
    }
}

fn client_tls(tls: &ClientTlsSettings, path: &str, p: &mut Problems) {
    let has_files = !tls.client_certificate.is_empty()
        || !tls.private_key.is_empty()
        || !tls.ca_certificates.is_empty();
    match tls.mode {
        ClientTlsMode::IstioMutual => {
            if has_files || !tls.credential_name.is_empty() || !tls.ca_crl.is_empty() {
                push(
                    p,
                    path,
                    "ISTIO_MUTUAL uses the mesh certificates: clientCertificate, privateKey, caCertificates, caCrl and credentialName must be empty",
                );
            }
        }
        ClientTlsMode::Mutual => {
            if tls.credential_name.is_empty()
                && (tls.client_certificate.is_empty() || tls.private_key.is_empty())
            {
                push(
                    p,
                    path,
                    "MUTUAL requires clientCertificate and privateKey (or credentialName)",
                );
            }
        }
        ClientTlsMode::Simple | ClientTlsMode::Disable => {}
    }
    if !tls.credential_name.is_empty() && has_files {
        push(
            p,
            path,
            "credentialName cannot be combined with clientCertificate, privateKey or caCertificates",
        );
    }
    if tls.insecure_skip_verify == Some(true)
        && tls.mode == ClientTlsMode::Simple
        && (!tls.ca_certificates.is_empty()
            || !tls.credential_name.is_empty()
            || !tls.subject_alt_names.is_empty())
    {
        push(
            p,
            format!("{path}.insecureSkipVerify"),
            "insecureSkipVerify cannot be combined with caCertificates, credentialName or subjectAltNames",
        );
    }
}

// === Gateway ===

const GATEWAY_PROTOCOLS: &[&str] = &[
    "HTTP", "HTTPS", "GRPC", "GRPC-WEB", "HTTP2", "MONGO", "TCP", "TLS",
];

fn gateway(gw: &Gateway, p: &mut Problems) {
    if gw.servers.is_empty() {
        push(p, "spec", "required field \"servers\" is missing");
    }
    let mut names = HashSet::new();
    for (i, s) in gw.servers.iter().enumerate() {
        let path = format!("spec.servers[{i}]");
        port_number(s.port.number, &format!("{path}.port.number"), p);
        let proto = s.port.protocol.to_ascii_uppercase();
        if !GATEWAY_PROTOCOLS.contains(&proto.as_str()) {
            push(
                p,
                format!("{path}.port.protocol"),
                format!(
                    "unsupported protocol \"{}\": supported: {}",
                    s.port.protocol,
                    GATEWAY_PROTOCOLS.join(", ")
                ),
            );
        }
        if s.port.name.is_empty() {
            push(
                p,
                format!("{path}.port"),
                "required field \"name\" is missing",
            );
        }
        if !s.name.is_empty() && !names.insert(&s.name) {
            push(
                p,
                format!("{path}.name"),
                format!("duplicate server name \"{}\"", s.name),
            );
        }
        if s.hosts.is_empty() {
            push(p, &path, "required field \"hosts\" is missing");
        }
        for (j, h) in s.hosts.iter().enumerate() {
            let (ns, host) = h.split_once('/').unwrap_or(("*", h));
            if ns != "*" && ns != "." && !is_dns1123_label(ns) {
                push(
                    p,
                    format!("{path}.hosts[{j}]"),
                    format!("invalid namespace \"{ns}\" in host \"{h}\""),
                );
            }
            if host.parse::<IpAddr>().is_err()
                && let Err(e) = wildcard_domain(host)
            {
                push(p, format!("{path}.hosts[{j}]"), e);
            }
        }
        let tls_proto = matches!(proto.as_str(), "HTTPS" | "TLS");
        match (&s.tls, tls_proto) {
            (None, true) => push(
                p,
                &path,
                format!("server with protocol {proto} requires tls settings"),
            ),
            (Some(tls), _) => {
                let tpath = format!("{path}.tls");
                let has_files = !tls.server_certificate.is_empty()
                    || !tls.private_key.is_empty()
                    || !tls.ca_certificates.is_empty();
                let has_cred = !tls.credential_name.is_empty()
                    || !tls.credential_names.is_empty()
                    || !tls.tls_certificates.is_empty();
                match tls.mode {
                    ServerTlsMode::IstioMutual if has_files || has_cred => push(
                        p,
                        &tpath,
                        "ISTIO_MUTUAL uses the mesh certificates: certificate fields and credentialName must be empty",
                    ),
                    ServerTlsMode::Simple
                    | ServerTlsMode::Mutual
                    | ServerTlsMode::OptionalMutual
                        if !tls.https_redirect
                            && !has_cred
                            && (tls.server_certificate.is_empty()
                                || tls.private_key.is_empty()) =>
                    {
                        push(
                            p,
                            &tpath,
                            format!(
                                "{} requires serverCertificate and privateKey (or credentialName)",
                                tls.mode.as_str()
                            ),
                        )
                    }
                    ServerTlsMode::Mutual if !has_cred && tls.ca_certificates.is_empty() => push(
                        p,
                        &tpath,
                        "MUTUAL requires caCertificates (or credentialName)",
                    ),
                    _ => {}
                }
                if !tls_proto && !tls.https_redirect {
                    push(
                        p,
                        &tpath,
                        format!(
                            "tls settings on a {proto} server have no effect except httpsRedirect"
                        ),
                    );
                }
            }
            (None, false) => {}
        }
    }
}

// === Sidecar ===

fn sidecar(sc: &Sidecar, p: &mut Problems) {
    for (i, e) in sc.egress.iter().enumerate() {
        let path = format!("spec.egress[{i}]");
        if e.hosts.is_empty() {
            push(p, &path, "required field \"hosts\" is missing");
        }
        for (j, h) in e.hosts.iter().enumerate() {
            match h.split_once('/') {
                None => push(
                    p,
                    format!("{path}.hosts[{j}]"),
                    format!("host \"{h}\" must be of the form namespace/dnsName"),
                ),
                Some((ns, host)) => {
                    let ns = ns.strip_prefix('~').unwrap_or(ns);
                    if ns != "*" && ns != "." && !ns.is_empty() && !is_dns1123_label(ns) {
                        push(
                            p,
                            format!("{path}.hosts[{j}]"),
                            format!("invalid namespace \"{ns}\""),
                        );
                    }
                    if let Err(e) = wildcard_domain(host) {
                        push(p, format!("{path}.hosts[{j}]"), e);
                    }
                }
            }
        }
        if let Some(port) = &e.port {
            egress_port_and_bind(port.number, &e.bind, e.capture_mode, &path, p);
        }
    }
    unique_egress_binds(sc, p);
    for (i, ing) in sc.ingress.iter().enumerate() {
        sidecar_ingress(ing, &format!("spec.ingress[{i}]"), p);
    }
    if let Some(otp) = &sc.outbound_traffic_policy
        && otp.egress_proxy.is_some()
        && otp.mode != OutboundMode::AllowAny
    {
        push(
            p,
            "spec.outboundTrafficPolicy.egressProxy",
            "egressProxy is allowed only with mode ALLOW_ANY",
        );
    }
}

/// Istio's rules: port 0 is a unix socket listener (`bind: unix://...`,
/// captured by nothing); any other port binds an IP address.
fn egress_port_and_bind(
    number: u32,
    bind: &str,
    mode: Option<CaptureMode>,
    path: &str,
    p: &mut Problems,
) {
    if number == 0 {
        if !bind.starts_with("unix://") {
            push(
                p,
                format!("{path}.bind"),
                "sidecar: ports with 0 value must have a unix domain socket bind address",
            );
        } else if bind.len() == "unix://".len() {
            push(
                p,
                format!("{path}.bind"),
                "unix domain socket address is empty",
            );
        }
        if mode == Some(CaptureMode::Iptables) {
            push(
                p,
                format!("{path}.captureMode"),
                "sidecar: captureMode must be DEFAULT/NONE for unix domain socket listeners",
            );
        }
        return;
    }
    port_number(number, &format!("{path}.port.number"), p);
    if !bind.is_empty() && bind.parse::<std::net::IpAddr>().is_err() {
        push(
            p,
            format!("{path}.bind"),
            format!("{bind} is not a valid IP"),
        );
    }
}

fn unique_egress_binds(sc: &Sidecar, p: &mut Problems) {
    let mut ports = std::collections::HashSet::new();
    let mut sockets = std::collections::HashSet::new();
    for (i, e) in sc.egress.iter().enumerate() {
        let Some(port) = &e.port else { continue };
        let unique = if port.number == 0 {
            sockets.insert(e.bind.as_str())
        } else {
            ports.insert(port.number)
        };
        if !unique {
            let what = if port.number == 0 {
                "sidecar: unix domain socket values for listeners must be unique"
            } else {
                "sidecar: ports on IP bound listeners must be unique"
            };
            push(p, format!("spec.egress[{i}].port"), what);
        }
    }
}

/// An ingress listener: an IP bind, a `defaultEndpoint` on the loopback or
/// any address (or a unix socket), and TLS for clients outside the mesh
/// with certificate files, as Istio validates them.
fn sidecar_ingress(ing: &IstioIngressListener, path: &str, p: &mut Problems) {
    port_number(ing.port.number, &format!("{path}.port.number"), p);
    if !ing.bind.is_empty() && ing.bind.parse::<std::net::IpAddr>().is_err() {
        push(
            p,
            format!("{path}.bind"),
            format!("{} is not a valid IP", ing.bind),
        );
    }
    let endpoint = ing.default_endpoint.as_str();
    if !endpoint.is_empty() && !endpoint.starts_with("unix://") {
        let local = endpoint.parse::<std::net::SocketAddr>().ok().filter(|a| {
            let ip = a.ip();
            ip.is_unspecified()
                || ip == std::net::Ipv4Addr::LOCALHOST
                || ip == std::net::Ipv6Addr::LOCALHOST
        });
        if local.is_none_or(|a| a.port() == 0) {
            push(
                p,
                format!("{path}.defaultEndpoint"),
                "sidecar: defaultEndpoint must be of form 127.0.0.1:<port>,0.0.0.0:<port>,[::1]:port,[::]:port,unix://filepath or unset",
            );
        }
    }
    let Some(tls) = &ing.tls else { return };
    let tpath = format!("{path}.tls");
    let refused = [
        (
            !tls.subject_alt_names.is_empty(),
            "sidecar: subjectAltNames is not supported in ingress tls",
        ),
        (
            tls.https_redirect,
            "sidecar: httpsRedirect is not supported",
        ),
        (
            !tls.credential_name.is_empty(),
            "sidecar: credentialName is not currently supported",
        ),
        (
            !tls.credential_names.is_empty(),
            "sidecar: credentialNames is not currently supported",
        ),
        (
            !tls.tls_certificates.is_empty(),
            "sidecar: tls_certificates is not currently supported",
        ),
    ];
    for (_, msg) in refused.iter().filter(|(bad, _)| *bad) {
        push(p, &tpath, *msg);
    }
    match tls.mode {
        ServerTlsMode::IstioMutual
        | ServerTlsMode::AutoPassthrough
        | ServerTlsMode::Passthrough => push(
            p,
            format!("{tpath}.mode"),
            format!(
                "configuration is invalid: cannot set mode to {} in sidecar ingress tls",
                tls.mode.as_str()
            ),
        ),
        _ if tls.server_certificate.is_empty() || tls.private_key.is_empty() => push(
            p,
            &tpath,
            format!(
                "{} requires serverCertificate and privateKey",
                tls.mode.as_str()
            ),
        ),
        ServerTlsMode::Mutual | ServerTlsMode::OptionalMutual if tls.ca_certificates.is_empty() => {
            push(
                p,
                &tpath,
                format!("{} requires caCertificates", tls.mode.as_str()),
            )
        }
        _ => {}
    }
    if !crate::registry::Protocol::parse(&ing.port.protocol).is_tls() {
        push(
            p,
            format!("{path}.port.protocol"),
            "server cannot have TLS settings for non HTTPS/TLS ports",
        );
    }
}

// === Security ===

/// `when` keys Istio supports; anything else is refused rather than ignored
/// so that a typo cannot silently widen a policy.
fn supported_condition_key(key: &str) -> bool {
    const EXACT: &[&str] = &[
        "source.ip",
        "remote.ip",
        "source.namespace",
        "source.principal",
        "source.serviceAccount",
        "source.trustDomain",
        "destination.ip",
        "destination.port",
        "connection.sni",
        "request.auth.principal",
        "request.auth.audiences",
        "request.auth.presenter",
    ];
    EXACT.contains(&key)
        || (key.starts_with("request.headers[") && key.ends_with(']'))
        || (key.starts_with("request.auth.claims[") && key.ends_with(']'))
        || key.starts_with("experimental.envoy.filters.")
}

fn authorization_policy(ap: &AuthorizationPolicy, p: &mut Problems) {
    if ap.selector.is_some() && (ap.target_ref.is_some() || !ap.target_refs.is_empty()) {
        push(p, "spec", "only one of selector or targetRefs may be set");
    }
    match (ap.action, &ap.provider) {
        (AuthzAction::Custom, None) => push(p, "spec", "action CUSTOM requires provider.name"),
        (AuthzAction::Custom, Some(pr)) if pr.name.is_empty() => {
            push(p, "spec.provider", "required field \"name\" is missing")
        }
        (AuthzAction::Allow | AuthzAction::Deny | AuthzAction::Audit, Some(_)) => push(
            p,
            "spec.provider",
            "provider is allowed only with action CUSTOM",
        ),
        _ => {}
    }
    for (i, rule) in ap.rules.iter().flatten().enumerate() {
        let path = format!("spec.rules[{i}]");
        for (j, from) in rule.from.iter().enumerate() {
            let s = &from.source;
            let fpath = format!("{path}.from[{j}].source");
            let lists = [
                &s.principals,
                &s.not_principals,
                &s.request_principals,
                &s.not_request_principals,
                &s.namespaces,
                &s.not_namespaces,
                &s.service_accounts,
                &s.not_service_accounts,
                &s.ip_blocks,
                &s.not_ip_blocks,
                &s.remote_ip_blocks,
                &s.not_remote_ip_blocks,
            ];
            if lists.iter().all(|l| l.is_empty()) {
                push(p, &fpath, "source must not be empty");
            }
            if (!s.service_accounts.is_empty() || !s.not_service_accounts.is_empty())
                && (!s.principals.is_empty()
                    || !s.not_principals.is_empty()
                    || !s.namespaces.is_empty()
                    || !s.not_namespaces.is_empty())
            {
                push(
                    p,
                    &fpath,
                    "serviceAccounts cannot be combined with principals or namespaces",
                );
            }
            for (field, list) in [
                ("ipBlocks", &s.ip_blocks),
                ("notIpBlocks", &s.not_ip_blocks),
                ("remoteIpBlocks", &s.remote_ip_blocks),
                ("notRemoteIpBlocks", &s.not_remote_ip_blocks),
            ] {
                for (k, v) in list.iter().enumerate() {
                    if !cidr_or_ip(v) {
                        push(
                            p,
                            format!("{fpath}.{field}[{k}]"),
                            format!("invalid IP address or CIDR \"{v}\""),
                        );
                    }
                }
            }
            for (field, list) in [
                ("principals", &s.principals),
                ("notPrincipals", &s.not_principals),
                ("namespaces", &s.namespaces),
                ("notNamespaces", &s.not_namespaces),
            ] {
                for (k, v) in list.iter().enumerate() {
                    if v.is_empty() {
                        push(p, format!("{fpath}.{field}[{k}]"), "empty value");
                    }
                }
            }
        }
        for (j, to) in rule.to.iter().enumerate() {
            let o = &to.operation;
            let opath = format!("{path}.to[{j}].operation");
            let lists = [
                &o.hosts,
                &o.not_hosts,
                &o.ports,
                &o.not_ports,
                &o.methods,
                &o.not_methods,
                &o.paths,
                &o.not_paths,
            ];
            if lists.iter().all(|l| l.is_empty()) {
                push(p, &opath, "operation must not be empty");
            }
            for (field, list) in [("paths", &o.paths), ("notPaths", &o.not_paths)] {
                for (k, v) in list.iter().enumerate() {
                    if let Some(msg) = path_template_problem(v) {
                        push(p, format!("{opath}.{field}[{k}]"), msg);
                    }
                }
            }
            for (field, list) in [("ports", &o.ports), ("notPorts", &o.not_ports)] {
                for (k, v) in list.iter().enumerate() {
                    if v.parse::<u16>().map_or(true, |n| n == 0) {
                        push(
                            p,
                            format!("{opath}.{field}[{k}]"),
                            format!("invalid port \"{v}\""),
                        );
                    }
                }
            }
        }
        for (j, c) in rule.when.iter().enumerate() {
            let cpath = format!("{path}.when[{j}]");
            if c.key.is_empty() {
                push(p, &cpath, "required field \"key\" is missing");
            } else if !supported_condition_key(&c.key) {
                push(
                    p,
                    format!("{cpath}.key"),
                    format!("unknown condition key \"{}\"", c.key),
                );
            }
            if c.values.is_empty() && c.not_values.is_empty() {
                push(p, &cpath, "at least one of values or notValues is required");
            }
            if matches!(c.key.as_str(), "source.ip" | "remote.ip" | "destination.ip") {
                for v in c.values.iter().chain(&c.not_values) {
                    if !cidr_or_ip(v) {
                        push(p, &cpath, format!("invalid IP address or CIDR \"{v}\""));
                    }
                }
            }
            if c.key == "destination.port" {
                for v in c.values.iter().chain(&c.not_values) {
                    if v.parse::<u16>().is_err() {
                        push(p, &cpath, format!("invalid port \"{v}\""));
                    }
                }
            }
        }
    }
}

/// Envoy URI templates in paths: `{*}` one segment, `{**}` the rest (once,
/// last).
fn path_template_problem(path: &str) -> Option<String> {
    let many = path.matches("{**}").count();
    if many > 1 {
        return Some(format!(
            "path \"{path}\": only one {{**}} operator is allowed"
        ));
    }
    if many == 1 && !path.ends_with("{**}") {
        return Some(format!(
            "path \"{path}\": the {{**}} operator must be the last part of the path"
        ));
    }
    let literal = path.replace("{**}", "").replace("{*}", "");
    if literal != path && literal.contains('*') {
        return Some(format!(
            "path \"{path}\": a URI template cannot be combined with a prefix or suffix '*'"
        ));
    }
    None
}

/// Istio's rules for what it would enforce: one way to select; per rule
/// an issuer or a JWKS URI, and no empty audience or token location.
fn request_authentication(ra: &RequestAuthentication, p: &mut Problems) {
    if ra.selector.is_some() && (ra.target_ref.is_some() || !ra.target_refs.is_empty()) {
        push(p, "spec", "only one of selector or targetRefs may be set");
    }
    for (i, rule) in ra.jwt_rules.iter().enumerate() {
        let path = format!("spec.jwtRules[{i}]");
        if rule.issuer.is_empty() && rule.jwks_uri.is_empty() {
            push(p, &path, "issuer or jwksUri must be non-empty string");
        }
        if rule.audiences.iter().any(String::is_empty) {
            push(
                p,
                format!("{path}.audiences"),
                "audience must be non-empty string",
            );
        }
        if rule.from_headers.iter().any(|h| h.name.is_empty()) {
            let msg = "location header name must be non-empty string";
            push(p, format!("{path}.fromHeaders"), msg);
        }
        if rule.from_params.iter().any(String::is_empty) {
            push(
                p,
                format!("{path}.fromParams"),
                "location query must be non-empty string",
            );
        }
    }
}

fn peer_authentication(pa: &PeerAuthentication, p: &mut Problems) {
    let empty_selector = pa
        .selector
        .as_ref()
        .is_none_or(|s| s.match_labels.is_empty());
    if empty_selector && !pa.port_level_mtls.is_empty() {
        push(
            p,
            "spec.portLevelMtls",
            "portLevelMtls requires a workload selector",
        );
    }
    for port in pa.port_level_mtls.keys() {
        port_number(*port, "spec.portLevelMtls", p);
    }
}

/// The retry conditions Istio accepts in `retries.retryOn` (Envoy's
/// `x-envoy-retry-on` and `x-envoy-retry-grpc-on` values).
const RETRY_ON: [&str; 16] = [
    "5xx",
    "gateway-error",
    "reset",
    "reset-before-request",
    "connect-failure",
    "retriable-4xx",
    "refused-stream",
    "retriable-status-codes",
    "retriable-headers",
    "envoy-ratelimited",
    "http3-post-connect-failure",
    "cancelled",
    "deadline-exceeded",
    "internal",
    "resource-exhausted",
    "unavailable",
];

/// A number that names a registered HTTP status (the statuses Istio's
/// validation knows by name).
fn is_registered_status(text: &str) -> bool {
    text.parse::<u16>().is_ok_and(|n| {
        matches!(n,
            100..=103 | 200..=208 | 226 | 300..=305 | 307 | 308 | 400..=418 | 421..=426
            | 428 | 429 | 431 | 451 | 500..=508 | 510 | 511)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts() {
        for ok in ["a.com", "*.a.com", "*", "svc", "a-b.c"] {
            assert!(wildcard_domain(ok).is_ok(), "{ok}");
        }
        for bad in [
            "", "a..com", "*a.com", "a.*.com", "-a.com", "a_b.com", "a.com.",
        ] {
            assert!(wildcard_domain(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn dns_labels() {
        assert!(is_dns1123_label("curl-egress-tst"));
        assert!(!is_dns1123_label("Curl"));
        assert!(!is_dns1123_label("-x"));
        assert!(!is_dns1123_label(""));
    }
}

#[cfg(test)]
mod path_tests {
    use super::path_template_problem;

    #[test]
    fn uri_templates() {
        assert_eq!(path_template_problem("/a/{*}/b"), None);
        assert_eq!(path_template_problem("/a/{**}"), None);
        assert_eq!(path_template_problem("/a/*"), None);
        assert!(
            path_template_problem("/{**}/{**}")
                .unwrap()
                .contains("only one")
        );
        assert!(
            path_template_problem("/{**}/b")
                .unwrap()
                .contains("must be the last")
        );
        assert!(
            path_template_problem("/a/{*}*")
                .unwrap()
                .contains("cannot be combined")
        );
    }
}
