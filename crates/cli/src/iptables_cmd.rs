//! `meshgate iptables`: transparent capture in the current network namespace.

use std::process::ExitCode;

use meshgate_proxy::iptables::{self, Options};

#[derive(Debug, clap::Args)]
pub(crate) struct IptablesArgs {
    /// Remove the rules (and only them) instead of installing.
    #[arg(long)]
    cleanup: bool,
    /// Print the rules without applying them.
    #[arg(long, conflicts_with = "cleanup")]
    dry_run: bool,
    /// Port outbound TCP is redirected to (istio-iptables -p).
    #[arg(long, default_value_t = 15001)]
    proxy_port: u16,
    /// The proxy's uid, never redirected (-u).
    #[arg(long, default_value_t = 1337)]
    proxy_uid: u32,
    /// The proxy's gid, never redirected (-g).
    #[arg(long, default_value_t = 1337)]
    proxy_gid: u32,
    /// Outbound ports never redirected (-o), comma-separated.
    #[arg(long, value_delimiter = ',')]
    exclude_outbound_ports: Vec<u16>,
    /// Outbound CIDRs never redirected (-x), comma-separated.
    #[arg(long, value_delimiter = ',')]
    exclude_outbound_cidrs: Vec<String>,
    /// Outbound CIDRs to redirect (-i), comma-separated; `*` is all.
    #[arg(long, value_delimiter = ',', default_value = "*")]
    include_outbound_cidrs: Vec<String>,
    /// Inbound ports to redirect to --inbound-capture-port (-b); off by
    /// default because meshgate's sidecar proxies outbound traffic.
    #[arg(long, value_delimiter = ',')]
    inbound_ports: Vec<String>,
    /// Inbound capture port (-z).
    #[arg(long, default_value_t = 15006)]
    inbound_capture_port: u16,
}

pub(crate) fn run(a: &IptablesArgs) -> anyhow::Result<ExitCode> {
    if a.cleanup {
        iptables::cleanup()?;
        println!("removed meshgate's nat rules");
        return Ok(ExitCode::SUCCESS);
    }
    let o = Options {
        proxy_port: a.proxy_port,
        inbound_capture_port: a.inbound_capture_port,
        proxy_uid: a.proxy_uid,
        proxy_gid: a.proxy_gid,
        inbound_ports: a.inbound_ports.clone(),
        exclude_outbound_ports: a.exclude_outbound_ports.clone(),
        include_outbound_cidrs: a.include_outbound_cidrs.clone(),
        exclude_outbound_cidrs: a.exclude_outbound_cidrs.clone(),
        ..Options::default()
    };
    if a.dry_run {
        print!("{}", iptables::rules(&o)?);
        return Ok(ExitCode::SUCCESS);
    }
    let text = iptables::install(&o)?;
    print!("{text}");
    Ok(ExitCode::SUCCESS)
}
