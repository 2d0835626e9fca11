//! Pieces `SpikeArrest` and `Quota` share: settings given as a literal or a template, the
//! message weight, identifiers, and the client-facing answers.

use serde::Deserialize;

use crate::expr::Template;
use crate::fault::Fault;
use crate::policies::common::SpecError;
use crate::vars::Exchange;

/// Longest identifier kept in flow variables (the counter key is a hash of the whole one).
pub const MAX_IDENTIFIER_VAR: usize = 256;
/// Largest message weight accepted.
pub const MAX_WEIGHT: u64 = 1_000_000_000;

/// A number written literally or as a template (`"{request.header.x-weight}"`).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum NumberSpec {
    Number(i64),
    Text(String),
}

/// A compiled numeric setting.
#[derive(Debug, Clone)]
pub enum Setting {
    Fixed(u64),
    Template(Template),
}

impl Setting {
    /// Compiles `spec`; a literal must lie in `min..=max`.
    pub fn compile(field: &str, spec: &NumberSpec, min: u64, max: u64) -> Result<Self, SpecError> {
        let out_of_range = || SpecError::new(field, format!("must be between {min} and {max}"));
        match spec {
            NumberSpec::Number(n) => {
                let n = u64::try_from(*n).map_err(|_| out_of_range())?;
                if !(min..=max).contains(&n) {
                    return Err(out_of_range());
                }
                Ok(Setting::Fixed(n))
            }
            NumberSpec::Text(t) => {
                let tpl = Template::compile(t).map_err(|e| SpecError::new(field, e.to_string()))?;
                if tpl.is_static() {
                    let n: u64 = t.trim().parse().map_err(|_| {
                        SpecError::new(field, format!("`{t}` is neither a number nor a template"))
                    })?;
                    if !(min..=max).contains(&n) {
                        return Err(out_of_range());
                    }
                    return Ok(Setting::Fixed(n));
                }
                // `{firstnonnull(ref,'100')}`: the reference wins, the literal is used when
                // it does not resolve (Apigee's `countRef` + `count`); the literal is
                // checked now, as a literal setting is.
                if let Some(fallback) = tpl.literal_fallback() {
                    let n: u64 = fallback.trim().parse().map_err(|_| {
                        SpecError::new(
                            field,
                            format!("the fallback `{fallback}` in `{t}` is not a number"),
                        )
                    })?;
                    if !(min..=max).contains(&n) {
                        return Err(out_of_range());
                    }
                }
                Ok(Setting::Template(tpl))
            }
        }
    }

    /// The value for this exchange, or the text that did not parse (`None` when it lies
    /// outside `min..=max`).
    pub fn resolve(&self, ex: &Exchange, min: u64, max: u64) -> Result<u64, String> {
        match self {
            Setting::Fixed(n) => Ok(*n),
            Setting::Template(t) => {
                let text = t.render(ex);
                match text.trim().parse::<u64>() {
                    Ok(n) if (min..=max).contains(&n) => Ok(n),
                    _ => Err(text),
                }
            }
        }
    }
}

/// The message weight of this exchange, or the Apigee fault for a negative, non-numeric or
/// too small one. `min` is 1, except for a count-only quota, where 0 is a valid no-op count
/// (a response that used no tokens). Without a setting, or when its template renders empty
/// (the variable is not set), the weight is 1: as in Apigee, a reference that does not
/// resolve falls back.
pub fn weight(setting: Option<&Setting>, ex: &Exchange, min: u64) -> Result<u64, Fault> {
    let Some(s) = setting else { return Ok(1) };
    s.resolve(ex, min, MAX_WEIGHT).or_else(|text| {
        if text.trim().is_empty() {
            return Ok(1);
        }
        let shown: String = text.chars().take(64).collect();
        Err(Fault::new(
            500,
            "policies.ratelimit.InvalidMessageWeight",
            format!("Invalid message weight value `{shown}`: expected an integer between {min} and {MAX_WEIGHT}"),
        ))
    })
}

/// An identifier template, compiled.
pub fn identifier(field: &str, spec: Option<&str>) -> Result<Option<Template>, SpecError> {
    spec.map(|s| Template::compile(s).map_err(|e| SpecError::new(field, e.to_string())))
        .transpose()
}

/// The identifier as shown in variables and messages: bounded.
pub fn shown(identifier: &str) -> std::borrow::Cow<'_, str> {
    if identifier.len() <= MAX_IDENTIFIER_VAR {
        return std::borrow::Cow::Borrowed(identifier);
    }
    let mut end = MAX_IDENTIFIER_VAR;
    while !identifier.is_char_boundary(end) {
        end -= 1;
    }
    std::borrow::Cow::Owned(format!("{}…", &identifier[..end]))
}

/// Whole seconds until `at` (at least 1), for `Retry-After` and reset headers.
pub fn seconds_until(at: i64, now: i64) -> i64 {
    ((at - now + 999).div_euclid(1000)).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings() {
        let ex = Exchange::default();
        assert!(matches!(
            Setting::compile("w", &NumberSpec::Number(3), 1, 10).unwrap(),
            Setting::Fixed(3)
        ));
        assert!(matches!(
            Setting::compile("w", &NumberSpec::Text("7".into()), 1, 10).unwrap(),
            Setting::Fixed(7)
        ));
        assert_eq!(
            Setting::compile("w", &NumberSpec::Number(0), 1, 10)
                .unwrap_err()
                .field,
            "w"
        );
        assert!(Setting::compile("w", &NumberSpec::Number(-1), 1, 10).is_err());
        assert!(Setting::compile("w", &NumberSpec::Text("lots".into()), 1, 10).is_err());
        let t = Setting::compile("w", &NumberSpec::Text("{x}".into()), 1, 10).unwrap();
        assert_eq!(t.resolve(&ex, 1, 10), Err(String::new()));
    }

    /// Apigee's `countRef` + `count`: the reference wins; the literal, checked at load,
    /// answers when the reference does not resolve.
    #[test]
    fn a_reference_with_a_literal_fallback() {
        let spec = |t: &str| NumberSpec::Text(t.into());
        let s =
            Setting::compile("allow", &spec("{firstnonnull(product.limit,'5')}"), 1, 10).unwrap();
        let mut ex = Exchange::default();
        assert_eq!(s.resolve(&ex, 1, 10), Ok(5));
        ex.set_var("product.limit", "8");
        assert_eq!(s.resolve(&ex, 1, 10), Ok(8));
        ex.set_var("product.limit", "80");
        assert_eq!(s.resolve(&ex, 1, 10), Err("80".into()));
        for bad in [
            "{firstnonnull(product.limit,'50')}",
            "{firstnonnull(product.limit,'many')}",
        ] {
            let e = Setting::compile("allow", &spec(bad), 1, 10).unwrap_err();
            assert_eq!(e.field, "allow", "{bad}");
        }
    }

    #[test]
    fn weights_from_templates() {
        let mut ex = Exchange::default();
        let s = Setting::compile("w", &NumberSpec::Text("{w}".into()), 1, MAX_WEIGHT).unwrap();
        for bad in ["0", "-3", "x", "1.5", "99999999999999999999"] {
            ex.set_var("w", bad);
            let f = weight(Some(&s), &ex, 1).unwrap_err();
            assert_eq!(f.code, "policies.ratelimit.InvalidMessageWeight", "{bad}");
            assert_eq!(f.status, 500);
        }
        ex.set_var("w", "");
        assert_eq!(weight(Some(&s), &ex, 1).unwrap(), 1, "unset: the default");
        ex.set_var("w", " 4 ");
        assert_eq!(weight(Some(&s), &ex, 1).unwrap(), 4);
        assert_eq!(weight(None, &ex, 1).unwrap(), 1);
        // Count-only: 0 counts nothing; negative still fails.
        ex.set_var("w", "0");
        assert_eq!(weight(Some(&s), &ex, 0).unwrap(), 0);
        ex.set_var("w", "-1");
        assert!(weight(Some(&s), &ex, 0).is_err());
    }

    #[test]
    fn identifiers_are_bounded() {
        assert_eq!(shown("abc"), "abc");
        let long = "é".repeat(1000);
        assert!(shown(&long).len() <= MAX_IDENTIFIER_VAR + 3);
        assert_eq!(seconds_until(1001, 0), 2);
        assert_eq!(seconds_until(0, 5), 1);
    }
}
