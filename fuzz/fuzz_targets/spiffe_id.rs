//! Any text as a SPIFFE ID: refused with an error, or parsed into an ID
//! that prints as the text and parses to itself.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshgate_identity::SpiffeId;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(id) = text.parse::<SpiffeId>() {
        assert_eq!(id.to_string(), text);
        assert_eq!(id.to_string().parse::<SpiffeId>().ok(), Some(id));
    }
});
