//! The SNI of a TLS ClientHello (RFC 8446 4.1.2, RFC 6066 3), read
//! without terminating TLS: how passthrough traffic is routed.

/// A TLS record is at most 16 KiB plus its 5-byte header.
pub const MAX_HELLO: usize = 16 * 1024 + 5;

#[derive(Debug, PartialEq, Eq)]
pub enum Hello {
    /// A complete ClientHello; the SNI if it carries one.
    Complete(Option<String>),
    /// More bytes are needed.
    Partial,
    /// Not a TLS ClientHello.
    NotTls,
}

/// Parses the SNI out of the first TLS record (RFC 8446 4.1.2, RFC 6066 3).
pub fn parse_client_hello(buf: &[u8]) -> Hello {
    if buf.is_empty() {
        return Hello::Partial;
    }
    if buf[0] != 0x16 {
        return Hello::NotTls;
    }
    if buf.len() < 5 {
        return Hello::Partial;
    }
    let record_len = usize::from(u16::from_be_bytes([buf[3], buf[4]]));
    if buf.len() < 5 + record_len {
        return Hello::Partial;
    }
    let hs = &buf[5..5 + record_len];
    parse_handshake(hs).map_or(Hello::NotTls, Hello::Complete)
}

fn parse_handshake(hs: &[u8]) -> Option<Option<String>> {
    let mut r = Reader(hs);
    if r.u8()? != 1 {
        return None; // not ClientHello
    }
    let len = r.u24()?;
    let mut r = Reader(r.take(len)?);
    r.take(2 + 32)?; // version, random
    r.vec8()?; // session id
    r.vec16()?; // cipher suites
    r.vec8()?; // compression methods
    if r.0.is_empty() {
        return Some(None); // no extensions
    }
    let mut exts = r.vec16()?;
    while !exts.0.is_empty() {
        let ty = exts.u16()?;
        let data = exts.vec16()?;
        if ty == 0 {
            return server_name(data);
        }
    }
    Some(None)
}

/// The host name in a server_name extension (RFC 6066 3). A name that is
/// empty, longer than a DNS name, or not printable ASCII makes the hello
/// malformed, as BoringSSL (Envoy's TLS inspector) refuses it: it would
/// otherwise reach routes and logs as the client wrote it.
fn server_name(mut data: Reader<'_>) -> Option<Option<String>> {
    let mut names = data.vec16()?;
    while !names.0.is_empty() {
        let kind = names.u8()?;
        let name = names.vec16()?;
        if kind == 0 {
            let valid = (1..=255).contains(&name.0.len())
                && name.0.iter().all(|b| (0x21..=0x7e).contains(b));
            return valid.then(|| Some(String::from_utf8_lossy(name.0).to_ascii_lowercase()));
        }
    }
    Some(None)
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }

    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }

    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }

    fn u24(&mut self) -> Option<usize> {
        self.take(3)
            .map(|b| (usize::from(b[0]) << 16) | (usize::from(b[1]) << 8) | usize::from(b[2]))
    }

    /// A vector with a one-byte length.
    fn vec8(&mut self) -> Option<Reader<'a>> {
        let n = usize::from(self.u8()?);
        self.take(n).map(Reader)
    }

    /// A vector with a two-byte length.
    fn vec16(&mut self) -> Option<Reader<'a>> {
        let n = usize::from(self.u16()?);
        self.take(n).map(Reader)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    /// A real ClientHello, made by rustls, for `name`.
    fn hello(name: &str) -> Vec<u8> {
        let cfg = rustls::ClientConfig::builder_with_provider(meshgate_identity::tls::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        let mut conn =
            rustls::ClientConnection::new(Arc::new(cfg), name.to_owned().try_into().unwrap())
                .unwrap();
        let mut out = Vec::new();
        conn.write_tls(&mut out).unwrap();
        out
    }

    #[test]
    fn sni_from_a_real_client_hello() {
        let h = hello("API.Example.com");
        assert_eq!(
            parse_client_hello(&h),
            Hello::Complete(Some("api.example.com".into()))
        );
        for cut in [0, 1, 4, 5, 40, h.len() - 1] {
            assert_eq!(
                parse_client_hello(&h[..cut]),
                Hello::Partial,
                "cut at {cut}"
            );
        }
        assert_eq!(parse_client_hello(b"GET / HTTP/1.1\r\n"), Hello::NotTls);
        let ip = hello("10.0.0.1");
        assert_eq!(
            parse_client_hello(&ip),
            Hello::Complete(None),
            "no SNI for an IP address"
        );
        let mut garbage = h.clone();
        garbage[5] = 2; // not a ClientHello
        assert_eq!(parse_client_hello(&garbage), Hello::NotTls);
    }

    /// A minimal ClientHello whose server_name is `name`, byte for byte.
    fn hello_naming(name: &[u8]) -> Vec<u8> {
        let be16 = |n: usize| [(n >> 8) as u8, n as u8];
        let mut list = vec![0];
        list.extend(be16(name.len()));
        list.extend(name);
        let mut ext = vec![0, 0];
        ext.extend(be16(list.len() + 2));
        ext.extend(be16(list.len()));
        ext.extend(list);
        let mut body = vec![3, 3];
        body.extend([7u8; 32]);
        body.extend([0, 0, 2, 0x13, 0x01, 1, 0]);
        body.extend(be16(ext.len()));
        body.extend(ext);
        let mut hs = vec![1, 0];
        hs.extend(be16(body.len()));
        hs.extend(body);
        let mut record = vec![0x16, 3, 1];
        record.extend(be16(hs.len()));
        record.extend(hs);
        record
    }

    /// Names BoringSSL refuses make the hello malformed; others are
    /// lowercased.
    #[test]
    fn server_names_are_checked() {
        let named = |n: &[u8]| parse_client_hello(&hello_naming(n));
        assert_eq!(
            named(b"API.example.com"),
            Hello::Complete(Some("api.example.com".into()))
        );
        for bad in [&b""[..], b"a\0b", b"a b", b"caf\xc3\xa9", &[b'a'; 256]] {
            assert_eq!(named(bad), Hello::NotTls, "{bad:?}");
        }
    }

    /// Hardening: every byte of a real ClientHello flipped to many values,
    /// and every length field lied about, parses to an answer, never a
    /// panic or an out-of-bounds read; an answer of `Complete` only ever
    /// carries a name that was in the input.
    #[test]
    fn mutated_client_hellos_never_panic() {
        let h = hello("api.example.com");
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        for i in 0..h.len() {
            for v in [
                0u8,
                1,
                0x7f,
                0x80,
                0xff,
                h[i].wrapping_add(1),
                h[i].wrapping_sub(1),
            ] {
                let mut m = h.clone();
                m[i] = v;
                if let Hello::Complete(Some(name)) = parse_client_hello(&m) {
                    assert!(name.len() <= m.len(), "byte {i}={v:#x}");
                }
                // And truncated right after the change.
                let _ = parse_client_hello(&m[..=i]);
            }
        }
        // Random bytes behind a TLS handshake record header.
        for _ in 0..20_000 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let len = (seed % 300) as usize;
            let mut m = vec![0x16, 3, 1, (len >> 8) as u8, len as u8, 1];
            m.extend((0..len).map(|j| (seed >> (j % 56)) as u8));
            let _ = parse_client_hello(&m);
        }
    }
}
