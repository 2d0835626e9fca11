//! Criterion benchmarks of the developer portal's pages at scale (issue 19's target: under
//! 50 ms at 1,000 products and 10,000 apps): the catalog for a developer with private
//! grants, and an app page (keys, subscribe choices over every product, the 24-hour usage
//! chart). Rendering only: the session and store reads a request adds are the store's cost.
//!
//! `cargo bench --bench portal -- --quick`

use criterion::{criterion_group, criterion_main, Criterion};
use tollgate::consumer::service::Consumers;
use tollgate::consumer::{hash_key, ApiKey, ApiProduct, App, KeyStatus, Operation, Origin};
use tollgate::portal::accounts::{Developer, DeveloperStatus};
use tollgate::portal::{render_app, render_catalog, Portal, PortalOptions};
use tollgate::store::{Store, Write};

#[cfg(all(unix, not(target_env = "musl")))]
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

const PRODUCTS: usize = 1_000;
const APPS: usize = 10_000;

fn product(i: usize) -> ApiProduct {
    let access = if i.is_multiple_of(10) {
        "private"
    } else {
        "public"
    };
    ApiProduct {
        name: format!("product-{i:04}"),
        description: format!("Product {i}: forecasts, <maps> & more for every city"),
        operations: (0..3)
            .map(|j| Operation {
                path: format!("/v{j}/product-{i}/**"),
                methods: vec!["GET".into(), "POST".into()],
                models: vec!["gpt-4o-mini".into()],
                ..Default::default()
            })
            .collect(),
        quota: Some(tollgate::consumer::QuotaSettings {
            limit: 1000,
            interval: 1,
            time_unit: tollgate::consumer::TimeUnit::Hour,
        }),
        llm_token_quota: None,
        approval_type: Default::default(),
        attributes: [("access".to_owned(), access.to_owned())].into(),
        origin: Origin::File,
        revision: 0,
    }
}

fn app(i: usize) -> App {
    App {
        name: format!("app-{i:05}"),
        developer_email: format!("dev{}@example.com", i % 500),
        status: Default::default(),
        products: vec![format!("product-{:04}", i % PRODUCTS)],
        keys: (0..5)
            .map(|k| ApiKey {
                id: format!("key_{i}_{k}"),
                hash: hash_key(&format!("key-{i}-{k}")),
                status: KeyStatus::Approved,
                expires_at: None,
                created_at: 1_765_000_000_000,
            })
            .collect(),
        attributes: Default::default(),
        origin: Origin::Api,
        revision: 0,
    }
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let store = Store::memory();
    let consumers = Consumers::new(store.clone());
    rt.block_on(async {
        for i in 0..APPS {
            store.put_app(&app(i), Write::Create).await.expect("app");
        }
        consumers.resync().await.expect("resync");
    });
    consumers.set_file_objects((0..PRODUCTS).map(product).collect(), vec![]);
    let portal = Portal::new(consumers, None, PortalOptions::default());
    let dev = Developer {
        email: "dev7@example.com".into(),
        name: "Dev".into(),
        password_hash: None,
        status: DeveloperStatus::Active,
        products: vec!["product-0010".into(), "product-0020".into()],
        created_at: 0,
        revision: 0,
    };
    let report = tollgate::usage::Report {
        by: tollgate::usage::Dim::App,
        granularity: tollgate::usage::Granularity::Hour,
        series: vec![tollgate::usage::Series {
            name: "app-00007".into(),
            points: (0..24)
                .map(|h| tollgate::usage::Point {
                    start: format!("2026-12-07T{h:02}:00:00.000Z"),
                    requests: h * 10,
                    errors: 0,
                    input_tokens: h * 100,
                    output_tokens: h * 50,
                    total_tokens: h * 150,
                    cost: 0.0,
                })
                .collect(),
        }],
    };
    let the_app = app(7);
    let mut g = c.benchmark_group("portal");
    g.bench_function("catalog_1000_products", |b| {
        b.iter(|| render_catalog(&portal, Some(&dev)).len())
    });
    g.bench_function("app_page_10000_apps", |b| {
        b.iter(|| {
            render_app(
                &portal,
                &dev,
                &"c".repeat(64),
                &the_app,
                Some(&report),
                None,
            )
            .len()
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
