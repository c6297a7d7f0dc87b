//! `tessera bench` (and `cargo bench --bench pipeline`): the project's whole pipeline on
//! generated events at chosen sizes, beside the floor (just scanning and decoding the event
//! columns) and the same pipeline in DuckDB SQL, stage by stage, written to CSV and Markdown.
//!
//! Every size runs on two data sets from the generator: `friendly` (its defaults: each person's
//! events together) and `adversarial` (its preset of shuffled rows, many anonymous ids, shared
//! devices and varied junk), reported side by side: a figure that holds only on friendly data
//! is not a result.
//!
//! Generated events are cached per size, so a second bench measures only the engines. Each
//! Tessera run is a child `tessera run --json` process (a fresh process per run, as a
//! scheduler would start it) and its per-stage figures come from its report; DuckDB runs
//! `benches/duckdb_pipeline.py` (built into the binary) with the given Python.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use futures::StreamExt;
use serde::Serialize;

use crate::cli::generate::{generate, GenerateOptions, Preset};
use crate::config::CONFIG_FILE;
use crate::error::{Error, Result};
use crate::metrics::{Meter, StageStats};
use crate::progress::Progress;
use crate::storage::Place;

/// The DuckDB baseline, written next to the work folders when it runs.
const DUCKDB_SCRIPT: &str = include_str!("../../benches/duckdb_pipeline.py");
/// Generated days per size; people are chosen so that the events come to about the size.
const DAYS: u32 = 30;
/// Events the generator makes per person over [`DAYS`] days (measured: 322,580 people give
/// 9.66 million events after checks and deduplication, 10.0 million rows).
const EVENTS_PER_PERSON: u64 = 31;
/// The share of the event rows an incremental run adds (at least one row).
const INCREMENTAL_SHARE: f64 = 0.01;

/// What to measure.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Event counts to generate and run, e.g. 1,000,000.
    pub sizes: Vec<u64>,
    /// The project whose tessera.toml and queries/ run (its storage settings are replaced).
    pub project: PathBuf,
    /// Where generated events are cached and the runs write.
    pub data_dir: PathBuf,
    /// The `tessera` executable that runs the pipeline.
    pub exe: PathBuf,
    /// Python with the `duckdb` package, for the baseline; `None` skips it.
    pub python: Option<PathBuf>,
    /// Memory limit for both engines (`--memory-limit`), e.g. `4GiB`.
    pub memory_limit: Option<String>,
    /// Also time an incremental run that adds the last 1% of the files.
    pub incremental: bool,
    /// The generator's data sets to run on, each size on each.
    pub data_sets: Vec<Preset>,
}

/// The name a data set goes by in reports and cache folders.
pub fn data_name(preset: Preset) -> &'static str {
    match preset {
        Preset::Friendly => "friendly",
        Preset::Adversarial => "adversarial",
    }
}

/// One measured stage of one engine at one size.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// Target size (events).
    pub size: u64,
    /// Event rows in the input files.
    pub rows: u64,
    /// The data set: `friendly` or `adversarial`.
    pub data: String,
    /// `floor`, `tessera`, `tessera incremental` or `duckdb`.
    pub engine: String,
    /// The stage's figures; stage `total` is the whole process.
    pub stats: StageStats,
}

/// Everything one bench measured.
#[derive(Debug, Clone, Default, Serialize)]
pub struct BenchReport {
    /// One row per engine and stage.
    pub rows: Vec<Row>,
    /// Engines that failed at a size and data set (size, "data: engine", error): the others'
    /// figures still count.
    pub failures: Vec<(u64, String, String)>,
    /// Per size, how the incremental run's tables compared with a `--full` run's over the
    /// same files: empty when equal, else the tables that differ.
    pub incremental_tables: Vec<(u64, String, Vec<String>)>,
}

/// Parses `1M`, `250k`, `1.5M`, `2G` or a plain number of events.
pub fn parse_count(text: &str) -> Result<u64> {
    let t = text.trim();
    let (number, scale) = match t.char_indices().last() {
        Some((i, 'k' | 'K')) => (&t[..i], 1e3),
        Some((i, 'm' | 'M')) => (&t[..i], 1e6),
        Some((i, 'g' | 'G' | 'b' | 'B')) => (&t[..i], 1e9),
        _ => (t, 1.0),
    };
    match number.trim().parse::<f64>() {
        Ok(n) if n > 0.0 && (n * scale) >= 1.0 => Ok((n * scale).round() as u64),
        _ => Err(Error::Usage(format!(
            "`{text}` is not a number of events; write e.g. 1M, 250k or 1000000"
        ))),
    }
}

/// A short label for a size: 1M, 10M, 250k.
pub fn label(size: u64) -> String {
    match size {
        s if s >= 1_000_000 && s % 1_000_000 == 0 => format!("{}M", s / 1_000_000),
        s if s >= 1_000 && s % 1_000 == 0 => format!("{}k", s / 1_000),
        s => s.to_string(),
    }
}

/// People to generate for about `size` events.
pub fn people_for(size: u64) -> u64 {
    (size / EVENTS_PER_PERSON).max(1)
}

/// The as-of time both engines use: the end of the generated days, so windows hold events.
fn as_of() -> chrono::DateTime<chrono::Utc> {
    let start = GenerateOptions::default().start;
    (start + chrono::Days::new(DAYS as u64))
        .and_hms_opt(0, 0, 0)
        .expect("midnight exists")
        .and_utc()
}

/// Generated events for `people` in data set `preset` (cached under `data_dir`), made when
/// missing.
pub async fn generated(
    data_dir: &Path,
    people: u64,
    preset: Preset,
    progress: Progress,
) -> Result<PathBuf> {
    let dir = data_dir.join(match preset {
        Preset::Friendly => format!("people-{people}-days-{DAYS}"),
        other => format!("people-{people}-days-{DAYS}-{}", data_name(other)),
    });
    let done = dir.join("truth.parquet");
    if !done.exists() {
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        let place = Place::open(&dir.display().to_string(), Path::new("/"), "bench data")?;
        let options = GenerateOptions {
            people,
            days: DAYS,
            ..GenerateOptions::default()
        }
        .with_preset(preset);
        tracing::info!(people, dir = %dir.display(), "generating events");
        generate(&place, &options, progress).await?;
    }
    Ok(dir)
}

/// Runs the bench.
pub async fn run(options: &BenchOptions, progress: Progress) -> Result<BenchReport> {
    let mut report = BenchReport::default();
    std::fs::create_dir_all(&options.data_dir).map_err(|e| Error::io(&options.data_dir, e))?;
    for &size in &options.sizes {
        for &preset in &options.data_sets {
            run_one(options, size, preset, &mut report, progress).await?;
        }
    }
    Ok(report)
}

/// One size on one data set.
async fn run_one(
    options: &BenchOptions,
    size: u64,
    preset: Preset,
    report: &mut BenchReport,
    progress: Progress,
) -> Result<()> {
    let data_set = data_name(preset);
    let data = generated(&options.data_dir, people_for(size), preset, progress).await?;
    let events = data.join("events");
    let files = event_files(&events)?;
    let rows = footer_rows(&files)?;
    let work = options
        .data_dir
        .join(format!("work-{}-{data_set}", label(size)));
    let add = |report: &mut BenchReport, engine: &str, stages: Vec<StageStats>| {
        for stats in stages {
            report.rows.push(Row {
                size,
                rows,
                data: data_set.to_string(),
                engine: engine.to_string(),
                stats,
            });
        }
    };
    let what = format!("{} {data_set}", label(size));
    let spinner = progress.spinner(&format!("{what}: scan floor"));
    add(report, "floor", vec![scan_floor(&events, rows).await?]);
    spinner.set_message(format!("{what}: tessera run"));
    let project = project_copy(options, &work.join("tessera"), &events)?;
    add(report, "tessera", tessera_run(options, &project, false)?);
    if options.incremental {
        spinner.set_message(format!("{what}: tessera incremental run"));
        let runs = incremental(options, &work, &files).await?;
        add(report, "tessera incremental", runs.incremental);
        add(report, "tessera no change", runs.unchanged);
        add(report, "tessera full after", runs.full);
        report
            .incremental_tables
            .push((size, data_set.to_string(), runs.differing));
    }
    if let Some(python) = &options.python {
        spinner.set_message(format!("{what}: duckdb baseline"));
        match duckdb_run(options, python, &work, &events) {
            Ok(stages) => add(report, "duckdb", stages),
            Err(e) => {
                tracing::warn!(size = %label(size), data = data_set, error = %e, "the DuckDB baseline failed");
                let last = e.to_string().lines().last().unwrap_or_default().to_string();
                report
                    .failures
                    .push((size, format!("{data_set}: duckdb"), last));
            }
        }
    }
    spinner.finish_and_clear();
    std::fs::remove_dir_all(&work).ok();
    Ok(())
}

/// Every Parquet file under `dir`, sorted (the generator names them by day).
fn event_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(d) = pending.pop() {
        for entry in std::fs::read_dir(&d).map_err(|e| Error::io(&d, e))? {
            let path = entry.map_err(|e| Error::io(&d, e))?.path();
            if path.is_dir() {
                pending.push(path);
            } else if path.extension().is_some_and(|e| e == "parquet") {
                files.push(path);
            }
        }
    }
    files.sort();
    Ok(files)
}

fn footer_rows(files: &[PathBuf]) -> Result<u64> {
    let mut rows = 0;
    for f in files {
        let file = std::fs::File::open(f).map_err(|e| Error::io(f, e))?;
        let reader = parquet::file::serialized_reader::SerializedFileReader::new(file)
            .map_err(|e| Error::Usage(format!("{}: not a Parquet file: {e}", f.display())))?;
        use parquet::file::reader::FileReader;
        rows += reader.metadata().file_metadata().num_rows() as u64;
    }
    Ok(rows)
}

/// The floor: scanning and decoding every event column the pipeline reads, nothing else.
async fn scan_floor(events: &Path, rows: u64) -> Result<StageStats> {
    let limits = crate::engine::Limits::from_config(&Default::default())?;
    let ctx = crate::engine::new_context_with(&limits)?;
    let meter = Meter::start(ctx.runtime_env().disk_manager.clone());
    let url = format!("{}/", events.display());
    let df = ctx
        .read_parquet(&url, datafusion::prelude::ParquetReadOptions::default())
        .await?;
    let columns: Vec<datafusion::prelude::Expr> = df
        .schema()
        .fields()
        .iter()
        .filter(|f| f.name() != "date")
        .map(|f| datafusion::prelude::ident(f.name()))
        .collect();
    let mut stream = df.select(columns)?.execute_stream().await?;
    let mut seen = 0u64;
    while let Some(batch) = stream.next().await {
        seen += batch?.num_rows() as u64;
    }
    let mut stats = meter.finish("scan", rows);
    stats.rows = seen;
    Ok(stats)
}

/// A copy of the project (its config and queries/) reading `events` and writing to `dir/out`.
fn project_copy(options: &BenchOptions, dir: &Path, events: &Path) -> Result<PathBuf> {
    std::fs::remove_dir_all(dir).ok();
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let config_file = options.project.join(CONFIG_FILE);
    let text = std::fs::read_to_string(&config_file).map_err(|e| Error::io(&config_file, e))?;
    let mut config: toml::Table = text.parse().map_err(|e| Error::Config {
        file: config_file.clone(),
        key: None,
        message: format!("not valid TOML: {e}"),
    })?;
    let storage = config
        .entry("storage")
        .or_insert_with(|| toml::Value::Table(Default::default()));
    if let toml::Value::Table(storage) = storage {
        storage.insert("events".into(), events.display().to_string().into());
        storage.insert("output".into(), "out".into());
    }
    let target = dir.join(CONFIG_FILE);
    std::fs::write(&target, config.to_string()).map_err(|e| Error::io(&target, e))?;
    let queries = options.project.join("queries");
    if queries.is_dir() {
        copy_tree(&queries, &dir.join("queries"))?;
    }
    Ok(dir.to_path_buf())
}

fn copy_tree(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to).map_err(|e| Error::io(to, e))?;
    for entry in std::fs::read_dir(from).map_err(|e| Error::io(from, e))? {
        let path = entry.map_err(|e| Error::io(from, e))?.path();
        let target = to.join(path.file_name().expect("an entry has a name"));
        if path.is_dir() {
            copy_tree(&path, &target)?;
        } else {
            std::fs::copy(&path, &target).map_err(|e| Error::io(&path, e))?;
        }
    }
    Ok(())
}

/// One `tessera run` in a child process: its stages plus `total` (the process, start to end).
fn tessera_run(options: &BenchOptions, project: &Path, full: bool) -> Result<Vec<StageStats>> {
    let mut command = Command::new(&options.exe);
    command
        .arg("--project")
        .arg(project)
        .args(["run", "--json", "--quiet", "--as-of"])
        .arg(as_of().to_rfc3339());
    if full {
        command.arg("--full");
    }
    if let Some(limit) = &options.memory_limit {
        command.args(["--memory-limit", limit]);
    }
    let finished = child(&mut command, "tessera run")?;
    let report: serde_json::Value = serde_json::from_slice(&finished.stdout).map_err(|e| {
        Error::Usage(format!(
            "tessera run printed no JSON report ({e}); run it by hand in {} to see why",
            project.display()
        ))
    })?;
    let stages: Vec<StageStats> = serde_json::from_value(report["stages"].clone())
        .map_err(|e| Error::Usage(format!("tessera run's report has no stages: {e}")))?;
    let events = report["events"].as_u64().unwrap_or(0);
    Ok(with_total(stages, &finished, events))
}

/// Adds stage `total`: the process's wall time and peak memory, the largest spill, all bytes
/// read.
fn with_total(mut stages: Vec<StageStats>, finished: &Finished, rows: u64) -> Vec<StageStats> {
    let total = StageStats {
        stage: "total".into(),
        ms: (finished.seconds * 1000.0).round() as u64,
        rows,
        peak_rss_bytes: stages
            .iter()
            .map(|s| s.peak_rss_bytes)
            .max()
            .unwrap_or(0)
            .max(finished.peak_rss_bytes),
        bytes_read: stages.iter().map(|s| s.bytes_read).sum(),
        spill_bytes: stages.iter().map(|s| s.spill_bytes).max().unwrap_or(0),
    };
    stages.push(total);
    stages
}

/// What a child process left: its stdout, wall seconds and peak resident memory.
struct Finished {
    stdout: Vec<u8>,
    seconds: f64,
    peak_rss_bytes: u64,
}

/// Runs a child to the end, or an error with its stderr. Its peak memory is the kernel's
/// count for that process (`ru_maxrss` from `wait4`), so a run too short for the stage
/// sampler to see, or one with no stage at all, still has one.
fn child(command: &mut Command, what: &str) -> Result<Finished> {
    use std::io::Read;
    let started = Instant::now();
    let program = command.get_program().to_owned();
    let cannot =
        |e: std::io::Error| Error::Usage(format!("cannot start {what} ({program:?}): {e}"));
    let mut process = command
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(cannot)?;
    let drain = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_end(&mut buf);
            }
            buf
        })
    };
    let out = drain(
        process
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let err = drain(
        process
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let (success, status_text, peak) = wait_with_peak(&mut process)?;
    let seconds = started.elapsed().as_secs_f64();
    let stdout = out.join().unwrap_or_default();
    let stderr = err.join().unwrap_or_default();
    if !success {
        // With --json a failure is a JSON object on stdout; anything else is on stderr.
        let text = format!(
            "{}\n{}",
            String::from_utf8_lossy(&stderr),
            String::from_utf8_lossy(&stdout)
        );
        let tail: Vec<&str> = text
            .lines()
            .filter(|l| !l.trim().is_empty())
            .rev()
            .take(20)
            .collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        return Err(Error::Usage(format!(
            "{what} failed ({status_text}):\n{}",
            tail.join("\n")
        )));
    }
    Ok(Finished {
        stdout,
        seconds,
        peak_rss_bytes: peak,
    })
}

/// Waits for `process`: whether it succeeded, its exit status as text, and its peak RSS.
fn wait_with_peak(process: &mut std::process::Child) -> Result<(bool, String, u64)> {
    let pid = process.id() as libc::pid_t;
    let mut status: libc::c_int = 0;
    // SAFETY: rusage is plain data that wait4 fills in; the pid is our own unwaited child.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let waited = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    if waited != pid {
        // Not ours to reap after all (already waited): fall back to std, without a peak.
        let status = process
            .wait()
            .map_err(|e| Error::Usage(format!("waiting for a child: {e}")))?;
        return Ok((status.success(), status.to_string(), 0));
    }
    let success = libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0;
    let text = if libc::WIFEXITED(status) {
        format!("exit status {}", libc::WEXITSTATUS(status))
    } else {
        format!("killed by signal {}", libc::WTERMSIG(status))
    };
    // Linux reports ru_maxrss in KiB.
    Ok((success, text, usage.ru_maxrss.max(0) as u64 * 1024))
}

/// The runs of `--incremental` at one size.
struct IncrementalRuns {
    /// The run that adds the newest events.
    incremental: Vec<StageStats>,
    /// The next run, with nothing new.
    unchanged: Vec<StageStats>,
    /// A `--full` run over the same files, whose tables the incremental run's must equal.
    full: Vec<StageStats>,
    /// The tables that differ between the two (none, when all is well).
    differing: Vec<String>,
}

/// A run over all events but the newest 1% (not measured), the run that adds them as a new
/// file, a run with nothing new, and a `--full` run over the same files to compare with.
async fn incremental(
    options: &BenchOptions,
    work: &Path,
    files: &[PathBuf],
) -> Result<IncrementalRuns> {
    let root = work.join("incremental");
    let events = root.join("events");
    std::fs::remove_dir_all(&root).ok();
    std::fs::create_dir_all(&events).map_err(|e| Error::io(&events, e))?;
    let (first, newest) = crate::cli::bench_incremental::hold_back_newest(
        files,
        INCREMENTAL_SHARE,
        &root.join("cut"),
    )?;
    let link = |f: &PathBuf, i: usize| -> Result<()> {
        let target = events.join(format!("{i:06}.parquet"));
        std::fs::hard_link(f, &target)
            .or_else(|_| std::fs::copy(f, &target).map(|_| ()))
            .map_err(|e| Error::io(&target, e))
    };
    for (i, f) in first.iter().enumerate() {
        link(f, i)?;
    }
    let project = project_copy(options, &root.join("project"), &events)?;
    tessera_run(options, &project, false)?;
    link(&newest, first.len())?;
    let incremental = tessera_run(options, &project, false)?;
    let unchanged = tessera_run(options, &project, false)?;
    // The incremental run's tables move to a project of their own; the full run writes anew.
    let kept = project_copy(options, &root.join("incremental-tables"), &events)?;
    std::fs::rename(project.join("out"), kept.join("out"))
        .map_err(|e| Error::io(project.join("out"), e))?;
    let full = tessera_run(options, &project, true)?;
    let differing = crate::cli::bench_incremental::differing_tables(&kept, &project).await?;
    Ok(IncrementalRuns {
        incremental,
        unchanged,
        full,
        differing,
    })
}

/// The same pipeline in DuckDB, in a child Python process.
fn duckdb_run(
    options: &BenchOptions,
    python: &Path,
    work: &Path,
    events: &Path,
) -> Result<Vec<StageStats>> {
    std::fs::create_dir_all(work).map_err(|e| Error::io(work, e))?;
    let script = work.join("duckdb_pipeline.py");
    std::fs::write(&script, DUCKDB_SCRIPT).map_err(|e| Error::io(&script, e))?;
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let mut command = Command::new(python);
    command
        .arg(&script)
        .arg("--events")
        .arg(events)
        .arg("--work")
        .arg(work.join("duckdb"))
        .arg("--as-of")
        .arg(as_of().to_rfc3339())
        .arg("--threads")
        .arg(threads.to_string());
    if let Some(limit) = &options.memory_limit {
        command.args(["--memory-limit", limit]);
    }
    let finished = child(&mut command, "the DuckDB baseline")?;
    let report: serde_json::Value = serde_json::from_slice(&finished.stdout)
        .map_err(|e| Error::Usage(format!("the DuckDB baseline printed no JSON ({e})")))?;
    let stages: Vec<StageStats> = serde_json::from_value(report["stages"].clone())
        .map_err(|e| Error::Usage(format!("the DuckDB baseline's report has no stages: {e}")))?;
    let events = report["events"].as_u64().unwrap_or(0);
    Ok(with_total(stages, &finished, events))
}

impl BenchReport {
    fn find(&self, size: u64, data: &str, engine: &str, stage: &str) -> Option<&StageStats> {
        self.rows
            .iter()
            .find(|r| {
                r.size == size && r.data == data && r.engine == engine && r.stats.stage == stage
            })
            .map(|r| &r.stats)
    }

    fn seconds(&self, size: u64, data: &str, engine: &str, stages: &[&str]) -> Option<f64> {
        let found: Vec<&StageStats> = stages
            .iter()
            .filter_map(|s| self.find(size, data, engine, s))
            .collect();
        (!found.is_empty()).then(|| found.iter().map(|s| s.ms as f64 / 1000.0).sum())
    }

    /// (size, data set) pairs in the order they ran.
    fn runs(&self) -> Vec<(u64, String)> {
        let mut runs: Vec<(u64, String)> = Vec::new();
        for r in &self.rows {
            if !runs.iter().any(|(s, d)| *s == r.size && *d == r.data) {
                runs.push((r.size, r.data.clone()));
            }
        }
        runs
    }

    /// One CSV line per data set, engine and stage.
    pub fn csv(&self) -> String {
        let mut out = String::from(
            "size,data,input_rows,engine,stage,seconds,rows,rows_per_second,peak_rss_mib,read_mib,spill_mib\n",
        );
        for r in &self.rows {
            let s = &r.stats;
            let seconds = s.ms as f64 / 1000.0;
            out.push_str(&format!(
                "{},{},{},{},{},{:.3},{},{:.0},{:.0},{:.1},{:.1}\n",
                label(r.size),
                r.data,
                r.rows,
                r.engine,
                s.stage,
                seconds,
                s.rows,
                s.rows as f64 / seconds.max(0.001),
                mib(s.peak_rss_bytes),
                mib(s.bytes_read),
                mib(s.spill_bytes),
            ));
        }
        out
    }

    /// A summary table (engines side by side, each size's data sets on adjacent lines) and the
    /// stage table, in Markdown.
    pub fn markdown(&self) -> String {
        let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
            (Some(a), Some(b)) if b > 0.0 => format!("{:.1}x", a / b),
            _ => "–".into(),
        };
        let secs = |v: Option<f64>| v.map_or("–".into(), |v| format!("{v:.1}"));
        let mut out = String::from(
            "| events | data | scan floor (s) | Tessera (s) | DuckDB (s) | DuckDB ÷ Tessera | Tessera ÷ floor | identity: Tessera (s) | identity: DuckDB (s) | identity ratio | incremental +1% (s) | incremental ÷ full | Tessera peak RSS (MiB) |\n\
             |---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
        );
        for (size, data) in self.runs() {
            let data = data.as_str();
            let floor = self.seconds(size, data, "floor", &["scan"]);
            let tessera = self.seconds(size, data, "tessera", &["total"]);
            // The baseline runs every stage the bundled project configures: whole run to whole run.
            let duckdb = self.seconds(size, data, "duckdb", &["total"]);
            let id_t = self.seconds(size, data, "tessera", &["identity", "identity_tables"]);
            let id_d = self.seconds(size, data, "duckdb", &["identity"]);
            let inc = self.seconds(size, data, "tessera incremental", &["total"]);
            let rss = self
                .find(size, data, "tessera", "total")
                .map_or("–".into(), |s| format!("{:.0}", mib(s.peak_rss_bytes)));
            let inc_share = match (inc, tessera) {
                (Some(i), Some(t)) if t > 0.0 => format!("{:.1}%", 100.0 * i / t),
                _ => "–".into(),
            };
            let rows = self
                .rows
                .iter()
                .find(|r| r.size == size && r.data == data)
                .map_or(0, |r| r.rows);
            out.push_str(&format!(
                "| {} ({rows} rows) | {data} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {inc_share} | {rss} |\n",
                label(size),
                secs(floor),
                secs(tessera),
                secs(duckdb),
                ratio(duckdb, tessera),
                ratio(tessera, floor),
                secs(id_t),
                secs(id_d),
                ratio(id_d, id_t),
                secs(inc),
            ));
        }
        for (size, data, differing) in &self.incremental_tables {
            let unchanged = self.seconds(*size, data, "tessera no change", &["total"]);
            let peak = |engine: &str| {
                self.find(*size, data, engine, "total")
                    .map_or("–".into(), |s| {
                        format!("{:.0} MiB", mib(s.peak_rss_bytes))
                    })
            };
            out.push_str(&format!(
                "\n{} {data}: incremental run (newest 1% of the events as a new file) {} s, peak RSS {} against {} for the full run; no-change run {} s; tables {}\n",
                label(*size),
                secs(self.seconds(*size, data, "tessera incremental", &["total"])),
                peak("tessera incremental"),
                peak("tessera"),
                secs(unchanged),
                if differing.is_empty() {
                    "equal to a --full run's".to_string()
                } else {
                    format!("differing from a --full run's: {}", differing.join("; "))
                }
            ));
        }
        for (size, engine, error) in &self.failures {
            out.push_str(&format!("\n{} {engine} failed: {error}\n", label(*size)));
        }
        out.push_str(
            "\n| events | data | engine | stage | seconds | rows/s | peak RSS (MiB) | read (MiB) | spill (MiB) |\n\
             |---:|---|---|---|---:|---:|---:|---:|---:|\n",
        );
        for r in &self.rows {
            let s = &r.stats;
            let seconds = s.ms as f64 / 1000.0;
            out.push_str(&format!(
                "| {} | {} | {} | {} | {:.2} | {:.0} | {:.0} | {:.0} | {:.0} |\n",
                label(r.size),
                r.data,
                r.engine,
                s.stage,
                seconds,
                s.rows as f64 / seconds.max(0.001),
                mib(s.peak_rss_bytes),
                mib(s.bytes_read),
                mib(s.spill_bytes),
            ));
        }
        out
    }
}

/// Writes `bench.csv` and `bench.md` into `dir`; returns their paths.
pub fn write(report: &BenchReport, dir: &Path) -> Result<Vec<String>> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let mut written = Vec::new();
    for (name, text) in [("bench.csv", report.csv()), ("bench.md", report.markdown())] {
        let path = dir.join(name);
        std::fs::write(&path, text).map_err(|e| Error::io(&path, e))?;
        written.push(path.display().to_string());
    }
    Ok(written)
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_like_people_write_them() {
        assert_eq!(parse_count("1M").unwrap(), 1_000_000);
        assert_eq!(parse_count("250k").unwrap(), 250_000);
        assert_eq!(parse_count("1.5M").unwrap(), 1_500_000);
        assert_eq!(parse_count("100000").unwrap(), 100_000);
        assert!(parse_count("lots").is_err());
        assert!(parse_count("0").is_err());
        assert_eq!(label(10_000_000), "10M");
        assert_eq!(label(250_000), "250k");
        assert_eq!(people_for(10_000_000), 322_580);
    }
}
