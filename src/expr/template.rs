//! Message templates: text with `{flow.variable}` references and Apigee's template
//! functions (`{toUpperCase(request.verb)}`, see `functions`).
//!
//! - A brace whose content is neither a variable name nor a function call (as in a JSON
//!   literal) is kept as text, so JSON payloads need no escaping.
//! - `\{` writes a literal `{` that opens nothing (`\{client_id}` renders `{client_id}`);
//!   Apigee has no template escape (its AssignMessage payload changes the delimiters
//!   instead). Only an odd run of backslashes escapes: `\\{x}` is a backslash and `x`'s
//!   value, as the text of a JSON string holding a backslash writes it.
//! - `{name(...)}` is a function call, parsed and checked at compile: a function nothing
//!   defines, a wrong argument count, an invalid JSONPath, regular expression or time
//!   format is a load error naming it.
//! - A reference that does not resolve renders as empty text, as a function whose input is
//!   missing or unusable does. Variable names are not checked at compile: flows set
//!   variables at run time (AssignMessage, scripts, KVM), so no name can be called
//!   undefined without false alarms.

use std::borrow::Cow;

use super::functions::{split_args, Call, MAX_CALL_BYTES};
use super::ExprError;
use crate::vars::Exchange;

/// A compiled template, e.g. `Bearer {kvm.creds.token}`.
#[derive(Debug, Clone)]
pub struct Template {
    parts: Vec<Part>,
}

#[derive(Debug, Clone)]
enum Part {
    Lit(String),
    Var(String),
    Call(Box<Call>),
}

pub(super) fn is_var_name(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

/// A call starting right after a `{`: `name(args)}`. `Some((name, args, length))`, the
/// length counting through the closing `}`; `None` when the text is not shaped as a call.
fn call_at(after: &str) -> Option<(&str, Vec<&str>, usize)> {
    let b = after.as_bytes();
    let first = *b.first()?;
    if !(first.is_ascii_alphabetic() || first == b'_') {
        return None;
    }
    let name_len = b
        .iter()
        .position(|c| !(c.is_ascii_alphanumeric() || *c == b'_'))?;
    if b[name_len] != b'(' {
        return None;
    }
    // The `)` that closes the call: the first one at depth 0 outside quotes.
    let (mut depth, mut quote) = (0usize, None::<u8>);
    let limit = b.len().min(MAX_CALL_BYTES);
    let mut close = None;
    for (i, &c) in b.iter().enumerate().take(limit).skip(name_len + 1) {
        match quote {
            Some(q) => {
                if c == q {
                    quote = None;
                }
            }
            None => match c {
                b'\'' | b'"' => quote = Some(c),
                b'(' | b'[' => depth += 1,
                b']' => depth = depth.checked_sub(1)?,
                b')' if depth == 0 => {
                    close = Some(i);
                    break;
                }
                b')' => depth -= 1,
                b'{' | b'}' => return None,
                _ => {}
            },
        }
    }
    let close = close?;
    if b.get(close + 1) != Some(&b'}') {
        return None;
    }
    let args = split_args(&after[name_len + 1..close])?;
    Some((&after[..name_len], args, close + 2))
}

impl Template {
    pub fn compile(source: &str) -> Result<Self, ExprError> {
        let mut parts = Vec::new();
        let mut lit = String::new();
        // Text before `emit` is in `parts`/`lit`; the next `{` is searched from `scan`.
        let (mut emit, mut scan) = (0usize, 0usize);
        while let Some(rel) = source[scan..].find('{') {
            let open = scan + rel;
            let backslashes = source[emit..open]
                .bytes()
                .rev()
                .take_while(|&b| b == b'\\')
                .count();
            if backslashes % 2 == 1 {
                lit.push_str(&source[emit..open - 1]);
                lit.push('{');
                emit = open + 1;
                scan = emit;
                continue;
            }
            let after = &source[open + 1..];
            if let Some((name, args, len)) = call_at(after) {
                let call = Call::compile(name, &args).map_err(|m| {
                    ExprError::Template(source.to_owned(), format!("`{{{}`: {m}", &after[..len]))
                })?;
                lit.push_str(&source[emit..open]);
                if !lit.is_empty() {
                    parts.push(Part::Lit(std::mem::take(&mut lit)));
                }
                parts.push(Part::Call(Box::new(call)));
                emit = open + 1 + len;
                scan = emit;
                continue;
            }
            // Not a call: a variable name up to the next `}`, unless another `{` comes
            // first (only the last `{` before a `}` can open a name, which holds no `{`).
            let Some(next) = after.find(['{', '}']) else {
                break;
            };
            if after.as_bytes()[next] == b'{' {
                scan = open + 1 + next;
                continue;
            }
            let name = &after[..next];
            if is_var_name(name) {
                lit.push_str(&source[emit..open]);
                if !lit.is_empty() {
                    parts.push(Part::Lit(std::mem::take(&mut lit)));
                }
                parts.push(Part::Var(name.to_owned()));
                emit = open + 1 + next + 1;
            }
            scan = open + 1 + next + 1;
        }
        lit.push_str(&source[emit..]);
        if !lit.is_empty() {
            parts.push(Part::Lit(lit));
        }
        Ok(Self { parts })
    }

    /// The variable names the template refers to, function arguments included.
    pub fn variables(&self) -> impl Iterator<Item = &str> {
        self.parts.iter().flat_map(|p| match p {
            Part::Var(v) => vec![v.as_str()],
            Part::Call(c) => c.variables(),
            Part::Lit(_) => vec![],
        })
    }

    /// True when the template has no variable references or function calls.
    pub fn is_static(&self) -> bool {
        self.parts.iter().all(|p| matches!(p, Part::Lit(_)))
    }

    /// The literal the template falls back to when its reference does not resolve: for a
    /// template that is one `{firstnonnull(ref,...,'literal')}`, that literal. Apigee's
    /// `countRef` + `count` (a reference that wins over a literal) is written this way, and
    /// a numeric setting checks the literal at load.
    pub fn literal_fallback(&self) -> Option<&str> {
        match self.parts.as_slice() {
            [Part::Call(c)] => c.literal_fallback(),
            _ => None,
        }
    }

    /// Renders with every variable's value and function result passed through `escape`
    /// (literal text is kept): for values placed into URLs, where a raw `&` or `/` would
    /// change the request.
    pub fn render_escaped(&self, ex: &Exchange, escape: impl Fn(&str) -> String) -> String {
        let mut out = String::new();
        for p in &self.parts {
            match p {
                Part::Lit(s) => out.push_str(s),
                Part::Var(name) => {
                    if let Some(v) = ex.lookup(name) {
                        out.push_str(&escape(&v));
                    }
                }
                Part::Call(c) => {
                    if let Some(v) = c.eval(ex) {
                        out.push_str(&escape(&v));
                    }
                }
            }
        }
        out
    }

    /// Like [`Template::render`], borrowing when the template is one variable or one
    /// literal (an identifier such as `{client_id}` costs no copy).
    pub fn render_cow<'e>(&'e self, ex: &'e Exchange) -> Cow<'e, str> {
        match self.parts.as_slice() {
            [Part::Var(name)] => ex.lookup(name).unwrap_or_default(),
            [Part::Lit(s)] => Cow::Borrowed(s),
            _ => Cow::Owned(self.render(ex)),
        }
    }

    pub fn render(&self, ex: &Exchange) -> String {
        match self.parts.as_slice() {
            [] => String::new(),
            [Part::Lit(s)] => s.clone(),
            parts => {
                let mut out = String::new();
                for p in parts {
                    match p {
                        Part::Lit(s) => out.push_str(s),
                        Part::Var(name) => {
                            if let Some(v) = ex.lookup(name) {
                                out.push_str(&v);
                            }
                        }
                        Part::Call(c) => {
                            if let Some(v) = c.eval(ex) {
                                out.push_str(&v);
                            }
                        }
                    }
                }
                out
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vars::{Headers, RequestInfo};

    const BODY: &str = r#"{"a":{"b":"x","n":1,"z":null},"list":[1,2],
        "people":[{"name":"Mae West","occupation":"actor"},{"name":"Bo","occupation":"poet"}]}"#;

    fn ex() -> Exchange {
        let mut h = Headers::new();
        h.push(":method".into(), "POST".into());
        h.push(":path".into(), "/v1/chat?page=2".into());
        h.push(":authority".into(), "api.local".into());
        h.push("authorization".into(), "Bearer tok-123".into());
        h.push("x-tier".into(), "Gold".into());
        let mut ex = Exchange {
            flow: "demo".into(),
            request: RequestInfo::from_headers(h),
            request_body: Some(BODY.as_bytes().to_vec()),
            ..Default::default()
        };
        ex.set_var("client_id", "c-1");
        ex.set_var("alpha", "abcdefgh");
        ex.set_var("accented", "héllo");
        ex.set_var("b64", "aGVsbG8=");
        ex.set_var("bad64", "not base64!");
        ex.set_var("ts", "1709622489045");
        ex.set_var("ts_s", "1709622489");
        ex.set_var("fmt", "yyyy/MM/dd");
        ex.set_var("start", 2);
        ex.set_var("empty", "");
        ex.set_var("swap", "(a)(b)");
        ex
    }

    fn r(src: &str) -> String {
        Template::compile(src)
            .unwrap_or_else(|e| panic!("{src}: {e}"))
            .render(&ex())
    }

    fn err(src: &str) -> String {
        Template::compile(src)
            .err()
            .unwrap_or_else(|| panic!("`{src}` compiled"))
            .to_string()
    }

    #[test]
    fn json_path() {
        assert_eq!(r("{jsonPath($.a.b,request.content)}"), "x");
        assert_eq!(r("{jsonPath('$.a.n', request.content)}"), "1");
        assert_eq!(
            r("{jsonPath($.a,request.content)}"),
            r#"{"b":"x","n":1,"z":null}"#
        );
        assert_eq!(r("{jsonPath($.list,request.content)}"), "[1,2]");
        assert_eq!(
            r("{jsonPath($.people[?(@.name == 'Mae West')].occupation,request.content)}"),
            "actor"
        );
        assert_eq!(
            r("{jsonPath($.people[*].name,request.content)}"),
            r#"["Mae West","Bo"]"#
        );
        assert_eq!(r("{jsonPath($.a.b,request.content,'true')}"), r#"["x"]"#);
        assert_eq!(r("{jsonPath($.a.b,request.content,false)}"), "x");
        // Nothing matched, a JSON null, a body that is not JSON, no such variable: empty.
        assert_eq!(r("[{jsonPath($.nope,request.content)}]"), "[]");
        assert_eq!(r("[{jsonPath($.a.z,request.content)}]"), "[]");
        assert_eq!(r("[{jsonPath($.a,alpha)}]"), "[]");
        assert_eq!(r("[{jsonPath($.a,missing)}]"), "[]");
        assert_eq!(r(r#"{jsonPath($.k,'{"k":"lit"}')}"#), "lit");
        assert!(err("{jsonPath(a.b,request.content)}").contains("starting with `$`"));
        assert!(err("{jsonPath($.a[?@.b ===],request.content)}").contains("JSONPath"));
        assert!(err("{jsonPath($.a,request.content,maybe)}").contains("true or false"));
    }

    #[test]
    fn escapes_case_and_base64() {
        let mut ex = ex();
        ex.set_var("raw", "a\"b\\c\n<d href='x'>&</d>\u{1}");
        let r = |s: &str| Template::compile(s).unwrap().render(&ex);
        assert_eq!(
            r("{escapeJSON(raw)}"),
            "a\\\"b\\\\c\\n<d href='x'>&</d>\\u0001"
        );
        assert_eq!(
            r("{escapeXML(raw)}"),
            "a&quot;b\\c\n&lt;d href=&apos;x&apos;&gt;&amp;&lt;/d&gt;\u{1}"
        );
        assert_eq!(
            r("{encodeHTML('<a b=\"c\">')}"),
            "&lt;a b=&quot;c&quot;&gt;"
        );
        assert_eq!(r("{toUpperCase(request.header.x-tier)}"), "GOLD");
        assert_eq!(r("{toLowerCase(request.verb)}"), "post");
        assert_eq!(r("{toUpperCase('straße')}"), "STRASSE");
        assert_eq!(r("{encodeBase64('hello')}"), "aGVsbG8=");
        assert_eq!(r("{decodeBase64(b64)}"), "hello");
        assert_eq!(r("{decodeBase64('aGVsbG8')}"), "hello");
        assert_eq!(r("[{decodeBase64(bad64)}]"), "[]");
        assert_eq!(r("[{decodeBase64('/w==')}]"), "[\u{fffd}]");
        assert_eq!(r("[{toUpperCase(missing)}]"), "[]");
    }

    #[test]
    fn first_non_null_and_substring() {
        assert_eq!(r("{firstnonnull(missing,client_id,'x')}"), "c-1");
        assert_eq!(r("{firstnonnull(missing, other, 'fallback')}"), "fallback");
        // An empty value is not null.
        assert_eq!(r("[{firstnonnull(empty,'x')}]"), "[]");
        assert_eq!(r("[{firstnonnull(missing,other)}]"), "[]");
        assert_eq!(r("{firstnonnull(missing,'a,b)}')}"), "a,b)}");
        assert_eq!(r(r#"{firstnonnull(missing,"dq")}"#), "dq");
        assert_eq!(r("{firstnonnull(missing,42)}"), "42");

        assert_eq!(r("{substring(alpha,0,4)}"), "abcd");
        assert_eq!(r("{substring(alpha,start)}"), "cdefgh");
        assert_eq!(r("{substring(alpha,8)}"), "");
        assert_eq!(r("{substring(accented,1,3)}"), "él");
        assert_eq!(r("{substring('literal',3,7)}"), "eral");
        // Outside 0 <= start <= end <= length (where Java throws): nothing.
        for bad in ["0,99", "5,2", "-1", "9", "a,2"] {
            let src = if bad == "a,2" {
                "[{substring(alpha,client_id,2)}]".to_owned()
            } else {
                format!("[{{substring(alpha,{bad})}}]")
            };
            assert_eq!(r(&src), "[]", "{src}");
        }
        assert!(err("{substring(alpha,'x')}").contains("not an integer"));
        assert!(err("{substring(alpha)}").contains("takes 2 to 3 argument(s), got 1"));
    }

    #[test]
    fn replace() {
        assert_eq!(
            r("{replaceAll(request.header.authorization,'^Bearer ','')}"),
            "tok-123"
        );
        assert_eq!(r("{replaceAll(alpha,'[aeiou]','_')}"), "_bcd_fgh");
        assert_eq!(r("{replaceFirst(alpha,'[a-z]','_')}"), "_bcdefgh");
        // Java's replacement syntax: `$2$1`, `$1x` is group 1 then `x`, `\$` a dollar.
        assert_eq!(r("{replaceAll('ab','(a)(b)','$2$1')}"), "ba");
        assert_eq!(r("{replaceAll('ab','(a)(b)','$1x')}"), "ax");
        assert_eq!(r(r"{replaceAll('ab','a','\$')}"), "$b");
        // The pattern from a variable, compiled when rendered; a bad one renders nothing.
        assert_eq!(r("{replaceAll('abab',swap,'$2$1')}"), "baba");
        assert_eq!(r("[{replaceAll('ab',client_id,'x')}]"), "[ab]");
        let mut ex = ex();
        ex.set_var("broken", "(");
        let t = Template::compile("[{replaceAll('ab',broken,'x')}]").unwrap();
        assert_eq!(t.render(&ex), "[]");
        assert!(err("{replaceAll(alpha,'(','x')}").contains("regular expression"));
    }

    #[test]
    fn time_uuid_random() {
        assert_eq!(
            r("{timeFormatUTCMs('yyyy-MM-dd HH:mm:ss.SSS',ts)}"),
            "2024-03-05 07:08:09.045"
        );
        assert_eq!(r("{timeFormatMs(fmt,ts)}"), "2024/03/05");
        assert_eq!(r("{timeFormatUTC('HH:mm:ss',ts_s)}"), "07:08:09");
        assert_eq!(r("{timeFormat('yyyy',ts_s)}"), "2024");
        assert_eq!(r("[{timeFormatUTCMs('yyyy',alpha)}]"), "[]");
        assert_eq!(r("[{timeFormatUTC('yyyy',9223372036854775807)}]"), "[]");
        // A format from a variable that is no pattern (`c-1`: `c` is no pattern letter).
        assert_eq!(r("[{timeFormatUTCMs(client_id,ts)}]"), "[]");
        assert!(err("{timeFormatUTCMs('yyyy-ww',ts)}").contains("not supported"));

        let t = Template::compile("{createUuid()}").unwrap();
        let (a, b) = (t.render(&ex()), t.render(&ex()));
        assert_ne!(a, b);
        let shape = regex::Regex::new(
            "^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$",
        )
        .unwrap();
        assert!(shape.is_match(&a), "{a}");
        assert_eq!(r("{randomLong(5,6)}"), "5");
        let n: i64 = r("{randomLong()}").parse().unwrap();
        assert!(n >= 0);
        assert_eq!(r("[{randomLong(6,5)}]"), "[]");
        assert!(err("{createUuid(x)}").contains("takes 0 argument(s)"));
    }

    #[test]
    fn hashes_and_hmac() {
        assert_eq!(
            r("{sha256Hex('abc')}"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(
            r("{sha256Base64('abc')}"),
            "ungWv48Bz+pBQUDeXa4iI7ADYaOWF3qctBD/YfIAFa0="
        );
        assert_eq!(
            r("{sha512Hex('abc')}"),
            "ddaf35a193617abacc417349ae20413112e6fa4e89a97ea20a9eeee64b55d39a\
             2192992a274fc1a836ba3c23a3feebbd454d4423643ce80e2a9ac94fa54ca49f"
        );
        assert_eq!(
            r("{sha1Hex('abc')}"),
            "a9993e364706816aba3e25717850c26c9cd0d89d"
        );
        assert_eq!(r("{sha1Base64('abc')}"), "qZk+NkcGgWq6PiVxeFDCbJzQ2J0=");
        // RFC 4231, test case 2: key "Jefe".
        let mut ex = ex();
        ex.set_var("private.key", "Jefe");
        ex.set_var("msg", "what do ya want for nothing?");
        let r = |s: &str| Template::compile(s).unwrap().render(&ex);
        let hex = "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843";
        assert_eq!(r("{hmacSha256(private.key,msg,'utf8','hex')}"), hex);
        assert_eq!(r("{hmacSha256('4a656665',msg,'hex','base16')}"), hex);
        assert_eq!(r("{hmacSha256('SmVmZQ==',msg,base64,hex)}"), hex);
        // Output base64 by default.
        assert_eq!(
            r("{hmacSha256(private.key,msg)}"),
            "W9zBRr9gdU5qBCQmCJV1x1oAPwidJzmDnexYuWTsOEM="
        );
        assert_eq!(
            r("{hmacSha256(private.key,msg,'utf8','base64url')}"),
            "W9zBRr9gdU5qBCQmCJV1x1oAPwidJzmDnexYuWTsOEM"
        );
        assert_eq!(
            r("{hmacSha512(private.key,msg,'utf8','hex')}"),
            "164b7a7bfcf819e2e395fbe73b56e0a387bd64222e831fd610270cd7ea250554\
             9758bf75c05a994a6d034f65f8f0e6fdcaeab1a34d4a6b4b636e070a38bce737"
        );
        // RFC 2202, test case 2.
        assert_eq!(
            r("{hmacSha1(private.key,msg,'utf8','hex')}"),
            "effcdf6ae5eb2fa2d27416d5f184df9c259a7c79"
        );
        // A key longer than the block is hashed first (RFC 4231, test case 6).
        ex.set_var("long", "aa".repeat(131));
        ex.set_var(
            "m6",
            "Test Using Larger Than Block-Size Key - Hash Key First",
        );
        assert_eq!(
            Template::compile("{hmacSha256(long,m6,'hex','hex')}")
                .unwrap()
                .render(&ex),
            "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54"
        );
        assert_eq!(
            Template::compile("[{hmacSha256('zz',msg,'hex')}]")
                .unwrap()
                .render(&ex),
            "[]"
        );
        assert!(err("{hmacSha256(k,m,'latin1')}").contains("key encoding"));
        assert!(err("{hmacSha256(k,m,'utf8','octal')}").contains("output encoding"));
    }

    #[test]
    fn unknown_and_malformed_calls_are_load_errors() {
        let e = err("x {fooBar(a)} y");
        assert!(e.contains("unknown template function `fooBar`"), "{e}");
        let e = err("{xPath(/a,request.content)}");
        assert!(e.contains("tollgate does not implement"), "{e}");
        let e = err("{toUpperCase(toLowerCase(a))}");
        assert!(e.contains("do not nest"), "{e}");
        let e = err("{toUpperCase(a,b)}");
        assert!(e.contains("takes 1 argument(s), got 2"), "{e}");
        let e = err("{toUpperCase()}");
        assert!(e.contains("got 0"), "{e}");
        let e = err("{firstnonnull(a,)}");
        assert!(e.contains("empty"), "{e}");
        let e = err("{toUpperCase(a b)}");
        assert!(e.contains("neither"), "{e}");
    }

    /// What is not shaped as a call or a name stays text, as before functions existed.
    #[test]
    fn braces_that_are_not_calls_stay_text() {
        for src in [
            r#"{"a":{"b":1},"c":[{"d":"{e"}]}"#,
            "{ toUpperCase(x) }",
            "{toUpperCase (x)}",
            "{f(x) + 1}",
            "{f(x}",
            "{f(x)",
            "{f('x)}",
            "{f(x))}",
            "function g(x){return h(x)}",
            "{}",
            "{{}}",
            "}{",
        ] {
            assert_eq!(r(src), src, "{src}");
        }
        assert_eq!(r("{{client_id}}"), "{c-1}");
        assert_eq!(
            r(r#"{"id":"{client_id}","up":"{toUpperCase(client_id)}"}"#),
            r#"{"id":"c-1","up":"C-1"}"#
        );
    }

    #[test]
    fn backslash_escapes_a_brace() {
        assert_eq!(r(r"\{client_id}"), "{client_id}");
        assert_eq!(
            r(r"a\{toUpperCase(x)} {client_id}"),
            "a{toUpperCase(x)} c-1"
        );
        // An even run of backslashes escapes nothing; all of them stay.
        assert_eq!(r(r"\\{client_id}"), r"\\c-1");
        assert_eq!(r(r"\\\{client_id}"), r"\\{client_id}");
        assert_eq!(r(r"x\y\{"), r"x\y{");
        assert_eq!(r(r"{ \{client_id}"), "{ {client_id}");
    }

    #[test]
    fn variables_escaping_and_fallbacks() {
        let t = Template::compile("{substring(alpha,0,n)} {x} {jsonPath($.a,body)}").unwrap();
        assert_eq!(
            t.variables().collect::<Vec<_>>(),
            ["alpha", "n", "x", "body"]
        );
        assert!(!Template::compile("{createUuid()}").unwrap().is_static());
        let t = Template::compile("/u/{toUpperCase('a/b&c')}").unwrap();
        assert_eq!(
            t.render_escaped(&ex(), crate::vars::percent_encode),
            "/u/A%2FB%26C"
        );
        assert_eq!(t.render_cow(&ex()), "/u/A/B&C");
        let fb = |s: &str| {
            Template::compile(s)
                .unwrap()
                .literal_fallback()
                .map(str::to_owned)
        };
        assert_eq!(fb("{firstnonnull(a,b,'100')}").as_deref(), Some("100"));
        assert_eq!(fb("{firstnonnull(a,b)}"), None);
        assert_eq!(fb("x{firstnonnull(a,'1')}"), None);
    }

    /// Odd templates built from the characters and words the parser reacts to: compiling
    /// and rendering never panic.
    #[test]
    fn odd_templates_never_panic() {
        const PIECES: &[&str] = &[
            "{",
            "}",
            "(",
            ")",
            "[",
            "]",
            "'",
            "\"",
            ",",
            "\\",
            "$",
            ".",
            " ",
            "a",
            "é",
            "client_id",
            "jsonPath",
            "substring",
            "firstnonnull",
            "replaceAll",
            "hmacSha256",
            "timeFormatUTCMs",
            "decodeBase64",
            "createUuid",
            "$.a",
            "-1",
            "0",
            "99",
            "'x'",
            "request.content",
            "@",
            "?",
            "*",
            "\u{0}",
            "💥",
        ];
        let ex = ex();
        let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..20_000 {
            let mut s = String::new();
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let len = (seed % 24) as usize;
            let mut x = seed;
            for _ in 0..len {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                s.push_str(PIECES[(x >> 33) as usize % PIECES.len()]);
            }
            if let Ok(t) = Template::compile(&s) {
                let _ = t.render(&ex);
                let _ = t.render_escaped(&ex, crate::vars::percent_encode);
                let _ = t.variables().count();
            }
        }
    }
}

/// The parser before template functions, kept as the reference: for any text without a
/// call or a backslash, the templates render exactly as they did.
#[cfg(test)]
mod old_equivalence {
    use super::*;

    fn old_render(source: &str, ex: &Exchange) -> String {
        let mut out = String::new();
        let mut lit = String::new();
        let mut rest = source;
        while let Some(open) = rest.find('{') {
            let after = &rest[open + 1..];
            let Some(close) = after.find('}') else { break };
            let start = after[..close].rfind('{').map_or(0, |j| j + 1);
            let name = &after[start..close];
            if is_var_name(name) {
                lit.push_str(&rest[..open + start]);
                out.push_str(&std::mem::take(&mut lit));
                if let Some(v) = ex.lookup(name) {
                    out.push_str(&v);
                }
            } else {
                lit.push_str(&rest[..open + 1 + close + 1]);
            }
            rest = &after[close + 1..];
        }
        lit.push_str(rest);
        out.push_str(&lit);
        out
    }

    #[test]
    fn same_as_before_without_calls_or_escapes() {
        const P: &[&str] = &[
            "{", "}", "a", ".", " ", "\"", ":", "x-y", "1", "(", ")", "é", "{a}", "b",
        ];
        let mut ex = Exchange::default();
        ex.set_var("a", "VA");
        ex.set_var("x-y", "VXY");
        ex.set_var("b", "VB");
        let mut seed: u64 = 0x1234_5678_9abc_def1;
        for _ in 0..200_000 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let mut x = seed;
            let mut s = String::new();
            for _ in 0..(seed % 20) {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                s.push_str(P[(x >> 33) as usize % P.len()]);
            }
            let Ok(t) = Template::compile(&s) else {
                assert!(s.contains("("), "{s:?} refused");
                continue;
            };
            assert_eq!(t.render(&ex), old_render(&s, &ex), "{s:?}");
        }
    }
}
