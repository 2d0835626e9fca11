//! A compact Unigram tokenizer for the built-in model's `tokenizer.json`: the same tokens as
//! the `tokenizers` crate (the test below compares them), in a tenth of the memory.
//!
//! Why: `tokenizers` keeps its Unigram vocabulary in a byte trie with a hash map per node;
//! for the built-in model's 276k pieces that is about 320 MB of resident memory, for every
//! tollgate process with a semantic cache or a model router. Here the pieces live in a
//! character-wise double-array trie (`crawdad`) and the scores in one `Vec<f64>`: about
//! 10 MB.
//!
//! Supported shape (what `tokenlearn` / Model2Vec Unigram models ship): normalizer
//! `Precompiled` (SentencePiece's character map) or none; pre-tokenizer `WhitespaceSplit`
//! then `Metaspace` (prepend `always`, split), or `Metaspace` alone; model `Unigram` without
//! byte fallback. [`Unigram::from_json`] returns `Ok(None)` for any other shape, and the
//! caller uses `tokenizers` for it. Added tokens (`<pad>`, `<unk>`) are not split out of
//! the text: a literal `<pad>` in a prompt is tokenized as text. Nothing depends on that
//! (queries and stored entries go through the same tokenizer).
//!
//! Encoding is SentencePiece's Viterbi search: for each character position, every vocabulary
//! piece starting there (a common-prefix search) extends the best path ending at that
//! position; a character no piece covers is the unknown piece with the lowest score minus 10;
//! adjacent unknown pieces are fused into one.

use serde::Deserialize;
use serde_json::Value;

/// SentencePiece's penalty below the lowest piece score for an unknown character.
const UNK_PENALTY: f64 = 10.0;

/// Why a `tokenizer.json` of the supported shape could not be read.
#[derive(Debug, thiserror::Error)]
pub enum UnigramError {
    #[error("tokenizer.json: {0}")]
    Json(#[from] serde_json::Error),
    #[error("tokenizer.json: {0}")]
    Invalid(String),
}

#[derive(Deserialize)]
struct TokenizerJson {
    #[serde(default)]
    normalizer: Value,
    #[serde(default)]
    pre_tokenizer: Value,
    model: ModelJson,
}

/// The model's type alone (a WordPiece or BPE vocabulary has another layout).
#[derive(Deserialize)]
struct Peek {
    model: PeekModel,
}

#[derive(Deserialize)]
struct PeekModel {
    #[serde(rename = "type")]
    kind: String,
}

#[derive(Deserialize)]
struct ModelJson {
    #[serde(default)]
    unk_id: Option<usize>,
    #[serde(default)]
    vocab: Vec<(String, f64)>,
    #[serde(default)]
    byte_fallback: bool,
}

/// A Unigram tokenizer of the supported shape.
pub struct Unigram {
    precompiled: Option<spm_precompiled::Precompiled>,
    /// Split on whitespace before the Metaspace step (else whitespace becomes `▁`).
    whitespace_split: bool,
    replacement: char,
    /// Piece → id (for duplicate pieces, the last id, as `tokenizers` does).
    trie: crawdad::Trie,
    scores: Vec<f64>,
    unk_id: Option<u32>,
    unk_score: f64,
}

impl std::fmt::Debug for Unigram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Unigram({} pieces)", self.scores.len())
    }
}

impl Unigram {
    /// Reads `json` (a whole `tokenizer.json`): `Ok(None)` when its shape is not the
    /// supported one (the caller falls back to `tokenizers`).
    pub fn from_json(json: &[u8]) -> Result<Option<Self>, UnigramError> {
        let peek: Peek = serde_json::from_slice(json)?;
        if peek.model.kind != "Unigram" {
            return Ok(None);
        }
        let t: TokenizerJson = serde_json::from_slice(json)?;
        if t.model.byte_fallback {
            return Ok(None);
        }
        let precompiled =
            match &t.normalizer {
                Value::Null => None,
                n if n["type"] == "Precompiled" => {
                    let map = n["precompiled_charsmap"].as_str().ok_or_else(|| {
                        UnigramError::Invalid("Precompiled normalizer without a charsmap".into())
                    })?;
                    use base64::Engine;
                    let bytes = base64::engine::general_purpose::STANDARD
                        .decode(map)
                        .map_err(|e| UnigramError::Invalid(format!("precompiled_charsmap: {e}")))?;
                    Some(spm_precompiled::Precompiled::from(&bytes).map_err(|e| {
                        UnigramError::Invalid(format!("precompiled_charsmap: {e:?}"))
                    })?)
                }
                _ => return Ok(None),
            };
        let metaspace = |m: &Value| -> Option<char> {
            let ok = m["type"] == "Metaspace"
                && m["prepend_scheme"].as_str().unwrap_or("always") == "always"
                && m["split"].as_bool().unwrap_or(true);
            let mut r = m["replacement"].as_str()?.chars();
            match (ok, r.next(), r.next()) {
                (true, Some(c), None) => Some(c),
                _ => None,
            }
        };
        let (whitespace_split, replacement) = match &t.pre_tokenizer {
            p if p["type"] == "Metaspace" => match metaspace(p) {
                Some(c) => (false, c),
                None => return Ok(None),
            },
            p if p["type"] == "Sequence" => {
                match p["pretokenizers"].as_array().map(Vec::as_slice) {
                    Some([w, m]) if w["type"] == "WhitespaceSplit" => match metaspace(m) {
                        Some(c) => (true, c),
                        None => return Ok(None),
                    },
                    _ => return Ok(None),
                }
            }
            _ => return Ok(None),
        };
        let vocab = t.model.vocab;
        if vocab.is_empty() {
            return Err(UnigramError::Invalid("empty vocabulary".into()));
        }
        let unk_id = match t.model.unk_id {
            Some(u) if u >= vocab.len() => {
                return Err(UnigramError::Invalid(
                    "unk_id outside the vocabulary".into(),
                ))
            }
            Some(u) => Some(u32::try_from(u).map_err(|_| UnigramError::Invalid("unk_id".into()))?),
            None => None,
        };
        let min_score = vocab.iter().map(|(_, s)| *s).fold(f64::INFINITY, f64::min);
        let mut last: std::collections::HashMap<&str, u32> =
            std::collections::HashMap::with_capacity(vocab.len());
        for (id, (piece, _)) in vocab.iter().enumerate() {
            if !piece.is_empty() {
                let id = u32::try_from(id)
                    .map_err(|_| UnigramError::Invalid("vocabulary too large".into()))?;
                last.insert(piece.as_str(), id);
            }
        }
        let trie = crawdad::Trie::from_records(last.iter().map(|(k, v)| (*k, *v)))
            .map_err(|e| UnigramError::Invalid(format!("vocabulary: {e}")))?;
        drop(last);
        Ok(Some(Self {
            precompiled,
            whitespace_split,
            replacement,
            trie,
            scores: vocab.into_iter().map(|(_, s)| s).collect(),
            unk_id,
            unk_score: min_score - UNK_PENALTY,
        }))
    }

    /// Pieces in the vocabulary (ids are below it).
    pub fn vocab_size(&self) -> usize {
        self.scores.len()
    }

    /// The token ids of `text`, appended to `out`.
    pub fn encode(&self, text: &str, out: &mut Vec<u32>) {
        let normalized;
        let text = match &self.precompiled {
            Some(p) => {
                normalized = p.normalize_string(text);
                normalized.as_str()
            }
            None => text,
        };
        let mut word = String::new();
        let mut push_word = |w: &str, out: &mut Vec<u32>| {
            word.clear();
            for c in w.chars() {
                word.push(if c == ' ' { self.replacement } else { c });
            }
            if !word.starts_with(self.replacement) {
                word.insert(0, self.replacement);
            }
            // Metaspace's split: a piece starts at every replacement character.
            let mut start = 0;
            for (i, c) in word.char_indices().skip(1) {
                if c == self.replacement {
                    self.viterbi(&word[start..i], out);
                    start = i;
                }
            }
            self.viterbi(&word[start..], out);
        };
        if self.whitespace_split {
            for w in text.split(char::is_whitespace).filter(|w| !w.is_empty()) {
                push_word(w, out);
            }
        } else if !text.is_empty() {
            push_word(text, out);
        }
    }

    /// SentencePiece's best segmentation of one pre-token.
    fn viterbi(&self, s: &str, out: &mut Vec<u32>) {
        if s.is_empty() {
            return;
        }
        #[derive(Clone, Copy)]
        struct Best {
            score: f64,
            /// Character where the last piece of the best path to here starts.
            start: usize,
            id: Option<u32>,
            set: bool,
        }
        let chars: Vec<char> = s.chars().collect();
        let n = chars.len();
        let mut best = vec![
            Best {
                score: 0.0,
                start: 0,
                id: None,
                set: false,
            };
            n + 1
        ];
        for i in 0..n {
            let here = best[i].score;
            let mut single = false;
            for (id, len) in self.trie.common_prefix_search(chars[i..].iter().copied()) {
                let end = i + len;
                let score = here + self.scores.get(id as usize).copied().unwrap_or(f64::MIN);
                let b = &mut best[end];
                if !b.set || score > b.score {
                    *b = Best {
                        score,
                        start: i,
                        id: Some(id),
                        set: true,
                    };
                }
                single |= len == 1;
            }
            if !single {
                let score = here + self.unk_score;
                let b = &mut best[i + 1];
                if !b.set || score > b.score {
                    *b = Best {
                        score,
                        start: i,
                        id: None,
                        set: true,
                    };
                }
            }
        }
        // Back from the end; adjacent unknown pieces fuse into one.
        let first = out.len();
        let mut end = n;
        let mut in_unk = false;
        while end > 0 {
            let b = best[end];
            match b.id {
                Some(id) => {
                    out.push(id);
                    in_unk = false;
                }
                None => {
                    if !in_unk {
                        if let Some(u) = self.unk_id {
                            out.push(u);
                        }
                    }
                    in_unk = true;
                }
            }
            end = b.start;
        }
        out[first..].reverse();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model_dir() -> Option<std::path::PathBuf> {
        let d = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(".tools/embed-model");
        if d.join("tokenizer.json").exists() {
            Some(d)
        } else {
            eprintln!("skipped: no built-in model in .tools/embed-model (run scripts/setup.sh)");
            None
        }
    }

    /// The same ids as the `tokenizers` crate for the built-in model, over varied text:
    /// the paraphrase set, accents, CJK, emoji, control characters, odd whitespace.
    #[test]
    fn same_tokens_as_the_tokenizers_crate() {
        let Some(dir) = model_dir() else { return };
        let json = std::fs::read(dir.join("tokenizer.json")).unwrap();
        let ours = Unigram::from_json(&json)
            .unwrap()
            .expect("the supported shape");
        let theirs = tokenizers::Tokenizer::from_bytes(&json).unwrap();
        let mut texts: Vec<String> = vec![
            "How do I reset my password?".into(),
            "  leading and   trailing   spaces  ".into(),
            "Ünïcödé façade naïve coöperate — “quotes” ‘single’".into(),
            "東京の天気はどうですか？ 北京欢迎你".into(),
            "emoji 😀👍🏽 family 👨‍👩‍👧 flags 🇫🇷".into(),
            "tabs\tnew\nlines\r\nnbsp\u{a0}here zero\u{200b}width".into(),
            "ﬁ ligature ① ² ½ Ⅻ ＦＵＬＬ ｗｉｄｔｈ".into(),
            "control \u{1}\u{7f} chars and \u{301} lone combining".into(),
            "x".repeat(300),
            "qzxjkvw brrrzzt unknownword123 snake_case camelCase kebab-case".into(),
            String::new(),
            "   ".into(),
            "▁already▁has▁metaspace".into(),
        ];
        let set = std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/data/semantic/paraphrases.jsonl"),
        )
        .unwrap();
        for line in set.lines() {
            let v: Value = serde_json::from_str(line).unwrap();
            texts.push(v["a"].as_str().unwrap().to_owned());
            texts.push(v["b"].as_str().unwrap().to_owned());
        }
        for t in &texts {
            let mut ids = Vec::new();
            ours.encode(t, &mut ids);
            let want = theirs
                .encode_fast(t.as_str(), false)
                .unwrap()
                .get_ids()
                .to_vec();
            assert_eq!(ids, want, "{t:?}");
        }
    }

    #[test]
    fn other_shapes_fall_back_and_bad_ones_are_errors() {
        let wordpiece =
            br#"{"normalizer":null,"pre_tokenizer":null,"model":{"type":"WordPiece","vocab":{}}}"#;
        assert!(Unigram::from_json(wordpiece).unwrap().is_none());
        let bpe_pre = br#"{"normalizer":null,"pre_tokenizer":{"type":"ByteLevel"},"model":{"type":"Unigram","vocab":[["a",0.0]]}}"#;
        assert!(Unigram::from_json(bpe_pre).unwrap().is_none());
        let empty = br#"{"normalizer":null,"pre_tokenizer":{"type":"Metaspace","replacement":"_"},"model":{"type":"Unigram","vocab":[]}}"#;
        assert!(Unigram::from_json(empty).is_err());
        assert!(Unigram::from_json(b"not json").is_err());
        let tiny = br#"{"normalizer":null,"pre_tokenizer":{"type":"Metaspace","replacement":"_"},"model":{"type":"Unigram","unk_id":0,"vocab":[["<unk>",0.0],["_a",-1.0],["_",-2.0],["b",-3.0]]}}"#;
        let u = Unigram::from_json(tiny).unwrap().expect("supported");
        let mut ids = Vec::new();
        u.encode("a b zz", &mut ids);
        // "_a", then "_" + "b", then "_" + the two unknown z fused into one <unk>.
        assert_eq!(ids, vec![1, 2, 3, 2, 0]);
    }
}
