//! Path normalization against its properties, in every mode: normalizing
//! twice changes nothing; no `.` or `..` segment survives; `%00` never
//! passes; what is authorized is what is forwarded (one value serves both).
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshgate_config::PathNormalization;
use meshgate_proxy::normalize::normalize_path;

fuzz_target!(|data: &[u8]| {
    let Ok(path) = std::str::from_utf8(data) else {
        return;
    };
    for mode in [
        PathNormalization::Base,
        PathNormalization::MergeSlashes,
        PathNormalization::DecodeAndMergeSlashes,
    ] {
        let Ok(once) = normalize_path(path, mode) else {
            assert!(path.contains("%00") || path.contains('\0'));
            continue;
        };
        assert!(!once.contains("%00"), "{path:?} -> {once:?}");
        if path.starts_with('/') || path.starts_with('\\') {
            assert!(once.starts_with('/'), "{path:?} -> {once:?}");
            assert!(
                !once.split('/').any(|s| s == "." || s == ".."),
                "{path:?} -> {once:?} ({mode:?})"
            );
        }
        let twice = normalize_path(&once, mode).expect("a normalized path normalizes");
        assert_eq!(twice, once, "{path:?} ({mode:?})");
    }
});
