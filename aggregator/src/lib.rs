//! The Outpost aggregator: verified frames in, durable spool, dedup, sinks.
//!
//! Data flows one way: `http` (verify, decode, validate) → `spool` (ack
//! after fsync; `handoff` keeps the decoded batch in memory) → `delivery`
//! (one worker per sink: decode unless handed off, dedup, write) → `sinks`. `app` wires them from `config`; `telemetry` names every metric.

pub mod app;
pub mod bench;
pub mod clients;
pub mod clients_cmd;
pub mod config;
pub mod db;
pub mod dedup;
pub mod delivery;
#[cfg(feature = "edge-host")]
pub mod dev_cmd;
#[cfg(feature = "edge-host")]
pub mod edge_cmd;
pub mod geoip;
pub mod geoip_download;
pub mod handoff;
pub mod http;
pub mod http_client;
pub mod limits;
pub mod openapi;
pub mod query;
pub mod server;
pub mod sinks;
pub mod spool;
pub mod spool_cmd;
pub mod telemetry;
