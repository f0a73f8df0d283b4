//! The aggregator's HTTP listener: hyper 1 under the axum router, with the
//! bounds a server facing the internet needs (edges on Cloudflare reach it
//! from anywhere).
//!
//! * **Header timeout** (`server.header_timeout_ms`): a connection must send
//!   a request's headers within it, also between requests on a kept-alive
//!   connection, or it is closed. Slow or silent clients cannot hold
//!   descriptors.
//! * **Connection cap** (`server.max_connections`): at the cap, the oldest
//!   connection with no request in flight (a slow client, an idle
//!   keep-alive) is closed to make room; only when every connection is
//!   busy is the new one turned away. So a flood of held-open connections
//!   cannot lock out a real client.
//! * **TLS** (optional, `[server.tls]`): rustls with the ring provider the
//!   aggregator already uses; the certificate and key files are read again
//!   when they change (checked every `reload_check_secs`), without a
//!   restart; a file that does not load leaves the previous certificate in
//!   use.
//! * **Graceful shutdown**: stop accepting, let requests in flight finish
//!   (each bounded by the request timeout), close idle connections, and
//!   give up on the rest after the drain period.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use axum::Router;
use axum::extract::ConnectInfo;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tower_service::Service as _;

use crate::config::{ServerConfig, TlsConfig};
use crate::telemetry::Metrics;

/// What the listener needs besides the router.
pub struct Listener {
    /// Bound socket.
    pub tcp: TcpListener,
    /// TLS, when configured.
    pub tls: Option<Tls>,
    /// Time to send a request's headers.
    pub header_timeout: Duration,
    /// Most open connections.
    pub max_connections: usize,
    /// How long shutdown waits for requests in flight.
    pub drain: Duration,
}

impl Listener {
    /// Binds `server.listen` and loads TLS when configured.
    pub async fn bind(cfg: &ServerConfig) -> anyhow::Result<Listener> {
        use anyhow::Context as _;
        let tcp = TcpListener::bind(cfg.listen)
            .await
            .with_context(|| format!("binding {}", cfg.listen))?;
        let tls = match cfg.tls.enabled() {
            true => Some(Tls::load(&cfg.tls).context("server.tls")?),
            false => None,
        };
        Ok(Listener {
            tcp,
            tls,
            header_timeout: Duration::from_millis(cfg.header_timeout_ms),
            max_connections: cfg.max_connections.max(1),
            drain: Duration::from_millis(cfg.request_timeout_ms) + Duration::from_secs(2),
        })
    }
}

/// Longest the listener waits for a connection it evicted to close.
const EVICTION_WAIT: Duration = Duration::from_secs(1);

/// One open connection, as the cap sees it.
struct Conn {
    opened: Instant,
    in_flight: Arc<AtomicUsize>,
    /// Closes it; the sender passed along is answered once it is closed.
    close: Option<oneshot::Sender<oneshot::Sender<()>>>,
}

/// What the cap says about one more connection.
enum Room {
    Free,
    /// Another was closed to make room: wait for `closed` before serving,
    /// so that the open sockets never pass the cap, however fast they
    /// arrive.
    Evicted(oneshot::Receiver<()>),
    Full,
}

/// The open connections.
#[derive(Default)]
struct Conns {
    by_id: Mutex<HashMap<u64, Conn>>,
    next: AtomicU64,
}

impl Conns {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Conn>> {
        self.by_id
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Makes room for one more under `max`: closes the oldest connection
    /// with no request in flight. `Full` when every one is busy.
    fn make_room(&self, max: usize) -> Room {
        let mut conns = self.lock();
        if conns.len() < max {
            return Room::Free;
        }
        let idle = conns
            .iter()
            .filter(|(_, c)| c.in_flight.load(Ordering::SeqCst) == 0)
            .min_by_key(|(_, c)| c.opened)
            .map(|(id, _)| *id);
        match idle.and_then(|id| conns.remove(&id)) {
            Some(mut c) => {
                let (closed_tx, closed_rx) = oneshot::channel();
                if let Some(close) = c.close.take() {
                    let _ = close.send(closed_tx);
                }
                Room::Evicted(closed_rx)
            }
            None => Room::Full,
        }
    }
}

/// Serves `app` until `shutdown` resolves, then drains.
pub async fn serve(
    listener: Listener,
    app: Router,
    metrics: Metrics,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let conns = Arc::new(Conns::default());
    let graceful = GracefulShutdown::new();
    let mut shutdown = pin!(shutdown);
    let acceptor = listener
        .tls
        .as_ref()
        .map(|t| tokio_rustls::TlsAcceptor::from(t.config.clone()));
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.tcp.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Usually out of descriptors: back off rather than spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        match conns.make_room(listener.max_connections) {
            Room::Free => {}
            // Its task drops the socket at once (nothing is in flight); the
            // bound only keeps a stuck task from stalling the listener.
            Room::Evicted(closed) => {
                let _ = tokio::time::timeout(EVICTION_WAIT, closed).await;
            }
            Room::Full => {
                metrics
                    .http_connections_closed
                    .get_or_create(&crate::telemetry::ReasonLabel { reason: "refused" })
                    .inc();
                drop(stream);
                continue;
            }
        }
        let _ = stream.set_nodelay(true);
        let id = conns.next.fetch_add(1, Ordering::Relaxed);
        let in_flight = Arc::new(AtomicUsize::new(0));
        let (close_tx, close_rx) = oneshot::channel();
        conns.lock().insert(
            id,
            Conn {
                opened: Instant::now(),
                in_flight: in_flight.clone(),
                close: Some(close_tx),
            },
        );
        metrics.http_connections.inc();
        let service = hyper::service::service_fn({
            let app = app.clone();
            let in_flight = in_flight.clone();
            move |mut req: hyper::Request<hyper::body::Incoming>| {
                let mut app = app.clone();
                let in_flight = in_flight.clone();
                req.extensions_mut().insert(ConnectInfo(peer));
                async move {
                    in_flight.fetch_add(1, Ordering::SeqCst);
                    let resp = app.call(req).await;
                    in_flight.fetch_sub(1, Ordering::SeqCst);
                    Ok::<_, Infallible>(resp.unwrap_or_else(|e| match e {}))
                }
            }
        });
        let mut builder = http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(listener.header_timeout);
        let watcher = graceful.watcher();
        let acceptor = acceptor.clone();
        let (conns, metrics, header_timeout) =
            (conns.clone(), metrics.clone(), listener.header_timeout);
        tokio::spawn(async move {
            let served = async {
                match acceptor {
                    Some(acceptor) => {
                        // The handshake is bounded like the headers are.
                        match tokio::time::timeout(header_timeout, acceptor.accept(stream)).await {
                            Ok(Ok(tls)) => {
                                let conn = builder.serve_connection(TokioIo::new(tls), service);
                                watcher.watch(conn).await
                            }
                            Ok(Err(e)) => {
                                tracing::debug!(%peer, error = %e, "TLS handshake failed");
                                Ok(())
                            }
                            Err(_) => Ok(()),
                        }
                    }
                    None => {
                        let conn = builder.serve_connection(TokioIo::new(stream), service);
                        watcher.watch(conn).await
                    }
                }
            };
            let mut evicted = None;
            let reason = tokio::select! {
                r = served => match r {
                    Ok(()) => "closed",
                    Err(e) if e.is_timeout() => "header_timeout",
                    Err(e) => {
                        tracing::debug!(%peer, error = %e, "connection ended with an error");
                        "error"
                    }
                },
                closed = close_rx => {
                    evicted = closed.ok();
                    "evicted"
                }
            };
            conns.lock().remove(&id);
            metrics.http_connections.dec();
            metrics
                .http_connections_closed
                .get_or_create(&crate::telemetry::ReasonLabel { reason })
                .inc();
            if let Some(closed) = evicted {
                let _ = closed.send(());
            }
        });
    }
    drop(listener.tcp);
    if tokio::time::timeout(listener.drain, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("connections still open after the drain period; closing them");
    }
    Ok(())
}

/// The TLS configuration, with a certificate that can be replaced while
/// serving.
pub struct Tls {
    config: Arc<rustls::ServerConfig>,
}

impl Tls {
    /// Loads the certificate and key, and starts watching the files.
    pub fn load(cfg: &TlsConfig) -> anyhow::Result<Tls> {
        let resolver = Arc::new(ReloadingCert::load(&cfg.cert_path, &cfg.key_path)?);
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_cert_resolver(resolver.clone());
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let every = Duration::from_secs(cfg.reload_check_secs.max(1));
        let weak = Arc::downgrade(&resolver);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.tick().await;
            loop {
                tick.tick().await;
                match weak.upgrade() {
                    Some(r) => r.reload_if_changed(),
                    None => return,
                }
            }
        });
        Ok(Tls {
            config: Arc::new(config),
        })
    }
}

/// The served certificate, read again when its files change.
#[derive(Debug)]
struct ReloadingCert {
    cert_path: PathBuf,
    key_path: PathBuf,
    current: RwLock<(Arc<CertifiedKey>, Option<SystemTime>, Option<SystemTime>)>,
}

fn modified(p: &Path) -> Option<SystemTime> {
    std::fs::metadata(p).and_then(|m| m.modified()).ok()
}

fn load_pair(cert_path: &Path, key_path: &Path) -> anyhow::Result<Arc<CertifiedKey>> {
    use anyhow::Context as _;
    let certs = CertificateDer::pem_file_iter(cert_path)
        .with_context(|| format!("reading {}", cert_path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("parsing {}", cert_path.display()))?;
    anyhow::ensure!(
        !certs.is_empty(),
        "{} holds no certificate",
        cert_path.display()
    );
    let key = PrivateKeyDer::from_pem_file(key_path)
        .with_context(|| format!("reading the key {}", key_path.display()))?;
    let signer = rustls::crypto::ring::sign::any_supported_type(&key)
        .map_err(|e| anyhow::anyhow!("{}: {e}", key_path.display()))?;
    let pair = CertifiedKey::new(certs, signer);
    pair.keys_match()
        .map_err(|e| anyhow::anyhow!("the key does not match the certificate: {e}"))?;
    Ok(Arc::new(pair))
}

impl ReloadingCert {
    fn load(cert_path: &Path, key_path: &Path) -> anyhow::Result<ReloadingCert> {
        let (cm, km) = (modified(cert_path), modified(key_path));
        let pair = load_pair(cert_path, key_path)?;
        Ok(ReloadingCert {
            cert_path: cert_path.to_path_buf(),
            key_path: key_path.to_path_buf(),
            current: RwLock::new((pair, cm, km)),
        })
    }

    fn reload_if_changed(&self) {
        let (cm, km) = (modified(&self.cert_path), modified(&self.key_path));
        let unchanged = {
            let cur = self
                .current
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            cur.1 == cm && cur.2 == km
        };
        if unchanged {
            return;
        }
        match load_pair(&self.cert_path, &self.key_path) {
            Ok(pair) => {
                *self
                    .current
                    .write()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = (pair, cm, km);
                tracing::info!(cert = %self.cert_path.display(), "TLS certificate reloaded");
            }
            // Half-written during a renewal, say: keep serving the old one
            // and try again at the next check.
            Err(e) => {
                tracing::warn!(error = %e, "TLS certificate changed but does not load; keeping the previous one")
            }
        }
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(
            self.current
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .0
                .clone(),
        )
    }
}

/// The client's address for per-address limits: the TCP peer, or behind
/// `server.trusted_proxies` the last `X-Forwarded-For` entry they did not
/// add (every header line joined, in order).
pub fn client_ip(
    peer: SocketAddr,
    headers: &axum::http::HeaderMap,
    trusted: &outpost_edge::net::NetList,
) -> std::net::IpAddr {
    let lines: Vec<&str> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    let joined = (!lines.is_empty()).then(|| lines.join(", "));
    outpost_edge::net::client_ip(None, peer.ip(), joined.as_deref(), trusted)
}
