//! `meshgate ca`: create the mesh root, issue workload certificates, and
//! serve certificate requests.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use meshgate_config::model::Duration;
use meshgate_identity::caserver::{self, TokenTable};
use meshgate_identity::{CertificateAuthority, SpiffeId};

#[derive(Debug, clap::Subcommand)]
pub(crate) enum CaCommand {
    /// Create a self-signed root (ECDSA P-256, 10 years) in DIR:
    /// root-cert.pem and root-key.pem (mode 0600).
    Init {
        /// Folder for the CA files.
        #[arg(long)]
        dir: PathBuf,
        /// SPIFFE trust domain of the mesh.
        #[arg(long, default_value = "cluster.local")]
        trust_domain: String,
        /// Replace an existing CA (every certificate it issued stops verifying).
        #[arg(long)]
        force: bool,
    },
    /// Issue a workload certificate in Istio's mounted layout:
    /// cert-chain.pem, key.pem, root-cert.pem.
    Issue {
        /// Folder of the CA (from `ca init`).
        #[arg(long)]
        dir: PathBuf,
        /// Identity, e.g. spiffe://cluster.local/ns/default/sa/default.
        #[arg(long)]
        spiffe_id: String,
        /// Output folder.
        #[arg(long)]
        out: PathBuf,
        /// Lifetime (Go duration syntax: 24h, 90m, 30s); at most 90 days.
        #[arg(long, default_value = "24h")]
        ttl: String,
    },
    /// Issue certificates to proxies over TLS from CSRs, authenticated by
    /// bootstrap tokens (see docs/ca-protocol.md).
    Serve {
        /// Folder of the CA (from `ca init`).
        #[arg(long)]
        dir: PathBuf,
        /// Address to listen on (port 0 picks a free port).
        #[arg(long, default_value = "127.0.0.1:15012")]
        listen: String,
        /// Token file: one `<token> <namespace>/<serviceaccount>` per line.
        #[arg(long)]
        tokens: PathBuf,
    },
}

pub(crate) fn run(cmd: &CaCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        CaCommand::Init {
            dir,
            trust_domain,
            force,
        } => {
            let ca = CertificateAuthority::init(dir, trust_domain, *force)?;
            println!(
                "created CA for trust domain {} in {} (root-cert.pem, root-key.pem)",
                ca.trust_domain(),
                dir.display()
            );
        }
        CaCommand::Issue {
            dir,
            spiffe_id,
            out,
            ttl,
        } => {
            let ca = CertificateAuthority::load(dir)?;
            let id: SpiffeId = spiffe_id.parse()?;
            let ttl = Duration::parse(ttl)
                .map_err(anyhow::Error::msg)
                .context("--ttl")?;
            let issued = ca.issue(&id, ttl.as_std())?;
            // Writing over a certificate is how a mounted folder rotates;
            // say so, and whose it was.
            let previous =
                std::fs::read_to_string(out.join(meshgate_identity::ca::CERT_CHAIN_FILE))
                    .ok()
                    .and_then(|pem| meshgate_identity::cert::parse_certs(&pem).ok())
                    .and_then(|certs| meshgate_identity::tls::spiffe_id_of(certs.first()?).ok());
            issued.write_to(out)?;
            match previous {
                Some(old) => println!(
                    "replaced the certificate of {old} in {} with one for {id} (ttl {ttl}); proxies reading the folder take it up",
                    out.display()
                ),
                None => println!(
                    "issued {id} (ttl {ttl}) to {} (cert-chain.pem, key.pem, root-cert.pem)",
                    out.display()
                ),
            }
        }
        CaCommand::Serve {
            dir,
            listen,
            tokens,
        } => {
            let ca = Arc::new(CertificateAuthority::load(dir)?);
            let tokens = TokenTable::load(tokens)?;
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .context("starting the runtime")?;
            rt.block_on(async {
                let listener = tokio::net::TcpListener::bind(listen)
                    .await
                    .with_context(|| format!("listening on {listen}"))?;
                println!(
                    "meshgate CA for {} listening on {}",
                    ca.trust_domain(),
                    listener.local_addr()?
                );
                tokio::select! {
                    r = caserver::serve(ca, tokens, listener) => r.map_err(anyhow::Error::from),
                    _ = crate::shutdown_signal() => Ok(()),
                }
            })?;
        }
    }
    Ok(ExitCode::SUCCESS)
}
