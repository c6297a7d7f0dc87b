//! Segment exports a destination imports as they are: Salesforce Bulk API 2.0 CSV, HubSpot
//! import CSV with its import request, plain CSV and Parquet; whole memberships or only who
//! entered and who left; written by `tessera export segment --to` and, for `[[exports]]`, after
//! every run beside the tables.
//!
//! A CRM takes one value per field, named by its own field API names, in files under its upload
//! limits: so columns are mapped destination ← Tessera, list columns give their first value,
//! and files are cut before they reach the limit, each with the header. The `--hash-pii` rules
//! of [`crate::cli::export`] apply before the mapping, so a hashed CRM file holds no personal
//! data in clear either.

use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema};
use datafusion::dataframe::DataFrame;

use crate::cli::export::{csv_batch, hash_pii, segment_frame, ExportFormat, ExportSummary};
use crate::config::{ExportSpec, ExportTarget};
use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::tables;

/// Salesforce Bulk API 2.0: upload data of at most 100 MB (Salesforce base64-encodes it, which
/// adds about half again, under its 150 MB request limit).
pub const SALESFORCE_MAX_FILE_BYTES: u64 = 100_000_000;
/// HubSpot imports: 20 MB a file on free tools (512 MB on paid subscriptions; raise
/// `max_file_bytes` there). The smaller limit is the default so a file fits every account.
pub const HUBSPOT_MAX_FILE_BYTES: u64 = 20_000_000;
/// HubSpot imports: 1,048,576 rows a file, the header row included.
pub const HUBSPOT_MAX_FILE_ROWS: u64 = 1_048_575;
/// HubSpot's object type id of contacts.
const HUBSPOT_CONTACT: &str = "0-1";

/// Which members a file holds.
#[derive(Debug, Clone)]
pub enum Members {
    /// Everyone in the segment now.
    All,
    /// Who entered or left since run `RUN_ID` (net: a member who left and came back is in
    /// neither file).
    Since(String),
    /// Who entered or left in run `RUN_ID` itself.
    OfRun(String),
}

/// `--to`: the destination of `tessera export segment`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ExportTo {
    /// Salesforce Bulk API 2.0 ingest CSV (a folder of files).
    Salesforce,
    /// HubSpot import CSV and its importRequest JSON (a folder of files).
    Hubspot,
    /// CSV (as --format csv).
    Csv,
    /// Parquet (as --format parquet).
    Parquet,
}

impl ExportTo {
    /// The `--format` this destination is, for plain files.
    pub fn plain_format(self) -> Option<ExportFormat> {
        match self {
            ExportTo::Csv => Some(ExportFormat::Csv),
            ExportTo::Parquet => Some(ExportFormat::Parquet),
            _ => None,
        }
    }

    /// The target of `--to` (or, without it, of `--format`).
    pub fn target(to: Option<ExportTo>, format: ExportFormat) -> ExportTarget {
        match (to, format) {
            (Some(ExportTo::Salesforce), _) => ExportTarget::Salesforce,
            (Some(ExportTo::Hubspot), _) => ExportTarget::Hubspot,
            (Some(ExportTo::Csv), _) => ExportTarget::Csv,
            (Some(ExportTo::Parquet), _) | (None, ExportFormat::Parquet) => ExportTarget::Parquet,
            (None, ExportFormat::Csv) => ExportTarget::Csv,
        }
    }
}

/// One export to a destination.
#[derive(Debug, Clone)]
pub struct TargetExport {
    /// Names the export (HubSpot shows it as the import's name).
    pub name: String,
    /// The segment.
    pub segment: String,
    /// The destination.
    pub target: ExportTarget,
    /// Destination column ← Tessera column; empty: the target's standard columns.
    pub columns: Vec<(String, String)>,
    /// The destination column holding `profile_id`.
    pub external_id: Option<String>,
    /// The CSV field delimiter.
    pub delimiter: u8,
    /// Files are cut before growing past this (default: the target's limit).
    pub max_file_bytes: Option<u64>,
    /// Apply `--hash-pii` first.
    pub hash_pii: bool,
    /// CSV target only: write formula-like cells as they are.
    pub raw: bool,
}

impl TargetExport {
    /// The export an `[[exports]]` entry describes.
    pub fn from_spec(spec: &ExportSpec) -> TargetExport {
        TargetExport {
            name: spec.name.clone(),
            segment: spec.segment.clone(),
            target: spec.target,
            columns: spec
                .columns
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            external_id: spec.external_id.clone(),
            delimiter: spec
                .delimiter
                .as_deref()
                .and_then(crate::config::csv_char)
                .unwrap_or(b','),
            max_file_bytes: spec.max_file_bytes,
            hash_pii: spec.hash_pii,
            raw: false,
        }
    }

    /// The export `tessera export segment` asks for: an `[[exports]]` entry of the same segment
    /// and target gives the defaults (columns, external id, delimiter, cut size, hashing), and
    /// the command line's options win. `columns` are `Destination=column` pairs or plain names.
    #[allow(clippy::too_many_arguments)]
    pub fn for_command(
        project: &crate::config::Project,
        segment: &str,
        target: ExportTarget,
        columns: &[String],
        hash_pii: bool,
        raw: bool,
        max_file_bytes: Option<u64>,
        delimiter: Option<&str>,
    ) -> Result<TargetExport> {
        let mut export = match project
            .config
            .exports
            .iter()
            .find(|e| e.segment == segment && e.target == target)
        {
            Some(spec) => TargetExport::from_spec(spec),
            None => TargetExport {
                name: segment.to_string(),
                segment: segment.to_string(),
                target,
                columns: Vec::new(),
                external_id: None,
                delimiter: b',',
                max_file_bytes: None,
                hash_pii: false,
                raw: false,
            },
        };
        if !columns.is_empty() {
            export.columns = columns
                .iter()
                .map(|c| match c.split_once('=') {
                    Some((to, from)) => (to.trim().to_string(), from.trim().to_string()),
                    None => (c.clone(), c.clone()),
                })
                .collect();
            if !export.is_crm() {
                // Plain files name their columns as asked, with no external id column added.
                export.external_id = None;
            }
        }
        export.hash_pii |= hash_pii;
        export.raw = raw;
        if max_file_bytes.is_some() {
            export.max_file_bytes = max_file_bytes;
        }
        if export.max_file_bytes == Some(0) {
            return Err(Error::Usage("--max-file-bytes: must be at least 1".into()));
        }
        if let Some(d) = delimiter {
            export.delimiter = match crate::config::csv_char(d) {
                Some(b @ (b',' | b';' | b'|' | b'\t' | b'^' | b'`')) => b,
                _ => {
                    return Err(Error::Usage(format!(
                        "--delimiter {d:?}: use , ; | ^ ` or \\t (the delimiters Salesforce Bulk API 2.0 takes)"
                    )))
                }
            };
        }
        if export.target == ExportTarget::Hubspot && export.delimiter != b',' {
            return Err(Error::Usage(
                "--to hubspot: HubSpot imports read commas; leave the delimiter at ,".into(),
            ));
        }
        Ok(export)
    }

    fn is_crm(&self) -> bool {
        matches!(
            self.target,
            ExportTarget::Salesforce | ExportTarget::Hubspot
        )
    }

    fn external_id(&self) -> Option<String> {
        self.external_id.clone().or_else(|| match self.target {
            ExportTarget::Salesforce => Some("Tessera_Profile_Id__c".into()),
            ExportTarget::Hubspot => Some("tessera_profile_id".into()),
            _ => None,
        })
    }

    fn limits(&self) -> (u64, u64) {
        let (bytes, rows) = match self.target {
            ExportTarget::Salesforce => (SALESFORCE_MAX_FILE_BYTES, u64::MAX),
            ExportTarget::Hubspot => (HUBSPOT_MAX_FILE_BYTES, HUBSPOT_MAX_FILE_ROWS),
            _ => (u64::MAX, u64::MAX),
        };
        (self.max_file_bytes.unwrap_or(bytes), rows)
    }

    /// The standard contact columns of the target, destination ← Tessera.
    fn default_columns(&self) -> &'static [(&'static str, &'static str)] {
        match self.target {
            ExportTarget::Salesforce => &[
                ("Email", "emails"),
                ("Phone", "phones"),
                ("FirstName", "first_name"),
                ("LastName", "last_name"),
            ],
            ExportTarget::Hubspot => &[
                ("email", "emails"),
                ("phone", "phones"),
                ("firstname", "first_name"),
                ("lastname", "last_name"),
            ],
            _ => &[],
        }
    }

    /// Destination ← Tessera columns for a frame with columns `available`.
    fn mapping(&self, available: &[String]) -> Result<Vec<(String, String)>> {
        let mut out: Vec<(String, String)> = Vec::new();
        if let Some(id) = self.external_id() {
            out.push((id, "profile_id".into()));
        }
        if self.columns.is_empty() {
            if self.is_crm() {
                out.extend(
                    self.default_columns()
                        .iter()
                        .filter(|(_, from)| available.iter().any(|a| a == from))
                        .map(|(to, from)| (to.to_string(), from.to_string())),
                );
            } else {
                let rest: Vec<(String, String)> = available
                    .iter()
                    .filter(|a| !out.iter().any(|(_, from)| from == *a))
                    .map(|a| (a.clone(), a.clone()))
                    .collect();
                out.extend(rest);
            }
        } else {
            for (to, from) in &self.columns {
                if !available.contains(from) {
                    return Err(Error::Usage(format!(
                        "export {}: column `{from}` (mapped to `{to}`) is not a column of segment {} or of profiles (available: {}); fix the columns mapping",
                        self.name,
                        self.segment,
                        available.join(", ")
                    )));
                }
                out.push((to.clone(), from.clone()));
            }
        }
        let mut seen = std::collections::HashSet::new();
        if let Some((twice, _)) = out.iter().find(|(to, _)| !seen.insert(to.as_str())) {
            return Err(Error::Usage(format!(
                "export {}: destination column `{twice}` is mapped twice",
                self.name
            )));
        }
        Ok(out)
    }
}

/// What an export to a destination wrote.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct TargetSummary {
    /// Members in the members files (0 for a changes export).
    pub rows: u64,
    /// Members in the add files.
    pub added: u64,
    /// Members in the remove files.
    pub removed: u64,
    /// The files written, in order.
    pub files: Vec<String>,
    /// Columns written as SHA-256 digests.
    pub hashed: Vec<String>,
    /// Columns left out as personal data.
    pub dropped: Vec<String>,
    /// CSV cells given a leading `'` (CSV target only).
    pub neutralised_cells: u64,
}

/// The files of an export, by name, before they are stored.
pub type Files = Vec<(String, Vec<u8>)>;

/// Builds every file of `export` for `members`.
pub async fn build(
    engine: &Engine,
    export: &TargetExport,
    members: &Members,
) -> Result<(Files, TargetSummary)> {
    let base = segment_frame(engine, &export.segment).await?;
    let available: Vec<String> = base
        .schema()
        .fields()
        .iter()
        .map(|f| f.name().clone())
        .collect();
    let mapping = export.mapping(&available)?;
    let mut summary = TargetSummary::default();
    let mut files = Files::new();
    let parts: Vec<(&str, DataFrame)> = match members {
        Members::All => vec![("members", base)],
        Members::Since(_) | Members::OfRun(_) => {
            let (added, removed) = changes(engine, &export.segment, members).await?;
            let added = ids_frame(engine, "profile_id", added)?;
            let add = base.join(
                added,
                datafusion::common::JoinType::LeftSemi,
                &["profile_id"],
                &["profile_id"],
                None,
            )?;
            vec![
                ("add", add),
                ("remove", removed_frame(engine, removed).await?),
            ]
        }
    };
    for (part, df) in parts {
        let present: Vec<String> = df
            .schema()
            .fields()
            .iter()
            .map(|f| f.name().clone())
            .collect();
        let mut wanted: Vec<&str> = Vec::new();
        for (_, from) in &mapping {
            if present.contains(from) && !wanted.contains(&from.as_str()) {
                wanted.push(from);
            }
        }
        let df = crate::output::plain_columns(df.select_columns(&wanted)?)?;
        let mut batches = df.collect().await?;
        let rows: u64 = batches.iter().map(|b| b.num_rows() as u64).sum();
        match part {
            "members" => summary.rows = rows,
            "add" => summary.added = rows,
            _ => summary.removed = rows,
        }
        let out = std::path::PathBuf::from(format!("{}/{part}", export.name));
        let mut hashing = ExportSummary::default();
        if export.hash_pii {
            hash_pii(&mut batches, engine, &export.segment, &out, &mut hashing)?;
            for c in hashing.hashed.drain(..) {
                if !summary.hashed.contains(&c) {
                    summary.hashed.push(c);
                }
            }
            for c in hashing.dropped.drain(..) {
                if !summary.dropped.contains(&c) {
                    summary.dropped.push(c);
                }
            }
        }
        if export.target == ExportTarget::Parquet {
            let name = format!("{part}.parquet");
            files.push((name, parquet_bytes(&batches, &mapping)?));
            continue;
        }
        let table = text_table(&batches, &mapping, export, &mut summary.neutralised_cells)?;
        let (max_bytes, max_rows) = export.limits();
        let extension = "csv";
        let pieces = cut_csv(&table, export.delimiter, max_bytes, max_rows)
            .map_err(|message| Error::Usage(format!("export {}: {message}", export.name)))?;
        let numbered = export.is_crm();
        for (i, bytes) in pieces.into_iter().enumerate() {
            let name = if numbered {
                format!("{part}-{:04}.{extension}", i + 1)
            } else {
                format!("{part}.{extension}")
            };
            // Who left is not imported: an upsert would only touch their fields again.
            if export.target == ExportTarget::Hubspot && part != "remove" {
                let request = hubspot_request(export, &name, &table.0);
                let stem = name.trim_end_matches(".csv");
                files.push((format!("{stem}.import.json"), request.into_bytes()));
            }
            files.push((name, bytes));
        }
    }
    if export.target == ExportTarget::Salesforce {
        files.push(("job.json".into(), salesforce_job(export).into_bytes()));
    }
    summary.files = files.iter().map(|(n, _)| n.clone()).collect();
    Ok((files, summary))
}

/// The profile ids who entered and who left segment `segment`, per `members`.
async fn changes(
    engine: &Engine,
    segment: &str,
    members: &Members,
) -> Result<(Vec<String>, Vec<String>)> {
    let quote = |s: &str| s.replace('\'', "''");
    let segment_q = quote(segment);
    let sql = match members {
        Members::All => return Ok((Vec::new(), Vec::new())),
        Members::OfRun(run) => format!(
            "SELECT profile_id, change FROM {} WHERE segment = '{segment_q}' AND run_id = '{}' ORDER BY profile_id",
            tables::SEGMENT_CHANGES,
            quote(run)
        ),
        Members::Since(run) => {
            let known = engine
                .ctx
                .sql(&format!(
                    "SELECT count(*) AS n FROM {} WHERE run_id = '{}'",
                    tables::RUNS,
                    quote(run)
                ))
                .await?
                .collect()
                .await?;
            let n = known
                .first()
                .and_then(|b| b.column(0).as_primitive_opt::<arrow::datatypes::Int64Type>())
                .map(|a| a.value(0))
                .unwrap_or(0);
            if n == 0 {
                return Err(Error::Usage(format!(
                    "--changes-since {run}: no such run in the runs table; list runs with `tessera query \"SELECT run_id, finished_at FROM runs ORDER BY run_id\"`"
                )));
            }
            // Members then: whose last change up to that run was an entry. Members now: the
            // segment table. Added: now and not then; removed: then and not now.
            format!(
                "WITH then_members AS (
                   SELECT profile_id FROM (
                     SELECT profile_id, last_value(change ORDER BY run_id, changed_at) AS last
                     FROM {changes} WHERE segment = '{segment_q}' AND run_id <= '{run}'
                     GROUP BY profile_id) WHERE last = 'entered'),
                 now_members AS (SELECT DISTINCT profile_id FROM {segments}.{segment})
                 SELECT profile_id, 'entered' AS change FROM now_members
                   WHERE profile_id NOT IN (SELECT profile_id FROM then_members)
                 UNION ALL
                 SELECT profile_id, 'exited' AS change FROM then_members
                   WHERE profile_id NOT IN (SELECT profile_id FROM now_members)
                 ORDER BY profile_id",
                changes = tables::SEGMENT_CHANGES,
                segments = tables::SEGMENTS,
                run = quote(run),
            )
        }
    };
    let batches = engine.ctx.sql(&sql).await?.collect().await?;
    let (mut added, mut removed) = (Vec::new(), Vec::new());
    for batch in &batches {
        let ids = arrow::compute::cast(batch.column(0), &DataType::Utf8)?;
        let kinds = arrow::compute::cast(batch.column(1), &DataType::Utf8)?;
        let (ids, kinds) = (ids.as_string::<i32>(), kinds.as_string::<i32>());
        for i in 0..batch.num_rows() {
            match kinds.value(i) {
                "entered" => added.push(ids.value(i).to_string()),
                _ => removed.push(ids.value(i).to_string()),
            }
        }
    }
    Ok((added, removed))
}

/// A one-column frame of profile ids.
fn ids_frame(engine: &Engine, column: &str, ids: Vec<String>) -> Result<DataFrame> {
    let schema = Arc::new(Schema::new(vec![Field::new(column, DataType::Utf8, false)]));
    let batch = RecordBatch::try_new(schema, vec![Arc::new(StringArray::from(ids)) as ArrayRef])?;
    Ok(engine.ctx.read_batch(batch)?)
}

/// Who left: their profile ids with what `profiles` still holds of them (a profile merged
/// away or forgotten since has only its id).
async fn removed_frame(engine: &Engine, removed: Vec<String>) -> Result<DataFrame> {
    let ids = ids_frame(engine, "__tessera_removed_id", removed)?;
    let Ok(profiles) = engine.ctx.table(tables::PROFILES).await else {
        return Ok(ids.select(vec![
            datafusion::prelude::col("__tessera_removed_id").alias("profile_id")
        ])?);
    };
    let others: Vec<datafusion::prelude::Expr> = profiles
        .schema()
        .fields()
        .iter()
        .filter(|f| f.name() != "profile_id")
        .map(|f| datafusion::prelude::col(format!("\"{}\"", f.name())))
        .collect();
    let mut select = vec![datafusion::prelude::col("__tessera_removed_id").alias("profile_id")];
    select.extend(others);
    Ok(ids
        .join(
            profiles,
            datafusion::common::JoinType::Left,
            &["__tessera_removed_id"],
            &["profile_id"],
            None,
        )?
        .select(select)?
        .sort(vec![
            datafusion::prelude::col("profile_id").sort(true, false)
        ])?)
}

/// Header and rows of text cells: each destination column from its Tessera column (a list
/// gives its first value to a CRM, all of them joined with `;` to plain CSV).
type TextTable = (Vec<String>, Vec<Vec<Option<String>>>);

fn text_table(
    batches: &[RecordBatch],
    mapping: &[(String, String)],
    export: &TargetExport,
    neutralised: &mut u64,
) -> Result<TextTable> {
    let header: Vec<String> = mapping.iter().map(|(to, _)| to.clone()).collect();
    let mut rows = Vec::new();
    for batch in batches {
        let batch = if export.is_crm() {
            batch.clone()
        } else {
            csv_batch(batch, export.raw, neutralised)?
        };
        let mut columns: Vec<Option<ArrayRef>> = Vec::new();
        for (_, from) in mapping {
            let column = match batch.schema().index_of(from) {
                Ok(i) => Some(first_values(batch.column(i))?),
                Err(_) => None,
            };
            columns.push(column);
        }
        for r in 0..batch.num_rows() {
            rows.push(
                columns
                    .iter()
                    .map(|c| {
                        c.as_ref().and_then(|c| {
                            let text = c.as_string::<i32>();
                            text.is_valid(r).then(|| text.value(r).to_string())
                        })
                    })
                    .collect(),
            );
        }
    }
    Ok((header, rows))
}

/// A column as text; a list column gives the first value of each list.
fn first_values(array: &ArrayRef) -> Result<ArrayRef> {
    if let DataType::List(_) = array.data_type() {
        let list = array.as_list::<i32>();
        let values = arrow::compute::cast(list.values(), &DataType::Utf8)?;
        let values = values.as_string::<i32>();
        let offsets = list.offsets();
        let firsts: StringArray = (0..list.len())
            .map(|i| {
                if list.is_null(i) {
                    return None;
                }
                (offsets[i] as usize..offsets[i + 1] as usize)
                    .find(|&j| values.is_valid(j))
                    .map(|j| values.value(j).to_string())
            })
            .collect();
        return Ok(Arc::new(firsts));
    }
    Ok(arrow::compute::cast(array, &DataType::Utf8)?)
}

/// One CSV line (LF-terminated): fields quoted when they hold the delimiter, a quote or a line
/// break; quotes inside doubled. A missing value is an empty field (a CRM upsert leaves the
/// field as it is).
fn csv_line(cells: impl Iterator<Item = Option<String>>, delimiter: u8) -> Vec<u8> {
    let mut line = Vec::new();
    for (i, cell) in cells.enumerate() {
        if i > 0 {
            line.push(delimiter);
        }
        let Some(cell) = cell else { continue };
        let bytes = cell.as_bytes();
        if bytes
            .iter()
            .any(|&b| b == delimiter || b == b'"' || b == b'\n' || b == b'\r')
        {
            line.push(b'"');
            for &b in bytes {
                if b == b'"' {
                    line.push(b'"');
                }
                line.push(b);
            }
            line.push(b'"');
        } else {
            line.extend_from_slice(bytes);
        }
    }
    line.push(b'\n');
    line
}

/// The table as CSV files, each with the header, cut before a file would pass `max_bytes`
/// bytes or `max_rows` rows. Always at least one file (a header alone when there are no rows).
pub fn cut_csv(
    table: &TextTable,
    delimiter: u8,
    max_bytes: u64,
    max_rows: u64,
) -> std::result::Result<Vec<Vec<u8>>, String> {
    let header = csv_line(table.0.iter().cloned().map(Some), delimiter);
    let mut files: Vec<Vec<u8>> = Vec::new();
    let mut current = header.clone();
    let mut rows_in = 0u64;
    for (n, row) in table.1.iter().enumerate() {
        let line = csv_line(row.iter().cloned(), delimiter);
        if (header.len() + line.len()) as u64 > max_bytes {
            return Err(format!(
                "row {} takes {} bytes with the header, more than a file may hold ({max_bytes}); raise max_file_bytes",
                n + 1,
                header.len() + line.len()
            ));
        }
        if rows_in > 0 && ((current.len() + line.len()) as u64 > max_bytes || rows_in >= max_rows) {
            files.push(std::mem::replace(&mut current, header.clone()));
            rows_in = 0;
        }
        current.extend_from_slice(&line);
        rows_in += 1;
    }
    files.push(current);
    Ok(files)
}

/// The batches as one Parquet file with the destination's column names (lists kept).
fn parquet_bytes(batches: &[RecordBatch], mapping: &[(String, String)]) -> Result<Vec<u8>> {
    let mut renamed = Vec::new();
    for batch in batches {
        let mut fields = Vec::new();
        let mut columns = Vec::new();
        for (to, from) in mapping {
            if let Ok(i) = batch.schema().index_of(from) {
                fields.push(batch.schema().field(i).clone().with_name(to));
                columns.push(batch.column(i).clone());
            }
        }
        renamed.push(RecordBatch::try_new_with_options(
            Arc::new(Schema::new(fields)),
            columns,
            &arrow::array::RecordBatchOptions::new().with_row_count(Some(batch.num_rows())),
        )?);
    }
    let schema = renamed
        .first()
        .map(|b| b.schema())
        .unwrap_or_else(|| Arc::new(Schema::empty()));
    let mut bytes = Vec::new();
    let mut writer = parquet::arrow::ArrowWriter::try_new(&mut bytes, schema, None)?;
    for batch in &renamed {
        writer.write(batch)?;
    }
    writer.close()?;
    Ok(bytes)
}

/// The `importRequest` HubSpot's `POST /crm/v3/imports` takes for one file: every column
/// mapped to the contact property of its name, email as the key records are matched on
/// (else the external id column).
fn hubspot_request(export: &TargetExport, file: &str, header: &[String]) -> String {
    let key = if header.iter().any(|h| h == "email") {
        Some("email".to_string())
    } else {
        export.external_id()
    };
    let mappings: Vec<serde_json::Value> = header
        .iter()
        .map(|column| {
            let mut m = serde_json::json!({
                "columnObjectTypeId": HUBSPOT_CONTACT,
                "columnName": column,
                "propertyName": column,
            });
            if key.as_deref() == Some(column.as_str()) {
                m["idColumnType"] = serde_json::json!("HUBSPOT_ALTERNATE_ID");
            }
            m
        })
        .collect();
    serde_json::json!({
        "name": format!("{} {file}", export.name),
        "importOperations": { HUBSPOT_CONTACT: "UPSERT" },
        "dateFormat": "YEAR_MONTH_DAY",
        "files": [{
            "fileName": file,
            "fileFormat": "CSV",
            "fileImportPage": { "hasHeader": true, "columnMappings": mappings },
        }],
    })
    .to_string()
}

/// The Bulk API 2.0 ingest job request the files are uploaded to: an upsert of contacts on the
/// external id column, with the files' delimiter and LF line endings.
fn salesforce_job(export: &TargetExport) -> String {
    let delimiter = match export.delimiter {
        b'\t' => "TAB",
        b';' => "SEMICOLON",
        b'|' => "PIPE",
        b'^' => "CARET",
        b'`' => "BACKQUOTE",
        _ => "COMMA",
    };
    serde_json::json!({
        "object": "Contact",
        "operation": "upsert",
        "externalIdFieldName": export.external_id(),
        "contentType": "CSV",
        "columnDelimiter": delimiter,
        "lineEnding": "LF",
    })
    .to_string()
}

/// Writes `files` into local folder `dir` (created).
pub fn write_local(dir: &std::path::Path, files: &Files) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    for (name, bytes) in files {
        let path = dir.join(name);
        std::fs::write(&path, bytes).map_err(|e| Error::io(&path, e))?;
    }
    Ok(())
}

/// Writes every `[[exports]]` entry for run `run_id` under `<output>/exports/<name>/<run_id>/`:
/// the members now, and with `changes = true` who entered and left in this run. Returns each
/// export's folder and summary.
pub async fn write_run_exports(
    engine: &Engine,
    run_id: &str,
) -> Result<Vec<(String, TargetSummary)>> {
    use object_store::ObjectStoreExt;
    let mut done = Vec::new();
    let place = engine.outputs.place().clone();
    for spec in &engine.project.config.exports {
        let export = TargetExport::from_spec(spec);
        let folder = format!("exports/{}/{run_id}", spec.name);
        let (mut files, mut summary) = build(engine, &export, &Members::All).await?;
        if spec.changes {
            let (changes, changed) =
                build(engine, &export, &Members::OfRun(run_id.to_string())).await?;
            files.extend(changes.into_iter().filter(|(n, _)| n != "job.json"));
            summary.added = changed.added;
            summary.removed = changed.removed;
        }
        summary.files = files.iter().map(|(n, _)| n.clone()).collect();
        for (name, bytes) in files {
            let path = place.child(&format!("{folder}/{name}"));
            place
                .store
                .put(&path, bytes.into())
                .await
                .map_err(|e| Error::Export {
                    out: folder.clone().into(),
                    message: format!(
                        "[[exports]] {}: the run published its tables, but writing {name} failed: {e}",
                        spec.name
                    ),
                })?;
        }
        done.push((place.url_of(&place.child(&folder)).to_string(), summary));
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_are_cut_before_the_limit_each_with_the_header() {
        let table: TextTable = (
            vec!["Id".into(), "Name".into()],
            (0..10)
                .map(|i| vec![Some(format!("p{i}")), Some("a,b".into())])
                .collect(),
        );
        // Header "Id,Name\n" is 8 bytes, each row "pN,\"a,b\"\n" 9 bytes.
        let files = cut_csv(&table, b',', 8 + 9 * 3, u64::MAX).unwrap();
        assert_eq!(files.len(), 4);
        for f in &files {
            assert!(f.len() <= 35 && f.starts_with(b"Id,Name\n"));
        }
        let rows = cut_csv(&table, b',', u64::MAX, 4).unwrap();
        assert_eq!(rows.len(), 3);
        assert!(cut_csv(&table, b',', 10, u64::MAX).is_err());
        // No rows: one file with the header.
        assert_eq!(
            cut_csv(&(table.0.clone(), vec![]), b',', 100, 1)
                .unwrap()
                .len(),
            1
        );
    }

    #[test]
    fn documented_limits() {
        // Salesforce: "upload data that doesn't exceed 100 MB"; HubSpot: 20 MB a file on free
        // tools, 1,048,576 rows a file.
        assert_eq!(SALESFORCE_MAX_FILE_BYTES, 100_000_000);
        assert_eq!(HUBSPOT_MAX_FILE_BYTES, 20_000_000);
        assert_eq!(HUBSPOT_MAX_FILE_ROWS + 1, 1_048_576);
    }
}
