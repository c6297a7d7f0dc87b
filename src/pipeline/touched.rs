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

/// Runs one segment, over the touched profiles when it qualifies; its rows, members and what
/// it was computed for ([`TOUCHED`] or [`EVERY`]).
pub async fn segment(
    engine: &Engine,
    segment: &SegmentQuery,
    only_new_events: bool,
) -> Result<(Vec<RecordBatch>, Members, &'static str)> {
    let changed = if only_new_events {
        crate::stages::journeys::changed(engine).await?
    } else {
        None
    };
    match incremental_segments::rows(engine, segment, only_new_events, changed).await? {
        Some(rows) => {
            let (batches, members) = segments::materialise_rows(engine, segment, rows).await?;
            Ok((batches, members, TOUCHED))
        }
        None => {
            let (batches, members) = segments::materialise(engine, segment).await?;
            Ok((batches, members, EVERY))
        }
    }
}

/// Fills in `over` for the recomputed traits and segments of a plan.
pub async fn annotate(engine: &Engine, steps: &mut [Step]) -> Result<()> {
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
        let touched = step.only_new_events()
            && incremental_segments::per_profile(engine, &query.sql, &query.file).await;
        step.over = Some(if touched { TOUCHED } else { EVERY }.to_string());
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
