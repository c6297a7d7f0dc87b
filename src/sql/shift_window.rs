//! A physical optimizer rule: `lead` and `lag` over input sorted by their partition run as one
//! pass of index arithmetic per batch, not through DataFusion's streaming window operator.
//!
//! `BoundedWindowAggExec` keeps state per window partition: a key of `ScalarValue`s, a slice
//! of the batch and an evaluator for every function. Partitioned by profile, a CDP's windows
//! have hundreds of thousands of partitions of a few rows each, and that bookkeeping is the
//! cost: the bundled `after_add_to_cart` report (`lead(…) OVER (PARTITION BY profile_id ORDER
//! BY "timestamp", message_id)`, 3M events, 300k profiles) spent 0.95 s in the operator.
//!
//! With its input sorted by the partition keys (the operator's `Sorted` mode, which the
//! planner arranges with a sort below it), a row's `lead(x, k)` is `x` of the row `k` further
//! down when that row is in the same partition, else null; `lag` looks up. [`ShiftWindowExec`]
//! takes the operator's place when every one of its functions is such a shift (a literal
//! offset, no default or a null one, nulls respected). It holds back the rows of the last
//! partition of each batch until the partition ends, finds partition boundaries with arrow's
//! `partition` kernel and builds each result with one `take`. Everything the planner asks of
//! the operator (its input's distribution and order, its output's properties) is the replaced
//! operator's own, so the plan around it is unchanged. The held rows are reserved in the
//! engine's memory pool.

use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use arrow::array::{ArrayRef, RecordBatch, UInt32Array};
use arrow::datatypes::SchemaRef;
use datafusion::common::config::ConfigOptions;
use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::common::{Result, ScalarValue};
use datafusion::execution::memory_pool::{MemoryConsumer, MemoryReservation};
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::physical_expr::expressions::Literal;
use datafusion::physical_expr::window::StandardWindowExpr;
use datafusion::physical_expr::PhysicalExpr;
use datafusion::physical_expr_common::sort_expr::OrderingRequirements;
use datafusion::physical_optimizer::PhysicalOptimizerRule;
use datafusion::physical_plan::metrics::{BaselineMetrics, ExecutionPlanMetricsSet, MetricsSet};
use datafusion::physical_plan::windows::{BoundedWindowAggExec, WindowUDFExpr};
use datafusion::physical_plan::{
    DisplayAs, DisplayFormatType, ExecutionPlan, InputDistributionRequirements, InputOrderMode,
    PlanProperties, RecordBatchStream,
};
use futures::{Stream, StreamExt};

/// See the module documentation.
#[derive(Debug, Default)]
pub struct ShiftWindows;

impl PhysicalOptimizerRule for ShiftWindows {
    fn optimize(
        &self,
        plan: Arc<dyn ExecutionPlan>,
        _config: &ConfigOptions,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        crate::sql::plan_rules::replace_each(plan, |window: &BoundedWindowAggExec| {
            Ok(shifts_of(window).map(|shifts| {
                Arc::new(ShiftWindowExec {
                    original: Arc::new(window.clone()),
                    partition_by: window.window_expr()[0].partition_by().to_vec(),
                    shifts,
                    metrics: ExecutionPlanMetricsSet::new(),
                }) as Arc<dyn ExecutionPlan>
            }))
        })
    }

    fn name(&self) -> &str {
        "tessera_shift_windows"
    }

    fn schema_check(&self) -> bool {
        true
    }
}

/// One `lead` or `lag`: the value and how many rows further down (negative: up) it is read.
#[derive(Debug, Clone)]
struct Shift {
    value: Arc<dyn PhysicalExpr>,
    offset: i64,
}

/// The shifts of `window` when it is one [`ShiftWindowExec`] can take over, else `None`.
fn shifts_of(window: &BoundedWindowAggExec) -> Option<Vec<Shift>> {
    if !matches!(window.input_order_mode, InputOrderMode::Sorted) {
        return None;
    }
    let exprs = window.window_expr();
    let partition_by = exprs.first()?.partition_by();
    if partition_by.is_empty() {
        return None;
    }
    exprs
        .iter()
        .map(|expr| {
            if expr.partition_by().len() != partition_by.len()
                || !expr
                    .partition_by()
                    .iter()
                    .zip(partition_by)
                    .all(|(a, b)| a.eq(b))
            {
                return None;
            }
            let standard = expr.as_any().downcast_ref::<StandardWindowExpr>()?;
            let udf = standard
                .get_standard_func_expr()
                .as_any()
                .downcast_ref::<WindowUDFExpr>()?;
            let direction = match udf.fun().name() {
                "lead" => 1,
                "lag" => -1,
                _ => return None,
            };
            // `IGNORE NULLS` and an evaluation the optimizer reversed are kept private by
            // DataFusion; its Debug output shows both. Anything but the plain form (or a
            // changed format) leaves the window to DataFusion, and a test notices the latter.
            let shown = format!("{udf:?}");
            if !shown.contains("is_reversed: false") || !shown.contains("ignore_nulls: false") {
                return None;
            }
            let args = udf.args();
            let value = args.first()?.clone();
            let offset = match args.get(1) {
                None => 1,
                Some(arg) => match arg.downcast_ref::<Literal>()?.value() {
                    ScalarValue::Int64(Some(v)) => *v,
                    ScalarValue::Int32(Some(v)) => i64::from(*v),
                    ScalarValue::UInt64(Some(v)) => i64::try_from(*v).ok()?,
                    _ => return None,
                },
            };
            if let Some(default) = args.get(2) {
                if !default.downcast_ref::<Literal>()?.value().is_null() {
                    return None;
                }
            }
            if args.len() > 3 {
                return None;
            }
            Some(Shift {
                value,
                offset: offset.checked_mul(direction)?,
            })
        })
        .collect()
}

/// `lead`/`lag` over input sorted by the partition keys; see the module documentation.
#[derive(Debug)]
pub struct ShiftWindowExec {
    /// The operator replaced: its properties and requirements are this one's.
    original: Arc<BoundedWindowAggExec>,
    partition_by: Vec<Arc<dyn PhysicalExpr>>,
    shifts: Vec<Shift>,
    metrics: ExecutionPlanMetricsSet,
}

impl DisplayAs for ShiftWindowExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        let shifts: Vec<String> = self
            .shifts
            .iter()
            .map(|s| format!("{} by {}", s.value, s.offset))
            .collect();
        let keys: Vec<String> = self.partition_by.iter().map(|e| e.to_string()).collect();
        write!(
            f,
            "ShiftWindowExec: partition_by=[{}], shifts=[{}]",
            keys.join(", "),
            shifts.join(", ")
        )
    }
}

impl ExecutionPlan for ShiftWindowExec {
    fn name(&self) -> &str {
        "ShiftWindowExec"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        self.original.properties()
    }

    fn input_distribution_requirements(&self) -> InputDistributionRequirements {
        self.original.input_distribution_requirements()
    }

    fn required_input_ordering(&self) -> Vec<Option<OrderingRequirements>> {
        self.original.required_input_ordering()
    }

    fn maintains_input_order(&self) -> Vec<bool> {
        vec![true]
    }

    fn benefits_from_input_partitioning(&self) -> Vec<bool> {
        self.original.benefits_from_input_partitioning()
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![self.original.input()]
    }

    fn apply_expressions(
        &self,
        f: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> Result<TreeNodeRecursion>,
    ) -> Result<TreeNodeRecursion> {
        self.original.apply_expressions(f)
    }

    #[allow(deprecated)]
    fn with_new_children(
        self: Arc<Self>,
        children: Vec<Arc<dyn ExecutionPlan>>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let original: Arc<dyn ExecutionPlan> = self.original.clone();
        let replaced = original.with_new_children(children)?;
        let Some(original) = replaced.downcast_ref::<BoundedWindowAggExec>() else {
            return Err(datafusion::common::DataFusionError::Internal(format!(
                "a window operator given new inputs became {}",
                replaced.name()
            )));
        };
        let original = original.clone();
        Ok(Arc::new(ShiftWindowExec {
            original: Arc::new(original),
            partition_by: self.partition_by.clone(),
            shifts: self.shifts.clone(),
            metrics: ExecutionPlanMetricsSet::new(),
        }))
    }

    fn execute(
        &self,
        partition: usize,
        context: Arc<TaskContext>,
    ) -> Result<SendableRecordBatchStream> {
        let reservation = MemoryConsumer::new(format!("ShiftWindowExec[{partition}]"))
            .register(context.memory_pool());
        let input = self.original.input().execute(partition, context)?;
        Ok(Box::pin(ShiftStream {
            input,
            schema: self.schema(),
            partition_by: self.partition_by.clone(),
            shifts: self.shifts.clone(),
            held: Vec::new(),
            reservation,
            done: false,
            metrics: BaselineMetrics::new(&self.metrics, partition),
        }))
    }

    fn metrics(&self) -> Option<MetricsSet> {
        Some(self.metrics.clone_inner())
    }
}

struct ShiftStream {
    input: SendableRecordBatchStream,
    schema: SchemaRef,
    partition_by: Vec<Arc<dyn PhysicalExpr>>,
    shifts: Vec<Shift>,
    /// Rows of a partition that may go on in the next batch (all of one partition).
    held: Vec<RecordBatch>,
    /// What `held` takes, in the engine's memory pool. A partition cannot be cut, so when the
    /// pool cannot hold one the query fails with the pool's error rather than grow unseen.
    reservation: MemoryReservation,
    done: bool,
    metrics: BaselineMetrics,
}

impl ShiftStream {
    fn keys(&self, batch: &RecordBatch) -> Result<Vec<ArrayRef>> {
        self.partition_by
            .iter()
            .map(|e| e.evaluate(batch)?.into_array(batch.num_rows()))
            .collect()
    }

    /// Whether the first row of `batch` is in the partition of the rows held back.
    fn continues_held(&self, batch: &RecordBatch) -> Result<bool> {
        let Some(last) = self.held.last() else {
            return Ok(false);
        };
        let pair = arrow::compute::concat_batches(
            &batch.schema(),
            [&last.slice(last.num_rows() - 1, 1), &batch.slice(0, 1)],
        )?;
        Ok(arrow::compute::partition(&self.keys(&pair)?)?.len() == 1)
    }

    /// Takes `batch` in; returns the rows whose partitions are now complete, with the shifts.
    fn push(&mut self, batch: RecordBatch) -> Result<Option<RecordBatch>> {
        if batch.num_rows() == 0 {
            return Ok(None);
        }
        let ranges = arrow::compute::partition(&self.keys(&batch)?)?.ranges();
        let last = ranges
            .last()
            .expect("a batch with rows has a partition")
            .start;
        if last == 0 && (self.held.is_empty() || self.continues_held(&batch)?) {
            self.held.push(batch);
            self.reserve_held()?;
            return Ok(None);
        }
        let mut complete = std::mem::take(&mut self.held);
        if last > 0 {
            complete.push(batch.slice(0, last));
        }
        self.held.push(batch.slice(last, batch.num_rows() - last));
        self.reserve_held()?;
        self.shifted(complete).map(Some)
    }

    /// Sizes the reservation to the held rows (a slice counts its whole batch's buffers,
    /// which it keeps alive).
    fn reserve_held(&mut self) -> Result<()> {
        let bytes = self
            .held
            .iter()
            .map(RecordBatch::get_array_memory_size)
            .sum();
        self.reservation.try_resize(bytes)
    }

    /// `batches` (whole partitions, in order) as one batch with the shifted columns added.
    fn shifted(&self, batches: Vec<RecordBatch>) -> Result<RecordBatch> {
        let input = match batches.as_slice() {
            [one] => one.clone(),
            _ => arrow::compute::concat_batches(&self.input.schema(), &batches)?,
        };
        let ranges = arrow::compute::partition(&self.keys(&input)?)?.ranges();
        let mut columns = input.columns().to_vec();
        for (shift, field) in self
            .shifts
            .iter()
            .zip(self.schema.fields().iter().skip(input.num_columns()))
        {
            let values = shift.value.evaluate(&input)?.into_array(input.num_rows())?;
            let mut from = Vec::with_capacity(input.num_rows());
            for range in &ranges {
                let (start, end) = (range.start as i64, range.end as i64);
                for row in start..end {
                    let source = row + shift.offset;
                    from.push((start..end).contains(&source).then_some(source as u32));
                }
            }
            let mut column = arrow::compute::take(&values, &UInt32Array::from(from), None)?;
            if column.data_type() != field.data_type() {
                column = arrow::compute::cast(&column, field.data_type())?;
            }
            columns.push(column);
        }
        Ok(RecordBatch::try_new(self.schema.clone(), columns)?)
    }
}

impl Stream for ShiftStream {
    type Item = Result<RecordBatch>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            if self.done {
                return Poll::Ready(None);
            }
            let polled = futures::ready!(self.input.poll_next_unpin(cx));
            let elapsed = self.metrics.elapsed_compute().clone();
            let timer = elapsed.timer();
            let out = match polled {
                Some(Ok(batch)) => self.push(batch),
                Some(Err(e)) => Err(e),
                None => {
                    self.done = true;
                    let held = std::mem::take(&mut self.held);
                    self.reservation.free();
                    if held.is_empty() {
                        Ok(None)
                    } else {
                        self.shifted(held).map(Some)
                    }
                }
            };
            timer.done();
            match out {
                Ok(Some(batch)) => {
                    self.metrics.record_output(batch.num_rows());
                    return Poll::Ready(Some(Ok(batch)));
                }
                Ok(None) => continue,
                Err(e) => {
                    self.done = true;
                    return Poll::Ready(Some(Err(e)));
                }
            }
        }
    }
}

impl RecordBatchStream for ShiftStream {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Int64Array, StringArray};
    use arrow::datatypes::{DataType, Field, Schema};
    use datafusion::datasource::MemTable;
    use datafusion::prelude::SessionContext;

    /// Rows in `parts` table partitions of `batch` rows: a key with few values (and nulls), a
    /// time with ties, a unique id, and nullable values of two types.
    fn table(seed: u64, rows: usize, batch: usize, parts: usize) -> MemTable {
        let schema = Arc::new(Schema::new(vec![
            Field::new("id", DataType::Int64, false),
            Field::new("k", DataType::Utf8, true),
            Field::new("t", DataType::Int64, false),
            Field::new("x", DataType::Int64, true),
            Field::new("s", DataType::Utf8, true),
        ]));
        let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        let mut next = move |n: u64| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state % n
        };
        let (mut ids, mut keys, mut times, mut values, mut texts) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for id in 0..rows as i64 {
            ids.push(id);
            keys.push(match next(8) {
                0 => None,
                k => Some(format!("p{}", next(k * 3))),
            });
            times.push(next(20) as i64);
            values.push((next(5) > 0).then(|| next(1000) as i64));
            texts.push((next(4) > 0).then(|| format!("v{}", next(50))));
        }
        let all = RecordBatch::try_new(
            schema.clone(),
            vec![
                Arc::new(Int64Array::from(ids)),
                Arc::new(StringArray::from(keys)),
                Arc::new(Int64Array::from(times)),
                Arc::new(Int64Array::from(values)),
                Arc::new(StringArray::from(texts)),
            ],
        )
        .unwrap();
        let mut partitions = vec![Vec::new(); parts];
        for (i, start) in (0..rows).step_by(batch).enumerate() {
            partitions[i % parts].push(all.slice(start, batch.min(rows - start)));
        }
        MemTable::try_new(schema, partitions).unwrap()
    }

    fn context(with_rule: bool, batch_size: usize) -> SessionContext {
        let rule = with_rule.then(|| Arc::new(ShiftWindows) as _);
        crate::sql::plan_rules::testing::context(batch_size, rule)
    }

    use crate::sql::plan_rules::testing::result_and_plan as run;

    const SHIFTS: &str = "SELECT id, \
        lead(x) OVER w AS a, lag(x) OVER w AS b, lead(s, 2) OVER w AS c, \
        lag(s, 3, NULL) OVER w AS d, lead(x, 0) OVER w AS e, lead(t, 25) OVER w AS f \
        FROM r WINDOW w AS (PARTITION BY k ORDER BY t, id) ORDER BY id";

    #[tokio::test]
    async fn shifts_agree_with_datafusion_wherever_batches_and_partitions_end() {
        for (seed, rows, batch, batch_size) in [
            (1, 200, 7, 5),
            (2, 500, 64, 3),
            (3, 300, 1, 1),
            (4, 1000, 100, 64),
            (5, 40, 40, 8192),
        ] {
            let (with, without) = (context(true, batch_size), context(false, batch_size));
            for ctx in [&with, &without] {
                ctx.register_table("r", Arc::new(table(seed, rows, batch, 2)))
                    .unwrap();
            }
            let (ours, plan) = run(&with, SHIFTS).await;
            let (theirs, their_plan) = run(&without, SHIFTS).await;
            assert!(plan.contains("ShiftWindowExec"), "{plan}");
            assert!(!their_plan.contains("ShiftWindowExec"), "{their_plan}");
            assert_eq!(ours, theirs, "seed {seed}");
        }
    }

    #[tokio::test]
    async fn other_windows_are_left_to_datafusion() {
        let (with, without) = (context(true, 7), context(false, 7));
        for ctx in [&with, &without] {
            ctx.register_table("r", Arc::new(table(9, 300, 11, 2)))
                .unwrap();
        }
        for sql in [
            // Nulls ignored, a default, a function that is no shift, no partition.
            "SELECT id, lead(x) IGNORE NULLS OVER (PARTITION BY k ORDER BY t, id) AS a FROM r ORDER BY id",
            "SELECT id, lag(x, 1, -1) OVER (PARTITION BY k ORDER BY t, id) AS a FROM r ORDER BY id",
            "SELECT id, lead(x) OVER w AS a, row_number() OVER w AS b FROM r WINDOW w AS (PARTITION BY k ORDER BY t, id) ORDER BY id",
            "SELECT id, lead(x) OVER (ORDER BY t, id) AS a FROM r ORDER BY id",
        ] {
            let (ours, plan) = run(&with, sql).await;
            let (theirs, _) = run(&without, sql).await;
            assert!(!plan.contains("ShiftWindowExec"), "{sql}\n{plan}");
            assert_eq!(ours, theirs, "{sql}");
        }
    }

    /// One partition running through every batch is held back whole, and what it takes is
    /// in the memory pool: a pool too small for it fails the query instead of growing unseen.
    #[tokio::test]
    async fn held_rows_are_reserved_in_the_memory_pool() {
        use datafusion::execution::memory_pool::{GreedyMemoryPool, MemoryPool};
        use datafusion::physical_expr::expressions::Column;
        use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
        let schema = Arc::new(Schema::new(vec![
            Field::new("k", DataType::Utf8, false),
            Field::new("x", DataType::Int64, false),
        ]));
        let batch = |key: &str, n: usize| {
            RecordBatch::try_new(
                schema.clone(),
                vec![
                    Arc::new(StringArray::from(vec![key; n])),
                    Arc::new(Int64Array::from_iter_values(0..n as i64)),
                ],
            )
            .unwrap()
        };
        let out_schema = Arc::new(Schema::new(vec![
            Field::new("k", DataType::Utf8, false),
            Field::new("x", DataType::Int64, false),
            Field::new("next", DataType::Int64, true),
        ]));
        let one_batch = batch("a", 1000).get_array_memory_size();
        let stream = |limit: usize| {
            let pool: Arc<dyn MemoryPool> = Arc::new(GreedyMemoryPool::new(limit));
            let input = futures::stream::iter(
                [
                    batch("a", 1000),
                    batch("a", 1000),
                    batch("a", 1000),
                    batch("b", 10),
                ]
                .map(Ok),
            );
            let stream = ShiftStream {
                input: Box::pin(RecordBatchStreamAdapter::new(schema.clone(), input)),
                schema: out_schema.clone(),
                partition_by: vec![Arc::new(Column::new("k", 0))],
                shifts: vec![Shift {
                    value: Arc::new(Column::new("x", 1)),
                    offset: 1,
                }],
                held: Vec::new(),
                reservation: MemoryConsumer::new("test").register(&pool),
                done: false,
                metrics: BaselineMetrics::new(&ExecutionPlanMetricsSet::new(), 0),
            };
            (pool, stream)
        };

        let (pool, mut roomy) = stream(100 * one_batch);
        let first = roomy.next().await.unwrap().unwrap();
        assert_eq!(first.num_rows(), 3000, "partition a comes out whole");
        assert!(
            pool.reserved() >= one_batch / 100,
            "b is held: {}",
            pool.reserved()
        );
        assert_eq!(roomy.next().await.unwrap().unwrap().num_rows(), 10);
        assert!(roomy.next().await.is_none());
        assert_eq!(pool.reserved(), 0, "everything is given back at the end");

        let (pool, mut tight) = stream(2 * one_batch);
        let error = tight.next().await.unwrap().unwrap_err().to_string();
        assert!(error.contains("Resources exhausted"), "{error}");
        assert!(
            tight.next().await.is_none(),
            "the stream ends after its error"
        );
        drop(tight);
        assert_eq!(pool.reserved(), 0);
    }

    /// The bundled project's engine has the rule: the report that uses `lead` runs through it.
    #[tokio::test]
    async fn tessera_contexts_take_shifts_over() {
        let ctx = crate::engine::new_context().unwrap();
        ctx.register_table("r", Arc::new(table(3, 50, 10, 1)))
            .unwrap();
        let (_, plan) = run(
            &ctx,
            "SELECT id, lead(coalesce(s, k)) OVER (PARTITION BY k ORDER BY t, id) AS a FROM r",
        )
        .await;
        assert!(plan.contains("ShiftWindowExec"), "{plan}");
    }
}
