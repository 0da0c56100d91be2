//! Any text through the loader and the analyzers, and every workload's
//! proxy view of what has no errors: errors are diagnostics, never a panic.
//! Text that parses whole parses the same in parts (`document_parts`, as
//! a large file is parsed on several threads), and text that does not
//! parse whole fails in some part (else the loader would take it).
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshgate_config::{
    Loaded, MeshSettings, analyze::analyze, load::load_str, registry, view, yaml,
};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
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
