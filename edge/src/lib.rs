//! The platform-neutral Outpost edge: everything an edge adapter needs that
//! is not itself a platform API. The adapters (Cloudflare Workers, Spin, the
//! local wasmtime host) are thin layers on top; see ARCHITECTURE.md.
//!
//! * [`net`]: which address is the client's (trusted proxies), and the
//!   IP/CIDR block list;
//! * [`body`]: request bodies — content types, `Content-Encoding: gzip`
//!   decoded with a bound on the decompressed size;
//! * [`kv_cache`]: a per-instance cache that keeps KV writes within a
//!   platform's limits (Cloudflare: one write per key per second, 60 s TTL);
//! * [`kv_slots`]: a bounded key space over a store without expiry (Spin);
//! * [`pipeline`]: the request flow over the `Kv`, `Upstream` and `EdgeEnv`
//!   seams — what every adapter runs;
//! * [`config`]: the settings every adapter reads from its platform's
//!   variables, with one set of names and defaults;
//! * [`upstream`]: the requests to the aggregator, what its answers mean,
//!   and the `Upstream` every adapter uses over its own HTTP `Transport`;
//! * `fixtures`: the test clients the unit tests and the conformance suite
//!   share (test data, unused by the edge itself).

pub mod body;
pub mod config;
#[doc(hidden)]
pub mod fixtures;
pub mod kv_cache;
pub mod kv_slots;
pub mod net;
pub mod pipeline;
pub mod upstream;

pub use outpost_shared as shared;
