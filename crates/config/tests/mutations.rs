//! Hardening: thousands of mutated versions of the seed's YAML go through
//! the whole pipeline a proxy runs at start and on every reload (load,
//! analyze, registry, every workload's proxy view). Whatever the input, the
//! answer is a result or a diagnostic naming the file, never a panic.
//! Deterministic (fixed seed) and bounded.
#![allow(clippy::unwrap_used)]

use meshgate_config::load::load_str;
use meshgate_config::{Loaded, MeshSettings, analyze::analyze, registry, view};

const SEED: [(&str, &str); 10] = [
    (
        "namespaces.yaml",
        include_str!("../../../examples/seed/namespaces.yaml"),
    ),
    (
        "deployment-egress-gw.yaml",
        include_str!("../../../examples/seed/deployment-egress-gw.yaml"),
    ),
    (
        "deployment-workload.yaml",
        include_str!("../../../examples/seed/deployment-workload.yaml"),
    ),
    (
        "gateway.yaml",
        include_str!("../../../examples/seed/gateway.yaml"),
    ),
    (
        "serviceentry.yaml",
        include_str!("../../../examples/seed/serviceentry.yaml"),
    ),
    (
        "virtualservice-egress-gw.yaml",
        include_str!("../../../examples/seed/virtualservice-egress-gw.yaml"),
    ),
    (
        "virtualservice-workload.yaml",
        include_str!("../../../examples/seed/virtualservice-workload.yaml"),
    ),
    (
        "destintionrule.yaml",
        include_str!("../../../examples/seed/destintionrule.yaml"),
    ),
    (
        "sidecar.yaml",
        include_str!("../../../examples/seed/sidecar.yaml"),
    ),
    (
        "authorization-policy.yaml",
        include_str!("../../../examples/seed/authorization-policy.yaml"),
    ),
];

/// Bytes that mean something to YAML, plus a few that mean nothing.
const TOKENS: [&str; 24] = [
    ":", "-", " ", "\n", "\t", "[", "]", "{", "}", ",", "&a", "*a", "!!str ", "|", ">", "#", "\"",
    "'", "%", "---\n", "? ", "0x", "é", "\u{0}",
];

/// xorshift64: a tiny deterministic generator, so a failure replays.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

fn mutate(text: &str, rng: &mut Rng) -> String {
    let mut s: Vec<char> = text.chars().collect();
    for _ in 0..=rng.below(4) {
        let at = rng.below(s.len() + 1);
        match rng.below(5) {
            // Insert a token.
            0 | 1 => {
                let t = TOKENS[rng.below(TOKENS.len())];
                s.splice(at..at, t.chars());
            }
            // Delete a run.
            2 => {
                let end = (at + 1 + rng.below(12)).min(s.len());
                if at < end {
                    s.drain(at..end);
                }
            }
            // Duplicate a run (repeated keys, nested blocks).
            3 => {
                let end = (at + 1 + rng.below(40)).min(s.len());
                if at < end {
                    let run: Vec<char> = s[at..end].to_vec();
                    s.splice(at..at, run);
                }
            }
            // Truncate.
            _ => s.truncate(at),
        }
    }
    s.into_iter().collect()
}

#[test]
fn mutated_seed_config_never_panics_and_errors_name_the_file() {
    let mut rng = Rng(0x5eed_cafe_f00d_d00d);
    let mesh = MeshSettings::default();
    let mut refused = 0;
    for round in 0..3000 {
        let victim = rng.below(SEED.len());
        let mut loaded = Loaded::default();
        let mut mutated = String::new();
        for (i, (name, text)) in SEED.iter().enumerate() {
            let text = if i == victim {
                mutated = mutate(text, &mut rng);
                mutated.as_str()
            } else {
                text
            };
            if let Err(e) = load_str(name, text, &mut loaded) {
                assert!(
                    e.to_string().starts_with(name),
                    "round {round}: error does not name {name}: {e}\n---\n{mutated}"
                );
                refused += 1;
            }
        }
        for d in &loaded.diagnostics {
            assert!(!d.to_string().is_empty(), "round {round}: empty diagnostic");
        }
        // `check` analyses whatever could be read, errors or not.
        let _ = analyze(&loaded.config, &mesh);
        if loaded.has_errors() {
            refused += 1;
            continue;
        }
        // A config a proxy would accept: everything downstream must cope.
        let reg = registry::build(&loaded.config, &mesh);
        for w in [
            "curl-egress-tst/curl-egress-tst-gateway",
            "curl-external-tst/curl-test",
        ] {
            if let Ok(w) = view::find_workload(&reg, w) {
                let _ = view::proxy_view(&loaded.config, &reg, &mesh, w);
            }
        }
    }
    // The mutations must actually hit: most inputs are refused.
    assert!(
        refused > 500,
        "only {refused} of 3000 mutated configs were refused"
    );
}
