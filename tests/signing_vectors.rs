//! The README's request-signing test vector, checked by implementations
//! that share no code with ours: Python's `hmac`/`hashlib` (running the
//! README's own Python example) and `openssl dgst` (the README's shell
//! example). If the docs and the code ever disagree, this fails.

use std::collections::BTreeMap;
use std::process::Command;

use outpost_shared::auth::signature::{self, SignedRequest};
use outpost_tests::{fenced_block_after, readme, require_tool};

fn vector() -> BTreeMap<String, String> {
    fenced_block_after(&readme(), "signing-vector")
        .lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect()
}

#[test]
fn readme_vector_is_what_shared_signs_and_accepts() {
    let v = vector();
    let ts: i64 = v["timestamp"].parse().unwrap();
    let sig = signature::sign(
        v["secret"].as_bytes(),
        &v["method"],
        &v["path"],
        ts,
        Some(&v["nonce"]),
        v["body"].as_bytes(),
    );
    assert_eq!(sig, v["signature"]);
    assert_eq!(
        signature::canonical_string(
            &v["method"],
            &v["path"],
            ts,
            Some(&v["nonce"]),
            v["body"].as_bytes()
        )
        .replace('\n', "\\n"),
        v["canonical"]
    );
    let req = SignedRequest {
        method: &v["method"],
        path_and_query: &v["path"],
        timestamp: &v["timestamp"],
        nonce: Some(&v["nonce"]),
        body: v["body"].as_bytes(),
        signature: &v["signature"],
    };
    assert_eq!(
        signature::verify(&req, [v["secret"].as_bytes()], ts + 10, 300),
        Ok(())
    );
}

#[test]
fn readme_python_example_signs_the_vector_and_shared_accepts_it() {
    let v = vector();
    let python = require_tool("python3");
    let example = fenced_block_after(&readme(), "example: python-signing");
    let script = format!(
        "{example}\n\nimport json, sys\nh = outpost_headers({:?}, {:?}, {:?}, {:?}, {:?}.encode(), timestamp={}, nonce={:?})\nprint(json.dumps(h))\n",
        "acme-server", v["secret"], v["method"], v["path"], v["body"], v["timestamp"], v["nonce"]
    );
    let out = outpost_tests::run_ok(Command::new(python).arg("-c").arg(&script));
    let headers: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let sig = headers["X-Outpost-Signature"].as_str().unwrap();
    assert_eq!(
        sig, v["signature"],
        "Python disagrees with the README vector"
    );
    let req = SignedRequest {
        method: &v["method"],
        path_and_query: &v["path"],
        timestamp: headers["X-Outpost-Timestamp"].as_str().unwrap(),
        nonce: headers["X-Outpost-Nonce"].as_str(),
        body: v["body"].as_bytes(),
        signature: sig,
    };
    assert_eq!(
        signature::verify(
            &req,
            [v["secret"].as_bytes()],
            v["timestamp"].parse().unwrap(),
            300
        ),
        Ok(())
    );
}

#[test]
fn readme_openssl_example_signs_the_vector() {
    let v = vector();
    require_tool("openssl");
    let example = fenced_block_after(&readme(), "example: shell-signing");
    let script = format!(
        "set -eu\nSECRET={:?}\nMETHOD={:?}\nPATH_AND_QUERY={:?}\nBODY={:?}\nTIMESTAMP={}\nNONCE={:?}\n{example}\necho \"$SIGNATURE\"\n",
        v["secret"], v["method"], v["path"], v["body"], v["timestamp"], v["nonce"]
    );
    let out = outpost_tests::run_ok(Command::new("bash").arg("-c").arg(&script));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), v["signature"]);
}

#[test]
fn readme_node_example_signs_the_vector() {
    let v = vector();
    let node = require_tool("node");
    let example = fenced_block_after(&readme(), "example: node-signing");
    let script = format!(
        "{example}\nconsole.log(JSON.stringify(outpostHeaders({:?}, {:?}, {:?}, {:?}, {:?}, {{ timestamp: {}, nonce: {:?} }})));\n",
        "acme-server", v["secret"], v["method"], v["path"], v["body"], v["timestamp"], v["nonce"]
    );
    let out =
        outpost_tests::run_ok(Command::new(node).args(["--input-type=module", "-e", &script]));
    let headers: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(headers["X-Outpost-Signature"], v["signature"].as_str());
    assert_eq!(headers["X-Outpost-Timestamp"], v["timestamp"].as_str());
    assert_eq!(headers["X-Outpost-Nonce"], v["nonce"].as_str());
    assert_eq!(headers["X-Outpost-Key"], "acme-server");
}
