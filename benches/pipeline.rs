//! `cargo bench --bench pipeline`: the bundled project's whole pipeline on generated events,
//! beside the scan floor and the same pipeline in DuckDB SQL — the harness `tessera bench` runs.
//!
//! Settings (environment):
//! - TESSERA_BENCH_SIZES: event counts, comma-separated (default `1M,10M`; `100M` takes
//!   about half an hour the first time, most of it generating the events).
//! - TESSERA_BENCH_PYTHON: a Python with the packages of benches/requirements.txt (default
//!   `.venv/bin/python`); the DuckDB baseline is skipped when it is missing, and reported as
//!   failed when it lacks NumPy or SciPy.
//! - TESSERA_BENCH_MEMORY_LIMIT: a memory limit for both engines, e.g. `4GiB`.
//! - TESSERA_BENCH_INCREMENTAL=0 skips the incremental run.
//! - TESSERA_BENCH_DATA: the generator's data sets, comma-separated (default
//!   `friendly,adversarial`; each size runs on each, reported side by side).
//!
//! Generated events are cached under target/bench-data/; the results go to
//! target/bench-data/bench.csv and bench.md and are printed.

use std::path::PathBuf;

mod common;

use tessera::cli::bench::{parse_count, run, write, BenchOptions};
use tessera::progress::Progress;

fn main() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let sizes = std::env::var("TESSERA_BENCH_SIZES").unwrap_or_else(|_| "1M,10M".into());
    let python = std::env::var("TESSERA_BENCH_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|_| root.join(".venv/bin/python"));
    let options = BenchOptions {
        sizes: sizes
            .split(',')
            .map(|s| parse_count(s).expect("TESSERA_BENCH_SIZES holds sizes like 1M,10M"))
            .collect(),
        project: root.clone(),
        data_dir: common::data_root(),
        exe: PathBuf::from(env!("CARGO_BIN_EXE_tessera")),
        python: python.exists().then_some(python),
        memory_limit: std::env::var("TESSERA_BENCH_MEMORY_LIMIT").ok(),
        incremental: std::env::var("TESSERA_BENCH_INCREMENTAL").map_or(true, |v| v != "0"),
        data_sets: common::data_sets(),
    };
    if options.python.is_none() {
        eprintln!("no Python for the DuckDB baseline (set TESSERA_BENCH_PYTHON to one with benches/requirements.txt): skipping the DuckDB baseline");
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let report = rt.block_on(run(&options, Progress::new(true))).unwrap();
    println!("{}", report.markdown());
    for path in write(&report, &options.data_dir).unwrap() {
        eprintln!("wrote {path}");
    }
}
