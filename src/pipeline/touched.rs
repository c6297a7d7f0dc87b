//! Which recomputed SQL nodes run over the touched profiles only, for the run and for
//! `tessera plan`.
//!
//! The run graph says why a node is recomputed; the stages say whether its plan is per
//! profile ([`crate::stages::incremental_segments`], [`crate::stages::incremental_traits`]).
//! This module puts the two together: a trait or segment recomputed only because new events
//! arrived, whose plan is per profile, runs over the touched profiles; any other runs over
//! every profile.

use arrow::array::RecordBatch;

use super::graph::{Action, Kind, Step};
use crate::engine::Engine;
use crate::error::Result;
use crate::stages::incremental_segments::{self, EVERY, TOUCHED};
use crate::stages::segments::{self, Members, SegmentQuery};
use crate::stages::windows::{self, Windows, DUE};

/// Runs one segment, over the touched profiles when it qualifies, or at a moved as-of over
/// the touched and due profiles when its windows allow ([`crate::stages::windows`]); its rows,
/// members and what it was computed for ([`TOUCHED`], [`DUE`] or [`EVERY`]).
/// `only_new_events` / `time_moved`: the graph recomputes it only because `events` or
/// `identity` were / for those and a moved as-of.
pub async fn segment(
    engine: &Engine,
    segment: &SegmentQuery,
    only_new_events: bool,
    time_moved: bool,
    windows: &mut Windows,
) -> Result<(Vec<RecordBatch>, Members, &'static str)> {
    // The plan as the segment is planned over every event: what `_state/windows` is about.
    let plan = engine
        .query(&segment.sql, &segment.file)
        .await
        .ok()
        .map(|df| df.logical_plan().clone());
    let (rows, over) = if only_new_events {
        let changed = crate::stages::journeys::changed(engine).await?;
        (
            incremental_segments::rows(engine, segment, true, changed, false).await?,
            TOUCHED,
        )
    } else if let (true, Some(plan)) = (time_moved, &plan) {
        let due = windows
            .over(&segment.file, &segment.sql, plan)
            .filter(|_| windows.recorded_at(&segment.file).is_some());
        let rows = match due {
            Some(due) => incremental_segments::rows(engine, segment, true, Some(due), true).await?,
            None => None,
        };
        (rows, DUE)
    } else {
        (None, EVERY)
    };
    let (batches, members, over) = match rows {
        Some(rows) => {
            let (batches, members) = segments::materialise_rows(engine, segment, rows).await?;
            (batches, members, over)
        }
        None => {
            let (batches, members) = segments::materialise(engine, segment).await?;
            (batches, members, EVERY)
        }
    };
    if let Some(plan) = &plan {
        windows.computed(&segment.file, &segment.sql, plan, over == EVERY);
    }
    Ok((batches, members, over))
}

/// Fills in `over` for the recomputed traits and segments of a plan at `as_of` (µs).
pub async fn annotate(engine: &Engine, steps: &mut [Step], as_of: i64) -> Result<()> {
    let stand_in = incremental_segments::stand_in_events(engine).await?;
    let mut files = engine.project.query_files("traits")?;
    files.extend(engine.project.query_files(crate::tables::SEGMENTS)?);
    for step in steps.iter_mut() {
        if step.action == Action::Recompute && step.kind == Kind::Identity {
            step.over = Some(identity_over(engine, step).await?);
            continue;
        }
        if step.action != Action::Recompute || !matches!(step.kind, Kind::Trait | Kind::Segment) {
            continue;
        }
        let Some(query) = step
            .file
            .as_ref()
            .and_then(|f| files.iter().find(|q| &q.file == f))
        else {
            continue;
        };
        let over = if step.only_new_events() {
            if incremental_segments::per_profile(engine, &query.sql, &query.file).await {
                TOUCHED
            } else {
                EVERY
            }
        } else if step.only_new_events_and_time()
            && windows::plan_covers(engine, &query.file, &query.sql, as_of).await?
        {
            DUE
        } else {
            EVERY
        };
        step.over = Some(over.to_string());
    }
    if stand_in {
        engine.ctx.deregister_table(crate::tables::EVENTS)?;
    }
    Ok(())
}

/// What identity runs over: the groups the new events reach, or every event (and why).
async fn identity_over(engine: &Engine, step: &Step) -> Result<String> {
    use crate::stages::identity::groups;
    Ok(match groups::plan(engine).await? {
        Err(why) => format!("{}: {why}", groups::EVERY_EVENT),
        Ok(()) if step.only_new_events() => groups::NEW_GROUPS.to_string(),
        Ok(()) => groups::EVERY_EVENT.to_string(),
    })
}
