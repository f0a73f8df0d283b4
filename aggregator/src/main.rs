//! `outpost`: the command line — the aggregator service (`serve`), its
//! database migrations (`migrate`), and the shared rules (`validate`,
//! `sign`) for scripts and debugging.

use std::io::Read as _;

// The aggregator allocates many small, short-lived objects per event
// (decoding, JSON, line protocol); glibc malloc spent ~40 % of its CPU on
// them under `outpost bench` (see BENCHMARKS.md). Built without its
// transparent-huge-page advice (`no_thp`): with it, the kernel zeroed a
// 2 MiB page at each fresh fault, a sixth of the CPU under load.
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
    /// Everything on this machine, nothing to install: the aggregator on
    /// SQLite with in-process dedup, the edge under wasmtime, demo clients,
    /// and ready-to-paste examples.
    Dev {
        /// Directory for the spool, the SQLite store and credentials.json.
        #[arg(long, default_value = ".outpost-dev")]
        dir: std::path::PathBuf,
        /// The aggregator's address.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: std::net::SocketAddr,
        /// The edge's address.
        #[arg(long, default_value = "127.0.0.1:3000")]
        edge_listen: std::net::SocketAddr,
        /// The Spin component (default: where `scripts/build-edge spin` puts it).
        #[arg(long)]
        component: Option<std::path::PathBuf>,
    },
    /// Run the aggregator.
    Serve {
        /// TOML config file; `OUTPOST_*` environment variables override it.
        #[arg(long, short, env = "OUTPOST_CONFIG")]
        config: Option<std::path::PathBuf>,
    },
    /// Serve the edge (the Spin component) locally under wasmtime.
    Edge {
        /// TOML file: `component`, `listen`, `[variables]`, `[kv]`, `[limits]`
        /// (README, "Running the edge locally"). `SPIN_VARIABLE_<NAME>`
        /// environment variables override `[variables]`.
        #[arg(long, short, env = "OUTPOST_EDGE_CONFIG")]
        config: std::path::PathBuf,
        /// Address to listen on (overrides `listen`).
        #[arg(long)]
        listen: Option<std::net::SocketAddr>,
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
    /// Manage client records (kept in the aggregator's PostgreSQL or SQLite).
    Clients {
        /// TOML config file (`[postgres]` or `[sqlite]` is used); secrets are sealed with OUTPOST_SECRETS_KEY.
        #[arg(long, short, env = "OUTPOST_CONFIG", global = true)]
        config: Option<std::path::PathBuf>,
        /// Print JSON.
        #[arg(long, global = true)]
        json: bool,
        #[command(subcommand)]
        command: ClientsCommand,
    },
    /// The spool: which sinks it holds batches for, and dropping one that
    /// is gone for good (prints JSON).
    Spool {
        /// TOML config file (`spool.path` and the sinks are used).
        #[arg(long, short, env = "OUTPOST_CONFIG", global = true)]
        config: Option<std::path::PathBuf>,
        #[command(subcommand)]
        command: SpoolCommand,
    },
    /// What the sinks gave up on: list, show, replay or purge (prints JSON).
    DeadLetters {
        /// TOML config file (`spool.path`; `replay` signs with the first edge key).
        #[arg(long, short, env = "OUTPOST_CONFIG", global = true)]
        config: Option<std::path::PathBuf>,
        #[command(subcommand)]
        command: DeadLettersCommand,
    },
    /// Inspect the GeoIP databases.
    Geoip {
        /// TOML config file (`[geoip]` is used).
        #[arg(long, short, env = "OUTPOST_CONFIG", global = true)]
        config: Option<std::path::PathBuf>,
        #[command(subcommand)]
        command: GeoipCommand,
    },
    /// Exit 0 when the aggregator at URL is ready (`/health/ready` answers
    /// 200), 1 otherwise: the container health check, with no curl needed.
    Healthcheck {
        /// The readiness URL.
        #[arg(
            long,
            env = "OUTPOST_HEALTHCHECK_URL",
            default_value = "http://127.0.0.1:8080/health/ready"
        )]
        url: String,
    },
    /// Apply the database migrations (PostgreSQL, or SQLite with `[sqlite]`) and exit.
    Migrate {
        /// TOML config file (only `[postgres]` or `[sqlite]` is used).
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
enum ClientsCommand {
    /// Create a client; its secret or API key is printed once.
    Create(outpost_aggregator::clients_cmd::CreateArgs),
    /// List clients (no key material).
    List,
    /// Show one client (no key material).
    Show {
        /// Client id.
        id: String,
    },
    /// Stop a client from sending (edges notice within their cache TTL).
    Revoke {
        /// Client id.
        id: String,
    },
    /// Let a revoked client send again.
    Activate {
        /// Client id.
        id: String,
    },
    /// Issue a new secret or API key; the old one works for the grace period.
    Rotate {
        /// Client id.
        id: String,
        /// How long the old credential keeps working, seconds.
        #[arg(long, default_value_t = 86_400)]
        grace_secs: u64,
    },
    /// Delete a client for good.
    Delete {
        /// Client id.
        id: String,
        /// Yes, really.
        #[arg(long)]
        force: bool,
    },
    /// Print the signature headers for a request, with the client's HMAC secret.
    Sign {
        /// Client id.
        id: String,
        /// HTTP method.
        #[arg(long, default_value = "POST")]
        method: String,
        /// Path and query.
        #[arg(long, default_value = "/v1/batch")]
        path: String,
        /// Body (default: empty).
        #[arg(long, default_value = "")]
        body: String,
        /// Nonce.
        #[arg(long)]
        nonce: Option<String>,
    },
}

#[derive(Subcommand)]
enum SpoolCommand {
    /// Each sink the spool holds batches for, with its backlog, and the dead letters.
    Status,
    /// Drop the backlog of a sink no longer configured (the aggregator
    /// refuses to start while one is left).
    DropSink {
        /// The sink (`postgres`, `sqlite`, `influxdb`).
        name: String,
        /// Yes, drop its undelivered batches for good.
        #[arg(long)]
        yes: bool,
    },
}

#[derive(Subcommand)]
enum DeadLettersCommand {
    /// Dead letters, oldest first, without payloads.
    List {
        #[command(flatten)]
        selection: outpost_aggregator::spool_cmd::Selection,
        /// Most to list.
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// One dead letter with its payload and the edge's facts.
    Show {
        /// Its id (from `list`).
        id: i64,
    },
    /// Send them to the aggregator again (after fixing the cause); those it
    /// accepts are deleted.
    Replay {
        #[command(flatten)]
        selection: outpost_aggregator::spool_cmd::Selection,
        /// The aggregator (default: from `server.listen`).
        #[arg(long)]
        url: Option<String>,
    },
    /// Delete them for good.
    Purge {
        #[command(flatten)]
        selection: outpost_aggregator::spool_cmd::Selection,
        /// Only those older than this (RFC 3339).
        #[arg(long)]
        before: Option<String>,
        /// Yes, delete them.
        #[arg(long)]
        yes: bool,
    },
}

/// The aggregator's own address, for commands that call it.
fn own_url(config: &outpost_aggregator::config::Config) -> String {
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

#[derive(Subcommand)]
enum GeoipCommand {
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

/// Human-readable output: one `key: value` line per field, one line per
/// list entry.
fn print_text(v: &serde_json::Value) {
    let scalar = |v: &serde_json::Value| match v {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    match v {
        serde_json::Value::Array(items) => {
            for i in items {
                println!(
                    "{:<24} {:<10} {:<6} {} [{}]",
                    scalar(&i["id"]),
                    scalar(&i["method"]),
                    if i["active"] == true {
                        "active"
                    } else {
                        "REVOKED"
                    },
                    scalar(&i["name"]),
                    i["permissions"]
                        .as_array()
                        .map(|p| p.iter().map(scalar).collect::<Vec<_>>().join(", "))
                        .unwrap_or_default()
                );
            }
        }
        serde_json::Value::Object(map) => {
            for (k, v) in map {
                println!("{k}: {}", scalar(v));
            }
            if map
                .keys()
                .any(|k| k == "secret" || k == "api_key" || k == "jwt_secret")
            {
                println!("(store the secret now: it is not shown again)");
            }
        }
        other => println!("{}", scalar(other)),
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Dev {
            dir,
            listen,
            edge_listen,
            component,
        } => {
            let log = outpost_aggregator::config::LogConfig {
                level: "warn,outpost_aggregator=info".into(),
                ..Default::default()
            };
            outpost_aggregator::telemetry::init_logging(&log);
            let opts = outpost_aggregator::dev_cmd::DevOptions {
                dir,
                listen,
                edge_listen,
                component,
            };
            runtime()?.block_on(outpost_aggregator::dev_cmd::run(opts))?;
        }
        Command::Serve { config } => {
            let config = outpost_aggregator::config::Config::load(config.as_deref())?;
            outpost_aggregator::telemetry::init_logging(&config.log);
            runtime()?.block_on(outpost_aggregator::app::serve(config))?;
        }
        Command::Edge { config, listen } => {
            outpost_aggregator::telemetry::init_logging(&Default::default());
            let cfg = outpost_aggregator::edge_cmd::load(&config, std::env::vars())?;
            runtime()?.block_on(outpost_aggregator::edge_cmd::run(cfg, listen))?;
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
        Command::Clients {
            config,
            json,
            command,
        } => {
            use outpost_aggregator::clients_cmd as cmd;
            let config = outpost_aggregator::config::Config::load_unchecked(config.as_deref())?;
            let out = runtime()?.block_on(async {
                let db = outpost_aggregator::db::open(&config).await?;
                let store = outpost_aggregator::clients::ClientStore::new(
                    db,
                    outpost_aggregator::clients::SecretsKey::from_env()?,
                );
                match command {
                    ClientsCommand::Create(a) => cmd::create(&store, &a).await,
                    ClientsCommand::List => cmd::list(&store).await,
                    ClientsCommand::Show { id } => cmd::show(&store, &id).await,
                    ClientsCommand::Revoke { id } => cmd::set_active(&store, &id, false).await,
                    ClientsCommand::Activate { id } => cmd::set_active(&store, &id, true).await,
                    ClientsCommand::Rotate { id, grace_secs } => {
                        cmd::rotate(&store, &id, grace_secs).await
                    }
                    ClientsCommand::Delete { id, force } => cmd::delete(&store, &id, force).await,
                    ClientsCommand::Sign {
                        id,
                        method,
                        path,
                        body,
                        nonce,
                    } => {
                        cmd::sign(
                            &store,
                            &id,
                            &method,
                            &path,
                            body.as_bytes(),
                            nonce.as_deref(),
                        )
                        .await
                    }
                }
            })?;
            if json {
                println!("{out}");
            } else {
                print_text(&out);
            }
        }
        Command::Spool { config, command } => {
            use outpost_aggregator::spool_cmd as cmd;
            let config = outpost_aggregator::config::Config::load_unchecked(config.as_deref())?;
            let out = runtime()?.block_on(async {
                match command {
                    SpoolCommand::Status => cmd::status(&config).await,
                    SpoolCommand::DropSink { name, yes } => {
                        cmd::drop_sink(&config, &name, yes).await
                    }
                }
            })?;
            println!("{}", serde_json::to_string_pretty(&out)?);
        }
        Command::DeadLetters { config, command } => {
            use outpost_aggregator::spool_cmd as cmd;
            let config = outpost_aggregator::config::Config::load_unchecked(config.as_deref())?;
            let out = runtime()?.block_on(async {
                match command {
                    DeadLettersCommand::List { selection, limit } => {
                        cmd::list(&config, &selection, limit).await
                    }
                    DeadLettersCommand::Show { id } => cmd::show(&config, id).await,
                    DeadLettersCommand::Replay { selection, url } => {
                        let url = url.unwrap_or_else(|| own_url(&config));
                        cmd::replay(&config, &selection, &url).await
                    }
                    DeadLettersCommand::Purge {
                        selection,
                        before,
                        yes,
                    } => cmd::purge(&config, &selection, before.as_deref(), yes).await,
                }
            })?;
            println!("{}", serde_json::to_string_pretty(&out)?);
        }
        Command::Geoip { config, command } => {
            let config = outpost_aggregator::config::Config::load_unchecked(config.as_deref())?;
            let mut registry = prometheus_client::registry::Registry::default();
            let metrics = outpost_aggregator::telemetry::Metrics::new(&mut registry);
            let geo = outpost_aggregator::geoip::GeoIp::open(&config.geoip, metrics);
            let out = match command {
                GeoipCommand::Download => {
                    let client = outpost_aggregator::http_client::client();
                    let done = runtime()?.block_on(
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
        }
        Command::Healthcheck { url } => {
            let ready = runtime()?.block_on(async {
                let client = outpost_aggregator::http_client::client();
                let req = hyper::Request::get(&url).body(http_body_util::Full::default())?;
                let resp =
                    tokio::time::timeout(std::time::Duration::from_secs(3), client.request(req))
                        .await??;
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
        }
        Command::Migrate { config } => {
            let mut config = outpost_aggregator::config::Config::load_unchecked(config.as_deref())?;
            config.postgres.migrate_on_start = true;
            runtime()?.block_on(async {
                let db = outpost_aggregator::db::open(&config).await?;
                println!("migrations applied ({})", db.name());
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
