//! Authentication and authorization rules: request signatures, JWTs, API
//! keys and permissions, and the one check of a caller against its client
//! record ([`caller`]). Pure functions of their inputs and a clock value;
//! the only state they touch (nonces) goes through [`crate::kv::Kv`].

pub mod api_key;
pub mod caller;
pub mod jwt;
pub mod permission;
pub mod signature;
