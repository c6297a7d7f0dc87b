//! Ingest: event files → the `events` table (checked, deduplicated) and `rejected_events`.
//!
//! A bad file must never take a run down, so every file's footer is read on its own (under
//! `catch_unwind`: parquet-rs still panics on some corrupt inputs) and its schema is checked
//! against the event contract before any scan is planned. Files that fail are recorded with
//! the reason and skipped; rows that fail a check become `rejected_events` rows; nothing
//! disappears without being counted.

use std::collections::BTreeMap;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, RecordBatch};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::common::{Column, ScalarValue};
use datafusion::dataframe::DataFrame;
use datafusion::functions::string::expr_fn::btrim;
use datafusion::functions_window::expr_fn::row_number;
use datafusion::logical_expr::{
    cast, lit, not, try_cast, when, Expr, ExprFunctionExt, LogicalPlan, Union,
};
use datafusion::prelude::{ParquetReadOptions, SessionContext};
use futures::{FutureExt, StreamExt, TryStreamExt};
use object_store::path::Path as ObjectPath;
use object_store::{ObjectMeta, ObjectStoreExt};
use parquet::arrow::arrow_reader::{ArrowReaderMetadata, ArrowReaderOptions};
#[allow(deprecated)] // its replacement (a hand-written AsyncFileReader) buys nothing here yet
use parquet::arrow::async_reader::ParquetObjectReader;

use crate::config::EventFormat;
use crate::error::{Error, Result};
use crate::stages::formats::Mapped;
use crate::storage::{EventPlace, Location, Place};
use crate::tables::{column, event};

/// Internal column carrying each row's input file through the plan.
const SOURCE: &str = "__tessera_source_file";
/// Internal column carrying each row's rejection reason (NULL when it passes).
const REASON: &str = "__tessera_reason";
/// Internal column numbering copies of one message_id.
const COPY: &str = "__tessera_copy";
/// Internal column naming a time column whose value cannot be held in microseconds (NULL
/// when every time column converted).
const TIME_PROBLEM: &str = "__tessera_time_problem";

/// How many footers are read at once (matters on S3, where each is a round trip).
const FOOTER_CONCURRENCY: usize = 16;

pub use crate::error::SkippedFile;
pub use crate::tables::{plain_field, plain_type, timestamp_type};

/// What a known event column must hold.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Text,
    Time,
}

/// The Segment-spec columns, in the order `events` shows them, and whether each is required.
const KNOWN_COLUMNS: &[(&str, Kind, bool)] = &[
    (event::MESSAGE_ID, Kind::Text, true),
    (event::TYPE, Kind::Text, true),
    (event::EVENT, Kind::Text, false),
    (event::ANONYMOUS_ID, Kind::Text, false),
    (event::USER_ID, Kind::Text, false),
    (event::TIMESTAMP, Kind::Time, true),
    (event::RECEIVED_AT, Kind::Time, false),
    (event::TRAITS, Kind::Text, false),
    (event::PROPERTIES, Kind::Text, false),
    (event::CONTEXT, Kind::Text, false),
];

/// One event file that passed the footer and schema checks.
#[derive(Debug, Clone)]
pub struct EventFile {
    /// Where it is inside the store.
    pub path: ObjectPath,
    /// Its full URL, as reports and `source_file` show it.
    pub url: String,
    /// Size in bytes.
    pub size: u64,
    /// The store's ETag, when it gives one.
    pub e_tag: Option<String>,
    /// Rows according to the footer.
    pub rows: u64,
    /// Hive partition values from its path (`date=2026-11-28/…`).
    pub partitions: Vec<(String, String)>,
    /// The URL DataFusion scans it by: [`EventFile::url`] with every character that a URL
    /// parser would read as syntax escaped, so the scan reads exactly `path`.
    scan_url: String,
    /// The file's own schema, as its footer gives it.
    schema: SchemaRef,
    /// The store holding it.
    store: Arc<dyn object_store::ObjectStore>,
    /// How its rows become event rows, when it is not Segment-spec.
    mapping: Option<Arc<crate::stages::formats::Mapping>>,
    /// The columns its scan gives: the mapping's, or its own.
    columns: SchemaRef,
}

/// The event files found under `storage.events`, checked.
#[derive(Debug, Clone)]
pub struct Inventory {
    /// Files that will be read, in path order.
    pub files: Vec<EventFile>,
    /// Files that will not be read.
    pub skipped: Vec<SkippedFile>,
    /// Files processed by an earlier run that have changed since: reported, not re-read.
    pub changed: Vec<SkippedFile>,
    /// Files processed by an earlier run and unchanged: not read again.
    pub already_processed: usize,
    /// The schema of `events`: Segment-spec columns, then other columns, then partition columns.
    pub schema: SchemaRef,
}

impl Inventory {
    /// Rows in the files that will be read, by their footers.
    pub fn rows(&self) -> u64 {
        self.files.iter().map(|f| f.rows).sum()
    }

    /// Bytes in the files that will be read.
    pub fn bytes(&self) -> u64 {
        self.files.iter().map(|f| f.size).sum()
    }
}

/// Lists the event files of every place, reads each footer and checks each schema (through
/// its format's mapping, for places that are not Segment-spec).
///
/// `on_file` is called once per file examined (for progress).
///
/// Files listed in `known_bad` (found corrupt by [`find_corrupt`]) are skipped with their reason.
/// With `seen` (the files earlier runs processed: URL → size and ETag), only other files are
/// read; a seen file whose size or ETag differs is listed in `changed`.
pub async fn discover(
    places: &[EventPlace],
    known_bad: &[SkippedFile],
    seen: Option<&crate::output::state::Seen>,
    on_file: &(dyn Fn(u64, u64) + Sync),
) -> Result<Inventory> {
    let mut metas = Vec::new();
    let mut unreadable = Vec::new();
    for (i, event_place) in places.iter().enumerate() {
        let place = &event_place.place;
        if let Location::Local(dir) = &place.location {
            if !dir.exists() {
                return Err(Error::Location {
                    key: place.key.clone(),
                    location: dir.display().to_string(),
                    message: if place.key == "storage.events" {
                        "the folder does not exist; point storage.events at your event files, or make a sample with `tessera generate --out data`".into()
                    } else {
                        format!(
                            "the folder does not exist; point {} at the source's files",
                            place.key
                        )
                    },
                });
            }
        }
        let mut listing = if event_place.format == EventFormat::Snowplow {
            list_delta(place).await?
        } else {
            list_event_files(place).await?
        };
        listing
            .files
            .sort_by(|a, b| a.meta.location.cmp(&b.meta.location));
        metas.extend(listing.files.into_iter().map(|l| (i, l)));
        unreadable.extend(listing.unreadable);
    }
    let mut changed = Vec::new();
    let mut already_processed = 0;
    if let Some(seen) = seen {
        metas.retain(|(i, listed)| {
            let meta = &listed.meta;
            let url = object_url(&places[*i].place, &meta.location);
            let Some(before) = seen.get(&url) else {
                return true;
            };
            already_processed += 1;
            let etag_differs = matches!((&before.e_tag, &meta.e_tag), (Some(a), Some(b)) if a != b);
            if before.size != meta.size || etag_differs {
                tracing::warn!(file = %url, "an event file changed after it was processed; it is not read again");
                changed.push(SkippedFile {
                    reason: format!(
                        "changed after run {} processed it (size {} → {}{}); its new rows are not read. \
                         Write new events to new files; `tessera run --full` rebuilds from every file as it is now",
                        before.run_id,
                        before.size,
                        meta.size,
                        if etag_differs { ", new ETag" } else { "" }
                    ),
                    file: url,
                });
            }
            false
        });
    }
    let total = metas.len() as u64;
    let done = std::sync::atomic::AtomicU64::new(0);

    let footers: Vec<((usize, Listed), Footer)> = futures::stream::iter(metas)
        .map(|(i, listed)| {
            let store = places[i].place.store.clone();
            let done = &done;
            async move {
                let footer = read_footer(store, &listed.meta).await;
                let n = done.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
                on_file(n, total);
                ((i, listed), footer)
            }
        })
        .buffered(FOOTER_CONCURRENCY)
        .collect()
        .await;

    let mut files = Vec::new();
    let mut skipped = unreadable;
    let mut extra: Vec<Field> = Vec::new();
    let mut first_seen: BTreeMap<String, String> = BTreeMap::new();
    let mut partition_keys: Vec<String> = Vec::new();

    for (
        (
            i,
            Listed {
                meta,
                names,
                partitions: logged,
            },
        ),
        footer,
    ) in footers
    {
        let EventPlace { place, format } = &places[i];
        let url = object_url(place, &meta.location);
        if let Some(bad) = known_bad.iter().find(|b| b.file == url) {
            skipped.push(bad.clone());
            continue;
        }
        let (schema, rows) = match footer {
            Ok(found) => found,
            Err(reason) => {
                tracing::warn!(file = %url, %reason, "skipping unreadable event file");
                skipped.push(SkippedFile { file: url, reason });
                continue;
            }
        };
        let folders = match logged {
            Some(logged) => Ok(logged),
            None => hive_partitions(&names),
        };
        let (mapping, columns) = match &folders {
            Err(_) => (None, schema.clone()),
            Ok(folders) => match crate::stages::formats::map(
                *format,
                &meta
                    .location
                    .parts()
                    .map(|p| p.as_ref().to_string())
                    .collect::<Vec<_>>(),
                &schema,
                folders,
            ) {
                Ok(None) => (None, schema.clone()),
                Ok(Some(Mapped::NotEvents)) => continue,
                Ok(Some(Mapped::Events(mapping))) => {
                    let columns = mapping.schema.clone();
                    (Some(Arc::new(mapping)), columns)
                }
                Err(reason) => {
                    let reason = format!("not readable as {} events: {reason}", format.name());
                    tracing::warn!(file = %url, %reason, "skipping event file");
                    skipped.push(SkippedFile { file: url, reason });
                    continue;
                }
            },
        };
        match check_schema(&columns, &extra, &first_seen) {
            Ok(widened) => {
                for field in widened {
                    match extra.iter_mut().find(|f| f.name() == field.name()) {
                        Some(existing) => *existing = field,
                        None => {
                            first_seen.insert(field.name().clone(), url.clone());
                            extra.push(field);
                        }
                    }
                }
            }
            Err(reason) => {
                tracing::warn!(file = %url, %reason, "skipping event file with a conflicting schema");
                skipped.push(SkippedFile { file: url, reason });
                continue;
            }
        }
        // A mapped file's folders are part of its layout, already read by the mapping.
        let folders = if mapping.is_some() {
            Ok(Vec::new())
        } else {
            folders
        };
        let partitions: Vec<(String, String)> = match folders {
            Ok(found) => found
                .into_iter()
                .filter(|(k, _)| schema.field_with_name(k).is_err())
                .collect(),
            Err(reason) => {
                tracing::warn!(file = %url, %reason, "skipping event file with an unreadable folder name");
                skipped.push(SkippedFile { file: url, reason });
                continue;
            }
        };
        for (key, _) in &partitions {
            if !partition_keys.contains(key) {
                partition_keys.push(key.clone());
            }
        }
        files.push(EventFile {
            scan_url: scan_url(place, &meta.location),
            path: meta.location.clone(),
            url,
            size: meta.size,
            e_tag: meta.e_tag.clone(),
            rows,
            partitions,
            schema,
            store: place.store.clone(),
            mapping,
            columns,
        });
    }

    let mut fields: Vec<Field> = KNOWN_COLUMNS
        .iter()
        .map(|(name, kind, _)| Field::new(*name, kind_type(*kind), true))
        .collect();
    fields.extend(extra.into_iter().map(|f| f.with_nullable(true)));
    for key in partition_keys {
        if fields.iter().all(|f| f.name() != &key) {
            fields.push(Field::new(key, DataType::Utf8, true));
        }
    }
    skipped.sort_by(|a, b| a.file.cmp(&b.file));
    Ok(Inventory {
        files,
        skipped,
        changed,
        already_processed,
        schema: Arc::new(Schema::new(fields)),
    })
}

/// Decodes every row of every event file and returns the files that fail.
///
/// A file can have a sound footer and corrupt pages; that only shows when a scan reads them,
/// and it fails the whole scan. A run that fails calls this, skips what it finds, and tries
/// once more, so one bad file never takes a run down.
pub async fn find_corrupt(
    places: &[EventPlace],
    seen: Option<&crate::output::state::Seen>,
) -> Result<Vec<SkippedFile>> {
    use parquet::arrow::ParquetRecordBatchStreamBuilder;
    let inventory = discover(places, &[], seen, &|_, _| {}).await?;
    let checks = inventory.files.iter().map(|file| {
        let store = file.store.clone();
        async move {
            #[allow(deprecated)]
            let reader =
                ParquetObjectReader::new(store, file.path.clone()).with_file_size(file.size);
            let decode = async move {
                let mut stream = ParquetRecordBatchStreamBuilder::new(reader)
                    .await?
                    .build()?;
                while let Some(batch) = stream.next().await {
                    batch?;
                }
                Ok::<(), parquet::errors::ParquetError>(())
            };
            let reason = match AssertUnwindSafe(decode).catch_unwind().await {
                Ok(Ok(())) => return None,
                Ok(Err(e)) => format!(
                    "corrupt data ({e}): the footer reads but the rows do not; land the file again"
                ),
                Err(_) => {
                    "corrupt data: the Parquet reader crashed on its rows; land the file again"
                        .to_string()
                }
            };
            Some(SkippedFile {
                file: file.url.clone(),
                reason,
            })
        }
    });
    let found: Vec<Option<SkippedFile>> = futures::stream::iter(checks).buffered(4).collect().await;
    Ok(found.into_iter().flatten().collect())
}

/// One event file found by listing, with the names its folders and file really have.
struct Listed {
    meta: ObjectMeta,
    /// The folder names below the events folder, then the file name, as the store holds
    /// them (not as object_store encodes them into a path).
    names: Vec<String>,
    /// Its partition values when a table's log gives them (Delta), rather than its folders.
    partitions: Option<Vec<(String, String)>>,
}

/// What listing the events folder found.
struct Listing {
    /// Event files, not yet checked.
    files: Vec<Listed>,
    /// Files whose path cannot be read, with why.
    unreadable: Vec<SkippedFile>,
}

/// Event files are `*.parquet`; names starting with `_` or `.` (markers, temp files, and
/// folders holding them) are not.
fn is_event_file(names: &[String]) -> bool {
    names.last().is_some_and(|n| n.ends_with(".parquet"))
        && !names.iter().any(|n| n.starts_with(['_', '.']))
}

/// Lists the event files under `place`.
///
/// A local folder is walked here rather than through object_store's listing, which both
/// stops at the first name it cannot represent (a folder named with bytes that are not UTF-8
/// took every other file with it) and decodes `%` escapes in names (a file under `date=%41/`
/// was listed as `date=A/`, a path that reads nothing). Each name here becomes one path part
/// as it is, so reading the path opens that very file.
async fn list_event_files(place: &Place) -> Result<Listing> {
    let dir = match &place.location {
        Location::Local(dir) => dir.clone(),
        _ => {
            let metas: Vec<ObjectMeta> =
                place.store.list(Some(&place.prefix)).try_collect().await?;
            let files = metas
                .into_iter()
                .filter_map(|meta| {
                    let names: Vec<String> = meta
                        .location
                        .prefix_match(&place.prefix)?
                        .map(|p| p.as_ref().to_string())
                        .collect();
                    is_event_file(&names).then_some(Listed {
                        meta,
                        names,
                        partitions: None,
                    })
                })
                .collect();
            return Ok(Listing {
                files,
                unreadable: Vec::new(),
            });
        }
    };
    let root = place.store_url();
    let (found, mut unreadable) = tokio::task::spawn_blocking(move || walk_local(&dir, &root))
        .await
        .map_err(|e| Error::Usage(format!("listing the event folder stopped: {e}")))?;
    let heads: Vec<(Vec<String>, String, object_store::Result<ObjectMeta>)> =
        futures::stream::iter(found)
            .map(|(names, shown)| {
                // The local store maps a path's parts to file names as they are.
                let location = names.iter().try_fold(place.prefix.clone(), |p, n| {
                    object_store::path::PathPart::parse(n)
                        .map(|part| p.join(part))
                        .map_err(|e| object_store::Error::InvalidPath {
                            source: object_store::path::Error::BadSegment {
                                path: n.clone(),
                                source: e,
                            },
                        })
                });
                let store = place.store.clone();
                async move {
                    let head = match location {
                        Ok(location) => store.head(&location).await,
                        Err(e) => Err(e),
                    };
                    (names, shown, head)
                }
            })
            .buffered(FOOTER_CONCURRENCY)
            .collect()
            .await;
    let mut files = Vec::with_capacity(heads.len());
    for (names, shown, head) in heads {
        match head {
            Ok(meta) => files.push(Listed {
                meta,
                names,
                partitions: None,
            }),
            // Removed since it was listed: it is simply not there any more.
            Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => unreadable.push(SkippedFile {
                file: shown,
                reason: format!("cannot be read ({e}); check its permissions, or rename it"),
            }),
        }
    }
    Ok(Listing { files, unreadable })
}

/// The live files of the Delta table at `place` (the Snowplow lake loader's), from its log.
async fn list_delta(place: &Place) -> Result<Listing> {
    let found = crate::stages::formats::list_delta_files(place).await?;
    let mut files = Vec::with_capacity(found.len());
    let mut unreadable = Vec::new();
    for file in found {
        match place.store.head(&file.path).await {
            Ok(meta) => files.push(Listed {
                meta,
                names: file.names,
                partitions: Some(file.partitions),
            }),
            Err(e) => unreadable.push(SkippedFile {
                file: object_url(place, &file.path),
                reason: format!(
                    "the Delta log lists it but it cannot be read ({e}); repair the table (its log and files disagree)"
                ),
            }),
        }
    }
    Ok(Listing { files, unreadable })
}

/// Walks a local events folder: the names of every event file below it, each with the URL
/// it is shown by, and the files whose names cannot be read.
fn walk_local(
    dir: &std::path::Path,
    root: &url::Url,
) -> (Vec<(Vec<String>, String)>, Vec<SkippedFile>) {
    let shown = |path: &std::path::Path| {
        format!(
            "{}{}",
            root.as_str(),
            path.to_string_lossy().trim_start_matches('/')
        )
    };
    let mut found = Vec::new();
    let mut unreadable = Vec::new();
    let walk = walkdir::WalkDir::new(dir)
        .min_depth(1)
        .follow_links(true)
        .sort_by_file_name()
        .into_iter()
        // Hidden folders hold markers and temporary files: not entered at all.
        .filter_entry(|e| {
            !e.file_name().to_string_lossy().starts_with(['_', '.']) || e.depth() == 0
        });
    for entry in walk {
        let entry = match entry {
            Ok(entry) => entry,
            Err(e) => {
                let path = e.path().map(&shown).unwrap_or_else(|| shown(dir));
                // A folder that cannot be opened hides the event files in it: say so.
                unreadable.push(SkippedFile {
                    file: path,
                    reason: format!("cannot be listed ({e}); its event files are not read. Check its permissions"),
                });
                continue;
            }
        };
        if !entry.file_type().is_file() {
            continue;
        }
        let Ok(relative) = entry.path().strip_prefix(dir) else {
            continue;
        };
        let names: Option<Vec<String>> = relative
            .components()
            .map(|c| c.as_os_str().to_str().map(str::to_string))
            .collect();
        match names {
            Some(names) if is_event_file(&names) => {
                let shown = shown(entry.path());
                found.push((names, shown))
            }
            Some(_) => {}
            None if entry.path().to_string_lossy().ends_with(".parquet") => {
                unreadable.push(SkippedFile {
                    file: shown(entry.path()),
                    reason: "its path is not valid UTF-8, which object stores and URLs cannot name; rename the folder or file".into(),
                });
            }
            None => {}
        }
    }
    (found, unreadable)
}

/// `key=value` folders above the file, with Hive's `%` escapes decoded (`date=100%25` holds
/// `100%`); a folder whose decoded name is not UTF-8 makes the file unreadable.
fn hive_partitions(names: &[String]) -> std::result::Result<Vec<(String, String)>, String> {
    let folders = &names[..names.len().saturating_sub(1)];
    let mut found = Vec::new();
    for segment in folders {
        let decoded = percent_encoding::percent_decode_str(segment)
            .decode_utf8()
            .map_err(|_| {
                format!(
                    "folder `{segment}` is not valid UTF-8 once its %-escapes are decoded, so its partition value cannot be read; rename the folder"
                )
            })?;
        if let Some((k, v)) = decoded.split_once('=') {
            if crate::config::is_sql_name(k) {
                found.push((k.to_string(), v.to_string()));
            }
        }
    }
    Ok(found)
}

/// The URL of an object in `place`'s store, as reports, `source_file` and the state show it.
pub fn object_url(place: &Place, path: &ObjectPath) -> String {
    let root = place.store_url();
    format!("{}{}", root.as_str(), path.as_ref())
}

/// Characters escaped in [`scan_url`]: everything a URL parser reads as syntax or changes,
/// `%` first of all, but not `/`, which separates the path's parts.
const URL_ESCAPED: &percent_encoding::AsciiSet = &percent_encoding::CONTROLS
    .add(b' ')
    .add(b'"')
    .add(b'#')
    .add(b'%')
    .add(b'<')
    .add(b'>')
    .add(b'?')
    .add(b'[')
    .add(b'\\')
    .add(b']')
    .add(b'^')
    .add(b'`')
    .add(b'{')
    .add(b'|')
    .add(b'}');

/// The URL that makes DataFusion read exactly `path`: it decodes a URL's path once into an
/// object path, so every character it would decode or cut (`%41`, `#1`, `?`) is escaped.
fn scan_url(place: &Place, path: &ObjectPath) -> String {
    let root = place.store_url();
    let escaped = percent_encoding::utf8_percent_encode(path.as_ref(), URL_ESCAPED);
    format!("{}{escaped}", root.as_str())
}

/// A file's Arrow schema and row count, or why its footer cannot be read.
type Footer = std::result::Result<(SchemaRef, u64), String>;

/// Reads a file's footer: its Arrow schema and row count, or why it cannot be read.
async fn read_footer(store: Arc<dyn object_store::ObjectStore>, meta: &ObjectMeta) -> Footer {
    if meta.size == 0 {
        return Err("the file is empty (0 bytes); remove it or land it again".into());
    }
    #[allow(deprecated)]
    let mut reader =
        ParquetObjectReader::new(store, meta.location.clone()).with_file_size(meta.size);
    let load = ArrowReaderMetadata::load_async(&mut reader, ArrowReaderOptions::new());
    match AssertUnwindSafe(load).catch_unwind().await {
        Ok(Ok(metadata)) => {
            let rows = metadata.metadata().file_metadata().num_rows().max(0) as u64;
            Ok((metadata.schema().clone(), rows))
        }
        Ok(Err(e)) => Err(format!(
            "not a readable Parquet file ({e}); it may be truncated or still being written"
        )),
        Err(_) => Err("the Parquet reader crashed on this file; it is corrupt".into()),
    }
}

fn kind_type(kind: Kind) -> DataType {
    match kind {
        Kind::Text => DataType::Utf8,
        Kind::Time => timestamp_type(),
    }
}

fn is_text(dt: &DataType) -> bool {
    matches!(
        dt,
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View
    )
}

fn is_time(dt: &DataType) -> bool {
    matches!(dt, DataType::Timestamp(_, _))
}

/// The common type of two column types, when one can hold the other.
fn unify(a: &DataType, b: &DataType) -> Option<DataType> {
    if a == b {
        return Some(a.clone());
    }
    let int = |t: &DataType| t.is_integer();
    let float = |t: &DataType| t.is_floating();
    if int(a) && int(b) {
        return Some(DataType::Int64);
    }
    if (int(a) || float(a)) && (int(b) || float(b)) {
        return Some(DataType::Float64);
    }
    None
}

/// Checks one file's schema; on success returns the other columns as they widen the table's.
fn check_schema(
    schema: &Schema,
    extra: &[Field],
    first_seen: &BTreeMap<String, String>,
) -> std::result::Result<Vec<Field>, String> {
    for (name, kind, required) in KNOWN_COLUMNS {
        match schema.field_with_name(name) {
            Err(_) if *required => {
                return Err(format!(
                    "no `{name}` column; every event file needs message_id, type and timestamp"
                ))
            }
            Err(_) => {}
            Ok(field) => {
                let ok = match kind {
                    Kind::Text => is_text(field.data_type()),
                    Kind::Time => is_time(field.data_type()),
                };
                if !ok {
                    let want = match kind {
                        Kind::Text => "text (UTF-8; JSON columns hold JSON text)",
                        Kind::Time => "a timestamp (UTC)",
                    };
                    return Err(format!(
                        "column `{name}` is {} but must be {want}; fix the writer that lands these files",
                        field.data_type()
                    ));
                }
            }
        }
    }
    let mut widened = Vec::new();
    for field in schema.fields() {
        if KNOWN_COLUMNS.iter().any(|(n, _, _)| n == field.name()) {
            continue;
        }
        let plain = plain_type(field.data_type());
        match extra.iter().find(|f| f.name() == field.name()) {
            None => widened.push(Field::new(field.name(), plain, true)),
            Some(existing) => match unify(existing.data_type(), &plain) {
                Some(t) if &t == existing.data_type() => {}
                Some(t) => widened.push(Field::new(field.name(), t, true)),
                None => {
                    return Err(format!(
                        "column `{}` is {} here but {} in {}; make the files agree or move this one out of storage.events",
                        field.name(),
                        plain,
                        existing.data_type(),
                        first_seen.get(field.name()).map(String::as_str).unwrap_or("earlier files"),
                    ))
                }
            },
        }
    }
    Ok(widened)
}

fn ident(name: &str) -> Expr {
    Expr::Column(Column::new_unqualified(name))
}

/// Every event row, each file cast to the table's schema, with its source file attached.
async fn scan_all(ctx: &SessionContext, inventory: &Inventory) -> Result<DataFrame> {
    let mut plans = Vec::with_capacity(inventory.files.len());
    for file in &inventory.files {
        let options = ParquetReadOptions::default().schema(&file.schema);
        let mut df = ctx.read_parquet(file.scan_url.as_str(), options).await?;
        if let Some(mapping) = &file.mapping {
            df = df.select(mapping.exprs.clone())?;
        }
        let mut exprs = Vec::with_capacity(inventory.schema.fields().len() + 2);
        let mut time_problem = when(lit(false), lit(ScalarValue::Utf8(None)));
        for field in inventory.schema.fields() {
            let name = field.name();
            let expr = if let Ok(source) = file.columns.field_with_name(name) {
                if source.data_type() == field.data_type() {
                    ident(name)
                } else if is_time(source.data_type()) {
                    // Seconds or milliseconds past what microseconds can hold (beyond about
                    // ±292,000 years) cannot be converted: such a row is quarantined with
                    // the reason, instead of the cast failing the whole run.
                    let converted = try_cast(ident(name), field.data_type().clone());
                    time_problem = time_problem.when(
                        ident(name).is_not_null().and(converted.clone().is_null()),
                        lit(format!(
                            "{name} out of range (it cannot be held in microseconds)"
                        )),
                    );
                    converted.alias(name)
                } else {
                    cast(ident(name), field.data_type().clone()).alias(name)
                }
            } else if let Some((_, value)) = file.partitions.iter().find(|(k, _)| k == name) {
                lit(value.as_str()).alias(name)
            } else {
                lit(ScalarValue::try_from(field.data_type())?).alias(name)
            };
            exprs.push(expr);
        }
        exprs.push(lit(file.url.as_str()).alias(SOURCE));
        exprs.push(
            time_problem
                .otherwise(lit(ScalarValue::Utf8(None)))?
                .alias(TIME_PROBLEM),
        );
        plans.push(Arc::new(df.select(exprs)?.into_unoptimized_plan()));
    }
    let plan = match plans.len() {
        0 => {
            let mut fields: Vec<Field> = inventory
                .schema
                .fields()
                .iter()
                .map(|f| f.as_ref().clone())
                .collect();
            fields.push(Field::new(SOURCE, DataType::Utf8, false));
            fields.push(Field::new(TIME_PROBLEM, DataType::Utf8, true));
            let empty = RecordBatch::new_empty(Arc::new(Schema::new(fields)));
            return Ok(ctx.read_batch(empty)?);
        }
        1 => Arc::unwrap_or_clone(plans.pop().expect("one plan")),
        _ => LogicalPlan::Union(Union::try_new(plans)?),
    };
    Ok(ctx.read_table(Arc::new(crate::sql::file_chain::FileChain::new(plan)))?)
}

/// Why a row is rejected, or NULL when it passes. The first failing check wins.
fn reject_reason() -> Result<Expr> {
    let blank = |name: &str| {
        ident(name)
            .is_null()
            .or(btrim(vec![ident(name)]).eq(lit("")))
    };
    let types: Vec<Expr> = event::TYPES.iter().map(|t| lit(*t)).collect();
    let is_json = crate::sql::json_check::is_json_udf();
    let mut reason = when(ident(TIME_PROBLEM).is_not_null(), ident(TIME_PROBLEM))
        .when(blank(event::MESSAGE_ID), lit("missing message_id"))
        .when(blank(event::TYPE), lit("missing type"))
        .when(
            not(ident(event::TYPE).in_list(types, false)),
            lit("unknown type"),
        )
        .when(ident(event::TIMESTAMP).is_null(), lit("missing timestamp"));
    for name in event::JSON_COLUMNS {
        reason = reason.when(
            ident(name)
                .is_not_null()
                .and(not(is_json.call(vec![ident(name)]))),
            lit(format!("invalid JSON in {name}")),
        );
    }
    Ok(reason.otherwise(lit(ScalarValue::Utf8(None)))?)
}

/// One ingest: what to keep and what to quarantine.
pub struct Ingested {
    /// The files read and skipped.
    pub inventory: Inventory,
    /// `events`: rows that passed, one per message_id.
    pub events: DataFrame,
    /// `rejected_events`: the event's columns, `reason`, `source_file`.
    pub rejected: DataFrame,
    /// Every row read, with its rejection reason and source file: what [`split`] routes.
    checked: DataFrame,
    /// Hashes of the message_ids that may occur more than once (`None`: none does).
    repeated: Option<Arc<IdSet>>,
}

/// The 64-bit hash used to find message_ids that may repeat.
fn id_hash() -> foldhash::fast::FixedState {
    foldhash::fast::FixedState::with_seed(0x5eed_d0d0)
}

/// Hashes of message_ids, as [`id_hash`] makes them.
type IdSet = hashbrown::HashSet<u64, foldhash::fast::FixedState>;

/// For each id, whether its hash is in `repeated` (a possible copy); false for NULL.
fn may_repeat(ids: &arrow::array::StringArray, repeated: &IdSet) -> arrow::array::BooleanArray {
    use std::hash::BuildHasher;
    let hasher = id_hash();
    ids.iter()
        .map(|v| Some(v.is_some_and(|id| repeated.contains(&hasher.hash_one(id)))))
        .collect()
}

fn id_set(capacity: usize) -> IdSet {
    IdSet::with_capacity_and_hasher(capacity, foldhash::fast::FixedState::with_seed(1))
}

/// Finds the id hashes seen more than once.
///
/// One set of every hash is as large as the input (1.1 GiB of table at 100M events), and
/// inserting into it in input order misses the CPU caches on nearly every row: that was a
/// fifth of the ingest stage. The hashes are split by their top byte into 256 sets, each
/// sized from the row count the file footers give, and buffered per set so that each
/// flush inserts a run of hashes into one small table. Each set has its own lock, so one
/// [`SeenIds`] per partition of the scan hashes and inserts on every core; two writers
/// rarely want the same set at once.
struct SeenSets {
    parts: Vec<std::sync::Mutex<SeenPart>>,
}

/// One of the 256 sets, and the hashes it has been offered more than once.
struct SeenPart {
    set: IdSet,
    repeated: IdSet,
}

impl SeenSets {
    const PARTS: usize = 256;

    /// Footers can claim any row count: sizing up front stops at 128M rows, and the sets
    /// grow past that as rows really arrive.
    const PRESIZE_ROWS: u64 = 1 << 27;

    fn new(rows: u64) -> Self {
        let each = (rows.min(Self::PRESIZE_ROWS) as usize / Self::PARTS) + SeenIds::RUN;
        SeenSets {
            parts: (0..Self::PARTS)
                .map(|_| {
                    std::sync::Mutex::new(SeenPart {
                        set: id_set(each),
                        repeated: id_set(0),
                    })
                })
                .collect(),
        }
    }

    /// Every hash offered more than once, once all writers have finished.
    fn repeated(self) -> IdSet {
        let mut all = id_set(0);
        for part in self.parts {
            all.extend(part.into_inner().expect("not poisoned").repeated);
        }
        all
    }
}

/// One writer into [`SeenSets`]: buffers its hashes per set and inserts them a run at a time.
struct SeenIds {
    sets: Arc<SeenSets>,
    pending: Vec<Vec<u64>>,
}

impl SeenIds {
    const RUN: usize = 512;

    fn new(sets: Arc<SeenSets>) -> Self {
        SeenIds {
            sets,
            pending: (0..SeenSets::PARTS)
                .map(|_| Vec::with_capacity(Self::RUN))
                .collect(),
        }
    }

    fn insert(&mut self, h: u64) {
        let part = (h >> 56) as usize;
        let pending = &mut self.pending[part];
        pending.push(h);
        if pending.len() == Self::RUN {
            self.flush(part);
        }
    }

    fn flush(&mut self, part: usize) {
        let mut guard = self.sets.parts[part].lock().expect("not poisoned");
        let SeenPart { set, repeated } = &mut *guard;
        for h in self.pending[part].drain(..) {
            if !set.insert(h) {
                repeated.insert(h);
            }
        }
    }

    /// Inserts what is still buffered.
    fn finish(mut self) {
        for part in 0..SeenSets::PARTS {
            self.flush(part);
        }
    }
}

/// Checks rows and removes copies of a message_id: one pass now, and a plan.
///
/// Pass one streams every row's message_id into a set of 64-bit hashes; an id whose hash was
/// seen before is a candidate copy. The planned `events` are the valid rows that are surely
/// unique, plus the candidates' rows (a small share of real data: redeliveries) with one kept
/// per message_id exactly, by comparing ids themselves, so a hash collision costs a little
/// work and never an event; no sorting or windowing of the whole table. A run does not
/// execute that plan: [`split`] routes and deduplicates in its own single pass.
pub async fn plan(ctx: &SessionContext, inventory: Inventory) -> Result<Ingested> {
    use std::hash::BuildHasher;

    let all = scan_all(ctx, &inventory).await?;
    let checked = all.clone().with_column(REASON, reject_reason()?)?;
    let event_columns: Vec<Expr> = inventory
        .schema
        .fields()
        .iter()
        .map(|f| ident(f.name()))
        .collect();

    let mut rejected_columns = event_columns.clone();
    rejected_columns.push(ident(REASON).alias(column::REASON));
    rejected_columns.push(ident(SOURCE).alias(column::SOURCE_FILE));
    let rejected = checked
        .clone()
        .filter(ident(REASON).is_not_null())?
        .select(rejected_columns)?;
    let valid = checked.clone().filter(ident(REASON).is_null())?;

    // Pass one: which message_ids may occur more than once.
    // Only the message_id column is read: rows that the checks reject later may make a few
    // extra candidates, which pass two handles exactly like any other.
    let sets = Arc::new(SeenSets::new(inventory.rows()));
    let streams = all
        .clone()
        .select(vec![cast(ident(event::MESSAGE_ID), DataType::Utf8)])?
        .execute_stream_partitioned()
        .await?;
    let mut tasks = tokio::task::JoinSet::new();
    for mut stream in streams {
        let mut seen = SeenIds::new(sets.clone());
        tasks.spawn(async move {
            let hasher = id_hash();
            while let Some(batch) = stream.next().await {
                let batch = batch?;
                let ids = batch.column(0).as_string::<i32>();
                for id in ids.iter().flatten() {
                    seen.insert(hasher.hash_one(id));
                }
            }
            seen.finish();
            Ok::<(), datafusion::error::DataFusionError>(())
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.map_err(|e| Error::Internal(format!("reading the event files stopped: {e}")))??;
    }
    let repeated = Arc::into_inner(sets)
        .expect("every writer has finished")
        .repeated();

    let unique = valid.clone().select(event_columns.clone())?;
    if repeated.is_empty() {
        return Ok(Ingested {
            inventory,
            events: unique,
            rejected,
            checked,
            repeated: None,
        });
    }

    // Pass two: the candidates' rows, deduplicated exactly. Copies of one message_id keep the
    // one received first (as Segment and Snowplow do); exact redeliveries are identical, so any
    // tie-break among them gives the same row.
    let repeated = Arc::new(repeated);
    let candidate = {
        let repeated = repeated.clone();
        datafusion::logical_expr::create_udf(
            "__tessera_repeated_id",
            vec![DataType::Utf8],
            DataType::Boolean,
            datafusion::logical_expr::Volatility::Immutable,
            Arc::new(move |args: &[datafusion::logical_expr::ColumnarValue]| {
                let arrays = datafusion::logical_expr::ColumnarValue::values_to_arrays(args)?;
                let out = may_repeat(arrays[0].as_string::<i32>(), &repeated);
                Ok(datafusion::logical_expr::ColumnarValue::Array(Arc::new(
                    out,
                )))
            }),
        )
    };
    let is_candidate = candidate.call(vec![ident(event::MESSAGE_ID)]);
    // A plan, not a result: a run writes its tables through `split`, which routes and
    // deduplicates the candidates in its own single pass, so this is executed only where
    // `events` is read as planned here (queries, `validate`). Collecting it here made every
    // run decode all columns and check every JSON document once more, for nothing.
    let kept = first_copies(
        valid.clone().filter(is_candidate.clone())?,
        event_columns.clone(),
    )?;
    let events = valid
        .filter(not(is_candidate))?
        .select(event_columns)?
        .union(kept)?;
    Ok(Ingested {
        inventory,
        events,
        rejected,
        checked,
        repeated: Some(repeated),
    })
}

/// What `validate` reports of an ingest before any run: rows that would be quarantined,
/// by file and reason, and files whose scan would fall short of their footers.
#[derive(Debug, Default)]
pub struct Preview {
    /// (file, reason, rows) for rows that go to `rejected_events`.
    pub quarantined: Vec<(String, String, u64)>,
    /// Files a run would skip because their scan reads other rows than their footer holds.
    pub short: Vec<SkippedFile>,
}

impl Ingested {
    /// Scans every row once and counts, without writing anything.
    pub async fn preview(&self) -> Result<Preview> {
        use datafusion::functions_aggregate::expr_fn::count;
        let counted = self
            .checked
            .clone()
            .aggregate(
                vec![ident(SOURCE), ident(REASON)],
                vec![count(lit(1)).alias("rows")],
            )?
            .collect()
            .await?;
        let mut preview = Preview::default();
        let mut read = Read::default();
        for batch in counted {
            let files = cast_utf8(batch.column(0))?;
            let reasons = cast_utf8(batch.column(1))?;
            let rows = arrow::compute::cast(batch.column(2), &DataType::UInt64)?;
            let (files, reasons) = (files.as_string::<i32>(), reasons.as_string::<i32>());

            let rows = rows.as_primitive::<arrow::datatypes::UInt64Type>();
            for i in 0..batch.num_rows() {
                let file = files.value(i).to_string();
                *read.rows_by_file.entry(file.clone()).or_default() += rows.value(i);
                if reasons.is_valid(i) {
                    preview
                        .quarantined
                        .push((file, reasons.value(i).to_string(), rows.value(i)));
                }
            }
        }
        preview.quarantined.sort();
        preview.short = read.short_files(&self.inventory);
        Ok(preview)
    }
}

/// The plan keeping one row per message_id of `copies` (valid rows whose id may repeat, with
/// the internal source column): the one received first, as Segment and Snowplow keep. Exact
/// redeliveries are identical, so any tie-break among them gives the same row.
fn first_copies(copies: DataFrame, event_columns: Vec<Expr>) -> Result<DataFrame> {
    let copy_number = row_number()
        .partition_by(vec![ident(event::MESSAGE_ID)])
        .order_by(vec![
            ident(event::RECEIVED_AT).sort(true, false),
            ident(event::TIMESTAMP).sort(true, false),
            ident(SOURCE).sort(true, false),
        ])
        .build()?
        .alias(COPY);
    Ok(copies
        .window(vec![copy_number])?
        .filter(ident(COPY).eq(lit(1u64)))?
        .select(event_columns)?)
}

/// [`first_copies`] of collected rows, collected.
async fn keep_first_copies(
    ctx: &SessionContext,
    copies: Vec<RecordBatch>,
    event_columns: Vec<Expr>,
    schema: Schema,
) -> Result<DataFrame> {
    if copies.iter().all(|b| b.num_rows() == 0) {
        return Ok(ctx.read_batch(RecordBatch::new_empty(Arc::new(schema)))?);
    }
    let kept = first_copies(ctx.read_batches(copies)?, event_columns)?
        .collect()
        .await?;
    Ok(ctx.read_batches(if kept.is_empty() {
        vec![RecordBatch::new_empty(Arc::new(schema))]
    } else {
        kept
    })?)
}

/// The two tables an ingest writes, fed by one pass over the input (see [`split`]).
pub struct Split {
    /// `rejected_events` rows. Its plan can be executed once.
    pub rejected: DataFrame,
    /// `events` rows, one per message_id. Its plan can be executed once.
    pub events: DataFrame,
    /// Reads the input and feeds both; it must run while both are written. It resolves to
    /// the message_ids sent to `events` when [`split`] was asked for them, else nothing.
    pub driver: futures::future::BoxFuture<'static, Result<Read>>,
}

/// What [`split`]'s driver read.
#[derive(Debug, Default)]
pub struct Read {
    /// The message_ids sent to `events`, when asked for.
    pub ids: Vec<ArrayRef>,
    /// Rows scanned per input file (by its URL): what `rows_read` counts, checked against
    /// each footer's own count.
    pub rows_by_file: std::collections::HashMap<String, u64>,
}

impl Read {
    fn add_rows(&mut self, other: std::collections::HashMap<String, u64>) {
        for (file, rows) in other {
            *self.rows_by_file.entry(file).or_default() += rows;
        }
    }

    /// Every row scanned.
    pub fn rows(&self) -> u64 {
        self.rows_by_file.values().sum()
    }

    /// The files whose scan gave other than the rows their footer promised: a scan that
    /// read the wrong thing, or nothing. Counting their rows as read would lose events
    /// without a trace.
    pub fn short_files(&self, inventory: &Inventory) -> Vec<SkippedFile> {
        inventory
            .files
            .iter()
            .filter_map(|f| {
                let scanned = self.rows_by_file.get(&f.url).copied().unwrap_or(0);
                (scanned != f.rows).then(|| SkippedFile {
                    file: f.url.clone(),
                    reason: format!(
                        "the scan read {scanned} rows but the file's footer holds {}, so none of its rows are kept and it is not recorded as processed; land it again under a plain name (letters, digits, `-`, `_`, `=`) and report it to Tessera's developers",
                        f.rows
                    ),
                })
            })
            .collect()
    }
}

/// Batches in flight to each table's writer.
const SPLIT_CHANNEL: usize = 8;

/// Reads every row once and routes it: rejected rows to `rejected_events`, valid rows to
/// `events`, and valid rows whose message_id may repeat to a buffer that is deduplicated
/// (as in [`plan`]) once the input is read and then sent to `events` too.
///
/// Writing the two tables from `Ingested`'s plans scans the input three times (the
/// quarantine, the copies, the history), each time decoding every column and validating
/// every JSON document. Here both writers read from channels the one scan fills.
pub fn split(ctx: &SessionContext, ingested: &Ingested, want_ids: bool) -> Result<Split> {
    use tokio::sync::mpsc;
    let rejected_schema = Arc::new(ingested.rejected.schema().as_arrow().clone());
    let events_schema = Arc::new(ingested.events.schema().as_arrow().clone());
    let checked_schema = ingested.checked.schema().as_arrow().clone();
    let width = events_schema.fields().len();
    let source = checked_schema.index_of(SOURCE)?;
    let reason = checked_schema.index_of(REASON)?;
    let message_id = events_schema.index_of(event::MESSAGE_ID)?;
    let copy_schema =
        Arc::new(checked_schema.project(&(0..width).chain([source]).collect::<Vec<_>>())?);
    let event_columns: Vec<Expr> = events_schema
        .fields()
        .iter()
        .map(|f| ident(f.name()))
        .collect();

    let (rejected_tx, rejected_rx) = mpsc::channel(SPLIT_CHANNEL);
    let (events_tx, events_rx) = mpsc::channel(SPLIT_CHANNEL);
    let table = |schema: &SchemaRef, rx| -> Result<DataFrame> {
        let stream = Arc::new(OnceStream {
            schema: schema.clone(),
            rx: std::sync::Mutex::new(Some(rx)),
        });
        let table =
            datafusion::catalog::streaming::StreamingTable::try_new(schema.clone(), vec![stream])?;
        Ok(ctx.read_table(Arc::new(table))?)
    };
    let rejected = table(&rejected_schema, rejected_rx)?;
    let events = table(&events_schema, events_rx)?;

    let route = Route {
        rejected_schema,
        events_schema: events_schema.clone(),
        copy_schema,
        width,
        source,
        reason,
        message_id,
        repeated: ingested.repeated.clone(),
        want_ids,
    };
    let checked = ingested.checked.clone();
    let ctx = ctx.clone();
    let driver = async move {
        let outcome: Result<Read> = async {
            // One task per partition, so the partitions are decoded on every core; returning
            // early drops the set, which stops the others.
            let mut tasks = tokio::task::JoinSet::new();
            for stream in checked.execute_stream_partitioned().await? {
                let route = route.clone();
                let (rejected_tx, events_tx) = (rejected_tx.clone(), events_tx.clone());
                tasks.spawn(async move { route.partition(stream, &rejected_tx, &events_tx).await });
            }
            let mut copies = Vec::new();
            let mut read = Read::default();
            while let Some(done) = tasks.join_next().await {
                let (c, i, rows) = done.map_err(|e| {
                    Error::Internal(format!("reading the event files stopped: {e}"))
                })??;
                copies.extend(c);
                read.ids.extend(i);
                read.add_rows(rows);
            }
            if route.repeated.is_some() {
                let kept =
                    keep_first_copies(&ctx, copies, event_columns, events_schema.as_ref().clone())
                        .await?
                        .collect()
                        .await?;
                for batch in kept {
                    let batch =
                        RecordBatch::try_new(events_schema.clone(), batch.columns().to_vec())?;
                    if want_ids {
                        read.ids.push(cast_utf8(batch.column(message_id))?);
                    }
                    send(&events_tx, batch).await?;
                }
            }
            Ok(read)
        }
        .await;
        if let Err(e) = &outcome {
            // Both writers must fail rather than commit what they received so far.
            for tx in [&rejected_tx, &events_tx] {
                let _ = tx
                    .send(Err(datafusion::error::DataFusionError::Execution(
                        e.to_string(),
                    )))
                    .await;
            }
        }
        outcome
    };
    Ok(Split {
        rejected,
        events,
        driver: Box::pin(driver),
    })
}

type Batches = tokio::sync::mpsc::Sender<datafusion::error::Result<RecordBatch>>;

async fn send(tx: &Batches, batch: RecordBatch) -> Result<()> {
    if batch.num_rows() == 0 {
        return Ok(());
    }
    tx.send(Ok(batch))
        .await
        // The writer went away first: its own error says why.
        .map_err(|_| Error::WriterStopped)
}

fn cast_utf8(array: &ArrayRef) -> Result<ArrayRef> {
    Ok(arrow::compute::cast(array, &DataType::Utf8)?)
}

/// Where [`split`] sends each row of the checked input.
#[derive(Clone)]
struct Route {
    rejected_schema: SchemaRef,
    events_schema: SchemaRef,
    copy_schema: SchemaRef,
    /// The event columns are the input's first `width`.
    width: usize,
    source: usize,
    reason: usize,
    /// In `events_schema`.
    message_id: usize,
    repeated: Option<Arc<IdSet>>,
    want_ids: bool,
}

impl Route {
    /// Routes one partition of the input; returns its candidate copies and, when wanted,
    /// the message_ids it sent to `events`.
    async fn partition(
        &self,
        mut stream: datafusion::execution::SendableRecordBatchStream,
        rejected_tx: &Batches,
        events_tx: &Batches,
    ) -> Result<(
        Vec<RecordBatch>,
        Vec<ArrayRef>,
        std::collections::HashMap<String, u64>,
    )> {
        use arrow::compute::{and, filter_record_batch, is_not_null, is_null, not as negate};
        let mut copies = Vec::new();
        let mut ids = Vec::new();
        let mut rows_by_file = std::collections::HashMap::new();
        while let Some(batch) = stream.next().await {
            let batch = batch?;
            count_by_file(batch.column(self.source), &mut rows_by_file)?;
            let reason = batch.column(self.reason);
            let event_columns = batch.columns()[..self.width].to_vec();

            let rejected = is_not_null(reason)?;
            if rejected.true_count() > 0 {
                let mut columns = event_columns.clone();
                columns.push(reason.clone());
                columns.push(batch.column(self.source).clone());
                let all = RecordBatch::try_new(self.rejected_schema.clone(), columns)?;
                send(rejected_tx, filter_record_batch(&all, &rejected)?).await?;
            }

            let valid = is_null(reason)?;
            let keep = match &self.repeated {
                None => valid,
                Some(repeated) => {
                    let ids = cast_utf8(&event_columns[self.message_id])?;
                    let candidate = may_repeat(ids.as_string::<i32>(), repeated);
                    let copy = and(&valid, &candidate)?;
                    if copy.true_count() > 0 {
                        let mut columns = event_columns.clone();
                        columns.push(batch.column(self.source).clone());
                        let all = RecordBatch::try_new(self.copy_schema.clone(), columns)?;
                        copies.push(filter_record_batch(&all, &copy)?);
                    }
                    and(&valid, &negate(&candidate)?)?
                }
            };
            let all = RecordBatch::try_new(self.events_schema.clone(), event_columns)?;
            let kept = filter_record_batch(&all, &keep)?;
            if self.want_ids && kept.num_rows() > 0 {
                ids.push(cast_utf8(kept.column(self.message_id))?);
            }
            send(events_tx, kept).await?;
        }
        Ok((copies, ids, rows_by_file))
    }
}

/// Adds a batch's rows to the count of their source file (a batch nearly always comes
/// from one file: one run of equal values).
fn count_by_file(
    source: &ArrayRef,
    counts: &mut std::collections::HashMap<String, u64>,
) -> Result<()> {
    let source = cast_utf8(source)?;
    let files = source.as_string::<i32>();
    let mut start = 0;
    for i in 1..=files.len() {
        if i == files.len() || files.value(i) != files.value(start) {
            let file = files.value(start);
            let n = (i - start) as u64;
            match counts.get_mut(file) {
                Some(count) => *count += n,
                None => {
                    counts.insert(file.to_string(), n);
                }
            }
            start = i;
        }
    }
    Ok(())
}

/// A table whose one partition is what a channel receives; it can be read once.
#[derive(Debug)]
struct OnceStream {
    schema: SchemaRef,
    rx: std::sync::Mutex<
        Option<tokio::sync::mpsc::Receiver<datafusion::error::Result<RecordBatch>>>,
    >,
}

impl datafusion::physical_plan::streaming::PartitionStream for OnceStream {
    fn schema(&self) -> &SchemaRef {
        &self.schema
    }

    fn execute(
        &self,
        _ctx: Arc<datafusion::execution::TaskContext>,
    ) -> datafusion::execution::SendableRecordBatchStream {
        let rx = self.rx.lock().map(|mut rx| rx.take()).unwrap_or(None);
        let stream = match rx {
            Some(rx) => futures::stream::unfold(rx, |mut rx| async move {
                rx.recv().await.map(|batch| (batch, rx))
            })
            .boxed(),
            None => futures::stream::once(async {
                Err(datafusion::error::DataFusionError::Internal(
                    "an ingest channel was read twice".into(),
                ))
            })
            .boxed(),
        };
        Box::pin(
            datafusion::physical_plan::stream::RecordBatchStreamAdapter::new(
                self.schema.clone(),
                stream,
            ),
        )
    }
}

/// Finds and checks event files, plans ingest and registers `events`.
///
/// Files in `known_bad` are skipped with their reason (see [`find_corrupt`]).
pub async fn ingest(
    engine: &crate::engine::Engine,
    known_bad: &[SkippedFile],
    seen: Option<&crate::output::state::Seen>,
    on_file: &(dyn Fn(u64, u64) + Sync),
) -> Result<Ingested> {
    let inventory = discover(&engine.event_places, known_bad, seen, on_file).await?;
    let ingested = plan(&engine.ctx, inventory).await?;
    engine.ctx.deregister_table(crate::tables::EVENTS)?;
    engine
        .ctx
        .register_table(crate::tables::EVENTS, ingested.events.clone().into_view())?;
    Ok(ingested)
}

/// [`ingest`], and when it fails, once more without the files whose rows are corrupt.
pub async fn ingest_skipping_corrupt(engine: &crate::engine::Engine) -> Result<Ingested> {
    match ingest(engine, &[], None, &|_, _| {}).await {
        Ok(ingested) => Ok(ingested),
        Err(e) => {
            let corrupt = find_corrupt(&engine.event_places, None)
                .await
                .unwrap_or_default();
            if corrupt.is_empty() {
                return Err(e);
            }
            ingest(engine, &corrupt, None, &|_, _| {}).await
        }
    }
}

/// Rows of `_state/input_files` for the files a run read.
pub fn input_files_batch(files: &[EventFile], run_id: &str) -> Result<arrow::array::RecordBatch> {
    let schema = std::sync::Arc::new(arrow::datatypes::Schema::new(vec![
        arrow::datatypes::Field::new("file", arrow::datatypes::DataType::Utf8, false),
        arrow::datatypes::Field::new("size", arrow::datatypes::DataType::Int64, false),
        arrow::datatypes::Field::new("e_tag", arrow::datatypes::DataType::Utf8, true),
        arrow::datatypes::Field::new("rows", arrow::datatypes::DataType::Int64, false),
        arrow::datatypes::Field::new("run_id", arrow::datatypes::DataType::Utf8, false),
    ]));
    let columns: Vec<arrow::array::ArrayRef> = vec![
        std::sync::Arc::new(arrow::array::StringArray::from_iter_values(
            files.iter().map(|f| f.url.as_str()),
        )),
        std::sync::Arc::new(arrow::array::Int64Array::from_iter_values(
            files.iter().map(|f| f.size as i64),
        )),
        std::sync::Arc::new(arrow::array::StringArray::from_iter(
            files.iter().map(|f| f.e_tag.as_deref()),
        )),
        std::sync::Arc::new(arrow::array::Int64Array::from_iter_values(
            files.iter().map(|f| f.rows as i64),
        )),
        std::sync::Arc::new(arrow::array::StringArray::from_iter_values(
            files.iter().map(|_| run_id),
        )),
    ];
    Ok(arrow::array::RecordBatch::try_new(schema, columns)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::datatypes::TimeUnit;

    #[test]
    fn seen_ids_finds_exactly_the_hashes_inserted_more_than_once() {
        // Hashes spread over every part, with runs long enough to flush, some repeated in
        // the same run, some across runs, one three times.
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let unique: Vec<u64> = (0..20_000).map(|_| next()).collect();
        let mut input = unique.clone();
        input.extend(unique.iter().step_by(97).copied());
        input.push(unique[5]);
        input.insert(10, unique[11]);
        let mut want = std::collections::HashSet::new();
        let mut once = std::collections::HashSet::new();
        for h in &input {
            if !once.insert(*h) {
                want.insert(*h);
            }
        }
        for rows in [0, input.len() as u64, u64::MAX] {
            // One writer, and three taking turns (as partitions of a scan do): a hash that
            // two writers each saw once is repeated too.
            for writers in [1, 3] {
                let sets = Arc::new(SeenSets::new(rows));
                let mut seen: Vec<SeenIds> =
                    (0..writers).map(|_| SeenIds::new(sets.clone())).collect();
                for (i, h) in input.iter().enumerate() {
                    seen[i % writers].insert(*h);
                }
                seen.into_iter().for_each(SeenIds::finish);
                let got: std::collections::HashSet<u64> = Arc::into_inner(sets)
                    .unwrap()
                    .repeated()
                    .into_iter()
                    .collect();
                assert_eq!(got, want, "sized for {rows} rows, {writers} writers");
            }
        }
    }

    /// Ingests one file of `(message_id, time)` rows in `unit` and returns the events' ids
    /// with their µs timestamps, and the quarantined ids with their reasons.
    async fn intake(unit: TimeUnit, times: &[i64]) -> (Vec<(String, i64)>, Vec<String>) {
        use arrow::array::{Array, PrimitiveArray};
        use arrow::datatypes::{
            TimestampMicrosecondType, TimestampMillisecondType, TimestampNanosecondType,
            TimestampSecondType,
        };
        let dir = tempfile::tempdir().unwrap();
        let ids: Vec<String> = (0..times.len()).map(|i| format!("m{i}")).collect();
        let values = times.to_vec();
        let time: ArrayRef = match unit {
            TimeUnit::Second => {
                Arc::new(PrimitiveArray::<TimestampSecondType>::from(values).with_timezone("UTC"))
            }
            TimeUnit::Millisecond => Arc::new(
                PrimitiveArray::<TimestampMillisecondType>::from(values).with_timezone("UTC"),
            ),
            TimeUnit::Microsecond => Arc::new(
                PrimitiveArray::<TimestampMicrosecondType>::from(values).with_timezone("UTC"),
            ),
            TimeUnit::Nanosecond => Arc::new(
                PrimitiveArray::<TimestampNanosecondType>::from(values).with_timezone("UTC"),
            ),
        };
        let schema = Arc::new(Schema::new(vec![
            Field::new("message_id", DataType::Utf8, true),
            Field::new("type", DataType::Utf8, true),
            Field::new("timestamp", time.data_type().clone(), true),
        ]));
        let batch = RecordBatch::try_new(
            schema.clone(),
            vec![
                Arc::new(arrow::array::StringArray::from(ids.clone())),
                Arc::new(arrow::array::StringArray::from(vec!["track"; times.len()])),
                time,
            ],
        )
        .unwrap();
        let bytes = crate::cli::generate::parquet_bytes(schema, &[batch]).unwrap();
        std::fs::write(dir.path().join("e.parquet"), bytes).unwrap();
        let place =
            Place::open(dir.path().to_str().unwrap(), dir.path(), "storage.events").unwrap();
        let ctx = crate::engine::new_context().unwrap();
        place.register(&ctx);
        let places = [EventPlace {
            place,
            format: EventFormat::Segment,
        }];
        let inventory = discover(&places, &[], None, &|_, _| {}).await.unwrap();
        let ingested = plan(&ctx, inventory).await.unwrap();
        let mut events = Vec::new();
        for batch in ingested.events.clone().collect().await.unwrap() {
            let ids = cast_utf8(batch.column_by_name("message_id").unwrap()).unwrap();
            let ts = batch.column_by_name("timestamp").unwrap();
            let ts = ts.as_primitive::<TimestampMicrosecondType>();
            for i in 0..batch.num_rows() {
                events.push((ids.as_string::<i32>().value(i).to_string(), ts.value(i)));
            }
        }
        events.sort();
        let mut rejected = Vec::new();
        for batch in ingested.rejected.clone().collect().await.unwrap() {
            let ids = cast_utf8(batch.column_by_name("message_id").unwrap()).unwrap();
            let reasons = cast_utf8(batch.column_by_name("reason").unwrap()).unwrap();
            for i in 0..batch.num_rows() {
                let reason = reasons.as_string::<i32>().value(i);
                assert!(reason.starts_with("timestamp out of range"), "{reason}");
                rejected.push(ids.as_string::<i32>().value(i).to_string());
            }
        }
        rejected.sort();
        (events, rejected)
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(12))]
        #[test]
        fn timestamps_of_any_unit_are_converted_exactly_or_quarantined(
            unit in proptest::sample::select(vec![TimeUnit::Second, TimeUnit::Millisecond, TimeUnit::Microsecond, TimeUnit::Nanosecond]),
            times in proptest::collection::vec(proptest::prop_oneof![
                proptest::num::i64::ANY,
                -10_000_000_000_000i64..10_000_000_000_000i64,
                proptest::sample::select(vec![i64::MAX, i64::MIN, i64::MAX / 1000, i64::MAX / 1000 + 1, i64::MIN / 1000 - 1, 0]),
            ], 1..20),
        ) {
            let rt = tokio::runtime::Runtime::new().unwrap();
            let (events, rejected) = rt.block_on(intake(unit, &times));
            let scale: i64 = match unit {
                TimeUnit::Second => 1_000_000,
                TimeUnit::Millisecond => 1_000,
                _ => 1,
            };
            let mut want_events = Vec::new();
            let mut want_rejected = Vec::new();
            for (i, t) in times.iter().enumerate() {
                let id = format!("m{i}");
                let micros = match unit {
                    TimeUnit::Nanosecond => Some(t / 1000),
                    _ => t.checked_mul(scale),
                };
                match micros {
                    Some(us) => want_events.push((id, us)),
                    None => want_rejected.push(id),
                }
            }
            want_events.sort();
            want_rejected.sort();
            proptest::prop_assert_eq!(events, want_events);
            proptest::prop_assert_eq!(rejected, want_rejected);
        }
    }

    fn names(path: &str) -> Vec<String> {
        path.split('/').map(str::to_string).collect()
    }

    #[test]
    fn event_files_and_partitions() {
        let p = names("date=2026-11-28/part-0.parquet");
        assert!(is_event_file(&p));
        assert_eq!(
            hive_partitions(&p).unwrap(),
            vec![("date".into(), "2026-11-28".into())]
        );
        assert!(!is_event_file(&names("_SUCCESS")));
        assert!(!is_event_file(&names("_tmp/x.parquet")));
        assert!(!is_event_file(&names(".staging/x.parquet")));
        assert!(!is_event_file(&names("notes.txt")));
    }

    #[test]
    fn hive_folder_names_are_decoded_once_and_never_panic() {
        let value = |path: &str| hive_partitions(&names(path)).map(|p| p[0].1.clone());
        assert_eq!(value("date=%41/x.parquet").unwrap(), "A");
        assert_eq!(value("date=100%25/x.parquet").unwrap(), "100%");
        assert_eq!(
            value("date=2026-10-01#1/x.parquet").unwrap(),
            "2026-10-01#1"
        );
        // A `%` not followed by two hex digits stays as it is, also before a multi-byte
        // character (this sliced a character in two and panicked).
        assert_eq!(value("date=%1é/x.parquet").unwrap(), "%1é");
        assert_eq!(value("date=%/x.parquet").unwrap(), "%");
        // Escapes that decode to bytes that are not UTF-8 make the file unreadable, by name.
        let err = value("date=%e2%82/x.parquet").unwrap_err();
        assert!(err.contains("date=%e2%82"), "{err}");
        // Folders that are not key=value, or whose key is not a column name, give nothing.
        assert!(hive_partitions(&names("2026/11/x.parquet"))
            .unwrap()
            .is_empty());
        assert!(hive_partitions(&names("Bad Key=1/x.parquet"))
            .unwrap()
            .is_empty());
    }

    proptest::proptest! {
        #[test]
        fn hive_decoding_takes_any_folder_name(folder in "\\PC{0,24}", value in "[%a-f0-9é#?=]{0,12}") {
            let path = vec![folder, format!("date={value}"), "x.parquet".to_string()];
            // Never panics; when it decodes, re-escaping the value gives it back.
            if let Ok(found) = hive_partitions(&path) {
                if let Some((_, v)) = found.iter().find(|(k, _)| k == "date") {
                    let again: String = percent_encoding::utf8_percent_encode(v, percent_encoding::NON_ALPHANUMERIC).to_string();
                    let back = percent_encoding::percent_decode_str(&again).decode_utf8().unwrap();
                    proptest::prop_assert_eq!(back.as_ref(), v.as_str());
                }
            }
        }

        #[test]
        fn scan_urls_give_back_the_object_path(parts in proptest::collection::vec("[^/\\x00-\\x1f]{1,12}", 1..4)) {
            // What DataFusion does with a URL: parse it, then decode its path once.
            let place = Place::open("/tmp/tessera-prop", std::path::Path::new("/"), "storage.events").unwrap();
            let path = parts.iter().fold(ObjectPath::default(), |p, n| p.join(object_store::path::PathPart::from(n.as_str())));
            let url = url::Url::parse(&scan_url(&place, &path)).unwrap();
            let back = ObjectPath::from_url_path(url.path()).unwrap();
            proptest::prop_assert_eq!(back, path);
        }
    }

    #[test]
    fn widening_and_conflicts() {
        assert_eq!(
            unify(&DataType::Int32, &DataType::Int64),
            Some(DataType::Int64)
        );
        assert_eq!(
            unify(&DataType::Int32, &DataType::Float32),
            Some(DataType::Float64)
        );
        assert_eq!(unify(&DataType::Utf8, &DataType::Int64), None);
        assert_eq!(
            plain_type(&DataType::Timestamp(TimeUnit::Nanosecond, None)),
            timestamp_type()
        );
        assert_eq!(plain_type(&DataType::Utf8View), DataType::Utf8);
    }

    #[test]
    fn required_columns_and_kinds() {
        let ok = Schema::new(vec![
            Field::new("message_id", DataType::Utf8, true),
            Field::new("type", DataType::Utf8View, true),
            Field::new(
                "timestamp",
                DataType::Timestamp(TimeUnit::Millisecond, None),
                true,
            ),
        ]);
        assert!(check_schema(&ok, &[], &BTreeMap::new()).is_ok());
        let missing = Schema::new(vec![Field::new("message_id", DataType::Utf8, true)]);
        assert!(check_schema(&missing, &[], &BTreeMap::new())
            .unwrap_err()
            .contains("`type`"));
        let wrong = Schema::new(vec![
            Field::new("message_id", DataType::Utf8, true),
            Field::new("type", DataType::Utf8, true),
            Field::new("timestamp", DataType::Utf8, true),
        ]);
        assert!(check_schema(&wrong, &[], &BTreeMap::new())
            .unwrap_err()
            .contains("timestamp"));
    }
}
