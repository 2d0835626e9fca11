//! What clients send: JSON bodies parsed strictly (the offending field named), path
//! parameters, and the checks of names and texts every resource shares.

use std::collections::BTreeMap;
use std::fmt;

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::Path;
use axum::http::{header, HeaderMap, StatusCode};
use serde::de::{DeserializeOwned, Error as _, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer};
use serde_json::{Map, Value};

use super::errors::ApiError;

/// Largest request body accepted (413 beyond).
pub const BODY_LIMIT: usize = 1 << 20;

pub(super) const MAX_NAME_LEN: usize = 253;
pub(super) const MAX_TEXT_LEN: usize = 4096;

/// A JSON value parsed strictly: an object with the same field twice is refused (plain
/// `serde_json::Value` keeps the last one silently).
struct Strict(Value);

impl<'de> Deserialize<'de> for Strict {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(StrictVisitor).map(Strict)
    }
}

struct StrictVisitor;

impl<'de> Visitor<'de> for StrictVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number))
    }
    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }
    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut out = Vec::new();
        while let Some(Strict(v)) = seq.next_element()? {
            out.push(v);
        }
        Ok(Value::Array(out))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut out = Map::new();
        while let Some(k) = map.next_key::<String>()? {
            if out.contains_key(&k) {
                return Err(A::Error::custom(format!("duplicate field `{}`", show(&k))));
            }
            let Strict(v) = map.next_value()?;
            out.insert(k, v);
        }
        Ok(Value::Object(out))
    }
}

/// The field an error is about: the path where deserialization stopped, completed with the
/// field a "missing field" or "duplicate field" message names.
fn field_of(path: &serde_path_to_error::Path, message: &str) -> Option<String> {
    let p = path.to_string();
    let at = (p != "." && p != "?").then_some(p);
    let named = ["missing field `", "duplicate field `"]
        .iter()
        .find_map(|prefix| message.strip_prefix(prefix))
        .and_then(|rest| rest.split_once('`'))
        .map(|(name, _)| name.to_owned());
    match (at, named) {
        (Some(at), Some(name)) if !at.ends_with(&format!(".{name}")) && at != name => {
            Some(format!("{at}.{name}"))
        }
        (None, Some(name)) => Some(name),
        (at, _) => at,
    }
}

/// The request body as a JSON object (`None`: an empty body). Refuses a non-JSON content
/// type (415), an oversized body (413), and malformed JSON, duplicate fields or anything
/// other than an object (400).
pub(super) fn body_object(
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Option<Map<String, Value>>, ApiError> {
    if let Some(ct) = headers.get(header::CONTENT_TYPE) {
        let essence = ct
            .to_str()
            .unwrap_or("")
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        let json = essence == "application/json"
            || (essence.starts_with("application/") && essence.ends_with("+json"));
        if !json {
            return Err(ApiError::UnsupportedMediaType(
                "request bodies must be JSON (`Content-Type: application/json`)".into(),
            ));
        }
    }
    let bytes = body.map_err(|r| {
        if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::PayloadTooLarge(format!(
                "the request body exceeds the limit of {BODY_LIMIT} bytes"
            ))
        } else {
            ApiError::InvalidArgument {
                message: format!("cannot read the request body: {}", r.body_text()),
                field: None,
            }
        }
    })?;
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    let mut de = serde_json::Deserializer::from_slice(&bytes);
    let value = serde_path_to_error::deserialize::<_, Strict>(&mut de)
        .map_err(|e| {
            let path = e.path().clone();
            let inner = e.into_inner();
            if inner.is_syntax() || inner.is_eof() {
                ApiError::InvalidArgument {
                    message: format!("malformed JSON: {inner}"),
                    field: None,
                }
            } else {
                let message = inner.to_string();
                ApiError::InvalidArgument {
                    field: field_of(&path, &message),
                    message,
                }
            }
        })
        .and_then(|Strict(v)| {
            de.end().map_err(|e| ApiError::InvalidArgument {
                message: format!("malformed JSON: {e}"),
                field: None,
            })?;
            Ok(v)
        })?;
    match value {
        Value::Object(m) => Ok(Some(m)),
        _ => Err(ApiError::InvalidArgument {
            message: "the request body must be a JSON object".into(),
            field: None,
        }),
    }
}

/// A required JSON object body.
pub(super) fn required_object(
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Map<String, Value>, ApiError> {
    body_object(headers, body)?.ok_or_else(|| ApiError::InvalidArgument {
        message: "a JSON object body is required".into(),
        field: None,
    })
}

/// Deserializes an object into `T`, naming the offending field on error (unknown fields,
/// wrong types, missing fields).
pub(super) fn decode<T: DeserializeOwned>(object: Map<String, Value>) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(Value::Object(object)).map_err(|e| {
        let path = e.path().clone();
        let message = e.into_inner().to_string();
        ApiError::InvalidArgument {
            field: field_of(&path, &message),
            message,
        }
    })
}

pub(super) fn path_param<T>(p: Result<Path<T>, PathRejection>) -> Result<T, ApiError> {
    p.map(|Path(v)| v).map_err(|r| ApiError::InvalidArgument {
        message: format!("invalid path: {}", r.body_text()),
        field: None,
    })
}

/// A value for a message: control characters escaped, long values cut.
pub(super) fn show(s: &str) -> String {
    const MAX: usize = 64;
    let mut out: String = s.chars().take(MAX).flat_map(char::escape_debug).collect();
    if s.chars().nth(MAX).is_some() {
        out.push('…');
    }
    out
}

pub(super) fn check_name(value: &str, field: &str) -> Result<(), ApiError> {
    if value.is_empty() || value.len() > MAX_NAME_LEN {
        return Err(ApiError::invalid(
            field,
            format!("`{field}` must be 1 to {MAX_NAME_LEN} characters long"),
        ));
    }
    if !value
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return Err(ApiError::invalid(
            field,
            format!(
                "`{field}` may contain only letters, digits, `.`, `_` and `-` (got `{}`)",
                show(value)
            ),
        ));
    }
    Ok(())
}

pub(super) fn check_text(value: &str, field: &str, max: usize) -> Result<(), ApiError> {
    if value.len() > max {
        return Err(ApiError::invalid(
            field,
            format!("`{field}` is longer than {max} bytes"),
        ));
    }
    if value.chars().any(char::is_control) {
        return Err(ApiError::invalid(
            field,
            format!("`{field}` contains control characters"),
        ));
    }
    Ok(())
}

pub(super) fn check_attributes(attrs: &BTreeMap<String, String>) -> Result<(), ApiError> {
    if attrs.len() > 100 {
        return Err(ApiError::invalid(
            "attributes",
            "at most 100 attributes are allowed",
        ));
    }
    for (k, v) in attrs {
        let field = format!("attributes.{}", show(k));
        if k.is_empty() {
            return Err(ApiError::invalid(field, "attribute names cannot be empty"));
        }
        check_text(k, &field, MAX_NAME_LEN)?;
        check_text(v, &field, MAX_TEXT_LEN)?;
    }
    Ok(())
}

pub(super) fn check_path_name(body_name: &str, path_name: &str) -> Result<(), ApiError> {
    if body_name != path_name {
        return Err(ApiError::invalid(
            "name",
            format!(
                "the body names `{}` but the path names `{path_name}`; renaming is not supported",
                show(body_name)
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strict_json() {
        let h = HeaderMap::new();
        let obj = |s: &str| body_object(&h, Ok(Bytes::from(s.to_owned())));
        assert!(obj(r#"{"a":1,"b":[1,{"c":null}]}"#).unwrap().is_some());
        assert!(obj("  ").unwrap().is_none());
        let err = |s: &str| match obj(s) {
            Err(ApiError::InvalidArgument { message, .. }) => message,
            other => panic!("{other:?}"),
        };
        assert!(err(r#"{"a":1,"a":2}"#).contains("duplicate field"));
        assert!(err(r#"{"a":1"#).contains("malformed JSON"));
        assert!(err(r#"{"a":1} x"#).contains("malformed JSON"));
        assert!(err("[1]").contains("JSON object"));
        assert!(err(&format!("{}{}", "[".repeat(500), "]".repeat(500))).contains("recursion"));
    }
}
