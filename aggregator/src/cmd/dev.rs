//! `outpost dev`: the whole pipeline on one machine with no server to
//! install. The aggregator runs with the embedded SQLite store in place of
//! PostgreSQL, the in-process dedup cache in place of Redis and no InfluxDB;
//! the real edge component runs beside it under wasmtime. Everything lives
//! in one directory (`.outpost-dev` by default): the spool, the SQLite
//! file, and `credentials.json` with the generated keys, so a second run
//! finds the same clients and prints the same examples.
//!
//! Three demo clients are created on the first run: `demo-web` (a public
//! write key, any origin, for browsers), `demo-server` (HMAC signatures)
//! and `demo-reader` (an API key that reads every client's events and
//! stats).

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use outpost_shared::auth::signature;
use outpost_shared::client::Secret;
use outpost_shared::frame::EdgeKey;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::cmd::clients::{CreateArgs, MethodArg};
use outpost_aggregator::clients::{ClientStore, SecretsKey, random_bytes};
use outpost_aggregator::config::{Config, DedupBackend, SqliteConfig};

/// What `outpost dev` takes.
#[derive(Debug, Clone)]
pub struct DevOptions {
    /// Where its files live.
    pub dir: PathBuf,
    /// The aggregator's address.
    pub listen: SocketAddr,
    /// The edge's address.
    pub edge_listen: SocketAddr,
    /// The Spin component; when `None`, the usual build locations are tried.
    pub component: Option<PathBuf>,
}

/// The generated keys and demo credentials (`credentials.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Credentials {
    /// Edge key id the local edge signs frames with.
    pub edge_key_id: String,
    /// Its secret (base64url).
    pub edge_key_secret: String,
    /// `OUTPOST_SECRETS_KEY` for this directory's database.
    pub secrets_key: String,
    /// The browser client's write key (its id).
    pub write_key: String,
    /// The HMAC client's id.
    pub hmac_client: String,
    /// The HMAC client's secret.
    pub hmac_secret: String,
    /// The reader's API key (`read:events`, `read:stats`, `admin:events`).
    pub read_api_key: String,
}

const WEB: &str = "demo-web";
const SERVER: &str = "demo-server";
const READER: &str = "demo-reader";
const EDGE_KEY_ID: &str = "dev";

/// The demo write key's limits: public keys get per-client and per-address
/// limits in production, so the demo shows their `RateLimit-*` headers too.
const DEMO_RATE_LIMIT: &str = "6000/60";
const DEMO_IP_RATE_LIMIT: &str = "1200/60";

fn create_args(id: &str, name: &str, method: MethodArg, permissions: &[&str]) -> CreateArgs {
    let write_key = method == MethodArg::WriteKey;
    CreateArgs {
        name: name.into(),
        id: Some(id.into()),
        method,
        public_key_file: None,
        permissions: permissions.iter().map(|p| (*p).to_owned()).collect(),
        rate_limit: write_key.then(|| DEMO_RATE_LIMIT.to_owned()),
        ip_rate_limit: write_key.then(|| DEMO_IP_RATE_LIMIT.to_owned()),
        origins: if method == MethodArg::WriteKey {
            vec!["*".into()]
        } else {
            Vec::new()
        },
        expires: None,
        jwt_issuer: None,
        jwt_audience: None,
    }
}

/// The aggregator's configuration for `dir`.
pub fn config(opts: &DevOptions, creds: &Credentials) -> anyhow::Result<Config> {
    let mut config = Config::default();
    config.server.listen = opts.listen;
    config.edge_keys = vec![EdgeKey {
        id: creds.edge_key_id.clone(),
        secret: Secret::new(
            B64.decode(&creds.edge_key_secret)
                .context("credentials.json: edge_key_secret is not base64url")?,
        ),
    }];
    config.spool.path = opts.dir.join("spool.db");
    config.spool.max_bytes = 256 << 20;
    config.dedup.backend = DedupBackend::Memory;
    config.dedup.memory_max_entries = 100_000;
    config.postgres.enabled = false;
    config.sqlite = SqliteConfig {
        enabled: true,
        path: opts.dir.join("events.db"),
    };
    config.influxdb.enabled = false;
    config.check()?;
    Ok(config)
}

/// Reads `credentials.json`, or makes it (and the demo clients) on the
/// first run.
pub async fn prepare(opts: &DevOptions) -> anyhow::Result<Credentials> {
    std::fs::create_dir_all(&opts.dir)
        .with_context(|| format!("creating {}", opts.dir.display()))?;
    let path = opts.dir.join("credentials.json");
    if path.exists() {
        let text = std::fs::read_to_string(&path)?;
        return serde_json::from_str(&text).with_context(|| format!("reading {}", path.display()));
    }
    let secrets_key = B64.encode(random_bytes::<32>());
    let mut creds = Credentials {
        edge_key_id: EDGE_KEY_ID.into(),
        edge_key_secret: B64.encode(random_bytes::<32>()),
        secrets_key: secrets_key.clone(),
        write_key: WEB.into(),
        hmac_client: SERVER.into(),
        hmac_secret: String::new(),
        read_api_key: String::new(),
    };
    let config = config(opts, &creds)?;
    let db = outpost_aggregator::db::open(&config).await?;
    let store = ClientStore::new(db, Some(SecretsKey::from_base64(&secrets_key)?));
    let field = |v: &Value, name: &str| -> anyhow::Result<String> {
        v[name]
            .as_str()
            .map(str::to_owned)
            .with_context(|| format!("create did not return {name}"))
    };
    // A directory from an interrupted first run may hold some of them.
    for id in [WEB, SERVER, READER] {
        store.delete(id).await?;
    }
    crate::cmd::clients::create(
        &store,
        &create_args(WEB, "Demo web app", MethodArg::WriteKey, &["write:events"]),
    )
    .await?;
    let server = crate::cmd::clients::create(
        &store,
        &create_args(SERVER, "Demo server", MethodArg::Hmac, &["write:events"]),
    )
    .await?;
    creds.hmac_secret = field(&server, "secret")?;
    let reader = crate::cmd::clients::create(
        &store,
        &create_args(
            READER,
            "Demo reader",
            MethodArg::ApiKey,
            &["read:events", "read:stats", "admin:events"],
        ),
    )
    .await?;
    creds.read_api_key = field(&reader, "api_key")?;
    write_private(&path, serde_json::to_string_pretty(&creds)?.as_bytes())?;
    Ok(creds)
}

fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write as _;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut f = options
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    Ok(())
}

/// Where `scripts/build-edge spin` puts the component.
pub fn find_component() -> Option<PathBuf> {
    let rel = Path::new("wasm32-wasip2/wasm/outpost_edge_spin.wasm");
    let mut candidates = Vec::new();
    if let Some(dir) = std::env::var_os("CARGO_TARGET_DIR") {
        candidates.push(PathBuf::from(dir).join(rel));
    }
    candidates.push(Path::new("target").join(rel));
    // Next to the binary: target/<profile>/outpost → target/wasm32-wasip2/…
    if let Ok(exe) = std::env::current_exe()
        && let Some(target) = exe.parent().and_then(Path::parent)
    {
        candidates.push(target.join(rel));
    }
    candidates.into_iter().find(|p| p.is_file())
}

/// The edge's settings: the component, its variables, an in-memory KV.
pub fn edge_config(
    component: PathBuf,
    opts: &DevOptions,
    creds: &Credentials,
) -> outpost_edge_host::HostConfig {
    let mut cfg = outpost_edge_host::HostConfig::new(component);
    cfg.listen = opts.edge_listen;
    for (k, v) in [
        ("aggregator_url", format!("http://{}", opts.listen)),
        ("edge_id", "dev-edge".to_owned()),
        ("edge_key_id", creds.edge_key_id.clone()),
        ("edge_key_secret", creds.edge_key_secret.clone()),
    ] {
        cfg.variables.insert(k.into(), v);
    }
    cfg
}

/// The ready-to-paste examples printed at start-up. The HMAC-signed one
/// carries a timestamp, so it is valid for the signature window (5 minutes).
pub fn examples(opts: &DevOptions, creds: &Credentials, edge: bool, now_secs: i64) -> String {
    let ingest = if edge {
        format!("http://{}", opts.edge_listen)
    } else {
        format!("http://{}", opts.listen)
    };
    let event_id = uuid_v4();
    let signed_id = uuid_v4();
    let body = format!(
        r#"{{"batch":[{{"event_id":"{signed_id}","name":"signup","user_id":"u-1","properties":{{"plan":"pro"}}}}]}}"#
    );
    let nonce = hex::encode(random_bytes::<8>());
    let sig = signature::sign(
        creds.hmac_secret.as_bytes(),
        "POST",
        "/v1/batch",
        now_secs,
        Some(&nonce),
        body.as_bytes(),
    );
    let mut out = String::new();
    let _ = writeln!(out, "Outpost dev is running.");
    let _ = writeln!(
        out,
        "  aggregator  http://{}   data in {}",
        opts.listen,
        opts.dir.display()
    );
    if edge {
        let _ = writeln!(out, "  edge        http://{}", opts.edge_listen);
    }
    let _ = writeln!(
        out,
        "  clients     {WEB} (write key), {SERVER} (HMAC), {READER} (API key); secrets in {}",
        opts.dir.join("credentials.json").display()
    );
    if edge {
        let _ = writeln!(out, "\nSend an event with the browser write key:");
        let _ = writeln!(
            out,
            "curl -s '{ingest}/v1/event?write_key={}' -H 'Content-Type: application/json' -H 'Origin: http://localhost' -d '{{\"event_id\":\"{event_id}\",\"name\":\"page_view\",\"properties\":{{\"path\":\"/\"}}}}'; echo",
            creds.write_key
        );
        let _ = writeln!(
            out,
            "\nSend one signed with HMAC (this signature is valid for 5 minutes; `outpost sign` makes new ones):"
        );
        let _ = writeln!(
            out,
            "curl -s {ingest}/v1/batch -H 'Content-Type: application/json' -H 'X-Outpost-Key: {}' -H 'X-Outpost-Timestamp: {now_secs}' -H 'X-Outpost-Nonce: {nonce}' -H 'X-Outpost-Signature: {sig}' -d '{body}'; echo",
            creds.hmac_client
        );
    } else {
        let _ = writeln!(
            out,
            "\nThe edge component was not found, so only the aggregator runs: build it with `./scripts/build-edge spin` (or pass --component) and start again."
        );
    }
    let _ = writeln!(out, "\nRead them back:");
    let _ = writeln!(
        out,
        "curl -s 'http://{}/v1/events?limit=10' -H 'Authorization: Bearer {}'; echo",
        opts.listen, creds.read_api_key
    );
    let _ = writeln!(out, "\nStop with Ctrl-C.");
    out
}

/// A random (version 4) UUID, hyphenated.
fn uuid_v4() -> String {
    let mut b = random_bytes::<16>();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h = hex::encode(b);
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

/// Runs both until SIGINT/SIGTERM.
pub async fn run(opts: DevOptions) -> anyhow::Result<()> {
    let creds = prepare(&opts).await?;
    let config = config(&opts, &creds)?;
    let secrets = SecretsKey::from_base64(&creds.secrets_key)?;
    let component = opts.component.clone().or_else(find_component);
    if let Some(c) = &opts.component {
        anyhow::ensure!(c.is_file(), "no component at {}", c.display());
    }

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };
    let listener = tokio::net::TcpListener::bind(opts.edge_listen);
    let edge = match component {
        Some(component) => {
            let host = outpost_edge_host::EdgeHost::new(edge_config(component, &opts, &creds))
                .context("loading the edge component")?;
            let listener = listener
                .await
                .with_context(|| format!("binding {}", opts.edge_listen))?;
            let stop = stopped();
            Some(tokio::spawn(
                async move { host.serve(listener, stop).await },
            ))
        }
        None => None,
    };
    let mut aggregator = tokio::spawn(outpost_aggregator::app::serve_until(
        config,
        Some(secrets),
        stopped(),
    ));
    // Print once the aggregator answers, so the examples work when read.
    let url = format!("http://{}/health/ready", opts.listen);
    let client = outpost_aggregator::http_client::client();
    for _ in 0..200 {
        if aggregator.is_finished() {
            break;
        }
        if let Ok(req) = hyper::Request::get(&url).body(http_body_util::Full::default())
            && let Ok(resp) = client.request(req).await
            && resp.status().is_success()
        {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs() as i64)
                .unwrap_or_default();
            println!("{}", examples(&opts, &creds, edge.is_some(), now));
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }

    // Until a signal, or until the aggregator stops by itself (an error).
    let early = tokio::select! {
        _ = outpost_aggregator::app::shutdown_signal() => None,
        r = &mut aggregator => Some(r),
    };
    let _ = stop_tx.send(true);
    let result = match early {
        Some(r) => r?,
        None => aggregator.await?,
    };
    if let Some(edge) = edge {
        edge.await??;
    }
    result
}

/// `outpost dev`: quiet logs, then [`run`].
pub fn main(opts: DevOptions) -> anyhow::Result<()> {
    let log = outpost_aggregator::config::LogConfig {
        level: "warn,outpost_aggregator=info".into(),
        ..Default::default()
    };
    outpost_aggregator::telemetry::init_logging(&log);
    super::runtime()?.block_on(run(opts))?;
    Ok(())
}
