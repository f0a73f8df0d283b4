//! Small, deterministic GeoIP databases for tests, written with
//! `mmdb-writer` in the shapes of GeoIP2 City and ASN.

use std::path::Path;

use serde::Serialize;
use serde_json::json;

/// One city entry.
pub struct CityEntry<'a> {
    /// Network, e.g. `203.0.113.0/24`.
    pub net: &'a str,
    /// ISO country code.
    pub country: &'a str,
    /// ISO subdivision code.
    pub region: &'a str,
    /// City name (English).
    pub city: &'a str,
    /// Latitude, longitude.
    pub location: (f64, f64),
    /// IANA time zone.
    pub time_zone: &'a str,
}

/// Writes a City database to `path` atomically (write, then rename over).
pub fn write_city_db(path: &Path, entries: &[CityEntry<'_>]) {
    let mut w = mmdb_writer::Writer::new("GeoIP2-City");
    for e in entries {
        let record = json!({
            "city": {"names": {"en": e.city}},
            "country": {"iso_code": e.country, "names": {"en": e.country}},
            "location": {"latitude": e.location.0, "longitude": e.location.1, "time_zone": e.time_zone},
            "subdivisions": [{"iso_code": e.region, "names": {"en": e.region}}],
        });
        w.insert(e.net.parse::<ipnet::IpNet>().expect("network"), &record)
            .expect("insert");
    }
    write_atomically(path, &w.to_bytes().expect("mmdb bytes"));
}

#[derive(Serialize)]
struct AsnRecord<'a> {
    autonomous_system_number: u32,
    autonomous_system_organization: &'a str,
}

/// Writes an ASN database to `path` atomically.
pub fn write_asn_db(path: &Path, entries: &[(&str, u32, &str)]) {
    let mut w = mmdb_writer::Writer::new("GeoLite2-ASN");
    for (net, asn, org) in entries {
        let record = AsnRecord {
            autonomous_system_number: *asn,
            autonomous_system_organization: org,
        };
        w.insert(net.parse::<ipnet::IpNet>().expect("network"), &record)
            .expect("insert");
    }
    write_atomically(path, &w.to_bytes().expect("mmdb bytes"));
}

/// Replaces `path` the way operators should: a new file renamed over it.
pub fn write_atomically(path: &Path, bytes: &[u8]) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).expect("write");
    std::fs::rename(&tmp, path).expect("rename");
}
