//! Any text through the loader and the analyzers, and every workload's
//! proxy view of what has no errors: errors are diagnostics, never a panic.
//! Text that parses whole parses the same in parts (`document_parts`, as
//! a large file is parsed on several threads), and text that does not
//! parse whole fails in some part (else the loader would take it). The
//! fast path for plain config YAML builds what the event parser builds, or
//! leaves the text to it (errors included).
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshgate_config::{
    Loaded, MeshSettings, analyze::analyze, load::load_str, registry, view, yaml,
};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    fast_path_agrees(text);
    same_in_parts(text);
    let mut loaded = Loaded::default();
    if load_str("fuzz.yaml", text, &mut loaded).is_err() {
        return;
    }
    let mesh = MeshSettings::default();
    // `check` analyses whatever could be read; proxies run only configs
    // without errors.
    let _ = analyze(&loaded.config, &mesh);
    if loaded.has_errors() {
        return;
    }
    let reg = registry::build(&loaded.config, &mesh);
    for w in &reg.workloads {
        let _ = view::proxy_view(&loaded.config, &reg, &mesh, w);
    }
    let _ = meshgate_config::mesh::parse_mesh_config("fuzz.yaml", text);
});

fn same_in_parts(text: &str) {
    let parts: Vec<_> = yaml::document_parts(text, 0)
        .into_iter()
        .map(|(range, lines)| yaml::parse_documents_at(&text[range], lines))
        .collect();
    match yaml::parse_documents(text) {
        Ok(whole) => {
            let mut roots = Vec::new();
            for part in parts {
                match part {
                    Ok(docs) => roots.extend(docs.into_iter().map(|d| d.root)),
                    Err(e) => panic!("parses whole, not in parts: {e}"),
                }
            }
            let whole: Vec<_> = whole.into_iter().map(|d| d.root).collect();
            assert!(roots == whole, "parts differ from the whole");
        }
        Err(e) => assert!(
            parts.iter().any(Result::is_err),
            "fails whole ({e}), parses in parts"
        ),
    }
}

fn fast_path_agrees(text: &str) {
    match (yaml::parse_documents(text), yaml::parse_events_at(text, 0)) {
        (Ok(docs), Ok(events)) => assert!(docs == events, "the fast path differs"),
        (Err(_), Err(_)) => {}
        (Ok(_), Err(e)) => panic!("the fast path took what does not parse: {e}"),
        (Err(e), Ok(_)) => panic!("fails only by the fast path: {e}"),
    }
}
