//! `cargo bench --bench segments`: profiles (the bundled computed traits) and 20 segments over
//! generated events, next to DuckDB running the same SQL on the same resolved events.
//!
//! TESSERA_BENCH_SEGMENT_PEOPLE (default 322000, about 10M events over 30 days) sets the size.
//! DuckDB comes from the project's .venv (scripts/test.sh makes it) or TESSERA_BENCH_PYTHON.
//! DuckDB's side computes the same computed traits but not the identifier lists or the merged
//! identify traits, which favours it. Both write every segment to Parquet.

use std::path::{Path, PathBuf};
use std::time::Instant;

mod common;

use tessera::cli::generate::{generate, GenerateOptions};
use tessera::config::Project;
use tessera::progress::Progress;
use tessera::storage::Place;

/// Fifteen more segments, on top of the five the project ships.
const EXTRA: &[(&str, &str)] = &[
    ("high_value_100", "SELECT profile_id FROM profiles WHERE revenue_total >= 100"),
    ("high_value_300", "SELECT profile_id FROM profiles WHERE revenue_total >= 300"),
    ("high_value_500", "SELECT profile_id FROM profiles WHERE revenue_total >= 500"),
    ("active_7d", "SELECT profile_id FROM profiles WHERE last_seen >= as_of() - INTERVAL '7 days'"),
    ("active_14d", "SELECT profile_id FROM profiles WHERE last_seen >= as_of() - INTERVAL '14 days'"),
    ("active_60d", "SELECT profile_id FROM profiles WHERE last_seen >= as_of() - INTERVAL '60 days'"),
    ("repeat_buyers", "SELECT profile_id FROM profiles WHERE orders_90d >= 2"),
    ("loyal_buyers", "SELECT profile_id FROM profiles WHERE orders_90d >= 3"),
    ("likes_shoes", "SELECT profile_id FROM profiles WHERE favourite_category = 'shoes'"),
    ("likes_hats", "SELECT profile_id FROM profiles WHERE favourite_category = 'hats'"),
    ("likes_bags", "SELECT profile_id FROM profiles WHERE favourite_category = 'bags'"),
    ("came_from_google", "SELECT profile_id FROM profiles WHERE first_source = 'google'"),
    ("came_from_newsletter", "SELECT profile_id FROM profiles WHERE first_source = 'newsletter'"),
    ("browsers_not_buyers", "SELECT profile_id FROM profiles WHERE viewed_product_count_30d >= 5 AND orders_90d IS NULL"),
    ("big_spenders_active", "SELECT h.profile_id FROM segments.high_value_300 h JOIN segments.active_14d a ON a.profile_id = h.profile_id"),
];

fn main() {
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let people: u64 = common::env_number("TESSERA_BENCH_SEGMENT_PEOPLE", 322_000);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let data = repo.join(format!("target/bench-data/people-{people}-days-30"));
    if !data.join("truth.parquet").exists() {
        let place = Place::open(data.to_str().unwrap(), Path::new("/"), "bench").unwrap();
        let options = GenerateOptions {
            people,
            days: 30,
            ..Default::default()
        };
        rt.block_on(generate(&place, &options, Progress::new(true)))
            .unwrap();
    }

    // The bundled project over the generated events, plus fifteen segments.
    let project_dir = tempfile::tempdir().unwrap();
    let config = std::fs::read_to_string(repo.join("tessera.toml"))
        .unwrap()
        .replace(
            "events = \"data/events\"",
            &format!("events = \"{}\"", data.join("events").display()),
        );
    std::fs::write(project_dir.path().join("tessera.toml"), config).unwrap();
    let queries = project_dir.path().join("queries");
    for kind in ["identity", "traits", "segments"] {
        std::fs::create_dir_all(queries.join(kind)).unwrap();
        for entry in std::fs::read_dir(repo.join("queries").join(kind)).unwrap() {
            let path = entry.unwrap().path();
            std::fs::copy(&path, queries.join(kind).join(path.file_name().unwrap())).unwrap();
        }
    }
    for (name, sql) in EXTRA {
        std::fs::write(queries.join("segments").join(format!("{name}.sql")), sql).unwrap();
    }
    let duck_dir = project_dir.path().join("duckdb-segments");
    std::fs::create_dir_all(&duck_dir).unwrap();
    for entry in std::fs::read_dir(queries.join("segments")).unwrap() {
        let path = entry.unwrap().path();
        let sql = std::fs::read_to_string(&path)
            .unwrap()
            .replace("segments.", "seg_");
        std::fs::write(duck_dir.join(path.file_name().unwrap()), sql).unwrap();
    }

    let engine = rt
        .block_on(tessera::engine::Engine::open(
            Project::load(project_dir.path()).unwrap(),
        ))
        .unwrap();
    let as_of = chrono::DateTime::parse_from_rfc3339("2026-10-31T00:00:00Z")
        .unwrap()
        .with_timezone(&chrono::Utc);
    let options = tessera::pipeline::RunOptions {
        full: false,
        as_of: Some(as_of),
    };
    let started = Instant::now();
    let report = rt
        .block_on(tessera::pipeline::run_on(
            &engine,
            &options,
            Progress::hidden(),
        ))
        .unwrap();
    let run_secs = started.elapsed().as_secs_f64();
    let rss = common::peak_rss_mib();
    let stage = |name: &str| {
        report
            .stages
            .iter()
            .find(|s| s.stage == name)
            .map(|s| s.ms as f64 / 1000.0)
            .unwrap_or(0.0)
    };
    let segments = report
        .tables
        .keys()
        .filter(|k| k.starts_with("segments/"))
        .count();

    // DuckDB reads the same resolved events.
    let resolved = project_dir.path().join("resolved.parquet");
    rt.block_on(async {
        engine
            .ctx
            .sql("SELECT * FROM events WHERE profile_id IS NOT NULL")
            .await
            .unwrap()
            .write_parquet(
                resolved.to_str().unwrap(),
                datafusion::dataframe::DataFrameWriteOptions::new().with_single_file_output(true),
                None,
            )
            .await
            .unwrap();
    });
    let python = std::env::var("TESSERA_BENCH_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|_| repo.join(".venv/bin/python"));
    let out = std::process::Command::new(&python)
        .arg(repo.join("tests/py/segments_bench_duckdb.py"))
        .arg(&resolved)
        .arg(&duck_dir)
        .arg(project_dir.path().join("duckdb-out"))
        .arg("2026-10-31 00:00:00+00")
        .output()
        .expect("python with duckdb (run scripts/test.sh once to make .venv)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let duck: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();

    println!("| engine | events | segments | profiles (s) | segments (s) | profiles + segments (s) | whole run (s) | peak RSS (MiB) |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    println!(
        "| Tessera | {} | {segments} | {:.2} | {:.2} | {:.2} | {run_secs:.2} | {rss:.0} |",
        report.events,
        stage("profiles"),
        stage("segments"),
        stage("profiles") + stage("segments")
    );
    println!(
        "| DuckDB | {} | {} | {:.2} | {:.2} | {:.2} | - | {:.0} |",
        report.events,
        duck["segments"],
        duck["profiles_s"].as_f64().unwrap(),
        duck["segments_s"].as_f64().unwrap(),
        duck["total_s"].as_f64().unwrap(),
        duck["peak_rss_mib"].as_f64().unwrap()
    );
}
