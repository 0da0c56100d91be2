//! A proxy's side of the config stream: connect to the control plane with
//! the proxy's mesh certificate, read pushes, report what was applied, and
//! reconnect with backoff while the control plane is away (the proxy keeps
//! running its last good config meanwhile).

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use meshgate_identity::{SpiffeId, WorkloadIdentity, caserver};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use crate::push::{Applied, CONFIG_PATH, HEARTBEAT, Push, STATUS_PATH};

/// Connecting, handshaking and one status report each take at most this.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const BACKOFF_MIN: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// A push larger than this is refused (a config this big is a mistake).
const MAX_LINE: usize = 64 << 20;

/// One version of this proxy's config.
#[derive(Debug)]
pub struct Version {
    pub version: u64,
    pub yaml: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{0}: {1}")]
    Connect(String, String),
    #[error("the control plane answered {0}: {1}")]
    Refused(StatusCode, String),
    #[error("the stream broke: {0}")]
    Stream(String),
}

/// Talks to one control plane for one workload.
#[derive(Clone)]
pub struct ConfigClient {
    addr: String,
    workload: String,
    tls: tokio_rustls::TlsConnector,
}

impl std::fmt::Debug for ConfigClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConfigClient")
            .field("addr", &self.addr)
            .field("workload", &self.workload)
            .finish()
    }
}

impl ConfigClient {
    /// The server must present the CA identity of the proxy's trust domain.
    pub fn new(
        addr: &str,
        workload: &str,
        identity: &Arc<WorkloadIdentity>,
    ) -> Result<Self, meshgate_identity::Error> {
        let server: SpiffeId = caserver::ca_identity(identity.id().trust_domain())?;
        let tls =
            meshgate_identity::tls::mesh_client_config(identity, vec![server], &[b"http/1.1"])?;
        Ok(ConfigClient {
            addr: addr.to_owned(),
            workload: workload.to_owned(),
            tls: tokio_rustls::TlsConnector::from(tls),
        })
    }

    /// Streams versions into `tx` forever: on any failure it waits (0.5 s
    /// doubling to 30 s) and connects again. Ends when `tx` is closed.
    pub async fn run(self, tx: mpsc::Sender<Version>) {
        let mut backoff = BACKOFF_MIN;
        loop {
            match self.stream(&tx).await {
                Ok(()) => return,
                Err(e) => {
                    tracing::warn!(control_plane = %self.addr, error = %e, retry_in = ?backoff, "no config stream");
                }
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    /// One stream, until it breaks. `Ok` when the receiver is gone.
    async fn stream(&self, tx: &mpsc::Sender<Version>) -> Result<(), ClientError> {
        let path = format!(
            "{CONFIG_PATH}?workload={}",
            self.workload.replace('/', "%2F")
        );
        let req = Request::get(path)
            .header(http::header::HOST, &self.addr)
            .body(Empty::<Bytes>::new().boxed())
            .map_err(|e| ClientError::Stream(e.to_string()))?;
        let resp = self.send(req).await?;
        let mut body = resp.into_body();
        let mut buf = BytesMut::new();
        tracing::info!(control_plane = %self.addr, "config stream open");
        loop {
            // Three missed heartbeats: the control plane or the path is gone.
            let frame = tokio::time::timeout(HEARTBEAT * 3, body.frame())
                .await
                .map_err(|_| ClientError::Stream("no heartbeat".into()))?
                .ok_or_else(|| ClientError::Stream("closed".into()))?
                .map_err(|e| ClientError::Stream(e.to_string()))?;
            let Ok(data) = frame.into_data() else {
                continue;
            };
            buf.extend_from_slice(&data);
            if buf.len() > MAX_LINE {
                return Err(ClientError::Stream("a push over 64 MiB".into()));
            }
            while let Some(end) = buf.iter().position(|b| *b == b'\n') {
                let line = buf.split_to(end + 1);
                let push: Push = serde_json::from_slice(&line)
                    .map_err(|e| ClientError::Stream(e.to_string()))?;
                if let (Some(version), Some(yaml)) = (push.version, push.config)
                    && tx.send(Version { version, yaml }).await.is_err()
                {
                    return Ok(());
                }
            }
        }
    }

    /// Tells the control plane what became of a version.
    pub async fn report(&self, version: u64, error: Option<String>) -> Result<(), ClientError> {
        let body = serde_json::to_vec(&Applied {
            workload: self.workload.clone(),
            version,
            error,
        })
        .map_err(|e| ClientError::Stream(e.to_string()))?;
        let req = Request::post(STATUS_PATH)
            .header(http::header::HOST, &self.addr)
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)).boxed())
            .map_err(|e| ClientError::Stream(e.to_string()))?;
        tokio::time::timeout(CONNECT_TIMEOUT, self.send(req))
            .await
            .map_err(|_| ClientError::Connect(self.addr.clone(), "timed out".into()))?
            .map(drop)
    }

    /// Connects (bounded), sends one request, and returns a 200 response.
    async fn send(
        &self,
        req: Request<http_body_util::combinators::BoxBody<Bytes, std::convert::Infallible>>,
    ) -> Result<http::Response<hyper::body::Incoming>, ClientError> {
        let connect = |e: String| ClientError::Connect(self.addr.clone(), e);
        let host = self
            .addr
            .rsplit_once(':')
            .map_or(self.addr.as_str(), |(h, _)| h)
            .trim_matches(['[', ']']);
        let name = rustls_pki_types::ServerName::try_from(host.to_owned())
            .map_err(|e| connect(e.to_string()))?;
        let stream = tokio::time::timeout(CONNECT_TIMEOUT, async {
            let tcp = TcpStream::connect(&self.addr)
                .await
                .map_err(|e| connect(e.to_string()))?;
            self.tls
                .connect(name, tcp)
                .await
                .map_err(|e| connect(meshgate_identity::tls::handshake_error_reason(&e)))
        })
        .await
        .map_err(|_| connect("timed out".into()))??;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .map_err(|e| connect(e.to_string()))?;
        tokio::spawn(conn);
        let resp = tokio::time::timeout(CONNECT_TIMEOUT, sender.send_request(req))
            .await
            .map_err(|_| connect("no answer".into()))?
            .map_err(|e| connect(e.to_string()))?;
        if resp.status() != StatusCode::OK {
            let status = resp.status();
            let text = tokio::time::timeout(CONNECT_TIMEOUT, resp.into_body().collect())
                .await
                .ok()
                .and_then(Result::ok)
                .map(|b| String::from_utf8_lossy(&b.to_bytes()).trim().to_owned())
                .unwrap_or_default();
            return Err(ClientError::Refused(status, text));
        }
        Ok(resp)
    }
}
