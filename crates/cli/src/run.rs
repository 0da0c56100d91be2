//! `meshgate gateway`: run the proxy of one gateway workload from the config.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use meshgate_config::model::{Config, Kind, Meta, Resource, SourceRef, WorkloadTemplate};
use meshgate_config::{Level, MeshSettings, fingerprint, load_paths, registry, view};
use meshgate_identity::{CertificateAuthority, Source, SpiffeId, WorkloadIdentity};
use meshgate_proxy::admin::{self, AdminRole, Readiness};
use meshgate_proxy::app::{App, Options};
use meshgate_proxy::proxy::Proxy;
use meshgate_proxy::sidecar::OriginalDst;
use meshgate_proxy::snapshot::{BuildContext, Snapshot};
use meshgate_proxy::upstream::dns::Resolver;
use meshgate_proxy::upstream::tls::DefaultRoots;
use meshgate_telemetry::{AccessLog, AccessLogFormat, Metrics};

use crate::digest::Digest;

/// Where the proxy's certificate comes from.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct IdentityArgs {
    /// Issue the certificate from the CA in this folder (from `meshgate ca
    /// init`), in process: the all-in-one local setup.
    #[arg(long, value_name = "DIR", conflicts_with_all = ["cert_dir", "ca_addr"])]
    pub ca_dir: Option<PathBuf>,
    /// Read cert-chain.pem, key.pem, root-cert.pem from this folder (Istio's
    /// mounted layout), re-read when they change.
    #[arg(long, value_name = "DIR", conflicts_with = "ca_addr")]
    pub cert_dir: Option<PathBuf>,
    /// Request the certificate from `meshgate ca serve` at this address.
    #[arg(long, value_name = "HOST:PORT", requires_all = ["ca_token_file", "ca_root_cert"])]
    pub ca_addr: Option<String>,
    /// Bootstrap token for --ca-addr.
    #[arg(long, value_name = "FILE")]
    pub ca_token_file: Option<PathBuf>,
    /// Root certificate that --ca-addr's server must chain to.
    #[arg(long, value_name = "FILE")]
    pub ca_root_cert: Option<PathBuf>,
    /// How --ca-addr speaks: meshgate's CA API, or Istio's gRPC
    /// IstioCertificateService (istiod, to join an Istio mesh's trust).
    #[arg(long, value_enum, default_value = "meshgate", value_name = "API")]
    pub ca_protocol: CaProtocol,
    /// With --ca-protocol istio: the name istiod's certificate must carry.
    #[arg(long, default_value = meshgate_identity::istioca::ISTIOD_SERVER_NAME, value_name = "DNS")]
    pub ca_server_name: String,
    /// Certificate lifetime to ask for (renewed at about half).
    #[arg(long, default_value = "24h", value_name = "DURATION")]
    pub cert_ttl: String,
}

impl IdentityArgs {
    pub(crate) async fn start(&self, id: SpiffeId) -> anyhow::Result<Arc<WorkloadIdentity>> {
        let ttl = meshgate_config::model::Duration::parse(&self.cert_ttl)
            .map_err(anyhow::Error::msg)
            .context("--cert-ttl")?
            .as_std();
        let source = if let Some(dir) = &self.ca_dir {
            Source::InProcess {
                ca: Arc::new(CertificateAuthority::load(dir)?),
                ttl,
            }
        } else if let Some(dir) = &self.cert_dir {
            Source::Files {
                dir: dir.clone(),
                poll: Duration::from_secs(2),
            }
        } else if let Some(addr) = &self.ca_addr {
            let token_file = self.ca_token_file.clone().context("--ca-token-file")?;
            let root_cert = self.ca_root_cert.clone().context("--ca-root-cert")?;
            match self.ca_protocol {
                CaProtocol::Meshgate => Source::CaServer {
                    addr: addr.clone(),
                    token_file,
                    root_cert,
                    ttl,
                },
                CaProtocol::Istio => Source::IstioCa {
                    addr: addr.clone(),
                    server_name: self.ca_server_name.clone(),
                    token_file,
                    root_cert,
                    ttl,
                },
            }
        } else {
            bail!(
                "no identity source: give --ca-dir, --cert-dir, or --ca-addr with --ca-token-file and --ca-root-cert"
            );
        };
        Ok(WorkloadIdentity::start(id, source).await?)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum CaProtocol {
    Meshgate,
    Istio,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum LogFormat {
    Text,
    Json,
    Off,
}

/// Flags shared by the proxies.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct ProxyArgs {
    /// YAML files or folders with the mesh config.
    #[arg(
        short,
        long = "config",
        required_unless_present = "control_plane",
        value_name = "PATH"
    )]
    pub config: Vec<PathBuf>,
    /// Take the config from `meshgate control` at this address instead of
    /// files (its port 15012): a stream over mutual TLS with this proxy's
    /// certificate, applied live; the last good config stays while the
    /// control plane is away. The workload is the Pod NAMESPACE/NAME; its
    /// identity is --service-account in that namespace.
    #[arg(long, value_name = "HOST:PORT", conflicts_with_all = ["config", "labels"])]
    pub control_plane: Option<String>,
    /// With --control-plane: how long to wait for the first good config.
    #[arg(long, default_value = "60s", value_name = "DURATION")]
    pub control_plane_wait: String,
    /// The workload, as NAMESPACE/NAME of its Deployment or Pod.
    #[arg(short, long, value_name = "NS/NAME")]
    pub workload: String,
    /// Pod labels, for a workload the config does not describe (k=v,k=v).
    #[arg(long, value_name = "K=V,...")]
    pub labels: Option<String>,
    /// Service account, for a workload the config does not describe.
    #[arg(long, default_value = "default")]
    pub service_account: String,
    #[command(flatten)]
    pub identity: IdentityArgs,
    /// DNS server for `resolution: DNS` (default: the system's resolver).
    #[arg(long, value_name = "IP:PORT")]
    pub dns_server: Option<SocketAddr>,
    /// Extra trusted roots for TLS origination when a DestinationRule has no
    /// caCertificates (added to the system's CA bundle).
    #[arg(long, value_name = "FILE")]
    pub extra_roots: Vec<PathBuf>,
    /// Static endpoints instead of DNS: lines of `host:port addr:port ...`.
    #[arg(long, value_name = "FILE")]
    pub endpoints: Option<PathBuf>,
    /// Address the traffic listeners bind.
    #[arg(long, default_value = "0.0.0.0")]
    pub bind_address: IpAddr,
    /// Bind a server port elsewhere: SERVER_PORT=BIND_PORT (0 = any free port).
    #[arg(long = "port", value_name = "PORT=BIND")]
    pub ports: Vec<String>,
    /// Address of the admin ports (health and metrics).
    #[arg(long, default_value = "0.0.0.0")]
    pub admin_address: IpAddr,
    /// Agent port: /stats/prometheus (merged) and /healthz/ready.
    #[arg(long, default_value_t = 15020)]
    pub admin_port: u16,
    /// Envoy's /stats/prometheus port.
    #[arg(long, default_value_t = 15090)]
    pub prometheus_port: u16,
    /// Readiness port: /healthz/ready.
    #[arg(long, default_value_t = 15021)]
    pub health_port: u16,
    /// Inspection port on 127.0.0.1 (Envoy's admin port): /config_dump,
    /// /clusters, /listeners, /certs, /server_info. Taken already, the
    /// proxy runs without it (and says so); 0 picks a free port.
    #[arg(long, default_value_t = 15000)]
    pub inspect_port: u16,
    /// Access log format (to stdout).
    #[arg(long, value_enum, default_value = "text")]
    pub access_log_format: LogFormat,
    /// Once ready, write the bound addresses here as JSON (rewritten when a
    /// reload changes the listeners).
    #[arg(long, value_name = "FILE")]
    pub ready_file: Option<PathBuf>,
    /// Worker threads (Istio's proxy concurrency); default: 2 for a sidecar,
    /// one per core for a gateway.
    #[arg(long, value_name = "N")]
    pub concurrency: Option<usize>,
    /// Downstream connections open at once, at most (Envoy's overload
    /// manager global_downstream_max_connections); beyond it a new
    /// connection is closed unread and counted as
    /// downstream_global_cx_overflow. Default: no limit, as Istio's.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub max_connections: Option<u64>,
    /// On SIGTERM: how long requests in flight may take to finish (Istio's
    /// terminationDrainDuration). The proxy exits as soon as none are left.
    #[arg(long, default_value = "5s", value_name = "DURATION")]
    pub drain_duration: String,
    #[command(flatten)]
    pub mesh: crate::MeshArgs,
    /// How often to look for config changes and apply them live (0s: never).
    #[arg(long, default_value = "2s", value_name = "DURATION")]
    pub reload_interval: String,
}

fn parse_labels(s: &str) -> anyhow::Result<meshgate_config::model::Labels> {
    s.split(',')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            kv.split_once('=')
                .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
                .with_context(|| format!("--labels: \"{kv}\" is not key=value"))
        })
        .collect()
}

/// Where Services' pods are: their EndpointSlices in the config, then the
/// --endpoints file over them.
fn endpoints_for(
    config: &Config,
    mesh: &MeshSettings,
    args: &ProxyArgs,
) -> anyhow::Result<HashMap<String, Vec<SocketAddr>>> {
    let mut endpoints = registry::service_endpoints(config, mesh);
    if let Some(p) = &args.endpoints {
        endpoints.extend(parse_endpoints(p)?);
    }
    Ok(endpoints)
}

fn parse_endpoints(path: &PathBuf) -> anyhow::Result<HashMap<String, Vec<SocketAddr>>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut out = HashMap::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let mut parts = line.split_whitespace();
        let key = parts.next().unwrap_or_default().to_owned();
        let addrs = parts
            .map(|a| a.parse::<SocketAddr>())
            .collect::<Result<Vec<_>, _>>()
            .with_context(|| {
                format!(
                    "{}:{}: expected `host:port addr:port ...`",
                    path.display(),
                    i + 1
                )
            })?;
        if addrs.is_empty() {
            bail!("{}:{}: no addresses for {key}", path.display(), i + 1);
        }
        out.insert(key, addrs);
    }
    Ok(out)
}

fn port_overrides(ports: &[String]) -> anyhow::Result<HashMap<u16, u16>> {
    ports
        .iter()
        .map(|p| {
            let (a, b) = p
                .split_once('=')
                .with_context(|| format!("--port {p}: expected SERVER_PORT=BIND_PORT"))?;
            Ok((a.parse().context("--port")?, b.parse().context("--port")?))
        })
        .collect()
}

/// Loads the config; schema errors stop the proxy (never half-applied).
pub(crate) fn load_config(paths: &[PathBuf]) -> anyhow::Result<Config> {
    checked(load_paths(paths)?)
}

/// A config that has errors: nothing of it runs (exit 3).
#[derive(Debug, thiserror::Error)]
#[error("the config has errors:\n{}", .0.join("\n"))]
pub(crate) struct ConfigErrors(pub Vec<String>);

/// The config, unless a resource was refused; warnings are logged.
fn checked(loaded: meshgate_config::Loaded) -> anyhow::Result<Config> {
    let errors = loaded.error_messages();
    if !errors.is_empty() {
        return Err(ConfigErrors(errors).into());
    }
    for d in loaded
        .diagnostics
        .iter()
        .filter(|d| d.level != Level::Error)
    {
        tracing::warn!("{d}");
    }
    Ok(loaded.config)
}

/// Adds a workload the config does not describe, from flags.
fn add_flag_workload(
    config: &mut Config,
    workload: &str,
    labels: &str,
    sa: &str,
    gateway: bool,
) -> anyhow::Result<()> {
    let (ns, name) = workload
        .split_once('/')
        .context("--workload must be NAMESPACE/NAME")?;
    let mut annotations = meshgate_config::model::Labels::new();
    if gateway {
        annotations.insert("inject.istio.io/templates".into(), "gateway".into());
    } else {
        annotations.insert("sidecar.istio.io/inject".into(), "true".into());
    }
    let labels = parse_labels(labels)?;
    let pod = meshgate_config::model::kube::PodSpec {
        service_account_name: Some(sa.to_owned()),
        ..Default::default()
    };
    config.workloads.push(Resource {
        meta: Meta {
            kind: Kind::Pod,
            api_version: "v1".into(),
            name: name.to_owned(),
            namespace: ns.to_owned(),
            labels: labels.clone(),
            annotations: annotations.clone(),
            source: SourceRef {
                file: Arc::from("(command line)"),
                line: 0,
                node: Arc::new(meshgate_config::yaml::Node {
                    value: meshgate_config::yaml::Value::Null,
                    pos: Default::default(),
                }),
            },
        },
        spec: WorkloadTemplate {
            pod_labels: labels.clone(),
            pod_annotations: annotations,
            selector: labels,
            pod,
        },
    });
    Ok(())
}

/// Which proxy to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ProxyKind {
    Gateway,
    Sidecar,
}

/// Sidecar-only flags.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct SidecarArgs {
    /// Outbound capture listener (iptables redirects here).
    #[arg(long, default_value_t = 15001)]
    pub outbound_port: u16,
    /// Address of the outbound listener: loopback, where iptables redirects
    /// the workload's own connections.
    #[arg(long, default_value = "127.0.0.1")]
    pub outbound_address: IpAddr,
    /// Also serve connections made to the outbound listener itself as an
    /// explicit HTTP proxy (`curl -x`, `http_proxy`). Off: they are closed,
    /// as Istio closes connections to 15001 itself.
    #[arg(long)]
    pub explicit_proxy: bool,
    /// Inbound capture listener (`iptables --inbound-ports` redirects
    /// here, Istio's 15006): the workload's PeerAuthentication and
    /// AuthorizationPolicies on the way in. Off unless given.
    #[arg(long, value_name = "PORT")]
    pub inbound_port: Option<u16>,
    /// Address of the inbound listener: any, where iptables redirects
    /// connections from other pods.
    #[arg(long, default_value = "0.0.0.0")]
    pub inbound_address: IpAddr,
}

/// The identity a --control-plane proxy asks for: its service account in
/// its workload's namespace (the config that confirms it comes later).
fn flag_identity(args: &ProxyArgs, mesh: &MeshSettings) -> anyhow::Result<SpiffeId> {
    let (ns, _) = args
        .workload
        .split_once('/')
        .context("--workload must be NAMESPACE/NAME")?;
    Ok(SpiffeId::new(
        &mesh.trust_domain,
        ns,
        &args.service_account,
    )?)
}

/// A config pushed by the control plane: the same loader and the same rule
/// as files (schema errors refuse the whole version).
fn config_from_yaml(yaml: &str) -> anyhow::Result<Config> {
    let mut loaded = meshgate_config::Loaded::default();
    meshgate_config::load::load_str("control plane", yaml, &mut loaded)?;
    checked(loaded)
}

/// The config stream of a --control-plane proxy.
struct ControlSource {
    client: meshgate_control::client::ConfigClient,
    pushes: tokio::sync::mpsc::Receiver<meshgate_control::client::Version>,
}

impl ControlSource {
    /// Connects and waits (bounded by --control-plane-wait) for the first
    /// version that loads and names this proxy's workload with its identity.
    async fn start(
        args: &ProxyArgs,
        kind: ProxyKind,
        mesh: &MeshSettings,
        id: &SpiffeId,
        identity: &Arc<WorkloadIdentity>,
    ) -> anyhow::Result<(ControlSource, Prepared)> {
        let addr = args.control_plane.as_deref().context("--control-plane")?;
        let wait = duration_flag(&args.control_plane_wait, "--control-plane-wait")?;
        let client = meshgate_control::client::ConfigClient::new(addr, &args.workload, identity)?;
        let (tx, mut pushes) = tokio::sync::mpsc::channel(1);
        tokio::spawn(client.clone().run(tx));
        let first = async {
            loop {
                let next = pushes.recv().await.context("the config stream ended")?;
                let checked = config_from_yaml(&next.yaml).and_then(|config| {
                    let config = Prepared::new(config, mesh);
                    let got = workload_identity(&config, args, kind)?;
                    if got != *id {
                        bail!(
                            "the control plane says {} runs as {got}, not {id}",
                            args.workload
                        );
                    }
                    Ok(config)
                });
                match checked {
                    Ok(config) => {
                        let _ = client.report(next.version, None).await;
                        tracing::info!(
                            version = next.version,
                            "first config from the control plane"
                        );
                        return Ok::<_, anyhow::Error>(config);
                    }
                    Err(e) => {
                        tracing::error!(
                            version = next.version,
                            error = format!("{e:#}"),
                            "config refused"
                        );
                        let _ = client.report(next.version, Some(format!("{e:#}"))).await;
                    }
                }
            }
        };
        let config = tokio::time::timeout(wait, first).await.map_err(|_| {
            anyhow::anyhow!(
                "no usable config from the control plane at {addr} within {}",
                args.control_plane_wait
            )
        })??;
        Ok((ControlSource { client, pushes }, config))
    }
}

/// A loaded config with its service registry, built once per load: the
/// workload check, the identity and the view all read it (at 10,000 hosts
/// each build is a noticeable part of a start or a reload).
struct Prepared {
    config: Config,
    registry: registry::Registry,
}

impl Prepared {
    fn new(config: Config, mesh: &MeshSettings) -> Prepared {
        let registry = registry::build(&config, mesh);
        Prepared { config, registry }
    }

    /// The proxy's view of its workload.
    fn view(&self, mesh: &MeshSettings, workload: &str) -> anyhow::Result<view::ProxyView> {
        Ok(view::build_with(
            &self.config,
            &self.registry,
            mesh,
            workload,
        )?)
    }
}

/// Loads the config and adds the workload from flags when the config does
/// not describe it. Used at start and on every reload.
fn prepare_config(
    args: &ProxyArgs,
    kind: ProxyKind,
    mesh: &MeshSettings,
) -> anyhow::Result<Prepared> {
    let prepared = Prepared::new(load_config(&args.config)?, mesh);
    if view::find_workload(&prepared.registry, &args.workload).is_ok() {
        return Ok(prepared);
    }
    let Some(labels) = &args.labels else {
        bail!(
            "workload {} is not in the config; describe it with a Deployment, or pass --labels (and --service-account)",
            args.workload
        );
    };
    let mut config = prepared.config;
    add_flag_workload(
        &mut config,
        &args.workload,
        labels,
        &args.service_account,
        kind == ProxyKind::Gateway,
    )?;
    // Rare (a workload described by flags): the registry is built again.
    Ok(Prepared::new(config, mesh))
}

/// Checks the workload runs the kind of proxy asked for; returns its identity.
fn workload_identity(
    prepared: &Prepared,
    args: &ProxyArgs,
    kind: ProxyKind,
) -> anyhow::Result<SpiffeId> {
    let w = view::find_workload(&prepared.registry, &args.workload)?;
    match (kind, w.proxy) {
        (ProxyKind::Gateway, registry::ProxyKind::Gateway)
        | (ProxyKind::Sidecar, registry::ProxyKind::Sidecar) => {}
        (ProxyKind::Gateway, _) => bail!(
            "{} is not a gateway workload (no inject.istio.io/templates: gateway, and more than an istio-proxy container); use `meshgate sidecar` for injected workloads",
            args.workload
        ),
        (ProxyKind::Sidecar, registry::ProxyKind::Gateway) => {
            bail!(
                "{} is a gateway workload; use `meshgate gateway`",
                args.workload
            )
        }
        (ProxyKind::Sidecar, _) => bail!(
            "{} has no sidecar injected (annotate the pod template with sidecar.istio.io/inject: \"true\" or label its namespace istio-injection=enabled)",
            args.workload
        ),
    }
    Ok(w.spiffe_id.parse()?)
}

pub(crate) fn run(
    args: &ProxyArgs,
    kind: ProxyKind,
    sidecar: Option<&SidecarArgs>,
) -> anyhow::Result<ExitCode> {
    let mesh = args.mesh.load()?;
    // Taken before the config is read: a change while it loads is a change.
    let loaded = config_fingerprint(args);
    let config = match args.control_plane {
        None => Some(prepare_config(args, kind, &mesh)?),
        // From the control plane, once the proxy has its certificate.
        Some(_) => None,
    };
    let threads = args.concurrency.unwrap_or(match kind {
        ProxyKind::Sidecar => 2,
        ProxyKind::Gateway => std::thread::available_parallelism().map_or(2, usize::from),
    });
    // One thread: no work stealing and no cross-thread wake-ups, the
    // cheapest per request (like one nginx worker).
    let mut builder = if threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(threads);
        b
    };
    let rt = builder
        .enable_all()
        .build()
        .context("starting the runtime")?;
    rt.block_on(proxy_main(args, kind, sidecar, config, mesh, loaded))
}

async fn proxy_main(
    args: &ProxyArgs,
    kind: ProxyKind,
    sidecar: Option<&SidecarArgs>,
    config: Option<Prepared>,
    mesh: MeshSettings,
    loaded: Result<u64, String>,
) -> anyhow::Result<ExitCode> {
    let readiness = Readiness::default();
    let cert_pending = readiness.register("certificate");
    let listeners_pending = readiness.register("listeners");

    let id = match &config {
        Some(config) => workload_identity(config, args, kind)?,
        None => flag_identity(args, &mesh)?,
    };
    let reload_interval = duration_flag(&args.reload_interval, "--reload-interval")?;
    let drain_duration = duration_flag(&args.drain_duration, "--drain-duration")?;
    let metrics = Arc::new(Metrics::new());

    // Admin ports first, so /healthz/ready answers (not ready) while we start.
    let admin_addrs = bind_admin(args, &metrics, &readiness).await?;

    let identity = args
        .identity
        .start(id.clone())
        .await
        .context("loading the workload certificate")?;
    cert_pending.done();
    readiness.watch_certificate(identity.clone());

    let mut control = None;
    let config = match config {
        Some(config) => config,
        None => {
            let (source, config) = ControlSource::start(args, kind, &mesh, &id, &identity).await?;
            control = Some(source);
            config
        }
    };

    let ctx = BuildContext {
        resolver: Resolver::new(args.dns_server)?,
        roots: DefaultRoots::load(&args.extra_roots)?,
        identity: Some(identity.clone()),
        endpoints: endpoints_for(&config.config, &mesh, args)?,
    };
    // The model (with every resource's parsed YAML, kept for line numbers)
    // is not needed once the view is made: freed while the snapshot is built.
    let view = config.view(&mesh, &args.workload)?;
    let digest = Digest::of(&config.config);
    let snapshot = build_in_own_heap(view, &ctx, config)?;
    if kind == ProxyKind::Gateway && snapshot.listeners.is_empty() {
        tracing::warn!(workload = %args.workload, "no Gateway selects this workload: nothing to listen on");
    }
    let access_log = Arc::new(AccessLog::stdout(match args.access_log_format {
        LogFormat::Text => AccessLogFormat::Text,
        LogFormat::Json => AccessLogFormat::Json,
        LogFormat::Off => AccessLogFormat::Off,
    }));
    let mut proxy = Proxy::new(snapshot, &identity, metrics, access_log)?;
    proxy.max_connections = args
        .max_connections
        .map(|n| usize::try_from(n).unwrap_or(usize::MAX));
    let proxy = Arc::new(proxy);
    let options = Options {
        bind: args.bind_address,
        port_overrides: port_overrides(&args.ports)?,
        any_free_port: false,
        outbound: sidecar.map_or(SocketAddr::new(args.bind_address, 15001), |s| {
            SocketAddr::new(s.outbound_address, s.outbound_port)
        }),
        original_dst: OriginalDst::Socket,
        explicit_proxy: sidecar.is_some_and(|s| s.explicit_proxy),
        inbound: sidecar.and_then(|s| {
            s.inbound_port
                .map(|port| SocketAddr::new(s.inbound_address, port))
        }),
    };
    let mut app = App::start(proxy, &options).await?;
    listeners_pending.done();
    let config_source = Arc::new(arc_swap::ArcSwap::from_pointee(match &control {
        Some(_) => "control plane".to_owned(),
        None => "files".to_owned(),
    }));
    let mut admin_addrs = admin_addrs;
    let inspect = meshgate_proxy::inspect::Inspect {
        proxy: app.proxy.clone(),
        identity: identity.clone(),
        workload: args.workload.clone(),
        started: std::time::Instant::now(),
        config: config_source.clone(),
        log_filter: Some(Arc::new(crate::log_filter)),
    };
    admin_addrs.extend(bind_inspect(args.inspect_port, inspect).await);
    let ready = ReadyFile {
        path: args.ready_file.clone(),
        id: id.clone(),
        admin: admin_addrs,
    };
    // Everything that only starting ran is done: its memory goes back
    // before anyone is told the proxy is ready.
    crate::memory::release_after_load();
    // The ready file is there by the time the log says so.
    ready.write(&app.addresses())?;
    let what = match kind {
        ProxyKind::Gateway => "egress gateway",
        ProxyKind::Sidecar => "sidecar",
    };
    tracing::info!(workload = %args.workload, identity = %id, "{what} running");
    let code_release = tokio::spawn(crate::memory::keep_code_to_working_set());
    let mut live = Live {
        args,
        kind,
        id: &id,
        mesh,
        ctx,
        ready: &ready,
        loaded,
        tls_loaded: tls_fingerprint(args, &app),
        digest,
        config_source,
    };
    // Config changes come from the files or from the control plane.
    let changes = async {
        match control.as_mut() {
            Some(control) => live.follow(control, &mut app).await,
            None => live.watch(reload_interval, &mut app).await,
        }
    };
    tokio::select! {
        () = crate::shutdown_signal() => {}
        () = changes => {}
    }
    code_release.abort();

    // Drain: report not ready, stop accepting, let requests in flight
    // finish, then exit.
    let _not_ready = readiness.register("draining");
    tracing::info!(
        connections = app.proxy.drain.open_connections(),
        limit = ?drain_duration,
        "draining"
    );
    let left = app.drain(drain_duration).await;
    tracing::info!(connections_cut = left, "shutting down");
    Ok(ExitCode::SUCCESS)
}

fn duration_flag(value: &str, flag: &str) -> anyhow::Result<Duration> {
    Ok(meshgate_config::model::Duration::parse(value)
        .map_err(anyhow::Error::msg)
        .context(flag.to_owned())?
        .as_std())
}

/// Binds the inspection port on loopback. It is a convenience: a port
/// already taken (two proxies on one host) leaves the proxy without it.
async fn bind_inspect(
    port: u16,
    inspect: meshgate_proxy::inspect::Inspect,
) -> Option<(AdminRole, SocketAddr)> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    match tokio::net::TcpListener::bind(addr).await {
        Ok(l) => {
            let local = l.local_addr().ok()?;
            tracing::info!(address = %local, "inspection port bound (/config_dump, /clusters, /certs)");
            tokio::spawn(meshgate_proxy::inspect::serve(l, inspect));
            Some((AdminRole::Inspect, local))
        }
        Err(e) => {
            tracing::warn!(address = %addr, error = %e, "inspection port not bound; give another with --inspect-port");
            None
        }
    }
}

/// Binds the agent (15020), Prometheus (15090) and health (15021) ports.
async fn bind_admin(
    args: &ProxyArgs,
    metrics: &Arc<Metrics>,
    readiness: &Readiness,
) -> anyhow::Result<Vec<(AdminRole, SocketAddr)>> {
    let admin_ports = [
        (args.admin_port, AdminRole::Agent),
        (args.prometheus_port, AdminRole::Prometheus),
        (args.health_port, AdminRole::Health),
    ];
    let mut out = Vec::new();
    for (port, role) in admin_ports {
        let addr = SocketAddr::new(args.admin_address, port);
        let l = admin::bind(addr)
            .await
            .with_context(|| format!("binding admin port {addr}"))?;
        let local = l.local_addr()?;
        tracing::info!(address = %local, ?role, "admin port bound");
        out.push((role, local));
        tokio::spawn(admin::serve(l, role, metrics.clone(), readiness.clone()));
    }
    Ok(out)
}

/// `--ready-file`: the identity and bound addresses, as JSON, written
/// atomically so a reader never sees half a file.
struct ReadyFile {
    path: Option<PathBuf>,
    id: SpiffeId,
    admin: Vec<(AdminRole, SocketAddr)>,
}

impl ReadyFile {
    fn write(&self, listeners: &[(u16, SocketAddr)]) -> anyhow::Result<()> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        let json = serde_json::json!({
            "identity": self.id.to_string(),
            "listeners": listeners.iter().map(|(p, a)| serde_json::json!({"port": p, "address": a.to_string()})).collect::<Vec<_>>(),
            "admin": self.admin.iter().map(|(r, a)| serde_json::json!({"role": format!("{r:?}").to_lowercase(), "address": a.to_string()})).collect::<Vec<_>>(),
        });
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(&json)?)
            .with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
        Ok(())
    }
}

/// What the config came from: the config files, the --endpoints file and
/// the MeshConfig all feed the snapshot.
fn config_fingerprint(args: &ProxyArgs) -> Result<u64, String> {
    let watched = args
        .config
        .iter()
        .chain(&args.endpoints)
        .chain(&args.mesh.mesh_config);
    fingerprint(&watched.collect::<Vec<_>>()).map_err(|e| e.to_string())
}

/// The certificate files the running config reads (DestinationRule and
/// Gateway server TLS) and `--extra-roots`: rotating one in place is a
/// change too.
fn tls_fingerprint(args: &ProxyArgs, app: &App) -> Result<u64, String> {
    let snap = app.proxy.state.load();
    let mut files: Vec<PathBuf> = args.extra_roots.clone();
    files.extend(snap.certificate_files.iter().map(PathBuf::from));
    files.sort();
    files.dedup();
    fingerprint(&files).map_err(|e| e.to_string())
}

/// Live reload: the config files are polled; a changed config is loaded,
/// checked and compiled completely before it is swapped in as one snapshot.
/// Any error leaves the running config in place. Requests in flight finish
/// on the snapshot they started with; unchanged clusters keep their pools.
struct Live<'a> {
    args: &'a ProxyArgs,
    kind: ProxyKind,
    id: &'a SpiffeId,
    mesh: MeshSettings,
    ctx: BuildContext,
    ready: &'a ReadyFile,
    /// The fingerprint of the files the running config came from.
    loaded: Result<u64, String>,
    /// The same for the certificate files it reads (and `--extra-roots`).
    tls_loaded: Result<u64, String>,
    /// What each resource of the running config says, to tell a reload's
    /// changes.
    digest: Digest,
    /// Where the running config came from, for the inspection port.
    config_source: Arc<arc_swap::ArcSwap<String>>,
}

impl Live<'_> {
    async fn watch(&mut self, interval: Duration, app: &mut App) {
        if interval.is_zero() {
            return std::future::pending().await;
        }
        loop {
            tokio::time::sleep(interval).await;
            let now = config_fingerprint(self.args);
            let tls_now = tls_fingerprint(self.args, app);
            if now == self.loaded && tls_now == self.tls_loaded {
                continue;
            }
            self.loaded = now;
            let started = std::time::Instant::now();
            let reloaded = self.reload(app).await;
            let elapsed_ms = started.elapsed().as_millis();
            // The files the config now in force reads.
            self.tls_loaded = tls_fingerprint(self.args, app);
            // The inspection port's /config_dump says what the last
            // reload did.
            let at = meshgate_telemetry::accesslog::format_time(std::time::SystemTime::now());
            match reloaded {
                Ok(changes) => {
                    tracing::info!(workload = %self.args.workload, %changes, elapsed_ms, "config reloaded");
                    self.config_source
                        .store(Arc::new(format!("files, reloaded at {at}: {changes}")));
                }
                Err(e) => {
                    tracing::error!(
                        error = format!("{e:#}"),
                        "config reload failed; the running config stays"
                    );
                    self.config_source.store(Arc::new(format!(
                        "files; the reload at {at} was refused ({e:#}); the running config stays"
                    )));
                }
            }
        }
    }

    /// Loads and applies the files again; says what changed.
    async fn reload(&mut self, app: &mut App) -> anyhow::Result<String> {
        // Off the proxy's threads: parsing a large config takes a while.
        self.mesh = self.args.mesh.load()?;
        let (args, kind, mesh) = (self.args.clone(), self.kind, self.mesh.clone());
        let (config, digest) = tokio::task::spawn_blocking(move || {
            prepare_config(&args, kind, &mesh).map(|c| {
                let d = Digest::of(&c.config);
                (c, d)
            })
        })
        .await
        .context("loading the config")??;
        self.apply(config, app).await?;
        release_after_load().await;
        let changes = self.digest.changes(&digest);
        self.digest = digest;
        Ok(changes)
    }

    /// Applies versions from the control plane as they come, and tells it
    /// which were applied and which refused.
    async fn follow(&mut self, control: &mut ControlSource, app: &mut App) {
        while let Some(next) = control.pushes.recv().await {
            let yaml = next.yaml;
            let mesh = self.mesh.clone();
            let parsed = tokio::task::spawn_blocking(move || {
                Ok(Prepared::new(config_from_yaml(&yaml)?, &mesh))
            })
            .await
            .context("loading the config");
            let result = match parsed {
                Ok(Ok(config)) => self.apply(config, app).await,
                Ok(Err(e)) | Err(e) => Err(e),
            };
            release_after_load().await;
            let error = match result {
                Ok(()) => {
                    tracing::info!(workload = %self.args.workload, version = next.version, "config applied");
                    self.config_source
                        .store(Arc::new(format!("control plane version {}", next.version)));
                    None
                }
                Err(e) => {
                    tracing::error!(
                        version = next.version,
                        error = format!("{e:#}"),
                        "config refused; the running config stays"
                    );
                    Some(format!("{e:#}"))
                }
            };
            if let Err(e) = control.client.report(next.version, error).await {
                tracing::warn!(error = %e, "cannot report the config version");
            }
        }
    }

    /// Checks, compiles and swaps in a whole new config.
    async fn apply(&mut self, config: Prepared, app: &mut App) -> anyhow::Result<()> {
        let id = workload_identity(&config, self.args, self.kind)?;
        if id != *self.id {
            bail!(
                "the workload's identity would change from {} to {id}; restart the proxy to take a new service account",
                self.id
            );
        }
        let mut ctx = self.ctx.clone();
        ctx.endpoints = endpoints_for(&config.config, &self.mesh, self.args)?;
        // Read again: an operator may have added or rotated a root.
        ctx.roots = DefaultRoots::load(&self.args.extra_roots)?;
        // Off the proxy's threads too: with one worker (`--concurrency 1`)
        // compiling 10,000 hosts here held every request for its length.
        let old = app.proxy.state.load_full();
        let (mesh, workload, build_ctx) =
            (self.mesh.clone(), self.args.workload.clone(), ctx.clone());
        let snap = tokio::task::spawn_blocking(move || -> anyhow::Result<Snapshot> {
            let view = config.view(&mesh, &workload)?;
            let snap = while_freeing(config, || Snapshot::rebuild(view, &build_ctx, Some(&old)));
            Ok(snap?)
        })
        .await
        .context("compiling the config")??;
        app.reload(snap).await?;
        self.ctx = ctx;
        self.ready.write(&app.addresses())
    }
}

/// Compiles the first snapshot on a thread of its own, so into pages of
/// its own (each thread allocates from a heap of its own): what stays as
/// long as the config is packed together there, while the loaded model's
/// memory (for 10,000 hosts ten times the snapshot's) is freed whole, on
/// this thread meanwhile (~50-100 ms at 10,000 hosts), and given back.
/// Built among the model's freed blocks, a snapshot of 12 MB held 20 MB
/// of pages.
fn build_in_own_heap(
    view: meshgate_config::view::ProxyView,
    ctx: &BuildContext,
    model: Prepared,
) -> anyhow::Result<Snapshot> {
    let runtime = tokio::runtime::Handle::current();
    let built = std::thread::scope(|s| {
        let thread = std::thread::Builder::new()
            .name("meshgate-load".into())
            .spawn_scoped(s, move || {
                let _in_runtime = runtime.enter();
                Snapshot::build(view, ctx)
            })?;
        drop(model);
        Ok::<_, std::io::Error>(
            thread
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic)),
        )
    });
    Ok(built.context("starting a thread to compile the config")??)
}

/// Runs `f` while `garbage` is freed on another thread: a reload's model
/// of 10,000 hosts takes ~50-100 ms to free, as long as its compile.
fn while_freeing<T: Send, R>(garbage: T, f: impl FnOnce() -> R) -> R {
    std::thread::scope(|s| {
        // A thread that cannot start frees it here, at once.
        let _ = std::thread::Builder::new()
            .name("meshgate-free".into())
            .spawn_scoped(s, move || drop(garbage));
        f()
    })
}

/// `memory::release_after_load` off the proxy's threads (it walks the heap
/// and the process's mappings).
async fn release_after_load() {
    let _ = tokio::task::spawn_blocking(crate::memory::release_after_load).await;
}
