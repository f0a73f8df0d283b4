//! Real storage for tests: a private PostgreSQL database and a private Redis
//! key prefix per test, both removed again when the fixture drops. The
//! servers are the ones on the machine (scripts/test starts them when they
//! are not running); override with `OUTPOST_TEST_PG_URL` (an admin URL
//! without database) and `OUTPOST_TEST_REDIS_URL`.

/// Admin connection to the machine's PostgreSQL.
pub fn pg_admin_url() -> String {
    std::env::var("OUTPOST_TEST_PG_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into())
}

/// The machine's Redis.
pub fn redis_url() -> String {
    std::env::var("OUTPOST_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// The config sections every storage-backed test shares: its own database
/// and Redis prefix, and short retry delays so recovery is quick.
pub fn store_config(db_url: &str, redis: &TestRedis) -> String {
    format!(
        "[postgres]\nurl = \"{db_url}\"\n\n[dedup]\nbackend = \"redis\"\nredis_urls = [\"{}\"]\nkey_prefix = \"{}\"\n\n[delivery]\nbackoff_initial_ms = 50\nbackoff_max_ms = 500\n",
        redis_url(),
        redis.prefix
    )
}

/// The same, with PostgreSQL unreachable (a port where nothing listens) and
/// migrations off: a sink that is down from the start.
pub fn store_config_pg_down(redis: &TestRedis) -> (String, String) {
    let dead = format!(
        "postgres://postgres@127.0.0.1:{}/none",
        crate::aggregator::free_port()
    );
    (
        store_config(&dead, redis)
            .replace("[postgres]\n", "[postgres]\nmigrate_on_start = false\n"),
        dead,
    )
}

/// A short random name part, unique enough for concurrent test runs.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}_{}_{:08x}", std::process::id(), fastrand::u32(..))
}

/// Runs async cleanup from `Drop`, which may itself be inside a runtime.
fn block_on_thread<F: std::future::Future<Output = ()> + Send + 'static>(f: F) {
    let _ = std::thread::spawn(move || {
        if let Ok(rt) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            rt.block_on(f);
        }
    })
    .join();
}

/// A database of its own, dropped with the fixture.
pub struct TestDb {
    /// Its name.
    pub name: String,
    /// Its URL.
    pub url: String,
    /// A pool on it.
    pub pool: sqlx::PgPool,
}

impl TestDb {
    /// Creates a fresh, empty database.
    pub async fn new() -> TestDb {
        TestDb::create("").await
    }

    /// Creates a fresh, empty database whose default collation is the ICU
    /// locale `locale` (e.g. `en-US`): text ordered as people read it, not
    /// by bytes, like the databases of the PostgreSQL image in
    /// docker-compose.yml (`en_US.utf8`) and unlike this machine's `C.UTF-8`.
    pub async fn in_locale(locale: &str) -> TestDb {
        TestDb::create(&format!(
            " TEMPLATE template0 ENCODING 'UTF8' LOCALE_PROVIDER icu ICU_LOCALE '{locale}'"
        ))
        .await
    }

    /// `CREATE DATABASE <a new name><options>`.
    async fn create(options: &str) -> TestDb {
        let name = unique("outpost_test");
        let admin = format!("{}/postgres", pg_admin_url());
        let mut conn: sqlx::PgConnection =
            sqlx::Connection::connect(&admin).await.unwrap_or_else(|e| {
                panic!("PostgreSQL at {admin} is needed (scripts/test starts it): {e}")
            });
        sqlx::query(&format!("CREATE DATABASE {name}{options}"))
            .execute(&mut conn)
            .await
            .expect("create database");
        let url = format!("{}/{name}", pg_admin_url());
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(4)
            .connect(&url)
            .await
            .expect("connect test db");
        TestDb { name, url, pool }
    }

    /// Rows in `events` for a client.
    pub async fn count_events(&self, client_id: &str) -> i64 {
        sqlx::query_scalar("SELECT COUNT(*) FROM events WHERE client_id = $1")
            .bind(client_id)
            .fetch_one(&self.pool)
            .await
            .unwrap_or(0)
    }

    /// Makes PostgreSQL refuse events named `poison` (SQLSTATE 23514): a
    /// constraint an operator added, which validation cannot know about.
    pub async fn refuse_poison(&self) {
        sqlx::query(
            "ALTER TABLE events ADD CONSTRAINT no_poison CHECK (name IS DISTINCT FROM 'poison')",
        )
        .execute(&self.pool)
        .await
        .expect("add the no_poison constraint");
    }

    /// Waits up to `secs` until `client_id` has exactly `rows` events stored.
    pub async fn wait_rows(&self, client_id: &str, rows: i64, secs: u64) {
        crate::aggregator::eventually(secs, &format!("{rows} rows of {client_id}"), || async {
            self.count_events(client_id).await == rows
        })
        .await;
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        // The pool's connections live on the test's runtime, which is blocked
        // here: do not close them from this thread; FORCE ends them server-side.
        let name = self.name.clone();
        block_on_thread(async move {
            let admin = format!("{}/postgres", pg_admin_url());
            if let Ok(mut conn) = <sqlx::PgConnection as sqlx::Connection>::connect(&admin).await {
                let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    .execute(&mut conn)
                    .await;
            }
        });
    }
}

/// A Redis key prefix of its own; its keys are deleted with the fixture.
pub struct TestRedis {
    /// The prefix (ends with `:`).
    pub prefix: String,
}

impl TestRedis {
    /// A fresh prefix.
    pub fn new() -> TestRedis {
        TestRedis {
            prefix: format!("{}:", unique("outpost-test")),
        }
    }

    /// A connection.
    pub async fn conn(&self) -> redis::aio::MultiplexedConnection {
        let client = redis::Client::open(redis_url()).expect("redis url");
        client
            .get_multiplexed_async_connection()
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "Redis at {} is needed (scripts/test starts it): {e}",
                    redis_url()
                )
            })
    }
}

impl Default for TestRedis {
    fn default() -> Self {
        TestRedis::new()
    }
}

impl Drop for TestRedis {
    fn drop(&mut self) {
        let pattern = format!("{}*", self.prefix);
        block_on_thread(async move {
            let Ok(client) = redis::Client::open(redis_url()) else {
                return;
            };
            let Ok(mut conn) = client.get_multiplexed_async_connection().await else {
                return;
            };
            let keys: Vec<String> = redis::cmd("KEYS")
                .arg(&pattern)
                .query_async(&mut conn)
                .await
                .unwrap_or_default();
            if !keys.is_empty() {
                let _: redis::RedisResult<()> =
                    redis::cmd("DEL").arg(keys).query_async(&mut conn).await;
            }
        });
    }
}

/// A PostgreSQL server of the test's own (initdb in a temp dir, its own
/// port), which the test may stop and start: for "the database went away
/// under load". Runs as the `postgres` user (PostgreSQL refuses root).
pub struct PrivatePostgres {
    dir: tempfile::TempDir,
    bin: std::path::PathBuf,
    /// Its port.
    pub port: u16,
}

impl PrivatePostgres {
    /// initdb + start; the database `outpost` exists.
    pub fn start() -> PrivatePostgres {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .ok()
            .and_then(|d| {
                d.filter_map(Result::ok)
                    .map(|e| e.path().join("bin"))
                    .filter(|p| p.join("initdb").exists())
                    .max()
            })
            .expect(
                "PostgreSQL server binaries under /usr/lib/postgresql (scripts/test installs them)",
            );
        let dir = tempfile::tempdir().expect("tempdir");
        let port = crate::aggregator::free_port();
        let as_postgres = |args: &[&str]| {
            let out = std::process::Command::new("runuser")
                .args(["-u", "postgres", "--"])
                .args(args)
                .output()
                .expect("runuser");
            assert!(
                out.status.success(),
                "{args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let data = dir.path().join("data");
        std::fs::create_dir(&data).unwrap();
        let _ = std::process::Command::new("chown")
            .args(["-R", "postgres:postgres"])
            .arg(dir.path())
            .status();
        let data_s = data.display().to_string();
        as_postgres(&[
            &bin.join("initdb").display().to_string(),
            "-D",
            &data_s,
            "-U",
            "postgres",
            "--auth=trust",
            "-E",
            "UTF8",
        ]);
        let pg = PrivatePostgres { dir, bin, port };
        pg.start_again();
        as_postgres(&[
            &pg.bin.join("createdb").display().to_string(),
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-U",
            "postgres",
            "outpost",
        ]);
        pg
    }

    fn pg_ctl(&self, args: &[&str]) -> bool {
        let data = self.dir.path().join("data").display().to_string();
        std::process::Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(self.bin.join("pg_ctl"))
            .args(["-D", &data, "-w", "-t", "30"])
            .args(args)
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
    }

    /// Starts the stopped server.
    pub fn start_again(&self) {
        let opts = format!(
            "-p {} -c listen_addresses=127.0.0.1 -k {} -c fsync=off",
            self.port,
            self.dir.path().display()
        );
        let log = self.dir.path().join("pg.log").display().to_string();
        assert!(
            self.pg_ctl(&["-o", &opts, "-l", &log, "start"]),
            "private PostgreSQL did not start"
        );
    }

    /// Stops the server (fast: open connections are cut).
    pub fn stop(&self) {
        assert!(
            self.pg_ctl(&["-m", "fast", "stop"]),
            "private PostgreSQL did not stop"
        );
    }

    /// URL of its `outpost` database.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/outpost", self.port)
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let _ = self.pg_ctl(&["-m", "immediate", "stop"]);
    }
}
