//! The Outpost edge as a Spin component.
//!
//! A thin adapter: it turns Spin's request into an
//! [`EdgeRequest`](outpost_edge::pipeline::EdgeRequest), runs the shared
//! pipeline over Spin's key-value store (expiry kept inside each value,
//! since Spin's store has none), Spin variables and outbound HTTP, and
//! turns the answer back. Every rule lives in `outpost-edge` / `outpost-shared`.
//!
//! Built for `wasm32-wasip2`; on other targets the crate is empty.

#[cfg(target_os = "wasi")]
mod component;
