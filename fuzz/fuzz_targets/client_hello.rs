//! Any bytes through the ClientHello parser: an answer, never a panic; an
//! SNI only ever from the input, lowercased.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshgate_proxy::tls_hello::{Hello, parse_client_hello};

fuzz_target!(|data: &[u8]| {
    if let Hello::Complete(Some(name)) = parse_client_hello(data) {
        assert_eq!(name, name.to_ascii_lowercase());
        let lower: Vec<u8> = data.iter().map(u8::to_ascii_lowercase).collect();
        assert!(
            lower.windows(name.len()).any(|w| w == name.as_bytes()),
            "{name} is not in the input"
        );
    }
});
