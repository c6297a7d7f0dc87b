//! Reading many event files with a few streams.
//!
//! Ingest plans one scan per event file (each file is cast to the table's schema and tagged with
//! its name), joined by a union. A union's output has one partition per file, and whatever
//! drains it (delta-rs's writer, `execute_stream`) starts every partition at once: with 408
//! files at 100M events that was 408 Parquet readers, each holding decoded pages and a batch in
//! flight, on a 2-core machine. [`FileChain`] serves the same rows through `target_partitions`
//! streams instead; each reads its share of the files one after another.

use std::fmt;
use std::sync::Arc;

use arrow::datatypes::SchemaRef;
use async_trait::async_trait;
use datafusion::catalog::{Session, TableProvider};
use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::datasource::TableType;
use datafusion::error::Result;
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::logical_expr::{LogicalPlan, LogicalPlanBuilder};
use datafusion::physical_expr::{EquivalenceProperties, Partitioning, PhysicalExpr};
use datafusion::physical_plan::execution_plan::{Boundedness, EmissionType};
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::{
    DisplayAs, DisplayFormatType, ExecutionPlan, ExecutionPlanProperties, PlanProperties,
};
use futures::{StreamExt, TryStreamExt};

/// A table whose rows are `plan`'s (a union of file scans), scanned through at most
/// `target_partitions` streams.
#[derive(Debug)]
pub struct FileChain {
    plan: LogicalPlan,
    schema: SchemaRef,
}

impl FileChain {
    /// The table over `plan`'s rows.
    pub fn new(plan: LogicalPlan) -> Self {
        let schema = plan.schema().inner().clone();
        Self { plan, schema }
    }
}

#[async_trait]
impl TableProvider for FileChain {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn table_type(&self) -> TableType {
        TableType::Temporary
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        _filters: &[datafusion::logical_expr::Expr],
        _limit: Option<usize>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let mut plan = LogicalPlanBuilder::from(self.plan.clone());
        if let Some(columns) = projection {
            // Each file's scan then reads only these columns.
            plan = plan.select(columns.iter().copied())?;
        }
        let physical = state.create_physical_plan(&plan.build()?).await?;
        let streams = state.config().target_partitions().max(1);
        Ok(Arc::new(ChainExec::new(physical, streams)))
    }
}

/// Runs its input's partitions `streams` at a time: output partition `p` reads input
/// partitions `p`, `p + streams`, `p + 2·streams`, … one after another.
#[derive(Debug)]
pub struct ChainExec {
    input: Arc<dyn ExecutionPlan>,
    streams: usize,
    properties: Arc<PlanProperties>,
}

impl ChainExec {
    /// `input` read through at most `streams` partitions.
    pub fn new(input: Arc<dyn ExecutionPlan>, streams: usize) -> Self {
        let streams = streams.clamp(1, input.output_partitioning().partition_count().max(1));
        let properties = PlanProperties::new(
            EquivalenceProperties::new(input.schema()),
            Partitioning::UnknownPartitioning(streams),
            EmissionType::Incremental,
            Boundedness::Bounded,
        );
        Self {
            input,
            streams,
            properties: Arc::new(properties),
        }
    }
}

impl DisplayAs for ChainExec {
    fn fmt_as(&self, _: DisplayFormatType, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "ChainExec: {} input partitions through {} streams",
            self.input.output_partitioning().partition_count(),
            self.streams
        )
    }
}

impl ExecutionPlan for ChainExec {
    fn name(&self) -> &str {
        "ChainExec"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        &self.properties
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![&self.input]
    }

    fn apply_expressions(
        &self,
        _f: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> Result<TreeNodeRecursion>,
    ) -> Result<TreeNodeRecursion> {
        Ok(TreeNodeRecursion::Continue)
    }

    fn benefits_from_input_partitioning(&self) -> Vec<bool> {
        vec![false]
    }

    fn with_new_children(
        self: Arc<Self>,
        mut children: Vec<Arc<dyn ExecutionPlan>>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let input = children.pop().ok_or_else(|| {
            datafusion::error::DataFusionError::Internal("ChainExec needs one child".into())
        })?;
        Ok(Arc::new(ChainExec::new(input, self.streams)))
    }

    fn execute(
        &self,
        partition: usize,
        context: Arc<TaskContext>,
    ) -> Result<SendableRecordBatchStream> {
        let input = self.input.clone();
        let total = input.output_partitioning().partition_count();
        let parts: Vec<usize> = (partition..total).step_by(self.streams).collect();
        // Each input partition is opened only when the one before it is used up.
        let stream = futures::stream::iter(parts)
            .map(move |p| input.execute(p, context.clone()))
            .try_flatten();
        Ok(Box::pin(RecordBatchStreamAdapter::new(
            self.schema(),
            stream,
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{AsArray, Int64Array, RecordBatch};
    use arrow::datatypes::{DataType, Field, Int64Type, Schema};
    use datafusion::logical_expr::{col, Union};
    use datafusion::prelude::{SessionConfig, SessionContext};

    #[tokio::test]
    async fn every_row_of_every_input_comes_through_the_few_streams() {
        let ctx = SessionContext::new_with_config(SessionConfig::new().with_target_partitions(3));
        let schema = Arc::new(Schema::new(vec![
            Field::new("file", DataType::Int64, false),
            Field::new("v", DataType::Int64, false),
        ]));
        // Seven inputs of different sizes, the way event files differ.
        let mut plans = Vec::new();
        for file in 0..7i64 {
            let n = 10 + file * 3;
            let batch = RecordBatch::try_new(
                schema.clone(),
                vec![
                    Arc::new(Int64Array::from(vec![file; n as usize])),
                    Arc::new(Int64Array::from_iter_values(0..n)),
                ],
            )
            .unwrap();
            let df = ctx.read_batch(batch).unwrap();
            plans.push(Arc::new(df.into_unoptimized_plan()));
        }
        let union = LogicalPlan::Union(Union::try_new(plans).unwrap());
        let table = ctx.read_table(Arc::new(FileChain::new(union))).unwrap();

        let plan = table.clone().create_physical_plan().await.unwrap();
        assert!(
            plan.output_partitioning().partition_count() <= 3,
            "{}",
            datafusion::physical_plan::displayable(plan.as_ref()).indent(true)
        );

        // A projection reaches the inputs, and no row is lost or repeated.
        let rows = table
            .select(vec![col("file")])
            .unwrap()
            .aggregate(
                vec![col("file")],
                vec![datafusion::functions_aggregate::count::count_all()],
            )
            .unwrap()
            .sort(vec![col("file").sort(true, false)])
            .unwrap()
            .collect()
            .await
            .unwrap();
        let mut got = Vec::new();
        for batch in &rows {
            let files = batch.column(0).as_primitive::<Int64Type>();
            let counts = batch.column(1).as_primitive::<Int64Type>();
            for i in 0..batch.num_rows() {
                got.push((files.value(i), counts.value(i)));
            }
        }
        let want: Vec<(i64, i64)> = (0..7).map(|f| (f, 10 + f * 3)).collect();
        assert_eq!(got, want);
    }
}
