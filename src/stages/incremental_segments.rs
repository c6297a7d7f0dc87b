//! Segments computed over the touched profiles only.
//!
//! An incremental run knows which profiles it touched: those with a new event and both sides
//! of every merge or split identity resolution found (the set sessions and per-profile traits
//! are recomputed for, see [`crate::stages::journeys::changed`]). A segment whose rows each
//! come from one profile's events (the per-profile [`Shape`] that computed traits use) keeps
//! the published rows of every other profile and is run over the touched profiles' events
//! alone. This holds only when nothing but those events changed since the published rows were
//! computed, so a segment runs over the touched profiles when all of these hold, and over
//! every profile otherwise:
//!
//! - the run graph recomputes it only because `events` or `identity` were recomputed: not for
//!   an edit of its file, a moved as-of (when it reads the time), a config key or an upgrade;
//! - its plan reads only `events`, through filters, projections, sorts, `DISTINCT`,
//!   aggregates grouped by `profile_id` and joins of such inputs on `profile_id`, and calls
//!   nothing volatile;
//! - the run found which profiles it touched (a published identity graph to compare with);
//! - no row, published or new, has a NULL `profile_id` (such a row cannot be told apart by
//!   profile).
//!
//! Events without a profile are always part of the touched rows: a new one can change what a
//! query computes for the NULL group.

use std::sync::Arc;

use arrow::array::RecordBatch;
use datafusion::common::{Column, JoinType};
use datafusion::dataframe::DataFrame;
use datafusion::datasource::TableProvider;
use datafusion::logical_expr::{cast, col, Expr};

use crate::engine::Engine;
use crate::error::Result;
use crate::stages::incremental_traits::{shape, Shape};
use crate::stages::segments::SegmentQuery;
use crate::tables;

/// What `tessera plan` and the run log say a recomputed node runs over.
pub const TOUCHED: &str = "touched profiles";
/// ... or, when it does not qualify.
pub const EVERY: &str = "every profile";

/// Whether `sql` (a trait or segment file) has the per-profile shape, planned against the
/// project's current tables. A file that does not plan is not per-profile.
pub async fn per_profile(engine: &Engine, sql: &str, file: &str) -> bool {
    match engine.query(sql, file).await {
        Ok(df) => matches!(shape(df.logical_plan()), Shape::PerProfile { .. }),
        Err(_) => false,
    }
}

/// Registers an empty `events` with the published history's columns and `profile_id`, when
/// no `events` table is registered (as in `tessera plan`, which reads no event), so that SQL
/// files can be planned. Returns whether it did; nothing is registered before a first run.
pub async fn stand_in_events(engine: &Engine) -> Result<bool> {
    let ctx = &engine.ctx;
    if ctx.table_exist(tables::EVENTS)? {
        return Ok(false);
    }
    let Some(history) = engine
        .outputs
        .read(ctx, crate::output::state::EVENTS)
        .await?
    else {
        return Ok(false);
    };
    let mut fields: Vec<arrow::datatypes::FieldRef> = history
        .schema()
        .as_arrow()
        .fields()
        .iter()
        .cloned()
        .collect();
    if !fields.iter().any(|f| f.name() == tables::event::PROFILE_ID) {
        fields.push(Arc::new(arrow::datatypes::Field::new(
            tables::event::PROFILE_ID,
            arrow::datatypes::DataType::Utf8,
            true,
        )));
    }
    let schema = Arc::new(arrow::datatypes::Schema::new(fields));
    let empty = datafusion::datasource::MemTable::try_new(schema, vec![vec![]])?;
    ctx.register_table(tables::EVENTS, Arc::new(empty))?;
    Ok(true)
}

/// The touched profiles' events and every event without a profile, computed once per run
/// as [`TOUCHED_EVENTS`]: held in memory when they fit a sixteenth of the memory limit,
/// otherwise written to the scratch folder. (At 100M adversarial events they did not fit, and
/// when that sent the segments over every profile, the incremental run's segments took
/// 37.5 s against a full run's 27.6 s.)
async fn touched_events(
    engine: &Engine,
    changed: &Arc<dyn TableProvider>,
    held_as: &str,
) -> Result<Arc<dyn TableProvider>> {
    let ctx = &engine.ctx;
    if !ctx.table_exist(held_as)? {
        let profileless = ctx
            .table(tables::EVENTS)
            .await?
            .filter(col(tables::event::PROFILE_ID).is_null())?;
        let changed = ctx.read_table(changed.clone())?;
        // The same columns in the same order on both sides of the union.
        let columns: Vec<Expr> = changed
            .schema()
            .fields()
            .iter()
            .map(|f| Expr::Column(Column::new_unqualified(f.name())))
            .collect();
        let touched = changed.union(profileless.select(columns)?)?;
        // Computed once, not a view: a view is planned inline, and the per-profile check
        // reads the plan's scan of `events`.
        engine
            .hold_or_write(held_as, touched, engine.limits.memory / 16)
            .await?;
    }
    Ok(ctx.table_provider(held_as).await?)
}

/// Forgets the touched events once the segments are done.
pub fn release(engine: &Engine) -> Result<()> {
    engine.release(TOUCHED_EVENTS)?;
    engine.release(DUE_EVENTS)
}

/// The touched events while segments run.
const TOUCHED_EVENTS: &str = "__tessera_touched_events";
/// The events of the touched profiles and those whose windows moved, for the windowed
/// segments at a moved as-of (another set than the touched one).
const DUE_EVENTS: &str = "__tessera_due_events";

/// The segment's rows computed over the touched profiles and kept from the published table
/// for every other profile, or `None` when it must run over every profile (see the module
/// comment). `only_new_events`: the run graph recomputes it only because `events` or
/// `identity` were, or (`due`) also because the as-of moved and `changed` holds the profiles
/// whose windows moved ([`crate::stages::windows`]); `changed`: the profiles to compute it
/// for and their events.
pub async fn rows(
    engine: &Engine,
    segment: &SegmentQuery,
    only_new_events: bool,
    changed: Option<(DataFrame, Arc<dyn TableProvider>)>,
    due: bool,
) -> Result<Option<DataFrame>> {
    let Some((profiles, events)) = changed else {
        return Ok(None);
    };
    if !only_new_events {
        return Ok(None);
    }
    let table = format!("{}/{}", tables::SEGMENTS, segment.name);
    let Some(published) = engine.outputs.read(&engine.ctx, &table).await? else {
        return Ok(None);
    };
    let held_as = if due { DUE_EVENTS } else { TOUCHED_EVENTS };
    let touched = touched_events(engine, &events, held_as).await?;
    let Some(fresh) = query_over(engine, touched, segment).await? else {
        return Ok(None);
    };
    let fresh_schema = fresh.schema().as_arrow().clone();
    let Ok(_) = fresh_schema.index_of(tables::event::PROFILE_ID) else {
        return Ok(None);
    };
    let fresh_rows = engine.collect(fresh, &segment.file).await?;
    // Published rows in the new rows' types; a column the published table lacks means it
    // was computed by another query.
    let mut columns = Vec::with_capacity(fresh_schema.fields().len());
    for field in fresh_schema.fields() {
        if !published
            .schema()
            .has_column_with_unqualified_name(field.name())
        {
            return Ok(None);
        }
        let c = Expr::Column(Column::new_unqualified(field.name()));
        columns.push(cast(c, field.data_type().clone()).alias(field.name()));
    }
    let published = published.select(columns)?;
    let unkeyed = published
        .clone()
        .filter(col(tables::event::PROFILE_ID).is_null())?
        .count()
        .await?;
    let fresh_unkeyed: usize = fresh_rows
        .iter()
        .filter_map(|b| b.column_by_name(tables::event::PROFILE_ID))
        .map(|c| c.null_count())
        .sum();
    if unkeyed > 0 || fresh_unkeyed > 0 {
        tracing::info!(file = %segment.file, "segment has rows without a profile_id: computed for every profile");
        return Ok(None);
    }
    let key_type = fresh_schema
        .field_with_name(tables::event::PROFILE_ID)?
        .data_type()
        .clone();
    let touched_ids = profiles.select(vec![cast(
        Expr::Column(Column::new_unqualified(tables::event::PROFILE_ID)),
        key_type,
    )
    .alias(TOUCHED_KEY)])?;
    let kept = published.join(
        touched_ids,
        JoinType::LeftAnti,
        &[tables::event::PROFILE_ID],
        &[TOUCHED_KEY],
        None,
    )?;
    let fresh = engine
        .ctx
        .read_batches(non_empty(fresh_rows, &fresh_schema))?;
    Ok(Some(fresh.union(kept)?))
}

/// The touched profiles' key while they are joined.
const TOUCHED_KEY: &str = "__tessera_touched_profile_id";

fn non_empty(mut rows: Vec<RecordBatch>, schema: &arrow::datatypes::Schema) -> Vec<RecordBatch> {
    if rows.is_empty() {
        rows.push(RecordBatch::new_empty(Arc::new(schema.clone())));
    }
    rows
}

/// The segment's query planned with `events` standing for the touched events; `None` when the
/// plan does not have the per-profile shape.
async fn query_over(
    engine: &Engine,
    events: Arc<dyn TableProvider>,
    segment: &SegmentQuery,
) -> Result<Option<DataFrame>> {
    let all = engine.ctx.deregister_table(tables::EVENTS)?;
    let planned = match engine.ctx.register_table(tables::EVENTS, events) {
        Ok(_) => engine.query(&segment.sql, &segment.file).await,
        Err(e) => Err(e.into()),
    };
    engine.ctx.deregister_table(tables::EVENTS)?;
    if let Some(all) = all {
        engine.ctx.register_table(tables::EVENTS, all)?;
    }
    let planned = planned?;
    Ok(match shape(planned.logical_plan()) {
        Shape::PerProfile { .. } => Some(planned),
        Shape::Other => None,
    })
}
