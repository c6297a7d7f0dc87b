//! `tessera status`: what a scheduler or an operator needs to know about an output without
//! taking its lease: the lease, publishes waiting to be finished, input files not yet
//! processed, table versions, and the last runs.

use std::collections::BTreeMap;

use arrow::util::display::{ArrayFormatter, FormatOptions};
use serde::Serialize;

use crate::engine::Engine;
use crate::error::Result;
use crate::error::SkippedFile;
use crate::output::lease::LeaseBody;

/// Everything `tessera status` reports.
#[derive(Debug, Serialize)]
pub struct Status {
    /// The output location.
    pub output: String,
    /// The lease object, when one exists.
    pub lease: Option<LeaseBody>,
    /// True while an unexpired, unreleased lease exists (a run is active, or died recently).
    pub locked: bool,
    /// Runs whose publish stopped part way; the next run finishes them.
    pub pending_publishes: Vec<String>,
    /// Event files processed by earlier runs.
    pub processed_files: usize,
    /// Event files the next run will read.
    pub new_files: Vec<String>,
    /// Processed files that changed since (not re-read; `--full` rebuilds).
    pub changed_files: Vec<SkippedFile>,
    /// Event files the next run would skip, and why.
    pub unreadable_files: Vec<SkippedFile>,
    /// The current version of each table.
    pub tables: BTreeMap<String, u64>,
    /// The last runs, newest first: each a column → value map.
    pub runs: Vec<BTreeMap<String, String>>,
    /// Identifier digests in `_state/suppressed` (people forgotten by `tessera forget`).
    pub suppressed_identifiers: u64,
    /// Event files that still hold a forgotten person's events: Tessera cannot delete them.
    pub files_holding_forgotten: Vec<crate::stages::forget::HeldFile>,
}

/// Gathers the status of `engine`'s output; reads only.
pub async fn status(engine: &Engine, last_runs: usize) -> Result<Status> {
    let place = engine.outputs.place();
    let lease = crate::output::lease::read(place)
        .await?
        .map(|(body, _)| body);
    let locked = match crate::output::lease::local_lock_held(place) {
        Some(held) => held,
        None => lease
            .as_ref()
            .is_some_and(|l| !l.is_free(chrono::Utc::now())),
    };
    let pending_publishes = crate::output::publish::pending(place).await?;
    let seen = crate::output::state::seen(&engine.outputs, &engine.ctx)
        .await?
        .unwrap_or_default();
    let inventory =
        crate::stages::ingest::discover(&engine.event_places, &[], Some(&seen), &|_, _| {}).await?;
    let mut tables = BTreeMap::new();
    for name in crate::output::published_tables(&engine.outputs, &engine.ctx).await? {
        if let Some(table) = engine.outputs.open(&name).await? {
            tables.insert(name, table.version().unwrap_or(0));
        }
    }
    let mut runs = Vec::new();
    if let Some(df) = engine
        .outputs
        .read(&engine.ctx, crate::tables::RUNS)
        .await?
    {
        let wanted = [
            "run_id",
            "status",
            "mode",
            "started_at",
            "finished_at",
            "input_files",
            "new_events",
            "events",
            "profiles",
            "error",
        ];
        let present: Vec<&str> = wanted
            .iter()
            .copied()
            .filter(|c| df.schema().field_with_unqualified_name(c).is_ok())
            .collect();
        let batches = df
            .select_columns(&present)?
            .sort(vec![
                datafusion::prelude::col("started_at").sort(false, false)
            ])?
            .limit(0, Some(last_runs))?
            .collect()
            .await?;
        let options = FormatOptions::default().with_null("");
        for batch in batches {
            let formatters: Vec<ArrayFormatter> = batch
                .columns()
                .iter()
                .map(|c| ArrayFormatter::try_new(c.as_ref(), &options))
                .collect::<std::result::Result<_, _>>()?;
            for row in 0..batch.num_rows() {
                let mut map = BTreeMap::new();
                for (i, field) in batch.schema().fields().iter().enumerate() {
                    map.insert(field.name().clone(), formatters[i].value(row).to_string());
                }
                runs.push(map);
            }
        }
    }
    let (suppressed_identifiers, files_holding_forgotten) =
        crate::stages::forget::held_files(engine).await?;
    Ok(Status {
        output: place.to_string(),
        lease,
        locked,
        pending_publishes,
        processed_files: seen.len(),
        new_files: inventory.files.iter().map(|f| f.url.clone()).collect(),
        changed_files: inventory.changed,
        unreadable_files: inventory.skipped,
        tables,
        runs,
        suppressed_identifiers,
        files_holding_forgotten,
    })
}

impl Status {
    /// The status as text for a person.
    pub fn render(&self) -> String {
        use std::fmt::Write;
        let mut out = String::new();
        let _ = writeln!(out, "output   {}", self.output);
        match &self.lease {
            None => {
                let _ = writeln!(out, "lease    free (never taken)");
            }
            Some(l) if self.locked => {
                let _ = writeln!(
                    out,
                    "lease    HELD by run {} on {} until {}",
                    l.run_id,
                    l.owner,
                    l.expires_at.to_rfc3339()
                );
            }
            Some(l) => {
                let how = if l.released {
                    format!(
                        "released by run {} at {}",
                        l.run_id,
                        l.expires_at.to_rfc3339()
                    )
                } else if l.expires_at > chrono::Utc::now() {
                    format!("run {} stopped without releasing it", l.run_id)
                } else {
                    format!(
                        "run {}'s lease expired at {}",
                        l.run_id,
                        l.expires_at.to_rfc3339()
                    )
                };
                let _ = writeln!(out, "lease    free ({how})");
            }
        }
        if self.pending_publishes.is_empty() {
            let _ = writeln!(out, "publish  nothing pending");
        } else {
            let _ = writeln!(
                out,
                "publish  unfinished: {} (the next run finishes it)",
                self.pending_publishes.join(", ")
            );
        }
        let _ = writeln!(
            out,
            "input    {} files processed, {} new, {} changed since processed, {} unreadable",
            self.processed_files,
            self.new_files.len(),
            self.changed_files.len(),
            self.unreadable_files.len()
        );
        for f in &self.changed_files {
            let _ = writeln!(out, "  changed    {}: {}", f.file, f.reason);
        }
        for f in &self.unreadable_files {
            let _ = writeln!(out, "  unreadable {}: {}", f.file, f.reason);
        }
        if self.suppressed_identifiers > 0 {
            let _ = writeln!(
                out,
                "forgotten {} identifiers suppressed; {} event files still hold them{}",
                self.suppressed_identifiers,
                self.files_holding_forgotten.len(),
                if self.files_holding_forgotten.is_empty() {
                    ""
                } else {
                    " (delete them, or rewrite them without those rows: Tessera cannot)"
                }
            );
            for f in &self.files_holding_forgotten {
                let _ = writeln!(out, "  holds      {} ({} rows)", f.file, f.rows);
            }
        }
        let _ = writeln!(out, "tables");
        for (name, version) in &self.tables {
            let _ = writeln!(out, "  {name:<28} version {version}");
        }
        let _ = writeln!(out, "runs (newest first)");
        for run in &self.runs {
            let get = |k: &str| run.get(k).map(String::as_str).unwrap_or("");
            let _ = writeln!(
                out,
                "  {} {:<9} {:<11} started {} events {} (new {}) {}",
                get("run_id"),
                get("status"),
                get("mode"),
                get("started_at"),
                get("events"),
                get("new_events"),
                get("error")
            );
        }
        out
    }
}
