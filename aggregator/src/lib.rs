//! The Outpost aggregator: verified frames in, durable spool, dedup, sinks.
//!
//! Data flows one way: `http` (verify, decode, validate) → `spool` (ack
//! after fsync; `handoff` keeps the decoded batch in memory) → `delivery`
//! (one worker per sink: decode unless handed off, dedup, write) → `sinks`.
//! `read_api` answers queries from the stored events. `app` wires them
//! from `config`; `telemetry` names every metric. The command line and its
//! tools (`outpost dev`, `edge`, `bench`, `clients`, `spool`) are the
//! binary's, in `src/cmd/`, outside this library.

pub mod app;
pub mod clients;
pub mod config;
pub mod db;
pub mod dedup;
pub mod delivery;
pub mod geoip;
pub mod geoip_download;
pub mod handoff;
pub mod http;
pub mod http_client;
pub mod limits;
pub mod openapi;
pub mod read_api;
pub mod redacted;
pub mod server;
pub mod sinks;
pub mod spool;
pub mod telemetry;
