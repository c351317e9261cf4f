//! Bytes as a request body (and query string) of every endpoint, through the server's own
//! decoders: `countersign::http::fuzzing::decode_any` panics on any panic or 5xx.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    countersign::http::fuzzing::decode_any(data);
});
