//! The service's own commands: `outpost serve`, `outpost migrate`,
//! `outpost partitions` and `outpost healthcheck` (the container health
//! check, with no curl).

use std::path::Path;

/// `outpost serve`: the aggregator, until SIGTERM or Ctrl-C.
pub fn serve(config: Option<&Path>) -> anyhow::Result<()> {
    let config = outpost_aggregator::config::Config::load(config)?;
    outpost_aggregator::telemetry::init_logging(&config.log);
    super::runtime()?.block_on(outpost_aggregator::app::serve(config))?;
    Ok(())
}

/// `outpost migrate`: apply the database migrations and exit.
pub fn migrate(config: Option<&Path>) -> anyhow::Result<()> {
    let mut config = outpost_aggregator::config::Config::load_unchecked(config)?;
    config.postgres.migrate_on_start = true;
    super::runtime()?.block_on(async {
        let db = outpost_aggregator::db::open(&config).await?;
        println!("migrations applied ({})", db.name());
        anyhow::Ok(())
    })?;
    Ok(())
}

/// `outpost partitions`: PostgreSQL's partition maintenance, once (what
/// every aggregator does hourly); prints what it did as JSON.
pub fn partitions(config: Option<&Path>) -> anyhow::Result<()> {
    use outpost_aggregator::sinks::postgres::partitions;
    let config = outpost_aggregator::config::Config::load_unchecked(config)?;
    anyhow::ensure!(
        config.postgres.enabled,
        "the PostgreSQL sink is off (`postgres.enabled = false`): nothing is partitioned"
    );
    let report = super::runtime()?.block_on(async {
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(1)
            .connect(&config.postgres.url.0)
            .await?;
        let report = partitions::maintain(
            &pool,
            config.postgres.retention_days,
            std::time::SystemTime::now(),
        )
        .await?;
        anyhow::Ok(report)
    })?;
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

/// `outpost backfill-users`: the distinct-user sketches from `from` on,
/// built from the stored events; prints what it did as JSON.
pub fn backfill_users(config: Option<&Path>, from: &str) -> anyhow::Result<()> {
    use outpost_aggregator::sinks::postgres::users;
    let from_ms = outpost_shared::event::Timestamp::parse_rfc3339(from)
        .map(|t| t.millis())
        .or_else(|| {
            chrono::NaiveDate::parse_from_str(from, "%Y-%m-%d")
                .ok()
                .and_then(|d| d.and_hms_opt(0, 0, 0))
                .map(|t| t.and_utc().timestamp_millis())
        })
        .ok_or_else(|| anyhow::anyhow!("--from: expected YYYY-MM-DD or RFC 3339, got {from:?}"))?;
    let config = outpost_aggregator::config::Config::load_unchecked(config)?;
    anyhow::ensure!(
        config.postgres.enabled,
        "the PostgreSQL sink is off (`postgres.enabled = false`): SQLite counts users from the rows"
    );
    let done = super::runtime()?.block_on(async {
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(2)
            .connect(&config.postgres.url.0)
            .await?;
        let done = users::backfill(&pool, from_ms, outpost_aggregator::delivery::now_ms()).await?;
        anyhow::Ok(done)
    })?;
    println!(
        "{}",
        serde_json::json!({"events": done.events, "sketches": done.sketches})
    );
    Ok(())
}

/// `outpost healthcheck`: exit 0 when `url` answers 200, 1 otherwise.
pub fn healthcheck(url: &str) -> anyhow::Result<()> {
    let ready = super::runtime()?.block_on(async {
        let client = outpost_aggregator::http_client::client();
        let req = hyper::Request::get(url).body(http_body_util::Full::default())?;
        let resp =
            tokio::time::timeout(std::time::Duration::from_secs(3), client.request(req)).await??;
        anyhow::Ok(resp.status().is_success())
    });
    match ready {
        Ok(true) => println!("ready"),
        Ok(false) => {
            println!("not ready");
            std::process::exit(1);
        }
        Err(e) => {
            println!("unreachable: {e}");
            std::process::exit(1);
        }
    }
    Ok(())
}
