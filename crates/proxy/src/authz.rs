//! AuthorizationPolicy evaluation with Istio's semantics, as a pure function
//! of compiled policies and one request's attributes.
//!
//! Order (Istio's): a matching CUSTOM policy denies (meshgate has no external
//! authorizer, so it denies rather than let unchecked traffic through), then
//! a matching DENY denies, then no ALLOW policy allows, then a matching ALLOW
//! allows, else deny. AUDIT policies never change the decision; a match is
//! reported.

use std::net::IpAddr;

use ipnet::IpNet;
use meshgate_config::model::security::{AuthzAction, Condition, Operation, Rule, Source};
use meshgate_config::view::PolicyView;

use crate::conn::Peer;

/// The request (or TCP connection) being authorized.
#[derive(Debug, Clone)]
pub struct AuthzRequest<'a> {
    /// The peer's verified identity when it came over mutual TLS.
    pub peer: Option<&'a Peer>,
    pub source_ip: IpAddr,
    /// The original client address (meshgate does not trust X-Forwarded-For,
    /// so this is the source address).
    pub remote_ip: IpAddr,
    pub destination_ip: IpAddr,
    pub destination_port: u16,
    pub sni: Option<&'a str>,
    /// `None` for TCP traffic.
    pub http: Option<HttpAttributes<'a>>,
}

#[derive(Debug, Clone)]
pub struct HttpAttributes<'a> {
    /// `:authority` / Host, as sent.
    pub host: &'a str,
    pub method: &'a str,
    /// Path without the query string.
    pub path: &'a str,
    pub headers: &'a http::HeaderMap,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Allow {
        /// An AUDIT policy matched.
        audited: bool,
    },
    /// `policy` is Istio's id: `ns[<ns>]-policy[<name>]-rule[<i>]`, or `none`
    /// when no ALLOW policy matched.
    Deny { policy: String },
}

impl Decision {
    pub fn is_allowed(&self) -> bool {
        matches!(self, Decision::Allow { .. })
    }

    /// The label for `meshgate_egress_requests_total`.
    pub fn label(&self) -> &'static str {
        match self {
            Decision::Allow { audited: false } => "allow",
            Decision::Allow { audited: true } => "audit",
            Decision::Deny { .. } => "deny",
        }
    }

    /// Envoy's `%RESPONSE_CODE_DETAILS%` for a denial.
    pub fn response_code_details(&self) -> Option<String> {
        match self {
            Decision::Deny { policy } => {
                Some(format!("rbac_access_denied_matched_policy[{policy}]"))
            }
            Decision::Allow { .. } => None,
        }
    }
}

/// `abc` exact, `abc*` prefix, `*abc` suffix, `*` presence (non-empty).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Pattern {
    Exact(String),
    Prefix(String),
    Suffix(String),
    Presence,
}

impl std::fmt::Display for Pattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Pattern::Exact(v) => write!(f, "{v}"),
            Pattern::Prefix(v) => write!(f, "{v}*"),
            Pattern::Suffix(v) => write!(f, "*{v}"),
            Pattern::Presence => f.write_str("*"),
        }
    }
}

impl std::fmt::Display for PathPattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PathPattern::Simple(p) => write!(f, "{p}"),
            PathPattern::Template(parts) => {
                for part in parts {
                    match part {
                        TemplatePart::Literal(l) => write!(f, "/{l}")?,
                        TemplatePart::One => f.write_str("/{*}")?,
                        TemplatePart::Many => f.write_str("/{**}")?,
                    }
                }
                Ok(())
            }
        }
    }
}

impl Pattern {
    fn new(v: &str, lowercase: bool) -> Pattern {
        let v = if lowercase {
            v.to_ascii_lowercase()
        } else {
            v.to_owned()
        };
        if v == "*" {
            Pattern::Presence
        } else if let Some(p) = v.strip_suffix('*') {
            Pattern::Prefix(p.to_owned())
        } else if let Some(s) = v.strip_prefix('*') {
            Pattern::Suffix(s.to_owned())
        } else {
            Pattern::Exact(v)
        }
    }

    fn matches(&self, value: &str) -> bool {
        match self {
            Pattern::Exact(e) => value == e,
            Pattern::Prefix(p) => value.starts_with(p.as_str()),
            Pattern::Suffix(s) => value.ends_with(s.as_str()),
            Pattern::Presence => !value.is_empty(),
        }
    }

    fn matches_ignore_case(&self, value: &str) -> bool {
        match self {
            Pattern::Exact(e) => value.eq_ignore_ascii_case(e),
            Pattern::Prefix(p) => {
                value.len() >= p.len() && value[..p.len()].eq_ignore_ascii_case(p)
            }
            Pattern::Suffix(s) => {
                value.len() >= s.len() && value[value.len() - s.len()..].eq_ignore_ascii_case(s)
            }
            Pattern::Presence => !value.is_empty(),
        }
    }
}

/// A path value: a string pattern, or a URI template with `{*}` (one
/// segment) and `{**}` (any number of segments, last only).
#[derive(Debug, Clone)]
enum PathPattern {
    Simple(Pattern),
    Template(Vec<TemplatePart>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum TemplatePart {
    Literal(String),
    One,
    Many,
}

impl PathPattern {
    fn new(v: &str) -> PathPattern {
        if v.contains("{*}") || v.contains("{**}") {
            let parts = v
                .trim_start_matches('/')
                .split('/')
                .map(|seg| match seg {
                    "{*}" => TemplatePart::One,
                    "{**}" => TemplatePart::Many,
                    lit => TemplatePart::Literal(lit.to_owned()),
                })
                .collect();
            PathPattern::Template(parts)
        } else {
            PathPattern::Simple(Pattern::new(v, false))
        }
    }

    fn matches(&self, path: &str) -> bool {
        match self {
            PathPattern::Simple(p) => p.matches(path),
            PathPattern::Template(parts) => {
                let Some(rest) = path.strip_prefix('/') else {
                    return false;
                };
                let segs: Vec<&str> = rest.split('/').collect();
                template_match(parts, &segs)
            }
        }
    }
}

fn template_match(parts: &[TemplatePart], segs: &[&str]) -> bool {
    match parts.split_first() {
        None => segs.is_empty(),
        // `{**}` (always last) matches the rest of the path: one or more
        // characters, across segments.
        Some((TemplatePart::Many, _)) => segs.iter().any(|s| !s.is_empty()),
        Some((TemplatePart::One, rest)) => segs
            .split_first()
            .is_some_and(|(s, tail)| !s.is_empty() && template_match(rest, tail)),
        Some((TemplatePart::Literal(l), rest)) => segs
            .split_first()
            .is_some_and(|(s, tail)| s == l && template_match(rest, tail)),
    }
}

/// A list field with its negation: `values` (any matches) and `not_values`
/// (none matches). Either may be empty (then it does not constrain).
#[derive(Debug, Clone)]
struct Field<T> {
    values: Vec<T>,
    not_values: Vec<T>,
}

impl<T> Field<T> {
    fn is_empty(&self) -> bool {
        self.values.is_empty() && self.not_values.is_empty()
    }

    fn check(&self, matches: impl Fn(&T) -> bool) -> bool {
        (self.values.is_empty() || self.values.iter().any(&matches))
            && !self.not_values.iter().any(matches)
    }
}

fn patterns(values: &[String], not_values: &[String], lowercase: bool) -> Field<Pattern> {
    Field {
        values: values.iter().map(|v| Pattern::new(v, lowercase)).collect(),
        not_values: not_values
            .iter()
            .map(|v| Pattern::new(v, lowercase))
            .collect(),
    }
}

fn nets(values: &[String], not_values: &[String]) -> Field<IpNet> {
    let parse = |v: &String| {
        v.parse::<IpNet>()
            .ok()
            .or_else(|| v.parse::<IpAddr>().ok().map(IpNet::from))
    };
    Field {
        values: values.iter().filter_map(parse).collect(),
        not_values: not_values.iter().filter_map(parse).collect(),
    }
}

#[derive(Debug, Clone)]
struct CompiledSource {
    principals: Field<Pattern>,
    request_principals: Field<Pattern>,
    namespaces: Field<Pattern>,
    service_accounts: Field<String>,
    ip_blocks: Field<IpNet>,
    remote_ip_blocks: Field<IpNet>,
}

#[derive(Debug, Clone)]
struct CompiledOperation {
    hosts: Field<Pattern>,
    ports: Field<u16>,
    methods: Field<Pattern>,
    paths: Field<PathPattern>,
}

#[derive(Debug, Clone)]
enum ConditionKey {
    Header(http::HeaderName),
    SourceIp,
    RemoteIp,
    DestinationIp,
    DestinationPort,
    SourceNamespace,
    SourcePrincipal,
    SourceServiceAccount,
    SourceTrustDomain,
    ConnectionSni,
    /// request.auth.*: needs RequestAuthentication (JWT), which meshgate
    /// does not implement: there is never a value.
    RequestAuth,
    /// Keys Istio ignores (experimental filters); the condition always holds.
    Ignored,
}

impl ConditionKey {
    fn http_only(&self) -> bool {
        matches!(self, ConditionKey::Header(_) | ConditionKey::RequestAuth)
    }
}

#[derive(Debug, Clone)]
struct CompiledCondition {
    /// The key as the policy writes it (`source.namespace`), for `explain`.
    name: String,
    key: ConditionKey,
    patterns: Field<Pattern>,
    nets: Field<IpNet>,
}

#[derive(Debug, Clone, Default)]
struct CompiledRule {
    from: Vec<CompiledSource>,
    to: Vec<CompiledOperation>,
    when: Vec<CompiledCondition>,
}

/// One AuthorizationPolicy, ready to evaluate.
#[derive(Debug, Clone)]
pub struct CompiledPolicy {
    pub namespace: String,
    pub name: String,
    pub action: AuthzAction,
    /// `None`: the policy never matches (no `rules`).
    rules: Vec<CompiledRule>,
}

impl CompiledPolicy {
    pub fn compile(p: &PolicyView) -> CompiledPolicy {
        CompiledPolicy {
            namespace: p.namespace.clone(),
            name: p.name.clone(),
            action: p.action,
            rules: p
                .rules
                .iter()
                .flatten()
                .map(|r| compile_rule(r, &p.namespace))
                .collect(),
        }
    }

    fn id(&self, rule: usize) -> String {
        format!("ns[{}]-policy[{}]-rule[{rule}]", self.namespace, self.name)
    }

    /// The index of the first rule that matches, if any.
    fn matching_rule(&self, req: &AuthzRequest<'_>) -> Option<usize> {
        let is_tcp = req.http.is_none();
        self.rules.iter().position(|rule| {
            // HTTP-only attributes on TCP traffic: an ALLOW rule that uses one
            // is dropped (it can never match); DENY, AUDIT and CUSTOM ignore
            // just that attribute, so they deny more, not less.
            if is_tcp && self.action == AuthzAction::Allow && rule_uses_http(rule) {
                return false;
            }
            rule_matches(rule, req)
        })
    }
}

fn rule_uses_http(rule: &CompiledRule) -> bool {
    rule.from.iter().any(|s| !s.request_principals.is_empty())
        || rule
            .to
            .iter()
            .any(|o| !o.hosts.is_empty() || !o.methods.is_empty() || !o.paths.is_empty())
        || rule.when.iter().any(|c| c.key.http_only())
}

fn compile_rule(r: &Rule, policy_ns: &str) -> CompiledRule {
    CompiledRule {
        from: r
            .from
            .iter()
            .map(|f| compile_source(&f.source, policy_ns))
            .collect(),
        to: r
            .to
            .iter()
            .map(|t| compile_operation(&t.operation))
            .collect(),
        when: r.when.iter().map(compile_condition).collect(),
    }
}

fn compile_source(s: &Source, policy_ns: &str) -> CompiledSource {
    let qualify = |v: &String| {
        if v.contains('/') {
            v.clone()
        } else {
            format!("{policy_ns}/{v}")
        }
    };
    CompiledSource {
        principals: patterns(&s.principals, &s.not_principals, false),
        request_principals: patterns(&s.request_principals, &s.not_request_principals, false),
        namespaces: patterns(&s.namespaces, &s.not_namespaces, false),
        service_accounts: Field {
            values: s.service_accounts.iter().map(qualify).collect(),
            not_values: s.not_service_accounts.iter().map(qualify).collect(),
        },
        ip_blocks: nets(&s.ip_blocks, &s.not_ip_blocks),
        remote_ip_blocks: nets(&s.remote_ip_blocks, &s.not_remote_ip_blocks),
    }
}

fn compile_operation(o: &Operation) -> CompiledOperation {
    let ports = |v: &[String]| v.iter().filter_map(|p| p.parse().ok()).collect();
    CompiledOperation {
        hosts: patterns(&o.hosts, &o.not_hosts, true),
        ports: Field {
            values: ports(&o.ports),
            not_values: ports(&o.not_ports),
        },
        methods: patterns(&o.methods, &o.not_methods, false),
        paths: Field {
            values: o.paths.iter().map(|p| PathPattern::new(p)).collect(),
            not_values: o.not_paths.iter().map(|p| PathPattern::new(p)).collect(),
        },
    }
}

fn compile_condition(c: &Condition) -> CompiledCondition {
    let key = match c.key.as_str() {
        "source.ip" => ConditionKey::SourceIp,
        "remote.ip" => ConditionKey::RemoteIp,
        "destination.ip" => ConditionKey::DestinationIp,
        "destination.port" => ConditionKey::DestinationPort,
        "source.namespace" => ConditionKey::SourceNamespace,
        "source.principal" => ConditionKey::SourcePrincipal,
        "source.serviceAccount" => ConditionKey::SourceServiceAccount,
        "source.trustDomain" => ConditionKey::SourceTrustDomain,
        "connection.sni" => ConditionKey::ConnectionSni,
        k if k.starts_with("request.headers[") => {
            let name = k
                .trim_start_matches("request.headers[")
                .trim_end_matches(']');
            http::HeaderName::from_bytes(name.to_ascii_lowercase().as_bytes())
                .map_or(ConditionKey::Ignored, ConditionKey::Header)
        }
        k if k.starts_with("request.auth.") => ConditionKey::RequestAuth,
        _ => ConditionKey::Ignored,
    };
    CompiledCondition {
        name: c.key.clone(),
        key,
        patterns: patterns(&c.values, &c.not_values, false),
        nets: nets(&c.values, &c.not_values),
    }
}

fn rule_matches(rule: &CompiledRule, req: &AuthzRequest<'_>) -> bool {
    (rule.from.is_empty() || rule.from.iter().any(|s| source_matches(s, req)))
        && (rule.to.is_empty() || rule.to.iter().any(|o| operation_matches(o, req)))
        && rule.when.iter().all(|c| condition_matches(c, req))
}

fn source_matches(s: &CompiledSource, req: &AuthzRequest<'_>) -> bool {
    let principal = req.peer.map_or("", |p| &*p.principal);
    let namespace = req.peer.map_or("", |p| p.id.namespace());
    let sa = req.peer.map(|p| &*p.service_account);
    s.principals.check(|p| p.matches(principal))
        // No JWT support: a request never has a request principal. Over TCP
        // the field is HTTP-only and ignored (DENY) or its rule dropped (ALLOW).
        && (req.http.is_none() || s.request_principals.check(|p| p.matches("")))
        && s.namespaces.check(|p| p.matches(namespace))
        && s.service_accounts.check(|v| sa == Some(v.as_str()))
        && s.ip_blocks.check(|n| n.contains(&req.source_ip))
        && s.remote_ip_blocks.check(|n| n.contains(&req.remote_ip))
}

fn operation_matches(o: &CompiledOperation, req: &AuthzRequest<'_>) -> bool {
    let port_ok = o.ports.check(|p| *p == req.destination_port);
    match &req.http {
        Some(h) => {
            port_ok
                && o.hosts.check(|p| p.matches_ignore_case(h.host))
                && o.methods.check(|p| p.matches(h.method))
                && o.paths.check(|p| p.matches(h.path))
        }
        // HTTP-only fields are ignored on TCP (see `matching_rule`).
        None => port_ok,
    }
}

fn condition_matches(c: &CompiledCondition, req: &AuthzRequest<'_>) -> bool {
    let peer = req.peer;
    let text = |value: Option<&str>| c.patterns.check(|p| p.matches(value.unwrap_or("")));
    match &c.key {
        ConditionKey::SourceIp => c.nets.check(|n| n.contains(&req.source_ip)),
        ConditionKey::RemoteIp => c.nets.check(|n| n.contains(&req.remote_ip)),
        ConditionKey::DestinationIp => c.nets.check(|n| n.contains(&req.destination_ip)),
        ConditionKey::DestinationPort => text(Some(&req.destination_port.to_string())),
        ConditionKey::SourceNamespace => text(peer.map(|p| p.id.namespace())),
        ConditionKey::SourcePrincipal => text(peer.map(|p| &*p.principal)),
        ConditionKey::SourceServiceAccount => text(peer.map(|p| &*p.service_account)),
        ConditionKey::SourceTrustDomain => text(peer.map(|p| p.id.trust_domain())),
        ConditionKey::ConnectionSni => text(req.sni),
        ConditionKey::Header(name) => match &req.http {
            Some(h) => match header_value(h.headers, name) {
                Some(v) => c.patterns.check(|p| p.matches(&v)),
                // A missing header matches no value, and satisfies notValues.
                None => c.patterns.values.is_empty(),
            },
            None => true,
        },
        ConditionKey::RequestAuth => match req.http {
            Some(_) => c.patterns.values.is_empty(),
            None => true,
        },
        ConditionKey::Ignored => true,
    }
}

/// A header's value as Istio's conditions see it: repeated headers joined
/// with `,` (so a second `x-user` cannot hide behind the first).
fn header_value<'h>(
    headers: &'h http::HeaderMap,
    name: &http::HeaderName,
) -> Option<std::borrow::Cow<'h, str>> {
    let mut values = headers.get_all(name).iter();
    let first = values.next()?.to_str().ok()?;
    let rest: Vec<&str> = values.filter_map(|v| v.to_str().ok()).collect();
    if rest.is_empty() {
        return Some(std::borrow::Cow::Borrowed(first));
    }
    Some(std::borrow::Cow::Owned(
        std::iter::once(first)
            .chain(rest)
            .collect::<Vec<_>>()
            .join(","),
    ))
}

/// Istio's decision for one request over the policies that apply to the
/// workload (in any order; the result does not depend on it).
pub fn authorize(policies: &[CompiledPolicy], req: &AuthzRequest<'_>) -> Decision {
    // The policy and rule; its id is only written for a denial.
    let first_match = |action: AuthzAction| {
        policies
            .iter()
            .filter(|p| p.action == action)
            .find_map(|p| p.matching_rule(req).map(|i| (p, i)))
    };
    if let Some((p, i)) = first_match(AuthzAction::Custom) {
        return Decision::Deny { policy: p.id(i) };
    }
    if let Some((p, i)) = first_match(AuthzAction::Deny) {
        return Decision::Deny { policy: p.id(i) };
    }
    let audited = first_match(AuthzAction::Audit).is_some();
    let has_allow = policies.iter().any(|p| p.action == AuthzAction::Allow);
    if !has_allow || first_match(AuthzAction::Allow).is_some() {
        Decision::Allow { audited }
    } else {
        Decision::Deny {
            policy: "none".to_owned(),
        }
    }
}

// === Why no ALLOW rule matches (for `explain`) ===

/// For a request no ALLOW rule admits: each ALLOW policy's rules and the
/// first field of each that does not hold, e.g. `curl-egress-tst/allow
/// rule[0]: source.namespace "other" not in [curl-external-tst]`.
pub fn why_not_allowed(policies: &[CompiledPolicy], req: &AuthzRequest<'_>) -> Vec<String> {
    let mut out = Vec::new();
    for p in policies.iter().filter(|p| p.action == AuthzAction::Allow) {
        if p.rules.is_empty() {
            out.push(format!(
                "{}/{}: no rules (it allows nothing)",
                p.namespace, p.name
            ));
        }
        for (i, rule) in p.rules.iter().enumerate() {
            let why = if req.http.is_none() && rule_uses_http(rule) {
                Some("uses HTTP fields, and this is TCP".to_owned())
            } else {
                rule_miss(rule, req)
            };
            if let Some(why) = why {
                out.push(format!("{}/{} rule[{i}]: {why}", p.namespace, p.name));
            }
        }
    }
    out
}

fn rule_miss(rule: &CompiledRule, req: &AuthzRequest<'_>) -> Option<String> {
    if let Some(first) = rule.from.first()
        && !rule.from.iter().any(|s| source_matches(s, req))
    {
        return Some(
            source_miss(first, req).unwrap_or_else(|| "from: no source matches".to_owned()),
        );
    }
    if let Some(first) = rule.to.first()
        && !rule.to.iter().any(|o| operation_matches(o, req))
    {
        return Some(
            operation_miss(first, req).unwrap_or_else(|| "to: no operation matches".to_owned()),
        );
    }
    rule.when
        .iter()
        .find(|c| !condition_matches(c, req))
        .map(|c| format!("when {}: not satisfied", c.name))
}

/// `name "actual" not in [values]`, or `name "actual" is in notValues`.
fn field_miss<T: std::fmt::Display>(
    name: &str,
    actual: &str,
    field: &Field<T>,
    holds: impl Fn(&T) -> bool,
) -> Option<String> {
    let list = |v: &[T]| {
        v.iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    };
    if !field.values.is_empty() && !field.values.iter().any(&holds) {
        return Some(format!(
            "{name} {actual:?} not in [{}]",
            list(&field.values)
        ));
    }
    field
        .not_values
        .iter()
        .find(|v| holds(v))
        .map(|v| format!("{name} {actual:?} matches not_{name} {v}"))
}

fn source_miss(s: &CompiledSource, req: &AuthzRequest<'_>) -> Option<String> {
    let principal = req.peer.map_or("", |p| &*p.principal);
    let namespace = req.peer.map_or("", |p| p.id.namespace());
    let sa = req.peer.map_or("", |p| &*p.service_account);
    let source_ip = req.source_ip.to_string();
    let remote_ip = req.remote_ip.to_string();
    field_miss("principals", principal, &s.principals, |p| {
        p.matches(principal)
    })
    .or_else(|| {
        field_miss("namespaces", namespace, &s.namespaces, |p| {
            p.matches(namespace)
        })
    })
    .or_else(|| field_miss("serviceAccounts", sa, &s.service_accounts, |v| v == sa))
    .or_else(|| {
        field_miss("ipBlocks", &source_ip, &s.ip_blocks, |n| {
            n.contains(&req.source_ip)
        })
    })
    .or_else(|| {
        field_miss("remoteIpBlocks", &remote_ip, &s.remote_ip_blocks, |n| {
            n.contains(&req.remote_ip)
        })
    })
    .or_else(|| {
        (req.http.is_some() && !s.request_principals.check(|p| p.matches(""))).then(|| {
            "requestPrincipals: no JWT (RequestAuthentication is not supported)".to_owned()
        })
    })
}

fn operation_miss(o: &CompiledOperation, req: &AuthzRequest<'_>) -> Option<String> {
    let port = req.destination_port.to_string();
    field_miss("ports", &port, &o.ports, |p| *p == req.destination_port).or_else(|| {
        let h = req.http.as_ref()?;
        field_miss("hosts", h.host, &o.hosts, |p| p.matches_ignore_case(h.host))
            .or_else(|| field_miss("methods", h.method, &o.methods, |p| p.matches(h.method)))
            .or_else(|| field_miss("paths", h.path, &o.paths, |p| p.matches(h.path)))
    })
}

#[cfg(test)]
mod tests;
