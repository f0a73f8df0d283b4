//! The client's address, and the block list.
//!
//! On Cloudflare the platform's `CF-Connecting-IP` is authoritative. Behind
//! any other front, `X-Forwarded-For` is honoured only hop by hop from the
//! right: each address is believed only if the hop that appended it is a
//! configured trusted proxy. A spoofed header from an untrusted peer is
//! ignored, so the peer's own address is the client's.

use std::net::IpAddr;

use ipnet::IpNet;

/// A list of networks (trusted proxies, or blocked ranges). Entries are
/// CIDR (`10.0.0.0/8`, `2001:db8::/32`) or single addresses.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NetList(Vec<IpNet>);

/// A list entry that is neither an address nor a network.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not an IP address or CIDR network")]
pub struct BadNet(pub String);

impl NetList {
    /// Parses entries; the first bad one fails the list (configuration errors
    /// must not silently open or close access).
    pub fn parse<'a>(entries: impl IntoIterator<Item = &'a str>) -> Result<NetList, BadNet> {
        entries
            .into_iter()
            .map(|e| {
                let e = e.trim();
                e.parse::<IpNet>()
                    .or_else(|_| e.parse::<IpAddr>().map(IpNet::from))
                    .map_err(|_| BadNet(e.to_owned()))
            })
            .collect::<Result<_, _>>()
            .map(NetList)
    }

    /// Whether `ip` is in any entry (IPv4-mapped IPv6 addresses count as IPv4).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        self.0.iter().any(|n| n.contains(&ip))
    }

    /// True when the list has no entry.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// The most `X-Forwarded-For` entries looked at (a header can be made long).
const MAX_FORWARDED_HOPS: usize = 32;

/// The client's address.
///
/// * `platform_ip`: an address the platform itself vouches for
///   (`CF-Connecting-IP` on Cloudflare); used as is when present.
/// * `peer`: the address of the TCP peer that sent the request.
/// * `forwarded_for`: the `X-Forwarded-For` header, if any.
pub fn client_ip(
    platform_ip: Option<IpAddr>,
    peer: IpAddr,
    forwarded_for: Option<&str>,
    trusted: &NetList,
) -> IpAddr {
    if let Some(ip) = platform_ip {
        return canonical(ip);
    }
    let mut client = canonical(peer);
    let Some(header) = forwarded_for else {
        return client;
    };
    // Walk from the nearest hop outwards while the hop that appended the
    // entry is trusted.
    for entry in header.rsplit(',').take(MAX_FORWARDED_HOPS) {
        if !trusted.contains(client) {
            break;
        }
        match entry.trim().parse::<IpAddr>() {
            Ok(ip) => client = canonical(ip),
            // Garbage from a trusted proxy's client: stop at the proxy.
            Err(_) => break,
        }
    }
    client
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn client_ip_table() {
        let trusted = NetList::parse(["10.0.0.0/8", "192.0.2.1"]).unwrap();
        let cases: &[(&str, Option<&str>, Option<&str>, &str)] = &[
            ("no proxy, no header", None, None, "203.0.113.9"),
            (
                "untrusted peer's header is ignored",
                None,
                Some("1.2.3.4"),
                "203.0.113.9",
            ),
            (
                "platform address wins",
                Some("198.51.100.7"),
                Some("1.2.3.4"),
                "198.51.100.7",
            ),
        ];
        for (what, platform, xff, expected) in cases {
            assert_eq!(
                client_ip(platform.map(ip), ip("203.0.113.9"), *xff, &trusted),
                ip(expected),
                "{what}"
            );
        }
        let behind: &[(&str, &str, &str)] = &[
            ("one trusted hop", "198.51.100.7", "198.51.100.7"),
            ("two trusted hops", "198.51.100.7, 10.1.1.1", "198.51.100.7"),
            (
                "client-supplied prefix is not believed",
                "6.6.6.6, 198.51.100.7",
                "198.51.100.7",
            ),
            (
                "spoof through an untrusted hop stops there",
                "6.6.6.6, 198.51.100.7, 10.2.2.2",
                "198.51.100.7",
            ),
            ("garbage entry stops at the proxy", "not-an-ip", "10.0.0.5"),
            (
                "all trusted: the leftmost",
                "10.9.9.9, 10.1.1.1",
                "10.9.9.9",
            ),
            ("ipv6 client", "2001:db8::1", "2001:db8::1"),
        ];
        for (what, xff, expected) in behind {
            assert_eq!(
                client_ip(None, ip("10.0.0.5"), Some(xff), &trusted),
                ip(expected),
                "{what}"
            );
        }
    }

    #[test]
    fn block_lists_match_addresses_and_ranges() {
        let blocked = NetList::parse(["203.0.113.0/24", "2001:db8::/32", "198.51.100.7"]).unwrap();
        assert!(blocked.contains(ip("203.0.113.200")));
        assert!(
            blocked.contains(ip("::ffff:203.0.113.5")),
            "IPv4-mapped IPv6"
        );
        assert!(blocked.contains(ip("2001:db8:1::1")));
        assert!(blocked.contains(ip("198.51.100.7")));
        assert!(!blocked.contains(ip("198.51.100.8")));
        assert!(!NetList::default().contains(ip("1.1.1.1")));
        assert_eq!(
            NetList::parse(["10.0.0.0/33"]).unwrap_err(),
            BadNet("10.0.0.0/33".into())
        );
        assert!(NetList::parse(["example.com"]).is_err());
    }

    #[test]
    fn a_very_long_forwarded_header_is_bounded() {
        let trusted = NetList::parse(["0.0.0.0/0"]).unwrap();
        let header = vec!["10.0.0.1"; 10_000].join(",");
        assert_eq!(
            client_ip(
                None,
                ip("10.0.0.5"),
                Some(&format!("1.1.1.1,{header}")),
                &trusted
            ),
            ip("10.0.0.1")
        );
    }
}
