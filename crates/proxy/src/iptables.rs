//! Transparent capture, as istio-init installs it: nat rules that redirect a
//! workload's outbound TCP to the sidecar (15001), except the proxy's own
//! traffic (uid/gid 1337), loopback, and excluded ports and CIDRs.
//!
//! The rule text is a pure function of the options (tested against Istio's
//! golden layout); applying it is one `iptables-restore --noflush`, so a
//! namespace never ends up half-configured.

use std::io::Write;
use std::process::{Command, Stdio};

#[derive(Debug, thiserror::Error)]
pub enum IptablesError {
    #[error("{0} not found: install the iptables package (Debian: apt-get install iptables)")]
    Missing(&'static str),
    #[error("{cmd} failed: {stderr}")]
    Failed { cmd: String, stderr: String },
    #[error("{0}")]
    Invalid(String),
}

/// istio-iptables options meshgate supports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    /// `-p`: where outbound TCP is redirected.
    pub proxy_port: u16,
    /// `-z`: inbound capture port (used only with `inbound_ports`).
    pub inbound_capture_port: u16,
    /// `-u` / `-g`: the proxy's uid and gid, never redirected.
    pub proxy_uid: u32,
    pub proxy_gid: u32,
    /// `-b`: inbound ports to capture (`*` for all); empty: none.
    pub inbound_ports: Vec<String>,
    /// `-d`: inbound ports never captured.
    pub exclude_inbound_ports: Vec<u16>,
    /// `-o`: outbound ports never captured.
    pub exclude_outbound_ports: Vec<u16>,
    /// `-i`: outbound CIDRs to capture (`*` for all).
    pub include_outbound_cidrs: Vec<String>,
    /// `-x`: outbound CIDRs never captured.
    pub exclude_outbound_cidrs: Vec<String>,
}

impl Default for Options {
    /// istio-init's defaults (`-p 15001 -z 15006 -u 1337 -i '*' -x "" -d
    /// 15090,15021,15020`), with inbound capture off: meshgate's sidecar
    /// handles outbound traffic (see docs).
    fn default() -> Self {
        Options {
            proxy_port: 15001,
            inbound_capture_port: 15006,
            proxy_uid: 1337,
            proxy_gid: 1337,
            inbound_ports: Vec::new(),
            exclude_inbound_ports: vec![15090, 15021, 15020],
            exclude_outbound_ports: Vec::new(),
            include_outbound_cidrs: vec!["*".to_owned()],
            exclude_outbound_cidrs: Vec::new(),
        }
    }
}

const CHAINS: [&str; 4] = [
    "ISTIO_INBOUND",
    "ISTIO_IN_REDIRECT",
    "ISTIO_OUTPUT",
    "ISTIO_REDIRECT",
];

fn valid_cidr(s: &str) -> bool {
    s.parse::<ipnet::IpNet>().is_ok() || s.parse::<std::net::IpAddr>().is_ok()
}

/// The `iptables-restore` input for the nat table.
pub fn rules(o: &Options) -> Result<String, IptablesError> {
    for c in o
        .include_outbound_cidrs
        .iter()
        .chain(&o.exclude_outbound_cidrs)
    {
        if c != "*" && !valid_cidr(c) {
            return Err(IptablesError::Invalid(format!(
                "\"{c}\" is not an IP address or CIDR"
            )));
        }
    }
    let inbound = !o.inbound_ports.is_empty();
    let mut r = vec!["*nat".to_owned()];
    for c in CHAINS {
        r.push(format!(":{c} - [0:0]"));
    }
    // Inbound.
    if inbound {
        r.push("-A ISTIO_INBOUND -p tcp --dport 15008 -j RETURN".to_owned());
        let by_port =
            |p: Option<&str>| p.map_or("-p tcp".to_owned(), |p| format!("-p tcp --dport {p}"));
        let (excluded, included) = (&o.exclude_inbound_ports, &o.inbound_ports);
        select(
            &mut r,
            "ISTIO_INBOUND",
            by_port,
            excluded,
            included,
            "ISTIO_IN_REDIRECT",
        );
        r.push(format!(
            "-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports {}",
            o.inbound_capture_port
        ));
        r.push("-A PREROUTING -p tcp -j ISTIO_INBOUND".to_owned());
    }
    r.push(format!(
        "-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports {}",
        o.proxy_port
    ));
    r.push("-A OUTPUT -p tcp -j ISTIO_OUTPUT".to_owned());
    // Outbound, in istio-iptables' order.
    for p in &o.exclude_outbound_ports {
        r.push(format!("-A ISTIO_OUTPUT -p tcp --dport {p} -j RETURN"));
    }
    r.push("-A ISTIO_OUTPUT -o lo -s 127.0.0.6/32 -j RETURN".to_owned());
    for (kind, id) in [("uid", o.proxy_uid), ("gid", o.proxy_gid)] {
        if inbound {
            r.push(format!(
                "-A ISTIO_OUTPUT -o lo ! -d 127.0.0.1/32 -p tcp ! --dport 15008 -m owner --{kind}-owner {id} -j ISTIO_IN_REDIRECT"
            ));
        }
        r.push(format!(
            "-A ISTIO_OUTPUT -o lo -m owner ! --{kind}-owner {id} -j RETURN"
        ));
        r.push(format!(
            "-A ISTIO_OUTPUT -m owner --{kind}-owner {id} -j RETURN"
        ));
    }
    r.push("-A ISTIO_OUTPUT -d 127.0.0.1/32 -j RETURN".to_owned());
    let by_cidr = |c: Option<&str>| c.map_or(String::new(), |c| format!("-d {c}"));
    let (excluded, included) = (&o.exclude_outbound_cidrs, &o.include_outbound_cidrs);
    select(
        &mut r,
        "ISTIO_OUTPUT",
        by_cidr,
        excluded,
        included,
        "ISTIO_REDIRECT",
    );
    r.push("COMMIT".to_owned());
    Ok(r.join("\n") + "\n")
}

fn run(cmd: &'static str, args: &[&str], stdin: Option<&str>) -> Result<String, IptablesError> {
    let mut child = Command::new(cmd)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => IptablesError::Missing(cmd),
            _ => IptablesError::Failed {
                cmd: cmd.to_owned(),
                stderr: e.to_string(),
            },
        })?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(input.as_bytes())
            .map_err(|e| IptablesError::Failed {
                cmd: cmd.to_owned(),
                stderr: e.to_string(),
            })?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| IptablesError::Failed {
            cmd: cmd.to_owned(),
            stderr: e.to_string(),
        })?;
    if !out.status.success() {
        return Err(IptablesError::Failed {
            cmd: format!("{cmd} {}", args.join(" ")),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn chain_exists(chain: &str) -> bool {
    run("iptables", &["-t", "nat", "-S", chain], None).is_ok()
}

/// Removes meshgate's (istio's) chains and the jumps into them; leaves
/// everything else in the nat table as it was. Safe to run when nothing is
/// installed.
pub fn cleanup() -> Result<(), IptablesError> {
    run("iptables", &["--version"], None)?;
    for (chain, jump) in [("OUTPUT", "ISTIO_OUTPUT"), ("PREROUTING", "ISTIO_INBOUND")] {
        // Delete every jump (installs by other tools may have added several).
        for _ in 0..16 {
            if run(
                "iptables",
                &["-t", "nat", "-D", chain, "-p", "tcp", "-j", jump],
                None,
            )
            .is_err()
            {
                break;
            }
        }
    }
    for c in CHAINS {
        if chain_exists(c) {
            run("iptables", &["-t", "nat", "-F", c], None)?;
        }
    }
    for c in CHAINS {
        if chain_exists(c) {
            run("iptables", &["-t", "nat", "-X", c], None)?;
        }
    }
    Ok(())
}

/// Installs the rules; idempotent (an existing install is replaced).
pub fn install(o: &Options) -> Result<String, IptablesError> {
    let text = rules(o)?;
    run("iptables-restore", &["--version"], None)?;
    cleanup()?;
    run("iptables-restore", &["--noflush"], Some(&text))?;
    Ok(text)
}

/// Rules of `chain` that return for each `excluded` value, then jump to
/// `target` for each `included` one (one rule for all with `*`).
/// `matcher(None)` matches everything.
fn select(
    rules: &mut Vec<String>,
    chain: &str,
    matcher: impl Fn(Option<&str>) -> String,
    excluded: &[impl std::fmt::Display],
    included: &[String],
    target: &str,
) {
    let rule = |m: String, target: &str| match m.as_str() {
        "" => format!("-A {chain} -j {target}"),
        m => format!("-A {chain} {m} -j {target}"),
    };
    rules.extend(
        excluded
            .iter()
            .map(|v| rule(matcher(Some(&v.to_string())), "RETURN")),
    );
    if included.iter().any(|v| v == "*") {
        rules.push(rule(matcher(None), target));
    } else {
        rules.extend(included.iter().map(|v| rule(matcher(Some(v)), target)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_rules_match_istio_init_outbound() {
        let text = rules(&Options::default()).unwrap();
        assert_eq!(
            text,
            "*nat
:ISTIO_INBOUND - [0:0]
:ISTIO_IN_REDIRECT - [0:0]
:ISTIO_OUTPUT - [0:0]
:ISTIO_REDIRECT - [0:0]
-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001
-A OUTPUT -p tcp -j ISTIO_OUTPUT
-A ISTIO_OUTPUT -o lo -s 127.0.0.6/32 -j RETURN
-A ISTIO_OUTPUT -o lo -m owner ! --uid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -m owner --uid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -o lo -m owner ! --gid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -m owner --gid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -d 127.0.0.1/32 -j RETURN
-A ISTIO_OUTPUT -j ISTIO_REDIRECT
COMMIT
"
        );
    }

    #[test]
    fn inbound_exclusions_and_cidrs() {
        let o = Options {
            inbound_ports: vec!["*".into()],
            exclude_outbound_ports: vec![5432],
            include_outbound_cidrs: vec!["10.0.0.0/8".into()],
            exclude_outbound_cidrs: vec!["10.1.0.0/16".into()],
            ..Options::default()
        };
        let text = rules(&o).unwrap();
        for want in [
            "-A ISTIO_INBOUND -p tcp --dport 15008 -j RETURN",
            "-A ISTIO_INBOUND -p tcp --dport 15090 -j RETURN",
            "-A ISTIO_INBOUND -p tcp -j ISTIO_IN_REDIRECT",
            "-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006",
            "-A PREROUTING -p tcp -j ISTIO_INBOUND",
            "-A ISTIO_OUTPUT -p tcp --dport 5432 -j RETURN",
            "-A ISTIO_OUTPUT -o lo ! -d 127.0.0.1/32 -p tcp ! --dport 15008 -m owner --uid-owner 1337 -j ISTIO_IN_REDIRECT",
            "-A ISTIO_OUTPUT -d 10.1.0.0/16 -j RETURN",
            "-A ISTIO_OUTPUT -d 10.0.0.0/8 -j ISTIO_REDIRECT",
        ] {
            assert!(text.contains(want), "missing {want}:\n{text}");
        }
        assert!(!text.contains("-A ISTIO_OUTPUT -j ISTIO_REDIRECT"));
        let bad = Options {
            exclude_outbound_cidrs: vec!["10.0.0.0/99".into()],
            ..Options::default()
        };
        assert!(
            rules(&bad)
                .unwrap_err()
                .to_string()
                .contains("not an IP address or CIDR")
        );
    }
}
