//! Exact money: integer millionths of a currency unit ("micros"), parsed from and printed as
//! decimal text. No floats anywhere on the money path: `"0.1"` is exactly 100 000 micros.

/// Micros per currency unit.
pub const MICROS: i64 = 1_000_000;
/// The largest amount accepted anywhere (a trillion units, in micros; sums stay in i64).
pub const MAX_MICROS: i64 = 1_000_000_000_000 * MICROS;

/// Parses a decimal amount (`"12"`, `"-3.5"`, `"0.000001"`) into micros: at most 6
/// decimals, at most [`MAX_MICROS`] in size.
pub fn parse(text: &str) -> Result<i64, String> {
    let t = text.trim();
    let (neg, digits) = match t.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, t.strip_prefix('+').unwrap_or(t)),
    };
    let (int, frac) = digits.split_once('.').unwrap_or((digits, ""));
    let bad = || format!("`{text}` is not a decimal amount with at most 6 decimals");
    if int.is_empty() && frac.is_empty()
        || !int.bytes().all(|b| b.is_ascii_digit())
        || !frac.bytes().all(|b| b.is_ascii_digit())
        || frac.len() > 6
        || int.len() > 13
    {
        return Err(bad());
    }
    let whole: i64 = if int.is_empty() {
        0
    } else {
        int.parse().map_err(|_| bad())?
    };
    let mut f: i64 = if frac.is_empty() {
        0
    } else {
        frac.parse().map_err(|_| bad())?
    };
    for _ in frac.len()..6 {
        f *= 10;
    }
    let v = whole
        .checked_mul(MICROS)
        .and_then(|w| w.checked_add(f))
        .filter(|v| *v <= MAX_MICROS)
        .ok_or_else(|| format!("`{text}` is too large"))?;
    Ok(if neg { -v } else { v })
}

/// Parses a YAML/JSON amount given as a string or a number (a number's own decimal text is
/// read, never converted through a float).
pub fn parse_value(v: &serde_json::Value) -> Result<i64, String> {
    match v {
        serde_json::Value::String(s) => parse(s),
        serde_json::Value::Number(n) => parse(&n.to_string()),
        other => Err(format!("`{other}` is not an amount")),
    }
}

/// Prints micros as a decimal with 6 places, sign first (`-1.500000`).
pub fn format(micros: i64) -> String {
    let sign = if micros < 0 { "-" } else { "" };
    let a = micros.unsigned_abs();
    let m = MICROS.unsigned_abs();
    format!("{sign}{}.{:06}", a / m, a % m)
}

/// `a × b / d`, rounded up, for non-negative operands (a price of a token count).
pub fn mul_div_ceil(a: u64, b: i64, d: i64) -> i64 {
    if b <= 0 || a == 0 || d <= 0 {
        return 0;
    }
    let n = i128::from(a) * i128::from(b);
    let d = i128::from(d);
    let q = (n + d - 1) / d;
    i64::try_from(q).unwrap_or(i64::MAX)
}

/// Serde helper: an amount field as a decimal string.
pub mod serde_amount {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &i64, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::format(*v))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
        let v = serde_json::Value::deserialize(d)?;
        super::parse_value(&v).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_exactly() {
        assert_eq!(parse("0.1").unwrap(), 100_000);
        assert_eq!(parse("12").unwrap(), 12_000_000);
        assert_eq!(parse("-3.5").unwrap(), -3_500_000);
        assert_eq!(parse(".000001").unwrap(), 1);
        assert_eq!(parse("1.").unwrap(), 1_000_000);
        for bad in [
            "",
            ".",
            "1.0000001",
            "abc",
            "1e3",
            "--1",
            "1,5",
            "99999999999999",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
        assert_eq!(
            parse_value(&serde_json::json!(0.3)).unwrap(),
            300_000,
            "a number is read from its text, not through a float sum"
        );
    }

    #[test]
    fn formats_and_rounds_up() {
        assert_eq!(format(-1_500_000), "-1.500000");
        assert_eq!(format(7), "0.000007");
        // 3 tokens at 0.5 per million: 1.5 micros, charged 2.
        assert_eq!(mul_div_ceil(3, 500_000, 1_000_000), 2);
        assert_eq!(mul_div_ceil(0, 5, 1), 0);
    }
}
