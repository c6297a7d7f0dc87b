//! Running a project on an Apache Ballista cluster: one scheduler, many executors, and the
//! `tessera run` that drives them (docs/cluster.md).
//!
//! Ballista's servers build each job's session themselves, so Tessera's SQL functions, optimizer
//! rules and plan codecs must be installed in the scheduler and every executor, not only in the
//! driver: all three are this binary, and [`session_state`] is the one place that installs them
//! for the servers, [`client_context`] for the driver. Ballista's client replaces a session's
//! function lists with its own defaults, so the driver registers Tessera's functions after
//! making its context, not before (a test keeps that so).
//!
//! The driver keeps what only it can do: ingest, Delta reads and commits, tables held in its
//! memory, identity's union-find and the publish under the lease ([`planner`] draws the line).

pub mod codec;
pub mod planner;
pub mod serve;
mod stores;

use std::sync::Arc;

use ballista::prelude::SessionConfigExt;
use ballista_core::extension::SessionStateExt;
use ballista_core::planner::BallistaQueryPlanner;
use datafusion::execution::runtime_env::RuntimeEnv;
use datafusion::execution::{SessionState, SessionStateBuilder};
use datafusion::prelude::{SessionConfig, SessionContext};
use datafusion_proto::protobuf::LogicalPlanNode;

use crate::engine::Limits;
use crate::error::{Error, Result};

/// The port a scheduler listens on when an address names none (Ballista's own default).
pub const DEFAULT_SCHEDULER_PORT: u16 = 50050;

/// A scheduler's address, `df://HOST:PORT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Address {
    /// Host name or IP.
    pub host: String,
    /// gRPC port.
    pub port: u16,
}

impl Address {
    /// Parses `df://HOST[:PORT]` (also `HOST:PORT`); `key` names the flag or config key in
    /// errors.
    pub fn parse(text: &str, key: &str) -> Result<Address> {
        let bad = |why: &str| {
            Error::Usage(format!(
            "{key} = \"{text}\": {why}; write the scheduler's address as df://HOST:PORT, e.g. df://scheduler:{DEFAULT_SCHEDULER_PORT}"
        ))
        };
        let trimmed = text.trim();
        let rest = match trimmed.split_once("://") {
            Some(("df", rest)) => rest,
            Some((scheme, _)) => {
                return Err(bad(&format!("`{scheme}://` is not a scheduler address")))
            }
            None => trimmed,
        };
        let rest = rest.trim_end_matches('/');
        let (host, port) = match rest.rsplit_once(':') {
            Some((host, port)) => (
                host,
                port.parse::<u16>()
                    .map_err(|_| bad(&format!("`{port}` is not a port")))?,
            ),
            None => (rest, DEFAULT_SCHEDULER_PORT),
        };
        if host.is_empty() || host.contains('/') {
            return Err(bad("no host"));
        }
        Ok(Address {
            host: host.to_string(),
            port,
        })
    }

    /// The scheduler's gRPC URL.
    pub fn grpc_url(&self) -> String {
        format!("http://{}:{}", self.host, self.port)
    }
}

impl std::fmt::Display for Address {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "df://{}:{}", self.host, self.port)
    }
}

/// A session for the scheduler or an executor: Ballista's defaults, then Tessera's functions,
/// the rules whose plans can travel, and `runtime` (object stores that open S3 buckets from
/// the process's `AWS_*` variables).
pub fn session_state(
    config: SessionConfig,
    runtime: Arc<RuntimeEnv>,
) -> datafusion::error::Result<SessionState> {
    let mut config = with_codecs(config);
    // Whatever a job's settings say, as Ballista 55 runs a job to the end after losing an
    // executor only so (docs/cluster.md, "Failures"): its adaptive planner loses the rerun of
    // a stage after a failed shuffle fetch, and its static planner fails on a join whose
    // inputs it swaps after DataFusion gave the join a dynamic filter.
    config.options_mut().set(
        "datafusion.optimizer.enable_dynamic_filter_pushdown",
        "false",
    )?;
    config.options_mut().set(
        ballista_core::config::BALLISTA_ADAPTIVE_PLANNER_ENABLED,
        "false",
    )?;
    let base = ballista_core::utils::default_session_builder(config)?;
    let builder = SessionStateBuilder::new_from_existing(base).with_runtime_env(runtime);
    let state = crate::sql::add_portable_rules(builder).build();
    let mut ctx = SessionContext::new_with_state(state);
    crate::sql::register_functions(&mut ctx)?;
    Ok(ctx.state())
}

/// The functions an executor looks plan functions up in: those of [`session_state`].
pub fn function_registry() -> Result<ballista_core::registry::BallistaFunctionRegistry> {
    let state = session_state(
        ballista_core::utils::default_config_producer(),
        Arc::new(RuntimeEnv::default()),
    )?;
    Ok(ballista_core::registry::BallistaFunctionRegistry::from(
        &state,
    ))
}

/// `config` with Tessera's plan codecs.
fn with_codecs(config: SessionConfig) -> SessionConfig {
    config
        .with_ballista_logical_extension_codec(Arc::new(codec::LogicalCodec::default()))
        .with_ballista_physical_extension_codec(Arc::new(codec::PhysicalCodec::default()))
}

/// The driver's context for a run on the cluster at `address`: the single-machine context
/// (settings, functions, rules, Delta planner, memory limits) whose queries go to the cluster
/// when the executors can run them ([`planner::SplitPlanner`]). Scans of URLs starting with
/// one of `driver_only` stay on the driver. `partitions` (default: the driver's cores) is how
/// many partitions the cluster's jobs are planned with.
pub fn client_context(
    address: &Address,
    limits: &Limits,
    driver_only: Vec<String>,
    partitions: Option<usize>,
) -> Result<(SessionContext, Arc<planner::SplitPlanner>)> {
    let local = crate::engine::new_context_with(limits)?;
    let state = local.state();
    // Ballista's config extension added before upgrading keeps the upgrade from applying its
    // "restricted" DataFusion settings (no round-robin repartitioning, its join thresholds)
    // to the queries the driver runs itself, which then plan exactly as on one machine. The
    // scheduler applies what it needs to the queries it plans.
    let config = state.config().clone();
    let extension = config.ballista_config();
    let config = with_codecs(config.with_option_extension(extension)).upgrade_for_ballista();
    let cluster = BallistaQueryPlanner::<LogicalPlanNode>::with_extension(
        address.grpc_url(),
        config.ballista_config(),
        Arc::new(codec::LogicalCodec::default()),
    );
    let registry = function_registry()?;
    let functions = registry
        .scalar_functions
        .keys()
        .chain(registry.aggregate_functions.keys())
        .chain(registry.window_functions.keys())
        .map(|name| name.to_lowercase())
        .collect();
    let split = Arc::new(
        planner::SplitPlanner::new(
            Arc::new(cluster),
            deltalake::delta_datafusion::planner::DeltaPlanner::new(),
            driver_only,
            limits
                .spill_dir
                .as_ref()
                .map(|dir| dir.to_string_lossy().into_owned()),
            functions,
            address.to_string(),
        )
        .with_partitions(partitions)
        .with_time_limit(limits.query_timeout, limits.query_timeout_text.clone()),
    );
    let config = config.with_ballista_query_planner(split.clone());
    let state = SessionStateBuilder::new_from_existing(state)
        .with_config(config)
        .build()
        .upgrade_for_ballista(address.grpc_url())?;
    let mut ctx = SessionContext::new_with_state(state);
    // Upgrading for Ballista replaced the function lists with Ballista's defaults.
    crate::sql::register_functions(&mut ctx)?;
    Ok((ctx, split))
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Array, AsArray, RecordBatch, StringArray};
    use ballista::prelude::SessionContextExt;

    const TOP: &str = "SELECT as_of() AS at, most_frequent(x) AS top FROM t";

    fn free_port() -> u16 {
        loop {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            if std::net::TcpListener::bind(("127.0.0.1", port + 1)).is_ok() {
                return port;
            }
        }
    }

    async fn listening(port: u16) {
        for _ in 0..600 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        panic!("nothing listens on {port}");
    }

    /// A Parquet folder of one string column `x`: b twice, a and c once.
    fn values() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let batch = RecordBatch::try_from_iter([(
            "x",
            std::sync::Arc::new(StringArray::from(vec!["a", "b", "c", "b"])) as _,
        )])
        .unwrap();
        let file = std::fs::File::create(dir.path().join("part-0.parquet")).unwrap();
        let mut writer = parquet::arrow::ArrowWriter::try_new(file, batch.schema(), None).unwrap();
        writer.write(&batch).unwrap();
        writer.close().unwrap();
        dir
    }

    /// Ballista's client replaces a session's function lists with its defaults: Tessera's
    /// functions registered before are gone. If this starts to pass, Ballista keeps them, and
    /// registering them again in [`client_context`] is no longer needed.
    #[tokio::test]
    async fn ballista_drops_functions_registered_before_its_upgrade() {
        let mut ctx = SessionContext::new();
        crate::sql::register_functions(&mut ctx).unwrap();
        let sql = "SELECT most_frequent(x), as_of() FROM (VALUES ('a')) v(x)";
        ctx.sql(sql).await.expect("plans before the upgrade");
        let remote = SessionContext::remote_with_state("df://127.0.0.1:1", ctx.state())
            .await
            .unwrap();
        let e = remote.sql(sql).await.expect_err("the functions are gone");
        assert!(e.to_string().contains("most_frequent"), "{e}");
    }

    /// The driver's context, a scheduler and an executor in this process: a query with
    /// Tessera's functions runs on the cluster, and `as_of()` is the driver's time, not the
    /// time the servers started.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn tessera_functions_run_on_the_cluster_with_the_drivers_as_of() {
        let port = free_port();
        let scheduler = tokio::spawn(serve::scheduler(serve::SchedulerOptions {
            bind: format!("127.0.0.1:{port}").parse().unwrap(),
            executor_timeout_secs: 30,
        }));
        listening(port).await;
        let flight = free_port();
        let work = tempfile::tempdir().unwrap();
        let executor = tokio::spawn(serve::executor(serve::ExecutorOptions {
            scheduler: Address::parse(&format!("127.0.0.1:{port}"), "test").unwrap(),
            bind: format!("127.0.0.1:{flight}").parse().unwrap(),
            external_host: None,
            memory_limit: Some(256 << 20),
            tasks: Some(2),
            work_dir: Some(work.path().to_path_buf()),
        }));
        listening(flight).await;

        let limits = Limits::from_config(&Default::default()).unwrap();
        let address = Address::parse(&format!("df://127.0.0.1:{port}"), "test").unwrap();
        let (ctx, split) = client_context(&address, &limits, Vec::new(), None).unwrap();
        let at = chrono::DateTime::parse_from_rfc3339("2025-06-30T08:00:00Z")
            .unwrap()
            .to_utc();
        ctx.register_udf(crate::sql::functions::as_of(at));
        let dir = values();
        ctx.register_parquet(
            "t",
            &format!("{}/", dir.path().display()),
            Default::default(),
        )
        .await
        .unwrap();
        let batches = ctx.sql(TOP).await.unwrap().collect().await.unwrap();
        assert_eq!(split.sent(), 1, "the query went to the cluster");
        let batch = &batches[0];
        let top = batch.column(1).as_string::<i32>();
        assert_eq!(top.value(0), "b");
        let time = batch
            .column(0)
            .as_primitive::<arrow::datatypes::TimestampMicrosecondType>();
        assert!(time.is_valid(0));
        assert_eq!(time.value(0), at.timestamp_micros());
        scheduler.abort();
        executor.abort();
    }

    #[test]
    fn addresses() {
        assert_eq!(
            Address::parse("df://10.0.0.5:50050", "--cluster").unwrap(),
            Address {
                host: "10.0.0.5".into(),
                port: 50050
            }
        );
        assert_eq!(
            Address::parse("scheduler", "run.cluster").unwrap().port,
            DEFAULT_SCHEDULER_PORT
        );
        for bad in ["http://x:1", "df://:1", "df://x:port", ""] {
            let e = Address::parse(bad, "run.cluster").unwrap_err().to_string();
            assert!(
                e.contains("run.cluster") && e.contains("df://HOST:PORT"),
                "{e}"
            );
        }
    }
}
