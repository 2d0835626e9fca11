//! How a request's host and path are compared with a flow's `match`, so that a client
//! cannot dodge a flow by writing the same target differently.
//!
//! Hosts compare as Envoy's virtual hosts compare them: case-insensitively, without the
//! port and without a trailing dot; wildcards are Envoy's `*`, `*suffix` and `prefix*`.
//!
//! Paths compare after the normalisation an Envoy HTTP connection manager configured with
//! `path_with_escaped_slashes_action: UNESCAPE_AND_FORWARD`, `normalize_path: true` and
//! `merge_slashes: true` applies (in that order, as Envoy does): `%2F`/`%5C` are separators,
//! a backslash is a slash, percent-encoded unreserved characters are decoded, `.` and `..`
//! segments are resolved (never above the root) and runs of slashes merged. When Envoy
//! already normalised (the recommended bootstraps), this changes nothing; when it did not,
//! the flow is chosen for the path most upstreams will read. Every step is one pass over
//! the input.

use std::borrow::Cow;

use crate::vars::strip_port;

/// A host as compared: without port and trailing dot, lower-case.
pub fn normalize_host(raw: &str) -> Cow<'_, str> {
    let host = strip_port(raw);
    let host = host.strip_suffix('.').unwrap_or(host);
    if host.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(host.to_ascii_lowercase())
    } else {
        Cow::Borrowed(host)
    }
}

/// One entry of `match.hosts`, compiled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostPattern {
    Exact(String),
    /// `*suffix`: the host ends with `suffix` and has at least one character before it.
    Suffix(String),
    /// `prefix*`: the host starts with `prefix` and has at least one character after it.
    Prefix(String),
    /// `*`: any host.
    Any,
}

impl HostPattern {
    /// Parses a configured host: a name (no port: the port is ignored in matching), or one
    /// of Envoy's wildcard forms. A trailing dot is dropped, case is folded.
    pub fn parse(written: &str) -> Result<Self, String> {
        let bad =
            || format!("`{written}` is not a host name or a wildcard (`*`, `*.suffix`, `prefix*`)");
        let h = written.strip_suffix('.').unwrap_or(written);
        if !h.is_ascii() {
            return Err(format!(
                "`{written}` is not ASCII: write an internationalised name in its punycode form (xn--…), as clients send it"
            ));
        }
        if h.is_empty()
            || h.bytes().any(|b| {
                b.is_ascii_whitespace() || b.is_ascii_control() || matches!(b, b'/' | b'?' | b'#')
            })
        {
            return Err(bad());
        }
        let stars = h.bytes().filter(|&b| b == b'*').count();
        let h = h.to_ascii_lowercase();
        if h == "*" {
            return Ok(Self::Any);
        }
        if stars > 1 {
            return Err(bad());
        }
        let port_like = |s: &str| {
            if s.starts_with('[') {
                s.contains("]:")
            } else {
                s.contains(':')
            }
        };
        if port_like(&h) {
            return Err(format!(
                "`{written}`: give the host without a port (ports are ignored in matching)"
            ));
        }
        if let Some(suffix) = h.strip_prefix('*') {
            return Ok(Self::Suffix(suffix.to_owned()));
        }
        if let Some(prefix) = h.strip_suffix('*') {
            return Ok(Self::Prefix(prefix.to_owned()));
        }
        if stars == 1 {
            return Err(bad());
        }
        Ok(Self::Exact(h))
    }

    /// `host` must be normalised ([`normalize_host`]).
    pub fn matches(&self, host: &str) -> bool {
        match self {
            Self::Exact(h) => host == h,
            Self::Suffix(s) => host.len() > s.len() && host.ends_with(s.as_str()),
            Self::Prefix(p) => host.len() > p.len() && host.starts_with(p.as_str()),
            Self::Any => true,
        }
    }

    pub fn is_exact(&self) -> bool {
        matches!(self, Self::Exact(_))
    }
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

fn unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// Bytes Envoy's normalize_path percent-encodes when they appear raw (its copy of
/// Chromium's path table): controls, space, `"`, `<`, `>`, `^`, `` ` ``, `{`, `|`, `}`, DEL
/// and every non-ASCII byte.
fn escaped_by_envoy(b: u8) -> bool {
    !(0x20..0x7f).contains(&b)
        || matches!(
            b,
            b' ' | b'"' | b'<' | b'>' | b'^' | b'`' | b'{' | b'|' | b'}'
        )
}

/// The path of `uri` (query and fragment cut off) as the flow match compares it; see the
/// module documentation. Already-normal paths are returned as they are, without copying.
pub fn normalize_path(uri: &str) -> Cow<'_, str> {
    if let Some(end) = normal_path_len(uri) {
        return Cow::Borrowed(&uri[..end]);
    }
    let end = uri.find(['?', '#']).unwrap_or(uri.len());
    let path = &uri[..end];
    // 1. Decode: escaped slashes and backslashes are separators, unreserved escapes their
    //    character; other escapes stay as written.
    let bytes = path.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len() + 1);
    if bytes.first() != Some(&b'/') && bytes.first() != Some(&b'\\') {
        decoded.push(b'/');
    }
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'%' && i + 2 < bytes.len() {
            if let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                let c = h * 16 + l;
                if c == b'/' || c == b'\\' {
                    decoded.push(b'/');
                    i += 3;
                    continue;
                }
                if unreserved(c) {
                    decoded.push(c);
                    i += 3;
                    continue;
                }
            }
        }
        if escaped_by_envoy(b) {
            const HEX: &[u8; 16] = b"0123456789ABCDEF";
            decoded.extend_from_slice(&[b'%', HEX[usize::from(b >> 4)], HEX[usize::from(b & 15)]]);
        } else {
            decoded.push(if b == b'\\' { b'/' } else { b });
        }
        i += 1;
    }
    // 2. Resolve dot segments (empty segments count, as in Envoy's normalize_path, which
    //    runs before merge_slashes), then 3. merge slashes. `decoded` starts with '/'.
    let mut segments: Vec<&[u8]> = Vec::new();
    let mut parts = decoded[1..].split(|&b| b == b'/').peekable();
    while let Some(seg) = parts.next() {
        let last = parts.peek().is_none();
        match seg {
            b"." => {}
            b".." => {
                segments.pop();
            }
            s => {
                segments.push(s);
                continue;
            }
        }
        if last {
            segments.push(b"");
        }
    }
    let mut out = Vec::with_capacity(decoded.len());
    let n = segments.len();
    for (k, seg) in segments.into_iter().enumerate() {
        if seg.is_empty() && k + 1 < n {
            continue;
        }
        out.push(b'/');
        out.extend_from_slice(seg);
    }
    if out.is_empty() {
        out.push(b'/');
    }
    // Only ASCII remains (every other byte was percent-encoded).
    Cow::Owned(String::from_utf8_lossy(&out).into_owned())
}

/// True when [`normalize_path`] would not change `path` (query already cut off). Runs on
/// every request: no allocation.
/// The length of `uri`'s path (up to `?` or `#`) when that path is already normal: it
/// starts with `/`, has no escape, backslash or byte Envoy would escape, and no empty, `.`
/// or `..` segment except a final empty one (a trailing slash). One pass over the bytes, as
/// it runs for every request.
fn normal_path_len(uri: &str) -> Option<usize> {
    let b = uri.as_bytes();
    if b.first() != Some(&b'/') {
        return None;
    }
    let dot_or_empty = |seg: &[u8]| matches!(seg, b"" | b"." | b"..");
    let mut seg_start = 1;
    let mut i = 1;
    while let Some(&c) = b.get(i) {
        match c {
            b'?' | b'#' => break,
            b'/' => {
                if dot_or_empty(&b[seg_start..i]) {
                    return None;
                }
                seg_start = i + 1;
            }
            b'%' | b'\\' => return None,
            c if escaped_by_envoy(c) => return None,
            _ => {}
        }
        i += 1;
    }
    // The last segment may be empty (a trailing slash), not a dot segment.
    (!matches!(&b[seg_start..i], b"." | b"..")).then_some(i)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The one-pass check for already-normal paths agrees with the full normalisation:
    /// what it lets through unchanged is a fixed point, and what it refuses is changed.
    #[test]
    fn fast_path_agrees_with_normalisation() {
        let parts = [
            "", "/", "//", "a", ".", "..", "%2F", "%41", "\\", "?q", "#f", "é", " ", "v1",
        ];
        for a in parts {
            for b in parts {
                for c in parts {
                    let uri = format!("/{a}{b}/{c}");
                    let n = normalize_path(&uri);
                    assert_eq!(normalize_path(&n), n, "{uri}");
                    if let Some(end) = normal_path_len(&uri) {
                        assert!(matches!(n, Cow::Borrowed(_)), "{uri}");
                        assert_eq!(&uri[..end], n, "{uri}");
                    }
                }
            }
        }
    }

    #[test]
    fn paths_normalise_as_envoy_does() {
        for (raw, want) in [
            ("/v1/chat", "/v1/chat"),
            ("/", "/"),
            ("", "/"),
            ("/v1/chat?x=//y", "/v1/chat"),
            ("/v1/chat#frag", "/v1/chat"),
            // merge_slashes
            ("//v1//chat", "/v1/chat"),
            ("/v1///chat/", "/v1/chat/"),
            ("//", "/"),
            // normalize_path (Envoy's own test cases)
            ("/a/b/../c", "/a/c"),
            ("/a/b/./c", "/a/b/c"),
            ("a/b/../c", "/a/c"),
            ("/a/b/../../../../c", "/c"),
            ("/a/..\\c", "/c"),
            ("/%c0%af", "/%c0%af"),
            ("/a/b/%2E%2E/c", "/a/c"),
            ("/a/b/%2E./c", "/a/c"),
            ("/a/b/%2e/c", "/a/b/c"),
            ("..", "/"),
            ("/../a/b", "/a/b"),
            ("/./a/b", "/a/b"),
            ("/A/B/C", "/A/B/C"),
            ("/a/b/..", "/a/"),
            ("/a/.", "/a/"),
            // dot segments resolve before slashes merge, as in Envoy
            ("/a//../b", "/a/b"),
            // unreserved characters decoded, others kept
            ("/v1/%63hat", "/v1/chat"),
            ("/v1/%7Euser", "/v1/~user"),
            ("/a%20b", "/a%20b"),
            ("/%7e%7E", "/~~"),
            ("/a%zz", "/a%zz"),
            ("/a%", "/a%"),
            ("/a%4", "/a%4"),
            // escaped slashes are separators (UNESCAPE_AND_FORWARD)
            ("/v1%2Fchat", "/v1/chat"),
            ("/v1%5cchat", "/v1/chat"),
            ("/v1\\chat", "/v1/chat"),
            ("/é/../x", "/x"),
            // raw bytes Envoy escapes
            ("/é", "/%C3%A9"),
            ("/a b|c", "/a%20b%7Cc"),
        ] {
            assert_eq!(normalize_path(raw), want, "{raw:?}");
            // Idempotent: a normal path stays.
            assert_eq!(normalize_path(want), want, "{want:?}");
        }
    }

    #[test]
    fn normal_paths_are_not_copied() {
        assert!(matches!(
            normalize_path("/v1/chat/completions?a=b"),
            Cow::Borrowed(_)
        ));
        assert!(matches!(normalize_path("/v1/"), Cow::Borrowed(_)));
        assert!(matches!(normalize_path("//v1"), Cow::Owned(_)));
    }

    #[test]
    fn hosts_normalise_as_envoy_virtual_hosts() {
        assert_eq!(normalize_host("API.Example.COM.:8443"), "api.example.com");
        assert_eq!(normalize_host("api.example.com"), "api.example.com");
        assert_eq!(normalize_host("[::1]:80"), "[::1]");
        assert_eq!(normalize_host("é.Example"), "é.example");
        assert_eq!(normalize_host(""), "");
    }

    #[test]
    fn host_patterns() {
        let p = |s: &str| HostPattern::parse(s).unwrap();
        assert_eq!(
            p("API.example.com."),
            HostPattern::Exact("api.example.com".into())
        );
        assert!(p("*.example.com").matches("a.example.com"));
        assert!(!p("*.example.com").matches("example.com"));
        assert!(!p("*.example.com").matches(".example.com"));
        assert!(p("*-api.example.com").matches("x-api.example.com"));
        assert!(p("api.*").matches("api.example.com"));
        assert!(!p("api.*").matches("api."));
        assert!(p("*").matches(""));
        // Multi-byte hosts never panic.
        assert!(!p("*.example.com").matches("é"));
        assert!(!p("*.com").matches("é"));
        assert!(p("*.com").matches("é.com"));
        for bad in [
            "",
            "a*b",
            "*a*",
            "a/b",
            "example.com:443",
            "[::1]:80",
            "é.com",
            "a b",
        ] {
            assert!(HostPattern::parse(bad).is_err(), "{bad:?}");
        }
        assert!(HostPattern::parse("[::1]").is_ok());
    }
}
