//! Shared pieces of the end-to-end tests: temp folders, the meshgate binary
//! as a child process, curl, and the stand-in external host.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

pub mod kube;
pub mod netns;

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_meshgate")
}

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

pub fn seed() -> String {
    repo_root()
        .join("examples/seed")
        .to_str()
        .unwrap()
        .to_owned()
}

pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(name: &str) -> TempDir {
        let d = std::env::temp_dir().join(format!(
            "meshgate-{name}-{}-{:x}",
            std::process::id(),
            fastrand_u32()
        ));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        TempDir(d)
    }

    pub fn path(&self, p: &str) -> String {
        self.0.join(p).to_str().unwrap().to_owned()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn fastrand_u32() -> u32 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    t.subsec_nanos() ^ (std::process::id() << 8)
}

/// A loopback address of our own for this test (127.x.y.z), so tests can
/// bind well-known ports without stepping on each other.
pub fn loopback_ip() -> IpAddr {
    let n = fastrand_u32();
    IpAddr::V4(Ipv4Addr::new(
        127,
        100 + (n % 100) as u8,
        ((n >> 8) % 250) as u8 + 1,
        ((n >> 16) % 250) as u8 + 1,
    ))
}

pub fn meshgate(args: &[&str]) -> Output {
    Command::new(bin())
        .args(args)
        .output()
        .expect("meshgate runs")
}

/// A running meshgate process; killed on drop. Its stderr is collected.
pub struct Proc {
    pub child: Child,
    lines: mpsc::Receiver<String>,
    pub log: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    pub stdout: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Proc {
    pub fn spawn(args: &[&str]) -> Proc {
        let mut argv = vec![bin()];
        argv.extend_from_slice(args);
        Proc::spawn_argv(&argv)
    }

    /// Runs any program (`argv[0]`), e.g. `ip netns exec ... meshgate ...`.
    pub fn spawn_argv(argv: &[&str]) -> Proc {
        let mut child = Command::new(argv[0])
            .args(&argv[1..])
            .env(
                "RUST_LOG",
                std::env::var("MESHGATE_TEST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("meshgate starts");
        let (tx, rx) = mpsc::channel();
        // Both streams feed `wait_for`; they are also kept apart.
        let tx_out = tx.clone();
        let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let stdout = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let err = child.stderr.take().unwrap();
        let l = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                l.lock().unwrap().push(line.clone());
                let _ = tx.send(line);
            }
        });
        let out = child.stdout.take().unwrap();
        let o = stdout.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                o.lock().unwrap().push(line.clone());
                let _ = tx_out.send(line);
            }
        });
        Proc {
            child,
            lines: rx,
            log,
            stdout,
        }
    }

    /// Waits (bounded) for a stderr line containing `needle`.
    pub fn wait_for(&self, needle: &str, timeout: Duration) -> String {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.contains(needle) => return line,
                Ok(_) => {}
                Err(_) => panic!(
                    "no \"{needle}\" within {timeout:?}; log:\n{}",
                    self.log.lock().unwrap().join("\n")
                ),
            }
        }
    }

    pub fn stdout_lines(&self) -> Vec<String> {
        self.stdout.lock().unwrap().clone()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// curl's body and status code (`-w` appends it on its own line).
pub fn curl(args: &[&str]) -> (String, String, i32) {
    let o = Command::new("curl")
        .args(["-sS", "--max-time", "10", "-w", "\n%{http_code}"])
        .args(args)
        .output()
        .expect("curl is installed (.ci/run installs it)");
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    let (body, code) = out.rsplit_once('\n').unwrap_or(("", &out));
    (
        body.to_owned(),
        code.to_owned(),
        o.status.code().unwrap_or(-1),
    )
}

pub fn http_get(addr: SocketAddr, path: &str) -> String {
    let (body, code, _) = curl(&[&format!("http://{addr}{path}")]);
    assert_eq!(code, "200", "GET {path} on {addr}: {body}");
    body
}

// Not every test binary uses both.
#[allow(unused_imports)]
pub use meshgate_proxy::testing::{metric_value, promtool_check};

/// Scrapes `url` until a metric reaches `want` (reports are written when a
/// response or connection ends, a moment after the client has its answer);
/// returns the last scrape. Bounded: 10 seconds.
pub fn scrape_until(url: &str, name: &str, labels: &[(&str, &str)], want: f64) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (text, code, _) = curl(&[url]);
        if code == "200" && metric_value(&text, name, labels) == Some(want) {
            return text;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{name}{labels:?} never reached {want} at {url}; last scrape:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A process's resident memory (VmRSS), in MiB; 0 when it is gone.
pub fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

/// A port that was free a moment ago (for a child that must be told one).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
