//! What Tessera's physical optimizer rules ([`crate::sql::shift_window`],
//! [`crate::sql::cheap_filters_first`]) share: replacing operators of one kind, and, for their
//! tests, plain DataFusion contexts with or without a rule and a query's result beside its plan.

use std::sync::Arc;

use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::common::Result;
use datafusion::physical_plan::ExecutionPlan;

/// `plan` with every operator of type `T` that `rewrite` gives a replacement for replaced
/// (bottom up, so a replacement's inputs are already rewritten).
pub fn replace_each<T: ExecutionPlan + 'static>(
    plan: Arc<dyn ExecutionPlan>,
    rewrite: impl Fn(&T) -> Result<Option<Arc<dyn ExecutionPlan>>>,
) -> Result<Arc<dyn ExecutionPlan>> {
    plan.transform_up(|node| {
        let replaced = match node.downcast_ref::<T>() {
            Some(op) => rewrite(op)?,
            None => None,
        };
        Ok(match replaced {
            Some(new) => Transformed::yes(new),
            None => Transformed::no(node),
        })
    })
    .map(|t| t.data)
}

/// Helpers for the rules' tests.
#[cfg(test)]
pub mod testing {
    use std::sync::Arc;

    use arrow::util::pretty::pretty_format_batches;
    use datafusion::execution::SessionStateBuilder;
    use datafusion::physical_optimizer::PhysicalOptimizerRule;
    use datafusion::prelude::{SessionConfig, SessionContext};

    /// A DataFusion context (two partitions, `batch_size` rows a batch) with `rule` added
    /// after DataFusion's own rules, or none.
    pub fn context(
        batch_size: usize,
        rule: Option<Arc<dyn PhysicalOptimizerRule + Send + Sync>>,
    ) -> SessionContext {
        let config = SessionConfig::new()
            .with_batch_size(batch_size)
            .with_target_partitions(2);
        let mut builder = SessionStateBuilder::new()
            .with_config(config)
            .with_default_features();
        if let Some(rule) = rule {
            builder = builder.with_physical_optimizer_rule(rule);
        }
        SessionContext::new_with_state(builder.build())
    }

    /// `sql`'s result as a printed table, and the physical plan it ran.
    pub async fn result_and_plan(ctx: &SessionContext, sql: &str) -> (String, String) {
        let df = ctx.sql(sql).await.unwrap();
        let plan = df.clone().create_physical_plan().await.unwrap();
        let shown = datafusion::physical_plan::displayable(plan.as_ref())
            .indent(true)
            .to_string();
        let batches = df.collect().await.unwrap();
        (pretty_format_batches(&batches).unwrap().to_string(), shown)
    }
}
