//! Network namespaces for end-to-end tests: an "app" namespace (curl and its
//! sidecar, with iptables capture) and a "gw" namespace (egress gateway and
//! the stand-in external world), joined by a veth pair. Everything is
//! removed on drop.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used)]

use std::process::{Command, Output};

pub struct Net {
    pub app: String,
    pub gw: String,
    /// First three octets, e.g. `10.23.7`.
    pub prefix: String,
}

fn sh(args: &[&str]) -> Output {
    Command::new(args[0]).args(&args[1..]).output().unwrap()
}

fn must(args: &[&str]) {
    let o = sh(args);
    assert!(
        o.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

impl Net {
    pub fn new() -> Net {
        let n = std::process::id()
            ^ std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .subsec_nanos();
        let tag = format!("{:x}", n & 0xffffff);
        let (a, b) = (10 + (n % 200), (n >> 8) % 250);
        let net = Net {
            app: format!("mga{tag}"),
            gw: format!("mgg{tag}"),
            prefix: format!("10.{a}.{b}"),
        };
        let (va, vg) = (format!("va{tag}"), format!("vg{tag}"));
        must(&["ip", "netns", "add", &net.app]);
        must(&["ip", "netns", "add", &net.gw]);
        must(&[
            "ip", "link", "add", &va, "type", "veth", "peer", "name", &vg,
        ]);
        must(&["ip", "link", "set", &va, "netns", &net.app]);
        must(&["ip", "link", "set", &vg, "netns", &net.gw]);
        let p = &net.prefix;
        net.exec_ok(
            &net.app,
            &["ip", "addr", "add", &format!("{p}.1/24"), "dev", &va],
        );
        for host in [2, 3, 101] {
            net.exec_ok(
                &net.gw,
                &["ip", "addr", "add", &format!("{p}.{host}/24"), "dev", &vg],
            );
        }
        for (ns, dev) in [(&net.app, &va), (&net.gw, &vg)] {
            net.exec_ok(ns, &["ip", "link", "set", "lo", "up"]);
            net.exec_ok(ns, &["ip", "link", "set", dev, "up"]);
        }
        net
    }

    pub fn ip(&self, host: u8) -> String {
        format!("{}.{host}", self.prefix)
    }

    /// Files in /etc/netns/<ns>/ replace /etc/<file> for `ip netns exec`.
    pub fn hosts_file(&self, ns: &str, text: &str) {
        let dir = format!("/etc/netns/{ns}");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(format!("{dir}/hosts"), text).unwrap();
    }

    pub fn exec(&self, ns: &str, args: &[&str]) -> Output {
        let mut full = vec!["ip", "netns", "exec", ns];
        full.extend_from_slice(args);
        sh(&full)
    }

    pub fn exec_ok(&self, ns: &str, args: &[&str]) -> String {
        let o = self.exec(ns, args);
        assert!(
            o.status.success(),
            "{args:?} in {ns}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// `iptables-save -t nat` without counters and comments, for comparison.
    pub fn nat_table(&self, ns: &str) -> String {
        self.exec_ok(ns, &["iptables-save", "-t", "nat"])
            .lines()
            .filter(|l| !l.starts_with('#'))
            .map(|l| l.split(" [").next().unwrap_or(l).to_owned())
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for ns in [&self.app, &self.gw] {
            let _ = sh(&["ip", "netns", "del", ns]);
            let _ = std::fs::remove_dir_all(format!("/etc/netns/{ns}"));
        }
    }
}
