//! `outpost spool …` and `outpost dead-letters …`: what an operator does
//! with the spool file — see which sinks it holds batches for and how many,
//! drop a sink that is gone for good, and handle what the sinks gave up on.
//!
//! `outpost spool` opens the spool named by `spool.path`, beside a running
//! aggregator if there is one (SQLite's locks keep them apart);
//! `outpost dead-letters` works on that file's table or, with
//! `spool.backend = "jetstream"`, on the stream `<stream>_DEAD` (ids are
//! its sequence numbers). `replay` does not write
//! to the spool itself: it signs the dead letters into frames with the
//! first edge key and sends them to the aggregator's `POST /v1/ingest`,
//! under their original batch id, so they pass validation (with today's
//! limits) and dedup like any frame, reach every sink (each stores an event
//! once however often it gets it), and leave the dead letters only once
//! the aggregator acknowledged them.

use std::collections::BTreeMap;

use anyhow::{Context as _, bail};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use outpost_shared::error::{AcceptedResponse, ErrorEnvelope};
use outpost_shared::event::{EdgeFacts, Event, Timestamp};
use outpost_shared::frame::{self, Batch, BatchId, FrameMeta};
use serde_json::{Value, json};

use outpost_aggregator::config::Config;
use outpost_aggregator::delivery::now_ms;
use outpost_aggregator::spool::{self, StoredDeadLetter};

/// `outpost spool status`: each sink the spool knows with its backlog, and
/// the dead letters held.
pub async fn status(config: &Config) -> anyhow::Result<Value> {
    let pool = spool::open_for_admin(&config.spool.path).await?;
    let sinks = spool::sink_backlogs(&pool).await?;
    let (count, bytes) = spool::dead_letter_totals(&pool).await?;
    let configured = config.sink_names();
    Ok(json!({
        "path": config.spool.path.display().to_string(),
        "sinks": sinks.iter().map(|(name, backlog)| json!({
            "sink": name,
            "backlog_batches": backlog,
            "configured": configured.contains(&name.as_str()),
        })).collect::<Vec<_>>(),
        "dead_letters": {"count": count, "bytes": bytes, "max_bytes": config.spool.dead_letters_max_bytes},
    }))
}

/// `outpost spool drop-sink NAME`: the backlog of a sink removed from the
/// configuration is dropped for it, for good.
pub async fn drop_sink(config: &Config, name: &str, yes: bool) -> anyhow::Result<Value> {
    if config.sink_names().contains(&name) {
        bail!("{name} is still configured: turn it off in the configuration first");
    }
    let pool = spool::open_for_admin(&config.spool.path).await?;
    let backlog = spool::sink_backlogs(&pool)
        .await?
        .into_iter()
        .find(|(s, _)| s == name)
        .map(|(_, n)| n)
        .with_context(|| format!("the spool has no sink {name:?}"))?;
    if !yes {
        bail!(
            "this drops {backlog} batch(es) the sink {name} has not received, for good: run again with --yes"
        );
    }
    let dropped = spool::drop_sink(&pool, name).await?;
    Ok(json!({"sink": name, "dropped_batches": dropped}))
}

/// Which dead letters a command is about.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct Selection {
    /// Only this sink's.
    #[arg(long)]
    pub sink: Option<String>,
    /// Only these ids (repeatable).
    #[arg(long = "id")]
    pub ids: Vec<i64>,
}

impl Selection {
    fn wants(&self, d: &StoredDeadLetter) -> bool {
        self.ids.is_empty() || self.ids.contains(&d.id)
    }
}

/// Reads every selected dead letter, in pages.
async fn selected(
    store: &spool::DeadLetters,
    sel: &Selection,
    with_payload: bool,
    max: usize,
) -> anyhow::Result<Vec<StoredDeadLetter>> {
    let mut out = Vec::new();
    let mut after = 0;
    loop {
        let page = store
            .list(sel.sink.as_deref(), after, 500, with_payload)
            .await?;
        let Some(last) = page.last() else { break };
        after = last.id;
        out.extend(page.into_iter().filter(|d| sel.wants(d)));
        if out.len() >= max {
            out.truncate(max);
            break;
        }
    }
    Ok(out)
}

/// `outpost dead-letters list`: oldest first, without payloads.
pub async fn list(config: &Config, sel: &Selection, limit: usize) -> anyhow::Result<Value> {
    let store = spool::DeadLetters::open(&config.spool).await?;
    let letters = selected(&store, sel, false, limit).await?;
    Ok(serde_json::to_value(letters)?)
}

/// `outpost dead-letters show ID`: one letter with its payload (the event
/// as JSON, or a whole frame in base64) and the edge's facts.
pub async fn show(config: &Config, id: i64) -> anyhow::Result<Value> {
    let store = spool::DeadLetters::open(&config.spool).await?;
    let sel = Selection {
        sink: None,
        ids: vec![id],
    };
    let d = selected(&store, &sel, true, 1)
        .await?
        .pop()
        .with_context(|| format!("no dead letter {id}"))?;
    let mut v = serde_json::to_value(&d)?;
    v["payload"] = match (&d.event_id, serde_json::from_slice::<Value>(&d.payload)) {
        (Some(_), Ok(event)) => event,
        _ => json!({"frame_base64": B64.encode(&d.payload)}),
    };
    v["facts"] = d
        .facts
        .as_deref()
        .and_then(|f| serde_json::from_str(f).ok())
        .unwrap_or(Value::Null);
    v["edge_id"] = d.edge_id.clone().map_or(Value::Null, Value::from);
    Ok(v)
}

/// `outpost dead-letters purge`: deletes the selection for good.
pub async fn purge(
    config: &Config,
    sel: &Selection,
    before: Option<&str>,
    yes: bool,
) -> anyhow::Result<Value> {
    let before_ms = before
        .map(|b| {
            Timestamp::parse_rfc3339(b)
                .map(Timestamp::millis)
                .with_context(|| format!("--before {b:?}: expected RFC 3339"))
        })
        .transpose()?;
    if !yes {
        bail!("purging deletes dead letters for good: run again with --yes");
    }
    let store = spool::DeadLetters::open(&config.spool).await?;
    let deleted = if sel.ids.is_empty() {
        store.purge(sel.sink.as_deref(), before_ms).await?
    } else {
        let ids: Vec<i64> = selected(&store, sel, false, usize::MAX)
            .await?
            .into_iter()
            .filter(|d| before_ms.is_none_or(|b| d.at_ms < b))
            .map(|d| d.id)
            .collect();
        store.delete(&ids).await?
    };
    Ok(json!({"deleted": deleted}))
}

/// One frame to replay: the events of one original batch.
struct Replay {
    client_id: String,
    batch: [u8; 16],
    facts: EdgeFacts,
    edge_id: String,
    /// Events by id, each with the dead letters (of any sink) it clears.
    events: BTreeMap<String, (Event, Vec<i64>)>,
}

/// `outpost dead-letters replay`: sends the selection to the aggregator at
/// `url` again (see the module documentation). Letters of events the
/// aggregator accepts are deleted; the others stay, with why in the report.
pub async fn replay(config: &Config, sel: &Selection, url: &str) -> anyhow::Result<Value> {
    let key = config
        .edge_keys
        .first()
        .cloned()
        .context("no edge key: the configuration's first edge key signs the frames")?;
    let store = spool::DeadLetters::open(&config.spool).await?;
    let letters = selected(&store, sel, true, usize::MAX).await?;
    let mut replays: BTreeMap<([u8; 16], String), Replay> = BTreeMap::new();
    let mut frames: Vec<(i64, Vec<u8>)> = Vec::new();
    let mut unreadable = Vec::new();
    for d in letters {
        if d.event_id.is_none() {
            // A whole frame that no longer decoded: sent as it is.
            frames.push((d.id, d.payload));
            continue;
        }
        let Ok(event) = serde_json::from_slice::<Event>(&d.payload) else {
            unreadable.push(d.id);
            continue;
        };
        let facts = d
            .facts
            .as_deref()
            .and_then(|f| serde_json::from_str::<EdgeFacts>(f).ok())
            .unwrap_or(EdgeFacts {
                received_at: Timestamp(d.at_ms),
                ..EdgeFacts::default()
            });
        let r = replays
            .entry((d.batch_bytes, d.client_id.clone()))
            .or_insert_with(|| Replay {
                client_id: d.client_id.clone(),
                batch: d.batch_bytes,
                facts,
                edge_id: d.edge_id.clone().unwrap_or_else(|| "replay".into()),
                events: BTreeMap::new(),
            });
        r.events
            .entry(event.event_id.to_string())
            .or_insert_with(|| (event, Vec::new()))
            .1
            .push(d.id);
    }

    let client = outpost_aggregator::http_client::client();
    let ingest = format!("{}/v1/ingest", url.trim_end_matches('/'));
    let send = |body: Vec<u8>| {
        let client = client.clone();
        let ingest = ingest.clone();
        async move {
            let req = hyper::Request::post(&ingest)
                .header(hyper::header::CONTENT_TYPE, frame::CONTENT_TYPE)
                .body(http_body_util::Full::new(bytes::Bytes::from(body)))?;
            let resp =
                tokio::time::timeout(std::time::Duration::from_secs(30), client.request(req))
                    .await
                    .context("the aggregator did not answer in 30 s")??;
            let status = resp.status().as_u16();
            use http_body_util::BodyExt as _;
            let body = resp.into_body().collect().await?.to_bytes();
            anyhow::Ok((status, body))
        }
    };

    let mut cleared: Vec<i64> = Vec::new();
    let mut still: Vec<Value> = Vec::new();
    for r in replays.into_values() {
        let events: Vec<(Event, Vec<i64>)> = r.events.into_values().collect();
        for chunk in events.chunks(config.server.frame.max_events.max(1) as usize) {
            let batch = Batch {
                client_id: r.client_id.as_str().into(),
                facts: r.facts.clone(),
                events: chunk.iter().map(|(e, _)| e.clone()).collect(),
                sent_at: None,
            };
            let meta = FrameMeta {
                edge_id: &r.edge_id,
                batch_id: BatchId(r.batch),
                created_at: Timestamp(now_ms()),
                compress: true,
            };
            let body = frame::encode(&meta, &batch, &key)?;
            let (status, answer) = send(body).await?;
            let refused: BTreeMap<usize, String> = match status {
                202 => serde_json::from_slice::<AcceptedResponse>(&answer)
                    .context("unreadable 202 from the aggregator")?
                    .errors
                    .into_iter()
                    .filter_map(|e| Some((e.index?, format!("{} {}", e.code, e.message))))
                    .collect(),
                400 => {
                    let env: ErrorEnvelope = serde_json::from_slice(&answer)
                        .context("unreadable 400 from the aggregator")?;
                    let mut all: BTreeMap<usize, String> = env
                        .errors
                        .into_iter()
                        .filter_map(|e| Some((e.index?, format!("{} {}", e.code, e.message))))
                        .collect();
                    for i in 0..chunk.len() {
                        all.entry(i)
                            .or_insert_with(|| format!("{} {}", env.code, env.message));
                    }
                    all
                }
                s => bail!(
                    "the aggregator at {ingest} answered {s}: {}",
                    String::from_utf8_lossy(&answer)
                ),
            };
            for (i, (event, ids)) in chunk.iter().enumerate() {
                match refused.get(&i) {
                    None => cleared.extend(ids),
                    Some(why) => still.push(json!({
                        "ids": ids, "event_id": event.event_id, "refused": why,
                    })),
                }
            }
        }
    }
    for (id, bytes) in frames {
        let (status, answer) = send(bytes).await?;
        if status == 202 {
            cleared.push(id);
        } else {
            still.push(json!({
                "ids": [id],
                "refused": format!("{status} {}", String::from_utf8_lossy(&answer)),
            }));
        }
    }
    let deleted = store.delete(&cleared).await?;
    Ok(json!({
        "replayed": deleted,
        "still_dead": still,
        "unreadable": unreadable,
    }))
}

#[derive(clap::Subcommand)]
pub enum SpoolCommand {
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

#[derive(clap::Subcommand)]
pub enum DeadLettersCommand {
    /// Dead letters, oldest first, without payloads.
    List {
        #[command(flatten)]
        selection: Selection,
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
        selection: Selection,
        /// The aggregator (default: from `server.listen`).
        #[arg(long)]
        url: Option<String>,
    },
    /// Delete them for good.
    Purge {
        #[command(flatten)]
        selection: Selection,
        /// Only those older than this (RFC 3339).
        #[arg(long)]
        before: Option<String>,
        /// Yes, delete them.
        #[arg(long)]
        yes: bool,
    },
}

/// `outpost spool …` (prints JSON).
pub fn spool_main(config: Option<&std::path::Path>, command: SpoolCommand) -> anyhow::Result<()> {
    let config = outpost_aggregator::config::Config::load_unchecked(config)?;
    sqlite_only(&config)?;
    let out = super::runtime()?.block_on(async {
        match command {
            SpoolCommand::Status => status(&config).await,
            SpoolCommand::DropSink { name, yes } => drop_sink(&config, &name, yes).await,
        }
    })?;
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}

/// `outpost spool` reads the SQLite spool; a JetStream spool's stream is
/// inspected with NATS's own tools (its consumers are the sinks).
fn sqlite_only(config: &Config) -> anyhow::Result<()> {
    if config.spool.backend == spool::Backend::Jetstream {
        let j = &config.spool.jetstream;
        bail!(
            "spool.backend is \"jetstream\": `outpost spool` reads the SQLite spool only; \
             see the stream and each sink's consumer with `nats stream info {}` and \
             `nats consumer report {}` (`outpost dead-letters` works on both)",
            j.stream,
            j.stream
        );
    }
    Ok(())
}

/// `outpost dead-letters …` (prints JSON).
pub fn dead_letters_main(
    config: Option<&std::path::Path>,
    command: DeadLettersCommand,
) -> anyhow::Result<()> {
    let config = outpost_aggregator::config::Config::load_unchecked(config)?;
    let out = super::runtime()?.block_on(async {
        match command {
            DeadLettersCommand::List { selection, limit } => list(&config, &selection, limit).await,
            DeadLettersCommand::Show { id } => show(&config, id).await,
            DeadLettersCommand::Replay { selection, url } => {
                let url = url.unwrap_or_else(|| super::own_url(&config));
                replay(&config, &selection, &url).await
            }
            DeadLettersCommand::Purge {
                selection,
                before,
                yes,
            } => purge(&config, &selection, before.as_deref(), yes).await,
        }
    })?;
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}
