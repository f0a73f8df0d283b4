//! `outpost`: the command line — the aggregator service (`serve`), its
//! database migrations (`migrate`), operator commands, tools (`dev`,
//! `edge`, `bench`) and the shared rules (`validate`, `sign`) for scripts
//! and debugging. This file is the CLI definition and the dispatch; each
//! command lives in `cmd/`.

// The aggregator allocates many small, short-lived objects per event
// (decoding, JSON, line protocol); glibc malloc spent ~40 % of its CPU on
// them under `outpost bench` (see BENCHMARKS.md). Built without its
// transparent-huge-page advice (`no_thp`): with it, the kernel zeroed a
// 2 MiB page at each fresh fault, a sixth of the CPU under load.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use clap::{Parser, Subcommand};

mod cmd;

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
    Bench(cmd::bench::BenchArgs),
    /// Manage client records (kept in the aggregator's PostgreSQL or SQLite).
    Clients {
        /// TOML config file (`[postgres]` or `[sqlite]` is used); secrets are sealed with OUTPOST_SECRETS_KEY.
        #[arg(long, short, env = "OUTPOST_CONFIG", global = true)]
        config: Option<std::path::PathBuf>,
        /// Print JSON.
        #[arg(long, global = true)]
        json: bool,
        #[command(subcommand)]
        command: cmd::clients::ClientsCommand,
    },
    /// The spool: which sinks it holds batches for, and dropping one that
    /// is gone for good (prints JSON).
    Spool {
        /// TOML config file (`spool.path` and the sinks are used).
        #[arg(long, short, env = "OUTPOST_CONFIG", global = true)]
        config: Option<std::path::PathBuf>,
        #[command(subcommand)]
        command: cmd::spool::SpoolCommand,
    },
    /// What the sinks gave up on: list, show, replay or purge (prints JSON).
    DeadLetters {
        /// TOML config file (`spool.path`; `replay` signs with the first edge key).
        #[arg(long, short, env = "OUTPOST_CONFIG", global = true)]
        config: Option<std::path::PathBuf>,
        #[command(subcommand)]
        command: cmd::spool::DeadLettersCommand,
    },
    /// Inspect the GeoIP databases.
    Geoip {
        /// TOML config file (`[geoip]` is used).
        #[arg(long, short, env = "OUTPOST_CONFIG", global = true)]
        config: Option<std::path::PathBuf>,
        #[command(subcommand)]
        command: cmd::geoip::GeoipCommand,
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
    /// PostgreSQL's day partitions: create the coming days, drop the ones
    /// `postgres.retention_days` expired (what `serve` does hourly), and
    /// print what was done (JSON).
    Partitions {
        /// TOML config file (only `[postgres]` is used).
        #[arg(long, short, env = "OUTPOST_CONFIG")]
        config: Option<std::path::PathBuf>,
    },
    /// Build the distinct-user sketches of `/v1/stats?users=true` from the
    /// stored events, from `--from` up to now (events stored before the
    /// sketches existed have none; until then those hours are counted from
    /// the rows). Safe to run again and while serving. Prints what it did.
    BackfillUsers {
        /// TOML config file (only `[postgres]` is used).
        #[arg(long, short, env = "OUTPOST_CONFIG")]
        config: Option<std::path::PathBuf>,
        /// First day (YYYY-MM-DD, UTC) or instant (RFC 3339) to sketch.
        #[arg(long)]
        from: String,
    },
    /// Print the HMAC signature headers for a request (body from stdin or --body).
    Sign(cmd::rules::SignArgs),
    /// Validate a batch request body (stdin) and print what the edge would answer.
    Validate,
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Dev {
            dir,
            listen,
            edge_listen,
            component,
        } => cmd::dev::main(cmd::dev::DevOptions {
            dir,
            listen,
            edge_listen,
            component,
        }),
        Command::Serve { config } => cmd::service::serve(config.as_deref()),
        Command::Edge { config, listen } => cmd::edge::main(&config, listen),
        Command::Bench(args) => cmd::bench::main(args),
        Command::Clients {
            config,
            json,
            command,
        } => cmd::clients::main(config.as_deref(), json, command),
        Command::Spool { config, command } => cmd::spool::spool_main(config.as_deref(), command),
        Command::DeadLetters { config, command } => {
            cmd::spool::dead_letters_main(config.as_deref(), command)
        }
        Command::Geoip { config, command } => cmd::geoip::main(config.as_deref(), command),
        Command::Healthcheck { url } => cmd::service::healthcheck(&url),
        Command::Migrate { config } => cmd::service::migrate(config.as_deref()),
        Command::Partitions { config } => cmd::service::partitions(config.as_deref()),
        Command::BackfillUsers { config, from } => {
            cmd::service::backfill_users(config.as_deref(), &from)
        }
        Command::Sign(args) => cmd::rules::sign(args),
        Command::Validate => cmd::rules::validate(),
    }
}
