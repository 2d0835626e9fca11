use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::http_client::HttpClient;

/// The built-in model's directory: `TOLLGATE_EMBED_MODEL_DIR`, else where
/// `scripts/setup.sh` puts it (`.tools/embed-model`). `None` (and the caller skips, saying
/// so) when neither holds a model.
pub(super) fn model_dir() -> Option<PathBuf> {
    let candidates = std::env::var_os("TOLLGATE_EMBED_MODEL_DIR")
        .map(PathBuf::from)
        .into_iter()
        .chain([PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".tools/embed-model")]);
    for dir in candidates {
        if dir.join("model.safetensors").is_file() {
            return Some(dir);
        }
    }
    eprintln!(
        "SKIPPED: no built-in embedding model (run scripts/setup.sh, or set \
         TOLLGATE_EMBED_MODEL_DIR to a directory with config.json, tokenizer.json and \
         model.safetensors)"
    );
    None
}

pub(super) fn load() -> Option<StaticEmbedder> {
    let dir = model_dir()?;
    Some(StaticEmbedder::load(&dir).expect("the installed model loads"))
}

#[test]
fn embedding_normalises_and_refuses_degenerate_vectors() {
    let e = Embedding::normalized(vec![3.0, 4.0]).unwrap();
    assert_eq!(e.as_slice(), &[0.6, 0.8]);
    assert!((e.cosine(&e) - 1.0).abs() < 1e-6);
    let o = Embedding::normalized(vec![-4.0, 3.0]).unwrap();
    assert!(e.cosine(&o).abs() < 1e-6);
    assert!(matches!(
        Embedding::normalized(vec![]),
        Err(EmbedError::Empty)
    ));
    assert!(matches!(
        Embedding::normalized(vec![0.0; 8]),
        Err(EmbedError::Empty)
    ));
    assert!(Embedding::normalized(vec![f32::NAN, 1.0]).is_err());
    assert!(Embedding::normalized(vec![f32::INFINITY, 1.0]).is_err());
    // Different models' vectors never look alike.
    let three = Embedding::normalized(vec![1.0, 0.0, 0.0]).unwrap();
    assert_eq!(e.cosine(&three), 0.0);
    // The unrolled dot product agrees with the plain one on odd lengths.
    let a: Vec<f32> = (0..67).map(|i| (i as f32).sin()).collect();
    let b: Vec<f32> = (0..67).map(|i| (i as f32).cos()).collect();
    let (ea, eb) = (
        Embedding::normalized(a.clone()).unwrap(),
        Embedding::normalized(b.clone()).unwrap(),
    );
    let plain: f32 = ea
        .as_slice()
        .iter()
        .zip(eb.as_slice())
        .map(|(x, y)| x * y)
        .sum();
    assert!((ea.cosine(&eb) - plain).abs() < 1e-5);
}

#[test]
fn static_model_dir_errors_are_config_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let err = StaticEmbedder::load(tmp.path()).unwrap_err();
    assert!(matches!(err, EmbedError::Model { .. }), "{err}");
    assert!(err.to_string().contains("config.json"), "{err}");
    std::fs::write(tmp.path().join("config.json"), "{}").unwrap();
    std::fs::write(tmp.path().join("tokenizer.json"), "not json").unwrap();
    let err = StaticEmbedder::load(tmp.path()).unwrap_err();
    assert!(err.to_string().contains("tokenizer.json"), "{err}");
    // A static spec with no directory anywhere is refused at load.
    let spec: EmbedderSpec = serde_norway::from_str("kind: static").unwrap();
    let err = build(&spec, None, &HttpClient::new()).unwrap_err();
    assert!(matches!(err, EmbedError::Config(_)), "{err}");
    assert!(serde_norway::from_str::<EmbedderSpec>("kind: static\nmodeldir: x").is_err());
}

#[test]
fn static_model_matches_the_reference_encoder() {
    let Some(e) = load() else { return };
    assert_eq!(e.model_dims(), 64);
    assert!(e.id().starts_with("static:64:"), "{}", e.id());
    // Vectors computed by the PyPI package's own encoder (static_model.get_embeddings).
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/semantic/static_reference.json");
    let rows: Vec<serde_json::Value> =
        serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    assert!(rows.len() >= 5);
    for row in rows {
        let text = row["text"].as_str().unwrap();
        let want: Vec<f32> = row["embedding"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect();
        let want = Embedding::normalized(want).unwrap();
        let got = e.embed_sync(text).unwrap();
        let cos = got.cosine(&want);
        assert!(cos > 0.9999, "{text:?}: cosine {cos} with the reference");
    }
}

#[tokio::test]
async fn static_embedder_inputs() {
    let Some(dir) = model_dir() else { return };
    let e = StaticEmbedder::load_with_limit(&dir, 32 * 1024).unwrap();
    assert!(matches!(e.embed("").await, Err(EmbedError::Empty)));
    assert!(matches!(e.embed(" \n\t ").await, Err(EmbedError::Empty)));
    let long = "word ".repeat(7000);
    assert!(matches!(
        e.embed(&long).await,
        Err(EmbedError::TooLong { max: 32768, .. })
    ));
    // Long texts go through the blocking pool and give the same vector.
    let mid = "How do I rotate an API key without downtime? ".repeat(400);
    assert!(mid.len() > 8 * 1024);
    let a = e.embed(&mid).await.unwrap();
    let b = e.embed_sync(&mid).unwrap();
    assert_eq!(a, b);
    // Odd input never panics: control characters, emoji, lone combining marks, NULs.
    for t in [
        "\u{0}\u{1}",
        "🙂🙂",
        "\u{301}",
        "a\u{200b}b",
        "ﷺ",
        "𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
        "ÿ",
    ] {
        match e.embed(t).await {
            Ok(v) => assert!((v.cosine(&v) - 1.0).abs() < 1e-4),
            Err(EmbedError::Empty) => {}
            Err(other) => panic!("{t:?}: {other}"),
        }
    }
    // Paraphrases are closer than unrelated questions.
    let p1 = e.embed("How do I reset my password?").await.unwrap();
    let p2 = e.embed("How can I reset my password?").await.unwrap();
    let other = e
        .embed("What is the weather in Paris tomorrow?")
        .await
        .unwrap();
    assert!(p1.cosine(&p2) > p1.cosine(&other));
}

// ---- the OpenAI-compatible embedder, against a local server speaking its shape ----

#[derive(Clone, Copy)]
enum Mode {
    Ok,
    Slow,
    Status500,
    NotJson,
    EmptyData,
    Strings,
    Zero,
}

/// Each request the server saw: its `authorization` header and JSON body.
type Seen = Arc<parking_lot::Mutex<Vec<(Option<String>, serde_json::Value)>>>;

struct Server {
    base: String,
    seen: Seen,
}

async fn server(mode: Mode) -> Server {
    use axum::{http::HeaderMap, routing::post, Json, Router};
    let seen: Seen = Default::default();
    let log = seen.clone();
    let app = Router::new().route(
        "/v1/embeddings",
        post(
            move |headers: HeaderMap, Json(body): Json<serde_json::Value>| {
                let log = log.clone();
                async move {
                    let auth = headers
                        .get("authorization")
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_string);
                    // A deterministic vector from the input's bytes (the test checks it arrives
                    // normalised).
                    let input = body["input"].as_str().unwrap_or_default().to_string();
                    log.lock().push((auth, body));
                    let v: Vec<f32> = (0..8)
                        .map(|i| input.as_bytes().get(i).map_or(1.0, |&b| b as f32))
                        .collect();
                    use axum::response::IntoResponse;
                    match mode {
                        Mode::Ok => Json(serde_json::json!({
                            "object": "list",
                            "data": [{"object": "embedding", "index": 0, "embedding": v}],
                            "model": "test-embed",
                            "usage": {"prompt_tokens": 3, "total_tokens": 3}
                        }))
                        .into_response(),
                        Mode::Slow => {
                            tokio::time::sleep(Duration::from_secs(30)).await;
                            Json(serde_json::json!({})).into_response()
                        }
                        Mode::Status500 => (
                            axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                            "{\"error\":{\"message\":\"overloaded\"}}",
                        )
                            .into_response(),
                        Mode::NotJson => "<html>gateway</html>".into_response(),
                        Mode::EmptyData => Json(serde_json::json!({"data": []})).into_response(),
                        Mode::Strings => {
                            Json(serde_json::json!({"data": [{"embedding": ["a", "b"]}]}))
                                .into_response()
                        }
                        Mode::Zero => {
                            Json(serde_json::json!({"data": [{"embedding": [0.0, 0.0]}]}))
                                .into_response()
                        }
                    }
                }
            },
        ),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Server {
        base: format!("http://{addr}"),
        seen,
    }
}

fn spec(base: &str) -> OpenAiSpec {
    OpenAiSpec {
        base_url: base.to_string(),
        model: "test-embed".into(),
        api_key_env: None,
        api_key_file: None,
        timeout_ms: Some(2000),
        max_input_bytes: None,
    }
}

#[tokio::test]
async fn openai_embedder_sends_the_documented_request() {
    let s = server(Mode::Ok).await;
    let key = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(key.path(), "sk-test-123\n").unwrap();
    let mut sp = spec(&format!("{}/", s.base));
    sp.api_key_file = Some(key.path().to_path_buf());
    let e = OpenAiEmbedder::new(sp, HttpClient::new()).unwrap();
    assert!(
        !format!("{e:?}").contains("sk-test"),
        "the key stays out of Debug"
    );
    let v = e.embed("hello").await.unwrap();
    assert_eq!(v.dims(), 8);
    assert!((v.cosine(&v) - 1.0).abs() < 1e-6);
    let raw: Vec<f32> = b"hello".iter().map(|&b| b as f32).chain([1.0; 3]).collect();
    assert!((v.cosine(&Embedding::normalized(raw).unwrap()) - 1.0).abs() < 1e-6);
    let seen = s.seen.lock().clone();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].0.as_deref(), Some("Bearer sk-test-123"));
    assert_eq!(
        seen[0].1,
        serde_json::json!({"model": "test-embed", "input": "hello"})
    );
    // Nothing is sent for input the embedder refuses.
    assert!(matches!(e.embed("  ").await, Err(EmbedError::Empty)));
    assert_eq!(s.seen.lock().len(), 1);
    // Through the configuration document, without a key.
    let spec: EmbedderSpec = serde_norway::from_str(&format!(
        "kind: openai\nbaseUrl: {}\nmodel: m2\ntimeoutMs: 1000",
        s.base
    ))
    .unwrap();
    let e = build(&spec, None, &HttpClient::new()).unwrap();
    assert!(e.id().contains("m2"));
    e.embed("x").await.unwrap();
    assert_eq!(s.seen.lock()[1].0, None);
}

#[tokio::test]
async fn openai_embedder_failures_are_typed_for_fail_open() {
    // Timeout: the server holds the answer.
    let s = server(Mode::Slow).await;
    let mut sp = spec(&s.base);
    sp.timeout_ms = Some(200);
    let e = OpenAiEmbedder::new(sp, HttpClient::new()).unwrap();
    let err = e.embed("hello").await.unwrap_err();
    assert!(
        matches!(err, EmbedError::Unavailable(ref m) if m.contains("timed out")),
        "{err}"
    );
    assert!(err.is_unavailable());

    for (mode, want) in [
        (Mode::Status500, "status 500"),
        (Mode::NotJson, "not an embeddings answer"),
        (Mode::EmptyData, "data is empty"),
        (Mode::Strings, "not an embeddings answer"),
        (Mode::Zero, "zero or empty"),
    ] {
        let s = server(mode).await;
        let e = OpenAiEmbedder::new(spec(&s.base), HttpClient::new()).unwrap();
        let err = e.embed("hello").await.unwrap_err();
        assert!(matches!(err, EmbedError::BadResponse(_)), "{want}: {err}");
        assert!(err.to_string().contains(want), "{want}: {err}");
        assert!(
            !err.to_string().contains("hello"),
            "no prompt in errors: {err}"
        );
        assert!(err.is_unavailable());
    }

    // Nothing listening.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let e =
        OpenAiEmbedder::new(spec(&format!("http://127.0.0.1:{port}")), HttpClient::new()).unwrap();
    let err = e.embed("hello").await.unwrap_err();
    assert!(matches!(err, EmbedError::Unavailable(_)), "{err}");

    // Input over the limit: refused before any call, not a remote failure.
    let mut sp = spec(&format!("http://127.0.0.1:{port}"));
    sp.max_input_bytes = Some(4);
    let e = OpenAiEmbedder::new(sp, HttpClient::new()).unwrap();
    let err = e.embed("hello").await.unwrap_err();
    assert!(matches!(err, EmbedError::TooLong { len: 5, max: 4 }));
    assert!(!err.is_unavailable());
}

#[test]
fn openai_embedder_configuration_errors() {
    let http = HttpClient::new();
    for (mutate, want) in [
        (
            Box::new(|s: &mut OpenAiSpec| s.base_url = "ftp://x".into())
                as Box<dyn Fn(&mut OpenAiSpec)>,
            "http",
        ),
        (Box::new(|s: &mut OpenAiSpec| s.model.clear()), "model"),
        (
            Box::new(|s: &mut OpenAiSpec| s.timeout_ms = Some(0)),
            "timeoutMs",
        ),
        (
            Box::new(|s: &mut OpenAiSpec| {
                s.api_key_env = Some("TOLLGATE_TEST_SURELY_UNSET_VAR".into())
            }),
            "not set",
        ),
        (
            Box::new(|s: &mut OpenAiSpec| {
                s.api_key_env = Some("A".into());
                s.api_key_file = Some("/x".into());
            }),
            "exclusive",
        ),
        (
            Box::new(|s: &mut OpenAiSpec| s.api_key_file = Some("/nonexistent/key".into())),
            "apiKeyFile",
        ),
    ] {
        let mut s = spec("http://127.0.0.1:1");
        mutate(&mut s);
        let err = OpenAiEmbedder::new(s, http.clone()).unwrap_err();
        assert!(matches!(err, EmbedError::Config(_)), "{err}");
        assert!(err.to_string().contains(want), "{want}: {err}");
    }
    assert!(serde_norway::from_str::<EmbedderSpec>(
        "kind: openai\nbaseUrl: http://x\nmodel: m\nbogus: 1"
    )
    .is_err());
}

/// Random text (bytes from a small alphabet of ASCII, punctuation, multi-byte letters and
/// digits) never panics the embedder or the specifics check.
#[test]
fn random_text_never_panics() {
    use rand::{Rng, SeedableRng};
    const PIECES: &[&str] = &[
        "a", "E", "ing", "ed", "s", "'", "’", ",", ".", "-", "_", "?", "!", ":", " ", "\n", "0",
        "7", "1,000", "n't", "é", "࿿", "ʼ", "🙂", "\u{301}", "to", "from", "not", "Gpt-4o",
        "ééing", "࿿࿿ed", "ß", "İ", "\u{0}", "ﬁ",
    ];
    let model = load();
    let mut rng = rand::rngs::StdRng::seed_from_u64(16);
    for _ in 0..2000 {
        let n = rng.gen_range(0..24);
        let text: String = (0..n)
            .map(|_| PIECES[rng.gen_range(0..PIECES.len())])
            .collect();
        let other: String = text.chars().rev().collect();
        let _ = specifics::compatible(&text, &other);
        if let Some(m) = &model {
            match m.embed_sync(&text) {
                Ok(v) => assert!((v.cosine(&v) - 1.0).abs() < 1e-3, "{text:?}"),
                Err(EmbedError::Empty) => {}
                Err(e) => panic!("{text:?}: {e}"),
            }
        }
    }
}

#[test]
fn specifics_catch_what_averages_blur() {
    use specifics::{compatible, Mismatch, Specifics};
    let m = |a: &str, b: &str| Specifics::of(a).mismatch(&Specifics::of(b));
    assert!(compatible(
        "How do I reset my password?",
        "how can i reset my password"
    ));
    assert_eq!(
        m("Refund order 4512", "Refund order 4513"),
        Some(Mismatch::Numbers)
    );
    assert!(compatible(
        "Is 1,000 requests a day enough?",
        "is 1000 requests per day enough"
    ));
    assert_eq!(
        m("give me five ideas", "give me 6 ideas"),
        Some(Mismatch::Numbers)
    );
    assert!(compatible("give me five ideas", "list 5 ideas"));
    assert_eq!(
        m("Can I cancel my plan?", "Can't I cancel my plan?"),
        Some(Mismatch::Negation)
    );
    assert!(compatible("I can't log in", "I cannot sign in"));
    assert_eq!(
        m(
            "How do I create a bucket in S3?",
            "How do I create a bucket in GCS?"
        ),
        Some(Mismatch::Anchor)
    );
    assert!(compatible(
        "Does gpt-4o support images?",
        "does GPT-4o support image input"
    ));
    assert_eq!(
        m("Convert 10 USD to EUR", "Convert 10 EUR to USD"),
        Some(Mismatch::Direction)
    );
    assert_eq!(
        m(
            "translate this from english to french",
            "translate this from french to english"
        ),
        Some(Mismatch::Direction)
    );
    assert!(compatible(
        "how to convert a string to an integer in Python",
        "In Python, how do I convert a string to an integer?"
    ));
    assert_eq!(
        m(
            "What is the context window of GPT-4o?",
            "What is the context window of GPT-4o mini?"
        ),
        Some(Mismatch::Anchor)
    );
    assert_eq!(
        m(
            "How do I create a user in Keycloak?",
            "How do I delete a user in Keycloak?"
        ),
        Some(Mismatch::Swapped)
    );
    assert!(compatible(
        "How do I create a virtual environment in Python?",
        "How can I make a Python virtual environment?"
    ));
    // Sentence-initial capitals are not names.
    assert!(compatible("Please summarise this", "summarise this please"));
}
