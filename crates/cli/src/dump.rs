//! `meshgate config-dump`: one workload's proxy view, as a table or JSON.

use std::fmt::Write as _;
use std::process::ExitCode;

use anyhow::Context;
use meshgate_config::model::networking::ClientTlsMode;
use meshgate_config::model::networking::HttpRedirect;
use meshgate_config::view::{ProxyView, RouteAction, match_summary, rule_summary};
use meshgate_config::{load_paths, view};

use crate::table::Table;
use crate::{DumpArgs, DumpOutput, EXIT_BAD_INPUT};

pub(crate) fn run(args: &DumpArgs) -> anyhow::Result<ExitCode> {
    let loaded = match load_paths(&args.config) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("error: {e}");
            return Ok(ExitCode::from(EXIT_BAD_INPUT));
        }
    };
    if loaded.has_errors() {
        for d in loaded
            .diagnostics
            .iter()
            .filter(|d| d.level == meshgate_config::Level::Error)
        {
            eprintln!("{d}");
        }
        eprintln!(
            "error: the config has schema errors; fix them (see `meshgate check`) before dumping a proxy view"
        );
        return Ok(ExitCode::from(EXIT_BAD_INPUT));
    }
    let v = view::build(&loaded.config, &args.mesh.load()?, &args.workload)?;
    let v = filtered(v, args.port, args.fqdn.as_deref());
    match args.output {
        DumpOutput::Json => println!(
            "{}",
            serde_json::to_string_pretty(&v).context("encoding JSON")?
        ),
        DumpOutput::Yaml => print!("{}", serde_saphyr::to_string(&v).context("encoding YAML")?),
        DumpOutput::Text => print!("{}", render(&v)),
    }
    Ok(ExitCode::SUCCESS)
}

/// Only what is on `port`, and whose host contains `fqdn`.
fn filtered(mut v: ProxyView, port: Option<u32>, fqdn: Option<&str>) -> ProxyView {
    let on_port = |p: u32| port.is_none_or(|want| want == p);
    let named = |h: &str| fqdn.is_none_or(|want| h.contains(want));
    v.listeners
        .retain(|l| on_port(l.port) && (fqdn.is_none() || l.hosts.iter().any(|h| named(h))));
    v.routes
        .retain(|r| on_port(r.listener_port) && named(&r.host));
    v.clusters.retain(|c| on_port(c.port) && named(&c.host));
    v
}

fn or_dash(s: &str) -> String {
    if s.is_empty() {
        "-".to_owned()
    } else {
        s.to_owned()
    }
}

fn render(v: &ProxyView) -> String {
    let mut out = String::new();
    let w = &v.workload;
    let kind = match w.proxy {
        meshgate_config::registry::ProxyKind::Sidecar => "sidecar",
        meshgate_config::registry::ProxyKind::Gateway => "gateway",
        meshgate_config::registry::ProxyKind::None => "no proxy (not injected)",
    };
    let _ = writeln!(
        out,
        "Workload:          {}/{} ({kind})",
        w.namespace, w.name
    );
    let _ = writeln!(out, "Identity:          {}", w.spiffe_id);
    let _ = writeln!(
        out,
        "Sidecar resource:  {}",
        v.sidecar.as_deref().unwrap_or("none")
    );
    let _ = writeln!(
        out,
        "Outbound policy:   {} ({})",
        v.outbound_traffic_policy.mode.as_str(),
        v.outbound_traffic_policy.source
    );
    let _ = writeln!(
        out,
        "Inbound mTLS:      {} ({})",
        v.peer_authentication.mode.as_str(),
        v.peer_authentication.source
    );

    let mut t = Table::new(&[
        "PORT",
        "BIND",
        "PROTOCOL",
        "DOWNSTREAM TLS",
        "HOSTS",
        "ORIGIN",
    ]);
    for l in &v.listeners {
        t.row(vec![
            l.port.to_string(),
            l.bind_port.to_string(),
            l.protocol.to_string(),
            l.tls.to_string(),
            l.hosts.join(","),
            l.origin.clone(),
        ]);
    }
    let _ = write!(out, "\nLISTENERS\n{}", t.render());

    let mut t = Table::new(&[
        "ROUTE (HOST:PORT)",
        "MATCH",
        "ACTION",
        "VIRTUALSERVICE",
        "RULE",
    ]);
    for r in &v.routes {
        let matches = if !r.sni_hosts.is_empty() {
            format!("sni={}", r.sni_hosts.join(","))
        } else if let Some(subnets) = &r.tcp_subnets {
            match subnets.as_slice() {
                [] => "tcp".to_owned(),
                s => format!("tcp dst={}", s.join(",")),
            }
        } else if r.matches.is_empty() {
            "*".to_owned()
        } else {
            r.matches
                .iter()
                .map(match_summary)
                .collect::<Vec<_>>()
                .join(" | ")
        };
        let action = match &r.action {
            RouteAction::Route(d) => d
                .iter()
                .map(|d| {
                    let subset = if d.subset.is_empty() {
                        String::new()
                    } else {
                        format!(" subset {}", d.subset)
                    };
                    let weight = if d.weight == 100 {
                        String::new()
                    } else {
                        format!(" weight {}", d.weight)
                    };
                    format!("-> {}:{}{subset}{weight}", d.host, d.port)
                })
                .collect::<Vec<_>>()
                .join(", "),
            RouteAction::Redirect(r) => format!(
                "redirect {} {}",
                r.redirect_code.unwrap_or(301),
                location(r)
            ),
            RouteAction::DirectResponse(d) => format!("direct response {}", d.status),
        };
        t.row(vec![
            format!("{}:{}", r.host, r.listener_port),
            matches,
            action,
            r.virtual_service
                .clone()
                .unwrap_or_else(|| "(default route)".to_owned()),
            r.rule.clone(),
        ]);
    }
    let _ = write!(out, "\nROUTES\n{}", t.render());

    let mut t = Table::new(&[
        "CLUSTER",
        "RESOLUTION",
        "TLS",
        "SNI",
        "EXPECTED PEER IDENTITY",
        "TRUST",
        "DESTINATIONRULE",
    ]);
    for c in &v.clusters {
        let mode = match (c.tls.mode, c.tls.auto) {
            (ClientTlsMode::IstioMutual, true) => "ISTIO_MUTUAL (auto mTLS)".to_owned(),
            (ClientTlsMode::Disable, _) => "DISABLE (plaintext)".to_owned(),
            (m, _) => m.as_str().to_owned(),
        };
        t.row(vec![
            c.name.clone(),
            c.resolution.to_string(),
            mode,
            or_dash(&c.tls.sni),
            or_dash(&c.tls.expected_identities.join(",")),
            or_dash(&c.tls.trust),
            c.destination_rule.clone().unwrap_or_else(|| "-".to_owned()),
        ]);
    }
    let _ = write!(out, "\nCLUSTERS\n{}", t.render());

    let mut t = Table::new(&["AUTHORIZATION POLICY", "ACTION", "SCOPE", "RULES"]);
    for p in &v.authorization_policies {
        let action = match &p.provider {
            Some(provider) => format!("{} ({provider})", p.action.as_str()),
            None => p.action.as_str().to_owned(),
        };
        let rules = match &p.rules {
            None => "(no rules: matches nothing)".to_owned(),
            Some(rules) => rules
                .iter()
                .map(rule_summary)
                .collect::<Vec<_>>()
                .join(" OR "),
        };
        t.row(vec![p.full_name(), action, p.scope.clone(), rules]);
    }
    if v.authorization_policies.is_empty() {
        t.row(vec!["(none: all requests allowed)".to_owned()]);
    }
    let _ = write!(out, "\nAUTHORIZATION\n{}", t.render());
    out
}

/// Where a redirect points, as far as the rule says (`scheme://authority/uri`).
fn location(r: &HttpRedirect) -> String {
    let scheme = if r.scheme.is_empty() {
        String::new()
    } else {
        format!("{}://", r.scheme)
    };
    format!("{scheme}{}{}", r.authority, r.uri)
}
