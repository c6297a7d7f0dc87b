//! `cargo bench --bench predictions`: fit time and predictions per second at scale.
//!
//! Buyers are simulated from BG/NBD and Gamma-Gamma with known parameters (so the fit can be
//! checked as well as timed), written as purchase events plus page views, and run through a
//! whole `tessera run` in a child process. Printed and written to
//! target/bench-data/predictions.csv: the run's wall time, its journeys stage, the fit time,
//! predictions per second, and the fitted parameters beside the true ones.
//!
//! Settings (environment):
//! - TESSERA_BENCH_BUYERS: buyers to simulate (default 1000000, about 10M events).
//!
//! The events are cached under target/bench-data/predictions-<buyers>/.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use arrow::array::{ArrayRef, RecordBatch, StringArray, TimestampMicrosecondArray};
use arrow::datatypes::{DataType, Field, Schema, TimeUnit};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

mod common;

/// The true parameters (time in weeks, money in dollars).
const R: f64 = 0.5;
const ALPHA: f64 = 2.5;
const A: f64 = 0.8;
const B: f64 = 2.5;
const P: f64 = 6.0;
const Q: f64 = 4.0;
const GAMMA: f64 = 15.0;
/// Buyers make their first purchase in the first half of a 52-week observation period.
const WEEKS: f64 = 52.0;
/// Page views per buyer, on average, around the purchases.
const PAGE_VIEWS: f64 = 6.0;
/// 2026-01-05T00:00:00Z in µs: week 0.
const START: i64 = 1_767_571_200_000_000;
const WEEK: f64 = 7.0 * 86_400.0 * 1e6;

/// One event: message_id, type, event, user_id, timestamp (µs), properties.
type Row = (
    String,
    &'static str,
    Option<&'static str>,
    String,
    i64,
    String,
);

/// Gamma(shape, rate) by Marsaglia and Tsang's method (with the boost for shape < 1).
fn gamma(rng: &mut ChaCha8Rng, shape: f64, rate: f64) -> f64 {
    if shape < 1.0 {
        let u: f64 = rng.gen::<f64>().max(f64::MIN_POSITIVE);
        return gamma(rng, shape + 1.0, rate) * u.powf(1.0 / shape);
    }
    let d = shape - 1.0 / 3.0;
    let c = 1.0 / (9.0 * d).sqrt();
    loop {
        // A standard normal by Box–Muller.
        let (u1, u2): (f64, f64) = (rng.gen::<f64>().max(f64::MIN_POSITIVE), rng.gen());
        let z = (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos();
        let v = (1.0 + c * z).powi(3);
        if v <= 0.0 {
            continue;
        }
        let u: f64 = rng.gen();
        if u.ln() < 0.5 * z * z + d - d * v + d * v.ln() {
            return d * v / rate;
        }
    }
}

fn beta(rng: &mut ChaCha8Rng, a: f64, b: f64) -> f64 {
    let x = gamma(rng, a, 1.0);
    let y = gamma(rng, b, 1.0);
    x / (x + y)
}

fn exponential(rng: &mut ChaCha8Rng, rate: f64) -> f64 {
    -rng.gen::<f64>().max(f64::MIN_POSITIVE).ln() / rate
}

/// One buyer's purchases (week, value) and page views (week).
fn buyer(rng: &mut ChaCha8Rng) -> (Vec<(f64, f64)>, Vec<f64>) {
    let rate = gamma(rng, R, ALPHA);
    let drop = beta(rng, A, B);
    let scale = gamma(rng, Q, GAMMA);
    let mut t = rng.gen::<f64>() * WEEKS / 2.0;
    let mut purchases = vec![(t, gamma(rng, P, scale))];
    loop {
        t += exponential(rng, rate);
        if t >= WEEKS {
            break;
        }
        purchases.push((t, gamma(rng, P, scale)));
        if rng.gen::<f64>() < drop {
            break;
        }
    }
    let first = purchases[0].0;
    let views = (0..((PAGE_VIEWS * 2.0 * rng.gen::<f64>()) as usize))
        .map(|_| first + rng.gen::<f64>() * (WEEKS - first))
        .collect();
    (purchases, views)
}

/// Writes the simulated events as Parquet files (cached); returns the events folder.
fn simulate(buyers: u64) -> PathBuf {
    let dir = common::data_root().join(format!("predictions-{buyers}"));
    let events = dir.join("events");
    if dir.join("done").exists() {
        return events;
    }
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&events).expect("mkdir");
    let started = Instant::now();
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let mut rows: Vec<Row> = Vec::new();
    let mut files = 0;
    let mut total = 0u64;
    let flush = |rows: &mut Vec<_>, files: &mut usize| {
        write_file(&events.join(format!("part-{:04}.parquet", *files)), rows);
        *files += 1;
        rows.clear();
    };
    for id in 0..buyers {
        let user = format!("u{id:08}");
        let (purchases, views) = buyer(&mut rng);
        for (i, (week, value)) in purchases.iter().enumerate() {
            rows.push((
                format!("{user}-o{i}"),
                "track",
                Some("Order Completed"),
                user.clone(),
                START + (week * WEEK) as i64,
                format!(r#"{{"revenue": {value:.2}}}"#),
            ));
        }
        for (i, week) in views.iter().enumerate() {
            rows.push((
                format!("{user}-v{i}"),
                "page",
                None,
                user.clone(),
                START + (week * WEEK) as i64,
                "{}".to_string(),
            ));
        }
        if rows.len() >= 500_000 {
            total += rows.len() as u64;
            flush(&mut rows, &mut files);
        }
    }
    if !rows.is_empty() {
        total += rows.len() as u64;
        flush(&mut rows, &mut files);
    }
    std::fs::write(dir.join("done"), total.to_string()).expect("write marker");
    eprintln!(
        "simulated {buyers} buyers: {total} events in {files} files, {:.1} s",
        started.elapsed().as_secs_f64()
    );
    events
}

fn write_file(path: &Path, rows: &[Row]) {
    let ts = DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()));
    let schema = Arc::new(Schema::new(vec![
        Field::new("message_id", DataType::Utf8, false),
        Field::new("type", DataType::Utf8, false),
        Field::new("event", DataType::Utf8, true),
        Field::new("user_id", DataType::Utf8, false),
        Field::new("timestamp", ts, false),
        Field::new("properties", DataType::Utf8, true),
    ]));
    let columns: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from_iter_values(
            rows.iter().map(|r| r.0.as_str()),
        )),
        Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.1))),
        Arc::new(rows.iter().map(|r| r.2).collect::<StringArray>()),
        Arc::new(StringArray::from_iter_values(
            rows.iter().map(|r| r.3.as_str()),
        )),
        Arc::new(
            TimestampMicrosecondArray::from_iter_values(rows.iter().map(|r| r.4))
                .with_timezone("UTC"),
        ),
        Arc::new(StringArray::from_iter_values(
            rows.iter().map(|r| r.5.as_str()),
        )),
    ];
    let batch = RecordBatch::try_new(schema.clone(), columns).expect("batch");
    let bytes = tessera::cli::generate::parquet_bytes(schema, &[batch]).expect("encode");
    std::fs::write(path, bytes).expect("write parquet");
}

fn main() {
    let buyers: u64 = common::env_number("TESSERA_BENCH_BUYERS", 1_000_000);
    let events = simulate(buyers);
    let project = common::data_root().join(format!("predictions-{buyers}/project"));
    let _ = std::fs::remove_dir_all(&project);
    std::fs::create_dir_all(&project).expect("mkdir");
    std::fs::write(
        project.join("tessera.toml"),
        format!(
            "[storage]\nevents = \"{}\"\noutput = \"out\"\n\n[identity]\n[[identity.identifiers]]\nname = \"user_id\"\n",
            events.display()
        ),
    )
    .expect("write config");
    let as_of = chrono::DateTime::from_timestamp_micros(START + (WEEKS * WEEK) as i64)
        .expect("a time")
        .to_rfc3339();
    let started = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_tessera"))
        .arg("--project")
        .arg(&project)
        .args(["run", "--json", "--quiet", "--as-of", &as_of])
        .output()
        .expect("tessera runs");
    let wall = started.elapsed().as_secs_f64();
    assert!(
        out.status.success(),
        "tessera run failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("run --json prints a report");
    let stage = |name: &str| {
        report["stages"]
            .as_array()
            .and_then(|s| s.iter().find(|s| s["stage"] == name))
            .and_then(|s| s["ms"].as_f64())
            .unwrap_or(f64::NAN)
            / 1000.0
    };
    let p = &report["predictions"];
    let fitted = |model: &str, k: &str| p["models"][model][k].as_f64().unwrap_or(f64::NAN);
    let n = p["buyers"].as_f64().unwrap_or(0.0);
    let fit_s = p["fit_ms"].as_f64().unwrap_or(f64::NAN) / 1000.0;
    let predict_s = p["predict_ms"].as_f64().unwrap_or(f64::NAN) / 1000.0;
    let mut md = String::new();
    md.push_str(&format!(
        "| events | buyers | run (s) | journeys stage (s) | fit (s) | predict (s) | predictions/s |\n|---:|---:|---:|---:|---:|---:|---:|\n| {} | {} | {wall:.1} | {:.1} | {fit_s:.2} | {predict_s:.2} | {:.0} |\n\n",
        report["events"], n, stage("journeys"), n / predict_s
    ));
    md.push_str("| parameter | true | fitted |\n|---|---:|---:|\n");
    let mut csv = String::from("parameter,true,fitted\n");
    for (model, k, truth) in [
        ("bgnbd", "r", R),
        ("bgnbd", "alpha", ALPHA),
        ("bgnbd", "a", A),
        ("bgnbd", "b", B),
        ("gamma_gamma", "p", P),
        ("gamma_gamma", "q", Q),
        ("gamma_gamma", "gamma", GAMMA),
    ] {
        let got = fitted(model, k);
        md.push_str(&format!("| {model}.{k} | {truth} | {got:.4} |\n"));
        csv.push_str(&format!("{model}.{k},{truth},{got}\n"));
    }
    csv.push_str(&format!(
        "events,,{}\nbuyers,,{n}\nrun_seconds,,{wall}\njourneys_seconds,,{}\nfit_seconds,,{fit_s}\npredict_seconds,,{predict_s}\n",
        report["events"],
        stage("journeys")
    ));
    println!("{md}");
    let path = common::data_root().join("predictions.csv");
    std::fs::write(&path, csv).expect("write csv");
    eprintln!("wrote {}", path.display());
}
