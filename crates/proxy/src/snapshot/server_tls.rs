//! What a listener does with TLS from its clients, with the rustls server
//! configs built once per snapshot.

use std::path::Path;
use std::sync::Arc;

use meshgate_config::model::networking::{ServerTlsMode as Mode, ServerTlsSettings};
use meshgate_config::view::DownstreamTls;
use meshgate_identity::cert::{read_certs, read_key};
use meshgate_identity::tls::{mesh_server_config, provider};

use super::{BuildContext, Role};

/// How a listener treats TLS from clients.
#[derive(Debug, Clone)]
pub enum ListenerTls {
    /// Plaintext (a sidecar's outbound ports).
    Plain,
    /// Plain HTTP that also accepts mutual TLS from mesh peers (detected on
    /// the first byte), as meshgate's gateways do.
    MeshAuto,
    /// TLS terminated with this config (SIMPLE, MUTUAL, ISTIO_MUTUAL).
    Terminate(Arc<rustls::ServerConfig>),
    /// TLS passed through by SNI (not terminated).
    Passthrough,
}

impl ListenerTls {
    pub(super) fn build(
        tls: &DownstreamTls,
        role: Role,
        ctx: &BuildContext,
    ) -> Result<ListenerTls, String> {
        match (tls, role) {
            (DownstreamTls::SniPassthrough, _) => Ok(ListenerTls::Passthrough),
            (DownstreamTls::None, Role::Sidecar) => Ok(ListenerTls::Plain),
            // A gateway workload is a mesh endpoint: its plain servers also
            // take mutual TLS from mesh peers.
            (DownstreamTls::None | DownstreamTls::MeshAuto, _) => Ok(ListenerTls::MeshAuto),
            (DownstreamTls::Server(t), _) => server(t, ctx),
        }
    }
}

fn server(t: &ServerTlsSettings, ctx: &BuildContext) -> Result<ListenerTls, String> {
    let alpn: [&[u8]; 2] = [b"h2", b"http/1.1"];
    match t.mode {
        Mode::Passthrough | Mode::AutoPassthrough => Ok(ListenerTls::Passthrough),
        Mode::IstioMutual => {
            let id = ctx
                .identity
                .as_ref()
                .ok_or("ISTIO_MUTUAL needs a workload identity")?;
            mesh_server_config(id, &alpn)
                .map(ListenerTls::Terminate)
                .map_err(|e| e.to_string())
        }
        Mode::Simple | Mode::Mutual | Mode::OptionalMutual => {
            let mut config = from_files(t).map_err(|e| e.to_string())?;
            config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
            Ok(ListenerTls::Terminate(Arc::new(config)))
        }
    }
}

/// SIMPLE, MUTUAL and OPTIONAL_MUTUAL servers: certificate, key and (for
/// client certificates) CA from the files the Gateway names.
fn from_files(t: &ServerTlsSettings) -> Result<rustls::ServerConfig, Box<dyn std::error::Error>> {
    let chain = read_certs(Path::new(&t.server_certificate))?;
    let key = read_key(Path::new(&t.private_key))?;
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?;
    let builder = if t.mode == Mode::Simple {
        builder.with_no_client_auth()
    } else {
        let mut roots = rustls::RootCertStore::empty();
        for c in read_certs(Path::new(&t.ca_certificates))? {
            roots.add(c)?;
        }
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            provider(),
        );
        let verifier = if t.mode == Mode::OptionalMutual {
            verifier.allow_unauthenticated()
        } else {
            verifier
        };
        builder.with_client_cert_verifier(verifier.build()?)
    };
    Ok(builder.with_single_cert(chain, key)?)
}
