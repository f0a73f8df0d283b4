//! [`Redacted`]: configuration strings that hold secrets.

use serde::{Deserialize, Serialize};

/// A string that is a secret (or holds one, like a URL with a password):
/// `***` in `Debug`, itself in TOML and JSON.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Redacted(pub String);

impl std::fmt::Debug for Redacted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_empty() { "\"\"" } else { "***" })
    }
}

impl From<&str> for Redacted {
    fn from(s: &str) -> Redacted {
        Redacted(s.to_owned())
    }
}
