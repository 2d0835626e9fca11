//! Token counting.
//!
//! OpenAI models are counted exactly with encodings bundled in the binary (nothing is
//! fetched at build or run time): `o200k_base` for gpt-4o, gpt-4.1, gpt-4.5, gpt-5, the
//! o-series and gpt-oss; `cl100k_base` for gpt-4, gpt-3.5 and the OpenAI embeddings, both
//! with `bpe-openai` (the same tokens as tiktoken, about twice as fast; a test compares
//! them); the older `p50k`/`r50k` for legacy models with `tiktoken-rs`, whose model table
//! also picks the encoding. Each encoder is built once per process, on first use (or by
//! [`TokenCounter::warm_up`]), and shared.
//!
//! Counts of segments (below) are cached per process, keyed by encoding, length and a
//! seeded hash of the text ([`SEGMENT_CACHE_ENTRIES`] entries, about 2 MB): chat clients
//! resend the system prompt and the whole conversation on every turn, so all but the newest
//! message is counted once. A cache hit costs a hash of the segment instead of its encoding.
//!
//! No other family's tokenizer ships offline, so Claude, Gemini, Llama, Mistral... are
//! approximated: `ceil(chars / chars_per_token)` over Latin-script characters, plus one token
//! per CJK ideograph, kana or hangul syllable (those run close to one token each, where
//! chars/4 would undercount four-fold). `chars_per_token` is 4.0 by default and configurable,
//! globally and per model-name prefix. Estimates are reconciled with the upstream's usage
//! when it reports one.
//!
//! Text is cut into segments before encoding, at spaces between two non-space characters
//! (where no tiktoken piece can span, so the count is unchanged), and, where no such space
//! exists for [`HARD_SEGMENT_BYTES`], at a character boundary (at most about one token extra
//! per cut). This bounds the work on pathological input: tiktoken's regex and BPE are
//! superlinear in the length of one piece, and its regex engine panics on very long runs of a
//! single character.

use std::hash::BuildHasher;
use std::sync::OnceLock;

use tiktoken_rs::tokenizer::{get_tokenizer, Tokenizer};
use tiktoken_rs::CoreBPE;

use super::{Api, LlmRequest};

/// Segments shorter than this are encoded, not cached (a lookup would cost about as much).
const SEGMENT_CACHE_MIN_BYTES: usize = 96;
/// Cached segment counts (each entry about 100 bytes with the cache's own bookkeeping).
pub const SEGMENT_CACHE_ENTRIES: u64 = 16_384;

/// A run without a safe cut point longer than this is cut anyway.
pub const HARD_SEGMENT_BYTES: usize = 256;
/// Segments are cut at the first safe point after this many bytes.
const SOFT_SEGMENT_BYTES: usize = 2048;

/// Per-message framing OpenAI adds in chat formats (role and separators), and the tokens
/// priming the reply: the estimate adds them as the cookbook does.
const TOKENS_PER_MESSAGE: u64 = 3;
const TOKENS_REPLY_PRIMING: u64 = 3;

/// An exact encoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Encoding {
    O200kBase,
    Cl100kBase,
    P50kBase,
    R50kBase,
}

impl Encoding {
    pub fn name(self) -> &'static str {
        match self {
            Encoding::O200kBase => "o200k_base",
            Encoding::Cl100kBase => "cl100k_base",
            Encoding::P50kBase => "p50k_base",
            Encoding::R50kBase => "r50k_base",
        }
    }

    /// Tokens in `text`, exactly (`None` only if a bundled tiktoken file failed to load,
    /// which a test rules out; callers then approximate).
    fn count(self, text: &str) -> Option<u64> {
        match self {
            Encoding::O200kBase => Some(bpe_openai::o200k_base().count(text) as u64),
            Encoding::Cl100kBase => Some(bpe_openai::cl100k_base().count(text) as u64),
            Encoding::P50kBase | Encoding::R50kBase => self
                .tiktoken()
                .map(|bpe| bpe.encode_ordinary(text).len() as u64),
        }
    }

    /// The shared tiktoken encoder, built on first use. `None` only if the bundled file
    /// failed to load.
    fn tiktoken(self) -> Option<&'static CoreBPE> {
        static O200K: OnceLock<Option<CoreBPE>> = OnceLock::new();
        static CL100K: OnceLock<Option<CoreBPE>> = OnceLock::new();
        static P50K: OnceLock<Option<CoreBPE>> = OnceLock::new();
        static R50K: OnceLock<Option<CoreBPE>> = OnceLock::new();
        let (cell, build): (_, fn() -> anyhow::Result<CoreBPE>) = match self {
            Encoding::O200kBase => (&O200K, tiktoken_rs::o200k_base),
            Encoding::Cl100kBase => (&CL100K, tiktoken_rs::cl100k_base),
            Encoding::P50kBase => (&P50K, tiktoken_rs::p50k_base),
            Encoding::R50kBase => (&R50K, tiktoken_rs::r50k_base),
        };
        cell.get_or_init(|| match build() {
            Ok(bpe) => Some(bpe),
            Err(e) => {
                tracing::error!(encoding = self.name(), error = %e, "tokenizer failed to load; approximating");
                None
            }
        })
        .as_ref()
    }
}

/// How a model's text is counted.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum CountMethod {
    Exact(Encoding),
    /// Characters per token for Latin-script text (see the module documentation).
    Approx {
        chars_per_token: f64,
    },
}

/// Counting settings (from configuration).
#[derive(Debug, Clone, PartialEq)]
pub struct CountingConfig {
    /// Characters per token for models without an exact tokenizer. Default 4.0.
    pub chars_per_token: f64,
    /// Per model-name prefix overrides of `chars_per_token` (first match wins), e.g.
    /// `("claude", 3.5)`.
    pub prefix_ratios: Vec<(String, f64)>,
}

impl Default for CountingConfig {
    fn default() -> Self {
        CountingConfig {
            chars_per_token: 4.0,
            prefix_ratios: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CountingConfigError {
    #[error("chars per token must be a number between 0.5 and 20 (got {0})")]
    Ratio(f64),
}

fn check_ratio(r: f64) -> Result<f64, CountingConfigError> {
    if r.is_finite() && (0.5..=20.0).contains(&r) {
        Ok(r)
    } else {
        Err(CountingConfigError::Ratio(r))
    }
}

/// Counts tokens; cheap to clone and share.
#[derive(Debug, Clone, Default)]
pub struct TokenCounter {
    config: CountingConfig,
}

impl TokenCounter {
    pub fn new(config: CountingConfig) -> Result<Self, CountingConfigError> {
        check_ratio(config.chars_per_token)?;
        for (_, r) in &config.prefix_ratios {
            check_ratio(*r)?;
        }
        Ok(TokenCounter { config })
    }

    /// Build the exact encoders now (at startup), not on the first request that needs them.
    pub fn warm_up() {
        for e in [Encoding::O200kBase, Encoding::Cl100kBase] {
            let _ = e.count("warm up");
        }
    }

    /// How `model` (as the request or path names it) is counted for `api`.
    pub fn method_for(&self, api: Api, model: &str) -> CountMethod {
        // `openai/gpt-4o` (routers' provider prefixes) and `ft:gpt-4o:org::id`.
        let bare = model.rsplit_once('/').map_or(model, |(_, m)| m);
        let bare = bare.trim();
        if let Some(t) = get_tokenizer(bare) {
            return CountMethod::Exact(match t {
                Tokenizer::O200kBase | Tokenizer::O200kHarmony => Encoding::O200kBase,
                Tokenizer::Cl100kBase => Encoding::Cl100kBase,
                Tokenizer::P50kBase | Tokenizer::P50kEdit => Encoding::P50kBase,
                Tokenizer::R50kBase | Tokenizer::Gpt2 => Encoding::R50kBase,
            });
        }
        // Newer OpenAI names than the table knows (gpt-6, o5...) use the newest encoding.
        if api.is_openai() && is_openai_like(bare) {
            return CountMethod::Exact(Encoding::O200kBase);
        }
        let lower = bare.to_ascii_lowercase();
        let chars_per_token = self
            .config
            .prefix_ratios
            .iter()
            .find(|(p, _)| lower.starts_with(&p.to_ascii_lowercase()))
            .map_or(self.config.chars_per_token, |(_, r)| *r);
        CountMethod::Approx { chars_per_token }
    }

    /// Tokens in `text` for `model`.
    pub fn count(&self, api: Api, model: &str, text: &str) -> u64 {
        self.count_with(self.method_for(api, model), text)
    }

    /// Tokens in `text` counted with `method`.
    pub fn count_with(&self, method: CountMethod, text: &str) -> u64 {
        match method {
            CountMethod::Exact(e) => count_exact(e, text)
                .unwrap_or_else(|| approximate(text, self.config.chars_per_token)),
            CountMethod::Approx { chars_per_token } => approximate(text, chars_per_token),
        }
    }

    /// The prompt tokens a request will be billed, estimated before the call: its prompt
    /// text, tool definitions, pre-tokenized input, and (chat formats) per-message framing.
    /// Images and other media are not estimated (`media_parts` says how many there were).
    pub fn count_request(&self, req: &LlmRequest, model: Option<&str>) -> u64 {
        let model = model.or(req.model.as_deref()).unwrap_or("");
        let method = self.method_for(req.api, model);
        let mut n = self
            .count_with(method, &req.prompt)
            .saturating_add(self.count_with(method, &req.tools))
            .saturating_add(req.prompt_token_ids);
        if req.messages > 0 {
            n = n
                .saturating_add(TOKENS_PER_MESSAGE.saturating_mul(req.messages))
                .saturating_add(TOKENS_REPLY_PRIMING);
        }
        n
    }
}

fn is_openai_like(m: &str) -> bool {
    let b = m.as_bytes();
    m.starts_with("gpt-")
        || m.starts_with("chatgpt-")
        || (b.len() >= 2 && b[0] == b'o' && b[1].is_ascii_digit())
}

fn count_exact(e: Encoding, text: &str) -> Option<u64> {
    let mut n: u64 = 0;
    for seg in segments(text) {
        n = n.saturating_add(count_segment(e, seg)?);
    }
    Some(n)
}

/// Seeded per process, so nobody can craft two segments that share a key.
type SegmentKey = (Encoding, usize, u64);

fn segment_cache() -> &'static moka::sync::Cache<SegmentKey, u64> {
    static CACHE: OnceLock<moka::sync::Cache<SegmentKey, u64>> = OnceLock::new();
    CACHE.get_or_init(|| moka::sync::Cache::new(SEGMENT_CACHE_ENTRIES))
}

fn count_segment(e: Encoding, seg: &str) -> Option<u64> {
    if seg.len() < SEGMENT_CACHE_MIN_BYTES {
        return e.count(seg);
    }
    static SEED: OnceLock<foldhash::quality::RandomState> = OnceLock::new();
    let key = (
        e,
        seg.len(),
        SEED.get_or_init(foldhash::quality::RandomState::default)
            .hash_one(seg),
    );
    let cache = segment_cache();
    if let Some(n) = cache.get(&key) {
        return Some(n);
    }
    let n = e.count(seg)?;
    cache.insert(key, n);
    Some(n)
}

/// Cuts `text` into segments that tiktoken encodes to the same tokens as the whole (see the
/// module documentation): at the first safe space (a space between two non-spaces) after
/// [`SOFT_SEGMENT_BYTES`], and at a character boundary after [`HARD_SEGMENT_BYTES`] without
/// a safe space. Jumps from space to space (`memchr`) rather than testing every byte.
/// Must cut exactly where it always did: the segment cache's keys depend on it.
fn segments(text: &str) -> impl Iterator<Item = &str> {
    let mut rest = text;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let b = rest.as_bytes();
        let mut last_safe = 0;
        // One pass over the spaces (the iterator keeps its state: a fresh search per word
        // cost more than the cutting saved). The hard cut's character boundary is looked
        // up only once a space reaches it.
        let mut cut = None;
        for i in memchr::memchr_iter(b' ', b.get(1..).unwrap_or_default()).map(|k| k + 1) {
            let hard = (i >= last_safe + HARD_SEGMENT_BYTES)
                .then(|| boundary_from(rest, last_safe + HARD_SEGMENT_BYTES));
            if let Some(h) = hard.filter(|&h| h < i) {
                cut = Some(h);
                break;
            }
            if i + 1 < b.len() && !is_space(b[i - 1]) && !is_space(b[i + 1]) {
                if i >= SOFT_SEGMENT_BYTES {
                    cut = Some(i);
                    break;
                }
                last_safe = i;
            } else if hard == Some(i) {
                cut = Some(i);
                break;
            }
        }
        let cut =
            cut.unwrap_or_else(|| boundary_from(rest, last_safe + HARD_SEGMENT_BYTES).min(b.len()));
        let (seg, tail) = rest.split_at(cut);
        rest = tail;
        Some(seg)
    })
}

/// The first character boundary at or after `p`, at most `s.len()`.
fn boundary_from(s: &str, mut p: usize) -> usize {
    while p < s.len() && !s.is_char_boundary(p) {
        p += 1;
    }
    p.min(s.len())
}

fn is_space(b: u8) -> bool {
    // Bytes of multi-byte characters (>= 0x80) are never ASCII spaces; Unicode spaces there
    // only make the cut rule more conservative, never wrong, as cuts need ASCII ' '.
    b.is_ascii_whitespace() || b == 0x0b
}

/// `ceil(latin chars / ratio) + CJK chars`.
fn approximate(text: &str, chars_per_token: f64) -> u64 {
    let mut latin: u64 = 0;
    let mut wide: u64 = 0;
    for c in text.chars() {
        if is_wide(c) {
            wide += 1;
        } else {
            latin += 1;
        }
    }
    let ratio = if chars_per_token.is_finite() && chars_per_token > 0.0 {
        chars_per_token
    } else {
        4.0
    };
    ((latin as f64 / ratio).ceil() as u64).saturating_add(wide)
}

fn is_wide(c: char) -> bool {
    matches!(c as u32,
        0x2E80..=0x9FFF      // CJK radicals, kana, CJK unified ideographs
        | 0xAC00..=0xD7AF    // hangul syllables
        | 0xF900..=0xFAFF    // CJK compatibility ideographs
        | 0x20000..=0x3FFFF) // CJK extensions
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The one-pass cutter cuts exactly where the space-by-space one did (the segment
    /// cache's keys depend on it), on prose, long words, runs of spaces and multi-byte text.
    #[test]
    fn segments_cut_where_the_per_word_search_did() {
        #[rustfmt::skip]
        fn segments_per_word(text: &str) -> impl Iterator<Item = &str> {
            let mut rest = text;
            std::iter::from_fn(move || {
                if rest.is_empty() {
                    return None;
                }
                let b = rest.as_bytes();
                let mut last_safe = 0;
                let mut from = 1;
                let cut = loop {
                    // Where the hard cut falls unless a safe space comes first.
                    let hard = boundary_from(rest, last_safe + HARD_SEGMENT_BYTES);
                    let next = b
                        .get(from..)
                        .and_then(|tail| memchr::memchr(b' ', tail))
                        .map(|k| from + k);
                    let Some(i) = next else {
                        break hard.min(b.len());
                    };
                    if hard < i {
                        break hard;
                    }
                    if i + 1 < b.len() && !is_space(b[i - 1]) && !is_space(b[i + 1]) {
                        if i >= SOFT_SEGMENT_BYTES {
                            break i;
                        }
                        last_safe = i;
                    } else if hard == i {
                        break i;
                    }
                    from = i + 1;
                };
                let (seg, tail) = rest.split_at(cut);
                rest = tail;
                Some(seg)
            })
        }
        let mut seed = 0x2545_f491_4f6c_dd1d_u64;
        let pieces = [
            "word",
            " ",
            "  ",
            "é",
            "🦀",
            "\n",
            "x".repeat(300).leak(),
            "ab cd",
            "\t ",
        ];
        for _ in 0..300 {
            let mut text = String::new();
            let len = (seed % 9000) as usize;
            while text.len() < len {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                text.push_str(pieces[(seed % pieces.len() as u64) as usize]);
            }
            let new: Vec<&str> = segments(&text).collect();
            let old: Vec<&str> = segments_per_word(&text).collect();
            assert_eq!(new, old);
            assert_eq!(new.concat(), text);
        }
    }

    fn exact(model: &str) -> Option<Encoding> {
        match TokenCounter::default().method_for(Api::OpenAiChat, model) {
            CountMethod::Exact(e) => Some(e),
            CountMethod::Approx { .. } => None,
        }
    }

    #[test]
    fn encoding_matches_the_model_family() {
        assert_eq!(exact("gpt-4o"), Some(Encoding::O200kBase));
        assert_eq!(exact("gpt-4o-mini-2024-07-18"), Some(Encoding::O200kBase));
        assert_eq!(exact("gpt-4.1-nano"), Some(Encoding::O200kBase));
        assert_eq!(exact("gpt-5-mini"), Some(Encoding::O200kBase));
        assert_eq!(exact("o3-mini"), Some(Encoding::O200kBase));
        assert_eq!(exact("o1"), Some(Encoding::O200kBase));
        assert_eq!(exact("gpt-oss-20b"), Some(Encoding::O200kBase));
        assert_eq!(exact("openai/gpt-4o"), Some(Encoding::O200kBase));
        assert_eq!(exact("ft:gpt-4o-mini:acme::abc"), Some(Encoding::O200kBase));
        assert_eq!(exact("gpt-4"), Some(Encoding::Cl100kBase));
        assert_eq!(exact("gpt-4-turbo"), Some(Encoding::Cl100kBase));
        assert_eq!(exact("gpt-3.5-turbo"), Some(Encoding::Cl100kBase));
        assert_eq!(exact("text-embedding-3-small"), Some(Encoding::Cl100kBase));
        assert_eq!(exact("gpt-7-preview"), Some(Encoding::O200kBase));
        assert_eq!(exact("meta-llama/Llama-3.1-8B-Instruct"), None);
        let c = TokenCounter::default();
        assert!(matches!(
            c.method_for(Api::AnthropicMessages, "claude-sonnet-4-5"),
            CountMethod::Approx { .. }
        ));
        assert!(matches!(
            c.method_for(Api::Gemini, "gemini-2.5-flash"),
            CountMethod::Approx { .. }
        ));
        // A non-OpenAI API naming an unknown `o…` model is not forced onto o200k.
        assert!(matches!(
            c.method_for(Api::AnthropicMessages, "o9-thing"),
            CountMethod::Approx { .. }
        ));
    }

    #[test]
    fn exact_counts_known_strings() {
        let c = TokenCounter::default();
        // "hello world" is two tokens in both encodings; the empty string none.
        assert_eq!(c.count(Api::OpenAiChat, "gpt-4o", "hello world"), 2);
        assert_eq!(c.count(Api::OpenAiChat, "gpt-4", "hello world"), 2);
        assert_eq!(c.count(Api::OpenAiChat, "gpt-4o", ""), 0);
    }

    fn varied_text() -> String {
        let mut text = String::new();
        for i in 0..400 {
            text.push_str(&format!(
                "Sentence {i}: the quick brown fox (\"jumps\") over 1234567 lazy dogs' tails;  \n\t"
            ));
            if i % 7 == 0 {
                text.push_str("{\"json\":[1,2,3],\"k\":\"v\"} x == y && z != w ");
            }
            if i % 11 == 0 {
                text.push_str("日本語のテキスト、한국어 텍스트 🎉🎉 naïve café ÅNGSTRÖM I'LL we've   \r\n\r\n");
            }
            if i % 13 == 0 {
                text.push_str("    def f(x):\n\t\treturn x**2  # 3.14159e-10 0xFF_FF\n\n\n   ");
            }
        }
        text
    }

    /// The byte-by-byte cutter `segments` replaced: both must cut every text alike.
    fn reference_segments(text: &str) -> Vec<&str> {
        let mut out = Vec::new();
        let mut rest = text;
        while !rest.is_empty() {
            let b = rest.as_bytes();
            let mut last_safe = 0;
            let mut i = 1;
            let cut = loop {
                if i >= b.len() {
                    break b.len();
                }
                if b[i] == b' ' && i + 1 < b.len() && !is_space(b[i - 1]) && !is_space(b[i + 1]) {
                    if i >= SOFT_SEGMENT_BYTES {
                        break i;
                    }
                    last_safe = i;
                }
                if i - last_safe >= HARD_SEGMENT_BYTES && rest.is_char_boundary(i) {
                    break i;
                }
                i += 1;
            };
            let (seg, tail) = rest.split_at(cut);
            out.push(seg);
            rest = tail;
        }
        out
    }

    #[test]
    fn segments_cut_as_the_reference_does() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let alphabet = [
            "a", "b", " ", " ", "  ", "\n", "\t", "é", "字", "🎉", "x", "0", "'", "\u{0b}",
        ];
        for round in 0..3000 {
            let len = rng.gen_range(0..6000);
            let space_rate = [0.0, 0.01, 0.2, 0.5][round % 4];
            let mut s = String::new();
            while s.len() < len {
                if rng.gen_bool(space_rate) {
                    s.push(' ');
                } else {
                    s.push_str(alphabet[rng.gen_range(0..alphabet.len())]);
                }
                if round % 3 == 0 {
                    s.push_str(&"z".repeat(rng.gen_range(0..400)));
                }
            }
            assert_eq!(
                segments(&s).collect::<Vec<_>>(),
                reference_segments(&s),
                "round {round}"
            );
        }
        let text = varied_text();
        assert_eq!(
            segments(&text).collect::<Vec<_>>(),
            reference_segments(&text)
        );
    }

    /// The bundled bpe-openai encoders, segmenting and the count cache together give exactly
    /// tiktoken's count of the whole text, cached or not.
    #[test]
    fn counts_equal_tiktoken_on_the_whole_text() {
        let text = varied_text();
        assert!(segments(&text).count() > 10);
        assert_eq!(segments(&text).collect::<String>(), text);
        let o200k = tiktoken_rs::o200k_base().expect("bundled o200k");
        let cl100k = tiktoken_rs::cl100k_base().expect("bundled cl100k");
        for _ in 0..2 {
            assert_eq!(
                count_exact(Encoding::O200kBase, &text),
                Some(o200k.encode_ordinary(&text).len() as u64)
            );
            assert_eq!(
                count_exact(Encoding::Cl100kBase, &text),
                Some(cl100k.encode_ordinary(&text).len() as u64)
            );
        }
        // The second round was answered from the cache.
        let cache = segment_cache();
        cache.run_pending_tasks();
        assert!(cache.entry_count() > 0);
        // Piece by piece, on inputs where pre-tokenizers differ most (whitespace runs,
        // contractions, digits, scripts, emoji): bpe-openai agrees with tiktoken.
        for piece in text.split_inclusive('\n').chain([
            "",
            " ",
            "  ",
            "\n\n\n",
            " \t \n x",
            "'s 'S 'Ll 've",
            "123456789012",
            "a  b   c    d",
            "…—–",
            "🎉",
            "x\u{0301}",
            "\u{feff}BOM",
            "A\u{00a0}B",
        ]) {
            assert_eq!(
                Encoding::O200kBase.count(piece),
                Some(o200k.encode_ordinary(piece).len() as u64),
                "o200k {piece:?}"
            );
            assert_eq!(
                Encoding::Cl100kBase.count(piece),
                Some(cl100k.encode_ordinary(piece).len() as u64),
                "cl100k {piece:?}"
            );
        }
    }

    #[test]
    fn legacy_encodings_still_count() {
        let c = TokenCounter::default();
        assert!(matches!(
            c.method_for(Api::OpenAiCompletions, "davinci-002"),
            CountMethod::Exact(Encoding::Cl100kBase)
                | CountMethod::Exact(Encoding::P50kBase)
                | CountMethod::Exact(Encoding::R50kBase)
        ));
        assert_eq!(
            c.count_with(CountMethod::Exact(Encoding::P50kBase), "hello world"),
            2
        );
        assert_eq!(
            c.count_with(CountMethod::Exact(Encoding::R50kBase), "hello world"),
            2
        );
    }

    #[test]
    fn pathological_input_is_bounded_and_does_not_panic() {
        let c = TokenCounter::default();
        for unit in ["a", "^", " ", "\n", "é", "字", "0"] {
            let text = unit.repeat(300_000);
            let start = std::time::Instant::now();
            let n = c.count(Api::OpenAiChat, "gpt-4o", &text);
            assert!(n > 0, "{unit:?}");
            assert!(
                start.elapsed() < std::time::Duration::from_secs(20),
                "{unit:?} took {:?}",
                start.elapsed()
            );
            // Every segment respects the hard bound (plus one character).
            assert!(segments(&text).all(|s| s.len() <= HARD_SEGMENT_BYTES + 4));
        }
    }

    #[test]
    fn approximation_is_documented_and_configurable() {
        let c = TokenCounter::default();
        assert_eq!(c.count(Api::AnthropicMessages, "claude-x", "abcdefgh"), 2);
        assert_eq!(c.count(Api::AnthropicMessages, "claude-x", "abcdefghi"), 3);
        assert_eq!(c.count(Api::Gemini, "gemini-2.5-pro", "日本語です"), 5);
        assert_eq!(c.count(Api::Gemini, "gemini-2.5-pro", ""), 0);
        let c = TokenCounter::new(CountingConfig {
            chars_per_token: 2.0,
            prefix_ratios: vec![("Claude".into(), 3.0)],
        })
        .unwrap();
        assert_eq!(c.count(Api::Gemini, "gemini", "abcdefgh"), 4);
        assert_eq!(
            c.count(Api::AnthropicMessages, "claude-opus-4", "abcdefghi"),
            3
        );
        assert!(TokenCounter::new(CountingConfig {
            chars_per_token: 0.0,
            prefix_ratios: vec![],
        })
        .is_err());
        assert!(TokenCounter::new(CountingConfig {
            chars_per_token: 4.0,
            prefix_ratios: vec![("x".into(), f64::NAN)],
        })
        .is_err());
    }
}
