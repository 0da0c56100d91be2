//! The `meshgate` command: one binary for every part of the data plane.

mod ca;
mod check;
mod control_cmd;
mod digest;
mod dump;
mod exec_cmd;
mod explain;
mod iptables_cmd;
mod kube_cmd;
mod memory;
mod proxy_config;
mod run;
mod standin_cmd;
mod table;
mod up;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

/// mimalloc: a request's allocations cost about half of glibc's (see
/// `memory`; docs/BENCHMARKS.md, stops 29 and 30).
#[global_allocator]
static ALLOCATOR: memory::Allocator = memory::Allocator;

/// meshgate: an egress data plane for service meshes, configured by the same
/// Istio and Kubernetes YAML you would apply to a cluster.
#[derive(Debug, Parser)]
#[command(name = "meshgate", version, propagate_version = true)]
struct Cli {
    /// Log level (error, warn, info, debug, trace) or a filter such as
    /// `info,meshgate_proxy=debug`; overrides RUST_LOG. Logs go to stderr.
    #[arg(long, global = true, value_name = "FILTER")]
    log_level: Option<String>,
    /// Log lines as text or as one JSON object each.
    #[arg(long, global = true, value_enum, default_value = "text")]
    log_format: LogLines,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Validate config files or folders like `istioctl analyze`: same codes,
    /// same line format. Exit 0 when no Error is found, 79 when one is, 3
    /// when the input cannot be read or parsed.
    Check(CheckArgs),
    /// Print one workload's proxy view: listeners, routes, upstream clusters
    /// (resolution, TLS, expected peer identity), authorization policies and
    /// the outbound traffic policy.
    ConfigDump(DumpArgs),
    /// Explain one request's path through one proxy, decision by decision:
    /// listener, route (VirtualService and rule), cluster (resolution, TLS,
    /// expected identity), authorization, and the result. Exit 0 when the
    /// proxy would send it on; 80 denied, 81 blocked (REGISTRY_ONLY), 82
    /// no route, 83 another answer of its own.
    Explain(Box<explain::ExplainArgs>),
    /// What a running proxy runs, from its inspection port (as `istioctl
    /// proxy-config`): clusters, endpoints with outlier state, listeners,
    /// the workload certificate, the log filter, or everything. TARGET is
    /// HOST:PORT or a part of a running `meshgate up`.
    ProxyConfig(proxy_config::ProxyConfigArgs),
    /// Run a command as a workload of a running `meshgate up`: in its
    /// network namespace, or on loopback with its sidecar as http_proxy.
    /// Exits with the command's code.
    Exec(exec_cmd::ExecArgs),
    /// The mesh certificate authority: create a root, issue SPIFFE workload
    /// certificates, serve certificate requests.
    #[command(subcommand)]
    Ca(ca::CaCommand),
    /// Run the egress gateway proxy of one gateway workload: mutual TLS in,
    /// AuthorizationPolicy, Gateway + VirtualService routing, TLS origination
    /// out, Istio metrics and access logs.
    Gateway(Box<run::ProxyArgs>),
    /// Run the sidecar of one injected workload: capture its outbound
    /// traffic (iptables or explicit proxy), route it by the mesh's
    /// VirtualServices, apply the outbound traffic policy, and carry it to
    /// mesh peers (the egress gateway) over mutual TLS.
    Sidecar(Box<SidecarCmd>),
    /// Install (or remove) the nat rules that redirect this network
    /// namespace's outbound TCP to the sidecar, as istio-init does.
    Iptables(iptables_cmd::IptablesArgs),
    /// Stand-ins for external hosts when offline: an HTTPS server with its
    /// own CA (serving /todos/1 like jsonplaceholder) and a DNS server.
    StandIn(standin_cmd::StandinArgs),
    /// Run the whole system a config describes on this machine: CA,
    /// gateways, sidecars (with capture) and the workloads' own commands.
    Up(up::UpArgs),
    /// Print the CustomResourceDefinitions of the Istio kinds meshgate
    /// reads, for a cluster without Istio: `meshgate crds | kubectl apply -f -`.
    Crds,
    /// The control plane on Kubernetes (the istiod role): watches the
    /// cluster's Istio and Kubernetes objects into the config model and
    /// publishes each good config as a new version.
    Control(control_cmd::ControlArgs),
    /// Inject the sidecar into Kubernetes manifests offline, as `istioctl
    /// kube-inject`: an init container for capture, the proxy container
    /// (uid 1337) with its config and certificate from `meshgate control`.
    KubeInject(kube_cmd::KubeInjectArgs),
}

#[derive(Debug, clap::Args)]
struct SidecarCmd {
    #[command(flatten)]
    proxy: run::ProxyArgs,
    #[command(flatten)]
    sidecar: run::SidecarArgs,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    /// Human-readable lines and tables.
    Text,
    /// Machine-readable JSON.
    Json,
}

/// Istio's MeshConfig, for every command that decides as the proxies do.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct MeshArgs {
    /// Istio's MeshConfig (a MeshConfig document, or the `istio` ConfigMap):
    /// trustDomain, rootNamespace, outboundTrafficPolicy, pathNormalization.
    #[arg(long, value_name = "FILE")]
    pub mesh_config: Option<PathBuf>,
}

impl MeshArgs {
    /// The settings, from the file or Istio's defaults; MeshConfig fields
    /// meshgate does not read are named on stderr.
    pub(crate) fn load(&self) -> anyhow::Result<meshgate_config::MeshSettings> {
        let Some(path) = &self.mesh_config else {
            return Ok(meshgate_config::MeshSettings::default());
        };
        let (mesh, ignored) = meshgate_config::load_mesh_config(path)?;
        if !ignored.is_empty() {
            tracing::info!(
                file = %path.display(),
                fields = ignored.join(", "),
                "MeshConfig fields meshgate does not read"
            );
        }
        Ok(mesh)
    }
}

#[derive(Debug, clap::Args)]
struct CheckArgs {
    /// YAML files or folders (searched recursively for .yaml and .yml);
    /// `-` reads standard input.
    #[arg(required = true, value_name = "PATH")]
    paths: Vec<PathBuf>,
    #[command(flatten)]
    mesh: MeshArgs,
    /// Output format.
    #[arg(short, long, value_enum, default_value = "text")]
    output: Output,
    /// The lowest level that fails the check (exit 79), as istioctl
    /// analyze's --failure-threshold.
    #[arg(long, value_enum, default_value = "error", value_name = "LEVEL")]
    failure_threshold: Threshold,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum LogLines {
    Text,
    Json,
}

/// Message levels, most severe first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Threshold {
    Error,
    Warning,
    Info,
}

#[derive(Debug, clap::Args)]
struct DumpArgs {
    /// YAML files or folders with the mesh config.
    #[arg(short, long = "config", required = true, value_name = "PATH")]
    config: Vec<PathBuf>,
    #[command(flatten)]
    mesh: MeshArgs,
    /// The workload, as NAMESPACE/NAME of its Deployment or Pod.
    #[arg(short, long, value_name = "NS/NAME")]
    workload: String,
    /// Output format.
    #[arg(short, long, value_enum, default_value = "text")]
    output: DumpOutput,
    /// Only listeners, routes and clusters of this port (as `istioctl
    /// proxy-config --port`).
    #[arg(long, value_name = "PORT")]
    port: Option<u32>,
    /// Only listeners, routes and clusters whose host contains this (as
    /// `istioctl proxy-config --fqdn`).
    #[arg(long, value_name = "HOST")]
    fqdn: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum DumpOutput {
    /// Tables.
    Text,
    Json,
    Yaml,
}

// Exit codes a script can tell apart (README, "Exit codes").
/// A failure at run time that is none of the below.
const EXIT_FAILURE: u8 = 1;
/// Bad flags or arguments (clap's own code for usage errors).
const EXIT_USAGE: u8 = 2;
/// The config cannot be read, or has errors.
const EXIT_BAD_INPUT: u8 = 3;
/// Identity: the CA refused or could not be reached, a certificate, key or
/// token is unusable, the CA folder is missing or already exists.
const EXIT_IDENTITY: u8 = 4;
/// An address cannot be listened on (in use, or not permitted).
const EXIT_LISTEN: u8 = 5;
/// Analysis found an Error, as `istioctl analyze` uses.
const EXIT_ANALYSIS_ERROR: u8 = 79;
// `explain`: what the proxy would do with the request, for a CI job.
/// Denied by an AuthorizationPolicy (403).
const EXIT_DENIED: u8 = 80;
/// Blocked by REGISTRY_ONLY (502, or the connection closed).
const EXIT_BLOCKED: u8 = 81;
/// No route (404 NR, 503 NC) or nothing listening.
const EXIT_NO_ROUTE: u8 = 82;
/// Any other answer of the proxy's own (400, 431, 503 UH, ...).
const EXIT_LOCAL_REPLY: u8 = 83;

/// A command-line value that makes no sense (exit 2, as clap's errors).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct UsageError(String);

/// Was the error a listen the system did not permit?
fn denied(e: &anyhow::Error) -> bool {
    e.chain()
        .filter_map(|c| c.downcast_ref::<std::io::Error>())
        .any(|io| io.kind() == std::io::ErrorKind::PermissionDenied)
}

/// Which exit code an error gets: by the first cause that says.
fn exit_code_of(e: &anyhow::Error) -> u8 {
    let listening = e.chain().any(|c| {
        let text = c.to_string();
        text.contains("listen") || text.contains("bind")
    });
    for cause in e.chain() {
        // A workload the arguments name that the config does not have.
        if cause.is::<UsageError>() || cause.is::<meshgate_config::view::ViewError>() {
            return EXIT_USAGE;
        }
        // A config the proxy cannot run (e.g. MG0002 at a gateway).
        if cause.is::<meshgate_proxy::snapshot::BuildError>() {
            return EXIT_BAD_INPUT;
        }
        if cause.is::<run::ConfigErrors>()
            || cause.is::<meshgate_config::LoadError>()
            || cause.is::<meshgate_config::mesh::MeshConfigError>()
        {
            return EXIT_BAD_INPUT;
        }
        if cause.is::<meshgate_identity::Error>() {
            return EXIT_IDENTITY;
        }
        if let Some(io) = cause.downcast_ref::<std::io::Error>() {
            use std::io::ErrorKind::{AddrInUse, AddrNotAvailable, PermissionDenied};
            match io.kind() {
                AddrInUse | AddrNotAvailable => return EXIT_LISTEN,
                PermissionDenied if listening => return EXIT_LISTEN,
                _ => {}
            }
        }
    }
    EXIT_FAILURE
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Commands that print a report keep the log to warnings.
    let default = if matches!(cli.command, Command::Explain(_) | Command::ProxyConfig(_)) {
        "warn"
    } else {
        "info"
    };
    let up = matches!(cli.command, Command::Up(_));
    let json = cli.log_format == LogLines::Json;
    if let Err(e) = init_logging(cli.log_level.as_deref(), default, up, json) {
        eprintln!("error: --log-level: {e}");
        return ExitCode::from(EXIT_USAGE);
    }
    let result = match cli.command {
        Command::Check(args) => check::run(&args),
        Command::ConfigDump(args) => dump::run(&args),
        Command::Explain(args) => explain::run(&args),
        Command::ProxyConfig(args) => proxy_config::run(&args),
        Command::Exec(args) => exec_cmd::run(&args),
        Command::Ca(cmd) => ca::run(&cmd),
        Command::Gateway(args) => run::run(&args, run::ProxyKind::Gateway, None),
        Command::Sidecar(cmd) => run::run(&cmd.proxy, run::ProxyKind::Sidecar, Some(&cmd.sidecar)),
        Command::Iptables(args) => iptables_cmd::run(&args),
        Command::StandIn(args) => standin_cmd::run(&args),
        Command::Up(args) => up::run(&args),
        Command::Crds => kube_cmd::crds(),
        Command::Control(args) => control_cmd::run(&args),
        Command::KubeInject(args) => kube_cmd::kube_inject(&args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            let code = exit_code_of(&e);
            if code == EXIT_LISTEN && denied(&e) {
                eprintln!(
                    "hint: ports below 1024 need root or CAP_NET_BIND_SERVICE; a gateway can listen elsewhere with --port SERVER=BIND (e.g. --port 80=8080)"
                );
            }
            ExitCode::from(code)
        }
    }
}

/// Diagnostics go to stderr, filtered by `--log-level`, else `RUST_LOG`,
/// else `default`.
fn init_logging(
    flag: Option<&str>,
    default: &str,
    up: bool,
    json: bool,
) -> Result<(), tracing_subscriber::filter::ParseError> {
    let (filter, text) = match flag {
        Some(f) => (tracing_subscriber::EnvFilter::try_new(f)?, f.to_owned()),
        None => match std::env::var("RUST_LOG") {
            Ok(v) => match tracing_subscriber::EnvFilter::try_new(&v) {
                Ok(f) => (f, v),
                Err(_) => (
                    tracing_subscriber::EnvFilter::new(default),
                    default.to_owned(),
                ),
            },
            Err(_) => (
                tracing_subscriber::EnvFilter::new(default),
                default.to_owned(),
            ),
        },
    };
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt().with_ansi(std::io::stderr().is_terminal());
    // `up` prefixes its own lines as it prefixes each part's. The filter
    // can be changed while running (the inspection port's /logging).
    macro_rules! install {
        ($builder:expr) => {{
            let builder = $builder.with_env_filter(filter).with_filter_reloading();
            let handle = builder.reload_handle();
            let _ = LOG_FILTER.set(LogFilter {
                current: std::sync::Mutex::new(text),
                reload: Box::new(move |f| handle.reload(f).map_err(|e| e.to_string())),
            });
            let _ = builder.try_init();
        }};
    }
    match (up, json) {
        (true, false) => install!(builder.with_writer(|| up::PrefixedStderr)),
        (true, true) => install!(builder.json().with_writer(|| up::PrefixedStderr)),
        (false, false) => install!(builder.with_writer(std::io::stderr)),
        (false, true) => install!(builder.json().with_writer(std::io::stderr)),
    }
    Ok(())
}

/// The running log filter, and how to change it.
struct LogFilter {
    current: std::sync::Mutex<String>,
    reload: Box<dyn Fn(tracing_subscriber::EnvFilter) -> Result<(), String> + Send + Sync>,
}

static LOG_FILTER: std::sync::OnceLock<LogFilter> = std::sync::OnceLock::new();

/// Sets the log filter of this process (`None`: says the current one);
/// returns the filter in force.
pub(crate) fn log_filter(new: Option<&str>) -> Result<String, String> {
    let lf = LOG_FILTER.get().ok_or("logging is not set up")?;
    let mut current = lf.current.lock().map_err(|e| e.to_string())?;
    if let Some(f) = new {
        let filter = tracing_subscriber::EnvFilter::try_new(f).map_err(|e| e.to_string())?;
        (lf.reload)(filter)?;
        tracing::info!(filter = f, "log filter changed");
        *current = f.to_owned();
    }
    Ok(current.clone())
}

/// Resolves on Ctrl-C or SIGTERM.
pub(crate) async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let Ok(mut term) =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        else {
            let _ = ctrl_c.await;
            return;
        };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
