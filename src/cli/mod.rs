//! The `tessera` command line: flags are parsed here, checked, and handed to the library.

pub mod bench;
pub mod bench_incremental;
#[cfg(feature = "cluster")]
pub mod cluster;
pub mod crm_export;
pub mod export;
pub mod generate;
pub mod plan_sql;
pub mod report;
pub mod serve;
pub mod status;

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};

use arrow::record_batch::RecordBatch;
use chrono::NaiveDate;
use clap::{Parser, Subcommand, ValueEnum};
use tracing_subscriber::EnvFilter;

use crate::cli::generate::GenerateOptions;
use crate::config::{Project, CONFIG_FILE};
use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::pipeline::runs::RunReport;
use crate::pipeline::{self, RunOptions};
use crate::progress::Progress;
use crate::storage::Place;

/// Tessera: an embedded customer data platform engine.
#[derive(Debug, Parser)]
#[command(name = "tessera", version, about, long_about = None)]
pub struct Cli {
    /// The project folder (holding tessera.toml).
    #[arg(long, global = true, default_value = ".", value_name = "DIR")]
    pub project: PathBuf,
    /// No progress bars and only warnings in the log.
    #[arg(long, short, global = true)]
    pub quiet: bool,
    /// Machine-readable output: JSON on stdout, JSON log lines on stderr.
    #[arg(long, global = true)]
    pub json: bool,
    /// More log detail (-v: info, -vv: debug). RUST_LOG overrides.
    #[arg(long, short, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the pipeline: ingest events, write the output tables, record the run.
    Run {
        /// Rebuild everything from all input.
        #[arg(long)]
        full: bool,
        /// The time relative windows are measured from, as `as_of()` in SQL (RFC 3339 or
        /// YYYY-MM-DD, UTC); default: now. Fix it to make a run reproducible.
        #[arg(long, value_name = "TIME")]
        as_of: Option<String>,
        /// Memory the query engine may use, e.g. `4GiB` or `60%` (overrides run.memory_limit).
        #[arg(long, value_name = "SIZE")]
        memory_limit: Option<String>,
        /// Folder for spill files (overrides run.spill_dir).
        #[arg(long, value_name = "DIR")]
        spill_dir: Option<String>,
        /// Longest one query may run, e.g. `30m`, `90s`, `2h` (overrides run.query_timeout).
        #[arg(long, value_name = "TIME")]
        query_timeout: Option<String>,
        /// Run on the cluster whose scheduler is at df://HOST:PORT (overrides run.cluster;
        /// see docs/cluster.md).
        #[arg(long, value_name = "df://HOST:PORT")]
        cluster: Option<String>,
    },
    /// Serve as part of a cluster: its scheduler or one of its executors (docs/cluster.md).
    #[cfg(feature = "cluster")]
    Cluster {
        /// Which role.
        #[command(subcommand)]
        role: cluster::Role,
    },
    /// Show the lease, unfinished publishes, new input files, table versions and the last runs.
    Status {
        /// How many runs to list.
        #[arg(long, default_value_t = 10)]
        runs: usize,
    },
    /// Run one SQL query over events, sources and the output tables.
    Query {
        /// The query (one SELECT).
        sql: String,
        /// How to print the result.
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
        /// Run the query and print its physical plan with what each operator did (rows, time,
        /// memory, spill) instead of its result: for finding what makes a trait slow.
        #[arg(long)]
        explain: bool,
    },
    /// Write the HTML report of the published output: the last run, segments over time,
    /// identity health, funnels, the RFM grid and customer value (docs/report.md).
    Report {
        /// The file to write (default: `[report] path`, else report.html at the top of the output).
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
        /// How many of the last runs the charts over time show (default: `[report] runs`).
        #[arg(long, value_name = "N")]
        runs: Option<usize>,
    },
    /// Check the config, the SQL files and the event files; write nothing.
    Validate,
    /// Serve the published tables over Arrow Flight SQL for BI tools (docs/serve.md).
    Serve {
        /// The address to listen on. Beyond loopback a token is required.
        #[arg(long, default_value = "127.0.0.1:50051", value_name = "IP:PORT")]
        bind: String,
        /// The token clients send as `authorization: Bearer <token>`.
        #[arg(long, env = "TESSERA_SERVE_TOKEN", hide_env_values = true)]
        token: Option<String>,
    },
    /// Say what the next run would recompute and why (new events, a changed SQL file or
    /// config key, a moved as-of, an upstream change, a removed file); write nothing.
    Plan {
        /// Plan a `--full` run.
        #[arg(long)]
        full: bool,
        /// The as-of time the run would use (RFC 3339 or YYYY-MM-DD, UTC); default: now.
        #[arg(long, value_name = "TIME")]
        as_of: Option<String>,
    },
    /// Explain an identifier's profile: its identifiers, the links that joined them, refused links.
    Explain {
        /// The identifier as TYPE:VALUE, e.g. email:alice@example.com (normalised like the data).
        identifier: String,
    },
    /// Erase a person (GDPR Art. 17, CCPA): their rows in every table and old version, and
    /// keep their events out of later runs. See docs/privacy.md.
    Forget {
        /// Identifiers as TYPE:VALUE, e.g. email:alice@example.com (normalised like the data).
        identifiers: Vec<String>,
        /// A file of TYPE:VALUE lines (blank lines and `#` comments skipped).
        #[arg(long, value_name = "FILE")]
        from_file: Option<PathBuf>,
        /// Print what would be deleted; write nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Export a segment's members for a campaign or a CRM: CSV, Parquet, Salesforce or HubSpot import files.
    Export {
        /// What to export.
        #[command(subcommand)]
        what: ExportWhat,
    },
    /// Pairwise precision and recall of identity_graph against a truth file.
    Accuracy {
        /// The truth: Parquet with identifier_type, identifier_value, person.
        #[arg(long, default_value = "data/truth.parquet")]
        truth: String,
    },
    /// Create a new project with a config, example queries and a small generated sample.
    Init {
        /// The folder to create (must be empty or absent).
        dir: PathBuf,
        /// People in the generated sample.
        #[arg(long, default_value_t = 300)]
        people: u64,
    },
    /// Benchmark the project's pipeline on generated events, beside the scan floor and DuckDB.
    Bench(BenchArgs),
    /// Purchase models outside a run.
    Predict {
        /// What to do.
        #[command(subcommand)]
        what: PredictWhat,
    },
    /// Generate synthetic Segment-spec events and their identity truth.
    Generate {
        /// Where to write: events go to OUT/events/, the truth to OUT/truth.parquet.
        #[arg(long, value_name = "OUT")]
        out: String,
        /// How many people.
        #[arg(long, default_value_t = 1000)]
        people: u64,
        /// How many days.
        #[arg(long, default_value_t = 30)]
        days: u32,
        /// The seed: the same seed gives the same rows.
        #[arg(long, default_value_t = 42)]
        seed: u64,
        /// The first day (YYYY-MM-DD).
        #[arg(long, default_value = "2026-10-01")]
        start: NaiveDate,
        /// Rows per Parquet file at most.
        #[arg(long, default_value_t = 250_000)]
        rows_per_file: usize,
        /// The data's knobs (see the flags below, which override the preset's): `friendly`
        /// (the defaults) or `adversarial` (shuffled rows, ~3.7 anonymous ids per person,
        /// family devices, a kiosk, varied junk ids).
        #[arg(long, value_enum, default_value = "friendly")]
        preset: generate::Preset,
        /// The knobs one by one.
        #[command(flatten)]
        knobs: GenerateKnobs,
    },
}

/// `tessera generate`'s knobs; unset ones come from the preset.
#[derive(Debug, clap::Args)]
pub struct GenerateKnobs {
    /// Row order: by-person (each person's events of a day together), by-time, or shuffled
    /// (across files, as late and re-batched deliveries arrive).
    #[arg(long, value_enum)]
    order: Option<generate::EventOrder>,
    /// With --order shuffled: rows shuffled together (memory holds them, ~400 bytes each).
    #[arg(long, value_name = "ROWS")]
    shuffle_window: Option<usize>,
    /// Share of identify calls after sign-up that carry traits (default 0.5).
    #[arg(long, value_name = "SHARE")]
    identify_traits: Option<f64>,
    /// Mean anonymous ids per person (default: about 1.6, each visit on one at random).
    #[arg(long, value_name = "MEAN")]
    anonymous_ids: Option<f64>,
    /// Share of homes where 2-4 people share a family device (default 0).
    #[arg(long, value_name = "SHARE")]
    family_devices: Option<f64>,
    /// Share of visits made on one kiosk everyone shares (default 0).
    #[arg(long, value_name = "SHARE")]
    kiosk: Option<f64>,
    /// Scales how often junk ids appear (default 1; 0 for none).
    #[arg(long, value_name = "SCALE")]
    junk: Option<f64>,
    /// Which junk ids: constant (one junk anonymous_id and email) or varied.
    #[arg(long, value_enum)]
    junk_mix: Option<generate::JunkMix>,
}

impl GenerateKnobs {
    /// `options` with the knobs that were given.
    fn apply(self, mut options: GenerateOptions) -> GenerateOptions {
        if let Some(v) = self.order {
            options.order = v;
        }
        if let Some(v) = self.shuffle_window {
            options.shuffle_window = v;
        }
        if let Some(v) = self.identify_traits {
            options.identify_traits = v;
        }
        if let Some(v) = self.anonymous_ids {
            options.anonymous_ids = Some(v);
        }
        if let Some(v) = self.family_devices {
            options.family_devices = v;
        }
        if let Some(v) = self.kiosk {
            options.kiosk = v;
        }
        if let Some(v) = self.junk {
            options.junk = v;
        }
        if let Some(v) = self.junk_mix {
            options.junk_mix = v;
        }
        options
    }
}

/// What `tessera bench` measures.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// Event counts to generate and run, comma-separated (1M, 250k, 100000).
    #[arg(long, default_value = "1M", value_delimiter = ',')]
    pub sizes: Vec<String>,
    /// Where generated events are cached (and the runs write while they last).
    #[arg(long, default_value = "bench-data", value_name = "DIR")]
    pub data: PathBuf,
    /// Where bench.csv and bench.md go (default: the data folder).
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Python with the packages of benches/requirements.txt: also run the DuckDB baseline.
    #[arg(long, value_name = "PYTHON")]
    pub duckdb: Option<PathBuf>,
    /// Memory limit for both engines, e.g. 4GiB.
    #[arg(long, value_name = "SIZE")]
    pub memory_limit: Option<String>,
    /// Also time a run that adds the newest 1% of the events as a new file, a run with
    /// nothing new, and a `--full` run to compare its tables with.
    #[arg(long)]
    pub incremental: bool,
    /// The generator's data sets to run each size on, comma-separated: friendly (each
    /// person's events together) and adversarial (shuffled, shared devices; see
    /// `tessera generate --preset`).
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "friendly,adversarial"
    )]
    pub data_sets: Vec<generate::Preset>,
}

/// `tessera predict` subcommands.
#[derive(Debug, Subcommand)]
pub enum PredictWhat {
    /// Fit BG/NBD (and Gamma-Gamma, with zbar) to per-customer summaries and print the parameters.
    Fit {
        /// CSV (with a header) or Parquet with columns x (repeat purchases), t_x (time of the
        /// last purchase), T (age), all in one time unit, and optionally zbar (mean spend of the
        /// repeat purchases).
        #[arg(long, value_name = "FILE")]
        summary: PathBuf,
    },
}

/// What `tessera export` exports.
#[derive(Debug, Subcommand)]
pub enum ExportWhat {
    /// A published segment, with its members' profile columns.
    Segment {
        /// The segment's name (its file name in queries/segments/).
        name: String,
        /// The file format.
        #[arg(long, value_enum, default_value_t = crate::cli::export::ExportFormat::Csv)]
        format: crate::cli::export::ExportFormat,
        /// The file to write (a folder with --to salesforce/hubspot or --changes-since).
        #[arg(long)]
        out: PathBuf,
        /// Columns to keep, comma-separated (default: all); with --to salesforce/hubspot or
        /// --changes-since, Destination=column pairs.
        #[arg(long, value_delimiter = ',')]
        columns: Vec<String>,
        /// Leave no personal data in clear: identifiers (emails trimmed and lowercased, phones in
        /// E.164, user and anonymous ids trimmed) and names (trimmed, lowercased) are replaced by
        /// their SHA-256; JSON columns such as `traits` are left out unless [export]
        /// traits_allowlist keeps some keys. See docs/exports.md.
        #[arg(long)]
        hash_pii: bool,
        /// Write CSV cells as they are. By default a cell starting with = + - @, a tab or a
        /// carriage return gets a leading ' so spreadsheets show it as text, not run it.
        #[arg(long)]
        raw: bool,
        /// The destination: salesforce (Bulk API 2.0 CSV) or hubspot (import CSV and its
        /// importRequest JSON) write a folder of files cut under the CRM's limits; csv and
        /// parquet are --format's. See docs/crm.md.
        #[arg(long, value_enum)]
        to: Option<crate::cli::crm_export::ExportTo>,
        /// Only who entered or left the segment since this run (a run_id of `runs`), as add
        /// and remove files in the --out folder.
        #[arg(long, value_name = "RUN_ID")]
        changes_since: Option<String>,
        /// Cut files before they grow past this many bytes (default: the destination's limit).
        #[arg(long, value_name = "BYTES")]
        max_file_bytes: Option<u64>,
        /// CSV field delimiter of --to salesforce/csv folders: , ; | ^ ` or \t (default ,).
        #[arg(long)]
        delimiter: Option<String>,
    },
}

/// How `tessera query` prints rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// An aligned text table.
    Table,
    /// CSV with a header.
    Csv,
    /// A JSON array of objects.
    Json,
}

/// Parses the command line, runs it, and returns the process exit code.
pub fn main() -> i32 {
    let cli = Cli::parse();
    init_logging(&cli);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return 1;
        }
    };
    let json = cli.json;
    match runtime.block_on(main_inner(cli)) {
        Ok(code) => code,
        Err(e) => {
            if json {
                let body = serde_json::json!({"error": e.to_string(), "exit_code": e.exit_code()});
                println!("{body}");
            } else {
                eprintln!("error: {e}");
            }
            e.exit_code()
        }
    }
}

fn init_logging(cli: &Cli) {
    let interactive = std::io::stderr().is_terminal();
    let default = match (cli.quiet, cli.verbose) {
        (true, _) => "warn",
        (false, 0) if interactive && !cli.json => "warn",
        (false, 0 | 1) => "tessera=info,warn",
        (false, _) => "tessera=debug,info",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if cli.json {
        builder.json().init();
    } else {
        builder.with_target(false).with_ansi(interactive).init();
    }
}

async fn main_inner(cli: Cli) -> Result<i32> {
    let progress = Progress::new(!cli.quiet && !cli.json);
    let project_dir = cli.project.clone();
    match cli.command {
        Command::Run {
            full,
            as_of,
            memory_limit,
            spill_dir,
            query_timeout,
            cluster,
        } => {
            let mut project = Project::load(&project_dir)?;
            if let Some(limit) = query_timeout {
                if crate::config::parse_duration(&limit).is_none() {
                    return Err(Error::Usage(format!(
                        "--query-timeout {limit}: not a time limit; write e.g. 30m, 90s or 2h (at least 1 second, at most 7 days)"
                    )));
                }
                project.config.run.query_timeout = limit;
            }
            if let Some(limit) = memory_limit {
                project.config.run.memory_limit = limit;
            }
            if let Some(dir) = spill_dir {
                project.config.run.spill_dir = Some(dir);
            }
            let as_of = as_of.as_deref().map(parse_as_of).transpose()?;
            let options = RunOptions { full, as_of };
            let cluster = match cluster {
                Some(address) => Some((address, "--cluster")),
                None => project
                    .config
                    .run
                    .cluster
                    .clone()
                    .map(|a| (a, "run.cluster")),
            };
            let exporting = (!project.config.exports.is_empty()).then(|| project.clone());
            let report = match cluster {
                None => pipeline::run(project, &options, progress).await?,
                #[cfg(feature = "cluster")]
                Some((address, key)) => {
                    cluster::run(project, &address, key, &options, progress).await?
                }
                #[cfg(not(feature = "cluster"))]
                Some((_, key)) => {
                    return Err(Error::Usage(format!(
                        "{key}: this tessera was built without cluster support; build it with `cargo build --features cluster`, or remove {key} to run on this machine"
                    )))
                }
            };
            print_report(&report, cli.json);
            if let Some(project) = exporting {
                // After publish, from the published tables: a scheduled run leaves the
                // destinations' files beside them.
                let engine = Engine::open(project).await?;
                for (folder, summary) in
                    crate::cli::crm_export::write_run_exports(&engine, &report.run_id).await?
                {
                    if !cli.json && !cli.quiet {
                        println!(
                            "export: {} files in {folder} ({} members, {} added, {} removed)",
                            summary.files.len(),
                            summary.rows,
                            summary.added,
                            summary.removed
                        );
                    }
                }
            }
            after_run_report(&project_dir, &report).await;
            Ok(0)
        }
        Command::Report { out, runs } => {
            let project = Project::load(&project_dir)?;
            let target = match out {
                Some(path) => report::Target::File(path),
                None => {
                    report::Target::configured(&project.dir, project.config.report.path.as_deref())
                }
            };
            let runs = runs.unwrap_or(project.config.report.runs).max(1);
            let engine = Engine::open(project).await?;
            let written = report::write(&engine, &target, runs).await?;
            if cli.json {
                println!("{}", serde_json::json!({ "report": written }));
            } else {
                println!("wrote {written}");
            }
            Ok(0)
        }
        Command::Query {
            sql,
            format,
            explain,
        } => {
            let engine = Engine::open(Project::load(&project_dir)?).await?;
            // `events` is the published event history; before any run, the event files as
            // they are now (checked and deduplicated on the fly).
            let events = match engine
                .outputs
                .read(&engine.ctx, crate::output::state::EVENTS)
                .await?
            {
                Some(history) => {
                    engine.ctx.deregister_table(crate::tables::EVENTS)?;
                    engine
                        .ctx
                        .register_table(crate::tables::EVENTS, history.clone().into_view())?;
                    history
                }
                None => {
                    crate::stages::ingest::ingest_skipping_corrupt(&engine)
                        .await?
                        .events
                }
            };
            engine.register_outputs().await?;
            // Looking up every event's profile costs a pass over events: only when asked for.
            if sql.to_lowercase().contains("profile_id") {
                if let Some(resolved) =
                    crate::stages::identity::events_with_published_profiles(&engine, events).await?
                {
                    engine.ctx.deregister_table(crate::tables::EVENTS)?;
                    engine
                        .ctx
                        .register_table(crate::tables::EVENTS, resolved.into_view())?;
                }
            }
            let mut df = engine.query(&sql, "<query>").await?;
            if explain {
                df = df
                    .explain(false, true)
                    .map_err(|e| Error::query("<query>", e))?;
            }
            // An empty result still has columns: printed as a header with no rows.
            let schema = std::sync::Arc::new(df.schema().as_arrow().clone());
            let batches = df.collect().await.map_err(|e| Error::query("<query>", e))?;
            if explain && !cli.json {
                print_plan(&batches);
                return Ok(0);
            }
            let format = if cli.json { Format::Json } else { format };
            print_batches(schema, &batches, format)?;
            Ok(0)
        }
        Command::Validate => validate(&project_dir, cli.json).await,
        Command::Serve { bind, token } => {
            serve::serve(Project::load(&project_dir)?, &bind, token).await?;
            Ok(0)
        }
        Command::Plan { full, as_of } => {
            let engine = Engine::open(Project::load(&project_dir)?).await?;
            let as_of = as_of.as_deref().map(parse_as_of).transpose()?;
            let plan = crate::pipeline::plan(&engine, &RunOptions { full, as_of }).await?;
            if cli.json {
                println!("{}", serde_json::to_string(&plan).unwrap_or_default());
            } else {
                print!("{}", plan.render());
            }
            Ok(0)
        }
        #[cfg(feature = "cluster")]
        Command::Cluster { role } => cluster::serve(role).await.map(|()| 0),
        Command::Status { runs } => {
            let engine = Engine::open(Project::load(&project_dir)?).await?;
            let status = crate::cli::status::status(&engine, runs).await?;
            if cli.json {
                println!("{}", serde_json::to_string(&status).unwrap_or_default());
            } else {
                print!("{}", status.render());
            }
            Ok(0)
        }
        Command::Explain { identifier } => {
            let engine = Engine::open(Project::load(&project_dir)?).await?;
            let explanation =
                crate::stages::identity::explain::explain(&engine, &identifier).await?;
            if cli.json {
                println!(
                    "{}",
                    serde_json::to_string(&explanation).unwrap_or_default()
                );
            } else {
                print!("{}", explanation.render());
            }
            Ok(0)
        }
        Command::Forget {
            identifiers,
            from_file,
            dry_run,
        } => {
            let specs = crate::stages::forget::collect_specs(&identifiers, from_file.as_deref())?;
            let engine = Engine::open(Project::load(&project_dir)?).await?;
            let report = crate::stages::forget::forget(&engine, &specs, dry_run).await?;
            if cli.json {
                println!("{}", serde_json::to_string(&report).unwrap_or_default());
            } else {
                print!("{}", report.render(&specs));
            }
            Ok(0)
        }
        Command::Export {
            what:
                ExportWhat::Segment {
                    name,
                    format,
                    out,
                    columns,
                    hash_pii,
                    raw,
                    to,
                    changes_since,
                    max_file_bytes,
                    delimiter,
                },
        } => {
            let project = Project::load(&project_dir)?;
            let crm = to.is_some_and(|t| t.plain_format().is_none());
            if crm || changes_since.is_some() {
                crate::cli::export::check_out_path(&project, &out)?;
                let engine = Engine::open(project).await?;
                let target = crate::cli::crm_export::ExportTo::target(to, format);
                let export = crate::cli::crm_export::TargetExport::for_command(
                    &engine.project,
                    &name,
                    target,
                    &columns,
                    hash_pii,
                    raw,
                    max_file_bytes,
                    delimiter.as_deref(),
                )?;
                let members = match changes_since {
                    Some(run) => crate::cli::crm_export::Members::Since(run),
                    None => crate::cli::crm_export::Members::All,
                };
                let (files, summary) =
                    crate::cli::crm_export::build(&engine, &export, &members).await?;
                crate::cli::crm_export::write_local(&out, &files)?;
                if cli.json {
                    let mut report = serde_json::to_value(&summary).unwrap_or_default();
                    report["out"] = serde_json::json!(out);
                    println!("{report}");
                } else if !cli.quiet {
                    println!(
                        "wrote {} files of {} to {} ({} members, {} added, {} removed)",
                        summary.files.len(),
                        name,
                        out.display(),
                        summary.rows,
                        summary.added,
                        summary.removed
                    );
                    if !summary.hashed.is_empty() {
                        println!("  hashed (SHA-256): {}", summary.hashed.join(", "));
                    }
                    if !summary.dropped.is_empty() {
                        println!(
                            "  left out as personal data: {}",
                            summary.dropped.join(", ")
                        );
                    }
                }
                return Ok(0);
            }
            let format = to.and_then(|t| t.plain_format()).unwrap_or(format);
            // Refused before the engine opens: nothing is read for a file that may not be written.
            crate::cli::export::check_out_path(&project, &out)?;
            let engine = Engine::open(project).await?;
            let options = crate::cli::export::ExportOptions {
                segment: name,
                format,
                columns,
                hash_pii,
                raw,
            };
            let summary = crate::cli::export::export_segment(&engine, &options, &out).await?;
            if cli.json {
                let mut report = serde_json::to_value(&summary).unwrap_or_default();
                report["out"] = serde_json::json!(out);
                println!("{report}");
            } else if !cli.quiet {
                println!(
                    "wrote {} members of {} to {}",
                    summary.rows,
                    options.segment,
                    out.display()
                );
                if !summary.hashed.is_empty() {
                    println!("  hashed (SHA-256): {}", summary.hashed.join(", "));
                }
                if !summary.dropped.is_empty() {
                    println!(
                        "  left out as personal data: {}",
                        summary.dropped.join(", ")
                    );
                }
                if !summary.filtered.is_empty() {
                    println!(
                        "  cut down to [export] traits_allowlist keys: {}",
                        summary.filtered.join(", ")
                    );
                }
                if summary.neutralised_cells > 0 {
                    println!(
                        "  {} cells starting with = + - @ tab or CR given a leading ' (--raw writes them as they are)",
                        summary.neutralised_cells
                    );
                }
            }
            Ok(0)
        }
        Command::Accuracy { truth } => {
            let engine = Engine::open(Project::load(&project_dir)?).await?;
            let accuracy = crate::stages::identity::accuracy::measure(&engine, &truth).await?;
            if cli.json {
                println!("{}", serde_json::to_string(&accuracy).unwrap_or_default());
            } else {
                print!("{}", accuracy.render(&truth));
            }
            Ok(0)
        }
        Command::Init { dir, people } => {
            init(&dir, people, progress).await?;
            if !cli.quiet {
                println!(
                    "created project in {}; next: cd {} && tessera run",
                    dir.display(),
                    dir.display()
                );
            }
            Ok(0)
        }
        Command::Predict {
            what: PredictWhat::Fit { summary },
        } => {
            let models = crate::stages::predict::fit_summary_file(&summary).await?;
            if cli.json {
                println!("{}", serde_json::to_string(&models).unwrap_or_default());
            } else {
                print_models(&models);
            }
            Ok(0)
        }
        Command::Bench(args) => {
            let options = crate::cli::bench::BenchOptions {
                sizes: args
                    .sizes
                    .iter()
                    .map(|s| crate::cli::bench::parse_count(s))
                    .collect::<Result<_>>()?,
                project: std::path::absolute(&project_dir)
                    .map_err(|e| Error::io(&project_dir, e))?,
                data_dir: std::path::absolute(&args.data).map_err(|e| Error::io(&args.data, e))?,
                exe: std::env::current_exe().map_err(|e| Error::io("tessera", e))?,
                python: args.duckdb,
                memory_limit: args.memory_limit,
                incremental: args.incremental,
                data_sets: args.data_sets,
            };
            // Fail on a broken project before generating anything.
            Project::load(&options.project)?;
            let report = crate::cli::bench::run(&options, progress).await?;
            let out = args.out.unwrap_or(options.data_dir.clone());
            let written = crate::cli::bench::write(&report, &out)?;
            if cli.json {
                println!("{}", serde_json::to_string(&report).unwrap_or_default());
            } else {
                println!("{}", report.markdown());
                if !cli.quiet {
                    eprintln!("wrote {}", written.join(", "));
                }
            }
            Ok(0)
        }
        Command::Generate {
            out,
            people,
            days,
            seed,
            start,
            rows_per_file,
            preset,
            knobs,
        } => {
            let options = knobs.apply(
                GenerateOptions {
                    people,
                    days,
                    seed,
                    start,
                    rows_per_file,
                    ..GenerateOptions::default()
                }
                .with_preset(preset),
            );
            options.check().map_err(Error::Usage)?;
            let place = Place::open(&out, &current_dir()?, "--out")?;
            let summary = generate::generate(&place, &options, progress).await?;
            if cli.json {
                println!("{}", serde_json::to_string(&summary).unwrap_or_default());
            } else if !cli.quiet {
                println!(
                    "wrote {} event rows ({} redelivered copies, {} malformed) in {} files under {}events/, and {} truth rows",
                    summary.rows,
                    summary.duplicates,
                    summary.malformed,
                    summary.files,
                    place.url(),
                    summary.truth_rows
                );
            }
            Ok(0)
        }
    }
}

fn print_models(models: &crate::stages::predict::Models) {
    let diagnostics = |ll: f64, customers: usize, what: &str, iterations: u32, converged: bool| {
        println!(
            "             log-likelihood {ll:.4}, {customers} {what}, {iterations} iterations{}",
            if converged { "" } else { " (did not converge)" }
        );
    };
    if let Some(m) = &models.bgnbd {
        println!(
            "BG/NBD       r = {:.4}  alpha = {:.4}  a = {:.4}  b = {:.4}",
            m.params.r, m.params.alpha, m.params.a, m.params.b
        );
        diagnostics(
            m.log_likelihood,
            m.customers,
            "customers",
            m.iterations,
            m.converged,
        );
    }
    match (&models.gamma_gamma, &models.gamma_gamma_error) {
        (Some(m), _) => {
            println!(
                "Gamma-Gamma  p = {:.4}  q = {:.4}  gamma = {:.4}",
                m.params.p, m.params.q, m.params.gamma
            );
            diagnostics(
                m.log_likelihood,
                m.customers,
                "repeat customers",
                m.iterations,
                m.converged,
            );
        }
        (None, Some(e)) => println!("Gamma-Gamma  not fitted: {e}"),
        (None, None) => {}
    }
}

/// Writes the HTML report after a run that changed something, when `[report]` asks for it. The
/// run is published by then: a report that cannot be written is a warning, not a failed run.
async fn after_run_report(project_dir: &Path, run: &RunReport) {
    if run.status != crate::pipeline::runs::RunStatus::Succeeded {
        return;
    }
    let result = async {
        let project = Project::load(project_dir)?;
        let config = project.config.report.clone();
        if !project.config.declared.contains("report") || !config.enabled {
            return Ok(None);
        }
        let target = report::Target::configured(&project.dir, config.path.as_deref());
        let engine = Engine::open(project).await?;
        report::write(&engine, &target, config.runs).await.map(Some)
    }
    .await;
    match result {
        Ok(Some(written)) => eprintln!("wrote the report to {written}"),
        Ok(None) => {}
        Err(e) => {
            eprintln!("warning: the run is published, but its report could not be written: {e}")
        }
    }
}

fn print_report(report: &RunReport, json: bool) {
    if json {
        println!("{}", serde_json::to_string(report).unwrap_or_default());
        return;
    }
    let secs = (report.finished_at - report.started_at).num_milliseconds() as f64 / 1000.0;
    println!(
        "run {} {} in {secs:.1}s",
        report.run_id,
        report.status.as_str()
    );
    for run in &report.finished_publishes {
        println!("  first finished publishing run {run}, which had stopped part way");
    }
    println!(
        "  files   {} read ({} run), {} skipped, {} changed since processed",
        report.input_files.len(),
        report.mode,
        report.skipped_files.len(),
        report.changed_files.len()
    );
    for skipped in &report.skipped_files {
        println!("    skipped {}: {}", skipped.file, skipped.reason);
    }
    for changed in &report.changed_files {
        println!("    changed {}: {}", changed.file, changed.reason);
    }
    if report.status == crate::pipeline::runs::RunStatus::Unchanged {
        println!("  nothing to recompute: no new event files, and no SQL file, config key or time-dependent node changed; no table written");
        print_data_tests(report);
        return;
    }
    print_nodes(&report.nodes, &report.skipped_nodes);
    println!(
        "  rows    {} read, {} rejected, {} duplicates, {} events",
        report.rows_read, report.rows_rejected, report.rows_duplicate, report.events
    );
    println!(
        "  events  {} new, {} in the history",
        report.new_events, report.events
    );
    if report.suppressed > 0 {
        println!(
            "  forgotten  {} rows dropped: they hold identifiers of people forgotten by `tessera forget` (`tessera status` lists their files)",
            report.suppressed
        );
    }
    let id = &report.identity;
    println!(
        "  people  {} profiles from {} identifiers; {} links applied, {} refused, {} profiles merged; {} events without a profile",
        id.profiles, id.identifiers, id.links_accepted, id.links_refused, id.profiles_merged, report.events_without_profile
    );
    if let Some(p) = &report.predictions {
        let fitted = |ok: bool, converged: bool| match (ok, converged) {
            (false, _) => "not fitted",
            (true, false) => "fitted, did not converge",
            (true, true) => "fitted",
        };
        println!(
            "  buyers  {}: BG/NBD {}, Gamma-Gamma {} ({} ms fitting, {} ms predicting)",
            p.buyers,
            fitted(
                p.models.bgnbd.is_some(),
                p.models.bgnbd.as_ref().is_some_and(|m| m.converged)
            ),
            fitted(
                p.models.gamma_gamma.is_some(),
                p.models.gamma_gamma.as_ref().is_some_and(|m| m.converged)
            ),
            p.fit_ms,
            p.predict_ms
        );
    }
    print_data_tests(report);
    for w in &report.warnings {
        println!("  warning {}: {}", w.subject, w.message);
    }
    for (name, committed) in &report.tables {
        if committed.carried {
            println!("  table   {name:<18} version {:<4} kept", committed.version);
        } else {
            println!(
                "  table   {name:<18} version {:<4} {} rows written",
                committed.version, committed.rows
            );
        }
    }
}

/// One line per failing data test, and how many passed.
fn print_data_tests(report: &RunReport) {
    for outcome in &report.data_tests {
        if outcome.failing_rows > 0 {
            println!("  test    {}", outcome.describe());
        }
    }
    let passed = report
        .data_tests
        .iter()
        .filter(|o| o.failing_rows == 0)
        .count();
    if passed > 0 {
        println!("  tests   {passed} data tests passed");
    }
}

/// One line per node recomputed or retired, with why; then what was kept and skipped.
fn print_nodes(
    nodes: &[crate::pipeline::graph::Step],
    skipped: &[crate::pipeline::graph::Skipped],
) {
    use crate::pipeline::graph::Action;
    let mut kept = 0;
    for step in nodes {
        let verb = match step.action {
            Action::Keep => {
                kept += 1;
                continue;
            }
            Action::Recompute => "recomputed",
            Action::Retire => "retired",
        };
        println!("  {verb:<10} {}: {}", step.node, step.reasons.join("; "));
    }
    if kept > 0 {
        println!(
            "  kept       {kept} unchanged node{}",
            if kept == 1 { "" } else { "s" }
        );
    }
    for s in skipped {
        println!("  skipped    {}: {}", s.node, s.reason);
    }
}

/// Prints the text of an `EXPLAIN ANALYZE` result (its `plan` column) as it is.
fn print_plan(batches: &[arrow::array::RecordBatch]) {
    for batch in batches {
        if let Some(plans) = batch
            .column_by_name("plan")
            .and_then(|c| c.as_any().downcast_ref::<arrow::array::StringArray>())
        {
            for plan in plans.iter().flatten() {
                println!("{plan}");
            }
        }
    }
}

/// Prints batches in `format` to stdout; `schema` gives the header when there are no rows.
pub fn print_batches(
    schema: arrow::datatypes::SchemaRef,
    batches: &[RecordBatch],
    format: Format,
) -> Result<()> {
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let empty;
    let batches = if batches.iter().all(|b| b.num_rows() == 0) {
        empty = [RecordBatch::new_empty(schema.clone())];
        &empty[..]
    } else {
        batches
    };
    match format {
        Format::Table => {
            let table = arrow::util::pretty::pretty_format_batches_with_schema(schema, batches)?;
            writeln!(out, "{table}").map_err(|e| Error::io("<stdout>", e))?;
        }
        Format::Csv => {
            let mut writer = arrow::csv::WriterBuilder::new()
                .with_header(true)
                .build(&mut out);
            for batch in batches {
                writer.write(batch)?;
            }
        }
        Format::Json => {
            let mut writer = arrow::json::ArrayWriter::new(&mut out);
            let refs: Vec<&RecordBatch> = batches.iter().collect();
            writer.write_batches(&refs)?;
            writer.finish()?;
            drop(writer);
            writeln!(out).map_err(|e| Error::io("<stdout>", e))?;
        }
    }
    Ok(())
}

/// Problems `validate` found, by severity.
#[derive(Debug, Default, serde::Serialize)]
struct Findings {
    errors: Vec<String>,
    warnings: Vec<String>,
    /// Rows a run would send to `rejected_events`, by file and reason: not problems of the
    /// project, but worth seeing before a run.
    quarantined: Vec<String>,
    /// SQL files that could not be planned yet (they read a table no run has published).
    notes: Vec<String>,
    event_files: usize,
    sql_files: usize,
}

async fn validate(project_dir: &Path, json: bool) -> Result<i32> {
    let project = Project::load(project_dir)?;
    let engine = Engine::open(project).await?;
    let mut findings = Findings::default();
    // A full read of every file: validate is where a file with corrupt rows should show up.
    let corrupt = crate::stages::ingest::find_corrupt(&engine.event_places, None)
        .await
        .unwrap_or_default();
    match crate::stages::ingest::ingest(&engine, &corrupt, None, &|_, _| {}).await {
        Ok(ingested) => {
            findings.event_files = ingested.inventory.files.len();
            for skipped in &ingested.inventory.skipped {
                findings.warnings.push(format!(
                    "{}: will be skipped: {}",
                    skipped.file, skipped.reason
                ));
            }
            match ingested.preview().await {
                Ok(preview) => {
                    for short in preview.short {
                        findings
                            .warnings
                            .push(format!("{}: will be skipped: {}", short.file, short.reason));
                    }
                    // One line per reason: a project with thousands of files gets a few lines.
                    let mut by_reason: std::collections::BTreeMap<String, (u64, Vec<String>)> =
                        Default::default();
                    for (file, reason, rows) in preview.quarantined {
                        let entry = by_reason.entry(reason).or_default();
                        entry.0 += rows;
                        entry.1.push(file);
                    }
                    for (reason, (rows, files)) in by_reason {
                        findings.quarantined.push(format!(
                            "{rows} rows will go to rejected_events: {reason}; in {} file{}, first {}",
                            files.len(),
                            if files.len() == 1 { "" } else { "s" },
                            files[0]
                        ));
                    }
                }
                Err(e) => findings
                    .errors
                    .push(format!("reading the event files: {e}")),
            }
        }
        Err(e) => findings.errors.push(e.to_string()),
    }
    // Identity queries read only events and sources, which exist now: planned as they are.
    for query in engine.project.query_files("identity")? {
        findings.sql_files += 1;
        if let Err(e) = engine.query(&query.sql, &query.file).await {
            findings.errors.push(e.to_string());
        }
    }
    for kind in ["traits", "segments", "reports"] {
        findings.sql_files += engine.project.query_files(kind)?.len();
    }
    // The rest against the schemas the run would give them (see plan_sql).
    let mut tests = engine
        .project
        .query_files(crate::pipeline::data_tests::FOLDER)?;
    findings.sql_files += tests.len();
    for (i, declared) in engine.project.config.tests.iter().enumerate() {
        for test in crate::pipeline::data_tests::compile(i, declared) {
            tests.push(crate::config::QueryFile {
                file: format!("{} {}", CONFIG_FILE, test.name),
                sql: test.sql,
                path: engine.project.dir.join(CONFIG_FILE),
            });
        }
    }
    let planned = plan_sql::plan_all(&engine, &tests).await?;
    findings.errors.extend(planned.errors);
    findings.notes.extend(planned.notes);
    let code = if !findings.errors.is_empty() {
        2
    } else if !findings.warnings.is_empty() {
        1
    } else {
        0
    };
    if json {
        println!("{}", serde_json::to_string(&findings).unwrap_or_default());
    } else {
        for e in &findings.errors {
            println!("error: {e}");
        }
        for w in &findings.warnings {
            println!("warning: {w}");
        }
        for q in findings.quarantined.iter().chain(&findings.notes) {
            println!("note: {q}");
        }
        println!(
            "{}: {} event files, {} SQL files, {} errors, {} warnings",
            if code == 0 { "ok" } else { "problems found" },
            findings.event_files,
            findings.sql_files,
            findings.errors.len(),
            findings.warnings.len()
        );
    }
    Ok(code)
}

/// `--as-of`: RFC 3339 (`2026-11-01T00:00:00Z`) or a date (midnight UTC).
fn parse_as_of(text: &str) -> Result<chrono::DateTime<chrono::Utc>> {
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(text) {
        return Ok(t.with_timezone(&chrono::Utc));
    }
    if let Ok(d) = chrono::NaiveDate::parse_from_str(text, "%Y-%m-%d") {
        return Ok(d.and_hms_opt(0, 0, 0).expect("midnight").and_utc());
    }
    Err(Error::Usage(format!(
        "--as-of {text}: use RFC 3339 (2026-11-01T00:00:00Z) or a date (2026-11-01)"
    )))
}

fn current_dir() -> Result<PathBuf> {
    std::env::current_dir().map_err(|e| Error::io(".", e))
}

/// The files `tessera init` writes, from the bundled project itself.
const INIT_FILES: &[(&str, &str)] = &[
    (CONFIG_FILE, include_str!("../../tessera.toml")),
    (
        "queries/identity/events.sql",
        include_str!("../../queries/identity/events.sql"),
    ),
    (
        "queries/traits/order_count.sql",
        include_str!("../../queries/traits/order_count.sql"),
    ),
    (
        "queries/traits/revenue.sql",
        include_str!("../../queries/traits/revenue.sql"),
    ),
    (
        "queries/traits/favourite_category.sql",
        include_str!("../../queries/traits/favourite_category.sql"),
    ),
    (
        "queries/traits/campaign_source.sql",
        include_str!("../../queries/traits/campaign_source.sql"),
    ),
    (
        "queries/traits/viewed_products.sql",
        include_str!("../../queries/traits/viewed_products.sql"),
    ),
    (
        "queries/segments/high_value.sql",
        include_str!("../../queries/segments/high_value.sql"),
    ),
    (
        "queries/segments/active_30d.sql",
        include_str!("../../queries/segments/active_30d.sql"),
    ),
    (
        "queries/segments/cart_abandoners.sql",
        include_str!("../../queries/segments/cart_abandoners.sql"),
    ),
    (
        "queries/segments/lapsed_buyers.sql",
        include_str!("../../queries/segments/lapsed_buyers.sql"),
    ),
    (
        "queries/segments/high_value_active.sql",
        include_str!("../../queries/segments/high_value_active.sql"),
    ),
    (
        "queries/segments/abandoned_checkout.sql",
        include_str!("../../queries/segments/abandoned_checkout.sql"),
    ),
    (
        "queries/segments/valuable_at_risk.sql",
        include_str!("../../queries/segments/valuable_at_risk.sql"),
    ),
    (
        "queries/segments/champions.sql",
        include_str!("../../queries/segments/champions.sql"),
    ),
    (
        "queries/reports/checkout_funnel.sql",
        include_str!("../../queries/reports/checkout_funnel.sql"),
    ),
    (
        "queries/reports/after_add_to_cart.sql",
        include_str!("../../queries/reports/after_add_to_cart.sql"),
    ),
    (
        "queries/reports/rfm_overview.sql",
        include_str!("../../queries/reports/rfm_overview.sql"),
    ),
    (".gitignore", "/out\n"),
];

async fn init(dir: &Path, people: u64, progress: Progress) -> Result<()> {
    if dir.exists()
        && std::fs::read_dir(dir)
            .map_err(|e| Error::io(dir, e))?
            .next()
            .is_some()
    {
        return Err(Error::Usage(format!(
            "{} is not empty; `tessera init` only creates new projects",
            dir.display()
        )));
    }
    for (name, text) in INIT_FILES {
        let path = dir.join(name);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
        }
        std::fs::write(&path, text).map_err(|e| Error::io(&path, e))?;
    }
    let data = dir.join("data");
    let place = Place::open(&data.to_string_lossy(), &current_dir()?, "data")?;
    let options = GenerateOptions {
        people,
        ..GenerateOptions::default()
    };
    generate::generate(&place, &options, progress).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_ships_every_bundled_query_file() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let project = Project::load(root).unwrap();
        let mut bundled: Vec<String> = ["identity", "traits", "segments", "reports"]
            .iter()
            .flat_map(|kind| project.query_files(kind).unwrap())
            .map(|q| q.file)
            .collect();
        bundled.sort();
        let mut shipped: Vec<String> = INIT_FILES
            .iter()
            .map(|(name, _)| name.to_string())
            .filter(|n| n.starts_with("queries/"))
            .collect();
        shipped.sort();
        assert_eq!(shipped, bundled);
    }
}
