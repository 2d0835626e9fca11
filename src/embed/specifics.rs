//! The second check behind the similarity threshold: do two prompts agree on the details a
//! mean-pooled embedding blurs?
//!
//! An averaged embedding cannot tell "convert USD to EUR" from "convert EUR to USD" (same
//! words), and barely "refund order 4512" from "refund order 4513" or "can I" from "can't I".
//! A cached answer to one is a wrong answer to the other, so a semantic hit also needs:
//!
//! 1. the same numbers (digits, `1,000` = `1000`, number words two..billion);
//! 2. both negated or neither (not, no, never, n't, cannot, without, none, nothing...);
//! 3. the same anchors: acronyms, mid-sentence capitalised names, identifiers with digits,
//!    `_`, `.` or camelCase (`gpt-4o`, `user_id`, `S3`, `Kubernetes`); an anchor of one text
//!    must occur (in any case) in the other;
//! 4. the same direction: content words next to `to`/`from`/`into`/`than`/`vs`/`over`/
//!    `before`/`after` that both texts contain must come in the same order;
//! 5. no swapped word: when each text has content words the other lacks, and the words they
//!    share are at least as many as either side's own, the texts are the same sentence with a
//!    word exchanged ("create"/"delete", "free"/"enterprise tier", "dogs"/"cats",
//!    "login"/"logout"), which a static model scores as near-identical. A real paraphrase
//!    that swaps exactly one word ("write"/"compose a haiku") is lost: a miss costs an
//!    upstream call, a false hit a wrong answer.
//!
//! Model-variant words (`mini`, `pro`, `flash`, `turbo`...) count as anchors, so
//! "GPT-4o" and "GPT-4o mini" differ.
//!
//! Cheap (one pass over each text, no allocation beyond the word lists) and symmetric.

use std::collections::BTreeSet;

const NEGATIONS: &[&str] = &[
    "not", "no", "never", "cannot", "without", "none", "nothing", "nobody", "neither", "nor",
    "nowhere", "unable",
];

const DIRECTION: &[&str] = &[
    "to", "from", "into", "than", "vs", "versus", "over", "before", "after", "onto",
];

/// Words with no content of their own (skipped when looking for a marker's neighbours).
const STOP: &[&str] = &[
    "a", "an", "the", "my", "our", "your", "their", "his", "her", "its", "this", "that", "these",
    "those", "some", "any", "i", "we", "you", "it", "is", "are", "was", "be", "do", "does", "did",
    "of", "in", "on", "for", "with", "and", "or", "how", "what", "can", "could", "should", "would",
    "will", "me", "us", "them", "at", "by", "as", "so", "if", "then", "where", "why", "when",
    "who", "which", "there", "have", "has", "get", "please", "way", "best", "up", "about", "am",
    "to", "like", "want", "need", "tell", "give", "show", "explain", "possible", "using", "use",
    "i'm", "what's", "it's",
];

/// Model and product variant words: "GPT-4o mini" is not "GPT-4o".
const VARIANTS: &[&str] = &[
    "mini", "nano", "pro", "turbo", "flash", "lite", "max", "plus", "ultra", "preview", "instruct",
    "haiku", "sonnet", "opus", "large", "small", "medium",
];

/// Common interchangeable words in API and LLM questions, mapped to one form for the
/// swapped-word rule (a short generic list: "make"/"create", "change"/"update").
fn synonym(w: &str) -> &str {
    match w {
        "make" | "generate" => "create",
        "change" | "modify" | "edit" => "update",
        "configure" | "setup" => "set",
        "verify" | "see" | "view" | "find" => "check",
        "largest" | "biggest" | "maximum" | "max" => "largest",
        "quickest" | "fastest" => "fastest",
        "contact" | "reach" => "contact",
        "difference" | "different" | "differ" => "differ",
        "typical" | "typically" | "usual" | "usually" => "usual",
        "invite" => "add",
        "move" => "migrate",
        "turn" => "enable",
        "author" | "wrote" | "write" => "write",
        "compose" | "draft" => "write",
        "distance" | "far" => "far",
        "suggest" | "recommend" => "recommend",
        "dicts" | "dict" => "dictionary",
        "summary" | "summarise" | "summarize" => "summarize",
        other => other,
    }
}

/// Crude, symmetric stemming for the swapped-word rule ("works" = "work", "loading" =
/// "load", "controlled" = "control").
fn stem(w: &str) -> String {
    let w = w.strip_suffix("'s").unwrap_or(w);
    let w = synonym(w);
    let mut out = w;
    if w.len() > 5 && w.ends_with("ing") {
        out = &w[..w.len() - 3];
    } else if w.len() > 4 && w.ends_with("ed") {
        out = &w[..w.len() - 2];
    } else if w.len() > 3 && w.ends_with('s') && !w.ends_with("ss") {
        out = &w[..w.len() - 1];
    }
    // "controll" -> "control", "runn" -> "run".
    let mut tail = out.chars().rev();
    if out.len() != w.len() {
        if let (Some(x), Some(y)) = (tail.next(), tail.next()) {
            // ASCII only: the slice below must end on a character boundary.
            if x == y && x.is_ascii_alphabetic() {
                out = &out[..out.len() - 1];
            }
        }
    }
    synonym(out).to_string()
}

fn number_word(w: &str) -> Option<&'static str> {
    Some(match w {
        "zero" => "0",
        "two" => "2",
        "three" => "3",
        "four" => "4",
        "five" => "5",
        "six" => "6",
        "seven" => "7",
        "eight" => "8",
        "nine" => "9",
        "ten" => "10",
        "eleven" => "11",
        "twelve" => "12",
        "fifteen" => "15",
        "twenty" => "20",
        "thirty" => "30",
        "fifty" => "50",
        "hundred" => "100",
        "thousand" => "1000",
        "million" => "1000000",
        "billion" => "1000000000",
        _ => return None,
    })
}

struct Word<'a> {
    raw: &'a str,
    lower: String,
    /// First word of a sentence (its capital says nothing).
    initial: bool,
}

fn words(text: &str) -> Vec<Word<'_>> {
    let mut out = Vec::new();
    let mut initial = true;
    let mut start = None;
    let is_word = |c: char| c.is_alphanumeric() || matches!(c, '_' | '\'' | '’' | '.' | '-' | ',');
    let bytes: Vec<(usize, char)> = text.char_indices().collect();
    let mut i = 0;
    while i <= bytes.len() {
        let c = bytes.get(i).map(|&(_, c)| c);
        match (c, start) {
            (Some(c), None) if c.is_alphanumeric() => start = Some(bytes[i].0),
            (Some(c), Some(_)) if is_word(c) => {}
            (_, Some(s)) => {
                let end = bytes.get(i).map(|&(b, _)| b).unwrap_or(text.len());
                // Trailing punctuation (`.`, `,`, `'`, `-`) ends a sentence or clause.
                let w = text[s..end].trim_end_matches(|c: char| !c.is_alphanumeric());
                let ends_sentence = text[s + w.len()..end].contains('.')
                    || matches!(c, Some('?' | '!' | '\n' | ':'));
                let w = w.trim_end_matches(',');
                if !w.is_empty() {
                    // `1,000` stays one number; `a,b` would be two words but is rare.
                    let w = w
                        .strip_suffix("'s")
                        .or_else(|| w.strip_suffix("’s"))
                        .unwrap_or(w);
                    for part in if w.chars().any(|c| c.is_ascii_digit()) {
                        vec![w]
                    } else {
                        w.split(',').collect()
                    } {
                        if part.is_empty() {
                            continue;
                        }
                        out.push(Word {
                            raw: part,
                            lower: part.to_lowercase(),
                            initial,
                        });
                        initial = false;
                    }
                }
                if ends_sentence {
                    initial = true;
                }
                start = None;
            }
            (Some('?' | '!' | '\n' | ':'), None) => initial = true,
            _ => {}
        }
        i += 1;
    }
    out
}

fn is_negation(w: &str) -> bool {
    NEGATIONS.contains(&w) || w.ends_with("n't") || w.ends_with("n’t")
}

fn number(w: &str) -> Option<String> {
    if w.chars().any(|c| c.is_ascii_digit()) {
        if w.chars()
            .all(|c| c.is_ascii_digit() || matches!(c, ',' | '.'))
        {
            let n = w.replace(',', "");
            let n = if n.contains('.') {
                n.trim_end_matches('0').trim_end_matches('.').to_string()
            } else {
                n
            };
            return Some(n);
        }
        return None;
    }
    number_word(w).map(str::to_string)
}

fn is_anchor(w: &Word<'_>) -> bool {
    let raw = w.raw;
    let letters = raw.chars().filter(|c| c.is_alphabetic()).count();
    if letters == 0 {
        return false;
    }
    let upper = raw.chars().filter(|c| c.is_uppercase()).count();
    let digits = raw.chars().any(|c| c.is_ascii_digit());
    let inner_mark = raw.contains(['_', '.']);
    let camel =
        raw.chars().skip(1).any(|c| c.is_uppercase()) && raw.chars().any(|c| c.is_lowercase());
    let acronym = letters >= 2 && upper == letters;
    let capitalised =
        !w.initial && raw.chars().next().is_some_and(|c| c.is_uppercase()) && raw != "I";
    digits || inner_mark || camel || acronym || capitalised
}

/// What [`compatible`] compares, extracted once per text (a cache can store it with the
/// entry).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Specifics {
    numbers: BTreeSet<String>,
    negated: bool,
    anchors: BTreeSet<String>,
    /// Every word, lowercased (for "the anchor occurs in the other text").
    vocabulary: BTreeSet<String>,
    /// Content words next to a direction marker, lowercased, in text order.
    directed: Vec<String>,
    /// Content words in text order (first occurrences), for the direction check.
    sequence: Vec<String>,
    /// Stemmed content words, for the swapped-word rule.
    content: BTreeSet<String>,
}

impl Specifics {
    pub fn of(text: &str) -> Self {
        let ws = words(text);
        let mut s = Specifics::default();
        for (i, w) in ws.iter().enumerate() {
            let lower = w.lower.as_str();
            if let Some(n) = number(lower) {
                s.numbers.insert(n);
            }
            if is_negation(lower) {
                s.negated = true;
            }
            if (is_anchor(w) || VARIANTS.contains(&lower)) && number(lower).is_none() {
                s.anchors.insert(w.lower.clone());
            }
            s.vocabulary.insert(w.lower.clone());
            let content = !STOP.contains(&lower) && !DIRECTION.contains(&lower);
            if content && !s.sequence.contains(&w.lower) {
                s.sequence.push(w.lower.clone());
            }
            if content && !is_negation(lower) && number(lower).is_none() {
                s.content.insert(stem(lower));
            }
            if DIRECTION.contains(&lower) {
                let before = ws[..i].iter().rev().find(|x| {
                    !STOP.contains(&x.lower.as_str()) && !DIRECTION.contains(&x.lower.as_str())
                });
                let after = ws[i + 1..].iter().find(|x| {
                    !STOP.contains(&x.lower.as_str()) && !DIRECTION.contains(&x.lower.as_str())
                });
                for x in before.into_iter().chain(after) {
                    if !s.directed.contains(&x.lower) {
                        s.directed.push(x.lower.clone());
                    }
                }
            }
        }
        s
    }

    /// Why `self` and `other` are not the same question, if they are not.
    pub fn mismatch(&self, other: &Specifics) -> Option<Mismatch> {
        if self.numbers != other.numbers {
            return Some(Mismatch::Numbers);
        }
        if self.negated != other.negated {
            return Some(Mismatch::Negation);
        }
        let missing =
            |a: &Specifics, b: &Specifics| a.anchors.iter().any(|x| !b.vocabulary.contains(x));
        if missing(self, other) || missing(other, self) {
            return Some(Mismatch::Anchor);
        }
        // Words next to a marker in either text that both texts contain, in each text's order.
        let marked: Vec<&String> = self
            .directed
            .iter()
            .chain(&other.directed)
            .filter(|w| self.vocabulary.contains(*w) && other.vocabulary.contains(*w))
            .collect();
        fn order<'a>(s: &'a Specifics, marked: &[&String]) -> Vec<&'a String> {
            s.sequence.iter().filter(|w| marked.contains(w)).collect()
        }
        let (a, b) = (order(self, &marked), order(other, &marked));
        if a.len() >= 2 && a != b {
            return Some(Mismatch::Direction);
        }
        let only_a = self.content.difference(&other.content).count();
        let only_b = other.content.difference(&self.content).count();
        let shared = self.content.intersection(&other.content).count();
        if only_a > 0 && only_b > 0 && shared >= only_a.max(only_b) {
            return Some(Mismatch::Swapped);
        }
        None
    }
}

/// Which detail two prompts disagree on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mismatch {
    Numbers,
    Negation,
    Anchor,
    Direction,
    Swapped,
}

/// Whether two prompts agree on numbers, negation, anchors, direction and wording.
pub fn compatible(a: &str, b: &str) -> bool {
    Specifics::of(a).mismatch(&Specifics::of(b)).is_none()
}
