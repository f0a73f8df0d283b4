//! The shared rules from the command line, for scripts and debugging:
//! `outpost sign` (request signatures) and `outpost validate` (what the
//! edge would answer for a batch body).

use outpost_shared::auth::signature;
use outpost_shared::error::AcceptedResponse;
use outpost_shared::validate::{Limits, parse_batch};
use outpost_shared::{ErrorEnvelope, Timestamp};

use super::{now_millis, read_stdin};

/// `outpost sign`'s options.
#[derive(Debug, clap::Args)]
pub struct SignArgs {
    /// Client id (`X-Outpost-Key`).
    #[arg(long)]
    pub key_id: String,
    /// The client's HMAC secret; read from OUTPOST_SIGNING_SECRET when omitted.
    #[arg(long, env = "OUTPOST_SIGNING_SECRET", hide_env_values = true)]
    pub secret: String,
    /// HTTP method.
    #[arg(long, default_value = "POST")]
    pub method: String,
    /// Path and query, exactly as sent.
    #[arg(long, default_value = "/v1/batch")]
    pub path: String,
    /// Body; stdin when omitted.
    #[arg(long)]
    pub body: Option<String>,
    /// Unix seconds; now when omitted.
    #[arg(long)]
    pub timestamp: Option<i64>,
    /// Nonce; none when omitted.
    #[arg(long)]
    pub nonce: Option<String>,
    /// Print JSON instead of header lines.
    #[arg(long)]
    pub json: bool,
}

/// `outpost sign`: the signature headers, as lines or JSON.
pub fn sign(a: SignArgs) -> anyhow::Result<()> {
    let SignArgs {
        key_id,
        secret,
        method,
        path,
        body,
        timestamp,
        nonce,
        json,
    } = a;
    let body = match body {
        Some(b) => b.into_bytes(),
        None => read_stdin()?,
    };
    let ts = timestamp.unwrap_or(now_millis() / 1000);
    let sig = signature::sign(
        secret.as_bytes(),
        &method,
        &path,
        ts,
        nonce.as_deref(),
        &body,
    );
    let mut headers = vec![
        ("X-Outpost-Key", key_id),
        ("X-Outpost-Timestamp", ts.to_string()),
    ];
    if let Some(n) = nonce {
        headers.push(("X-Outpost-Nonce", n));
    }
    headers.push(("X-Outpost-Signature", sig));
    if json {
        let map: serde_json::Map<String, serde_json::Value> = headers
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.into()))
            .collect();
        println!("{}", serde_json::Value::Object(map));
    } else {
        for (k, v) in headers {
            println!("{k}: {v}");
        }
    }
    Ok(())
}

/// `outpost validate`: the edge's answer for the body on stdin (exit 1
/// when the whole request is refused).
pub fn validate() -> anyhow::Result<()> {
    let body = read_stdin()?;
    let request_id = "local";
    match parse_batch(&body, &Limits::default(), Timestamp(now_millis())) {
        Ok(out) => {
            let resp = AcceptedResponse {
                success: true,
                accepted: out.accepted.len(),
                rejected: out.rejected.len(),
                errors: out.rejected,
                request_id: request_id.into(),
            };
            println!("{}", serde_json::to_string_pretty(&resp)?);
        }
        Err(e) => {
            let env = ErrorEnvelope::new(e.code, request_id)
                .with_message(e.message.clone())
                .with_errors(vec![e]);
            println!("{}", serde_json::to_string_pretty(&env)?);
            std::process::exit(1);
        }
    }
    Ok(())
}
