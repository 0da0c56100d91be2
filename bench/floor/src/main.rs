//! The floor of `bench/run`: the seed chain's work with nothing but tokio,
//! hyper and rustls. A sidecar takes plain HTTP/1.1 and sends it to the
//! gateway over mutual TLS (HTTP/1.1 or HTTP/2 on that hop); the gateway
//! requires and verifies the client certificate, then originates TLS to the
//! external host with SNI and verification. Every hop keeps its connections.
//! No routing, policy, metrics or logs: what is left is the cost of the
//! stack meshgate is built on, which meshgate's chain is measured against.

mod upstream;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context as _;
use bytes::Bytes;
use clap::{Parser, Subcommand};
use http::{HeaderValue, Request, Response, StatusCode, Uri};
use http_body_util::{Either, Empty};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use rustls::RootCertStore;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;

use upstream::Upstream;

#[derive(Debug, Parser)]
#[command(name = "meshgate-floor", about = "bench/run's reference chain")]
struct Cli {
    #[command(subcommand)]
    part: Part,
}

#[derive(Debug, Subcommand)]
enum Part {
    /// Plain HTTP/1.1 in, mutual TLS to the gateway out.
    Sidecar {
        #[arg(long)]
        listen: SocketAddr,
        #[arg(long)]
        gateway: SocketAddr,
        /// The name the gateway's certificate must carry.
        #[arg(long)]
        gateway_name: String,
        #[command(flatten)]
        mesh: MeshTls,
        /// HTTP/2 on the mesh hop (ALPN h2) instead of HTTP/1.1.
        #[arg(long)]
        h2: bool,
    },
    /// Mutual TLS in (client certificate required), TLS origination out.
    Gateway {
        #[arg(long)]
        listen: SocketAddr,
        #[command(flatten)]
        mesh: MeshTls,
        /// The external host: SNI, verified name and Host header.
        #[arg(long)]
        host: String,
        #[arg(long)]
        upstream: SocketAddr,
        /// The root that signed the external host's certificate.
        #[arg(long)]
        upstream_ca: PathBuf,
    },
}

/// A part's mesh certificate and the root its peers' certificates chain to.
#[derive(Debug, clap::Args)]
struct MeshTls {
    #[arg(long)]
    cert: PathBuf,
    #[arg(long)]
    key: PathBuf,
    #[arg(long)]
    ca: PathBuf,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    // One thread, as meshgate's `--concurrency 1` and one nginx worker.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    // SIGTERM ends the process by returning from main, as meshgate does:
    // exit handlers run (a build with `-Cprofile-generate` writes its
    // profile then, bench/pgo).
    rt.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            r = run(cli.part) => r,
            _ = term.recv() => Ok(()),
        }
    })
}

async fn run(part: Part) -> anyhow::Result<()> {
    match part {
        Part::Sidecar {
            listen,
            gateway,
            gateway_name,
            mesh,
            h2,
        } => {
            let mut tls = rustls::ClientConfig::builder()
                .with_root_certificates(roots(&mesh.ca)?)
                .with_client_auth_cert(certs(&mesh.cert)?, private_key(&mesh.key)?)?;
            tls.alpn_protocols = vec![if h2 {
                b"h2".to_vec()
            } else {
                b"http/1.1".to_vec()
            }];
            let name = ServerName::try_from(gateway_name)?;
            let upstream = Upstream::new(gateway, name, tls, h2);
            let listener = TcpListener::bind(listen).await?;
            eprintln!("floor sidecar on {listen}");
            loop {
                let (tcp, _) = listener.accept().await?;
                tokio::spawn(serve_plain(tcp, upstream.clone()));
            }
        }
        Part::Gateway {
            listen,
            mesh,
            host,
            upstream,
            upstream_ca,
        } => {
            let verifier = WebPkiClientVerifier::builder(Arc::new(roots(&mesh.ca)?)).build()?;
            let mut server = rustls::ServerConfig::builder()
                .with_client_cert_verifier(verifier)
                .with_single_cert(certs(&mesh.cert)?, private_key(&mesh.key)?)?;
            server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
            let acceptor = TlsAcceptor::from(Arc::new(server));
            let mut tls = rustls::ClientConfig::builder()
                .with_root_certificates(roots(&upstream_ca)?)
                .with_no_client_auth();
            tls.alpn_protocols = vec![b"http/1.1".to_vec()];
            let name = ServerName::try_from(host.clone())?;
            let upstream = Upstream::new(upstream, name, tls, false);
            let authority: Uri = format!("https://{host}").parse()?;
            let route = Route {
                host: HeaderValue::try_from(host)?,
                authority,
            };
            let listener = TcpListener::bind(listen).await?;
            eprintln!("floor gateway on {listen}");
            loop {
                let (tcp, _) = listener.accept().await?;
                let (acceptor, upstream, route) =
                    (acceptor.clone(), upstream.clone(), route.clone());
                tokio::spawn(async move {
                    if let Ok(tls) = acceptor.accept(tcp).await {
                        serve_mesh(tls, upstream, route).await;
                    }
                });
            }
        }
    }
}

type Answer = Response<Either<Incoming, Empty<Bytes>>>;

/// The sidecar's side: HTTP/1.1 from the workload, each request sent on.
async fn serve_plain(tcp: TcpStream, upstream: Upstream) {
    let _ = tcp.set_nodelay(true);
    let svc = hyper::service::service_fn(move |mut req: Request<Incoming>| {
        let upstream = upstream.clone();
        async move {
            // As an explicit proxy the URI is absolute; else from Host.
            if req.uri().authority().is_none() {
                let host = req.headers().get(http::header::HOST).cloned();
                let pq = req.uri().path_and_query().cloned();
                if let (Some(host), Some(pq)) = (host, pq) {
                    let uri = Uri::builder()
                        .scheme("http")
                        .authority(host.as_bytes())
                        .path_and_query(pq)
                        .build();
                    if let Ok(uri) = uri {
                        *req.uri_mut() = uri;
                    }
                }
            }
            Ok::<_, std::convert::Infallible>(forward(&upstream, req).await)
        }
    });
    let _ = hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(tcp), svc)
        .await;
}

/// Where the gateway sends every request: one host.
#[derive(Clone)]
struct Route {
    host: HeaderValue,
    authority: Uri,
}

/// The gateway's side: HTTP/1.1 or HTTP/2 as ALPN chose.
async fn serve_mesh(
    tls: tokio_rustls::server::TlsStream<TcpStream>,
    upstream: Upstream,
    route: Route,
) {
    let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
    let svc = hyper::service::service_fn(move |mut req: Request<Incoming>| {
        let upstream = upstream.clone();
        let route = route.clone();
        async move {
            let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
            let mut parts = route.authority.clone().into_parts();
            parts.path_and_query = path.parse().ok();
            if let Ok(uri) = Uri::from_parts(parts) {
                *req.uri_mut() = uri;
            }
            req.headers_mut().insert(http::header::HOST, route.host);
            // The external hop is HTTP/1.1 whatever the mesh hop spoke.
            *req.version_mut() = http::Version::HTTP_11;
            Ok::<_, std::convert::Infallible>(forward(&upstream, req).await)
        }
    });
    let io = TokioIo::new(tls);
    let _ = if h2 {
        hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .serve_connection(io, svc)
            .await
    } else {
        hyper::server::conn::http1::Builder::new()
            .serve_connection(io, svc)
            .await
    };
}

async fn forward(upstream: &Upstream, req: Request<Incoming>) -> Answer {
    match upstream.send(req).await {
        Ok(resp) => resp.map(Either::Left),
        Err(e) => {
            // Never expected in a benchmark: say why, so a run that fails
            // can be read.
            eprintln!("floor: upstream request failed: {e:?}");
            let mut resp = Response::new(Either::Right(Empty::new()));
            *resp.status_mut() = StatusCode::BAD_GATEWAY;
            resp
        }
    }
}

fn roots(path: &PathBuf) -> anyhow::Result<RootCertStore> {
    let mut store = RootCertStore::empty();
    for cert in certs(path)? {
        store.add(cert)?;
    }
    Ok(store)
}

fn certs(path: &PathBuf) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    CertificateDer::pem_file_iter(path)
        .and_then(|i| i.collect::<Result<Vec<_>, _>>())
        .with_context(|| format!("reading certificates from {}", path.display()))
}

fn private_key(path: &PathBuf) -> anyhow::Result<PrivateKeyDer<'static>> {
    PrivateKeyDer::from_pem_file(path)
        .with_context(|| format!("reading a private key from {}", path.display()))
}
