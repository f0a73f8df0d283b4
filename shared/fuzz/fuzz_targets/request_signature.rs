//! HMAC request-signature checks on arbitrary header values: the input is
//! split into the signed parts (timestamp, nonce, signature, path, body).
//! Nothing panics; a signature the secret made for those parts verifies
//! (inside the window), and any other never does.
#![no_main]

use libfuzzer_sys::fuzz_target;
use outpost_shared::auth::signature::{self, SignedRequest};

const SECRET: &[u8] = b"fuzz-secret";
const NOW: i64 = 1_800_000_000;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let mut parts = text.splitn(5, '\n');
    let timestamp = parts.next().unwrap_or("");
    let nonce = parts.next().filter(|n| !n.is_empty());
    let presented = parts.next().unwrap_or("");
    let path = parts.next().unwrap_or("/v1/batch");
    let body = parts.next().unwrap_or("").as_bytes();
    let request = SignedRequest { method: "POST", path_and_query: path, timestamp, nonce, body, signature: presented };
    let verdict = signature::verify(&request, [SECRET], NOW, 300);
    // What the secret makes for exactly these parts.
    if let Ok(ts) = timestamp.parse::<i64>() {
        if timestamp == ts.to_string() {
            let good = signature::sign(SECRET, "POST", path, ts, nonce, body);
            if verdict.is_ok() {
                assert_eq!(presented, good, "verified a signature the secret did not make");
            }
            let honest = SignedRequest { signature: &good, ..request };
            let ok = signature::verify(&honest, [SECRET], NOW, 300);
            // abs_diff: `ts - NOW` overflows for timestamps near i64::MIN.
            let in_window = ts.abs_diff(NOW) <= 300;
            let nonce_ok = nonce.is_none_or(|n| n.len() <= 64 && n.bytes().all(|b| b.is_ascii_alphanumeric() || b".-_~".contains(&b)));
            if in_window && nonce_ok {
                assert!(ok.is_ok(), "a signature the secret made did not verify: {ok:?}");
            }
        }
    } else {
        assert!(verdict.is_err());
    }
});
