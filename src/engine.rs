//! The DataFusion `SessionContext` every stage shares: settings, functions and the read-only
//! SQL options applied to users' files.
//!
//! Stages receive a context they did not create and talk to it only through SQL and DataFrames,
//! so the same stages can later run against a distributed (Ballista) context.

use std::sync::Arc;

use arrow::array::RecordBatch;
use datafusion::execution::memory_pool::{MemoryConsumer, MemoryReservation};
use datafusion::execution::SessionStateBuilder;
use datafusion::prelude::{DataFrame, SessionConfig, SessionContext};
use datafusion::sql::parser::Statement;

use crate::config::Project;
use crate::error::{Error, Result};
use crate::output::scratch::Scratch;
use crate::output::Outputs;
use crate::storage::Place;
use crate::tables;

/// The bytes `batch`'s rows take. Not its buffers' capacity
/// (`RecordBatch::get_array_memory_size`): a scan of one large batch yields slices of it, and
/// each slice would be charged the whole batch.
fn slice_bytes(batch: &RecordBatch) -> Result<u64> {
    let mut bytes = 0;
    for column in batch.columns() {
        bytes += column.to_data().get_slice_memory_size()? as u64;
    }
    Ok(bytes)
}

pub use crate::sql::json_check::IS_JSON;

/// A project opened for work: its context with stores and tables registered.
///
/// This is the embedding API: open a project, ingest, then run SQL over its tables.
pub struct Engine {
    /// The project.
    pub project: Project,
    /// The context every stage and query shares.
    pub ctx: SessionContext,
    /// Where events are read from.
    pub events: Place,
    /// Every place read as events: `storage.events`, then each `[[sources]]` with an event
    /// format, each with its layout.
    pub event_places: Vec<crate::storage::EventPlace>,
    /// Where tables are written.
    pub outputs: Outputs,
    /// The memory and spill limits from `[run]` (for messages; the context enforces them).
    pub limits: Limits,
    /// This engine's scratch folder (spill files, resolved events); removed with the engine,
    /// and by a later run's sweep if this process is killed.
    scratch: Scratch,
    /// The resolved events written into the scratch folder, replaced on each materialising.
    events_copy: std::sync::Mutex<Option<tempfile::TempDir>>,
    /// Set on a cluster's driver ([`Engine::run_on_cluster`]).
    on_cluster: std::sync::atomic::AtomicBool,
    /// The memory pool's share each table held in memory takes ([`Engine::hold`]), by name.
    held: std::sync::Mutex<
        std::collections::HashMap<String, datafusion::execution::memory_pool::MemoryReservation>,
    >,
    /// The folders of tables [`Engine::hold_or_write`] wrote to the scratch folder, by name.
    written: std::sync::Mutex<std::collections::HashMap<String, tempfile::TempDir>>,
}

/// Where [`Engine::hold`] and [`Engine::hold_or_write`] put a table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Held {
    /// In memory.
    InMemory,
    /// In a Parquet folder in the scratch folder.
    Written,
    /// Nowhere: it did not fit, and there was no folder to write it to.
    No,
}

/// One partition's Parquet file of a table [`Engine::hold_or_write`] writes.
struct HeldWriter {
    writer: parquet::arrow::ArrowWriter<std::fs::File>,
    schema: arrow::datatypes::SchemaRef,
    path: std::path::PathBuf,
}

impl HeldWriter {
    fn create(
        folder: &std::path::Path,
        part: usize,
        schema: arrow::datatypes::SchemaRef,
    ) -> Result<HeldWriter> {
        let path = folder.join(format!("part-{part}.parquet"));
        let file = std::fs::File::create(&path).map_err(|e| Error::io(&path, e))?;
        // Read back a few times, soon: LZ4 as for the resolved events' copy.
        let props = parquet::file::properties::WriterProperties::builder()
            .set_compression(parquet::basic::Compression::LZ4_RAW)
            .build();
        let writer = parquet::arrow::ArrowWriter::try_new(file, schema.clone(), Some(props))?;
        Ok(HeldWriter {
            writer,
            schema,
            path,
        })
    }

    /// A writer for partition `part` that starts with `batches` (the rows read before the
    /// budget passed); `None` when there are none.
    fn starting_with(
        folder: &std::path::Path,
        part: usize,
        batches: impl IntoIterator<Item = RecordBatch>,
    ) -> Result<Option<HeldWriter>> {
        let mut batches = batches.into_iter().peekable();
        let Some(first) = batches.peek() else {
            return Ok(None);
        };
        let mut writer = HeldWriter::create(folder, part, first.schema())?;
        for batch in batches {
            writer.write(&batch)?;
        }
        Ok(Some(writer))
    }

    fn write(&mut self, batch: &RecordBatch) -> Result<()> {
        self.writer.write(batch)?;
        Ok(())
    }

    /// Closes the file; returns its rows.
    fn finish(self) -> Result<u64> {
        let path = self.path;
        let meta = self
            .writer
            .close()
            .map_err(|e| Error::Internal(format!("writing {}: {e}", path.display())))?;
        Ok(meta.file_metadata().num_rows() as u64)
    }
}

/// What to check when a run on a cluster waits past its time limit, in the errors that say
/// so (the query engine's and the cluster's own).
pub const EXECUTORS_TO_CHECK: &str = "executors (`tessera cluster executor`) are running and \
     registered with the scheduler (its log names each one it adds)";

/// A report table as its query returned it: sorted by [`tables::REPORT_ORDER`], which is
/// left out. A table written before reports kept their order is returned as it is.
pub fn in_report_order(
    ctx: &SessionContext,
    provider: Arc<dyn datafusion::catalog::TableProvider>,
) -> Result<Arc<dyn datafusion::catalog::TableProvider>> {
    if provider.schema().index_of(tables::REPORT_ORDER).is_err() {
        return Ok(provider);
    }
    let view = ctx
        .read_table(provider)?
        .sort(vec![
            datafusion::prelude::col(tables::REPORT_ORDER).sort(true, false)
        ])?
        .drop_columns(&[tables::REPORT_ORDER])?;
    Ok(view.into_view())
}

impl Engine {
    /// Opens `project`: resolves its locations and registers their stores and its sources.
    ///
    /// Spill files go into the engine's scratch folder (in `run.spill_dir`, or the system's
    /// temporary folder), so a later run removes them if this process is killed.
    pub async fn open(project: Project) -> Result<Engine> {
        let limits = Limits::from_config(&project.config.run)?;
        let scratch = Scratch::create(&limits.scratch_parent())?;
        let spill = scratch.path().join("spill");
        std::fs::create_dir_all(&spill).map_err(|e| Error::io(&spill, e))?;
        let ctx = new_context_with(&Limits {
            spill_dir: Some(spill),
            ..limits.clone()
        })?;
        Self::open_limited(project, ctx, limits, scratch).await
    }

    /// Like [`Engine::open`], over a context the caller made (e.g. a distributed one); its
    /// spill settings are the caller's.
    pub async fn open_with(project: Project, ctx: SessionContext) -> Result<Engine> {
        let limits = Limits::from_config(&project.config.run)?;
        let scratch = Scratch::create(&limits.scratch_parent())?;
        Self::open_limited(project, ctx, limits, scratch).await
    }

    async fn open_limited(
        project: Project,
        ctx: SessionContext,
        limits: Limits,
        scratch: Scratch,
    ) -> Result<Engine> {
        crate::metrics::keep_freed_memory_under(limits.memory / 2);
        let storage = &project.config.storage;
        let retry = &storage.retry;
        let events = Place::open_with(&storage.events, &project.dir, "storage.events", retry)?;
        let output = Place::open_with(&storage.output, &project.dir, "storage.output", retry)?;
        if output.location.overlaps(&events.location) {
            // Each run would read its own tables (rejected_events among them) as events, and a
            // clean-up of the output could delete event files.
            return Err(Error::Location {
                key: "storage.output".into(),
                location: storage.output.clone(),
                message: format!(
                    "overlaps storage.events ({}): the output must be a folder of its own, neither inside the events folder nor holding it",
                    events
                ),
            });
        }
        events.register(&ctx);
        output.register(&ctx);
        let mut event_places = vec![crate::storage::EventPlace {
            place: events.clone(),
            format: storage.events_format,
        }];
        for (i, source) in project.config.sources.iter().enumerate() {
            let key = format!("sources[{i}].location");
            let place = Place::open_with(&source.location, &project.dir, &key, retry)?;
            place.register(&ctx);
            if source.format == crate::config::SourceFormat::Csv {
                let batch = crate::sources::read_csv_source(&place, source, &key).await?;
                ctx.register_batch(source.name.as_str(), batch)?;
                continue;
            }
            if source.format == crate::config::SourceFormat::Snowplow {
                register_delta_source(&ctx, &place, &source.name, &key, &source.location).await?;
            } else if source.format.events().is_some() {
                // A producer's lake nests its files in table and time folders, which a folder
                // registered as one table would not look into.
                if let Err(e) = register_lake_source(&ctx, &place, &source.name).await {
                    // Its tables' columns need not agree (one writes a time as INT64, another
                    // as a timestamp): its events are still read file by file, so only the
                    // combined SQL table is given up.
                    tracing::warn!(
                        source = %source.name,
                        error = %e,
                        "the source's files do not make one SQL table; its events are still read"
                    );
                }
            } else {
                let url = place.url();
                // A location naming a file has no trailing slash; a folder keeps its own.
                let url = if source.location.trim_end().ends_with(".parquet") {
                    url.as_str().trim_end_matches('/').to_string()
                } else {
                    url.to_string()
                };
                ctx.register_parquet(source.name.as_str(), url.as_str(), Default::default())
                    .await
                    .map_err(|e| Error::Location {
                        key: key.clone(),
                        location: source.location.clone(),
                        message: format!("cannot register source `{}`: {e}", source.name),
                    })?;
            }
            if let Some(format) = source.format.events() {
                if output.location.overlaps(&place.location) {
                    return Err(Error::Location {
                        key,
                        location: source.location.clone(),
                        message: "overlaps storage.output: a source read as events must not hold Tessera's own tables, nor sit inside them".into(),
                    });
                }
                event_places.push(crate::storage::EventPlace { place, format });
            }
        }
        Ok(Engine {
            limits,
            scratch,
            events_copy: std::sync::Mutex::new(None),
            on_cluster: Default::default(),
            held: std::sync::Mutex::new(Default::default()),
            written: std::sync::Mutex::new(Default::default()),
            outputs: Outputs::new(output),
            project,
            ctx,
            events,
            event_places,
        })
    }

    /// A new folder in this engine's scratch folder, removed when dropped: under
    /// `run.spill_dir`, so on a cluster the executors read what the driver writes there.
    pub fn scratch_folder(&self, prefix: &str) -> Result<tempfile::TempDir> {
        tempfile::Builder::new()
            .prefix(prefix)
            .tempdir_in(self.scratch.path())
            .map_err(|e| Error::io(self.scratch.path(), e))
    }

    /// Marks the engine as a cluster's driver: [`Engine::materialise_events`] always writes
    /// the Parquet copy (the executors read that, not the driver's memory), and a query
    /// timeout's error names the executors.
    pub fn run_on_cluster(&self) {
        self.on_cluster
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    fn on_cluster(&self) -> bool {
        self.on_cluster.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Writes `events` as it is now (checked, deduplicated, with profile_id) to local Parquet
    /// once, and registers that in its place: every later stage reads it many times, and a
    /// plain scan is far cheaper than redoing the checks and the profile join on each read.
    ///
    /// When the copy would take at most a quarter of the memory limit it is kept in memory
    /// instead ([`Engine::events_in_memory`]); `rows` is how many events there are.
    pub async fn materialise_events(&self, rows: u64) -> Result<()> {
        let mut events = self.ctx.table(tables::EVENTS).await?;
        // Only the columns something after this point can read are copied.
        if let Some(read) = self.columns_read_later()? {
            let unread: Vec<String> = events
                .schema()
                .fields()
                .iter()
                .map(|f| f.name().clone())
                .filter(|name| !read.contains(&name.to_lowercase()))
                .collect();
            if !unread.is_empty() {
                tracing::debug!(columns = ?unread, "events columns no later query reads");
                let unread: Vec<&str> = unread.iter().map(String::as_str).collect();
                events = events.drop_columns(&unread)?;
            }
        }
        if self.events_in_memory(&events, rows).await? {
            *self.events_copy.lock().expect("not poisoned") = None;
            return Ok(());
        }
        let events_schema = events.schema().as_arrow().clone();
        let dir = tempfile::Builder::new()
            .prefix("events-")
            .tempdir_in(self.scratch.path())
            .map_err(|e| Error::io(self.scratch.path(), e))?;
        let path = dir.path().join(tables::EVENTS);
        let url = format!("{}/", path.display());
        // A scratch file read back a few times: LZ4 compresses and decompresses several times
        // faster than the default zstd, and its larger size only lives in the page cache.
        let mut options = datafusion::config::TableParquetOptions::default();
        options.global.compression = Some("lz4_raw".into());
        // Without the Arrow schema in the footer, strings read back as plain UTF-8 arrays
        // (below), not as the string views they were written from followed by a cast of every
        // value (2% of a run's CPU at 10M events).
        options.global.skip_arrow_metadata = true;
        // Statistics only for the time: it is what windows filter on and the files are
        // roughly in time order. The events are not ordered by anything else, so other columns'
        // min/max would prune nothing, and computing them compared every string written
        // (resolved events 4.5 → 4.3 s at 10M).
        options.global.statistics_enabled = Some("none".into());
        options.column_specific_options.insert(
            tables::event::TIMESTAMP.to_string(),
            datafusion::config::ParquetColumnOptions {
                statistics_enabled: Some("page".into()),
                ..Default::default()
            },
        );
        let written = events
            .write_parquet(
                &url,
                datafusion::dataframe::DataFrameWriteOptions::new(),
                Some(options),
            )
            .await?;
        let rows: u64 = written
            .iter()
            .filter_map(|b| {
                b.column(0)
                    .as_any()
                    .downcast_ref::<arrow::array::UInt64Array>()
            })
            .map(|a| a.iter().flatten().sum::<u64>())
            .sum();
        if rows == 0 {
            // Nothing was written, so there is no file to read a schema from: keep the view.
            return Ok(());
        }
        self.ctx.deregister_table(tables::EVENTS)?;
        // Read back in plain types, not the default string views: a view batch is charged for
        // every page buffer it points into, so sorts over these events (sessions, windows in
        // traits and reports) thought they held several times their size and spilled (901 MiB
        // at 10M events, with no memory limit in sight); plain strings are charged what they
        // hold.
        let plain = arrow::datatypes::Schema::new(
            events_schema
                .fields()
                .iter()
                .map(|f| crate::tables::plain_field(f))
                .collect::<Vec<_>>(),
        );
        let options = datafusion::prelude::ParquetReadOptions {
            schema: Some(&plain),
            ..Default::default()
        };
        self.ctx
            .register_parquet(tables::EVENTS, &url, options)
            .await?;
        *self.events_copy.lock().expect("not poisoned") = Some(dir);
        Ok(())
    }

    /// Registers `events` (`rows` of them) as `events`, held in memory in plain types, if that
    /// takes at most a quarter of the memory limit; false (and nothing registered) otherwise.
    ///
    /// Later stages scan the resolved events many times. From memory each scan is free, where
    /// the Parquet copy is encoded once and decoded by every scan (10M events: the run 2 s
    /// faster, 2.2 GiB more resident). The size is estimated from a sample of rows first, so
    /// events far too many to hold are not read twice.
    async fn events_in_memory(&self, events: &DataFrame, rows: u64) -> Result<bool> {
        const SAMPLE_ROWS: usize = 8192;
        self.release_memory(tables::EVENTS);
        if crate::faults::events_on_disk() || self.on_cluster() {
            return Ok(false);
        }
        let budget = self.limits.memory / 4;
        let plain = crate::output::plain_columns(events.clone())?;
        let sample = plain.clone().limit(0, Some(SAMPLE_ROWS))?.collect().await?;
        let sampled: usize = sample.iter().map(RecordBatch::num_rows).sum();
        if sampled == 0 {
            return Ok(false);
        }
        // A sample sliced from larger batches counts their whole buffers: this errs high.
        let bytes: usize = sample.iter().map(RecordBatch::get_array_memory_size).sum();
        let estimate = (bytes as f64 / sampled as f64 * rows as f64) as u64;
        if estimate > budget {
            tracing::info!(
                estimate_mib = estimate >> 20,
                budget_mib = budget >> 20,
                "resolved events go to the scratch folder"
            );
            return Ok(false);
        }
        let held = self.hold(tables::EVENTS, plain, budget).await?;
        if held {
            tracing::info!(
                estimate_mib = estimate >> 20,
                budget_mib = budget >> 20,
                "resolved events kept in memory"
            );
        } else {
            tracing::info!(
                estimate_mib = estimate >> 20,
                budget_mib = budget >> 20,
                "resolved events go to the scratch folder: larger than estimated, or the pool is short"
            );
        }
        Ok(held)
    }

    /// Registers `df` as the table `name`, collected into memory, if it takes at most `budget`
    /// bytes and the memory pool can spare them: true. Otherwise false, and `name` is left as
    /// it was; collecting stops as soon as the budget is passed.
    ///
    /// What the held batches take is reserved in the engine's memory pool until `name` is held
    /// again or [`Engine::release`]d, so sorts and joins spill sooner rather than run past
    /// the limit. The batches are dealt into as many partitions as the engine runs, so scans
    /// of the table run in parallel.
    pub async fn hold(&self, name: &str, df: DataFrame, budget: u64) -> Result<bool> {
        Ok(self.hold_or(name, df, budget, None).await? == Held::InMemory)
    }

    /// Registers `df` as the table `name` for many queries to read: held in memory as
    /// [`Engine::hold`] holds it when it fits `budget`, otherwise written to a Parquet folder
    /// in the scratch folder and read from there. Either way its rows are computed once: past
    /// the budget, the batches read so far are written first and the rest follow. The files
    /// are removed when `name` is [`Engine::release`]d, held again or the engine is dropped.
    pub async fn hold_or_write(&self, name: &str, df: DataFrame, budget: u64) -> Result<()> {
        let dir = self.scratch_folder("held-")?;
        self.hold_or(name, df, budget, Some(dir)).await?;
        Ok(())
    }

    async fn hold_or(
        &self,
        name: &str,
        df: DataFrame,
        budget: u64,
        spill: Option<tempfile::TempDir>,
    ) -> Result<Held> {
        self.release_memory(name);
        let planned = Arc::new(df.schema().as_arrow().clone());
        let parts = self.ctx.copied_config().target_partitions().max(1);
        // Each partition is read on its own task (polled together from this one, the
        // partitions' decoding and expressions ran on one core: resolved events at 10M took
        // 3.7-4.5 s instead of 2.0 s). Once the budget is passed, reading stops everywhere
        // (or, with a folder to write to, every partition writes from then on).
        let read = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let over = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let folder: Option<Arc<std::path::Path>> = spill.as_ref().map(|d| d.path().into());
        let mut tasks = tokio::task::JoinSet::new();
        for (i, mut stream) in df
            .execute_stream_partitioned()
            .await?
            .into_iter()
            .enumerate()
        {
            let (read, over, folder) = (read.clone(), over.clone(), folder.clone());
            tasks.spawn(async move {
                let mut batches = Vec::new();
                let mut writer: Option<HeldWriter> = None;
                while let Some(batch) = futures::StreamExt::next(&mut stream).await {
                    let batch = batch?;
                    if let Some(w) = writer.as_mut() {
                        w.write(&batch)?;
                        continue;
                    }
                    let bytes = slice_bytes(&batch)?;
                    let before = read.fetch_add(bytes, std::sync::atomic::Ordering::Relaxed);
                    if before + bytes > budget {
                        over.store(true, std::sync::atomic::Ordering::Relaxed);
                    }
                    batches.push(batch);
                    if over.load(std::sync::atomic::Ordering::Relaxed) {
                        let Some(folder) = &folder else {
                            return Ok::<_, Error>((i, None, None));
                        };
                        writer = HeldWriter::starting_with(folder, i, batches.drain(..))?;
                    }
                }
                Ok((i, Some(batches), writer))
            });
        }
        let mut read_parts = Vec::new();
        let mut writers = Vec::new();
        while let Some(done) = tasks.join_next().await {
            let (i, batches, writer) = done.map_err(|e| {
                Error::Internal(format!("reading `{name}` into memory stopped: {e}"))
            })??;
            let Some(batches) = batches else {
                tracing::info!(
                    table = name,
                    budget_mib = budget >> 20,
                    "too large to hold in memory: read where it is"
                );
                return Ok(Held::No);
            };
            read_parts.push((i, batches));
            writers.extend(writer);
        }
        read_parts.sort_unstable_by_key(|(i, _)| *i);
        let size = read.load(std::sync::atomic::Ordering::Relaxed);
        let reservation = datafusion::execution::memory_pool::MemoryConsumer::new(format!(
            "{name} (held in memory)"
        ))
        .register(&self.ctx.runtime_env().memory_pool);
        let short = if over.load(std::sync::atomic::Ordering::Relaxed) {
            None
        } else {
            reservation.try_grow(size as usize).err()
        };
        if let Some(e) = &short {
            tracing::info!(table = name, error = %e, "not held in memory: the pool is short");
        }
        if over.load(std::sync::atomic::Ordering::Relaxed) || short.is_some() {
            let Some(spill) = spill else {
                return Ok(Held::No);
            };
            // Partitions that ended before the budget passed hold their batches still.
            for (i, batches) in read_parts {
                writers.extend(HeldWriter::starting_with(spill.path(), i, batches)?);
            }
            let mut schema = None;
            let mut rows = 0;
            for w in writers {
                schema.get_or_insert_with(|| w.schema.clone());
                rows += w.finish()?;
            }
            // Every column nullable: partitions' batches may differ from each other and from
            // the plan in nullability, and the files are read with one schema.
            let schema = schema.unwrap_or(planned);
            let schema = arrow::datatypes::Schema::new(
                schema
                    .fields()
                    .iter()
                    .map(|f| f.as_ref().clone().with_nullable(true))
                    .collect::<Vec<_>>(),
            );
            let url = format!("{}/", spill.path().display());
            self.ctx.deregister_table(name)?;
            let options = datafusion::prelude::ParquetReadOptions {
                schema: Some(&schema),
                ..Default::default()
            };
            self.ctx.register_parquet(name, &url, options).await?;
            tracing::info!(
                table = name,
                rows,
                budget_mib = budget >> 20,
                "too large to hold in memory: written once to the scratch folder"
            );
            self.written
                .lock()
                .expect("not poisoned")
                .insert(name.to_string(), spill);
            return Ok(Held::Written);
        }
        let mut partitions = vec![Vec::new(); parts];
        for (n, batch) in read_parts.into_iter().flat_map(|(_, b)| b).enumerate() {
            partitions[n % parts].push(batch);
        }
        // The batches' own schema: the plan's may differ from it in nullability.
        let schema = partitions
            .iter()
            .flatten()
            .next()
            .map(RecordBatch::schema)
            .unwrap_or(planned);
        let table = datafusion::datasource::MemTable::try_new(schema, partitions)?;
        self.ctx.deregister_table(name)?;
        self.ctx.register_table(name, Arc::new(table))?;
        self.held
            .lock()
            .expect("not poisoned")
            .insert(name.to_string(), reservation);
        Ok(Held::InMemory)
    }

    /// Deregisters the table `name` and gives back the memory it held ([`Engine::hold`]).
    pub fn release(&self, name: &str) -> Result<()> {
        self.ctx.deregister_table(name)?;
        self.release_memory(name);
        Ok(())
    }

    /// Gives back the pool's share that `name` held, if it held any.
    pub(crate) fn release_memory(&self, name: &str) {
        self.held.lock().expect("not poisoned").remove(name);
        self.written.lock().expect("not poisoned").remove(name);
    }

    /// The `events` columns (lowercased) that stages after identity can read: those the
    /// pipeline's own code uses and every name that appears in a trait, segment or report query.
    /// `None` when any of those queries selects `*` or does not tokenize (its own stage reports
    /// that), so every column is kept.
    fn columns_read_later(&self) -> Result<Option<std::collections::HashSet<String>>> {
        let mut read: std::collections::HashSet<String> =
            NATIVE_COLUMNS.iter().map(|c| c.to_string()).collect();
        let dialect = self.ctx.state().config().options().sql_parser.dialect;
        // Data tests (`queries/tests/`, `[[tests]]`) read the events as later stages do.
        for kind in ["traits", tables::SEGMENTS, tables::REPORTS, "tests"] {
            for query in self.project.query_files(kind)? {
                match names_in_sql(&query.sql, dialect) {
                    Some(names) => read.extend(names),
                    None => return Ok(None),
                }
            }
        }
        for test in &self.project.config.tests {
            read.insert(test.column.to_lowercase());
            if let Some(to) = &test.relationships {
                read.insert(to.field.to_lowercase());
            }
        }
        Ok(Some(read))
    }

    /// Makes sure a schema of folder tables (`segments`, `reports`) exists in the context.
    pub fn ensure_schema(&self, schema: &str) -> Result<()> {
        let catalog = self
            .ctx
            .catalog("datafusion")
            .ok_or_else(|| Error::Internal("the default catalog is missing".into()))?;
        if catalog.schema(schema).is_none() {
            catalog.register_schema(
                schema,
                Arc::new(datafusion::catalog::MemorySchemaProvider::new()),
            )?;
        }
        Ok(())
    }

    /// Starts measuring a stage (time, memory, bytes read, spill).
    pub fn meter(&self) -> crate::metrics::Meter {
        crate::metrics::Meter::start(self.ctx.runtime_env().disk_manager.clone())
    }

    /// Registers the output tables that exist, so SQL can read them.
    pub async fn register_outputs(&self) -> Result<Vec<String>> {
        // A table a run retired stays on disk until the retention passes; it is not shown.
        let live = crate::output::published(&self.outputs, &self.ctx).await?;
        let shown = |name: &str| live.as_ref().is_none_or(|l| l.contains(name));
        for folder in [tables::SEGMENTS, tables::REPORTS] {
            self.ensure_schema(folder)?;
            for name in self.outputs.folder_tables(folder).await? {
                let table = format!("{folder}/{name}");
                if !shown(&table) {
                    continue;
                }
                if let Some(provider) = self.outputs.provider(&self.ctx, &table).await? {
                    let reference =
                        datafusion::common::TableReference::partial(folder, name.as_str());
                    let provider = if folder == tables::REPORTS {
                        in_report_order(&self.ctx, provider)?
                    } else {
                        provider
                    };
                    self.ctx.register_table(reference, provider)?;
                }
            }
        }
        let names: Vec<&str> = tables::OUTPUT_TABLES
            .iter()
            .copied()
            .filter(|n| crate::output::always_published(n) || shown(n))
            .collect();
        self.outputs.register(&self.ctx, &names).await
    }

    /// Runs `work`, the query `what` names (a SQL file, or one of Tessera's own stages),
    /// under `run.query_timeout`. Past the limit `work` is dropped: that cancels its streams,
    /// and with them the tasks they spawned, so the run fails at once and lets its lease go
    /// instead of holding it for as long as the query would run (a recursive CTE may never end).
    pub async fn in_time<T>(
        &self,
        what: &str,
        work: impl std::future::Future<Output = Result<T>>,
    ) -> Result<T> {
        match tokio::time::timeout(self.limits.query_timeout, work).await {
            Ok(done) => done,
            Err(_) => Err(Error::QueryTimeout {
                query: what.to_string(),
                limit: self.limits.query_timeout_text.clone(),
                hint: if self.on_cluster() {
                    format!(
                        "; on a cluster, also check that {EXECUTORS_TO_CHECK}: a scheduler with \
                         none holds the work"
                    )
                } else {
                    String::new()
                },
            }),
        }
    }

    /// Runs `df`, `file`'s query, to the end like [`Engine::collect`], charging every batch it
    /// returns to a reservation of the engine's memory pool named `holder`. A result larger
    /// than the pool can spare fails with the pool's error ("Resources exhausted") instead of
    /// growing unseen past the memory limit. The reservation is returned with the batches and
    /// should live as long as they do.
    pub async fn collect_reserved(
        &self,
        df: DataFrame,
        file: &str,
        holder: String,
    ) -> Result<(Vec<RecordBatch>, MemoryReservation)> {
        let reservation = MemoryConsumer::new(holder).register(&self.ctx.runtime_env().memory_pool);
        let task = Arc::new(df.task_ctx());
        let plan = df
            .create_physical_plan()
            .await
            .map_err(|e| Error::query(file, e))?;
        let mut stream = datafusion::physical_plan::execute_stream(plan.clone(), task)
            .map_err(|e| Error::query(file, e))?;
        let mut batches = Vec::new();
        while let Some(batch) = futures::StreamExt::next(&mut stream).await {
            let batch = batch.map_err(|e| Error::query(file, e))?;
            reservation.try_grow(slice_bytes(&batch)? as usize)?;
            batches.push(batch);
        }
        self.log_plan(&plan, file);
        Ok((batches, reservation))
    }

    /// Keeps `reservation` (memory that the table `name`, held in the context, takes) until
    /// `name` is held again or released.
    pub fn keep_reserved(&self, name: &str, reservation: MemoryReservation) {
        self.held
            .lock()
            .expect("not poisoned")
            .insert(name.to_string(), reservation);
    }

    fn log_plan(&self, plan: &Arc<dyn datafusion::physical_plan::ExecutionPlan>, file: &str) {
        if tracing::enabled!(tracing::Level::DEBUG) {
            let shown = datafusion::physical_plan::display::DisplayableExecutionPlan::with_metrics(
                plan.as_ref(),
            )
            .indent(true)
            .to_string();
            tracing::debug!(file, plan = %shown, "query ran");
        }
    }

    /// Runs one read-only query; `file` names it in errors.
    pub async fn query(&self, sql: &str, file: &str) -> Result<datafusion::dataframe::DataFrame> {
        check_read_only(&self.ctx, sql, file)?;
        self.ctx
            .sql_with_options(sql, read_only())
            .await
            .map_err(|e| Error::query_failed(file, e))
    }

    /// Runs `df`, `file`'s query, to the end. At debug level (`-vv`) the plan it ran is logged
    /// with each operator's rows, time, memory and spill, as `tessera query --explain` prints
    /// them, but over the events the run itself saw.
    pub async fn collect(&self, df: DataFrame, file: &str) -> Result<Vec<RecordBatch>> {
        let task = Arc::new(df.task_ctx());
        let plan = df
            .create_physical_plan()
            .await
            .map_err(|e| Error::query_failed(file, e))?;
        let batches = datafusion::physical_plan::collect(plan.clone(), task)
            .await
            .map_err(|e| Error::query_failed(file, e))?;
        self.log_plan(&plan, file);
        Ok(batches)
    }
}

/// SQL options for users' files: no DDL, no DML, no `SET`.
pub fn read_only() -> datafusion::execution::context::SQLOptions {
    datafusion::execution::context::SQLOptions::new()
        .with_allow_ddl(false)
        .with_allow_dml(false)
        .with_allow_statements(false)
}

/// Memory and spilling limits of a context.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Bytes the query engine's memory pool holds; sorts, aggregations and joins spill or
    /// fail (with a clear error) beyond it.
    pub memory: u64,
    /// The limit as the user wrote it (or the default), for messages.
    pub memory_text: String,
    /// Where spill files go (default: the system's temporary folder). An engine's scratch
    /// folder is made here too.
    pub spill_dir: Option<std::path::PathBuf>,
    /// Most bytes all spill files together may take.
    pub max_spill: u64,
    /// Longest one query may run (`run.query_timeout`); see [`Engine::in_time`].
    pub query_timeout: std::time::Duration,
    /// That limit as the user wrote it, for messages.
    pub query_timeout_text: String,
}

/// This machine's memory in bytes: the smaller of physical memory and the cgroup limit.
pub fn total_memory() -> u64 {
    let physical = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map(|kb| kb * 1024)
        .unwrap_or(8 << 30);
    let cgroup = std::fs::read_to_string("/sys/fs/cgroup/memory.max")
        .ok()
        .and_then(|t| t.trim().parse::<u64>().ok());
    cgroup.map_or(physical, |c| c.min(physical))
}

impl Limits {
    /// Where scratch folders are made: `spill_dir`, else the system's temporary folder.
    pub fn scratch_parent(&self) -> std::path::PathBuf {
        self.spill_dir.clone().unwrap_or_else(std::env::temp_dir)
    }

    /// The limits `[run]` asks for.
    pub fn from_config(run: &crate::config::RunConfig) -> Result<Limits> {
        let total = total_memory();
        let bad = |key: &str, value: &str| {
            Error::Usage(format!(
                "{key} = \"{value}\" is not a size: write e.g. \"4GiB\", \"512MiB\" or \"60%\""
            ))
        };
        let memory = crate::config::parse_size(&run.memory_limit, total)
            .ok_or_else(|| bad("memory limit", &run.memory_limit))?;
        let max_spill = crate::config::parse_size(&run.max_spill, total)
            .ok_or_else(|| bad("run.max_spill", &run.max_spill))?;
        let query_timeout = crate::config::parse_duration(&run.query_timeout).ok_or_else(|| {
            Error::Usage(format!(
                "run.query_timeout = \"{}\" is not a time limit: write e.g. \"30m\", \"90s\" or \"2h\" (at least 1 second, at most 7 days)",
                run.query_timeout
            ))
        })?;
        Ok(Limits {
            memory,
            memory_text: format!("{} ({} MiB)", run.memory_limit, memory >> 20),
            spill_dir: run.spill_dir.as_ref().map(std::path::PathBuf::from),
            max_spill,
            query_timeout,
            query_timeout_text: format!("{} (run.query_timeout)", run.query_timeout.trim()),
        })
    }
}

/// A new context with Tessera's settings and functions and the default limits.
pub fn new_context() -> Result<SessionContext> {
    new_context_with(&Limits::from_config(&Default::default())?)
}

/// A new context with Tessera's settings and functions, under `limits`.
pub fn new_context_with(limits: &Limits) -> Result<SessionContext> {
    use datafusion::execution::disk_manager::{DiskManagerBuilder, DiskManagerMode};
    use datafusion::execution::memory_pool::{FairSpillPool, TrackConsumersPool};
    // Freed memory the allocator keeps for reuse counts against the limit too.
    crate::metrics::keep_freed_memory_under(limits.memory / 2);
    let pool = TrackConsumersPool::new(
        FairSpillPool::new(limits.memory as usize),
        std::num::NonZeroUsize::new(5).expect("non-zero"),
    );
    let mut disk = DiskManagerBuilder::default().with_max_temp_directory_size(limits.max_spill);
    if let Some(dir) = &limits.spill_dir {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        disk = disk.with_mode(DiskManagerMode::Directories(vec![dir.clone()]));
    }
    let runtime = datafusion::execution::runtime_env::RuntimeEnvBuilder::new()
        .with_memory_pool(Arc::new(pool))
        .with_disk_manager_builder(disk)
        .build_arc()?;
    let config = SessionConfig::new()
        .with_information_schema(true)
        // Output must be plain UTF-8 for BI tools; view types would leak into every table.
        .set_bool(
            "datafusion.execution.parquet.schema_force_view_types",
            false,
        )
        .set_bool("datafusion.sql_parser.map_string_types_to_utf8view", false)
        // Tables are written by one delta-rs writer task per table, with these options:
        // snappy encodes several times faster than the default zstd(3) and every BI tool
        // reads it (it is Spark's default).
        .set_str("datafusion.execution.parquet.compression", "snappy")
        // Sessions at 100M events spill several GiB under a 4 GiB limit: LZ4 keeps the spill
        // files smaller (a full disk stopped such a run) at little CPU cost.
        .set_str("datafusion.execution.spill_compression", "lz4_frame")
        // On by default in 55: moves json_get_* below filters so it parses every row
        // (measured 8x more parses), and breaks some nested string expressions.
        .set_bool(
            "datafusion.optimizer.enable_leaf_expression_pushdown",
            false,
        );
    let state = SessionStateBuilder::new()
        .with_config(config)
        .with_runtime_env(runtime)
        .with_default_features();
    let state = crate::sql::add_rules(state)
        // delta-rs plans its writes with extension nodes only its planner knows.
        .with_query_planner(deltalake::delta_datafusion::planner::DeltaPlanner::new())
        .build();
    let mut ctx = SessionContext::new_with_state(state);
    crate::sql::register_functions(&mut ctx)?;
    Ok(ctx)
}

pub use crate::sql::json_check::is_json;

/// `events` columns read by the pipeline's own code after identity resolution: sessions and
/// first touches, last-known traits, event counts, RFM and predictions.
const NATIVE_COLUMNS: &[&str] = &[
    tables::event::MESSAGE_ID,
    tables::event::PROFILE_ID,
    tables::event::TYPE,
    tables::event::EVENT,
    tables::event::TIMESTAMP,
    tables::event::TRAITS,
    tables::event::PROPERTIES,
    tables::event::CONTEXT,
];

/// Every word and quoted name in `sql`, lowercased: a superset of the columns it can name.
/// `None` if it selects `*` (all columns) or cannot be split into tokens.
fn names_in_sql(sql: &str, dialect: impl AsRef<str>) -> Option<Vec<String>> {
    use datafusion::sql::sqlparser::keywords::Keyword;
    use datafusion::sql::sqlparser::tokenizer::{Token, Tokenizer};
    let dialect = datafusion::sql::sqlparser::dialect::dialect_from_str(dialect)
        .unwrap_or_else(|| Box::new(datafusion::sql::sqlparser::dialect::GenericDialect {}));
    let tokens = Tokenizer::new(dialect.as_ref(), sql).tokenize().ok()?;
    let mut names = Vec::new();
    let mut previous: Option<&Token> = None;
    for token in &tokens {
        match token {
            Token::Whitespace(_) => continue,
            Token::Word(word) => names.push(word.value.to_lowercase()),
            // `*` after SELECT, DISTINCT, ALL, a comma or a qualifier's dot is a wildcard;
            // after `(` (count(*)) or an operand it is not.
            Token::Mul => {
                let wildcard = match previous {
                    Some(Token::Comma | Token::Period) => true,
                    Some(Token::Word(w)) => {
                        matches!(
                            w.keyword,
                            Keyword::SELECT | Keyword::DISTINCT | Keyword::ALL
                        )
                    }
                    _ => false,
                };
                if wildcard {
                    return None;
                }
            }
            _ => {}
        }
        previous = Some(token);
    }
    Some(names)
}

/// Checks that `sql` holds exactly one read-only statement (a query); `file` names it in errors.
///
/// DataFusion's `SQLOptions` refuse DDL, DML and `SET` while planning; this check runs first so
/// the message names the file and the kind of statement, and also refuses `COPY`.
pub fn check_read_only(ctx: &SessionContext, sql: &str, file: &str) -> Result<Statement> {
    let dialect = ctx.state().config().options().sql_parser.dialect;
    let mut statements = datafusion::sql::parser::DFParser::parse_sql_with_dialect(
        sql,
        datafusion::sql::sqlparser::dialect::dialect_from_str(dialect)
            .unwrap_or_else(|| Box::new(datafusion::sql::sqlparser::dialect::GenericDialect {}))
            .as_ref(),
    )
    .map_err(|e| Error::query(file, format!("cannot parse SQL: {e}")))?;
    if statements.len() != 1 {
        return Err(Error::query(
            file,
            format!(
                "holds {} statements; a query file holds exactly one SELECT",
                statements.len()
            ),
        ));
    }
    let statement = statements.pop_front().expect("one statement");
    match &statement {
        Statement::Statement(s)
            if matches!(**s, datafusion::sql::sqlparser::ast::Statement::Query(_)) =>
        {
            Ok(statement)
        }
        other => {
            let text = other.to_string();
            let kind: String = text
                .split_whitespace()
                .take(2)
                .collect::<Vec<_>>()
                .join(" ");
            Err(Error::query(
                file,
                format!(
                    "`{kind} …` is not allowed: query files may only read (SELECT/WITH); DDL, DML, COPY and SET are refused"
                ),
            ))
        }
    }
}

/// Registers a source that is a Delta table (the Snowplow lake loader's) under its name, so SQL
/// reads its live files as the table's log says, with its partition columns.
async fn register_delta_source(
    ctx: &SessionContext,
    place: &Place,
    name: &str,
    key: &str,
    location: &str,
) -> Result<()> {
    let fail = |message: String| Error::Location {
        key: key.to_string(),
        location: location.to_string(),
        message,
    };
    let url = place.url();
    let table = deltalake::DeltaTableBuilder::from_url(url.clone())
        .map_err(|e| fail(format!("cannot open source `{name}` as a Delta table: {e}")))?
        .with_storage_backend(place.store.clone(), url)
        .load()
        .await
        .map_err(|e| {
            fail(format!(
                "cannot open source `{name}` as a Delta table ({e}); format = \"snowplow\" reads the lake loader's Delta table: point location at the folder holding _delta_log"
            ))
        })?;
    table
        .update_datafusion_session(&ctx.state())
        .map_err(|e| fail(format!("cannot register source `{name}`: {e}")))?;
    let provider = table
        .table_provider()
        .await
        .map_err(|e| fail(format!("cannot register source `{name}`: {e}")))?;
    ctx.register_table(name, provider)
        .map_err(|e| fail(format!("cannot register source `{name}`: {e}")))?;
    Ok(())
}

/// Registers every Parquet file below `place` (at any depth, markers and hidden files left
/// out) as one SQL table named `name`, its columns merged from the files' own.
async fn register_lake_source(
    ctx: &SessionContext,
    place: &Place,
    name: &str,
) -> datafusion::error::Result<()> {
    use datafusion::datasource::listing::{
        ListingOptions, ListingTable, ListingTableConfig, ListingTableUrl,
    };
    use futures::TryStreamExt;
    let listed: Vec<object_store::ObjectMeta> =
        place.store.list(Some(&place.prefix)).try_collect().await?;
    let mut urls = Vec::new();
    for meta in listed {
        let hidden = meta
            .location
            .prefix_match(&place.prefix)
            .is_some_and(|mut parts| parts.any(|p| p.as_ref().starts_with(['_', '.'])));
        if meta.location.as_ref().ends_with(".parquet") && !hidden {
            let url = place.url_of(&meta.location);
            urls.push(ListingTableUrl::parse(url.as_str().trim_end_matches('/'))?);
        }
    }
    if urls.is_empty() {
        return Err(datafusion::error::DataFusionError::Plan(
            "no Parquet files below its location".into(),
        ));
    }
    let state = ctx.state();
    let options = ListingOptions::new(Arc::new(
        datafusion::datasource::file_format::parquet::ParquetFormat::default(),
    ))
    .with_file_extension(".parquet");
    let config = ListingTableConfig::new_with_multi_paths(urls)
        .with_listing_options(options)
        .infer_schema(&state)
        .await?;
    ctx.register_table(name, Arc::new(ListingTable::try_new(config)?))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::ArrayRef;

    #[test]
    fn names_in_sql_keeps_every_word_and_gives_up_on_wildcards() {
        let names = names_in_sql(
            r#"SELECT profile_id, count(*) AS n, 2 * sum(x."Revenue") FROM events e WHERE "user_id" IS NOT NULL"#,
            "generic",
        )
        .expect("no wildcard");
        for name in ["profile_id", "revenue", "user_id", "events"] {
            assert!(names.contains(&name.to_string()), "{name}: {names:?}");
        }
        assert!(!names.contains(&"anonymous_id".to_string()));
        for sql in [
            "SELECT * FROM events",
            "SELECT DISTINCT * FROM events",
            "SELECT a, * FROM events",
            "SELECT e.* FROM events e",
            "SELECT 'unterminated FROM events",
        ] {
            assert_eq!(names_in_sql(sql, "generic"), None, "{sql}");
        }
    }

    #[test]
    fn json_check() {
        assert!(is_json(r#"{"a": [1, 2, {"b": null}]}"#));
        assert!(is_json("  {}  "));
        assert!(is_json("\"text\""));
        assert!(!is_json(r#"{"a": 1"#));
        assert!(!is_json("{a: 1}"));
        assert!(!is_json(""));
        assert!(!is_json("{} {}"));
        assert!(!is_json("[1,]"));
        assert!(!is_json("NaN"));
        assert!(!is_json(r#""\x""#));
        assert!(!is_json("{\"a\": tru}"));
        assert!(is_json(r#"{"emoji": "\ud83d\ude00", "n": -1.5e3}"#));
    }

    /// An engine over an empty project with a 256 MiB memory limit (and its folder).
    async fn engine_with_256_mib() -> (tempfile::TempDir, Engine) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join(crate::config::CONFIG_FILE),
            "[storage]\nevents = \"events\"\noutput = \"out\"\n[run]\nmemory_limit = \"256MiB\"\n",
        )
        .unwrap();
        let engine = Engine::open(Project::load(dir.path()).unwrap())
            .await
            .unwrap();
        (dir, engine)
    }

    #[tokio::test]
    async fn a_held_table_takes_its_share_of_the_pool_until_released() {
        let (_dir, engine) = engine_with_256_mib().await;
        let pool = engine.ctx.runtime_env().memory_pool.clone();
        let values = arrow::array::Int64Array::from_iter_values(0..1_000_000);
        let batch = RecordBatch::try_from_iter([("v", Arc::new(values) as ArrayRef)]).unwrap();
        let size = slice_bytes(&batch).unwrap();
        let df = engine.ctx.read_batch(batch).unwrap();
        let sum = |engine: &Engine| {
            let ctx = engine.ctx.clone();
            async move {
                let batches = ctx.sql("SELECT sum(v) FROM held").await?.collect().await?;
                Ok::<_, crate::error::Error>(
                    batches[0]
                        .column(0)
                        .as_any()
                        .downcast_ref::<arrow::array::Int64Array>()
                        .expect("sum of Int64")
                        .value(0),
                )
            }
        };

        // Too large for the budget: nothing registered, nothing reserved.
        assert!(!engine.hold("held", df.clone(), size / 2).await.unwrap());
        assert!(!engine.ctx.table_exist("held").unwrap());
        assert_eq!(pool.reserved(), 0);

        assert!(engine.hold("held", df.clone(), size * 2).await.unwrap());
        assert_eq!(pool.reserved() as u64, size);
        assert_eq!(sum(&engine).await.unwrap(), 499_999_500_000);
        // Held again: the old share is given back, not added to.
        assert!(engine.hold("held", df.clone(), size * 2).await.unwrap());
        assert_eq!(pool.reserved() as u64, size);

        engine.release("held").unwrap();
        assert_eq!(pool.reserved(), 0);
        assert!(!engine.ctx.table_exist("held").unwrap());
        // More than the pool can spare is not held, whatever the budget.
        let other =
            datafusion::execution::memory_pool::MemoryConsumer::new("other").register(&pool);
        other.grow((256 << 20) - size as usize / 2);
        assert!(!engine.hold("held", df, u64::MAX).await.unwrap());
        assert!(!engine.ctx.table_exist("held").unwrap());
        drop(other);
        assert_eq!(pool.reserved(), 0);
    }

    #[tokio::test]
    async fn rows_past_the_budget_are_written_once_to_the_scratch_folder_until_released() {
        let (_dir, engine) = engine_with_256_mib().await;
        let pool = engine.ctx.runtime_env().memory_pool.clone();
        // Eight batches over the engine's partitions, counted as they are read.
        let batches: Vec<RecordBatch> = (0..8)
            .map(|b| {
                let values = arrow::array::Int64Array::from_iter_values(b * 1000..(b + 1) * 1000);
                RecordBatch::try_from_iter([("v", Arc::new(values) as ArrayRef)]).unwrap()
            })
            .collect();
        let size: u64 = batches.iter().map(|b| slice_bytes(b).unwrap()).sum();
        let table = datafusion::datasource::MemTable::try_new(
            batches[0].schema(),
            batches.chunks(2).map(|c| c.to_vec()).collect(),
        )
        .unwrap();
        let df = engine.ctx.read_table(Arc::new(table)).unwrap();
        let scratch_files = |engine: &Engine| -> usize {
            walk(engine.scratch.path())
                .iter()
                .filter(|p| p.extension().is_some_and(|e| e == "parquet"))
                .count()
        };
        let rows = |engine: &Engine| {
            let ctx = engine.ctx.clone();
            async move {
                let batches = ctx
                    .sql("SELECT count(*), sum(v), count(DISTINCT v) FROM held")
                    .await?
                    .collect()
                    .await?;
                let value = |i: usize| {
                    batches[0]
                        .column(i)
                        .as_any()
                        .downcast_ref::<arrow::array::Int64Array>()
                        .expect("Int64")
                        .value(0)
                };
                Ok::<_, crate::error::Error>((value(0), value(1), value(2)))
            }
        };
        let expected = (8000, (0..8000).sum::<i64>(), 8000);

        // Within the budget: in memory, no file.
        engine
            .hold_or_write("held", df.clone(), size * 2)
            .await
            .unwrap();
        assert_eq!(pool.reserved() as u64, size);
        assert_eq!(scratch_files(&engine), 0);
        assert_eq!(rows(&engine).await.unwrap(), expected);

        // Past it: every row once (those read before the budget passed, and the rest), in
        // files, with nothing reserved in the pool.
        engine.hold_or_write("held", df, size / 3).await.unwrap();
        assert_eq!(pool.reserved(), 0);
        assert!(scratch_files(&engine) > 0);
        assert_eq!(rows(&engine).await.unwrap(), expected);

        engine.release("held").unwrap();
        assert!(!engine.ctx.table_exist("held").unwrap());
        assert_eq!(scratch_files(&engine), 0, "released: its files are removed");
    }

    /// Every file under `dir`.
    fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                out.extend(walk(&path));
            } else {
                out.push(path);
            }
        }
        out
    }

    #[tokio::test]
    async fn read_only_check_refuses_writes() {
        let ctx = new_context().unwrap();
        assert!(check_read_only(&ctx, "SELECT 1", "q.sql").is_ok());
        assert!(check_read_only(&ctx, "WITH a AS (SELECT 1) SELECT * FROM a", "q.sql").is_ok());
        for sql in [
            "CREATE TABLE t AS SELECT 1",
            "DROP TABLE events",
            "INSERT INTO t VALUES (1)",
            "COPY (SELECT 1) TO '/tmp/x.parquet'",
            "SET datafusion.execution.batch_size = 1",
            "CREATE EXTERNAL TABLE t STORED AS PARQUET LOCATION '/tmp'",
            "SELECT 1; SELECT 2",
        ] {
            let err = check_read_only(&ctx, sql, "queries/x.sql")
                .unwrap_err()
                .to_string();
            assert!(err.starts_with("queries/x.sql:"), "{sql}: {err}");
        }
    }
}
