//! Sessions cut in one pass over each profile's sorted events.
//!
//! The `sessions` table was cut in SQL: `lag()` to mark the events that open a session, a
//! running `sum()` to number them, and a `GROUP BY` per session. Those two window operators
//! and the aggregation cost more than the sort under them (10M events: 3.1 s and 1.1 s of
//! compute against 1.7 s for the sort), though once the events are in order a session is
//! just a run of rows. [`cut`] sorts the narrow rows (hash-partitioned by profile, sorted by
//! profile and time within each partition, spilling as any sort does) and walks them, giving
//! exactly what the SQL gave (tested against it below).
//!
//! The sort is on each profile's number (the 64 bits its `p_…` id is written from) and the
//! time, not on the id's text: the rows are a quarter narrower and the comparisons are of
//! integers. It sorts one bucket of profiles at a time (see [`cut`]); one sort per partition
//! spilled 4.4–4.9 GiB at 100M events at any memory limit and merged its runs back.

use std::fmt::Write;
use std::sync::Arc;

use arrow::array::{
    Array, ArrayBuilder, AsArray, Int64Array, Int64Builder, RecordBatch, StringArray, StringBuilder,
};
use arrow::compute::SortOptions;
use arrow::datatypes::{
    DataType, Field, Int64Type, Int8Type, Schema, SchemaRef, TimeUnit, UInt64Type,
};
use datafusion::catalog::streaming::StreamingTable;
use datafusion::catalog::TableProvider;
use datafusion::dataframe::DataFrame;
use datafusion::execution::memory_pool::{
    MemoryConsumer, MemoryLimit, MemoryPool, MemoryReservation,
};
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::physical_expr::expressions::col;
use datafusion::physical_expr::{LexOrdering, PhysicalSortExpr};
use datafusion::physical_plan::repartition::RepartitionExec;
use datafusion::physical_plan::sorts::sort::SortExec;
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::streaming::PartitionStream;
use datafusion::physical_plan::{ExecutionPlan, ExecutionPlanProperties, Partitioning};
use futures::StreamExt;

use crate::error::Result;

/// Columns [`cut`] expects of its input, in this order.
pub const INPUT: [&str; 4] = ["profile_id", "ts", "message_id", "page"];

/// What the sort orders: the profile's number (see [`profile_number`]), then the time.
const SORTED: [&str; 2] = ["profile_number", "ts"];

/// Rows per output batch.
const BATCH_ROWS: usize = 8192;

/// The sessions of `events` (columns [`INPUT`]: profile_id and message_id as UTF-8, ts a
/// timestamp, page an Int64 that is 1 for a page view): one row per session with
/// `profile_id, session_index, started_at, ended_at, event_count, page_views,
/// first_message_id`, as a table that runs the sort and the cut when it is scanned.
///
/// A profile's events, ordered by time then message_id (events without a time last), open a
/// session when they are its first or come more than `gap_minutes` after the one before;
/// sessions are numbered from 1 per profile. Rows without a profile_id are not cut. A
/// profile_id that identity resolution cannot have written (`p_` and 16 hex digits) is an
/// error when the table is scanned.
///
/// The rows are dealt by profile into [`BUCKETS_PER_PARTITION`] buckets per partition, and
/// each partition sorts and cuts its buckets one after the other, so a sort holds only a
/// bucket's rows. The buckets waiting their turn are held in memory up to `buffer_bytes` in
/// all and written to the engine's spill folder beyond that.
pub async fn cut(
    events: DataFrame,
    gap_minutes: u32,
    buffer_bytes: usize,
) -> Result<Arc<dyn TableProvider>> {
    use datafusion::prelude::{cast, col as column};
    let task = events.task_ctx();
    let partitions = task.session_config().target_partitions();
    let runtime = datafusion::execution::runtime_env::RuntimeEnvBuilder::from_runtime_env(
        &task.runtime_env(),
    )
    .with_memory_pool(Arc::new(BoundedBuffers::new(
        task.runtime_env().memory_pool.clone(),
        buffer_bytes,
    )))
    .build_arc()?;
    let events = events.select(vec![
        profile_number()
            .call(vec![column(INPUT[0])])
            .alias(SORTED[0]),
        column(INPUT[1]),
        column(INPUT[2]),
        cast(column(INPUT[3]), DataType::Int8).alias(INPUT[3]),
    ])?;
    let plan = events.create_physical_plan().await?;
    let input = plan.schema();
    let ts_type = input.field_with_name(INPUT[1])?.data_type().clone();
    let gap = match &ts_type {
        DataType::Timestamp(unit, _) => {
            let per_minute = match unit {
                TimeUnit::Second => 60,
                TimeUnit::Millisecond => 60_000,
                TimeUnit::Microsecond => 60_000_000,
                TimeUnit::Nanosecond => 60_000_000_000,
            };
            i64::from(gap_minutes).saturating_mul(per_minute)
        }
        other => {
            return Err(datafusion::error::DataFusionError::Plan(format!(
            "sessions need the events' `timestamp` column to be a timestamp, and it is {other}; \
                 write it as a Parquet timestamp in the event files"
        ))
            .into())
        }
    };
    let ascending = SortOptions {
        descending: false,
        nulls_first: false,
    };
    // Not by message_id: see [`Cutter`].
    let ordering = LexOrdering::new(
        SORTED
            .iter()
            .map(|name| Ok(PhysicalSortExpr::new(col(name, &input)?, ascending)))
            .collect::<Result<Vec<_>>>()?,
    )
    .expect("two sort keys");
    let partitions = partitions.max(1);
    let by_profile = Partitioning::Hash(
        vec![col(SORTED[0], &input)?],
        partitions * BUCKETS_PER_PARTITION,
    );
    let sorted: Arc<dyn ExecutionPlan> = Arc::new(
        SortExec::new(
            ordering,
            Arc::new(RepartitionExec::try_new(plan, by_profile)?),
        )
        .with_preserve_partitioning(true),
    );
    let schema = output_schema(&ts_type);
    let buckets = sorted.output_partitioning().partition_count();
    let streams = (0..partitions)
        .map(|first| {
            Arc::new(CutPartition {
                sorted: sorted.clone(),
                runtime: runtime.clone(),
                buckets: (first..buckets).step_by(partitions).collect(),
                schema: schema.clone(),
                gap,
            }) as Arc<dyn PartitionStream>
        })
        .collect();
    Ok(Arc::new(StreamingTable::try_new(schema, streams)?))
}

/// `profile_number(profile_id)`: the number an id written by identity resolution encodes
/// (`p_` and 16 hex digits), as UInt64; NULL for NULL, an error naming the id for any other.
fn profile_number() -> datafusion::logical_expr::ScalarUDF {
    use datafusion::logical_expr::{ColumnarValue, Volatility};
    datafusion::logical_expr::create_udf(
        "__tessera_profile_number",
        vec![DataType::Utf8],
        DataType::UInt64,
        Volatility::Immutable,
        Arc::new(|args: &[ColumnarValue]| {
            let ids = ColumnarValue::values_to_arrays(args)?;
            let ids = arrow::compute::cast(&ids[0], &DataType::Utf8)?;
            let ids: &StringArray = ids.as_string();
            let mut numbers = arrow::array::UInt64Builder::with_capacity(ids.len());
            for id in ids {
                match id {
                    None => numbers.append_null(),
                    Some(id) => match crate::stages::identity::profile_id_number(id) {
                        Some(n) => numbers.append_value(n),
                        None => {
                            return Err(datafusion::error::DataFusionError::Execution(format!(
                                "sessions: profile_id `{id}` is not one identity resolution \
                                 writes (`p_` and 16 lower-case hex digits); events get their \
                                 profile_id from identity resolution only"
                            )))
                        }
                    },
                }
            }
            Ok(ColumnarValue::Array(Arc::new(numbers.finish())))
        }),
    )
}

/// What [`cut`] produces; nullability as the SQL cut had it.
fn output_schema(ts_type: &DataType) -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("profile_id", DataType::Utf8, true),
        Field::new("session_index", DataType::Int64, true),
        Field::new("started_at", ts_type.clone(), true),
        Field::new("ended_at", ts_type.clone(), true),
        Field::new("event_count", DataType::Int64, false),
        Field::new("page_views", DataType::Int64, true),
        Field::new("first_message_id", DataType::Utf8, true),
    ]))
}

/// Buckets of profiles per partition that [`cut`] sorts one after the other. 16 at 100M events
/// (32 buckets of 3 million rows): the sessions took 47 s instead of 67 s, where one sort per
/// partition spilled 4.4 GiB and merged its runs back.
pub const BUCKETS_PER_PARTITION: usize = 16;

/// The engine's memory pool, with the repartition's waiting buckets charged to it as one
/// reservation that cannot spill and kept to `cap` bytes. Past the cap a buffer spills
/// (DataFusion's RepartitionExec spills a batch it cannot reserve). The sorts then share what
/// the buckets leave: the fair pool splits the rest of the limit among the operators that can
/// spill, and with each of the 16 buffers per partition counted as one of them, a bucket's sort
/// got a sliver of the limit and spilled every bucket (100M events under a 4 GiB limit).
#[derive(Debug)]
struct BoundedBuffers {
    pool: Arc<dyn MemoryPool>,
    cap: usize,
    /// What the waiting buckets hold, as the engine's pool sees it.
    held: MemoryReservation,
}

impl BoundedBuffers {
    fn new(pool: Arc<dyn MemoryPool>, cap: usize) -> Self {
        let held = MemoryConsumer::new("sessions: buckets waiting to be sorted").register(&pool);
        BoundedBuffers { pool, cap, held }
    }

    /// Whether `consumer` is a repartition buffer's (DataFusion names them
    /// `RepartitionExec[output]`).
    fn is_buffer(consumer: &MemoryConsumer) -> bool {
        consumer.name().starts_with("RepartitionExec")
    }
}

impl std::fmt::Display for BoundedBuffers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} (repartition buffers up to {} bytes)",
            self.pool, self.cap
        )
    }
}

impl MemoryPool for BoundedBuffers {
    fn name(&self) -> &str {
        "bounded_buffers"
    }

    fn register(&self, consumer: &MemoryConsumer) {
        if !Self::is_buffer(consumer) {
            self.pool.register(consumer)
        }
    }

    fn unregister(&self, consumer: &MemoryConsumer) {
        if !Self::is_buffer(consumer) {
            self.pool.unregister(consumer)
        }
    }

    fn grow(&self, reservation: &MemoryReservation, additional: usize) {
        if Self::is_buffer(reservation.consumer()) {
            self.held.grow(additional)
        } else {
            self.pool.grow(reservation, additional)
        }
    }

    fn shrink(&self, reservation: &MemoryReservation, shrink: usize) {
        if Self::is_buffer(reservation.consumer()) {
            self.held.shrink(shrink)
        } else {
            self.pool.shrink(reservation, shrink)
        }
    }

    fn try_grow(
        &self,
        reservation: &MemoryReservation,
        additional: usize,
    ) -> datafusion::error::Result<()> {
        if !Self::is_buffer(reservation.consumer()) {
            return self.pool.try_grow(reservation, additional);
        }
        let held = self.held.size();
        if held.saturating_add(additional) > self.cap {
            return Err(datafusion::error::DataFusionError::ResourcesExhausted(
                format!(
                "sessions: the buckets waiting to be sorted hold {held} bytes, up to {} allowed",
                self.cap
            ),
            ));
        }
        self.held.try_grow(additional)
    }

    fn reserved(&self) -> usize {
        self.pool.reserved()
    }

    fn memory_limit(&self) -> MemoryLimit {
        self.pool.memory_limit()
    }
}

/// Buckets of the sorted events, cut one after the other when executed.
#[derive(Debug)]
struct CutPartition {
    sorted: Arc<dyn ExecutionPlan>,
    /// The engine's runtime with [`BoundedBuffers`] for its pool.
    runtime: Arc<datafusion::execution::runtime_env::RuntimeEnv>,
    buckets: Vec<usize>,
    schema: SchemaRef,
    gap: i64,
}

impl PartitionStream for CutPartition {
    fn schema(&self) -> &SchemaRef {
        &self.schema
    }

    fn execute(&self, ctx: Arc<TaskContext>) -> SendableRecordBatchStream {
        let schema = self.schema.clone();
        let sorted = self.sorted.clone();
        let ctx = Arc::new(TaskContext::new(
            ctx.task_id(),
            ctx.session_id(),
            ctx.session_config().clone(),
            ctx.scalar_functions().clone(),
            ctx.higher_order_functions().clone(),
            ctx.aggregate_functions().clone(),
            ctx.window_functions().clone(),
            self.runtime.clone(),
        ));
        // A profile's events are all in one bucket, so the cutter reads bucket after bucket.
        let input: SendableRecordBatchStream = Box::pin(RecordBatchStreamAdapter::new(
            sorted.schema(),
            futures::stream::iter(self.buckets.clone())
                .map(move |bucket| match sorted.execute(bucket, ctx.clone()) {
                    Ok(stream) => stream.boxed(),
                    Err(e) => futures::stream::once(async { Err(e) }).boxed(),
                })
                .flatten(),
        ));
        let cutter = Cutter::new(schema.clone(), self.gap);
        let stream = futures::stream::unfold(Some((input, cutter)), |state| async move {
            let (mut input, mut cutter) = state?;
            loop {
                match input.next().await {
                    Some(Ok(batch)) => match cutter.push(&batch) {
                        Ok(Some(out)) => return Some((Ok(out), Some((input, cutter)))),
                        Ok(None) => {}
                        Err(e) => return Some((Err(e), None)),
                    },
                    Some(Err(e)) => return Some((Err(e), None)),
                    None => {
                        return match cutter.finish() {
                            Ok(Some(out)) => Some((Ok(out), None)),
                            Ok(None) => None,
                            Err(e) => Some((Err(e), None)),
                        }
                    }
                }
            }
        });
        Box::pin(RecordBatchStreamAdapter::new(schema, stream))
    }
}

/// The session being read.
struct Open {
    index: i64,
    started: i64,
    ended: i64,
    events: i64,
    pages: i64,
    first_message_id: Option<String>,
}

/// The smaller message_id, a missing one being larger than any (as `NULLS LAST` sorts).
fn first_of(a: &Option<String>, b: &Option<String>) -> std::cmp::Ordering {
    match (a, b) {
        (Some(a), Some(b)) => a.cmp(b),
        (Some(_), None) => std::cmp::Ordering::Less,
        (None, Some(_)) => std::cmp::Ordering::Greater,
        (None, None) => std::cmp::Ordering::Equal,
    }
}

/// Turns batches sorted by profile and time into session rows.
///
/// The input is not ordered by message_id among events of one profile at the same time: the
/// sort key leaves it out, as it is the widest column and decides nothing but which of such
/// events counts as a session's first. Events at one time are never apart (the gap between
/// them is zero), so the first is found here as the smallest message_id among the events at
/// the session's opening time. Events without a time come last; as in the SQL, where each
/// follows one whose `lag()` is NULL, the first of them (by message_id) joins the session
/// before it and every other one is a session of its own, so they are held until the profile
/// ends and then put in message_id order.
struct Cutter {
    schema: SchemaRef,
    gap: i64,
    /// The profile being read (its number) and the last session number it gave.
    profile_now: Option<u64>,
    index: i64,
    open: Option<Open>,
    untimed: Vec<(Option<String>, i64)>,
    out: Builders,
}

/// The output columns being filled.
#[derive(Default)]
struct Builders {
    profile: StringBuilder,
    index: Int64Builder,
    started: Int64Builder,
    ended: Int64Builder,
    events: Int64Builder,
    pages: Int64Builder,
    first_message_id: StringBuilder,
}

impl Builders {
    #[allow(clippy::too_many_arguments)]
    fn emit(
        &mut self,
        profile: u64,
        index: i64,
        started: Option<i64>,
        ended: Option<i64>,
        events: i64,
        pages: i64,
        first_message_id: Option<&str>,
    ) {
        // As `crate::stages::identity::profile_id_text` writes it, without a String per session.
        let _ = write!(self.profile, "p_{profile:016x}");
        self.profile.append_value("");
        self.index.append_value(index);
        self.started.append_option(started);
        self.ended.append_option(ended);
        self.events.append_value(events);
        self.pages.append_value(pages);
        self.first_message_id.append_option(first_message_id);
    }
}

impl Cutter {
    fn new(schema: SchemaRef, gap: i64) -> Self {
        Cutter {
            schema,
            gap,
            profile_now: None,
            index: 0,
            open: None,
            untimed: Vec::new(),
            out: Builders::default(),
        }
    }

    /// Reads one batch; returns the sessions finished so far once there are enough of them.
    fn push(&mut self, batch: &RecordBatch) -> datafusion::error::Result<Option<RecordBatch>> {
        let profile = batch.column(0).as_primitive::<UInt64Type>();
        // A timestamp's raw values, in its unit.
        let ts_values = arrow::compute::cast(batch.column(1), &DataType::Int64)?;
        let ts: &Int64Array = ts_values.as_primitive::<Int64Type>();
        let message_id: &StringArray = batch.column(2).as_string();
        let pages = batch.column(3).as_primitive::<Int8Type>();
        for row in 0..batch.num_rows() {
            if profile.is_null(row) {
                continue;
            }
            let p = profile.value(row);
            let page = if pages.is_valid(row) {
                i64::from(pages.value(row))
            } else {
                0
            };
            let m = message_id.is_valid(row).then(|| message_id.value(row));
            if self.profile_now != Some(p) {
                self.end_profile();
                self.profile_now = Some(p);
            }
            if ts.is_null(row) {
                self.untimed.push((m.map(str::to_string), page));
                continue;
            }
            let t = ts.value(row);
            if let Some(open) = &mut self.open {
                // As `ts - lag(ts) > gap`; times ascend, so the last event's is `ended`.
                if i128::from(t) - i128::from(open.ended) <= i128::from(self.gap) {
                    open.events += 1;
                    open.pages += page;
                    open.ended = t;
                    if t == open.started {
                        let m = m.map(str::to_string);
                        if first_of(&m, &open.first_message_id).is_lt() {
                            open.first_message_id = m;
                        }
                    }
                    continue;
                }
            }
            self.index += 1;
            let opened = Open {
                index: self.index,
                started: t,
                ended: t,
                events: 1,
                pages: page,
                first_message_id: m.map(str::to_string),
            };
            if let Some(done) = self.open.replace(opened) {
                self.emit(done);
            }
        }
        if self.out.profile.len() >= BATCH_ROWS {
            return self.flush().map(Some);
        }
        Ok(None)
    }

    /// Closes the profile being read: its last session, then its events without a time.
    fn end_profile(&mut self) {
        let mut untimed = std::mem::take(&mut self.untimed);
        untimed.sort_by(|a, b| first_of(&a.0, &b.0));
        let mut untimed = untimed.into_iter();
        if let Some(mut open) = self.open.take() {
            if let Some((_, page)) = untimed.next() {
                open.events += 1;
                open.pages += page;
            }
            self.emit(open);
        }
        let Some(profile) = self.profile_now else {
            return;
        };
        for (message_id, page) in untimed {
            self.index += 1;
            self.out.emit(
                profile,
                self.index,
                None,
                None,
                1,
                page,
                message_id.as_deref(),
            );
        }
        self.index = 0;
    }

    /// Ends the input: the sessions not yet returned, if any.
    fn finish(&mut self) -> datafusion::error::Result<Option<RecordBatch>> {
        self.end_profile();
        if self.out.profile.is_empty() {
            return Ok(None);
        }
        self.flush().map(Some)
    }

    fn emit(&mut self, session: Open) {
        let profile = self.profile_now.unwrap_or_default();
        self.out.emit(
            profile,
            session.index,
            Some(session.started),
            Some(session.ended),
            session.events,
            session.pages,
            session.first_message_id.as_deref(),
        );
    }

    fn flush(&mut self) -> datafusion::error::Result<RecordBatch> {
        let ts_type = self.schema.field(2).data_type();
        let out = &mut self.out;
        let started = arrow::compute::cast(&out.started.finish(), ts_type)?;
        let ended = arrow::compute::cast(&out.ended.finish(), ts_type)?;
        Ok(RecordBatch::try_new(
            self.schema.clone(),
            vec![
                Arc::new(out.profile.finish()),
                Arc::new(out.index.finish()),
                started,
                ended,
                Arc::new(out.events.finish()),
                Arc::new(out.pages.finish()),
                Arc::new(out.first_message_id.finish()),
            ],
        )?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::TimestampMicrosecondArray;
    use datafusion::prelude::{SessionConfig, SessionContext};
    use rand::{Rng, SeedableRng};

    /// How the SQL cut sessions before: `lag()`, a running `sum()` and a `GROUP BY`.
    const WINDOW_SQL: &str = r#"
WITH marked AS (
    SELECT profile_id, ts, message_id, page,
           CASE WHEN lag(ts) OVER (PARTITION BY profile_id ORDER BY ts, message_id) IS NULL
                  OR ts - lag(ts) OVER (PARTITION BY profile_id ORDER BY ts, message_id)
                     > INTERVAL '30 minutes'
                THEN 1 ELSE 0 END AS starts
    FROM ev WHERE profile_id IS NOT NULL
), numbered AS (
    SELECT *, sum(starts) OVER (PARTITION BY profile_id ORDER BY ts, message_id
                                ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW) AS session_index
    FROM marked
)
SELECT profile_id, CAST(session_index AS BIGINT) AS session_index, min(ts) AS started_at,
       max(ts) AS ended_at, count(*) AS event_count, CAST(sum(page) AS BIGINT) AS page_views,
       min(CASE WHEN starts = 1 THEN message_id END) AS first_message_id
FROM numbered GROUP BY profile_id, session_index
ORDER BY profile_id, session_index"#;

    /// Events on a ten-minute grid, so gaps of exactly 30 minutes (no new session) and ties
    /// on time (message_id decides) are common; a few have no time or no profile.
    fn events(seed: u64, rows: usize) -> RecordBatch {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let mut profile = Vec::new();
        let mut ts = Vec::new();
        let mut message_id = Vec::new();
        let mut page = Vec::new();
        for i in 0..rows {
            profile.push(
                (rng.gen_range(0..20) > 0)
                    .then(|| crate::stages::identity::profile_id_text(rng.gen_range(0..7) << 60)),
            );
            ts.push(
                (rng.gen_range(0..30) > 0)
                    .then(|| 1_700_000_000_000_000 + rng.gen_range(0..40i64) * 600_000_000),
            );
            message_id.push((rng.gen_range(0..40) > 0).then(|| format!("m{:03}", (i * 37) % 1000)));
            page.push(rng.gen_range(0..2i64));
        }
        RecordBatch::try_new(
            Arc::new(Schema::new(vec![
                Field::new("profile_id", DataType::Utf8, true),
                Field::new(
                    "ts",
                    DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
                    true,
                ),
                Field::new("message_id", DataType::Utf8, true),
                Field::new("page", DataType::Int64, false),
            ])),
            vec![
                Arc::new(StringArray::from(profile)),
                Arc::new(TimestampMicrosecondArray::from(ts).with_timezone("UTC")),
                Arc::new(StringArray::from(message_id)),
                Arc::new(Int64Array::from(page)),
            ],
        )
        .unwrap()
    }

    async fn pretty(ctx: &SessionContext, sql: &str) -> String {
        let batches = ctx.sql(sql).await.unwrap().collect().await.unwrap();
        arrow::util::pretty::pretty_format_batches(&batches)
            .unwrap()
            .to_string()
    }

    #[tokio::test]
    async fn the_one_pass_cut_gives_what_the_window_functions_gave() {
        // Unbounded buffers, and buffers of 1 KiB: then nearly every batch waiting for its
        // bucket is spilled and read back.
        for buffers in [usize::MAX, 1024] {
            for seed in 0..25 {
                // Three partitions and small batches, so profiles cross batch boundaries.
                let ctx = SessionContext::new_with_config(
                    SessionConfig::new()
                        .with_target_partitions(3)
                        .with_batch_size(7),
                );
                let batch = events(seed, 60 + 13 * seed as usize);
                // Split in two inputs so the repartition has more than one stream to merge.
                let half = batch.num_rows() / 2;
                let table = datafusion::datasource::MemTable::try_new(
                    batch.schema(),
                    vec![
                        vec![batch.slice(0, half)],
                        vec![batch.slice(half, batch.num_rows() - half)],
                    ],
                )
                .unwrap();
                ctx.register_table("ev", Arc::new(table)).unwrap();
                let input = ctx
                    .sql("SELECT profile_id, ts, message_id, page FROM ev WHERE profile_id IS NOT NULL")
                    .await
                    .unwrap();
                ctx.register_table("cut", cut(input, 30, buffers).await.unwrap())
                    .unwrap();
                let native =
                    pretty(&ctx, "SELECT * FROM cut ORDER BY profile_id, session_index").await;
                let window = pretty(&ctx, WINDOW_SQL).await;
                assert_eq!(native, window, "seed {seed}, buffers {buffers}");
                assert!(
                    native.lines().count() > 8,
                    "seed {seed} made too few sessions"
                );
            }
        }
    }

    #[tokio::test]
    async fn a_profile_id_identity_resolution_cannot_have_written_is_an_error_that_names_it() {
        let ctx = SessionContext::new();
        let input = ctx
            .sql(
                "SELECT profile_id, arrow_cast(1, 'Timestamp(Microsecond, None)') AS ts, \
                 'm' AS message_id, 0 AS page \
                 FROM (VALUES ('p_00000000000000ff'), ('customer-7')) AS t(profile_id)",
            )
            .await
            .unwrap();
        ctx.register_table("cut", cut(input, 30, usize::MAX).await.unwrap())
            .unwrap();
        let error = ctx
            .sql("SELECT * FROM cut")
            .await
            .unwrap()
            .collect()
            .await
            .unwrap_err()
            .to_string();
        assert!(error.contains("`customer-7`"), "{error}");
    }

    #[tokio::test]
    async fn a_time_column_that_is_not_a_timestamp_is_an_error_that_names_it() {
        let ctx = SessionContext::new();
        let input = ctx
            .sql("SELECT 'p_0000000000000001' AS profile_id, 'noon' AS ts, 'm' AS message_id, 0 AS page")
            .await
            .unwrap();
        let error = cut(input, 30, usize::MAX).await.err().unwrap().to_string();
        assert!(
            error.contains("`timestamp`") && error.contains("Utf8"),
            "{error}"
        );
    }

    /// Spill count and rows of a real hash repartition into 8 outputs, read one output after
    /// the other (as the cut reads its buckets), under `pool`.
    async fn repartition_read_in_turn(pool: Arc<dyn MemoryPool>) -> (usize, usize) {
        use datafusion::physical_plan::{repartition::RepartitionExec, ExecutionPlan};
        let schema = Arc::new(arrow::datatypes::Schema::new(vec![
            arrow::datatypes::Field::new("k", DataType::Int64, false),
            arrow::datatypes::Field::new("pad", DataType::Utf8, false),
        ]));
        let batches: Vec<RecordBatch> = (0..64i64)
            .map(|b| {
                let keys =
                    arrow::array::Int64Array::from_iter_values((0..512).map(|r| b * 512 + r));
                let pad =
                    arrow::array::StringArray::from_iter_values((0..512).map(|_| "x".repeat(64)));
                RecordBatch::try_new(schema.clone(), vec![Arc::new(keys), Arc::new(pad)]).unwrap()
            })
            .collect();
        let rows_in: usize = batches.iter().map(RecordBatch::num_rows).sum();
        let source = datafusion::datasource::memory::MemorySourceConfig::try_new_exec(
            &[batches],
            schema,
            None,
        )
        .unwrap();
        let key = datafusion::physical_expr::expressions::col("k", &source.schema()).unwrap();
        let repartition = Arc::new(
            RepartitionExec::try_new(
                source,
                datafusion::physical_plan::Partitioning::Hash(vec![key], 8),
            )
            .unwrap(),
        );
        let runtime = datafusion::execution::runtime_env::RuntimeEnvBuilder::new()
            .with_memory_pool(pool)
            .build_arc()
            .unwrap();
        let task = Arc::new(datafusion::execution::TaskContext::default().with_runtime(runtime));
        let mut rows = 0;
        for p in 0..8 {
            let stream = repartition.execute(p, task.clone()).unwrap();
            let out = datafusion::physical_plan::common::collect(stream)
                .await
                .unwrap();
            rows += out.iter().map(RecordBatch::num_rows).sum::<usize>();
        }
        assert_eq!(rows, rows_in, "every row comes out once");
        let spills = repartition
            .metrics()
            .and_then(|m| m.spill_count())
            .unwrap_or(0);
        (spills, rows)
    }

    #[tokio::test]
    async fn buffers_of_a_real_repartition_spill_past_the_cap_and_not_before() {
        use datafusion::execution::memory_pool::FairSpillPool;
        let fair = || -> Arc<dyn MemoryPool> { Arc::new(FairSpillPool::new(256 << 20)) };
        // Under the plain pool, 2 MiB of waiting outputs fit in 256 MiB: nothing spills.
        let (plain, _) = repartition_read_in_turn(fair()).await;
        assert_eq!(plain, 0);
        let (uncapped, _) =
            repartition_read_in_turn(Arc::new(BoundedBuffers::new(fair(), usize::MAX))).await;
        assert_eq!(uncapped, 0);
        // Capped at 64 KiB, the outputs waiting their turn spill. If DataFusion renamed the
        // repartition's memory consumers, BoundedBuffers would no longer see them: no spill.
        let (capped, _) =
            repartition_read_in_turn(Arc::new(BoundedBuffers::new(fair(), 64 << 10))).await;
        assert!(capped > 0, "no spill under a 64 KiB cap");
    }

    #[test]
    fn a_sort_keeps_its_share_of_the_limit_however_many_buffers_wait() {
        use datafusion::execution::memory_pool::FairSpillPool;
        let limit = 100 << 20;
        for buffers in [1, 32, 256] {
            let pool: Arc<dyn MemoryPool> = Arc::new(BoundedBuffers::new(
                Arc::new(FairSpillPool::new(limit)),
                8 << 20,
            ));
            let waiting: Vec<MemoryReservation> = (0..buffers)
                .map(|i| {
                    let r = MemoryConsumer::new(format!("RepartitionExec[{i}]"))
                        .with_can_spill(true)
                        .register(&pool);
                    r.try_grow(16 << 10).unwrap();
                    r
                })
                .collect();
            let held: usize = waiting.iter().map(MemoryReservation::size).sum();
            // The sort may take all the limit the waiting buffers leave.
            let sort = MemoryConsumer::new("SortExec[0]")
                .with_can_spill(true)
                .register(&pool);
            sort.try_grow(limit - held - (1 << 20)).unwrap_or_else(|e| {
                panic!("with {buffers} waiting buffers the sort got less than the rest: {e}")
            });
            // A buffer cannot pass the cap, and what it cannot hold it spills.
            let one = MemoryConsumer::new("RepartitionExec[x]").register(&pool);
            assert!(one.try_grow(8 << 20).is_err());
        }
    }
}
