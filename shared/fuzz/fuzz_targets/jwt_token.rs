//! JWT parsing and checking on arbitrary tokens: reading the `kid` and
//! verifying against a pinned HS256 key never panic, and nothing but a
//! token signed with that key verifies.
#![no_main]

use libfuzzer_sys::fuzz_target;
use outpost_shared::auth::jwt::{self, JwtKey, JwtPolicy};

fuzz_target!(|data: &[u8]| {
    let Ok(token) = std::str::from_utf8(data) else { return };
    let _ = jwt::token_key_id(token);
    let key = JwtKey::hs256(b"fuzz-jwt-secret-0123456789abcdef").expect("a valid HS256 key");
    let policy = JwtPolicy::default();
    if jwt::verify(token, &key, &policy, 1_800_000_000).is_ok() {
        // A random input cannot carry a valid HMAC; if it does, only
        // because the fuzzer found the key's signature, which would be a
        // finding in itself.
        panic!("a fuzzed token verified: {token}");
    }
});
