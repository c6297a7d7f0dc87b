//! Which queries of a run go to the cluster and which the driver runs itself.
//!
//! A query can run on the executors only if every table it reads can be named in a plan and
//! read by another machine: Parquet folders on a store the executors can reach (DataFusion's
//! listing tables). Tables a run holds in the driver's memory, Delta tables (delta-rs scans
//! carry the log the driver read), ingest's file chain and writes (Delta commits, Parquet
//! copies, all made by the driver under its lease; only a copy into the shared scratch
//! folder, which no reader sees, may go) cannot; a query touching any of them is
//! planned here with the same local planner a single-machine run uses. So is a query calling a
//! function the servers do not have: a stage's own functions close over the driver's state
//! (the event → profile lookup is one). So every query gets
//! the same answer on a cluster as off one; what differs is only where its work is done, and
//! [`SplitPlanner::sent`] counts how many went to the cluster.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use datafusion::catalog::Session;
use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
use datafusion::datasource::listing::ListingTable;
use datafusion::datasource::source_as_provider;
use datafusion::error::Result;
use datafusion::execution::context::QueryPlanner;
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::logical_expr::{Expr, LogicalPlan, WindowFunctionDefinition};
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::{DisplayAs, DisplayFormatType, ExecutionPlan, PlanProperties};
use futures::{StreamExt, TryStreamExt};

/// A query planner that sends what executors can run to the cluster and plans the rest
/// locally.
#[derive(Debug)]
pub struct SplitPlanner {
    cluster: Arc<dyn QueryPlanner + Send + Sync>,
    local: Arc<dyn QueryPlanner + Send + Sync>,
    /// URL prefixes only the driver can read (its scratch folder): a scan under one stays here.
    driver_only: Vec<String>,
    /// The folder the driver and every executor mount at the same path (`run.spill_dir`):
    /// a Parquet `COPY` into it may be written by the executors (see
    /// [`SplitPlanner::runs_on_cluster`]).
    shared_scratch: Option<String>,
    /// The functions the scheduler and executors have, by name (lowercase).
    functions: std::collections::HashSet<String>,
    /// The scheduler, as the user wrote it, for errors.
    address: String,
    /// Partitions of the cluster's jobs (`run.cluster_partitions`); `None`: the driver's.
    partitions: Option<usize>,
    /// Longest a job may take to finish and hand back its results, and that limit as the user
    /// wrote it (`run.query_timeout`).
    time_limit: (std::time::Duration, String),
    sent: AtomicU64,
    kept: AtomicU64,
}

impl SplitPlanner {
    /// A planner sending to `cluster` what it can and planning the rest with `local`.
    pub fn new(
        cluster: Arc<dyn QueryPlanner + Send + Sync>,
        local: Arc<dyn QueryPlanner + Send + Sync>,
        driver_only: Vec<String>,
        shared_scratch: Option<String>,
        functions: std::collections::HashSet<String>,
        address: String,
    ) -> SplitPlanner {
        SplitPlanner {
            cluster,
            local,
            driver_only,
            shared_scratch,
            functions,
            address,
            partitions: None,
            time_limit: (std::time::Duration::MAX, "none".into()),
            sent: AtomicU64::new(0),
            kept: AtomicU64::new(0),
        }
    }

    /// The planner with the cluster's jobs planned into `partitions` partitions (`None`: as
    /// many as the driver's own queries).
    pub fn with_partitions(mut self, partitions: Option<usize>) -> SplitPlanner {
        self.partitions = partitions;
        self
    }

    /// The planner with each of the cluster's jobs failed when it has not finished within
    /// `limit` (`text`: the limit as the user wrote it, for the error).
    pub fn with_time_limit(mut self, limit: std::time::Duration, text: String) -> SplitPlanner {
        self.time_limit = (limit, text);
        self
    }

    /// How many queries went to the cluster.
    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    /// How many queries the driver planned itself.
    pub fn kept(&self) -> u64 {
        self.kept.load(Ordering::Relaxed)
    }

    /// True when every table `plan` reads is a Parquet listing outside the driver-only
    /// prefixes, it reads at least one (a query of literals is not worth a job), every
    /// function it calls is one the servers have, and it aggregates, joins or windows.
    ///
    /// A plain scan (with filters and projections) stays on the driver: its rows would all
    /// come back through the driver anyway, so the cluster only adds the trip. Ingest's read
    /// of the new event files is such a scan; sent to one local executor it made the event
    /// history stage 2.3x slower at 1M events.
    ///
    /// A `COPY` of such a query into the shared scratch folder goes too, and the executors
    /// write its files: scratch files are the run's own, never a table a reader sees, so
    /// no commit or lease is involved (identity's SQL rounds write their edges this way).
    pub fn runs_on_cluster(&self, plan: &LogicalPlan) -> Result<bool> {
        if let LogicalPlan::Copy(copy) = plan {
            let shared = self.shared_scratch.as_ref().is_some_and(|dir| {
                let dir = format!("{}/", dir.trim_end_matches('/'));
                copy.output_url.starts_with(&dir)
            });
            return Ok(shared && self.runs_on_cluster(&copy.input)?);
        }
        if !matches!(
            plan,
            LogicalPlan::Projection(_)
                | LogicalPlan::Filter(_)
                | LogicalPlan::Window(_)
                | LogicalPlan::Aggregate(_)
                | LogicalPlan::Sort(_)
                | LogicalPlan::Join(_)
                | LogicalPlan::Repartition(_)
                | LogicalPlan::Union(_)
                | LogicalPlan::TableScan(_)
                | LogicalPlan::SubqueryAlias(_)
                | LogicalPlan::Limit(_)
                | LogicalPlan::Distinct(_)
        ) {
            return Ok(false);
        }
        let mut scans = 0;
        let mut portable = true;
        let mut reduces = false;
        plan.apply_with_subqueries(|node| {
            match node {
                LogicalPlan::TableScan(scan) => {
                    scans += 1;
                    let provider = source_as_provider(&scan.source)?;
                    let readable = provider
                        .downcast_ref::<ListingTable>()
                        .is_some_and(|listing| {
                            listing.table_paths().iter().all(|path| {
                                let url = path.as_str();
                                !self.driver_only.iter().any(|p| url.starts_with(p.as_str()))
                            })
                        });
                    if !readable {
                        portable = false;
                    }
                }
                LogicalPlan::Aggregate(_)
                | LogicalPlan::Join(_)
                | LogicalPlan::Window(_)
                | LogicalPlan::Distinct(_) => reduces = true,
                LogicalPlan::Extension(_)
                | LogicalPlan::Dml(_)
                | LogicalPlan::Ddl(_)
                | LogicalPlan::Copy(_)
                | LogicalPlan::Statement(_)
                | LogicalPlan::Explain(_)
                | LogicalPlan::Analyze(_)
                | LogicalPlan::DescribeTable(_)
                | LogicalPlan::RecursiveQuery(_) => portable = false,
                _ => {}
            }
            if portable {
                node.apply_expressions(|expr| {
                    expr.apply(|e| {
                        if let Some(name) = function_name(e) {
                            if !self.functions.contains(&name.to_lowercase()) {
                                tracing::debug!(function = name, "query kept on the driver");
                                portable = false;
                                return Ok(TreeNodeRecursion::Stop);
                            }
                        }
                        Ok(TreeNodeRecursion::Continue)
                    })
                })?;
            }
            Ok(if portable {
                TreeNodeRecursion::Continue
            } else {
                TreeNodeRecursion::Stop
            })
        })?;
        Ok(portable && scans > 0 && reduces)
    }
}

/// The name of the function `expr` calls, if it calls one.
fn function_name(expr: &Expr) -> Option<&str> {
    match expr {
        Expr::ScalarFunction(f) => Some(f.func.name()),
        Expr::AggregateFunction(f) => Some(f.func.name()),
        Expr::WindowFunction(w) => Some(match &w.fun {
            WindowFunctionDefinition::AggregateUDF(f) => f.name(),
            WindowFunctionDefinition::WindowUDF(f) => f.name(),
        }),
        _ => None,
    }
}

#[async_trait]
impl QueryPlanner for SplitPlanner {
    async fn create_physical_plan(
        &self,
        logical_plan: &LogicalPlan,
        session: &dyn Session,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        if self.runs_on_cluster(logical_plan)? {
            self.sent.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(plan = %logical_plan.display_indent(), "query sent to the cluster");
            let plan = self
                .cluster
                .create_physical_plan(logical_plan, session)
                .await
                .map_err(|e| on_cluster(&self.address, e))?;
            // A copy's files are written by the executors: sending it again must start over.
            let copy_target = match logical_plan {
                LogicalPlan::Copy(copy) => Some(copy.output_url.clone()),
                _ => None,
            };
            Ok(Arc::new(OnCluster {
                inner: plan,
                address: self.address.clone(),
                copy_target,
                partitions: self.partitions,
                time_limit: self.time_limit.clone(),
            }))
        } else {
            self.kept.fetch_add(1, Ordering::Relaxed);
            self.local.create_physical_plan(logical_plan, session).await
        }
    }
}

/// A query engine error from the cluster, saying so and what to do: the scheduler keeps a
/// job's state in its memory, so a lost scheduler (or every executor) fails the query, and
/// with it the run, which publishes nothing.
fn on_cluster(
    address: &str,
    e: datafusion::error::DataFusionError,
) -> datafusion::error::DataFusionError {
    e.context(format!(
        "a query sent to the cluster at {address} failed; check that its scheduler \
         (`tessera cluster scheduler`) and executors (`tessera cluster executor`) are running, \
         then run again (a failed run publishes nothing)"
    ))
}

/// The cluster's plan for one query, whose errors say they came from the cluster, sent again
/// when an executor holding its results is lost before the driver has read them.
#[derive(Debug, Clone)]
struct OnCluster {
    inner: Arc<dyn ExecutionPlan>,
    address: String,
    /// The folder a `COPY` query writes (in the shared scratch folder), emptied before the
    /// query is sent again.
    copy_target: Option<String>,
    /// Partitions the scheduler plans the job into; `None`: the driver's setting.
    partitions: Option<usize>,
    /// See [`SplitPlanner::with_time_limit`].
    time_limit: (std::time::Duration, String),
}

/// How many times a query is sent before its failure is the run's.
const ATTEMPTS: u32 = 3;

/// Results held back (and so safe to fetch again) before they are passed on.
const HELD_BYTES: usize = 64 << 20;

/// True when `e` is a failure to reach a server (an executor that died holding a finished
/// job's results, or the scheduler), not an error of the query itself: sending the query
/// again may succeed, and cannot give another answer.
fn unreachable_server(e: &datafusion::error::DataFusionError) -> bool {
    let text = e.to_string();
    [
        "GrpcConnectionError",
        "FetchFailed",
        "Connection refused",
        "ConnectionRefused",
        "transport error",
        "Unavailable",
    ]
    .iter()
    .any(|word| text.contains(word))
}

/// Runs a query by calling `send` (which submits a job) and returns its results. The results
/// are held until the job's stream ends or they pass `held_bytes`; a server that cannot be
/// reached before then ([`unreachable_server`]) costs a new job, up to [`ATTEMPTS`] in all,
/// with `before_again` run first (a copy's folder is emptied). Once results are passed on, a
/// failure is the query's: the rows already passed on cannot be taken back, and the run fails
/// and publishes nothing, as any failed run.
async fn with_resends(
    send: impl Fn() -> Result<SendableRecordBatchStream>,
    before_again: impl Fn() -> Result<()>,
    pause: std::time::Duration,
    held_bytes: usize,
    time_limit: (std::time::Duration, String),
) -> Result<futures::stream::BoxStream<'static, Result<arrow::array::RecordBatch>>> {
    let mut attempt = 1;
    loop {
        let mut stream = send()?;
        let mut held = Vec::new();
        let mut bytes = 0;
        let read = async {
            loop {
                match stream.next().await {
                    None => return Ok(false),
                    Some(Ok(batch)) => {
                        bytes += batch.get_array_memory_size();
                        held.push(batch);
                        if bytes > held_bytes {
                            return Ok(true);
                        }
                    }
                    Some(Err(e)) => return Err(e),
                }
            }
        };
        let failure = match tokio::time::timeout(time_limit.0, read).await {
            Ok(Ok(more)) => {
                let held = futures::stream::iter(held.into_iter().map(Ok));
                return Ok(if more {
                    held.chain(stream).boxed()
                } else {
                    held.boxed()
                });
            }
            Ok(Err(e)) => e,
            // Dropping the stream stops waiting for the job.
            Err(_) => {
                return Err(datafusion::error::DataFusionError::Execution(format!(
                    "the cluster did not finish the query within {}; check that {}, or raise \
                     the limit",
                    time_limit.1,
                    crate::engine::EXECUTORS_TO_CHECK
                )))
            }
        };
        if attempt >= ATTEMPTS || !unreachable_server(&failure) {
            return Err(failure);
        }
        tracing::warn!(
            attempt,
            error = %failure,
            "a query's results on the cluster could not be read; sending it again"
        );
        before_again()?;
        tokio::time::sleep(pause * attempt).await;
        attempt += 1;
    }
}

impl DisplayAs for OnCluster {
    fn fmt_as(&self, _: DisplayFormatType, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        write!(f, "OnCluster: {}", self.address)
    }
}

impl ExecutionPlan for OnCluster {
    fn name(&self) -> &str {
        "OnCluster"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        self.inner.properties()
    }

    fn apply_expressions(
        &self,
        _f: &mut dyn FnMut(
            &Arc<dyn datafusion::physical_plan::PhysicalExpr>,
        ) -> Result<TreeNodeRecursion>,
    ) -> Result<TreeNodeRecursion> {
        Ok(TreeNodeRecursion::Continue)
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![&self.inner]
    }

    fn with_new_children(
        self: Arc<Self>,
        mut children: Vec<Arc<dyn ExecutionPlan>>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        match children.pop() {
            Some(inner) if children.is_empty() => Ok(Arc::new(OnCluster {
                inner,
                ..self.as_ref().clone()
            })),
            _ => Err(datafusion::error::DataFusionError::Internal(
                "OnCluster takes one child".into(),
            )),
        }
    }

    fn execute(
        &self,
        partition: usize,
        context: Arc<TaskContext>,
    ) -> Result<SendableRecordBatchStream> {
        let address = self.address.clone();
        let context = match self.partitions {
            Some(n) => with_partitions(&context, n)?,
            None => context,
        };
        let inner = self.inner.clone();
        let target = self.copy_target.clone();
        let time_limit = self.time_limit.clone();
        let results = with_resends(
            move || inner.execute(partition, context.clone()),
            move || empty_folder(target.as_deref()),
            std::time::Duration::from_secs(1),
            HELD_BYTES,
            time_limit,
        );
        let stream = futures::stream::once(results).try_flatten();
        Ok(Box::pin(RecordBatchStreamAdapter::new(
            self.inner.schema(),
            stream.map(move |batch| batch.map_err(|e| on_cluster(&address, e))),
        )))
    }
}

/// `context` with `n` target partitions: a job's settings travel with it, and the scheduler
/// plans its stages with them.
fn with_partitions(context: &TaskContext, n: usize) -> Result<Arc<TaskContext>> {
    let mut config = context.session_config().clone();
    config
        .options_mut()
        .set("datafusion.execution.target_partitions", &n.to_string())?;
    Ok(Arc::new(TaskContext::new(
        context.task_id(),
        context.session_id(),
        config,
        context.scalar_functions().clone(),
        context.higher_order_functions().clone(),
        context.aggregate_functions().clone(),
        context.window_functions().clone(),
        context.runtime_env(),
    )))
}

/// Removes the folder at `path` (a copy's target in the shared scratch folder) and all in it.
fn empty_folder(path: Option<&str>) -> Result<()> {
    let Some(path) = path else { return Ok(()) };
    let path = path.strip_prefix("file://").unwrap_or(path);
    match std::fs::remove_dir_all(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(datafusion::error::DataFusionError::External(
                format!(
                    "{path}: cannot empty it before sending its query to the cluster again: {e}"
                )
                .into(),
            ))
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::datasource::file_format::format_as_file_type;
    use datafusion::datasource::file_format::parquet::ParquetFormatFactory;
    use datafusion::logical_expr::LogicalPlanBuilder;
    use datafusion::prelude::SessionContext;

    /// What `send` gives on each call: a failure (its text) or rows.
    fn job(
        answers: Vec<std::result::Result<Vec<i64>, &'static str>>,
    ) -> (
        impl Fn() -> Result<SendableRecordBatchStream>,
        Arc<std::sync::atomic::AtomicUsize>,
    ) {
        let sent = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = sent.clone();
        let send = move || {
            let n = count.fetch_add(1, Ordering::SeqCst);
            let schema = Arc::new(arrow::datatypes::Schema::new(vec![
                arrow::datatypes::Field::new("u", arrow::datatypes::DataType::Int64, false),
            ]));
            let batch = |rows: &[i64]| {
                arrow::array::RecordBatch::try_new(
                    schema.clone(),
                    vec![Arc::new(arrow::array::Int64Array::from(rows.to_vec()))],
                )
                .unwrap()
            };
            // Rows first, then the failure (a job whose fetch dies part way).
            let items: Vec<Result<arrow::array::RecordBatch>> = match &answers[n] {
                Ok(rows) => vec![Ok(batch(rows))],
                Err(text) => vec![
                    Ok(batch(&[0])),
                    Err(datafusion::error::DataFusionError::Execution(
                        text.to_string(),
                    )),
                ],
            };
            let stream: SendableRecordBatchStream = Box::pin(RecordBatchStreamAdapter::new(
                schema.clone(),
                futures::stream::iter(items),
            ));
            Ok(stream)
        };
        (send, sent)
    }

    fn no_limit() -> (std::time::Duration, String) {
        (std::time::Duration::MAX, String::new())
    }

    const REFUSED: &str = "GrpcConnectionError(\"Error connecting to Ballista scheduler or executor at http://127.0.0.1:9: Connection refused\")";

    async fn rows(
        stream: futures::stream::BoxStream<'static, Result<arrow::array::RecordBatch>>,
    ) -> Result<Vec<i64>> {
        let batches: Vec<_> = stream.try_collect().await?;
        Ok(batches
            .iter()
            .flat_map(|b| {
                b.column(0)
                    .as_any()
                    .downcast_ref::<arrow::array::Int64Array>()
                    .unwrap()
                    .values()
                    .to_vec()
            })
            .collect())
    }

    /// [`with_resends`] at once (no pause between attempts, no time limit), results held up to
    /// `held_bytes`, nothing to do before sending again.
    async fn resend(
        send: impl Fn() -> Result<SendableRecordBatchStream>,
        held_bytes: usize,
    ) -> Result<futures::stream::BoxStream<'static, Result<arrow::array::RecordBatch>>> {
        with_resends(
            send,
            || Ok(()),
            std::time::Duration::ZERO,
            held_bytes,
            no_limit(),
        )
        .await
    }

    /// An executor lost with a finished job's results: the job is sent again, the copy's
    /// folder is emptied first, and the rows are the new job's alone (none of the lost
    /// attempt's rows come through twice).
    #[tokio::test]
    async fn a_query_whose_results_are_lost_with_an_executor_is_sent_again() {
        let scratch = tempfile::tempdir().unwrap();
        let target = scratch.path().join("round-1");
        std::fs::create_dir_all(&target).unwrap();
        std::fs::write(target.join("part-0.parquet"), b"first attempt").unwrap();
        let folder = format!("{}/", target.display());
        let (send, sent) = job(vec![Err(REFUSED), Ok(vec![1, 2, 3])]);
        let stream = with_resends(
            send,
            || empty_folder(Some(&folder)),
            std::time::Duration::ZERO,
            HELD_BYTES,
            no_limit(),
        )
        .await
        .unwrap();
        assert_eq!(rows(stream).await.unwrap(), vec![1, 2, 3]);
        assert_eq!(sent.load(Ordering::SeqCst), 2);
        assert!(
            !target.exists(),
            "the first attempt's files are still there"
        );
    }

    /// A query's own error is not sent again; a server that stays unreachable is tried
    /// [`ATTEMPTS`] times; a failure after rows were passed on is the query's.
    #[tokio::test]
    async fn only_unread_results_of_unreachable_servers_are_fetched_again() {
        let (send, sent) = job(vec![Err("Execution error: division by zero")]);
        let e = resend(send, HELD_BYTES).await.err().unwrap();
        assert!(e.to_string().contains("division by zero"), "{e}");
        assert_eq!(sent.load(Ordering::SeqCst), 1);

        let (send, sent) = job(vec![Err(REFUSED); ATTEMPTS as usize + 1]);
        let e = resend(send, HELD_BYTES).await.err().unwrap();
        assert!(unreachable_server(&e), "{e}");
        assert_eq!(sent.load(Ordering::SeqCst), ATTEMPTS as usize);

        // Nothing held back: the first rows are passed on, so the failure is the query's.
        let (send, sent) = job(vec![Err(REFUSED), Ok(vec![1])]);
        let stream = resend(send, 0).await.unwrap();
        assert!(rows(stream).await.is_err());
        assert_eq!(sent.load(Ordering::SeqCst), 1);
    }

    /// A copy goes to the cluster only into the shared scratch folder (whose files no reader
    /// sees) and only when its query would go: an output table's files stay the driver's.
    #[tokio::test]
    async fn only_copies_into_the_shared_scratch_folder_go_to_the_cluster() {
        let scratch = tempfile::tempdir().unwrap();
        let input = scratch.path().join("edges");
        std::fs::create_dir_all(&input).unwrap();
        let batch = arrow::array::RecordBatch::try_from_iter([(
            "u",
            Arc::new(arrow::array::Int64Array::from(vec![1, 2, 2])) as _,
        )])
        .unwrap();
        let file = std::fs::File::create(input.join("part-0.parquet")).unwrap();
        let mut writer = parquet::arrow::ArrowWriter::try_new(file, batch.schema(), None).unwrap();
        writer.write(&batch).unwrap();
        writer.close().unwrap();
        let ctx = SessionContext::new();
        ctx.register_parquet("t", &format!("{}/", input.display()), Default::default())
            .await
            .unwrap();
        let local = || -> Arc<dyn QueryPlanner + Send + Sync> {
            deltalake::delta_datafusion::planner::DeltaPlanner::new()
        };
        let functions = ["count".to_string()].into_iter().collect();
        let dir = scratch.path().to_string_lossy().into_owned();
        let split = SplitPlanner::new(
            local(),
            local(),
            Vec::new(),
            Some(dir.clone()),
            functions,
            "df://x:1".into(),
        );
        let copy = |sql: &'static str, to: String| {
            let ctx = &ctx;
            async move {
                let plan = ctx.sql(sql).await.unwrap().into_unoptimized_plan();
                let file_type = format_as_file_type(Arc::new(ParquetFormatFactory::new()));
                LogicalPlanBuilder::copy_to(plan, to, file_type, Default::default(), Vec::new())
                    .unwrap()
                    .build()
                    .unwrap()
            }
        };
        let grouped = "SELECT u, count(*) AS n FROM t GROUP BY u";
        assert!(split
            .runs_on_cluster(&copy(grouped, format!("{dir}/round-1/")).await)
            .unwrap());
        // Elsewhere (an output table), beside the folder, or a plain scan: the driver's.
        for plan in [
            copy(grouped, "/elsewhere/out/".into()).await,
            copy(grouped, format!("{dir}-other/round-1/")).await,
            copy("SELECT u FROM t", format!("{dir}/round-1/")).await,
        ] {
            assert!(
                !split.runs_on_cluster(&plan).unwrap(),
                "{}",
                plan.display_indent()
            );
        }
    }
}
