//! `tessera cluster scheduler` and `tessera cluster executor`: Ballista's servers with
//! Tessera's functions, rules, codecs and object stores installed.

use std::net::SocketAddr;
use std::sync::Arc;

use ballista_core::config::TaskSchedulingPolicy;
use ballista_executor::executor_process::{start_executor_process, ExecutorProcessConfig};
use ballista_scheduler::cluster::BallistaCluster;
use ballista_scheduler::config::SchedulerConfig;
use ballista_scheduler::scheduler_process::start_server;
use datafusion::execution::runtime_env::{RuntimeEnv, RuntimeEnvBuilder};

use crate::cluster::{codec, session_state, stores::Stores, Address};
use crate::error::{Error, Result};

/// Executors ask the scheduler for work (pull) instead of the scheduler handing it out (push,
/// Ballista's default). Ballista 55's push scheduling counts an executor's free task slots on
/// the scheduler and loses them when a task of a stage rolled back after another executor died
/// reports in: the surviving executor then looks busy for ever and the job never ends. Pulling
/// executors count their own slots.
const SCHEDULING: TaskSchedulingPolicy = TaskSchedulingPolicy::PullStaged;

/// How a scheduler runs.
#[derive(Debug, Clone)]
pub struct SchedulerOptions {
    /// Where it listens for the driver and the executors.
    pub bind: SocketAddr,
    /// An executor silent (no heartbeat) for this long is taken as dead and its tasks run
    /// elsewhere.
    pub executor_timeout_secs: u64,
}

/// How an executor runs.
#[derive(Debug, Clone)]
pub struct ExecutorOptions {
    /// The scheduler to register with.
    pub scheduler: Address,
    /// Where it serves shuffle data (Arrow Flight); the next port serves the scheduler's calls.
    pub bind: SocketAddr,
    /// The host name other executors and the driver reach it by (default: the bind address).
    pub external_host: Option<String>,
    /// Bytes its queries may hold before spilling; `None`: 70% of the machine's memory.
    pub memory_limit: Option<u64>,
    /// Tasks it runs at once (default: its cores).
    pub tasks: Option<usize>,
    /// Where shuffle and spill files go (default: a new temporary folder).
    pub work_dir: Option<std::path::PathBuf>,
}

fn server_error(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Usage(format!("the cluster {what} stopped: {e}"))
}

/// Runs a scheduler until the process is stopped.
pub async fn scheduler(options: SchedulerOptions) -> Result<()> {
    let runtime: Arc<RuntimeEnv> = RuntimeEnvBuilder::new()
        .with_object_store_registry(Arc::new(Stores::default()))
        .build_arc()?;
    let config = SchedulerConfig {
        bind_host: options.bind.ip().to_string(),
        bind_port: options.bind.port(),
        external_host: options.bind.ip().to_string(),
        executor_timeout_seconds: options.executor_timeout_secs,
        no_executors_grace_period_seconds: options.executor_timeout_secs,
        expire_dead_executor_interval_seconds: (options.executor_timeout_secs / 2).clamp(1, 15),
        scheduling_policy: SCHEDULING,
        override_session_builder: Some(Arc::new(move |session_config| {
            session_state(session_config, runtime.clone())
        })),
        override_logical_codec: Some(Arc::new(codec::LogicalCodec::default())),
        override_physical_codec: Some(Arc::new(codec::PhysicalCodec::default())),
        ..Default::default()
    };
    let cluster = BallistaCluster::new_from_config(&config)
        .await
        .map_err(|e| server_error("scheduler", e))?;
    tracing::info!(bind = %options.bind, "cluster scheduler starting");
    start_server(cluster, options.bind, Arc::new(config))
        .await
        .map_err(|e| server_error("scheduler", e))
}

/// Runs an executor until the process is stopped.
pub async fn executor(options: ExecutorOptions) -> Result<()> {
    let stores = Arc::new(Stores::default());
    let grpc_port = options.bind.port().checked_add(1).ok_or_else(|| {
        Error::Usage(format!(
            "--bind {}: the executor also needs the next port; choose a lower one",
            options.bind
        ))
    })?;
    let external_host = options
        .external_host
        .clone()
        .or_else(|| (!options.bind.ip().is_unspecified()).then(|| options.bind.ip().to_string()));
    let temp = options.work_dir.clone();
    let defaults = ExecutorProcessConfig::default();
    let config = ExecutorProcessConfig {
        bind_host: options.bind.ip().to_string(),
        port: options.bind.port(),
        grpc_port,
        external_host,
        scheduler_host: options.scheduler.host.clone(),
        scheduler_port: options.scheduler.port,
        // Wait for a scheduler that starts after its executors (a compose file starts both).
        scheduler_connect_timeout_seconds: 60,
        // Often enough that a scheduler with a short --executor-timeout keeps live executors.
        executor_heartbeat_interval_seconds: 2,
        task_scheduling_policy: SCHEDULING,
        vcores: options.tasks.map_or(defaults.vcores, |tasks| tasks.max(1)),
        memory_pool_size: options.memory_limit,
        work_dir: options
            .work_dir
            .as_ref()
            .map(|dir| dir.to_string_lossy().into_owned()),
        override_runtime_producer: Some(Arc::new(move |_| {
            let mut builder = RuntimeEnvBuilder::new().with_object_store_registry(stores.clone());
            if let Some(dir) = &temp {
                builder = builder.with_temp_file_path(dir.clone());
            }
            builder.build_arc()
        })),
        override_function_registry: Some(Arc::new(crate::cluster::function_registry()?)),
        override_logical_codec: Some(Arc::new(codec::LogicalCodec::default())),
        override_physical_codec: Some(Arc::new(codec::PhysicalCodec::default())),
        ..defaults
    };
    tracing::info!(bind = %options.bind, scheduler = %options.scheduler, "cluster executor starting");
    start_executor_process(Arc::new(config))
        .await
        .map_err(|e| server_error("executor", e))
}
