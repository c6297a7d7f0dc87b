//! `tessera export segment NAME`: a segment's members with their identifiers and traits, as CSV
//! or Parquet, made safe to hand over: with `--hash-pii` no personal data is left in clear
//! (identifiers and names are normalised and SHA-256 hashed the way ad platforms' customer-match
//! uploads require, JSON text columns are dropped or cut down to allowlisted keys), CSV cells
//! that a spreadsheet would run as formulas are neutralised, and the file may not land where
//! Tessera reads events or writes tables.

use std::path::Path;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, ListArray, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema};

use crate::config::{ExportConfig, Normalize, PhoneFormat, PiiHandling, Project};
use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::stages::identity::graph::Rules;
use crate::storage::Location;
use crate::tables;

/// File formats for exports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ExportFormat {
    /// CSV with a header; list columns are joined with `;`.
    Csv,
    /// Parquet, list columns kept as lists.
    Parquet,
}

/// What to export.
#[derive(Debug, Clone)]
pub struct ExportOptions {
    /// The segment.
    pub segment: String,
    /// The file format.
    pub format: ExportFormat,
    /// Columns to keep (default: every column of the segment and of `profiles`).
    pub columns: Vec<String>,
    /// Leave no personal data in clear: hash identifiers and names, drop the rest.
    pub hash_pii: bool,
    /// Write CSV cells as they are, even those a spreadsheet would run as a formula.
    pub raw: bool,
}

/// What an export wrote.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ExportSummary {
    /// Members written.
    pub rows: u64,
    /// Columns written as SHA-256 digests.
    pub hashed: Vec<String>,
    /// Columns left out as personal data.
    pub dropped: Vec<String>,
    /// JSON text columns cut down to the allowlisted keys.
    pub filtered: Vec<String>,
    /// CSV cells given a leading `'` so spreadsheets show them as text.
    pub neutralised_cells: u64,
}

pub use crate::digest::sha256_hex;

/// How a value is normalised before it is hashed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Digest {
    /// Trim, lowercase.
    Email,
    /// E.164, written as `[export] phone_format` says.
    Phone,
    /// A person's name: trim, lowercase.
    Name,
    /// An identifier: its identifier type's normaliser (trim by default).
    Identifier(Normalize),
}

/// How one column is written in a hashed export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Treatment {
    /// Normalised, then replaced by its SHA-256 hex.
    Hash(Digest),
    /// Left out.
    Drop,
    /// A JSON text column: only allowlisted top-level keys are kept.
    Json,
    /// Written as it is; `declared` when the config says so (then not scanned for emails).
    Keep { declared: bool },
}

/// Columns holding a person's name, hashed as names by default.
const NAME_COLUMNS: &[&str] = &[
    "name",
    "first_name",
    "last_name",
    "middle_name",
    "full_name",
    "given_name",
    "family_name",
    "surname",
    "firstname",
    "lastname",
    "maiden_name",
    "nickname",
];

/// Personal data no customer-match file takes: left out by default.
const DROPPED_COLUMNS: &[&str] = &[
    "address",
    "street",
    "street_address",
    "birthday",
    "date_of_birth",
    "dob",
    "ip",
    "ip_address",
    "username",
];

/// Columns that hold JSON documents of the Segment spec.
const JSON_COLUMNS: &[&str] = &["traits", "properties", "context"];

/// Identifier columns by their usual names, for projects whose identifier types are named
/// otherwise (a segment may still return them).
fn usual_identifier(column: &str) -> Option<Digest> {
    match column {
        "email" | "emails" => Some(Digest::Email),
        "phone" | "phones" => Some(Digest::Phone),
        "user_id" | "user_ids" | "anonymous_id" | "anonymous_ids" => {
            Some(Digest::Identifier(Normalize::Trim))
        }
        _ => None,
    }
}

/// How `column` is written under `--hash-pii`: the config first, then identifier types
/// (a type's own name or its profiles list column, `emails` for `email`), names, other
/// personal data, JSON text; anything else is kept.
fn treatment(
    column: &str,
    chunks: &[&ArrayRef],
    rules: &Rules,
    config: &ExportConfig,
) -> Treatment {
    if let Some(how) = config.pii_columns.get(column) {
        return match how {
            PiiHandling::Email => Treatment::Hash(Digest::Email),
            PiiHandling::Phone => Treatment::Hash(Digest::Phone),
            PiiHandling::Name => Treatment::Hash(Digest::Name),
            PiiHandling::Hash => Treatment::Hash(Digest::Identifier(Normalize::Trim)),
            PiiHandling::Drop => Treatment::Drop,
            PiiHandling::Keep => Treatment::Keep { declared: true },
        };
    }
    let singular = column.strip_suffix('s').unwrap_or(column);
    for candidate in [column, singular] {
        if let Some(t) = rules.type_index(candidate) {
            return Treatment::Hash(match rules.types[t as usize].normalize {
                Normalize::Email => Digest::Email,
                Normalize::Phone => Digest::Phone,
                other => Digest::Identifier(other),
            });
        }
    }
    if let Some(digest) = usual_identifier(column) {
        return Treatment::Hash(digest);
    }
    if NAME_COLUMNS.contains(&column) {
        return Treatment::Hash(Digest::Name);
    }
    if DROPPED_COLUMNS.contains(&column) {
        return Treatment::Drop;
    }
    if JSON_COLUMNS.contains(&column) || holds_json(chunks) {
        return Treatment::Json;
    }
    Treatment::Keep { declared: false }
}

/// A text column whose every value is a JSON object or array (and that has a value).
fn holds_json(chunks: &[&ArrayRef]) -> bool {
    let mut any = false;
    for chunk in chunks {
        let Some(text) = chunk.as_string_opt::<i32>() else {
            return false;
        };
        for value in text.iter().flatten() {
            let value = value.trim();
            let shaped = (value.starts_with('{') && value.ends_with('}'))
                || (value.starts_with('[') && value.ends_with(']'));
            if !shaped || serde_json::from_str::<serde_json::Value>(value).is_err() {
                return false;
            }
            any = true;
        }
    }
    any
}

/// The text that is hashed for `raw`, or `None` when it is empty or not a valid value.
fn normalised(how: Digest, raw: &str, country: &str, phone: PhoneFormat) -> Option<String> {
    use crate::stages::identity::normalize::normalize;
    match how {
        Digest::Email => normalize(Normalize::Email, raw, country)
            .ok()
            .map(|v| v.into_owned()),
        Digest::Phone => {
            let e164 = normalize(Normalize::Phone, raw, country).ok()?;
            Some(match phone {
                PhoneFormat::E164 => e164.into_owned(),
                PhoneFormat::Digits => e164.trim_start_matches('+').to_string(),
            })
        }
        Digest::Name => {
            let t = raw.trim();
            (!t.is_empty()).then(|| t.to_lowercase())
        }
        Digest::Identifier(how) => normalize(how, raw, country).ok().map(|v| v.into_owned()),
    }
}

fn hash_value(how: Digest, raw: &str, country: &str, phone: PhoneFormat) -> Option<String> {
    normalised(how, raw, country, phone).map(|v| sha256_hex(&v))
}

fn hash_column(
    array: &ArrayRef,
    how: Digest,
    country: &str,
    phone: PhoneFormat,
) -> Result<ArrayRef> {
    let hash_text = |values: &ArrayRef| -> Result<StringArray> {
        let values = arrow::compute::cast(values, &DataType::Utf8)?;
        Ok(values
            .as_string::<i32>()
            .iter()
            .map(|v| v.and_then(|v| hash_value(how, v, country, phone)))
            .collect())
    };
    match array.data_type() {
        DataType::List(field) => {
            let list = array.as_list::<i32>();
            let hashed = hash_text(list.values())?;
            let field = Arc::new(Field::new(field.name(), DataType::Utf8, true));
            Ok(Arc::new(ListArray::try_new(
                field,
                list.offsets().clone(),
                Arc::new(hashed),
                list.nulls().cloned(),
            )?))
        }
        _ => Ok(Arc::new(hash_text(array)?)),
    }
}

/// Keeps only `allowlist`ed top-level keys of each JSON object; anything else (other keys,
/// arrays, text that is not JSON, objects left empty) becomes null.
fn filter_json(array: &ArrayRef, allowlist: &[String]) -> Result<ArrayRef> {
    let text = arrow::compute::cast(array, &DataType::Utf8)?;
    let filtered: StringArray = text
        .as_string::<i32>()
        .iter()
        .map(|v| {
            let serde_json::Value::Object(object) =
                serde_json::from_str::<serde_json::Value>(v?).ok()?
            else {
                return None;
            };
            let kept: serde_json::Map<String, serde_json::Value> = object
                .into_iter()
                .filter(|(k, _)| allowlist.iter().any(|a| a == k))
                .collect();
            (!kept.is_empty()).then(|| serde_json::Value::Object(kept).to_string())
        })
        .collect();
    Ok(Arc::new(filtered))
}

/// Whether `text` holds something shaped like an email address (`local@domain.tld`).
fn holds_email(text: &str) -> bool {
    let word = |c: char| c.is_alphanumeric() || matches!(c, '.' | '_' | '%' | '+' | '-' | '@');
    text.split(|c: char| !word(c)).any(|token| {
        token.split_once('@').is_some_and(|(local, domain)| {
            !local.is_empty()
                && !domain.contains('@')
                && domain
                    .rsplit_once('.')
                    .is_some_and(|(host, tld)| !host.is_empty() && tld.len() >= 2)
        })
    })
}

/// The first text value of `array` (text or a list of text) shaped like an email address.
fn first_email(array: &ArrayRef) -> Option<String> {
    let values = match array.data_type() {
        DataType::List(_) => array.as_list::<i32>().values().clone(),
        _ => array.clone(),
    };
    let text = values.as_string_opt::<i32>()?;
    text.iter()
        .flatten()
        .find(|v| holds_email(v))
        .map(str::to_string)
}

/// Applies `--hash-pii` to every batch of an export of `segment`; fills in the summary's
/// column lists.
pub(crate) fn hash_pii(
    batches: &mut [RecordBatch],
    engine: &Engine,
    segment: &str,
    out: &Path,
    summary: &mut ExportSummary,
) -> Result<()> {
    let Some(schema) = batches.first().map(|b| b.schema()) else {
        return Ok(());
    };
    let config = &engine.project.config.export;
    let rules = Rules::from_config(&engine.project.config.identity);
    let treatments: Vec<Treatment> = schema
        .fields()
        .iter()
        .enumerate()
        .map(|(i, field)| {
            let chunks: Vec<&ArrayRef> = batches.iter().map(|b| b.column(i)).collect();
            let mut how = treatment(field.name(), &chunks, &rules, config);
            if how == Treatment::Json && config.traits_allowlist.is_empty() {
                how = Treatment::Drop;
            }
            how
        })
        .collect();
    for (field, how) in schema.fields().iter().zip(&treatments) {
        let name = field.name().clone();
        match how {
            Treatment::Hash(_) => summary.hashed.push(name),
            Treatment::Drop => summary.dropped.push(name),
            Treatment::Json => summary.filtered.push(name),
            Treatment::Keep { .. } => {}
        }
    }
    for batch in batches.iter_mut() {
        let mut fields = Vec::new();
        let mut columns = Vec::new();
        for ((field, array), how) in schema.fields().iter().zip(batch.columns()).zip(&treatments) {
            let column = match how {
                Treatment::Drop => continue,
                Treatment::Keep { .. } => array.clone(),
                Treatment::Hash(digest) => {
                    hash_column(array, *digest, &rules.country, config.phone_format)?
                }
                Treatment::Json => filter_json(array, &config.traits_allowlist)?,
            };
            if matches!(how, Treatment::Keep { declared: false } | Treatment::Json) {
                if let Some(email) = first_email(&column) {
                    return Err(Error::Export {
                        out: out.to_path_buf(),
                        message: format!(
                            "column `{}` of segment {} holds an email address ({} characters) but is not \
                             marked as personal data, so --hash-pii would leave it in clear; nothing was \
                             written. Say how to treat it in tessera.toml: [export.pii_columns] {} = \
                             \"email\" (or \"hash\", \"drop\", or \"keep\" to write it as it is)",
                            field.name(),
                            segment,
                            email.chars().count(),
                            field.name()
                        ),
                    });
                }
            }
            fields.push(Field::new(field.name(), column.data_type().clone(), true));
            columns.push(column);
        }
        *batch = RecordBatch::try_new_with_options(
            Arc::new(Schema::new(fields)),
            columns,
            &arrow::array::RecordBatchOptions::new().with_row_count(Some(batch.num_rows())),
        )?;
    }
    Ok(())
}

/// Whether a spreadsheet would read `cell` as a formula (OWASP's list of leading characters).
fn formula_like(cell: &str) -> bool {
    matches!(
        cell.as_bytes().first().copied(),
        Some(b'=' | b'+' | b'-' | b'@' | b'\t' | b'\r')
    )
}

/// `cell` with a leading `'` when a spreadsheet would run it; counts the cells changed.
fn neutralise<'a>(cell: &'a str, count: &mut u64) -> std::borrow::Cow<'a, str> {
    if formula_like(cell) {
        *count += 1;
        std::borrow::Cow::Owned(format!("'{cell}"))
    } else {
        std::borrow::Cow::Borrowed(cell)
    }
}

/// Checks that `out` is not inside a folder Tessera reads or writes: the events, the output
/// tables or a `[[sources]]` location (a file there would be read as data or break a table).
pub fn check_out_path(project: &Project, out: &Path) -> Result<()> {
    let target = crate::storage::resolved_local(out);
    let storage = &project.config.storage;
    let mut places = vec![
        ("storage.events".to_string(), storage.events.as_str()),
        ("storage.output".to_string(), storage.output.as_str()),
    ];
    for (i, source) in project.config.sources.iter().enumerate() {
        places.push((format!("sources[{i}].location"), source.location.as_str()));
    }
    for (key, value) in places {
        let Ok(Location::Local(place)) = Location::parse(value, &project.dir, &key) else {
            continue;
        };
        let place = crate::storage::resolved_local(&place);
        if target.starts_with(&place) {
            return Err(Error::Export {
                out: out.to_path_buf(),
                message: format!(
                    "this is inside {} (`{key}` = \"{value}\"), which Tessera reads or writes; \
                     a file there would be taken for data or damage a table. Write the export \
                     somewhere else, e.g. --out exports/{}",
                    place.display(),
                    out.file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_else(|| "export.csv".into())
                ),
            });
        }
    }
    Ok(())
}

/// CSV-ready batch: list columns joined with `;`, and (unless `raw`) every text cell and list
/// element a spreadsheet would run as a formula given a leading `'`. Elements are neutralised
/// one by one because spreadsheets set to `;` as the separator split joined lists into cells.
pub(crate) fn csv_batch(batch: &RecordBatch, raw: bool, count: &mut u64) -> Result<RecordBatch> {
    let mut fields = Vec::new();
    let mut columns = Vec::new();
    for (field, array) in batch.schema().fields().iter().zip(batch.columns()) {
        let name = if raw {
            field.name().clone()
        } else {
            neutralise(field.name(), &mut 0).into_owned()
        };
        let text: Option<StringArray> = match array.data_type() {
            DataType::List(_) => {
                let list = array.as_list::<i32>();
                let values = arrow::compute::cast(list.values(), &DataType::Utf8)?;
                let values = values.as_string::<i32>();
                let offsets = list.offsets();
                Some(
                    (0..list.len())
                        .map(|i| {
                            list.is_valid(i).then(|| {
                                let (start, end) = (offsets[i] as usize, offsets[i + 1] as usize);
                                (start..end)
                                    .filter(|&j| values.is_valid(j))
                                    .map(|j| {
                                        let v = values.value(j);
                                        if raw {
                                            std::borrow::Cow::Borrowed(v)
                                        } else {
                                            neutralise(v, count)
                                        }
                                    })
                                    .collect::<Vec<_>>()
                                    .join(";")
                            })
                        })
                        .collect(),
                )
            }
            DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View if !raw => {
                let values = arrow::compute::cast(array, &DataType::Utf8)?;
                Some(
                    values
                        .as_string::<i32>()
                        .iter()
                        .map(|v| v.map(|v| neutralise(v, count).into_owned()))
                        .collect(),
                )
            }
            _ => None,
        };
        match text {
            Some(text) => {
                fields.push(Field::new(name, DataType::Utf8, true));
                columns.push(Arc::new(text) as ArrayRef);
            }
            None => {
                fields.push(field.as_ref().clone().with_name(name));
                columns.push(array.clone());
            }
        }
    }
    Ok(RecordBatch::try_new_with_options(
        Arc::new(Schema::new(fields)),
        columns,
        &arrow::array::RecordBatchOptions::new().with_row_count(Some(batch.num_rows())),
    )?)
}

/// A published segment's members joined with their `profiles` columns, in profile id order:
/// what every export of the segment starts from. Registers the published tables first.
pub async fn segment_frame(
    engine: &Engine,
    segment: &str,
) -> Result<datafusion::dataframe::DataFrame> {
    // Every run writes `runs`: when it is there, an earlier export already registered the
    // tables (registering them twice is an error).
    if !engine.ctx.table_exist(tables::RUNS)? {
        engine.register_outputs().await?;
    }
    // register_outputs has just registered every published segment.
    let reference = datafusion::common::TableReference::partial(tables::SEGMENTS, segment);
    if !engine.ctx.table_exist(reference.clone())? {
        let known = engine.outputs.segment_names().await?;
        return Err(Error::Usage(format!(
            "no segment `{}` in {} (published segments: {}); add queries/segments/{}.sql and run `tessera run`",
            segment,
            engine.outputs.place(),
            if known.is_empty() { "none".to_string() } else { known.join(", ") },
            segment
        )));
    }
    let segment_cols: Vec<String> = engine
        .ctx
        .table(reference)
        .await?
        .schema()
        .fields()
        .iter()
        .map(|f| f.name().clone())
        .collect();
    let mut select = vec!["s.profile_id".to_string()];
    select.extend(
        segment_cols
            .iter()
            .filter(|c| *c != "profile_id")
            .map(|c| format!("s.\"{c}\"")),
    );
    let profile_cols: Vec<String> = match engine.ctx.table(tables::PROFILES).await {
        Ok(p) => p
            .schema()
            .fields()
            .iter()
            .map(|f| f.name().clone())
            .collect(),
        Err(_) => Vec::new(),
    };
    let join = if profile_cols.is_empty() {
        String::new()
    } else {
        select.extend(
            profile_cols
                .iter()
                .filter(|c| *c != "profile_id" && !segment_cols.contains(c))
                .map(|c| format!("p.\"{c}\"")),
        );
        format!(
            " LEFT JOIN {} p ON p.profile_id = s.profile_id",
            tables::PROFILES
        )
    };
    let sql = format!(
        "SELECT {} FROM {}.{} s{join} ORDER BY s.profile_id",
        select.join(", "),
        tables::SEGMENTS,
        segment
    );
    Ok(engine.ctx.sql(&sql).await?)
}

/// Writes the export to `out`.
pub async fn export_segment(
    engine: &Engine,
    options: &ExportOptions,
    out: &Path,
) -> Result<ExportSummary> {
    check_out_path(&engine.project, out)?;
    let mut df = segment_frame(engine, &options.segment).await?;
    if !options.columns.is_empty() {
        let available: Vec<String> = df
            .schema()
            .fields()
            .iter()
            .map(|f| f.name().clone())
            .collect();
        if let Some(missing) = options.columns.iter().find(|c| !available.contains(c)) {
            return Err(Error::Usage(format!(
                "--columns: no column `{missing}` in the export of {} (available: {})",
                options.segment,
                available.join(", ")
            )));
        }
        let cols: Vec<&str> = options.columns.iter().map(String::as_str).collect();
        df = df.select_columns(&cols)?;
    }
    let df = crate::output::plain_columns(df)?;
    let mut batches = df.collect().await?;
    let mut summary = ExportSummary {
        rows: batches.iter().map(|b| b.num_rows() as u64).sum(),
        ..ExportSummary::default()
    };
    if options.hash_pii {
        hash_pii(&mut batches, engine, &options.segment, out, &mut summary)?;
    }
    if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    }
    let file = std::fs::File::create(out).map_err(|e| Error::io(out, e))?;
    match options.format {
        ExportFormat::Csv => {
            let mut writer = arrow::csv::WriterBuilder::new()
                .with_header(true)
                .build(file);
            for batch in &batches {
                writer.write(&csv_batch(
                    batch,
                    options.raw,
                    &mut summary.neutralised_cells,
                )?)?;
            }
        }
        ExportFormat::Parquet => {
            let schema = batches
                .first()
                .map(|b| b.schema())
                .unwrap_or_else(|| Arc::new(Schema::empty()));
            let mut writer = parquet::arrow::ArrowWriter::try_new(file, schema, None)?;
            for batch in &batches {
                writer.write(batch)?;
            }
            writer.close()?;
        }
    }
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    const E164: PhoneFormat = PhoneFormat::E164;

    #[test]
    fn sha256_of_normalised_identifiers() {
        // Digests computed outside Tessera (Python's hashlib.sha256) of the normalised text.
        assert_eq!(
            sha256_hex("test@example.com"),
            "973dfe463ec85785f5f95af5ba3906eedb2d931c24e69824a89ea65dba4e813b"
        );
        assert_eq!(
            hash_value(Digest::Email, "  Test@Example.COM ", "1", E164).unwrap(),
            "973dfe463ec85785f5f95af5ba3906eedb2d931c24e69824a89ea65dba4e813b"
        );
        // sha256("+14155550123")
        assert_eq!(
            hash_value(Digest::Phone, "(415) 555-0123", "1", E164).unwrap(),
            "36a2cef4ff9bf7a1abd2a93359136b870393be4106e6c5d19b72ff564f9deca4"
        );
        // sha256("+390612345678"): the Italian leading 0 is kept.
        assert_eq!(
            hash_value(Digest::Phone, "06 1234 5678", "39", E164).unwrap(),
            "37b702607839d6dc5fc81d95b52e550e336413bf7ae2e04cafeca79f066ea44b"
        );
        // sha256("+442079460958"): the "(0)" trunk prefix is dropped.
        assert_eq!(
            hash_value(Digest::Phone, "+44 (0) 20 7946 0958", "1", E164).unwrap(),
            "f0bf0228144d9fe2bdf1da2d8ca698f17bf1410ee688b075c27062e47b6f0b6d"
        );
        // Meta's form, sha256("14155550123"): no "+".
        assert_eq!(
            hash_value(Digest::Phone, "+1 415 555 0123", "1", PhoneFormat::Digits).unwrap(),
            "413ba75461ab5f99d36820e561ea97e2bd80f9cb586f7ecea6cf4c496518950a"
        );
        // sha256("ann"), sha256("o'brien"): names are trimmed and lowercased.
        assert_eq!(
            hash_value(Digest::Name, "  Ann ", "1", E164).unwrap(),
            "49915e0d7d4b402e3017d010bc1c0e83cac6c797d6c16e66340fe3268693a6a1"
        );
        assert_eq!(
            hash_value(Digest::Name, " O'Brien\t", "1", E164).unwrap(),
            "65b87174be3b1b122e2b0929f0b84888637d31a4a83bb96a860bcff411f5e668"
        );
        assert_eq!(
            normalised(Digest::Name, "ÉMILE", "1", E164).unwrap(),
            "émile"
        );
        assert_eq!(hash_value(Digest::Email, "   ", "1", E164), None);
        assert_eq!(hash_value(Digest::Phone, "not a phone", "1", E164), None);
        assert_eq!(hash_value(Digest::Name, " ", "1", E164), None);
    }

    #[test]
    fn formula_like_cells_are_neutralised() {
        let mut n = 0;
        for cell in [
            "=HYPERLINK(\"http://x\")",
            "@cmd|' /C calc'!A0",
            "+1+1",
            "-2",
            "\tx",
            "\rx",
        ] {
            assert_eq!(neutralise(cell, &mut n), format!("'{cell}"));
        }
        for cell in ["Ann", "", "1+1", "a=b", " =x", "'=x"] {
            assert_eq!(neutralise(cell, &mut n), cell);
        }
        assert_eq!(n, 6);
    }

    #[test]
    fn email_shaped_text_is_found() {
        for text in [
            "ann@x.com",
            "mail: Ann.Lee+1@example.co.uk!",
            "{\"e\":\"a@b.io\"}",
        ] {
            assert!(holds_email(text), "{text}");
        }
        for text in ["@home", "a@b", "price@ 10", "x@.c", "no at here", "@@"] {
            assert!(!holds_email(text), "{text}");
        }
    }

    proptest::proptest! {
        /// Normalise-then-hash takes any text without panicking, and a digest is 64 hex digits.
        #[test]
        fn hashing_any_text_never_panics(raw in ".{0,48}", country in "[0-9]{1,3}") {
            for how in [Digest::Email, Digest::Phone, Digest::Name, Digest::Identifier(Normalize::Trim)] {
                for phone in [PhoneFormat::E164, PhoneFormat::Digits] {
                    if let Some(h) = hash_value(how, &raw, &country, phone) {
                        proptest::prop_assert_eq!(h.len(), 64);
                        proptest::prop_assert!(h.bytes().all(|b| b.is_ascii_hexdigit()));
                    }
                }
            }
        }
    }
}
