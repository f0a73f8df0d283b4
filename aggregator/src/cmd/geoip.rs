//! `outpost geoip status | download | lookup`: the GeoIP databases, from
//! the operator's side (prints JSON).

#[derive(clap::Subcommand)]
pub enum GeoipCommand {
    /// Which databases are configured and loaded (JSON).
    Status,
    /// Fetch the databases from `geoip.city_url`/`asn_url`, check them
    /// (SHA-256, mmdb format) and swap them in atomically (JSON report).
    Download,
    /// What the databases say about an IP address (JSON).
    Lookup {
        /// IPv4 or IPv6 address.
        ip: std::net::IpAddr,
    },
}

/// `outpost geoip …`.
pub fn main(config: Option<&std::path::Path>, command: GeoipCommand) -> anyhow::Result<()> {
    let config = outpost_aggregator::config::Config::load_unchecked(config)?;
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = outpost_aggregator::telemetry::Metrics::new(&mut registry);
    let geo = outpost_aggregator::geoip::GeoIp::open(&config.geoip, metrics);
    let out = match command {
        GeoipCommand::Download => {
            let client = outpost_aggregator::http_client::client();
            let done = super::runtime()?.block_on(
                outpost_aggregator::geoip_download::download_all(&config.geoip, &client),
            )?;
            serde_json::to_value(done)?
        }
        GeoipCommand::Status => geo.status(),
        GeoipCommand::Lookup { ip } => serde_json::json!({
            "ip": ip,
            "geo": geo.lookup(&ip.to_string()).map(|g| serde_json::to_value(&*g)).transpose()?,
        }),
    };
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}
