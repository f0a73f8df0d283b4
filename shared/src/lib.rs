//! Every rule the Outpost edge and aggregator must agree on.
//!
//! This crate does no I/O and starts no runtime: it builds for the native
//! aggregator, `wasm32-unknown-unknown` (Cloudflare Workers) and
//! `wasm32-wasip2` (Spin, and the local wasmtime host). What it owns:
//!
//! * [`event`]: the envelope for analytics events and structured logs;
//! * [`validate`]: the limits and rules, with per-event errors;
//! * [`error`]: the one table of stable error codes and the JSON envelope;
//! * [`auth`]: HMAC request signatures, JWTs, API keys, permissions;
//! * [`ratelimit`]: GCRA over the [`kv::Kv`] seam;
//! * [`frame`]: the signed edge → aggregator batch codec;
//! * [`client`]: client records, the unit of authentication and limits;
//! * [`seal`]: client records sealed under keys derived from the edge key;
//! * [`id`]: `ClientId` and `EventId`, so the two cannot be mixed up.
//! * [`properties`]: an event's free-form properties, kept as JSON text.
//!
//! Time is always an argument (milliseconds or seconds since the epoch),
//! never read from a clock here: every rule is deterministic under test.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod auth;
pub mod client;
pub mod error;
pub mod event;
pub mod frame;
pub mod id;
pub mod kv;
pub mod properties;
pub mod ratelimit;
pub mod sample;
pub mod seal;
pub mod validate;

pub use error::{ErrorCode, ErrorEnvelope, FieldError};
pub use event::{EdgeFacts, Event, Timestamp};
pub use id::{ClientId, EventId};
