//! `meshgate stand-in`: local stand-ins for external hosts (offline runs and
//! tests): an HTTPS server that answers for any host (a certificate per
//! SNI from its own CA or one given, optionally requiring client
//! certificates), and a DNS server that resolves the hosts (wildcards too)
//! to it.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use meshgate_proxy::standin::{self, DnsZone, HostCert, Seen, StandinCa};

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
    /// Answer every other name with this address (NXDOMAIN without it).
    #[arg(long, value_name = "IP")]
    answer_all: Option<IpAddr>,
    /// Also serve plain HTTP here (repeat for several addresses).
    #[arg(long)]
    http_listen: Vec<SocketAddr>,
    /// Write the stand-in CA's root certificate here (for --extra-roots or
    /// a DestinationRule's caCertificates).
    #[arg(long)]
    ca_out: Option<PathBuf>,
    /// Issue the hosts' certificates from this CA certificate (PEM) instead
    /// of a new one; with --ca-key.
    #[arg(long, value_name = "FILE", requires = "ca_key")]
    ca_cert: Option<PathBuf>,
    /// The key of --ca-cert (PEM).
    #[arg(long, value_name = "FILE", requires = "ca_cert")]
    ca_key: Option<PathBuf>,
    /// Present this certificate for NAME (repeat; `*.x` covers `a.x`):
    /// NAME=CHAIN.pem:KEY.pem. Other names get one from the stand-in CA.
    #[arg(long = "host-cert", value_name = "NAME=CHAIN:KEY")]
    host_certs: Vec<String>,
    /// Require a client certificate that chains to this CA (PEM): an API
    /// that wants mutual TLS (a DestinationRule with mode MUTUAL).
    #[arg(long, value_name = "FILE")]
    client_ca: Option<PathBuf>,
}

fn read(path: &std::path::Path, flag: &str) -> anyhow::Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("{flag} {}", path.display()))
}

impl StandinArgs {
    fn ca(&self) -> anyhow::Result<StandinCa> {
        match (&self.ca_cert, &self.ca_key) {
            (Some(cert), Some(key)) => Ok(StandinCa::from_pem(
                &read(cert, "--ca-cert")?,
                &read(key, "--ca-key")?,
            )?),
            _ => Ok(StandinCa::new("meshgate stand-in CA")?),
        }
    }

    fn host_certs(&self) -> anyhow::Result<Vec<HostCert>> {
        self.host_certs
            .iter()
            .map(|spec| {
                let bad = || format!("--host-cert {spec}: expected NAME=CHAIN.pem:KEY.pem");
                let (name, files) = spec.split_once('=').with_context(bad)?;
                let (chain, key) = files.split_once(':').with_context(bad)?;
                let chain = read(std::path::Path::new(chain), "--host-cert")?;
                let key = read(std::path::Path::new(key), "--host-cert")?;
                Ok(HostCert::from_pem(vec![name.to_owned()], &chain, &key)?)
            })
            .collect()
    }
}

pub(crate) fn run(a: &StandinArgs) -> anyhow::Result<ExitCode> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .context("starting the runtime")?;
    rt.block_on(async {
        let mut https = a.https_listen;
        // Written even with no hosts to serve: whoever trusts it needs it.
        let ca = std::sync::Arc::new(a.ca()?);
        if let Some(out) = &a.ca_out {
            std::fs::write(out, &ca.root_pem)
                .with_context(|| format!("writing {}", out.display()))?;
        }
        if !a.hosts.is_empty() {
            let client_ca = match &a.client_ca {
                Some(p) => Some(read(p, "--client-ca")?),
                None => None,
            };
            // Clients without SNI get the first host's certificate.
            let default_name = a.hosts[0].trim_start_matches("*.");
            let tls = ca.any_host_config(default_name, a.host_certs()?, client_ca.as_deref())?;
            let listener = tokio::net::TcpListener::bind(a.https_listen)
                .await
                .with_context(|| format!("listening on {}", a.https_listen))?;
            https = listener.local_addr()?;
            tokio::spawn(standin::serve_https(listener, tls, Seen::unrecorded()));
        }
        let mut zone = match a.answer_all {
            Some(ip) => DnsZone::default().with_fallback(ip),
            None => DnsZone::default(),
        };
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
