//! A run, stage by stage, as DESIGN.md §1 draws it. Read this first.
//!
//! ```text
//! event files ─► ingest: footer + schema checks, row checks, dedupe ─► rejected_events
//!                          │
//!                       events ─► identity: queries/identity/*.sql → links → union-find
//!                          │          ─► identity_graph, identity_links, identity_conflicts, profile_merges
//!                 events + profile_id ─► (profiles, segments: coming stages)
//!                          │
//!                        runs  (one row per run, appended last)
//! ```

use std::time::Instant;

use chrono::Utc;

use crate::config::Project;
use crate::engine::Engine;
use crate::error::Result;
use crate::identity;
use crate::output::WriteMode;
use crate::progress::Progress;
use crate::runs::{RunReport, RunStatus};
use crate::tables;

/// Choices for one run.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Rebuild everything from all input. Every run is a full run until incremental input lands,
    /// so this is accepted now and changes nothing yet.
    pub full: bool,
    /// The time relative windows in SQL are measured from (`as_of()`); default: the run's start.
    pub as_of: Option<chrono::DateTime<chrono::Utc>>,
}

/// Runs the project's pipeline once and records the run in `runs`.
///
/// A run that fails still appends a `failed` row to `runs` (when the output can be written),
/// then returns the error.
pub async fn run(project: Project, options: &RunOptions, progress: Progress) -> Result<RunReport> {
    let engine = Engine::open(project).await?;
    run_on(&engine, options, progress).await
}

/// Runs the pipeline on an engine the caller opened; afterwards its context holds every table
/// of the run (`events` with `profile_id` included), for embedding and tests.
pub async fn run_on(
    engine: &Engine,
    options: &RunOptions,
    progress: Progress,
) -> Result<RunReport> {
    let mut report = RunReport::start(&engine.project.config.project.name);
    engine.ctx.register_udf(crate::functions::as_of(
        options.as_of.unwrap_or(report.started_at),
    ));
    tracing::info!(run_id = %report.run_id, full = options.full, "run started");
    let mut outcome = stages(engine, &mut report, progress, &[]).await;
    if outcome.is_err() {
        // A file with a sound footer and corrupt pages fails the scan that reads it: find such
        // files, skip them, and run once more. With none found, the first error stands.
        let corrupt = crate::ingest::find_corrupt(&engine.events)
            .await
            .unwrap_or_default();
        if !corrupt.is_empty() {
            for bad in &corrupt {
                tracing::warn!(file = %bad.file, reason = %bad.reason, "skipping corrupt event file");
            }
            report.tables.clear();
            report.timings_ms.clear();
            outcome = stages(engine, &mut report, progress, &corrupt).await;
        }
    }
    report.finished_at = Utc::now();
    report.status = match &outcome {
        Ok(()) => RunStatus::Succeeded,
        Err(e) => {
            report.error = Some(e.to_string());
            RunStatus::Failed
        }
    };
    let runs = engine.ctx.read_batch(report.to_batch()?)?;
    let logged = engine
        .outputs
        .write(&engine.ctx, tables::RUNS, runs, WriteMode::Append)
        .await;
    match (outcome, logged) {
        (Err(e), logged) => {
            if let Err(log_error) = logged {
                tracing::error!(error = %log_error, "could not record the failed run in `runs`");
            }
            Err(e)
        }
        (Ok(()), Err(e)) => Err(e),
        (Ok(()), Ok(committed)) => {
            report.tables.insert(tables::RUNS.to_string(), committed);
            tracing::info!(run_id = %report.run_id, events = report.events, "run succeeded");
            Ok(report)
        }
    }
}

async fn stages(
    engine: &Engine,
    report: &mut RunReport,
    progress: Progress,
    known_bad: &[crate::ingest::SkippedFile],
) -> Result<()> {
    // Ingest: find files, check them, plan the events table.
    let started = Instant::now();
    let bar = progress.bar("checking event files", 0);
    let on_file = |done: u64, total: u64| {
        bar.set_length(total);
        bar.set_position(done);
    };
    let ingested = engine.ingest(known_bad, &on_file).await?;
    bar.finish_and_clear();
    let inventory = &ingested.inventory;
    report.input_files = inventory.files.iter().map(|f| f.url.clone()).collect();
    report.skipped_files = inventory.skipped.clone();
    report.rows_read = inventory.rows();
    tracing::info!(
        files = inventory.files.len(),
        skipped = inventory.skipped.len(),
        rows = report.rows_read,
        bytes = inventory.bytes(),
        "event files checked"
    );
    report
        .timings_ms
        .push(("ingest".into(), elapsed_ms(started)));

    let started = Instant::now();
    let spinner = progress.spinner("quarantining rejected events");
    let committed = engine
        .outputs
        .write(
            &engine.ctx,
            tables::REJECTED_EVENTS,
            ingested.rejected.clone(),
            WriteMode::Replace,
        )
        .await?;
    spinner.finish_and_clear();
    report.rows_rejected = committed.rows;
    report
        .tables
        .insert(tables::REJECTED_EVENTS.to_string(), committed);
    report
        .timings_ms
        .push(("rejected_events".into(), elapsed_ms(started)));

    let valid = ingested.valid_rows;
    report.events = ingested.event_rows;
    report.rows_duplicate = valid - ingested.event_rows;
    if report.rows_read != valid + report.rows_rejected {
        tracing::warn!(
            read = report.rows_read,
            valid,
            rejected = report.rows_rejected,
            "row counts do not add up"
        );
    }

    // Identity: links from SQL, rules, union-find, stable profile ids.
    let started = Instant::now();
    let spinner = progress.spinner("resolving identities");
    let identity = identity::resolve(engine, &report.run_id, report.started_at).await?;
    report
        .timings_ms
        .push(("identity".into(), elapsed_ms(started)));
    let graph_for_sql = identity.graph.clone();
    let started = Instant::now();
    spinner.set_message("writing identity tables");
    for (name, batch, mode) in [
        (
            tables::IDENTITY_GRAPH,
            identity.graph.clone(),
            WriteMode::Replace,
        ),
        (tables::IDENTITY_LINKS, identity.links, WriteMode::Replace),
        (
            tables::IDENTITY_CONFLICTS,
            identity.conflicts,
            WriteMode::Replace,
        ),
        (tables::PROFILE_MERGES, identity.merges, WriteMode::Append),
    ] {
        let df = engine.ctx.read_batch(batch)?;
        let committed = engine.outputs.write(&engine.ctx, name, df, mode).await?;
        report.tables.insert(name.to_string(), committed);
    }
    spinner.finish_and_clear();
    report
        .timings_ms
        .push(("identity_tables".into(), elapsed_ms(started)));
    let resolved = identity::resolved_events(
        engine,
        ingested.events.clone(),
        identity.event_profiles,
        identity.event_sources,
    )?;
    engine.ctx.deregister_table(tables::EVENTS)?;
    engine
        .ctx
        .register_table(tables::EVENTS, resolved.into_view())?;
    engine.materialise_events().await?;
    engine.ctx.deregister_table(tables::IDENTITY_GRAPH)?;
    engine
        .ctx
        .register_batch(tables::IDENTITY_GRAPH, graph_for_sql)?;
    report.events_without_profile = report
        .events
        .saturating_sub(identity.stats.events_with_profile);
    report.identity = identity.stats;
    tracing::info!(
        identifiers = report.identity.identifiers,
        profiles = report.identity.profiles,
        refused = report.identity.links_refused,
        merged = report.identity.profiles_merged,
        "identities resolved"
    );

    // Profiles: identifiers, last-known traits, computed traits.
    let started = Instant::now();
    let spinner = progress.spinner("building profiles");
    let profiles = crate::profiles::build(engine).await?;
    let committed = write_batches(engine, tables::PROFILES, profiles).await?;
    report.profiles_written = committed.rows;
    report
        .tables
        .insert(tables::PROFILES.to_string(), committed);
    spinner.finish_and_clear();
    report
        .timings_ms
        .push(("profiles".into(), elapsed_ms(started)));

    // Segments, each after the segments it reads.
    let started = Instant::now();
    crate::segments::ensure_schema(engine)?;
    let mut changes = crate::segments::Changes::default();
    for segment in crate::segments::ordered(engine)? {
        let spinner = progress.spinner(&format!("segment {}", segment.name));
        let members = crate::segments::materialise(engine, &segment).await?;
        // Compared with the version published by the previous run: a profile merged away is
        // gone from the new members, so it exits; its survivor enters only if it qualifies.
        let before = crate::segments::published_members(engine, &segment.name).await?;
        changes.add(
            &segment.name,
            &before,
            &crate::segments::member_ids(&members)?,
        );
        let table = format!("{}/{}", tables::SEGMENTS, segment.name);
        let committed = write_batches(engine, &table, members).await?;
        report.tables.insert(table, committed);
        spinner.finish_and_clear();
    }
    let batch = changes.to_batch(&report.run_id, report.started_at)?;
    let committed = engine
        .outputs
        .write(
            &engine.ctx,
            tables::SEGMENT_CHANGES,
            engine.ctx.read_batch(batch)?,
            WriteMode::Append,
        )
        .await?;
    report
        .tables
        .insert(tables::SEGMENT_CHANGES.to_string(), committed);
    report
        .timings_ms
        .push(("segments".into(), elapsed_ms(started)));
    Ok(())
}

/// Replaces table `name` with `batches`.
async fn write_batches(
    engine: &Engine,
    name: &str,
    batches: Vec<arrow::array::RecordBatch>,
) -> Result<crate::output::Committed> {
    let df = engine.ctx.read_batches(batches)?;
    engine
        .outputs
        .write(&engine.ctx, name, df, WriteMode::Replace)
        .await
}

fn elapsed_ms(since: Instant) -> u64 {
    since.elapsed().as_millis() as u64
}
