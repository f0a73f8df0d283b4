//! A small wasmtime host that serves Outpost's Spin edge component over HTTP.
//!
//! The edge ships as a Spin component (spin-sdk 7, WASIp3), but no Spin
//! runtime can be installed where Outpost runs locally, so this crate is
//! the runtime: it provides exactly what the component imports (WASI 0.2 and
//! 0.3, `wasi:http@0.3.0`, Spin's `key-value` and `variables`), runs every
//! request in a fresh instance with a deadline and a memory bound, and turns
//! every failure into Outpost's JSON error envelope. The `outpost` command
//! line builds a [`HostConfig`], calls [`EdgeHost::new`] and
//! [`EdgeHost::serve`].
//!
//! What it does not try to be: Spin. There is one component, one route
//! (`/...`), one key-value store (`default`), and no manifest; outbound HTTP
//! may go anywhere the guest asks (the guest only calls its aggregator).

mod config;
mod envelope;
mod host;
mod kv;
mod spin;
mod state;

pub use config::{HostConfig, KvConfig, Limits};
pub use host::{DEADLINE_GRACE_MS, EPOCH_TICK, EdgeHost, HostMetrics, ResponseBody};
pub use kv::MEMORY_MAX_KEYS;
pub use spin::StoreHandle;
