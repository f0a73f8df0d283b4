//! The self-hosted stack, checked against the code without a Docker engine:
//! `docker-compose.yml`, `aggregator/Dockerfile`, the Prometheus and
//! Grafana provisioning and both dashboards. The compose file is read with
//! Python's YAML parser (PyYAML, which scripts/test installs).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use outpost_tests::aggregator::{Aggregator, batch_id, events, frame_for};
use outpost_tests::stores::{TestDb, TestRedis, store_config};
use serde_json::Value;

fn root() -> PathBuf {
    outpost_tests::repo_root()
}

/// A YAML file as JSON.
fn yaml(path: &Path) -> Value {
    outpost_tests::require_tool("python3");
    let out = Command::new("python3")
        .args([
            "-c",
            "import json, sys, yaml; json.dump(yaml.safe_load(open(sys.argv[1])), sys.stdout)",
        ])
        .arg(path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "python3 with PyYAML (scripts/test installs it) reads {}: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn compose() -> Value {
    yaml(&root().join("docker-compose.yml"))
}

/// `KEY=value` lines of `.env.example`.
fn env_example() -> BTreeMap<String, String> {
    std::fs::read_to_string(root().join(".env.example"))
        .unwrap()
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect()
}

/// The value of `${NAME…}` references, resolved from `.env.example`.
fn interpolate(s: &str, env: &BTreeMap<String, String>) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find("${") {
        out.push_str(&rest[..i]);
        let end = rest[i..].find('}').unwrap() + i;
        let inner = &rest[i + 2..end];
        let name = inner.split([':', '-', '?']).next().unwrap();
        let default = inner.split_once(":-").map(|(_, d)| d);
        let value = env
            .get(name)
            .cloned()
            .or(default.map(str::to_owned))
            .unwrap_or_else(|| panic!("${{{name}}} is not in .env.example"));
        out.push_str(&value);
        rest = &rest[end + 1..];
    }
    out.push_str(rest);
    out
}

fn env_of(service: &Value) -> BTreeMap<String, String> {
    service["environment"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| {
                    let v = match v {
                        Value::String(s) => s.clone(),
                        other => other.to_string(),
                    };
                    (k.clone(), v)
                })
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn compose_names_every_service_and_only_real_settings() {
    let c = compose();
    let services = c["services"].as_object().unwrap();
    let names: BTreeSet<&str> = services.keys().map(String::as_str).collect();
    for needed in [
        "outpost",
        "redis",
        "postgres",
        "influxdb",
        "prometheus",
        "grafana",
        "edge",
    ] {
        assert!(names.contains(needed), "service {needed} missing");
    }
    let env = env_example();

    // Every variable the file references is in .env.example, and every
    // value there is referenced.
    let text = std::fs::read_to_string(root().join("docker-compose.yml")).unwrap();
    let referenced: BTreeSet<String> = text
        .split("${")
        .skip(1)
        .map(|s| s.split([':', '-', '?', '}']).next().unwrap().to_owned())
        .collect();
    let offered: BTreeSet<String> = env.keys().cloned().collect();
    assert_eq!(referenced, offered, "docker-compose.yml vs .env.example");

    // The aggregator's settings are real config keys with valid values.
    let outpost = &services["outpost"];
    let outpost_env: BTreeMap<String, String> = env_of(outpost)
        .into_iter()
        .map(|(k, v)| (k, interpolate(&v, &env)))
        .collect();
    let readme = outpost_tests::readme();
    for k in outpost_env.keys() {
        let documented = readme.contains(&format!("`{k}`"));
        assert!(
            documented || k == "OUTPOST_EDGE_KEYS" || k == "OUTPOST_SECRETS_KEY",
            "{k} is not a documented setting"
        );
    }
    // .env.example holds placeholders; the shape of a real key is checked.
    let vars: Vec<(String, String)> = outpost_env
        .clone()
        .into_iter()
        .map(|(k, v)| {
            let v = real_shaped(&k, v);
            (k, v)
        })
        .collect();
    let config = outpost_aggregator::config::Config::load_with_env(None, vars.into_iter())
        .unwrap_or_else(|e| panic!("the compose settings do not load: {e:#}"));
    config.check().unwrap();
    assert!(config.postgres.enabled && config.influxdb.enabled);
    assert_eq!(
        config.influxdb.api,
        outpost_aggregator::config::WriteApi::V2
    );
    assert_eq!(
        config.dedup.backend,
        outpost_aggregator::config::DedupBackend::Redis
    );
    let port = config.server.listen.port();

    // Built from a Dockerfile that exists; the edge uses the same image.
    let build = &outpost["build"];
    assert_eq!(build["context"], ".");
    let dockerfile = root().join(build["dockerfile"].as_str().unwrap());
    assert!(dockerfile.is_file(), "{}", dockerfile.display());
    assert_eq!(services["edge"]["image"], outpost["image"]);

    // The health check asks the real readiness endpoint on the real port.
    let test: Vec<&str> = outpost["healthcheck"]["test"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(&test[..3], ["CMD", "outpost", "healthcheck"]);
    assert_eq!(
        test[4],
        format!("http://127.0.0.1:{port}/health/ready"),
        "{test:?}"
    );
    let published = outpost["ports"][0].as_str().unwrap();
    assert!(published.ends_with(&format!(":{port}")), "{published}");

    // Start order: a dependency waited on for health has a health check.
    let mut volumes_used = BTreeSet::new();
    for (name, s) in services {
        if let Some(deps) = s["depends_on"].as_object() {
            for (dep, cond) in deps {
                let target = services
                    .get(dep)
                    .unwrap_or_else(|| panic!("{name} depends on unknown {dep}"));
                if cond["condition"] == "service_healthy" {
                    let hc = &target["healthcheck"];
                    assert!(
                        hc.is_object() && hc["disable"] != true,
                        "{name} waits for {dep}, which has no health check"
                    );
                }
            }
        }
        for v in s["volumes"].as_array().into_iter().flatten() {
            let v = v.as_str().unwrap();
            let source = v.split(':').next().unwrap();
            if source.starts_with("./") {
                assert!(
                    root().join(source).exists(),
                    "{name} mounts missing {source}"
                );
            } else {
                volumes_used.insert(source.to_owned());
            }
        }
        // No secret written into the file: every password/token is a reference.
        for (k, v) in env_of(s) {
            if ["PASSWORD", "TOKEN", "SECRET", "KEYS"]
                .iter()
                .any(|w| k.contains(w))
            {
                assert!(v.contains("${"), "{name}: {k} is written in the file");
            }
        }
    }
    let declared: BTreeSet<String> = c["volumes"].as_object().unwrap().keys().cloned().collect();
    assert_eq!(volumes_used, declared, "named volumes");

    // The edge service reads a config the host accepts, naming the
    // component where the Dockerfile puts it.
    let edge_toml = root().join("aggregator/deploy/edge.toml");
    let host: outpost_edge_host::HostConfig =
        toml::from_str(&std::fs::read_to_string(edge_toml).unwrap()).unwrap();
    let dockerfile_text = std::fs::read_to_string(&dockerfile).unwrap();
    assert!(
        dockerfile_text.contains(&format!(" {}\n", host.component.display())),
        "the Dockerfile installs the component at {}",
        host.component.display()
    );
    assert_eq!(
        host.variables["aggregator_url"],
        format!("http://outpost:{port}")
    );
    let edge_env = env_of(&services["edge"]);
    assert!(edge_env.contains_key("SPIN_VARIABLE_EDGE_KEY_SECRET"));

    // Prometheus scrapes the aggregator where it listens.
    let prom = yaml(&root().join("aggregator/deploy/prometheus.yml"));
    let job = &prom["scrape_configs"][0];
    assert_eq!(job["metrics_path"], "/metrics");
    assert_eq!(
        job["static_configs"][0]["targets"][0],
        format!("outpost:{port}")
    );
}

/// A `.env.example` placeholder made into a value of the real shape (43
/// characters of base64url: 32 bytes).
fn real_shaped(k: &str, v: String) -> String {
    let key = "A".repeat(43);
    match k {
        "OUTPOST_EDGE_KEYS" => format!("edge1={key}"),
        "OUTPOST_READ_API_CURSOR_SECRET" => key,
        _ => v,
    }
}

#[test]
fn the_fleet_profile_runs_stateless_nodes_on_a_three_server_nats_cluster_behind_a_balancer() {
    let c = compose();
    let services = c["services"].as_object().unwrap();
    let env = env_example();
    for name in [
        "nats-1", "nats-2", "nats-3", "fleet-1", "fleet-2", "fleet-lb",
    ] {
        let s = services
            .get(name)
            .unwrap_or_else(|| panic!("service {name} missing"));
        assert_eq!(s["profiles"], serde_json::json!(["fleet"]), "{name}");
    }

    // The NATS configuration is valid to the real server, carries a whole
    // frame, and routes to exactly the three servers.
    let nats_conf = root().join("aggregator/deploy/nats.conf");
    outpost_tests::run_ok(
        Command::new(outpost_tests::require_tool("nats-server"))
            .arg("-t")
            .arg("-c")
            .arg(&nats_conf),
    );
    let conf = std::fs::read_to_string(&nats_conf).unwrap();
    let setting = |key: &str| {
        conf.lines()
            .map(str::trim)
            .find_map(|l| l.strip_prefix(&format!("{key}:")))
            .map(|v| v.trim().to_owned())
            .unwrap_or_else(|| panic!("nats.conf has no {key}"))
    };
    let max_payload: usize = setting("max_payload")
        .strip_suffix("MB")
        .and_then(|n| n.parse::<usize>().ok())
        .expect("max_payload in MB")
        * 1024
        * 1024;
    let frame = outpost_shared::frame::FrameLimits::default().max_frame_bytes;
    assert!(max_payload >= frame + outpost_aggregator::spool::jetstream::HEADER_ROOM);
    let client_port = setting("listen").rsplit(':').next().unwrap().to_owned();
    let routes: BTreeSet<&str> = conf
        .lines()
        .filter_map(|l| l.trim().strip_prefix("nats-route://"))
        .collect();
    let cluster_port = conf
        .split("cluster {")
        .nth(1)
        .and_then(|c| c.lines().find_map(|l| l.trim().strip_prefix("listen:")))
        .and_then(|l| l.trim().rsplit(':').next())
        .expect("cluster listen")
        .to_owned();
    let expected: BTreeSet<String> = (1..=3)
        .map(|i| format!("nats-{i}:{cluster_port}"))
        .collect();
    assert_eq!(
        routes,
        expected.iter().map(String::as_str).collect(),
        "routes"
    );
    let store_dir = conf
        .split("jetstream {")
        .nth(1)
        .and_then(|j| j.lines().find_map(|l| l.trim().strip_prefix("store_dir:")))
        .expect("jetstream store_dir")
        .trim()
        .to_owned();
    let mut server_names = BTreeSet::new();
    for i in 1..=3 {
        let s = &services[&format!("nats-{i}")];
        let args: Vec<&str> = s["command"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap())
            .collect();
        let conf_path = args[args.iter().position(|a| *a == "-c").unwrap() + 1];
        let name = args[args.iter().position(|a| *a == "--name").unwrap() + 1];
        server_names.insert(name.to_owned());
        let mounts: Vec<&str> = s["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        assert!(
            mounts.contains(&format!("./aggregator/deploy/nats.conf:{conf_path}:ro").as_str()),
            "{mounts:?}"
        );
        assert!(
            mounts
                .iter()
                .any(|m| !m.starts_with("./") && m.ends_with(&format!(":{store_dir}"))),
            "nats-{i} keeps its store on a volume: {mounts:?}"
        );
    }
    assert_eq!(server_names.len(), 3, "each server its own name");

    // Each node: a real configuration on the JetStream spool, replicated
    // three times, naming the three servers — and no volume of its own.
    let mut listen_port = None;
    for name in ["fleet-1", "fleet-2"] {
        let node = &services[name];
        assert!(
            node["volumes"].as_array().is_none_or(Vec::is_empty),
            "{name} keeps nothing on a volume"
        );
        let vars: Vec<(String, String)> = env_of(node)
            .into_iter()
            .map(|(k, v)| {
                let v = interpolate(&v, &env);
                (k.clone(), real_shaped(&k, v))
            })
            .collect();
        let config = outpost_aggregator::config::Config::load_with_env(None, vars.into_iter())
            .unwrap_or_else(|e| panic!("{name}'s settings do not load: {e:#}"));
        config.check().unwrap();
        assert_eq!(
            config.spool.backend,
            outpost_aggregator::spool::Backend::Jetstream
        );
        assert_eq!(config.spool.jetstream.replicas, 3);
        let urls: BTreeSet<String> = config.spool.jetstream.urls.iter().cloned().collect();
        let servers: BTreeSet<String> = (1..=3)
            .map(|i| format!("nats://nats-{i}:{client_port}"))
            .collect();
        assert_eq!(urls, servers);
        assert!(
            !config.read_api.cursor_secret.0.is_empty(),
            "one cursor secret for the fleet"
        );
        for dep in ["nats-1", "nats-2", "nats-3", "postgres", "redis"] {
            assert_eq!(
                node["depends_on"][dep]["condition"], "service_healthy",
                "{name} → {dep}"
            );
        }
        listen_port = Some(config.server.listen.port());
    }
    let port = listen_port.unwrap();

    // The balancer sends to both nodes where they listen, and on to the
    // other node on no answer or 503, POST included.
    let lb = std::fs::read_to_string(root().join("aggregator/deploy/fleet-nginx.conf")).unwrap();
    let upstream_block = lb
        .split("upstream ")
        .nth(1)
        .and_then(|u| u.split('}').next())
        .expect("an upstream block");
    let upstreams: BTreeSet<&str> = upstream_block
        .lines()
        .filter_map(|l| l.trim().strip_prefix("server "))
        .filter_map(|l| l.split_whitespace().next())
        .map(|s| s.trim_end_matches(';'))
        .collect();
    let want: BTreeSet<String> = ["fleet-1", "fleet-2"]
        .iter()
        .map(|n| format!("{n}:{port}"))
        .collect();
    assert_eq!(upstreams, want.iter().map(String::as_str).collect());
    let next = lb
        .lines()
        .find(|l| l.trim().starts_with("proxy_next_upstream "))
        .expect("proxy_next_upstream");
    for w in ["error", "timeout", "http_503", "non_idempotent"] {
        assert!(
            next.split_whitespace()
                .any(|x| x.trim_end_matches(';') == w),
            "{next}"
        );
    }
    let lb_listen = lb
        .lines()
        .find_map(|l| l.trim().strip_prefix("listen "))
        .map(|l| l.trim_end_matches(';').trim().to_owned())
        .expect("listen");
    let published = services["fleet-lb"]["ports"][0].as_str().unwrap();
    assert!(published.ends_with(&format!(":{lb_listen}")), "{published}");
    assert!(
        services["fleet-lb"]["volumes"][0]
            .as_str()
            .unwrap()
            .starts_with("./aggregator/deploy/fleet-nginx.conf:/etc/nginx/nginx.conf")
    );
}

#[test]
fn the_dockerfile_builds_what_exists_and_runs_unprivileged() {
    let text = std::fs::read_to_string(root().join("aggregator/Dockerfile")).unwrap();
    let toolchain = std::fs::read_to_string(root().join("rust-toolchain.toml")).unwrap();
    let channel = toolchain
        .lines()
        .find_map(|l| l.strip_prefix("channel = "))
        .unwrap()
        .trim_matches('"');
    assert!(
        text.contains(&format!("FROM rust:{channel}-")),
        "builder matches rust-toolchain.toml ({channel})"
    );
    assert!(text.contains("--bin outpost"));
    let workspace = std::fs::read_to_string(root().join("Cargo.toml")).unwrap();
    assert!(
        workspace.contains("[profile.wasm]"),
        "--profile wasm exists"
    );
    assert!(text.contains("-p outpost-edge-spin --target wasm32-wasip2"));
    let user = text.lines().find_map(|l| l.strip_prefix("USER ")).unwrap();
    assert_ne!(user.trim(), "root");
    assert!(text.contains(r#"HEALTHCHECK"#) && text.contains(r#"CMD ["outpost", "healthcheck"]"#));
    assert!(
        root().join("aggregator/Dockerfile.dockerignore").is_file(),
        "keeps target/ out of the build context"
    );
}

#[tokio::test]
async fn outpost_healthcheck_reports_readiness_by_exit_status() {
    let (db, redis) = (TestDb::new().await, TestRedis::new());
    let agg = Aggregator::start(&store_config(&db.url, &redis)).await;
    let run = |url: String| {
        tokio::task::spawn_blocking(move || {
            Command::new(outpost_tests::outpost_bin())
                .args(["healthcheck", "--url", &url])
                .status()
                .unwrap()
                .success()
        })
    };
    assert!(run(format!("{}/health/ready", agg.url)).await.unwrap());
    let dead = format!(
        "http://127.0.0.1:{}/health/ready",
        outpost_tests::aggregator::free_port()
    );
    assert!(!run(dead).await.unwrap(), "nothing listening is not ready");
}

/// Every `outpost_…` metric name in a PromQL expression.
fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = expr;
    while let Some(i) = rest.find("outpost_") {
        let name: String = rest[i..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        rest = &rest[i + name.len()..];
        names.push(name);
    }
    names
}

fn dashboard(name: &str) -> Value {
    let path = root()
        .join("aggregator/deploy/grafana/dashboards")
        .join(name);
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn targets(d: &Value) -> Vec<&Value> {
    d["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["targets"].as_array().unwrap())
        .collect()
}

#[tokio::test]
async fn the_ingestion_dashboard_queries_only_metrics_the_aggregator_exports() {
    let (db, redis) = (TestDb::new().await, TestRedis::new());
    let agg = Aggregator::start(&store_config(&db.url, &redis)).await;
    agg.ingest_accepted(frame_for("acme-web", events(31, 0..3), batch_id()))
        .await;
    db.wait_rows("acme-web", 3, 10).await;
    // And one refusal, so that the per-code family has a series.
    let refused = reqwest::Client::new()
        .post(format!("{}/v1/ingest", agg.url))
        .header("content-type", "text/plain")
        .body("not a frame")
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 415);
    let text = reqwest::get(format!("{}/metrics", agg.url))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    // Series names: `# TYPE name kind` (counters gain `_total`, histograms
    // `_bucket`/`_sum`/`_count`).
    let mut exported = BTreeSet::new();
    for line in text.lines() {
        let mut parts = line.split_whitespace();
        if let (Some("#"), Some("TYPE"), Some(name), Some(kind)) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        {
            match kind {
                "counter" => {
                    exported.insert(format!("{name}_total"));
                }
                "histogram" => {
                    for s in ["_bucket", "_sum", "_count"] {
                        exported.insert(format!("{name}{s}"));
                    }
                }
                _ => {
                    exported.insert(name.to_owned());
                }
            }
        }
    }
    let d = dashboard("ingestion.json");
    let datasources =
        yaml(&root().join("aggregator/deploy/grafana/provisioning/datasources/outpost.yml"));
    let prom_uid = datasources["datasources"][0]["uid"].as_str().unwrap();
    let mut queried = BTreeSet::new();
    for t in targets(&d) {
        assert_eq!(t["datasource"]["uid"], prom_uid);
        for name in metric_names(t["expr"].as_str().unwrap()) {
            queried.insert(name);
        }
    }
    let missing: Vec<_> = queried.difference(&exported).collect();
    assert!(
        missing.is_empty(),
        "not exported: {missing:?}\n{exported:?}"
    );
    // The dashboard covers what issue #6 asks of it.
    for needed in [
        "outpost_ingest_events_total",
        "outpost_ingest_errors_total",
        "outpost_dedup_duplicates_total",
        "outpost_spool_batches",
        "outpost_sink_lag_seconds",
        "outpost_sink_failures_total",
        "outpost_ingest_request_duration_seconds_bucket",
        "outpost_geoip_cache_hits_total",
        // And what tells an operator whether the hand-off bound fits.
        "outpost_delivery_batches_total",
        "outpost_handoff_bytes",
        // And what hostile traffic leaves behind: dead letters, shed load.
        "outpost_dead_letters",
        "outpost_http_connections_closed_total",
        "outpost_http_requests_shed_total",
        // And whether sink writes gather batches (delivery.linger_ms).
        "outpost_sink_writes_total",
    ] {
        assert!(queried.contains(needed), "{needed} is not on the dashboard");
    }
}

/// Expands the Grafana macros the analytics dashboard uses into plain SQL
/// over a fixed window.
fn expand_macros(sql: &str) -> String {
    let mut out = sql.replace("$__interval", "'5m'");
    for (name, expand) in [
        (
            "$__unixEpochGroupAlias(",
            (|a: &[&str]| format!("floor(({}) / 300) * 300 AS \"time\"", a[0]))
                as fn(&[&str]) -> String,
        ),
        ("$__unixEpochFilter(", |a| {
            format!("({}) BETWEEN 0 AND 4102444800", a[0])
        }),
        ("$__timeGroupAlias(", |a| {
            format!("date_trunc('day', {}) AS \"time\"", a[0])
        }),
        ("$__timeFilter(", |a| {
            format!("{} BETWEEN '1970-01-01' AND '2100-01-01'", a[0])
        }),
    ] {
        while let Some(i) = out.find(name) {
            let start = i + name.len();
            let mut depth = 1;
            let mut end = start;
            for (j, c) in out[start..].char_indices() {
                match c {
                    '(' => depth += 1,
                    ')' => depth -= 1,
                    _ => {}
                }
                if depth == 0 {
                    end = start + j;
                    break;
                }
            }
            let args: Vec<&str> = out[start..end].split(',').map(str::trim).collect();
            let replacement = expand(&args);
            out.replace_range(i..=end, &replacement);
        }
    }
    assert!(
        !out.contains("$__"),
        "a macro the test does not know: {out}"
    );
    out
}

#[tokio::test]
async fn every_analytics_panel_query_runs_against_the_real_schema() {
    let (db, redis) = (TestDb::new().await, TestRedis::new());
    let agg = Aggregator::start(&store_config(&db.url, &redis)).await;
    let mut evs = events(32, 0..4);
    for (i, e) in evs.iter_mut().enumerate() {
        e.user_id = Some(format!("u{}", i % 2));
        e.context.platform = Some("web".into());
    }
    agg.ingest_accepted(frame_for("acme-web", evs, batch_id()))
        .await;
    db.wait_rows("acme-web", 4, 10).await;
    let d = dashboard("analytics.json");
    let datasources =
        yaml(&root().join("aggregator/deploy/grafana/provisioning/datasources/outpost.yml"));
    let pg_uid = datasources["datasources"][1]["uid"].as_str().unwrap();
    let mut answered = 0;
    for t in targets(&d) {
        assert_eq!(t["datasource"]["uid"], pg_uid);
        let sql = expand_macros(t["rawSql"].as_str().unwrap());
        let rows = sqlx::query(&sql)
            .fetch_all(&db.pool)
            .await
            .unwrap_or_else(|e| panic!("{e}\n{sql}"));
        answered += usize::from(!rows.is_empty());
    }
    // Every panel but "logs by level" (these events are not logs) shows data.
    assert_eq!(answered, targets(&d).len() - 1);
}
