//! The normalised copy phrases are matched on: lower case, Latin accents folded, common
//! Cyrillic look-alikes mapped, leetspeak digits mapped, zero-width and format characters
//! dropped, and every run of other characters (space, punctuation, symbols) one space. Each
//! output byte remembers the byte offset of the source character it came from, so a match
//! maps back to the original text.

/// Reused buffers (the stream scanner normalises on every delta).
#[derive(Debug, Default)]
pub(crate) struct Normalized {
    pub text: String,
    /// For each byte of `text`: the start of its source character in the original.
    pub origin: Vec<u32>,
}

impl Normalized {
    /// Fills from `src[from..]` (earlier bytes are context the caller already scanned).
    pub fn fill(&mut self, src: &str) {
        self.text.clear();
        self.origin.clear();
        self.text.reserve(src.len() + 1);
        self.origin.reserve(src.len() + 1);
        // Leading separator so every phrase can be matched as " phrase " (word boundaries
        // without a second check).
        self.push(' ', 0);
        let mut last_space = true;
        for (i, c) in src.char_indices() {
            let at = u32::try_from(i).unwrap_or(u32::MAX);
            if is_invisible(c) {
                continue;
            }
            if let Some(m) = map_char(c) {
                match m {
                    Mapped::One(x) => self.push(x, at),
                    Mapped::Two(x, y) => {
                        self.push(x, at);
                        self.push(y, at);
                    }
                }
                last_space = false;
            } else if !last_space {
                self.push(' ', at);
                last_space = true;
            }
        }
        if !last_space {
            self.push(' ', u32::try_from(src.len()).unwrap_or(u32::MAX));
        }
        self.join_spelled();
    }

    /// "i g n o r e" → "ignore": four or more one-letter words in a row are joined (real
    /// prose rarely has more than two in a row).
    fn join_spelled(&mut self) {
        let b = self.text.as_bytes();
        // Words as (start, end) byte ranges; the text is " w w w ".
        let mut words = Vec::new();
        let mut i = 0;
        while i < b.len() {
            if b[i] == b' ' {
                i += 1;
                continue;
            }
            let s = i;
            while i < b.len() && b[i] != b' ' {
                i += 1;
            }
            words.push((s, i));
        }
        let single = |w: &(usize, usize)| w.1 - w.0 == 1;
        let mut join = vec![false; words.len()];
        let mut any = false;
        let mut k = 0;
        while k < words.len() {
            let mut e = k;
            while e < words.len() && single(&words[e]) {
                e += 1;
            }
            if e - k >= 4 {
                // Each word of the run but the last is glued to the next.
                join[k..e - 1].iter_mut().for_each(|j| *j = true);
                any = true;
            }
            k = e.max(k + 1);
        }
        if !any {
            return;
        }
        let mut text = String::with_capacity(self.text.len());
        let mut origin = Vec::with_capacity(self.origin.len());
        text.push(' ');
        origin.push(self.origin.first().copied().unwrap_or(0));
        for (n, &(s, e)) in words.iter().enumerate() {
            text.push_str(&self.text[s..e]);
            origin.extend_from_slice(&self.origin[s..e]);
            if !join[n] {
                text.push(' ');
                origin.push(self.origin.get(e).copied().unwrap_or(u32::MAX));
            }
        }
        self.text = text;
        self.origin = origin;
    }

    fn push(&mut self, c: char, at: u32) {
        let before = self.text.len();
        self.text.push(c);
        for _ in before..self.text.len() {
            self.origin.push(at);
        }
    }
}

enum Mapped {
    One(char),
    Two(char, char),
}

fn is_invisible(c: char) -> bool {
    matches!(
        c,
        // Apostrophes join elisions ("n'avais", "don't") into one word.
        '\'' | '\u{2019}' | '\u{00AD}' | '\u{034F}' | '\u{180E}' | '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}'
            | '\u{2060}'..='\u{2064}' | '\u{FEFF}'
    )
}

/// A word character's normalised form; `None` for a separator.
fn map_char(c: char) -> Option<Mapped> {
    use Mapped::{One, Two};
    Some(match c {
        'a'..='z' => One(c),
        'A'..='Z' => One(c.to_ascii_lowercase()),
        // Leetspeak (cheap and only used for phrase matching).
        '0' => One('o'),
        '1' => One('i'),
        '3' => One('e'),
        '4' | '@' => One('a'),
        '5' | '$' => One('s'),
        '7' => One('t'),
        '2' | '6' | '8' | '9' => One(c),
        _ if c.is_ascii() => return None,
        'à' | 'á' | 'â' | 'ã' | 'ä' | 'å' | 'À' | 'Á' | 'Â' | 'Ã' | 'Ä' | 'Å' => {
            One('a')
        }
        'ç' | 'Ç' => One('c'),
        'è' | 'é' | 'ê' | 'ë' | 'È' | 'É' | 'Ê' | 'Ë' => One('e'),
        'ì' | 'í' | 'î' | 'ï' | 'Ì' | 'Í' | 'Î' | 'Ï' => One('i'),
        'ñ' | 'Ñ' => One('n'),
        'ò' | 'ó' | 'ô' | 'õ' | 'ö' | 'ø' | 'Ò' | 'Ó' | 'Ô' | 'Õ' | 'Ö' | 'Ø' => {
            One('o')
        }
        'ù' | 'ú' | 'û' | 'ü' | 'Ù' | 'Ú' | 'Û' | 'Ü' => One('u'),
        'ý' | 'ÿ' | 'Ý' => One('y'),
        'ß' => Two('s', 's'),
        'œ' | 'Œ' => Two('o', 'e'),
        'æ' | 'Æ' => Two('a', 'e'),
        // Cyrillic look-alikes used to dodge filters.
        'а' | 'А' => One('a'),
        'е' | 'Е' => One('e'),
        'о' | 'О' => One('o'),
        'р' | 'Р' => One('p'),
        'с' | 'С' => One('c'),
        'х' | 'Х' => One('x'),
        'і' | 'І' => One('i'),
        'у' => One('y'),
        _ if c.is_alphanumeric() => {
            let mut l = c.to_lowercase();
            One(l.next().unwrap_or(c))
        }
        _ => return None,
    })
}

/// Normalises a configured phrase the same way, as " phrase " (empty when it has no word).
pub(crate) fn phrase(s: &str) -> String {
    let mut n = Normalized::default();
    n.fill(s);
    n.text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folds_and_maps_back() {
        let src = "Ign\u{200B}0re  ALL, précédentes!";
        let mut n = Normalized::default();
        n.fill(src);
        assert_eq!(n.text, " ignore all precedentes ");
        assert_eq!(n.origin.len(), n.text.len());
        let i = n.text.find("precedentes").unwrap_or(0);
        assert_eq!(&src[n.origin[i] as usize..], "précédentes!");
        assert_eq!(phrase("Don't"), " dont ");
        n.fill("so i g n o r e it, a b c");
        assert_eq!(n.text, " so ignore it a b c ");
        assert_eq!(n.origin.len(), n.text.len());
    }
}
