//! The command line's commands, one module each; `main.rs` holds the CLI
//! definition and dispatches here. These are the binary's, not the
//! service library's: tools (`dev`, `edge`, `bench`) and operator commands
//! build on `outpost_aggregator` without the library depending on them.

use std::io::Read as _;

use anyhow::Context as _;
use outpost_shared::validate::Limits;

pub mod bench;
pub mod clients;
pub mod dev;
pub mod edge;
pub mod geoip;
pub mod rules;
pub mod service;
pub mod spool;

/// The runtime every async command runs on.
pub fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

/// Now, Unix milliseconds.
pub fn now_millis() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// A request body from stdin, bounded.
pub fn read_stdin() -> anyhow::Result<Vec<u8>> {
    let mut buf = Vec::new();
    // One byte past the largest body, so an oversized one is still reported as such.
    std::io::stdin()
        .take(Limits::default().max_body_bytes as u64 + 1)
        .read_to_end(&mut buf)
        .context("reading stdin")?;
    Ok(buf)
}

/// The aggregator's own address, for commands that call it.
pub fn own_url(config: &outpost_aggregator::config::Config) -> String {
    let mut addr = config.server.listen;
    if addr.ip().is_unspecified() {
        addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    let scheme = if config.server.tls.enabled() {
        "https"
    } else {
        "http"
    };
    format!("{scheme}://{addr}")
}
