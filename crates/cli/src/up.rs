//! `meshgate up`: the system a config describes, on this machine, in one
//! command: the CA, one gateway per gateway workload, one sidecar per
//! injected workload, and each workload's own command.
//!
//! As root every part gets its own network namespace on a private bridge,
//! with iptables capture and the sidecar running as uid 1337 (as Istio runs
//! it). Without root the same parts share loopback, and workloads reach
//! their sidecar as an explicit HTTP proxy (`http_proxy`).
//!
//! Everything `up` creates (namespaces, rules, processes, files) is removed
//! when it stops: Ctrl-C, SIGTERM, or a proxy failing.

mod files;
mod netns;
mod parts;
mod plan;

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{ExitCode, Stdio};
use std::sync::Arc;

use anyhow::{Context, bail};
use meshgate_identity::CertificateAuthority;
use meshgate_identity::caserver::{self, TokenTable};
use tokio::sync::mpsc;

use self::files::{copy_config, free_port, me, random_token, write_world_readable};
use self::netns::{Cleanup, Network, remove_stale};
use self::parts::{Event, Runner, wait_ready};
use self::plan::{Plan, plan};

#[derive(Debug, clap::Args)]
pub(crate) struct UpArgs {
    /// YAML files or folders with the system (e.g. examples/seed).
    #[arg(required = true, value_name = "PATH")]
    paths: Vec<PathBuf>,
    /// Offline: stand in for every MESH_EXTERNAL host with a local HTTPS
    /// server (its own CA, trusted by the gateways) and a local DNS server.
    #[arg(long)]
    stand_in: bool,
    /// Use loopback ports even as root (no namespaces, no iptables).
    #[arg(long)]
    loopback: bool,
    /// Send an external host's port to your own server instead (repeat):
    /// HOST:PORT=ADDR:PORT. The gateways reach ADDR for it (from their
    /// namespace: the host side of the bridge is the first address `up`
    /// prints); with --stand-in the stand-in leaves that host alone.
    #[arg(long = "external", value_name = "HOST:PORT=ADDR:PORT")]
    externals: Vec<String>,
    /// Trust this CA (PEM) for TLS to --external servers.
    #[arg(long, value_name = "FILE")]
    external_ca: Option<PathBuf>,
    #[command(flatten)]
    mesh: crate::MeshArgs,
}

const PROXY_UID: &str = "1337";
const HTTP_PORT: u16 = 80;

/// How the parts are connected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Network namespaces, veth pairs on a bridge, iptables capture.
    Namespaces,
    /// Everything on 127.0.0.1, explicit proxies.
    Loopback,
}

fn tool_missing(tool: &str) -> bool {
    std::process::Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_err()
}

fn is_root() -> bool {
    std::process::Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

fn choose_mode(args: &UpArgs) -> (Mode, String) {
    if args.loopback {
        return (Mode::Loopback, "--loopback was given".into());
    }
    if !is_root() {
        return (
            Mode::Loopback,
            "not running as root: network namespaces and iptables need root; workloads use their sidecar as an explicit proxy".into(),
        );
    }
    for tool in ["ip", "iptables", "iptables-restore", "setpriv"] {
        if tool_missing(tool) {
            return (
                Mode::Loopback,
                format!(
                    "{tool} is not installed; network namespaces need iproute2, iptables and util-linux"
                ),
            );
        }
    }
    (
        Mode::Namespaces,
        "running as root: each part gets its own network namespace with iptables capture".into(),
    )
}

/// One `--external`: the cluster key the gateways' endpoints use and where
/// it goes.
#[derive(Debug, Clone)]
struct External {
    host: String,
    port: u16,
    addr: SocketAddr,
}

fn parse_externals(specs: &[String]) -> anyhow::Result<Vec<External>> {
    specs
        .iter()
        .map(|spec| {
            let bad = || format!("--external {spec}: expected HOST:PORT=ADDR:PORT");
            let (target, addr) = spec.split_once('=').with_context(bad)?;
            let (host, port) = target.rsplit_once(':').with_context(bad)?;
            Ok(External {
                host: host.to_ascii_lowercase(),
                port: port.parse().with_context(bad)?,
                addr: addr.parse().with_context(bad)?,
            })
        })
        .collect()
}

pub(crate) fn run(args: &UpArgs) -> anyhow::Result<ExitCode> {
    let externals = parse_externals(&args.externals)?;
    let config = crate::run::load_config(&args.paths)?;
    let mesh = args.mesh.load()?;
    let plan = plan(&config, &mesh);
    if plan.gateways.is_empty() && plan.sidecars.is_empty() {
        bail!("the config describes no gateway and no injected workload: nothing to run");
    }
    let (mode, why) = choose_mode(args);
    if mode == Mode::Namespaces {
        remove_stale();
    }
    println!(
        "meshgate up: {} mode ({why})",
        if mode == Mode::Namespaces {
            "namespace"
        } else {
            "loopback"
        }
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let mut cleanup = Cleanup::default();
    let result = rt.block_on(up(args, &plan, &externals, mode, &mut cleanup));
    cleanup.run();
    match result {
        Ok(code) => Ok(code),
        Err(e) => {
            eprintln!("meshgate up: {e:#}");
            eprintln!("meshgate up: stopped; everything it created was removed");
            Ok(ExitCode::from(1))
        }
    }
}

/// The CA `up` runs for the proxies, and what each proxy needs to reach it.
struct Ca {
    addr: SocketAddr,
    /// Part key → its bootstrap token file.
    tokens: BTreeMap<String, PathBuf>,
    root_file: PathBuf,
}

/// The DNS server (and HTTPS stand-in) the parts use.
struct Dns {
    addr: SocketAddr,
    standin: SocketAddr,
    standin_ca: PathBuf,
}

/// One row of the parts table.
struct Row([String; 5]);

/// Everything one `up` run shares between its steps.
struct Up<'a> {
    args: &'a UpArgs,
    plan: &'a Plan,
    mode: Mode,
    /// Width of the part-name column.
    width: usize,
    run_dir: PathBuf,
    bin: String,
    config_dir: String,
    /// The MeshConfig copied where the proxies can read it.
    mesh_config: Option<String>,
    net: Network,
    /// Reaching the real external hosts needs the host's own network: then
    /// the egress gateway (the one exit) runs in the host namespace, on the
    /// bridge, while workloads stay isolated behind their sidecars.
    gateway_in_host: bool,
    runner: Runner,
    rx: mpsc::UnboundedReceiver<Event>,
    table: Vec<Row>,
    /// Hosts sent to the user's own servers (`--external`).
    externals: Vec<External>,
}

async fn up(
    args: &UpArgs,
    plan: &Plan,
    externals: &[External],
    mode: Mode,
    cleanup: &mut Cleanup,
) -> anyhow::Result<ExitCode> {
    let mut up = Up::prepare(args, plan, mode, cleanup)?;
    up.externals = externals.to_vec();
    let ca = up.start_ca().await?;
    let dns = up.start_dns(cleanup).await?;
    let gateway_ports = up.start_gateways(&ca, &dns, cleanup).await?;
    let proxies = up
        .start_sidecars(&ca, &dns, &gateway_ports, cleanup)
        .await?;
    up.start_commands(&proxies, &dns, cleanup)?;
    up.print_table(&proxies);
    up.forward().await
}

impl<'a> Up<'a> {
    /// The run folder (a binary and config uid 1337 can read) and the
    /// network.
    fn prepare(
        args: &'a UpArgs,
        plan: &'a Plan,
        mode: Mode,
        cleanup: &mut Cleanup,
    ) -> anyhow::Result<Up<'a>> {
        let run_dir = std::env::temp_dir().join(format!("meshgate-up-{}", std::process::id()));
        std::fs::create_dir_all(&run_dir)?;
        std::fs::set_permissions(&run_dir, std::fs::Permissions::from_mode(0o755))?;
        cleanup.dirs.push(run_dir.clone());
        let bin = run_dir.join("meshgate");
        std::fs::copy(me()?, &bin).context("copying the meshgate binary for the proxies")?;
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755))?;
        let config_dir = run_dir.join("config");
        copy_config(&args.paths, &config_dir)?;
        let mesh_config = match &args.mesh.mesh_config {
            Some(file) => {
                let copy = run_dir.join("mesh-config.yaml");
                let text = std::fs::read_to_string(file)
                    .with_context(|| format!("reading {}", file.display()))?;
                write_world_readable(&copy, &text)?;
                Some(copy.to_string_lossy().into_owned())
            }
            None => None,
        };
        let names: Vec<String> = plan
            .gateways
            .iter()
            .map(|g| g.1.clone())
            .chain(plan.sidecars.iter().map(|s| format!("{}-sidecar", s.1)))
            .chain(
                plan.commands
                    .iter()
                    .map(|c| c.0.split('/').nth(1).unwrap_or("").to_owned()),
            )
            .chain(["stand-in".to_owned(), "meshgate up".to_owned()])
            .collect();
        let width = names.iter().map(String::len).max().unwrap_or(10);
        LOG_PREFIX_WIDTH.store(width, std::sync::atomic::Ordering::Relaxed);
        let gateway_in_host = mode == Mode::Namespaces && !args.stand_in;
        let net = match mode {
            Mode::Loopback => Network::loopback(),
            Mode::Namespaces => {
                let mut parts: Vec<String> = vec!["stand-in".into()];
                if !gateway_in_host {
                    parts.extend(plan.gateways.iter().map(|g| g.0.clone()));
                }
                parts.extend(plan.sidecars.iter().map(|g| g.0.clone()));
                // Uninjected workloads get a namespace too: the same DNS as
                // the others, without the capture.
                parts.extend(
                    plan.commands
                        .iter()
                        .filter(|c| !plan.sidecars.iter().any(|s| s.0 == c.0))
                        .map(|c| c.0.clone()),
                );
                let net =
                    Network::namespaces(&format!("{:x}", std::process::id()), &parts, cleanup)?;
                if let Some(s) = net.subnet {
                    println!(
                        "{:<width$} | network namespaces on {s}/24 (host side {})",
                        "meshgate up", net.host_ip
                    );
                }
                net
            }
        };
        let (tx, rx) = mpsc::unbounded_channel();
        let header = ["PART", "ADDRESS", "IDENTITY", "METRICS", "READY"].map(str::to_owned);
        Ok(Up {
            args,
            plan,
            mode,
            width,
            bin: bin.to_string_lossy().into_owned(),
            config_dir: config_dir.to_string_lossy().into_owned(),
            mesh_config,
            run_dir,
            net,
            gateway_in_host,
            runner: Runner::new(tx),
            rx,
            table: vec![Row(header)],
            externals: Vec::new(),
        })
    }

    /// The CA, in process, serving CSRs to the proxies (keys never leave
    /// them), with one bootstrap token per proxy.
    async fn start_ca(&self) -> anyhow::Result<Ca> {
        let ca = Arc::new(CertificateAuthority::generate("cluster.local")?);
        let listener = tokio::net::TcpListener::bind(SocketAddr::new(self.net.host_ip, 0)).await?;
        let addr = listener.local_addr()?;
        let mut token_lines = String::new();
        let mut tokens = BTreeMap::new();
        for (key, _, spiffe) in self.plan.gateways.iter().chain(&self.plan.sidecars) {
            let id: meshgate_identity::SpiffeId = spiffe.parse()?;
            let token = random_token()?;
            let _ = writeln!(
                token_lines,
                "{token} {}/{}",
                id.namespace(),
                id.service_account()
            );
            let file = self
                .run_dir
                .join(format!("token-{}", key.replace('/', "_")));
            std::fs::write(&file, &token)?;
            std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600))?;
            if self.mode == Mode::Namespaces {
                // Only the proxy (uid 1337) may read its bootstrap token.
                chown_to_proxy(&file)?;
            }
            tokens.insert(key.clone(), file);
        }
        let root_file = self.run_dir.join("root-cert.pem");
        write_world_readable(&root_file, ca.root_pem())?;
        tokio::spawn(caserver::serve(
            ca,
            TokenTable::parse(&token_lines, "tokens")?,
            listener,
        ));
        self.say(&format!("CA for cluster.local listening on {addr}"));
        Ok(Ca {
            addr,
            tokens,
            root_file,
        })
    }

    /// DNS (and the stand-ins): external hosts, and Kubernetes Services to
    /// the gateway that backs them.
    async fn start_dns(&mut self, cleanup: &mut Cleanup) -> anyhow::Result<Dns> {
        let standin_ca = self.run_dir.join("standin-ca.pem");
        let (addr, standin) = match self.net.ns_of("stand-in") {
            Some((_, a)) => (SocketAddr::new(a, 53), SocketAddr::new(a, 443)),
            None => (
                SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), free_port()?),
                SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), free_port()?),
            ),
        };
        let mut argv = vec![
            self.bin.clone(),
            "stand-in".into(),
            "--dns-listen".into(),
            addr.to_string(),
            "--https-listen".into(),
            standin.to_string(),
        ];
        let own = |h: &String| self.externals.iter().any(|e| &e.host == h);
        if self.args.stand_in {
            for h in self.plan.external_hosts.iter().filter(|h| !own(h)) {
                argv.extend(["--host".into(), h.clone()]);
            }
            // Offline, any other name resolves too (to an address nothing
            // serves): what the mesh does with it is the workload's answer
            // (REGISTRY_ONLY's 502), not a DNS error.
            if self.mode == Mode::Namespaces {
                argv.extend(["--answer-all".into(), self.net.addr_of(254).to_string()]);
            }
            // The user's servers: the name resolves (the capture takes the
            // connection), the gateway goes to --external's address.
            for h in self.plan.external_hosts.iter().filter(|h| own(h)) {
                argv.extend(["--record".into(), format!("{h}={}", self.net.addr_of(254))]);
            }
            argv.extend(["--ca-out".into(), standin_ca.to_string_lossy().into_owned()]);
        } else {
            // Workloads resolve external names to an address in the mesh
            // subnet (their sidecar captures the connection before it leaves).
            for h in &self.plan.external_hosts {
                argv.extend(["--record".into(), format!("{h}={}", self.net.addr_of(254))]);
            }
        }
        for (fqdn, selected, _) in &self.plan.services {
            // A Service resolves to a gateway it selects, else to the first
            // selected workload that has an address of its own.
            let gateway = selected
                .iter()
                .find(|k| self.plan.gateways.iter().any(|g| &g.0 == *k))
                .map(|g| self.gateway_addr(g));
            let workload = || {
                selected
                    .iter()
                    .find_map(|k| self.net.ns_of(k).map(|(_, a)| a))
            };
            if let Some(addr) = gateway.or_else(workload) {
                argv.extend(["--record".into(), format!("{fqdn}={addr}")]);
            }
        }
        let argv = match self.net.ns_of("stand-in") {
            Some((ns, _)) => in_namespace(&ns, argv),
            None => argv,
        };
        if self.args.stand_in || self.mode == Mode::Namespaces {
            self.runner.spawn("stand-in", &argv, &[], true, cleanup)?;
            wait_ready(&mut self.rx, self.width, "stand-in", "stand-in running").await?;
        }
        Ok(Dns {
            addr,
            standin,
            standin_ca,
        })
    }

    /// A gateway's address, for the Services that select it.
    fn gateway_addr(&self, key: &str) -> IpAddr {
        match self.net.ns_of(key) {
            Some((_, a)) => a,
            None if self.gateway_in_host => self.net.host_ip,
            None => IpAddr::V4(Ipv4Addr::LOCALHOST),
        }
    }

    /// The flags every proxy gets: config, workload, the CA.
    fn proxy_argv(&self, kind: &str, key: &str, ca: &Ca) -> Vec<String> {
        let mesh = self
            .mesh_config
            .iter()
            .flat_map(|m| ["--mesh-config".to_owned(), m.clone()]);
        let mut argv = vec![
            self.bin.clone(),
            kind.into(),
            "--config".into(),
            self.config_dir.clone(),
            "--workload".into(),
            key.to_owned(),
            "--ca-addr".into(),
            ca.addr.to_string(),
            "--ca-token-file".into(),
            ca.tokens[key].to_string_lossy().into_owned(),
            "--ca-root-cert".into(),
            ca.root_file.to_string_lossy().into_owned(),
        ];
        argv.extend(mesh);
        argv
    }

    /// Registers a part for `meshgate proxy-config PART`: where its ready
    /// file (naming its inspection port) will be, and its network
    /// namespace. Returns the proxy's `--ready-file` flag.
    fn register_part(&self, part: &str, netns: Option<&str>) -> anyhow::Result<Vec<String>> {
        let dir = self.run_dir.join(crate::proxy_config::PARTS_DIR);
        std::fs::create_dir_all(&dir)?;
        // Proxies in namespaces run as uid 1337 and write their ready
        // files here (sticky, as /tmp).
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o1777))?;
        let ready = dir.join(format!("{part}.ready.json"));
        self.register(
            part,
            serde_json::json!({ "readyFile": ready, "netns": netns }),
        )?;
        Ok(vec![
            "--ready-file".into(),
            ready.to_string_lossy().into_owned(),
        ])
    }

    /// Writes `run_dir/parts/NAME.json`, read by `proxy-config` and `exec`.
    fn register(&self, name: &str, what: serde_json::Value) -> anyhow::Result<()> {
        let dir = self.run_dir.join(crate::proxy_config::PARTS_DIR);
        std::fs::create_dir_all(&dir)?;
        std::fs::write(
            dir.join(format!("{name}.json")),
            serde_json::to_vec_pretty(&what)?,
        )?;
        Ok(())
    }

    /// One gateway per gateway workload; their HTTP ports by key.
    async fn start_gateways(
        &mut self,
        ca: &Ca,
        dns: &Dns,
        cleanup: &mut Cleanup,
    ) -> anyhow::Result<HashMap<String, u16>> {
        let mut ports = HashMap::new();
        let plan = self.plan;
        for (key, name, spiffe) in &plan.gateways {
            let ns = self.net.ns_of(key);
            let a = self.gateway_addr(key);
            let (admin, prom, health, http) = if ns.is_some() || self.gateway_in_host {
                (15020, 15090, 15021, HTTP_PORT)
            } else {
                (free_port()?, free_port()?, free_port()?, free_port()?)
            };
            ports.insert(key.clone(), http);
            let mut argv = self.proxy_argv("gateway", key, ca);
            argv.extend(admin_flags(a, admin, prom, health));
            argv.extend(self.register_part(name, ns.as_ref().map(|(n, _)| n.as_str()))?);
            argv.extend([
                "--bind-address".into(),
                a.to_string(),
                "--port".into(),
                format!("{HTTP_PORT}={http}"),
            ]);
            argv.extend(self.egress_flags(name, dns)?);
            let argv = match ns {
                Some((ns, _)) => as_proxy(&ns, argv),
                None => argv,
            };
            self.runner.spawn(name, &argv, &[], true, cleanup)?;
            wait_ready(&mut self.rx, self.width, name, "egress gateway running").await?;
            self.table.push(Row([
                name.clone(),
                format!("{a}:{http}"),
                spiffe.clone(),
                format!("http://{a}:{admin}/stats/prometheus"),
                format!("http://{a}:{health}/healthz/ready"),
            ]));
        }
        Ok(ports)
    }

    /// How a gateway reaches the external hosts: the stand-in by DNS in its
    /// namespace, or on loopback through an endpoints file (external port
    /// 443 is the stand-in's port); `--external` hosts at the user's
    /// servers. Trusts the stand-in's CA and `--external-ca`.
    fn egress_flags(&self, name: &str, dns: &Dns) -> anyhow::Result<Vec<String>> {
        let mut flags = Vec::new();
        let mut lines = String::new();
        if self.args.stand_in {
            flags.extend([
                "--extra-roots".into(),
                dns.standin_ca.to_string_lossy().into_owned(),
            ]);
            if self.net.ns_of("stand-in").is_some() {
                flags.extend(["--dns-server".into(), dns.addr.to_string()]);
            } else {
                let own = |h: &String| self.externals.iter().any(|e| &e.host == h && e.port == 443);
                for h in self.plan.external_hosts.iter().filter(|h| !own(h)) {
                    let _ = writeln!(lines, "{h}:443 {}", dns.standin);
                }
            }
        }
        if let Some(ca) = &self.args.external_ca {
            // Where the proxies (uid 1337) can read it.
            let copy = self.run_dir.join("external-ca.pem");
            let text = std::fs::read_to_string(ca)
                .with_context(|| format!("--external-ca {}", ca.display()))?;
            write_world_readable(&copy, &text)?;
            flags.extend(["--extra-roots".into(), copy.to_string_lossy().into_owned()]);
        }
        for e in &self.externals {
            let _ = writeln!(lines, "{}:{} {}", e.host, e.port, e.addr);
        }
        if !lines.is_empty() {
            let ep = self.run_dir.join(format!("endpoints-{name}"));
            write_world_readable(&ep, &lines)?;
            flags.extend(["--endpoints".into(), ep.to_string_lossy().into_owned()]);
        }
        Ok(flags)
    }

    /// One sidecar per injected workload, with the capture in front of it
    /// (namespaces) or as the workload's explicit proxy (loopback). Returns
    /// the `http_proxy` of each workload on loopback.
    async fn start_sidecars(
        &mut self,
        ca: &Ca,
        dns: &Dns,
        gateway_ports: &HashMap<String, u16>,
        cleanup: &mut Cleanup,
    ) -> anyhow::Result<HashMap<String, String>> {
        let mut proxy_env = HashMap::new();
        let plan = self.plan;
        for (key, name, spiffe) in &plan.sidecars {
            let part = format!("{name}-sidecar");
            let ns = self.net.ns_of(key);
            let (a, admin, prom, health, outbound) = match &ns {
                Some((_, a)) => (*a, 15020, 15090, 15021, 15001),
                None => (
                    IpAddr::V4(Ipv4Addr::LOCALHOST),
                    free_port()?,
                    free_port()?,
                    free_port()?,
                    free_port()?,
                ),
            };
            let mut argv = self.proxy_argv("sidecar", key, ca);
            argv.extend(admin_flags(a, admin, prom, health));
            argv.extend(self.register_part(&part, ns.as_ref().map(|(n, _)| n.as_str()))?);
            argv.extend(["--outbound-port".into(), outbound.to_string()]);
            match &ns {
                Some((ns_name, _)) => {
                    argv.extend(["--dns-server".into(), dns.addr.to_string()]);
                    capture(ns_name, key, &self.bin, dns, cleanup)?;
                }
                None => {
                    argv.extend(self.loopback_endpoints(name, gateway_ports)?);
                    proxy_env.insert(key.clone(), format!("http://127.0.0.1:{outbound}"));
                }
            }
            let argv = match &ns {
                Some((ns_name, _)) => as_proxy(ns_name, argv),
                None => argv,
            };
            self.runner.spawn(&part, &argv, &[], true, cleanup)?;
            wait_ready(&mut self.rx, self.width, &part, "sidecar running").await?;
            self.table.push(Row([
                part,
                // The outbound port: captured traffic's, and on loopback
                // the explicit proxy's.
                format!("{a}:{outbound}"),
                spiffe.clone(),
                format!("http://{a}:{admin}/stats/prometheus"),
                format!("http://{a}:{health}/healthz/ready"),
            ]));
        }
        Ok(proxy_env)
    }

    /// Loopback: Services resolve to the gateways' local ports.
    fn loopback_endpoints(
        &self,
        name: &str,
        gateway_ports: &HashMap<String, u16>,
    ) -> anyhow::Result<Vec<String>> {
        let ep = self.run_dir.join(format!("endpoints-{name}"));
        let mut lines = String::new();
        for (fqdn, selected, port) in &self.plan.services {
            if let Some(g) = selected.iter().find(|k| gateway_ports.contains_key(*k)) {
                let _ = writeln!(lines, "{fqdn}:{port} 127.0.0.1:{}", gateway_ports[g]);
            }
        }
        write_world_readable(&ep, &lines)?;
        Ok(vec![
            "--endpoints".into(),
            ep.to_string_lossy().into_owned(),
            "--outbound-address".into(),
            "127.0.0.1".into(),
            // Loopback: the workload uses its sidecar as `http_proxy`.
            "--explicit-proxy".into(),
        ])
    }

    /// The workloads' own commands.
    fn start_commands(
        &mut self,
        proxy_env: &HashMap<String, String>,
        dns: &Dns,
        cleanup: &mut Cleanup,
    ) -> anyhow::Result<()> {
        let plan = self.plan;
        for (key, argv) in &plan.commands {
            let name = key.split('/').nth(1).unwrap_or(key).to_owned();
            let injected = plan.sidecars.iter().any(|s| &s.0 == key);
            if let (Some((ns, _)), false) = (self.net.ns_of(key), injected) {
                resolv_conf(&ns, key, dns, cleanup)?;
            }
            let mut env: Vec<(&str, String)> = Vec::new();
            if let Some(p) = proxy_env.get(key) {
                env.push(("http_proxy", p.clone()));
                env.push(("HTTP_PROXY", p.clone()));
            }
            let ns = self.net.ns_of(key);
            let full = match &ns {
                Some((ns, _)) => [
                    vec!["ip".into(), "netns".into(), "exec".into(), ns.clone()],
                    argv.clone(),
                ]
                .concat(),
                None => argv.clone(),
            };
            self.runner.spawn(&name, &full, &env, false, cleanup)?;
            let addr = ns.map_or_else(|| "127.0.0.1".to_owned(), |x| x.1.to_string());
            let row = [
                name,
                addr,
                "(workload command)".into(),
                "-".into(),
                "-".into(),
            ];
            self.table.push(Row(row));
        }
        Ok(())
    }

    /// The parts table, and where each part lives (for `ip netns exec` by
    /// hand).
    fn print_table(&self, proxy_env: &HashMap<String, String>) {
        let w: [usize; 4] =
            [0, 1, 2, 3].map(|i| self.table.iter().map(|r| r.0[i].len()).max().unwrap_or(0));
        for Row(r) in &self.table {
            self.say(&format!(
                "{:<w0$}  {:<w1$}  {:<w2$}  {:<w3$}  {}",
                r[0],
                r[1],
                r[2],
                r[3],
                r[4],
                w0 = w[0],
                w1 = w[1],
                w2 = w[2],
                w3 = w[3]
            ));
        }
        for (key, ns) in self.net.namespaces_by_part() {
            self.say(&format!("netns {ns}: {key}"));
        }
        // `meshgate exec NAME -- ...` runs a command as a workload.
        for (key, _, _) in &self.plan.sidecars {
            let name = key.split('/').nth(1).unwrap_or(key);
            let ns = self.net.ns_of(key).map(|(ns, _)| ns);
            if let Err(e) = self.register(
                &format!("workload-{name}"),
                serde_json::json!({ "key": key, "netns": ns, "httpProxy": proxy_env.get(key) }),
            ) {
                tracing::warn!(
                    error = format!("{e:#}"),
                    "cannot register {key} for meshgate exec"
                );
            }
        }
        // How to send a request of one's own, as each workload would.
        if let Some(host) = self
            .plan
            .external_hosts
            .iter()
            .find(|h| !h.starts_with('*'))
        {
            for (key, _, _) in &self.plan.sidecars {
                let how = match (self.net.ns_of(key), proxy_env.get(key)) {
                    (Some((ns, _)), _) => {
                        format!("sudo ip netns exec {ns} curl -sS http://{host}/")
                    }
                    (None, Some(proxy)) => format!("curl -sS -x {proxy} http://{host}/"),
                    (None, None) => continue,
                };
                let name = key.split('/').nth(1).unwrap_or(key);
                self.say(&format!("try, as {key}: {how}"));
                self.say(&format!(
                    "  or: meshgate exec {name} -- curl -sS http://{host}/"
                ));
            }
        }
        self.say("all parts running; Ctrl-C stops everything");
    }

    /// Forwards output until a signal or a proxy failure.
    async fn forward(mut self) -> anyhow::Result<ExitCode> {
        let width = self.width;
        self.runner.watch_exits();
        let signal = crate::shutdown_signal();
        tokio::pin!(signal);
        loop {
            tokio::select! {
                _ = &mut signal => {
                    self.say("stopping");
                    return Ok(ExitCode::SUCCESS);
                }
                ev = self.rx.recv() => match ev {
                    Some(Event::Line(name, line)) => println!("{name:<width$} | {line}"),
                    Some(Event::Exited(name, true, status)) => bail!("{name} exited ({status}); stopping everything"),
                    Some(Event::Exited(name, false, status)) => println!("{name:<width$} | exited ({status})"),
                    None => return Ok(ExitCode::SUCCESS),
                }
            }
        }
    }

    /// A line of `up`'s own.
    fn say(&self, line: &str) {
        println!("{:<w$} | {line}", "meshgate up", w = self.width);
    }
}

/// The part-name column's width, for `up`'s own log lines (its CA).
static LOG_PREFIX_WIDTH: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(11);

/// `up`'s own log lines (the in-process CA's), on stderr with the same
/// `meshgate up | ` prefix as everything else it prints.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PrefixedStderr;

impl std::io::Write for PrefixedStderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        // The formatter writes one whole event per call.
        let w = LOG_PREFIX_WIDTH.load(std::sync::atomic::Ordering::Relaxed);
        let mut line = format!("{:<w$} | ", "meshgate up").into_bytes();
        line.extend_from_slice(buf);
        std::io::stderr().write_all(&line)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

fn admin_flags(a: IpAddr, admin: u16, prom: u16, health: u16) -> Vec<String> {
    let mut flags = vec![
        "--admin-address".into(),
        a.to_string(),
        "--admin-port".into(),
        admin.to_string(),
        "--prometheus-port".into(),
        prom.to_string(),
        "--health-port".into(),
        health.to_string(),
    ];
    // In its own namespace each proxy has 127.0.0.1:15000; on loopback
    // they share a host: each picks a port (its log line says which).
    if a.is_loopback() {
        flags.extend(["--inspect-port".into(), "0".into()]);
    }
    flags
}

fn in_namespace(ns: &str, argv: Vec<String>) -> Vec<String> {
    [
        vec!["ip".into(), "netns".into(), "exec".into(), ns.to_owned()],
        argv,
    ]
    .concat()
}

/// A proxy in its namespace, as uid 1337 (so its own traffic is not
/// captured).
fn as_proxy(ns: &str, argv: Vec<String>) -> Vec<String> {
    let setpriv = vec![
        "setpriv".into(),
        format!("--reuid={PROXY_UID}"),
        format!("--regid={PROXY_UID}"),
        "--clear-groups".into(),
    ];
    in_namespace(ns, [setpriv, argv].concat())
}

fn chown_to_proxy(file: &std::path::Path) -> anyhow::Result<()> {
    let o = std::process::Command::new("chown")
        .arg(format!("{PROXY_UID}:{PROXY_UID}"))
        .arg(file)
        .output()?;
    if !o.status.success() {
        bail!(
            "chown {}: {}",
            file.display(),
            String::from_utf8_lossy(&o.stderr).trim()
        );
    }
    Ok(())
}

/// A workload namespace's resolver: our DNS, with a pod's search path and
/// `ndots:5` (Kubernetes' own), so `svc.ns` is looked up in the cluster
/// domains before it is taken as a name of its own.
fn resolv_conf(ns: &str, key: &str, dns: &Dns, cleanup: &mut Cleanup) -> anyhow::Result<()> {
    let etc = PathBuf::from(format!("/etc/netns/{ns}"));
    std::fs::create_dir_all(&etc)?;
    cleanup.netns_etc.push(etc.clone());
    let (wns, _) = key.split_once('/').unwrap_or(("default", ""));
    std::fs::write(
        etc.join("resolv.conf"),
        format!(
            "nameserver {}\nsearch {wns}.svc.cluster.local svc.cluster.local cluster.local\noptions ndots:5\n",
            dns.addr.ip()
        ),
    )?;
    Ok(())
}

/// A workload's namespace before its application starts: our DNS, and
/// istio-init's iptables capture.
fn capture(ns: &str, key: &str, bin: &str, dns: &Dns, cleanup: &mut Cleanup) -> anyhow::Result<()> {
    resolv_conf(ns, key, dns, cleanup)?;
    let o = std::process::Command::new("ip")
        .args(["netns", "exec", ns, bin, "iptables"])
        .output()?;
    if !o.status.success() {
        bail!(
            "installing iptables capture for {key}: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        );
    }
    Ok(())
}
