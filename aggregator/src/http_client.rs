//! The aggregator's one outbound HTTP client: hyper 1 (through hyper-util)
//! with rustls for `https://` (webpki roots, ring), so that InfluxDB Cloud
//! and GeoIP downloads work without a second HTTP stack or a system
//! OpenSSL. Plain `http://` goes through the same client.

use http_body_util::Full;
use hyper::body::Bytes;
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

/// A client for `http://` and `https://` URLs.
pub type HttpClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// Builds the client. Certificates are checked against the Mozilla roots
/// compiled in (`webpki-roots`): the same on every machine and container.
pub fn client() -> HttpClient {
    let connector = HttpsConnectorBuilder::new()
        .with_provider_and_webpki_roots(rustls::crypto::ring::default_provider())
        // Only fails for a provider without safe defaults; ring has them.
        .expect("ring supports the default protocol versions")
        .https_or_http()
        .enable_http1()
        .build();
    Client::builder(TokioExecutor::new()).build(connector)
}
