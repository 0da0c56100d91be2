//! Network namespaces for `up` as root: a bridge in a hub namespace, the
//! host on it, one namespace per part, and the cleanup of all of it
//! (also of what a killed `up` left behind).

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::Stdio;

use anyhow::{Context, bail};

/// Everything to remove on the way out, in reverse order of creation.
#[derive(Default)]
pub(super) struct Cleanup {
    /// Host-side veths: deleted explicitly, because the kernel removes the
    /// interfaces of a deleted namespace asynchronously.
    pub(super) links: Vec<String>,
    pub(super) namespaces: Vec<String>,
    pub(super) netns_etc: Vec<PathBuf>,
    pub(super) dirs: Vec<PathBuf>,
    pub(super) pgids: Vec<u32>,
}

impl Cleanup {
    pub(super) fn run(&mut self) {
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

pub(super) fn ip(args: &[&str]) -> anyhow::Result<()> {
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

pub(super) fn netns_exec(ns: &str, args: &[&str]) -> anyhow::Result<()> {
    let mut full = vec!["netns", "exec", ns];
    full.extend_from_slice(args);
    ip(&full)
}

/// A /24 in 10.0.0.0/8 that no interface or route of this host uses.
pub(super) fn free_subnet() -> anyhow::Result<Ipv4Addr> {
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

/// Removes namespaces left by an `up` that was killed (SIGKILL, power loss).
pub(super) fn remove_stale() {
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

/// Where each part lives: its own namespace on the bridge (as root), or
/// loopback.
pub(super) struct Network {
    /// The namespaces' /24, when there are namespaces.
    pub(super) subnet: Option<Ipv4Addr>,
    /// The host's address on the bridge, or 127.0.0.1.
    pub(super) host_ip: IpAddr,
    /// Part key → (namespace, address).
    parts: HashMap<String, (String, IpAddr)>,
}

impl Network {
    pub(super) fn loopback() -> Network {
        Network {
            subnet: None,
            host_ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
            parts: HashMap::new(),
        }
    }

    /// A bridge in a hub namespace, the host on it (for the CA and for the
    /// operator's metrics URLs), and one namespace with a veth per part.
    pub(super) fn namespaces(
        tag: &str,
        parts: &[String],
        cleanup: &mut Cleanup,
    ) -> anyhow::Result<Network> {
        let subnet = free_subnet()?;
        let mut net = Network {
            subnet: Some(subnet),
            host_ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
            parts: HashMap::new(),
        };
        net.host_ip = net.addr_of(1);
        let hub = format!("mgup-{tag}");
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
        let host_ip = net.host_ip.to_string();
        ip(&["addr", "add", &format!("{host_ip}/24"), "dev", &host_if])?;
        ip(&["link", "set", &host_if, "up"])?;
        netns_exec(&hub, &["ip", "link", "set", "hostp", "master", "br0"])?;
        netns_exec(&hub, &["ip", "link", "set", "hostp", "up"])?;
        for (host, (i, key)) in (2u8..).zip(parts.iter().enumerate()) {
            let ns = format!("mgup-{tag}-{i}");
            let a = net.addr_of(host);
            part_namespace(&hub, &ns, i, a, &host_ip, cleanup)?;
            net.parts.insert(key.clone(), (ns, a));
        }
        Ok(net)
    }

    /// `.host` in the subnet, or 127.0.0.1 on loopback.
    pub(super) fn addr_of(&self, host: u8) -> IpAddr {
        match self.subnet {
            Some(s) => {
                let [a, b, c, _] = s.octets();
                IpAddr::V4(Ipv4Addr::new(a, b, c, host))
            }
            None => IpAddr::V4(Ipv4Addr::LOCALHOST),
        }
    }

    /// The namespace and address of a part (none on loopback).
    pub(super) fn ns_of(&self, key: &str) -> Option<(String, IpAddr)> {
        self.parts.get(key).cloned()
    }

    /// (part key, namespace), sorted.
    pub(super) fn namespaces_by_part(&self) -> Vec<(&String, &String)> {
        let mut v: Vec<(&String, &String)> =
            self.parts.iter().map(|(k, (ns, _))| (k, ns)).collect();
        v.sort();
        v
    }
}

/// One part's namespace: a veth to the bridge, its address, a default
/// route via the host, and unprivileged ports from 0 (the proxies run as
/// uid 1337).
fn part_namespace(
    hub: &str,
    ns: &str,
    i: usize,
    a: IpAddr,
    host_ip: &str,
    cleanup: &mut Cleanup,
) -> anyhow::Result<()> {
    ip(&["netns", "add", ns])?;
    cleanup.namespaces.push(ns.to_owned());
    let (inner, outer) = ("eth0", format!("p{i}"));
    ip(&[
        "link", "add", &outer, "netns", hub, "type", "veth", "peer", "name", inner, "netns", ns,
    ])?;
    netns_exec(hub, &["ip", "link", "set", &outer, "master", "br0"])?;
    netns_exec(hub, &["ip", "link", "set", &outer, "up"])?;
    netns_exec(ns, &["ip", "addr", "add", &format!("{a}/24"), "dev", inner])?;
    netns_exec(ns, &["ip", "link", "set", inner, "up"])?;
    netns_exec(ns, &["ip", "link", "set", "lo", "up"])?;
    netns_exec(ns, &["ip", "route", "add", "default", "via", host_ip])?;
    netns_exec(
        ns,
        &[
            "sh",
            "-c",
            "echo 0 > /proc/sys/net/ipv4/ip_unprivileged_port_start",
        ],
    )
}
