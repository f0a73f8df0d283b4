//! GeoIP enrichment: City and ASN databases in MaxMind's mmdb format
//! (GeoLite2/GeoIP2, or DB-IP's compatible files), read with `maxminddb`.
//!
//! Lookups go through an LRU cache (one client IP per batch, and the same
//! IPs recur). Each database is reloaded when its file changes: replace it
//! by renaming a new file over it (atomic), and within
//! `geoip.reload_check_secs` the new one is read, checked and swapped in;
//! a file that does not open leaves the old database in place. A database
//! that is not configured or missing means no enrichment, never a failure.
//!
//! A database is not read into the heap (a City file is ~100 MB, most of
//! which no lookup touches): it is copied into a private, already unlinked
//! temporary file and that copy is mapped. Only the pages lookups touch
//! become resident, and since no other process can open the copy, a file
//! overwritten or truncated in place (not renamed over) cannot change the
//! mapped bytes under a lookup, which would crash the process. Where no
//! temporary file can be made, the database is read into memory as before.

use std::net::IpAddr;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use maxminddb::{Reader, geoip2};
use serde::{Deserialize, Serialize};

use crate::redacted::Redacted;
use crate::telemetry::{GeoLabel, Metrics};

/// `[geoip]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GeoIpConfig {
    /// City database (`GeoLite2-City.mmdb`, `dbip-city-lite.mmdb`); empty: none.
    pub city_db: String,
    /// ASN database (`GeoLite2-ASN.mmdb`); empty: none.
    pub asn_db: String,
    /// IP addresses whose answers are cached.
    pub cache_entries: usize,
    /// How often to look for a changed database file, in seconds.
    pub reload_check_secs: u64,
    /// Where `outpost geoip download` fetches the City database
    /// (`.mmdb`, `.mmdb.gz` or `.tar.gz`); empty: not downloaded.
    pub city_url: String,
    /// A SHA-256 file (`<hex> [name]`) for `city_url`; empty: not checked.
    pub city_sha256_url: String,
    /// Where `outpost geoip download` fetches the ASN database; empty: not downloaded.
    pub asn_url: String,
    /// A SHA-256 file for `asn_url`; empty: not checked.
    pub asn_sha256_url: String,
    /// HTTP basic-auth user for the downloads (MaxMind: the account id).
    pub download_username: String,
    /// HTTP basic-auth password (MaxMind: the licence key); set it from the
    /// environment.
    pub download_password: Redacted,
    /// Time limit per download, seconds.
    pub download_timeout_secs: u64,
    /// Largest download, and largest database once unpacked, bytes.
    pub max_download_bytes: usize,
}

impl Default for GeoIpConfig {
    fn default() -> Self {
        GeoIpConfig {
            city_db: String::new(),
            asn_db: String::new(),
            cache_entries: 100_000,
            reload_check_secs: 60,
            city_url: String::new(),
            city_sha256_url: String::new(),
            asn_url: String::new(),
            asn_sha256_url: String::new(),
            download_username: String::new(),
            download_password: Redacted::default(),
            download_timeout_secs: 300,
            max_download_bytes: 512 << 20,
        }
    }
}

/// What GeoIP knows about an address.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Geo {
    /// ISO 3166-1 alpha-2.
    pub country: Option<String>,
    /// ISO 3166-2 subdivision code (largest subdivision).
    pub region: Option<String>,
    /// City name (English).
    pub city: Option<String>,
    /// Latitude.
    pub latitude: Option<f64>,
    /// Longitude.
    pub longitude: Option<f64>,
    /// IANA time zone.
    pub time_zone: Option<String>,
    /// Autonomous system number.
    pub asn: Option<u32>,
    /// Autonomous system organisation.
    pub as_org: Option<String>,
}

impl Geo {
    fn is_empty(&self) -> bool {
        self == &Geo::default()
    }
}

/// A database's bytes: mapped from a private copy, or read into memory.
enum Bytes {
    Mapped(memmap2::Mmap),
    Read(Vec<u8>),
}

impl AsRef<[u8]> for Bytes {
    fn as_ref(&self) -> &[u8] {
        match self {
            Bytes::Mapped(m) => m,
            Bytes::Read(v) => v,
        }
    }
}

/// Opens the database at `path` (see the module documentation).
fn open_db(path: &Path) -> Result<Reader<Bytes>, maxminddb::MaxMindDbError> {
    match map_private_copy(path) {
        Ok(map) => Reader::from_source(Bytes::Mapped(map)),
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "GeoIP database not mapped (no private copy in TMPDIR); reading it into memory");
            let bytes = std::fs::read(path).map_err(maxminddb::MaxMindDbError::Io)?;
            Reader::from_source(Bytes::Read(bytes))
        }
    }
}

/// Copies `path` into an unlinked temporary file and maps the copy.
fn map_private_copy(path: &Path) -> std::io::Result<memmap2::Mmap> {
    let mut copy = tempfile::tempfile()?;
    std::io::copy(&mut std::fs::File::open(path)?, &mut copy)?;
    // SAFETY: the mapping's file has no name (unlinked at creation) and
    // this process never writes to it again, so its bytes do not change
    // while mapped; only it holds the descriptor, which the map outlives.
    unsafe { memmap2::Mmap::map(&copy) }
}

struct Db {
    reader: Arc<Reader<Bytes>>,
    stamp: Option<(SystemTime, u64)>,
}

struct Slot {
    path: Option<PathBuf>,
    db: RwLock<Option<Db>>,
}

fn file_stamp(path: &Path) -> Option<(SystemTime, u64)> {
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len()))
}

impl Slot {
    fn new(path: &str, what: &str) -> Slot {
        let path = (!path.is_empty()).then(|| PathBuf::from(path));
        let slot = Slot {
            path,
            db: RwLock::new(None),
        };
        if let Some(p) = &slot.path
            && !slot.reload()
            && slot.reader().is_none()
        {
            tracing::warn!(db = what, path = %p.display(), "GeoIP database not readable: enrichment skipped until it is");
        }
        slot
    }

    fn reader(&self) -> Option<Arc<Reader<Bytes>>> {
        self.db
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .as_ref()
            .map(|d| d.reader.clone())
    }

    /// Re-reads the file when it changed; true when a new database was swapped in.
    fn reload(&self) -> bool {
        let Some(path) = &self.path else { return false };
        let stamp = file_stamp(path);
        let current = self
            .db
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .as_ref()
            .map(|d| d.stamp);
        if stamp.is_none() || current == Some(stamp) {
            return false;
        }
        match open_db(path) {
            Ok(reader) => {
                tracing::info!(path = %path.display(), database_type = %reader.metadata().database_type, build_epoch = reader.metadata().build_epoch, "GeoIP database loaded");
                *self
                    .db
                    .write()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(Db {
                    reader: Arc::new(reader),
                    stamp,
                });
                true
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "GeoIP database does not open; keeping the one in use");
                false
            }
        }
    }
}

/// The enricher.
pub struct GeoIp {
    city: Slot,
    asn: Slot,
    cache: Mutex<lru::LruCache<IpAddr, Option<Arc<Geo>>>>,
    metrics: Metrics,
}

impl GeoIp {
    /// Opens whatever databases are configured and present.
    pub fn open(config: &GeoIpConfig, metrics: Metrics) -> GeoIp {
        let capacity = NonZeroUsize::new(config.cache_entries.max(1)).unwrap_or(NonZeroUsize::MIN);
        GeoIp {
            city: Slot::new(&config.city_db, "city"),
            asn: Slot::new(&config.asn_db, "asn"),
            cache: Mutex::new(lru::LruCache::new(capacity)),
            metrics,
        }
    }

    /// Looks an address up (the edge's `client_ip`); `None` when nothing is known.
    pub fn lookup(&self, ip: &str) -> Option<Arc<Geo>> {
        let label = |result| GeoLabel { result };
        let Ok(ip) = ip.parse::<IpAddr>() else {
            self.metrics
                .geoip_lookups
                .get_or_create(&label("invalid_ip"))
                .inc();
            return None;
        };
        let (city, asn) = (self.city.reader(), self.asn.reader());
        if city.is_none() && asn.is_none() {
            self.metrics
                .geoip_lookups
                .get_or_create(&label("no_database"))
                .inc();
            return None;
        }
        if let Some(hit) = self
            .cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&ip)
        {
            self.metrics.geoip_cache_hits.inc();
            return hit.clone();
        }
        let mut geo = Geo::default();
        if let Some(r) = &city
            && let Ok(Some(c)) = r.lookup(ip).and_then(|l| l.decode::<geoip2::City<'_>>())
        {
            geo.country = c.country.iso_code.map(str::to_owned);
            geo.region = c
                .subdivisions
                .first()
                .and_then(|s| s.iso_code)
                .map(str::to_owned);
            geo.city = c.city.names.english.map(str::to_owned);
            geo.latitude = c.location.latitude;
            geo.longitude = c.location.longitude;
            geo.time_zone = c.location.time_zone.map(str::to_owned);
        }
        if let Some(r) = &asn
            && let Ok(Some(a)) = r.lookup(ip).and_then(|l| l.decode::<geoip2::Asn<'_>>())
        {
            geo.asn = a.autonomous_system_number;
            geo.as_org = a.autonomous_system_organization.map(str::to_owned);
        }
        let found = (!geo.is_empty()).then(|| Arc::new(geo));
        self.metrics
            .geoip_lookups
            .get_or_create(&label(if found.is_some() {
                "found"
            } else {
                "not_found"
            }))
            .inc();
        self.cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .put(ip, found.clone());
        found
    }

    /// Swaps in changed database files; clears the cache when one changed.
    pub fn reload_if_changed(&self) -> bool {
        let changed = self.city.reload() | self.asn.reload();
        if changed {
            self.cache
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clear();
        }
        changed
    }

    /// Checks for changed files every `every`, for as long as the process runs.
    pub fn spawn_reloader(self: &Arc<Self>, every: Duration) {
        let me = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every.max(Duration::from_secs(1)));
            tick.tick().await;
            loop {
                tick.tick().await;
                let Some(geo) = me.upgrade() else { return };
                // Reading a database file is blocking work.
                let _ = tokio::task::spawn_blocking(move || geo.reload_if_changed()).await;
            }
        });
    }

    /// What is loaded, for `outpost geoip status` and readiness.
    pub fn status(&self) -> serde_json::Value {
        let describe = |slot: &Slot| match (&slot.path, slot.reader()) {
            (None, _) => serde_json::json!({"configured": false}),
            (Some(p), None) => serde_json::json!({"configured": true, "path": p, "loaded": false}),
            (Some(p), Some(r)) => serde_json::json!({
                "configured": true, "path": p, "loaded": true,
                "database_type": r.metadata().database_type, "build_epoch": r.metadata().build_epoch,
            }),
        };
        serde_json::json!({"city": describe(&self.city), "asn": describe(&self.asn)})
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mapped_copy_does_not_change_when_the_file_is_rewritten_or_truncated() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let original: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &original).unwrap();
        let map = map_private_copy(&path).unwrap();
        // In place: same inode, other bytes, then nothing at all.
        std::fs::write(&path, vec![0xffu8; 100_000]).unwrap();
        assert_eq!(&map[..], &original[..]);
        std::fs::File::create(&path).unwrap();
        assert_eq!(&map[..], &original[..]);
    }
}
