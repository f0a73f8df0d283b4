//! The platform-neutral edge pipeline (request in → response and at most one
//! frame out) and, beside it, one thin adapter per platform.
//!
//! Not built yet: this crate holds the place in the workspace so that the
//! layout is fixed and every rule it will run already lives in
//! `outpost-shared`. See ARCHITECTURE.md for what goes here.

pub use outpost_shared as shared;
