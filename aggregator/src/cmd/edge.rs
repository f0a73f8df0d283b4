//! `outpost edge`: the Spin edge component served locally by the wasmtime
//! host (`outpost-edge-host`), as `spin up` would serve it.
//!
//! Settings come from a TOML file (the host's `HostConfig`: `component`,
//! `listen`, `[variables]`, `[kv]`, `[limits]`); Spin variables can also
//! come from `SPIN_VARIABLE_<NAME>` environment variables, Spin's own
//! convention, which win over the file (secrets stay out of files).

use std::net::SocketAddr;
use std::path::Path;

use anyhow::Context as _;
use outpost_edge_host::{EdgeHost, HostConfig};

/// The environment prefix Spin uses for application variables.
pub const VARIABLE_ENV_PREFIX: &str = "SPIN_VARIABLE_";

/// Reads the host's settings: the file, then `SPIN_VARIABLE_*` from `env`.
pub fn load(
    path: &Path,
    env: impl IntoIterator<Item = (String, String)>,
) -> anyhow::Result<HostConfig> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut cfg: HostConfig =
        toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    for (k, v) in env {
        if let Some(name) = k.strip_prefix(VARIABLE_ENV_PREFIX) {
            cfg.variables.insert(name.to_ascii_lowercase(), v);
        }
    }
    // A relative component path is relative to the file, as in spin.toml.
    if cfg.component.is_relative()
        && let Some(dir) = path.parent()
    {
        cfg.component = dir.join(&cfg.component);
    }
    Ok(cfg)
}

/// Serves until SIGINT/SIGTERM.
pub async fn run(cfg: HostConfig, listen: Option<SocketAddr>) -> anyhow::Result<()> {
    let addr = listen.unwrap_or(cfg.listen);
    let metrics_addr = cfg.metrics_listen;
    let component = cfg.component.display().to_string();
    let host = EdgeHost::new(cfg).with_context(|| format!("loading {component}"))?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {addr}"))?;
    if let Some(maddr) = metrics_addr {
        let metrics = host.metrics();
        let mlistener = tokio::net::TcpListener::bind(maddr)
            .await
            .with_context(|| format!("binding the metrics address {maddr}"))?;
        let app = axum::Router::new().route(
            "/metrics",
            axum::routing::get(move || {
                let metrics = metrics.clone();
                async move {
                    (
                        [(
                            axum::http::header::CONTENT_TYPE,
                            "text/plain; version=0.0.4; charset=utf-8",
                        )],
                        metrics.render(),
                    )
                }
            }),
        );
        tracing::info!(addr = %maddr, "edge metrics listening");
        tokio::spawn(async move {
            if let Err(e) = axum::serve(mlistener, app).await {
                tracing::warn!(error = %e, "edge metrics server stopped");
            }
        });
    }
    tracing::info!(%addr, %component, "edge listening");
    host.serve(listener, outpost_aggregator::app::shutdown_signal())
        .await?;
    tracing::info!("edge stopped");
    Ok(())
}

/// `outpost edge`: the component under wasmtime until Ctrl-C.
pub fn main(config: &Path, listen: Option<SocketAddr>) -> anyhow::Result<()> {
    outpost_aggregator::telemetry::init_logging(&Default::default());
    let cfg = load(config, std::env::vars())?;
    super::runtime()?.block_on(run(cfg, listen))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn variables_from_the_environment_win_and_paths_are_relative_to_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("edge.toml");
        std::fs::write(
            &path,
            "component = \"edge.wasm\"\n[variables]\naggregator_url = \"http://a\"\nedge_id = \"file\"\n",
        )
        .unwrap();
        let cfg = load(
            &path,
            [
                ("SPIN_VARIABLE_EDGE_ID".to_owned(), "env".to_owned()),
                ("HOME".to_owned(), "/root".to_owned()),
            ],
        )
        .unwrap();
        assert_eq!(cfg.component, dir.path().join("edge.wasm"));
        assert_eq!(cfg.variables["edge_id"], "env");
        assert_eq!(cfg.variables["aggregator_url"], "http://a");
        assert_eq!(cfg.variables.len(), 2);
    }

    #[test]
    fn unknown_keys_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("edge.toml");
        std::fs::write(&path, "component = \"e.wasm\"\nlisten_on = \"x\"\n").unwrap();
        assert!(load(&path, []).is_err());
    }
}
