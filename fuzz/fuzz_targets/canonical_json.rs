//! Bytes as stored JSON text: the sealer's and verifier's encoding straight from text
//! (`write_canonical_text`) must give exactly what parsing into a `Value` gives
//! (`canonical_json`), or fail exactly when that fails — or seals would stop matching.

#![no_main]

use countersign::audit::canonical::{canonical_json, write_canonical_text};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let via_value = serde_json::from_str::<serde_json::Value>(text)
        .map(|v| canonical_json(&v))
        .map_err(|e| e.to_string());
    let mut out = Vec::new();
    let via_text = write_canonical_text(&mut out, text)
        .map(|()| out)
        .map_err(|e| e.to_string());
    assert_eq!(via_text, via_value, "{text:?}");
});
