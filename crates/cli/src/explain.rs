//! `meshgate explain`: one request's path through one proxy, decision by
//! decision. It compiles the same snapshot the proxy runs and asks the same
//! `decide` function the data path asks, so what it prints is what the proxy
//! would do.

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use http::{HeaderMap, HeaderName, HeaderValue, Uri};
use meshgate_config::registry::ProxyKind;
use meshgate_config::{MeshSettings, registry, view};
use meshgate_identity::{CertificateAuthority, Source, SpiffeId, WorkloadIdentity};
use meshgate_proxy::authz::Decision;
use meshgate_proxy::decide::{TlsVerdict, Verdict, decide, decide_tls};
use meshgate_proxy::proxy::ConnInfo;
use meshgate_proxy::route::{Action, RequestView, Routed};
use meshgate_proxy::state::{BuildContext, ListenerTls, Snapshot};
use meshgate_proxy::upstream::dns::Resolver;
use meshgate_proxy::upstream::tls::DefaultRoots;

use crate::{EXIT_BAD_INPUT, Output};

#[derive(Debug, clap::Args)]
pub(crate) struct ExplainArgs {
    /// YAML files or folders with the mesh config.
    #[arg(short, long = "config", required = true, value_name = "PATH")]
    config: Vec<PathBuf>,
    /// The proxy's workload, as NAMESPACE/NAME of its Deployment or Pod.
    #[arg(short, long, value_name = "NS/NAME")]
    workload: String,
    /// The request's method.
    #[arg(short = 'X', long, default_value = "GET")]
    method: String,
    /// A request header, `Name: value` (repeat for several).
    #[arg(short = 'H', long = "header", value_name = "NAME: VALUE")]
    headers: Vec<String>,
    /// The caller's verified SPIFFE ID (a mesh peer over mutual TLS); without
    /// it the request arrives in plaintext.
    #[arg(long, value_name = "SPIFFE_ID")]
    from: Option<String>,
    /// Output format.
    #[arg(short, long, value_enum, default_value = "text")]
    output: Output,
    /// The request URL as the workload sends it (sidecar) or as it reaches
    /// the gateway's server port (gateway), e.g. http://example.com/path.
    url: String,
}

pub(crate) fn run(args: &ExplainArgs) -> anyhow::Result<ExitCode> {
    let config = match crate::run::load_config(&args.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e:#}");
            return Ok(ExitCode::from(EXIT_BAD_INPUT));
        }
    };
    let uri: Uri = args
        .url
        .parse()
        .with_context(|| format!("URL \"{}\"", args.url))?;
    let (Some(scheme), Some(authority)) = (uri.scheme_str(), uri.authority()) else {
        bail!(
            "URL \"{}\": give scheme and host, e.g. http://example.com/",
            args.url
        );
    };
    let port = authority
        .port_u16()
        .unwrap_or(if scheme == "https" { 443 } else { 80 });
    let mut headers = HeaderMap::new();
    for h in &args.headers {
        let (name, value) = h
            .split_once(':')
            .with_context(|| format!("header \"{h}\": expected `Name: value`"))?;
        headers.append(
            HeaderName::try_from(name.trim()).with_context(|| format!("header name \"{name}\""))?,
            HeaderValue::try_from(value.trim())
                .with_context(|| format!("header value \"{value}\""))?,
        );
    }
    let peer: Option<SpiffeId> = args
        .from
        .as_deref()
        .map(str::parse)
        .transpose()
        .context("--from")?;

    let mesh = MeshSettings::default();
    let reg = registry::build(&config, &mesh);
    let w = view::find_workload(&reg, &args.workload)?;
    if w.proxy == ProxyKind::None {
        bail!(
            "{} has no proxy (no sidecar injected, not a gateway): its traffic is not in the mesh",
            args.workload
        );
    }
    let is_gateway = w.proxy == ProxyKind::Gateway;
    let id: SpiffeId = w.spiffe_id.parse()?;

    // The snapshot needs an identity to build mesh TLS settings; a throwaway
    // CA in memory serves (nothing is sent anywhere).
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let snap = rt.block_on(async {
        let ca = Arc::new(CertificateAuthority::generate(id.trust_domain())?);
        let identity = WorkloadIdentity::start(
            id.clone(),
            Source::InProcess {
                ca,
                ttl: Duration::from_secs(3600),
            },
        )
        .await?;
        let ctx = BuildContext {
            mesh: mesh.clone(),
            resolver: Resolver::new(None)?,
            roots: DefaultRoots::load(&[])?,
            identity: Some(identity),
            endpoints: Default::default(),
        };
        anyhow::Ok(Snapshot::build(&config, &args.workload, &ctx)?)
    })?;

    let here = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port);
    let conn = ConnInfo {
        remote: SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2)), 40000),
        local: here,
        listener_port: port,
        peer: peer.as_ref().map(|p| Arc::from(p.to_string().as_str())),
        peer_namespace: peer
            .as_ref()
            .filter(|p| p.trust_domain() == id.trust_domain())
            .map(|p| Arc::from(p.namespace())),
        tls: peer.is_some(),
        sni: None,
        original_dst: (!is_gateway).then_some(here),
        explicit: false,
    };
    let path = uri.path();
    let query = uri.query().unwrap_or("");
    let req = RequestView {
        authority: authority.as_str(),
        method: &args.method,
        scheme,
        path,
        query,
        headers: &headers,
    };
    // TLS the proxy does not terminate (a sidecar always passes the
    // application's own TLS through; a gateway on a PASSTHROUGH server) is
    // decided by SNI alone.
    let passthrough = scheme == "https"
        && (!is_gateway
            || snap
                .listener(port)
                .is_some_and(|l| matches!(l.tls, ListenerTls::Passthrough)));
    if passthrough {
        return explain_tls(args, &snap, is_gateway, &id, port, authority.host());
    }
    let d = decide(&snap, &conn, Some(port), &req, 0.0);

    // Facts, in the order the proxy meets them.
    let listener = match d.listener {
        Some(l) => l.origin.clone(),
        None if is_gateway => format!("no Gateway server on port {port}"),
        None => format!("no mesh route table for port {port}"),
    };
    let (route, destinations) = match &d.routed {
        Routed::Matched { route, matched } => {
            let allow_any = snap
                .allow_any
                .as_ref()
                .is_some_and(|a| std::ptr::eq(a, *route));
            let vs = match (&route.virtual_service, allow_any) {
                (Some(v), _) => format!("VirtualService {v}"),
                (None, true) => "outbound traffic policy ALLOW_ANY".to_owned(),
                (None, false) => {
                    "default route of the service (no VirtualService for this host and port)"
                        .to_owned()
                }
            };
            let which = matched.map_or_else(String::new, |m| format!(", match #{m}"));
            let dests = match &route.action {
                Action::Forward(ws) => ws
                    .iter()
                    .map(|w| {
                        format!(
                            "{} (weight {})",
                            snap.cluster_names.get(w.cluster).map_or("?", |n| &**n),
                            w.weight
                        )
                    })
                    .collect(),
                Action::Redirect(r) => vec![format!("redirect ({})", r.code)],
                Action::Direct { status, .. } => vec![format!("direct response ({status})")],
            };
            (format!("{vs}, rule {}{which}", route.name), dests)
        }
        Routed::NoRoute => (
            format!("a virtual host for {authority} exists, but no rule matches"),
            vec![],
        ),
        Routed::NoVirtualHost => (format!("no route for host {authority}"), vec![]),
    };
    let cluster = d
        .cluster
        .and_then(|(i, _)| snap.cluster_names.get(i))
        .and_then(|name| snap.view.clusters.iter().find(|c| c.name == **name));
    let authz = match &d.authz {
        Decision::Allow { .. } if snap.policies.is_empty() => {
            "allowed: no AuthorizationPolicy applies".to_owned()
        }
        Decision::Allow { audited } => format!(
            "allowed by the ALLOW policies ({}){}",
            snap.policies
                .iter()
                .map(|p| format!("{}/{}", p.namespace, p.name))
                .collect::<Vec<_>>()
                .join(", "),
            if *audited { ", audited" } else { "" }
        ),
        Decision::Deny { policy } if policy == "none" => {
            "denied: ALLOW policies apply and none matches".to_owned()
        }
        Decision::Deny { policy } => format!("denied by {policy}"),
    };
    // A gateway only listens on its Gateway servers' ports.
    let refused = is_gateway && d.listener.is_none();
    let result = match d.verdict {
        _ if refused => format!("connection refused: no Gateway server listens on port {port}"),
        Verdict::Deny => "403 RBAC: access denied".to_owned(),
        Verdict::Blocked => format!(
            "502: outbound traffic policy REGISTRY_ONLY ({}) and {authority} is not in the registry (route block_all)",
            snap.view.outbound_traffic_policy.source
        ),
        Verdict::NoRoute => "404, response flag NR (no route)".to_owned(),
        Verdict::Route => match (&d.routed, cluster) {
            (_, Some(c)) => format!("forwarded to {}", c.name),
            (Routed::Matched { route, .. }, None) => match &route.action {
                Action::Redirect(r) => format!("{} redirect", r.code),
                Action::Direct { status, .. } => format!("{status} direct response"),
                Action::Forward(_) => {
                    "503, response flag NR (destination not in the registry)".to_owned()
                }
            },
            _ => "404".to_owned(),
        },
    };

    if args.output == Output::Json {
        let json = serde_json::json!({
            "request": {"method": args.method, "url": args.url, "from": args.from},
            "proxy": {"workload": args.workload, "kind": if is_gateway {"gateway"} else {"sidecar"}, "identity": id.to_string()},
            "listener": listener,
            "route": route,
            "destinations": destinations,
            "cluster": cluster,
            "authorization": if !refused && (is_gateway || !snap.policies.is_empty()) { Some(&authz) } else { None },
            "result": result,
        });
        println!("{}", serde_json::to_string_pretty(&json)?);
        return Ok(ExitCode::SUCCESS);
    }
    let mut out = String::new();
    let _ = writeln!(
        out,
        "request    {} {}{}",
        args.method,
        args.url,
        args.from
            .as_deref()
            .map_or_else(String::new, |f| format!(" from {f} (mutual TLS)"))
    );
    let _ = writeln!(
        out,
        "proxy      {} of {} ({id})",
        if is_gateway { "gateway" } else { "sidecar" },
        args.workload
    );
    let _ = writeln!(out, "1 listener {listener}");
    let _ = writeln!(out, "2 route    {route}");
    for dst in &destinations {
        let _ = writeln!(out, "           -> {dst}");
    }
    if let Some(c) = cluster {
        let tls = if c.tls.auto {
            "ISTIO_MUTUAL (auto mTLS)".to_owned()
        } else {
            format!("{:?}", c.tls.mode)
        };
        let _ = writeln!(
            out,
            "3 cluster  {}: resolution {}, TLS {tls}{}{}{}",
            c.name,
            c.resolution,
            if c.tls.sni.is_empty() {
                String::new()
            } else {
                format!(", SNI {}", c.tls.sni)
            },
            if c.tls.expected_identities.is_empty() {
                String::new()
            } else {
                format!(", expects {}", c.tls.expected_identities.join(" or "))
            },
            c.destination_rule
                .as_deref()
                .map_or_else(String::new, |dr| format!(", DestinationRule {dr}")),
        );
    }
    if !refused && (is_gateway || !snap.policies.is_empty()) {
        let _ = writeln!(out, "4 authz    {authz}");
    }
    let _ = writeln!(out, "result     {result}");
    print!("{out}");
    Ok(ExitCode::SUCCESS)
}

/// The SNI-only path of a TLS connection the proxy passes through.
fn explain_tls(
    args: &ExplainArgs,
    snap: &Snapshot,
    is_gateway: bool,
    id: &SpiffeId,
    port: u16,
    sni: &str,
) -> anyhow::Result<ExitCode> {
    let d = decide_tls(snap, port, sni, 0.0);
    let listener = match d.listener {
        Some(l) => l.origin.clone(),
        None if is_gateway => format!("no Gateway server on port {port}"),
        None => format!("no mesh listener for port {port}"),
    };
    let route = d.route.map_or_else(
        || format!("no tls route for SNI {sni}"),
        |r| format!("tls route {} (SNI {sni})", r.name),
    );
    let cluster = d
        .cluster
        .and_then(|(i, _)| snap.cluster_names.get(i))
        .map(|n| n.to_string());
    let result = match d.verdict {
        TlsVerdict::Route => format!(
            "TLS passed through to {}: the session is the workload's own, the proxy reads only SNI",
            cluster.as_deref().unwrap_or("?")
        ),
        TlsVerdict::OriginalDestination => {
            "TLS passed through to the original destination (PassthroughCluster)".to_owned()
        }
        TlsVerdict::Blocked => format!(
            "connection closed: outbound traffic policy REGISTRY_ONLY ({}) and no route for SNI {sni} (BlackHoleCluster)",
            snap.view.outbound_traffic_policy.source
        ),
        TlsVerdict::NoRoute => format!("connection closed: no route for SNI {sni} (NR)"),
    };
    if args.output == Output::Json {
        let json = serde_json::json!({
            "request": {"url": args.url, "sni": sni},
            "proxy": {"workload": args.workload, "kind": if is_gateway {"gateway"} else {"sidecar"}, "identity": id.to_string()},
            "listener": listener,
            "route": route,
            "cluster": cluster,
            "result": result,
        });
        println!("{}", serde_json::to_string_pretty(&json)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!("request    TLS to {} (SNI {sni})", args.url);
    println!(
        "proxy      {} of {} ({id})",
        if is_gateway { "gateway" } else { "sidecar" },
        args.workload
    );
    println!("1 listener {listener}");
    println!("2 route    {route}");
    if let Some(c) = &cluster {
        println!("3 cluster  {c}");
    }
    println!("result     {result}");
    Ok(ExitCode::SUCCESS)
}
