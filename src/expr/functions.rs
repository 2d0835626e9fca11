//! Apigee's message-template functions (`{jsonPath($.a,request.content)}`,
//! `{firstnonnull(x,'default')}`, `{hmacSha256(private.key,msg,'utf8','hex')}`), parsed and
//! checked once when the template compiles; rendering never fails: a function whose input
//! is missing or unusable (bad base64, an index outside the text, JSON that does not parse,
//! a path that matches nothing) renders as empty text, as an unresolved variable does.
//!
//! Arguments, as Apigee writes them: a bare name is a flow variable (`request.content`), a
//! quoted text is a literal (`'default'`, `"x"`), a bare integer is a literal number. A
//! variable that does not resolve is null: most functions then render nothing;
//! `firstnonnull` moves on to its next argument.

use std::borrow::Cow;

use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use sha2::{Digest, Sha224, Sha256, Sha384, Sha512};

use super::template::is_var_name;
use crate::vars::Exchange;

/// Longest call accepted, `{` to `}`: a longer one is not read as a call (it stays text).
pub(super) const MAX_CALL_BYTES: usize = 4096;
/// Largest regular expression compiled from a variable at render time.
const RUNTIME_REGEX_BYTES: usize = 1 << 20;

/// Apigee template functions tollgate does not implement: named in the load error, so a
/// migrating user learns it is a known gap rather than a typo.
const UNSUPPORTED: &[&str] = &["xPath", "xpath", "xeger", "md5Hex", "md5Base64", "hmacMd5"];

/// The functions tollgate implements, for the error naming an unknown one.
const KNOWN: &[&str] = &[
    "jsonPath",
    "escapeJSON",
    "escapeXML",
    "escapeXML11",
    "encodeHTML",
    "firstnonnull",
    "substring",
    "replaceAll",
    "replaceFirst",
    "toLowerCase",
    "toUpperCase",
    "encodeBase64",
    "decodeBase64",
    "createUuid",
    "randomLong",
    "timeFormat",
    "timeFormatMs",
    "timeFormatUTC",
    "timeFormatUTCMs",
    "sha1Hex",
    "sha1Base64",
    "sha224Hex",
    "sha224Base64",
    "sha256Hex",
    "sha256Base64",
    "sha384Hex",
    "sha384Base64",
    "sha512Hex",
    "sha512Base64",
    "hmacSha1",
    "hmacSha224",
    "hmacSha256",
    "hmacSha384",
    "hmacSha512",
];

/// An argument: a flow variable or a literal.
#[derive(Debug, Clone)]
pub(super) enum Arg {
    Var(String),
    Lit(String),
}

impl Arg {
    fn parse(raw: &str) -> Result<Self, String> {
        let t = raw.trim();
        if let Some(lit) = unquote(t) {
            return Ok(Arg::Lit(lit.to_owned()));
        }
        if t.parse::<i64>().is_ok() {
            return Ok(Arg::Lit(t.to_owned()));
        }
        if is_var_name(t) {
            return Ok(Arg::Var(t.to_owned()));
        }
        if t.is_empty() {
            return Err("an argument is empty".into());
        }
        if t.contains('(') {
            return Err(format!(
                "`{t}`: functions do not nest; assign the inner result to a variable first"
            ));
        }
        Err(format!(
            "`{t}` is neither a variable name, a quoted literal nor an integer"
        ))
    }

    fn get<'e>(&'e self, ex: &'e Exchange) -> Option<Cow<'e, str>> {
        match self {
            Arg::Var(name) => ex.lookup(name),
            Arg::Lit(s) => Some(Cow::Borrowed(s)),
        }
    }

    fn var(&self) -> Option<&str> {
        match self {
            Arg::Var(v) => Some(v),
            Arg::Lit(_) => None,
        }
    }
}

/// The text inside matching single or double quotes.
fn unquote(t: &str) -> Option<&str> {
    let b = t.as_bytes();
    if b.len() >= 2 && (b[0] == b'\'' || b[0] == b'"') && b[b.len() - 1] == b[0] {
        Some(&t[1..t.len() - 1])
    } else {
        None
    }
}

/// A keyword argument (an encoding, `true`), quoted or bare, lower-cased.
fn keyword(raw: &str) -> String {
    let t = raw.trim();
    unquote(t).unwrap_or(t).to_ascii_lowercase()
}

/// Splits the text between a call's parentheses at its top-level commas (outside quotes
/// and brackets). `None` when a quote or bracket is left open, or a brace appears outside
/// quotes: then the text is no call.
pub(super) fn split_args(inner: &str) -> Option<Vec<&str>> {
    let mut out = Vec::new();
    let (mut depth, mut quote, mut start) = (0usize, None::<u8>, 0usize);
    for (i, b) in inner.bytes().enumerate() {
        match quote {
            Some(q) => {
                if b == q {
                    quote = None;
                }
            }
            None => match b {
                b'\'' | b'"' => quote = Some(b),
                b'(' | b'[' => depth += 1,
                b')' | b']' => depth = depth.checked_sub(1)?,
                b'{' | b'}' => return None,
                b',' if depth == 0 => {
                    out.push(&inner[start..i]);
                    start = i + 1;
                }
                _ => {}
            },
        }
    }
    if quote.is_some() || depth != 0 {
        return None;
    }
    if !(out.is_empty() && inner.trim().is_empty()) {
        out.push(&inner[start..]);
    }
    Some(out)
}

#[derive(Debug, Clone, Copy)]
pub(super) enum Hash {
    /// Only because Apigee bundles name it (legacy signatures); not for new designs.
    Sha1,
    Sha224,
    Sha256,
    Sha384,
    Sha512,
}

impl Hash {
    fn digest(self, data: &[u8]) -> Vec<u8> {
        match self {
            Hash::Sha1 => ring::digest::digest(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, data)
                .as_ref()
                .to_vec(),
            Hash::Sha224 => Sha224::digest(data).to_vec(),
            Hash::Sha256 => Sha256::digest(data).to_vec(),
            Hash::Sha384 => Sha384::digest(data).to_vec(),
            Hash::Sha512 => Sha512::digest(data).to_vec(),
        }
    }

    fn hmac(self, key: &[u8], msg: &[u8]) -> Vec<u8> {
        match self {
            Hash::Sha1 => {
                let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, key);
                ring::hmac::sign(&key, msg).as_ref().to_vec()
            }
            Hash::Sha224 => hmac::<Sha224>(64, key, msg),
            Hash::Sha256 => hmac::<Sha256>(64, key, msg),
            Hash::Sha384 => hmac::<Sha384>(128, key, msg),
            Hash::Sha512 => hmac::<Sha512>(128, key, msg),
        }
    }
}

/// HMAC (RFC 2104) over a SHA-2 hash with block size `block`.
fn hmac<D: Digest>(block: usize, key: &[u8], msg: &[u8]) -> Vec<u8> {
    let mut k = if key.len() > block {
        D::digest(key).to_vec()
    } else {
        key.to_vec()
    };
    k.resize(block, 0);
    let mut inner = D::new();
    inner.update(k.iter().map(|b| b ^ 0x36).collect::<Vec<u8>>());
    inner.update(msg);
    let inner = inner.finalize();
    let mut outer = D::new();
    outer.update(k.iter().map(|b| b ^ 0x5c).collect::<Vec<u8>>());
    outer.update(inner);
    outer.finalize().to_vec()
}

/// How a digest is written out.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum Out {
    Hex,
    Base64,
    Base64Url,
}

impl Out {
    fn parse(raw: &str) -> Result<Self, String> {
        match keyword(raw).as_str() {
            "hex" | "base16" => Ok(Out::Hex),
            "base64" => Ok(Out::Base64),
            "base64url" => Ok(Out::Base64Url),
            other => Err(format!(
                "output encoding `{other}`: one of hex, base16, base64, base64url"
            )),
        }
    }

    fn write(self, bytes: &[u8]) -> String {
        match self {
            Out::Hex => hex(bytes),
            Out::Base64 => STANDARD.encode(bytes),
            Out::Base64Url => URL_SAFE_NO_PAD.encode(bytes),
        }
    }
}

/// How an HMAC key is written in its argument.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum KeyEnc {
    Utf8,
    Hex,
    Base64,
}

impl KeyEnc {
    fn parse(raw: &str) -> Result<Self, String> {
        match keyword(raw).as_str() {
            "utf8" | "utf-8" => Ok(KeyEnc::Utf8),
            "hex" | "base16" => Ok(KeyEnc::Hex),
            "base64" => Ok(KeyEnc::Base64),
            other => Err(format!(
                "key encoding `{other}`: one of utf8, hex, base16, base64"
            )),
        }
    }

    fn decode(self, key: &str) -> Option<Vec<u8>> {
        match self {
            KeyEnc::Utf8 => Some(key.as_bytes().to_vec()),
            KeyEnc::Hex => unhex(key),
            KeyEnc::Base64 => decode_base64(key),
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[usize::from(b >> 4)] as char);
        s.push(DIGITS[usize::from(b & 15)] as char);
    }
    s
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    let s = s.trim();
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Standard base64, padded or not (whitespace around it ignored).
fn decode_base64(s: &str) -> Option<Vec<u8>> {
    let s = s.trim();
    STANDARD
        .decode(s)
        .or_else(|_| STANDARD_NO_PAD.decode(s))
        .ok()
}

/// Where the pattern of `replaceAll` / `replaceFirst` comes from.
#[derive(Debug, Clone)]
pub(super) enum Pattern {
    Fixed(regex::Regex),
    /// A variable holding it, compiled when rendered.
    Var(String),
}

/// A compiled function call.
#[derive(Debug, Clone)]
pub(super) enum Call {
    JsonPath {
        path: serde_json_path::JsonPath,
        source: Arg,
        want_array: bool,
    },
    Escape(Escape, Arg),
    FirstNonNull(Vec<Arg>),
    Substring {
        text: Arg,
        start: Arg,
        end: Option<Arg>,
    },
    Replace {
        text: Arg,
        pattern: Pattern,
        with: Arg,
        all: bool,
    },
    Lower(Arg),
    Upper(Arg),
    EncodeBase64(Arg),
    DecodeBase64(Arg),
    CreateUuid,
    RandomLong(Option<Arg>, Option<Arg>),
    TimeFormat {
        format: TimeFormatArg,
        value: Arg,
        millis: bool,
    },
    Hash(Hash, Out, Arg),
    Hmac {
        hash: Hash,
        key: Arg,
        message: Arg,
        key_enc: KeyEnc,
        out: Out,
    },
}

#[derive(Debug, Clone, Copy)]
pub(super) enum Escape {
    Json,
    Xml,
    Html,
}

#[derive(Debug, Clone)]
pub(super) enum TimeFormatArg {
    Fixed(super::timefmt::TimeFormat),
    Var(String),
}

fn arity(name: &str, args: &[&str], min: usize, max: usize) -> Result<(), String> {
    if (min..=max).contains(&args.len()) {
        return Ok(());
    }
    let want = if min == max {
        format!("{min}")
    } else {
        format!("{min} to {max}")
    };
    Err(format!(
        "`{name}` takes {want} argument(s), got {}",
        args.len()
    ))
}

fn hash_of(name: &str) -> Option<(Hash, &str)> {
    for (prefix, h) in [
        ("sha1", Hash::Sha1),
        ("sha224", Hash::Sha224),
        ("sha256", Hash::Sha256),
        ("sha384", Hash::Sha384),
        ("sha512", Hash::Sha512),
    ] {
        if let Some(rest) = name.strip_prefix(prefix) {
            return Some((h, rest));
        }
    }
    None
}

impl Call {
    /// Compiles `name(args)`; the error names what is wrong.
    pub(super) fn compile(name: &str, args: &[&str]) -> Result<Self, String> {
        let one = |args: &[&str]| -> Result<Arg, String> {
            arity(name, args, 1, 1)?;
            Arg::parse(args[0])
        };
        Ok(match name {
            "jsonPath" => {
                arity(name, args, 2, 3)?;
                let raw = args[0].trim();
                let text = unquote(raw).unwrap_or(raw);
                if !text.starts_with('$') {
                    return Err(format!(
                        "`jsonPath`'s first argument is a JSONPath starting with `$`, got `{raw}`"
                    ));
                }
                let path = serde_json_path::JsonPath::parse(text)
                    .map_err(|e| format!("JSONPath `{text}`: {e}"))?;
                let want_array = match args.get(2).map(|a| keyword(a)) {
                    None => false,
                    Some(k) if k == "true" => true,
                    Some(k) if k == "false" => false,
                    Some(k) => {
                        return Err(format!(
                            "`jsonPath`'s want-array is true or false, got `{k}`"
                        ))
                    }
                };
                Call::JsonPath {
                    path,
                    source: Arg::parse(args[1])?,
                    want_array,
                }
            }
            "escapeJSON" => Call::Escape(Escape::Json, one(args)?),
            "escapeXML" | "escapeXML11" => Call::Escape(Escape::Xml, one(args)?),
            "encodeHTML" => Call::Escape(Escape::Html, one(args)?),
            "firstnonnull" => {
                arity(name, args, 1, 64)?;
                Call::FirstNonNull(
                    args.iter()
                        .map(|a| Arg::parse(a))
                        .collect::<Result<_, _>>()?,
                )
            }
            "substring" => {
                arity(name, args, 2, 3)?;
                let index = |raw: &str| -> Result<Arg, String> {
                    let a = Arg::parse(raw)?;
                    if let Arg::Lit(s) = &a {
                        if s.trim().parse::<i64>().is_err() {
                            return Err(format!("`substring`'s index `{s}` is not an integer"));
                        }
                    }
                    Ok(a)
                };
                Call::Substring {
                    text: Arg::parse(args[0])?,
                    start: index(args[1])?,
                    end: args.get(2).map(|a| index(a)).transpose()?,
                }
            }
            "replaceAll" | "replaceFirst" => {
                arity(name, args, 3, 3)?;
                let pattern = match Arg::parse(args[1])? {
                    Arg::Lit(p) => Pattern::Fixed(
                        regex::Regex::new(&p)
                            .map_err(|e| format!("regular expression `{p}`: {e}"))?,
                    ),
                    Arg::Var(v) => Pattern::Var(v),
                };
                Call::Replace {
                    text: Arg::parse(args[0])?,
                    pattern,
                    with: Arg::parse(args[2])?,
                    all: name == "replaceAll",
                }
            }
            "toLowerCase" => Call::Lower(one(args)?),
            "toUpperCase" => Call::Upper(one(args)?),
            "encodeBase64" => Call::EncodeBase64(one(args)?),
            "decodeBase64" => Call::DecodeBase64(one(args)?),
            "createUuid" => {
                arity(name, args, 0, 0)?;
                Call::CreateUuid
            }
            "randomLong" => {
                arity(name, args, 0, 2)?;
                let a: Vec<Arg> = args
                    .iter()
                    .map(|a| Arg::parse(a))
                    .collect::<Result<_, _>>()?;
                let mut it = a.into_iter();
                Call::RandomLong(it.next(), it.next())
            }
            "timeFormat" | "timeFormatMs" | "timeFormatUTC" | "timeFormatUTCMs" => {
                arity(name, args, 2, 2)?;
                let format = match Arg::parse(args[0])? {
                    Arg::Lit(f) => TimeFormatArg::Fixed(
                        super::timefmt::TimeFormat::parse(&f)
                            .map_err(|e| format!("time format `{f}`: {e}"))?,
                    ),
                    Arg::Var(v) => TimeFormatArg::Var(v),
                };
                Call::TimeFormat {
                    format,
                    value: Arg::parse(args[1])?,
                    millis: name.ends_with("Ms"),
                }
            }
            _ if UNSUPPORTED.contains(&name) => {
                return Err(format!(
                    "`{name}` is an Apigee template function tollgate does not implement"
                ))
            }
            _ => {
                if let Some((hash, rest)) = hash_of(name) {
                    match rest {
                        "Hex" => return Ok(Call::Hash(hash, Out::Hex, one(args)?)),
                        "Base64" => return Ok(Call::Hash(hash, Out::Base64, one(args)?)),
                        _ => {}
                    }
                }
                let hmac = match name {
                    "hmacSha1" => Some(Hash::Sha1),
                    "hmacSha224" => Some(Hash::Sha224),
                    "hmacSha256" => Some(Hash::Sha256),
                    "hmacSha384" => Some(Hash::Sha384),
                    "hmacSha512" => Some(Hash::Sha512),
                    _ => None,
                };
                if let Some(hash) = hmac {
                    arity(name, args, 2, 4)?;
                    return Ok(Call::Hmac {
                        hash,
                        key: Arg::parse(args[0])?,
                        message: Arg::parse(args[1])?,
                        key_enc: args.get(2).map_or(Ok(KeyEnc::Utf8), |a| KeyEnc::parse(a))?,
                        out: args.get(3).map_or(Ok(Out::Base64), |a| Out::parse(a))?,
                    });
                }
                return Err(format!(
                    "unknown template function `{name}`; known: {}",
                    KNOWN.join(", ")
                ));
            }
        })
    }

    /// The variables the call reads.
    pub(super) fn variables(&self) -> Vec<&str> {
        let args: Vec<&Arg> = match self {
            Call::JsonPath { source, .. } => vec![source],
            Call::Escape(_, a)
            | Call::Lower(a)
            | Call::Upper(a)
            | Call::EncodeBase64(a)
            | Call::DecodeBase64(a)
            | Call::Hash(_, _, a) => vec![a],
            Call::FirstNonNull(args) => args.iter().collect(),
            Call::Substring { text, start, end } => {
                let mut v = vec![text, start];
                v.extend(end);
                v
            }
            Call::Replace {
                text,
                pattern,
                with,
                ..
            } => {
                let mut v: Vec<&str> = [text, with].iter().filter_map(|a| a.var()).collect();
                if let Pattern::Var(p) = pattern {
                    v.push(p);
                }
                return v;
            }
            Call::CreateUuid => vec![],
            Call::RandomLong(a, b) => a.iter().chain(b.iter()).collect(),
            Call::TimeFormat { format, value, .. } => {
                let mut v: Vec<&str> = value.var().into_iter().collect();
                if let TimeFormatArg::Var(f) = format {
                    v.push(f);
                }
                return v;
            }
            Call::Hmac { key, message, .. } => vec![key, message],
        };
        args.into_iter().filter_map(Arg::var).collect()
    }

    /// The call's text for this exchange; `None` renders as nothing.
    pub(super) fn eval(&self, ex: &Exchange) -> Option<String> {
        match self {
            Call::JsonPath {
                path,
                source,
                want_array,
            } => {
                let text = source.get(ex)?;
                let json: serde_json::Value = serde_json::from_str(&text).ok()?;
                let nodes = path.query(&json).all();
                if *want_array {
                    return Some(
                        serde_json::Value::Array(nodes.into_iter().cloned().collect()).to_string(),
                    );
                }
                match nodes.as_slice() {
                    [] => None,
                    [one] => match one {
                        serde_json::Value::String(s) => Some(s.clone()),
                        serde_json::Value::Null => None,
                        other => Some(other.to_string()),
                    },
                    many => Some(
                        serde_json::Value::Array(many.iter().map(|v| (*v).clone()).collect())
                            .to_string(),
                    ),
                }
            }
            Call::Escape(kind, a) => Some(escape(*kind, &a.get(ex)?)),
            Call::FirstNonNull(args) => args.iter().find_map(|a| a.get(ex)).map(Cow::into_owned),
            Call::Substring { text, start, end } => {
                let text = text.get(ex)?;
                let index = |a: &Arg| -> Option<usize> {
                    usize::try_from(a.get(ex)?.trim().parse::<i64>().ok()?).ok()
                };
                let len = text.chars().count();
                let start = index(start)?;
                let end = match end {
                    Some(e) => index(e)?,
                    None => len,
                };
                // Java's String.substring throws outside 0 <= start <= end <= length: nothing.
                if start > end || end > len {
                    return None;
                }
                Some(text.chars().skip(start).take(end - start).collect())
            }
            Call::Replace {
                text,
                pattern,
                with,
                all,
            } => {
                let text = text.get(ex)?;
                let with = java_replacement(&with.get(ex)?);
                let compiled;
                let re = match pattern {
                    Pattern::Fixed(re) => re,
                    Pattern::Var(v) => {
                        compiled = regex::RegexBuilder::new(&ex.lookup(v)?)
                            .size_limit(RUNTIME_REGEX_BYTES)
                            .build()
                            .ok()?;
                        &compiled
                    }
                };
                Some(if *all {
                    re.replace_all(&text, with.as_str()).into_owned()
                } else {
                    re.replace(&text, with.as_str()).into_owned()
                })
            }
            Call::Lower(a) => Some(a.get(ex)?.to_lowercase()),
            Call::Upper(a) => Some(a.get(ex)?.to_uppercase()),
            Call::EncodeBase64(a) => Some(STANDARD.encode(a.get(ex)?.as_bytes())),
            Call::DecodeBase64(a) => {
                let bytes = decode_base64(&a.get(ex)?)?;
                Some(String::from_utf8_lossy(&bytes).into_owned())
            }
            Call::CreateUuid => uuid_v4(),
            Call::RandomLong(min, max) => {
                let bound = |a: &Option<Arg>| -> Option<Option<i64>> {
                    match a {
                        None => Some(None),
                        Some(a) => Some(Some(a.get(ex)?.trim().parse().ok()?)),
                    }
                };
                let (min, max) = (bound(min)?.unwrap_or(0), bound(max)?.unwrap_or(i64::MAX));
                if min >= max {
                    return None;
                }
                let mut b = [0u8; 8];
                getrandom::fill(&mut b).ok()?;
                let span = u64::try_from(i128::from(max) - i128::from(min)).ok()?;
                let r = u64::from_le_bytes(b) % span;
                Some((i128::from(min) + i128::from(r)).to_string())
            }
            Call::TimeFormat {
                format,
                value,
                millis,
            } => {
                let v: i64 = value.get(ex)?.trim().parse().ok()?;
                let ms = if *millis { v } else { v.checked_mul(1000)? };
                let at = chrono::DateTime::from_timestamp_millis(ms)?;
                match format {
                    TimeFormatArg::Fixed(f) => Some(f.format(&at)),
                    TimeFormatArg::Var(name) => {
                        let f = super::timefmt::TimeFormat::parse(&ex.lookup(name)?).ok()?;
                        Some(f.format(&at))
                    }
                }
            }
            Call::Hash(hash, out, a) => Some(out.write(&hash.digest(a.get(ex)?.as_bytes()))),
            Call::Hmac {
                hash,
                key,
                message,
                key_enc,
                out,
            } => {
                let key = key_enc.decode(&key.get(ex)?)?;
                Some(out.write(&hash.hmac(&key, message.get(ex)?.as_bytes())))
            }
        }
    }

    /// The literal a `firstnonnull` ends with: the fallback it renders when no variable
    /// before it resolves (Apigee's `countRef` + `count`).
    pub(super) fn literal_fallback(&self) -> Option<&str> {
        match self {
            Call::FirstNonNull(args) => match args.last()? {
                Arg::Lit(s) => Some(s),
                Arg::Var(_) => None,
            },
            _ => None,
        }
    }
}

fn escape(kind: Escape, s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    match kind {
        Escape::Json => {
            let quoted = serde_json::Value::String(s.to_owned()).to_string();
            out.push_str(&quoted[1..quoted.len() - 1]);
        }
        Escape::Xml | Escape::Html => {
            for c in s.chars() {
                match c {
                    '&' => out.push_str("&amp;"),
                    '<' => out.push_str("&lt;"),
                    '>' => out.push_str("&gt;"),
                    '"' => out.push_str("&quot;"),
                    '\'' if matches!(kind, Escape::Xml) => out.push_str("&apos;"),
                    '\'' => out.push_str("&#39;"),
                    c => out.push(c),
                }
            }
        }
    }
    out
}

/// A Java replacement string (`$1`, `${name}`, `\$` for a dollar) in the `regex` crate's
/// syntax: groups braced (`$1a` is group 1 then `a` in Java, group `1a` in Rust), other
/// dollars doubled.
fn java_replacement(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 4);
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' => match chars.next() {
                Some('$') => out.push_str("$$"),
                Some(n) => out.push(n),
                None => {}
            },
            '$' => match chars.peek() {
                Some('{') => {
                    chars.next();
                    let name: String = chars.by_ref().take_while(|&c| c != '}').collect();
                    out.push_str("${");
                    out.push_str(&name);
                    out.push('}');
                }
                Some(d) if d.is_ascii_digit() => {
                    let mut n = String::new();
                    while let Some(d) = chars.peek().filter(|d| d.is_ascii_digit()) {
                        n.push(*d);
                        chars.next();
                    }
                    out.push_str("${");
                    out.push_str(&n);
                    out.push('}');
                }
                _ => out.push_str("$$"),
            },
            c => out.push(c),
        }
    }
    out
}

/// A random (version 4) UUID, lower case, as Java's `UUID.randomUUID()` writes it.
pub(crate) fn uuid_v4() -> Option<String> {
    let mut b = [0u8; 16];
    getrandom::fill(&mut b).ok()?;
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h = hex(&b);
    Some(format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    ))
}
