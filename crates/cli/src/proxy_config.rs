//! `meshgate proxy-config KIND TARGET`: what a running proxy runs, read
//! from its inspection port as `istioctl proxy-config` reads Envoy's admin
//! port. TARGET is the port's address (`127.0.0.1:15000`) or the name of a
//! part of a running `meshgate up` (found by its run folder; a part in a
//! network namespace is asked from inside it).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use clap::{Args, ValueEnum};
use serde_json::Value;

use crate::table::Table;

#[derive(Debug, Clone, Args)]
pub(crate) struct ProxyConfigArgs {
    /// What to show.
    #[arg(value_enum)]
    kind: Kind,
    /// The inspection port (HOST:PORT), or a part of a running `meshgate up`
    /// (as its table names it, e.g. curl-test-sidecar).
    target: String,
    /// A table, or the inspection port's JSON.
    #[arg(short, long, value_enum, default_value = "short")]
    output: Output,
    /// `log` only: set the level (or a filter such as `info,meshgate_proxy=debug`).
    #[arg(long)]
    level: Option<String>,
    /// Which running `meshgate up` (its process id), when several run.
    #[arg(long, value_name = "PID")]
    up: Option<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Kind {
    /// Upstream clusters and where their endpoints come from.
    Cluster,
    /// Endpoints that carried requests, with health and outlier state.
    Endpoint,
    /// Listeners: ports, protocols, downstream TLS.
    Listener,
    /// The workload certificate: identity, serial, validity.
    Secret,
    /// The log filter (and `--level` to change it).
    Log,
    /// Everything the proxy runs (`/config_dump`).
    All,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    Short,
    Json,
}

/// Where a part of `meshgate up` registers (written by `up`).
pub(crate) const PARTS_DIR: &str = "parts";

pub(crate) fn run(args: &ProxyConfigArgs) -> anyhow::Result<ExitCode> {
    let addr = match args.target.to_socket_addrs() {
        Ok(mut a) => a.next().context("no address")?,
        Err(_) => {
            let part = find_part(&args.target, args.up)?;
            if let Some(ns) = part.netns {
                return in_namespace(&ns, part.inspect, args);
            }
            part.inspect
        }
    };
    let (path, post) = match (args.kind, &args.level) {
        (Kind::Log, Some(level)) => (format!("/logging?level={}", encode(level)), true),
        (Kind::Log, None) => ("/logging".to_owned(), false),
        (Kind::Cluster | Kind::Endpoint, _) => ("/clusters".to_owned(), false),
        (Kind::Listener, _) => ("/listeners".to_owned(), false),
        (Kind::Secret, _) => ("/certs".to_owned(), false),
        (Kind::All, _) => ("/config_dump".to_owned(), false),
    };
    let (status, body) = get(addr, &path, post)?;
    if status != 200 {
        bail!("{addr}{path} answered {status}: {}", body.trim());
    }
    if args.kind == Kind::Log || args.output == Output::Json {
        print!("{body}");
        return Ok(ExitCode::SUCCESS);
    }
    let v: Value = serde_json::from_str(&body).with_context(|| format!("{addr}{path}"))?;
    let table = match args.kind {
        Kind::Cluster => clusters(&v),
        Kind::Endpoint => endpoints(&v),
        Kind::Listener => listeners(&v),
        Kind::Secret => secret(&v),
        Kind::All | Kind::Log => {
            println!("{}", serde_json::to_string_pretty(&v)?);
            return Ok(ExitCode::SUCCESS);
        }
    };
    print!("{}", table.render());
    Ok(ExitCode::SUCCESS)
}

fn s(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".to_owned(),
        other => other.to_string(),
    }
}

fn clusters(v: &Value) -> Table {
    let mut t = Table::new(&["CLUSTER", "ENDPOINTS FROM", "HOSTS", "IN FLIGHT"]);
    for c in v.as_array().into_iter().flatten() {
        let from: Vec<String> = c["endpoints"]
            .as_array()
            .into_iter()
            .flatten()
            .map(s)
            .collect();
        t.row(vec![
            s(&c["name"]),
            from.join(", "),
            c["hosts"].as_array().map_or(0, Vec::len).to_string(),
            s(&c["requestsInFlight"]),
        ]);
    }
    t
}

fn endpoints(v: &Value) -> Table {
    let mut t = Table::new(&["ENDPOINT", "STATUS", "OUTLIER CHECK", "ACTIVE", "CLUSTER"]);
    for c in v.as_array().into_iter().flatten() {
        for h in c["hosts"].as_array().into_iter().flatten() {
            let ejected = h["ejected"].as_bool().unwrap_or(false);
            t.row(vec![
                s(&h["address"]),
                "HEALTHY".to_owned(),
                if ejected { "FAILED" } else { "OK" }.to_owned(),
                s(&h["activeRequests"]),
                s(&c["name"]),
            ]);
        }
    }
    t
}

fn listeners(v: &Value) -> Table {
    let mut t = Table::new(&["PORT", "BIND", "PROTOCOL", "HOSTS", "ORIGIN"]);
    for l in v.as_array().into_iter().flatten() {
        let hosts: Vec<String> = l["hosts"].as_array().into_iter().flatten().map(s).collect();
        t.row(vec![
            s(&l["port"]),
            // A Sidecar-bound listener names its address (or unix socket).
            s(if l["bind"].is_null() {
                &l["bindPort"]
            } else {
                &l["bind"]
            }),
            s(&l["protocol"]),
            hosts.join(","),
            s(&l["origin"]),
        ]);
    }
    t
}

fn secret(v: &Value) -> Table {
    let mut t = Table::new(&[
        "RESOURCE NAME",
        "TYPE",
        "STATUS",
        "VALID CERT",
        "SERIAL NUMBER",
        "NOT AFTER",
        "NOT BEFORE",
    ]);
    let time = |x: &Value| {
        x.as_u64().map_or_else(
            || "-".to_owned(),
            |secs| {
                meshgate_telemetry::accesslog::format_time(UNIX_EPOCH + Duration::from_secs(secs))
            },
        )
    };
    let valid = v["notAfter"]
        .as_u64()
        .is_some_and(|t| UNIX_EPOCH + Duration::from_secs(t) > SystemTime::now());
    t.row(vec![
        "default".to_owned(),
        "Cert Chain".to_owned(),
        if v["renewalError"].is_null() {
            "ACTIVE"
        } else {
            "RENEWAL FAILING"
        }
        .to_owned(),
        valid.to_string(),
        s(&v["serialNumber"]),
        time(&v["notAfter"]),
        time(&v["notBefore"]),
    ]);
    t
}

/// One request to the inspection port (HTTP/1.0: the answer ends with
/// the connection), bounded by timeouts.
fn get(addr: SocketAddr, path: &str, post: bool) -> anyhow::Result<(u16, String)> {
    let limit = Duration::from_secs(5);
    let mut tcp = TcpStream::connect_timeout(&addr, limit)
        .with_context(|| format!("cannot reach the inspection port at {addr}"))?;
    tcp.set_read_timeout(Some(limit))?;
    tcp.set_write_timeout(Some(limit))?;
    let method = if post { "POST" } else { "GET" };
    write!(
        tcp,
        "{method} {path} HTTP/1.0\r\nHost: {addr}\r\nContent-Length: 0\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    tcp.read_to_end(&mut raw)
        .with_context(|| format!("reading {addr}{path}"))?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .with_context(|| format!("{addr}{path}: not an HTTP answer"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("{addr}{path}: no status"))?;
    Ok((status, body.to_owned()))
}

fn encode(level: &str) -> String {
    level.replace(',', "%2C").replace('=', "%3D")
}

/// A part of a running `meshgate up`.
struct Part {
    inspect: SocketAddr,
    netns: Option<String>,
}

/// The registration `name` in the run folder of a live `meshgate up`.
pub(crate) fn registration(name: &str, up: Option<u32>) -> anyhow::Result<Option<Value>> {
    let mut found: Vec<PathBuf> = Vec::new();
    for entry in std::fs::read_dir(std::env::temp_dir())?.flatten() {
        let dir = entry.path();
        let Some(pid) = dir
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix("meshgate-up-"))
        else {
            continue;
        };
        // A folder left by an `up` that is gone says nothing.
        if !Path::new("/proc").join(pid).exists() || up.is_some_and(|u| u.to_string() != pid) {
            continue;
        }
        let file = dir.join(PARTS_DIR).join(format!("{name}.json"));
        if file.exists() {
            found.push(file);
        }
    }
    match found.as_slice() {
        [] => Ok(None),
        [one] => Ok(Some(serde_json::from_str(&std::fs::read_to_string(one)?)?)),
        _ => bail!("several running `meshgate up` have a part {name}: say which with --up PID"),
    }
}

/// A part's inspection port and namespace, from its ready file.
fn find_part(name: &str, up: Option<u32>) -> anyhow::Result<Part> {
    let Some(reg) = registration(name, up)? else {
        bail!(
            "{name} is neither HOST:PORT nor a part of a running `meshgate up` (give the inspection port's address, e.g. 127.0.0.1:15000)"
        );
    };
    let ready = reg["readyFile"]
        .as_str()
        .context("registration without readyFile")?;
    let ready: Value = serde_json::from_str(
        &std::fs::read_to_string(ready).with_context(|| format!("{name} is not ready yet"))?,
    )?;
    let inspect = ready["admin"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|a| a["role"] == "inspect")
        .and_then(|a| a["address"].as_str())
        .context("the part has no inspection port")?
        .parse()?;
    Ok(Part {
        inspect,
        netns: reg["netns"].as_str().map(str::to_owned),
    })
}

/// Asks from inside the part's network namespace (its inspection port is
/// that namespace's loopback).
fn in_namespace(ns: &str, addr: SocketAddr, args: &ProxyConfigArgs) -> anyhow::Result<ExitCode> {
    let me = std::env::current_exe()?;
    let kind = args
        .kind
        .to_possible_value()
        .map(|v| v.get_name().to_owned());
    let output = args
        .output
        .to_possible_value()
        .map(|v| v.get_name().to_owned());
    let mut cmd = std::process::Command::new("ip");
    cmd.args(["netns", "exec", ns])
        .arg(me)
        .arg("proxy-config")
        .args(kind)
        .arg(addr.to_string())
        .arg("-o")
        .args(output);
    if let Some(level) = &args.level {
        cmd.args(["--level", level]);
    }
    let status = cmd
        .status()
        .with_context(|| format!("entering network namespace {ns} (needs root)"))?;
    Ok(ExitCode::from(
        u8::try_from(status.code().unwrap_or(1)).unwrap_or(1),
    ))
}
