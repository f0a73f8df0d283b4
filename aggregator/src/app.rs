//! Wiring: builds the spool, dedup, sinks and router from a [`Config`],
//! serves until SIGTERM/SIGINT, then shuts down in order — stop accepting,
//! finish in-flight requests (their frames reach the spool), let the
//! sink workers drain what is due, exit.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use prometheus_client::registry::Registry;
use tokio::sync::watch;

use crate::clients::ClientStore;
use crate::config::Config;
use crate::dedup::Dedup;
use crate::delivery::DeliveryContext;
use crate::geoip::GeoIp;
use crate::http::{AppState, router};
use crate::limits::{BoundedKv, READ_LIMIT_ENTRIES};
use crate::server::Listener;
use crate::spool::{Backend, JetStreamSpool, Spool, SpoolOptions, SqliteSpool};
use crate::telemetry::Metrics;

/// Longest the sink workers may keep draining after a shutdown signal.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Runs the aggregator until a shutdown signal, sealing client secrets with
/// `OUTPOST_SECRETS_KEY`.
pub async fn serve(config: Config) -> anyhow::Result<()> {
    let secrets_key = crate::clients::SecretsKey::from_env()?;
    serve_until(config, secrets_key, shutdown_signal()).await
}

/// Runs the aggregator until `shutdown` resolves.
pub async fn serve_until(
    config: Config,
    secrets_key: Option<crate::clients::SecretsKey>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let mut registry = Registry::default();
    let metrics = Metrics::new(&mut registry);

    let sinks = crate::sinks::build(&config).await?;
    let probes: Vec<_> = sinks.iter().map(|s| s.probe.clone()).collect();
    let db = sinks.iter().find_map(|s| s.events_db.clone());
    let options = SpoolOptions {
        max_bytes: config.spool.max_bytes,
        max_frames_per_commit: config.spool.max_frames_per_commit,
        handoff_max_bytes: config.delivery.handoff_max_bytes,
        dead_letters_max_bytes: config.spool.dead_letters_max_bytes,
    };
    let sink_names = crate::sinks::enabled_names(&config);
    let spool = match config.spool.backend {
        Backend::Sqlite => Spool::Sqlite(Arc::new(
            SqliteSpool::open(&config.spool.path, &options, sink_names, metrics.clone())
                .await
                .with_context(|| format!("opening the spool at {}", config.spool.path.display()))?,
        )),
        Backend::Jetstream => Spool::JetStream(
            JetStreamSpool::open(
                &config.spool.jetstream,
                &options,
                sink_names,
                config.server.frame.max_frame_bytes,
                metrics.clone(),
            )
            .await
            .context("opening the JetStream spool")?,
        ),
    };
    let dedup = Arc::new(Dedup::connect(&config.dedup).await.context("dedup")?);

    let geoip = Arc::new(GeoIp::open(&config.geoip, metrics.clone()));
    geoip.spawn_reloader(Duration::from_secs(config.geoip.reload_check_secs));

    if secrets_key.is_none() {
        tracing::warn!(
            "OUTPOST_SECRETS_KEY is not set: clients with HMAC or HS256 secrets cannot be served"
        );
    }

    let spool_handle = spool.clone();
    let (stop_tx, stop_rx) = watch::channel(false);
    let ctx = Arc::new(DeliveryContext {
        spool: spool.clone(),
        dedup: dedup.clone(),
        config: config.delivery.clone(),
        limits: config.limits.clone(),
        frame_limits: config.server.frame,
        metrics: metrics.clone(),
        geoip,
    });
    let workers: Vec<_> = sinks
        .into_iter()
        .flat_map(|sink| sink.start(&ctx, &stop_rx))
        .collect();

    let state = Arc::new(AppState {
        ring: config.key_ring(),
        frame_limits: config.server.frame,
        limits: config.limits.clone(),
        spool,
        metrics: metrics.clone(),
        registry,
        dedup,
        clients: db
            .as_ref()
            .map(|db| ClientStore::new(db.clone(), secrets_key.clone())),
        // Per-caller and per-address limits of the read API (this instance
        // only), in a bounded map: addresses are the caller's to choose.
        read_limits: BoundedKv::new(READ_LIMIT_ENTRIES),
        read_ip_limit: (config.read_api.ip_requests_per_minute > 0).then_some(
            outpost_shared::ratelimit::RateLimit {
                limit: config.read_api.ip_requests_per_minute,
                period_secs: 60,
            },
        ),
        lookup_limit: (config.server.client_lookups_per_minute > 0).then_some(
            outpost_shared::ratelimit::RateLimit {
                limit: config.server.client_lookups_per_minute,
                period_secs: 60,
            },
        ),
        read_api: config.read_api.clone(),
        trusted_proxies: outpost_edge::net::NetList::parse(
            config.server.trusted_proxies.iter().map(String::as_str),
        )?,
        // `read_api.cursor_secret` (shared by a fleet), else a key derived
        // from the first edge key.
        cursor_key: config.cursor_key()?,
        db,
        sinks: probes,
        retry_after_secs: config.server.retry_after_secs,
        request_timeout: Duration::from_millis(config.server.request_timeout_ms),
        in_flight: Arc::new(tokio::sync::Semaphore::new(
            config.server.max_concurrent_requests,
        )),
    });
    let app = router(state);
    let listener = Listener::bind(&config.server).await?;
    tracing::info!(
        listen = %listener.tcp.local_addr()?,
        tls = listener.tls.is_some(),
        "outpost aggregator listening"
    );
    crate::server::serve(listener, app, metrics, shutdown).await?;

    tracing::info!("no longer accepting; draining sink workers");
    spool_handle.begin_drain();
    let _ = stop_tx.send(true);
    let drain = async {
        for w in workers {
            let _ = w.await;
        }
    };
    if tokio::time::timeout(DRAIN_TIMEOUT, drain).await.is_err() {
        tracing::warn!("sink workers did not drain in time; the rest stays in the spool");
    }
    spool_handle.release_held().await;
    tracing::info!("stopped");
    Ok(())
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
    tracing::info!("shutdown signal received");
}
