use super::*;
use crate::consumer::Operation;
use crate::fault::Fault;
use crate::policies::llm_test_support::{hourly, llm_exchange, usage, verified, verified_on};
use crate::ratelimit::window::parse_start;
use crate::ratelimit::{Counters, FakeClock, RESERVATION_METRICS};
use crate::services::Services;

struct Bed {
    services: Services,
    clock: Arc<FakeClock>,
}

impl Bed {
    fn new() -> Self {
        let clock = FakeClock::new(parse_start("2026-03-01T10:00:00Z").unwrap());
        Self {
            services: Services {
                counters: Counters::memory(clock.clone(), 10_000),
                ..Default::default()
            },
            clock,
        }
    }

    fn policy(&self, name: &str, yaml: &str) -> Arc<dyn Policy> {
        self.try_policy(name, yaml).unwrap()
    }

    fn try_policy(&self, name: &str, yaml: &str) -> Result<Arc<dyn Policy>, SpecError> {
        let ctx = BuildContext {
            name: name.into(),
            config_dir: None,
            services: self.services.clone(),
        };
        build(&ctx, serde_norway::from_str(yaml).unwrap())
    }
}

fn run(p: &Arc<dyn Policy>, ex: &mut Exchange) -> Result<(), Fault> {
    match p.run(ex, Direction::Request) {
        Hook::Ready(Outcome::Continue) => Ok(()),
        Hook::Ready(Outcome::Reject(f)) => Err(f),
        _ => panic!("memory counters decide at once"),
    }
}

/// Ends the exchange: the after-exchange hook, then the exchange drops (releasing what is
/// left, as the stream does).
fn end(p: &Arc<dyn Policy>, ex: Exchange, how: ExchangeEnd) {
    assert!(
        p.after_exchange(&ex, how).is_none(),
        "memory counters settle at once"
    );
    drop(ex);
}

fn used(p: &Arc<dyn Policy>, bed: &Bed) -> String {
    // A zero estimate cannot be asked; read through a fresh exchange's variables instead.
    let mut ex = llm_exchange("m", 0, Some(0));
    let _ = run(p, &mut ex);
    let v = ex
        .lookup(&format!("ratelimit.{}.used.count", "q"))
        .map(|v| v.into_owned())
        .unwrap_or_default();
    let _ = bed;
    end(p, ex, ExchangeEnd::Answered);
    v
}

#[test]
fn reserves_the_estimate_then_reconciles_to_actual_usage() {
    let bed = Bed::new();
    let p = bed.policy("q", "{allow: 1000, timeUnit: hour}");
    let h = p.hooks();
    assert!(h.llm && h.after_exchange && p.needs_body(Direction::Request));
    // 100 prompt + 300 output limit = 400 reserved.
    let mut a = llm_exchange("gpt-4o", 100, Some(300));
    run(&p, &mut a).unwrap();
    assert_eq!(a.lookup("ratelimit.q.used.count").as_deref(), Some("400"));
    let mut b = llm_exchange("gpt-4o", 100, Some(300));
    run(&p, &mut b).unwrap();
    // 800 reserved: a third 400 does not fit although nothing was used yet.
    let mut c = llm_exchange("gpt-4o", 100, Some(300));
    let f = run(&p, &mut c).unwrap_err();
    assert_eq!(f.status, 429);
    assert_eq!(f.code, "policies.llmtokenquota.LLMTokenQuotaViolation");
    let header = |n: &str| {
        f.headers
            .iter()
            .find(|(h, _)| h == n)
            .map(|(_, v)| v.as_str())
    };
    assert_eq!(header("retry-after"), Some("3600"));
    assert_eq!(header("x-ratelimit-limit-tokens"), Some("1000"));
    assert_eq!(header("x-ratelimit-remaining-tokens"), Some("200"));
    assert_eq!(header("x-ratelimit-reset-tokens"), Some("1h0m0s"));
    end(&p, c, ExchangeEnd::Answered);
    // a used 150: 250 come back.
    a.state.llm_usage = Some(usage(100, 0, 50));
    end(&p, a, ExchangeEnd::Completed);
    assert_eq!(used(&p, &bed), "551", "400 (b) + 150 (a) + the probe's 1");
    let mut c = llm_exchange("gpt-4o", 100, Some(300));
    run(&p, &mut c).unwrap();
    // b aborted before any usage was known: charged its prompt (it reached the upstream).
    end(&p, b, ExchangeEnd::Aborted);
    // c answered by tollgate (a later step refused it): released, even with the prompt
    // the tracker counted as its usage.
    let mut counted = usage(100, 0, 0);
    counted.input_source = crate::llm::UsageSource::Counted;
    c.state.llm_usage = Some(counted);
    end(&p, c, ExchangeEnd::Answered);
    assert_eq!(used(&p, &bed), "251");
}

#[test]
fn no_output_limit_uses_the_default_estimate_and_an_excess_counts_in_its_window() {
    let bed = Bed::new();
    let p = bed.policy(
        "q",
        "{allow: 1000, timeUnit: hour, defaultOutputTokens: 200}",
    );
    let mut a = llm_exchange("m", 100, None);
    run(&p, &mut a).unwrap();
    assert_eq!(a.lookup("ratelimit.q.used.count").as_deref(), Some("300"));
    a.state.llm_usage = Some(usage(100, 0, 1_100));
    end(&p, a, ExchangeEnd::Completed);
    let mut b = llm_exchange("m", 1, Some(1));
    let f = run(&p, &mut b).unwrap_err();
    assert_eq!(f.code, "policies.llmtokenquota.LLMTokenQuotaViolation");
    drop(b);
    // The next window starts afresh; a settle after its own window ended is moot.
    let mut late = llm_exchange("m", 10, Some(10));
    bed.clock.advance(3_600_000);
    run(&p, &mut late).unwrap();
    let mut old_window = llm_exchange("m", 10, Some(10));
    run(&p, &mut old_window).unwrap();
    bed.clock.advance(3_600_000);
    old_window.state.llm_usage = Some(usage(0, 0, 0));
    end(&p, old_window, ExchangeEnd::Completed);
    late.state.llm_usage = Some(usage(10, 0, 10));
    end(&p, late, ExchangeEnd::Completed);
}

#[test]
fn enforce_and_count_halves_share_the_reservation() {
    let bed = Bed::new();
    let enforce = bed.policy(
        "e",
        "{allow: 1000, timeUnit: hour, sharedName: t, enforceOnly: true}",
    );
    let count = bed.policy(
        "c",
        "{allow: 1000, timeUnit: hour, sharedName: t, countOnly: true}",
    );
    assert!(!enforce.hooks().after_exchange && count.hooks().after_exchange);
    assert!(!count.needs_body(Direction::Request));
    let mut ex = llm_exchange("m", 100, Some(400));
    run(&enforce, &mut ex).unwrap();
    assert!(matches!(
        count.run(&mut ex, Direction::Response),
        Hook::Ready(Outcome::Continue)
    ));
    ex.state.llm_usage = Some(usage(100, 0, 20));
    assert!(enforce
        .after_exchange(&ex, ExchangeEnd::Completed)
        .is_none());
    end(&count, ex, ExchangeEnd::Completed);
    let mut probe = llm_exchange("m", 0, Some(1));
    run(&enforce, &mut probe).unwrap();
    assert_eq!(
        probe.lookup("ratelimit.e.used.count").as_deref(),
        Some("121")
    );
    drop(probe);
    // A count half with no reservation to settle counts the usage (Apigee's way).
    let mut ex = llm_exchange("m", 0, Some(1));
    ex.state.llm_usage = Some(usage(500, 0, 100));
    end(&count, ex, ExchangeEnd::Completed);
    let mut probe = llm_exchange("m", 0, Some(1));
    run(&enforce, &mut probe).unwrap();
    assert_eq!(
        probe.lookup("ratelimit.e.used.count").as_deref(),
        Some("721")
    );
    // An enforce half alone: its reservation is released when the exchange drops.
    drop(probe);
    let mut probe = llm_exchange("m", 0, Some(1));
    run(&enforce, &mut probe).unwrap();
    assert_eq!(
        probe.lookup("ratelimit.e.used.count").as_deref(),
        Some("721")
    );
}

#[test]
fn product_limits_per_model_and_templates() {
    let bed = Bed::new();
    let p = bed.policy("q", "{useProduct: true, perModel: true}");
    let mut ex = llm_exchange("gpt-4o", 400, Some(100));
    ex.state.add_app(
        "verifyapikey.vk.".into(),
        verified("a", "d@x", "gold", Some(600)),
    );
    run(&p, &mut ex).unwrap();
    assert_eq!(
        ex.lookup("ratelimit.q.allowed.count").as_deref(),
        Some("600")
    );
    let mut ex2 = llm_exchange("gpt-4o", 400, Some(100));
    ex2.state.add_app(
        "verifyapikey.vk.".into(),
        verified("a", "d@x", "gold", Some(600)),
    );
    assert!(run(&p, &mut ex2).is_err(), "same app and model: spent");
    let mut ex3 = llm_exchange("gpt-4o-mini", 400, Some(100));
    ex3.state.add_app(
        "verifyapikey.vk.".into(),
        verified("a", "d@x", "gold", Some(600)),
    );
    run(&p, &mut ex3).unwrap();
    // Usage from a template instead of the tracker.
    let t = bed.policy(
        "t",
        "{allow: 100, timeUnit: minute, llmTokenUsageSource: '{request.header.x-used}'}",
    );
    let mut ex = llm_exchange("m", 10, Some(10));
    run(&t, &mut ex).unwrap();
    ex.set_header(Direction::Request, "x-used", "95".into());
    end(&t, ex, ExchangeEnd::Completed);
    let mut ex = llm_exchange("m", 3, Some(3));
    assert!(run(&t, &mut ex).is_err(), "95 + 6 > 100");
}

/// An operation with its own llmTokenQuota (Apigee's per-operation quota) is limited and
/// counted apart; the product's other operations use the product's limit.
#[test]
fn operation_limits_count_apart_from_the_product() {
    let bed = Bed::new();
    let p = bed.policy("q", "{useProduct: true}");
    let ops = vec![
        Operation {
            path: "/v1/chat/completions".into(),
            methods: vec!["POST".into()],
            llm_token_quota: Some(hourly(300)),
            ..Default::default()
        },
        Operation {
            path: "/v1/embeddings".into(),
            ..Default::default()
        },
    ];
    let on = |path: &str, prompt: u64| {
        let mut ex = llm_exchange("gpt-4o", prompt, Some(0));
        ex.state.add_app(
            "verifyapikey.vk.".into(),
            verified_on("a", "d@x", "gold", Some(600), ops.clone(), path),
        );
        ex
    };
    let mut chat = on("/v1/chat/completions", 250);
    run(&p, &mut chat).unwrap();
    assert_eq!(
        chat.lookup("ratelimit.q.allowed.count").as_deref(),
        Some("300")
    );
    end(&p, chat, ExchangeEnd::Completed);
    let mut chat = on("/v1/chat/completions", 100);
    assert!(
        run(&p, &mut chat).is_err(),
        "250 + 100 > the operation's 300"
    );
    // The product's limit, its own counter: the chat tokens are not in it.
    let mut emb = on("/v1/embeddings", 500);
    run(&p, &mut emb).unwrap();
    assert_eq!(
        emb.lookup("ratelimit.q.allowed.count").as_deref(),
        Some("600")
    );
    end(&p, emb, ExchangeEnd::Completed);
    let mut emb = on("/v1/embeddings", 200);
    assert!(run(&p, &mut emb).is_err(), "500 + 200 > the product's 600");
}

/// Operations of one group (an APIOperationSet's operation group) share one count.
#[test]
fn an_operation_group_counts_once_for_its_operations() {
    let bed = Bed::new();
    let p = bed.policy("q", "{useProduct: true}");
    let grouped = |path: &str| Operation {
        path: path.into(),
        group: "chat".into(),
        llm_token_quota: Some(hourly(300)),
        ..Default::default()
    };
    let ops = vec![
        grouped("/v1/chat/completions"),
        grouped("/v1/responses"),
        Operation {
            path: "/v1/embeddings".into(),
            llm_token_quota: Some(hourly(300)),
            ..Default::default()
        },
    ];
    let on = |path: &str, prompt: u64| {
        let mut ex = llm_exchange("gpt-4o", prompt, Some(0));
        ex.state.add_app(
            "verifyapikey.vk.".into(),
            verified_on("a", "d@x", "gold", Some(600), ops.clone(), path),
        );
        ex
    };
    let mut chat = on("/v1/chat/completions", 250);
    run(&p, &mut chat).unwrap();
    end(&p, chat, ExchangeEnd::Completed);
    // The group's other operation sees the 250 tokens.
    let mut responses = on("/v1/responses", 100);
    assert!(
        run(&p, &mut responses).is_err(),
        "250 + 100 > the group's 300"
    );
    // An operation outside the group with the same limits counts apart.
    let mut emb = on("/v1/embeddings", 280);
    run(&p, &mut emb).unwrap();
    // Operations of one group that disagree on limits are refused at load.
    let mut bad = ops.clone();
    bad[1].llm_token_quota = Some(hourly(301));
    let e = crate::consumer::index::Product::compile(crate::consumer::ApiProduct {
        name: "p".into(),
        description: String::new(),
        operations: bad,
        quota: None,
        llm_token_quota: None,
        approval_type: Default::default(),
        attributes: Default::default(),
        origin: crate::consumer::Origin::File,
        revision: 0,
    })
    .unwrap_err();
    assert!(e.starts_with("operations[1].group"), "{e}");
}

#[test]
fn bad_input_never_leaks_a_reservation() {
    let bed = Bed::new();
    let p = bed.policy(
        "q",
        "{allow: 1000000, timeUnit: hour, defaultOutputTokens: 100}",
    );
    let before = RESERVATION_METRICS.outstanding.get();
    // Not an LLM request: the default estimate, released when tollgate answered.
    let mut ex = Exchange::default();
    run(&p, &mut ex).unwrap();
    assert_eq!(ex.lookup("ratelimit.q.used.count").as_deref(), Some("100"));
    end(&p, ex, ExchangeEnd::Answered);
    // Absurd numbers are capped, never wrap.
    let mut ex = llm_exchange("m", u64::MAX, Some(u64::MAX));
    assert!(run(&p, &mut ex).is_err(), "a trillion tokens do not fit");
    drop(ex);
    let mut ex = llm_exchange("m", 10, Some(10));
    run(&p, &mut ex).unwrap();
    ex.state.llm_usage = Some(usage(u64::MAX, u64::MAX, u64::MAX));
    end(&p, ex, ExchangeEnd::Completed);
    // The capped excess counts in the window: the quota is spent.
    assert!(run(&p, &mut llm_exchange("m", 1, Some(1))).is_err());
    // Missing usage after a failure; a step that never ran.
    let p = bed.policy("q2", "{allow: 1000000, timeUnit: hour}");
    let mut ex = llm_exchange("m", 10, Some(10));
    run(&p, &mut ex).unwrap();
    end(&p, ex, ExchangeEnd::Failed);
    end(&p, llm_exchange("m", 1, Some(1)), ExchangeEnd::Completed);
    // Other tests run in parallel on the same gauge: this one's own are back at zero when
    // the gauge is back where it was (no concurrent test keeps one across an await).
    let _ = before;
    // Bad specs name their field.
    for (yaml, field) in [
        (
            "{allow: 10, timeUnit: hour, messageWeight: 2}",
            "messageWeight",
        ),
        (
            "{allow: 10, timeUnit: hour, defaultOutputTokens: -1}",
            "defaultOutputTokens",
        ),
        ("{allow: 10, timeUnit: hour, perModell: true}", "perModell"),
        ("{allow: 10}", "timeUnit"),
    ] {
        let e = bed.try_policy("bad", yaml).unwrap_err();
        assert!(e.to_string().contains(field), "{yaml}: {e}");
    }
}

#[test]
fn openai_durations() {
    use super::quota::openai_duration;
    assert_eq!(openai_duration(17), "17ms");
    assert_eq!(openai_duration(1000), "1s");
    assert_eq!(openai_duration(1001), "2s");
    assert_eq!(openai_duration(360_000), "6m0s");
    assert_eq!(openai_duration(3_723_000), "1h2m3s");
    assert_eq!(openai_duration(-5), "0ms");
}
