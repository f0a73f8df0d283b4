//! The service's own commands: `outpost serve`, `outpost migrate` and
//! `outpost healthcheck` (the container health check, with no curl).

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
