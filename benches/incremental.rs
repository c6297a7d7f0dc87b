//! `cargo bench --bench incremental`: a full run over all days but the last, then an
//! incremental run that adds the last day, then a `--full` run over everything, with the bundled
//! project's queries and rules.
//!
//! TESSERA_BENCH_PEOPLE (default 100000) and TESSERA_BENCH_DAYS (default 100) size the
//! generated events (cached under target/bench-data/); with 100 days the last day is about 1%
//! of the events. Prints a Markdown table and writes target/bench-data/incremental.csv.

use std::path::Path;
use std::time::Instant;

mod common;

use tessera::config::Project;
use tessera::pipeline::{run, RunOptions};
use tessera::progress::Progress;

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let path = entry.unwrap().path();
        let target = to.join(path.file_name().unwrap());
        if path.is_dir() {
            copy_dir(&path, &target);
        } else {
            std::fs::copy(&path, &target).unwrap();
        }
    }
}

fn main() {
    let people: u64 = common::env_number("TESSERA_BENCH_PEOPLE", 100_000);
    let days: u32 = common::env_number("TESSERA_BENCH_DAYS", 100);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let data = rt.block_on(common::generated(people, days));
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));

    // The bundled project, reading a copy of the events we can add a day to.
    let dir = tempfile::tempdir_in(common::data_root()).unwrap();
    let events = dir.path().join("events");
    let bundled = std::fs::read_to_string(repo.join("tessera.toml")).unwrap();
    let config: String = bundled
        .lines()
        .map(|line| {
            if line.starts_with("events = ") {
                format!("events = \"{}\"\n", events.display())
            } else {
                format!("{line}\n")
            }
        })
        .collect();
    std::fs::write(dir.path().join("tessera.toml"), config).unwrap();
    copy_dir(&repo.join("queries"), &dir.path().join("queries"));
    let mut day_dirs: Vec<_> = std::fs::read_dir(data.join("events"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    day_dirs.sort();
    let (last, earlier) = day_dirs.split_last().expect("at least one day");
    for day in earlier {
        copy_dir(day, &events.join(day.file_name().unwrap()));
    }
    let as_of = chrono::Utc::now();

    let mut rows = Vec::new();
    for (name, full, add_last) in [
        ("full, all days but the last", true, false),
        ("incremental, adds the last day", false, true),
        ("full, all days (--full)", true, false),
        ("incremental, nothing new", false, false),
    ] {
        if add_last {
            copy_dir(last, &events.join(last.file_name().unwrap()));
        }
        let project = Project::load(dir.path()).unwrap();
        common::reset_peak();
        let started = Instant::now();
        let options = RunOptions {
            full,
            as_of: Some(as_of),
        };
        let report = rt
            .block_on(run(project, &options, Progress::hidden()))
            .unwrap();
        let secs = started.elapsed().as_secs_f64();
        rows.push((
            name,
            full,
            report.events,
            report.new_events,
            secs,
            common::peak_rss_mib(),
        ));
    }
    // Incremental runs are compared with the `--full` run over the same events.
    let full_secs = rows[2].4;
    let mut lines = vec!["run,events,new_events,seconds,share_of_full,peak_rss_mib".to_string()];
    println!("| run | events in history | new events | seconds | vs `--full` | peak RSS (MiB) |");
    println!("|---|---:|---:|---:|---:|---:|");
    for (name, full, events, new, secs, rss) in rows {
        let share = if full {
            String::new()
        } else {
            format!("{:.1}%", 100.0 * secs / full_secs)
        };
        println!("| {name} | {events} | {new} | {secs:.2} | {share} | {rss:.0} |");
        lines.push(format!("{name},{events},{new},{secs:.3},{share},{rss:.0}"));
    }
    std::fs::write(
        common::data_root().join("incremental.csv"),
        lines.join("\n") + "\n",
    )
    .unwrap();
}
