//! `outpost`: the command line — the aggregator service (`serve`), its
//! database migrations (`migrate`), and the shared rules (`validate`,
//! `sign`) for scripts and debugging.

use std::io::Read as _;

// The aggregator allocates many small, short-lived objects per event
// (decoding, JSON, line protocol); glibc malloc spent ~40 % of its CPU on
// them under `outpost bench` (see BENCHMARKS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use outpost_shared::auth::signature;
use outpost_shared::error::AcceptedResponse;
use outpost_shared::validate::{Limits, parse_batch};
use outpost_shared::{ErrorEnvelope, Timestamp};

#[derive(Parser)]
#[command(
    name = "outpost",
    version,
    about = "Outpost: event and log ingestion for browsers and apps"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the aggregator.
    Serve {
        /// TOML config file; `OUTPOST_*` environment variables override it.
        #[arg(long, short, env = "OUTPOST_CONFIG")]
        config: Option<std::path::PathBuf>,
    },
    /// Load-test an aggregator's ingest (see BENCHMARKS.md).
    Bench {
        /// Aggregator base URL.
        #[arg(long, default_value = "http://127.0.0.1:8080")]
        url: String,
        /// Config file whose first edge key signs the frames (or OUTPOST_EDGE_KEYS).
        #[arg(long, short, env = "OUTPOST_CONFIG")]
        config: Option<std::path::PathBuf>,
        /// Frames to send.
        #[arg(long, default_value_t = 1000)]
        frames: usize,
        /// Events per frame.
        #[arg(long, default_value_t = 100)]
        events_per_frame: usize,
        /// Concurrent requests.
        #[arg(long, default_value_t = 8)]
        concurrency: usize,
        /// Frames per second in total (default: flat out).
        #[arg(long)]
        rate: Option<f64>,
        /// Wait until PostgreSQL has every event and report the end-to-end rate.
        #[arg(long)]
        wait_delivery: bool,
        /// Also time a raw COPY of the same rows into this PostgreSQL (migrated) database.
        #[arg(long)]
        baseline_postgres: Option<String>,
        /// PID of the server, to report its peak RSS.
        #[arg(long)]
        server_pid: Option<u32>,
        /// Client id the frames carry.
        #[arg(long, default_value = "bench")]
        client_id: String,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Inspect the GeoIP databases.
    Geoip {
        /// TOML config file (`[geoip]` is used).
        #[arg(long, short, env = "OUTPOST_CONFIG", global = true)]
        config: Option<std::path::PathBuf>,
        #[command(subcommand)]
        command: GeoipCommand,
    },
    /// Apply the PostgreSQL migrations and exit.
    Migrate {
        /// TOML config file (only `[postgres] url` is used).
        #[arg(long, short, env = "OUTPOST_CONFIG")]
        config: Option<std::path::PathBuf>,
    },
    /// Print the HMAC signature headers for a request (body from stdin or --body).
    Sign {
        /// Client id (`X-Outpost-Key`).
        #[arg(long)]
        key_id: String,
        /// The client's HMAC secret; read from OUTPOST_SIGNING_SECRET when omitted.
        #[arg(long, env = "OUTPOST_SIGNING_SECRET", hide_env_values = true)]
        secret: String,
        /// HTTP method.
        #[arg(long, default_value = "POST")]
        method: String,
        /// Path and query, exactly as sent.
        #[arg(long, default_value = "/v1/batch")]
        path: String,
        /// Body; stdin when omitted.
        #[arg(long)]
        body: Option<String>,
        /// Unix seconds; now when omitted.
        #[arg(long)]
        timestamp: Option<i64>,
        /// Nonce; none when omitted.
        #[arg(long)]
        nonce: Option<String>,
        /// Print JSON instead of header lines.
        #[arg(long)]
        json: bool,
    },
    /// Validate a batch request body (stdin) and print what the edge would answer.
    Validate,
}

#[derive(Subcommand)]
enum GeoipCommand {
    /// Which databases are configured and loaded (JSON).
    Status,
    /// What the databases say about an IP address (JSON).
    Lookup {
        /// IPv4 or IPv6 address.
        ip: std::net::IpAddr,
    },
}

fn now_millis() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

fn read_stdin() -> anyhow::Result<Vec<u8>> {
    let mut buf = Vec::new();
    // One byte past the largest body, so an oversized one is still reported as such.
    std::io::stdin()
        .take(Limits::default().max_body_bytes as u64 + 1)
        .read_to_end(&mut buf)
        .context("reading stdin")?;
    Ok(buf)
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Serve { config } => {
            let config = outpost_aggregator::config::Config::load(config.as_deref())?;
            outpost_aggregator::telemetry::init_logging(&config.log);
            runtime()?.block_on(outpost_aggregator::app::serve(config))?;
        }
        Command::Bench {
            url,
            config,
            frames,
            events_per_frame,
            concurrency,
            rate,
            wait_delivery,
            baseline_postgres,
            server_pid,
            client_id,
            json,
        } => {
            let config = outpost_aggregator::config::Config::load_unchecked(config.as_deref())?;
            let key = config
                .edge_keys
                .first()
                .cloned()
                .context("no edge key: pass --config or set OUTPOST_EDGE_KEYS")?;
            let opts = outpost_aggregator::bench::BenchOptions {
                url,
                key,
                frames,
                events_per_frame,
                concurrency,
                rate,
                wait_delivery: wait_delivery || baseline_postgres.is_some(),
                baseline_postgres,
                server_pid,
                client_id,
            };
            let report = runtime()?.block_on(outpost_aggregator::bench::run(opts))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", report.render());
            }
        }
        Command::Geoip { config, command } => {
            let config = outpost_aggregator::config::Config::load_unchecked(config.as_deref())?;
            let mut registry = prometheus_client::registry::Registry::default();
            let metrics = outpost_aggregator::telemetry::Metrics::new(&mut registry);
            let geo = outpost_aggregator::geoip::GeoIp::open(&config.geoip, metrics);
            let out = match command {
                GeoipCommand::Status => geo.status(),
                GeoipCommand::Lookup { ip } => serde_json::json!({
                    "ip": ip,
                    "geo": geo.lookup(&ip.to_string()).map(|g| serde_json::to_value(&*g)).transpose()?,
                }),
            };
            println!("{}", serde_json::to_string_pretty(&out)?);
        }
        Command::Migrate { config } => {
            let mut config = outpost_aggregator::config::Config::load_unchecked(config.as_deref())?;
            config.postgres.migrate_on_start = true;
            runtime()?.block_on(async {
                outpost_aggregator::sinks::postgres::PostgresSink::connect(&config.postgres)
                    .await?;
                println!("migrations applied");
                anyhow::Ok(())
            })?;
        }
        Command::Sign {
            key_id,
            secret,
            method,
            path,
            body,
            timestamp,
            nonce,
            json,
        } => {
            let body = match body {
                Some(b) => b.into_bytes(),
                None => read_stdin()?,
            };
            let ts = timestamp.unwrap_or(now_millis() / 1000);
            let sig = signature::sign(
                secret.as_bytes(),
                &method,
                &path,
                ts,
                nonce.as_deref(),
                &body,
            );
            let mut headers = vec![
                ("X-Outpost-Key", key_id),
                ("X-Outpost-Timestamp", ts.to_string()),
            ];
            if let Some(n) = nonce {
                headers.push(("X-Outpost-Nonce", n));
            }
            headers.push(("X-Outpost-Signature", sig));
            if json {
                let map: serde_json::Map<String, serde_json::Value> = headers
                    .into_iter()
                    .map(|(k, v)| (k.to_owned(), v.into()))
                    .collect();
                println!("{}", serde_json::Value::Object(map));
            } else {
                for (k, v) in headers {
                    println!("{k}: {v}");
                }
            }
        }
        Command::Validate => {
            let body = read_stdin()?;
            let request_id = "local";
            match parse_batch(&body, &Limits::default(), Timestamp(now_millis())) {
                Ok(out) => {
                    let resp = AcceptedResponse {
                        success: true,
                        accepted: out.accepted.len(),
                        rejected: out.rejected.len(),
                        errors: out.rejected,
                        request_id: request_id.into(),
                    };
                    println!("{}", serde_json::to_string_pretty(&resp)?);
                }
                Err(e) => {
                    let env = ErrorEnvelope::new(e.code, request_id)
                        .with_message(e.message.clone())
                        .with_errors(vec![e]);
                    println!("{}", serde_json::to_string_pretty(&env)?);
                    std::process::exit(1);
                }
            }
        }
    }
    Ok(())
}
