//! One-line summaries of rules and matches, for people: `config-dump`'s
//! tables and `explain`.

use crate::model::networking::HttpMatchRequest;
use crate::model::security::Rule;

/// A one-line summary of a rule, e.g. `from namespaces=[a] to methods=[GET]`.
pub fn rule_summary(rule: &Rule) -> String {
    fn field(out: &mut Vec<String>, name: &str, values: &[String]) {
        if !values.is_empty() {
            out.push(format!("{name}=[{}]", values.join(",")));
        }
    }
    let mut parts = Vec::new();
    for f in &rule.from {
        let s = &f.source;
        let mut o = Vec::new();
        field(&mut o, "principals", &s.principals);
        field(&mut o, "notPrincipals", &s.not_principals);
        field(&mut o, "requestPrincipals", &s.request_principals);
        field(&mut o, "notRequestPrincipals", &s.not_request_principals);
        field(&mut o, "namespaces", &s.namespaces);
        field(&mut o, "notNamespaces", &s.not_namespaces);
        field(&mut o, "serviceAccounts", &s.service_accounts);
        field(&mut o, "notServiceAccounts", &s.not_service_accounts);
        field(&mut o, "ipBlocks", &s.ip_blocks);
        field(&mut o, "notIpBlocks", &s.not_ip_blocks);
        field(&mut o, "remoteIpBlocks", &s.remote_ip_blocks);
        field(&mut o, "notRemoteIpBlocks", &s.not_remote_ip_blocks);
        parts.push(format!("from {}", o.join(" ")));
    }
    for t in &rule.to {
        let op = &t.operation;
        let mut o = Vec::new();
        field(&mut o, "hosts", &op.hosts);
        field(&mut o, "notHosts", &op.not_hosts);
        field(&mut o, "ports", &op.ports);
        field(&mut o, "notPorts", &op.not_ports);
        field(&mut o, "methods", &op.methods);
        field(&mut o, "notMethods", &op.not_methods);
        field(&mut o, "paths", &op.paths);
        field(&mut o, "notPaths", &op.not_paths);
        parts.push(format!("to {}", o.join(" ")));
    }
    for c in &rule.when {
        let mut o = Vec::new();
        field(&mut o, "values", &c.values);
        field(&mut o, "notValues", &c.not_values);
        parts.push(format!("when {} {}", c.key, o.join(" ")));
    }
    if parts.is_empty() {
        "(empty rule: matches everything)".to_owned()
    } else {
        parts.join("; ")
    }
}

/// A one-line summary of an HTTP match block.
pub fn match_summary(m: &HttpMatchRequest) -> String {
    use crate::model::networking::StringMatch;
    fn sm(s: &StringMatch) -> String {
        match (&s.exact, &s.prefix, &s.regex) {
            (Some(e), _, _) => format!("={e}"),
            (_, Some(p), _) => format!(" prefix {p}"),
            (_, _, Some(r)) => format!(" ~{r}"),
            _ => " present".to_owned(),
        }
    }
    let mut parts = Vec::new();
    if let Some(p) = m.port {
        parts.push(format!("port={p}"));
    }
    for (name, v) in [
        ("uri", &m.uri),
        ("scheme", &m.scheme),
        ("method", &m.method),
        ("authority", &m.authority),
    ] {
        if let Some(v) = v {
            parts.push(format!("{name}{}", sm(v)));
        }
    }
    for (k, v) in &m.headers {
        parts.push(format!("header {k}{}", sm(v)));
    }
    for (k, v) in &m.without_headers {
        parts.push(format!("!header {k}{}", sm(v)));
    }
    for (k, v) in &m.query_params {
        parts.push(format!("query {k}{}", sm(v)));
    }
    if !m.gateways.is_empty() {
        parts.push(format!("gateways={}", m.gateways.join(",")));
    }
    if m.ignore_uri_case {
        parts.push("ignoreUriCase".to_owned());
    }
    if parts.is_empty() {
        "*".to_owned()
    } else {
        parts.join(" ")
    }
}
