//! The Outpost edge as a Cloudflare Worker.
//!
//! A thin adapter: it turns the Worker's request into an
//! [`EdgeRequest`](outpost_edge::pipeline::EdgeRequest) (client address from
//! `CF-Connecting-IP`, PoP and country from `request.cf`), runs the shared
//! pipeline over Workers KV behind a per-isolate
//! [`CachedKv`](outpost_edge::kv_cache::CachedKv) (KV takes one write per
//! key per second and TTLs of at least 60 s), vars and secrets, and
//! `fetch` to the aggregator, and turns the answer back. Every rule lives
//! in `outpost-edge` / `outpost-shared`.
//!
//! Built with `worker-build` for `wasm32-unknown-unknown`; on other targets
//! the crate is empty.

#[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
mod worker_main;
