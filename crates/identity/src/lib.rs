//! meshgate's identity: the mesh CA, SPIFFE workload certificates, their
//! rotation, and the rustls configs that carry them (mTLS with SPIFFE
//! verification, as Istio's secure naming requires).

pub mod ca;
pub mod caserver;
pub mod cert;
pub mod istioca;
pub mod source;
pub mod spiffe;
pub mod tls;

use std::path::PathBuf;

pub use ca::{CertificateAuthority, IssuedIdentity};
pub use source::{Source, WorkloadIdentity};
pub use spiffe::SpiffeId;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {1}", path = .0.display())]
    File(PathBuf, String),
    #[error("{}: a CA already exists here; pass --force to replace it (every issued certificate stops verifying)", .0.display())]
    AlreadyExists(PathBuf),
    #[error("certificate: {0}")]
    Certificate(String),
    #[error("refused: {0}")]
    Refused(String),
    /// The request itself is malformed (a CSR that does not parse).
    #[error("bad request: {0}")]
    Malformed(String),
    #[error("CA server {0}")]
    CaServer(String),
    #[error("{0}")]
    Config(String),
}

#[cfg(test)]
mod tests;
