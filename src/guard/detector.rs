//! [`Detector`]: a [`GuardSpec`] compiled once. Scanning is at most three passes over the
//! text, whatever the number of detectors: the built-in regex set, the phrase automaton over
//! the normalised copy, and the custom regex set when one is configured.

use std::borrow::Cow;
use std::collections::HashSet;
use std::sync::Arc;

use aho_corasick::{AhoCorasick, MatchKind as AcKind};
use regex_automata::util::syntax;
use regex_automata::{hybrid, meta};
use regex_automata::{Anchored, Input};

use super::normalize::{self, Normalized};
use super::patterns::{Check, PATTERNS};
use super::phrases::{self, Grammar, INJECTION_GRAMMARS, MAX_FILLERS};
use super::redact::redact;
use super::spec::{GuardSpec, RedactionStyle, StreamSpec};
use super::validate;
use super::{Action, Builtin, Category, Confidence, Finding, GuardError};

/// Limits on what a configuration may ask for (compile time and memory stay bounded).
const MAX_CUSTOM: usize = 256;
const MAX_PATTERN_LEN: usize = 4096;
const MAX_WORDS: usize = 100_000;
/// Compiled size limit for one custom pattern and for the set (regex-automata's NFA bytes).
const CUSTOM_NFA_LIMIT: usize = 8 << 20;

struct RegexSlot {
    builtin: Builtin,
    check: Check,
    confidence: Confidence,
    action: Action,
    min: Confidence,
}

struct CustomSlot {
    category: Category,
    confidence: Confidence,
    action: Action,
}

enum PhraseKind {
    Fixed,
    /// A verb shared by several languages' grammars ("ignore": English and French).
    Grammar(Vec<&'static Grammar>),
}

struct PhraseSlot {
    kind: PhraseKind,
    category: Category,
    confidence: Confidence,
    action: Action,
    min: Confidence,
}

/// A compiled guard: `Send + Sync`, immutable, meant to be shared in an `Arc`.
pub struct Detector {
    builtin: Option<meta::Regex>,
    /// Each built-in pattern alone: when a candidate fails its check, lower-priority patterns
    /// are tried anchored at the same start (an order number failing Luhn must not hide the
    /// phone number that starts at the same digit).
    singles: Vec<meta::Regex>,
    /// The same patterns as lazy DFAs, for the stream's "could a match start here" test.
    pub(crate) builtin_dfa: Option<hybrid::dfa::DFA>,
    pub(crate) custom_dfa: Option<hybrid::dfa::DFA>,
    /// Every normalised phrase (no leading space), sorted: a tail is a possible phrase start
    /// when some phrase starts with it.
    pub(crate) phrase_prefixes: Vec<String>,
    /// Grammar verbs (normalised, no leading space): a tail starting with one may still
    /// complete a phrase within a few words.
    pub(crate) grammar_verbs: Vec<String>,
    builtin_slots: Vec<RegexSlot>,
    pub(crate) custom: Option<meta::Regex>,
    custom_slots: Vec<CustomSlot>,
    phrases: Option<AhoCorasick>,
    phrase_slots: Vec<PhraseSlot>,
    style: RedactionStyle,
    stream: StreamSpec,
    /// SHA-256 digests of texts of at least [`CLEAN_CACHE_MIN_BYTES`] this detector found
    /// nothing in ([`Detector::remembering_clean`], for prompts): chat clients resend the
    /// system prompt and every earlier turn with each request, and hashing a text costs a
    /// fraction of scanning it. A cryptographic digest, so no text can be made to pass as
    /// another one that was clean. Off for answers, which rarely repeat.
    clean: Option<moka::sync::Cache<[u8; 32], ()>>,
}

/// Shorter texts are scanned every time (the digest would cost about as much).
pub const CLEAN_CACHE_MIN_BYTES: usize = 256;
/// Clean texts remembered per detector (each entry about 100 bytes).
pub const CLEAN_CACHE_ENTRIES: u64 = 8192;

impl std::fmt::Debug for Detector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Detector")
            .field("builtin_patterns", &self.builtin_slots.len())
            .field("custom_patterns", &self.custom_slots.len())
            .field("phrases", &self.phrase_slots.len())
            .field("style", &self.style)
            .finish()
    }
}

/// What [`Detector::sanitize`] decided for one text.
#[derive(Debug)]
pub struct Sanitized<'a> {
    /// Every finding, by start.
    pub findings: Vec<Finding>,
    /// The most severe action (`None`: nothing found).
    pub action: Option<Action>,
    /// The text with `redact` findings rewritten (borrowed when nothing was).
    pub text: Cow<'a, str>,
}

impl Detector {
    pub fn compile(spec: &GuardSpec) -> Result<Detector, GuardError> {
        let global_min = spec.min_confidence.unwrap_or(Confidence::Low);
        let enabled = spec.enabled();

        // Built-in regexes of the enabled detectors, in priority order.
        let mut sources = Vec::new();
        let mut builtin_slots = Vec::new();
        for p in PATTERNS {
            if let Some(&(action, min)) = enabled.get(&p.builtin) {
                sources.push(p.regex);
                builtin_slots.push(RegexSlot {
                    builtin: p.builtin,
                    check: p.check,
                    confidence: p.confidence,
                    action,
                    min: min.unwrap_or(global_min),
                });
            }
        }
        // ASCII classes and word boundaries: the lazy DFA handles any text.
        let ascii = syntax::Config::new().unicode(false).utf8(false);
        let (builtin, builtin_dfa) = if sources.is_empty() {
            (None, None)
        } else {
            let re = meta::Builder::new()
                .syntax(ascii)
                .build_many(&sources)
                .map_err(|e| GuardError::Builtin(e.to_string()))?;
            let dfa = hybrid::dfa::DFA::builder()
                .syntax(ascii)
                .build_many(&sources)
                .map_err(|e| GuardError::Builtin(e.to_string()))?;
            (Some(re), Some(dfa))
        };
        let singles = sources
            .iter()
            .map(|p| meta::Builder::new().syntax(ascii).build(p))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| GuardError::Builtin(e.to_string()))?;

        let (custom, custom_slots) = compile_custom(spec)?;
        let custom_dfa = if custom.is_some() {
            let pats: Vec<&str> = spec.custom.iter().map(|c| c.pattern.as_str()).collect();
            // Not fatal: without it the stream holds the whole window for custom patterns.
            hybrid::dfa::DFA::builder().build_many(&pats).ok()
        } else {
            None
        };

        // Phrases: built-in injection / jailbreak, denied words, denied topics.
        let mut pats: Vec<String> = Vec::new();
        let mut phrase_slots = Vec::new();
        let mut seen: std::collections::HashMap<String, usize> = Default::default();
        let mut add = |text: &str,
                       kind: PhraseKind,
                       category: Category,
                       confidence: Confidence,
                       action: Action,
                       min: Confidence|
         -> Result<(), GuardError> {
            let n = normalize::phrase(text);
            let n = n.trim_end();
            if n.trim().is_empty() {
                return Err(GuardError::Empty {
                    what: format!("a `{}` phrase (it has no letters or digits)", category),
                });
            }
            if let Some(&i) = seen.get(n) {
                if let (
                    PhraseKind::Grammar(new),
                    Some(PhraseSlot {
                        kind: PhraseKind::Grammar(old),
                        ..
                    }),
                ) = (kind, phrase_slots.get_mut(i))
                {
                    old.extend(new);
                }
            } else {
                seen.insert(n.to_string(), pats.len());
                pats.push(n.to_string());
                phrase_slots.push(PhraseSlot {
                    kind,
                    category,
                    confidence,
                    action,
                    min,
                });
            }
            Ok(())
        };
        for (b, list) in [
            (Builtin::PromptInjection, phrases::injection()),
            (Builtin::Jailbreak, phrases::jailbreak()),
        ] {
            let Some(&(action, min)) = enabled.get(&b) else {
                continue;
            };
            let min = min.unwrap_or(global_min);
            for (p, c) in &list {
                add(p, PhraseKind::Fixed, b.into(), *c, action, min)?;
            }
            if b == Builtin::PromptInjection {
                for g in INJECTION_GRAMMARS {
                    for v in g.verbs {
                        add(
                            v,
                            PhraseKind::Grammar(vec![g]),
                            b.into(),
                            Confidence::High,
                            action,
                            min,
                        )?;
                    }
                }
            }
        }
        if let Some(words) = &spec.denied_words {
            if words.words.len() > MAX_WORDS {
                return Err(GuardError::Limits(format!(
                    "deniedWords has more than {MAX_WORDS} words"
                )));
            }
            for w in &words.words {
                add(
                    w,
                    PhraseKind::Fixed,
                    Category::DeniedWord,
                    Confidence::High,
                    words.action,
                    Confidence::Low,
                )?;
            }
        }
        let mut topic_names = HashSet::new();
        for t in &spec.denied_topics {
            check_name(&t.name)?;
            if !topic_names.insert(t.name.as_str()) {
                return Err(GuardError::DuplicateCustom(t.name.clone()));
            }
            if t.phrases.is_empty() || t.phrases.len() > MAX_WORDS {
                return Err(GuardError::Limits(format!(
                    "denied topic `{}` needs 1-{MAX_WORDS} phrases",
                    t.name
                )));
            }
            let name: Arc<str> = Arc::from(t.name.as_str());
            for p in &t.phrases {
                add(
                    p,
                    PhraseKind::Fixed,
                    Category::DeniedTopic(name.clone()),
                    Confidence::High,
                    t.action,
                    Confidence::Low,
                )?;
            }
        }
        let mut phrase_prefixes: Vec<String> =
            pats.iter().map(|p| p.trim_start().to_string()).collect();
        phrase_prefixes.sort();
        let mut grammar_verbs: Vec<String> = phrase_slots
            .iter()
            .zip(&pats)
            .filter(|(s, _)| matches!(s.kind, PhraseKind::Grammar(_)))
            .map(|(_, p)| p.trim_start().to_string())
            .collect();
        grammar_verbs.sort();
        let phrases = if pats.is_empty() {
            None
        } else {
            Some(
                AhoCorasick::builder()
                    .match_kind(AcKind::LeftmostLongest)
                    .build(&pats)
                    .map_err(|e| GuardError::Limits(format!("phrase automaton: {e}")))?,
            )
        };

        let stream = spec.stream;
        if !(16..=65_536).contains(&stream.hold_back_bytes)
            || stream.max_match_bytes < stream.hold_back_bytes
            || stream.max_match_bytes > 1 << 20
        {
            return Err(GuardError::Limits(
                "stream.holdBackBytes must be 16-65536 and stream.maxMatchBytes between it and 1048576"
                    .into(),
            ));
        }
        Ok(Detector {
            builtin,
            singles,
            builtin_dfa,
            custom_dfa,
            phrase_prefixes,
            grammar_verbs,
            builtin_slots,
            custom,
            custom_slots,
            phrases,
            phrase_slots,
            style: spec.redaction,
            stream,
            clean: None,
        })
    }

    /// Remember the texts found clean (see the `clean` field).
    pub fn remembering_clean(mut self) -> Self {
        self.clean = Some(moka::sync::Cache::new(CLEAN_CACHE_ENTRIES));
        self
    }

    pub fn style(&self) -> RedactionStyle {
        self.style
    }

    pub fn stream_spec(&self) -> StreamSpec {
        self.stream
    }

    /// Every finding in `text`, ordered by start (then end).
    pub fn scan(&self, text: &str) -> Vec<Finding> {
        let remembered = self
            .clean
            .as_ref()
            .filter(|_| text.len() >= CLEAN_CACHE_MIN_BYTES);
        let digest = remembered.map(|_| {
            use sha2::Digest;
            <[u8; 32]>::from(sha2::Sha256::digest(text.as_bytes()))
        });
        if let (Some(cache), Some(d)) = (remembered, &digest) {
            if cache.contains_key(d) {
                return Vec::new();
            }
        }
        let mut out = Vec::new();
        let mut norm = Normalized::default();
        self.scan_from(text, 0, &mut norm, &mut out);
        if let (Some(cache), Some(d), true) = (remembered, digest, out.is_empty()) {
            cache.insert(d, ());
        }
        out
    }

    /// Scans, decides, and redacts the `redact` findings (a `block` decision leaves the text
    /// as it was: the policy refuses it).
    pub fn sanitize<'a>(&self, text: &'a str) -> Sanitized<'a> {
        let findings = self.scan(text);
        let action = super::decision(&findings);
        let text = if action == Some(Action::Redact) {
            let r: Vec<Finding> = findings
                .iter()
                .filter(|f| f.action == Action::Redact)
                .cloned()
                .collect();
            redact(text, &r, self.style)
        } else {
            Cow::Borrowed(text)
        };
        Sanitized {
            findings,
            action,
            text,
        }
    }

    /// Findings that start at or after `from` (bytes before it are context only: word
    /// boundaries). Appends to `out`, sorted by start.
    pub(crate) fn scan_from(
        &self,
        text: &str,
        from: usize,
        norm: &mut Normalized,
        out: &mut Vec<Finding>,
    ) {
        let first = out.len();
        let from = floor_char(text, from);
        if from >= text.len() {
            return;
        }
        if let Some(re) = &self.builtin {
            let len = text.len();
            let mut pos = from;
            while pos < len {
                let Some(m) = re.search(&Input::new(text).span(pos..len)) else {
                    break;
                };
                let first = m.pattern().as_usize();
                let mut hit = self.candidate(first, text, m.start(), m.end());
                if hit.is_none() {
                    for j in first + 1..self.singles.len() {
                        let anchored = Input::new(text)
                            .span(m.start()..len)
                            .anchored(Anchored::Yes);
                        if let Some(m2) = self.singles[j].search(&anchored) {
                            hit = self.candidate(j, text, m2.start(), m2.end());
                            if hit.is_some() {
                                break;
                            }
                        }
                    }
                }
                pos = match hit {
                    Some(f) => {
                        let end = f.end.max(m.start() + 1);
                        out.push(f);
                        end
                    }
                    // A short failed candidate may hide one starting inside it; a long one
                    // (a token-like run) is skipped whole to stay linear.
                    None if m.len() <= 64 => next_char(text, m.start()),
                    None => m.end(),
                };
            }
        }
        if let Some(re) = &self.custom {
            for m in re.find_iter(Input::new(text).span(from..text.len())) {
                if m.is_empty() {
                    continue;
                }
                if let Some(slot) = self.custom_slots.get(m.pattern().as_usize()) {
                    out.push(Finding {
                        category: slot.category.clone(),
                        confidence: slot.confidence,
                        action: slot.action,
                        start: m.start(),
                        end: m.end(),
                    });
                }
            }
        }
        if let Some(ac) = &self.phrases {
            let tail = text.get(from..).unwrap_or("");
            norm.fill(tail);
            self.phrase_pass(ac, tail, from, norm, out);
        }
        out[first..].sort_by_key(|f| (f.start, f.end));
    }

    /// A candidate of built-in pattern `i`, validated.
    fn candidate(&self, i: usize, text: &str, start: usize, end: usize) -> Option<Finding> {
        let slot = self.builtin_slots.get(i)?;
        let (s, e, c) = validate::check(slot.check, text, start, end, slot.confidence)?;
        (c >= slot.min && e > s).then(|| Finding {
            category: slot.builtin.into(),
            confidence: c,
            action: slot.action,
            start: s,
            end: e,
        })
    }

    fn phrase_pass(
        &self,
        ac: &AhoCorasick,
        src: &str,
        offset: usize,
        norm: &Normalized,
        out: &mut Vec<Finding>,
    ) {
        let t = norm.text.as_str();
        let b = t.as_bytes();
        for m in ac.find_iter(t) {
            let Some(slot) = self.phrase_slots.get(m.pattern().as_usize()) else {
                continue;
            };
            // Patterns start with a space; the phrase must also end at a word end.
            if b.get(m.end()).is_some_and(|&c| c != b' ') {
                continue;
            }
            let end = match &slot.kind {
                PhraseKind::Fixed => m.end(),
                PhraseKind::Grammar(gs) => {
                    let rest = t.get(m.end()..).unwrap_or("").trim_start_matches(' ');
                    let Some(n) = gs
                        .iter()
                        .find_map(|g| g.complete(rest.split(' ').take(MAX_FILLERS + 4)))
                    else {
                        continue;
                    };
                    let consumed: usize = rest.split(' ').take(n).map(|w| w.len() + 1).sum();
                    m.end() + consumed
                }
            };
            if slot.confidence < slot.min {
                continue;
            }
            // Map back: first byte of the phrase (after the leading space) and the end of the
            // source character of its last byte.
            let (Some(&s), Some(&l)) = (
                norm.origin.get(m.start() + 1),
                norm.origin.get(end.saturating_sub(1)),
            ) else {
                continue;
            };
            let (s, l) = (s as usize, l as usize);
            let last_len = src
                .get(l..)
                .and_then(|r| r.chars().next())
                .map_or(0, char::len_utf8);
            out.push(Finding {
                category: slot.category.clone(),
                confidence: slot.confidence,
                action: slot.action,
                start: offset + s,
                end: offset + l + last_len,
            });
        }
    }
}

fn next_char(text: &str, i: usize) -> usize {
    let mut j = i + 1;
    while j < text.len() && !text.is_char_boundary(j) {
        j += 1;
    }
    j
}

fn floor_char(text: &str, mut i: usize) -> usize {
    if i >= text.len() {
        return text.len();
    }
    while !text.is_char_boundary(i) {
        i -= 1;
    }
    i
}

fn check_name(name: &str) -> Result<(), GuardError> {
    let ok = (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(GuardError::CustomName(name.to_string()))
    }
}

fn compile_custom(spec: &GuardSpec) -> Result<(Option<meta::Regex>, Vec<CustomSlot>), GuardError> {
    if spec.custom.is_empty() {
        return Ok((None, Vec::new()));
    }
    if spec.custom.len() > MAX_CUSTOM {
        return Err(GuardError::Limits(format!(
            "at most {MAX_CUSTOM} custom patterns"
        )));
    }
    let mut names = HashSet::new();
    let mut slots = Vec::new();
    let config = meta::Config::new()
        .nfa_size_limit(Some(CUSTOM_NFA_LIMIT))
        .onepass_size_limit(Some(CUSTOM_NFA_LIMIT))
        .dfa_size_limit(Some(CUSTOM_NFA_LIMIT));
    for c in &spec.custom {
        check_name(&c.name)?;
        if !names.insert(c.name.as_str()) {
            return Err(GuardError::DuplicateCustom(c.name.clone()));
        }
        if c.pattern.is_empty() || c.pattern.len() > MAX_PATTERN_LEN {
            return Err(GuardError::CustomPattern {
                name: c.name.clone(),
                reason: format!("must be 1-{MAX_PATTERN_LEN} bytes"),
            });
        }
        // Alone first, so an error names its pattern.
        meta::Builder::new()
            .configure(config.clone())
            .build(&c.pattern)
            .map_err(|e| GuardError::CustomPattern {
                name: c.name.clone(),
                reason: e.to_string(),
            })?;
        slots.push(CustomSlot {
            category: Category::Custom(Arc::from(c.name.as_str())),
            confidence: c.confidence,
            action: c.action,
        });
    }
    let re = meta::Builder::new()
        .configure(config)
        .build_many(
            &spec
                .custom
                .iter()
                .map(|c| c.pattern.as_str())
                .collect::<Vec<_>>(),
        )
        .map_err(|e| GuardError::CustomSet(e.to_string()))?;
    Ok((Some(re), slots))
}
