//! Monetization end to end: `policies/monetization.yaml` behind a real Envoy 1.40 and the
//! `tollgate` binary, with the management API open (`--admin-insecure`): accounts, top-ups,
//! adjustments, subscriptions, the 403/402 faults through Envoy, and 500 concurrent priced
//! calls against a balance that covers 100, after which balance, ledger and statement
//! agree to the micro. Run with `cargo test --test monetization`.

mod support;

use std::time::Duration;

use serde_json::{json, Value};
use support::{eventually, within, BedOptions, TestBed};

const LIMIT: Duration = Duration::from_secs(120);
const DEV: &str = "buyer@example.com";
const KEY: &str = "tg_demo_mint_key_0001";

async fn bed() -> TestBed {
    let example = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("policies/monetization.yaml"),
    )
    .expect("example");
    let mut opts = BedOptions::new(&example);
    opts.tollgate_args.push("--admin-insecure".to_owned());
    TestBed::start_with(opts).await
}

async fn admin(bed: &TestBed, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
    let url = format!("http://{}{}", bed.tollgate.admin, path);
    let r = match body {
        Some(b) => {
            bed.client
                .send(
                    method,
                    &url,
                    &[("content-type", "application/json")],
                    b.to_string(),
                )
                .await
        }
        None => bed.client.send(method, &url, &[], "").await,
    };
    let v = serde_json::from_slice(&r.body).unwrap_or(Value::String(r.text()));
    (r.status, v)
}

async fn call(bed: &TestBed) -> support::Reply {
    bed.get("/mint/weather/today", &[("x-api-key", KEY)]).await
}

fn code(r: &support::Reply) -> String {
    r.text()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_concurrent_calls_never_spend_past_zero() {
    within(LIMIT, async {
        let bed = bed().await;
        let dev = format!("/v1/developers/{DEV}");

        // Plans are listed from the configuration.
        let (s, plans) = admin(&bed, "GET", "/v1/rateplans?product=mint-weather", None).await;
        assert_eq!(s, 200, "{plans}");
        let names: Vec<&str> = plans["ratePlans"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["weather-standard", "weather-volume"]);

        // A subscription needs an account.
        let (s, body) = admin(
            &bed,
            "POST",
            "/v1/subscriptions",
            Some(json!({"app": "weather-shop", "plan": "weather-standard"})),
        )
        .await;
        assert_eq!(s, 404, "{body}");

        let (s, body) = admin(
            &bed,
            "PUT",
            &format!("{dev}/account"),
            Some(json!({"currency": "USD", "billing": "prepaid"})),
        )
        .await;
        assert_eq!(s, 200, "{body}");
        assert_eq!(body["balance"], "0.000000");

        // No subscription: 403 through Envoy, Apigee-style code.
        let r = call(&bed).await;
        assert_eq!(r.status, 403, "{}", r.text());
        assert!(
            code(&r).contains("steps.monetizationlimitscheck.SubscriptionNotFound"),
            "{}",
            r.text()
        );

        let (s, sub) = admin(
            &bed,
            "POST",
            "/v1/subscriptions",
            Some(json!({"app": "weather-shop", "plan": "weather-standard"})),
        )
        .await;
        assert_eq!(s, 201, "{sub}");
        // A second subscription to the same product is refused.
        let (s, body) = admin(
            &bed,
            "POST",
            "/v1/subscriptions",
            Some(json!({"app": "weather-shop", "plan": "weather-volume"})),
        )
        .await;
        assert_eq!(s, 409, "{body}");

        // Subscribed, balance zero: 402.
        let r = call(&bed).await;
        assert_eq!(r.status, 402, "{}", r.text());
        assert!(
            code(&r).contains("steps.monetizationlimitscheck.InsufficientFunds"),
            "{}",
            r.text()
        );

        // Bad amounts are refused; a top-up of 1.00 covers 100 calls at 0.01.
        for bad in [
            json!({"amount": "-1"}),
            json!({"amount": "0.0000001"}),
            json!({"amount": 1, "x": 1}),
        ] {
            let (s, body) = admin(&bed, "POST", &format!("{dev}/topups"), Some(bad)).await;
            assert_eq!(s, 400, "{body}");
        }
        let (s, e) = admin(
            &bed,
            "POST",
            &format!("{dev}/topups"),
            Some(json!({"amount": "1.00", "reference": "card 4242"})),
        )
        .await;
        assert_eq!(s, 201, "{e}");
        assert_eq!(e["amount"], "1.000000");

        let replies = futures_util::future::join_all((0..500).map(|_| call(&bed))).await;
        let ok = replies.iter().filter(|r| r.status == 200).count();
        let served = replies
            .iter()
            .find(|r| r.status == 200)
            .expect("one served");
        assert_eq!(
            served.echoed_header("x-tollgate-rateplan").as_deref(),
            Some("weather-standard")
        );
        let paid = replies.iter().filter(|r| r.status == 402).count();
        assert_eq!(
            (ok, paid),
            (100, 400),
            "every call is either served or refused with 402"
        );
        for r in replies.iter().filter(|r| r.status == 402) {
            assert!(code(r).contains("InsufficientFunds"), "{}", r.text());
        }

        // Charges land in the tallies when each exchange ends; wait for all 100.
        let statement = eventually(
            Duration::from_secs(30),
            "100 calls in the statement",
            || async {
                let (s, st) = admin(&bed, "GET", &format!("{dev}/statement"), None).await;
                assert_eq!(s, 200, "{st}");
                (st["lines"][0]["calls"] == 100).then_some(st)
            },
        )
        .await;
        assert_eq!(statement["usageTotal"], "1.000000", "{statement}");
        assert_eq!(statement["lines"][0]["amount"], "1.000000");
        assert_eq!(statement["lines"][0]["plan"], "weather-standard");
        assert_eq!(statement["entriesTotal"], "1.000000");

        let (_, bal) = admin(&bed, "GET", &format!("{dev}/balance"), None).await;
        assert_eq!(bal["balance"], "0.000000", "{bal}");
        assert_eq!(bal["spent"], "1.000000", "{bal}");
        let (_, ledger) = admin(&bed, "GET", &format!("{dev}/ledger"), None).await;
        assert_eq!(ledger["sum"], "0.000000", "{ledger}");
        assert_eq!(ledger["balance"], "0.000000", "{ledger}");
        assert_eq!(ledger["reserved"], "0.000000", "{ledger}");
        let kinds: Vec<&str> = ledger["entries"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["kind"].as_str().unwrap())
            .collect();
        assert_eq!(kinds, ["topUp", "usage"], "{ledger}");

        // An adjustment of +0.05 buys exactly 5 more calls; a negative one is an entry too.
        let (s, _) = admin(
            &bed,
            "POST",
            &format!("{dev}/adjustments"),
            Some(json!({"amount": "0.05", "reference": "goodwill"})),
        )
        .await;
        assert_eq!(s, 201);
        for _ in 0..5 {
            let r = call(&bed).await;
            assert_eq!(r.status, 200, "{}", r.text());
        }
        assert_eq!(call(&bed).await.status, 402);
        let (s, _) = admin(
            &bed,
            "POST",
            &format!("{dev}/adjustments"),
            Some(json!({"amount": "-0.02", "reference": "correction"})),
        )
        .await;
        assert_eq!(s, 201);
        let ledger = eventually(Duration::from_secs(30), "105 calls charged", || async {
            let (_, l) = admin(&bed, "GET", &format!("{dev}/ledger"), None).await;
            (l["reserved"] == "0.000000" && l["sum"] == "-0.020000").then_some(l)
        })
        .await;
        assert_eq!(ledger["balance"], "-0.020000", "{ledger}");

        // The CSV statement says the same.
        let r = bed
            .client
            .get(
                &format!("http://{}{dev}/statement?format=csv", bed.tollgate.admin),
                &[],
            )
            .await;
        assert_eq!(r.status, 200);
        assert_eq!(r.header("content-type"), Some("text/csv; charset=utf-8"));
        let csv = r.text();
        assert!(
            csv.contains(",weather-shop,mint-weather,weather-standard,105,0,0,-1.050000\n"),
            "{csv}"
        );
        assert!(csv.contains(",usageTotal,,,,-1.050000\n"), "{csv}");

        // Cancelled: 403 again.
        let id = sub["id"].as_str().unwrap();
        let (s, _) = admin(
            &bed,
            "POST",
            &format!("/v1/subscriptions/{id}/cancel"),
            None,
        )
        .await;
        assert_eq!(s, 200);
        assert_eq!(call(&bed).await.status, 403);
    })
    .await;
}
