//! Fuzz target bodies. Each function takes arbitrary bytes, turns them into input for one
//! part of tollgate and panics only when an invariant breaks; everything else (errors,
//! rejections) is a normal outcome. `fuzz/fuzz_targets/*.rs` hands them to libFuzzer
//! (`cargo +nightly fuzz run <target>`), and `tests/fuzz_smoke.rs` runs them on stable over
//! the committed corpora, the regressions and a bounded number of seeded mutations.
//!
//! Not part of the API: hidden from the docs, kept in the library so both drivers share one
//! definition of each target.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::{HeaderMap, HeaderValue, Metadata};
use envoy_types::pb::envoy::service::ext_proc::v3::{
    processing_request::Request, processing_response::Response, HttpBody, HttpHeaders,
    HttpTrailers, ProcessingRequest, ProcessingResponse, ProtocolConfiguration,
};
use envoy_types::pb::google::protobuf::{value::Kind, Struct, Value as PbValue};

use crate::config::reload::{ConfigManager, ConfigSource};
use crate::config::SourceFile;
use crate::expr::{Condition, Template};
use crate::pipeline::{Direction, Hook, Outcome, Policy};
use crate::policies::BuildContext;
use crate::server::{NoMatch, Shared};
use crate::vars::{Exchange, Headers, RequestInfo, ResponseInfo};

/// A fuzz target's body.
pub type Target = fn(&[u8]);

/// The fuzz targets, by name (also the corpus and regression directory names).
pub const TARGETS: &[(&str, Target)] = &[
    ("stream", stream),
    ("config", config),
    ("template", template),
    ("path_template", path_template),
    ("oas", oas),
];

/// Longest time one ext_proc message may take before the stream counts as stalled. The
/// slowest legitimate step in the fuzz configuration (a callout refused on loopback, a
/// JavaScript step with its 20 ms limit) finishes far within it.
const STALL: Duration = Duration::from_secs(10);

/// The configuration the stream and configuration targets compile against: the examples
/// of `policies/` (every policy type, read as they are, so the fuzzers follow them) with the
/// callout and the external guards pointed at a closed loopback port, plus the fuzz-only documents and specs of
/// `fuzz/config/`; assembled once per process in a temporary directory.
pub fn config_dir() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
        let dir = std::env::temp_dir().join(format!("tollgate-fuzz-config-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        copy_tree(&root.join("policies"), &dir).expect("policies/ copies");
        copy_tree(&root.join("fuzz/config"), &dir).expect("fuzz/config copies");
        let callout = dir.join("service-callout.yaml");
        let text = std::fs::read_to_string(&callout).expect("the callout example reads");
        // The demo's authorization service: nothing listens on port 9 (discard).
        std::fs::write(&callout, text.replace("127.0.0.1:8081", "127.0.0.1:9"))
            .expect("the callout example writes");
        // The external guards example: Model Armor, its token source and the HTTP guard on
        // the same closed port (fuzz runs never leave the machine).
        let guards = dir.join("external-guards.yaml");
        let text = std::fs::read_to_string(&guards).expect("the external guards example reads");
        let text = text
            .replace(
                "https://modelarmor.us-central1.rep.googleapis.com",
                "http://127.0.0.1:9",
            )
            .replace("metadata.google.internal", "127.0.0.1:9")
            .replace(
                "https://guard.internal.example/check",
                "http://127.0.0.1:9/check",
            );
        std::fs::write(&guards, text).expect("the external guards example writes");
        // The built-in model of the semantic cache and the model router, where
        // scripts/setup.sh installs it.
        let model = root.join(".tools/embed-model");
        for example in ["semantic-cache.yaml", "model-router.yaml"] {
            let path = dir.join(example);
            let text = std::fs::read_to_string(&path).expect("the example reads");
            std::fs::write(
                &path,
                text.replace(
                    "embedder: {kind: static}",
                    &format!(
                        "embedder: {{kind: static, modelDir: \"{}\"}}",
                        model.display()
                    ),
                ),
            )
            .expect("the example writes");
        }
        dir
    })
    .clone()
}

fn copy_tree(from: &std::path::Path, to: &std::path::Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_tree(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), target)?;
        }
    }
    Ok(())
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a current-thread runtime builds")
    })
}

/// Reads fuzz input as a sequence of choices; past the end every read is zero/empty.
struct Input<'a> {
    data: &'a [u8],
}

impl<'a> Input<'a> {
    fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    fn byte(&mut self) -> u8 {
        match self.data.split_first() {
            Some((b, rest)) => {
                self.data = rest;
                *b
            }
            None => 0,
        }
    }

    fn bytes(&mut self, max: usize) -> &'a [u8] {
        let n = (usize::from(self.byte()) % (max + 1)).min(self.data.len());
        let (head, rest) = self.data.split_at(n);
        self.data = rest;
        head
    }

    /// Text: a dictionary word, a word with fuzzed bytes after it, or fuzzed bytes (lossily
    /// decoded, so invalid UTF-8 becomes multi-byte replacement characters).
    fn text(&mut self, dict: &[&str], max: usize) -> String {
        let sel = self.byte();
        let word = if dict.is_empty() {
            ""
        } else {
            dict[usize::from(sel >> 2) % dict.len()]
        };
        match sel & 3 {
            0 => word.to_owned(),
            1 => format!("{word}{}", String::from_utf8_lossy(self.bytes(max))),
            _ => String::from_utf8_lossy(self.bytes(max)).into_owned(),
        }
    }
}

/// Splits at the first NUL: `(before, after)`.
fn split0(data: &[u8]) -> (&[u8], &[u8]) {
    match data.iter().position(|b| *b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[]),
    }
}

const METHODS: &[&str] = &[
    "GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "get",
];
const PATHS: &[&str] = &[
    "/v1/models",
    "/v1/models/m",
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/pets",
    "/v1/pets/1",
    "/v1/pets?limit=10",
    "/catalog/a",
    "/js",
    "/jwt",
    "/kvm",
    "/partner/x",
    "/prefs",
    "/limited/a",
    "/weighted",
    "/callout",
    "/",
    "/v1/models?apikey=tg_demo_key_rotate_me_0001",
    "/v1/models/%2e%2e/x",
    "/v1/items?t=a&s=1%202&p=1|2&d[min]=1&f=color,red&since=2024-01-01T00:00:00Z",
    "/v1/a+b/1",
    "/v1/files/x.json",
    "/v1/pets/mine",
];
const HOSTS: &[&str] = &[
    "api.example.com",
    "localhost:10000",
    "a.b.example.com.",
    "[::1]:80",
    "EXAMPLE.com",
    "é.example.com",
];
const HEADER_NAMES: &[&str] = &[
    "x-api-key",
    "authorization",
    "content-type",
    "content-length",
    "accept-language",
    "cache-control",
    "x-tenant",
    "x-user",
    "x-tier",
    "x-weight",
    "x-request-id",
    "x-forwarded-for",
    "cookie",
    "x-trace",
    "x-tollgate-app",
];
const HEADER_VALUES: &[&str] = &[
    "tg_demo_key_rotate_me_0001",
    "tg_limits_demo_key_0001",
    "application/json",
    "text/event-stream",
    "no-cache",
    "Bearer ",
    // HS256 with the demo secret: iss/aud as configured, sub, tier, exp in 2100.
    "Bearer eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJpc3MiOiJodHRwczovL2lzc3Vlci5leGFtcGxlLmNvbSIsImF1ZCI6InRvbGxnYXRlLWRlbW8iLCJzdWIiOiJ1MSIsInRpZXIiOiJnb2xkIiwiZXhwIjo0MTAyNDQ0ODAwfQ.GAHZr5Fn7uK1bfLwZzFy53ZRPlOKG-gkHUHFwBu1YXY",
    "acme",
    "18446744073709551616",
    "-1",
    "1e308",
    "10.0.0.1, 10.0.0.2",
];
const BODIES: &[&str] = &[
    r#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}]}"#,
    r#"{"name":"Rex","kind":"dog","goodBoy":true}"#,
    r#"{"name":"Rex","kind":"dog","goodBoy":"yes","tags":[1,2,3]}"#,
    r#"{"allowed":true,"tier":"gold"}"#,
    r#"[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]"#,
    "data: {\"choices\":[{\"delta\":{\"content\":\"x\"}}]}\n\n",
    "{\"a\":",
    "\u{feff}{}",
];

fn header_map(list: Vec<(String, String)>, raw: bool) -> Option<HeaderMap> {
    Some(HeaderMap {
        headers: list
            .into_iter()
            .map(|(key, value)| {
                if raw {
                    HeaderValue {
                        key,
                        value: String::new(),
                        raw_value: value.into_bytes(),
                    }
                } else {
                    HeaderValue {
                        key,
                        value,
                        raw_value: Vec::new(),
                    }
                }
            })
            .collect(),
    })
}

fn request_headers(inp: &mut Input) -> Vec<(String, String)> {
    let mut h = vec![
        (":method".to_owned(), inp.text(METHODS, 8)),
        (":path".to_owned(), inp.text(PATHS, 48)),
        (":scheme".to_owned(), "http".to_owned()),
    ];
    if inp.byte() & 1 == 0 {
        h.push((":authority".to_owned(), inp.text(HOSTS, 24)));
    }
    for _ in 0..inp.byte() % 6 {
        h.push((inp.text(HEADER_NAMES, 12), inp.text(HEADER_VALUES, 40)));
    }
    h
}

fn body(inp: &mut Input) -> Vec<u8> {
    match inp.byte() % 3 {
        0 => BODIES[usize::from(inp.byte()) % BODIES.len()]
            .as_bytes()
            .to_vec(),
        1 => Vec::new(),
        _ => inp.bytes(200).to_vec(),
    }
}

fn string_struct(fields: &[(&str, String)]) -> Struct {
    Struct {
        fields: fields
            .iter()
            .map(|(k, v)| {
                (
                    (*k).to_owned(),
                    PbValue {
                        kind: Some(Kind::StringValue(v.clone())),
                    },
                )
            })
            .collect(),
    }
}

fn kind_of_request(r: &Request) -> usize {
    match r {
        Request::RequestHeaders(_) => 0,
        Request::RequestBody(_) => 1,
        Request::RequestTrailers(_) => 2,
        Request::ResponseHeaders(_) => 3,
        Request::ResponseBody(_) => 4,
        Request::ResponseTrailers(_) => 5,
    }
}

fn kind_of_response(r: &ProcessingResponse) -> Option<usize> {
    Some(match r.response.as_ref()? {
        Response::RequestHeaders(_) => 0,
        Response::RequestBody(_) => 1,
        Response::RequestTrailers(_) => 2,
        Response::ResponseHeaders(_) => 3,
        Response::ResponseBody(_) => 4,
        Response::ResponseTrailers(_) => 5,
        Response::ImmediateResponse(_) | Response::StreamedImmediateResponse(_) => 6,
    })
}

fn shared(reject: bool) -> Arc<Shared> {
    static SHARED: OnceLock<[Arc<Shared>; 2]> = OnceLock::new();
    let both = SHARED.get_or_init(|| {
        let _rt = runtime().enter();
        let cfg = ConfigManager::load(ConfigSource::Dir(config_dir())).unwrap_or_else(|e| {
            panic!("the fuzz configuration (policies/ + fuzz/config/) does not load: {e}")
        });
        [
            Shared::new(cfg.clone(), NoMatch::Continue),
            Shared::new(cfg, NoMatch::Reject),
        ]
    });
    both[usize::from(reject)].clone()
}

/// One ext_proc stream: an arbitrary sequence of messages (any order, any body modes,
/// observability mode, metadata naming a flow, attributes) through the compiled fuzz
/// configuration. Invariants: no panic; every message is handled within [`STALL`]; outside
/// observability mode and before an immediate response, every message with a request gets
/// an answer of its own kind (or an immediate response, or ends the stream with an error),
/// except FULL_DUPLEX_STREAMED body chunks held until the body ends.
pub fn stream(data: &[u8]) {
    const FULL_DUPLEX: i32 = 4;
    let mut inp = Input { data };
    let flags = inp.byte();
    let shared = shared(flags & 1 != 0);
    let observability = flags & 2 != 0;
    let modes = (flags & 4 != 0).then(|| (i32::from(inp.byte() % 5), i32::from(inp.byte() % 5)));
    let raw_headers = flags & 8 != 0;
    let mut first = Some(ProcessingRequest {
        observability_mode: observability,
        protocol_config: modes.map(|(req, resp)| ProtocolConfiguration {
            request_body_mode: req,
            response_body_mode: resp,
            ..Default::default()
        }),
        metadata_context: (flags & 16 != 0).then(|| Metadata {
            filter_metadata: HashMap::from([(
                "envoy.filters.http.ext_proc".to_owned(),
                string_struct(&[(
                    crate::server::proto::FLOW_METADATA_KEY,
                    inp.text(&["api", "pets", "js", "jwt-api", "callout", "nope"], 8),
                )]),
            )]),
            ..Default::default()
        }),
        attributes: if flags & 32 != 0 {
            HashMap::from([(
                "envoy.filters.http.ext_proc".to_owned(),
                string_struct(&[
                    (
                        "source.address",
                        inp.text(&["10.0.0.1:4242", "[::1]:1"], 16),
                    ),
                    ("request.id", inp.text(&[], 8)),
                ]),
            )])
        } else {
            HashMap::new()
        },
        ..Default::default()
    });
    let full_duplex = |dir: usize| match modes {
        Some((req, _)) if dir == 1 => req == FULL_DUPLEX,
        Some((_, resp)) if dir == 4 => resp == FULL_DUPLEX,
        _ => false,
    };

    let rt = runtime();
    let mut state = {
        let _rt = rt.enter();
        crate::server::stream::StreamState::new(shared)
    };
    let mut answered = false;
    for _ in 0..24 {
        if inp.is_empty() {
            break;
        }
        let op = inp.byte();
        let eos = op & 0x80 != 0;
        let request = match op % 8 {
            0 => Some(Request::RequestHeaders(HttpHeaders {
                headers: header_map(request_headers(&mut inp), raw_headers),
                end_of_stream: eos,
                ..Default::default()
            })),
            1 => Some(Request::RequestBody(HttpBody {
                body: body(&mut inp),
                end_of_stream: eos,
                ..Default::default()
            })),
            2 => Some(Request::RequestTrailers(HttpTrailers { trailers: None })),
            3 => {
                let mut h = vec![(
                    ":status".to_owned(),
                    inp.text(&["200", "404", "500", "99999"], 4),
                )];
                for _ in 0..inp.byte() % 4 {
                    h.push((inp.text(HEADER_NAMES, 12), inp.text(HEADER_VALUES, 40)));
                }
                Some(Request::ResponseHeaders(HttpHeaders {
                    headers: header_map(h, raw_headers),
                    end_of_stream: eos,
                    ..Default::default()
                }))
            }
            4 => Some(Request::ResponseBody(HttpBody {
                body: body(&mut inp),
                end_of_stream: eos,
                ..Default::default()
            })),
            5 => Some(Request::ResponseTrailers(HttpTrailers { trailers: None })),
            _ => None,
        };
        let mut msg = first.take().unwrap_or_default();
        let kind = request.as_ref().map(kind_of_request);
        msg.request = request;
        let mut out = Vec::new();
        let result = rt
            .block_on(async { tokio::time::timeout(STALL, state.on_message(msg, &mut out)).await });
        let Ok(result) = result else {
            panic!("an ext_proc message stalled the stream for {STALL:?}");
        };
        if observability {
            assert!(out.is_empty(), "answers in observability mode: {out:?}");
        }
        let Some(kind) = kind else {
            assert!(
                out.is_empty(),
                "answers to a message without a request: {out:?}"
            );
            continue;
        };
        if answered || observability {
            if result.is_err() {
                break;
            }
            continue;
        }
        for r in &out {
            let k = kind_of_response(r);
            // Trailers in FULL_DUPLEX_STREAMED release the held body first; a request body or
            // trailers there release the request-headers answer held for the body steps.
            let ok = k == Some(kind)
                || k == Some(6)
                || (kind % 3 == 2 && k == Some(kind - 1))
                || (matches!(kind, 1 | 2) && full_duplex(1) && k == Some(0));
            assert!(ok, "message kind {kind} answered with {r:?}");
        }
        answered |= out.iter().any(|r| kind_of_response(r) == Some(6));
        if result.is_err() {
            break;
        }
        // A FULL_DUPLEX_STREAMED request whose flow needs the body holds its headers answer
        // until the body steps ran.
        let held = (kind % 3 == 1 && full_duplex(kind) && !eos) || (kind == 0 && full_duplex(1));
        assert!(
            held || !out.is_empty(),
            "message kind {kind} got no answer and the stream goes on"
        );
    }
    drop(state);
}

/// Configuration loading: the input is one configuration file (YAML or JSON), compiled
/// next to the fuzz configuration directory (so relative script and spec paths resolve).
/// A configuration that compiles then selects flows for a few requests.
pub fn config(data: &[u8]) {
    let (text, req) = split0(data);
    let files = [SourceFile {
        name: "fuzz.yaml".to_owned(),
        text: String::from_utf8_lossy(text).into_owned(),
    }];
    let _rt = runtime().enter();
    let Ok(snap) = crate::config::compile(&files, Some(&config_dir())) else {
        return;
    };
    let mut inp = Input { data: req };
    let mut h = Headers::new();
    for (k, v) in request_headers(&mut inp) {
        h.push(k, v);
    }
    let req = RequestInfo::from_headers(h);
    let named = inp.text(&[], 12);
    let _ = snap.select(Some(&named), &req);
    let _ = snap.select(None, &req);
}

fn exchange(inp: &mut Input) -> Exchange {
    let mut h = Headers::new();
    for (k, v) in request_headers(inp) {
        h.push(k, v);
    }
    let mut ex = Exchange {
        request: RequestInfo::from_headers(h),
        ..Default::default()
    };
    if inp.byte() & 1 == 1 {
        ex.request_body = Some(body(inp));
    }
    if inp.byte() & 1 == 1 {
        let mut rh = Headers::new();
        for _ in 0..inp.byte() % 4 {
            rh.push(inp.text(HEADER_NAMES, 12), inp.text(HEADER_VALUES, 40));
        }
        ex.response = Some(ResponseInfo {
            status: u16::from(inp.byte()) * 3,
            headers: rh,
        });
        if inp.byte() & 1 == 1 {
            ex.response_body = Some(body(inp));
        }
    }
    for _ in 0..inp.byte() % 4 {
        let name = inp.text(
            &["client_id", "ratelimit.q.available", "jwt.auth.claim.sub"],
            8,
        );
        let value = inp.text(&[], 16);
        ex.set_var(name, value);
    }
    ex.attributes
        .insert("source.address".to_owned(), inp.text(&["10.0.0.1:1"], 8));
    ex
}

/// Templates and conditions: `template NUL condition NUL exchange`. Both compile (or are
/// refused) and are evaluated against an exchange built from the rest; the condition both
/// as CEL and in Apigee's language.
pub fn template(data: &[u8]) {
    let (t, rest) = split0(data);
    let (c, rest) = split0(rest);
    let mut inp = Input { data: rest };
    let ex = exchange(&mut inp);
    if let Ok(t) = Template::compile(&String::from_utf8_lossy(t)) {
        let _ = t.render(&ex);
        let _ = t.render_cow(&ex);
        let _ = t.render_escaped(&ex, crate::vars::percent_encode);
        let _ = t.variables().count();
    }
    // The same text as CEL and as an Apigee condition.
    let c = String::from_utf8_lossy(c);
    for c in [Condition::compile(&c), Condition::compile_apigee(&c)]
        .into_iter()
        .flatten()
    {
        let _ = c.eval(&ex);
    }
}

/// Path templates: `template NUL path`, through the product operation matcher and the
/// OpenAPI path matcher, and the ambiguous-path check.
pub fn path_template(data: &[u8]) {
    let (t, p) = split0(data);
    let t = String::from_utf8_lossy(t);
    let p = String::from_utf8_lossy(p);
    let _ = crate::consumer::index::ambiguous_path(&p);
    if let Ok(c) = crate::consumer::index::PathTemplate::compile(&t) {
        let _ = c.matches(&p);
    }
    let _ = crate::openapi::match_path_template(&t, &p);
}

fn oas_policies() -> &'static [Arc<dyn Policy>] {
    static P: OnceLock<Vec<Arc<dyn Policy>>> = OnceLock::new();
    P.get_or_init(|| {
        let dir = config_dir();
        [
            "spec: specs/petstore.yaml\nvalidateBody: true\nresponse: enforce\nallowUnspecifiedParameters: {query: false, header: false, cookie: false}\nmaxViolations: 3",
            "spec: specs/fuzz30.yaml\nvalidateBody: true\nresponse: enforce",
            "spec: specs/fuzz31.yaml\nvalidateBody: true\nresponse: log\nbasePath: /v1",
        ]
        .iter()
        .map(|s| {
            let ctx = BuildContext {
                name: "oas".to_owned(),
                config_dir: Some(dir.clone()),
                ..Default::default()
            };
            let spec = serde_norway::from_str(s).expect("the fuzz policy specs are YAML");
            crate::policies::oas_validation::build(&ctx, spec)
                .unwrap_or_else(|e| panic!("fuzz OasValidation spec does not build: {e}"))
        })
        .collect()
    })
}

/// The OpenAPI validator: a request (and possibly a response) built from the input,
/// validated against the fuzz specs (`fuzz/config/specs/`).
pub fn oas(data: &[u8]) {
    let mut inp = Input { data };
    let which = usize::from(inp.byte());
    let policies = oas_policies();
    let policy = &policies[which % policies.len()];
    let mut ex = exchange(&mut inp);
    let passed = matches!(
        policy.run(&mut ex, Direction::Request),
        Hook::Ready(Outcome::Continue)
    );
    if passed && ex.response.is_some() {
        let _ = policy.run(&mut ex, Direction::Response);
    }
}
