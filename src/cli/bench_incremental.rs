//! What `tessera bench --incremental` needs beside the runs themselves: the newest share of
//! the events held back as a new file, and the tables of two runs compared.
//!
//! The held-back events are the newest by `timestamp`, as a scheduled run sees them (a slice
//! of the last file would be some people's events of the last day, not the last hours of
//! everyone's). The comparison reads both runs' published tables through DataFusion, leaving
//! out the logs and what names a run (`run_id`), and rounds floats that are sums whose last
//! digits move with the order rows arrive in.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::path::{Path, PathBuf};

use arrow::array::{AsArray, BooleanArray, RecordBatch};
use arrow::datatypes::{DataType, TimestampMicrosecondType};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ProjectionMask;

use crate::error::{Error, Result};

fn unreadable(file: &Path, e: &dyn std::fmt::Display) -> Error {
    Error::Usage(format!(
        "{}: could not read its events: {e}",
        file.display()
    ))
}

/// Each batch's `timestamp` in µs (nulls as `None`), read alone.
fn timestamps(file: &Path, mut each: impl FnMut(&[Option<i64>])) -> Result<()> {
    let opened = std::fs::File::open(file).map_err(|e| Error::io(file, e))?;
    let builder =
        ParquetRecordBatchReaderBuilder::try_new(opened).map_err(|e| unreadable(file, &e))?;
    let Some(index) = builder
        .schema()
        .fields()
        .iter()
        .position(|f| f.name() == "timestamp")
    else {
        return Err(unreadable(file, &"it has no `timestamp` column"));
    };
    let mask = ProjectionMask::roots(builder.parquet_schema(), [index]);
    let reader = builder
        .with_projection(mask)
        .build()
        .map_err(|e| unreadable(file, &e))?;
    for batch in reader {
        let batch = batch.map_err(|e| unreadable(file, &e))?;
        let column = arrow::compute::cast(
            batch.column(0),
            &DataType::Timestamp(arrow::datatypes::TimeUnit::Microsecond, None),
        )?;
        let values: Vec<Option<i64>> = column
            .as_primitive::<TimestampMicrosecondType>()
            .iter()
            .collect();
        each(&values);
    }
    Ok(())
}

/// The rows of `files`, from their footers.
fn rows_in(files: &[PathBuf]) -> Result<u64> {
    let mut rows = 0;
    for file in files {
        let opened = std::fs::File::open(file).map_err(|e| Error::io(file, e))?;
        let builder =
            ParquetRecordBatchReaderBuilder::try_new(opened).map_err(|e| unreadable(file, &e))?;
        rows += builder.metadata().file_metadata().num_rows() as u64;
    }
    Ok(rows)
}

/// The time from which the newest `wanted` rows of `files` start (the `wanted`-th largest
/// timestamp); `None` when the files hold no timestamp. Only `wanted` times are held.
fn cut_time(files: &[PathBuf], wanted: usize) -> Result<Option<i64>> {
    let mut newest: BinaryHeap<Reverse<i64>> = BinaryHeap::with_capacity(wanted + 1);
    for file in files {
        timestamps(file, |values| {
            for t in values.iter().flatten() {
                if newest.len() < wanted {
                    newest.push(Reverse(*t));
                } else if newest.peek().is_some_and(|Reverse(min)| t > min) {
                    newest.pop();
                    newest.push(Reverse(*t));
                }
            }
        })?;
    }
    Ok(newest.peek().map(|Reverse(t)| *t))
}

/// Splits `files` into what a first run reads and the newest `share` of their rows (by
/// `timestamp`, ties included), written as one file in `dir`; files without new rows are
/// kept as they are, the others are rewritten without them into `dir`.
pub fn hold_back_newest(
    files: &[PathBuf],
    share: f64,
    dir: &Path,
) -> Result<(Vec<PathBuf>, PathBuf)> {
    let total = rows_in(files)?;
    let wanted = ((total as f64 * share).round() as u64).clamp(1, total.max(1)) as usize;
    let cut = cut_time(files, wanted)?.unwrap_or(i64::MAX);
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let mut first = Vec::with_capacity(files.len());
    let mut newest: Vec<RecordBatch> = Vec::new();
    for (i, file) in files.iter().enumerate() {
        let mut any = false;
        timestamps(file, |values| {
            any |= values.iter().flatten().any(|t| *t >= cut)
        })?;
        if !any {
            first.push(file.clone());
            continue;
        }
        let opened = std::fs::File::open(file).map_err(|e| Error::io(file, e))?;
        let reader = ParquetRecordBatchReaderBuilder::try_new(opened)
            .map_err(|e| unreadable(file, &e))?
            .build()
            .map_err(|e| unreadable(file, &e))?;
        let schema = arrow::array::RecordBatchReader::schema(&reader);
        let mut older = Vec::new();
        for batch in reader {
            let batch = batch.map_err(|e| unreadable(file, &e))?;
            let column = batch
                .column_by_name("timestamp")
                .ok_or_else(|| unreadable(file, &"it has no `timestamp` column"))?;
            let column = arrow::compute::cast(
                column,
                &DataType::Timestamp(arrow::datatypes::TimeUnit::Microsecond, None),
            )?;
            let is_new: BooleanArray = column
                .as_primitive::<TimestampMicrosecondType>()
                .iter()
                .map(|t| Some(t.is_some_and(|t| t >= cut)))
                .collect();
            let is_old = arrow::compute::not(&is_new)?;
            newest.push(arrow::compute::filter_record_batch(&batch, &is_new)?);
            older.push(arrow::compute::filter_record_batch(&batch, &is_old)?);
        }
        let path = dir.join(format!("older-{i:06}.parquet"));
        write(&path, schema, &older)?;
        first.push(path);
    }
    let schema = match newest.first() {
        Some(b) => b.schema(),
        None => {
            return Err(Error::Usage(
                "the events hold no timestamp to cut at".into(),
            ))
        }
    };
    let path = dir.join("newest.parquet");
    write(&path, schema, &newest)?;
    Ok((first, path))
}

fn write(path: &Path, schema: arrow::datatypes::SchemaRef, batches: &[RecordBatch]) -> Result<()> {
    let bytes = crate::cli::generate::parquet_bytes(schema, batches)?;
    std::fs::write(path, bytes).map_err(|e| Error::io(path, e))
}

/// The published tables of the projects `a` and `b` that differ (rows compared as sets, and
/// their counts), each with why; empty when every table is equal. Logs (`runs`,
/// `segment_changes`, `profile_merges`) and Tessera's state are left out.
pub async fn differing_tables(a: &Path, b: &Path) -> Result<Vec<String>> {
    let open = |dir: &Path| {
        let dir = dir.to_path_buf();
        async move { crate::engine::Engine::open(crate::config::Project::load(&dir)?).await }
    };
    let (ea, eb) = (open(a).await?, open(b).await?);
    let names = |set: Option<std::collections::BTreeSet<String>>| set.unwrap_or_default();
    let ta = names(crate::output::published(&ea.outputs, &ea.ctx).await?);
    let tb = names(crate::output::published(&eb.outputs, &eb.ctx).await?);
    let mut differ = Vec::new();
    for name in ta.union(&tb) {
        if name.starts_with("_state/")
            || ["runs", "segment_changes", "profile_merges"].contains(&name.as_str())
        {
            continue;
        }
        let (Some(da), Some(db)) = (
            ea.outputs.read(&ea.ctx, name).await?,
            eb.outputs.read(&eb.ctx, name).await?,
        ) else {
            differ.push(format!("{name}: published by one run only"));
            continue;
        };
        // Both sides in one context: B's rows are collected and registered beside A's.
        let canon =
            |df: datafusion::dataframe::DataFrame| -> Result<datafusion::dataframe::DataFrame> {
                let columns: Vec<datafusion::prelude::Expr> = df
                    .schema()
                    .fields()
                    .iter()
                    .filter(|f| f.name() != "run_id")
                    .map(|f| {
                        let c = datafusion::prelude::ident(f.name());
                        match f.data_type() {
                            DataType::Float32 | DataType::Float64 => {
                                datafusion::functions::math::expr_fn::round(vec![
                                    c,
                                    datafusion::prelude::lit(6),
                                ])
                                .alias(f.name())
                            }
                            _ => c,
                        }
                    })
                    .collect();
                crate::output::plain_columns(df.select(columns)?)
            };
        let (da, db) = (canon(da)?, canon(db)?);
        let schema_b = std::sync::Arc::new(db.schema().as_arrow().clone());
        let mut rows_b = db.collect().await?;
        if rows_b.is_empty() {
            rows_b.push(RecordBatch::new_empty(schema_b));
        }
        let db = ea.ctx.read_batches(rows_b)?;
        let (na, nb) = (da.clone().count().await?, db.clone().count().await?);
        if na != nb {
            differ.push(format!("{name}: {na} rows against {nb}"));
            continue;
        }
        match da.except(db) {
            Ok(only_a) => {
                let n = only_a.count().await?;
                if n > 0 {
                    differ.push(format!("{name}: {n} rows differ"));
                }
            }
            Err(e) => differ.push(format!("{name}: not comparable ({e})")),
        }
    }
    Ok(differ)
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Int64Array, TimestampMicrosecondArray};
    use std::sync::Arc;

    /// A file of rows numbered `numbers`, each with timestamp `time(n)`.
    fn file(path: &Path, numbers: &[i64], time: impl Fn(i64) -> i64) -> PathBuf {
        let batch = RecordBatch::try_from_iter([
            (
                "n",
                Arc::new(Int64Array::from(numbers.to_vec())) as arrow::array::ArrayRef,
            ),
            (
                "timestamp",
                Arc::new(
                    TimestampMicrosecondArray::from(
                        numbers.iter().map(|n| time(*n)).collect::<Vec<_>>(),
                    )
                    .with_timezone("UTC"),
                ),
            ),
        ])
        .unwrap();
        write(path, batch.schema(), &[batch]).unwrap();
        path.to_path_buf()
    }

    fn numbers(files: &[PathBuf]) -> Vec<i64> {
        let mut out = Vec::new();
        for f in files {
            let reader = ParquetRecordBatchReaderBuilder::try_new(std::fs::File::open(f).unwrap())
                .unwrap()
                .build()
                .unwrap();
            for batch in reader {
                let batch = batch.unwrap();
                out.extend(
                    batch
                        .column(0)
                        .as_primitive::<arrow::datatypes::Int64Type>()
                        .values()
                        .iter(),
                );
            }
        }
        out.sort_unstable();
        out
    }

    #[test]
    fn the_newest_share_of_the_events_is_held_back_from_every_file() {
        let dir = tempfile::tempdir().unwrap();
        // Rows 0..1000 at time n, spread over three files out of time order: the newest tenth
        // (900..1000) sits in two of them, and one file holds none of it.
        let evens: Vec<i64> = (0..1000).filter(|n| n % 2 == 0).collect();
        let odds: Vec<i64> = (0..800).filter(|n| n % 2 == 1).collect();
        let late: Vec<i64> = (800..1000).filter(|n| n % 2 == 1).collect();
        let files = vec![
            file(&dir.path().join("a.parquet"), &late, |n| n),
            file(&dir.path().join("b.parquet"), &evens, |n| n),
            file(&dir.path().join("c.parquet"), &odds, |n| n),
        ];
        let (first, newest) = hold_back_newest(&files, 0.1, &dir.path().join("cut")).unwrap();
        assert_eq!(numbers(&[newest]), (900..1000).collect::<Vec<_>>());
        assert_eq!(numbers(&first), (0..900).collect::<Vec<_>>());
        assert!(
            first.contains(&files[2]),
            "a file with no new row is read as it is"
        );
        // At least one row, however small the share.
        let (_, newest) = hold_back_newest(&files, 0.0, &dir.path().join("cut2")).unwrap();
        assert_eq!(numbers(&[newest]), vec![999]);
    }
}
