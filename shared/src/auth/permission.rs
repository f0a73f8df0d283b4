//! Permissions: `action:resource` strings with wildcards.
//!
//! A grant `a:r` allows the action `A` on the resource `R` when `r` is `*`
//! or `R`, and `a` is `A`, `admin` (admin on a resource implies every action
//! on it), or `*` — except that `*` never stands for `admin`: lifting a
//! limit (reading every client's events, managing clients) takes a grant
//! that says `admin` in so many words, or `*:*`, the one grant that allows
//! everything. So `admin:*` and `*:*` allow everything, `write:*` every
//! write, `*:events` reading and writing events (not `admin:events`),
//! `admin:clients` creating, reading, updating and deleting clients.

use core::fmt;

use serde::{Deserialize, Serialize};

/// One grant, `action:resource`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Permission {
    action: String,
    resource: String,
}

/// Why a permission string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid permission {0:?}: expected action:resource, each `*` or [a-z0-9_-]{{1,64}}")]
pub struct PermissionError(pub String);

fn valid_part(s: &str) -> bool {
    s == "*"
        || (!s.is_empty()
            && s.len() <= 64
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-'))
}

impl Permission {
    /// Parses `action:resource`.
    pub fn parse(s: &str) -> Result<Permission, PermissionError> {
        let (action, resource) = s
            .split_once(':')
            .ok_or_else(|| PermissionError(s.to_owned()))?;
        if !valid_part(action) || !valid_part(resource) {
            return Err(PermissionError(s.to_owned()));
        }
        Ok(Permission {
            action: action.to_owned(),
            resource: resource.to_owned(),
        })
    }

    /// Whether this grant allows `action` on `resource`.
    pub fn allows(&self, action: &str, resource: &str) -> bool {
        let resource_ok = self.resource == "*" || self.resource == resource;
        let action_ok = match self.action.as_str() {
            "admin" => true,
            // A wildcard action never means admin, unless the grant is `*:*`.
            "*" => action != "admin" || self.resource == "*",
            a => a == action,
        };
        action_ok && resource_ok
    }
}

impl fmt::Display for Permission {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.action, self.resource)
    }
}

/// A set of grants. Serialized as a list of strings.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Permissions(Vec<Permission>);

impl Permissions {
    /// Parses every string; the first bad one fails the whole set.
    pub fn parse<'a>(
        list: impl IntoIterator<Item = &'a str>,
    ) -> Result<Permissions, PermissionError> {
        list.into_iter()
            .map(Permission::parse)
            .collect::<Result<_, _>>()
            .map(Permissions)
    }

    /// Parses what parses and drops the rest (for claims in third-party tokens).
    pub fn parse_lenient<'a>(list: impl IntoIterator<Item = &'a str>) -> Permissions {
        Permissions(
            list.into_iter()
                .filter_map(|s| Permission::parse(s).ok())
                .collect(),
        )
    }

    /// Whether any grant allows `action` on `resource`.
    pub fn allows(&self, action: &str, resource: &str) -> bool {
        self.0.iter().any(|p| p.allows(action, resource))
    }

    /// The grants.
    pub fn iter(&self) -> impl Iterator<Item = &Permission> {
        self.0.iter()
    }

    /// True when nothing is granted.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl Serialize for Permissions {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.0.iter().map(ToString::to_string))
    }
}

impl<'de> Deserialize<'de> for Permissions {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let list = Vec::<String>::deserialize(d)?;
        Permissions::parse(list.iter().map(String::as_str)).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcard_table() {
        let cases: &[(&str, &str, &str, bool)] = &[
            ("write:events", "write", "events", true),
            ("write:events", "read", "events", false),
            ("write:events", "write", "stats", false),
            ("*:*", "delete", "clients", true),
            ("*:*", "admin", "events", true),
            ("write:*", "write", "anything", true),
            ("write:*", "read", "events", false),
            ("*:events", "read", "events", true),
            ("*:events", "write", "events", true),
            ("*:events", "read", "stats", false),
            ("*:events", "admin", "events", false),
            ("read:*", "read", "events", true),
            ("read:*", "admin", "events", false),
            ("write:*", "admin", "events", false),
            ("admin:events", "admin", "events", true),
            ("admin:events", "admin", "stats", false),
            ("admin:clients", "create", "clients", true),
            ("admin:clients", "read", "clients", true),
            ("admin:clients", "update", "clients", true),
            ("admin:clients", "delete", "clients", true),
            ("admin:clients", "admin", "clients", true),
            ("admin:clients", "read", "events", false),
            ("admin:*", "read", "events", true),
            ("read:events", "admin", "events", false),
        ];
        for (grant, action, resource, expected) in cases {
            let p = Permission::parse(grant).unwrap();
            assert_eq!(
                p.allows(action, resource),
                *expected,
                "{grant} allows {action}:{resource}"
            );
        }
    }

    #[test]
    fn malformed_permissions_are_refused() {
        for bad in [
            "",
            "write",
            ":events",
            "write:",
            "Write:events",
            "write:events:x",
            "wr ite:events",
            "a:b c",
        ] {
            assert!(Permission::parse(bad).is_err(), "{bad:?}");
        }
        assert!(Permissions::parse(["read:events", "nope"]).is_err());
        let lenient = Permissions::parse_lenient(["read:events", "nope"]);
        assert_eq!(lenient.iter().count(), 1);
    }

    #[test]
    fn permissions_serialize_as_strings() {
        let p = Permissions::parse(["read:events", "admin:*"]).unwrap();
        let json = serde_json::to_string(&p).unwrap();
        assert_eq!(json, r#"["read:events","admin:*"]"#);
        assert_eq!(serde_json::from_str::<Permissions>(&json).unwrap(), p);
        assert!(serde_json::from_str::<Permissions>(r#"["bad"]"#).is_err());
    }
}
