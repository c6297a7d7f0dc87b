//! `tessera report`: one self-contained HTML page about the published output, for the people
//! who look at a CDP rather than query it: the last run, segment sizes over the last runs with
//! who entered and exited, the identity graph's health, funnels, the RFM grid and the spread of
//! customer value. Charts are SVG drawn here, so the page needs no network and no script.
//!
//! The page reads the published tables as `tessera query` does (the same engine and
//! registration), so it shows exactly what a reader sees. A table that is absent (no
//! `[predictions]`, no run yet) gives its section a sentence saying so instead of an error.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use arrow::array::{Array, AsArray, RecordBatch};
use arrow::datatypes::{DataType, Float64Type};
use object_store::ObjectStoreExt;

use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::tables;

/// The report's file name at the top of the output, when no path is configured.
pub const FILE: &str = "report.html";

/// Where a report goes.
#[derive(Debug, Clone)]
pub enum Target {
    /// A local file.
    File(PathBuf),
    /// `report.html` at the top of the output (local or S3).
    Output,
}

impl Target {
    /// Where `[report] path` (or its default) puts the report of the project in `dir`.
    pub fn configured(dir: &Path, path: Option<&str>) -> Target {
        match path {
            Some(p) => Target::File(dir.join(p)),
            None => Target::Output,
        }
    }
}

/// Renders the report and writes it to `target`; returns where it went.
pub async fn write(engine: &Engine, target: &Target, runs: usize) -> Result<String> {
    let html = render(engine, runs).await?;
    match target {
        Target::File(path) => {
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
            }
            std::fs::write(path, html).map_err(|e| Error::io(path, e))?;
            Ok(path.display().to_string())
        }
        Target::Output => {
            let place = engine.outputs.place();
            let at = place.child(FILE);
            place.store.put(&at, html.into_bytes().into()).await?;
            Ok(place.url_of(&at).as_str().trim_end_matches('/').to_string())
        }
    }
}

/// The report as HTML text.
pub async fn render(engine: &Engine, runs: usize) -> Result<String> {
    engine.register_outputs().await?;
    let r = Reader { engine };
    let mut page = Page::default();
    let history = r.runs(runs).await?;
    page.header(
        &engine.project.config.project.name,
        &engine.outputs,
        &history,
    );
    page.last_run(history.last());
    let changes = r.segment_changes(&history).await?;
    page.segments(&history, &changes);
    page.identity(&r, &history).await?;
    page.funnels(&r).await?;
    page.rfm(&r).await?;
    page.predictions(&r).await?;
    Ok(page.finish())
}

// ---------------------------------------------------------------------------------------------
// Reading
// ---------------------------------------------------------------------------------------------

struct Reader<'a> {
    engine: &'a Engine,
}

/// One `runs` row, as the report uses it.
#[derive(Debug, Default)]
struct Run {
    run_id: String,
    status: String,
    started_at: String,
    finished_at: String,
    as_of: Option<String>,
    mode: Option<String>,
    error: Option<String>,
    events: f64,
    new_events: f64,
    profiles: f64,
    profiles_merged: f64,
    timings: Vec<(String, f64)>,
    tables: BTreeMap<String, serde_json::Value>,
    warnings: Vec<serde_json::Value>,
}

/// Columns of a result as text or numbers, by name.
struct Columns {
    batches: Vec<RecordBatch>,
}

impl Columns {
    fn rows(&self) -> usize {
        self.batches.iter().map(|b| b.num_rows()).sum()
    }

    fn has(&self, name: &str) -> bool {
        self.batches
            .first()
            .is_some_and(|b| b.schema().index_of(name).is_ok())
    }

    fn text(&self, name: &str) -> Vec<Option<String>> {
        let mut out = Vec::with_capacity(self.rows());
        for b in &self.batches {
            let Some(c) = b.column_by_name(name) else {
                out.extend(std::iter::repeat_n(None, b.num_rows()));
                continue;
            };
            match arrow::compute::cast(c, &DataType::Utf8) {
                Ok(c) => out.extend(c.as_string::<i32>().iter().map(|v| v.map(str::to_string))),
                Err(_) => out.extend(std::iter::repeat_n(None, b.num_rows())),
            }
        }
        out
    }

    fn number(&self, name: &str) -> Vec<Option<f64>> {
        let mut out = Vec::with_capacity(self.rows());
        for b in &self.batches {
            let cast = b
                .column_by_name(name)
                .and_then(|c| arrow::compute::cast(c, &DataType::Float64).ok());
            match cast {
                Some(c) => {
                    let c = c.as_primitive::<Float64Type>();
                    out.extend((0..c.len()).map(|i| (!c.is_null(i)).then(|| c.value(i))));
                }
                None => out.extend(std::iter::repeat_n(None, b.num_rows())),
            }
        }
        out
    }

    /// The names of the columns.
    fn names(&self) -> Vec<String> {
        self.batches
            .first()
            .map(|b| {
                b.schema()
                    .fields()
                    .iter()
                    .map(|f| f.name().clone())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Whether column `name` holds numbers.
    fn numeric(&self, name: &str) -> bool {
        self.batches.first().is_some_and(|b| {
            b.column_by_name(name)
                .is_some_and(|c| c.data_type().is_numeric())
        })
    }
}

impl Reader<'_> {
    /// Whether table `name` (`reports.x` for one in a folder) is published.
    async fn exists(&self, name: &str) -> bool {
        self.engine.ctx.table_exist(name).unwrap_or(false)
    }

    async fn columns_of(&self, name: &str) -> Vec<String> {
        match self.engine.ctx.table(name).await {
            Ok(df) => df
                .schema()
                .fields()
                .iter()
                .map(|f| f.name().clone())
                .collect(),
            Err(_) => Vec::new(),
        }
    }

    async fn sql(&self, sql: &str) -> Result<Columns> {
        let df = self.engine.query(sql, "<report>").await?;
        let batches = df
            .collect()
            .await
            .map_err(|e| Error::query("<report>", e))?;
        Ok(Columns { batches })
    }

    /// The last `n` runs, oldest first.
    async fn runs(&self, n: usize) -> Result<Vec<Run>> {
        if !self.exists(tables::RUNS).await {
            return Ok(Vec::new());
        }
        let have = self.columns_of(tables::RUNS).await;
        // Older `runs` tables lack later columns: those read as NULL.
        let optional = |c: &str| {
            if have.iter().any(|h| h == c) {
                format!("\"{c}\"")
            } else {
                format!("NULL AS \"{c}\"")
            }
        };
        let sql = format!(
            "SELECT run_id, status, started_at, finished_at, error, events, profiles, profiles_merged, \
             timings_ms, tables, {}, {}, {}, {} FROM runs ORDER BY started_at DESC LIMIT {n}",
            optional("as_of"),
            optional("mode"),
            optional("new_events"),
            optional("warnings"),
        );
        let c = self.sql(&sql).await?;
        let text = |name: &str| c.text(name);
        let num = |name: &str| c.number(name);
        let (ids, status, started, finished, error) = (
            text("run_id"),
            text("status"),
            text("started_at"),
            text("finished_at"),
            text("error"),
        );
        let (as_of, mode, timings, tables_json, warnings) = (
            text("as_of"),
            text("mode"),
            text("timings_ms"),
            text("tables"),
            text("warnings"),
        );
        let (events, new_events, profiles, merged) = (
            num("events"),
            num("new_events"),
            num("profiles"),
            num("profiles_merged"),
        );
        let mut runs = Vec::new();
        for i in 0..c.rows() {
            let timings: Vec<(String, f64)> = timings[i]
                .as_deref()
                .and_then(|t| serde_json::from_str::<serde_json::Map<_, _>>(t).ok())
                .map(|m| {
                    m.into_iter()
                        .map(|(k, v)| (k, v.as_f64().unwrap_or(0.0)))
                        .collect()
                })
                .unwrap_or_default();
            runs.push(Run {
                run_id: ids[i].clone().unwrap_or_default(),
                status: status[i].clone().unwrap_or_default(),
                started_at: started[i].clone().unwrap_or_default(),
                finished_at: finished[i].clone().unwrap_or_default(),
                as_of: as_of[i].clone(),
                mode: mode[i].clone(),
                error: error[i].clone(),
                events: events[i].unwrap_or(0.0),
                new_events: new_events[i].unwrap_or(0.0),
                profiles: profiles[i].unwrap_or(0.0),
                profiles_merged: merged[i].unwrap_or(0.0),
                timings,
                tables: tables_json[i]
                    .as_deref()
                    .and_then(|t| serde_json::from_str(t).ok())
                    .unwrap_or_default(),
                warnings: warnings[i]
                    .as_deref()
                    .and_then(|t| serde_json::from_str(t).ok())
                    .unwrap_or_default(),
            });
        }
        runs.reverse();
        Ok(runs)
    }

    /// Entered and exited counts by (run, segment).
    async fn segment_changes(&self, runs: &[Run]) -> Result<HashMap<(String, String), (f64, f64)>> {
        let mut out = HashMap::new();
        if runs.is_empty() || !self.exists(tables::SEGMENT_CHANGES).await {
            return Ok(out);
        }
        let ids: Vec<String> = runs
            .iter()
            .map(|r| format!("'{}'", r.run_id.replace('\'', "''")))
            .collect();
        let c = self
            .sql(&format!(
                "SELECT run_id, segment, \
                 sum(CASE WHEN change = 'entered' THEN 1 ELSE 0 END) AS entered, \
                 sum(CASE WHEN change = 'exited' THEN 1 ELSE 0 END) AS exited \
                 FROM segment_changes WHERE run_id IN ({}) GROUP BY run_id, segment",
                ids.join(", ")
            ))
            .await?;
        let (run, segment, entered, exited) = (
            c.text("run_id"),
            c.text("segment"),
            c.number("entered"),
            c.number("exited"),
        );
        for i in 0..c.rows() {
            out.insert(
                (
                    run[i].clone().unwrap_or_default(),
                    segment[i].clone().unwrap_or_default(),
                ),
                (entered[i].unwrap_or(0.0), exited[i].unwrap_or(0.0)),
            );
        }
        Ok(out)
    }
}

// ---------------------------------------------------------------------------------------------
// The page
// ---------------------------------------------------------------------------------------------

const STYLE: &str = "body{font:14px/1.45 system-ui,-apple-system,'Segoe UI',sans-serif;color:#1d2330;margin:0;background:#f5f6f8}\
main{max-width:1000px;margin:0 auto;padding:24px}\
h1{font-size:24px;margin:0 0 4px}h2{font-size:19px;margin:0 0 12px;border-bottom:1px solid #dde1e7;padding-bottom:6px}\
h3{font-size:15px;margin:18px 0 8px}\
section{background:#fff;border:1px solid #dde1e7;border-radius:6px;padding:16px 20px;margin:16px 0}\
table{border-collapse:collapse;margin:8px 0}td,th{padding:3px 10px;border-bottom:1px solid #eceef2;text-align:left;vertical-align:top}\
td.n,th.n{text-align:right;font-variant-numeric:tabular-nums}\
.meta{color:#5b6475}.absent{color:#5b6475;font-style:italic}\
.warn{background:#fff6e0;border-left:4px solid #e0a100;padding:6px 10px;margin:6px 0}\
.ok{color:#1a7f37}.bad{color:#c62828}\
svg{display:block;max-width:100%;height:auto}svg text{font:12px system-ui,sans-serif;fill:#1d2330}\
.legend span{display:inline-block;margin-right:14px}.legend i{display:inline-block;width:10px;height:10px;margin-right:4px;border-radius:2px}";

const PALETTE: [&str; 8] = [
    "#3367d6", "#e8710a", "#1a7f37", "#c62828", "#8e24aa", "#00838f", "#6d4c41", "#5b6475",
];

#[derive(Default)]
struct Page {
    body: String,
}

fn esc(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A number for people: thousands separated, at most two decimals.
fn num(v: f64) -> String {
    if !v.is_finite() {
        return "–".into();
    }
    // Past 100, decimals are noise in a chart label: rounded and grouped like counts.
    let v = if v.abs() >= 100.0 { v.round() } else { v };
    if v.fract() == 0.0 && v.abs() < 1e15 {
        let digits = format!("{}", v.abs() as u64);
        let mut out = String::new();
        for (i, c) in digits.chars().enumerate() {
            if i > 0 && (digits.len() - i) % 3 == 0 {
                out.push(',');
            }
            out.push(c);
        }
        return if v < 0.0 { format!("-{out}") } else { out };
    }
    if v.abs() >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

impl Page {
    fn push(&mut self, text: &str) {
        self.body.push_str(text);
    }

    fn absent(&mut self, text: &str) {
        let _ = write!(self.body, "<p class=\"absent\">{}</p>", esc(text));
    }

    fn header(&mut self, project: &str, outputs: &crate::output::Outputs, runs: &[Run]) {
        let _ = write!(
            self.body,
            "<header><h1>Tessera: {}</h1><p class=\"meta\">Output {} · generated {} · {} run{} shown</p></header>",
            esc(project),
            esc(&outputs.place().to_string()),
            chrono::Utc::now().format("%Y-%m-%d %H:%M UTC"),
            runs.len(),
            if runs.len() == 1 { "" } else { "s" }
        );
    }

    fn last_run(&mut self, run: Option<&Run>) {
        self.push("<section id=\"last-run\"><h2>Last run</h2>");
        let Some(run) = run else {
            self.absent(
                "No run is recorded yet: the `runs` table is absent. Run `tessera run` first.",
            );
            self.push("</section>");
            return;
        };
        let status_class = if run.status == "succeeded" {
            "ok"
        } else {
            "bad"
        };
        let _ = write!(
            self.body,
            "<table><tr><th>run</th><td>{}</td></tr><tr><th>status</th><td class=\"{status_class}\">{}</td></tr>\
             <tr><th>started</th><td>{}</td></tr><tr><th>finished</th><td>{}</td></tr><tr><th>as-of</th><td>{}</td></tr>\
             <tr><th>mode</th><td>{}</td></tr><tr><th>events</th><td>{} ({} new)</td></tr><tr><th>profiles</th><td>{}</td></tr></table>",
            esc(&run.run_id),
            esc(&run.status),
            esc(&run.started_at),
            esc(&run.finished_at),
            esc(run.as_of.as_deref().unwrap_or("–")),
            esc(run.mode.as_deref().unwrap_or("–")),
            num(run.events),
            num(run.new_events),
            num(run.profiles),
        );
        if let Some(error) = &run.error {
            let _ = write!(self.body, "<p class=\"warn\">Error: {}</p>", esc(error));
        }
        self.push("<h3>Warnings</h3>");
        if run.warnings.is_empty() {
            self.push("<p class=\"ok\">None.</p>");
        }
        for w in &run.warnings {
            let subject = w.get("subject").and_then(|v| v.as_str()).unwrap_or("");
            let message = w
                .get("message")
                .and_then(|v| v.as_str())
                .map(str::to_string)
                .unwrap_or_else(|| w.to_string());
            let _ = write!(
                self.body,
                "<div class=\"warn\"><b>{}</b>: {}</div>",
                esc(subject),
                esc(&message)
            );
        }
        self.push("<h3>Stage times</h3>");
        if run.timings.is_empty() {
            self.absent("This run recorded no stage times.");
        } else {
            // In the order a run goes through them (the stored map is alphabetical).
            const ORDER: [&str; 10] = [
                "ingest",
                "events",
                "identity",
                "identity_tables",
                "resolved_events",
                "journeys",
                "profiles",
                "segments",
                "reports",
                "publish",
            ];
            let mut timings = run.timings.clone();
            timings.sort_by_key(|(s, _)| ORDER.iter().position(|o| o == s).unwrap_or(ORDER.len()));
            let items: Vec<(String, f64, String)> = timings
                .iter()
                .map(|(s, ms)| (s.clone(), *ms, format!("{} ms", num(*ms))))
                .collect();
            self.push(&hbars("stage-times", &items, PALETTE[0]));
        }
        self.push("<h3>Tables</h3><table><tr><th>table</th><th class=\"n\">version</th><th class=\"n\">rows</th><th></th></tr>");
        for (name, t) in &run.tables {
            let carried = t.get("carried").and_then(|v| v.as_bool()).unwrap_or(false);
            let _ = write!(
                self.body,
                "<tr><td>{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"meta\">{}</td></tr>",
                esc(name),
                t.get("version").and_then(|v| v.as_u64()).unwrap_or(0),
                num(t.get("rows").and_then(|v| v.as_f64()).unwrap_or(0.0)),
                if carried { "kept" } else { "written" }
            );
        }
        self.push("</table></section>");
    }

    fn segments(&mut self, runs: &[Run], changes: &HashMap<(String, String), (f64, f64)>) {
        self.push("<section id=\"segments\"><h2>Segments</h2>");
        let runs: Vec<&Run> = runs.iter().filter(|r| r.status == "succeeded").collect();
        let mut names: Vec<String> = runs
            .iter()
            .flat_map(|r| r.tables.keys())
            .filter_map(|t| t.strip_prefix("segments/"))
            .map(str::to_string)
            .collect();
        names.sort();
        names.dedup();
        if names.is_empty() {
            self.absent("No segment in the runs shown: add SQL files to queries/segments/.");
            self.push("</section>");
            return;
        }
        // A segment's size in a run: the rows of the version the run published (written or kept).
        let size = |run: &Run, name: &str| {
            run.tables
                .get(&format!("segments/{name}"))
                .and_then(|t| t.get("rows"))
                .and_then(|v| v.as_f64())
        };
        let labels: Vec<String> = runs.iter().map(|r| short_time(&r.started_at)).collect();
        let series: Vec<(String, Vec<Option<f64>>)> = names
            .iter()
            .map(|n| (n.clone(), runs.iter().map(|r| size(r, n)).collect()))
            .collect();
        let _ = write!(
            self.body,
            "<h3>Members over the last {} successful run{}</h3>",
            runs.len(),
            if runs.len() == 1 { "" } else { "s" }
        );
        self.push(&lines("segment-sizes", &labels, &series));
        let entered: Vec<(String, f64)> = runs
            .iter()
            .map(|r| {
                let sum: f64 = names
                    .iter()
                    .filter_map(|n| changes.get(&(r.run_id.clone(), n.clone())))
                    .map(|c| c.0)
                    .sum();
                (short_time(&r.started_at), sum)
            })
            .collect();
        let exited: Vec<f64> = runs
            .iter()
            .map(|r| {
                names
                    .iter()
                    .filter_map(|n| changes.get(&(r.run_id.clone(), n.clone())))
                    .map(|c| c.1)
                    .sum()
            })
            .collect();
        self.push("<h3>Entered and exited per run (all segments)</h3>");
        self.push(&paired_bars("segment-changes", &entered, &exited));
        self.push("<h3>Per segment</h3><table><tr><th>segment</th><th class=\"n\">members</th><th>trend</th><th class=\"n\">entered (last run)</th><th class=\"n\">exited (last run)</th></tr>");
        let last = runs.last();
        for (name, values) in &series {
            let now = values.last().copied().flatten();
            let (entered, exited) = last
                .and_then(|r| changes.get(&(r.run_id.clone(), name.clone())))
                .copied()
                .unwrap_or((0.0, 0.0));
            let _ = write!(
                self.body,
                "<tr><td>{}</td><td class=\"n\">{}</td><td>{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td></tr>",
                esc(name),
                now.map(num).unwrap_or_else(|| "retired".into()),
                sparkline(values),
                num(entered),
                num(exited)
            );
        }
        self.push("</table></section>");
    }

    async fn identity(&mut self, r: &Reader<'_>, runs: &[Run]) -> Result<()> {
        self.push("<section id=\"identity\"><h2>Identity</h2>");
        if r.exists(tables::IDENTITY_GRAPH).await {
            let c = r
                .sql(
                    "SELECT n, count(*) AS profiles FROM \
                     (SELECT profile_id, count(*) AS n FROM identity_graph GROUP BY profile_id) \
                     GROUP BY n ORDER BY n",
                )
                .await?;
            let (n, profiles) = (c.number("n"), c.number("profiles"));
            // Sizes past 20 share one bar, so one huge profile does not squeeze the chart.
            let mut bins: BTreeMap<u64, f64> = BTreeMap::new();
            for i in 0..c.rows() {
                let size = n[i].unwrap_or(0.0) as u64;
                *bins.entry(size.min(20)).or_default() += profiles[i].unwrap_or(0.0);
            }
            let items: Vec<(String, f64)> = bins
                .into_iter()
                .map(|(s, v)| (if s == 20 { "20+".into() } else { s.to_string() }, v))
                .collect();
            self.push("<h3>Profiles by number of identifiers</h3>");
            self.push(&vbars(
                "profile-sizes",
                &items,
                PALETTE[0],
                "identifiers in the profile",
            ));
            let top = r
                .sql(
                    "SELECT profile_id, count(*) AS identifiers, count(DISTINCT identifier_type) AS types \
                     FROM identity_graph GROUP BY profile_id ORDER BY identifiers DESC, profile_id LIMIT 10",
                )
                .await?;
            self.push("<h3>Largest profiles</h3><table><tr><th>profile</th><th class=\"n\">identifiers</th><th class=\"n\">identifier types</th></tr>");
            let (ids, count, types) = (
                top.text("profile_id"),
                top.number("identifiers"),
                top.number("types"),
            );
            for i in 0..top.rows() {
                let _ = write!(
                    self.body,
                    "<tr><td>{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td></tr>",
                    esc(ids[i].as_deref().unwrap_or("")),
                    num(count[i].unwrap_or(0.0)),
                    num(types[i].unwrap_or(0.0))
                );
            }
            self.push("</table><p class=\"meta\">See one with <code>tessera explain TYPE:VALUE</code>.</p>");
        } else {
            self.absent("No identity_graph table yet: run `tessera run` first.");
        }
        self.push("<h3>Refused links by reason</h3>");
        if r.exists(tables::IDENTITY_CONFLICTS).await {
            let c = r
                .sql("SELECT reason, count(*) AS links FROM identity_conflicts GROUP BY reason ORDER BY links DESC, reason")
                .await?;
            let items: Vec<(String, f64, String)> = c
                .text("reason")
                .into_iter()
                .zip(c.number("links"))
                .map(|(reason, n)| {
                    let n = n.unwrap_or(0.0);
                    (reason.unwrap_or_default(), n, num(n))
                })
                .collect();
            if items.is_empty() {
                self.push("<p class=\"ok\">No link was refused.</p>");
            } else {
                self.push(&hbars("conflicts", &items, PALETTE[3]));
            }
        } else {
            self.absent("No identity_conflicts table yet.");
        }
        self.push("<h3>Profiles merged per run</h3>");
        let merges: Vec<(String, f64)> = runs
            .iter()
            .filter(|r| r.status == "succeeded")
            .map(|r| (short_time(&r.started_at), r.profiles_merged))
            .collect();
        if merges.is_empty() {
            self.absent("No successful run recorded yet.");
        } else if merges.iter().all(|m| m.1 == 0.0) {
            let _ = write!(
                self.body,
                "<p class=\"ok\">No profile was merged in the last {} successful run{}.</p>",
                merges.len(),
                if merges.len() == 1 { "" } else { "s" }
            );
        } else {
            self.push(&vbars("merges", &merges, PALETTE[4], "run started"));
        }
        self.push("</section>");
        Ok(())
    }

    async fn funnels(&mut self, r: &Reader<'_>) -> Result<()> {
        self.push("<section id=\"funnels\"><h2>Funnels</h2>");
        let names = r
            .engine
            .outputs
            .folder_tables(tables::REPORTS)
            .await
            .unwrap_or_default();
        let mut shown = 0;
        for name in names {
            let table = format!("{}.{name}", tables::REPORTS);
            if !r.exists(&table).await {
                continue;
            }
            let c = r.sql(&format!("SELECT * FROM {table}")).await?;
            if !c.has("step") {
                continue;
            }
            // The count: `profiles` when there is one, else the first other numeric column.
            let value = if c.has("profiles") {
                Some("profiles".to_string())
            } else {
                c.names().into_iter().find(|n| n != "step" && c.numeric(n))
            };
            let Some(value) = value else {
                continue;
            };
            let labels = if c.has("name") {
                c.text("name")
            } else {
                c.text("step")
            };
            let values = c.number(&value);
            let first = values.first().copied().flatten().unwrap_or(0.0);
            let items: Vec<(String, f64, String)> = labels
                .into_iter()
                .zip(values)
                .map(|(l, v)| {
                    let v = v.unwrap_or(0.0);
                    let share = if first > 0.0 {
                        format!(" ({:.0}%)", v / first * 100.0)
                    } else {
                        String::new()
                    };
                    (l.unwrap_or_default(), v, format!("{}{share}", num(v)))
                })
                .collect();
            let _ = write!(
                self.body,
                "<h3>reports.{} <span class=\"meta\">({value})</span></h3>",
                esc(&name)
            );
            self.push(&hbars(&format!("funnel-{name}"), &items, PALETTE[2]));
            shown += 1;
        }
        if shown == 0 {
            self.absent("No report returns funnel steps: a report with a `step` column (and `name`, `profiles`) is drawn here.");
        }
        self.push("</section>");
        Ok(())
    }

    async fn rfm(&mut self, r: &Reader<'_>) -> Result<()> {
        self.push("<section id=\"rfm\"><h2>RFM grid</h2>");
        if !r.exists(tables::RFM).await {
            self.absent("No rfm table: it is computed when tessera.toml has a [predictions] section or a query reads rfm.");
            self.push("</section>");
            return Ok(());
        }
        let c = r
            .sql("SELECT r_score, f_score, count(*) AS buyers, sum(monetary) AS revenue FROM rfm GROUP BY r_score, f_score")
            .await?;
        let mut grid = [[(0.0, 0.0); 5]; 5];
        let (rs, fs, buyers, revenue) = (
            c.number("r_score"),
            c.number("f_score"),
            c.number("buyers"),
            c.number("revenue"),
        );
        for i in 0..c.rows() {
            let (Some(r), Some(f)) = (rs[i], fs[i]) else {
                continue;
            };
            let (r, f) = (r as usize, f as usize);
            if (1..=5).contains(&r) && (1..=5).contains(&f) {
                grid[f - 1][r - 1] = (buyers[i].unwrap_or(0.0), revenue[i].unwrap_or(0.0));
            }
        }
        self.push("<p class=\"meta\">Buyers by recency score (columns, 5 = most recent) and frequency score (rows, 5 = most frequent); revenue below.</p>");
        self.push(&heatmap("rfm-grid", &grid));
        self.push("</section>");
        Ok(())
    }

    async fn predictions(&mut self, r: &Reader<'_>) -> Result<()> {
        self.push("<section id=\"predictions\"><h2>Customer value</h2>");
        if !r.exists(tables::PREDICTIONS).await {
            self.absent("No predictions table: it is computed when tessera.toml has a [predictions] section or a query reads predictions.");
            self.push("</section>");
            return Ok(());
        }
        if r.exists(tables::PREDICTION_MODELS).await {
            let c = r
                .sql("SELECT model, value FROM prediction_models WHERE parameter = 'converged' ORDER BY model")
                .await?;
            for (model, v) in c.text("model").into_iter().zip(c.number("value")) {
                let model = model.unwrap_or_default();
                if v == Some(0.0) {
                    let _ = write!(
                        self.body,
                        "<div class=\"warn\"><b>{}</b> did not converge or is degenerate: its columns say little (see the last run's warnings).</div>",
                        esc(&model)
                    );
                }
            }
        }
        let c = r.sql("SELECT clv, p_alive FROM predictions").await?;
        let clv: Vec<f64> = c
            .number("clv")
            .into_iter()
            .flatten()
            .filter(|v| v.is_finite())
            .collect();
        let alive: Vec<f64> = c
            .number("p_alive")
            .into_iter()
            .flatten()
            .filter(|v| v.is_finite())
            .collect();
        let _ = write!(
            self.body,
            "<p class=\"meta\">{} buyers.</p><h3>Lifetime value (clv)</h3>",
            num(c.rows() as f64)
        );
        if clv.is_empty() {
            self.absent("No buyer has a lifetime value (the Gamma-Gamma model was not fitted).");
        } else {
            // The top 1% share the last bar, so a few big spenders do not flatten the rest.
            let mut sorted = clv.clone();
            sorted.sort_by(f64::total_cmp);
            let hi = sorted[((sorted.len() - 1) as f64 * 0.99) as usize].max(sorted[0]);
            let lo = sorted[0];
            self.push(&vbars(
                "clv",
                &histogram(&clv, lo, hi, 20),
                PALETTE[1],
                "clv",
            ));
        }
        self.push("<h3>P(alive)</h3>");
        if alive.is_empty() {
            self.absent("No buyer has a P(alive) (the BG/NBD model was not fitted).");
        } else {
            self.push(&vbars(
                "p-alive",
                &histogram(&alive, 0.0, 1.0, 20),
                PALETTE[5],
                "p_alive",
            ));
        }
        self.push("</section>");
        Ok(())
    }

    fn finish(self) -> String {
        format!(
            "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">\
             <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
             <title>Tessera report</title><style>{STYLE}</style></head><body><main>{}</main></body></html>\n",
            self.body
        )
    }
}

/// `2026-10-31T00:00:00Z` → `10-31 00:00:00` (runs minutes apart stay apart).
fn short_time(t: &str) -> String {
    match t.get(5..19) {
        Some(s) => s.replace('T', " "),
        None => t.to_string(),
    }
}

/// Counts of `values` in `bins` equal bins over [lo, hi]; values past hi go to the last.
fn histogram(values: &[f64], lo: f64, hi: f64, bins: usize) -> Vec<(String, f64)> {
    let width = if hi > lo {
        (hi - lo) / bins as f64
    } else {
        1.0
    };
    let mut counts = vec![0.0; bins];
    for v in values {
        let i = (((v - lo) / width).floor().max(0.0) as usize).min(bins - 1);
        counts[i] += 1.0;
    }
    counts
        .into_iter()
        .enumerate()
        .map(|(i, c)| {
            let from = lo + width * i as f64;
            let label = if i == bins - 1 && values.iter().any(|v| *v > hi) {
                format!("≥{}", num(from))
            } else {
                num(from)
            };
            (label, c)
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// SVG charts
// ---------------------------------------------------------------------------------------------

const WIDTH: f64 = 900.0;

/// Horizontal bars: a label, a bar and its value text per item.
fn hbars(id: &str, items: &[(String, f64, String)], color: &str) -> String {
    let row = 24.0;
    let label_w = 220.0;
    let value_w = 120.0;
    let height = row * items.len() as f64 + 8.0;
    let max = items.iter().map(|i| i.1).fold(0.0, f64::max);
    let mut svg = format!(
        "<svg class=\"chart\" data-chart=\"{}\" viewBox=\"0 0 {WIDTH} {height}\" width=\"{WIDTH}\" height=\"{height}\" role=\"img\">",
        esc(id)
    );
    for (i, (label, v, text)) in items.iter().enumerate() {
        let y = i as f64 * row + 4.0;
        let w = if max > 0.0 {
            (WIDTH - label_w - value_w) * v / max
        } else {
            0.0
        };
        let _ = write!(
            svg,
            "<text x=\"{:.0}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>\
             <rect x=\"{label_w}\" y=\"{y:.1}\" width=\"{w:.1}\" height=\"{:.1}\" fill=\"{color}\"><title>{}: {}</title></rect>\
             <text x=\"{:.1}\" y=\"{:.1}\">{}</text>",
            label_w - 8.0,
            y + row * 0.65,
            esc(&clip(label, 32)),
            row - 6.0,
            esc(label),
            esc(text),
            label_w + w + 6.0,
            y + row * 0.65,
            esc(text)
        );
    }
    svg.push_str("</svg>");
    svg
}

/// Vertical bars with their labels under them and the largest value on the axis.
fn vbars(id: &str, items: &[(String, f64)], color: &str, x_title: &str) -> String {
    let (left, bottom, top, height) = (60.0, 56.0, 12.0, 240.0);
    let plot_h = height - bottom - top;
    let n = items.len().max(1) as f64;
    let slot = (WIDTH - left - 10.0) / n;
    let max = items.iter().map(|i| i.1).fold(0.0, f64::max);
    let mut svg = format!(
        "<svg class=\"chart\" data-chart=\"{}\" viewBox=\"0 0 {WIDTH} {height}\" width=\"{WIDTH}\" height=\"{height}\" role=\"img\">",
        esc(id)
    );
    let _ = write!(
        svg,
        "<line x1=\"{left}\" y1=\"{top}\" x2=\"{left}\" y2=\"{:.1}\" stroke=\"#9aa3b2\"/>\
         <line x1=\"{left}\" y1=\"{:.1}\" x2=\"{:.1}\" y2=\"{:.1}\" stroke=\"#9aa3b2\"/>\
         <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text><text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">0</text>\
         <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\" class=\"meta\">{}</text>",
        top + plot_h,
        top + plot_h,
        WIDTH - 10.0,
        top + plot_h,
        left - 6.0,
        top + 10.0,
        num(max),
        left - 6.0,
        top + plot_h,
        left + (WIDTH - left) / 2.0,
        height - 4.0,
        esc(x_title)
    );
    // Labels are thinned so they do not overlap: at most about 12 shown.
    let every = (items.len() as f64 / 12.0).ceil().max(1.0) as usize;
    for (i, (label, v)) in items.iter().enumerate() {
        let h = if max > 0.0 { plot_h * v / max } else { 0.0 };
        let x = left + slot * i as f64 + slot * 0.1;
        let _ = write!(
            svg,
            "<rect x=\"{x:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{h:.1}\" fill=\"{color}\"><title>{}: {}</title></rect>",
            top + plot_h - h,
            slot * 0.8,
            esc(label),
            num(*v)
        );
        if i % every == 0 {
            let _ = write!(
                svg,
                "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>",
                x + slot * 0.4,
                top + plot_h + 16.0,
                esc(&clip(label, 16))
            );
        }
    }
    svg.push_str("</svg>");
    svg
}

/// Entered (up, green) and exited (down, red) bars per run.
fn paired_bars(id: &str, entered: &[(String, f64)], exited: &[f64]) -> String {
    let (left, height) = (60.0, 220.0);
    let mid = 100.0;
    let half = 80.0;
    let n = entered.len().max(1) as f64;
    let slot = (WIDTH - left - 10.0) / n;
    let max = entered
        .iter()
        .map(|e| e.1)
        .chain(exited.iter().copied())
        .fold(0.0, f64::max);
    let mut svg = format!(
        "<svg class=\"chart\" data-chart=\"{}\" viewBox=\"0 0 {WIDTH} {height}\" width=\"{WIDTH}\" height=\"{height}\" role=\"img\">",
        esc(id)
    );
    let _ = write!(
        svg,
        "<line x1=\"{left}\" y1=\"{mid}\" x2=\"{:.1}\" y2=\"{mid}\" stroke=\"#9aa3b2\"/>\
         <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">+{}</text><text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">−{}</text>",
        WIDTH - 10.0,
        left - 6.0,
        mid - half + 10.0,
        num(max),
        left - 6.0,
        mid + half,
        num(max)
    );
    let every = (entered.len() as f64 / 12.0).ceil().max(1.0) as usize;
    // Bars at most 48 wide, centred in their slot: one run does not fill the chart.
    let bar = (slot * 0.7).min(48.0);
    for (i, ((label, e), x_out)) in entered.iter().zip(exited).enumerate() {
        let x = left + slot * i as f64 + (slot - bar) / 2.0;
        let scale = |v: f64| if max > 0.0 { half * v / max } else { 0.0 };
        let _ = write!(
            svg,
            "<rect x=\"{x:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"{}\"><title>{}: {} entered</title></rect>\
             <rect x=\"{x:.1}\" y=\"{mid}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"{}\"><title>{}: {} exited</title></rect>",
            mid - scale(*e),
            bar,
            scale(*e),
            PALETTE[2],
            esc(label),
            num(*e),
            bar,
            scale(*x_out),
            PALETTE[3],
            esc(label),
            num(*x_out)
        );
        if i % every == 0 {
            let _ = write!(
                svg,
                "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>",
                x + bar / 2.0,
                height - 8.0,
                esc(label)
            );
        }
    }
    svg.push_str("</svg>");
    let _ = write!(
        svg,
        "<p class=\"legend\"><span><i style=\"background:{}\"></i>entered</span><span><i style=\"background:{}\"></i>exited</span></p>",
        PALETTE[2], PALETTE[3]
    );
    svg
}

/// One line per series over the same x labels; a gap where a series has no value.
fn lines(id: &str, labels: &[String], series: &[(String, Vec<Option<f64>>)]) -> String {
    let (left, bottom, top, height) = (60.0, 30.0, 12.0, 260.0);
    let plot_h = height - bottom - top;
    let plot_w = WIDTH - left - 20.0;
    let max = series
        .iter()
        .flat_map(|s| s.1.iter().flatten())
        .copied()
        .fold(0.0, f64::max);
    let step = if labels.len() > 1 {
        plot_w / (labels.len() - 1) as f64
    } else {
        0.0
    };
    let x_of =
        |i: usize| left + step * i as f64 + if labels.len() > 1 { 0.0 } else { plot_w / 2.0 };
    let y_of = |v: f64| top + plot_h - if max > 0.0 { plot_h * v / max } else { 0.0 };
    let mut svg = format!(
        "<svg class=\"chart\" data-chart=\"{}\" viewBox=\"0 0 {WIDTH} {height}\" width=\"{WIDTH}\" height=\"{height}\" role=\"img\">",
        esc(id)
    );
    let _ = write!(
        svg,
        "<line x1=\"{left}\" y1=\"{top}\" x2=\"{left}\" y2=\"{:.1}\" stroke=\"#9aa3b2\"/>\
         <line x1=\"{left}\" y1=\"{:.1}\" x2=\"{:.1}\" y2=\"{:.1}\" stroke=\"#9aa3b2\"/>\
         <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text><text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">0</text>",
        top + plot_h,
        top + plot_h,
        left + plot_w,
        top + plot_h,
        left - 6.0,
        top + 10.0,
        num(max),
        left - 6.0,
        top + plot_h
    );
    let every = (labels.len() as f64 / 8.0).ceil().max(1.0) as usize;
    for (i, label) in labels.iter().enumerate() {
        if i % every == 0 || i + 1 == labels.len() {
            let anchor = match i {
                0 if labels.len() > 1 => "start",
                i if i + 1 == labels.len() && labels.len() > 1 => "end",
                _ => "middle",
            };
            let _ = write!(
                svg,
                "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"{anchor}\">{}</text>",
                x_of(i),
                height - 8.0,
                esc(label)
            );
        }
    }
    let mut legend = String::from("<p class=\"legend\">");
    for (k, (name, values)) in series.iter().enumerate() {
        let color = PALETTE[k % PALETTE.len()];
        let mut path = String::new();
        let mut pen_down = false;
        for (i, v) in values.iter().enumerate() {
            match v {
                Some(v) => {
                    let _ = write!(
                        path,
                        "{}{:.1},{:.1} ",
                        if pen_down { "L" } else { "M" },
                        x_of(i),
                        y_of(*v)
                    );
                    let _ = write!(
                        svg,
                        "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3\" fill=\"{color}\"><title>{}: {}</title></circle>",
                        x_of(i),
                        y_of(*v),
                        esc(name),
                        num(*v)
                    );
                    pen_down = true;
                }
                None => pen_down = false,
            }
        }
        if !path.is_empty() {
            let _ = write!(
                svg,
                "<path d=\"{}\" fill=\"none\" stroke=\"{color}\" stroke-width=\"2\"/>",
                path.trim_end()
            );
        }
        let _ = write!(
            legend,
            "<span><i style=\"background:{color}\"></i>{}</span>",
            esc(name)
        );
    }
    svg.push_str("</svg>");
    legend.push_str("</p>");
    svg + &legend
}

/// A small line of `values` for a table cell.
fn sparkline(values: &[Option<f64>]) -> String {
    let (w, h) = (120.0, 24.0);
    let max = values.iter().flatten().copied().fold(0.0, f64::max);
    let step = if values.len() > 1 {
        w / (values.len() - 1) as f64
    } else {
        0.0
    };
    let mut path = String::new();
    let mut pen_down = false;
    for (i, v) in values.iter().enumerate() {
        match v {
            Some(v) => {
                let y = h - 2.0 - if max > 0.0 { (h - 4.0) * v / max } else { 0.0 };
                let _ = write!(
                    path,
                    "{}{:.1},{y:.1} ",
                    if pen_down { "L" } else { "M" },
                    step * i as f64
                );
                pen_down = true;
            }
            None => pen_down = false,
        }
    }
    // A lone value is a dot (a path of one point draws nothing).
    let dot = match values.iter().rposition(Option::is_some) {
        Some(i) => {
            let v = values[i].unwrap_or(0.0);
            let y = h - 2.0 - if max > 0.0 { (h - 4.0) * v / max } else { 0.0 };
            format!(
                "<circle cx=\"{:.1}\" cy=\"{y:.1}\" r=\"2\" fill=\"{}\"/>",
                step * i as f64,
                PALETTE[0]
            )
        }
        None => String::new(),
    };
    format!(
        "<svg class=\"spark\" data-chart=\"sparkline\" viewBox=\"-2 0 {} {h}\" width=\"{}\" height=\"{h}\"><path d=\"{}\" fill=\"none\" stroke=\"{}\" stroke-width=\"1.5\"/>{dot}</svg>",
        w + 4.0,
        w + 4.0,
        path.trim_end(),
        PALETTE[0]
    )
}

/// The 5×5 RFM grid: `grid[f-1][r-1]` = (buyers, revenue), darker for more buyers.
fn heatmap(id: &str, grid: &[[(f64, f64); 5]; 5]) -> String {
    let (left, top, cell_w, cell_h) = (90.0, 24.0, 110.0, 52.0);
    let width = left + cell_w * 5.0 + 10.0;
    let height = top + cell_h * 5.0 + 30.0;
    let max = grid.iter().flatten().map(|c| c.0).fold(0.0, f64::max);
    let mut svg = format!(
        "<svg class=\"chart\" data-chart=\"{}\" viewBox=\"0 0 {width} {height}\" width=\"{width}\" height=\"{height}\" role=\"img\">",
        esc(id)
    );
    for r in 0..5 {
        let _ = write!(
            svg,
            "<text x=\"{:.1}\" y=\"16\" text-anchor=\"middle\">R {}</text>",
            left + cell_w * r as f64 + cell_w / 2.0,
            r + 1
        );
    }
    for (row, f) in (0..5).rev().enumerate() {
        let y = top + cell_h * row as f64;
        let _ = write!(
            svg,
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">F {}</text>",
            left - 8.0,
            y + cell_h / 2.0 + 4.0,
            f + 1
        );
        for (r, &(buyers, revenue)) in grid[f].iter().enumerate() {
            let shade = if max > 0.0 { buyers / max } else { 0.0 };
            let x = left + cell_w * r as f64;
            // From a pale to a deep blue; text turns white on the dark cells.
            let (cr, cg, cb) = (
                235.0 - 184.0 * shade,
                241.0 - 138.0 * shade,
                250.0 - 36.0 * shade,
            );
            let ink = if shade > 0.55 { "#ffffff" } else { "#1d2330" };
            let _ = write!(
                svg,
                "<rect x=\"{x:.1}\" y=\"{y:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"rgb({cr:.0},{cg:.0},{cb:.0})\" stroke=\"#ffffff\"><title>R {} F {}: {} buyers, revenue {}</title></rect>\
                 <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\" style=\"fill:{ink};font-weight:600\">{}</text>\
                 <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\" style=\"fill:{ink}\">{}</text>",
                cell_w - 2.0,
                cell_h - 2.0,
                r + 1,
                f + 1,
                num(buyers),
                num(revenue),
                x + cell_w / 2.0,
                y + cell_h / 2.0 - 2.0,
                num(buyers),
                x + cell_w / 2.0,
                y + cell_h / 2.0 + 14.0,
                num(revenue)
            );
        }
    }
    let _ = write!(
        svg,
        "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\" class=\"meta\">recency score (5 = bought most recently)</text>",
        left + cell_w * 2.5,
        height - 6.0
    );
    svg.push_str("</svg>");
    svg
}

fn clip(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        return text.to_string();
    }
    let mut out: String = text.chars().take(max - 1).collect();
    out.push('…');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_read_well_and_text_is_escaped() {
        assert_eq!(num(1234567.0), "1,234,567");
        assert_eq!(num(-1000.0), "-1,000");
        assert_eq!(num(0.12345), "0.123");
        assert_eq!(num(1572.4), "1,572");
        assert_eq!(
            esc("<a href='x'>&</a>"),
            "&lt;a href=&#39;x&#39;&gt;&amp;&lt;/a&gt;"
        );
    }

    #[test]
    fn a_histogram_counts_every_value_once_and_puts_the_tail_in_the_last_bin() {
        let values = [0.0, 0.05, 0.5, 0.99, 1.0, 7.0];
        let bins = histogram(&values, 0.0, 1.0, 10);
        assert_eq!(bins.iter().map(|b| b.1).sum::<f64>(), values.len() as f64);
        assert_eq!(bins[0].1, 2.0);
        assert_eq!(bins[5].1, 1.0);
        assert_eq!(bins[9].1, 3.0);
        assert!(bins[9].0.starts_with('≥'));
    }
}
