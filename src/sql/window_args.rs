//! An optimizer rule: window function arguments that are expressions are computed once per
//! batch below the window, so the window operator only ever sees plain columns.
//!
//! DataFusion's window operators evaluate a window function's argument expressions again for
//! every partition of every batch. With millions of small partitions (one per profile) that
//! turns a cheap `coalesce(event, type)` into millions of evaluations over slices, and on
//! `Utf8View` input every evaluation also copies the array's list of shared buffers. Measured
//! on 3M events with 383k profiles: `lead(coalesce(event, type)) OVER (PARTITION BY profile_id
//! ORDER BY "timestamp")` spent 15.5 s in the window operator; with the argument computed in a
//! projection first, 1.35 s. Users write the first form in traits, segments and reports, so
//! the rewrite is done for them:
//!
//! ```text
//! Window: lead(f(a))            Projection: <every column the window had>
//!   Input             ──►          Window: lead(__tessera_window_arg_0) AS "lead(f(a))"
//!                                    Projection: <input columns>, f(a) AS __tessera_window_arg_0
//!                                      Input
//! ```
//!
//! The result has the same schema and values; only where `f(a)` is evaluated changes. The same
//! is done for `FILTER (WHERE …)` clauses. Arguments without a column (offsets, defaults,
//! literals) stay where they are: some functions need them as literals.

use std::sync::Arc;

use datafusion::common::tree_node::Transformed;
use datafusion::common::{Column, Result};
use datafusion::logical_expr::expr::{Alias, WindowFunction};
use datafusion::logical_expr::{Expr, LogicalPlan, Projection, Window};
use datafusion::optimizer::optimizer::ApplyOrder;
use datafusion::optimizer::{OptimizerConfig, OptimizerRule};

/// Prefix of the columns the rule adds below a window (dropped again above it).
const PREFIX: &str = "__tessera_window_arg_";

/// See the module documentation.
#[derive(Debug, Default)]
pub struct WindowArgsAsColumns;

/// Argument expressions moved below one window, each under its column name.
#[derive(Default)]
struct Moved {
    exprs: Vec<(Expr, String)>,
}

impl Moved {
    /// The column that stands for `expr`: `expr` itself when it needs no work per row.
    fn column_for(&mut self, expr: Expr) -> Expr {
        if matches!(expr, Expr::Column(_)) || expr.column_refs().is_empty() {
            return expr;
        }
        let name = match self.exprs.iter().find(|(e, _)| *e == expr) {
            Some((_, name)) => name.clone(),
            None => {
                let name = format!("{PREFIX}{}", self.exprs.len());
                self.exprs.push((expr, name.clone()));
                name
            }
        };
        Expr::Column(Column::from_name(name))
    }
}

impl OptimizerRule for WindowArgsAsColumns {
    fn name(&self) -> &str {
        "tessera_window_args_as_columns"
    }

    fn apply_order(&self) -> Option<ApplyOrder> {
        Some(ApplyOrder::BottomUp)
    }

    fn rewrite(
        &self,
        plan: LogicalPlan,
        _config: &dyn OptimizerConfig,
    ) -> Result<Transformed<LogicalPlan>> {
        let LogicalPlan::Window(window) = plan else {
            return Ok(Transformed::no(plan));
        };
        let mut moved = Moved::default();
        let mut window_exprs = Vec::with_capacity(window.window_expr.len());
        for expr in &window.window_expr {
            // The output keeps the name (and qualifier) the plan above refers to.
            let (inner, relation, name) = match expr {
                Expr::Alias(Alias {
                    expr,
                    relation,
                    name,
                    ..
                }) => (expr.as_ref(), relation.clone(), name.clone()),
                other => (other, None, other.schema_name().to_string()),
            };
            let Expr::WindowFunction(function) = inner else {
                window_exprs.push(expr.clone());
                continue;
            };
            let WindowFunction { fun, params } = function.as_ref();
            let mut params = params.clone();
            params.args = params
                .args
                .into_iter()
                .map(|arg| moved.column_for(arg))
                .collect();
            params.filter = params
                .filter
                .map(|filter| Box::new(moved.column_for(*filter)));
            if params == function.params {
                window_exprs.push(expr.clone());
                continue;
            }
            let rewritten = Expr::WindowFunction(Box::new(WindowFunction {
                fun: fun.clone(),
                params,
            }));
            window_exprs.push(Expr::Alias(Alias::new(rewritten, relation, name)));
        }
        if moved.exprs.is_empty() {
            return Ok(Transformed::no(LogicalPlan::Window(window)));
        }

        let input = window.input.as_ref();
        let mut below: Vec<Expr> = columns_of(input.schema().iter());
        below.extend(moved.exprs.into_iter().map(|(expr, name)| expr.alias(name)));
        let below = Projection::try_new(below, Arc::clone(&window.input))?;
        let rewritten = Window::try_new(window_exprs, Arc::new(LogicalPlan::Projection(below)))?;
        let above = Projection::try_new(
            columns_of(window.schema.iter()),
            Arc::new(LogicalPlan::Window(rewritten)),
        )?;
        Ok(Transformed::yes(LogicalPlan::Projection(above)))
    }
}

/// A column reference for each field, keeping its qualifier.
fn columns_of<'a>(
    fields: impl Iterator<
        Item = (
            Option<&'a datafusion::common::TableReference>,
            &'a Arc<datafusion::arrow::datatypes::Field>,
        ),
    >,
) -> Vec<Expr> {
    fields
        .map(|(qualifier, field)| Expr::Column(Column::new(qualifier.cloned(), field.name())))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::array::{Int64Array, RecordBatch, StringArray};
    use datafusion::arrow::datatypes::{DataType, Field, Schema};
    use datafusion::arrow::util::pretty::pretty_format_batches;
    use datafusion::execution::SessionStateBuilder;
    use datafusion::prelude::SessionContext;

    fn context(with_rule: bool) -> SessionContext {
        let mut builder = SessionStateBuilder::new().with_default_features();
        if with_rule {
            builder = builder.with_optimizer_rule(Arc::new(WindowArgsAsColumns));
        }
        let ctx = SessionContext::new_with_state(builder.build());
        let schema = Arc::new(Schema::new(vec![
            Field::new("profile", DataType::Utf8, true),
            Field::new("t", DataType::Int64, false),
            Field::new("event", DataType::Utf8, true),
            Field::new("kind", DataType::Utf8, false),
        ]));
        let batch = RecordBatch::try_new(
            schema,
            vec![
                Arc::new(StringArray::from(vec![
                    Some("a"),
                    Some("a"),
                    Some("b"),
                    Some("a"),
                    None,
                    Some("b"),
                ])),
                Arc::new(Int64Array::from(vec![3, 1, 2, 2, 5, 1])),
                Arc::new(StringArray::from(vec![
                    None,
                    Some("view"),
                    Some("buy"),
                    None,
                    Some("view"),
                    Some("add"),
                ])),
                Arc::new(StringArray::from(vec![
                    "page", "track", "track", "identify", "track", "track",
                ])),
            ],
        )
        .unwrap();
        ctx.register_batch("events", batch).unwrap();
        ctx
    }

    const SQL: &str = "SELECT profile, t, \
        lead(coalesce(event, kind)) OVER (PARTITION BY profile ORDER BY t) AS next, \
        lag(coalesce(event, kind), 1, 'none') OVER (PARTITION BY profile ORDER BY t) AS previous, \
        count(*) FILTER (WHERE kind = 'track') OVER (PARTITION BY profile ORDER BY t) AS tracks, \
        sum(t * 2) OVER (PARTITION BY profile) AS doubled, \
        row_number() OVER (ORDER BY t, profile) AS n \
        FROM events ORDER BY profile, t";

    async fn result(ctx: &SessionContext) -> String {
        let batches = ctx.sql(SQL).await.unwrap().collect().await.unwrap();
        pretty_format_batches(&batches).unwrap().to_string()
    }

    #[tokio::test]
    async fn same_result_with_arguments_as_columns() {
        let plain = result(&context(false)).await;
        let rewritten = result(&context(true)).await;
        assert_eq!(plain, rewritten);
        // Hand-checked rows: profile a in time order is view(1), identify(2), page(3).
        assert!(
            plain.contains("| a       | 1 | identify | none     | 1      | 12      |"),
            "{plain}"
        );
        assert!(
            plain.contains("| a       | 3 |          | identify | 1      | 12      |"),
            "{plain}"
        );
    }

    async fn optimized(ctx: &SessionContext, sql: &str) -> String {
        let df = ctx.sql(sql).await.unwrap();
        df.into_optimized_plan()
            .unwrap()
            .display_indent()
            .to_string()
    }

    #[tokio::test]
    async fn window_sees_only_columns() {
        let ctx = context(true);
        // Each argument used once (DataFusion's common subexpression pass already moves an
        // expression shared by two window functions; it leaves these in place).
        let sql = "SELECT profile, \
            lead(coalesce(event, kind)) OVER (PARTITION BY profile ORDER BY t) AS next, \
            count(*) FILTER (WHERE kind = 'track') OVER (PARTITION BY profile ORDER BY t) AS tracks, \
            sum(t * 2) OVER (PARTITION BY profile) AS doubled \
            FROM events";
        let plan = optimized(&ctx, sql).await;
        // (coalesce is planned as CASE by then.)
        assert!(
            plan.contains("ELSE events.kind END AS __tessera_window_arg_"),
            "{plan}"
        );
        assert!(plan.contains("lead(__tessera_window_arg_"), "{plan}");
        assert!(plan.contains("sum(__tessera_window_arg_"), "{plan}");
        assert!(
            plan.contains("FILTER (WHERE __tessera_window_arg_"),
            "{plan}"
        );
        let without = optimized(&context(false), sql).await;
        assert!(!without.contains(PREFIX), "{without}");
        // The columns added for the window do not leave it.
        let df = ctx.sql(sql).await.unwrap();
        assert_eq!(
            df.schema().field_names(),
            vec!["events.profile", "next", "tracks", "doubled"]
        );
        assert_eq!(df.collect().await.unwrap()[0].num_columns(), 4);
    }
}
