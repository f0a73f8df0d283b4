//! `outpost bench`: a load generator for the aggregator's ingest.
//!
//! It signs frames of typical events (made before the clock starts, so the
//! generator's own encoding does not compete with the server for CPU),
//! sends them from `--concurrency` connections flat out or at `--rate`
//! frames per second, and reports throughput, latency percentiles and
//! errors by code. With `--wait-delivery` it also waits until the server's
//! `outpost_sink_delivered_events_total{sink="postgres"}` has grown by every
//! event sent, giving the end-to-end rate; `--baseline-postgres URL` then
//! COPYs the same rows straight into a scratch table, three times, so the
//! end-to-end rate can be reported as a ratio to raw COPY (the median of the
//! three: a single COPY right after a load varies by a third on a small
//! machine) measured in the same run. With `--server-pid` it samples the
//! server's resident memory every `--rss-every` seconds from the first
//! request until everything is delivered, so a long run at a fixed `--rate`
//! shows whether memory grows.
//!
//! To hold it against another collector on the same load, `--body json`
//! sends each frame's events as a plain JSON array to `--url` as given
//! (Vector's `http_server`, say), `--count-rows` waits until PostgreSQL's
//! `events` table has them all, and `--cpu-of NAME` adds the CPU of the
//! processes around the server (Redis, PostgreSQL, InfluxDB) to the report,
//! with the whole machine's (`scripts/bench-vector`).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use outpost_shared::Timestamp;
use outpost_shared::event::Event;
use outpost_shared::frame::{self, BatchId, EdgeKey, FrameMeta};
use outpost_shared::sample::typical_batch;
use serde::Serialize;

use outpost_aggregator::delivery::now_ms;

/// `outpost bench`'s options.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// Aggregator base URL (with `--body json`: the URL to post to).
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub url: String,
    /// What each request carries.
    #[arg(long, value_enum, default_value_t = Body::Frame)]
    pub body: Body,
    /// Config file whose first edge key signs the frames (or OUTPOST_EDGE_KEYS).
    #[arg(long, short, env = "OUTPOST_CONFIG")]
    pub config: Option<std::path::PathBuf>,
    /// Frames to send.
    #[arg(long, default_value_t = 1000)]
    pub frames: usize,
    /// Events per frame.
    #[arg(long, default_value_t = 100)]
    pub events_per_frame: usize,
    /// Concurrent requests.
    #[arg(long, default_value_t = 8)]
    pub concurrency: usize,
    /// Frames per second in total (default: flat out).
    #[arg(long)]
    pub rate: Option<f64>,
    /// Wait until PostgreSQL has every event and report the end-to-end rate.
    #[arg(long)]
    pub wait_delivery: bool,
    /// Also time a raw COPY of the same rows into this PostgreSQL (migrated) database.
    #[arg(long)]
    pub baseline_postgres: Option<String>,
    /// Wait until this PostgreSQL's `events` table holds every event sent
    /// (rows of `--client-id`) and report the end-to-end rate: for servers
    /// without Outpost's metrics.
    #[arg(long)]
    pub count_rows: Option<String>,
    /// PID of the server, to report its peak RSS and sample its RSS over the run.
    #[arg(long)]
    pub server_pid: Option<u32>,
    /// Also report the CPU of every process with this name (repeatable:
    /// `redis-server`, `postgres`, `influxd`, `vector`), children they
    /// reaped included, and the whole machine's less this generator's.
    #[arg(long = "cpu-of")]
    pub cpu_of: Vec<String>,
    /// Seconds between samples of the server's RSS (with --server-pid).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    pub rss_every: u64,
    /// Client id the frames carry.
    #[arg(long, default_value = "bench")]
    pub client_id: String,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// What each request carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Body {
    /// A signed frame to `{url}/v1/ingest`, as an edge sends it; `202` is
    /// an acknowledgement.
    Frame,
    /// The frame's events as a JSON array (the events as a client sends
    /// them) to the URL as given; any `2xx` is an acknowledgement.
    Json,
}

/// What to run.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Aggregator base URL (`Body::Json`: the URL to post to).
    pub url: String,
    /// What each request carries.
    pub body: Body,
    /// Edge key to sign frames with (`Body::Frame`).
    pub key: Option<EdgeKey>,
    /// Frames to send.
    pub frames: usize,
    /// Events per frame.
    pub events_per_frame: usize,
    /// Concurrent requests.
    pub concurrency: usize,
    /// Frames per second in total; `None`: flat out.
    pub rate: Option<f64>,
    /// Wait until the PostgreSQL sink has delivered everything.
    pub wait_delivery: bool,
    /// PostgreSQL URL for the COPY baseline.
    pub baseline_postgres: Option<String>,
    /// Wait until this PostgreSQL's `events` holds every event sent.
    pub count_rows: Option<String>,
    /// PID of the server, to report its peak RSS (Linux).
    pub server_pid: Option<u32>,
    /// Names of processes whose CPU is reported too.
    pub cpu_of: Vec<String>,
    /// Seconds between samples of the server's RSS.
    pub rss_every: Duration,
    /// Client id the frames claim.
    pub client_id: String,
}

/// The summary (printed as text, or JSON with `--json`).
#[derive(Debug, Serialize)]
pub struct BenchReport {
    /// Frames acknowledged with 202.
    pub frames_ok: u64,
    /// Events in acknowledged frames.
    pub events_ok: u64,
    /// Refused or failed requests, by error code (0: transport error).
    pub errors: std::collections::BTreeMap<u32, u64>,
    /// Wall time of the sending phase, seconds.
    pub ingest_secs: f64,
    /// Acknowledged events per second.
    pub ingest_events_per_sec: f64,
    /// Latency percentiles of acknowledged requests, milliseconds.
    pub latency_ms: Percentiles,
    /// Seconds from the first request until PostgreSQL had every event.
    pub end_to_end_secs: Option<f64>,
    /// Events per second, end to end into PostgreSQL.
    pub end_to_end_events_per_sec: Option<f64>,
    /// Events per second of a raw COPY of the same rows (the median of
    /// [`BenchReport::baseline_copy_runs`]).
    pub baseline_copy_events_per_sec: Option<f64>,
    /// Events per second of each COPY of the same rows, in run order.
    pub baseline_copy_runs: Vec<f64>,
    /// End-to-end rate over the COPY rate.
    pub ratio_to_copy: Option<f64>,
    /// CPU seconds the server used (user + system, all threads) from just
    /// before the first request until every sink had every event.
    pub server_cpu_secs: Option<f64>,
    /// [`BenchReport::server_cpu_secs`] per acknowledged event, µs.
    pub server_cpu_us_per_event: Option<f64>,
    /// CPU seconds over the same span of the processes named with
    /// `--cpu-of`, by name (each process's own and its reaped children's).
    pub cpu_by_process: std::collections::BTreeMap<String, f64>,
    /// The whole machine's busy CPU seconds over the same span, less this
    /// generator's own: the server and everything it uses, and whatever
    /// else runs.
    pub machine_cpu_secs: Option<f64>,
    /// [`BenchReport::machine_cpu_secs`] per acknowledged event, µs.
    pub machine_cpu_us_per_event: Option<f64>,
    /// Server's peak resident memory, MiB.
    pub server_peak_rss_mib: Option<f64>,
    /// The server's resident memory over the run (from the first request
    /// until everything was delivered), first and last sample included.
    pub server_rss_samples: Vec<RssSample>,
}

/// The server's resident memory at one moment of the run.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct RssSample {
    /// Seconds since the first request.
    pub secs: f64,
    /// Resident memory, MiB.
    pub mib: f64,
    /// Of which anonymous (the heap, stacks), MiB: what a leak grows.
    pub anon_mib: Option<f64>,
    /// Of which file-backed (the binary, the mapped GeoIP databases: pages
    /// lookups touched, which the kernel may drop), MiB.
    pub file_mib: Option<f64>,
}

/// Latency percentiles, milliseconds.
#[derive(Debug, Serialize)]
pub struct Percentiles {
    /// Median.
    pub p50: f64,
    /// 95th.
    pub p95: f64,
    /// 99th.
    pub p99: f64,
    /// Largest.
    pub max: f64,
}

fn percentiles(mut v: Vec<f64>) -> Percentiles {
    v.sort_by(f64::total_cmp);
    let at = |q: f64| {
        if v.is_empty() {
            0.0
        } else {
            v[((v.len() - 1) as f64 * q).round() as usize]
        }
    };
    Percentiles {
        p50: at(0.50),
        p95: at(0.95),
        p99: at(0.99),
        max: at(1.0),
    }
}

fn events_for(run: u64, frame: usize, n: usize, now: Timestamp) -> Vec<Event> {
    let mut events = typical_batch(n).events;
    for (i, e) in events.iter_mut().enumerate() {
        e.event_id = format!(
            "{:08x}-{:04x}-4{:03x}-8000-{:012x}",
            run as u32,
            (frame >> 12) & 0xffff,
            frame & 0xfff,
            i
        )
        .into();
        e.timestamp = Some(now);
    }
    events
}

/// Runs the benchmark.
pub async fn run(opts: BenchOptions) -> anyhow::Result<BenchReport> {
    anyhow::ensure!(
        opts.frames > 0 && opts.events_per_frame > 0 && opts.concurrency > 0,
        "nothing to send"
    );
    let run_id = now_ms() as u64;
    let now = Timestamp(now_ms());
    eprintln!(
        "preparing {} frames of {} events…",
        opts.frames, opts.events_per_frame
    );
    let mut batch = typical_batch(0);
    batch.client_id = opts.client_id.as_str().into();
    batch.facts.received_at = now;
    let mut frames = Vec::with_capacity(opts.frames);
    let mut all_events = Vec::new();
    for f in 0..opts.frames {
        batch.events = events_for(run_id, f, opts.events_per_frame, now);
        // Many distinct public addresses, so GeoIP does real lookups.
        batch.facts.client_ip = Some(format!(
            "{}.{}.{}.{}",
            81 + f % 3,
            (f / 3) % 200,
            (f / 600) % 200,
            1 + f % 250
        ));
        let meta = FrameMeta {
            edge_id: "bench",
            batch_id: BatchId(fastrand::u128(..).to_be_bytes()),
            created_at: now,
            compress: true,
        };
        frames.push(Bytes::from(match (opts.body, &opts.key) {
            (Body::Frame, Some(key)) => frame::encode(&meta, &batch, key)?,
            (Body::Frame, None) => bail!("frames need an edge key"),
            (Body::Json, _) => serde_json::to_vec(&batch.events)?,
        }));
        if opts.baseline_postgres.is_some() {
            all_events.append(&mut batch.events);
        }
    }

    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(opts.concurrency)
        .build_http();
    let (uri, content_type): (hyper::Uri, _) = match opts.body {
        Body::Frame => (
            format!("{}/v1/ingest", opts.url.trim_end_matches('/')).parse()?,
            outpost_aggregator::http::FRAME_CONTENT_TYPE,
        ),
        Body::Json => (opts.url.parse()?, "application/json"),
    };
    let body_kind = opts.body;
    let rows = match &opts.count_rows {
        Some(url) => Some(RowCount::connect(url, &opts.client_id).await?),
        None => None,
    };
    let before = match &rows {
        Some(rows) => rows.count().await? as f64,
        None => delivered_postgres(&client, &opts.url).await.unwrap_or(0.0),
    };

    let frames = Arc::new(frames);
    let next = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicU64::new(0));
    let cpu_before = opts.server_pid.and_then(cpu_secs);
    let named_before = processes_cpu(&opts.cpu_of);
    let machine_before = machine_busy_secs().zip(cpu_secs(std::process::id()));
    let started = Instant::now();
    let (stop_sampling, stopped) = tokio::sync::oneshot::channel::<()>();
    let rss_sampler = opts
        .server_pid
        .map(|pid| tokio::spawn(sample_rss(pid, started, opts.rss_every, stopped)));
    let interval = opts
        .rate
        .map(|r| Duration::from_secs_f64(1.0 / r.max(0.001)));
    let mut tasks = Vec::new();
    for _ in 0..opts.concurrency {
        let (client, uri, frames, next, done) = (
            client.clone(),
            uri.clone(),
            frames.clone(),
            next.clone(),
            done.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut errors = std::collections::BTreeMap::<u32, u64>::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                if i >= frames.len() {
                    break;
                }
                if let Some(iv) = interval {
                    let due = started + iv * i as u32;
                    tokio::time::sleep_until(due.into()).await;
                }
                let req = hyper::Request::post(uri.clone())
                    .header(hyper::header::CONTENT_TYPE, content_type)
                    .body(Full::new(frames[i].clone()));
                let t = Instant::now();
                let outcome = match req {
                    Ok(req) => match client.request(req).await {
                        Ok(resp) => {
                            let status = resp.status();
                            let body = resp
                                .into_body()
                                .collect()
                                .await
                                .map(|b| b.to_bytes())
                                .unwrap_or_default();
                            let acknowledged = match body_kind {
                                Body::Frame => status == hyper::StatusCode::ACCEPTED,
                                Body::Json => status.is_success(),
                            };
                            if acknowledged {
                                Ok(())
                            } else {
                                let code = serde_json::from_slice::<serde_json::Value>(&body)
                                    .ok()
                                    .and_then(|v| v["code"].as_u64())
                                    .unwrap_or(u64::from(status.as_u16()));
                                Err(code as u32)
                            }
                        }
                        Err(_) => Err(0),
                    },
                    Err(_) => Err(0),
                };
                match outcome {
                    Ok(()) => latencies.push(t.elapsed().as_secs_f64() * 1000.0),
                    Err(code) => *errors.entry(code).or_default() += 1,
                }
                done.fetch_add(1, Ordering::Relaxed);
            }
            (latencies, errors)
        }));
    }
    let progress = {
        let (done, total) = (done.clone(), opts.frames as u64);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let d = done.load(Ordering::Relaxed);
                let width = 30usize;
                let filled = (d as usize * width) / total.max(1) as usize;
                eprint!(
                    "\r[{}{}] {d}/{total} frames",
                    "#".repeat(filled),
                    " ".repeat(width - filled)
                );
                if d >= total {
                    eprintln!();
                    return;
                }
            }
        })
    };
    let mut latencies = Vec::new();
    let mut errors = std::collections::BTreeMap::new();
    for t in tasks {
        let (l, e) = t.await?;
        latencies.extend(l);
        for (k, v) in e {
            *errors.entry(k).or_default() += v;
        }
    }
    let ingest_secs = started.elapsed().as_secs_f64();
    progress.abort();
    eprintln!();
    let frames_ok = latencies.len() as u64;
    let events_ok = frames_ok * opts.events_per_frame as u64;

    let mut end_to_end_secs = None;
    if opts.wait_delivery || rows.is_some() {
        eprintln!("waiting until PostgreSQL has all {events_ok} events…");
        let target = before + events_ok as f64;
        let deadline = Instant::now() + Duration::from_secs(600);
        loop {
            let stored = match &rows {
                Some(rows) => rows.count().await? as f64,
                None => delivered_postgres(&client, &opts.url).await.unwrap_or(0.0),
            };
            if stored >= target {
                end_to_end_secs = Some(started.elapsed().as_secs_f64());
                break;
            }
            if Instant::now() > deadline {
                bail!("the sinks did not deliver everything within 10 minutes");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let end_to_end_events_per_sec = end_to_end_secs.map(|s| events_ok as f64 / s);
    let mut server_rss_samples = Vec::new();
    let _ = stop_sampling.send(());
    if let Some(sampler) = rss_sampler {
        server_rss_samples = sampler.await?;
    }
    server_rss_samples.extend(opts.server_pid.and_then(|pid| rss_sample(pid, started)));

    // Until every sink has every event (InfluxDB may trail PostgreSQL):
    // the server's CPU is counted to here, and the yardstick below runs on
    // a quiet machine, not while a sink is still catching up on the same
    // CPUs.
    if opts.body == Body::Frame && (opts.wait_delivery || opts.server_pid.is_some()) {
        let deadline = Instant::now() + Duration::from_secs(120);
        while metric(&client, &opts.url, "outpost_spool_batches")
            .await
            .unwrap_or(0.0)
            > 0.0
            && Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let server_cpu_secs = opts
        .server_pid
        .and_then(cpu_secs)
        .zip(cpu_before)
        .map(|(after, before)| after - before);
    let cpu_by_process = cpu_by_name(&named_before, &processes_cpu(&opts.cpu_of));
    let machine_cpu_secs = machine_busy_secs()
        .zip(cpu_secs(std::process::id()))
        .zip(machine_before)
        .map(|((busy, own), (busy0, own0))| ((busy - busy0) - (own - own0)).max(0.0));
    let per_event = |secs: Option<f64>| {
        secs.filter(|_| events_ok > 0)
            .map(|c| c * 1e6 / events_ok as f64)
    };
    let baseline_copy_runs = match &opts.baseline_postgres {
        Some(url) => copy_baseline(url, &opts.client_id, &all_events, &batch.facts).await?,
        None => Vec::new(),
    };
    let baseline_copy_events_per_sec = median(&baseline_copy_runs);
    let ratio_to_copy = match (end_to_end_events_per_sec, baseline_copy_events_per_sec) {
        (Some(e), Some(b)) if b > 0.0 => Some(e / b),
        _ => None,
    };
    Ok(BenchReport {
        frames_ok,
        events_ok,
        errors,
        ingest_secs,
        ingest_events_per_sec: events_ok as f64 / ingest_secs,
        latency_ms: percentiles(latencies),
        end_to_end_secs,
        end_to_end_events_per_sec,
        baseline_copy_events_per_sec,
        baseline_copy_runs,
        ratio_to_copy,
        server_cpu_secs,
        server_cpu_us_per_event: per_event(server_cpu_secs),
        cpu_by_process,
        machine_cpu_secs,
        machine_cpu_us_per_event: per_event(machine_cpu_secs),
        server_peak_rss_mib: opts.server_pid.and_then(|pid| status_mib(pid, "VmHWM:")),
        server_rss_samples,
    })
}

async fn delivered_postgres(
    client: &Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
    base: &str,
) -> anyhow::Result<f64> {
    metric(
        client,
        base,
        "outpost_sink_delivered_events_total{sink=\"postgres\"}",
    )
    .await
}

/// Rows of one client in PostgreSQL's `events`, for servers without
/// Outpost's metrics.
struct RowCount {
    pool: sqlx::PgPool,
    client_id: String,
}

impl RowCount {
    async fn connect(url: &str, client_id: &str) -> anyhow::Result<RowCount> {
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(1)
            .connect(url)
            .await
            .context("--count-rows PostgreSQL")?;
        Ok(RowCount {
            pool,
            client_id: client_id.to_owned(),
        })
    }

    async fn count(&self) -> anyhow::Result<i64> {
        Ok(
            sqlx::query_scalar("SELECT count(*) FROM events WHERE client_id = $1")
                .bind(&self.client_id)
                .fetch_one(&self.pool)
                .await?,
        )
    }
}

/// One sample of the aggregator's `/metrics` (0 when it is not there).
async fn metric(
    client: &Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
    base: &str,
    series: &str,
) -> anyhow::Result<f64> {
    let uri: hyper::Uri = format!("{}/metrics", base.trim_end_matches('/')).parse()?;
    let resp = client.get(uri).await?;
    let text = resp.into_body().collect().await?.to_bytes();
    let text = String::from_utf8_lossy(&text);
    Ok(text
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0))
}

/// How many times the COPY baseline runs.
const BASELINE_RUNS: usize = 3;

fn median(runs: &[f64]) -> Option<f64> {
    let mut sorted = runs.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted.get(sorted.len() / 2).copied()
}

/// COPYs the same rows (same columns the sink writes) into a scratch copy of
/// `events`, timed, [`BASELINE_RUNS`] times (a fresh table each time,
/// dropped afterwards); events per second of each run.
async fn copy_baseline(
    url: &str,
    client_id: &str,
    events: &[Event],
    facts: &outpost_shared::EdgeFacts,
) -> anyhow::Result<Vec<f64>> {
    use sqlx::Connection as _;
    let mut conn = sqlx::PgConnection::connect(url)
        .await
        .context("baseline PostgreSQL")?;
    let mut text = String::with_capacity(events.len() * 700);
    let esc = |s: &str| {
        s.replace('\\', "\\\\")
            .replace('\t', "\\t")
            .replace('\n', "\\n")
            .replace('\r', "\\r")
    };
    let opt = |s: Option<&str>| s.map(esc).unwrap_or_else(|| "\\N".into());
    let ts = |ms: i64| Timestamp(ms).to_rfc3339().unwrap_or_default();
    for e in events {
        let fields = [
            esc(client_id),
            esc(&e.event_id),
            "00000000-0000-4000-8000-000000000000".to_owned(),
            "bench".to_owned(),
            ts(e.timestamp.unwrap_or(facts.received_at).millis()),
            ts(facts.received_at.millis()),
            e.kind.as_str().to_owned(),
            opt(e.name.as_deref()),
            opt(e.message.as_deref()),
            opt(e.level.map(|l| l.as_str())),
            opt(e.user_id.as_deref()),
            opt(e.anonymous_id.as_deref()),
            opt(e.session_id.as_deref()),
            esc(e.properties.get()),
            esc(&serde_json::to_string(&e.context)?),
            opt(e.context.app_version.as_deref()),
            opt(e.context.platform.as_deref()),
            opt(e.trace_id.as_deref()),
            opt(e.span_id.as_deref()),
            e.seq.map(|s| s.to_string()).unwrap_or_else(|| "\\N".into()),
            e.priority.as_str().to_owned(),
            opt(facts.client_ip.as_deref()),
            opt(facts.user_agent.as_deref()),
            opt(facts.pop.as_deref()),
            opt(facts.country_hint.as_deref()),
        ];
        text.push_str(&fields.join("\t"));
        text.push('\n');
    }
    let table = format!("outpost_bench_baseline_{}", std::process::id());
    let mut runs = Vec::with_capacity(BASELINE_RUNS);
    for _ in 0..BASELINE_RUNS {
        sqlx::query(&format!("CREATE TABLE {table} (LIKE events INCLUDING DEFAULTS INCLUDING CONSTRAINTS INCLUDING INDEXES)"))
            .execute(&mut conn)
            .await
            .context("creating the baseline table (run `outpost migrate` on that database first)")?;
        let started = Instant::now();
        let mut copy = conn
            .copy_in_raw(&format!(
                "COPY {table} (client_id, event_id, batch_id, edge_id, ts, received_at, kind, name, message, level, user_id, \
                 anonymous_id, session_id, properties, context, app_version, platform, trace_id, span_id, seq, priority, \
                 client_ip, user_agent, pop, country) FROM STDIN"
            ))
            .await?;
        copy.send(text.as_bytes()).await?;
        let rows = copy.finish().await?;
        let secs = started.elapsed().as_secs_f64();
        sqlx::query(&format!("DROP TABLE {table}"))
            .execute(&mut conn)
            .await?;
        anyhow::ensure!(
            rows as usize == events.len(),
            "COPY wrote {rows} of {} rows",
            events.len()
        );
        runs.push(events.len() as f64 / secs);
    }
    Ok(runs)
}

/// Samples the server's RSS now and every `every` until told to stop.
async fn sample_rss(
    pid: u32,
    started: Instant,
    every: Duration,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) -> Vec<RssSample> {
    let mut samples = Vec::new();
    loop {
        samples.extend(rss_sample(pid, started));
        tokio::select! {
            _ = &mut stop => return samples,
            () = tokio::time::sleep(every) => {}
        }
    }
}

/// The server's resident memory now (Linux).
fn rss_sample(pid: u32, started: Instant) -> Option<RssSample> {
    // One read, so the parts add up to the whole.
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    Some(RssSample {
        secs: started.elapsed().as_secs_f64(),
        mib: field_mib(&status, "VmRSS:")?,
        anon_mib: field_mib(&status, "RssAnon:"),
        file_mib: field_mib(&status, "RssFile:"),
    })
}

/// CPU seconds a process has used, user and system, all its threads
/// (Linux: `/proc/PID/stat` fields 14 and 15, in the kernel's fixed 100
/// ticks a second).
fn cpu_secs(pid: u32) -> Option<f64> {
    stat_cpu_secs(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

fn stat_cpu_secs(stat: &str) -> Option<f64> {
    stat_cpu(stat).map(|c| c.own)
}

/// What `/proc/PID/stat` says of a process's CPU.
#[derive(Debug, PartialEq)]
struct StatCpu<'a> {
    /// The command name (at most 15 bytes).
    name: &'a str,
    /// Its own CPU seconds, user and system.
    own: f64,
    /// CPU seconds of the children it waited for (PostgreSQL's backends
    /// that closed, say).
    children: f64,
}

fn stat_cpu(stat: &str) -> Option<StatCpu<'_>> {
    // The command name (field 2) may hold spaces and `)`: it runs from the
    // first `(` to the last `)`; count fields after it.
    let (open, close) = (stat.find('(')?, stat.rfind(')')?);
    let name = stat.get(open + 1..close)?;
    let mut after_name = stat.get(close + 1..)?.split_whitespace();
    let mut next = |skip: usize| -> Option<f64> { after_name.nth(skip)?.parse().ok() };
    let (utime, stime, cutime, cstime) = (next(11)?, next(0)?, next(0)?, next(0)?);
    Some(StatCpu {
        name,
        own: (utime + stime) / 100.0,
        children: (cutime + cstime) / 100.0,
    })
}

/// CPU seconds (own and reaped children's) of every process named in
/// `names`, by pid, this generator left out.
fn processes_cpu(names: &[String]) -> std::collections::HashMap<u32, (String, f64)> {
    let mut found = std::collections::HashMap::new();
    if names.is_empty() {
        return found;
    }
    let me = std::process::id();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == me {
            continue;
        }
        // A process may exit between the listing and the read.
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        if let Some(cpu) = stat_cpu(&stat).filter(|c| names.iter().any(|n| n == c.name)) {
            found.insert(pid, (cpu.name.to_owned(), cpu.own + cpu.children));
        }
    }
    found
}

/// CPU seconds by name between two [`processes_cpu`] readings: a process
/// seen only at the end counts whole (it started during the run); one
/// that ended during the run counts through its parent's reaped children
/// when the parent has the same name (PostgreSQL's postmaster) — all of
/// its time, from before the run too. A benchmark's pooled connections
/// outlive the run, so that over-count stays small.
fn cpu_by_name(
    before: &std::collections::HashMap<u32, (String, f64)>,
    after: &std::collections::HashMap<u32, (String, f64)>,
) -> std::collections::BTreeMap<String, f64> {
    let mut by_name = std::collections::BTreeMap::new();
    for (pid, (name, secs)) in after {
        let earlier = before
            .get(pid)
            .filter(|(n, _)| n == name)
            .map_or(0.0, |(_, s)| *s);
        *by_name.entry(name.clone()).or_insert(0.0) += (secs - earlier).max(0.0);
    }
    by_name
}

/// Busy CPU seconds of the whole machine since boot: every CPU's time
/// outside idle and I/O wait (Linux: the first line of `/proc/stat`).
fn machine_busy_secs() -> Option<f64> {
    proc_stat_busy_secs(&std::fs::read_to_string("/proc/stat").ok()?)
}

fn proc_stat_busy_secs(stat: &str) -> Option<f64> {
    // cpu user nice system idle iowait irq softirq steal guest guest_nice
    // (guest time is already inside user and nice).
    let mut f = stat
        .lines()
        .next()?
        .strip_prefix("cpu ")?
        .split_whitespace();
    let ticks: Vec<f64> = (0..8)
        .map(|_| f.next()?.parse().ok())
        .collect::<Option<_>>()?;
    let busy = ticks[0] + ticks[1] + ticks[2] + ticks[5] + ticks[6] + ticks[7];
    Some(busy / 100.0)
}

/// A memory line of `/proc/PID/status` (`VmHWM:` peak, `VmRSS:` now), MiB.
fn status_mib(pid: u32, field: &str) -> Option<f64> {
    field_mib(
        &std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?,
        field,
    )
}

fn field_mib(status: &str, field: &str) -> Option<f64> {
    let kb: f64 = status
        .lines()
        .find(|l| l.starts_with(field))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kb / 1024.0)
}

impl BenchReport {
    /// Human-readable summary.
    pub fn render(&self) -> String {
        let mut s = format!(
            "ingest: {} frames, {} events in {:.2} s = {:.0} events/s\nlatency ms: p50 {:.2}  p95 {:.2}  p99 {:.2}  max {:.2}\n",
            self.frames_ok,
            self.events_ok,
            self.ingest_secs,
            self.ingest_events_per_sec,
            self.latency_ms.p50,
            self.latency_ms.p95,
            self.latency_ms.p99,
            self.latency_ms.max
        );
        if !self.errors.is_empty() {
            s.push_str(&format!("errors by code: {:?}\n", self.errors));
        }
        if let (Some(t), Some(r)) = (self.end_to_end_secs, self.end_to_end_events_per_sec) {
            s.push_str(&format!(
                "end to end into PostgreSQL: {t:.2} s = {r:.0} events/s\n"
            ));
        }
        if let Some(b) = self.baseline_copy_events_per_sec {
            let runs: Vec<String> = self
                .baseline_copy_runs
                .iter()
                .map(|r| format!("{r:.0}"))
                .collect();
            s.push_str(&format!(
                "raw COPY baseline: {b:.0} events/s (median of {})\n",
                runs.join(", ")
            ));
        }
        if let Some(r) = self.ratio_to_copy {
            s.push_str(&format!("ratio end-to-end / COPY: {r:.2}\n"));
        }
        if let (Some(c), Some(per)) = (self.server_cpu_secs, self.server_cpu_us_per_event) {
            s.push_str(&format!(
                "server CPU until every sink had every event: {c:.2} s = {per:.1} µs per event\n"
            ));
        }
        for (name, c) in &self.cpu_by_process {
            s.push_str(&format!(
                "CPU of {name}: {c:.2} s = {:.1} µs per event\n",
                c * 1e6 / self.events_ok.max(1) as f64
            ));
        }
        if let (Some(c), Some(per)) = (self.machine_cpu_secs, self.machine_cpu_us_per_event) {
            s.push_str(&format!(
                "machine CPU less the generator's: {c:.2} s = {per:.1} µs per event\n"
            ));
        }
        if let Some(m) = self.server_peak_rss_mib {
            s.push_str(&format!("server peak RSS: {m:.1} MiB\n"));
        }
        if self.server_rss_samples.len() > 1 {
            // At most a dozen, evenly spread, the last one always.
            let n = self.server_rss_samples.len();
            let step = n.div_ceil(12);
            let shown: Vec<String> = self
                .server_rss_samples
                .iter()
                .enumerate()
                .filter(|(i, _)| i % step == 0 || *i == n - 1)
                .map(|(_, r)| match r.anon_mib {
                    Some(anon) => format!("{:.0} s {:.1} (anon {anon:.1})", r.secs, r.mib),
                    None => format!("{:.0} s {:.1}", r.secs, r.mib),
                })
                .collect();
            s.push_str(&format!(
                "server RSS MiB over the run: {}\n",
                shown.join(", ")
            ));
        }
        s
    }
}

/// `outpost bench`: load, wait, report (text or JSON).
pub fn main(a: BenchArgs) -> anyhow::Result<()> {
    let key = match a.body {
        Body::Frame => {
            let config = outpost_aggregator::config::Config::load_unchecked(a.config.as_deref())?;
            Some(
                config
                    .edge_keys
                    .first()
                    .cloned()
                    .context("no edge key: pass --config or set OUTPOST_EDGE_KEYS")?,
            )
        }
        Body::Json => None,
    };
    anyhow::ensure!(
        a.body == Body::Frame
            || a.count_rows.is_some()
            || !(a.wait_delivery || a.baseline_postgres.is_some()),
        "--body json: the end-to-end rate needs --count-rows (there are no Outpost metrics to read)"
    );
    let opts = BenchOptions {
        url: a.url,
        body: a.body,
        key,
        frames: a.frames,
        events_per_frame: a.events_per_frame,
        concurrency: a.concurrency,
        rate: a.rate,
        wait_delivery: a.wait_delivery || a.baseline_postgres.is_some(),
        baseline_postgres: a.baseline_postgres,
        count_rows: a.count_rows,
        server_pid: a.server_pid,
        cpu_of: a.cpu_of,
        rss_every: Duration::from_secs(a.rss_every),
        client_id: a.client_id,
    };
    let report = super::runtime()?.block_on(run(opts))?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.render());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_cpu_is_read_after_a_command_name_with_spaces() {
        // pid (comm) state ppid pgrp session tty tpgid flags minflt
        // cminflt majflt cmajflt utime stime …
        let stat = "4242 (outpost (x) y) S 1 4242 4242 0 -1 4194560 900 0 0 0 250 75 0 0 20 0 9 0";
        assert_eq!(stat_cpu_secs(stat), Some(3.25));
        assert_eq!(stat_cpu_secs("4242 (outpost) S 1"), None);
        // This process: the reading grows while it spends CPU (ticks are
        // 10 ms; a loaded machine may take a while to give it them).
        let before = cpu_secs(std::process::id()).unwrap();
        let machine_before = machine_busy_secs().unwrap();
        let spin = Instant::now();
        let mut x = 0u64;
        while cpu_secs(std::process::id()).unwrap() <= before {
            assert!(spin.elapsed() < Duration::from_secs(30), "no CPU counted");
            for _ in 0..100_000 {
                x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
            }
        }
        assert!(
            machine_busy_secs().unwrap() > machine_before,
            "the machine's busy time holds this process's"
        );
    }

    #[test]
    fn a_process_cpu_reading_has_its_name_and_its_reaped_childrens_time() {
        let stat = "77 (postgres) S 1 77 77 0 -1 4194560 900 0 0 0 250 75 30 20 20 0 1 0";
        assert_eq!(
            stat_cpu(stat),
            Some(StatCpu {
                name: "postgres",
                own: 3.25,
                children: 0.5
            })
        );
        let odd = "78 (a (b) c) R 1 78 78 0 -1 0 0 0 0 0 1 2 3 4 20 0 1 0";
        assert_eq!(stat_cpu(odd).map(|c| c.name), Some("a (b) c"));
        // Truncated before the children's fields.
        assert_eq!(
            stat_cpu("79 (redis-server) S 1 79 79 0 -1 0 0 0 0 0 1 2"),
            None
        );
    }

    #[test]
    fn cpu_by_name_counts_what_each_process_spent_between_the_readings() {
        let reading = |rows: &[(u32, &str, f64)]| {
            rows.iter()
                .map(|&(pid, name, secs)| (pid, (name.to_owned(), secs)))
                .collect::<std::collections::HashMap<_, _>>()
        };
        let before = reading(&[
            (1, "postgres", 10.0),
            (2, "postgres", 4.0),
            (3, "redis-server", 7.0),
            (4, "vector", 1.0),
        ]);
        let after = reading(&[
            // 1 ran 2 s and reaped 2, which had 5 s in all (4 before the
            // run): all 7 count, the over-count the function names.
            (1, "postgres", 17.0),
            // A backend that started during the run counts whole.
            (5, "postgres", 0.5),
            (3, "redis-server", 7.25),
            // pid 4 was reused by another program: not the earlier one's time.
            (4, "influxd", 0.75),
        ]);
        let by_name = cpu_by_name(&before, &after);
        assert_eq!(by_name.len(), 3);
        assert_eq!(by_name["postgres"], 7.5);
        assert_eq!(by_name["redis-server"], 0.25);
        assert_eq!(by_name["influxd"], 0.75);
    }

    #[test]
    fn the_machine_busy_time_leaves_out_idle_and_io_wait() {
        let stat = "cpu  100 5 50 1000 30 2 3 4 9 0\ncpu0 50 2 25 500 15 1 1 2 0 0\n";
        // user nice system irq softirq steal = 164 ticks.
        assert_eq!(proc_stat_busy_secs(stat), Some(1.64));
        assert_eq!(proc_stat_busy_secs("cpu  100 5 50"), None);
        assert_eq!(proc_stat_busy_secs("intr 1 2 3 4 5 6 7 8"), None);
    }
}
