use super::*;
use crate::monetization::{money, Billing, EntryKind, Plans, RatePlan};
use crate::pipeline::Outcome;
use crate::policies::llm_test_support::{llm_exchange, usage, verified};
use crate::ratelimit::window::parse_start;
use crate::ratelimit::FakeClock;
use crate::services::Services;

const DEV: &str = "dev@x";

fn plan(name: &str, yaml: &str) -> Arc<RatePlan> {
    let spec = serde_norway::from_str(yaml).unwrap();
    Arc::new(RatePlan::compile(name, spec).unwrap())
}

struct Bed {
    policy: Arc<dyn Policy>,
    mint: Arc<Monetization>,
    counters: Counters,
    _plans: Arc<Plans>,
}

async fn bed(plans: Vec<Arc<RatePlan>>) -> Bed {
    let clock = FakeClock::new(parse_start("2026-03-15T10:00:00Z").unwrap());
    let counters = Counters::memory(clock, 1000);
    let plans = Arc::new(Plans(plans));
    let base = Services::default();
    base.monetization.publish_plans(&plans);
    let ctx = BuildContext {
        name: "mint".into(),
        config_dir: None,
        services: Services {
            counters: counters.clone(),
            rate_plans: plans.clone(),
            ..base.clone()
        },
    };
    let policy = build(&ctx, serde_norway::from_str("{}").unwrap()).unwrap();
    Bed {
        policy,
        mint: base.monetization,
        counters,
        _plans: plans,
    }
}

fn ex(app: &str, prompt: u64, out: u64) -> Exchange {
    let mut ex = llm_exchange("gpt-4o", prompt, Some(out));
    ex.state
        .add_app("verifyapikey.v.".into(), verified(app, DEV, "gold", None));
    ex
}

async fn run(b: &Bed, ex: &mut Exchange) -> Result<(), Fault> {
    match b.policy.run(ex, Direction::Request).outcome().await {
        Outcome::Continue => Ok(()),
        Outcome::Reject(f) => Err(f),
        other => panic!("unexpected {other:?}"),
    }
}

async fn end(b: &Bed, ex: &Exchange, e: ExchangeEnd) {
    if let Some(f) = b.policy.after_exchange(ex, e) {
        f.await;
    }
}

fn var(ex: &Exchange, name: &str) -> String {
    ex.var(name)
        .map(|v| v.as_text().into_owned())
        .unwrap_or_default()
}

#[tokio::test]
async fn refuses_without_subscription_or_funds_and_charges_tokens_exactly() {
    let b = bed(vec![plan(
        "tokens",
        "{product: gold, currency: USD, consumption: {per: token, input: '3', output: '15'}}",
    )])
    .await;
    let now = b.counters.now();

    // No subscription: 403, Apigee's variables say why.
    let mut e = ex("shop", 10, 5);
    let f = run(&b, &mut e).await.unwrap_err();
    assert_eq!(
        (f.status, f.code.as_str()),
        (403, "steps.monetizationlimitscheck.SubscriptionNotFound")
    );
    assert_eq!(var(&e, "mint.limitscheck.is_subscription_found"), "false");
    assert_eq!(var(&e, "mint.limitscheck.is_request_blocked"), "true");

    // A subscription needs an account in the plan's currency.
    let products = vec!["gold".to_owned()];
    assert!(b
        .mint
        .subscribe("shop", DEV, &products, "tokens", None, now)
        .await
        .is_err());
    b.mint
        .put_account(DEV, "eur", Billing::Prepaid, 0, now)
        .await
        .unwrap();
    let err = b
        .mint
        .subscribe("shop", DEV, &products, "tokens", None, now)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("priced in USD"), "{err}");
    b.mint
        .put_account(DEV, "usd", Billing::Prepaid, 0, now)
        .await
        .unwrap();
    b.mint
        .subscribe("shop", DEV, &products, "tokens", None, now)
        .await
        .unwrap();

    // Subscribed, no funds: 402.
    let mut e = ex("shop", 10, 5);
    let f = run(&b, &mut e).await.unwrap_err();
    assert_eq!(
        (f.status, f.code.as_str()),
        (402, "steps.monetizationlimitscheck.InsufficientFunds")
    );

    // 200 micros; each call reserves 10 × 3 + 5 × 15 = 105.
    b.mint
        .add_entry(DEV, EntryKind::TopUp, 200, "t", now)
        .await
        .unwrap();
    let mut first = ex("shop", 10, 5);
    run(&b, &mut first).await.unwrap();
    assert_eq!(var(&first, "mint.rateplan"), "tokens");
    assert_eq!(
        var(&first, "mint.limitscheck.prepaid_developer_balance"),
        "0.000095"
    );
    let mut second = ex("shop", 10, 5);
    assert_eq!(run(&b, &mut second).await.unwrap_err().status, 402);
    // The first used 10 in and 2 out: 30 + 30 micros; the refund admits the second.
    first.state.llm_usage = Some(usage(10, 0, 2));
    end(&b, &first, ExchangeEnd::Completed).await;
    let mut second = ex("shop", 10, 5);
    run(&b, &mut second).await.unwrap();
    // The second's upstream failed before any usage: released.
    end(&b, &second, ExchangeEnd::Failed).await;

    let bal = b.mint.balance(&b.counters, DEV).await.unwrap();
    assert_eq!((bal.credited, bal.spent, bal.balance), (200, 60, 140));
    let st = b.mint.statement(DEV, now).await.unwrap();
    assert_eq!(st.usage_total, 60);
    assert_eq!(st.lines[0].input_tokens, 10);
    assert_eq!(st.lines[0].output_tokens, 2);
    let ledger = b.mint.ledger(&b.counters, DEV).await.unwrap();
    assert_eq!(ledger["sum"], money::format(140));
    assert_eq!(ledger["reserved"], "0.000000");
}

#[tokio::test]
async fn free_allowance_then_bands_by_the_months_calls_and_fees_on_subscribing() {
    let b = bed(vec![plan(
        "volume",
        "{product: gold, currency: USD, setupFee: '0.5', recurringFee: 1, consumption: {per: call}, freeAllowance: 2, bands: [{upTo: 3, price: '0.01'}, {price: '0.001'}]}",
    )])
    .await;
    let now = b.counters.now();
    b.mint
        .put_account(DEV, "USD", Billing::Postpaid, 2_000_000, now)
        .await
        .unwrap();
    b.mint
        .subscribe("shop", DEV, &["gold".to_owned()], "volume", None, now)
        .await
        .unwrap();
    // Fees: -1.50, so the postpaid account is 0.50 into its 2.00 credit limit.
    let bal = b.mint.balance(&b.counters, DEV).await.unwrap();
    assert_eq!((bal.balance, bal.available), (-1_500_000, 500_000));
    for _ in 0..5 {
        let mut e = ex("shop", 0, 0);
        e.state.llm = None;
        run(&b, &mut e).await.unwrap();
        end(&b, &e, ExchangeEnd::Completed).await;
    }
    // Calls 1-2 free, 3 at 0.01, 4-5 at 0.001.
    let st = b.mint.statement(DEV, now).await.unwrap();
    assert_eq!(st.lines[0].calls, 5);
    assert_eq!(st.usage_total, 12_000);
    assert_eq!(st.entries_total, -1_500_000);
    let bal = b.mint.balance(&b.counters, DEV).await.unwrap();
    assert_eq!(bal.balance, -1_512_000);
    let csv = st.to_csv();
    assert!(csv.contains(",shop,gold,volume,5,0,0,-0.012000\n"), "{csv}");
}

#[test]
fn a_rate_plan_must_name_a_product_of_the_configuration() {
    let doc = |product: &str| {
        format!(
            "apiVersion: tollgate.dev/v1alpha1\nkind: ApiProduct\nmetadata: {{name: gold}}\nspec: {{operations: [{{path: /x}}]}}\n---\napiVersion: tollgate.dev/v1alpha1\nkind: RatePlan\nmetadata: {{name: p}}\nspec: {{product: {product}, currency: USD, consumption: {{per: call, price: '0.01'}}}}\n"
        )
    };
    let files = |text: String| {
        vec![crate::config::SourceFile {
            name: "plans.yaml".into(),
            text,
        }]
    };
    let snap = crate::config::compile(&files(doc("gold")), None).unwrap();
    assert_eq!(snap.rate_plans.0[0].name, "p");
    let e = crate::config::compile(&files(doc("silver")), None).unwrap_err();
    assert!(
        e.to_string()
            .contains("field `spec.product`: no ApiProduct named `silver`"),
        "{e}"
    );
}
