//! A run, stage by stage, as DESIGN.md §1 draws it. Read this first.
//!
//! ```text
//! lease ─► finish any half-done publish ─► which input files are new (_state/input_files)
//!   new event files ─► ingest: footer + schema checks, row checks, dedupe ─► rejected_events
//!                          │
//!   _state/events (history + new events) ─► identity: queries/identity/*.sql → union-find
//!                          │          ─► identity_graph, identity_links, identity_conflicts, profile_merges
//!                 events + profile_id ─► profiles ─► segments, segment_changes
//!                          │
//!                        runs ─► publish: every table's commit, `runs` last ─► release lease
//! ```
//!
//! Every table is written to a stage first ([`crate::output::publish`]); nothing is visible to
//! readers until [`Stage::publish`] runs at the end.

pub mod data_tests;
pub mod graph;
pub mod runs;
pub mod touched;
pub mod warnings;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use arrow::array::{AsArray, RecordBatch};

use chrono::Utc;

use crate::config::Project;
use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::output::lease::Lease;
use crate::output::publish::Stage;
use crate::output::state;
use crate::output::{Committed, Outputs, WriteMode};
use crate::pipeline::runs::{RunReport, RunStatus};
use crate::progress::Progress;
use crate::stages::identity;
use crate::tables;

/// Choices for one run.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Rebuild everything from every input file, ignoring what earlier runs processed.
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

/// What a run's stages did.
enum Work {
    /// Tables were written to the stage and wait to be published.
    Done,
    /// An incremental run found no new event files: nothing to write.
    Nothing,
}

/// Runs the pipeline on an engine the caller opened; afterwards its context holds every table
/// of the run (`events` with `profile_id` included), for embedding and tests.
///
/// Takes the output's lease first: while another run holds it, this returns
/// [`Error::Locked`] having done nothing.
pub async fn run_on(
    engine: &Engine,
    options: &RunOptions,
    progress: Progress,
) -> Result<RunReport> {
    let mut report = RunReport::start(&engine.project.config.project.name);
    report.as_of = options.as_of.unwrap_or(report.started_at);
    engine
        .ctx
        .register_udf(crate::sql::functions::as_of(report.as_of));
    let place = engine.outputs.place().clone();
    crate::output::lease::check_conditional_writes(&place).await?;
    let ttl = Duration::from_secs(engine.project.config.run.lease_seconds);
    let lease = Lease::acquire(&place, &report.run_id, ttl).await?;
    tracing::info!(run_id = %report.run_id, full = options.full, "run started");
    // Only a run sweeps: other commands are often run by hand beside a scheduled one, and
    // must not delete anything.
    crate::output::scratch::sweep(&engine.limits.scratch_parent());
    let result = leased(engine, options, progress, &lease, &mut report).await;
    lease.release().await;
    result.map(|()| report)
}

async fn leased(
    engine: &Engine,
    options: &RunOptions,
    progress: Progress,
    lease: &Lease,
    report: &mut RunReport,
) -> Result<()> {
    let place = engine.outputs.place().clone();
    report.finished_publishes = crate::output::publish::roll_forward(&place).await?;
    let seen = if options.full {
        None
    } else {
        state::seen(&engine.outputs, &engine.ctx).await?
    };
    report.mode = if seen.is_some() {
        "incremental"
    } else {
        "full"
    }
    .into();

    let mut stage = Stage::new(&place);
    let mut outcome = stages(
        engine,
        &stage,
        report,
        progress,
        &[],
        seen.as_ref(),
        options.full,
    )
    .await;
    // A query stopped at its time limit was not failed by a file: the run ends at once rather
    // than read every event file again looking for corrupt ones.
    let timed_out = matches!(outcome, Err(Error::QueryTimeout { .. }));
    if outcome.is_err() && !timed_out && !lease.is_lost() {
        // A file with a sound footer and corrupt pages fails the scan that reads it: find such
        // files, skip them, and run once more. With none found, the first error stands.
        let corrupt = match &outcome {
            Err(Error::ShortScan(files)) => files.clone(),
            _ => crate::stages::ingest::find_corrupt(&engine.event_places, seen.as_ref())
                .await
                .unwrap_or_default(),
        };
        if !corrupt.is_empty() {
            for bad in &corrupt {
                tracing::warn!(file = %bad.file, reason = %bad.reason, "skipping corrupt event file");
            }
            report.tables.clear();
            report.stages.clear();
            stage = Stage::new(&place);
            outcome = stages(
                engine,
                &stage,
                report,
                progress,
                &corrupt,
                seen.as_ref(),
                options.full,
            )
            .await;
        }
    }
    report.finished_at = Utc::now();
    match outcome {
        Ok(Work::Nothing) => {
            report.status = RunStatus::Unchanged;
            tracing::info!(run_id = %report.run_id, "nothing to recompute; nothing written");
            Ok(())
        }
        Ok(Work::Done) => {
            report.status = RunStatus::Succeeded;
            // Only a warning hangs on it: a failure to read the time is logged, not fatal.
            let newest = newest_event(engine).await.unwrap_or_else(|e| {
                tracing::warn!(error = %e, "could not read the newest event's time");
                None
            });
            report.warnings.extend(warnings::as_of_gap(
                newest,
                report.as_of,
                &engine.project.config.warnings,
            ));
            report.warnings.sort_by(|a, b| a.subject.cmp(&b.subject));
            let meter = engine.meter();
            let outputs = Outputs::new(stage.place().clone());
            let runs = engine.ctx.read_batch(report.to_batch()?)?;
            let committed = outputs
                .write(&engine.ctx, tables::RUNS, runs, WriteMode::Append)
                .await?;
            stage_manifests(engine, &stage, &outputs, report).await?;
            let spinner = progress.spinner("publishing");
            let entries = stage.publish(&report.run_id, lease, tables::RUNS).await?;
            report.tables.insert(tables::RUNS.to_string(), committed);
            spinner.set_message("tidying old versions");
            tidy(engine).await;
            spinner.finish_and_clear();
            report.stages.push(meter.finish("publish", 0));
            tracing::info!(run_id = %report.run_id, events = report.events, commits = entries,
                "run succeeded and published");
            Ok(())
        }
        Err(e) => {
            report.status = RunStatus::Failed;
            report.error = Some(e.to_string());
            if !matches!(e, Error::Fenced(_)) {
                if let Err(log_error) = record_failure(engine, lease, report).await {
                    tracing::error!(error = %log_error, "could not record the failed run in `runs`");
                }
            }
            Err(e)
        }
    }
}

/// The time of the newest event in the run's event history; `None` when there are none.
async fn newest_event(engine: &Engine) -> Result<Option<chrono::DateTime<Utc>>> {
    use arrow::array::{Array, AsArray};
    let df = engine
        .ctx
        .sql(&format!(
            "SELECT max(\"{}\") FROM {}",
            crate::tables::event::TIMESTAMP,
            tables::EVENTS
        ))
        .await?;
    for batch in df.collect().await? {
        let column = arrow::compute::cast(
            batch.column(0),
            &arrow::datatypes::DataType::Timestamp(arrow::datatypes::TimeUnit::Microsecond, None),
        )?;
        let values = column.as_primitive::<arrow::datatypes::TimestampMicrosecondType>();
        if !values.is_empty() && !values.is_null(0) {
            return Ok(chrono::DateTime::from_timestamp_micros(values.value(0)));
        }
    }
    Ok(None)
}

/// Stages the current-files manifests of the tables this run publishes (docs/readers.md).
async fn stage_manifests(
    engine: &Engine,
    stage: &Stage,
    staged: &Outputs,
    report: &RunReport,
) -> Result<()> {
    let mut written = vec![tables::RUNS.to_string()];
    let mut carried = Vec::new();
    for (name, committed) in &report.tables {
        if committed.carried {
            carried.push(name.clone());
        } else {
            written.push(name.clone());
        }
    }
    let retired: Vec<String> = report
        .nodes
        .iter()
        .filter(|s| s.action == graph::Action::Retire)
        .flat_map(|s| s.tables.iter().cloned())
        .filter(|t| !crate::output::always_published(t))
        .collect();
    crate::output::manifest::stage(stage, staged, &engine.outputs, &written, &carried, &retired)
        .await
}

/// Publishes only the failed run's `runs` row: nothing else of it becomes visible.
async fn record_failure(engine: &Engine, lease: &Lease, report: &RunReport) -> Result<()> {
    let stage = Stage::new(engine.outputs.place());
    let outputs = Outputs::new(stage.place().clone());
    let runs = engine.ctx.read_batch(report.to_batch()?)?;
    outputs
        .write(&engine.ctx, tables::RUNS, runs, WriteMode::Append)
        .await?;
    let runs_table = [tables::RUNS.to_string()];
    crate::output::manifest::stage(&stage, &outputs, &engine.outputs, &runs_table, &[], &[])
        .await?;
    stage.publish(&report.run_id, lease, tables::RUNS).await?;
    Ok(())
}

/// Checkpoints long logs and deletes files older than `run.retention_hours` that no kept
/// version needs; a failure here is logged and leaves the published run as it is.
async fn tidy(engine: &Engine) {
    let retention = Duration::from_secs(engine.project.config.run.retention_hours * 3600);
    let result = async {
        let names = crate::output::all_tables(&engine.outputs).await?;
        let mut done = engine.outputs.tidy(&names, retention).await?;
        for name in crate::output::retired_tables(&engine.outputs, &engine.ctx).await? {
            done.files_deleted += engine.outputs.remove_retired(&name, retention).await?;
        }
        Ok::<_, Error>(done)
    }
    .await;
    match result {
        Ok(done) => tracing::debug!(
            checkpoints = done.checkpoints,
            deleted = done.files_deleted,
            "tidied"
        ),
        Err(e) => {
            tracing::warn!(error = %e, "could not tidy old table versions; the next run tries again")
        }
    }
}

/// The resolved events' queries, as a query timeout names them.
const RESOLVED_EVENTS: &str = "Tessera's resolved events (events with their profile_id)";
/// How the query time limit names the writing of the event history and rejected_events.
const BUILT_IN_EVENTS: &str = "Tessera's event history (checking new events, rejected_events)";

/// A one-column (`message_id`) table of `ids`.
fn message_ids(
    ctx: &datafusion::prelude::SessionContext,
    ids: Vec<arrow::array::ArrayRef>,
) -> Result<datafusion::dataframe::DataFrame> {
    let schema = std::sync::Arc::new(arrow::datatypes::Schema::new(vec![
        arrow::datatypes::Field::new(
            tables::event::MESSAGE_ID,
            arrow::datatypes::DataType::Utf8,
            true,
        ),
    ]));
    let batches = ids
        .into_iter()
        .map(|a| arrow::array::RecordBatch::try_new(schema.clone(), vec![a]))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    Ok(if batches.is_empty() {
        ctx.read_batch(arrow::array::RecordBatch::new_empty(schema))?
    } else {
        ctx.read_batches(batches)?
    })
}

/// Names the stage and the limit when the query engine ran out of memory.
fn in_stage<'a>(engine: &'a Engine, stage: &'static str) -> impl Fn(Error) -> Error + 'a {
    move |e| out_of_memory(engine, stage.to_string(), None, e)
}

/// Names the segment and its file when its rows (or the comparison with its last version)
/// did not fit in the memory limit: the segment's own SQL decides how many rows there are.
fn in_segment<'a>(
    engine: &'a Engine,
    segment: &'a crate::stages::segments::SegmentQuery,
) -> impl Fn(Error) -> Error + 'a {
    move |e| {
        out_of_memory(
            engine,
            format!("segment `{}` ({})", segment.name, segment.file),
            Some("or narrow the segment so that it returns fewer rows".to_string()),
            e,
        )
    }
}

/// A memory error from below, named by the stage that caught it (a segment names itself more
/// precisely than the query that failed inside it) and the limit in force; one already named
/// by a stage passes through.
fn out_of_memory(engine: &Engine, stage: String, narrow: Option<String>, e: Error) -> Error {
    match e {
        Error::Memory { limit, message, .. } if limit.is_empty() => Error::Memory {
            stage,
            limit: engine.limits.memory_text.clone(),
            message,
            narrow,
        },
        e @ Error::DataFusion(_) if e.is_memory() => Error::Memory {
            stage,
            limit: engine.limits.memory_text.clone(),
            message: e.to_string(),
            narrow,
        },
        e => e,
    }
}

/// The identity stage under the query time limit, which names its SQL files.
async fn resolve_in_time(
    engine: &Engine,
    run_id: &str,
    started_at: chrono::DateTime<Utc>,
    full: bool,
    new_events: Option<&identity::groups::NewEvents>,
) -> Result<identity::IdentityTables> {
    let files: Vec<String> = identity::load_queries(engine)?
        .into_iter()
        .map(|q| q.file)
        .collect();
    let what = format!("identity ({})", files.join(", "));
    engine
        .in_time(
            &what,
            identity::resolve(engine, run_id, started_at, full, new_events),
        )
        .await
}

async fn stages(
    engine: &Engine,
    stage: &Stage,
    report: &mut RunReport,
    progress: Progress,
    known_bad: &[crate::error::SkippedFile],
    seen: Option<&state::Seen>,
    full: bool,
) -> Result<Work> {
    let outputs = &Outputs::new(stage.place().clone());
    let ctx = &engine.ctx;
    // Ingest: find the files not processed before, check them, plan their events.
    let meter = engine.meter();
    let bar = progress.bar("checking event files", 0);
    let on_file = |done: u64, total: u64| {
        bar.set_length(total);
        bar.set_position(done);
    };
    let ingested = crate::stages::ingest::ingest(engine, known_bad, seen, &on_file).await?;
    bar.finish_and_clear();
    let inventory = &ingested.inventory;
    report.input_files = inventory.files.iter().map(|f| f.url.clone()).collect();
    report.skipped_files = inventory.skipped.clone();
    report.changed_files = inventory.changed.clone();
    report.rows_read = inventory.rows();
    tracing::info!(
        files = inventory.files.len(),
        already_processed = inventory.already_processed,
        changed = inventory.changed.len(),
        skipped = inventory.skipped.len(),
        rows = report.rows_read,
        bytes = inventory.bytes(),
        "event files checked"
    );

    // What needs recomputing, and why.
    let (graph, plan, fingerprints) =
        plan_run(engine, inventory.files.len(), report.as_of, full).await?;
    report.nodes = plan.steps.clone();
    report.skipped_nodes = plan.skipped.clone();
    for step in plan.recomputed() {
        tracing::info!(node = %step.node, reasons = %step.reasons.join("; "), "recompute");
    }
    if !plan.has_work() {
        // Nothing to recompute, but a test may be new: tests check the published tables.
        // One that passed over these same tables at the last run is not run again.
        register_outputs(engine).await?;
        run_data_tests(engine, progress, report, true).await?;
        return Ok(Work::Nothing);
    }
    report.stages.push(meter.finish("ingest", report.rows_read));
    let previous = previous_run(engine).await?;
    // Every published table stands in for its node until (unless) the node is recomputed;
    // the tables of retired nodes and of built-in nodes nothing needs are not read.
    register_outputs(engine).await?;
    for table in plan
        .steps
        .iter()
        .filter(|s| s.action == graph::Action::Retire)
        .flat_map(|s| s.tables.iter().cloned())
        .chain(plan.skipped.iter().flat_map(|s| skipped_tables(&s.node)))
    {
        deregister(ctx, &table)?;
    }

    // The event history.
    let meter = engine.meter();
    let read_ids = if plan.recomputes(graph::node::EVENTS) {
        let mode = if seen.is_some() {
            WriteMode::Append
        } else {
            WriteMode::Replace
        };
        let spinner =
            progress.spinner("quarantining rejected events, adding new events to the history");
        let read_ids = event_history(engine, outputs, &ingested, seen, mode, report).await?;
        spinner.finish_and_clear();
        Some(read_ids)
    } else {
        report.rows_read = 0;
        None
    };
    // The history as this run leaves it: published, plus what this run staged.
    let history = outputs
        .provider(ctx, state::EVENTS)
        .await?
        .ok_or_else(|| Error::Internal("the event history table was not written".into()))?;
    ctx.deregister_table(tables::EVENTS)?;
    ctx.register_table(tables::EVENTS, history)?;
    if read_ids.is_some() || previous.is_none() {
        report.events = ctx.table(tables::EVENTS).await?.count().await? as u64;
    } else if let Some(previous) = &previous {
        report.events = previous.events;
    }
    report.stages.push(meter.finish("events", report.rows_read));

    // Identity: links from SQL, rules, union-find, stable profile ids.
    let reads_events = |step: &graph::Step| {
        graph.node(&step.node).is_some_and(|n| {
            n.reads.contains(graph::node::EVENTS) && n.reads.contains(graph::node::IDENTITY)
        })
    };
    let events_needed = plan.recomputed().into_iter().any(reads_events);
    let mut changed_identities = None;
    let identity_graph: Option<RecordBatch> = if plan.recomputes(graph::node::IDENTITY) {
        let meter = engine.meter();
        let spinner = progress.spinner("resolving identities");
        // An incremental run resolves only the identity groups its new events reach.
        let new_events = if full || seen.is_none() || read_ids.is_none() {
            tracing::info!(why = "a full run", "identity: resolving every group");
            None
        } else if !inventory.changed.is_empty() {
            tracing::info!(
                why = "event files changed since they were processed",
                "identity: resolving every group"
            );
            None
        } else {
            match identity::groups::new_event_files(engine, outputs).await? {
                Ok(files) => Some(files),
                Err(why) => {
                    tracing::info!(why = %why, "identity: resolving every group");
                    None
                }
            }
        };
        let identity = resolve_in_time(
            engine,
            &report.run_id,
            report.started_at,
            full,
            new_events.as_ref(),
        )
        .await
        .map_err(in_stage(engine, "identity"))?;
        report.stages.push(meter.finish("identity", report.events));
        changed_identities = identity.changed_profiles;
        let graph_for_sql = identity.graph.clone();
        let meter = engine.meter();
        spinner.set_message("writing identity tables");
        // The four tables are written at once: each writer encodes on one task, so one after
        // the other they left a core idle.
        let mut writes = vec![
            (
                tables::IDENTITY_GRAPH,
                vec![identity.graph.clone()],
                WriteMode::Replace,
            ),
            (
                tables::IDENTITY_LINKS,
                vec![identity.links],
                WriteMode::Replace,
            ),
            (
                tables::IDENTITY_CONFLICTS,
                vec![identity.conflicts],
                WriteMode::Replace,
            ),
            (
                tables::PROFILE_MERGES,
                vec![identity.merges],
                WriteMode::Append,
            ),
        ];
        // The groups kept for the next incremental run (see identity::groups).
        let groups_meta = match identity.groups {
            Some(groups) => {
                let fingerprint = groups.fingerprint.clone();
                writes.push((identity::groups::IDS, groups.ids, WriteMode::Replace));
                writes.push((identity::groups::LINKS, groups.links, WriteMode::Replace));
                Some(fingerprint)
            }
            None => None,
        };
        let writes = writes.into_iter().map(|(name, batches, mode)| async move {
            let df = ctx.read_batches(batches)?;
            let committed = outputs.write(ctx, name, df, mode).await?;
            Ok::<_, Error>((name, committed))
        });
        for (name, committed) in futures::future::try_join_all(writes).await? {
            report.tables.insert(name.to_string(), committed);
            if !name.starts_with("_state/") {
                register_staged(ctx, outputs, name).await?;
            }
        }
        if let Some(fingerprint) = groups_meta {
            // Names the graph and the history the groups were resolved with, by version.
            let version = |name: &str| report.tables.get(name).map(|c| c.version);
            let graph_version = version(tables::IDENTITY_GRAPH).unwrap_or(0);
            let events_version = match version(state::EVENTS) {
                Some(v) => v,
                None => identity::groups::published_version(engine, state::EVENTS).await?,
            };
            let meta = identity::groups::meta_batch(fingerprint, graph_version, events_version)?;
            let df = ctx.read_batch(meta)?;
            let committed = outputs
                .write(ctx, identity::groups::META, df, WriteMode::Replace)
                .await?;
            report
                .tables
                .insert(identity::groups::META.to_string(), committed);
        }
        if let Some(matching) = identity.matching {
            for (name, batch) in [
                (tables::MATCH_MODEL, matching.model),
                (tables::MATCH_SCORES, matching.scores),
                (tables::state::MATCH_MODEL, matching.state_model),
                (tables::state::MATCH_RECORDS, matching.state_records),
            ] {
                let df = ctx.read_batch(batch)?;
                let committed = outputs.write(ctx, name, df, WriteMode::Replace).await?;
                report.tables.insert(name.to_string(), committed);
                register_staged(ctx, outputs, name).await?;
            }
        }
        spinner.finish_and_clear();
        report
            .stages
            .push(meter.finish("identity_tables", identity.stats.identifiers));
        let events = ctx.table(tables::EVENTS).await?;
        let rules = identity::graph::Rules::from_config(&engine.project.config.identity);
        let resolved =
            identity::resolve_events(events, identity.event_profiles, &graph_for_sql, &rules)?;
        ctx.deregister_table(tables::EVENTS)?;
        ctx.register_table(tables::EVENTS, resolved.into_view())?;
        materialise_events(engine, report).await?;
        ctx.deregister_table(tables::IDENTITY_GRAPH)?;
        ctx.register_batch(tables::IDENTITY_GRAPH, graph_for_sql.clone())?;
        let unresolved = ctx
            .table(tables::EVENTS)
            .await?
            .filter(datafusion::prelude::col(tables::event::PROFILE_ID).is_null())?;
        report.events_without_profile = engine
            .in_time(RESOLVED_EVENTS, async { Ok(unresolved.count().await?) })
            .await? as u64;
        report.identity = identity.stats;
        report.identity.events_with_profile = report.events - report.events_without_profile;
        tracing::info!(
            identifiers = report.identity.identifiers,
            profiles = report.identity.profiles,
            refused = report.identity.links_refused,
            merged = report.identity.profiles_merged,
            "identities resolved"
        );
        Some(graph_for_sql)
    } else {
        // Kept: the published graph maps the events to their profiles, when anything
        // recomputed reads them.
        if let Some(previous) = &previous {
            report.identity = previous.identity.clone();
            report.events_without_profile = previous.events_without_profile;
        }
        if events_needed {
            let events = ctx.table(tables::EVENTS).await?;
            if let Some(resolved) = identity::events_with_published_profiles(engine, events).await?
            {
                ctx.deregister_table(tables::EVENTS)?;
                ctx.register_table(tables::EVENTS, resolved.into_view())?;
                materialise_events(engine, report).await?;
            }
        }
        None
    };

    // Journeys and predictions, before profiles so traits and segments can read them.
    let which = crate::stages::journeys::Which {
        sessions: plan.recomputes(graph::node::SESSIONS),
        rfm: plan.recomputes(graph::node::RFM),
        predictions: plan.recomputes(graph::node::PREDICTIONS),
    };
    // An incremental run names the events it added and the profiles identity changed, so
    // sessions are cut again, and per-profile traits computed again, only where they can have
    // changed.
    crate::stages::journeys::release_changed(engine)?;
    if let (Some(_), Some(changed_profiles), Some(read_ids)) = (seen, changed_identities, read_ids)
    {
        let changes = crate::stages::journeys::Changes {
            new_events: message_ids(ctx, read_ids)?,
            changed_profiles,
        };
        crate::stages::journeys::register_changes(engine, changes).await?;
    }
    if which.sessions || which.rfm || which.predictions {
        let meter = engine.meter();
        let spinner = progress.spinner("sessions, RFM and predictions");
        let (built, predictions) = engine
            .in_time(
                "Tessera's journeys stage (sessions, rfm, predictions)",
                crate::stages::journeys::build(
                    engine,
                    outputs,
                    &report.run_id,
                    report.as_of,
                    which,
                ),
            )
            .await
            .map_err(in_stage(engine, "journeys"))?;
        for (name, committed) in built {
            report.tables.insert(name, committed);
        }
        if let Some(p) = &predictions {
            report.warnings.extend(warnings::models(&p.models));
        }
        report.predictions = predictions;
        spinner.finish_and_clear();
        report.stages.push(meter.finish("journeys", report.events));
    }

    // With the events and identities as published, no profile changed: every trait file
    // whose text and as-of are the ones recorded keeps its published values.
    let sql_nodes = plan.recomputes(graph::node::PROFILES)
        || plan
            .steps
            .iter()
            .any(|s| s.kind == graph::Kind::Segment && s.action == graph::Action::Recompute);
    let changed = if !sql_nodes {
        None
    } else if plan.recomputes(graph::node::EVENTS) || plan.recomputes(graph::node::IDENTITY) {
        crate::stages::journeys::changed(engine).await?
    } else {
        let none = ctx
            .table(tables::EVENTS)
            .await?
            .filter(datafusion::prelude::lit(false))?;
        let profiles = none.clone().select_columns(&[tables::event::PROFILE_ID])?;
        Some((profiles, none.into_view()))
    };
    // Which profiles the traits and segments that read the time within windows run over.
    let mut windows = if sql_nodes {
        crate::stages::windows::Windows::open(
            engine,
            report.as_of.timestamp_micros(),
            changed.clone(),
        )
        .await?
    } else {
        crate::stages::windows::Windows::closed(report.as_of.timestamp_micros())
    };

    // Profiles: identifiers, last-known traits, computed traits.
    let mut profiles_write = tokio::task::JoinSet::new();
    if plan.recomputes(graph::node::PROFILES) {
        let meter = engine.meter();
        let spinner = progress.spinner("building profiles");
        let as_of = report.as_of.timestamp_micros();
        let graph_batch = match identity_graph {
            Some(batch) => batch,
            None => published_identity_graph(engine).await?,
        };
        // Unreadable state costs only time: every trait file then runs over every profile.
        let carry = match crate::stages::incremental_traits::Carry::open(
            ctx,
            &engine.outputs,
            as_of,
            changed,
        )
        .await
        {
            Ok(carry) => carry,
            Err(e) => {
                tracing::warn!(
                    error = %e,
                    "could not read {}: computing every trait for every profile",
                    crate::stages::incremental_traits::STATE
                );
                None
            }
        };
        // Read once: `_state/traits` records the very text the traits were computed with.
        let trait_files = engine.project.query_files("traits")?;
        let profiles = crate::stages::profiles::build(
            engine,
            &graph_batch,
            &trait_files,
            carry.as_ref(),
            &mut windows,
        )
        .await
        .map_err(in_stage(engine, "profiles"))?;
        // Written while segments and reports run (they read the profiles held in memory):
        // the table is encoded on one task, and at 100M events that took 4-5 s of a core.
        profiles_write.spawn(replace_table(
            engine,
            outputs,
            tables::PROFILES.to_string(),
            profiles,
        ));
        // What the next incremental run needs to know to carry these traits over.
        let mut recorded = trait_files;
        recorded.push(crate::stages::profiles::last_known_state(&engine.project));
        let state = crate::stages::incremental_traits::state_batch(&recorded, as_of)?;
        let committed = outputs
            .write(
                ctx,
                crate::stages::incremental_traits::STATE,
                ctx.read_batch(state)?,
                WriteMode::Replace,
            )
            .await?;
        report.tables.insert(
            crate::stages::incremental_traits::STATE.to_string(),
            committed,
        );
        spinner.finish_and_clear();
        report.stages.push(meter.finish("profiles", report.events));
    }

    // Segments, each after the segments it reads; retired segments' members all exit. A
    // segment over one profile's events at a time runs over the touched profiles only.
    let meter = engine.meter();
    engine.ensure_schema(tables::SEGMENTS)?;
    let mut changes = crate::stages::segments::Changes::new(
        &ctx.runtime_env().memory_pool,
        &report.run_id,
        report.started_at,
    );
    let mut writes = tokio::task::JoinSet::new();
    let mut segments_changed = false;
    for segment in crate::stages::segments::ordered(engine)? {
        let node = format!("{}/{}", tables::SEGMENTS, segment.name);
        if !plan.recomputes(&node) {
            continue;
        }
        segments_changed = true;
        let spinner = progress.spinner(&format!("segment {}", segment.name));
        let t0 = std::time::Instant::now();
        let only_new_events = plan.step(&node).is_some_and(graph::Step::only_new_events);
        let time_moved = plan
            .step(&node)
            .is_some_and(graph::Step::only_new_events_and_time);
        let (members, ids, over) = engine
            .in_time(
                &segment.file,
                touched::segment(engine, &segment, only_new_events, time_moved, &mut windows),
            )
            .await
            .map_err(in_segment(engine, &segment))?;
        tracing::info!(ms = t0.elapsed().as_millis() as u64, file = %segment.file, computed_for = over, "segment");
        // Compared with the version published by the previous run: a profile merged away is
        // gone from the new members, so it exits; its survivor enters only if it qualifies.
        // A segment that was not published (new, or retired before) had no members.
        let before = if published_before(&plan, &node) {
            crate::stages::segments::published_members(engine, &segment)
                .await
                .map_err(in_segment(engine, &segment))?
        } else {
            crate::stages::segments::Members::default()
        };
        changes
            .add(&segment.name, &before, &ids)
            .map_err(in_segment(engine, &segment))?;
        let had = published_before(&plan, &node).then(|| before.len());
        report.warnings.extend(warnings::segment_size(
            &segment.name,
            had,
            ids.len(),
            &engine.project.config.warnings,
        ));
        drop(before);
        // Written while the next segment runs (a table is encoded on one task; later
        // segments read this one from memory, not from its table).
        writes.spawn(replace_table(engine, outputs, node, members));
        spinner.finish_and_clear();
    }
    for step in &plan.steps {
        if step.action != graph::Action::Retire || step.kind != graph::Kind::Segment {
            continue;
        }
        let name = step
            .node
            .strip_prefix(&format!("{}/", tables::SEGMENTS))
            .unwrap_or(&step.node)
            .to_string();
        segments_changed = true;
        let retired = crate::stages::segments::SegmentQuery {
            name: name.clone(),
            file: step.file.clone().unwrap_or_else(|| step.node.clone()),
            sql: String::new(),
            needs: Default::default(),
        };
        let before = crate::stages::segments::published_members(engine, &retired)
            .await
            .map_err(in_segment(engine, &retired))?;
        changes
            .add(&name, &before, &Default::default())
            .map_err(in_segment(engine, &retired))?;
        ctx.deregister_table(datafusion::common::TableReference::partial(
            tables::SEGMENTS,
            name.as_str(),
        ))?;
    }
    while let Some(done) = writes.join_next().await {
        let (table, committed) =
            done.map_err(|e| Error::Internal(format!("writing a segment table stopped: {e}")))??;
        report.tables.insert(table, committed);
    }
    // Written when a segment changed, and on the first run whatever the project has, so the
    // table is always there to read.
    if segments_changed
        || engine
            .outputs
            .open(tables::SEGMENT_CHANGES)
            .await?
            .is_none()
    {
        let (batches, held) = changes
            .take()
            .map_err(in_stage(engine, tables::SEGMENT_CHANGES))?;
        let committed = outputs
            .write(
                ctx,
                tables::SEGMENT_CHANGES,
                ctx.read_batches(batches)?,
                WriteMode::Append,
            )
            .await
            .map_err(in_stage(engine, tables::SEGMENT_CHANGES))?;
        drop(held);
        report
            .tables
            .insert(tables::SEGMENT_CHANGES.to_string(), committed);
        register_staged(ctx, outputs, tables::SEGMENT_CHANGES).await?;
        report.stages.push(meter.finish("segments", report.events));
    }

    // Each windowed trait's and segment's next moments, for the next run at a later as-of.
    let mut current = engine.project.query_files("traits")?;
    current.extend(engine.project.query_files(tables::SEGMENTS)?);
    if let Some(committed) = windows.write(engine, outputs, &current).await? {
        report
            .tables
            .insert(crate::stages::windows::STATE.to_string(), committed);
    }
    crate::stages::journeys::release_changed(engine)?;
    crate::stages::incremental_segments::release(engine)?;

    // Reports: any read-only query over the run's tables, written for BI tools.
    let meter = engine.meter();
    engine.ensure_schema(tables::REPORTS)?;
    for query in crate::stages::reports::list(engine)? {
        if !plan.recomputes(&format!("{}/{}", tables::REPORTS, query.name)) {
            continue;
        }
        let spinner = progress.spinner(&format!("report {}", query.name));
        let t0 = std::time::Instant::now();
        let (table, committed) = engine
            .in_time(
                &query.file,
                crate::stages::reports::materialise(engine, outputs, &query),
            )
            .await
            .map_err(in_stage(engine, "reports"))?;
        tracing::info!(ms = t0.elapsed().as_millis() as u64, file = %query.file, rows = committed.rows, "report");
        report.tables.insert(table, committed);
        spinner.finish_and_clear();
    }
    // Any of the profiles write still running counts to the reports stage.
    if let Some(done) = profiles_write.join_next().await {
        let (_, committed) =
            done.map_err(|e| Error::Internal(format!("writing the profiles table stopped: {e}")))??;
        report.profiles_written = committed.rows;
        report
            .tables
            .insert(tables::PROFILES.to_string(), committed);
    }
    report.stages.push(meter.finish("reports", report.events));

    // Data tests read the tables as this run would publish them; a failing `error` test
    // stops the publish.
    let keys = run_data_tests(engine, progress, report, false).await?;

    // The tests' keys, the graph as this run leaves it, and the tables it carries over
    // unchanged.
    for (name, state) in [
        (
            data_tests::STATE,
            data_tests::state_batch(&report.data_tests, &keys)?,
        ),
        (
            graph::STATE,
            graph::state_batch(&graph, &fingerprints, report.as_of)?,
        ),
    ] {
        let committed = outputs
            .write(ctx, name, ctx.read_batch(state)?, WriteMode::Replace)
            .await?;
        report.tables.insert(name.to_string(), committed);
    }
    carry_tables(engine, &plan, previous.as_ref(), report).await?;
    Ok(Work::Done)
}

/// Runs the project's data tests over the tables registered now; an `error` test that finds
/// rows fails the run. With `carry`, a test that passed at the last published run over the
/// same inputs is carried over instead (for a run that recomputes nothing). Returns each
/// test's key for `_state/tests`.
async fn run_data_tests(
    engine: &Engine,
    progress: Progress,
    report: &mut RunReport,
    carry: bool,
) -> Result<BTreeMap<String, String>> {
    let tests = data_tests::collect(&engine.project)?;
    if tests.is_empty() {
        return Ok(BTreeMap::new());
    }
    let spinner = progress.spinner("data tests");
    let keys = data_tests::keys(engine, &tests, report.as_of).await?;
    let outcomes = if carry {
        data_tests::run_changed(engine, &tests, &keys).await?
    } else {
        data_tests::run_all(engine, &tests).await?
    };
    spinner.finish_and_clear();
    report.data_tests = outcomes;
    match data_tests::blocking(&report.data_tests) {
        Some(failed) => Err(failed),
        None => Ok(keys),
    }
}

/// The tables of a built-in node that a run skips.
fn skipped_tables(node: &str) -> Vec<String> {
    match node {
        graph::node::SESSIONS => vec![tables::SESSIONS.into()],
        graph::node::RFM => vec![tables::RFM.into()],
        graph::node::PREDICTIONS => {
            vec![tables::PREDICTIONS.into(), tables::PREDICTION_MODELS.into()]
        }
        _ => Vec::new(),
    }
}

/// Removes output table `name` (`segments/x` included) from the context, if registered.
fn deregister(ctx: &datafusion::prelude::SessionContext, name: &str) -> Result<()> {
    match name.split_once('/') {
        Some((folder, table)) if folder == tables::SEGMENTS || folder == tables::REPORTS => {
            ctx.deregister_table(datafusion::common::TableReference::partial(folder, table))?;
        }
        Some(_) => {}
        None => {
            ctx.deregister_table(name)?;
        }
    }
    Ok(())
}

/// Registers the version of `name` this run staged, so later SQL in the run reads it.
async fn register_staged(
    ctx: &datafusion::prelude::SessionContext,
    outputs: &Outputs,
    name: &str,
) -> Result<()> {
    if let Some(provider) = outputs.provider(ctx, name).await? {
        ctx.deregister_table(name)?;
        ctx.register_table(name, provider)?;
    }
    Ok(())
}

/// Whether node `name`'s table held its previous members: not when its file is new (a
/// table left by a file retired earlier had every member exit then).
fn published_before(plan: &graph::Plan, name: &str) -> bool {
    !plan
        .step(name)
        .is_some_and(|s| s.reasons.iter().any(|r| r.starts_with("new file")))
}

/// Records the published version of every table of a kept node in this run's `runs` row.
async fn carry_tables(
    engine: &Engine,
    plan: &graph::Plan,
    previous: Option<&PreviousRun>,
    report: &mut RunReport,
) -> Result<()> {
    for step in &plan.steps {
        if step.action != graph::Action::Keep {
            continue;
        }
        for table in &step.tables {
            if report.tables.contains_key(table) {
                continue;
            }
            let Some(opened) = engine.outputs.open(table).await? else {
                continue;
            };
            let version = opened.version().unwrap_or(0);
            let rows = previous
                .and_then(|p| p.tables.get(table))
                .map_or(0, |c| c.rows);
            report.tables.insert(
                table.clone(),
                Committed {
                    version,
                    rows,
                    carried: true,
                },
            );
        }
    }
    Ok(())
}

/// Writes the new events to the history and rejected rows to `rejected_events`, and records
/// the files read; returns the message ids read (sessions use them on incremental runs).
async fn event_history(
    engine: &Engine,
    outputs: &Outputs,
    ingested: &crate::stages::ingest::Ingested,
    seen: Option<&state::Seen>,
    mode: WriteMode,
    report: &mut RunReport,
) -> Result<Vec<arrow::array::ArrayRef>> {
    let ctx = &engine.ctx;
    let inventory = &ingested.inventory;
    // One pass over the input feeds both tables (see `ingest::split`). An incremental run
    // also keeps the message_ids it read, so sessions know which profiles got events.
    let split = crate::stages::ingest::split(ctx, ingested, seen.is_some())?;
    // A forgotten person's rows stop here, before the history and the quarantine: whatever
    // file brings them (redelivered, or read again by `--full`), see `forget`.
    let suppression = crate::stages::forget::Suppression::load(engine).await?;
    let (split_events, split_rejected) = match &suppression {
        Some(s) => (s.filter(split.events)?, s.filter(split.rejected)?),
        None => (split.events, split.rejected),
    };
    // The event history: earlier runs' events plus the new ones not seen before.
    let new_events = match seen {
        Some(_) => match engine.outputs.read(ctx, state::EVENTS).await? {
            Some(history) => {
                let known = history
                    .select(vec![datafusion::prelude::col(tables::event::MESSAGE_ID)
                        .alias("__tessera_known_id")])?;
                split_events.join(
                    known,
                    datafusion::common::JoinType::LeftAnti,
                    &[tables::event::MESSAGE_ID],
                    &["__tessera_known_id"],
                    None,
                )?
            }
            None => split_events,
        },
        None => split_events,
    };
    let (rejected, history, read_ids) = engine
        .in_time(BUILT_IN_EVENTS, async {
            Ok(tokio::join!(
                outputs.write(ctx, tables::REJECTED_EVENTS, split_rejected, mode),
                outputs.write(ctx, state::EVENTS, new_events, mode),
                split.driver,
            ))
        })
        .await?;
    // An error reading the input fails both writes and is the one that says why; a writer
    // that fails first stops the reading, and then the writer's error says why.
    let read = match read_ids {
        Ok(read) => read,
        Err(Error::WriterStopped) => {
            rejected.map_err(in_stage(engine, "rejected_events"))?;
            history.map_err(in_stage(engine, "event history"))?;
            return Err(Error::WriterStopped);
        }
        Err(e) => return Err(in_stage(engine, "event history")(e)),
    };
    // Rows read are rows scanned, never what footers promise; a file whose scan fell short
    // fails the run before anything of it is published or recorded as processed.
    let short = read.short_files(inventory);
    if !short.is_empty() {
        return Err(Error::ShortScan(short));
    }
    report.rows_read = read.rows();
    let read_ids = read.ids;
    let committed = rejected.map_err(in_stage(engine, "rejected_events"))?;
    report.rows_rejected = committed.rows;
    report
        .tables
        .insert(tables::REJECTED_EVENTS.to_string(), committed);
    register_staged(ctx, outputs, tables::REJECTED_EVENTS).await?;
    let committed = history.map_err(in_stage(engine, "event history"))?;
    report.new_events = committed.rows;
    report.tables.insert(state::EVENTS.to_string(), committed);
    let files = ctx.read_batch(crate::stages::ingest::input_files_batch(
        &inventory.files,
        &report.run_id,
    )?)?;
    let committed = outputs.write(ctx, state::INPUT_FILES, files, mode).await?;
    report
        .tables
        .insert(state::INPUT_FILES.to_string(), committed);
    // Every row read is either rejected or valid; copies are the valid rows not kept.
    report.suppressed = suppression.as_ref().map_or(0, |s| s.dropped());
    if report.suppressed > 0 {
        tracing::info!(
            rows = report.suppressed,
            "dropped rows holding the identifiers of forgotten people"
        );
    }
    let valid = report.rows_read.saturating_sub(report.rows_rejected);
    report.rows_duplicate = valid.saturating_sub(report.new_events + report.suppressed);
    Ok(read_ids)
}

/// Registers the published tables for the run's SQL. `runs` is first written when a
/// project's first run ends: until then SQL over it (a data test, a report) reads it empty,
/// as a table of no earlier runs.
async fn register_outputs(engine: &Engine) -> Result<()> {
    engine.register_outputs().await?;
    if !engine.ctx.table_exist(tables::RUNS)? {
        let empty = datafusion::datasource::MemTable::try_new(RunReport::schema(), vec![vec![]])?;
        engine.ctx.register_table(tables::RUNS, Arc::new(empty))?;
    }
    Ok(())
}

/// Copies the resolved events once for the many stages that read them.
async fn materialise_events(engine: &Engine, report: &mut RunReport) -> Result<()> {
    let meter = engine.meter();
    engine
        .in_time(RESOLVED_EVENTS, engine.materialise_events(report.events))
        .await
        .map_err(in_stage(engine, "resolved events"))?;
    report
        .stages
        .push(meter.finish("resolved_events", report.events));
    Ok(())
}

/// The published identity graph in one batch (for profiles, when identity is kept).
async fn published_identity_graph(engine: &Engine) -> Result<RecordBatch> {
    let df = engine
        .outputs
        .read(&engine.ctx, tables::IDENTITY_GRAPH)
        .await?
        .ok_or_else(|| {
            Error::Usage(format!(
                "the published {} is missing; run `tessera run --full`",
                tables::IDENTITY_GRAPH
            ))
        })?;
    let df = crate::output::plain_columns(df)?;
    let schema = Arc::new(df.schema().as_arrow().clone());
    let batches = df.collect().await?;
    Ok(arrow::compute::concat_batches(&schema, &batches)?)
}

/// What the last succeeded run recorded that a run keeping its nodes reports again.
struct PreviousRun {
    events: u64,
    events_without_profile: u64,
    identity: crate::stages::identity::IdentityStats,
    tables: BTreeMap<String, Committed>,
}

/// The last succeeded run's counts and tables; `None` before any.
async fn previous_run(engine: &Engine) -> Result<Option<PreviousRun>> {
    let Some(runs) = engine.outputs.read(&engine.ctx, tables::RUNS).await? else {
        return Ok(None);
    };
    let wanted = [
        "events",
        "events_without_profile",
        "identifiers",
        "profiles",
        "links_accepted",
        "links_refused",
        "profiles_merged",
        "tables",
    ];
    let batches = runs
        .filter(datafusion::prelude::col("status").eq(datafusion::prelude::lit("succeeded")))?
        .sort(vec![
            datafusion::prelude::col("started_at").sort(false, false)
        ])?
        .limit(0, Some(1))?
        .select_columns(&wanted)?
        .collect()
        .await?;
    let Some(batch) = batches.into_iter().find(|b| b.num_rows() > 0) else {
        return Ok(None);
    };
    let int = |name: &str| -> u64 {
        batch
            .column_by_name(name)
            .and_then(|c| arrow::compute::cast(c, &arrow::datatypes::DataType::Int64).ok())
            .map(|c| {
                c.as_primitive::<arrow::datatypes::Int64Type>()
                    .value(0)
                    .max(0) as u64
            })
            .unwrap_or(0)
    };
    let tables_json = batch
        .column_by_name("tables")
        .and_then(|c| arrow::compute::cast(c, &arrow::datatypes::DataType::Utf8).ok())
        .map(|c| c.as_string::<i32>().value(0).to_string())
        .unwrap_or_default();
    Ok(Some(PreviousRun {
        events: int("events"),
        events_without_profile: int("events_without_profile"),
        identity: crate::stages::identity::IdentityStats {
            identifiers: int("identifiers"),
            profiles: int("profiles"),
            links_accepted: int("links_accepted"),
            links_refused: int("links_refused"),
            profiles_merged: int("profiles_merged"),
            ..Default::default()
        },
        tables: serde_json::from_str(&tables_json).unwrap_or_default(),
    }))
}

/// The graph, what the next run would do with each node, and the nodes' fingerprints.
async fn plan_run(
    engine: &Engine,
    new_files: usize,
    as_of: chrono::DateTime<Utc>,
    full: bool,
) -> Result<(graph::Graph, graph::Plan, BTreeMap<String, String>)> {
    let graph = graph::Graph::build(engine).await?;
    let recorded = graph::recorded(engine).await?;
    let (mut plan, fingerprints) = graph::plan(&graph, recorded.as_ref(), new_files, as_of, full);
    if recorded.is_none() {
        // Before the graph was recorded, a segment or report whose file was deleted stayed
        // published: retire it now.
        for (folder, kind) in [
            (tables::SEGMENTS, graph::Kind::Segment),
            (tables::REPORTS, graph::Kind::Report),
        ] {
            for name in engine.outputs.folder_tables(folder).await? {
                let node = format!("{folder}/{name}");
                if graph.node(&node).is_none() {
                    plan.steps.push(graph::Step {
                        reasons: vec![format!("no file in queries/{folder}/ defines it any more")],
                        tables: vec![node.clone()],
                        node,
                        kind,
                        file: None,
                        action: graph::Action::Retire,
                        over: None,
                    });
                }
            }
        }
    }
    Ok((graph, plan, fingerprints))
}

/// What the next run would recompute and why, without running it (`tessera plan`).
pub async fn plan(engine: &Engine, options: &RunOptions) -> Result<graph::Plan> {
    let as_of = options.as_of.unwrap_or_else(Utc::now);
    let seen = if options.full {
        None
    } else {
        state::seen(&engine.outputs, &engine.ctx).await?
    };
    let inventory =
        crate::stages::ingest::discover(&engine.event_places, &[], seen.as_ref(), &|_, _| {})
            .await?;
    let (_, mut plan, _) = plan_run(engine, inventory.files.len(), as_of, options.full).await?;
    touched::annotate(engine, &mut plan.steps, as_of.timestamp_micros()).await?;
    Ok(plan)
}
/// Replaces table `name` with `batches`. The future owns what it needs, so it can run on a
/// task of its own while the next work goes on (a table is encoded on one task).
fn replace_table(
    engine: &Engine,
    outputs: &Outputs,
    name: String,
    batches: Vec<arrow::array::RecordBatch>,
) -> impl std::future::Future<Output = Result<(String, crate::output::Committed)>> + Send + 'static
{
    let (ctx, outputs) = (engine.ctx.clone(), outputs.clone());
    async move {
        let t0 = std::time::Instant::now();
        let df = ctx.read_batches(batches)?;
        let committed = outputs.write(&ctx, &name, df, WriteMode::Replace).await?;
        // Whole-table rewrites are what an incremental run still pays per row it keeps.
        tracing::info!(table = %name, rows = committed.rows, ms = t0.elapsed().as_millis() as u64, "table written");
        Ok((name, committed))
    }
}
