//! A DestinationRule's `tunnel`: TCP to the cluster goes through an HTTP
//! CONNECT tunnel its endpoint (a forward proxy) opens to `targetHost:
//! targetPort`, as Envoy's TCP proxy `tunneling_config` (HTTP/1.1). The
//! answer's head is read a byte at a time so that nothing of the tunnel
//! that comes with it is lost.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::UpstreamError;

/// The most a proxy's answer to CONNECT may take before the tunnel.
const MAX_HEAD: usize = 8 * 1024;

/// Asks the proxy at the other end of `io` for a tunnel to `authority`
/// (`host:port`); `Ok` once it answered 2xx. The caller bounds the wait.
pub(super) async fn open<S>(io: &mut S, authority: &str) -> Result<(), UpstreamError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let failed = |why: String| UpstreamError::ConnectFailure(format!("tunnel: {why}"));
    let request = format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n");
    io.write_all(request.as_bytes())
        .await
        .map_err(|e| failed(e.to_string()))?;
    io.flush().await.map_err(|e| failed(e.to_string()))?;
    let head = read_head(io).await.map_err(|e| failed(e.to_string()))?;
    match status(&head) {
        Some(code) if (200..300).contains(&code) => Ok(()),
        Some(code) => Err(failed(format!(
            "the proxy answered {code} to CONNECT {authority}"
        ))),
        None => Err(failed("the proxy's answer is not HTTP/1.1".to_owned())),
    }
}

/// Bytes up to the blank line that ends the answer's head.
async fn read_head<S: AsyncRead + Unpin>(io: &mut S) -> std::io::Result<Vec<u8>> {
    let mut head = Vec::with_capacity(128);
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() >= MAX_HEAD {
            return Err(std::io::Error::other(
                "the proxy's answer head is over 8 KiB",
            ));
        }
        head.push(io.read_u8().await?);
    }
    Ok(head)
}

/// The status of an HTTP/1.x status line.
fn status(head: &[u8]) -> Option<u16> {
    let line = head.split(|b| *b == b'\n').next()?;
    let mut parts = std::str::from_utf8(line).ok()?.split(' ');
    let version = parts.next()?;
    if !version.starts_with("HTTP/1.") {
        return None;
    }
    parts.next()?.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_2xx_opens_the_tunnel_and_what_follows_the_head_is_left() {
        let (mut ours, mut proxy) = tokio::io::duplex(1024);
        let answered = tokio::spawn(async move {
            let asked = read_head(&mut proxy).await.unwrap();
            proxy
                .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n220 banner\r\n")
                .await
                .unwrap();
            String::from_utf8_lossy(&asked).into_owned()
        });
        open(&mut ours, "smtp.example.com:25").await.unwrap();
        assert_eq!(
            answered.await.unwrap(),
            "CONNECT smtp.example.com:25 HTTP/1.1\r\nHost: smtp.example.com:25\r\n\r\n"
        );
        let mut banner = [0u8; 12];
        ours.read_exact(&mut banner).await.unwrap();
        assert_eq!(
            &banner, b"220 banner\r\n",
            "the server's first bytes are the tunnel's"
        );
    }

    #[tokio::test]
    async fn a_refusal_or_a_non_http_answer_is_a_connect_failure() {
        for (answer, why) in [
            (
                &b"HTTP/1.1 403 Forbidden\r\ncontent-length: 0\r\n\r\n"[..],
                "answered 403",
            ),
            (b"SSH-2.0-OpenSSH\r\n\r\n", "not HTTP/1.1"),
        ] {
            let (mut ours, mut proxy) = tokio::io::duplex(1024);
            tokio::spawn(async move {
                read_head(&mut proxy).await.unwrap();
                proxy.write_all(answer).await.unwrap();
            });
            let err = open(&mut ours, "a.example.com:443").await.unwrap_err();
            assert!(
                matches!(&err, UpstreamError::ConnectFailure(m) if m.contains(why)),
                "{err}"
            );
        }
    }
}
