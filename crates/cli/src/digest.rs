//! What each resource of the running config says, kept to tell a reload's
//! changes ("added 1 (ServiceEntry ns/name), changed 0 (), removed 0 ()").
//!
//! A proxy keeps one for as long as it runs, so it is small: the names
//! (`Kind ns/name`) sorted and front-coded in one buffer (each stores only
//! what differs from the name before it; generated names share most of
//! theirs), and one hash per resource. Ten thousand external hosts are
//! thirty thousand resources: a map of strings held ~250 bytes per host,
//! this ~40.

use std::hash::{Hash, Hasher};

use meshgate_config::Config;

/// Each resource's name and a hash of what it says (its spec, labels and
/// annotations; not where in which file it is).
#[derive(Debug, Default)]
pub(crate) struct Digest {
    /// Per name, in order: the bytes it shares with the one before (u16,
    /// little-endian), the length of the rest (u16), the rest.
    names: Vec<u8>,
    hashes: Vec<u64>,
}

impl Digest {
    /// One resource serialized at a time (the whole config at once
    /// doubled a large config's memory at load).
    pub(crate) fn of(config: &Config) -> Digest {
        let mut all: Vec<(String, u64)> = config
            .spec_texts()
            .map(|(meta, spec)| {
                let mut h = std::collections::hash_map::DefaultHasher::new();
                spec.hash(&mut h);
                meta.labels.hash(&mut h);
                meta.annotations.hash(&mut h);
                (format!("{} {}", meta.kind, meta.full_name()), h.finish())
            })
            .collect();
        Digest::from_entries(&mut all)
    }

    fn from_entries(all: &mut [(String, u64)]) -> Digest {
        all.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        let mut digest = Digest {
            names: Vec::new(),
            hashes: Vec::with_capacity(all.len()),
        };
        let mut before = "";
        for (name, hash) in all.iter() {
            let name = at_most(name, usize::from(u16::MAX));
            // A repeated name (the loader refuses them) is kept once.
            if !digest.hashes.is_empty() && name == before {
                continue;
            }
            let shared = shared_prefix(before, name);
            let rest = &name.as_bytes()[shared..];
            digest.names.extend_from_slice(&len16(shared).to_le_bytes());
            digest
                .names
                .extend_from_slice(&len16(rest.len()).to_le_bytes());
            digest.names.extend_from_slice(rest);
            digest.hashes.push(*hash);
            before = name;
        }
        digest.names.shrink_to_fit();
        digest
    }

    /// What `new` added, changed and removed against `self`, as text (each
    /// list cut at ten names).
    pub(crate) fn changes(&self, new: &Digest) -> String {
        let (mut added, mut changed, mut removed) =
            (Listed::default(), Listed::default(), Listed::default());
        let (mut old, mut new) = (self.cursor(), new.cursor());
        let (mut a, mut b) = (old.next(), new.next());
        loop {
            match (a, b) {
                (None, None) => break,
                (Some(_), None) => {
                    removed.push(old.name());
                    a = old.next();
                }
                (None, Some(_)) => {
                    added.push(new.name());
                    b = new.next();
                }
                (Some(ha), Some(hb)) => match old.name().cmp(new.name()) {
                    std::cmp::Ordering::Less => {
                        removed.push(old.name());
                        a = old.next();
                    }
                    std::cmp::Ordering::Greater => {
                        added.push(new.name());
                        b = new.next();
                    }
                    std::cmp::Ordering::Equal => {
                        if ha != hb {
                            changed.push(new.name());
                        }
                        (a, b) = (old.next(), new.next());
                    }
                },
            }
        }
        if added.count + changed.count + removed.count == 0 {
            return "no resource changed".to_owned();
        }
        format!("added {added}, changed {changed}, removed {removed}")
    }

    fn cursor(&self) -> Cursor<'_> {
        Cursor {
            digest: self,
            at: 0,
            index: 0,
            name: Vec::new(),
        }
    }
}

fn shared_prefix(a: &str, b: &str) -> usize {
    let n = a.bytes().zip(b.bytes()).take_while(|(x, y)| x == y).count();
    // Whole characters only, so every prefix is text.
    at_most(b, n).len()
}

/// `s` cut to at most `max` bytes, at a character's boundary.
fn at_most(s: &str, max: usize) -> &str {
    let end = (0..=max.min(s.len()))
        .rev()
        .find(|&i| s.is_char_boundary(i))
        .unwrap_or(0);
    &s[..end]
}

fn len16(n: usize) -> u16 {
    u16::try_from(n).unwrap_or(u16::MAX)
}

/// Walks a digest in name order, rebuilding each name.
struct Cursor<'a> {
    digest: &'a Digest,
    at: usize,
    index: usize,
    name: Vec<u8>,
}

impl Cursor<'_> {
    /// The next resource's hash (its name is then `name()`).
    fn next(&mut self) -> Option<u64> {
        let hash = *self.digest.hashes.get(self.index)?;
        let bytes = &self.digest.names;
        let u16_at = |i: usize| usize::from(u16::from_le_bytes([bytes[i], bytes[i + 1]]));
        let (shared, rest) = (u16_at(self.at), u16_at(self.at + 2));
        let start = self.at + 4;
        self.name.truncate(shared);
        self.name.extend_from_slice(&bytes[start..start + rest]);
        self.at = start + rest;
        self.index += 1;
        Some(hash)
    }

    fn name(&self) -> &str {
        // Built from whole characters of `String`s (`shared_prefix`).
        std::str::from_utf8(&self.name).unwrap_or_default()
    }
}

/// How many names, and the first ten.
#[derive(Default)]
struct Listed {
    count: usize,
    shown: Vec<String>,
}

impl Listed {
    fn push(&mut self, name: &str) {
        self.count += 1;
        if self.shown.len() < 10 {
            self.shown.push(name.to_owned());
        }
    }
}

impl std::fmt::Display for Listed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let more = if self.count > self.shown.len() {
            ", ..."
        } else {
            ""
        };
        write!(f, "{} ({}{more})", self.count, self.shown.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(entries: &[(&str, u64)]) -> Digest {
        let mut all: Vec<(String, u64)> =
            entries.iter().map(|(n, h)| ((*n).to_owned(), *h)).collect();
        Digest::from_entries(&mut all)
    }

    fn names(d: &Digest) -> Vec<(String, u64)> {
        let mut c = d.cursor();
        std::iter::from_fn(|| c.next().map(|h| (c.name().to_owned(), h))).collect()
    }

    #[test]
    fn names_come_back_whole_and_in_order() {
        let d = digest(&[
            ("ServiceEntry ns/h10", 3),
            ("ServiceEntry ns/h1", 1),
            ("DestinationRule ns/h1", 2),
            ("ServiceEntry ns/h1", 1),
            ("Gateway ns/é", 4),
            ("Gateway ns/è", 5),
        ]);
        assert_eq!(
            names(&d),
            [
                ("DestinationRule ns/h1".to_owned(), 2),
                ("Gateway ns/è".to_owned(), 5),
                ("Gateway ns/é".to_owned(), 4),
                ("ServiceEntry ns/h1".to_owned(), 1),
                ("ServiceEntry ns/h10".to_owned(), 3),
            ]
        );
    }

    #[test]
    fn changes_name_what_was_added_changed_and_removed() {
        let old = digest(&[("A ns/a", 1), ("A ns/b", 2), ("A ns/c", 3)]);
        let new = digest(&[("A ns/b", 2), ("A ns/c", 4), ("A ns/d", 5)]);
        assert_eq!(
            old.changes(&new),
            "added 1 (A ns/d), changed 1 (A ns/c), removed 1 (A ns/a)"
        );
        assert_eq!(new.changes(&new), "no resource changed");
        assert_eq!(
            Digest::default().changes(&old),
            "added 3 (A ns/a, A ns/b, A ns/c), changed 0 (), removed 0 ()"
        );
    }

    #[test]
    fn long_lists_are_cut_at_ten_names() {
        let many: Vec<(String, u64)> = (0..25).map(|i| (format!("SE ns/h{i:02}"), 0)).collect();
        let refs: Vec<(&str, u64)> = many.iter().map(|(n, h)| (n.as_str(), *h)).collect();
        let text = Digest::default().changes(&digest(&refs));
        assert!(
            text.starts_with("added 25 (SE ns/h00, SE ns/h01,"),
            "{text}"
        );
        assert!(text.contains("SE ns/h09, ...), changed 0 ()"), "{text}");
    }
}
