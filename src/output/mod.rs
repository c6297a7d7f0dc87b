//! Output tables: Delta Lake tables under `storage.output`, each replaced or appended in one
//! commit, with plain types every BI tool reads (UTF-8 strings, µs UTC timestamps).

pub mod lease;
pub mod manifest;
pub mod publish;
pub mod scratch;
pub mod state;

use std::sync::{Arc, OnceLock};

use datafusion::common::Column;
use datafusion::dataframe::DataFrame;
use datafusion::logical_expr::{cast, Expr};
use datafusion::prelude::SessionContext;
use deltalake::kernel::transaction::CommitProperties;
use deltalake::logstore::{
    default_logstore, logstore_factories, LogStore, LogStoreFactory, ObjectStoreRef, StorageConfig,
};
use deltalake::operations::write::SchemaMode;
use deltalake::protocol::SaveMode;
use deltalake::{DeltaResult, DeltaTable, DeltaTableBuilder, DeltaTableError};
use futures::StreamExt;
use object_store::ObjectStoreExt;
use url::Url;

use crate::error::{Error, Result};
use crate::storage::Place;
use crate::tables::plain_type;

/// How a table is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteMode {
    /// The new version holds exactly the rows written.
    Replace,
    /// The rows are added to the current version.
    Append,
}

/// What one table commit produced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Committed {
    /// The Delta version created.
    pub version: u64,
    /// Rows written by this commit.
    pub rows: u64,
    /// Not written by this run: the table's node was unchanged, and this is the version it
    /// carried over (with the rows of the commit that wrote it).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub carried: bool,
}

/// How table files are encoded: snappy (as delta-rs does by default; several times faster
/// to encode than zstd and read by every BI tool), except the event history, Tessera's own
/// state, in LZ4 (faster again to write and to read back: a run reads it twice), and no
/// min/max statistics for the JSON text columns. Their values share long prefixes, so
/// computing a page's minimum and maximum compared most of every document's bytes, and no
/// filter prunes files by a JSON document's text range.
fn writer_properties(table: &str) -> parquet::file::properties::WriterProperties {
    use parquet::file::properties::EnabledStatistics;
    let compression = if table == crate::tables::state::EVENTS {
        parquet::basic::Compression::LZ4_RAW
    } else {
        parquet::basic::Compression::SNAPPY
    };
    let mut builder =
        parquet::file::properties::WriterProperties::builder().set_compression(compression);
    for column in [
        crate::tables::event::CONTEXT,
        crate::tables::event::PROPERTIES,
        crate::tables::event::TRAITS,
    ] {
        builder = builder.set_column_statistics_enabled(column.into(), EnabledStatistics::None);
    }
    builder.build()
}

/// The output tables of a project.
#[derive(Debug, Clone)]
pub struct Outputs {
    place: Place,
}

/// delta-rs ships no log store for `s3://` unless built with the whole AWS SDK; we hand it our
/// own object_store S3 client and the default log store (commits by conditional create).
struct S3LogStoreFactory;

impl LogStoreFactory for S3LogStoreFactory {
    fn with_options(
        &self,
        prefixed_store: ObjectStoreRef,
        root_store: ObjectStoreRef,
        location: &Url,
        options: &StorageConfig,
    ) -> DeltaResult<Arc<dyn LogStore>> {
        Ok(default_logstore(
            prefixed_store,
            root_store,
            location,
            options,
        ))
    }
}

fn register_s3_logstore() {
    static DONE: OnceLock<()> = OnceLock::new();
    DONE.get_or_init(|| {
        let scheme = Url::parse("s3://").expect("static URL");
        logstore_factories().insert(scheme, Arc::new(S3LogStoreFactory));
    });
}

impl Outputs {
    /// The output tables under `place`.
    pub fn new(place: Place) -> Self {
        register_s3_logstore();
        Outputs { place }
    }

    /// Where the tables live.
    pub fn place(&self) -> &Place {
        &self.place
    }

    /// The URL of table `name`.
    pub fn table_url(&self, name: &str) -> Url {
        self.place.url_of(&self.place.child(name))
    }

    /// The folder of table `name` when the output is local.
    fn local_dir(&self, name: &str) -> Option<std::path::PathBuf> {
        match &self.place.location {
            crate::storage::Location::Local(dir) => {
                Some(name.split('/').fold(dir.clone(), |d, p| d.join(p)))
            }
            _ => None,
        }
    }

    fn builder(&self, name: &str) -> Result<DeltaTableBuilder> {
        let url = self.table_url(name);
        Ok(DeltaTableBuilder::from_url(url.clone())
            .map_err(|e| Error::delta(name, e))?
            .with_storage_backend(self.place.store.clone(), url))
    }

    /// Opens table `name` at its latest version; `None` when it has never been written.
    pub async fn open(&self, name: &str) -> Result<Option<DeltaTable>> {
        // Asking delta-rs about a folder without a log makes its kernel log an error; look first.
        let log = self.place.child(name).join("_delta_log");
        if self.place.store.list(Some(&log)).next().await.is_none() {
            return Ok(None);
        }
        let mut table = self
            .builder(name)?
            .build()
            .map_err(|e| Error::delta(name, e))?;
        match table.load().await {
            Ok(()) => Ok(Some(table)),
            Err(DeltaTableError::NotATable(_)) => Ok(None),
            Err(e) => Err(Error::delta(name, e)),
        }
    }

    /// Opens table `name` at `version` (to read a set of tables a `runs` row pinned).
    pub async fn open_version(&self, name: &str, version: u64) -> Result<DeltaTable> {
        let mut table = self
            .builder(name)?
            .build()
            .map_err(|e| Error::delta(name, e))?;
        table
            .load_version(version)
            .await
            .map_err(|e| Error::delta(name, e))?;
        Ok(table)
    }

    /// Writes `df` to table `name` in one commit (creating the table on first write).
    pub async fn write(
        &self,
        ctx: &SessionContext,
        name: &str,
        df: DataFrame,
        mode: WriteMode,
    ) -> Result<Committed> {
        let df = plain_columns(df)?;
        if let Some(dir) = self.local_dir(name) {
            // delta-rs refuses a local table location that does not exist yet.
            std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        }
        let table = match self.open(name).await? {
            Some(table) => {
                self.check_owned(name, &table)?;
                table
            }
            None => {
                self.check_free(name).await?;
                self.builder(name)?
                    .build()
                    .map_err(|e| Error::delta(name, e))?
            }
        };
        let (save, schema) = match mode {
            WriteMode::Replace => (SaveMode::Overwrite, SchemaMode::Overwrite),
            WriteMode::Append => (SaveMode::Append, SchemaMode::Merge),
        };
        let table = table
            .write(Vec::new())
            .with_input_plan(df.into_unoptimized_plan())
            .with_session_state(Arc::new(ctx.state()))
            .with_save_mode(save)
            .with_schema_mode(schema)
            .with_writer_properties(writer_properties(name))
            .with_table_name(name)
            // Checkpoints and log clean-up are post-commit work on the real log: Tessera does
            // them after publishing (`Outputs::tidy`), never from inside a staged run.
            .with_commit_properties(
                CommitProperties::default()
                    .with_create_checkpoint(false)
                    .with_cleanup_expired_logs(Some(false)),
            )
            .await
            .map_err(|e| Error::delta(name, e))?;
        let version = table.version().unwrap_or(0);
        let rows = last_commit_rows(&table).await;
        tracing::debug!(table = name, version, rows, "committed");
        Ok(Committed {
            version,
            rows,
            carried: false,
        })
    }

    /// Refuses to create table `name` in a folder that holds anything but the data files a
    /// dead run of Tessera left there: an output folder shared with other tools keeps their
    /// files, and a later clean-up never deletes them.
    async fn check_free(&self, name: &str) -> Result<()> {
        let folder = self.place.child(name);
        let mut listing = self.place.store.list(Some(&folder));
        while let Some(meta) = listing.next().await {
            let meta = match meta {
                Ok(meta) => meta,
                Err(object_store::Error::NotFound { .. }) => return Ok(()),
                Err(e) => return Err(e.into()),
            };
            let inside = meta
                .location
                .prefix_match(&folder)
                .map(|parts| {
                    parts
                        .map(|p| p.as_ref().to_string())
                        .collect::<Vec<_>>()
                        .join("/")
                })
                .unwrap_or_default();
            if !is_written_data_file(&inside) {
                return Err(Error::Location {
                    key: "storage.output".into(),
                    location: self.place.to_string(),
                    message: format!(
                        "the folder for table `{name}` ({}) already holds `{inside}`, which Tessera did not write; \
                         Tessera only creates tables in empty folders. Move those files, or point storage.output at a folder of Tessera's own",
                        self.table_url(name)
                    ),
                });
            }
        }
        Ok(())
    }

    /// Refuses to write to a Delta table that another program made: Tessera names its tables
    /// (the table's metadata `name`) after their folder.
    fn check_owned(&self, name: &str, table: &DeltaTable) -> Result<()> {
        let owner = table
            .snapshot()
            .ok()
            .and_then(|s| s.metadata().name().map(str::to_string));
        if owner.as_deref() == Some(name) {
            return Ok(());
        }
        Err(Error::Location {
            key: "storage.output".into(),
            location: self.place.to_string(),
            message: format!(
                "{} is a Delta table that Tessera did not write (its name is {}); \
                 Tessera does not overwrite other tables. Move it, or point storage.output at a folder of Tessera's own",
                self.table_url(name),
                owner.map(|o| format!("`{o}`")).unwrap_or_else(|| "not set".into())
            ),
        })
    }

    /// Replaces table `name` with `df`, then registers the version just written as
    /// `reference`, so later SQL in the run reads the table as published.
    pub async fn write_registered(
        &self,
        ctx: &SessionContext,
        name: &str,
        reference: datafusion::common::TableReference,
        df: DataFrame,
    ) -> Result<Committed> {
        let committed = self.write(ctx, name, df, WriteMode::Replace).await?;
        let provider = self
            .provider(ctx, name)
            .await?
            .ok_or_else(|| Error::Usage(format!("table {name} was not written")))?;
        ctx.deregister_table(reference.clone())?;
        ctx.register_table(reference, provider)?;
        Ok(committed)
    }

    /// The current version of table `name` as a provider `ctx` can scan; `None` when absent.
    pub async fn provider(
        &self,
        ctx: &SessionContext,
        name: &str,
    ) -> Result<Option<Arc<dyn datafusion::catalog::TableProvider>>> {
        self.provider_at(ctx, name, None).await
    }

    /// Table `name` at `version` (the latest when `None`) as a provider; `None` when absent.
    pub async fn provider_at(
        &self,
        ctx: &SessionContext,
        name: &str,
        version: Option<u64>,
    ) -> Result<Option<Arc<dyn datafusion::catalog::TableProvider>>> {
        let table = match version {
            Some(version) => Some(self.open_version(name, version).await?),
            None => self.open(name).await?,
        };
        let Some(table) = table else {
            return Ok(None);
        };
        table
            .update_datafusion_session(&ctx.state())
            .map_err(|e| Error::delta(name, e))?;
        Ok(Some(table.table_provider().await?))
    }

    /// The current version of table `name` as a DataFrame; `None` when absent.
    pub async fn read(&self, ctx: &SessionContext, name: &str) -> Result<Option<DataFrame>> {
        match self.provider(ctx, name).await? {
            Some(provider) => Ok(Some(ctx.read_table(provider)?)),
            None => Ok(None),
        }
    }

    /// The names of the segment tables under `<output>/segments/`.
    pub async fn segment_names(&self) -> Result<Vec<String>> {
        self.folder_tables(crate::tables::SEGMENTS).await
    }

    /// The names of the tables in one folder of the output (`segments`, `reports`).
    pub async fn folder_tables(&self, folder: &str) -> Result<Vec<String>> {
        let folder = self.place.child(folder);
        let listing = match self.place.store.list_with_delimiter(Some(&folder)).await {
            Ok(listing) => listing,
            Err(object_store::Error::NotFound { .. }) => return Ok(Vec::new()),
            Err(e) => return Err(e.into()),
        };
        let mut names: Vec<String> = listing
            .common_prefixes
            .iter()
            .filter_map(|p| p.filename().map(str::to_string))
            .filter(|n| crate::config::is_sql_name(n))
            .collect();
        names.sort();
        Ok(names)
    }

    /// Registers every table in `names` that exists with `ctx`; returns those registered.
    pub async fn register(&self, ctx: &SessionContext, names: &[&str]) -> Result<Vec<String>> {
        let mut found = Vec::new();
        for name in names {
            if let Some(provider) = self.provider(ctx, name).await? {
                ctx.register_table(*name, provider)?;
                found.push(name.to_string());
            }
        }
        Ok(found)
    }
}

/// Every Delta table under the output: the contract tables, each segment, and `_state` tables.
pub async fn all_tables(outputs: &Outputs) -> Result<Vec<String>> {
    let mut names: Vec<String> = crate::tables::OUTPUT_TABLES
        .iter()
        .map(|s| s.to_string())
        .collect();
    for folder in [crate::tables::SEGMENTS, crate::tables::REPORTS] {
        names.extend(
            outputs
                .folder_tables(folder)
                .await?
                .into_iter()
                .map(|n| format!("{folder}/{n}")),
        );
    }
    names.push(crate::tables::state::EVENTS.into());
    names.push(crate::tables::state::INPUT_FILES.into());
    names.push(crate::tables::state::TRAITS.into());
    names.push(crate::tables::state::SUPPRESSED.into());
    names.push(crate::tables::state::NODES.into());
    names.push(crate::tables::state::TESTS.into());
    names.push(crate::tables::state::WINDOWS.into());
    names.push(crate::tables::state::MATCH_MODEL.into());
    names.push(crate::tables::state::MATCH_RECORDS.into());
    names.push(crate::tables::state::IDENTITY_IDS.into());
    names.push(crate::tables::state::IDENTITY_LINKS.into());
    names.push(crate::tables::state::IDENTITY_GROUPS.into());
    Ok(names)
}

/// Tables that stay published whatever the run's graph holds: the logs (runs, segment
/// changes, forget requests) and Tessera's own state.
pub fn always_published(name: &str) -> bool {
    name == crate::tables::RUNS
        || name == crate::tables::FORGET_REQUESTS
        || name == crate::tables::SEGMENT_CHANGES
        || name.starts_with("_state/")
}

/// The tables the last published run left published: every node's tables as
/// `_state/nodes` lists them; `None` before a run recorded its graph (then every table
/// under the output is published).
pub async fn published(
    outputs: &Outputs,
    ctx: &SessionContext,
) -> Result<Option<std::collections::BTreeSet<String>>> {
    use arrow::array::AsArray;
    let Some(df) = outputs.read(ctx, crate::tables::state::NODES).await? else {
        return Ok(None);
    };
    let mut names = std::collections::BTreeSet::new();
    for batch in df.select_columns(&["tables"])?.collect().await? {
        let column = arrow::compute::cast(batch.column(0), &arrow::datatypes::DataType::Utf8)?;
        for value in column.as_string::<i32>().iter().flatten() {
            names.extend(serde_json::from_str::<Vec<String>>(value).unwrap_or_default());
        }
    }
    Ok(Some(names))
}

/// The tables under the output that are published now (see [`published`]).
pub async fn published_tables(outputs: &Outputs, ctx: &SessionContext) -> Result<Vec<String>> {
    let all = all_tables(outputs).await?;
    Ok(match published(outputs, ctx).await? {
        Some(live) => all
            .into_iter()
            .filter(|n| always_published(n) || live.contains(n))
            .collect(),
        None => all,
    })
}

/// The tables under the output that a run retired: no longer published, waiting for the
/// retention to pass before their files are deleted.
pub async fn retired_tables(outputs: &Outputs, ctx: &SessionContext) -> Result<Vec<String>> {
    let Some(live) = published(outputs, ctx).await? else {
        return Ok(Vec::new());
    };
    let mut retired = Vec::new();
    for name in all_tables(outputs).await? {
        if !always_published(&name) && !live.contains(&name) && outputs.open(&name).await?.is_some()
        {
            retired.push(name);
        }
    }
    Ok(retired)
}

/// Checkpoints written and files deleted by [`Outputs::tidy`].
#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
pub struct Tidied {
    /// Tables given a new checkpoint.
    pub checkpoints: u64,
    /// Files deleted: those of versions older than the retention, and leftovers of dead runs.
    pub files_deleted: u64,
}

/// A table gets a checkpoint every this many versions, so readers replay a short log.
const CHECKPOINT_EVERY: u64 = 20;

impl Outputs {
    /// After a publish: checkpoints tables whose log grew long, and deletes data files that no
    /// version younger than `retention` needs (files replaced long ago, and files a dead run
    /// wrote but never published). Readers pinned to a version older than `retention` lose it.
    pub async fn tidy(&self, names: &[String], retention: std::time::Duration) -> Result<Tidied> {
        let mut done = Tidied::default();
        for name in names {
            let Some(table) = self.open(name).await? else {
                continue;
            };
            let version = table.version().unwrap_or(0);
            if version > 0 && version % CHECKPOINT_EVERY == 0 {
                deltalake::checkpoints::create_checkpoint(&table, None)
                    .await
                    .map_err(|e| Error::delta(name.as_str(), e))?;
                done.checkpoints += 1;
            }
            let store = table.log_store().object_store(None);
            let (_, plan) = table
                .vacuum()
                .with_retention_period(chrono::Duration::from_std(retention).map_err(|_| {
                    Error::Usage(format!(
                        "a retention of {} hours is past what a timestamp can hold; set run.retention_hours to at most 876000",
                        retention.as_secs() / 3600
                    ))
                })?)
                .with_enforce_retention_duration(false)
                .with_mode(deltalake::operations::vacuum::VacuumMode::Full)
                .with_dry_run(true)
                .await
                .map_err(|e| Error::delta(name.as_str(), e))?;
            // Full mode proposes every file the log does not name, whoever put it there; only
            // data files named the way this writer names them are Tessera's to delete.
            for file in plan
                .files_deleted
                .into_iter()
                .filter(|f| is_written_data_file(f))
            {
                match store
                    .delete(&object_store::path::Path::from(file.as_str()))
                    .await
                {
                    Ok(()) | Err(object_store::Error::NotFound { .. }) => done.files_deleted += 1,
                    Err(e) => return Err(e.into()),
                }
            }
        }
        Ok(done)
    }
}

impl Outputs {
    /// Deletes retired table `name` once its last commit is older than `retention`: the data
    /// files Tessera wrote, then its log. Files of any other name are left where they are,
    /// and a table Tessera did not write is not touched. Returns the files deleted.
    pub async fn remove_retired(&self, name: &str, retention: std::time::Duration) -> Result<u64> {
        use futures::TryStreamExt;
        let Some(table) = self.open(name).await? else {
            return Ok(0);
        };
        self.check_owned(name, &table)?;
        let folder = self.place.child(name);
        let log = folder.clone().join("_delta_log");
        let entries: Vec<object_store::ObjectMeta> =
            self.place.store.list(Some(&log)).try_collect().await?;
        let newest = entries.iter().map(|m| m.last_modified).max();
        let age = newest
            .map(|t| chrono::Utc::now() - t)
            .and_then(|d| d.to_std().ok())
            .unwrap_or_default();
        if age < retention {
            return Ok(0);
        }
        let mut deleted = 0;
        let listing = self.place.store.list_with_delimiter(Some(&folder)).await?;
        let data = listing
            .objects
            .into_iter()
            .filter(|m| m.location.filename().is_some_and(is_written_data_file));
        for meta in data.chain(entries) {
            match self.place.store.delete(&meta.location).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => deleted += 1,
                Err(e) => return Err(e.into()),
            }
        }
        // A manifest left by a run that did not delete it would keep the folder from reuse.
        let manifest = manifest::path(self, name);
        match self.place.store.delete(&manifest).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => return Err(e.into()),
        }
        // A local folder left empty goes too (object stores have no folders to leave).
        if let Some(dir) = self.local_dir(name) {
            let _ = std::fs::remove_dir(dir.join(manifest::DIR));
            let _ = std::fs::remove_dir(dir.join("_delta_log"));
            let _ = std::fs::remove_dir(&dir);
        }
        tracing::info!(table = name, files = deleted, "deleted a retired table");
        Ok(deleted)
    }
}

/// Whether `path` (relative to a table's folder) is named like the data files delta-rs writes
/// for Tessera: `part-00000-<uuid>-c000.<codec>.parquet`, directly in the table's folder.
pub(crate) fn is_written_data_file(path: &str) -> bool {
    let Some(rest) = path.strip_prefix("part-") else {
        return false;
    };
    let Some((counter, rest)) = rest.split_at_checked(5) else {
        return false;
    };
    let Some(rest) = rest.strip_prefix('-') else {
        return false;
    };
    let Some((id, rest)) = rest.split_at_checked(36) else {
        return false;
    };
    counter.bytes().all(|b| b.is_ascii_digit())
        && uuid::Uuid::parse_str(id).is_ok()
        && rest.starts_with("-c000")
        && rest.ends_with(".parquet")
        && !rest.contains('/')
}

/// Rows added by the table's latest commit, from the commit's own metrics.
async fn last_commit_rows(table: &DeltaTable) -> u64 {
    let mut history = table.history(Some(1));
    while let Some(Ok(info)) = history.next().await {
        if let Some(rows) = info
            .info
            .get("operationMetrics")
            .and_then(|m| m.get("num_added_rows"))
            .and_then(|v| v.as_u64())
        {
            return rows;
        }
    }
    0
}

/// Casts every column to its plain type (no view types, no dictionaries, µs UTC timestamps).
pub fn plain_columns(df: DataFrame) -> Result<DataFrame> {
    let schema = df.schema().clone();
    let mut changed = false;
    let exprs: Vec<Expr> = schema
        .fields()
        .iter()
        .map(|field| {
            let column = Expr::Column(Column::new_unqualified(field.name()));
            let plain = plain_type(field.data_type());
            if &plain == field.data_type() {
                column
            } else {
                changed = true;
                cast(column, plain).alias(field.name())
            }
        })
        .collect();
    Ok(if changed { df.select(exprs)? } else { df })
}
