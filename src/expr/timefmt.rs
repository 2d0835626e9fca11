//! Java `SimpleDateFormat` patterns (what Apigee's `timeFormat*` template functions take,
//! e.g. `yyyy-MM-dd'T'HH:mm:ss.SSS'Z'`), always in UTC. Parsed once; a letter Java does
//! not define, or one tollgate does not render (`w`, `W`, `F`), is an error at parse.

use chrono::{DateTime, Datelike, Timelike, Utc};

#[derive(Debug, Clone, PartialEq)]
enum Item {
    Lit(String),
    Field(char, usize),
}

/// A parsed pattern.
#[derive(Debug, Clone, PartialEq)]
pub struct TimeFormat {
    items: Vec<Item>,
}

const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];
const DAYS: [&str; 7] = [
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
    "Sunday",
];

/// Longest pattern accepted (a pattern comes from configuration or a variable).
const MAX_PATTERN: usize = 256;

impl TimeFormat {
    pub fn parse(pattern: &str) -> Result<Self, String> {
        if pattern.len() > MAX_PATTERN {
            return Err(format!("longer than {MAX_PATTERN} bytes"));
        }
        let mut items = Vec::new();
        let mut lit = String::new();
        let mut chars = pattern.chars().peekable();
        while let Some(c) = chars.next() {
            if c == '\'' {
                if chars.peek() == Some(&'\'') {
                    chars.next();
                    lit.push('\'');
                    continue;
                }
                let mut closed = false;
                while let Some(q) = chars.next() {
                    if q == '\'' {
                        if chars.peek() == Some(&'\'') {
                            chars.next();
                            lit.push('\'');
                            continue;
                        }
                        closed = true;
                        break;
                    }
                    lit.push(q);
                }
                if !closed {
                    return Err("unterminated quote".into());
                }
            } else if c.is_ascii_alphabetic() {
                if !"GyYMLdDEuaHkKhmsSzZX".contains(c) {
                    return Err(format!("pattern letter `{c}` is not supported"));
                }
                let mut n = 1;
                while chars.peek() == Some(&c) {
                    chars.next();
                    n += 1;
                }
                if !lit.is_empty() {
                    items.push(Item::Lit(std::mem::take(&mut lit)));
                }
                items.push(Item::Field(c, n));
            } else {
                lit.push(c);
            }
        }
        if !lit.is_empty() {
            items.push(Item::Lit(lit));
        }
        Ok(Self { items })
    }

    pub fn format(&self, at: &DateTime<Utc>) -> String {
        let mut out = String::new();
        let num = |out: &mut String, v: i64, width: usize| {
            let s = v.unsigned_abs().to_string();
            if v < 0 {
                out.push('-');
            }
            for _ in s.len()..width {
                out.push('0');
            }
            out.push_str(&s);
        };
        for item in &self.items {
            let (c, n) = match item {
                Item::Lit(s) => {
                    out.push_str(s);
                    continue;
                }
                Item::Field(c, n) => (*c, *n),
            };
            let hour = i64::from(at.hour());
            match c {
                'G' => out.push_str("AD"),
                'y' | 'Y' => {
                    let year = if c == 'y' {
                        i64::from(at.year())
                    } else {
                        i64::from(at.iso_week().year())
                    };
                    if n == 2 {
                        num(&mut out, year.rem_euclid(100), 2);
                    } else {
                        num(&mut out, year, n);
                    }
                }
                'M' | 'L' => {
                    let m = at.month0() as usize;
                    match n {
                        1 | 2 => num(&mut out, m as i64 + 1, n),
                        3 => out.push_str(&MONTHS[m][..3]),
                        _ => out.push_str(MONTHS[m]),
                    }
                }
                'd' => num(&mut out, i64::from(at.day()), n),
                'D' => num(&mut out, i64::from(at.ordinal()), n),
                'E' => {
                    let d = at.weekday().num_days_from_monday() as usize;
                    if n <= 3 {
                        out.push_str(&DAYS[d][..3]);
                    } else {
                        out.push_str(DAYS[d]);
                    }
                }
                'u' => num(&mut out, i64::from(at.weekday().number_from_monday()), n),
                'a' => out.push_str(if hour < 12 { "AM" } else { "PM" }),
                'H' => num(&mut out, hour, n),
                'k' => num(&mut out, if hour == 0 { 24 } else { hour }, n),
                'K' => num(&mut out, hour % 12, n),
                'h' => num(&mut out, if hour % 12 == 0 { 12 } else { hour % 12 }, n),
                'm' => num(&mut out, i64::from(at.minute()), n),
                's' => num(&mut out, i64::from(at.second()), n),
                'S' => num(&mut out, i64::from(at.timestamp_subsec_millis()), n),
                'z' => out.push_str(if n >= 4 {
                    "Coordinated Universal Time"
                } else {
                    "UTC"
                }),
                'Z' => out.push_str("+0000"),
                'X' => out.push('Z'),
                _ => {}
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn java_patterns_render_as_simple_date_format_would() {
        // 2024-03-05T07:08:09.045Z, a Tuesday.
        let at = DateTime::from_timestamp_millis(1_709_622_489_045).unwrap();
        let f = |p: &str| TimeFormat::parse(p).unwrap().format(&at);
        assert_eq!(
            f("yyyy-MM-dd'T'HH:mm:ss.SSS'Z'"),
            "2024-03-05T07:08:09.045Z"
        );
        assert_eq!(f("yyyyMMdd-HH:mm:ss:SSS"), "20240305-07:08:09:045");
        assert_eq!(f("yy/M/d h:m:s a"), "24/3/5 7:8:9 AM");
        assert_eq!(
            f("EEE, dd MMM yyyy HH:mm:ss z"),
            "Tue, 05 Mar 2024 07:08:09 UTC"
        );
        assert_eq!(f("EEEE MMMM D u"), "Tuesday March 65 2");
        assert_eq!(f("'o''clock' ''k K Z X G"), "o'clock '7 7 +0000 Z AD");
        assert_eq!(f("S"), "45");
        assert_eq!(f(""), "");
        for bad in ["'open", "yyyy-ww", "F", "qq"] {
            assert!(TimeFormat::parse(bad).is_err(), "{bad}");
        }
        assert!(TimeFormat::parse(&"y".repeat(300)).is_err());
    }
}
