//! Asynchronous DNS for `resolution: DNS` clusters: hickory's resolver,
//! which caches answers for their TTL. The nameserver is the system's
//! (resolv.conf) unless one is given (`--dns-server`).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use hickory_resolver::TokioResolver;
use hickory_resolver::config::{
    LookupIpStrategy, NameServerConfig, ResolveHosts, ResolverConfig, ResolverOpts,
};
use hickory_resolver::net::runtime::TokioRuntimeProvider;

#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    #[error("cannot set up the DNS resolver: {0}")]
    Setup(String),
    #[error("DNS lookup of {host} failed: {reason}")]
    Lookup { host: String, reason: String },
    /// DNS answered: the name has no address (NXDOMAIN, or no A or AAAA).
    #[error("DNS has no address for {host}")]
    NoAddresses { host: String },
}

#[derive(Clone)]
pub struct Resolver {
    inner: Arc<TokioResolver>,
}

impl std::fmt::Debug for Resolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Resolver")
    }
}

impl Resolver {
    /// The system resolver (`/etc/resolv.conf`), or one nameserver.
    pub fn new(server: Option<SocketAddr>) -> Result<Self, DnsError> {
        let mut opts = ResolverOpts::default();
        // Names in ServiceEntries are absolute; do not try search domains.
        opts.ndots = 0;
        // Envoy's V4_PREFERRED (Istio on a single-stack IPv4 cluster asks
        // for V4 only): A first, AAAA only when there is no A. Asking both
        // would also re-ask an empty AAAA on every lookup (it is cached for
        // 0 s), so a DNS outage would stall requests whose A is cached.
        opts.ip_strategy = LookupIpStrategy::Ipv4thenIpv6;
        let builder = match server {
            Some(addr) => {
                // An explicit nameserver is the only source of answers: the
                // workload's /etc/hosts is not consulted.
                opts.use_hosts_file = ResolveHosts::Never;
                let mut ns = NameServerConfig::udp_and_tcp(addr.ip());
                for c in &mut ns.connections {
                    c.port = addr.port();
                }
                let mut cfg = ResolverConfig::default();
                cfg.add_name_server(ns);
                TokioResolver::builder_with_config(cfg, TokioRuntimeProvider::default())
            }
            None => TokioResolver::builder_tokio().map_err(|e| DnsError::Setup(e.to_string()))?,
        };
        let inner = builder
            .with_options(opts)
            .build()
            .map_err(|e| DnsError::Setup(e.to_string()))?;
        Ok(Resolver {
            inner: Arc::new(inner),
        })
    }

    /// The addresses of `host` (an IP literal is returned as is).
    pub async fn lookup(&self, host: &str) -> Result<Vec<IpAddr>, DnsError> {
        if let Ok(ip) = host.trim_matches(['[', ']']).parse::<IpAddr>() {
            return Ok(vec![ip]);
        }
        let fqdn = if host.ends_with('.') {
            host.to_owned()
        } else {
            format!("{host}.")
        };
        let answer = self.inner.lookup_ip(fqdn.as_str()).await.map_err(|e| {
            if e.is_no_records_found() {
                DnsError::NoAddresses {
                    host: host.to_owned(),
                }
            } else {
                DnsError::Lookup {
                    host: host.to_owned(),
                    reason: e.to_string(),
                }
            }
        })?;
        let ips: Vec<IpAddr> = answer.iter().collect();
        if ips.is_empty() {
            return Err(DnsError::NoAddresses {
                host: host.to_owned(),
            });
        }
        Ok(ips)
    }
}
