//! `tessera export segment NAME`: a segment's members with their identifiers and traits, as CSV
//! or Parquet, optionally with personal identifiers normalised and SHA-256 hashed the way ad
//! platforms' customer-match uploads require.

use std::path::Path;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, ListArray, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema};
use sha2::{Digest, Sha256};

use crate::config::Normalize;
use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::identity::graph::Rules;
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
    /// Normalise and SHA-256 hash emails and phones.
    pub hash_pii: bool,
}

/// SHA-256 of `text` as lowercase hex.
pub fn sha256_hex(text: &str) -> String {
    let digest = Sha256::digest(text.as_bytes());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// How a column is hashed under `--hash-pii`, by its identifier type's normaliser.
fn pii_kind(column: &str, rules: &Rules) -> Option<Normalize> {
    let base = column.strip_suffix('s').unwrap_or(column);
    for candidate in [column, base] {
        if let Some(t) = rules.type_index(candidate) {
            let how = rules.types[t as usize].normalize;
            if matches!(how, Normalize::Email | Normalize::Phone) {
                return Some(how);
            }
        }
        match candidate {
            "email" => return Some(Normalize::Email),
            "phone" => return Some(Normalize::Phone),
            _ => {}
        }
    }
    None
}

fn hash_value(how: Normalize, raw: &str, country: &str) -> Option<String> {
    crate::identity::normalize::normalize(how, raw, country)
        .ok()
        .map(|v| sha256_hex(&v))
}

fn hash_column(array: &ArrayRef, how: Normalize, country: &str) -> Result<ArrayRef> {
    match array.data_type() {
        DataType::List(field) => {
            let list = array.as_list::<i32>();
            let values = arrow::compute::cast(list.values(), &DataType::Utf8)?;
            let values = values.as_string::<i32>();
            let hashed: StringArray = values
                .iter()
                .map(|v| v.and_then(|v| hash_value(how, v, country)))
                .collect();
            let field = Arc::new(Field::new(field.name(), DataType::Utf8, true));
            Ok(Arc::new(ListArray::try_new(
                field,
                list.offsets().clone(),
                Arc::new(hashed),
                list.nulls().cloned(),
            )?))
        }
        _ => {
            let values = arrow::compute::cast(array, &DataType::Utf8)?;
            let hashed: StringArray = values
                .as_string::<i32>()
                .iter()
                .map(|v| v.and_then(|v| hash_value(how, v, country)))
                .collect();
            Ok(Arc::new(hashed))
        }
    }
}

/// Joins list columns into `a;b;c` text so CSV can hold them.
fn flatten_lists(batch: &RecordBatch) -> Result<RecordBatch> {
    let mut fields = Vec::new();
    let mut columns = Vec::new();
    for (field, array) in batch.schema().fields().iter().zip(batch.columns()) {
        if let DataType::List(_) = array.data_type() {
            let list = array.as_list::<i32>();
            let joined: StringArray = (0..list.len())
                .map(|i| {
                    list.is_valid(i).then(|| {
                        let v = arrow::compute::cast(&list.value(i), &DataType::Utf8)
                            .expect("lists of text cast to text");
                        v.as_string::<i32>()
                            .iter()
                            .flatten()
                            .collect::<Vec<_>>()
                            .join(";")
                    })
                })
                .collect();
            fields.push(Field::new(field.name(), DataType::Utf8, true));
            columns.push(Arc::new(joined) as ArrayRef);
        } else {
            fields.push(field.as_ref().clone());
            columns.push(array.clone());
        }
    }
    Ok(RecordBatch::try_new(
        Arc::new(Schema::new(fields)),
        columns,
    )?)
}

/// Writes the export to `out`; returns the rows written.
pub async fn export_segment(engine: &Engine, options: &ExportOptions, out: &Path) -> Result<u64> {
    engine.register_outputs().await?;
    // register_outputs has just registered every published segment.
    let reference =
        datafusion::common::TableReference::partial(tables::SEGMENTS, options.segment.as_str());
    if !engine.ctx.table_exist(reference.clone())? {
        let known = engine.outputs.segment_names().await?;
        return Err(Error::Usage(format!(
            "no segment `{}` in {} (published segments: {}); add queries/segments/{}.sql and run `tessera run`",
            options.segment,
            engine.outputs.place(),
            if known.is_empty() { "none".to_string() } else { known.join(", ") },
            options.segment
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
        options.segment
    );
    let mut df = engine.ctx.sql(&sql).await?;
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
    let rules = Rules::from_config(&engine.project.config.identity);
    if options.hash_pii {
        for batch in batches.iter_mut() {
            let mut columns = batch.columns().to_vec();
            let mut fields: Vec<Field> = batch
                .schema()
                .fields()
                .iter()
                .map(|f| f.as_ref().clone())
                .collect();
            for (i, field) in fields.iter_mut().enumerate() {
                if let Some(how) = pii_kind(field.name(), &rules) {
                    columns[i] = hash_column(&columns[i], how, &rules.country)?;
                    *field = Field::new(field.name(), columns[i].data_type().clone(), true);
                }
            }
            *batch = RecordBatch::try_new(Arc::new(Schema::new(fields)), columns)?;
        }
    }
    let rows = batches.iter().map(|b| b.num_rows() as u64).sum();
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
                writer.write(&flatten_lists(batch)?)?;
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
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256_of_normalised_identifiers() {
        // Known digests: sha256("test@example.com") and sha256("+14155550123").
        assert_eq!(
            sha256_hex("test@example.com"),
            "973dfe463ec85785f5f95af5ba3906eedb2d931c24e69824a89ea65dba4e813b"
        );
        assert_eq!(
            hash_value(Normalize::Email, "  Test@Example.COM ", "1").unwrap(),
            "973dfe463ec85785f5f95af5ba3906eedb2d931c24e69824a89ea65dba4e813b"
        );
        assert_eq!(
            hash_value(Normalize::Phone, "(415) 555-0123", "1").unwrap(),
            sha256_hex("+14155550123")
        );
        assert_eq!(hash_value(Normalize::Email, "   ", "1"), None);
    }
}
