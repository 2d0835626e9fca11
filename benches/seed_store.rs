//! Seeds an embedded store (the `redb` file `tollgate serve --store embedded --data-dir DIR`
//! reads) with N apps of one API key each, all on one product, for the consumer-scale
//! benchmark (`benches/consumers-scale.sh`).
//!
//!     cargo build --release --example seed_store
//!     target/release/examples/seed_store --data-dir /tmp/tg-data --apps 100000
//!
//! App `i` (0-based) is `seed-app-<i, 6 digits>`, developer `dev<i>@seed.example.com`, with the
//! key `tg_seed_<i, 10 digits>` (stored as its SHA-256 only, as the management API stores
//! keys) on the product `--product` (default `seeded`: `POST /verify/**`, the path of the
//! `verify` flow in `benches/configs/bench.yaml`). The product is created in the store too
//! when missing: store apps may only name products that exist.
//!
//! `--mode bulk` (default) writes `--batch` apps per redb write transaction straight into the
//! tables `EmbeddedBackend` reads (same file, same tables, same JSON encoding); `--mode store`
//! goes through `EmbeddedBackend::put_app(Write::Create)`, one durable transaction (fsync) per
//! app, as the management API does — much slower, and a measure of durable writes per second.
//! Either way the directory is then opened with `EmbeddedBackend::open` and its snapshot counted,
//! so a seeded directory is known to load.
//!
//! Prints one sample key and one JSON line of figures (`--json`) or a short report.

use std::path::PathBuf;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use clap::{Parser, ValueEnum};
use redb::{Database, Durability, ReadableTable};
use tollgate::consumer::{hash_key, ApiKey, ApiProduct, App, KeyStatus, Operation, Origin};
use tollgate::store::embedded::{EmbeddedBackend, APPS, DB_FILE, PRODUCTS};
use tollgate::store::{Store, Write};

#[derive(Clone, Copy, Debug, PartialEq, ValueEnum)]
enum Mode {
    /// Batched redb transactions straight into the store's tables.
    Bulk,
    /// One `EmbeddedBackend::put_app` (a durable transaction) per app.
    Store,
}

#[derive(Parser, Debug)]
#[command(about = "Seed an embedded tollgate store with apps and keys")]
struct Args {
    /// Data directory (as `tollgate serve --data-dir`); created when missing.
    #[arg(long)]
    data_dir: PathBuf,
    /// Number of apps (one key each).
    #[arg(long, default_value_t = 100_000)]
    apps: usize,
    /// Index of the first app (to add more apps to a seeded store).
    #[arg(long, default_value_t = 0)]
    start: usize,
    /// Product every app is on (created in the store when missing).
    #[arg(long, default_value = "seeded")]
    product: String,
    /// Path template of the product's one operation (created products only).
    #[arg(long, default_value = "/verify/**")]
    operation: String,
    #[arg(long, value_enum, default_value_t = Mode::Bulk)]
    mode: Mode,
    /// Apps per write transaction (`--mode bulk`).
    #[arg(long, default_value_t = 10_000)]
    batch: usize,
    /// One JSON line of figures instead of the text report.
    #[arg(long)]
    json: bool,
}

/// The key of seeded app `i`.
fn key_of(i: usize) -> String {
    format!("tg_seed_{i:010}")
}

fn app_of(i: usize, product: &str, now: i64) -> App {
    App {
        name: format!("seed-app-{i:06}"),
        developer_email: format!("dev{i}@seed.example.com"),
        status: Default::default(),
        products: vec![product.to_owned()],
        keys: vec![ApiKey {
            id: format!("key_{i:016x}"),
            hash: hash_key(&key_of(i)),
            status: KeyStatus::Approved,
            expires_at: None,
            created_at: now,
        }],
        attributes: Default::default(),
        origin: Origin::Api,
        revision: 0,
    }
}

fn product_of(name: &str, operation: &str) -> ApiProduct {
    ApiProduct {
        name: name.to_owned(),
        description: "seeded by benches/seed_store.rs".into(),
        operations: vec![Operation {
            path: operation.to_owned(),
            methods: vec!["POST".into()],
            models: vec![],
            ..Default::default()
        }],
        quota: None,
        llm_token_quota: None,
        approval_type: Default::default(),
        attributes: Default::default(),
        origin: Origin::Api,
        revision: 0,
    }
}

type Error = Box<dyn std::error::Error>;

fn seed_bulk(args: &Args, now: i64) -> Result<(), Error> {
    let db = Database::create(args.data_dir.join(DB_FILE))?;
    {
        let txn = db.begin_write()?;
        {
            let mut products = txn.open_table(PRODUCTS)?;
            if products.get(args.product.as_str())?.is_none() {
                let json = serde_json::to_vec(&product_of(&args.product, &args.operation))?;
                products.insert(args.product.as_str(), json.as_slice())?;
            }
        }
        txn.commit()?;
    }
    let end = args.start + args.apps;
    let mut i = args.start;
    while i < end {
        let upto = (i + args.batch.max(1)).min(end);
        let mut txn = db.begin_write()?;
        txn.set_durability(Durability::Immediate)?;
        {
            let mut apps = txn.open_table(APPS)?;
            for j in i..upto {
                let app = app_of(j, &args.product, now);
                if apps.get(app.name.as_str())?.is_some() {
                    return Err(format!("app `{}` already exists", app.name).into());
                }
                let json = serde_json::to_vec(&app)?;
                apps.insert(app.name.as_str(), json.as_slice())?;
            }
        }
        txn.commit()?;
        i = upto;
    }
    Ok(())
}

async fn seed_store(args: &Args, now: i64) -> Result<(), Error> {
    let dir = args.data_dir.clone();
    let store = Store::new(std::sync::Arc::new(
        tokio::task::spawn_blocking(move || EmbeddedBackend::open(&dir)).await??,
    ));
    if store.get_product(&args.product).await?.is_none() {
        store
            .put_product(&product_of(&args.product, &args.operation), Write::Create)
            .await?;
    }
    for i in args.start..args.start + args.apps {
        store
            .put_app(&app_of(i, &args.product, now), Write::Create)
            .await?;
    }
    Ok(())
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args = Args::parse();
    if let Err(e) = run(&args).await {
        eprintln!("seed_store: {e}");
        std::process::exit(1);
    }
}

async fn run(args: &Args) -> Result<(), Error> {
    let now = i64::try_from(SystemTime::now().duration_since(UNIX_EPOCH)?.as_millis())?;
    // Creates the directory, the file and both tables exactly as tollgate does.
    drop(EmbeddedBackend::open(&args.data_dir)?);

    let t0 = Instant::now();
    match args.mode {
        Mode::Bulk => seed_bulk(args, now)?,
        Mode::Store => seed_store(args, now).await?,
    }
    let seed_s = t0.elapsed().as_secs_f64();

    // Read it back the way `tollgate serve` does at startup.
    let t1 = Instant::now();
    let dir = args.data_dir.clone();
    let store = Store::new(std::sync::Arc::new(
        tokio::task::spawn_blocking(move || EmbeddedBackend::open(&dir)).await??,
    ));
    let contents = store.snapshot().await?;
    let check_s = t1.elapsed().as_secs_f64();
    drop(store);
    let file_bytes = std::fs::metadata(args.data_dir.join(DB_FILE))?.len();
    let sample = key_of(args.start + args.apps / 2);
    let mode = format!("{:?}", args.mode).to_lowercase();
    let rate = args.apps as f64 / seed_s.max(1e-9);
    if args.json {
        println!(
            concat!(
                r#"{{"mode":"{}","apps_written":{},"seed_s":{:.3},"apps_per_s":{:.0},"#,
                r#""store_apps":{},"store_products":{},"open_and_snapshot_s":{:.3},"#,
                r#""file_bytes":{},"sample_key":"{}"}}"#
            ),
            mode,
            args.apps,
            seed_s,
            rate,
            contents.apps.len(),
            contents.products.len(),
            check_s,
            file_bytes,
            sample
        );
    } else {
        println!(
            "seeded {} apps ({mode}) in {seed_s:.2}s ({rate:.0} apps/s) into {}",
            args.apps,
            args.data_dir.join(DB_FILE).display()
        );
        println!(
            "store now holds {} apps and {} products; open + snapshot {check_s:.2}s; file {:.1} MB",
            contents.apps.len(),
            contents.products.len(),
            file_bytes as f64 / 1e6
        );
        println!("sample key: {sample}");
    }
    Ok(())
}
