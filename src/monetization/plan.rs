//! `RatePlan` documents: what a product costs. Parsed and checked at load; every amount is
//! exact (see [`super::money`]).
//!
//! ```yaml
//! apiVersion: tollgate.dev/v1alpha1
//! kind: RatePlan
//! metadata: {name: weather-gold}
//! spec:
//!   product: weather            # an ApiProduct of the same configuration
//!   displayName: Gold
//!   currency: USD
//!   setupFee: "10.00"           # charged once, when a subscription is made
//!   recurringFee: "5.00"        # charged for the first period when a subscription is made
//!   recurringPeriod: month      # day | week | month
//!   consumption:
//!     per: call                 # call | token
//!     price: "0.01"             # per call; per token: input: "3.00", output: "15.00" (per million)
//!   bands:                      # optional volume bands over the period's consumption
//!     - {upTo: 1000, price: "0.01"}
//!     - {price: "0.005"}        # the last band is open
//!   freeAllowance: 100          # units (calls or tokens) free in each calendar month
//!   startDate: "2026-01-01T00:00:00Z"
//!   endDate: "2027-01-01T00:00:00Z"
//! ```

use serde::{Deserialize, Serialize};

use super::money::{self, mul_div_ceil};

/// Tokens priced per million.
const PER_MILLION: i64 = 1_000_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Per {
    Call,
    Token,
}

/// One band's prices, in micros: per call, or per million input/output tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Rate {
    pub call: i64,
    pub input: i64,
    pub output: i64,
}

/// A band: its rate applies while the period's consumption before the call is below `up_to`
/// (`None`: no end).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Band {
    pub up_to: Option<u64>,
    pub rate: Rate,
}

/// A compiled rate plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RatePlan {
    pub name: String,
    pub product: String,
    pub display_name: String,
    pub description: String,
    pub currency: String,
    pub setup_fee: i64,
    pub recurring_fee: i64,
    pub recurring_period: String,
    pub per: Per,
    /// At least one; the last one is open.
    pub bands: Vec<Band>,
    pub free_allowance: u64,
    /// Milliseconds since the epoch.
    pub start_ms: Option<i64>,
    pub end_ms: Option<i64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ConsumptionSpec {
    per: Per,
    #[serde(default)]
    price: Option<serde_json::Value>,
    #[serde(default)]
    input: Option<serde_json::Value>,
    #[serde(default)]
    output: Option<serde_json::Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct BandSpec {
    #[serde(default)]
    up_to: Option<u64>,
    #[serde(default)]
    price: Option<serde_json::Value>,
    #[serde(default)]
    input: Option<serde_json::Value>,
    #[serde(default)]
    output: Option<serde_json::Value>,
}

/// The `spec` of a `RatePlan` document.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RatePlanSpec {
    product: String,
    #[serde(default)]
    display_name: Option<String>,
    #[serde(default)]
    description: String,
    currency: String,
    #[serde(default)]
    setup_fee: Option<serde_json::Value>,
    #[serde(default)]
    recurring_fee: Option<serde_json::Value>,
    #[serde(default)]
    recurring_period: Option<String>,
    consumption: ConsumptionSpec,
    #[serde(default)]
    bands: Vec<BandSpec>,
    #[serde(default)]
    free_allowance: u64,
    #[serde(default)]
    start_date: Option<String>,
    #[serde(default)]
    end_date: Option<String>,
}

fn amount(field: &str, v: Option<&serde_json::Value>) -> Result<i64, String> {
    let Some(v) = v else { return Ok(0) };
    let m = money::parse_value(v).map_err(|e| format!("field `spec.{field}`: {e}"))?;
    if m < 0 {
        return Err(format!("field `spec.{field}`: must not be negative"));
    }
    Ok(m)
}

fn rate(
    at: &str,
    per: Per,
    price: Option<&serde_json::Value>,
    input: Option<&serde_json::Value>,
    output: Option<&serde_json::Value>,
) -> Result<Rate, String> {
    match per {
        Per::Call => {
            if input.is_some() || output.is_some() {
                return Err(format!(
                    "field `spec.{at}`: a per-call plan has `price`, not `input`/`output`"
                ));
            }
            let Some(p) = price else {
                return Err(format!(
                    "field `spec.{at}.price`: required for a per-call plan"
                ));
            };
            Ok(Rate {
                call: amount(&format!("{at}.price"), Some(p))?,
                ..Rate::default()
            })
        }
        Per::Token => {
            if price.is_some() {
                return Err(format!(
                    "field `spec.{at}`: a per-token plan has `input` and `output` (per million tokens), not `price`"
                ));
            }
            let (Some(i), Some(o)) = (input, output) else {
                return Err(format!(
                    "field `spec.{at}`: a per-token plan needs `input` and `output` (per million tokens)"
                ));
            };
            Ok(Rate {
                call: 0,
                input: amount(&format!("{at}.input"), Some(i))?,
                output: amount(&format!("{at}.output"), Some(o))?,
            })
        }
    }
}

fn date(field: &str, v: Option<&str>) -> Result<Option<i64>, String> {
    v.map(|s| {
        chrono::DateTime::parse_from_rfc3339(s)
            .map(|t| t.timestamp_millis())
            .map_err(|e| format!("field `spec.{field}`: not an RFC 3339 time: {e}"))
    })
    .transpose()
}

impl RatePlan {
    /// Compiles a document's spec; the message names the field.
    pub fn compile(name: &str, s: RatePlanSpec) -> Result<Self, String> {
        let currency = s.currency.trim().to_ascii_uppercase();
        if currency.len() != 3 || !currency.bytes().all(|b| b.is_ascii_alphabetic()) {
            return Err("field `spec.currency`: a three-letter currency code such as USD".into());
        }
        let period = s.recurring_period.unwrap_or_else(|| "month".into());
        if !matches!(period.as_str(), "day" | "week" | "month") {
            return Err("field `spec.recurringPeriod`: one of day, week, month".into());
        }
        let c = &s.consumption;
        let base = if s.bands.is_empty() {
            Some(rate(
                "consumption",
                c.per,
                c.price.as_ref(),
                c.input.as_ref(),
                c.output.as_ref(),
            )?)
        } else {
            if c.price.is_some() || c.input.is_some() || c.output.is_some() {
                return Err(
                    "field `spec.consumption`: with `bands`, prices are given in the bands".into(),
                );
            }
            None
        };
        let mut bands = Vec::new();
        match base {
            Some(rate) => bands.push(Band { up_to: None, rate }),
            None => {
                let mut last = 0;
                for (i, b) in s.bands.iter().enumerate() {
                    let at = format!("bands[{i}]");
                    let is_last = i + 1 == s.bands.len();
                    match (b.up_to, is_last) {
                        (None, false) => {
                            return Err(format!(
                                "field `spec.{at}.upTo`: required on every band but the last"
                            ))
                        }
                        (Some(_), true) => {
                            return Err(format!(
                                "field `spec.{at}.upTo`: the last band is open (no upTo), so every call has a price"
                            ))
                        }
                        (Some(u), false) if u <= last => {
                            return Err(format!(
                                "field `spec.{at}.upTo`: bands must increase (after {last})"
                            ))
                        }
                        (Some(u), false) => last = u,
                        (None, true) => {}
                    }
                    bands.push(Band {
                        up_to: b.up_to,
                        rate: rate(
                            &at,
                            c.per,
                            b.price.as_ref(),
                            b.input.as_ref(),
                            b.output.as_ref(),
                        )?,
                    });
                }
            }
        }
        let start_ms = date("startDate", s.start_date.as_deref())?;
        let end_ms = date("endDate", s.end_date.as_deref())?;
        if let (Some(a), Some(b)) = (start_ms, end_ms) {
            if b <= a {
                return Err("field `spec.endDate`: must be after startDate".into());
            }
        }
        Ok(Self {
            name: name.to_owned(),
            product: s.product,
            display_name: s.display_name.unwrap_or_else(|| name.to_owned()),
            description: s.description,
            currency,
            setup_fee: amount("setupFee", s.setup_fee.as_ref())?,
            recurring_fee: amount("recurringFee", s.recurring_fee.as_ref())?,
            recurring_period: period,
            per: c.per,
            bands,
            free_allowance: s.free_allowance,
            start_ms,
            end_ms,
        })
    }

    /// Whether the plan can be subscribed to / charged at `now_ms`.
    pub fn is_open(&self, now_ms: i64) -> bool {
        self.start_ms.is_none_or(|s| now_ms >= s) && self.end_ms.is_none_or(|e| now_ms < e)
    }

    /// Whether pricing depends on the period's consumption so far (bands or an allowance).
    pub fn needs_period_count(&self) -> bool {
        self.free_allowance > 0 || self.bands.len() > 1
    }

    fn band(&self, used_before: u64) -> Rate {
        self.bands
            .iter()
            .find(|b| b.up_to.is_none_or(|u| used_before < u))
            .or(self.bands.last())
            .map(|b| b.rate)
            .unwrap_or_default()
    }

    /// The price of one call when `used_before` calls were made in the period.
    pub fn call_charge(&self, used_before: u64) -> i64 {
        if used_before < self.free_allowance {
            return 0;
        }
        self.band(used_before).call
    }

    /// The price of a call's tokens when `used_before` tokens were used in the period: the
    /// free allowance left covers input first, then output; the whole call is priced at the
    /// band the period was in when it started.
    pub fn token_charge(&self, used_before: u64, input: u64, output: u64) -> i64 {
        let mut free = self.free_allowance.saturating_sub(used_before);
        let free_in = free.min(input);
        free -= free_in;
        let free_out = free.min(output);
        let r = self.band(used_before);
        mul_div_ceil(input - free_in, r.input, PER_MILLION).saturating_add(mul_div_ceil(
            output - free_out,
            r.output,
            PER_MILLION,
        ))
    }

    /// The plan as the management API and the portal show it (amounts as decimal strings).
    pub fn view(&self) -> serde_json::Value {
        let ms = |v: Option<i64>| {
            v.and_then(chrono::DateTime::from_timestamp_millis)
                .map(|t| t.to_rfc3339())
        };
        let bands: Vec<serde_json::Value> = self
            .bands
            .iter()
            .map(|b| match self.per {
                Per::Call => {
                    serde_json::json!({"upTo": b.up_to, "price": money::format(b.rate.call)})
                }
                Per::Token => serde_json::json!({
                    "upTo": b.up_to,
                    "input": money::format(b.rate.input),
                    "output": money::format(b.rate.output),
                }),
            })
            .collect();
        serde_json::json!({
            "name": self.name,
            "product": self.product,
            "displayName": self.display_name,
            "description": self.description,
            "currency": self.currency,
            "setupFee": money::format(self.setup_fee),
            "recurringFee": money::format(self.recurring_fee),
            "recurringPeriod": self.recurring_period,
            "per": self.per,
            "bands": bands,
            "freeAllowance": self.free_allowance,
            "startDate": ms(self.start_ms),
            "endDate": ms(self.end_ms),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(yaml: &str) -> Result<RatePlan, String> {
        let v: serde_norway::Value = serde_norway::from_str(yaml).unwrap();
        let s: RatePlanSpec = serde_norway::from_value(v).map_err(|e| e.to_string())?;
        RatePlan::compile("p", s)
    }

    #[test]
    fn per_call_bands_and_allowance() {
        let p = plan(
            "product: w\ncurrency: usd\nconsumption: {per: call}\nfreeAllowance: 2\nbands:\n- {upTo: 4, price: '0.01'}\n- {price: 0.005}\n",
        )
        .unwrap();
        assert_eq!(p.currency, "USD");
        let charges: Vec<i64> = (0..6).map(|u| p.call_charge(u)).collect();
        assert_eq!(charges, [0, 0, 10_000, 10_000, 5_000, 5_000]);
        assert!(p.needs_period_count());
    }

    #[test]
    fn per_token_prices_input_and_output_apart() {
        let p = plan(
            "product: w\ncurrency: EUR\nconsumption: {per: token, input: '3', output: '15'}\nfreeAllowance: 100\n",
        )
        .unwrap();
        // 100 free tokens cover the input; 50 output tokens at 15 per million.
        assert_eq!(p.token_charge(0, 100, 50), 750);
        // Nothing free left: 1000 × 3 + 1000 × 15 micros.
        assert_eq!(p.token_charge(100, 1000, 1000), 18_000);
        // One token at 3 per million is 3 micros; rounding up only under a micro.
        assert_eq!(p.token_charge(100, 1, 0), 3);
    }

    #[test]
    fn bad_plans_are_refused_with_the_field() {
        for (yaml, field) in [
            ("product: w\ncurrency: dollars\nconsumption: {per: call, price: 1}\n", "spec.currency"),
            ("product: w\ncurrency: USD\nconsumption: {per: call}\n", "spec.consumption.price"),
            ("product: w\ncurrency: USD\nconsumption: {per: token, price: 1}\n", "spec.consumption"),
            ("product: w\ncurrency: USD\nconsumption: {per: call, price: '-1'}\n", "spec.consumption.price"),
            ("product: w\ncurrency: USD\nconsumption: {per: call}\nbands: [{upTo: 5, price: 1}]\n", "spec.bands[0].upTo"),
            ("product: w\ncurrency: USD\nconsumption: {per: call}\nbands: [{upTo: 5, price: 1}, {upTo: 3, price: 1}, {price: 1}]\n", "spec.bands[1].upTo"),
            ("product: w\ncurrency: USD\nconsumption: {per: call, price: 1}\nstartDate: '2027-01-01T00:00:00Z'\nendDate: '2026-01-01T00:00:00Z'\n", "spec.endDate"),
            ("product: w\ncurrency: USD\nconsumption: {per: call, price: 1.0000001}\n", "spec.consumption.price"),
            ("product: w\ncurrency: USD\nconsumption: {per: call, price: 1}\nrecurringPeriod: year\n", "spec.recurringPeriod"),
        ] {
            let e = plan(yaml).unwrap_err();
            assert!(e.contains(&format!("`{field}`")), "{yaml}: {e}");
        }
    }
}
