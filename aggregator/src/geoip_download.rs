//! `outpost geoip download`: fetches the City and ASN databases from
//! configured URLs, checks them, and swaps them in atomically.
//!
//! A download may be a plain `.mmdb`, a gzipped one (`.mmdb.gz`, as DB-IP
//! serves them) or a `.tar.gz` holding one (as MaxMind serves them). It is
//! read with a size bound, checked against a SHA-256 when one is configured
//! (MaxMind publishes `…sha256` files: `<hex>  <name>`), opened as an mmdb
//! to prove it is one, written next to the target and renamed over it. A
//! running aggregator picks the new file up within
//! `geoip.reload_check_secs`; a failed download leaves the old file as it
//! was.

use std::io::Read as _;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail, ensure};
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::body::Bytes;
use sha2::{Digest as _, Sha256};

use crate::geoip::GeoIpConfig;
use crate::http_client::HttpClient;

/// What one database download did.
#[derive(Debug, serde::Serialize)]
pub struct Downloaded {
    /// `city` or `asn`.
    pub database: &'static str,
    /// Where it was written.
    pub path: PathBuf,
    /// Bytes of the `.mmdb`.
    pub bytes: usize,
    /// SHA-256 of the download, lower-case hex.
    pub sha256: String,
    /// Whether it matched a published checksum (`false`: none configured).
    pub verified: bool,
    /// The database's own type and build time.
    pub database_type: String,
    /// Unix seconds.
    pub build_epoch: u64,
}

/// Downloads every database that has a URL; fails on the first that does
/// not check out (earlier ones stay swapped in: each is whole on its own).
pub async fn download_all(
    cfg: &GeoIpConfig,
    client: &HttpClient,
) -> anyhow::Result<Vec<Downloaded>> {
    let mut done = Vec::new();
    for (database, url, sha_url, path) in [
        ("city", &cfg.city_url, &cfg.city_sha256_url, &cfg.city_db),
        ("asn", &cfg.asn_url, &cfg.asn_sha256_url, &cfg.asn_db),
    ] {
        if url.is_empty() {
            continue;
        }
        ensure!(
            !path.is_empty(),
            "geoip.{database}_url is set but geoip.{database}_db (where to put it) is not"
        );
        done.push(
            download_one(cfg, client, database, url, sha_url, Path::new(path))
                .await
                .with_context(|| format!("{database} database from {url}"))?,
        );
    }
    ensure!(
        !done.is_empty(),
        "nothing to download: set geoip.city_url and/or geoip.asn_url"
    );
    Ok(done)
}

async fn download_one(
    cfg: &GeoIpConfig,
    client: &HttpClient,
    database: &'static str,
    url: &str,
    sha_url: &str,
    target: &Path,
) -> anyhow::Result<Downloaded> {
    let body = fetch(cfg, client, url, cfg.max_download_bytes).await?;
    let sha256 = hex::encode(Sha256::digest(&body));
    let verified = if sha_url.is_empty() {
        false
    } else {
        let published = fetch(cfg, client, sha_url, 4096).await?;
        let published = std::str::from_utf8(&published)
            .ok()
            .and_then(|s| s.split_whitespace().next())
            .map(str::to_ascii_lowercase)
            .context("the checksum file is not `<hex> [name]`")?;
        ensure!(
            published == sha256,
            "SHA-256 mismatch: published {published}, downloaded {sha256}"
        );
        true
    };
    let mmdb = extract_mmdb(&body, cfg.max_download_bytes)?;
    let reader = maxminddb::Reader::from_source(mmdb.as_slice())
        .map_err(|e| anyhow::anyhow!("not a MaxMind database: {e}"))?;
    let (database_type, build_epoch) = (
        reader.metadata().database_type.clone(),
        reader.metadata().build_epoch,
    );
    let expected = if database == "city" { "City" } else { "ASN" };
    ensure!(
        database_type.contains(expected),
        "geoip.{database}_url holds a {database_type} database, not a {expected} one"
    );
    write_atomically(target, &mmdb)?;
    Ok(Downloaded {
        database,
        path: target.to_owned(),
        bytes: mmdb.len(),
        sha256,
        verified,
        database_type,
        build_epoch,
    })
}

async fn fetch(
    cfg: &GeoIpConfig,
    client: &HttpClient,
    url: &str,
    max: usize,
) -> anyhow::Result<Bytes> {
    let mut req = hyper::Request::get(url).header("user-agent", "outpost-geoip");
    if !cfg.download_username.is_empty() || !cfg.download_password.0.is_empty() {
        use base64::Engine as _;
        let token = base64::engine::general_purpose::STANDARD.encode(format!(
            "{}:{}",
            cfg.download_username, cfg.download_password.0
        ));
        req = req.header("authorization", format!("Basic {token}"));
    }
    let req = req.body(Full::new(Bytes::new())).context("bad URL")?;
    let timeout = std::time::Duration::from_secs(cfg.download_timeout_secs);
    let resp = tokio::time::timeout(timeout, client.request(req))
        .await
        .context("timed out")??;
    let status = resp.status();
    // MaxMind answers with a redirect to a signed storage URL.
    if status.is_redirection()
        && let Some(location) = resp.headers().get("location").and_then(|l| l.to_str().ok())
    {
        let location = location.to_owned();
        return Box::pin(fetch_plain(client, &location, max, timeout)).await;
    }
    ensure!(status.is_success(), "HTTP {status}");
    read_bounded(resp.into_body(), max, timeout).await
}

/// Follows a redirect without credentials (they are for the first host only).
async fn fetch_plain(
    client: &HttpClient,
    url: &str,
    max: usize,
    timeout: std::time::Duration,
) -> anyhow::Result<Bytes> {
    let req = hyper::Request::get(url)
        .header("user-agent", "outpost-geoip")
        .body(Full::new(Bytes::new()))
        .context("bad redirect URL")?;
    let resp = tokio::time::timeout(timeout, client.request(req))
        .await
        .context("timed out")??;
    ensure!(
        resp.status().is_success(),
        "HTTP {} after a redirect",
        resp.status()
    );
    read_bounded(resp.into_body(), max, timeout).await
}

async fn read_bounded(
    body: hyper::body::Incoming,
    max: usize,
    timeout: std::time::Duration,
) -> anyhow::Result<Bytes> {
    let collected = tokio::time::timeout(timeout, Limited::new(body, max).collect())
        .await
        .context("timed out reading the body")?
        .map_err(|e| anyhow::anyhow!("reading the body (limit {max} bytes): {e}"))?;
    Ok(collected.to_bytes())
}

/// The `.mmdb` inside a download: as is, gunzipped, or the first `.mmdb`
/// entry of a `.tar.gz`. Decompression stops at `max` bytes.
pub fn extract_mmdb(body: &[u8], max: usize) -> anyhow::Result<Vec<u8>> {
    if !body.starts_with(&[0x1f, 0x8b]) {
        return Ok(body.to_vec());
    }
    let mut inflated = Vec::new();
    flate2::read::GzDecoder::new(body)
        .take(max as u64 + 1)
        .read_to_end(&mut inflated)
        .context("not valid gzip")?;
    ensure!(inflated.len() <= max, "more than {max} bytes once unpacked");
    // A tar archive says so at offset 257.
    if inflated.get(257..262) != Some(b"ustar") {
        return Ok(inflated);
    }
    let mut archive = tar::Archive::new(inflated.as_slice());
    for entry in archive.entries().context("not a tar archive")? {
        let mut entry = entry.context("a broken tar entry")?;
        let is_mmdb = entry
            .path()
            .ok()
            .is_some_and(|p| p.extension().is_some_and(|x| x == "mmdb"));
        if is_mmdb {
            let mut out = Vec::new();
            entry
                .read_to_end(&mut out)
                .context("reading the .mmdb entry")?;
            return Ok(out);
        }
    }
    bail!("the archive holds no .mmdb file")
}

/// Writes `bytes` beside `target` and renames it over: readers see the old
/// file or the new one, never half of one.
fn write_atomically(target: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write as _;
    let dir = target
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut tmp = tempfile::NamedTempFile::new_in(dir)
        .with_context(|| format!("a temporary file in {}", dir.display()))?;
    tmp.write_all(bytes)?;
    tmp.as_file().sync_all()?;
    tmp.persist(target)
        .with_context(|| format!("renaming over {}", target.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gzip_bombs_are_stopped_at_the_bound() {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        std::io::Write::write_all(&mut e, &vec![0u8; 4 << 20]).unwrap();
        let bomb = e.finish().unwrap();
        let err = extract_mmdb(&bomb, 1 << 20).unwrap_err();
        assert!(err.to_string().contains("more than"), "{err}");
    }

    #[test]
    fn plain_files_pass_through_and_broken_gzip_is_an_error() {
        assert_eq!(extract_mmdb(b"abc", 10).unwrap(), b"abc");
        assert!(extract_mmdb(&[0x1f, 0x8b, 0, 1, 2], 10).is_err());
    }
}
