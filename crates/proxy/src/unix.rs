//! Unix sockets a Sidecar names (`unix:///path`, or `unix://@name` in
//! Linux's abstract namespace): listeners the application calls, and
//! `defaultEndpoint`s the workload serves on.

use std::io;

use tokio::net::{UnixListener, UnixStream};

/// `unix:///path` → `/path`, `unix://@name` → `@name`; `None` for anything
/// else.
pub fn socket_name(uri: &str) -> Option<&str> {
    uri.strip_prefix("unix://").filter(|n| !n.is_empty())
}

#[cfg(target_os = "linux")]
fn abstract_addr(name: &str) -> io::Result<std::os::unix::net::SocketAddr> {
    use std::os::linux::net::SocketAddrExt;
    std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())
}

#[cfg(not(target_os = "linux"))]
fn abstract_addr(_: &str) -> io::Result<std::os::unix::net::SocketAddr> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "abstract unix sockets are Linux-only",
    ))
}

/// Connects to a socket by its name.
pub async fn connect(name: &str) -> io::Result<UnixStream> {
    match name.strip_prefix('@') {
        // A local connect does not block on the network.
        Some(abs) => {
            let s = std::os::unix::net::UnixStream::connect_addr(&abstract_addr(abs)?)?;
            s.set_nonblocking(true)?;
            UnixStream::from_std(s)
        }
        None => UnixStream::connect(name).await,
    }
}

/// Listens on a socket by its name; a file left by an earlier run is
/// replaced (as Envoy does), never another kind of file.
pub fn bind(name: &str) -> io::Result<UnixListener> {
    if let Some(abs) = name.strip_prefix('@') {
        let l = std::os::unix::net::UnixListener::bind_addr(&abstract_addr(abs)?)?;
        l.set_nonblocking(true)?;
        return UnixListener::from_std(l);
    }
    use std::os::unix::fs::FileTypeExt;
    if let Ok(meta) = std::fs::symlink_metadata(name)
        && meta.file_type().is_socket()
    {
        std::fs::remove_file(name)?;
    }
    UnixListener::bind(name)
}
