//! `outpost clients …`: create, list, show, revoke, activate, rotate,
//! delete and sign. Each returns JSON (printed as is with `--json`, or as
//! text); a secret is shown once, when it is made.

use anyhow::{Context as _, bail};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use outpost_shared::auth::jwt::{JwtAlgorithm, JwtPolicy};
use outpost_shared::auth::permission::Permissions;
use outpost_shared::auth::{api_key, signature};
use outpost_shared::client::{AuthMethod, ClientRecord, Credential, KeyMaterial, Secret};
use outpost_shared::event::Timestamp;
use outpost_shared::ratelimit::RateLimit;
use serde_json::{Value, json};

use outpost_aggregator::clients::{ClientStore, random_bytes};
use outpost_aggregator::delivery::now_ms;

/// How a new client authenticates (command-line names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum MethodArg {
    /// Public write key for browsers.
    WriteKey,
    /// HMAC request signatures.
    Hmac,
    /// API key.
    ApiKey,
    /// JWT with a shared HS256 secret.
    JwtHs256,
    /// JWT, RS256 public key.
    JwtRs256,
    /// JWT, ES256 public key.
    JwtEs256,
    /// JWT, EdDSA public key.
    JwtEddsa,
}

/// Everything `create` takes.
#[derive(Debug, Clone, clap::Args)]
pub struct CreateArgs {
    /// Display name.
    #[arg(long)]
    pub name: String,
    /// Client id (`[a-z0-9][a-z0-9-]{0,63}`); made from the name when omitted.
    #[arg(long)]
    pub id: Option<String>,
    /// Authentication method.
    #[arg(long, value_enum)]
    pub method: MethodArg,
    /// PEM public key, for jwt-rs256 / jwt-es256 / jwt-eddsa.
    #[arg(long)]
    pub public_key_file: Option<std::path::PathBuf>,
    /// Permissions, comma-separated (default: write:events).
    #[arg(long, value_delimiter = ',', default_value = "write:events")]
    pub permissions: Vec<String>,
    /// Requests per period for the client, `LIMIT/SECONDS` (e.g. 1000/60).
    #[arg(long)]
    pub rate_limit: Option<String>,
    /// Requests per period per client IP, `LIMIT/SECONDS`.
    #[arg(long)]
    pub ip_rate_limit: Option<String>,
    /// Allowed browser origins, comma-separated.
    #[arg(long, value_delimiter = ',')]
    pub origins: Vec<String>,
    /// When the client stops working (RFC 3339).
    #[arg(long)]
    pub expires: Option<String>,
    /// Required JWT issuer.
    #[arg(long)]
    pub jwt_issuer: Option<String>,
    /// Required JWT audience.
    #[arg(long)]
    pub jwt_audience: Option<String>,
}

fn parse_rate(s: &Option<String>) -> anyhow::Result<Option<RateLimit>> {
    let Some(s) = s else { return Ok(None) };
    let (l, p) = s
        .split_once('/')
        .context("rate limits are LIMIT/SECONDS, e.g. 1000/60")?;
    Ok(Some(RateLimit {
        limit: l.trim().parse()?,
        period_secs: p.trim().parse()?,
    }))
}

fn slug(name: &str) -> String {
    let s: String = name
        .to_ascii_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    let s = s
        .split('-')
        .filter(|p| !p.is_empty())
        .collect::<Vec<_>>()
        .join("-");
    let s: String = s.chars().take(50).collect();
    let suffix = hex::encode(random_bytes::<3>());
    if s.is_empty() {
        suffix
    } else {
        format!("{s}-{suffix}")
    }
}

/// A fresh credential for a method; the JSON says what to hand the user once.
fn new_credential(
    id: &str,
    method: MethodArg,
    public_key_file: Option<&std::path::Path>,
) -> anyhow::Result<(KeyMaterial, Value)> {
    let secret = random_bytes::<32>();
    // Shared secrets are 43 characters of base64url text, and that text
    // itself is the key: `openssl -hmac "$SECRET"`, Python's
    // `secret.encode()` and JWT libraries all take it as printed.
    let text = B64.encode(secret);
    Ok(match method {
        MethodArg::WriteKey => bail!("write-key clients have no credential: the id is the key"),
        MethodArg::Hmac => (
            KeyMaterial::HmacSecret {
                secret: Secret::new(text.clone().into_bytes()),
            },
            json!({"secret": text}),
        ),
        MethodArg::JwtHs256 => (
            KeyMaterial::JwtSecret {
                secret: Secret::new(text.clone().into_bytes()),
            },
            json!({"jwt_secret": text}),
        ),
        MethodArg::ApiKey => {
            let key = api_key::format(id, &secret);
            (
                KeyMaterial::ApiKeyHash {
                    sha256: api_key::hash(&key),
                },
                json!({"api_key": key}),
            )
        }
        MethodArg::JwtRs256 | MethodArg::JwtEs256 | MethodArg::JwtEddsa => {
            let alg = match method {
                MethodArg::JwtRs256 => JwtAlgorithm::Rs256,
                MethodArg::JwtEs256 => JwtAlgorithm::Es256,
                _ => JwtAlgorithm::EdDsa,
            };
            let path = public_key_file.context("--public-key-file is required for this method")?;
            let pem = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            (KeyMaterial::JwtPublicKey { alg, pem }, json!({}))
        }
    })
}

fn auth_method(m: MethodArg) -> AuthMethod {
    match m {
        MethodArg::WriteKey => AuthMethod::WriteKey,
        MethodArg::Hmac => AuthMethod::Hmac,
        MethodArg::ApiKey => AuthMethod::ApiKey,
        _ => AuthMethod::Jwt,
    }
}

/// A record as shown to people: everything but key material.
pub fn public_view(r: &ClientRecord) -> Value {
    let creds: Vec<Value> = r
        .credentials
        .iter()
        .map(|c| {
            let kind = match &c.key {
                KeyMaterial::HmacSecret { .. } => "hmac_secret".to_owned(),
                KeyMaterial::JwtSecret { .. } => "jwt_secret".to_owned(),
                KeyMaterial::JwtPublicKey { alg, .. } => {
                    format!("jwt_public_key ({})", alg.as_str())
                }
                KeyMaterial::ApiKeyHash { .. } => "api_key_hash".to_owned(),
            };
            json!({"type": kind, "not_after": c.not_after})
        })
        .collect();
    let mut v = serde_json::to_value(r).unwrap_or(Value::Null);
    v["credentials"] = Value::Array(creds);
    v
}

/// `create`.
pub async fn create(store: &ClientStore, a: &CreateArgs) -> anyhow::Result<Value> {
    let id = a.id.clone().unwrap_or_else(|| slug(&a.name));
    if store.get(&id).await?.is_some() {
        bail!("a client {id:?} exists already");
    }
    let mut out = json!({"id": id, "method": auth_method(a.method).as_str()});
    let credentials = if a.method == MethodArg::WriteKey {
        out["write_key"] = Value::from(id.clone());
        Vec::new()
    } else {
        let (key, shown) = new_credential(&id, a.method, a.public_key_file.as_deref())?;
        if let (Value::Object(o), Value::Object(s)) = (&mut out, shown) {
            o.extend(s);
        }
        vec![Credential {
            key,
            not_after: None,
        }]
    };
    let jwt = (a.jwt_issuer.is_some() || a.jwt_audience.is_some()).then(|| JwtPolicy {
        issuer: a.jwt_issuer.clone(),
        audience: a.jwt_audience.clone(),
        leeway_secs: None,
    });
    let record = ClientRecord {
        id: id.as_str().into(),
        name: a.name.clone(),
        method: auth_method(a.method),
        credentials,
        jwt,
        permissions: Permissions::parse(a.permissions.iter().map(String::as_str))?,
        rate_limit: parse_rate(&a.rate_limit)?,
        ip_rate_limit: parse_rate(&a.ip_rate_limit)?,
        allowed_origins: a.origins.clone(),
        active: true,
        expires_at: a
            .expires
            .as_deref()
            .map(|e| Timestamp::parse_rfc3339(e).context("--expires must be RFC 3339"))
            .transpose()?,
    };
    record.check()?;
    store.put(&record).await?;
    Ok(out)
}

async fn load(store: &ClientStore, id: &str) -> anyhow::Result<ClientRecord> {
    store
        .get(id)
        .await?
        .with_context(|| format!("no client {id:?}"))
}

/// `list`.
pub async fn list(store: &ClientStore) -> anyhow::Result<Value> {
    Ok(Value::Array(
        store.list().await?.iter().map(public_view).collect(),
    ))
}

/// `show`.
pub async fn show(store: &ClientStore, id: &str) -> anyhow::Result<Value> {
    Ok(public_view(&load(store, id).await?))
}

/// `revoke` / `activate`.
pub async fn set_active(store: &ClientStore, id: &str, active: bool) -> anyhow::Result<Value> {
    let mut r = load(store, id).await?;
    r.active = active;
    store.put(&r).await?;
    Ok(json!({"id": id, "active": active}))
}

/// `rotate`: a new credential; the old ones keep working for `grace_secs`.
pub async fn rotate(store: &ClientStore, id: &str, grace_secs: u64) -> anyhow::Result<Value> {
    let mut r = load(store, id).await?;
    let method = match r.method {
        AuthMethod::WriteKey => bail!("write-key clients have nothing to rotate"),
        AuthMethod::Hmac => MethodArg::Hmac,
        AuthMethod::ApiKey => MethodArg::ApiKey,
        AuthMethod::Jwt
            if r.credentials
                .iter()
                .any(|c| matches!(c.key, KeyMaterial::JwtSecret { .. })) =>
        {
            MethodArg::JwtHs256
        }
        AuthMethod::Jwt => bail!(
            "public-key JWT clients rotate by adding a key: create the new key pair, then use --public-key-file"
        ),
    };
    let (key, shown) = new_credential(id, method, None)?;
    let now = now_ms();
    let until = Timestamp(now + i64::try_from(grace_secs).unwrap_or(i64::MAX / 1000) * 1000);
    for c in &mut r.credentials {
        c.not_after = Some(c.not_after.map_or(until, |t| t.min(until)));
    }
    // Credentials past their grace period are dropped for good.
    r.credentials
        .retain(|c| c.not_after.is_none_or(|t| t.millis() > now));
    r.credentials.push(Credential {
        key,
        not_after: None,
    });
    store.put(&r).await?;
    let mut out = json!({"id": id, "old_credentials_valid_until": until});
    if let (Value::Object(o), Value::Object(s)) = (&mut out, shown) {
        o.extend(s);
    }
    Ok(out)
}

/// `delete`.
pub async fn delete(store: &ClientStore, id: &str, force: bool) -> anyhow::Result<Value> {
    if !force {
        bail!("deleting a client cannot be undone: add --force (or `outpost clients revoke {id}`)");
    }
    if !store.delete(id).await? {
        bail!("no client {id:?}");
    }
    Ok(json!({"id": id, "deleted": true}))
}

/// `sign`: the headers for a request signed with the client's newest HMAC secret.
pub async fn sign(
    store: &ClientStore,
    id: &str,
    method: &str,
    path: &str,
    body: &[u8],
    nonce: Option<&str>,
) -> anyhow::Result<Value> {
    let r = load(store, id).await?;
    let now = now_ms();
    let secret = r
        .hmac_secrets(Timestamp(now))
        .last()
        .context("this client has no HMAC secret")?
        .to_vec();
    let ts = now / 1000;
    let sig = signature::sign(&secret, method, path, ts, nonce, body);
    let mut h = json!({"X-Outpost-Key": id, "X-Outpost-Timestamp": ts.to_string(), "X-Outpost-Signature": sig});
    if let Some(n) = nonce {
        h["X-Outpost-Nonce"] = Value::from(n);
    }
    Ok(h)
}

#[derive(clap::Subcommand)]
pub enum ClientsCommand {
    /// Create a client; its secret or API key is printed once.
    Create(CreateArgs),
    /// List clients (no key material).
    List,
    /// Show one client (no key material).
    Show {
        /// Client id.
        id: String,
    },
    /// Stop a client from sending (edges notice within their cache TTL).
    Revoke {
        /// Client id.
        id: String,
    },
    /// Let a revoked client send again.
    Activate {
        /// Client id.
        id: String,
    },
    /// Issue a new secret or API key; the old one works for the grace period.
    Rotate {
        /// Client id.
        id: String,
        /// How long the old credential keeps working, seconds.
        #[arg(long, default_value_t = 86_400)]
        grace_secs: u64,
    },
    /// Delete a client for good.
    Delete {
        /// Client id.
        id: String,
        /// Yes, really.
        #[arg(long)]
        force: bool,
    },
    /// Print the signature headers for a request, with the client's HMAC secret.
    Sign {
        /// Client id.
        id: String,
        /// HTTP method.
        #[arg(long, default_value = "POST")]
        method: String,
        /// Path and query.
        #[arg(long, default_value = "/v1/batch")]
        path: String,
        /// Body (default: empty).
        #[arg(long, default_value = "")]
        body: String,
        /// Nonce.
        #[arg(long)]
        nonce: Option<String>,
    },
}

/// `outpost clients …`: JSON with `--json`, else readable lines.
pub fn main(
    config: Option<&std::path::Path>,
    json: bool,
    command: ClientsCommand,
) -> anyhow::Result<()> {
    let config = outpost_aggregator::config::Config::load_unchecked(config)?;
    let out = super::runtime()?.block_on(async {
        let db = outpost_aggregator::db::open(&config).await?;
        let store = outpost_aggregator::clients::ClientStore::new(
            db,
            outpost_aggregator::clients::SecretsKey::from_env()?,
        );
        match command {
            ClientsCommand::Create(a) => create(&store, &a).await,
            ClientsCommand::List => list(&store).await,
            ClientsCommand::Show { id } => show(&store, &id).await,
            ClientsCommand::Revoke { id } => set_active(&store, &id, false).await,
            ClientsCommand::Activate { id } => set_active(&store, &id, true).await,
            ClientsCommand::Rotate { id, grace_secs } => rotate(&store, &id, grace_secs).await,
            ClientsCommand::Delete { id, force } => delete(&store, &id, force).await,
            ClientsCommand::Sign {
                id,
                method,
                path,
                body,
                nonce,
            } => {
                sign(
                    &store,
                    &id,
                    &method,
                    &path,
                    body.as_bytes(),
                    nonce.as_deref(),
                )
                .await
            }
        }
    })?;
    if json {
        println!("{out}");
    } else {
        print_text(&out);
    }
    Ok(())
}

/// Human-readable output: one `key: value` line per field, one line per
/// list entry.
fn print_text(v: &serde_json::Value) {
    let scalar = |v: &serde_json::Value| match v {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    match v {
        serde_json::Value::Array(items) => {
            for i in items {
                println!(
                    "{:<24} {:<10} {:<6} {} [{}]",
                    scalar(&i["id"]),
                    scalar(&i["method"]),
                    if i["active"] == true {
                        "active"
                    } else {
                        "REVOKED"
                    },
                    scalar(&i["name"]),
                    i["permissions"]
                        .as_array()
                        .map(|p| p.iter().map(scalar).collect::<Vec<_>>().join(", "))
                        .unwrap_or_default()
                );
            }
        }
        serde_json::Value::Object(map) => {
            for (k, v) in map {
                println!("{k}: {}", scalar(v));
            }
            if map
                .keys()
                .any(|k| k == "secret" || k == "api_key" || k == "jwt_secret")
            {
                println!("(store the secret now: it is not shown again)");
            }
        }
        other => println!("{}", scalar(other)),
    }
}
