//! Quota windows in UTC, in milliseconds since the Unix epoch.
//!
//! - default type: windows aligned to the top of the unit (`interval` units long, counted
//!   from the epoch): seconds, minutes, hours, days at midnight UTC, weeks on Sunday 00:00
//!   UTC (as Apigee resets them), months on the 1st at 00:00 UTC;
//! - calendar type: windows `interval` units long starting at `startTime`;
//! - flexi windows only need a length, measured from the first request ([`span_from`]), so a
//!   month is as long as the calendar says from then;
//! - rolling windows need a length that does not move with the clock, since their slots
//!   are sized from it ([`rolling_len`]): a month there is 30 days.

use chrono::{DateTime, Datelike, Months, NaiveDate, TimeZone, Utc};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    Second,
    Minute,
    Hour,
    Day,
    Week,
    Month,
}

const SEC: i64 = 1000;
const MIN: i64 = 60 * SEC;
const HOUR: i64 = 60 * MIN;
const DAY: i64 = 24 * HOUR;
const WEEK: i64 = 7 * DAY;
/// 1970-01-04, the first Sunday after the epoch.
const FIRST_SUNDAY: i64 = 3 * DAY;

impl Unit {
    /// Parses a time unit as Apigee and API products write it (any case, singular or plural).
    pub fn parse(s: &str) -> Option<Unit> {
        let s = s.trim().to_ascii_lowercase();
        let s = s.strip_suffix('s').unwrap_or(&s);
        Some(match s {
            "second" | "sec" => Unit::Second,
            "minute" | "min" => Unit::Minute,
            "hour" => Unit::Hour,
            "day" => Unit::Day,
            "week" => Unit::Week,
            "month" => Unit::Month,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Unit::Second => "second",
            Unit::Minute => "minute",
            Unit::Hour => "hour",
            Unit::Day => "day",
            Unit::Week => "week",
            Unit::Month => "month",
        }
    }

    /// Fixed length in ms; `None` for months.
    fn fixed_ms(self) -> Option<i64> {
        match self {
            Unit::Second => Some(SEC),
            Unit::Minute => Some(MIN),
            Unit::Hour => Some(HOUR),
            Unit::Day => Some(DAY),
            Unit::Week => Some(WEEK),
            Unit::Month => None,
        }
    }
}

fn utc(ms: i64) -> DateTime<Utc> {
    Utc.timestamp_millis_opt(ms)
        .single()
        .unwrap_or(DateTime::<Utc>::UNIX_EPOCH)
}

/// Months since January 1970 of a time.
fn month_index(t: DateTime<Utc>) -> i64 {
    (i64::from(t.year()) - 1970) * 12 + i64::from(t.month0())
}

/// Midnight UTC on the 1st of month `index` (months since January 1970).
fn month_start(index: i64) -> i64 {
    let year = 1970 + index.div_euclid(12);
    let month = index.rem_euclid(12) + 1;
    i32::try_from(year)
        .ok()
        .and_then(|y| NaiveDate::from_ymd_opt(y, u32::try_from(month).ok()?, 1))
        .and_then(|d| d.and_hms_opt(0, 0, 0))
        .map_or(i64::MAX, |d| d.and_utc().timestamp_millis())
}

/// `t` plus `n` months (negative allowed); the day is clamped to the month's length.
fn add_months(t: DateTime<Utc>, n: i64) -> Option<DateTime<Utc>> {
    let m = Months::new(u32::try_from(n.unsigned_abs()).ok()?);
    if n >= 0 {
        t.checked_add_months(m)
    } else {
        t.checked_sub_months(m)
    }
}

/// The default-type window holding `now`: `[start, end)`.
pub fn aligned(now: i64, interval: u32, unit: Unit) -> (i64, i64) {
    let interval = i64::from(interval.max(1));
    match unit.fixed_ms() {
        Some(len) => {
            let len = len.saturating_mul(interval);
            let origin = if unit == Unit::Week { FIRST_SUNDAY } else { 0 };
            let start = origin + (now - origin).div_euclid(len) * len;
            (start, start.saturating_add(len))
        }
        None => {
            let k = month_index(utc(now)).div_euclid(interval) * interval;
            (month_start(k), month_start(k + interval))
        }
    }
}

/// The calendar-type window holding `now`, for windows starting at `start`.
pub fn calendar(now: i64, start: i64, interval: u32, unit: Unit) -> (i64, i64) {
    let interval = i64::from(interval.max(1));
    match unit.fixed_ms() {
        Some(len) => {
            let len = len.saturating_mul(interval);
            let s = start + (now - start).div_euclid(len) * len;
            (s, s.saturating_add(len))
        }
        None => {
            let s = utc(start);
            let n = utc(now);
            let at =
                |k: i64| add_months(s, k * interval).map_or(i64::MAX, |t| t.timestamp_millis());
            let mut k = (month_index(n) - month_index(s)).div_euclid(interval);
            // The month difference can be one off around the day and time of `start`.
            while k > i64::MIN / 2 && at(k) > now {
                k -= 1;
            }
            while at(k + 1) <= now {
                k += 1;
            }
            (at(k), at(k + 1))
        }
    }
}

/// How long `interval` units last from `now` (months by the calendar).
pub fn span_from(now: i64, interval: u32, unit: Unit) -> i64 {
    let interval = i64::from(interval.max(1));
    match unit.fixed_ms() {
        Some(len) => len.saturating_mul(interval),
        None => add_months(utc(now), interval).map_or(i64::MAX / 2, |t| t.timestamp_millis() - now),
    }
}

/// How far a rolling window looks back: fixed units as they are, months as 30 days (a
/// length measured from now would change with the month and reset the slots sized from it).
pub fn rolling_len(interval: u32, unit: Unit) -> i64 {
    let interval = i64::from(interval.max(1));
    unit.fixed_ms().unwrap_or(30 * DAY).saturating_mul(interval)
}

/// Parses a calendar start time: RFC 3339 (`2026-01-01T00:00:00Z`) or Apigee's
/// `2026-01-01 00:00:00` (UTC).
pub fn parse_start(s: &str) -> Option<i64> {
    if let Ok(t) = DateTime::parse_from_rfc3339(s.trim()) {
        return Some(t.timestamp_millis());
    }
    chrono::NaiveDateTime::parse_from_str(s.trim(), "%Y-%m-%d %H:%M:%S")
        .ok()
        .map(|t| t.and_utc().timestamp_millis())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(s: &str) -> i64 {
        parse_start(s).unwrap()
    }

    #[test]
    fn units_parse() {
        assert_eq!(Unit::parse("Minute"), Some(Unit::Minute));
        assert_eq!(Unit::parse("days"), Some(Unit::Day));
        assert_eq!(Unit::parse("fortnight"), None);
        assert_eq!(Unit::parse(""), None);
    }

    #[test]
    fn default_windows_align_to_the_top_of_the_unit() {
        let now = ms("2024-03-15T10:42:17.250Z");
        assert_eq!(
            aligned(now, 1, Unit::Second),
            (ms("2024-03-15T10:42:17Z"), ms("2024-03-15T10:42:18Z"))
        );
        assert_eq!(
            aligned(now, 1, Unit::Minute),
            (ms("2024-03-15T10:42:00Z"), ms("2024-03-15T10:43:00Z"))
        );
        assert_eq!(
            aligned(now, 1, Unit::Hour),
            (ms("2024-03-15T10:00:00Z"), ms("2024-03-15T11:00:00Z"))
        );
        assert_eq!(
            aligned(now, 1, Unit::Day),
            (ms("2024-03-15T00:00:00Z"), ms("2024-03-16T00:00:00Z"))
        );
        // 2024-03-15 is a Friday: the week began on Sunday the 10th, midnight UTC.
        assert_eq!(
            aligned(now, 1, Unit::Week),
            (ms("2024-03-10T00:00:00Z"), ms("2024-03-17T00:00:00Z"))
        );
        assert_eq!(
            aligned(now, 1, Unit::Month),
            (ms("2024-03-01T00:00:00Z"), ms("2024-04-01T00:00:00Z"))
        );
        // Multiples: 5-minute windows from the epoch.
        assert_eq!(
            aligned(now, 5, Unit::Minute),
            (ms("2024-03-15T10:40:00Z"), ms("2024-03-15T10:45:00Z"))
        );
    }

    #[test]
    fn default_window_edges() {
        // The last millisecond of a window and the first of the next.
        let end = ms("2024-03-15T11:00:00Z");
        assert_eq!(aligned(end - 1, 1, Unit::Hour).1, end);
        assert_eq!(aligned(end, 1, Unit::Hour).0, end);
        // A week edge: Saturday 23:59:59.999 vs Sunday 00:00.
        let sunday = ms("2024-03-17T00:00:00Z");
        assert_eq!(aligned(sunday - 1, 1, Unit::Week).1, sunday);
        assert_eq!(aligned(sunday, 1, Unit::Week).0, sunday);
        // Leap year February has 29 days, 2023's has 28.
        let feb = aligned(ms("2024-02-29T23:59:59.999Z"), 1, Unit::Month);
        assert_eq!(
            feb,
            (ms("2024-02-01T00:00:00Z"), ms("2024-03-01T00:00:00Z"))
        );
        assert_eq!(feb.1 - feb.0, 29 * DAY);
        let feb = aligned(ms("2023-02-28T12:00:00Z"), 1, Unit::Month);
        assert_eq!(feb.1 - feb.0, 28 * DAY);
        // Month windows across a year end, and quarters (3 months from January 1970).
        assert_eq!(
            aligned(ms("2023-12-31T23:59:59.999Z"), 1, Unit::Month).1,
            ms("2024-01-01T00:00:00Z")
        );
        assert_eq!(
            aligned(ms("2024-05-20T00:00:00Z"), 3, Unit::Month),
            (ms("2024-04-01T00:00:00Z"), ms("2024-07-01T00:00:00Z"))
        );
        // Day windows at midnight UTC whatever the local zone.
        assert_eq!(
            aligned(ms("2024-12-31T23:59:59.999Z"), 1, Unit::Day).1,
            ms("2025-01-01T00:00:00Z")
        );
        // Before the epoch still floors.
        assert_eq!(aligned(-1, 1, Unit::Second), (-1000, 0));
    }

    #[test]
    fn calendar_windows_start_at_the_start_time() {
        let start = ms("2024-01-31T08:30:00Z");
        // Hourly from 08:30.
        assert_eq!(
            calendar(ms("2024-02-02T10:29:59Z"), start, 1, Unit::Hour),
            (ms("2024-02-02T09:30:00Z"), ms("2024-02-02T10:30:00Z"))
        );
        // Before the start time: the window that ends at it.
        assert_eq!(
            calendar(ms("2024-01-31T08:00:00Z"), start, 1, Unit::Hour),
            (ms("2024-01-31T07:30:00Z"), start)
        );
        // Monthly from the 31st: clamped to the end of shorter months (leap February).
        assert_eq!(
            calendar(ms("2024-02-15T00:00:00Z"), start, 1, Unit::Month),
            (start, ms("2024-02-29T08:30:00Z"))
        );
        assert_eq!(
            calendar(ms("2024-02-29T08:30:00Z"), start, 1, Unit::Month),
            (ms("2024-02-29T08:30:00Z"), ms("2024-03-31T08:30:00Z"))
        );
        // Edge: one millisecond before the next window.
        let (s, e) = calendar(ms("2024-03-31T08:29:59.999Z"), start, 1, Unit::Month);
        assert_eq!(
            (s, e),
            (ms("2024-02-29T08:30:00Z"), ms("2024-03-31T08:30:00Z"))
        );
        // Weekly from a Wednesday noon.
        let wed = ms("2024-03-13T12:00:00Z");
        assert_eq!(
            calendar(ms("2024-03-20T11:59:59Z"), wed, 1, Unit::Week),
            (wed, ms("2024-03-20T12:00:00Z"))
        );
    }

    #[test]
    fn spans() {
        assert_eq!(span_from(0, 2, Unit::Minute), 2 * MIN);
        assert_eq!(
            span_from(ms("2024-02-10T00:00:00Z"), 1, Unit::Month),
            29 * DAY
        );
        assert_eq!(
            span_from(ms("2023-02-10T00:00:00Z"), 1, Unit::Month),
            28 * DAY
        );
        assert_eq!(
            span_from(ms("2024-01-31T00:00:00Z"), 1, Unit::Month),
            29 * DAY
        );
        assert_eq!(
            parse_start("2024-01-01 00:00:00"),
            parse_start("2024-01-01T00:00:00Z")
        );
        assert_eq!(parse_start("yesterday"), None);
    }
}
