//! `cargo bench`: the pipeline on generated events, stage by stage.
//!
//! Sizes come from TESSERA_BENCH_PEOPLE (comma-separated, default 20000) and
//! TESSERA_BENCH_DAYS (default 30). Generated events are cached under
//! target/bench-data/ so later runs measure only the pipeline. Prints a Markdown table and
//! writes the same figures to target/bench-data/pipeline.csv.

use std::time::Instant;

mod common;

use tessera::config::Project;
use tessera::pipeline::{run, RunOptions};
use tessera::progress::Progress;

fn main() {
    // `cargo bench` passes --bench; nothing else is read from the command line.
    let people: Vec<u64> = std::env::var("TESSERA_BENCH_PEOPLE")
        .unwrap_or_else(|_| "20000".into())
        .split(',')
        .map(|s| {
            s.trim()
                .parse()
                .expect("TESSERA_BENCH_PEOPLE holds whole numbers")
        })
        .collect();
    let days: u32 = common::env_number("TESSERA_BENCH_DAYS", 30);
    let root = common::data_root();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();

    let mut lines =
        vec!["people,days,rows_read,stage,seconds,rows_per_second,peak_rss_mib".to_string()];
    println!("| people | rows read | stage | seconds | rows/s | peak RSS (MiB) |");
    println!("|---:|---:|---|---:|---:|---:|");
    for &n in &people {
        let data = rt.block_on(common::generated(n, days));
        let project_dir = tempfile::tempdir().unwrap();
        std::fs::write(
            project_dir.path().join("tessera.toml"),
            format!(
                "[storage]\nevents = \"{}/events\"\noutput = \"out\"\n",
                data.display()
            ),
        )
        .unwrap();
        let project = Project::load(project_dir.path()).unwrap();
        let started = Instant::now();
        let report = rt
            .block_on(run(project, &RunOptions::default(), Progress::hidden()))
            .unwrap();
        let total = started.elapsed().as_secs_f64();
        let rss = common::peak_rss_mib();
        let mut stages: Vec<(String, f64)> = report
            .timings_ms
            .iter()
            .map(|(s, ms)| (s.clone(), *ms as f64 / 1000.0))
            .collect();
        stages.push(("total".into(), total));
        for (stage, secs) in stages {
            let rate = report.rows_read as f64 / secs.max(1e-9);
            println!(
                "| {n} | {} | {stage} | {secs:.2} | {rate:.0} | {rss:.0} |",
                report.rows_read
            );
            lines.push(format!(
                "{n},{days},{},{stage},{secs:.3},{rate:.0},{rss:.0}",
                report.rows_read
            ));
        }
    }
    std::fs::write(root.join("pipeline.csv"), lines.join("\n") + "\n").unwrap();
}
