//! A real Kubernetes API server for tests: etcd and kube-apiserver as
//! child processes on 127.0.0.1, and kubectl to talk to them. No kubelet
//! and no controller manager: a test creates what they would (Pods,
//! EndpointSlices, ServiceAccounts).
//!
//! The binaries come from `tests/kube/build` (cached under
//! /var/cache/meshgate/kube, or `MESHGATE_KUBE_BIN`). Everything stops and
//! is removed when the [`TestCluster`] is dropped.

use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use rcgen::{CertificateParams, KeyPair};

/// Where `tests/kube/build` puts the binaries unless told otherwise.
pub const DEFAULT_BIN_DIR: &str = "/var/cache/meshgate/kube/v1.34.4";
/// kube-apiserver is ready in 5-10 s on an idle machine; a loaded CI
/// machine gets more.
const READY_WITHIN: Duration = Duration::from_secs(90);
/// Starts of etcd and kube-apiserver before a port taken under them fails a test.
const START_ATTEMPTS: u32 = 3;

/// A running etcd + kube-apiserver, and a kubeconfig with admin rights.
#[derive(Debug)]
pub struct TestCluster {
    bin: PathBuf,
    dir: PathBuf,
    kubeconfig: PathBuf,
    /// `https://127.0.0.1:PORT`
    pub server: String,
    children: Vec<Child>,
    /// How to start kube-apiserver again (`restart_apiserver`).
    apiserver: Option<Command>,
    /// The network namespace everything runs in (`ip netns exec`).
    netns: Option<String>,
}

impl TestCluster {
    /// Starts etcd and kube-apiserver and waits until `/readyz` says yes.
    pub fn start() -> TestCluster {
        TestCluster::start_in(None)
    }

    /// The same inside network namespace `netns` (which the caller made,
    /// with its loopback up): etcd, kube-apiserver and kubectl all run
    /// there, so proxies in that and linked namespaces can reach what the
    /// test starts beside them.
    pub fn start_in_netns(netns: &str) -> TestCluster {
        TestCluster::start_in(Some(netns.to_owned()))
    }

    fn start_in(netns: Option<String>) -> TestCluster {
        let bin = PathBuf::from(
            std::env::var("MESHGATE_KUBE_BIN").unwrap_or_else(|_| DEFAULT_BIN_DIR.into()),
        );
        let dir = std::env::temp_dir().join(format!(
            "meshgate-kube-{}-{}",
            std::process::id(),
            fastrand_suffix()
        ));
        // A port found free can be taken before etcd or kube-apiserver
        // binds it (by another test's listener): start again on others.
        for attempt in 1..=START_ATTEMPTS {
            std::fs::create_dir_all(&dir).expect("create the cluster folder");
            let mut cluster = TestCluster {
                kubeconfig: dir.join("kubeconfig"),
                bin: bin.clone(),
                server: String::new(),
                children: Vec::new(),
                apiserver: None,
                netns: netns.clone(),
                dir: dir.clone(),
            };
            let etcd = cluster.start_etcd();
            cluster.start_apiserver(&etcd);
            match cluster.try_ready() {
                Ok(()) => return cluster,
                Err(logs)
                    if attempt < START_ATTEMPTS && logs.contains("address already in use") =>
                {
                    continue;
                }
                Err(logs) => panic!("{logs}"),
            }
        }
        unreachable!("the last attempt returns or panics")
    }

    /// The kubeconfig file (admin: `system:masters`).
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// A kubeconfig that authenticates with `token` (a service account's,
    /// from `kubectl create token`), written into the cluster's folder.
    pub fn kubeconfig_for(&self, name: &str, token: &str) -> PathBuf {
        let path = self.dir.join(name);
        std::fs::write(&path, self.kubeconfig_text(token)).expect("write a kubeconfig");
        path
    }

    fn kubeconfig_text(&self, token: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: {}\n    \
             certificate-authority: {}\nusers:\n- name: user\n  user:\n    token: {token}\n\
             contexts:\n- name: test\n  context:\n    cluster: test\n    user: user\n\
             current-context: test\n",
            self.server,
            self.dir.join("apiserver.crt").display()
        )
    }

    /// A scratch folder that lives as long as the cluster.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Runs kubectl with `args` against the cluster.
    pub fn kubectl(&self, args: &[&str]) -> Output {
        self.kubectl_stdin(args, "")
    }

    /// Runs kubectl with `args`, writing `stdin` to it (for `-f -`).
    pub fn kubectl_stdin(&self, args: &[&str], stdin: &str) -> Output {
        let mut child = self
            .command("kubectl")
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .arg("--request-timeout=30s")
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run kubectl");
        let mut input = child.stdin.take().expect("kubectl stdin");
        input.write_all(stdin.as_bytes()).expect("write to kubectl");
        drop(input);
        child.wait_with_output().expect("kubectl output")
    }

    /// Like [`TestCluster::kubectl_stdin`], and panics with kubectl's output
    /// when it fails.
    pub fn kubectl_ok(&self, args: &[&str], stdin: &str) -> String {
        let out = self.kubectl_stdin(args, stdin);
        assert!(
            out.status.success(),
            "kubectl {} failed: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn start_etcd(&mut self) -> String {
        let client = format!("http://127.0.0.1:{}", free_port());
        let peer = format!("http://127.0.0.1:{}", free_port());
        let log = std::fs::File::create(self.dir.join("etcd.log")).expect("etcd log");
        let child = self
            .command("etcd")
            .arg("--data-dir")
            .arg(self.dir.join("etcd"))
            .args([
                "--listen-client-urls",
                &client,
                "--advertise-client-urls",
                &client,
            ])
            .args([
                "--listen-peer-urls",
                &peer,
                "--initial-advertise-peer-urls",
                &peer,
            ])
            .args([
                "--initial-cluster",
                &format!("default={peer}"),
                "--log-level",
                "warn",
            ])
            .args(["--unsafe-no-fsync", "--quota-backend-bytes", "1073741824"])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start etcd");
        self.children.push(child);
        client
    }

    fn start_apiserver(&mut self, etcd: &str) {
        let port = free_port();
        self.server = format!("https://127.0.0.1:{port}");
        let (cert, key) = self_signed(&["127.0.0.1", "localhost"]);
        let sa = KeyPair::generate().expect("service account key");
        let token = format!("admin-{}", fastrand_suffix());
        self.write("apiserver.crt", &cert);
        self.write("apiserver.key", &key);
        self.write("sa.key", &sa.serialize_pem());
        self.write("sa.pub", &sa.public_key_pem());
        self.write(
            "tokens.csv",
            &format!("{token},admin,admin,system:masters\n"),
        );
        self.write("kubeconfig", &self.kubeconfig_text(&token));
        let d = |f: &str| self.dir.join(f).display().to_string();
        let mut cmd = self.command("kube-apiserver");
        cmd.args(["--etcd-servers", etcd, "--bind-address", "127.0.0.1"])
            .args([
                "--secure-port",
                &port.to_string(),
                "--advertise-address",
                "127.0.0.1",
            ])
            .args([
                "--tls-cert-file",
                &d("apiserver.crt"),
                "--tls-private-key-file",
                &d("apiserver.key"),
            ])
            .args([
                "--token-auth-file",
                &d("tokens.csv"),
                "--authorization-mode",
                "Node,RBAC",
            ])
            .args([
                "--service-account-issuer",
                "https://kubernetes.default.svc.cluster.local",
            ])
            .args(["--service-account-key-file", &d("sa.pub")])
            .args(["--service-account-signing-key-file", &d("sa.key")])
            .args([
                "--api-audiences",
                "https://kubernetes.default.svc.cluster.local",
            ])
            .args(["--service-cluster-ip-range", "10.96.0.0/16"])
            // No kubelets: nothing to reconcile the `kubernetes` Service's
            // endpoints against, and 127.0.0.1 would loop.
            .args([
                "--endpoint-reconciler-type",
                "none",
                "--enable-priority-and-fairness=false",
            ])
            .args(["--cert-dir", &d("certs")]);
        self.apiserver = Some(cmd);
        self.spawn_apiserver();
    }

    /// Starts kube-apiserver (again) from the command `start_apiserver` made;
    /// it is the last child.
    fn spawn_apiserver(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("apiserver.log"))
            .expect("apiserver log");
        let cmd = self.apiserver.as_mut().expect("an API server command");
        let child = cmd
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start kube-apiserver");
        self.children.push(child);
    }

    /// Stops kube-apiserver (etcd keeps the data) and runs `while_down`.
    /// Then starts it again on the same port and waits until it is ready.
    pub fn restart_apiserver(&mut self, while_down: impl FnOnce()) {
        if let Some(mut child) = self.children.pop() {
            let _ = child.kill();
            let _ = child.wait();
        }
        while_down();
        self.spawn_apiserver();
        self.wait_ready();
    }

    /// Bounded: polls `/readyz` until it answers ok or a process exits.
    fn wait_ready(&mut self) {
        if let Err(e) = self.try_ready() {
            panic!("{e}");
        }
    }

    /// [`TestCluster::wait_ready`], saying why it is not ready with the
    /// processes' logs.
    fn try_ready(&mut self) -> Result<(), String> {
        let start = Instant::now();
        loop {
            let out = self.kubectl(&["get", "--raw", "/readyz"]);
            if out.status.success() && out.stdout.starts_with(b"ok") {
                return Ok(());
            }
            for child in &mut self.children {
                if let Ok(Some(status)) = child.try_wait() {
                    return Err(format!(
                        "a cluster process exited ({status}):\n{}",
                        self.logs()
                    ));
                }
            }
            if start.elapsed() >= READY_WITHIN {
                return Err(format!("kube-apiserver not ready:\n{}", self.logs()));
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// The last lines of etcd's and kube-apiserver's logs.
    pub fn logs(&self) -> String {
        ["etcd.log", "apiserver.log"]
            .iter()
            .map(|f| {
                let text = std::fs::read_to_string(self.dir.join(f)).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(30).collect();
                format!(
                    "--- {f}\n{}",
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// One of the cluster's binaries, in the cluster's network namespace.
    fn command(&self, binary: &str) -> Command {
        let path = self.bin.join(binary);
        match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(path);
                c
            }
            None => Command::new(path),
        }
    }

    fn write(&self, name: &str, content: &str) {
        std::fs::write(self.dir.join(name), content).expect("write a cluster file");
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        // The API server first, then its store.
        for child in self.children.iter_mut().rev() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A self-signed serving certificate and its key, as PEM.
fn self_signed(names: &[&str]) -> (String, String) {
    let key = KeyPair::generate().expect("key");
    let params = CertificateParams::new(names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>())
        .expect("certificate names");
    let cert = params.self_signed(&key).expect("self-signed certificate");
    (cert.pem(), key.serialize_pem())
}

/// A port free at this moment on 127.0.0.1, below Linux's ephemeral range
/// (32768 on): one from port 0 is in that range, where any process's next
/// outgoing connection or port-0 listener may take it before etcd or
/// kube-apiserver binds it (they take ports, not listeners; `start_in`
/// starts again when one was taken all the same).
fn free_port() -> u16 {
    for _ in 0..200 {
        let port = fastrand::u16(10_000..32_768);
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn fastrand_suffix() -> String {
    format!("{:08x}", fastrand::u32(..))
}
