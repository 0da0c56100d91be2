//! `meshgate explain`: one request's (or connection's) path through one
//! proxy, decision by decision. It compiles the snapshot the proxy would
//! run and asks the same `plan` the proxy's listeners ask, step by step as
//! they do (TLS or not, the ClientHello, TLS termination, the request), so
//! what it prints is what the proxy does.

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use http::{HeaderMap, HeaderName, HeaderValue, Uri};
use meshgate_config::model::security::MtlsMode;
use meshgate_config::registry::ProxyKind;
use meshgate_config::view;
use meshgate_config::view::ClusterView;
use meshgate_identity::{CertificateAuthority, Source, SpiffeId, WorkloadIdentity};
use meshgate_proxy::authz::Decision;
use meshgate_proxy::conn::{Conn, Peer, Terminated};
use meshgate_proxy::listener::Timeouts;
use meshgate_proxy::plan::{
    Local, Need, Peeked, Plan, Refusal, RequestAction, RequestHead, RequestPlan, TcpAction,
    TcpPlan, TcpReason, Termination, plan,
};
use meshgate_proxy::route::{Action, RequestView, Routed};
use meshgate_proxy::snapshot::{BuildContext, Role, Snapshot};
use meshgate_proxy::upstream::dns::Resolver;
use meshgate_proxy::upstream::tls::DefaultRoots;
use serde::Serialize;

use crate::{EXIT_BAD_INPUT, Output};

#[derive(Debug, Clone, clap::Args)]
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
    /// Follow the request on: where a sidecar sends it to a gateway of the
    /// mesh, explain the gateway's part too (with the sidecar's identity).
    #[arg(long, conflicts_with = "inbound")]
    follow: bool,
    /// Explain the way in to the workload instead: its sidecar receiving
    /// the request on the workload's own port (the URL's; a Service's
    /// targetPort), with its PeerAuthentication and AuthorizationPolicies.
    #[arg(long)]
    inbound: bool,
    /// With tcp://: the client sends nothing and waits for the server to
    /// speak first (SMTP, MySQL): whether the proxy takes its silence for
    /// plaintext after its protocol detection timeout or closes the
    /// connection waiting for a first byte.
    #[arg(long)]
    silent: bool,
    #[command(flatten)]
    mesh: crate::MeshArgs,
    /// What the workload sends (sidecar) or what reaches the gateway's
    /// server port (gateway): http://host[:port]/path, https://host[:port]
    /// (TLS with that SNI), or tcp://host:port (opaque bytes).
    url: String,
}

/// The request, parsed.
struct Input {
    scheme: Scheme,
    method: String,
    authority: String,
    host: String,
    port: u16,
    path: String,
    query: String,
    headers: HeaderMap,
    from: Option<SpiffeId>,
    /// The client waits for the server to speak first (`--silent`).
    silent: bool,
    /// Where a sidecar's application connects: the host if it is an
    /// address, else the service's first address (a ServiceEntry's
    /// `addresses`, a ClusterIP), as DNS would answer.
    destination: Option<IpAddr>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scheme {
    Http,
    Https,
    Tcp,
}

pub(crate) fn run(args: &ExplainArgs) -> anyhow::Result<ExitCode> {
    let config = match crate::run::load_config(&args.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e:#}");
            return Ok(ExitCode::from(EXIT_BAD_INPUT));
        }
    };
    let mesh = args.mesh.load()?;
    // Each hop: the proxy's part, then (with --follow) the gateway it
    // sends the request to, as the mesh peer it is.
    let mut hop = args.clone();
    let mut reports = Vec::new();
    let mut code = 0;
    for _ in 0..3 {
        let mut input = parse_input(&hop).map_err(|e| crate::UsageError(format!("{e:#}")))?;
        input.destination = destination_ip(&config, &mesh, &hop.workload, &input.host);
        let view = view::build(&config, &mesh, &hop.workload)?;
        match view.workload.proxy {
            ProxyKind::None => {
                return Err(crate::UsageError(format!(
                    "{} has no proxy (no sidecar injected, not a gateway): its traffic is not in the mesh",
                    hop.workload
                ))
                .into());
            }
            ProxyKind::Gateway if args.inbound => {
                return Err(crate::UsageError(format!(
                    "--inbound explains a sidecar's way in to its workload; {} is a gateway: explain what reaches its server port without --inbound",
                    hop.workload
                ))
                .into());
            }
            _ => {}
        }
        let id: SpiffeId = view.workload.spiffe_id.parse()?;
        // The snapshot keeps no cluster views: the steps describe them.
        let clusters = view.clusters.clone();
        let snap = snapshot(view, &id)?;
        let explained = explain(&snap, &clusters, &input, &id, args.inbound);
        reports.push(match args.output {
            Output::Json => explained.json(&hop),
            Output::Text => serde_json::Value::String(explained.text(&hop)),
        });
        // A script can guard a policy: what the proxy does is the code.
        code = explained.exit_code();
        let next = explained
            .next_gateway()
            .filter(|_| args.follow && code == 0);
        let Some((workload, port)) = next else { break };
        hop.url = with_port(&hop.url, port);
        hop.from = Some(id.to_string());
        hop.workload = workload;
    }
    match (args.output, reports.as_slice()) {
        (Output::Json, [one]) => println!("{}", serde_json::to_string_pretty(one)?),
        (Output::Json, hops) => println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({ "hops": hops }))?
        ),
        (Output::Text, hops) => {
            let texts: Vec<&str> = hops.iter().filter_map(|h| h.as_str()).collect();
            print!("{}", texts.join("\n"));
        }
    }
    Ok(ExitCode::from(code))
}

/// `url` with its port set to `port` (the next hop hears it there); the
/// scheme's own port is left out.
fn with_port(url: &str, port: u16) -> String {
    match url.parse::<Uri>() {
        Ok(uri) => {
            let scheme = uri.scheme_str().unwrap_or("http");
            let host = uri.host().unwrap_or("");
            let path = uri.path_and_query().map_or("/", |p| p.as_str());
            let default = matches!((scheme, port), ("http", 80) | ("https", 443));
            if default {
                format!("{scheme}://{host}{path}")
            } else {
                format!("{scheme}://{host}:{port}{path}")
            }
        }
        Err(_) => url.to_owned(),
    }
}

fn parse_input(args: &ExplainArgs) -> anyhow::Result<Input> {
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
    let (scheme, default_port) = match scheme {
        "http" => (Scheme::Http, 80),
        "https" => (Scheme::Https, 443),
        "tcp" if authority.port_u16().is_some() => (Scheme::Tcp, 0),
        "tcp" => bail!("URL \"{}\": tcp:// needs a port", args.url),
        other => bail!(
            "URL \"{}\": scheme {other} is not one a proxy tells apart; use http://, https:// (TLS) or tcp:// (opaque bytes)",
            args.url
        ),
    };
    if args.silent && scheme != Scheme::Tcp {
        bail!(
            "--silent goes with tcp://: a client that sends a request or a ClientHello is not silent"
        );
    }
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
    Ok(Input {
        scheme,
        method: args.method.clone(),
        authority: authority.as_str().to_owned(),
        host: authority.host().to_ascii_lowercase(),
        port: authority.port_u16().unwrap_or(default_port),
        path: uri.path().to_owned(),
        query: uri.query().unwrap_or("").to_owned(),
        headers,
        from: args
            .from
            .as_deref()
            .map(str::parse)
            .transpose()
            .context("--from")?,
        silent: args.silent,
        destination: None,
    })
}

/// The address a sidecar's application would connect to for `host`.
fn destination_ip(
    config: &meshgate_config::model::Config,
    mesh: &meshgate_config::MeshSettings,
    workload: &str,
    host: &str,
) -> Option<IpAddr> {
    if let Ok(ip) = host.trim_matches(['[', ']']).parse() {
        return Some(ip);
    }
    let namespace = workload.split_once('/').map_or("default", |(ns, _)| ns);
    let registry = meshgate_config::registry::build(config, mesh);
    let service = registry.lookup(host, namespace)?;
    service
        .addresses
        .iter()
        .find_map(|a| a.split('/').next()?.parse().ok())
}

/// The snapshot the proxy would run. Mesh TLS settings need an identity;
/// a throwaway CA in memory serves (nothing is sent anywhere).
fn snapshot(view: meshgate_config::view::ProxyView, id: &SpiffeId) -> anyhow::Result<Snapshot> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
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
            resolver: Resolver::new(None)?,
            roots: DefaultRoots::load(&[])?,
            identity: Some(identity),
            endpoints: Default::default(),
        };
        anyhow::Ok(Snapshot::build(view, &ctx)?)
    })
}

/// What the proxy does, and the steps on the way.
struct Explained<'s> {
    snap: &'s Snapshot,
    clusters: &'s [ClusterView],
    input: &'s Input,
    id: &'s SpiffeId,
    /// On the way in to the workload (`--inbound`).
    inbound: bool,
    /// TLS the proxy terminated on the way.
    terminated: Option<&'static str>,
    /// How long the proxy waited on a silent client (`--silent`) before it
    /// took it for one of a server-first protocol.
    silence: Option<Duration>,
    outcome: Outcome<'s>,
    /// Each ALLOW rule and the field that keeps it from admitting this.
    why_denied: Vec<String>,
}

enum Outcome<'s> {
    Request(RequestPlan<'s>),
    Tcp(TcpPlan<'s>),
    Refused(Refusal),
    /// Mesh mutual TLS with no `--from`: the handshake needs a mesh
    /// certificate.
    NeedsMeshCertificate,
    /// Served as HTTP, but `tcp://` gave no request.
    ServedAsHttp,
    /// A silent client (`--silent`) where the proxy waits for a first
    /// byte to tell the protocol: closed when the wait times out.
    WaitsForFirstByte,
}

/// Asks the plan as the proxy's listener does, one step at a time.
fn explain<'s>(
    snap: &'s Snapshot,
    clusters: &'s [ClusterView],
    input: &'s Input,
    id: &'s SpiffeId,
    inbound: bool,
) -> Explained<'s> {
    let here = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), input.port);
    let remote = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2)), 40000);
    let mut conn = Conn::accepted(remote, here, input.port);
    conn.inbound = inbound;
    if snap.role == Role::Sidecar {
        let to = input
            .destination
            .filter(|_| !inbound)
            .map_or(here, |ip| SocketAddr::new(ip, input.port));
        conn.original_dst = Some(to);
    }
    // Mesh peers speak mutual TLS to a gateway, and to a sidecar on the
    // way in to its workload.
    let peer = input
        .from
        .clone()
        .filter(|_| snap.role == Role::Gateway || inbound)
        .map(|p| Arc::new(Peer::new(p, id.trust_domain())));
    let head = |scheme| RequestHead {
        view: RequestView {
            authority: &input.authority,
            method: &input.method,
            scheme,
            path: &input.path,
            query: &input.query,
            headers: &input.headers,
        },
        uri_port: None,
    };
    let (plain, secure) = (head("http"), head("https"));
    // What the client sends first: a ClientHello for https:// and for a
    // mesh peer's mutual TLS, else plaintext.
    let sni = (input.scheme == Scheme::Https).then_some(input.host.as_str());
    let mut tls_first = input.scheme == Scheme::Https || peer.is_some();
    let mut terminated = None;
    let mut silence = None;
    let outcome = loop {
        let peeked = match (tls_first, input.scheme, &conn.tls) {
            (true, _, _) => Peeked::ClientHello { sni },
            (false, Scheme::Tcp, _) if input.silent => match silence {
                Some(_) => Peeked::Silent,
                None => Peeked::Nothing,
            },
            (false, Scheme::Tcp, _) => Peeked::FirstByte { tls: false },
            (false, _, Some(_)) => Peeked::Request(&secure),
            (false, _, None) => Peeked::Request(&plain),
        };
        match plan(snap, &conn, peeked, 0.0) {
            Plan::Request(p) => break Outcome::Request(p),
            Plan::Tcp(p) => break Outcome::Tcp(p),
            Plan::Close(r) => break Outcome::Refused(r),
            // The listener waits this long, then takes the silence for
            // plaintext and asks the plan again (connection.rs).
            Plan::Read(Need::FirstByteOrSilence(wait)) if input.silent && silence.is_none() => {
                silence = Some(wait);
            }
            Plan::Read(_) if input.silent => break Outcome::WaitsForFirstByte,
            Plan::ServeHttp | Plan::Read(_) => break Outcome::ServedAsHttp,
            Plan::Terminate(how) => {
                let mesh = matches!(how, Termination::Mesh);
                if mesh && peer.is_none() {
                    break Outcome::NeedsMeshCertificate;
                }
                terminated = Some(if mesh {
                    "mesh mutual TLS (ISTIO_MUTUAL)"
                } else {
                    "the Gateway server's TLS"
                });
                conn.tls = Some(Terminated {
                    sni: sni.map(Arc::from),
                    peer: peer.clone(),
                    client_cert: None,
                });
                tls_first = false;
            }
        }
    };
    // A request no ALLOW rule admits: which rule fails on which field.
    let denied_by_none = match &outcome {
        Outcome::Request(p) => matches!(&p.authz, Decision::Deny { policy } if policy == "none"),
        Outcome::Tcp(p) => matches!(&p.authz, Decision::Deny { policy } if policy == "none"),
        _ => false,
    };
    let why_denied = if denied_by_none {
        let head = match (&outcome, &conn.tls) {
            (Outcome::Tcp(_), _) => None,
            (_, Some(_)) => Some(&secure),
            (_, None) => Some(&plain),
        };
        meshgate_proxy::plan::why_denied(snap, &conn, head)
    } else {
        Vec::new()
    };
    Explained {
        snap,
        clusters,
        input,
        id,
        inbound,
        terminated,
        silence,
        outcome,
        why_denied,
    }
}

/// The machine-readable result: what a test or a CI job compares with
/// what the proxy did.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct ResultJson {
    /// `forward`, `redirect`, `direct-response`, `local-reply`, `connect`
    /// (HTTP); `forward`, `original-destination`, `close` (TCP); `refused`.
    action: &'static str,
    /// The status the proxy answers with itself (none when forwarded).
    status: Option<u16>,
    /// The response flags the proxy reports when it ends the request or
    /// connection itself.
    response_flags: Option<String>,
    route: Option<String>,
    cluster: Option<String>,
    summary: String,
}

impl Explained<'_> {
    fn kind(&self) -> &'static str {
        match self.snap.role {
            Role::Gateway => "gateway",
            Role::Sidecar => "sidecar",
        }
    }

    fn listener(&self) -> String {
        let port = self.input.port;
        if self.inbound {
            return self.inbound_listener();
        }
        let listener = match &self.outcome {
            Outcome::Request(p) => p.listener,
            Outcome::Tcp(p) => p.listener,
            _ => self.snap.listener(port),
        };
        match (listener, self.snap.role) {
            (Some(l), _) => l.origin.clone(),
            (None, Role::Gateway) => format!("no Gateway server on port {port}"),
            (None, Role::Sidecar) => format!("no mesh listener for port {port}"),
        }
    }

    /// The workload's port the connection arrives on, what it speaks and
    /// the mutual TLS it takes.
    fn inbound_listener(&self) -> String {
        let port = self.input.port;
        let view = &self.snap.view;
        let mode = self
            .snap
            .inbound_mtls_ports
            .get(&port)
            .copied()
            .unwrap_or(self.snap.inbound_mtls);
        let mtls = match mode {
            MtlsMode::Unset => "PERMISSIVE".to_owned(),
            m => m.as_str().to_owned(),
        };
        let mtls = format!("mTLS {mtls} ({})", view.peer_authentication.source);
        match view.inbound_ports.get(&u32::from(port)) {
            Some(p) => {
                let service = p
                    .service
                    .as_deref()
                    .map_or_else(String::new, |s| format!(" of {s}"));
                format!("inbound port {port}, {}{service}; {mtls}", p.protocol)
            }
            None => {
                let served: Vec<String> = view
                    .inbound_ports
                    .iter()
                    .map(|(n, p)| format!("{n} ({})", p.protocol))
                    .collect();
                let served = if served.is_empty() {
                    "none".to_owned()
                } else {
                    served.join(", ")
                };
                format!(
                    "inbound port {port}: no Service or Sidecar ingress names it, its bytes are opaque TCP (the workload's ports: {served}); {mtls}"
                )
            }
        }
    }

    /// The route line and the destinations it lists.
    fn route(&self) -> (String, Vec<String>) {
        match &self.outcome {
            Outcome::Request(p) => self.http_route(p),
            Outcome::Tcp(p) => match (p.route, p.reason) {
                (Some(r), _) if p.is_tcp_route() => (
                    format!(
                        "tcp route {} (destination port {})",
                        r.name, self.input.port
                    ),
                    r.destinations
                        .iter()
                        .map(|w| self.destination(w.cluster, w.weight))
                        .collect(),
                ),
                (Some(r), _) => (
                    format!("tls route {} (SNI {})", r.name, self.input.host),
                    r.destinations
                        .iter()
                        .map(|w| self.destination(w.cluster, w.weight))
                        .collect(),
                ),
                (None, TcpReason::Inbound | TcpReason::Denied) if self.inbound => (
                    format!("to the workload's port {}", self.input.port),
                    Vec::new(),
                ),
                (None, TcpReason::RegisteredPort) => (
                    format!("port {} of a registered TCP service", self.input.port),
                    Vec::new(),
                ),
                (None, _) if self.input.scheme == Scheme::Https => (
                    format!("no tls route for SNI {}", self.input.host),
                    Vec::new(),
                ),
                (None, _) => (
                    format!("no route for TCP to port {}", self.input.port),
                    Vec::new(),
                ),
            },
            _ => ("-".to_owned(), Vec::new()),
        }
    }

    fn http_route(&self, p: &RequestPlan<'_>) -> (String, Vec<String>) {
        let authority = &self.input.authority;
        match &p.routed {
            Routed::Matched { route, .. } if self.inbound => {
                let dests = match &route.action {
                    Action::Forward(ws) => ws
                        .iter()
                        .map(|w| self.destination(w.cluster, w.weight))
                        .collect(),
                    _ => Vec::new(),
                };
                (
                    format!("inbound route {} to the workload", route.name),
                    dests,
                )
            }
            Routed::Matched { route, matched } => {
                let vs = match (&route.virtual_service, &*route.name) {
                    (Some(v), _) => format!("VirtualService {v}"),
                    (None, "allow_any") => "outbound traffic policy ALLOW_ANY".to_owned(),
                    (None, _) => {
                        "default route of the service (no VirtualService for this host and port)"
                            .to_owned()
                    }
                };
                let which = matched.map_or_else(String::new, |m| format!(", match #{m}"));
                let dests = match &route.action {
                    Action::Forward(ws) => ws
                        .iter()
                        .map(|w| self.destination(w.cluster, w.weight))
                        .collect(),
                    Action::Redirect(r) => vec![format!("redirect ({})", r.code)],
                    Action::Direct { status, .. } => vec![format!("direct response ({status})")],
                };
                (format!("{vs}, rule {}{which}", route.name), dests)
            }
            Routed::NoRoute => (
                format!("a virtual host for {authority} exists, but no rule matches"),
                Vec::new(),
            ),
            Routed::NoVirtualHost => (format!("no route for host {authority}"), Vec::new()),
        }
    }

    fn destination(&self, cluster: usize, weight: u32) -> String {
        let name = self.snap.cluster_name(cluster).map_or("?", |n| &**n);
        format!("{name} (weight {weight})")
    }

    /// The cluster picked, as the view describes it.
    fn cluster(&self) -> Option<&ClusterView> {
        let name = self.cluster_name()?;
        self.clusters.iter().find(|c| c.name == name)
    }

    /// The exit code for what the proxy does (README, "Exit codes"): 0 sent
    /// on; 80 denied by policy; 81 blocked by REGISTRY_ONLY; 82 no route
    /// or nothing listening; 83 any other answer of the proxy's own.
    fn exit_code(&self) -> u8 {
        let r = self.result();
        let blocked = self.snap.view.outbound_traffic_policy.mode
            == meshgate_config::model::networking::OutboundMode::RegistryOnly;
        if matches!(&self.outcome, Outcome::Tcp(p) if p.reason == TcpReason::Denied) {
            return crate::EXIT_DENIED;
        }
        match (r.action, r.status) {
            (
                "forward" | "original-destination" | "redirect" | "direct-response" | "connect",
                _,
            ) => 0,
            ("local-reply", Some(403)) => crate::EXIT_DENIED,
            ("local-reply", Some(502)) if blocked => crate::EXIT_BLOCKED,
            ("close", _) if blocked && r.summary.contains("REGISTRY_ONLY") => crate::EXIT_BLOCKED,
            ("local-reply", Some(404)) | ("refused", _) => crate::EXIT_NO_ROUTE,
            ("local-reply", Some(503)) if r.response_flags.as_deref() == Some("NC") => {
                crate::EXIT_NO_ROUTE
            }
            _ => crate::EXIT_LOCAL_REPLY,
        }
    }

    /// The mesh gateway this request goes to next, and the port it hears
    /// it on: a forwarded request whose cluster is one gateway workload.
    fn next_gateway(&self) -> Option<(String, u16)> {
        if self.result().action != "forward" {
            return None;
        }
        let c = self.cluster()?;
        let w = c.destination_workload.as_ref()?;
        (w.proxy == ProxyKind::Gateway).then(|| {
            (
                format!("{}/{}", w.namespace, w.name),
                u16::try_from(c.port).unwrap_or(80),
            )
        })
    }

    fn cluster_name(&self) -> Option<&str> {
        match &self.outcome {
            Outcome::Request(p) => p.cluster_name(self.snap),
            Outcome::Tcp(p) => p.cluster_name(),
            _ => None,
        }
    }

    /// A host the registry has, on a port it declares HTTP: TLS sent there
    /// is not routed (the usual cause: `protocol: HTTP` on port 443).
    fn declared_http_hint(&self) -> String {
        let host = &self.input.host;
        let port = u32::from(self.input.port);
        let declared_http = self.snap.view.listeners.iter().any(|l| {
            l.port == port
                && l.protocol.is_http()
                && l.hosts.iter().any(|h| h.eq_ignore_ascii_case(host))
        });
        if declared_http {
            format!(
                "; {host}:{port} is registered, but its port is declared HTTP: TLS to it is not routed (declare the port TLS or HTTPS to pass TLS through, or send plain HTTP and let a gateway originate TLS)"
            )
        } else {
            String::new()
        }
    }

    fn authz(&self) -> Option<String> {
        let decision = match &self.outcome {
            Outcome::Request(p) => &p.authz,
            Outcome::Tcp(p) if p.route.is_some() || self.inbound => &p.authz,
            _ => return None,
        };
        let policies = if self.inbound {
            &self.snap.inbound_policies
        } else {
            &self.snap.policies
        };
        if self.snap.role == Role::Sidecar && !self.inbound && policies.is_empty() {
            return None;
        }
        Some(match decision {
            Decision::Allow { .. } if policies.is_empty() => {
                "allowed: no AuthorizationPolicy applies".to_owned()
            }
            Decision::Allow { audited } => format!(
                "allowed by the ALLOW policies ({}){}",
                policies
                    .iter()
                    .map(|p| format!("{}/{}", p.namespace, p.name))
                    .collect::<Vec<_>>()
                    .join(", "),
                if *audited { ", audited" } else { "" }
            ),
            Decision::Deny { policy } if policy == "none" => format!(
                "denied: ALLOW policies apply and no rule matches ({})",
                self.why_denied.join("; ")
            ),
            Decision::Deny { policy } => format!("denied by {policy}"),
        })
    }

    fn result(&self) -> ResultJson {
        let outbound = &self.snap.view.outbound_traffic_policy.source;
        let (action, status, flags, route, summary) = match &self.outcome {
            Outcome::Request(p) => {
                let (action, status, flags, summary) = self.request_result(p);
                (
                    action,
                    status,
                    flags,
                    p.route_name().map(str::to_owned),
                    summary,
                )
            }
            Outcome::Tcp(p) => {
                let (action, flags, summary) = match p.action {
                    TcpAction::Forward if p.reason == TcpReason::TcpRoute => (
                        "forward",
                        None,
                        format!(
                            "bytes sent on to {} as they come (opaque TCP)",
                            p.cluster_name().unwrap_or("?")
                        ),
                    ),
                    TcpAction::Forward => (
                        "forward",
                        None,
                        format!(
                            "passed through to {}: the session is the client's own, the proxy reads only SNI",
                            p.cluster_name().unwrap_or("?")
                        ),
                    ),
                    TcpAction::OriginalDst if p.reason == TcpReason::Inbound => (
                        "forward",
                        None,
                        format!(
                            "bytes sent on to the workload's port {} as they come (opaque TCP)",
                            self.input.port
                        ),
                    ),
                    TcpAction::OriginalDst => (
                        "original-destination",
                        None,
                        format!(
                            "passed through to the original destination (PassthroughCluster): {}",
                            p.reason
                        ),
                    ),
                    TcpAction::Close(flags) => (
                        "close",
                        Some(flags.to_string()),
                        match p.reason {
                            TcpReason::BlackHole if self.input.scheme == Scheme::Https => format!(
                                "connection closed: outbound traffic policy REGISTRY_ONLY ({outbound}) and no route for SNI {} (BlackHoleCluster){}",
                                self.input.host,
                                self.declared_http_hint()
                            ),
                            TcpReason::BlackHole => format!(
                                "connection closed: outbound traffic policy REGISTRY_ONLY ({outbound}) and no route for port {} (BlackHoleCluster)",
                                self.input.port
                            ),
                            reason => format!("connection closed, response flag {flags}: {reason}"),
                        },
                    ),
                };
                let route = p.route.map(|r| r.name.to_string());
                (action, None, flags, route, summary)
            }
            Outcome::Refused(Refusal::NoListener(port)) => (
                "refused",
                None,
                None,
                None,
                format!("connection refused: no Gateway server listens on port {port}"),
            ),
            Outcome::Refused(r) => (
                "refused",
                None,
                None,
                None,
                format!("connection closed: {r}"),
            ),
            Outcome::NeedsMeshCertificate => (
                "refused",
                None,
                None,
                None,
                "mutual TLS with mesh certificates: give the caller's identity with --from"
                    .to_owned(),
            ),
            Outcome::ServedAsHttp => (
                "served-as-http",
                None,
                None,
                None,
                "served as HTTP: explain an http:// URL to see the request's path".to_owned(),
            ),
            Outcome::WaitsForFirstByte => (
                "close",
                None,
                None,
                None,
                format!(
                    "connection closed after {} s: the proxy waits for the client's first byte to tell its protocol (Envoy's listener filter timeout), and a server-first client sends none; declare the port TCP (`protocol: TCP`) for such protocols",
                    Timeouts::default().first_byte.as_secs()
                ),
            ),
        };
        ResultJson {
            action,
            status,
            response_flags: flags,
            route,
            cluster: self.cluster_name().map(str::to_owned),
            summary,
        }
    }

    fn request_result(
        &self,
        p: &RequestPlan<'_>,
    ) -> (&'static str, Option<u16>, Option<String>, String) {
        match &p.action {
            RequestAction::Forward { cluster, .. } => (
                "forward",
                None,
                None,
                format!("forwarded to {}", cluster.cluster.name()),
            ),
            RequestAction::Redirect { redirect, .. } => (
                "redirect",
                Some(redirect.code),
                Some("-".to_owned()),
                format!("{} redirect", redirect.code),
            ),
            RequestAction::Direct { status, .. } => (
                "direct-response",
                Some(*status),
                Some("-".to_owned()),
                format!("{status} direct response"),
            ),
            RequestAction::CorsPreflight(_) => (
                "cors-preflight",
                Some(200),
                Some("-".to_owned()),
                "200, a CORS preflight the route's corsPolicy answers".to_owned(),
            ),
            RequestAction::Connect { host, port } => (
                "connect",
                Some(200),
                None,
                format!("200, then a tunnel planned as a connection to {host}:{port}"),
            ),
            RequestAction::Local(l) => (
                "local-reply",
                Some(l.status.as_u16()),
                Some(l.flags.to_string()),
                self.local_summary(l),
            ),
        }
    }

    fn local_summary(&self, l: &Local) -> String {
        let status = l.status.as_u16();
        match (status, &*l.details) {
            (403, _) => "403 RBAC: access denied".to_owned(),
            (502, _) => format!(
                "502: outbound traffic policy REGISTRY_ONLY ({}) and {} is not in the registry (route block_all)",
                self.snap.view.outbound_traffic_policy.source, self.input.authority
            ),
            (404, _) => "404, response flag NR (no route)".to_owned(),
            (503, "cluster_not_found") => {
                "503, response flag NC (the route's destination is not in the registry)".to_owned()
            }
            (_, details) => format!("{status}, response flag {} ({details})", l.flags),
        }
    }

    /// The path routing and authorization saw, when normalization changed
    /// it.
    fn normalized_path(&self) -> Option<&str> {
        match &self.outcome {
            Outcome::Request(p) => p.normalized_path.as_deref(),
            _ => None,
        }
    }

    fn json(&self, args: &ExplainArgs) -> serde_json::Value {
        let (route, destinations) = self.route();
        serde_json::json!({
            "normalizedPath": self.normalized_path(),
            "request": {"method": args.method, "url": args.url, "from": args.from},
            "proxy": {"workload": args.workload, "kind": self.kind(), "identity": self.id.to_string(), "direction": if self.inbound { "inbound" } else { "outbound" }},
            "listener": self.listener(),
            "tls": self.terminated,
            "silenceTakenAfterMs": self.silence.map(|d| d.as_millis()),
            "route": route,
            "destinations": destinations,
            "cluster": self.cluster(),
            "authorization": self.authz(),
            "result": self.result(),
        })
    }

    fn text(&self, args: &ExplainArgs) -> String {
        let mut out = String::new();
        let from = args
            .from
            .as_deref()
            .map_or_else(String::new, |f| format!(" from {f} (mutual TLS)"));
        let _ = writeln!(out, "request    {} {}{from}", args.method, args.url);
        let _ = writeln!(
            out,
            "proxy      {} of {} ({}){}",
            self.kind(),
            args.workload,
            self.id,
            if self.inbound { ", on the way in" } else { "" }
        );
        let _ = writeln!(out, "1 listener {}", self.listener());
        if let Some(wait) = self.silence {
            let _ = writeln!(
                out,
                "           nothing from the client in {}: a server-first protocol, taken for plaintext (protocol detection timeout)",
                seconds_or_ms(wait)
            );
        }
        if let Some(tls) = self.terminated {
            let _ = writeln!(out, "           TLS terminated: {tls}");
        }
        if let Some(p) = self.normalized_path() {
            let mode = self.snap.view.path_normalization.as_str();
            let _ = writeln!(
                out,
                "           path normalized to {p} (pathNormalization {mode})"
            );
        }
        let (route, destinations) = self.route();
        let _ = writeln!(out, "2 route    {route}");
        for d in &destinations {
            let _ = writeln!(out, "           -> {d}");
        }
        if let Some(c) = self.cluster() {
            let _ = writeln!(out, "3 cluster  {}", cluster_line(c));
        } else if let Some(name) = self.cluster_name() {
            let _ = writeln!(out, "3 cluster  {name}");
        }
        if let Some(authz) = self.authz() {
            let _ = writeln!(out, "4 authz    {authz}");
        }
        let _ = writeln!(out, "result     {}", self.result().summary);
        out
    }
}

/// `1 s`, `1.5 s` or `100 ms`, as a timeout is usually written.
fn seconds_or_ms(d: Duration) -> String {
    if d.as_millis() >= 1000 {
        format!("{} s", d.as_secs_f64())
    } else {
        format!("{} ms", d.as_millis())
    }
}

fn cluster_line(c: &ClusterView) -> String {
    if !c.in_registry {
        return format!("{}: not in the registry", c.name);
    }
    let tls = if c.tls.auto {
        "ISTIO_MUTUAL (auto mTLS)".to_owned()
    } else {
        c.tls.mode.as_str().to_owned()
    };
    let sni = if c.tls.sni.is_empty() {
        String::new()
    } else {
        format!(", SNI {}", c.tls.sni)
    };
    let expects = if c.tls.expected_identities.is_empty() {
        String::new()
    } else {
        format!(", expects {}", c.tls.expected_identities.join(" or "))
    };
    let dr = c
        .destination_rule
        .as_deref()
        .map_or_else(String::new, |dr| format!(", DestinationRule {dr}"));
    format!(
        "{}: resolution {}, TLS {tls}{sni}{expects}{dr}",
        c.name, c.resolution
    )
}
