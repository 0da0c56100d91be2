//! `meshgate stand-in`: local stand-ins for external hosts (offline runs and
//! tests): an HTTPS server with a certificate from its own CA, and a DNS
//! server that resolves the hosts to it.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use meshgate_proxy::standin::{self, DnsZone, Seen, StandinCa};

#[derive(Debug, clap::Args)]
pub(crate) struct StandinArgs {
    /// External host names to stand in for (repeat for several).
    #[arg(long = "host")]
    hosts: Vec<String>,
    /// Extra DNS records, NAME=IP (repeat), answered but not served.
    #[arg(long = "record", value_name = "NAME=IP")]
    records: Vec<String>,
    /// HTTPS listen address (the hosts' port 443).
    #[arg(long, default_value = "127.0.0.1:443")]
    https_listen: SocketAddr,
    /// DNS listen address (UDP and TCP).
    #[arg(long, default_value = "127.0.0.1:53")]
    dns_listen: SocketAddr,
    /// Address the DNS server answers for the hosts (default: the HTTPS
    /// listen address).
    #[arg(long)]
    answer: Option<IpAddr>,
    /// Also serve plain HTTP here (repeat for several addresses).
    #[arg(long)]
    http_listen: Vec<SocketAddr>,
    /// Write the stand-in CA's root certificate here (for --extra-roots or
    /// a DestinationRule's caCertificates).
    #[arg(long)]
    ca_out: Option<PathBuf>,
}

pub(crate) fn run(a: &StandinArgs) -> anyhow::Result<ExitCode> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .context("starting the runtime")?;
    rt.block_on(async {
        let mut https = a.https_listen;
        if !a.hosts.is_empty() {
            let ca = StandinCa::new("meshgate stand-in CA")?;
            if let Some(out) = &a.ca_out {
                std::fs::write(out, &ca.root_pem)
                    .with_context(|| format!("writing {}", out.display()))?;
            }
            let tls = ca.server_config(&a.hosts)?;
            let listener = tokio::net::TcpListener::bind(a.https_listen)
                .await
                .with_context(|| format!("listening on {}", a.https_listen))?;
            https = listener.local_addr()?;
            tokio::spawn(standin::serve_https(listener, tls, Seen::default()));
        }
        let mut zone = DnsZone::default();
        for h in &a.hosts {
            zone.insert(h, a.answer.unwrap_or(https.ip()));
        }
        for r in &a.records {
            let (name, ip) = r
                .split_once('=')
                .with_context(|| format!("--record {r}: expected NAME=IP"))?;
            zone.insert(
                name,
                ip.parse()
                    .with_context(|| format!("--record {r}: bad IP"))?,
            );
        }
        let dns = standin::serve_dns(a.dns_listen, zone).await?;
        for &addr in &a.http_listen {
            let l = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("listening on {addr}"))?;
            tokio::spawn(standin::serve_http(l));
        }
        tracing::info!(%https, %dns, hosts = %a.hosts.join(","), "stand-in running");
        crate::shutdown_signal().await;
        anyhow::Ok(())
    })?;
    Ok(ExitCode::SUCCESS)
}
