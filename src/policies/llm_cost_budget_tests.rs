use super::*;
use crate::pipeline::Outcome;
use crate::policies::llm_test_support::{llm_exchange, usage, verified};
use crate::ratelimit::window::parse_start;
use crate::ratelimit::FakeClock;
use crate::services::Services;

const SPEC: &str = r#"{
  currency: USD, budget: 1.00, per: app, timeUnit: month,
  prices: [
    {model: gpt-4o, input: 2.5, cachedInput: 1.25, output: 10},
    {model: "claude-*", input: 3, output: 15},
    {model: "claude-haiku-*", input: 1, output: 5}
  ]
}"#;

fn bed(spec: &str) -> (Arc<dyn Policy>, Arc<FakeClock>) {
    bed_named("budget", spec)
}

fn bed_named(name: &str, spec: &str) -> (Arc<dyn Policy>, Arc<FakeClock>) {
    let clock = FakeClock::new(parse_start("2026-03-15T10:00:00Z").unwrap());
    let ctx = BuildContext {
        name: name.into(),
        config_dir: None,
        services: Services {
            counters: Counters::memory(clock.clone(), 1000),
            ..Default::default()
        },
    };
    (
        build(&ctx, serde_norway::from_str(spec).unwrap()).unwrap(),
        clock,
    )
}

fn ex(app: &str, model: &str, prompt: u64, out: u64) -> Exchange {
    let mut ex = llm_exchange(model, prompt, Some(out));
    ex.state.add_app(
        "verifyapikey.v.".into(),
        verified(app, "dev@x", "gold", None),
    );
    ex
}

fn run(p: &Arc<dyn Policy>, ex: &mut Exchange) -> Result<(), Fault> {
    match p.run(ex, Direction::Request) {
        Hook::Ready(Outcome::Continue) => Ok(()),
        Hook::Ready(Outcome::Reject(f)) => Err(f),
        _ => panic!("memory counters decide at once"),
    }
}

fn spent(app: &str) -> f64 {
    let b = budgets()
        .into_iter()
        .find(|b| b.policy == "spend-test")
        .expect("registered");
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    rt.block_on(b.spend(app)).unwrap().spent
}

#[test]
fn prices_match_exactly_then_by_the_longest_prefix() {
    let spec: Spec = parse_spec(serde_norway::from_str(SPEC).unwrap()).unwrap();
    let mut table = PriceTable::default();
    for ps in &spec.prices {
        let pr = price("p", ps).unwrap();
        match ps.model.as_deref().unwrap().strip_suffix('*') {
            Some(pre) => table.prefixes.push((pre.into(), pr)),
            None => table.exact.push((ps.model.clone().unwrap(), pr)),
        }
    }
    table.prefixes.sort_by_key(|p| std::cmp::Reverse(p.0.len()));
    assert_eq!(table.price("gpt-4o").unwrap().output, 10.0);
    assert!(
        table.price("gpt-4o-mini").is_none(),
        "exact names are exact"
    );
    assert_eq!(table.price("claude-haiku-4").unwrap().input, 1.0);
    assert_eq!(table.price("claude-sonnet-4").unwrap().input, 3.0);
    // 1000 input (400 cached), 100 output: 600 × 2.5 + 400 × 1.25 + 100 × 10 micros.
    let gpt = table.price("gpt-4o").unwrap();
    assert_eq!(gpt.cost(&usage(1000, 400, 100)), 1500 + 500 + 1000);
    assert_eq!(gpt.estimate(1000, 100), 2500 + 1000);
    // Absurd numbers saturate, never wrap.
    assert!(gpt.cost(&usage(u64::MAX, u64::MAX, u64::MAX)) > 0);
}

#[test]
fn reserves_the_estimated_cost_and_settles_to_the_actual_cost() {
    let (p, clock) = bed_named("spend-test", SPEC);
    // Estimate: 100_000 × 2.5 + 20_000 × 10 = 450_000 micros = $0.45.
    let mut a = ex("app-a", "gpt-4o", 100_000, 20_000);
    run(&p, &mut a).unwrap();
    let mut b = ex("app-a", "gpt-4o", 100_000, 20_000);
    run(&p, &mut b).unwrap();
    assert!((spent("app-a") - 0.9).abs() < 1e-9);
    let mut c = ex("app-a", "gpt-4o", 100_000, 20_000);
    let f = run(&p, &mut c).unwrap_err();
    assert_eq!(
        (f.status, f.code.as_str()),
        (429, "policies.llmcostbudget.BudgetExceeded")
    );
    assert!(f.message.contains("1.00 USD"), "{}", f.message);
    let retry = f.headers.iter().find(|(h, _)| h == "retry-after").unwrap();
    // Until April 1st 00:00 UTC.
    assert_eq!(retry.1, (16 * 86_400 + 14 * 3600).to_string());
    drop(c);
    // Another app has its own budget.
    let mut other = ex("app-b", "gpt-4o", 100_000, 20_000);
    run(&p, &mut other).unwrap();
    drop(other);
    // a: 100_000 in (50_000 cached), 1_000 out = 125_000 + 62_500 + 10_000.
    a.state.llm_usage = Some(usage(100_000, 50_000, 1_000));
    p.exchange_end(&mut a, ExchangeEnd::Completed);
    assert_eq!(a.state.llm_cost, Some(0.1975));
    assert!(p.after_exchange(&a, ExchangeEnd::Completed).is_none());
    drop(a);
    assert!((spent("app-a") - (0.45 + 0.1975)).abs() < 1e-9);
    // b aborted without usage: charged its prompt at the input price.
    assert!(p.after_exchange(&b, ExchangeEnd::Aborted).is_none());
    drop(b);
    assert!((spent("app-a") - (0.25 + 0.1975)).abs() < 1e-9);
    // The next month starts afresh.
    clock.set(parse_start("2026-04-01T00:00:00Z").unwrap());
    assert_eq!(spent("app-a"), 0.0);
}

#[test]
fn unknown_models_non_llm_requests_and_missing_identity() {
    let (p, _) = bed(SPEC);
    let mut e = ex("app-c", "mystery", 10, 10);
    let f = run(&p, &mut e).unwrap_err();
    assert_eq!(
        (f.status, f.code.as_str()),
        (403, "policies.llmcostbudget.ModelNotPriced")
    );
    // Not an LLM request: nothing to price, passes without reserving.
    let mut plain = Exchange::default();
    run(&p, &mut plain).unwrap();
    assert!(plain.state.reservations.is_empty());
    // No verified app.
    let mut anon = llm_exchange("gpt-4o", 10, Some(10));
    let f = run(&p, &mut anon).unwrap_err();
    assert_eq!(f.code, "policies.llmcostbudget.NoIdentity");
    // A default price covers unknown models.
    let (p, _) = bed(
        "{currency: EUR, budget: 5, per: developer, timeUnit: day, prices: [], defaultPrice: {input: 1, output: 1}}",
    );
    let mut e = ex("app-d", "mystery", 10, 10);
    run(&p, &mut e).unwrap();
    assert!(!e.state.reservations.is_empty());
}

#[test]
fn bad_specs_name_the_field() {
    let ctx = BuildContext {
        name: "b".into(),
        config_dir: None,
        services: Services::default(),
    };
    for (yaml, field) in [
        ("{currency: USD, budget: -1, per: app, timeUnit: day, prices: []}", "budget"),
        ("{currency: USD, budget: 1, per: team, timeUnit: day, prices: []}", "per"),
        ("{currency: USD, budget: 1, per: app, timeUnit: year, prices: []}", "timeUnit"),
        ("{currency: USD, budget: 1, per: app, timeUnit: day, prices: [{input: 1, output: 1}]}", "prices[0].model"),
        ("{currency: USD, budget: 1, per: app, timeUnit: day, prices: [{model: m, input: -1, output: 1}]}", "prices[0].input"),
    ] {
        let e = build(&ctx, serde_norway::from_str(yaml).unwrap()).unwrap_err();
        assert!(e.to_string().contains(field), "{yaml}: {e}");
    }
}
