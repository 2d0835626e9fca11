//! Validators run on candidates only. Each returns the (possibly narrowed) range and a
//! confidence, or `None` to drop the candidate. All work on ASCII ranges found by the
//! built-in patterns, so byte indexing is on character boundaries; still, every access is
//! checked so no input can panic.

use base64::Engine;

use super::patterns::Check;
use super::Confidence;

pub(crate) type Checked = Option<(usize, usize, Confidence)>;

pub(crate) fn check(
    check: Check,
    text: &str,
    start: usize,
    end: usize,
    base: Confidence,
) -> Checked {
    let bytes = text.as_bytes();
    let s = bytes.get(start..end)?;
    match check {
        Check::None => Some((start, end, base)),
        Check::Assignment => assignment(s, start, base),
        Check::Mixed => mixed(s).then_some((start, end, base)),
        Check::Luhn => card(s).map(|c| (start, end, c)),
        Check::Iban => iban(s).map(|len| (start, start + len, base)),
        Check::Ssn => ssn(s).then_some((start, end, base)),
        Check::SsnLabelled => {
            let d = s.len().checked_sub(9)?;
            ssn(&s[d..]).then_some((start + d, end, base))
        }
        Check::Phone {
            min_digits,
            max_digits,
        } => phone(bytes, start, end, min_digits, max_digits, base),
        Check::Ipv4 => ipv4(bytes, start, end, s).then_some((start, end, base)),
        Check::Ipv6 => ipv6(bytes, start, end, s).then_some((start, end, base)),
        Check::Email => email(bytes, end, s).map(|c| (start, end, c.min(base))),
        Check::Jwt => jwt(s).then_some((start, end, base)),
        Check::Entropy => token(s).then_some((start, end, base)),
    }
}

/// `name: value`: the finding is the value (the name stays readable after redaction).
/// A value that is a plain word ("password: required") is not a secret.
fn assignment(s: &[u8], start: usize, base: Confidence) -> Checked {
    // A closing quote ends some patterns (`"private_key_id": "…"`): not part of the value.
    let s = s.strip_suffix(b"\"").unwrap_or(s);
    // The value is the trailing run of non-separator bytes.
    let is_sep = |b: u8| matches!(b, b':' | b'=' | b'"' | b'\'' | b' ' | b'\t' | b'\r' | b'\n');
    let vstart = s.iter().rposition(|&b| is_sep(b)).map_or(0, |i| i + 1);
    let value = &s[vstart..];
    if value.len() < 6 {
        return None;
    }
    let digit = value.iter().any(u8::is_ascii_digit);
    let alpha = value.iter().any(u8::is_ascii_alphabetic);
    let other = value.iter().any(|b| !b.is_ascii_alphanumeric());
    let upper = value.iter().any(u8::is_ascii_uppercase);
    let lower = value.iter().any(u8::is_ascii_lowercase);
    if !(digit || other || (upper && lower)) || !(alpha || digit) {
        return None;
    }
    Some((start + vstart, start + s.len(), base))
}

fn mixed(s: &[u8]) -> bool {
    s.iter().any(u8::is_ascii_digit)
        && s.iter().any(u8::is_ascii_uppercase)
        && s.iter().any(u8::is_ascii_lowercase)
}

fn digits(s: &[u8]) -> impl Iterator<Item = u8> + '_ {
    s.iter().filter(|b| b.is_ascii_digit()).map(|b| b - b'0')
}

pub(crate) fn luhn(d: &[u8]) -> bool {
    let mut sum = 0u32;
    for (i, &x) in d.iter().rev().enumerate() {
        let mut v = u32::from(x);
        if i % 2 == 1 {
            v *= 2;
            if v > 9 {
                v -= 9;
            }
        }
        sum += v;
    }
    sum.is_multiple_of(10)
}

/// Luhn, then the issuer prefix and length: a known brand is high confidence; an unknown
/// prefix is only reported for the common 16-digit shape, low.
fn card(s: &[u8]) -> Option<Confidence> {
    let d: Vec<u8> = digits(s).collect();
    if !(13..=19).contains(&d.len()) || !luhn(&d) || d.iter().all(|&x| x == d[0]) {
        return None;
    }
    // Mixed separators ("1234-5678 9012") are not how cards are written.
    if s.contains(&b' ') && s.contains(&b'-') {
        return None;
    }
    let n = |k: usize| d.iter().take(k).fold(0u32, |a, &x| a * 10 + u32::from(x));
    let len = d.len();
    let brand = match d[0] {
        4 => matches!(len, 13 | 16 | 19),
        5 => (51..=55).contains(&n(2)) && len == 16,
        2 => (2221..=2720).contains(&n(4)) && len == 16,
        3 => {
            (matches!(n(2), 34 | 37) && len == 15)
                || (n(2) == 35 && (16..=19).contains(&len))
                || (matches!(n(2), 36 | 38 | 39) && (14..=19).contains(&len))
                || ((300..=305).contains(&n(3)) && (14..=19).contains(&len))
        }
        6 => {
            (n(4) == 6011 || n(2) == 65 || (644..=649).contains(&n(3)) || n(2) == 62)
                && (16..=19).contains(&len)
        }
        _ => false,
    };
    if brand {
        Some(Confidence::High)
    } else if len == 16 {
        Some(Confidence::Low)
    } else {
        None
    }
}

/// IBAN length per country (the SWIFT registry's lengths for the countries most seen).
fn iban_len(cc: &[u8]) -> Option<usize> {
    Some(match cc {
        b"AD" => 24,
        b"AE" => 23,
        b"AL" => 28,
        b"AT" => 20,
        b"AZ" => 28,
        b"BA" => 20,
        b"BE" => 16,
        b"BG" => 22,
        b"BH" => 22,
        b"BR" => 29,
        b"CH" => 21,
        b"CR" => 22,
        b"CY" => 28,
        b"CZ" => 24,
        b"DE" => 22,
        b"DK" => 18,
        b"DO" => 28,
        b"EE" => 20,
        b"EG" => 29,
        b"ES" => 24,
        b"FI" => 18,
        b"FO" => 18,
        b"FR" => 27,
        b"GB" => 22,
        b"GE" => 22,
        b"GI" => 23,
        b"GL" => 18,
        b"GR" => 27,
        b"GT" => 28,
        b"HR" => 21,
        b"HU" => 28,
        b"IE" => 22,
        b"IL" => 23,
        b"IS" => 26,
        b"IT" => 27,
        b"JO" => 30,
        b"KW" => 30,
        b"KZ" => 20,
        b"LB" => 28,
        b"LI" => 21,
        b"LT" => 20,
        b"LU" => 20,
        b"LV" => 21,
        b"MC" => 27,
        b"MD" => 24,
        b"ME" => 22,
        b"MK" => 19,
        b"MR" => 27,
        b"MT" => 31,
        b"MU" => 30,
        b"NL" => 18,
        b"NO" => 15,
        b"PK" => 24,
        b"PL" => 28,
        b"PS" => 29,
        b"PT" => 25,
        b"QA" => 29,
        b"RO" => 24,
        b"RS" => 22,
        b"SA" => 24,
        b"SE" => 24,
        b"SI" => 19,
        b"SK" => 24,
        b"SM" => 27,
        b"TN" => 24,
        b"TR" => 26,
        b"UA" => 29,
        b"VA" => 22,
        b"VG" => 24,
        b"XK" => 20,
        _ => return None,
    })
}

/// Returns the byte length of the IBAN at the start of `s` (the pattern may have run on
/// into a following word), after the country's length and the mod-97 check.
fn iban(s: &[u8]) -> Option<usize> {
    let want = iban_len(s.get(..2)?)?;
    let mut chars = Vec::with_capacity(want);
    let mut used = 0;
    for (i, &b) in s.iter().enumerate() {
        if b == b' ' {
            continue;
        }
        chars.push(b);
        if chars.len() == want {
            used = i + 1;
            break;
        }
    }
    if chars.len() != want {
        return None;
    }
    // The IBAN must end at a word end, not in the middle of a longer group.
    if s.get(used).is_some_and(|b| b.is_ascii_alphanumeric()) {
        return None;
    }
    let mut rem: u32 = 0;
    for &b in chars[4..].iter().chain(&chars[..4]) {
        let v = match b {
            b'0'..=b'9' => u32::from(b - b'0'),
            b'A'..=b'Z' => u32::from(b - b'A') + 10,
            _ => return None,
        };
        rem = if v >= 10 {
            (rem * 100 + v) % 97
        } else {
            (rem * 10 + v) % 97
        };
    }
    (rem == 1).then_some(used)
}

/// Area 001-899 except 666, group 01-99, serial 0001-9999, and not the well-known
/// advertising numbers.
fn ssn(s: &[u8]) -> bool {
    let d: Vec<u8> = digits(s).collect();
    if d.len() != 9 {
        return false;
    }
    let n = |r: std::ops::Range<usize>| d[r].iter().fold(0u32, |a, &x| a * 10 + u32::from(x));
    let (area, group, serial) = (n(0..3), n(3..5), n(5..9));
    let invalid = area == 0 || area == 666 || area >= 900 || group == 0 || serial == 0;
    let advertised = matches!(
        (area, group, serial),
        (78, 5, 1120) | (219, 9, 9999) | (123, 45, 6789)
    );
    !invalid && !advertised
}

fn phone(bytes: &[u8], start: usize, end: usize, min: u8, max: u8, base: Confidence) -> Checked {
    // Trim what the loose pattern may leave at the end (an unmatched parenthesis).
    let mut end = end;
    while end > start && !bytes.get(end - 1)?.is_ascii_digit() {
        end -= 1;
    }
    let s = bytes.get(start..end)?;
    let n = digits(s).count();
    if n < usize::from(min) || n > usize::from(max) {
        return None;
    }
    // Glued to a word or a longer number: part of something else (an id, a version).
    let before = start.checked_sub(1).and_then(|i| bytes.get(i)).copied();
    let after = bytes.get(end).copied();
    if before.is_some_and(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/')
        || after.is_some_and(|b| b.is_ascii_alphanumeric())
    {
        return None;
    }
    if after == Some(b'.') && bytes.get(end + 1).is_some_and(u8::is_ascii_digit) {
        return None;
    }
    // Separators must be of one kind besides spaces and parentheses ("06.12-34" is not a
    // number anyone writes); dates such as 2024-05-17 never reach here (too few digits).
    let seps: Vec<u8> = s
        .iter()
        .copied()
        .filter(|b| matches!(b, b'.' | b'-' | b'/'))
        .collect();
    if seps.windows(2).any(|w| w[0] != w[1]) {
        return None;
    }
    Some((start, end, base))
}

/// Context that makes a dotted quad part of something longer (a version `1.2.3.4.5`).
fn ipv4(bytes: &[u8], start: usize, end: usize, s: &[u8]) -> bool {
    let before = start.checked_sub(1).and_then(|i| bytes.get(i)).copied();
    let after = bytes.get(end).copied();
    if before == Some(b'.')
        || after == Some(b'.') && bytes.get(end + 1).is_some_and(u8::is_ascii_digit)
    {
        return false;
    }
    std::str::from_utf8(s)
        .ok()
        .and_then(|t| t.parse::<std::net::Ipv4Addr>().ok())
        .is_some()
}

fn ipv6(bytes: &[u8], start: usize, end: usize, s: &[u8]) -> bool {
    let before = start.checked_sub(1).and_then(|i| bytes.get(i)).copied();
    let after = bytes.get(end).copied();
    if before.is_some_and(|b| b.is_ascii_alphanumeric() || b == b':' || b == b'_')
        || after.is_some_and(|b| b.is_ascii_alphanumeric() || b == b'_')
    {
        return false;
    }
    // `::1`, `a::b` and `std::x`-like shapes are too common in code: at least two groups,
    // and three of them or one of 3+ digits (`fe80::1`, `2001:db8::1`).
    let groups: Vec<&[u8]> = s.split(|&b| b == b':').filter(|g| !g.is_empty()).collect();
    if groups.len() < 2 || (groups.len() < 3 && groups.iter().all(|g| g.len() < 3)) {
        return false;
    }
    std::str::from_utf8(s)
        .ok()
        .and_then(|t| t.parse::<std::net::Ipv6Addr>().ok())
        .is_some()
}

fn email(bytes: &[u8], end: usize, s: &[u8]) -> Option<Confidence> {
    // `git@github.com:org/repo.git`: SSH syntax, not an address.
    if bytes.get(end) == Some(&b':') && bytes.get(end + 1).is_some_and(|b| !b.is_ascii_whitespace())
    {
        return None;
    }
    let at = s.iter().position(|&b| b == b'@')?;
    let (local, domain) = (&s[..at], &s[at + 1..]);
    if local.first() == Some(&b'.')
        || local.last() == Some(&b'.')
        || local.windows(2).any(|w| w == b"..")
    {
        return None;
    }
    let tld = domain.rsplit(|&b| b == b'.').next()?;
    // Asset names such as `icon@2x.png` look like addresses.
    const FILES: &[&[u8]] = &[
        b"png", b"jpg", b"jpeg", b"gif", b"svg", b"webp", b"ico", b"bmp", b"pdf", b"js", b"css",
    ];
    if FILES.iter().any(|f| tld.eq_ignore_ascii_case(f)) {
        return None;
    }
    Some(Confidence::High)
}

/// Three dot-separated base64url parts; the first decodes to a JSON object naming `alg`.
fn jwt(s: &[u8]) -> bool {
    let Some(head) = s.split(|&b| b == b'.').next() else {
        return false;
    };
    let Ok(json) = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(head) else {
        return false;
    };
    match serde_json::from_slice::<serde_json::Value>(&json) {
        Ok(serde_json::Value::Object(m)) => m.get("alg").is_some_and(|a| a.is_string()),
        _ => false,
    }
}

/// Shannon entropy in bits per byte.
pub(crate) fn entropy(s: &[u8]) -> f64 {
    if s.is_empty() {
        return 0.0;
    }
    let mut counts = [0u32; 256];
    for &b in s {
        counts[usize::from(b)] += 1;
    }
    let n = s.len() as f64;
    counts
        .iter()
        .filter(|&&c| c > 0)
        .map(|&c| {
            let p = f64::from(c) / n;
            -p * p.log2()
        })
        .sum()
}

/// A generic token: random-looking, not an identifier, not a hex digest or UUID (those are
/// everywhere in technical prose and are not secrets by themselves).
fn token(s: &[u8]) -> bool {
    let count = |f: fn(&u8) -> bool| s.iter().filter(|b| f(b)).count();
    let (upper, lower, digit) = (
        count(u8::is_ascii_uppercase),
        count(u8::is_ascii_lowercase),
        count(u8::is_ascii_digit),
    );
    if s.iter().all(|b| b.is_ascii_hexdigit() || *b == b'-') {
        return false;
    }
    if upper < 2 || lower < 2 || digit < 2 {
        return false;
    }
    // Words: a run of 7+ lower-case letters is rare in random base62 and common in
    // identifiers (`MyComponentProps2024`).
    let mut run = 0;
    for &b in s {
        if b.is_ascii_lowercase() {
            run += 1;
            if run >= 7 {
                return false;
            }
        } else {
            run = 0;
        }
    }
    // snake/kebab identifiers with several parts.
    if s.iter().filter(|&&b| b == b'_' || b == b'-').count() >= 3 {
        return false;
    }
    entropy(s) >= 3.5
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn luhn_cards() {
        assert_eq!(card(b"4111 1111 1111 1111"), Some(Confidence::High));
        assert_eq!(card(b"4111 1111 1111 1112"), None);
        assert_eq!(card(b"378282246310005"), Some(Confidence::High));
        assert_eq!(card(b"0000000000000000"), None);
    }

    #[test]
    fn ibans() {
        assert_eq!(iban(b"DE89 3704 0044 0532 0130 00"), Some(27));
        assert_eq!(iban(b"GB82WEST12345698765432"), Some(22));
        assert_eq!(iban(b"GB82WEST12345698765433"), None);
        assert_eq!(iban(b"ZZ82WEST12345698765432"), None);
        assert_eq!(iban(b"FR1420041010050500013M02606"), Some(27));
    }

    #[test]
    fn ssns() {
        assert!(ssn(b"536-22-1234"));
        assert!(!ssn(b"000-22-1234"));
        assert!(!ssn(b"666-22-1234"));
        assert!(!ssn(b"912-22-1234"));
        assert!(!ssn(b"536-00-1234"));
        assert!(!ssn(b"536-22-0000"));
    }

    #[test]
    fn tokens_and_entropy() {
        assert!(token(b"Zx9Qm2LpT7vR4kWb8NcY3hJd"));
        assert!(!token(b"9f86d081884c7d659a2feaa0c55ad015a3bf4f1b"));
        assert!(!token(b"MyComponentProperties2024V2"));
        assert!(entropy(b"aaaa") < 0.01);
    }

    #[test]
    fn jwt_header() {
        // {"alg":"HS256","typ":"JWT"}
        assert!(jwt(
            b"eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxIn0.abc"
        ));
        // {"typ":"JWT"} has no alg.
        assert!(!jwt(b"eyJ0eXAiOiJKV1QifQ.eyJzdWIiOiIxIn0.abc"));
    }
}
