//! The platform-neutral Outpost edge: everything an edge adapter needs that
//! is not itself a platform API. The adapters (Cloudflare Workers, Spin) and
//! the request pipeline that ties these pieces together are built on top;
//! see ARCHITECTURE.md.
//!
//! * [`net`]: which address is the client's (trusted proxies), and the
//!   IP/CIDR block list;
//! * [`body`]: request bodies — content types, `Content-Encoding: gzip`
//!   decoded with a bound on the decompressed size.

pub mod body;
pub mod net;

pub use outpost_shared as shared;
