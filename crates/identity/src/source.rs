//! The live workload identity and where it comes from.
//!
//! Four sources: an in-process CA (the all-in-one local run), mounted files
//! in Istio's layout (re-read when they change), `meshgate ca serve` or
//! `meshgate control` (a CSR authenticated by a token), or an Istio CA
//! (istiod) over Istio's gRPC API. Certificates from a CA are
//! renewed at about half their lifetime, with jitter. A renewal swaps the
//! certificate atomically: new handshakes use it, open connections keep
//! theirs.

use std::path::PathBuf;
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime};

use arc_swap::{ArcSwap, ArcSwapOption};
use rustls::sign::CertifiedKey;
use rustls_pki_types::PrivateKeyDer;
use rustls_pki_types::pem::PemObject;
use tokio::sync::watch;

use crate::ca::{CERT_CHAIN_FILE, CertificateAuthority, IssuedIdentity, KEY_FILE, ROOT_CERT_FILE};
use crate::cert::{CertInfo, parse_certs};
use crate::tls::{TrustBundle, certified_key};
use crate::{Error, SpiffeId};

/// Istio renews at 50% of the lifetime (SECRET_GRACE_PERIOD_RATIO).
const REFRESH_FRACTION: f64 = 0.5;
/// ± jitter as a fraction of the lifetime.
const REFRESH_JITTER: f64 = 0.01;
const RETRY_MIN: Duration = Duration::from_millis(500);
const RETRY_MAX: Duration = Duration::from_secs(30);

/// Where certificates come from.
#[derive(Debug, Clone)]
pub enum Source {
    /// Issue locally from a CA held in this process.
    InProcess {
        ca: Arc<CertificateAuthority>,
        ttl: Duration,
    },
    /// Istio's mounted layout: `cert-chain.pem`, `key.pem`, `root-cert.pem`,
    /// checked for changes every `poll`.
    Files { dir: PathBuf, poll: Duration },
    /// `meshgate ca serve` at `addr`, authenticated by the token in
    /// `token_file`, its certificate verified against `root_cert`.
    CaServer {
        addr: String,
        token_file: PathBuf,
        root_cert: PathBuf,
        ttl: Duration,
    },
    /// An Istio CA (istiod's 15012) at `addr` over Istio's gRPC API, with
    /// the pod's service-account token in `token_file`; its serving
    /// certificate must chain to `root_cert` and name `server_name`.
    IstioCa {
        addr: String,
        server_name: String,
        token_file: PathBuf,
        root_cert: PathBuf,
        ttl: Duration,
    },
}

/// One loaded certificate with what we derived from it.
#[derive(Debug)]
pub struct Loaded {
    pub certified: Arc<CertifiedKey>,
    pub info: CertInfo,
    pub trust: Arc<TrustBundle>,
    /// The PEM chain, for comparison when watching files.
    chain_pem: String,
    received: SystemTime,
}

/// A workload's identity: its SPIFFE ID, current certificate and trust
/// bundle, readable lock-free on every handshake.
#[derive(Debug)]
pub struct WorkloadIdentity {
    id: SpiffeId,
    current: ArcSwapOption<Loaded>,
    /// Trust without a certificate (bootstrap clients); replaced by `current`.
    trust: ArcSwap<TrustBundle>,
    /// Counts certificate loads; tests and readiness wait on it.
    generation: watch::Sender<u64>,
    /// Why the last renewal failed; `None` after a success.
    renewal_error: watch::Sender<Option<Arc<str>>>,
}

impl WorkloadIdentity {
    /// Loads the first certificate (so a proxy is never up without one) and
    /// starts rotation in the background. The task ends when the identity
    /// is dropped.
    pub async fn start(id: SpiffeId, source: Source) -> Result<Arc<Self>, Error> {
        let first = fetch(&id, &source).await?;
        let identity = Arc::new(WorkloadIdentity {
            id,
            trust: ArcSwap::new(first.trust.clone()),
            current: ArcSwapOption::empty(),
            generation: watch::channel(0).0,
            renewal_error: watch::channel(None).0,
        });
        identity.install(first);
        tokio::spawn(rotate(Arc::downgrade(&identity), source));
        Ok(identity)
    }

    /// Reads a mounted certificate directory, taking the SPIFFE ID from the
    /// certificate itself.
    pub async fn from_files(dir: PathBuf, poll: Duration) -> Result<Arc<Self>, Error> {
        let chain = crate::cert::read_certs(&dir.join(CERT_CHAIN_FILE))?;
        let id = crate::tls::spiffe_id_of(&chain[0])
            .map_err(|e| Error::File(dir.join(CERT_CHAIN_FILE), e.to_string()))?;
        Self::start(id, Source::Files { dir, poll }).await
    }

    /// An identity with only a trust bundle (no certificate).
    pub(crate) fn trust_only(id: SpiffeId, trust: TrustBundle) -> Arc<Self> {
        Arc::new(WorkloadIdentity {
            id,
            current: ArcSwapOption::empty(),
            trust: ArcSwap::new(Arc::new(trust)),
            generation: watch::channel(0).0,
            renewal_error: watch::channel(None).0,
        })
    }

    /// An identity from fixed PEM material, without checking that the
    /// certificate carries `id` (tests use it to present broken certificates).
    #[cfg(test)]
    pub(crate) fn fixed(id: SpiffeId, issued: &IssuedIdentity) -> Arc<Self> {
        let chain = parse_certs(&issued.cert_chain_pem).expect("chain");
        let key = PrivateKeyDer::from_pem_slice(issued.key_pem.as_bytes()).expect("key");
        let loaded = Loaded {
            certified: Arc::new(certified_key(chain.clone(), key).expect("certified key")),
            info: CertInfo::parse(&chain[0]).expect("info"),
            trust: Arc::new(TrustBundle::from_pem(&issued.root_pem).expect("trust")),
            chain_pem: issued.cert_chain_pem.clone(),
            received: SystemTime::now(),
        };
        let me = Self::trust_only(id, TrustBundle::from_pem(&issued.root_pem).expect("trust"));
        me.install(loaded);
        me
    }

    pub fn id(&self) -> &SpiffeId {
        &self.id
    }

    /// The certificate to present now.
    pub fn certified(&self) -> Option<Arc<CertifiedKey>> {
        self.current.load().as_ref().map(|l| l.certified.clone())
    }

    /// The roots peers must chain to.
    pub fn trust(&self) -> Arc<TrustBundle> {
        self.trust.load_full()
    }

    /// Facts about the current certificate.
    pub fn info(&self) -> Option<CertInfo> {
        self.current.load().as_ref().map(|l| l.info.clone())
    }

    /// A receiver that changes on every certificate load (1 after start).
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }

    /// Why the last renewal failed (the current certificate is kept until
    /// it expires); `None` when the last one succeeded.
    pub fn renewal_error(&self) -> Option<Arc<str>> {
        self.renewal_error.borrow().clone()
    }

    /// Changes of `renewal_error`.
    pub fn watch_renewal(&self) -> watch::Receiver<Option<Arc<str>>> {
        self.renewal_error.subscribe()
    }

    /// No certificate, or the current one is past its NotAfter.
    pub fn expired(&self) -> bool {
        self.info().is_none_or(|i| i.not_after <= SystemTime::now())
    }

    fn install(&self, loaded: Loaded) {
        tracing::info!(
            identity = %self.id,
            valid_for_s = until(loaded.info.not_after).as_secs(),
            "workload certificate loaded"
        );
        self.trust.store(loaded.trust.clone());
        self.current.store(Some(Arc::new(loaded)));
        self.generation.send_modify(|g| *g += 1);
    }
}

fn loaded_from_pem(
    id: &SpiffeId,
    chain_pem: &str,
    key_pem: &str,
    root_pem: &str,
) -> Result<Loaded, Error> {
    let chain = parse_certs(chain_pem)?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
        .map_err(|e| Error::Certificate(format!("no usable private key: {e}")))?;
    let info = CertInfo::parse(&chain[0])?;
    let got = crate::tls::spiffe_id_of(&chain[0]).map_err(|e| Error::Certificate(e.to_string()))?;
    if &got != id {
        return Err(Error::Certificate(format!(
            "certificate is for {got}, expected {id}"
        )));
    }
    Ok(Loaded {
        certified: Arc::new(certified_key(chain, key)?),
        info,
        trust: Arc::new(TrustBundle::from_pem(root_pem)?),
        chain_pem: chain_pem.to_owned(),
        received: SystemTime::now(),
    })
}

async fn fetch(id: &SpiffeId, source: &Source) -> Result<Loaded, Error> {
    match source {
        Source::InProcess { ca, ttl } => {
            let issued: IssuedIdentity = ca.issue(id, *ttl)?;
            loaded_from_pem(
                id,
                &issued.cert_chain_pem,
                &issued.key_pem,
                &issued.root_pem,
            )
        }
        Source::Files { dir, .. } => {
            let read = |name: &str| {
                let p = dir.join(name);
                std::fs::read_to_string(&p).map_err(|e| Error::File(p, e.to_string()))
            };
            loaded_from_pem(
                id,
                &read(CERT_CHAIN_FILE)?,
                &read(KEY_FILE)?,
                &read(ROOT_CERT_FILE)?,
            )
        }
        Source::CaServer {
            addr,
            token_file,
            root_cert,
            ttl,
        } => {
            let (csr, key) = CertificateAuthority::csr_for(id)?;
            let (token, root_pem) = credentials(token_file, root_cert)?;
            let response =
                crate::caserver::request_certificate(addr, token.trim(), &root_pem, &csr, *ttl)
                    .await?;
            loaded_from_pem(
                id,
                &response.cert_chain,
                &key.serialize_pem(),
                &response.root_cert,
            )
        }
        Source::IstioCa {
            addr,
            server_name,
            token_file,
            root_cert,
            ttl,
        } => {
            let (csr, key) = CertificateAuthority::csr_for(id)?;
            let (token, root_pem) = credentials(token_file, root_cert)?;
            let issued = crate::istioca::request_certificate(
                addr,
                server_name,
                token.trim(),
                &root_pem,
                &csr,
                *ttl,
            )
            .await?;
            loaded_from_pem(
                id,
                &issued.cert_chain,
                &key.serialize_pem(),
                &issued.root_cert,
            )
        }
    }
}

/// The token and the root a CA request needs, read again for every
/// request (a projected token is rotated by the kubelet).
fn credentials(token_file: &PathBuf, root_cert: &PathBuf) -> Result<(String, String), Error> {
    let read =
        |p: &PathBuf| std::fs::read_to_string(p).map_err(|e| Error::File(p.clone(), e.to_string()));
    Ok((read(token_file)?, read(root_cert)?))
}

/// How long until `t` (zero if past).
fn until(t: SystemTime) -> Duration {
    t.duration_since(SystemTime::now()).unwrap_or_default()
}

async fn rotate(identity: Weak<WorkloadIdentity>, source: Source) {
    let mut backoff = RETRY_MIN;
    loop {
        let Some(me) = identity.upgrade() else { return };
        let wait = match (&source, me.current.load().as_ref()) {
            (Source::Files { poll, .. }, _) => *poll,
            (_, Some(cur)) => until(cur.info.refresh_at(
                cur.received,
                REFRESH_FRACTION,
                REFRESH_JITTER,
            )),
            (_, None) => Duration::ZERO,
        };
        let id = me.id.clone();
        drop(me);
        tokio::time::sleep(wait).await;

        let result = fetch(&id, &source).await;
        let Some(me) = identity.upgrade() else { return };
        match result {
            Ok(loaded) => {
                backoff = RETRY_MIN;
                me.renewal_error.send_replace(None);
                let unchanged = matches!(source, Source::Files { .. })
                    && me
                        .current
                        .load()
                        .as_ref()
                        .is_some_and(|cur| cur.chain_pem == loaded.chain_pem);
                if !unchanged {
                    me.install(loaded);
                }
            }
            Err(e) => {
                // Keep serving with the certificate we have; it is still valid
                // until its NotAfter.
                tracing::warn!(identity = %id, error = %e, retry_in = ?backoff, "certificate renewal failed");
                me.renewal_error
                    .send_replace(Some(Arc::from(e.to_string().as_str())));
                drop(me);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(RETRY_MAX);
            }
        }
    }
}

/// A serving certificate for DNS names (the control plane's Service: its
/// admission webhooks and its CA port for Istio's agents), from the mesh
/// CA, renewed in place at half its lifetime while anyone holds it.
#[derive(Debug)]
pub struct DnsCert {
    names: Vec<String>,
    current: ArcSwap<CertifiedKey>,
}

impl DnsCert {
    /// Issues the first certificate and starts renewing it (needs a tokio
    /// runtime).
    pub fn start(
        ca: Arc<CertificateAuthority>,
        names: Vec<String>,
        ttl: Duration,
    ) -> Result<Arc<Self>, Error> {
        let cert = Arc::new(DnsCert {
            current: ArcSwap::new(Arc::new(Self::issue(&ca, &names, ttl)?)),
            names,
        });
        let weak = Arc::downgrade(&cert);
        tokio::spawn(async move {
            let mut wait = ttl.mul_f64(REFRESH_FRACTION);
            loop {
                tokio::time::sleep(wait).await;
                let Some(me) = weak.upgrade() else { return };
                match Self::issue(&ca, &me.names, ttl) {
                    Ok(key) => {
                        me.current.store(Arc::new(key));
                        tracing::info!(names = me.names.join(","), "serving certificate renewed");
                        wait = ttl.mul_f64(REFRESH_FRACTION);
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "serving certificate not renewed; retrying");
                        wait = RETRY_MAX;
                    }
                }
            }
        });
        Ok(cert)
    }

    fn issue(
        ca: &CertificateAuthority,
        names: &[String],
        ttl: Duration,
    ) -> Result<CertifiedKey, Error> {
        let issued = ca.issue_dns(names, ttl)?;
        let key = PrivateKeyDer::from_pem_slice(issued.key_pem.as_bytes())
            .map_err(|e| Error::Certificate(format!("no usable private key: {e}")))?;
        certified_key(parse_certs(&issued.cert_chain_pem)?, key)
    }

    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// The certificate to present now.
    pub fn certified(&self) -> Arc<CertifiedKey> {
        self.current.load_full()
    }
}
