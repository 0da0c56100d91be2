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

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use meshgate_config::model::networking::Location;
use meshgate_config::registry::{self, ProxyKind, ServiceSource};
use meshgate_config::{Config, MeshSettings};
use meshgate_identity::CertificateAuthority;
use meshgate_identity::caserver::{self, TokenTable};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

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

/// A process `up` started; its lines are prefixed with `name |`.
struct Part {
    name: String,
    child: Child,
    /// Proxies: their exit stops everything.
    essential: bool,
}

/// One line from a part, or its exit.
enum Event {
    Line(String, String),
    Exited(String, bool, String),
}

/// Everything to remove on the way out, in reverse order of creation.
#[derive(Default)]
struct Cleanup {
    /// Host-side veths: deleted explicitly, because the kernel removes the
    /// interfaces of a deleted namespace asynchronously.
    links: Vec<String>,
    namespaces: Vec<String>,
    netns_etc: Vec<PathBuf>,
    dirs: Vec<PathBuf>,
    pgids: Vec<u32>,
}

impl Cleanup {
    fn run(&mut self) {
        // Kill whole process groups: a workload's shell loop and its curl.
        for pgid in self.pgids.drain(..) {
            let _ = std::process::Command::new("kill")
                .args(["-KILL", "--", &format!("-{pgid}")])
                .stderr(Stdio::null())
                .status();
        }
        for link in self.links.drain(..) {
            let _ = std::process::Command::new("ip")
                .args(["link", "del", &link])
                .stderr(Stdio::null())
                .status();
        }
        // Deleting a namespace removes its interfaces and iptables rules.
        for ns in self.namespaces.drain(..).rev() {
            let _ = std::process::Command::new("ip")
                .args(["netns", "del", &ns])
                .stderr(Stdio::null())
                .status();
        }
        for d in self.netns_etc.drain(..).chain(self.dirs.drain(..)) {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        self.run();
    }
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let o = std::process::Command::new("ip")
        .args(args)
        .output()
        .context("running ip")?;
    if !o.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&o.stderr).trim()
        );
    }
    Ok(())
}

fn netns_exec(ns: &str, args: &[&str]) -> anyhow::Result<()> {
    let mut full = vec!["netns", "exec", ns];
    full.extend_from_slice(args);
    ip(&full)
}

/// A /24 in 10.0.0.0/8 that no interface or route of this host uses.
fn free_subnet() -> anyhow::Result<Ipv4Addr> {
    let used = std::process::Command::new("ip")
        .args(["-4", "route", "show", "table", "all"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let seed = std::process::id();
    for i in 0..200u32 {
        let n = seed.wrapping_mul(2654435761).wrapping_add(i * 7919);
        let (b, c) = (((n >> 8) % 200 + 20) as u8, (n % 250) as u8);
        let prefix = format!("10.{b}.{c}.");
        if !used.contains(&prefix) {
            return Ok(Ipv4Addr::new(10, b, c, 0));
        }
    }
    bail!("no free 10.x.y.0/24 subnet found")
}

/// The plan: which parts run, with what identity and where.
struct Plan {
    gateways: Vec<(String, String, String)>,
    sidecars: Vec<(String, String, String)>,
    /// Workloads with a command to run: (ns/name, command line).
    commands: Vec<(String, Vec<String>)>,
    external_hosts: Vec<String>,
    /// Kubernetes Service FQDN → workload (ns/name) it selects.
    services: Vec<(String, Vec<String>, u16)>,
}

fn plan(config: &Config, mesh: &MeshSettings) -> Plan {
    let reg = registry::build(config, mesh);
    let mut p = Plan {
        gateways: Vec::new(),
        sidecars: Vec::new(),
        commands: Vec::new(),
        external_hosts: Vec::new(),
        services: Vec::new(),
    };
    for w in &reg.workloads {
        let key = format!("{}/{}", w.namespace, w.name);
        match w.proxy {
            ProxyKind::Gateway => {
                p.gateways
                    .push((key.clone(), w.name.clone(), w.spiffe_id.clone()))
            }
            ProxyKind::Sidecar => {
                p.sidecars
                    .push((key.clone(), w.name.clone(), w.spiffe_id.clone()))
            }
            ProxyKind::None => {}
        }
        if w.proxy != ProxyKind::Gateway {
            let template = config
                .workloads
                .iter()
                .find(|r| r.meta.namespace == w.namespace && r.meta.name == w.name);
            if let Some(c) = template.and_then(|t| t.spec.pod.containers.first()) {
                let argv: Vec<String> = c.command.iter().chain(&c.args).cloned().collect();
                if !argv.is_empty() {
                    p.commands.push((key, argv));
                }
            }
        }
    }
    for s in &reg.services {
        match &s.source {
            ServiceSource::ServiceEntry { .. }
                if s.location == Location::MeshExternal && !s.hostname.starts_with('*') =>
            {
                if !p.external_hosts.contains(&s.hostname) {
                    p.external_hosts.push(s.hostname.clone());
                }
            }
            ServiceSource::Kubernetes { .. } => {
                let selected: Vec<String> = reg
                    .workloads
                    .iter()
                    .filter(|w| {
                        w.namespace == s.namespace
                            && s.selector.as_ref().is_some_and(|sel| {
                                !sel.is_empty()
                                    && meshgate_config::model::labels_match(sel, &w.labels)
                            })
                    })
                    .map(|w| format!("{}/{}", w.namespace, w.name))
                    .collect();
                let port = s
                    .ports
                    .first()
                    .map_or(HTTP_PORT, |p| u16::try_from(p.number).unwrap_or(HTTP_PORT));
                p.services.push((s.hostname.clone(), selected, port));
            }
            ServiceSource::ServiceEntry { .. } => {}
        }
    }
    p
}

pub(crate) fn run(args: &UpArgs) -> anyhow::Result<ExitCode> {
    let config = crate::run::load_config(&args.paths)?;
    let mesh = MeshSettings::default();
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
    let result = rt.block_on(up(args, &plan, mode, &mut cleanup));
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

struct Runner {
    tx: mpsc::UnboundedSender<Event>,
    parts: Vec<Part>,
}

impl Runner {
    /// Starts a part in its own process group and forwards its output.
    fn spawn(
        &mut self,
        name: &str,
        argv: &[String],
        env: &[(&str, String)],
        essential: bool,
        cleanup: &mut Cleanup,
    ) -> anyhow::Result<()> {
        let mut cmd = Command::new(&argv[0]);
        cmd.args(&argv[1..])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            // Marks every process `up` starts, so leftovers can be found.
            .env("MESHGATE_UP", std::process::id().to_string())
            .process_group(0)
            .kill_on_drop(true);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting {name}: {}", argv[0]))?;
        if let Some(pid) = child.id() {
            cleanup.pgids.push(pid);
        }
        for stream in [
            child
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Unpin + Send>),
            child
                .stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Unpin + Send>),
        ]
        .into_iter()
        .flatten()
        {
            let (tx, name) = (self.tx.clone(), name.to_owned());
            tokio::spawn(async move {
                let mut lines = BufReader::new(stream).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    if tx.send(Event::Line(name.clone(), line)).is_err() {
                        return;
                    }
                }
            });
        }
        self.parts.push(Part {
            name: name.to_owned(),
            child,
            essential,
        });
        Ok(())
    }
}

/// Waits until a part logs `needle`, printing everything meanwhile.
async fn wait_ready(
    rx: &mut mpsc::UnboundedReceiver<Event>,
    width: usize,
    part: &str,
    needle: &str,
) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let ev = tokio::time::timeout_at(deadline, rx.recv())
            .await
            .map_err(|_| anyhow::anyhow!("{part} did not become ready within 30s"))?;
        match ev {
            Some(Event::Line(name, line)) => {
                println!("{name:<width$} | {line}");
                if name == part && line.contains(needle) {
                    return Ok(());
                }
            }
            Some(Event::Exited(name, _, status)) if name == part => {
                bail!("{part} exited while starting ({status})")
            }
            Some(Event::Exited(name, _, status)) => println!("{name:<width$} | exited ({status})"),
            None => bail!("output channel closed"),
        }
    }
}

fn me() -> anyhow::Result<String> {
    Ok(std::env::current_exe()?.to_string_lossy().into_owned())
}

fn write_world_readable(path: &Path, text: &str) -> anyhow::Result<()> {
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644))?;
    Ok(())
}

#[allow(clippy::too_many_lines)]
async fn up(
    args: &UpArgs,
    plan: &Plan,
    mode: Mode,
    cleanup: &mut Cleanup,
) -> anyhow::Result<ExitCode> {
    let run_dir = std::env::temp_dir().join(format!("meshgate-up-{}", std::process::id()));
    std::fs::create_dir_all(&run_dir)?;
    std::fs::set_permissions(&run_dir, std::fs::Permissions::from_mode(0o755))?;
    cleanup.dirs.push(run_dir.clone());
    // The proxies run as uid 1337: give them a binary and a config they can
    // read, whatever the permissions of the folders they came from.
    let bin = run_dir.join("meshgate");
    std::fs::copy(me()?, &bin).context("copying the meshgate binary for the proxies")?;
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755))?;
    let bin = bin.to_string_lossy().into_owned();
    let config_dir = run_dir.join("config");
    copy_config(&args.paths, &config_dir)?;
    let config_args = [
        "--config".to_owned(),
        config_dir.to_string_lossy().into_owned(),
    ];
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut runner = Runner {
        tx: tx.clone(),
        parts: Vec::new(),
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

    // Addresses.
    let subnet = if mode == Mode::Namespaces {
        Some(free_subnet()?)
    } else {
        None
    };
    let addr_of = |host: u8| -> IpAddr {
        match subnet {
            Some(s) => IpAddr::V4(Ipv4Addr::new(
                s.octets()[0],
                s.octets()[1],
                s.octets()[2],
                host,
            )),
            None => IpAddr::V4(Ipv4Addr::LOCALHOST),
        }
    };
    let tag = format!("{:x}", std::process::id());
    // Reaching the real external hosts needs the host's own network: then
    // the egress gateway (the one exit) runs in the host namespace, on the
    // bridge, while workloads stay isolated behind their sidecars.
    let gateway_in_host = mode == Mode::Namespaces && !args.stand_in;
    let hub = format!("mgup-{tag}");
    let host_ip = addr_of(1);

    // Namespace plumbing: a bridge in a hub namespace, the host on it (for
    // the CA and for the operator's metrics URLs), and one veth per part.
    let mut part_ns: HashMap<String, (String, IpAddr)> = HashMap::new();
    if let Some(s) = subnet {
        ip(&["netns", "add", &hub])?;
        cleanup.namespaces.push(hub.clone());
        netns_exec(&hub, &["ip", "link", "add", "br0", "type", "bridge"])?;
        netns_exec(&hub, &["ip", "link", "set", "br0", "up"])?;
        netns_exec(&hub, &["ip", "link", "set", "lo", "up"])?;
        let host_if = format!("mgh{tag}");
        ip(&[
            "link", "add", &host_if, "type", "veth", "peer", "name", "hostp", "netns", &hub,
        ])?;
        cleanup.links.push(host_if.clone());
        ip(&["addr", "add", &format!("{host_ip}/24"), "dev", &host_if])?;
        ip(&["link", "set", &host_if, "up"])?;
        netns_exec(&hub, &["ip", "link", "set", "hostp", "master", "br0"])?;
        netns_exec(&hub, &["ip", "link", "set", "hostp", "up"])?;
        let mut parts: Vec<String> = vec!["stand-in".into()];
        if !gateway_in_host {
            parts.extend(plan.gateways.iter().map(|g| g.0.clone()));
        }
        parts.extend(plan.sidecars.iter().map(|g| g.0.clone()));
        for (host, (i, key)) in (2u8..).zip(parts.iter().enumerate()) {
            let ns = format!("mgup-{tag}-{i}");
            ip(&["netns", "add", &ns])?;
            cleanup.namespaces.push(ns.clone());
            let (inner, outer) = ("eth0".to_owned(), format!("p{i}"));
            ip(&[
                "link", "add", &outer, "netns", &hub, "type", "veth", "peer", "name", &inner,
                "netns", &ns,
            ])?;
            netns_exec(&hub, &["ip", "link", "set", &outer, "master", "br0"])?;
            netns_exec(&hub, &["ip", "link", "set", &outer, "up"])?;
            let a = addr_of(host);

            netns_exec(
                &ns,
                &["ip", "addr", "add", &format!("{a}/24"), "dev", &inner],
            )?;
            netns_exec(&ns, &["ip", "link", "set", &inner, "up"])?;
            netns_exec(&ns, &["ip", "link", "set", "lo", "up"])?;
            netns_exec(
                &ns,
                &["ip", "route", "add", "default", "via", &host_ip.to_string()],
            )?;
            // Unprivileged ports from 0: the proxies run as uid 1337.
            netns_exec(
                &ns,
                &[
                    "sh",
                    "-c",
                    "echo 0 > /proc/sys/net/ipv4/ip_unprivileged_port_start",
                ],
            )?;
            part_ns.insert(key.clone(), (ns, a));
        }
        println!(
            "{:<width$} | network namespaces on {s}/24 (host side {host_ip})",
            "meshgate up"
        );
    }
    let ns_of = |key: &str| part_ns.get(key).cloned();

    // The CA, in process, serving CSRs to the proxies (keys never leave them).
    let ca = Arc::new(CertificateAuthority::generate("cluster.local")?);
    let ca_listener = tokio::net::TcpListener::bind(SocketAddr::new(
        if subnet.is_some() {
            host_ip
        } else {
            IpAddr::V4(Ipv4Addr::LOCALHOST)
        },
        0,
    ))
    .await?;
    let ca_addr = ca_listener.local_addr()?;
    let mut token_lines = String::new();
    let mut tokens: BTreeMap<String, PathBuf> = BTreeMap::new();
    for (key, _, spiffe) in plan.gateways.iter().chain(&plan.sidecars) {
        let id: meshgate_identity::SpiffeId = spiffe.parse()?;
        let token = random_token()?;
        let _ = writeln!(
            token_lines,
            "{token} {}/{}",
            id.namespace(),
            id.service_account()
        );
        let file = run_dir.join(format!("token-{}", key.replace('/', "_")));
        std::fs::write(&file, &token)?;
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600))?;
        if mode == Mode::Namespaces {
            // Only the proxy (uid 1337) may read its bootstrap token.
            let o = std::process::Command::new("chown")
                .arg(format!("{PROXY_UID}:{PROXY_UID}"))
                .arg(&file)
                .output()?;
            if !o.status.success() {
                bail!(
                    "chown {}: {}",
                    file.display(),
                    String::from_utf8_lossy(&o.stderr).trim()
                );
            }
        }
        tokens.insert(key.clone(), file);
    }
    let root_file = run_dir.join("root-cert.pem");
    write_world_readable(&root_file, ca.root_pem())?;
    tokio::spawn(caserver::serve(
        ca.clone(),
        TokenTable::parse(&token_lines, "tokens")?,
        ca_listener,
    ));
    println!(
        "{:<width$} | CA for cluster.local listening on {ca_addr}",
        "meshgate up"
    );

    // DNS (and the stand-ins): external hosts, and Kubernetes Services to
    // the gateway that backs them.
    let standin_ca = run_dir.join("standin-ca.pem");
    let (dns_addr, standin_addr) = match ns_of("stand-in") {
        Some((_, a)) => (SocketAddr::new(a, 53), SocketAddr::new(a, 443)),
        None => (
            SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), free_port()?),
            SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), free_port()?),
        ),
    };
    let mut standin_argv = vec![
        bin.clone(),
        "stand-in".into(),
        "--dns-listen".into(),
        dns_addr.to_string(),
        "--https-listen".into(),
        standin_addr.to_string(),
    ];
    if args.stand_in {
        for h in &plan.external_hosts {
            standin_argv.extend(["--host".into(), h.clone()]);
        }
        standin_argv.extend(["--ca-out".into(), standin_ca.to_string_lossy().into_owned()]);
    } else {
        // Workloads resolve external names to an address in the mesh subnet
        // (their sidecar captures the connection before it leaves).
        for h in &plan.external_hosts {
            standin_argv.extend(["--record".into(), format!("{h}={}", addr_of(254))]);
        }
    }
    // Gateways' addresses, for the Services that select them.
    let gateway_addr = |key: &str| match ns_of(key) {
        Some((_, a)) => a,
        None if gateway_in_host => host_ip,
        None => IpAddr::V4(Ipv4Addr::LOCALHOST),
    };
    for (fqdn, selected, _) in &plan.services {
        if let Some(g) = selected
            .iter()
            .find(|k| plan.gateways.iter().any(|g| &g.0 == *k))
        {
            let a = gateway_addr(g);
            standin_argv.extend(["--record".into(), format!("{fqdn}={a}")]);
        }
    }
    let standin_argv = match ns_of("stand-in") {
        Some((ns, _)) => [
            vec!["ip".into(), "netns".into(), "exec".into(), ns],
            standin_argv,
        ]
        .concat(),
        None => standin_argv,
    };
    let needs_standin = args.stand_in || mode == Mode::Namespaces;
    if needs_standin {
        runner.spawn("stand-in", &standin_argv, &[], true, cleanup)?;
        wait_ready(&mut rx, width, "stand-in", "stand-in running").await?;
    }

    // Gateways.
    let mut table = vec![(
        "PART".to_owned(),
        "ADDRESS".to_owned(),
        "IDENTITY".to_owned(),
        "METRICS".to_owned(),
        "READY".to_owned(),
    )];
    let mut gateway_ports: HashMap<String, u16> = HashMap::new();
    for (key, name, spiffe) in &plan.gateways {
        let (ns, a) = match ns_of(key) {
            Some((ns, a)) => (Some(ns), a),
            None if gateway_in_host => (None, host_ip),
            None => (None, IpAddr::V4(Ipv4Addr::LOCALHOST)),
        };
        let (admin, prom, health, http) = match (&ns, gateway_in_host) {
            (Some(_), _) | (None, true) => (15020, 15090, 15021, HTTP_PORT),
            (None, false) => (free_port()?, free_port()?, free_port()?, free_port()?),
        };
        gateway_ports.insert(key.clone(), http);
        let mut argv = vec![bin.clone(), "gateway".into()];
        argv.extend(config_args.iter().cloned());
        argv.extend([
            "--workload".into(),
            key.clone(),
            "--ca-addr".into(),
            ca_addr.to_string(),
            "--ca-token-file".into(),
            tokens[key].to_string_lossy().into_owned(),
            "--ca-root-cert".into(),
            root_file.to_string_lossy().into_owned(),
            "--bind-address".into(),
            a.to_string(),
            "--admin-address".into(),
            a.to_string(),
            "--admin-port".into(),
            admin.to_string(),
            "--prometheus-port".into(),
            prom.to_string(),
            "--health-port".into(),
            health.to_string(),
            "--port".into(),
            format!("{HTTP_PORT}={http}"),
        ]);
        if args.stand_in {
            argv.extend([
                "--extra-roots".into(),
                standin_ca.to_string_lossy().into_owned(),
            ]);
            match ns_of("stand-in") {
                Some(_) => argv.extend(["--dns-server".into(), dns_addr.to_string()]),
                None => {
                    // Loopback: external hosts' port 443 is the stand-in's port.
                    let ep = run_dir.join(format!("endpoints-{name}"));
                    let lines: String = plan
                        .external_hosts
                        .iter()
                        .map(|h| format!("{h}:443 {standin_addr}\n"))
                        .collect();
                    write_world_readable(&ep, &lines)?;
                    argv.extend(["--endpoints".into(), ep.to_string_lossy().into_owned()]);
                }
            }
        }
        let argv = match ns_of(key) {
            Some((ns, _)) => [
                vec![
                    "ip".into(),
                    "netns".into(),
                    "exec".into(),
                    ns,
                    "setpriv".into(),
                    format!("--reuid={PROXY_UID}"),
                    format!("--regid={PROXY_UID}"),
                    "--clear-groups".into(),
                ],
                argv,
            ]
            .concat(),
            None => argv,
        };
        runner.spawn(name, &argv, &[], true, cleanup)?;
        wait_ready(&mut rx, width, name, "egress gateway running").await?;
        table.push((
            name.clone(),
            format!("{a}:{http}"),
            spiffe.clone(),
            format!("http://{a}:{admin}/stats/prometheus"),
            format!("http://{a}:{health}/healthz/ready"),
        ));
    }

    // Sidecars, and the capture in front of them.
    let mut proxy_env: HashMap<String, String> = HashMap::new();
    for (key, name, spiffe) in &plan.sidecars {
        let part = format!("{name}-sidecar");
        let ns = ns_of(key);
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
        let mut argv = vec![bin.clone(), "sidecar".into()];
        argv.extend(config_args.iter().cloned());
        argv.extend([
            "--workload".into(),
            key.clone(),
            "--ca-addr".into(),
            ca_addr.to_string(),
            "--ca-token-file".into(),
            tokens[key].to_string_lossy().into_owned(),
            "--ca-root-cert".into(),
            root_file.to_string_lossy().into_owned(),
            "--admin-address".into(),
            a.to_string(),
            "--admin-port".into(),
            admin.to_string(),
            "--prometheus-port".into(),
            prom.to_string(),
            "--health-port".into(),
            health.to_string(),
            "--outbound-port".into(),
            outbound.to_string(),
        ]);
        match &ns {
            Some((ns_name, _)) => {
                argv.extend(["--dns-server".into(), dns_addr.to_string()]);
                // Name resolution for the workload: our DNS.
                let etc = PathBuf::from(format!("/etc/netns/{ns_name}"));
                std::fs::create_dir_all(&etc)?;
                cleanup.netns_etc.push(etc.clone());
                let (wns, _) = key.split_once('/').unwrap_or(("default", ""));
                std::fs::write(
                    etc.join("resolv.conf"),
                    format!(
                        "nameserver {}\nsearch {wns}.svc.cluster.local svc.cluster.local cluster.local\n",
                        dns_addr.ip()
                    ),
                )?;
                // iptables capture, as istio-init does, before the app starts.
                let o = std::process::Command::new("ip")
                    .args(["netns", "exec", ns_name, &bin, "iptables"])
                    .output()?;
                if !o.status.success() {
                    bail!(
                        "installing iptables capture for {key}: {}",
                        String::from_utf8_lossy(&o.stderr).trim()
                    );
                }
            }
            None => {
                // Loopback: Services resolve to the gateways' local ports.
                let ep = run_dir.join(format!("endpoints-{name}"));
                let mut lines = String::new();
                for (fqdn, selected, port) in &plan.services {
                    if let Some(g) = selected.iter().find(|k| gateway_ports.contains_key(*k)) {
                        let _ = writeln!(lines, "{fqdn}:{port} 127.0.0.1:{}", gateway_ports[g]);
                    }
                }
                write_world_readable(&ep, &lines)?;
                argv.extend([
                    "--endpoints".into(),
                    ep.to_string_lossy().into_owned(),
                    "--outbound-address".into(),
                    "127.0.0.1".into(),
                ]);
                proxy_env.insert(key.clone(), format!("http://127.0.0.1:{outbound}"));
            }
        }
        let argv = match &ns {
            Some((ns_name, _)) => [
                vec![
                    "ip".into(),
                    "netns".into(),
                    "exec".into(),
                    ns_name.clone(),
                    "setpriv".into(),
                    format!("--reuid={PROXY_UID}"),
                    format!("--regid={PROXY_UID}"),
                    "--clear-groups".into(),
                ],
                argv,
            ]
            .concat(),
            None => argv,
        };
        runner.spawn(&part, &argv, &[], true, cleanup)?;
        wait_ready(&mut rx, width, &part, "sidecar running").await?;
        table.push((
            part.clone(),
            a.to_string(),
            spiffe.clone(),
            format!("http://{a}:{admin}/stats/prometheus"),
            format!("http://{a}:{health}/healthz/ready"),
        ));
    }

    // The workloads' own commands.
    for (key, argv) in &plan.commands {
        let name = key.split('/').nth(1).unwrap_or(key).to_owned();
        let mut env: Vec<(&str, String)> = Vec::new();
        if let Some(p) = proxy_env.get(key) {
            env.push(("http_proxy", p.clone()));
            env.push(("HTTP_PROXY", p.clone()));
        }
        let full = match ns_of(key) {
            Some((ns, _)) => [
                vec!["ip".into(), "netns".into(), "exec".into(), ns],
                argv.clone(),
            ]
            .concat(),
            None => argv.clone(),
        };
        runner.spawn(&name, &full, &env, false, cleanup)?;
        let addr = ns_of(key).map_or_else(|| "127.0.0.1".to_owned(), |x| x.1.to_string());
        table.push((
            name,
            addr,
            "(workload command)".into(),
            "-".into(),
            "-".into(),
        ));
    }

    // The parts table.
    let w: [usize; 4] = [0, 1, 2, 3].map(|i| {
        table
            .iter()
            .map(|r| [&r.0, &r.1, &r.2, &r.3][i].len())
            .max()
            .unwrap_or(0)
    });
    for r in &table {
        println!(
            "{:<width$} | {:<w0$}  {:<w1$}  {:<w2$}  {:<w3$}  {}",
            "meshgate up",
            r.0,
            r.1,
            r.2,
            r.3,
            r.4,
            w0 = w[0],
            w1 = w[1],
            w2 = w[2],
            w3 = w[3]
        );
    }
    // Where each part lives, for `ip netns exec` by hand.
    let mut in_ns: Vec<(&String, &String)> = part_ns.iter().map(|(k, (ns, _))| (k, ns)).collect();
    in_ns.sort();
    for (key, ns) in in_ns {
        println!("{:<width$} | netns {ns}: {key}", "meshgate up");
    }
    println!(
        "{:<width$} | all parts running; Ctrl-C stops everything",
        "meshgate up"
    );

    // Forward output until a signal or a proxy failure.
    let mut parts = std::mem::take(&mut runner.parts);
    let watch_tx = tx.clone();
    for mut p in parts.drain(..) {
        let tx = watch_tx.clone();
        tokio::spawn(async move {
            let status = p
                .child
                .wait()
                .await
                .map_or_else(|e| e.to_string(), |s| s.to_string());
            let _ = tx.send(Event::Exited(p.name, p.essential, status));
        });
    }
    let signal = crate::shutdown_signal();
    tokio::pin!(signal);
    loop {
        tokio::select! {
            _ = &mut signal => {
                println!("{:<width$} | stopping", "meshgate up");
                return Ok(ExitCode::SUCCESS);
            }
            ev = rx.recv() => match ev {
                Some(Event::Line(name, line)) => println!("{name:<width$} | {line}"),
                Some(Event::Exited(name, true, status)) => bail!("{name} exited ({status}); stopping everything"),
                Some(Event::Exited(name, false, status)) => println!("{name:<width$} | exited ({status})"),
                None => return Ok(ExitCode::SUCCESS),
            }
        }
    }
}

fn free_port() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// 128 random bits from the kernel, as hex.
fn random_token() -> anyhow::Result<String> {
    use std::io::Read;
    let mut b = [0u8; 16];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut b)?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

/// Copies the YAML the user gave into one readable folder (names kept;
/// files from several folders get a numbered prefix only on a clash).
fn copy_config(paths: &[PathBuf], out: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(out)?;
    std::fs::set_permissions(out, std::fs::Permissions::from_mode(0o755))?;
    let mut n = 0;
    let mut copy = |file: &Path| -> anyhow::Result<()> {
        let name = file
            .file_name()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let mut dest = out.join(&name);
        if dest.exists() {
            n += 1;
            dest = out.join(format!("{n}-{name}"));
        }
        std::fs::copy(file, &dest).with_context(|| format!("copying {}", file.display()))?;
        std::fs::set_permissions(&dest, std::fs::Permissions::from_mode(0o644))?;
        Ok(())
    };
    for p in paths {
        if p.is_dir() {
            let mut files: Vec<PathBuf> = walk(p)?;
            files.sort();
            for f in files {
                copy(&f)?;
            }
        } else {
            copy(p)?;
        }
    }
    Ok(())
}

fn walk(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir)? {
        let p = e?.path();
        if p.is_dir() {
            out.extend(walk(&p)?);
        } else if matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")) {
            out.push(p);
        }
    }
    Ok(out)
}

/// Removes namespaces left by an `up` that was killed (SIGKILL, power loss).
fn remove_stale() {
    let Ok(o) = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
    else {
        return;
    };
    for line in String::from_utf8_lossy(&o.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        let Some(rest) = name.strip_prefix("mgup-") else {
            continue;
        };
        let pid_hex = rest.split('-').next().unwrap_or("");
        let Ok(pid) = u32::from_str_radix(pid_hex, 16) else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::process::Command::new("ip")
                .args(["netns", "del", name])
                .status();
            let _ = std::fs::remove_dir_all(format!("/etc/netns/{name}"));
        }
    }
}
