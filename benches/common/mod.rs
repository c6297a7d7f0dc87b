//! What the benchmarks share: memory readings and generated events cached between runs.
#![allow(dead_code)] // each benchmark uses a part

pub mod legacy_intake;

use std::path::{Path, PathBuf};
use std::time::Instant;

use tessera::cli::generate::{generate, GenerateOptions, Preset};
use tessera::progress::Progress;
use tessera::storage::Place;

/// A `/proc/self/status` field in KiB (Linux), e.g. `VmRSS:` or `VmHWM:`.
pub fn status_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Peak resident memory of this process so far, in MiB.
pub fn peak_rss_mib() -> f64 {
    status_kib("VmHWM:") as f64 / 1024.0
}

/// Resets the peak so the next reading covers only what follows.
pub fn reset_peak() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// The whole number in environment variable `name`, or `default` when it is unset.
pub fn env_number<T: std::str::FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Ok(text) => text
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name} is a whole number, not {text:?}")),
        Err(_) => default,
    }
}

/// `target/bench-data/`, where generated events and the CSV results go.
pub fn data_root() -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/bench-data");
    std::fs::create_dir_all(&root).expect("target/bench-data is writable");
    root
}

/// Generated events for `people` over `days` (default seed, friendly data), made once and cached.
pub async fn generated(people: u64, days: u32) -> PathBuf {
    generated_as(people, days, Preset::Friendly).await
}

/// The data sets in TESSERA_BENCH_DATA (comma-separated `friendly`, `adversarial`; default both).
pub fn data_sets() -> Vec<Preset> {
    let text =
        std::env::var("TESSERA_BENCH_DATA").unwrap_or_else(|_| "friendly,adversarial".into());
    text.split(',')
        .map(|s| match s.trim() {
            "friendly" => Preset::Friendly,
            "adversarial" => Preset::Adversarial,
            other => panic!("TESSERA_BENCH_DATA holds friendly or adversarial, not {other:?}"),
        })
        .collect()
}

/// Generated events for `people` over `days` (default seed) of data set `preset`, made once and
/// cached.
pub async fn generated_as(people: u64, days: u32, preset: Preset) -> PathBuf {
    let name = match preset {
        Preset::Friendly => format!("people-{people}-days-{days}"),
        other => format!(
            "people-{people}-days-{days}-{}",
            tessera::cli::bench::data_name(other)
        ),
    };
    let dir = data_root().join(name);
    if !dir.join("truth.parquet").exists() {
        let place = Place::open(dir.to_str().unwrap(), Path::new("/"), "bench").unwrap();
        let options = GenerateOptions {
            people,
            days,
            ..GenerateOptions::default()
        }
        .with_preset(preset);
        let started = Instant::now();
        let summary = generate(&place, &options, Progress::new(true))
            .await
            .unwrap();
        eprintln!(
            "generated {} rows in {:.1}s",
            summary.rows,
            started.elapsed().as_secs_f64()
        );
    }
    dir
}
