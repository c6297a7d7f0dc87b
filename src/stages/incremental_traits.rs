//! Computed traits carried over between runs.
//!
//! An incremental run knows which profiles can have changed: those with a new event and those
//! whose identifiers identity resolution moved (the same set sessions are cut again for, see
//! [`crate::stages::journeys::incremental_sessions`]). A trait file whose rows each depend only on one
//! profile's events is then run over those profiles' events alone, and every other profile
//! keeps the values the published `profiles` table holds. A file is carried over only when
//! all of these hold, and is otherwise run over every profile as in a full run:
//!
//! - its plan reads only `events`, through filters, projections, sorts, `DISTINCT` and
//!   aggregates that each group by the events' own `profile_id` (no join, window, union,
//!   limit or subquery, which could mix profiles);
//! - it calls no function whose value changes from call to call or run to run (`now()`,
//!   `random()`); if it calls `as_of()`, the run's as-of time is the one the published values
//!   were computed at;
//! - its text (and Tessera's version) is the one the published values were computed with,
//!   as recorded in `_state/traits`, and the published `profiles` has all of its columns.

use std::collections::HashMap;
use std::sync::Arc;

use arrow::array::{Array, AsArray, RecordBatch, StringArray, TimestampMicrosecondArray};
use arrow::datatypes::{DataType, Field, Schema};
use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
use datafusion::common::{Column, JoinType};
use datafusion::dataframe::DataFrame;
use datafusion::datasource::TableProvider;
use datafusion::logical_expr::{cast, Distinct, Expr, LogicalPlan, Volatility};
use datafusion::prelude::SessionContext;

use crate::config::QueryFile;
use crate::error::Result;
use crate::output::Outputs;
use crate::tables;

/// What each run recorded about its trait files: `file, fingerprint, as_of`.
pub const STATE: &str = crate::tables::state::TRAITS;

/// The key of a trait file's text, Tessera's version included (a new version may compute a
/// function differently).
pub fn fingerprint(file: &str, sql: &str) -> String {
    crate::digest::sha256_hex(&format!(
        "{}\u{0}{file}\u{0}{sql}",
        env!("CARGO_PKG_VERSION")
    ))
}

/// `_state/traits` for this run's trait files, computed at `as_of` (µs).
pub fn state_batch(files: &[QueryFile], as_of: i64) -> Result<RecordBatch> {
    let schema = Arc::new(Schema::new(vec![
        Field::new("file", DataType::Utf8, false),
        Field::new("fingerprint", DataType::Utf8, false),
        Field::new("as_of", crate::tables::timestamp_type(), false),
    ]));
    Ok(RecordBatch::try_new(
        schema,
        vec![
            Arc::new(StringArray::from_iter_values(files.iter().map(|f| &f.file))),
            Arc::new(StringArray::from_iter_values(
                files.iter().map(|f| fingerprint(&f.file, &f.sql)),
            )),
            Arc::new(
                TimestampMicrosecondArray::from(vec![as_of; files.len()]).with_timezone("UTC"),
            ),
        ],
    )?)
}

/// Whether a trait plan's rows each belong to one profile and depend only on its events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// Per profile; `as_of` says whether it calls `as_of()`.
    PerProfile {
        /// It calls `as_of()`.
        as_of: bool,
    },
    /// Anything else: run over every profile.
    Other,
}

/// The [`Shape`] of a trait file's (unoptimised) plan.
pub fn shape(plan: &LogicalPlan) -> Shape {
    let mut as_of = false;
    let mut steady = true;
    let _ = plan.apply(|node| {
        for expr in node.expressions() {
            let _ = expr.apply(|e| {
                match e {
                    Expr::ScalarFunction(f) if f.name() == "as_of" => as_of = true,
                    Expr::ScalarFunction(f)
                        if f.func.signature().volatility != Volatility::Immutable =>
                    {
                        steady = false
                    }
                    Expr::ScalarSubquery(_)
                    | Expr::Exists(_)
                    | Expr::InSubquery(_)
                    | Expr::OuterReferenceColumn(..) => steady = false,
                    _ => {}
                }
                Ok(TreeNodeRecursion::Continue)
            });
        }
        Ok(TreeNodeRecursion::Continue)
    });
    if steady && keyed(plan) {
        Shape::PerProfile { as_of }
    } else {
        Shape::Other
    }
}

/// Whether `plan` has a `profile_id` column that is the events' own, and each of its rows
/// comes from the events of that one profile.
fn keyed(plan: &LogicalPlan) -> bool {
    let is_key =
        |e: &Expr| matches!(e.clone().unalias(), Expr::Column(c) if c.name == "profile_id");
    match plan {
        LogicalPlan::TableScan(scan) => {
            scan.table_name.table() == tables::EVENTS
                && scan.fetch.is_none()
                && scan
                    .projected_schema
                    .has_column_with_unqualified_name("profile_id")
        }
        LogicalPlan::Filter(f) => keyed(&f.input),
        LogicalPlan::Sort(s) => s.fetch.is_none() && keyed(&s.input),
        LogicalPlan::SubqueryAlias(a) => keyed(&a.input),
        LogicalPlan::Distinct(Distinct::All(input)) => keyed(input),
        LogicalPlan::Projection(p) => {
            // The output's profile_id must be the input's, not another column renamed.
            let mut keys = p
                .expr
                .iter()
                .zip(p.schema.fields())
                .filter(|(_, f)| f.name() == "profile_id");
            matches!(keys.next(), Some((e, _)) if is_key(e))
                && keys.next().is_none()
                && keyed(&p.input)
        }
        LogicalPlan::Aggregate(a) => a.group_expr.iter().any(is_key) && keyed(&a.input),
        // Two per-profile inputs joined on their profile_id: each joined row pairs rows of
        // one profile (a NULL key matches nothing). Joins that can emit the right side's rows
        // unmatched are left out: their profile_id would come from the other side.
        LogicalPlan::Join(j) => {
            matches!(
                j.join_type,
                JoinType::Inner | JoinType::Left | JoinType::LeftSemi | JoinType::LeftAnti
            ) && (j.on.iter().any(|(l, r)| is_key(l) && is_key(r))
                // Before optimisation an `ON` clause is still the join's filter.
                || j.filter.as_ref().is_some_and(|f| {
                    datafusion::logical_expr::utils::split_conjunction(f)
                        .into_iter()
                        .any(|c| match c {
                            Expr::BinaryExpr(b) => {
                                b.op == datafusion::logical_expr::Operator::Eq
                                    && is_key(&b.left)
                                    && is_key(&b.right)
                                    && b.left != b.right
                            }
                            _ => false,
                        })
                }))
                && keyed(&j.left)
                && keyed(&j.right)
        }
        _ => false,
    }
}

/// What an incremental run may carry over, and from where.
pub struct Carry {
    recorded: HashMap<String, (String, i64)>,
    as_of: i64,
    previous: DataFrame,
    changed_profiles: DataFrame,
    changed_events: Arc<dyn TableProvider>,
}

impl Carry {
    /// What can be carried into this run (as of `as_of`, µs): `None` when the published
    /// output has no `_state/traits` or `profiles`, or this run did not find which profiles
    /// changed (`changed`: the changed profiles' ids and their events).
    pub async fn open(
        ctx: &SessionContext,
        published: &Outputs,
        as_of: i64,
        changed: Option<(DataFrame, Arc<dyn TableProvider>)>,
    ) -> Result<Option<Carry>> {
        let Some((changed_profiles, changed_events)) = changed else {
            return Ok(None);
        };
        let (Some(state), Some(previous)) = (
            published.read(ctx, STATE).await?,
            published.read(ctx, tables::PROFILES).await?,
        ) else {
            return Ok(None);
        };
        let mut recorded = HashMap::new();
        for batch in state.collect().await? {
            let text = |name: &str| tables::text_column(&batch, name);
            let (Some(file), Some(print), Some(at)) = (
                text("file")?,
                text("fingerprint")?,
                batch.column_by_name("as_of").map(|c| {
                    arrow::compute::cast(c, &DataType::Int64)
                        .map(|a| a.as_primitive::<arrow::datatypes::Int64Type>().clone())
                }),
            ) else {
                continue;
            };
            let at = at?;
            for row in 0..batch.num_rows() {
                if file.is_valid(row) && print.is_valid(row) && at.is_valid(row) {
                    recorded.insert(
                        file.value(row).to_string(),
                        (print.value(row).to_string(), at.value(row)),
                    );
                }
            }
        }
        Ok(Some(Carry {
            recorded,
            as_of,
            previous,
            changed_profiles,
            changed_events,
        }))
    }

    /// Whether the file's published values can be kept for unchanged profiles.
    pub fn applies(&self, file: &str, sql: &str, plan: &LogicalPlan) -> bool {
        if !self.recorded_as(file, sql) {
            return false;
        }
        match shape(plan) {
            Shape::PerProfile { as_of } => !as_of || self.recorded[file].1 == self.as_of,
            Shape::Other => false,
        }
    }

    /// Whether the published values were computed from `sql` under the name `file`, with no
    /// condition on the plan: for what Tessera computes itself per profile (the last-known
    /// traits), whose "SQL" is a description of its settings.
    pub fn recorded_as(&self, file: &str, sql: &str) -> bool {
        self.recorded
            .get(file)
            .is_some_and(|(print, _)| *print == fingerprint(file, sql))
    }

    /// The events of the changed profiles, to stand in for `events` while the file is planned.
    pub fn changed_events(&self) -> Arc<dyn TableProvider> {
        self.changed_events.clone()
    }

    /// The as-of the published values of `file` were computed at, if they were computed from
    /// `sql`.
    pub fn recorded_at(&self, file: &str, sql: &str) -> Option<i64> {
        self.recorded_as(file, sql).then(|| self.recorded[file].1)
    }

    /// The published values of `schema`'s columns (a trait file's output) for every profile
    /// that did not change, in `schema`'s types; `None` if `profiles` lacks one of them.
    pub fn kept(&self, schema: &Schema) -> Result<Option<DataFrame>> {
        self.kept_except(schema, self.changed_profiles.clone())
    }

    /// As [`Carry::kept`], for every profile not in `recomputed` (a frame with `profile_id`).
    pub fn kept_except(&self, schema: &Schema, recomputed: DataFrame) -> Result<Option<DataFrame>> {
        let published = self.previous.schema();
        let mut columns = Vec::with_capacity(schema.fields().len());
        for field in schema.fields() {
            if !published.has_column_with_unqualified_name(field.name()) {
                return Ok(None);
            }
            let c = Expr::Column(Column::new_unqualified(field.name()));
            columns.push(cast(c, field.data_type().clone()).alias(field.name()));
        }
        // The recomputed set may come with another string type: joined in the output's.
        let key_type = schema.field_with_name("profile_id")?.data_type().clone();
        let changed = recomputed.select(vec![cast(
            Expr::Column(Column::new_unqualified("profile_id")),
            key_type,
        )
        .alias(CHANGED_KEY)])?;
        Ok(Some(self.previous.clone().select(columns)?.join(
            changed,
            JoinType::LeftAnti,
            &["profile_id"],
            &[CHANGED_KEY],
            None,
        )?))
    }
}

/// The changed profiles' key while they are joined.
const CHANGED_KEY: &str = "__tessera_changed_profile_id";

#[cfg(test)]
mod tests {
    use super::*;

    async fn shape_of(sql: &str) -> Shape {
        let ctx = crate::engine::new_context().unwrap();
        ctx.sql(
            "CREATE TABLE events AS SELECT 'p' AS profile_id, 'm' AS message_id, 'x' AS event, \
             CAST(1.5 AS DOUBLE) AS revenue, now() AS \"timestamp\"",
        )
        .await
        .unwrap();
        ctx.sql("CREATE TABLE other AS SELECT 'p' AS profile_id")
            .await
            .unwrap();
        let df = ctx.sql(sql).await.unwrap();
        shape(df.logical_plan())
    }

    #[tokio::test]
    async fn per_profile_plans_are_told_from_those_that_mix_profiles() {
        let per = Shape::PerProfile { as_of: false };
        let cases = [
            ("SELECT profile_id, count(*) AS n FROM events GROUP BY profile_id", per),
            (
                "SELECT profile_id, sum(revenue) AS r FROM events WHERE event = 'x' GROUP BY profile_id",
                per,
            ),
            (
                "SELECT e.profile_id, max(e.revenue) AS r FROM events e GROUP BY e.profile_id, e.event",
                per,
            ),
            (
                "SELECT profile_id, count(*) AS n FROM (SELECT DISTINCT profile_id, event FROM events) GROUP BY profile_id",
                per,
            ),
            (
                "SELECT profile_id, count(*) AS n FROM events WHERE \"timestamp\" >= as_of() - INTERVAL '30 days' GROUP BY profile_id",
                Shape::PerProfile { as_of: true },
            ),
            // Mixes profiles or the run's clock: every profile.
            ("SELECT message_id AS profile_id, count(*) AS n FROM events GROUP BY message_id", Shape::Other),
            ("SELECT profile_id, count(*) AS n FROM events GROUP BY event, profile_id HAVING count(*) > (SELECT count(*) FROM events)", Shape::Other),
            ("SELECT profile_id, rank() OVER (ORDER BY revenue) AS r FROM events", Shape::Other),
            ("SELECT e.profile_id, count(*) AS n FROM events e JOIN other o ON e.profile_id = o.profile_id GROUP BY e.profile_id", Shape::Other),
            // Per-profile sides joined on profile_id stay per profile; any other key mixes.
            (
                "WITH a AS (SELECT profile_id, max(revenue) AS r FROM events GROUP BY profile_id), \
                 b AS (SELECT DISTINCT profile_id FROM events WHERE event = 'x') \
                 SELECT a.profile_id, a.r FROM a LEFT JOIN b ON b.profile_id = a.profile_id WHERE b.profile_id IS NULL",
                per,
            ),
            (
                "SELECT a.profile_id FROM events a JOIN events b ON a.profile_id = b.profile_id",
                per,
            ),
            ("SELECT a.profile_id FROM events a JOIN events b ON a.message_id = b.message_id", Shape::Other),
            ("SELECT a.profile_id FROM events a RIGHT JOIN events b ON a.profile_id = b.profile_id", Shape::Other),
            ("SELECT a.profile_id FROM events a CROSS JOIN events b", Shape::Other),
            ("SELECT profile_id, count(*) AS n FROM other GROUP BY profile_id", Shape::Other),
            ("SELECT profile_id, count(*) AS n FROM events WHERE \"timestamp\" > now() GROUP BY profile_id", Shape::Other),
            ("SELECT profile_id, max(random()) AS n FROM events GROUP BY profile_id", Shape::Other),
            ("SELECT profile_id, count(*) AS n FROM (SELECT * FROM events LIMIT 10) GROUP BY profile_id", Shape::Other),
            ("SELECT event AS profile_id FROM events GROUP BY event", Shape::Other),
            ("SELECT profile_id, event FROM events", per),
        ];
        for (sql, want) in cases {
            assert_eq!(shape_of(sql).await, want, "{sql}");
        }
    }

    #[test]
    fn the_state_records_each_file_with_its_fingerprint() {
        let file = |name: &str| QueryFile {
            file: name.to_string(),
            sql: "SELECT 1".to_string(),
            path: name.into(),
        };
        let files = vec![file("a.sql"), file("b.sql")];
        let batch = state_batch(&files, 42).unwrap();
        let prints = batch.column(1).as_string::<i32>();
        assert_eq!(prints.value(0), fingerprint("a.sql", "SELECT 1"));
        assert_ne!(
            prints.value(0),
            prints.value(1),
            "the file name is part of it"
        );
        assert_ne!(
            fingerprint("a.sql", "SELECT 1"),
            fingerprint("a.sql", "SELECT 2")
        );
    }
}
