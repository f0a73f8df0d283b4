//! Real InfluxDB-protocol servers from Debian's packages, one private
//! instance per test on a free port, killed when the fixture drops:
//! `influxd` 1.x (v1 write API; keeps string fields) and VictoriaMetrics
//! (accepts `/api/v2/write`; shows data after `/internal/force_flush`).

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// A running server; killed on drop.
pub struct InfluxServer {
    child: Child,
    /// Base URL.
    pub url: String,
    _dir: tempfile::TempDir,
}

impl Drop for InfluxServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn wait_up(url: &str, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while reqwest::get(url)
        .await
        .map(|r| r.status().as_u16() >= 500)
        .unwrap_or(true)
    {
        assert!(Instant::now() < deadline, "{what} did not start");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

impl InfluxServer {
    /// `influxd` 1.x on `port`, with database `db` created.
    pub async fn influxdb_v1(port: u16, db: &str) -> InfluxServer {
        crate::require_tool("influxd");
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().display();
        let rpc = crate::aggregator::free_port();
        let conf = format!(
            "reporting-disabled = true\nbind-address = \"127.0.0.1:{rpc}\"\n[meta]\n  dir = \"{d}/meta\"\n[data]\n  dir = \"{d}/data\"\n  wal-dir = \"{d}/wal\"\n  query-log-enabled = false\n[http]\n  bind-address = \"127.0.0.1:{port}\"\n  log-enabled = false\n[monitor]\n  store-enabled = false\n[continuous_queries]\n  enabled = false\n"
        );
        std::fs::write(dir.path().join("influxdb.conf"), conf).unwrap();
        let child = Command::new("influxd")
            .arg("-config")
            .arg(dir.path().join("influxdb.conf"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("influxd");
        let url = format!("http://127.0.0.1:{port}");
        let s = InfluxServer {
            child,
            url,
            _dir: dir,
        };
        wait_up(&format!("{}/ping", s.url), "influxd").await;
        // The port must be influxd's (another server that took it first
        // would answer too), and the database must be there before the
        // test writes: CREATE answers 200 even when it failed, so ask.
        let http = reqwest::Client::new();
        let ping = http.get(format!("{}/ping", s.url)).send().await.unwrap();
        assert!(
            ping.headers().contains_key("x-influxdb-version"),
            "port {port} is not influxd's: {:?}",
            ping.headers()
        );
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let created = http
                .post(format!("{}/query", s.url))
                .form(&[("q", format!("CREATE DATABASE {db}"))])
                .send()
                .await
                .unwrap();
            assert!(created.status().is_success());
            let shown = http
                .post(format!("{}/query", s.url))
                .form(&[("q", "SHOW DATABASES")])
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap_or_default();
            if shown.contains(&format!("[\"{db}\"]")) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "influxd has no database {db}: {shown}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        s
    }

    /// Writes `p_ms` as a string field into database `db` (another
    /// writer's point): the sink's number for it is then a field type
    /// conflict, which influxd refuses for the whole write.
    pub async fn make_p_ms_a_string(&self, db: &str) {
        let now_ns = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let seeded = reqwest::Client::new()
            .post(format!("{}/write?db={db}", self.url))
            .body(format!(
                "outpost_events,client=other p_ms=\"slow\" {now_ns}"
            ))
            .send()
            .await
            .unwrap();
        assert_eq!(seeded.status(), 204);
    }

    /// VictoriaMetrics on `port`.
    pub async fn victoria_metrics(port: u16) -> InfluxServer {
        crate::require_tool("victoria-metrics");
        let dir = tempfile::tempdir().unwrap();
        let child = Command::new("victoria-metrics")
            .arg(format!("-httpListenAddr=127.0.0.1:{port}"))
            .arg(format!("-storageDataPath={}", dir.path().display()))
            // Or points with old timestamps are dropped.
            .arg("-retentionPeriod=100y")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("victoria-metrics");
        let url = format!("http://127.0.0.1:{port}");
        let s = InfluxServer {
            child,
            url,
            _dir: dir,
        };
        wait_up(&format!("{}/health", s.url), "victoria-metrics").await;
        s
    }

    /// InfluxQL query (v1 server): the first series' rows as JSON objects.
    pub async fn query_v1(&self, db: &str, q: &str) -> Vec<serde_json::Map<String, Value>> {
        let v: Value = reqwest::Client::new()
            .post(format!("{}/query", self.url))
            .form(&[("db", db), ("q", q)])
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let series = &v["results"][0]["series"][0];
        let cols: Vec<String> = series["columns"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|c| c.as_str().unwrap_or("").to_owned())
                    .collect()
            })
            .unwrap_or_default();
        series["values"]
            .as_array()
            .map(|rows| {
                rows.iter()
                    .map(|r| {
                        cols.iter()
                            .cloned()
                            .zip(r.as_array().cloned().unwrap_or_default())
                            .collect()
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// VictoriaMetrics export of series matching `selector`, after a flush.
    pub async fn export_vm(&self, selector: &str) -> Vec<Value> {
        let _ = reqwest::get(format!("{}/internal/force_flush", self.url)).await;
        let text = reqwest::Client::new()
            .post(format!("{}/api/v1/export", self.url))
            .form(&[("match[]", selector)])
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        text.lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }
}
