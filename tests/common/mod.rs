//! Helpers shared by the integration tests: where things are, and how to
//! start them. Every test file in `tests/` uses these instead of its own.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// The `outpost` binary built by `cargo build --bins` in the same target
/// directory as this test (scripts/test builds it first).
pub fn outpost_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> → target/<profile>/outpost
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>");
    let bin = profile_dir.join(format!("outpost{}", std::env::consts::EXE_SUFFIX));
    assert!(
        bin.exists(),
        "{} is missing: run `cargo build --bins` first (scripts/test does)",
        bin.display()
    );
    bin
}

/// Runs `cmd` to completion and fails the test, showing the command and
/// what it printed, unless it exits successfully.
pub fn run_ok(cmd: &mut Command) -> std::process::Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{cmd:?} did not start: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}\n--- stdout\n{}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// README.md as text.
pub fn readme() -> String {
    std::fs::read_to_string(repo_root().join("README.md")).expect("README.md")
}

/// The body of the first fenced code block after the line `<!-- marker -->`.
pub fn fenced_block_after(doc: &str, marker: &str) -> String {
    let tag = format!("<!-- {marker} -->");
    let start = doc
        .find(&tag)
        .unwrap_or_else(|| panic!("README has no {tag}"));
    let rest = &doc[start..];
    let open = rest.find("```").expect("a fenced block after the marker");
    let after_open = &rest[open..];
    let body_start = after_open.find('\n').expect("fence line") + 1;
    let body = &after_open[body_start..];
    let end = body.find("\n```").expect("closing fence");
    body[..end].to_owned()
}

/// The text between `<!-- name:start -->` and `<!-- name:end -->`.
pub fn section(doc: &str, name: &str) -> String {
    let start_tag = format!("<!-- {name}:start -->");
    let end_tag = format!("<!-- {name}:end -->");
    let start = doc
        .find(&start_tag)
        .unwrap_or_else(|| panic!("README has no {start_tag}"))
        + start_tag.len();
    let end = doc
        .find(&end_tag)
        .unwrap_or_else(|| panic!("README has no {end_tag}"));
    doc[start..end].trim().to_owned()
}

/// Whether a program is on PATH (scripts/test installs what the tests need;
/// a test that finds a tool missing fails with this in its message).
pub fn require_tool(name: &str) -> PathBuf {
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {name}"))
        .output()
        .expect("sh");
    assert!(
        out.status.success(),
        "{name} is not installed: run scripts/test, which installs it"
    );
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

pub mod aggregator;
pub mod dev;
pub mod edge;
pub mod geo;
pub mod influx;
pub mod nats;
pub mod stores;

/// A JWT signed with HMAC-SHA256 under `key`, whose header says `alg` and
/// names client `kid` (tests set `alg` to other values to forge tokens).
pub fn hmac_jwt(kid: &str, alg: &str, key: &[u8], claims: &serde_json::Value) -> String {
    use base64::Engine as _;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
    use hmac::Mac as _;
    let head = B64.encode(serde_json::json!({"alg": alg, "kid": kid, "typ": "JWT"}).to_string());
    let input = format!("{head}.{}", B64.encode(claims.to_string()));
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(key).expect("any key length");
    mac.update(input.as_bytes());
    format!("{input}.{}", B64.encode(mac.finalize().into_bytes()))
}
