//! HTTP caching rules (RFC 9111, RFC 9110) a shared response cache follows, and the hex
//! form of keys.

use std::time::Duration;

use super::Key;
use crate::vars::{Headers, ResponseInfo};

/// Lower-case hex of a key (the `responsecache.<policy>.key` variable, the Redis key).
pub fn hex(b: &[u8]) -> String {
    const H: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(b.len() * 2);
    for x in b {
        s.push(H[(x >> 4) as usize] as char);
        s.push(H[(x & 15) as usize] as char);
    }
    s
}

/// A key back from [`hex`].
pub fn unhex(s: &str) -> Option<Key> {
    let mut k = [0u8; 32];
    if s.len() != 64 {
        return None;
    }
    for (i, out) in k.iter_mut().enumerate() {
        *out = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(k)
}

/// Headers never stored or replayed: per connection (hop-by-hop), per message, or per user.
pub fn stored_header(name: &str) -> bool {
    !(name.starts_with(':')
        || name.starts_with("x-envoy-")
        || name.starts_with("proxy-")
        || matches!(
            name,
            "content-length"
                | "transfer-encoding"
                | "connection"
                | "keep-alive"
                | "te"
                | "trailer"
                | "upgrade"
                | "set-cookie"
                | "age"
                | "content-type"
        ))
}

/// Every value of `name`, as one comma-separated list.
pub fn all_values(h: &Headers, name: &str) -> String {
    let mut out = String::new();
    for (_, v) in h.iter().filter(|(n, _)| n.eq_ignore_ascii_case(name)) {
        if !out.is_empty() {
            out.push(',');
        }
        out.push_str(v);
    }
    out
}

/// What an upstream's `Cache-Control` allows a shared cache.
#[derive(Debug, PartialEq, Eq)]
pub enum Freshness {
    /// `no-store`, `private`, `no-cache` (stored responses would need revalidation, which
    /// this cache does not do; not on event streams, see `freshness`), or a lifetime of 0.
    DoNotStore,
    /// `s-maxage` (preferred: this is a shared cache) or `max-age`: the TTL's upper bound.
    AtMost(Duration),
    Unbounded,
}

pub fn is_event_stream(resp: &ResponseInfo) -> bool {
    resp.headers.get("content-type").is_some_and(|c| {
        c.trim_start()
            .to_ascii_lowercase()
            .starts_with("text/event-stream")
    })
}

/// `event_stream`: the response is `text/event-stream`, whose `no-cache` is the customary
/// "do not buffer or replay this live stream" of SSE servers (LLM APIs send it on every
/// streamed answer), not a statement about the answer's content; caching a deterministic
/// completion is the policy's decision, so there `no-cache` does not forbid storing.
pub fn freshness(cache_control: &str, event_stream: bool) -> Freshness {
    let (mut max_age, mut s_maxage) = (None, None);
    for d in cache_control.split(',') {
        let d = d.trim().to_ascii_lowercase();
        let (name, arg) = match d.split_once('=') {
            Some((n, a)) => (n.trim(), Some(a.trim().trim_matches('"'))),
            None => (d.as_str(), None),
        };
        match name {
            "no-store" | "private" => return Freshness::DoNotStore,
            "no-cache" if !event_stream => return Freshness::DoNotStore,
            // An unparsable lifetime is stale (RFC 9111 §4.2.1).
            "max-age" => max_age = Some(arg.and_then(|a| a.parse::<u64>().ok()).unwrap_or(0)),
            "s-maxage" => s_maxage = Some(arg.and_then(|a| a.parse::<u64>().ok()).unwrap_or(0)),
            _ => {}
        }
    }
    match s_maxage.or(max_age) {
        Some(0) => Freshness::DoNotStore,
        Some(n) => Freshness::AtMost(Duration::from_secs(n)),
        None => Freshness::Unbounded,
    }
}

/// RFC 9111 §3.5: a shared cache may store a response to a request with `Authorization`
/// only when its `Cache-Control` has `public`, `s-maxage` or `must-revalidate`.
pub fn shareable_with_credentials(cache_control: &str) -> bool {
    cache_control.split(',').any(|d| {
        let name = d.split('=').next().unwrap_or_default().trim();
        ["public", "s-maxage", "must-revalidate"]
            .iter()
            .any(|n| name.eq_ignore_ascii_case(n))
    })
}

/// Whether `accept-encoding` allows every coding of `content-encoding` (RFC 9110 §12.5.3;
/// a request without `accept-encoding` is only served identity, to be safe).
pub fn accepts_encoding(accept: Option<&str>, content_encoding: &str) -> bool {
    content_encoding
        .split(',')
        .map(|c| c.trim().to_ascii_lowercase())
        .filter(|c| !c.is_empty() && c != "identity")
        .all(|coding| {
            let Some(accept) = accept else { return false };
            let mut star = None;
            for item in accept.split(',') {
                let mut parts = item.split(';');
                let name = parts.next().unwrap_or_default().trim().to_ascii_lowercase();
                let q = parts
                    .filter_map(|p| {
                        p.trim()
                            .strip_prefix("q=")
                            .or_else(|| p.trim().strip_prefix("Q="))
                    })
                    .find_map(|q| q.trim().parse::<f32>().ok())
                    .unwrap_or(1.0);
                if name == coding {
                    return q > 0.0;
                }
                if name == "*" {
                    star = Some(q > 0.0);
                }
            }
            star.unwrap_or(false)
        })
}
