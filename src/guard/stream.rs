//! [`StreamScanner`]: guards generated text as it streams, without holding the stream.
//!
//! Each delta is appended to the unreleased text, which is scanned (with up to
//! [`CONTEXT`] already-released bytes before it, for word boundaries). Then the scanner
//! releases everything except the tail that could still become (part of) a match:
//!
//! - within the last `holdBackBytes` (default 256), the earliest position from which some
//!   built-in or custom pattern is still alive (its lazy DFA, run anchored from there, is not
//!   dead at the end of the text), or from whose word some phrase or grammar could still be
//!   completed. Typical prose holds back only its last word; a trailing "4111 1111" holds the
//!   digits;
//! - a finding that reaches the end of the text (it may grow: `a@b.co` → `a@b.com`), from its
//!   start, up to `maxMatchBytes` (default 4096, for a private key block arriving line by
//!   line).
//!
//! So a match of at most `holdBackBytes` bytes is caught whatever the deltas; a longer one is
//! caught when its start is still held, otherwise found from where the released text ends.
//! Released text has `redact` findings rewritten; a `block` finding stops the stream: the
//! text before it is released and nothing after.

use std::sync::Arc;

use regex_automata::hybrid::dfa::{Cache, DFA};
use regex_automata::{Anchored, Input};

use super::detector::Detector;
use super::normalize::Normalized;
use super::phrases::MAX_FILLERS;
use super::redact::redact;
use super::{Action, Finding};

/// Released bytes kept before the unreleased text as look-behind context.
pub const CONTEXT: usize = 64;

/// What one delta (or the end) lets through.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct StreamOutput {
    /// Text safe to send now, redacted where needed (may be empty).
    pub release: String,
    /// Findings now certain, with byte offsets in the original (unredacted) stream.
    pub findings: Vec<Finding>,
    /// A `block` finding: `release` stops before it and the scanner takes no more text. The
    /// caller ends the stream with its API's final event.
    pub blocked: Option<Finding>,
}

/// Scans one stream's text deltas. One per stream; not shared.
pub struct StreamScanner {
    detector: Arc<Detector>,
    builtin_cache: Option<Cache>,
    custom_cache: Option<Cache>,
    /// Released context, then unreleased text from `pending`.
    buf: String,
    pending: usize,
    /// Stream offset of `buf[0]`.
    base: usize,
    norm: Normalized,
    found: Vec<Finding>,
    done: bool,
}

impl std::fmt::Debug for StreamScanner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamScanner")
            .field("held", &(self.buf.len() - self.pending))
            .field("offset", &(self.base + self.pending))
            .field("done", &self.done)
            .finish()
    }
}

impl StreamScanner {
    pub fn new(detector: Arc<Detector>) -> StreamScanner {
        StreamScanner {
            builtin_cache: detector.builtin_dfa.as_ref().map(DFA::create_cache),
            custom_cache: detector.custom_dfa.as_ref().map(DFA::create_cache),
            detector,
            buf: String::new(),
            pending: 0,
            base: 0,
            norm: Normalized::default(),
            found: Vec::new(),
            done: false,
        }
    }

    /// Bytes received but not yet released.
    pub fn held(&self) -> usize {
        self.buf.len() - self.pending
    }

    /// Whether a block ended the stream (later deltas are dropped).
    pub fn is_blocked(&self) -> bool {
        self.done
    }

    pub fn push(&mut self, delta: &str) -> StreamOutput {
        if self.done {
            return StreamOutput::default();
        }
        self.buf.push_str(delta);
        self.step(false)
    }

    /// The stream ended: release the rest.
    pub fn finish(&mut self) -> StreamOutput {
        if self.done {
            return StreamOutput::default();
        }
        let out = self.step(true);
        self.done = true;
        out
    }

    fn step(&mut self, last: bool) -> StreamOutput {
        let len = self.buf.len();
        self.found.clear();
        let mut found = std::mem::take(&mut self.found);
        self.detector
            .scan_from(&self.buf, self.pending, &mut self.norm, &mut found);

        if let Some(b) = found.iter().find(|f| f.action == Action::Block).cloned() {
            // Release only what precedes the block and every finding overlapping it.
            let mut cut = b.start;
            loop {
                let before = cut;
                for f in &found {
                    if f.start < cut && cut < f.end {
                        cut = f.start;
                    }
                }
                if cut == before {
                    break;
                }
            }
            let out = self.release(&found, cut.max(self.pending), Some(b));
            self.done = true;
            self.found = found;
            return out;
        }

        let mut cut = len;
        if !last {
            let stream = self.detector.stream_spec();
            // Findings that reach the end may still grow.
            for f in found.iter().filter(|f| f.end == len) {
                if len - f.start <= stream.max_match_bytes {
                    cut = cut.min(f.start);
                }
            }
            let window =
                floor(&self.buf, len.saturating_sub(stream.hold_back_bytes)).max(self.pending);
            if let Some(p) = self.first_open(window, cut, &found) {
                cut = p;
            }
        }
        // Never split a finding.
        loop {
            let before = cut;
            for f in &found {
                if f.start < cut && cut < f.end {
                    cut = f.end;
                }
            }
            if cut == before {
                break;
            }
        }
        let out = self.release(&found, cut, None);
        self.found = found;
        out
    }

    /// Releases `buf[pending..cut]` with its findings, then drops what is no longer needed
    /// as context.
    fn release(&mut self, found: &[Finding], cut: usize, blocked: Option<Finding>) -> StreamOutput {
        let cut = floor(&self.buf, cut.min(self.buf.len())).max(self.pending);
        let inside: Vec<Finding> = found
            .iter()
            .filter(|f| f.end <= cut && f.start >= self.pending)
            .cloned()
            .collect();
        let shifted: Vec<Finding> = inside
            .iter()
            .filter(|f| f.action == Action::Redact)
            .map(|f| Finding {
                start: f.start - self.pending,
                end: f.end - self.pending,
                ..f.clone()
            })
            .collect();
        let release = redact(
            &self.buf[self.pending..cut],
            &shifted,
            self.detector.style(),
        )
        .into_owned();
        let abs = |f: &Finding| Finding {
            start: f.start + self.base,
            end: f.end + self.base,
            ..f.clone()
        };
        let findings = inside.iter().map(abs).collect();
        let blocked = blocked.as_ref().map(abs);
        self.pending = cut;
        if blocked.is_some() {
            self.base += self.buf.len();
            self.buf.clear();
            self.pending = 0;
        } else {
            let keep = floor(&self.buf, cut.saturating_sub(CONTEXT));
            if keep > 0 {
                self.buf.drain(..keep);
                self.base += keep;
                self.pending -= keep;
            }
        }
        StreamOutput {
            release,
            findings,
            blocked,
        }
    }

    /// The earliest position in `[from, to)` from which a match could still be under way at
    /// the end of the text (skipping the inside of findings already complete).
    fn first_open(&mut self, from: usize, to: usize, found: &[Finding]) -> Option<usize> {
        let len = self.buf.len();
        let phrase_start = self.phrase_open(from, to);
        let to = phrase_start.unwrap_or(to);
        let bytes = self.buf.as_bytes();
        let mut p = from;
        while p < to {
            if let Some(f) = found
                .iter()
                .find(|f| f.start < p && p < f.end && f.end < len)
            {
                p = f.end;
                continue;
            }
            if self.buf.is_char_boundary(p) {
                let hay = &self.buf;
                let d = &self.detector;
                if alive(d.builtin_dfa.as_ref(), self.builtin_cache.as_mut(), hay, p)
                    || alive(d.custom_dfa.as_ref(), self.custom_cache.as_mut(), hay, p)
                    || (d.custom.is_some() && d.custom_dfa.is_none())
                {
                    return Some(p);
                }
            }
            // Skip the rest of a UTF-8 sequence quickly.
            p += 1;
            while p < to && bytes.get(p).is_some_and(|b| (b & 0xC0) == 0x80) {
                p += 1;
            }
        }
        phrase_start
    }

    /// The start (in `buf`) of the earliest word in `[from, to)` from which a phrase could
    /// still be completed.
    fn phrase_open(&self, from: usize, to: usize) -> Option<usize> {
        let d = &self.detector;
        if d.phrase_prefixes.is_empty() || from >= self.buf.len() {
            return None;
        }
        // `norm` holds the normalised `buf[pending..]` from the scan just made.
        let t = self.norm.text.as_str();
        let tb = t.as_bytes();
        for (i, &c) in tb.iter().enumerate() {
            if c != b' ' || i + 1 >= tb.len() {
                continue;
            }
            let Some(&o) = self.norm.origin.get(i + 1) else {
                continue;
            };
            let at = self.pending + o as usize;
            if at < from {
                continue;
            }
            if at >= to {
                return None;
            }
            let tail = &t[i + 1..];
            let tail = tail.strip_suffix(' ').unwrap_or(tail);
            // A prefix of some phrase?
            let k = d.phrase_prefixes.partition_point(|p| p.as_str() < tail);
            if d.phrase_prefixes
                .get(k)
                .is_some_and(|p| p.starts_with(tail))
            {
                return Some(at);
            }
            // A grammar verb with few enough words after it to still complete.
            let k = d.grammar_verbs.partition_point(|v| v.as_str() <= tail);
            let verb = k
                .checked_sub(1)
                .and_then(|j| d.grammar_verbs.get(j))
                .is_some_and(|v| {
                    tail.starts_with(v.as_str())
                        && tail.as_bytes().get(v.len()).is_none_or(|&b| b == b' ')
                        && tail[v.len()..].split(' ').count() <= MAX_FILLERS + 3
                });
            if verb {
                return Some(at);
            }
        }
        None
    }
}

/// Whether some pattern, started at `p`, is still alive at the end of `hay`.
fn alive(dfa: Option<&DFA>, cache: Option<&mut Cache>, hay: &str, p: usize) -> bool {
    let (Some(dfa), Some(cache)) = (dfa, cache) else {
        return false;
    };
    let input = Input::new(hay).span(p..hay.len()).anchored(Anchored::Yes);
    let Ok(mut sid) = dfa.start_state_forward(cache, &input) else {
        return true;
    };
    for &b in &hay.as_bytes()[p..] {
        match dfa.next_state(cache, sid, b) {
            Ok(s) => sid = s,
            Err(_) => return true,
        }
        if sid.is_tagged() {
            if sid.is_dead() {
                return false;
            }
            if sid.is_quit() {
                return true;
            }
        }
    }
    true
}

fn floor(t: &str, mut i: usize) -> usize {
    i = i.min(t.len());
    while i > 0 && !t.is_char_boundary(i) {
        i -= 1;
    }
    i
}
