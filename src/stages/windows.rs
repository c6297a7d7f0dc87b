//! Time windows: which profiles a run at a later as-of must compute again.
//!
//! A per-profile trait or segment that calls `as_of()` gives a profile another result when
//! the time moves, even with no new event (`last seen in the 30 days before the as-of`). It
//! does so only at known moments when the query compares event times with the as-of: the
//! comparison `x >= as_of() - INTERVAL '30 days'` can flip only when the as-of passes
//! `x + 30 days`, and `x` is one of the profile's event times. So each run keeps, per profile,
//! the next such moment at or after its as-of over the windows of every such file
//! (`_state/windows`, published with the run's tables, with a row per file saying which text
//! and as-of its results are from); a run at a later as-of computes these files again only for
//! the profiles whose moment has come (the due ones) and the touched ones, and keeps every
//! other profile's published rows. One moment per profile, not per file and profile, keeps the
//! state as small as `profiles`; the price is that a profile due for one window is computed
//! again for every windowed file.
//!
//! A query is bounded this way ([`offsets`]) when every `as_of()` it calls sits in a
//! comparison (`<`, `<=`, `>`, `>=`, `=`, `<>`, `BETWEEN`) of `as_of()` plus or minus a fixed
//! interval (days, hours, ..., not months) with a column that holds the events' own
//! `timestamp`, or a `min`, `max`, `first_value` or `last_value` of it, plus or minus a fixed
//! interval. Such a comparison's truth, for any as-of between two of the moments
//! `timestamp + offset` of the profile's events, is the same, and so is every row computed
//! from it. Anything else (the as-of in a projection, in a function, compared with another
//! column, an interval in months) leaves the query on the path it had: over every profile.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use arrow::array::{Array, AsArray, RecordBatch, StringArray, TimestampMicrosecondArray};
use arrow::datatypes::{DataType, Field, Int64Type, Schema};
use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
use datafusion::common::{Column, JoinType, ScalarValue};
use datafusion::dataframe::DataFrame;
use datafusion::datasource::TableProvider;
use datafusion::logical_expr::{cast, col, lit, Distinct, Expr, LogicalPlan, Operator};

use crate::config::QueryFile;
use crate::engine::Engine;
use crate::error::Result;
use crate::output::{Committed, Outputs, WriteMode};
use crate::stages::incremental_traits::{fingerprint, shape, Shape};
use crate::tables;

/// Where the next moments are kept.
pub const STATE: &str = tables::state::WINDOWS;

/// What `tessera plan` and the run log say a windowed trait or segment, recomputed because
/// the as-of moved, runs over: the touched profiles and those whose next moment has come.
pub const DUE: &str = "touched and due profiles";

/// The offsets `k` (µs) such that the query's result for a profile can change only when the
/// as-of passes `t + k` for one of the profile's event times `t`; `None` when the query calls
/// `as_of()` in any other way. An empty set: it does not call `as_of()`.
pub fn offsets(plan: &LogicalPlan) -> Option<BTreeSet<i64>> {
    let mut found = BTreeSet::new();
    let mut bounded = true;
    let _ = plan.apply(|node| {
        for expr in node.expressions() {
            if !visit(&expr, node, &mut found) {
                bounded = false;
                return Ok(TreeNodeRecursion::Stop);
            }
        }
        Ok(TreeNodeRecursion::Continue)
    });
    bounded.then_some(found)
}

/// Whether `expr` (of `node`) calls `as_of()` only in bounded comparisons, adding their offsets.
fn visit(expr: &Expr, node: &LogicalPlan, found: &mut BTreeSet<i64>) -> bool {
    match expr {
        Expr::BinaryExpr(b) if is_comparison(b.op) => {
            if let Some(k) = crossing(&b.left, &b.right, node) {
                found.insert(k);
                return true;
            }
        }
        Expr::Between(b) => {
            if let (Some(low), Some(high)) = (
                crossing(&b.expr, &b.low, node),
                crossing(&b.expr, &b.high, node),
            ) {
                found.insert(low);
                found.insert(high);
                return true;
            }
        }
        Expr::ScalarFunction(f) if f.name() == crate::sql::functions::AS_OF => return false,
        _ => {}
    }
    let mut ok = true;
    let _ = expr.apply_children(|child| {
        if visit(child, node, found) {
            Ok(TreeNodeRecursion::Continue)
        } else {
            ok = false;
            Ok(TreeNodeRecursion::Stop)
        }
    });
    ok
}

fn is_comparison(op: Operator) -> bool {
    matches!(
        op,
        Operator::Eq
            | Operator::NotEq
            | Operator::Lt
            | Operator::LtEq
            | Operator::Gt
            | Operator::GtEq
            | Operator::IsDistinctFrom
            | Operator::IsNotDistinctFrom
    )
}

/// What one side of a comparison is: the as-of or a column, plus a fixed offset (µs).
enum Base {
    AsOf,
    Column(Column),
}

fn term(expr: &Expr) -> Option<(Base, i64)> {
    match expr {
        Expr::Alias(a) => term(&a.expr),
        Expr::ScalarFunction(f)
            if f.name() == crate::sql::functions::AS_OF && f.args.is_empty() =>
        {
            Some((Base::AsOf, 0))
        }
        Expr::Column(c) => Some((Base::Column(c.clone()), 0)),
        Expr::BinaryExpr(b) if b.op == Operator::Plus => {
            let (side, k) = match (interval(&b.left), interval(&b.right)) {
                (None, Some(k)) => (&b.left, k),
                (Some(k), None) => (&b.right, k),
                _ => return None,
            };
            let (base, o) = term(side)?;
            Some((base, o.checked_add(k)?))
        }
        Expr::BinaryExpr(b) if b.op == Operator::Minus => {
            let k = interval(&b.right)?;
            let (base, o) = term(&b.left)?;
            Some((base, o.checked_sub(k)?))
        }
        _ => None,
    }
}

/// A literal interval of fixed length, in µs (`None` for months, which vary in length).
fn interval(expr: &Expr) -> Option<i64> {
    let Expr::Literal(value, _) = expr else {
        return None;
    };
    match value {
        ScalarValue::IntervalMonthDayNano(Some(v))
            if v.months == 0 && v.nanoseconds % 1000 == 0 =>
        {
            (v.days as i64)
                .checked_mul(86_400_000_000)?
                .checked_add(v.nanoseconds / 1000)
        }
        ScalarValue::IntervalDayTime(Some(v)) => (v.days as i64)
            .checked_mul(86_400_000_000)?
            .checked_add(v.milliseconds as i64 * 1000),
        ScalarValue::DurationMicrosecond(Some(v)) => Some(*v),
        ScalarValue::DurationMillisecond(Some(v)) => v.checked_mul(1000),
        ScalarValue::DurationSecond(Some(v)) => v.checked_mul(1_000_000),
        _ => None,
    }
}

/// For `a op b` with one side `as_of() + k1` and the other `x + k2` (`x` an event time of the
/// row's profile): the offset `k2 - k1` of the as-of at which it can flip, `x + k2 - k1`.
fn crossing(a: &Expr, b: &Expr, node: &LogicalPlan) -> Option<i64> {
    let (left, right) = (term(a)?, term(b)?);
    let (column, k_column, k_as_of) = match (left, right) {
        ((Base::AsOf, k1), (Base::Column(c), k2)) | ((Base::Column(c), k2), (Base::AsOf, k1)) => {
            (c, k2, k1)
        }
        _ => return None,
    };
    let inputs = node.inputs();
    // A join's condition sees both sides; any other node its one input.
    let found = inputs.iter().find_map(|input| {
        input
            .schema()
            .maybe_index_of_column(&column)
            .map(|i| (*input, i))
    })?;
    event_time(found.0, found.1).then(|| k_column.checked_sub(k_as_of))?
}

/// Whether output column `index` of `plan` always holds one of the events' `timestamp`
/// values of the row's profile (or NULL).
fn event_time(plan: &LogicalPlan, index: usize) -> bool {
    let through_column = |expr: &Expr, input: &LogicalPlan| match expr.clone().unalias() {
        Expr::Column(c) => input
            .schema()
            .maybe_index_of_column(&c)
            .is_some_and(|i| event_time(input, i)),
        _ => false,
    };
    match plan {
        LogicalPlan::TableScan(scan) => {
            scan.table_name.table() == tables::EVENTS
                && scan.projected_schema.fields().get(index).is_some_and(|f| {
                    f.name() == tables::event::TIMESTAMP && is_event_time_type(f.data_type())
                })
        }
        LogicalPlan::Filter(f) => event_time(&f.input, index),
        LogicalPlan::Sort(s) => event_time(&s.input, index),
        LogicalPlan::SubqueryAlias(a) => event_time(&a.input, index),
        LogicalPlan::Distinct(Distinct::All(input)) => event_time(input, index),
        LogicalPlan::Projection(p) => p
            .expr
            .get(index)
            .is_some_and(|e| through_column(e, &p.input)),
        LogicalPlan::Aggregate(a) => {
            if a.group_expr
                .iter()
                .any(|g| matches!(g, Expr::GroupingSet(_)))
            {
                return false;
            }
            let groups = a.group_expr.len();
            if index < groups {
                return through_column(&a.group_expr[index], &a.input);
            }
            match a.aggr_expr.get(index - groups).map(|e| e.clone().unalias()) {
                Some(Expr::AggregateFunction(f)) => {
                    ["min", "max", "first_value", "last_value"]
                        .contains(&f.func.name().to_lowercase().as_str())
                        && f.params.args.len() == 1
                        && through_column(&f.params.args[0], &a.input)
                }
                _ => false,
            }
        }
        LogicalPlan::Join(j) => {
            let left = j.left.schema().fields().len();
            if index < left {
                event_time(&j.left, index)
            } else {
                matches!(
                    j.join_type,
                    datafusion::common::JoinType::Inner | datafusion::common::JoinType::Left
                ) && event_time(&j.right, index - left)
            }
        }
        _ => false,
    }
}

/// The history's `timestamp` type, in µs UTC: a whole number of µs offsets stays exact, and a
/// day is always 24 hours (in a zone with summer time, adding a day need not be).
fn is_event_time_type(data_type: &DataType) -> bool {
    match data_type {
        DataType::Timestamp(arrow::datatypes::TimeUnit::Microsecond, tz) => tz
            .as_deref()
            .is_none_or(|tz| ["UTC", "+00:00", "Z"].contains(&tz)),
        _ => false,
    }
}

/// Whether a trait or segment plan can run over the profiles whose windows moved: per
/// profile, and bounded (see the module comment). Its offsets, when it can.
pub fn bounded(plan: &LogicalPlan) -> Option<BTreeSet<i64>> {
    match shape(plan) {
        Shape::PerProfile { as_of: true } => offsets(plan).filter(|k| !k.is_empty()),
        _ => None,
    }
}

/// What the last run recorded for one windowed file.
#[derive(Debug, Clone)]
struct Recorded {
    fingerprint: String,
    /// The as-of its published results were computed at (µs).
    at: i64,
    offsets: BTreeSet<i64>,
}

/// The columns of `_state/windows`. A file's row (a marker: `file`, `fingerprint`, `offsets`,
/// `as_of`) says which text its results were computed from, at which as-of; a profile's row
/// (`profile_id`, `next_change`, `as_of`) holds its next moment over the offsets of every
/// recorded file, one row per profile rather than per file and profile.
mod column {
    pub const FILE: &str = "file";
    pub const FINGERPRINT: &str = "fingerprint";
    pub const OFFSETS: &str = "offsets";
    pub const AS_OF: &str = "as_of";
    pub const PROFILE_ID: &str = "profile_id";
    pub const NEXT_CHANGE: &str = "next_change";
}

fn state_schema() -> Arc<Schema> {
    Arc::new(Schema::new(vec![
        Field::new(column::FILE, DataType::Utf8, true),
        Field::new(column::FINGERPRINT, DataType::Utf8, true),
        Field::new(column::OFFSETS, DataType::Utf8, true),
        Field::new(column::AS_OF, tables::timestamp_type(), false),
        Field::new(column::PROFILE_ID, DataType::Utf8, true),
        Field::new(column::NEXT_CHANGE, tables::timestamp_type(), true),
    ]))
}

/// Reads `_state/windows`: the table and its files' rows (a row that does not read as one
/// is left out, so its file runs over every profile).
async fn recorded(engine: &Engine) -> Result<Option<(DataFrame, HashMap<String, Recorded>)>> {
    let Some(state) = engine.outputs.read(&engine.ctx, STATE).await? else {
        return Ok(None);
    };
    let markers = state
        .clone()
        .filter(col(column::FILE).is_not_null())?
        .collect()
        .await?;
    let mut out = HashMap::new();
    for batch in markers {
        let text = |name: &str| tables::text_column(&batch, name);
        let (Some(file), Some(print), Some(offsets), Some(at)) = (
            text(column::FILE)?,
            text(column::FINGERPRINT)?,
            text(column::OFFSETS)?,
            batch.column_by_name(column::AS_OF),
        ) else {
            continue;
        };
        let at = arrow::compute::cast(at, &DataType::Int64)?;
        let at = at.as_primitive::<Int64Type>();
        for row in 0..batch.num_rows() {
            if !(file.is_valid(row) && print.is_valid(row) && at.is_valid(row)) {
                continue;
            }
            let Some(offsets) = (offsets.is_valid(row))
                .then(|| parse_offsets(offsets.value(row)))
                .flatten()
            else {
                continue;
            };
            out.insert(
                file.value(row).to_string(),
                Recorded {
                    fingerprint: print.value(row).to_string(),
                    at: at.value(row),
                    offsets,
                },
            );
        }
    }
    Ok(Some((state, out)))
}

fn format_offsets(offsets: &BTreeSet<i64>) -> String {
    offsets
        .iter()
        .map(i64::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

fn parse_offsets(text: &str) -> Option<BTreeSet<i64>> {
    text.split(',').map(|k| k.trim().parse().ok()).collect()
}

/// Whether `file`'s published results can be brought to `as_of` by computing the profiles
/// whose windows moved: its state was recorded with this text at an earlier as-of, and its
/// plan is per profile and bounded by the offsets recorded.
fn covers(
    recorded: &HashMap<String, Recorded>,
    file: &str,
    sql: &str,
    plan: &LogicalPlan,
    as_of: i64,
) -> bool {
    recorded.get(file).is_some_and(|r| {
        r.fingerprint == fingerprint(file, sql)
            && r.at < as_of
            && bounded(plan).is_some_and(|k| k == r.offsets)
    })
}

/// For `tessera plan`: whether a trait or segment recomputed only for new events and a moved
/// as-of would run over the touched profiles and those whose windows moved.
pub async fn plan_covers(engine: &Engine, file: &str, sql: &str, as_of: i64) -> Result<bool> {
    // What the run would do if the state cannot be read: every profile.
    let Ok(Some((_, recorded))) = recorded(engine).await else {
        return Ok(false);
    };
    let Ok(df) = engine.query(sql, file).await else {
        return Ok(false);
    };
    Ok(covers(&recorded, file, sql, df.logical_plan(), as_of))
}

/// How one windowed file was computed this run.
struct Computed {
    file: String,
    fingerprint: String,
    offsets: BTreeSet<i64>,
    every_profile: bool,
}

/// One run's windows: which profiles to compute the windowed files for, and what to record.
pub struct Windows {
    as_of: i64,
    previous: Option<(DataFrame, HashMap<String, Recorded>)>,
    /// The touched profiles and those whose windows moved, with their events; `None` when
    /// the run found no touched set (every file then runs over every profile).
    over: Option<(DataFrame, Arc<dyn TableProvider>)>,
    computed: Vec<Computed>,
}

/// The profiles the windowed files run over at a moved as-of, and their events (held).
const WINDOW_EVENTS: &str = "__tessera_window_events";
const WINDOW_PROFILES: &str = "__tessera_window_profiles";

impl Windows {
    /// The windows of a run that computes no trait or segment: nothing to record.
    pub fn closed(as_of: i64) -> Windows {
        Windows {
            as_of,
            previous: None,
            over: None,
            computed: Vec::new(),
        }
    }

    /// Opens the run's windows at `as_of` (µs); `touched`: the run's touched profiles and
    /// their events, when it found them.
    pub async fn open(
        engine: &Engine,
        as_of: i64,
        touched: Option<(DataFrame, Arc<dyn TableProvider>)>,
    ) -> Result<Windows> {
        let ctx = &engine.ctx;
        // Unreadable state costs only time.
        let previous = match recorded(engine).await {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(error = %e, "could not read {STATE}: windowed queries run over every profile");
                None
            }
        };
        let mut windows = Windows {
            as_of,
            previous,
            over: None,
            computed: Vec::new(),
        };
        let (Some((state, _)), Some((touched_profiles, touched_events))) =
            (&windows.previous, touched)
        else {
            return Ok(windows);
        };
        // Due: a recorded moment at or before the new as-of, recorded at an earlier one.
        let at = lit(ScalarValue::TimestampMicrosecond(
            Some(as_of),
            Some("UTC".into()),
        ));
        let due = state
            .clone()
            .filter(
                col(column::PROFILE_ID)
                    .is_not_null()
                    .and(col(column::NEXT_CHANGE).lt_eq(at.clone()))
                    .and(col(column::AS_OF).lt(at)),
            )?
            .select(vec![
                cast(col(column::PROFILE_ID), DataType::Utf8).alias(column::PROFILE_ID)
            ])?;
        let mut ids: HashSet<String> = HashSet::new();
        for batch in touched_profiles.clone().collect().await? {
            let Some(c) = batch.column_by_name(tables::event::PROFILE_ID) else {
                return Ok(windows);
            };
            let c = arrow::compute::cast(c, &DataType::Utf8)?;
            ids.extend(c.as_string::<i32>().iter().flatten().map(str::to_string));
        }
        let touched_count = ids.len();
        for batch in due.collect().await? {
            let c = arrow::compute::cast(batch.column(0), &DataType::Utf8)?;
            ids.extend(c.as_string::<i32>().iter().flatten().map(str::to_string));
        }
        let due_count = ids.len() - touched_count;
        tracing::info!(
            touched = touched_count,
            due = due_count,
            "profiles the windowed traits and segments run over at this as-of"
        );
        if due_count == 0 {
            windows.over = Some((touched_profiles, touched_events));
            return Ok(windows);
        }
        let schema = Arc::new(Schema::new(vec![Field::new(
            tables::event::PROFILE_ID,
            DataType::Utf8,
            false,
        )]));
        let batch = RecordBatch::try_new(
            schema,
            vec![Arc::new(StringArray::from_iter_values(ids.iter()))],
        )?;
        ctx.deregister_table(WINDOW_PROFILES)?;
        ctx.register_batch(WINDOW_PROFILES, batch)?;
        let events = ctx.table(tables::EVENTS).await?.join(
            ctx.table(WINDOW_PROFILES)
                .await?
                .select(vec![col(tables::event::PROFILE_ID).alias(WINDOW_KEY)])?,
            JoinType::LeftSemi,
            &[tables::event::PROFILE_ID],
            &[WINDOW_KEY],
            None,
        )?;
        // In memory when they fit a sixteenth of the limit, otherwise in the scratch folder.
        engine
            .hold_or_write(WINDOW_EVENTS, events, engine.limits.memory / 16)
            .await?;
        windows.over = Some((
            ctx.table(WINDOW_PROFILES).await?,
            ctx.table_provider(WINDOW_EVENTS).await?,
        ));
        Ok(windows)
    }

    /// The as-of `file`'s published results were computed at, as recorded.
    pub fn recorded_at(&self, file: &str) -> Option<i64> {
        self.previous.as_ref()?.1.get(file).map(|r| r.at)
    }

    /// The profiles (and their events) `file` runs over when it is computed only for new
    /// events and a moved as-of; `None`: every profile.
    pub fn over(
        &self,
        file: &str,
        sql: &str,
        plan: &LogicalPlan,
    ) -> Option<(DataFrame, Arc<dyn TableProvider>)> {
        let (_, recorded) = self.previous.as_ref()?;
        if !covers(recorded, file, sql, plan, self.as_of) {
            return None;
        }
        self.over.clone()
    }

    /// Notes how a trait or segment file was computed: over every profile or over this run's
    /// window profiles ([`Windows::over`], or the touched ones at an unmoved as-of).
    pub fn computed(&mut self, file: &str, sql: &str, plan: &LogicalPlan, every_profile: bool) {
        let Some(offsets) = bounded(plan) else {
            return;
        };
        self.computed.push(Computed {
            file: file.to_string(),
            fingerprint: fingerprint(file, sql),
            offsets,
            every_profile,
        });
    }

    /// Writes `_state/windows`: a row for every windowed file computed this run, and for every
    /// current one recorded before and not computed now; each profile's next moment over all
    /// their offsets, computed again for the profiles this run computed and kept for the
    /// others. Nothing is written when no windowed file was computed.
    pub async fn write(
        self,
        engine: &Engine,
        outputs: &Outputs,
        current: &[QueryFile],
    ) -> Result<Option<Committed>> {
        let written = self.write_inner(engine, outputs, current).await;
        release(engine)?;
        written
    }

    async fn write_inner(
        &self,
        engine: &Engine,
        outputs: &Outputs,
        current: &[QueryFile],
    ) -> Result<Option<Committed>> {
        let ctx = &engine.ctx;
        if self.computed.is_empty() {
            return Ok(None);
        }
        let t0 = std::time::Instant::now();
        let mut files: Vec<(String, String, i64, BTreeSet<i64>)> = self
            .computed
            .iter()
            .map(|c| {
                (
                    c.file.clone(),
                    c.fingerprint.clone(),
                    self.as_of,
                    c.offsets.clone(),
                )
            })
            .collect();
        let computed: HashSet<&str> = self.computed.iter().map(|c| c.file.as_str()).collect();
        // The offsets the published profile rows were computed with.
        let mut before: BTreeSet<i64> = BTreeSet::new();
        if let Some((_, recorded)) = &self.previous {
            let current: HashMap<&str, String> = current
                .iter()
                .map(|q| (q.file.as_str(), fingerprint(&q.file, &q.sql)))
                .collect();
            for (file, r) in recorded {
                before.extend(r.offsets.iter().copied());
                if !computed.contains(file.as_str())
                    && current.get(file.as_str()) == Some(&r.fingerprint)
                {
                    files.push((file.clone(), r.fingerprint.clone(), r.at, r.offsets.clone()));
                }
            }
        }
        let offsets: BTreeSet<i64> = files.iter().flat_map(|f| f.3.iter().copied()).collect();
        // A kept profile row is the least moment over the offsets it was computed with; with
        // no new offset among them it is at or before the moment over the current ones, so
        // at worst a profile is computed again early.
        let kept = match (&self.previous, &self.over) {
            (Some((state, _)), Some((over, _)))
                if !self.computed.iter().any(|c| c.every_profile) && offsets.is_subset(&before) =>
            {
                let over = over.clone().select(vec![cast(
                    col(tables::event::PROFILE_ID),
                    DataType::Utf8,
                )
                .alias(WINDOW_KEY)])?;
                Some(
                    state
                        .clone()
                        .filter(col(column::PROFILE_ID).is_not_null())?
                        .select(vec![
                            cast(col(column::PROFILE_ID), DataType::Utf8).alias(column::PROFILE_ID),
                            cast(col(column::NEXT_CHANGE), tables::timestamp_type())
                                .alias(column::NEXT_CHANGE),
                            cast(col(column::AS_OF), tables::timestamp_type()).alias(column::AS_OF),
                        ])?
                        .join(
                            over,
                            JoinType::LeftAnti,
                            &[column::PROFILE_ID],
                            &[WINDOW_KEY],
                            None,
                        )?,
                )
            }
            _ => None,
        };
        let every = kept.is_none();
        let events: Arc<dyn TableProvider> = match (&kept, &self.over) {
            (Some(_), Some((_, events))) => events.clone(),
            _ => ctx.table_provider(tables::EVENTS).await?,
        };
        let mut rows = next_moments(engine, events, &offsets, self.as_of)
            .await?
            .collect()
            .await?;
        if let Some(kept) = kept {
            rows.extend(kept.collect().await?);
        }
        let mut batches = vec![files_batch(&files)?];
        for batch in rows {
            batches.push(profiles_batch(&batch)?);
        }
        let committed = outputs
            .write(ctx, STATE, ctx.read_batches(batches)?, WriteMode::Replace)
            .await?;
        tracing::info!(
            rows = committed.rows,
            ms = t0.elapsed().as_millis() as u64,
            computed_for = if every {
                "every profile"
            } else {
                "touched and due profiles"
            },
            "next moments of the windowed traits and segments written"
        );
        Ok(Some(committed))
    }
}

/// The due profiles' key while they are joined.
const WINDOW_KEY: &str = "__tessera_window_profile_id";

/// Forgets the window profiles and their events.
pub fn release(engine: &Engine) -> Result<()> {
    engine.ctx.deregister_table(WINDOW_PROFILES)?;
    engine.release(WINDOW_EVENTS)
}

/// Per profile of `events`: the earliest `timestamp + k` at or after `as_of` (µs) over the
/// offsets `k` (`profile_id`, `next_change`, `as_of`); profiles with none are left out.
async fn next_moments(
    engine: &Engine,
    events: Arc<dyn TableProvider>,
    offsets: &BTreeSet<i64>,
    as_of: i64,
) -> Result<DataFrame> {
    let ctx = &engine.ctx;
    // t + k >= as_of, as t >= as_of - k: the moment is the least such t, plus k.
    let moments: Vec<String> = offsets
        .iter()
        .map(|k| {
            format!(
                "min(CASE WHEN t >= {from} THEN t + ({k}) END)",
                from = as_of.saturating_sub(*k)
            )
        })
        .collect();
    let next = match moments.as_slice() {
        [one] => one.clone(),
        _ => format!("least({})", moments.join(", ")),
    };
    // An event older than `as_of` minus the longest offset passes no CASE above: leaving it
    // out changes no moment. The filter is on the event time itself, so a scan of the scratch
    // copy (which keeps the time's page statistics) skips the pages before the window's start.
    let from = offsets
        .iter()
        .map(|k| as_of.saturating_sub(*k))
        .min()
        .unwrap_or(as_of);
    let since = datafusion::prelude::lit(datafusion::common::ScalarValue::TimestampMicrosecond(
        Some(from),
        Some("UTC".into()),
    ));
    let events = ctx
        .read_table(events)?
        .filter(col(tables::event::TIMESTAMP).gt_eq(since))?
        .select(vec![
            cast(col(tables::event::PROFILE_ID), DataType::Utf8).alias("profile_id"),
            cast(col(tables::event::TIMESTAMP), DataType::Int64).alias("t"),
        ])?;
    let name = "__tessera_window_moments_events";
    ctx.deregister_table(name)?;
    ctx.register_table(name, events.into_view())?;
    let sql = format!(
        "SELECT profile_id, \
                arrow_cast(next, 'Timestamp(Microsecond, Some(\"UTC\"))') AS {next_change}, \
                arrow_cast({as_of}, 'Timestamp(Microsecond, Some(\"UTC\"))') AS {as_of_column} \
         FROM (SELECT profile_id, {next} AS next FROM {name} \
               WHERE profile_id IS NOT NULL AND t IS NOT NULL GROUP BY profile_id) \
         WHERE next IS NOT NULL",
        next_change = column::NEXT_CHANGE,
        as_of_column = column::AS_OF,
    );
    let planned = crate::stages::journeys::plan(engine, STATE, &sql).await;
    ctx.deregister_table(name)?;
    planned
}

/// The files' rows of `_state/windows`.
fn files_batch(files: &[(String, String, i64, BTreeSet<i64>)]) -> Result<RecordBatch> {
    let n = files.len();
    Ok(RecordBatch::try_new(
        state_schema(),
        vec![
            Arc::new(StringArray::from_iter_values(files.iter().map(|f| &f.0))),
            Arc::new(StringArray::from_iter_values(files.iter().map(|f| &f.1))),
            Arc::new(StringArray::from_iter_values(
                files.iter().map(|f| format_offsets(&f.3)),
            )),
            Arc::new(
                TimestampMicrosecondArray::from_iter_values(files.iter().map(|f| f.2))
                    .with_timezone("UTC"),
            ),
            Arc::new(StringArray::new_null(n)),
            Arc::new(TimestampMicrosecondArray::new_null(n).with_timezone("UTC")),
        ],
    )?)
}

/// Profile rows (`profile_id`, `next_change`, `as_of`) in `_state/windows`' columns.
fn profiles_batch(batch: &RecordBatch) -> Result<RecordBatch> {
    let n = batch.num_rows();
    let column = |name: &str, to: &DataType| -> Result<arrow::array::ArrayRef> {
        let c = batch.column_by_name(name).ok_or_else(|| {
            crate::error::Error::Internal(format!("{STATE}: no column {name} in its rows"))
        })?;
        Ok(arrow::compute::cast(c, to)?)
    };
    Ok(RecordBatch::try_new(
        state_schema(),
        vec![
            Arc::new(StringArray::new_null(n)),
            Arc::new(StringArray::new_null(n)),
            Arc::new(StringArray::new_null(n)),
            column(column::AS_OF, &tables::timestamp_type())?,
            column(column::PROFILE_ID, &DataType::Utf8)?,
            column(column::NEXT_CHANGE, &tables::timestamp_type())?,
        ],
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn offsets_of(sql: &str) -> Option<Vec<i64>> {
        let ctx = crate::engine::new_context().unwrap();
        ctx.sql(
            "CREATE TABLE events AS SELECT 'p' AS profile_id, 'm' AS message_id, 'x' AS event, \
             CAST(1.5 AS DOUBLE) AS revenue, arrow_cast(now(), 'Timestamp(Microsecond, Some(\"UTC\"))') AS \"timestamp\"",
        )
        .await
        .unwrap();
        let df = ctx.sql(sql).await.unwrap();
        bounded(df.logical_plan()).map(|k| k.into_iter().collect())
    }

    const DAY: i64 = 86_400_000_000;

    #[tokio::test]
    async fn windows_are_bounded_only_by_event_times_against_the_as_of() {
        let cases: Vec<(&str, Option<Vec<i64>>)> = vec![
            (
                "SELECT profile_id, count(*) AS n FROM events WHERE \"timestamp\" >= as_of() - INTERVAL '30 days' GROUP BY profile_id",
                Some(vec![30 * DAY]),
            ),
            (
                "SELECT profile_id, max(\"timestamp\") AS last FROM events GROUP BY profile_id HAVING max(\"timestamp\") < as_of() - INTERVAL '21 days'",
                Some(vec![21 * DAY]),
            ),
            (
                "SELECT profile_id, count(*) FILTER (WHERE \"timestamp\" + INTERVAL '1 day' > as_of()) AS n FROM events GROUP BY profile_id",
                Some(vec![DAY]),
            ),
            (
                "SELECT profile_id, count(*) AS n FROM events WHERE \"timestamp\" BETWEEN as_of() - INTERVAL '2 days' AND as_of() GROUP BY profile_id",
                Some(vec![0, 2 * DAY]),
            ),
            (
                "WITH a AS (SELECT profile_id, max(\"timestamp\") AS last FROM events GROUP BY profile_id) \
                 SELECT profile_id, last FROM a WHERE last >= as_of() - INTERVAL '7 days' AND last < as_of() - INTERVAL '1 hour'",
                Some(vec![3_600_000_000, 7 * DAY]),
            ),
            // The as-of used any other way: not bounded.
            ("SELECT profile_id, max(as_of() - \"timestamp\") AS age FROM events GROUP BY profile_id", None),
            (
                "SELECT profile_id, count(*) AS n FROM events WHERE \"timestamp\" >= as_of() - INTERVAL '1 month' GROUP BY profile_id",
                None,
            ),
            (
                "SELECT profile_id, count(*) AS n FROM events WHERE date_trunc('day', \"timestamp\") >= as_of() - INTERVAL '1 day' GROUP BY profile_id",
                None,
            ),
            (
                "SELECT profile_id, count(*) AS n FROM events WHERE revenue > 0 AND date_trunc('day', as_of()) <= \"timestamp\" GROUP BY profile_id",
                None,
            ),
            (
                "SELECT profile_id, count(*) AS n FROM events GROUP BY profile_id HAVING count(*) > 1 AND as_of() > to_timestamp(0)",
                None,
            ),
            (
                "SELECT profile_id, sum(revenue) AS r FROM events GROUP BY profile_id HAVING sum(revenue) > 1",
                None,
            ),
        ];
        for (sql, want) in cases {
            assert_eq!(offsets_of(sql).await, want, "{sql}");
        }
    }

    #[tokio::test]
    async fn the_bundled_windowed_queries_are_bounded() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("queries");
        for (file, want) in [
            ("segments/abandoned_checkout.sql", vec![14 * DAY]),
            ("segments/cart_abandoners.sql", vec![7 * DAY]),
            ("segments/lapsed_buyers.sql", vec![21 * DAY]),
            ("traits/order_count.sql", vec![90 * DAY]),
            ("traits/viewed_products.sql", vec![30 * DAY]),
        ] {
            let sql = std::fs::read_to_string(root.join(file)).unwrap();
            let ctx = crate::engine::new_context().unwrap();
            ctx.sql(
                "CREATE TABLE events AS SELECT 'p' AS profile_id, 'm' AS message_id, 'x' AS event, 'track' AS type, \
                 '{}' AS properties, '{}' AS context, arrow_cast(now(), 'Timestamp(Microsecond, Some(\"UTC\"))') AS \"timestamp\"",
            )
            .await
            .unwrap();
            let df = ctx.sql(&sql).await.unwrap();
            assert_eq!(
                bounded(df.logical_plan()).map(|k| k.into_iter().collect::<Vec<_>>()),
                Some(want),
                "{file}"
            );
        }
    }
}
