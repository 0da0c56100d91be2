//! Proxies inside a test (feature `testing`): sidecars and gateways built
//! by `app` exactly as the binary builds them, on 127.0.0.1 with port 0,
//! identities from an in-memory CA, real HTTPS and DNS stand-ins for
//! external hosts, access logs captured as JSON. Real sockets and real TLS
//! all the way; nothing needs root. (ztunnel's `app::build` with a test CA.)
//!
//! Tests wait for events, never for time: `TestProxy::next_log` returns the
//! next access-log entry, written when a request's response ends (after its
//! metrics are recorded), within a bounded wait.

#![allow(clippy::unwrap_used, clippy::missing_panics_doc)]

use std::collections::HashMap;
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use meshgate_config::model::Config;
use meshgate_config::view::ProxyView;
use meshgate_config::{MeshSettings, view};
use meshgate_identity::{CertificateAuthority, Source, SpiffeId, WorkloadIdentity};
use meshgate_telemetry::{AccessLog, AccessLogFormat, Metrics};
use rustls_pki_types::CertificateDer;
use tokio::sync::{Mutex, mpsc};

use crate::app::{App, Options};
use crate::proxy::Proxy;
use crate::sidecar::OriginalDst;
use crate::snapshot::{BuildContext, Snapshot};
use crate::standin::{self, DnsZone, Seen, StandinCa};
use crate::upstream::dns::Resolver;
use crate::upstream::tls::DefaultRoots;

/// The seed's egress gateway workload.
pub const GATEWAY: &str = "curl-egress-tst/curl-egress-tst-gateway";
/// The seed's workload with a sidecar.
pub const WORKLOAD: &str = "curl-external-tst/curl-test";
/// The seed workload's identity.
pub const CURL_ID: &str = "spiffe://cluster.local/ns/curl-external-tst/sa/default";
/// The seed's external host.
pub const HOST: &str = "jsonplaceholder.typicode.com";
/// The gateway's Service, as the sidecar's cluster names it.
pub const GATEWAY_SERVICE: &str = "curl-egress-tst.curl-egress-tst.svc.cluster.local:80";
/// A server-first protocol's service behind the gateway: smtp.example.com
/// (port 25, TCP) on a plain TCP Gateway server, port 2525, by a `tcp`
/// route.
pub const SMTP_BEHIND_GATEWAY: &str = "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: smtp, namespace: curl-egress-tst}
spec:
  hosts: [smtp.example.com]
  ports: [{number: 25, name: tcp-smtp, protocol: TCP}]
  resolution: DNS
---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: smtp-gw, namespace: curl-egress-tst}
spec:
  selector: {istio: egressgateway}
  servers: [{port: {number: 2525, name: tcp, protocol: TCP}, hosts: [smtp.example.com]}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: smtp, namespace: curl-egress-tst}
spec:
  hosts: [smtp.example.com]
  gateways: [smtp-gw]
  tcp: [{route: [{destination: {host: smtp.example.com, port: {number: 25}}}]}]
";
const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
const WAIT: Duration = Duration::from_secs(10);

/// A folder removed when dropped.
#[derive(Debug)]
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(name: &str) -> TempDir {
        let d = std::env::temp_dir().join(format!(
            "meshgate-{name}-{}-{:08x}",
            std::process::id(),
            fastrand::u32(..)
        ));
        std::fs::create_dir_all(&d).unwrap();
        TempDir(d)
    }

    pub fn path(&self, p: &str) -> String {
        self.0.join(p).to_str().unwrap().to_owned()
    }

    pub fn write(&self, name: &str, text: &str) -> String {
        let p = self.path(name);
        std::fs::write(&p, text).unwrap();
        p
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The seed's YAML (examples/seed) and `extra` documents, loaded as the
/// proxies load files; panics on any error.
pub fn seed_config(extra: &[&str]) -> Config {
    seed_config_except(&[], extra)
}

/// The seed's YAML without the files named in `skip`, and `extra`.
pub fn seed_config_except(skip: &[&str], extra: &[&str]) -> Config {
    let seed = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/seed");
    let files: Vec<PathBuf> = std::fs::read_dir(seed)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .filter(|p| !skip.iter().any(|s| p.ends_with(s)))
        .collect();
    let mut loaded = meshgate_config::load_paths(&files).unwrap();
    for (i, text) in extra.iter().enumerate() {
        meshgate_config::load::load_str(&format!("extra-{i}.yaml"), text, &mut loaded).unwrap();
    }
    let errors: Vec<String> = loaded
        .diagnostics
        .iter()
        .filter(|d| d.level == meshgate_config::Level::Error)
        .map(ToString::to_string)
        .collect();
    assert!(errors.is_empty(), "{errors:?}");
    loaded.config
}

/// Writes the seed's YAML files (without those in `skip`) and `extra`
/// documents into `dir/name`, for tools that read files (`meshgate
/// explain`); `seed_config_except` loads the same.
pub fn seed_files(dir: &TempDir, name: &str, skip: &[&str], extra: &[&str]) -> String {
    let out = dir.0.join(name);
    std::fs::create_dir_all(&out).unwrap();
    let seed = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/seed");
    for e in std::fs::read_dir(seed).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "yaml") && !skip.iter().any(|s| p.ends_with(s)) {
            std::fs::copy(&p, out.join(p.file_name().unwrap())).unwrap();
        }
    }
    for (i, text) in extra.iter().enumerate() {
        std::fs::write(out.join(format!("extra-{i}.yaml")), text).unwrap();
    }
    out.to_str().unwrap().to_owned()
}

/// The mesh's CA, in memory.
#[derive(Debug)]
pub struct Mesh {
    pub ca: Arc<CertificateAuthority>,
}

impl Default for Mesh {
    fn default() -> Self {
        Mesh {
            ca: Arc::new(CertificateAuthority::generate("cluster.local").unwrap()),
        }
    }
}

impl Mesh {
    pub async fn identity(&self, id: &str) -> Arc<WorkloadIdentity> {
        let id: SpiffeId = id.parse().unwrap();
        let source = Source::InProcess {
            ca: self.ca.clone(),
            ttl: Duration::from_secs(3600),
        };
        WorkloadIdentity::start(id, source).await.unwrap()
    }

    /// A mesh peer for curl: a workload certificate for `id` in Istio's
    /// file layout under `dir`.
    pub fn client(&self, id: &str, dir: &TempDir) -> MeshClient {
        let name = id.replace(['/', ':'], "_");
        let issued = self
            .ca
            .issue(&id.parse().unwrap(), Duration::from_secs(3600))
            .unwrap();
        issued.write_to(&dir.0.join(&name)).unwrap();
        MeshClient {
            cert: dir.path(&format!("{name}/cert-chain.pem")),
            key: dir.path(&format!("{name}/key.pem")),
        }
    }
}

/// curl as a mesh peer, with a workload certificate.
#[derive(Debug, Clone)]
pub struct MeshClient {
    pub cert: String,
    pub key: String,
}

impl MeshClient {
    /// `https://host:port/path` over mutual TLS to 127.0.0.1 (`-k`: curl
    /// cannot check SPIFFE IDs; the proxy's check of curl is what is
    /// tested).
    pub async fn get(&self, host: &str, port: u16, path: &str, extra: &[&str]) -> Curl {
        let resolve = format!("{host}:{port}:127.0.0.1");
        let url = format!("https://{host}:{port}{path}");
        let mut args = vec![
            "-k",
            "--cert",
            &self.cert,
            "--key",
            &self.key,
            "--resolve",
            &resolve,
        ];
        args.extend_from_slice(extra);
        args.push(&url);
        curl(&args).await
    }
}

/// An external host: the HTTPS stand-in on 127.0.0.1 with its own CA.
#[derive(Debug)]
pub struct External {
    pub addr: SocketAddr,
    pub seen: Seen,
    pub ca: StandinCa,
}

impl External {
    /// Serves HTTPS for `names` (the certificate's DNS names).
    pub async fn start(names: &[&str]) -> External {
        let ca = StandinCa::new("stand-in CA").unwrap();
        let names: Vec<String> = names.iter().map(|s| (*s).to_owned()).collect();
        let tls = ca.server_config(&names).unwrap();
        let listener = tokio::net::TcpListener::bind((LOCALHOST, 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Seen::default();
        tokio::spawn(standin::serve_https(listener, tls, seen.clone()));
        External { addr, seen, ca }
    }

    pub fn root(&self) -> CertificateDer<'static> {
        meshgate_identity::cert::parse_certs(&self.ca.root_pem)
            .unwrap()
            .remove(0)
    }
}

/// Files for a server certificate for `name` from a new CA of its own:
/// (certificate, key, CA certificate) paths in `dir`.
pub fn server_cert_files(dir: &TempDir, name: &str) -> (String, String, String) {
    let ca = StandinCa::new(&format!("{name} CA")).unwrap();
    let (cert, key) = ca.server_cert_pem(&[name.to_owned()]).unwrap();
    (
        dir.write(&format!("{name}-cert.pem"), &cert),
        dir.write(&format!("{name}-key.pem"), &key),
        dir.write(&format!("{name}-ca.pem"), &ca.root_pem),
    )
}

/// A plain-HTTP server answering like the external API (a stand-in for a
/// plaintext service: where ALLOW_ANY traffic goes).
pub async fn plain_http() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind((LOCALHOST, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(standin::serve_http(listener));
    addr
}

/// A TCP server echoing what each connection sends: a stand-in for an
/// external host behind a TCP route.
pub async fn tcp_echo() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind((LOCALHOST, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

/// Whether an access-log entry's `upstream_transport_failure_reason`
/// mentions `what`.
pub fn failure_reason_mentions(entry: &serde_json::Value, what: &str) -> bool {
    entry["upstream_transport_failure_reason"]
        .as_str()
        .is_some_and(|r| r.contains(what))
}

/// A DNS server answering `names` with 127.0.0.1 (and NXDOMAIN for others).
pub async fn dns(names: &[&str]) -> SocketAddr {
    let mut zone = DnsZone::default();
    for n in names {
        zone.insert(n, LOCALHOST);
    }
    standin::serve_dns((LOCALHOST, 0).into(), zone)
        .await
        .unwrap()
}

/// What a proxy under test is built from.
#[derive(Debug)]
pub struct Spec {
    pub config: Config,
    pub workload: String,
    /// `host:port` → addresses, instead of DNS.
    pub endpoints: HashMap<String, Vec<SocketAddr>>,
    /// Roots for TLS origination (none: only a CA that signed nothing).
    pub roots: Vec<CertificateDer<'static>>,
    /// The DNS server clusters resolve with (none: one that knows nothing).
    pub dns: Option<SocketAddr>,
    /// A sidecar's outbound listener is also an explicit HTTP proxy.
    pub explicit_proxy: bool,
    /// MeshConfig.
    pub mesh: MeshSettings,
    /// How long downstreams may take.
    pub timeouts: crate::listener::Timeouts,
    /// Downstream connections open at once, at most.
    pub max_connections: Option<usize>,
}

impl Spec {
    pub fn new(config: Config, workload: &str) -> Spec {
        Spec {
            config,
            workload: workload.to_owned(),
            endpoints: HashMap::new(),
            roots: Vec::new(),
            dns: None,
            explicit_proxy: true,
            mesh: MeshSettings::default(),
            timeouts: crate::listener::Timeouts::default(),
            max_connections: None,
        }
    }

    /// Connect to `addr` for `host_port` (`host:port`).
    pub fn endpoint(mut self, host_port: &str, addr: SocketAddr) -> Spec {
        self.endpoints.insert(host_port.to_owned(), vec![addr]);
        self
    }

    pub fn trust(mut self, root: CertificateDer<'static>) -> Spec {
        self.roots.push(root);
        self
    }

    pub fn dns(mut self, server: SocketAddr) -> Spec {
        self.dns = Some(server);
        self
    }

    async fn context(&self, identity: Arc<WorkloadIdentity>) -> BuildContext {
        let dns = match self.dns {
            Some(d) => d,
            None => dns(&[]).await,
        };
        let mut roots = self.roots.clone();
        if roots.is_empty() {
            let nobody = StandinCa::new("trusts nothing").unwrap();
            roots = meshgate_identity::cert::parse_certs(&nobody.root_pem).unwrap();
        }
        BuildContext {
            resolver: Resolver::new(Some(dns)).unwrap(),
            roots: DefaultRoots::only(roots).unwrap(),
            identity: Some(identity),
            endpoints: self.endpoints.clone(),
        }
    }
}

/// A running proxy with its access log captured.
#[derive(Debug)]
pub struct TestProxy {
    pub app: App,
    pub metrics: Arc<Metrics>,
    spec: Spec,
    ctx: BuildContext,
    logs: Mutex<mpsc::UnboundedReceiver<serde_json::Value>>,
}

impl TestProxy {
    /// Builds and starts the proxy of `spec.workload`, listening on
    /// 127.0.0.1 (every port 0).
    pub async fn start(mesh: &Mesh, spec: Spec) -> TestProxy {
        let view = view::build(&spec.config, &spec.mesh, &spec.workload).unwrap();
        let identity = mesh.identity(&view.workload.spiffe_id).await;
        let ctx = spec.context(identity.clone()).await;
        let snapshot = Snapshot::build(view, &ctx).unwrap();
        let (tx, rx) = mpsc::unbounded_channel();
        let log = AccessLog::new(AccessLogFormat::Json, Box::new(LogSink(tx, Vec::new())));
        let metrics = Arc::new(Metrics::new());
        let mut proxy = Proxy::new(snapshot, &identity, metrics.clone(), Arc::new(log)).unwrap();
        proxy.timeouts = spec.timeouts;
        proxy.max_connections = spec.max_connections;
        let options = Options {
            bind: LOCALHOST,
            port_overrides: HashMap::new(),
            any_free_port: true,
            outbound: (LOCALHOST, 0).into(),
            original_dst: OriginalDst::Socket,
            explicit_proxy: spec.explicit_proxy,
            inbound: None,
        };
        let app = App::start(Arc::new(proxy), &options).await.unwrap();
        TestProxy {
            app,
            metrics,
            spec,
            ctx,
            logs: Mutex::new(rx),
        }
    }

    /// The address serving `port`: a Gateway server's port, or a sidecar's
    /// outbound listener (any port: it is the explicit-proxy port).
    pub fn addr(&self, port: u16) -> SocketAddr {
        let addrs = self.app.addresses();
        match addrs.iter().find(|(p, _)| *p == port) {
            Some((_, a)) => *a,
            None if self.app.proxy.role == crate::snapshot::Role::Sidecar => addrs[0].1,
            None => panic!("no listener for port {port}: {addrs:?}"),
        }
    }

    /// A listener taking connections as captured on their way to
    /// `original` (sidecars).
    pub async fn capture(&mut self, original: SocketAddr) -> SocketAddr {
        self.app
            .capture_for(LOCALHOST, original)
            .await
            .unwrap()
            .expect("a sidecar")
    }

    /// A listener taking connections as captured on their way in to the
    /// workload, to `original` (sidecars).
    pub async fn capture_inbound(&mut self, original: SocketAddr) -> SocketAddr {
        self.app
            .capture_inbound_for(LOCALHOST, original)
            .await
            .unwrap()
            .expect("a sidecar")
    }

    /// The next access-log entry (within 10 s).
    pub async fn next_log(&self) -> serde_json::Value {
        let mut rx = self.logs.lock().await;
        match tokio::time::timeout(WAIT, rx.recv()).await {
            Ok(Some(entry)) => entry,
            _ => panic!("no access-log entry within {WAIT:?}"),
        }
    }

    /// The access-log entry of the request with this `x-request-id`
    /// (entries before it are passed over), within 10 s.
    pub async fn log_of(&self, request_id: &str) -> serde_json::Value {
        self.log_where(&format!("for request {request_id}"), |e| {
            e["request_id"] == request_id
        })
        .await
    }

    /// The next access-log entry with this status (others are passed
    /// over), within 10 s.
    pub async fn log_of_status(&self, status: u16) -> serde_json::Value {
        self.log_where(&format!("with status {status}"), |e| {
            e["response_code"] == status
        })
        .await
    }

    /// The next access-log entry that `wanted` accepts (others are passed
    /// over), within 10 s.
    pub async fn log_where(
        &self,
        what: &str,
        wanted: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let mut rx = self.logs.lock().await;
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(entry)) if wanted(&entry) => return entry,
                Ok(Some(_)) => {}
                _ => panic!("no access-log entry {what} within {WAIT:?}"),
            }
        }
    }

    /// `/stats/prometheus`, as the admin port serves it.
    pub fn metrics_text(&self) -> String {
        self.metrics.encode()
    }

    /// Waits (up to 10 s) until a metric has the value `want`: counters
    /// of a connection are written when it closes, a moment after the
    /// client saw it close.
    pub async fn metric_reaches(&self, name: &str, labels: &[(&str, &str)], want: f64) {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let text = self.metrics_text();
            if metric_value(&text, name, labels) == Some(want) {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{name} {labels:?} never reached {want}:\n{text}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Waits until `meshgate_downstream_refused_total{reason}` is `want`.
    pub async fn refused_reaches(&self, reason: &str, want: f64) {
        let labels = [("reason", reason)];
        self.metric_reaches("meshgate_downstream_refused_total", &labels, want)
            .await;
    }

    /// Applies another config, as a reload does.
    pub async fn reload(&mut self, config: Config) {
        self.spec.config = config;
        let view = view::build(
            &self.spec.config,
            &MeshSettings::default(),
            &self.spec.workload,
        )
        .unwrap();
        let old = self.app.proxy.state.load_full();
        let snap = Snapshot::rebuild(view, &self.ctx, Some(&old)).unwrap();
        self.app.reload(snap).await.unwrap();
    }
}

/// Access-log lines, parsed, into a channel.
struct LogSink(mpsc::UnboundedSender<serde_json::Value>, Vec<u8>);

impl Write for LogSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.1.extend_from_slice(buf);
        while let Some(i) = self.1.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = self.1.drain(..=i).collect();
            if let Ok(v) = serde_json::from_slice(&line) {
                let _ = self.0.send(v);
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The seed system in one process: the external host's stand-in, the
/// egress gateway (trusting the stand-in's CA, reaching it for
/// jsonplaceholder.typicode.com:443) and the workload's sidecar (reaching
/// the gateway's Service at the gateway).
#[derive(Debug)]
pub struct SeedChain {
    pub mesh: Mesh,
    pub external: External,
    pub gateway: TestProxy,
    pub sidecar: TestProxy,
    pub dir: TempDir,
}

impl SeedChain {
    /// The seed plus `extra` YAML documents, for both proxies.
    pub async fn start(extra: &[&str]) -> SeedChain {
        Self::with(seed_config(extra)).await
    }

    /// `config` for both proxies.
    pub async fn with(config: Config) -> SeedChain {
        Self::with_endpoints(config, &[]).await
    }

    /// `config` for both proxies; the sidecar reaches `host:port` at the
    /// address given.
    pub async fn with_endpoints(config: Config, sidecar: &[(&str, SocketAddr)]) -> SeedChain {
        Self::with_sidecar(config, |mut spec| {
            for (host_port, addr) in sidecar {
                spec = spec.endpoint(host_port, *addr);
            }
            spec
        })
        .await
    }

    /// `config` for both proxies; `adjust` changes the sidecar's spec
    /// (timeouts, endpoints, explicit proxy).
    pub async fn with_sidecar(config: Config, adjust: impl FnOnce(Spec) -> Spec) -> SeedChain {
        let mesh = Mesh::default();
        let external = External::start(&[HOST]).await;
        let gateway = TestProxy::start(&mesh, Self::gateway_spec(config.clone(), &external)).await;
        let sidecar_spec = Spec::new(config, WORKLOAD).endpoint(GATEWAY_SERVICE, gateway.addr(80));
        let sidecar = TestProxy::start(&mesh, adjust(sidecar_spec)).await;
        SeedChain {
            mesh,
            external,
            gateway,
            sidecar,
            dir: TempDir::new("chain"),
        }
    }

    /// The gateway of `config`, with the external host's stand-in as
    /// jsonplaceholder.typicode.com:443.
    pub fn gateway_spec(config: Config, external: &External) -> Spec {
        Spec::new(config, GATEWAY)
            .endpoint(&format!("{HOST}:443"), external.addr)
            .trust(external.root())
    }

    /// curl as a mesh peer of identity `id` (mutual TLS with a workload
    /// certificate; `-k`: curl cannot check SPIFFE IDs, the gateway's check
    /// of curl is what is tested), to the seed host on the gateway's port 80.
    pub async fn mtls_get(&self, id: &str, path: &str) -> Curl {
        self.mtls_request(id, HOST, path).await
    }

    /// The same for any host.
    pub async fn mtls_request(&self, id: &str, host: &str, path: &str) -> Curl {
        let port = self.gateway.addr(80).port();
        self.mesh
            .client(id, &self.dir)
            .get(host, port, path, &[])
            .await
    }

    /// curl in plaintext to the seed host on the gateway's port 80.
    pub async fn plain_get(&self, path: &str) -> Curl {
        self.plain_request(HOST, path).await
    }

    /// The same for any host.
    pub async fn plain_request(&self, host: &str, path: &str) -> Curl {
        let port = self.gateway.addr(80).port();
        curl(&[
            "--resolve",
            &format!("{host}:{port}:127.0.0.1"),
            &format!("http://{host}:{port}{path}"),
        ])
        .await
    }

    /// curl with the sidecar as its explicit HTTP proxy.
    pub async fn via_sidecar(&self, url: &str, extra: &[&str]) -> Curl {
        let proxy = format!("http://{}", self.sidecar.addr(15001));
        let mut args = vec!["-x", &proxy];
        args.extend_from_slice(extra);
        args.push(url);
        curl(&args).await
    }
}

/// What curl printed: the body, the status code (`000` for none) and its
/// exit code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Curl {
    pub body: String,
    pub code: String,
    pub exit: i32,
}

impl Curl {
    /// (code, body), for one assertion.
    pub fn answer(&self) -> (&str, &str) {
        (&self.code, &self.body)
    }
}

/// `https://host:port/path` trusting only `ca` (a PEM file), connecting to
/// `at` whatever the name resolves to.
pub async fn https_get(ca: &str, host: &str, port: u16, at: SocketAddr, path: &str) -> Curl {
    let to = format!("{host}:{port}:{}:{}", at.ip(), at.port());
    let url = format!("https://{host}:{port}{path}");
    curl(&["--cacert", ca, "--connect-to", &to, &url]).await
}

/// Runs curl (bounded: 10 s).
pub async fn curl(args: &[&str]) -> Curl {
    let o = tokio::process::Command::new("curl")
        .args(["-sS", "--max-time", "10", "-w", "\n%{http_code}"])
        .args(args)
        .output()
        .await
        .expect("curl is installed (.ci/run installs it)");
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    let (body, code) = out.rsplit_once('\n').unwrap_or(("", &out));
    Curl {
        body: body.to_owned(),
        code: code.to_owned(),
        exit: o.status.code().unwrap_or(-1),
    }
}

/// The value of a metric line with all these label pairs, if present.
pub fn metric_value(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .find(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// Runs `promtool check metrics` on exposition text. Passing means: valid
/// exposition format, and no lint problem except the one Istio's own metric
/// name carries (`istio_request_duration_milliseconds` is not in seconds;
/// Istio's name is the contract). promtool exits 1 for format errors, 3 for
/// lint problems only.
pub fn promtool_check(text: &str) -> (bool, String) {
    let mut child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool is installed (Debian's prometheus package; .ci/run installs it)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let o = child.wait_with_output().unwrap();
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    let code = o.status.code().unwrap_or(-1);
    let only_istio_unit = report
        .lines()
        .filter(|l| !l.trim().is_empty())
        .all(|l| l == "istio_request_duration_milliseconds use base unit \"seconds\" instead of \"milliseconds\"");
    (code == 0 || (code == 3 && only_istio_unit), report)
}

/// The external hosts of a generated scale config: `h{i}.scale.example`.
pub fn scale_host(i: usize) -> String {
    format!("h{i}.scale.example")
}

/// How a generated scale config declares its external hosts
/// (`h{i}.scale.example`, all in the gateway's namespace).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScaleShape {
    /// Per host what the seed has for its one: a ServiceEntry with HTTP on
    /// 80 and 443, a VirtualService on the shared `*.scale.example`
    /// Gateway (port 80) to 443, a DestinationRule originating TLS with SNI.
    PerHost,
    /// One ServiceEntry with every host (and the shared Gateway).
    OneEntry,
    /// Istio's egress pattern per host: `PerHost` with a Gateway of the
    /// host's own that its VirtualService names.
    GatewayPerHost,
    /// Mesh-bound, each exported to its namespace only (`exportTo: ['.']`):
    /// a ServiceEntry, a VirtualService with a timeout, a DestinationRule
    /// with a connection pool setting.
    MeshExported,
    /// A VirtualService routing to a subset its DestinationRule declares
    /// (without labels, as Istio's egress examples name the gateway's).
    Subsets,
}

impl ScaleShape {
    /// Every shape, in the order the scale benchmark runs them.
    pub const ALL: [ScaleShape; 5] = [
        ScaleShape::PerHost,
        ScaleShape::OneEntry,
        ScaleShape::GatewayPerHost,
        ScaleShape::MeshExported,
        ScaleShape::Subsets,
    ];

    /// What the shape is, for a benchmark's table.
    pub fn describe(self) -> &'static str {
        match self {
            ScaleShape::PerHost => "ServiceEntry + VirtualService + DestinationRule each",
            ScaleShape::OneEntry => "in one ServiceEntry",
            ScaleShape::GatewayPerHost => "a Gateway each too",
            ScaleShape::MeshExported => "mesh-bound, exportTo '.'",
            ScaleShape::Subsets => "routed to a subset each",
        }
    }
}

/// A generated config of `n` external hosts of `shape` beside the seed,
/// in ten files (name, YAML). The scale benchmarks (issue: performance)
/// load these.
pub fn scale_files(n: usize, shape: ScaleShape) -> Vec<(String, String)> {
    const FILES: usize = 10;
    let mut files: Vec<String> = vec![String::new(); FILES];
    if shape != ScaleShape::GatewayPerHost {
        files[0].push_str(&scale_gateway("scale-gateway", "\"*.scale.example\""));
    }
    if shape == ScaleShape::OneEntry {
        let hosts: String = (0..n).map(|i| format!("  - {}\n", scale_host(i))).collect();
        files[1].push_str(&format!(
            "---\napiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata:\n  \
             name: scale-all\n  namespace: curl-egress-tst\nspec:\n  hosts:\n{hosts}  ports:\n  \
             - number: 80\n    name: http\n    protocol: HTTP\n  - number: 443\n    name: https\n    \
             protocol: HTTP\n  location: MESH_EXTERNAL\n  resolution: DNS\n"
        ));
    } else {
        for i in 0..n {
            files[i % FILES].push_str(&scale_resources(i, shape));
        }
    }
    files
        .into_iter()
        .enumerate()
        .map(|(i, text)| (format!("scale-{i}.yaml"), text))
        .collect()
}

/// A Gateway `name` on the egress gateway's port 80 for `host`.
fn scale_gateway(name: &str, host: &str) -> String {
    format!(
        "---\napiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata:\n  name: {name}\n  \
         namespace: curl-egress-tst\nspec:\n  selector:\n    istio: egressgateway\n  servers:\n  \
         - port:\n      number: 80\n      name: http\n      protocol: HTTP\n    hosts:\n    \
         - {host}\n"
    )
}

/// Host `i`'s resources in `shape` (not `OneEntry`).
fn scale_resources(i: usize, shape: ScaleShape) -> String {
    let h = scale_host(i);
    let head = |kind: &str| {
        format!(
            "---\napiVersion: networking.istio.io/v1\nkind: {kind}\nmetadata:\n  name: h{i}\n  \
             namespace: curl-egress-tst\nspec:\n"
        )
    };
    let (se, vs, dr) = (
        head("ServiceEntry"),
        head("VirtualService"),
        head("DestinationRule"),
    );
    let ports = "  ports:\n  - number: 80\n    name: http\n    protocol: HTTP\n";
    let external = "  location: MESH_EXTERNAL\n  resolution: DNS\n";
    match shape {
        ScaleShape::PerHost | ScaleShape::GatewayPerHost | ScaleShape::OneEntry => {
            let gateway = match shape {
                ScaleShape::GatewayPerHost => format!("h{i}"),
                _ => "scale-gateway".to_owned(),
            };
            let own_gateway = match shape {
                ScaleShape::GatewayPerHost => scale_gateway(&gateway, &h),
                _ => String::new(),
            };
            format!(
                "{se}  hosts:\n  - {h}\n{ports}  - number: 443\n    name: https\n    \
                 protocol: HTTP\n{external}{own_gateway}\
                 {vs}  hosts:\n  - {h}\n  gateways:\n  - {gateway}\n  http:\n  - route:\n    \
                 - destination:\n        host: {h}\n        port:\n          number: 443\n\
                 {dr}  host: {h}\n  trafficPolicy:\n    portLevelSettings:\n    - port:\n        \
                 number: 443\n      tls:\n        mode: SIMPLE\n        sni: {h}\n"
            )
        }
        ScaleShape::MeshExported => format!(
            "{se}  hosts:\n  - {h}\n  exportTo: ['.']\n{ports}{external}\
             {vs}  hosts:\n  - {h}\n  exportTo: ['.']\n  http:\n  - timeout: 5s\n    route:\n    \
             - destination:\n        host: {h}\n        port:\n          number: 80\n\
             {dr}  host: {h}\n  exportTo: ['.']\n  trafficPolicy:\n    connectionPool:\n      \
             http:\n        maxRequestsPerConnection: 10\n"
        ),
        ScaleShape::Subsets => format!(
            "{se}  hosts:\n  - {h}\n{ports}{external}\
             {vs}  hosts:\n  - {h}\n  http:\n  - route:\n    - destination:\n        host: {h}\n        \
             subset: v1\n        port:\n          number: 80\n\
             {dr}  host: {h}\n  subsets:\n  - name: v1\n"
        ),
    }
}

/// The seed and `scale_files(n, shape)`, loaded as the proxies load
/// files.
pub fn scale_config(n: usize, shape: ScaleShape) -> Config {
    let files = scale_files(n, shape);
    let texts: Vec<&str> = files.iter().map(|(_, t)| t.as_str()).collect();
    seed_config(&texts)
}

/// The compiled snapshot of `workload` in `config`, as a proxy builds it
/// (an identity from a fresh in-memory CA; DNS pointed at a closed port).
pub async fn snapshot(config: &Config, workload: &str) -> Snapshot {
    snapshot_of(view::build(config, &MeshSettings::default(), workload).unwrap()).await
}

/// The compiled snapshot of a view, as `snapshot` builds it.
pub async fn snapshot_of(view: ProxyView) -> Snapshot {
    let identity = Mesh::default().identity(&view.workload.spiffe_id).await;
    let nobody = StandinCa::new("trusts nothing").unwrap();
    let ctx = BuildContext {
        resolver: Resolver::new(Some(SocketAddr::from(([127, 0, 0, 1], 9)))).unwrap(),
        roots: DefaultRoots::only(meshgate_identity::cert::parse_certs(&nobody.root_pem).unwrap())
            .unwrap(),
        identity: Some(identity),
        endpoints: HashMap::new(),
    };
    Snapshot::build(view, &ctx).unwrap()
}

/// An HTTP/1.1 keep-alive server on 127.0.0.1 (`keepalive_server`).
#[derive(Debug)]
pub struct KeepAliveServer {
    pub addr: SocketAddr,
    /// Connections it accepted.
    pub accepted: Arc<std::sync::atomic::AtomicUsize>,
    /// One message for each connection the client closed.
    pub closed: mpsc::UnboundedReceiver<()>,
}

/// An HTTP/1.1 keep-alive server answering `200` with `body` to every
/// request (reading heads only: for bodyless requests).
pub async fn keepalive_server(body: &'static str) -> KeepAliveServer {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let (tx, closed) = mpsc::unbounded_channel();
    let count = accepted.clone();
    let answer = format!(
        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            let (tx, answer) = (tx.clone(), answer.clone());
            tokio::spawn(async move {
                let mut got = Vec::new();
                let mut chunk = [0u8; 1024];
                while let Ok(n) = s.read(&mut chunk).await {
                    if n == 0 {
                        break;
                    }
                    got.extend_from_slice(&chunk[..n]);
                    while let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
                        got.drain(..end + 4);
                        if s.write_all(answer.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                }
                let _ = tx.send(());
            });
        }
    });
    KeepAliveServer {
        addr,
        accepted,
        closed,
    }
}
