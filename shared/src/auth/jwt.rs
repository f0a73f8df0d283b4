//! JWT bearer tokens, verified with `jwt-compact`.
//!
//! Each client record pins exactly one algorithm and one key (HS256 secret,
//! or an RS256/ES256/EdDSA public key in PEM). A token whose header names
//! any other algorithm — `none`, or HS256 against an RSA key — fails before
//! its signature is looked at. `exp` is required; `exp`/`nbf` get a leeway.
//! `iss` and `aud` are checked when the record sets them. Permissions come
//! from a `permissions` array claim and/or an OAuth-style `scope` string.
//!
//! The edge finds the client record from the token's `kid` header
//! ([`token_key_id`]), which must be the client id.

use chrono::{DateTime, TimeDelta, Utc};
use jwt_compact::alg::{Ed25519, Es256, Hs256, Hs256Key, Rsa};
use jwt_compact::{AlgorithmExt, Claims, TimeOptions, UntrustedToken, ValidationError};
use serde::{Deserialize, Serialize};

use crate::auth::permission::Permissions;
use crate::error::ErrorCode;

/// Longest token accepted, in bytes (a header cannot carry much more anyway).
pub const MAX_TOKEN_BYTES: usize = 8 * 1024;
/// Shortest HS256 secret accepted: the hash size (RFC 7518 §3.2).
pub const MIN_HS256_SECRET_BYTES: usize = 32;
/// Smallest RSA modulus accepted, in bits.
pub const MIN_RSA_BITS: usize = 2048;

/// The algorithms a key may be pinned to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum JwtAlgorithm {
    /// HMAC-SHA256 with a shared secret.
    #[serde(rename = "HS256")]
    Hs256,
    /// RSASSA-PKCS1-v1_5 with SHA-256.
    #[serde(rename = "RS256")]
    Rs256,
    /// ECDSA on P-256 with SHA-256.
    #[serde(rename = "ES256")]
    Es256,
    /// Ed25519.
    #[serde(rename = "EdDSA")]
    EdDsa,
}

impl JwtAlgorithm {
    /// The JOSE name, as in a token header.
    pub const fn as_str(self) -> &'static str {
        match self {
            JwtAlgorithm::Hs256 => "HS256",
            JwtAlgorithm::Rs256 => "RS256",
            JwtAlgorithm::Es256 => "ES256",
            JwtAlgorithm::EdDsa => "EdDSA",
        }
    }
}

/// A verifying key, pinned to its algorithm.
#[derive(Clone)]
pub enum JwtKey {
    /// Shared secret.
    Hs256(Hs256Key),
    /// RSA public key.
    Rs256(rsa::RsaPublicKey),
    /// P-256 public key.
    Es256(p256::ecdsa::VerifyingKey),
    /// Ed25519 public key.
    EdDsa(ed25519_compact::PublicKey),
}

impl core::fmt::Debug for JwtKey {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        // Never print key material, not even a public key's bytes.
        write!(f, "JwtKey({})", self.algorithm().as_str())
    }
}

/// Why key material was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// The HS256 secret is shorter than [`MIN_HS256_SECRET_BYTES`].
    #[error("an HS256 secret must be at least {MIN_HS256_SECRET_BYTES} bytes")]
    SecretTooShort,
    /// The PEM does not hold a public key of the pinned algorithm.
    #[error("not a {0} public key in PEM (SubjectPublicKeyInfo)")]
    BadPublicKey(&'static str),
    /// The RSA modulus is too small.
    #[error("RSA keys must have at least {MIN_RSA_BITS} bits")]
    RsaTooSmall,
}

impl JwtKey {
    /// An HS256 key from its secret bytes.
    pub fn hs256(secret: &[u8]) -> Result<JwtKey, KeyError> {
        if secret.len() < MIN_HS256_SECRET_BYTES {
            return Err(KeyError::SecretTooShort);
        }
        Ok(JwtKey::Hs256(Hs256Key::new(secret)))
    }

    /// A public key from PEM (SubjectPublicKeyInfo, as `openssl pkey -pubout`
    /// writes it; RSA also as PKCS#1).
    pub fn from_public_pem(alg: JwtAlgorithm, pem: &str) -> Result<JwtKey, KeyError> {
        use p256::pkcs8::DecodePublicKey as _;
        match alg {
            JwtAlgorithm::Hs256 => Err(KeyError::BadPublicKey("HS256 has no")),
            JwtAlgorithm::Rs256 => {
                use rsa::pkcs1::DecodeRsaPublicKey as _;
                use rsa::traits::PublicKeyParts as _;
                let key = rsa::RsaPublicKey::from_public_key_pem(pem)
                    .or_else(|_| rsa::RsaPublicKey::from_pkcs1_pem(pem))
                    .map_err(|_| KeyError::BadPublicKey("RS256"))?;
                if key.n().bits() < MIN_RSA_BITS {
                    return Err(KeyError::RsaTooSmall);
                }
                Ok(JwtKey::Rs256(key))
            }
            JwtAlgorithm::Es256 => p256::ecdsa::VerifyingKey::from_public_key_pem(pem)
                .map(JwtKey::Es256)
                .map_err(|_| KeyError::BadPublicKey("ES256")),
            JwtAlgorithm::EdDsa => ed25519_compact::PublicKey::from_pem(pem)
                .map(JwtKey::EdDsa)
                .map_err(|_| KeyError::BadPublicKey("EdDSA")),
        }
    }

    /// The algorithm this key is pinned to.
    pub fn algorithm(&self) -> JwtAlgorithm {
        match self {
            JwtKey::Hs256(_) => JwtAlgorithm::Hs256,
            JwtKey::Rs256(_) => JwtAlgorithm::Rs256,
            JwtKey::Es256(_) => JwtAlgorithm::Es256,
            JwtKey::EdDsa(_) => JwtAlgorithm::EdDsa,
        }
    }
}

/// What a client record requires of its tokens besides the signature.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct JwtPolicy {
    /// Required `iss`, if set.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub issuer: Option<String>,
    /// Required `aud` (one of the token's audiences), if set.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub audience: Option<String>,
    /// Clock leeway for `exp` and `nbf`, in seconds (default 60).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub leeway_secs: Option<u32>,
}

impl JwtPolicy {
    /// The leeway used when none is configured.
    pub const DEFAULT_LEEWAY_SECS: u32 = 60;
}

/// What a verified token says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedToken {
    /// `sub`, usually the end user.
    pub subject: Option<String>,
    /// `iss`.
    pub issuer: Option<String>,
    /// `exp`, Unix seconds.
    pub expires_at: i64,
    /// From `permissions` and `scope`.
    pub permissions: Permissions,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Audience {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
struct OutpostClaims {
    #[serde(default)]
    iss: Option<String>,
    #[serde(default)]
    sub: Option<String>,
    #[serde(default)]
    aud: Option<Audience>,
    #[serde(default)]
    permissions: Option<Vec<String>>,
    #[serde(default)]
    scope: Option<String>,
}

/// Reads the `kid` header of an unverified token, to find its client record.
pub fn token_key_id(token: &str) -> Option<String> {
    if token.len() > MAX_TOKEN_BYTES {
        return None;
    }
    UntrustedToken::new(token).ok()?.header().key_id.clone()
}

/// Verifies a token against a pinned key and policy at `now_secs`.
pub fn verify(
    token: &str,
    key: &JwtKey,
    policy: &JwtPolicy,
    now_secs: i64,
) -> Result<VerifiedToken, ErrorCode> {
    if token.len() > MAX_TOKEN_BYTES {
        return Err(ErrorCode::MalformedToken);
    }
    let untrusted = UntrustedToken::new(token).map_err(|_| ErrorCode::MalformedToken)?;
    if untrusted.algorithm() != key.algorithm().as_str() {
        return Err(ErrorCode::AlgorithmNotAllowed);
    }
    let checked = match key {
        JwtKey::Hs256(k) => Hs256.validator::<OutpostClaims>(k).validate(&untrusted),
        JwtKey::Rs256(k) => Rsa::rs256()
            .validator::<OutpostClaims>(k)
            .validate(&untrusted),
        JwtKey::Es256(k) => Es256.validator::<OutpostClaims>(k).validate(&untrusted),
        JwtKey::EdDsa(k) => Ed25519.validator::<OutpostClaims>(k).validate(&untrusted),
    };
    let token = checked.map_err(map_validation_error)?;
    let claims: &Claims<OutpostClaims> = token.claims();

    let now = DateTime::<Utc>::from_timestamp(now_secs, 0).ok_or(ErrorCode::Internal)?;
    let leeway = TimeDelta::seconds(i64::from(
        policy.leeway_secs.unwrap_or(JwtPolicy::DEFAULT_LEEWAY_SECS),
    ));
    let options = TimeOptions::new(leeway, move || now);
    claims
        .validate_expiration(&options)
        .map_err(map_validation_error)?;
    if claims.not_before.is_some() {
        claims
            .validate_maturity(&options)
            .map_err(map_validation_error)?;
    }

    let custom = &claims.custom;
    if let Some(want) = &policy.issuer
        && custom.iss.as_ref() != Some(want)
    {
        return Err(ErrorCode::WrongIssuerOrAudience);
    }
    if let Some(want) = &policy.audience {
        let ok = match &custom.aud {
            Some(Audience::One(a)) => a == want,
            Some(Audience::Many(list)) => list.iter().any(|a| a == want),
            None => false,
        };
        if !ok {
            return Err(ErrorCode::WrongIssuerOrAudience);
        }
    }

    let mut granted: Vec<&str> = Vec::new();
    if let Some(list) = &custom.permissions {
        granted.extend(list.iter().map(String::as_str));
    }
    if let Some(scope) = &custom.scope {
        granted.extend(scope.split_ascii_whitespace());
    }
    // A malformed permission string grants nothing rather than failing the token.
    let permissions = Permissions::parse_lenient(granted);

    Ok(VerifiedToken {
        subject: custom.sub.clone(),
        issuer: custom.iss.clone(),
        expires_at: claims.expiration.map(|t| t.timestamp()).unwrap_or_default(),
        permissions,
    })
}

fn map_validation_error(e: ValidationError) -> ErrorCode {
    match e {
        ValidationError::AlgorithmMismatch { .. } => ErrorCode::AlgorithmNotAllowed,
        ValidationError::InvalidSignatureLen { .. }
        | ValidationError::MalformedSignature(_)
        | ValidationError::InvalidSignature => ErrorCode::InvalidSignature,
        ValidationError::Expired => ErrorCode::TokenExpired,
        ValidationError::NotMature => ErrorCode::TokenNotYetValid,
        // Missing `exp`, claims that are not JSON of the right shape, and
        // anything jwt-compact adds later.
        _ => ErrorCode::MalformedToken,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine as _;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
    use jwt_compact::Header;
    use serde_json::{Value, json};

    const NOW: i64 = 1_795_701_600;
    const HS_SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";
    const RS_PRIV: &str = include_str!("testdata/rs256.key.pem");
    const RS_PUB: &str = include_str!("testdata/rs256.pub.pem");
    const RS1024_PUB: &str = include_str!("testdata/rs1024.pub.pem");
    const ES_PRIV: &str = include_str!("testdata/es256.key.pem");
    const ES_PUB: &str = include_str!("testdata/es256.pub.pem");
    const ED_PRIV: &str = include_str!("testdata/eddsa.key.pem");
    const ED_PUB: &str = include_str!("testdata/eddsa.pub.pem");

    fn claims(extra: Value) -> Claims<Value> {
        let mut c = Claims::new(extra);
        c.expiration = DateTime::from_timestamp(NOW + 600, 0);
        c
    }

    fn header() -> Header {
        Header::empty().with_key_id("client-1")
    }

    fn hs(c: &Claims<Value>) -> String {
        Hs256
            .token(&header(), c, &Hs256Key::new(HS_SECRET))
            .unwrap()
    }

    fn rs(c: &Claims<Value>) -> String {
        use rsa::pkcs8::DecodePrivateKey as _;
        let k = rsa::RsaPrivateKey::from_pkcs8_pem(RS_PRIV).unwrap();
        Rsa::rs256().token(&header(), c, &k).unwrap()
    }

    fn es(c: &Claims<Value>) -> String {
        use p256::pkcs8::DecodePrivateKey as _;
        let k = p256::ecdsa::SigningKey::from_pkcs8_pem(ES_PRIV).unwrap();
        Es256.token(&header(), c, &k).unwrap()
    }

    fn ed(c: &Claims<Value>) -> String {
        let k = ed25519_compact::SecretKey::from_pem(ED_PRIV).unwrap();
        Ed25519.token(&header(), c, &k).unwrap()
    }

    /// A token with a hand-made header and claims, signed with HS256 over
    /// whatever the header says (for `none` and confusion attacks).
    fn forged(header: Value, claims: Value, secret: &[u8]) -> String {
        use hmac::Mac as _;
        let signing_input = format!(
            "{}.{}",
            B64.encode(header.to_string()),
            B64.encode(claims.to_string())
        );
        let mut mac = <hmac::Hmac<sha2::Sha256> as hmac::Mac>::new_from_slice(secret).unwrap();
        mac.update(signing_input.as_bytes());
        format!(
            "{signing_input}.{}",
            B64.encode(mac.finalize().into_bytes())
        )
    }

    #[test]
    fn every_algorithm_verifies_its_own_tokens() {
        let c = claims(json!({"sub": "u-1", "permissions": ["write:events"]}));
        let keys = [
            (JwtKey::hs256(HS_SECRET).unwrap(), hs(&c)),
            (
                JwtKey::from_public_pem(JwtAlgorithm::Rs256, RS_PUB).unwrap(),
                rs(&c),
            ),
            (
                JwtKey::from_public_pem(JwtAlgorithm::Es256, ES_PUB).unwrap(),
                es(&c),
            ),
            (
                JwtKey::from_public_pem(JwtAlgorithm::EdDsa, ED_PUB).unwrap(),
                ed(&c),
            ),
        ];
        for (key, token) in &keys {
            let v = verify(token, key, &JwtPolicy::default(), NOW)
                .unwrap_or_else(|e| panic!("{key:?}: {e}"));
            assert_eq!(v.subject.as_deref(), Some("u-1"));
            assert_eq!(v.expires_at, NOW + 600);
            assert!(v.permissions.allows("write", "events"));
            assert_eq!(token_key_id(token).as_deref(), Some("client-1"));
        }
    }

    #[test]
    fn rejection_cases() {
        let hs_key = JwtKey::hs256(HS_SECRET).unwrap();
        let rs_key = JwtKey::from_public_pem(JwtAlgorithm::Rs256, RS_PUB).unwrap();
        let es_key = JwtKey::from_public_pem(JwtAlgorithm::Es256, ES_PUB).unwrap();
        let ok = claims(json!({}));
        let exp_claims = json!({"exp": NOW + 600});
        let mut expired = claims(json!({}));
        expired.expiration = DateTime::from_timestamp(NOW - 61, 0);
        let mut expired_in_leeway = claims(json!({}));
        expired_in_leeway.expiration = DateTime::from_timestamp(NOW - 59, 0);
        let immature =
            claims(json!({})).set_not_before(DateTime::from_timestamp(NOW + 61, 0).unwrap());
        let mut no_exp = claims(json!({}));
        no_exp.expiration = None;
        let mut tampered = hs(&ok);
        let last = tampered.pop().unwrap();
        tampered.push(if last == 'A' { 'B' } else { 'A' });
        let lax = JwtPolicy::default();
        let other_es = JwtKey::from_public_pem(JwtAlgorithm::Es256, &p256_other_pub()).unwrap();
        let strict = JwtPolicy {
            issuer: Some("https://id.example".into()),
            audience: Some("outpost".into()),
            leeway_secs: None,
        };

        let cases: Vec<(&str, String, &JwtKey, &JwtPolicy, ErrorCode)> = vec![
            (
                "alg none",
                format!(
                    "{}.{}.",
                    B64.encode(r#"{"alg":"none"}"#),
                    B64.encode(exp_claims.to_string())
                ),
                &hs_key,
                &lax,
                ErrorCode::AlgorithmNotAllowed,
            ),
            // The classic confusion: an HS256 token keyed with the RSA public key's bytes.
            (
                "HS256 against RS256 key",
                forged(
                    json!({"alg":"HS256"}),
                    exp_claims.clone(),
                    RS_PUB.as_bytes(),
                ),
                &rs_key,
                &lax,
                ErrorCode::AlgorithmNotAllowed,
            ),
            (
                "RS256 against HS256 key",
                rs(&ok),
                &hs_key,
                &lax,
                ErrorCode::AlgorithmNotAllowed,
            ),
            (
                "ES256 token against RS256 key",
                es(&ok),
                &rs_key,
                &lax,
                ErrorCode::AlgorithmNotAllowed,
            ),
            (
                "wrong HS secret",
                forged(
                    json!({"alg":"HS256"}),
                    exp_claims.clone(),
                    b"another-secret-another-secret-32",
                ),
                &hs_key,
                &lax,
                ErrorCode::InvalidSignature,
            ),
            (
                "tampered signature",
                tampered,
                &hs_key,
                &lax,
                ErrorCode::InvalidSignature,
            ),
            (
                "ES256 signed by another key",
                es(&ok),
                &other_es,
                &lax,
                ErrorCode::InvalidSignature,
            ),
            (
                "expired beyond leeway",
                hs(&expired),
                &hs_key,
                &lax,
                ErrorCode::TokenExpired,
            ),
            (
                "not yet valid",
                hs(&immature),
                &hs_key,
                &lax,
                ErrorCode::TokenNotYetValid,
            ),
            (
                "no exp",
                hs(&no_exp),
                &hs_key,
                &lax,
                ErrorCode::MalformedToken,
            ),
            (
                "not a jwt",
                "hello".into(),
                &hs_key,
                &lax,
                ErrorCode::MalformedToken,
            ),
            (
                "oversized",
                "a".repeat(MAX_TOKEN_BYTES + 1),
                &hs_key,
                &lax,
                ErrorCode::MalformedToken,
            ),
            (
                "claims not an object",
                forged(json!({"alg":"HS256"}), json!([1]), HS_SECRET),
                &hs_key,
                &lax,
                ErrorCode::MalformedToken,
            ),
            (
                "missing iss",
                hs(&ok),
                &hs_key,
                &strict,
                ErrorCode::WrongIssuerOrAudience,
            ),
            (
                "wrong aud",
                hs(&claims(
                    json!({"iss": "https://id.example", "aud": ["other"]}),
                )),
                &hs_key,
                &strict,
                ErrorCode::WrongIssuerOrAudience,
            ),
        ];
        for (what, token, key, policy, code) in cases {
            assert_eq!(verify(&token, key, policy, NOW), Err(code), "{what}");
        }
        assert!(verify(&hs(&expired_in_leeway), &hs_key, &JwtPolicy::default(), NOW).is_ok());
        let good = hs(&claims(
            json!({"iss": "https://id.example", "aud": ["x", "outpost"]}),
        ));
        assert!(verify(&good, &hs_key, &strict, NOW).is_ok());
        assert!(
            verify(
                &hs(&claims(
                    json!({"iss": "https://id.example", "aud": "outpost"})
                )),
                &hs_key,
                &strict,
                NOW
            )
            .is_ok()
        );
        let _ = es_key;
    }

    fn p256_other_pub() -> String {
        use p256::pkcs8::EncodePublicKey as _;
        let sk = p256::ecdsa::SigningKey::from_slice(&[7u8; 32]).unwrap();
        sk.verifying_key()
            .to_public_key_pem(Default::default())
            .unwrap()
    }

    #[test]
    fn permissions_come_from_the_claim_and_from_scope() {
        let key = JwtKey::hs256(HS_SECRET).unwrap();
        let t = hs(&claims(
            json!({"permissions": ["read:events"], "scope": "read:stats bogus"}),
        ));
        let v = verify(&t, &key, &JwtPolicy::default(), NOW).unwrap();
        assert!(v.permissions.allows("read", "events"));
        assert!(v.permissions.allows("read", "stats"));
        assert!(!v.permissions.allows("write", "events"));
    }

    #[test]
    fn weak_keys_are_refused() {
        assert_eq!(
            JwtKey::hs256(b"short").unwrap_err(),
            KeyError::SecretTooShort
        );
        assert_eq!(
            JwtKey::from_public_pem(JwtAlgorithm::Rs256, RS1024_PUB).unwrap_err(),
            KeyError::RsaTooSmall
        );
        assert!(JwtKey::from_public_pem(JwtAlgorithm::Es256, RS_PUB).is_err());
        assert!(JwtKey::from_public_pem(JwtAlgorithm::EdDsa, "garbage").is_err());
        assert!(JwtKey::from_public_pem(JwtAlgorithm::Hs256, ES_PUB).is_err());
    }

    #[test]
    fn debug_never_prints_key_material() {
        let k = JwtKey::hs256(HS_SECRET).unwrap();
        assert_eq!(format!("{k:?}"), "JwtKey(HS256)");
    }
}
