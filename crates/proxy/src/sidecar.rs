//! The sidecar's outbound listener (15001): connections iptables redirected
//! (the original destination from SO_ORIGINAL_DST) and explicit-proxy
//! clients (`curl -x`: absolute-form requests and CONNECT) on one port.
//! What each connection is, is the plan's decision (`plan.rs`).

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};

use crate::conn::Conn;
use crate::listener::accept_loop;
use crate::proxy::Proxy;

/// How the sidecar learns where the application was connecting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OriginalDst {
    /// SO_ORIGINAL_DST: where iptables redirected the connection from. A
    /// connection made to the listener itself is an explicit-proxy client.
    Socket,
    /// Every connection as if redirected on its way to this address: for
    /// running the sidecar where nothing redirects (in-process tests).
    Fixed(SocketAddr),
}

/// The address the application was connecting to, when iptables redirected
/// the connection (`None` when it was made to us directly).
pub fn original_dst(tcp: &TcpStream) -> Option<SocketAddr> {
    let local = tcp.local_addr().ok()?;
    let sock = socket2::SockRef::from(tcp);
    let orig = if local.is_ipv4() {
        sock.original_dst_v4()
    } else {
        sock.original_dst_v6()
    };
    let orig = orig.ok()?.as_socket()?;
    // Not redirected: the kernel reports our own address.
    (orig != local).then_some(orig)
}

/// Serves the outbound listener until the task is dropped. A connection
/// nothing redirected (made to the listener itself) is an explicit-proxy
/// client only with `explicit_proxy`; otherwise the plan closes it, as
/// Istio's virtualOutbound sends connections to 15001 itself to a black
/// hole (no open proxy on the pod's address).
pub async fn serve(
    proxy: Arc<Proxy>,
    listener: TcpListener,
    how: OriginalDst,
    explicit_proxy: bool,
) {
    accept_loop(listener, |tcp, remote| {
        let Some(mut conn) = captured(&tcp, remote, how) else {
            return;
        };
        conn.explicit = conn.original_dst.is_none() && explicit_proxy;
        tokio::spawn(crate::connection::serve(proxy.clone(), conn, tcp));
    })
    .await;
}

/// A connection as captured: where it was going (SO_ORIGINAL_DST, or the
/// fixed address), the port routes match on.
fn captured(tcp: &TcpStream, remote: SocketAddr, how: OriginalDst) -> Option<Conn> {
    let local = tcp.local_addr().ok()?;
    let orig = match how {
        OriginalDst::Socket => original_dst(tcp),
        OriginalDst::Fixed(addr) => Some(addr),
    };
    Some(Conn {
        original_dst: orig,
        ..Conn::accepted(remote, local, orig.map_or(local.port(), |o| o.port()))
    })
}

/// Serves the inbound capture listener (Istio's 15006) until the task is
/// dropped: connections on their way in to the workload, by their
/// original destination (its own address and port).
pub async fn serve_inbound(proxy: Arc<Proxy>, listener: TcpListener, how: OriginalDst) {
    accept_loop(listener, |tcp, remote| {
        let Some(mut conn) = captured(&tcp, remote, how) else {
            return;
        };
        conn.inbound = true;
        tokio::spawn(crate::connection::serve(proxy.clone(), conn, tcp));
    })
    .await;
}
