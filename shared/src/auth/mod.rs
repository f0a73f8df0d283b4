//! Authentication and authorization rules: request signatures, JWTs, API
//! keys and permissions. Pure functions of their inputs and a clock value;
//! the only state they touch (nonces) goes through [`crate::kv::Kv`].

pub mod api_key;
pub mod jwt;
pub mod permission;
pub mod signature;
