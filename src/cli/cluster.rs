//! `tessera cluster scheduler|executor` and `tessera run --cluster`: the command-line side of
//! running on a Ballista cluster (the library side is [`crate::cluster`]).

use std::net::{SocketAddr, ToSocketAddrs};
use std::time::Duration;

use clap::Subcommand;

use crate::cluster::serve::{ExecutorOptions, SchedulerOptions};
use crate::cluster::Address;
use crate::config::Project;
use crate::engine::{Engine, Limits};
use crate::error::{Error, Result};
use crate::pipeline::runs::RunReport;
use crate::pipeline::RunOptions;
use crate::progress::Progress;

/// A cluster role.
#[derive(Debug, Subcommand)]
pub enum Role {
    /// Plan jobs into stages and hand their tasks to executors.
    Scheduler {
        /// Address to listen on.
        #[arg(long, default_value = "0.0.0.0:50050", value_name = "HOST:PORT")]
        bind: String,
        /// Seconds without a heartbeat after which an executor is taken as dead and its tasks
        /// are run again elsewhere.
        #[arg(long, default_value_t = 60, value_name = "SECONDS")]
        executor_timeout: u64,
    },
    /// Run tasks: scan, shuffle, join and aggregate; serve shuffle data to the others.
    Executor {
        /// The scheduler, as df://HOST:PORT or HOST:PORT.
        #[arg(long, value_name = "HOST:PORT")]
        scheduler: String,
        /// Address for shuffle reads (Arrow Flight); the next port takes the scheduler's calls.
        #[arg(long, default_value = "0.0.0.0:50051", value_name = "HOST:PORT")]
        bind: String,
        /// The host name the driver and other executors reach this one by (default: the bind
        /// address; needed when binding 0.0.0.0).
        #[arg(long, value_name = "HOST")]
        external_host: Option<String>,
        /// Memory its queries may use before spilling, e.g. `8GiB` or `70%` (default: 70%).
        #[arg(long, value_name = "SIZE")]
        memory_limit: Option<String>,
        /// Tasks run at once (default: the machine's cores).
        #[arg(long, value_name = "N")]
        tasks: Option<usize>,
        /// Folder for shuffle and spill files (default: a new temporary folder).
        #[arg(long, value_name = "DIR")]
        work_dir: Option<std::path::PathBuf>,
    },
}

fn socket(text: &str, flag: &str) -> Result<SocketAddr> {
    text.to_socket_addrs()
        .ok()
        .and_then(|mut found| found.next())
        .ok_or_else(|| {
            Error::Usage(format!(
                "{flag} {text}: not an address to listen on; write HOST:PORT, e.g. 0.0.0.0:50050"
            ))
        })
}

/// Serves `role` until the process is stopped.
pub async fn serve(role: Role) -> Result<()> {
    match role {
        Role::Scheduler {
            bind,
            executor_timeout,
        } => {
            crate::cluster::serve::scheduler(SchedulerOptions {
                bind: socket(&bind, "--bind")?,
                executor_timeout_secs: executor_timeout.max(1),
            })
            .await
        }
        Role::Executor {
            scheduler,
            bind,
            external_host,
            memory_limit,
            tasks,
            work_dir,
        } => {
            let memory_limit = match memory_limit {
                None => None,
                Some(text) => Some(
                    crate::config::parse_size(&text, crate::engine::total_memory()).ok_or_else(
                        || {
                            Error::Usage(format!(
                                "--memory-limit {text}: not a size; write e.g. 8GiB, 512MiB or 70%"
                            ))
                        },
                    )?,
                ),
            };
            crate::cluster::serve::executor(ExecutorOptions {
                scheduler: Address::parse(&scheduler, "--scheduler")?,
                bind: socket(&bind, "--bind")?,
                external_host,
                memory_limit,
                tasks,
                work_dir,
            })
            .await
        }
    }
}

/// Runs `project` with the cluster at `address` (from `key`) doing the queries it can.
pub async fn run(
    project: Project,
    address: &str,
    key: &str,
    options: &RunOptions,
    progress: Progress,
) -> Result<RunReport> {
    let address = Address::parse(address, key)?;
    let limits = Limits::from_config(&project.config.run)?;
    if limits.spill_dir.is_none() {
        return Err(Error::Cluster {
            address: address.to_string(),
            message: "a run on a cluster writes the resolved events into run.spill_dir for the executors to read: set run.spill_dir (or --spill-dir) to a folder mounted at the same path on this machine and every executor".into(),
        });
    }
    reachable(&address)?;
    let partitions = project.config.run.cluster_partitions;
    let (ctx, split) = crate::cluster::client_context(&address, &limits, Vec::new(), partitions)?;
    let engine = Engine::open_with(project, ctx).await?;
    engine.run_on_cluster();
    let report = crate::pipeline::run_on(&engine, options, progress).await;
    tracing::info!(
        on_cluster = split.sent(),
        on_driver = split.kept(),
        "queries run on the cluster and on this machine"
    );
    report
}

/// Fails with a clear message when nothing listens at the scheduler's address (Ballista would
/// only fail at the first query, mid-run).
fn reachable(address: &Address) -> Result<()> {
    let target = format!("{}:{}", address.host, address.port);
    let failed = |message: String| Error::Cluster {
        address: address.to_string(),
        message,
    };
    let addrs: Vec<SocketAddr> = target
        .to_socket_addrs()
        .map_err(|e| {
            failed(format!(
                "cannot resolve the scheduler's host ({e}); check --cluster / run.cluster"
            ))
        })?
        .collect();
    let mut last = None;
    for addr in addrs {
        match std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(10)) {
            Ok(_) => return Ok(()),
            Err(e) => last = Some(e),
        }
    }
    Err(failed(format!(
        "cannot reach the scheduler ({}); start it with `tessera cluster scheduler`, or check --cluster / run.cluster",
        last.map_or_else(|| "no address".to_string(), |e| e.to_string())
    )))
}
