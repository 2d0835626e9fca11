//! `GenerateJwt` (Apigee's `GenerateJWT`): signs a JSON Web Token and puts it in a flow
//! variable (typically then set as an upstream header by AssignMessage).
//!
//! ```yaml
//! spec:
//!   type: GenerateJwt
//!   algorithm: RS256          # RS256/384/512, PS256/384/512, ES256, ES384, HS256/384/512
//!   privateKey:               # RS, PS, ES: a PEM private key (PKCS#8, or PKCS#1 for RSA)
//!     file: keys/signing.pem  # beside the configuration, read at load; or
//!     # value: "{private.signing-key}"   # a template: a variable (a KVM get) per request
//!     id: key-1               # the `kid` header (a template)
//!   # secretKey: {value: "{private.secret}", encoding: base64, id: k1}   # HS: utf-8 (default) | base64 | hex
//!   issuer: urn://tollgate
//!   subject: "{client_id}"
//!   audience: [backend]       # one or more (templates)
//!   expiresIn: 1h             # ms | s | m | h | d | w; no unit: seconds. None: no `exp`
//!   notBeforeIn: 0s           # `nbf` relative to now (may be omitted)
//!   id: ""                    # `jti`: empty generates a UUID (Apigee's `<Id/>`)
//!   additionalClaims: {tier: "{verifyapikey.key.apiproduct.tier}", admin: false}
//!   additionalHeaders: {x-origin: tollgate}
//!   outputVariable: upstream.jwt   # default jwt.<policy>.generated_jwt
//!   ignoreUnresolvedVariables: false
//! ```
//!
//! `iat` is always set. String values of claims and headers are templates; other YAML values
//! (numbers, booleans, lists, maps) are sent as JSON. With `ignoreUnresolvedVariables:
//! false` (the default, as Apigee's) a claim or header template referring to a variable that
//! does not resolve fails the step; with `true` it renders what resolves. A key taken from
//! a variable is parsed on first use and kept while the variable's text stays the same.
//!
//! Faults, 401 with Apigee's codes (as its JWT policies use): `steps.jwt.FailedToResolveVariable`
//! (a key or claim variable that does not resolve), `steps.jwt.KeyParsingFailed` (a key
//! variable that is not a key for the algorithm), `steps.jwt.InsufficientKeyLength` (an HMAC
//! secret shorter than the hash: 32 bytes for HS256), `steps.jwt.SigningFailed`. Literal and
//! file keys are checked at load.

use std::collections::BTreeMap;
use std::sync::Arc;

use base64::Engine as _;
use jsonwebtoken::{Algorithm, EncodingKey};
use parking_lot::Mutex;
use serde::Deserialize;

use super::{parse_spec, read_config_file, BuildContext, SpecError};
use crate::expr::Template;
use crate::fault::Fault;
use crate::pipeline::{Direction, Hook, Outcome, Policy};
use crate::vars::Exchange;

pub const TYPE: &str = "GenerateJwt";
pub const APIGEE_TYPE: &str = "GenerateJWT";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Spec {
    algorithm: String,
    #[serde(default)]
    private_key: Option<KeySpec>,
    #[serde(default)]
    secret_key: Option<KeySpec>,
    #[serde(default)]
    issuer: Option<String>,
    #[serde(default)]
    subject: Option<String>,
    #[serde(default)]
    audience: Option<OneOrMany>,
    #[serde(default)]
    expires_in: Option<String>,
    #[serde(default)]
    not_before_in: Option<String>,
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    additional_claims: BTreeMap<String, serde_json::Value>,
    #[serde(default)]
    additional_headers: BTreeMap<String, serde_json::Value>,
    #[serde(default)]
    output_variable: Option<String>,
    #[serde(default)]
    ignore_unresolved_variables: bool,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct KeySpec {
    #[serde(default)]
    value: Option<String>,
    #[serde(default)]
    file: Option<String>,
    #[serde(default)]
    id: Option<String>,
    /// HMAC secrets only: how `value`/`file` encode the bytes.
    #[serde(default)]
    encoding: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Encoding {
    Utf8,
    Base64,
    Hex,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Family {
    Rsa,
    Ec,
    Hmac,
}

/// Where the signing key comes from.
enum KeySource {
    Fixed(Arc<EncodingKey>),
    /// Rendered per request; the last parse is kept by its text.
    Template(Template, Mutex<Option<(String, Arc<EncodingKey>)>>),
}

impl std::fmt::Debug for KeySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            KeySource::Fixed(_) => "Fixed(..)",
            KeySource::Template(..) => "Template(..)",
        })
    }
}

/// A claim or header value: a template (strings) or fixed JSON.
#[derive(Debug)]
enum ClaimValue {
    Text(Template),
    Json(serde_json::Value),
}

#[derive(Debug)]
struct GenerateJwt {
    alg: Algorithm,
    family: Family,
    encoding: Encoding,
    key: KeySource,
    kid: Option<Template>,
    issuer: Option<Template>,
    subject: Option<Template>,
    audience: Vec<Template>,
    expires_in_ms: Option<i64>,
    not_before_ms: Option<i64>,
    /// `Some(None)`: generate a UUID.
    jti: Option<Option<Template>>,
    claims: Vec<(String, ClaimValue)>,
    headers: Vec<(String, ClaimValue)>,
    output: String,
    ignore_unresolved: bool,
}

fn algorithm(s: &str) -> Result<(Algorithm, Family), String> {
    Ok(match s {
        "RS256" => (Algorithm::RS256, Family::Rsa),
        "RS384" => (Algorithm::RS384, Family::Rsa),
        "RS512" => (Algorithm::RS512, Family::Rsa),
        "PS256" => (Algorithm::PS256, Family::Rsa),
        "PS384" => (Algorithm::PS384, Family::Rsa),
        "PS512" => (Algorithm::PS512, Family::Rsa),
        "ES256" => (Algorithm::ES256, Family::Ec),
        "ES384" => (Algorithm::ES384, Family::Ec),
        "HS256" => (Algorithm::HS256, Family::Hmac),
        "HS384" => (Algorithm::HS384, Family::Hmac),
        "HS512" => (Algorithm::HS512, Family::Hmac),
        other => {
            return Err(format!(
                "`{other}`: RS256, RS384, RS512, PS256, PS384, PS512, ES256, ES384, HS256, HS384 or HS512"
            ))
        }
    })
}

/// Apigee's time interval: a number with `ms`, `s`, `m`, `h`, `d` or `w` (no unit:
/// seconds), in milliseconds.
fn interval_ms(s: &str) -> Option<i64> {
    let s = s.trim();
    let digits = s.bytes().take_while(u8::is_ascii_digit).count();
    let n: i64 = s[..digits].parse().ok()?;
    let unit: i64 = match s[digits..].trim() {
        "ms" => 1,
        "" | "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        "w" => 604_800_000,
        _ => return None,
    };
    n.checked_mul(unit)
}

/// The least secret length for an HMAC algorithm, in bytes (the hash's size; Apigee's
/// `InsufficientKeyLength`).
fn min_secret(alg: Algorithm) -> usize {
    match alg {
        Algorithm::HS384 => 48,
        Algorithm::HS512 => 64,
        _ => 32,
    }
}

fn make_key(
    family: Family,
    alg: Algorithm,
    encoding: Encoding,
    text: &[u8],
) -> Result<EncodingKey, (&'static str, String)> {
    match family {
        Family::Rsa => EncodingKey::from_rsa_pem(text)
            .map_err(|e| ("KeyParsingFailed", format!("not an RSA private key: {e}"))),
        Family::Ec => EncodingKey::from_ec_pem(text).map_err(|e| {
            (
                "KeyParsingFailed",
                format!("not an EC private key (PKCS#8): {e}"),
            )
        }),
        Family::Hmac => {
            let bytes = match encoding {
                Encoding::Utf8 => text.to_vec(),
                Encoding::Base64 => {
                    let t: Vec<u8> = text
                        .iter()
                        .copied()
                        .filter(|c| !c.is_ascii_whitespace())
                        .collect();
                    base64::engine::general_purpose::STANDARD
                        .decode(&t)
                        .or_else(|_| base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(&t))
                        .map_err(|e| ("KeyParsingFailed", format!("not base64: {e}")))?
                }
                Encoding::Hex => {
                    let t = std::str::from_utf8(text)
                        .map_err(|_| ("KeyParsingFailed", "not hex".to_owned()))?
                        .trim();
                    if t.len() % 2 != 0 {
                        return Err(("KeyParsingFailed", "not hex".to_owned()));
                    }
                    (0..t.len())
                        .step_by(2)
                        .map(|i| u8::from_str_radix(&t[i..i + 2], 16))
                        .collect::<Result<Vec<u8>, _>>()
                        .map_err(|_| ("KeyParsingFailed", "not hex".to_owned()))?
                }
            };
            if bytes.len() < min_secret(alg) {
                return Err((
                    "InsufficientKeyLength",
                    format!(
                        "the secret has {} bytes; {alg:?} needs at least {}",
                        bytes.len(),
                        min_secret(alg)
                    ),
                ));
            }
            Ok(EncodingKey::from_secret(&bytes))
        }
    }
}

fn compile(field: &str, s: &str) -> Result<Template, SpecError> {
    Template::compile(s).map_err(|e| SpecError::new(field, e.to_string()))
}

fn claim_values(
    field: &str,
    map: BTreeMap<String, serde_json::Value>,
    reserved: &[&str],
) -> Result<Vec<(String, ClaimValue)>, SpecError> {
    map.into_iter()
        .map(|(k, v)| {
            let at = format!("{field}.{k}");
            if k.is_empty() || reserved.contains(&k.as_str()) {
                return Err(SpecError::new(
                    at,
                    "set by the policy itself (use its own field)",
                ));
            }
            let v = match v {
                serde_json::Value::String(s) => ClaimValue::Text(compile(&at, &s)?),
                other => ClaimValue::Json(other),
            };
            Ok((k, v))
        })
        .collect()
}

pub fn build(ctx: &BuildContext, spec: serde_norway::Value) -> Result<Arc<dyn Policy>, SpecError> {
    let spec: Spec = parse_spec(spec)?;
    let (alg, family) =
        algorithm(spec.algorithm.trim()).map_err(|m| SpecError::new("algorithm", m))?;
    let (key_field, key) = match (family, spec.private_key, spec.secret_key) {
        (Family::Hmac, None, Some(k)) => ("secretKey", k),
        (Family::Rsa | Family::Ec, Some(k), None) => ("privateKey", k),
        (Family::Hmac, ..) => {
            return Err(SpecError::new(
                "secretKey",
                "HS algorithms take secretKey (only)",
            ))
        }
        _ => {
            return Err(SpecError::new(
                "privateKey",
                "RS, PS and ES algorithms take privateKey (only)",
            ))
        }
    };
    let encoding = match (family, key.encoding.as_deref()) {
        (_, None) => Encoding::Utf8,
        (Family::Hmac, Some(e)) => match e.to_ascii_lowercase().as_str() {
            "utf-8" | "utf8" => Encoding::Utf8,
            "base64" | "base64url" => Encoding::Base64,
            "hex" | "base16" => Encoding::Hex,
            other => {
                return Err(SpecError::new(
                    format!("{key_field}.encoding"),
                    format!("`{other}`: utf-8, base64 or hex"),
                ))
            }
        },
        (_, Some(_)) => {
            return Err(SpecError::new(
                format!("{key_field}.encoding"),
                "only for secretKey",
            ))
        }
    };
    let fixed = |text: &[u8], field: &str| {
        make_key(family, alg, encoding, text)
            .map(|k| KeySource::Fixed(Arc::new(k)))
            .map_err(|(_, m)| SpecError::new(field, m))
    };
    let source = match (&key.value, &key.file) {
        (Some(v), None) => {
            let field = format!("{key_field}.value");
            let t = compile(&field, v)?;
            if t.is_static() {
                fixed(v.as_bytes(), &field)?
            } else {
                KeySource::Template(t, Mutex::new(None))
            }
        }
        (None, Some(f)) => {
            let field = format!("{key_field}.file");
            let bytes = read_config_file(ctx, &field, f)?;
            let bytes = if encoding == Encoding::Utf8 {
                bytes
            } else {
                // A base64 or hex secret in a file usually ends in a newline.
                bytes.trim_ascii().to_vec()
            };
            fixed(&bytes, &field)?
        }
        _ => {
            return Err(SpecError::new(
                key_field,
                "give value (a literal or template) or file",
            ))
        }
    };
    let opt = |field: &str, s: &Option<String>| s.as_deref().map(|s| compile(field, s)).transpose();
    let audience = match spec.audience {
        None => Vec::new(),
        Some(OneOrMany::One(a)) => vec![compile("audience", &a)?],
        Some(OneOrMany::Many(list)) => list
            .iter()
            .enumerate()
            .map(|(i, a)| compile(&format!("audience[{i}]"), a))
            .collect::<Result<_, _>>()?,
    };
    let time = |field: &str, s: &Option<String>| {
        s.as_deref()
            .map(|s| {
                interval_ms(s).ok_or_else(|| {
                    SpecError::new(field, format!("`{s}`: a number with ms, s, m, h, d or w"))
                })
            })
            .transpose()
    };
    let output = spec
        .output_variable
        .unwrap_or_else(|| format!("jwt.{}.generated_jwt", ctx.name));
    if output.is_empty()
        || output.starts_with("request.")
        || output.starts_with("response.")
        || !output
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
    {
        return Err(SpecError::new(
            "outputVariable",
            format!("`{output}` is not a variable a policy may set"),
        ));
    }
    Ok(Arc::new(GenerateJwt {
        alg,
        family,
        encoding,
        key: source,
        kid: opt(&format!("{key_field}.id"), &key.id)?,
        issuer: opt("issuer", &spec.issuer)?,
        subject: opt("subject", &spec.subject)?,
        audience,
        expires_in_ms: time("expiresIn", &spec.expires_in)?,
        not_before_ms: time("notBeforeIn", &spec.not_before_in)?,
        jti: match spec.id {
            None => None,
            Some(s) if s.trim().is_empty() => Some(None),
            Some(s) => Some(Some(compile("id", &s)?)),
        },
        claims: claim_values(
            "additionalClaims",
            spec.additional_claims,
            &["iss", "sub", "aud", "exp", "nbf", "iat", "jti"],
        )?,
        headers: claim_values(
            "additionalHeaders",
            spec.additional_headers,
            &["alg", "typ", "kid", "crit"],
        )?,
        output,
        ignore_unresolved: spec.ignore_unresolved_variables,
    }))
}

fn fault(code: &str, message: String) -> Fault {
    Fault::new(401, format!("steps.jwt.{code}"), message)
}

fn uuid_v4() -> String {
    let mut b = [0u8; 16];
    // The OS's randomness; a failure leaves zeros, which only weakens uniqueness of `jti`.
    let _ = getrandom::fill(&mut b);
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

impl GenerateJwt {
    fn render(&self, t: &Template, ex: &Exchange, strict: bool) -> Result<String, Fault> {
        if strict {
            if let Some(v) = t.variables().find(|v| ex.resolve(v).is_none()) {
                return Err(fault(
                    "FailedToResolveVariable",
                    format!("Failed to resolve variable {v}"),
                ));
            }
        }
        Ok(t.render(ex))
    }

    fn value(&self, v: &ClaimValue, ex: &Exchange) -> Result<serde_json::Value, Fault> {
        Ok(match v {
            ClaimValue::Text(t) => {
                serde_json::Value::String(self.render(t, ex, !self.ignore_unresolved)?)
            }
            ClaimValue::Json(j) => j.clone(),
        })
    }

    fn key(&self, ex: &Exchange) -> Result<Arc<EncodingKey>, Fault> {
        match &self.key {
            KeySource::Fixed(k) => Ok(Arc::clone(k)),
            KeySource::Template(t, cache) => {
                // A key must resolve whatever ignoreUnresolvedVariables says.
                let text = self.render(t, ex, true)?;
                if let Some((cached, k)) = cache.lock().as_ref() {
                    if *cached == text {
                        return Ok(k.clone());
                    }
                }
                let k = Arc::new(
                    make_key(self.family, self.alg, self.encoding, text.as_bytes())
                        .map_err(|(code, m)| fault(code, m))?,
                );
                *cache.lock() = Some((text, k.clone()));
                Ok(k)
            }
        }
    }

    fn sign(&self, ex: &Exchange, now_ms: i64) -> Result<String, Fault> {
        let key = self.key(ex)?;
        let strict = !self.ignore_unresolved;
        let mut header = serde_json::Map::new();
        header.insert(
            "alg".into(),
            serde_json::to_value(self.alg).unwrap_or_default(),
        );
        header.insert("typ".into(), "JWT".into());
        if let Some(k) = &self.kid {
            let kid = self.render(k, ex, strict)?;
            if !kid.is_empty() {
                header.insert("kid".into(), kid.into());
            }
        }
        for (n, v) in &self.headers {
            header.insert(n.clone(), self.value(v, ex)?);
        }
        let mut claims = serde_json::Map::new();
        let now_s = now_ms.div_euclid(1000);
        for (name, t) in [("iss", &self.issuer), ("sub", &self.subject)] {
            if let Some(t) = t {
                claims.insert(name.into(), self.render(t, ex, strict)?.into());
            }
        }
        match self.audience.as_slice() {
            [] => {}
            [one] => {
                claims.insert("aud".into(), self.render(one, ex, strict)?.into());
            }
            many => {
                let list = many
                    .iter()
                    .map(|t| self.render(t, ex, strict).map(serde_json::Value::from))
                    .collect::<Result<Vec<_>, _>>()?;
                claims.insert("aud".into(), list.into());
            }
        }
        claims.insert("iat".into(), now_s.into());
        if let Some(e) = self.expires_in_ms {
            claims.insert("exp".into(), (now_ms + e).div_euclid(1000).into());
        }
        if let Some(n) = self.not_before_ms {
            claims.insert("nbf".into(), (now_ms + n).div_euclid(1000).into());
        }
        match &self.jti {
            None => {}
            Some(None) => {
                claims.insert("jti".into(), uuid_v4().into());
            }
            Some(Some(t)) => {
                claims.insert("jti".into(), self.render(t, ex, strict)?.into());
            }
        }
        for (n, v) in &self.claims {
            claims.insert(n.clone(), self.value(v, ex)?);
        }
        let b64 = |v: &serde_json::Map<String, serde_json::Value>| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .encode(serde_json::Value::Object(v.clone()).to_string())
        };
        let message = format!("{}.{}", b64(&header), b64(&claims));
        let sig = jsonwebtoken::crypto::sign(message.as_bytes(), &key, self.alg)
            .map_err(|e| fault("SigningFailed", format!("Failed to sign the token: {e}")))?;
        Ok(format!("{message}.{sig}"))
    }
}

impl Policy for GenerateJwt {
    fn type_name(&self) -> &'static str {
        TYPE
    }

    fn run<'a>(&'a self, ex: &'a mut Exchange, _dir: Direction) -> Hook<'a> {
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
            .unwrap_or(0);
        Hook::Ready(match self.sign(ex, now_ms) {
            Ok(token) => {
                ex.set_var(self.output.clone(), token);
                Outcome::Continue
            }
            Err(f) => Outcome::Reject(f),
        })
    }
}

#[cfg(test)]
#[path = "generate_jwt_tests.rs"]
mod tests;
