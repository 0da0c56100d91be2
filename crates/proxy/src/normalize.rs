//! Request path normalization, as Istio configures Envoy (MeshConfig
//! `pathNormalization`): the path is normalized before routing and
//! authorization, and the normalized path is what goes upstream, so a
//! policy on `/admin` cannot be walked around with `/public/../admin`,
//! `/%61dmin` or `/public\..\admin`. Decoding happens once (no double
//! decoding); `%00` is refused in every mode.

use std::borrow::Cow;

use meshgate_config::PathNormalization;

/// A path no normalization makes safe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("%00 in the path")]
    EncodedNul,
}

/// The path as routing, authorization and the upstream see it.
pub fn normalize_path(path: &str, mode: PathNormalization) -> Result<Cow<'_, str>, PathError> {
    let merging = matches!(
        mode,
        PathNormalization::MergeSlashes | PathNormalization::DecodeAndMergeSlashes
    );
    if plainly_normal(path.as_bytes(), merging) {
        return Ok(Cow::Borrowed(path));
    }
    normalize_fully(path, mode)
}

fn normalize_fully(path: &str, mode: PathNormalization) -> Result<Cow<'_, str>, PathError> {
    if contains_encoded_nul(path) {
        return Err(PathError::EncodedNul);
    }
    let (decode_slashes, merge) = match mode {
        PathNormalization::None => return Ok(Cow::Borrowed(path)),
        PathNormalization::Base => (false, false),
        PathNormalization::MergeSlashes => (false, true),
        PathNormalization::DecodeAndMergeSlashes => (true, true),
    };
    // Only paths (origin form) are normalized; `*` and the like are kept.
    if (!path.starts_with('/') && !path.starts_with('\\')) || already_normal(path, merge) {
        return Ok(Cow::Borrowed(path));
    }
    let decoded = decode(path, decode_slashes);
    let mut out = remove_dot_segments(&decoded);
    if merge {
        out = merge_slashes(&out);
    }
    if out == path {
        Ok(Cow::Borrowed(path))
    } else {
        Ok(Cow::Owned(out))
    }
}

/// Most paths, in one pass over their bytes: nothing to decode, no
/// backslash or NUL, no segment starting with a dot, and when merging no
/// repeated slash. (False is not "not normal": the full check decides.)
fn plainly_normal(path: &[u8], merging: bool) -> bool {
    let mut prev = 0u8;
    for &c in path {
        match c {
            b'%' | b'\\' | 0 => return false,
            b'.' if prev == b'/' => return false,
            b'/' if merging && prev == b'/' => return false,
            _ => {}
        }
        prev = c;
    }
    true
}

/// True when normalizing cannot change the path: nothing to decode, no
/// backslash, no dot segment and, when merging, no repeated slash. Most
/// paths are; one pass, no allocation.
fn already_normal(path: &str, merge: bool) -> bool {
    if path.bytes().any(|c| c == b'%' || c == b'\\') {
        return false;
    }
    let mut segments = path.split('/').skip(1).peekable();
    while let Some(s) = segments.next() {
        let repeated_slash = s.is_empty() && segments.peek().is_some();
        if s == "." || s == ".." || (merge && repeated_slash) {
            return false;
        }
    }
    true
}

fn contains_encoded_nul(path: &str) -> bool {
    path.as_bytes().windows(3).any(|w| w == b"%00") || path.contains('\0')
}

/// Unreserved characters (RFC 3986 2.3): decoding them changes no meaning.
fn unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// One pass over the path: unreserved `%XX` decoded (and `%2F`, `%5C` with
/// `slashes`), `\` made `/`. Other escapes are kept as they are; a `%`
/// that starts no escape becomes `%25`, so decoding never makes a new
/// escape (`%%32%65` is not `%2e`, which an upstream would decode again).
fn decode(path: &str, slashes: bool) -> String {
    let b = path.as_bytes();
    let mut out = String::with_capacity(path.len());
    let mut i = 0;
    while i < b.len() {
        let escaped = match b[i] {
            b'%' => b
                .get(i + 1)
                .and_then(|&h| hex(h))
                .zip(b.get(i + 2).and_then(|&l| hex(l)))
                .map(|(h, l)| h << 4 | l),
            _ => None,
        };
        match escaped {
            Some(c) if unreserved(c) || (slashes && matches!(c, b'/' | b'\\')) => {
                out.push(if c == b'\\' { '/' } else { char::from(c) });
                i += 3;
            }
            Some(_) => {
                out.push_str(&path[i..i + 3]);
                i += 3;
            }
            None if b[i] == b'%' => {
                out.push_str("%25");
                i += 1;
            }
            None => {
                // Whole characters: the path may hold UTF-8.
                let ch = path[i..].chars().next().unwrap_or('\u{fffd}');
                out.push(if ch == '\\' { '/' } else { ch });
                i += ch.len_utf8();
            }
        }
    }
    out
}

/// RFC 3986 5.2.4: `.` and `..` segments resolved; `..` never climbs above
/// the root. A trailing `.` or `..` leaves a trailing `/`.
fn remove_dot_segments(path: &str) -> String {
    let mut segments: Vec<&str> = Vec::new();
    let mut trailing_slash = false;
    for seg in path.split('/').skip(1) {
        trailing_slash = false;
        match seg {
            "." => trailing_slash = true,
            ".." => {
                segments.pop();
                trailing_slash = true;
            }
            s => segments.push(s),
        }
    }
    let mut out = String::with_capacity(path.len());
    for s in &segments {
        out.push('/');
        out.push_str(s);
    }
    if trailing_slash || out.is_empty() {
        out.push('/');
    }
    out
}

fn merge_slashes(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    for c in path.chars() {
        if !(c == '/' && out.ends_with('/')) {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use PathNormalization::*;

    /// Istio's documented examples (reference/config/security/normalization
    /// and the pathNormalization options), and the walk-arounds of a DENY
    /// on /admin.
    #[test]
    fn istio_examples() {
        let cases: &[(&str, PathNormalization, &str)] = &[
            ("/a/../b", Base, "/b"),
            ("\\da", Base, "/da"),
            ("/a//b", Base, "/a//b"),
            ("/a//b", MergeSlashes, "/a/b"),
            ("/a%2fb", MergeSlashes, "/a%2fb"),
            ("/a%2fb", DecodeAndMergeSlashes, "/a/b"),
            ("/a%5Cb", DecodeAndMergeSlashes, "/a/b"),
            (
                "/some%2fdata/%61%62%63",
                DecodeAndMergeSlashes,
                "/some/data/abc",
            ),
            ("/some\\data", Base, "/some/data"),
            ("/some//data///abc", MergeSlashes, "/some/data/abc"),
            ("/public/./data/abc/../xyz", Base, "/public/data/xyz"),
            ("/%2d%2e%5f%7e%30%39%41%5a%61%7a", Base, "/-._~09AZaz"),
            // No double decoding.
            ("/%252e%252e/admin", Base, "/%252e%252e/admin"),
            // Reserved escapes stay; a stray % is escaped.
            ("/a%3fb%23c", Base, "/a%3fb%23c"),
            ("/%%32%65%%32%65/admin", Base, "/%252e%252e/admin"),
            ("/100%", Base, "/100%25"),
            // The walk-arounds.
            ("/public/../admin", Base, "/admin"),
            ("/./admin", Base, "/admin"),
            ("/public/%2e%2e/admin", Base, "/admin"),
            ("/%61dmin", Base, "/admin"),
            ("/public\\..\\admin", Base, "/admin"),
            ("/../../admin", Base, "/admin"),
            ("/admin/.", Base, "/admin/"),
            ("/admin/..", Base, "/"),
            ("/", Base, "/"),
            ("/public/../admin", None, "/public/../admin"),
            ("*", Base, "*"),
            ("/caf\u{e9}/../x", Base, "/x"),
        ];
        for (path, mode, want) in cases {
            assert_eq!(
                normalize_path(path, *mode).as_deref(),
                Ok(*want),
                "{path} with {mode:?}"
            );
        }
    }

    #[test]
    fn encoded_nul_is_refused_in_every_mode() {
        for mode in [None, Base, MergeSlashes, DecodeAndMergeSlashes] {
            assert_eq!(
                normalize_path("/a%00b", mode),
                Err(PathError::EncodedNul),
                "{mode:?}"
            );
        }
    }

    /// Properties: normalizing twice changes nothing, and no `.` or `..`
    /// segment survives, for many generated paths.
    #[test]
    fn idempotent_and_no_dot_segment_survives() {
        let atoms = [
            "/", "//", ".", "..", "%2e", "%2E", "%2f", "%5c", "\\", "a", "%61", "%", "%zz",
            "%252e", "~", "\u{e9}", "%3", "2", "e",
        ];
        let mut seed = 0x2545_f491_4f6c_dd1d_u64;
        for _ in 0..20_000 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let mut path = String::from("/");
            for k in 0..(seed % 9) {
                path.push_str(atoms[((seed >> (k * 4)) % atoms.len() as u64) as usize]);
            }
            for mode in [Base, MergeSlashes, DecodeAndMergeSlashes] {
                let Ok(once) = normalize_path(&path, mode) else {
                    continue;
                };
                // The shortcut agrees with the full normalization.
                let merge = mode != Base;
                if already_normal(&path, merge) {
                    let mut full = remove_dot_segments(&decode(&path, false));
                    if merge {
                        full = merge_slashes(&full);
                    }
                    assert_eq!(full, path, "{mode:?}");
                }
                // So does the one-pass shortcut.
                if plainly_normal(path.as_bytes(), merge) {
                    assert_eq!(normalize_fully(&path, mode).as_deref(), Ok(&*path));
                }
                let twice = normalize_path(&once, mode);
                assert_eq!(twice.as_deref(), Ok(&*once), "{path} {mode:?}");
                assert!(
                    !once.split('/').any(|s| s == "." || s == ".."),
                    "{path} -> {once} ({mode:?})"
                );
            }
        }
    }
}
