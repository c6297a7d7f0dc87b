//! sqllogictest: `tests/slt/*.slt` run against the context of a real pipeline run over
//! `tests/slt/fixture/events.jsonl` with the bundled project's queries. Files a data engineer
//! can read: a query, then the rows it must return.

use std::path::Path;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, RecordBatch, StringArray, TimestampMicrosecondArray};
use arrow::datatypes::{DataType, Field, Schema};
use arrow::util::display::{ArrayFormatter, FormatOptions};
use datafusion::prelude::SessionContext;
use sqllogictest::{AsyncDB, DBOutput, DefaultColumnType};

use crate::common::*;

#[derive(Debug)]
struct SltError(String);

impl std::fmt::Display for SltError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for SltError {}

struct Tessera {
    ctx: SessionContext,
}

fn cell(array: &ArrayRef, row: usize) -> String {
    if array.is_null(row) {
        return "NULL".into();
    }
    match array.data_type() {
        DataType::Float64 => array
            .as_any()
            .downcast_ref::<arrow::array::Float64Array>()
            .unwrap()
            .value(row)
            .to_string(),
        DataType::Float32 => array
            .as_any()
            .downcast_ref::<arrow::array::Float32Array>()
            .unwrap()
            .value(row)
            .to_string(),
        _ => {
            let options = FormatOptions::default().with_null("NULL");
            let text = ArrayFormatter::try_new(array.as_ref(), &options)
                .unwrap()
                .value(row)
                .to_string();
            if text.is_empty() {
                "(empty)".into()
            } else {
                text
            }
        }
    }
}

#[async_trait::async_trait]
impl AsyncDB for Tessera {
    type Error = SltError;
    type ColumnType = DefaultColumnType;

    async fn run(&mut self, sql: &str) -> Result<DBOutput<DefaultColumnType>, SltError> {
        let df = self
            .ctx
            .sql(sql)
            .await
            .map_err(|e| SltError(e.to_string()))?;
        let schema = df.schema().as_arrow().clone();
        let batches = df.collect().await.map_err(|e| SltError(e.to_string()))?;
        let types = schema
            .fields()
            .iter()
            .map(|f| match f.data_type() {
                t if t.is_integer() => DefaultColumnType::Integer,
                t if t.is_floating() || matches!(t, DataType::Decimal128(_, _)) => {
                    DefaultColumnType::FloatingPoint
                }
                _ => DefaultColumnType::Text,
            })
            .collect();
        let mut rows = Vec::new();
        for b in &batches {
            for r in 0..b.num_rows() {
                rows.push(b.columns().iter().map(|c| cell(c, r)).collect());
            }
        }
        Ok(DBOutput::Rows { types, rows })
    }

    async fn shutdown(&mut self) {}
}

/// The fixture's JSON lines as a batch of Segment-spec events (objects become JSON text).
fn fixture_batch(path: &Path) -> RecordBatch {
    let text = std::fs::read_to_string(path).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let s = |key: &str| -> ArrayRef {
        Arc::new(StringArray::from(
            lines
                .iter()
                .map(|l| match &l[key] {
                    serde_json::Value::Null => None,
                    serde_json::Value::String(v) => Some(v.clone()),
                    other => Some(other.to_string()),
                })
                .collect::<Vec<_>>(),
        ))
    };
    let micros: Vec<i64> = lines
        .iter()
        .map(|l| {
            chrono::DateTime::parse_from_rfc3339(l["timestamp"].as_str().unwrap())
                .unwrap()
                .timestamp_micros()
        })
        .collect();
    let ts = || {
        Arc::new(TimestampMicrosecondArray::from(micros.clone()).with_timezone("UTC")) as ArrayRef
    };
    let t = DataType::Timestamp(arrow::datatypes::TimeUnit::Microsecond, Some("UTC".into()));
    let names = ["message_id", "type", "event", "anonymous_id", "user_id"];
    let mut fields: Vec<Field> = names
        .iter()
        .map(|n| Field::new(*n, DataType::Utf8, true))
        .collect();
    let mut columns: Vec<ArrayRef> = names.iter().map(|n| s(n)).collect();
    fields.push(Field::new("timestamp", t.clone(), true));
    columns.push(ts());
    fields.push(Field::new("received_at", t, true));
    columns.push(ts());
    for n in ["traits", "properties", "context"] {
        fields.push(Field::new(n, DataType::Utf8, true));
        columns.push(s(n));
    }
    RecordBatch::try_new(Arc::new(Schema::new(fields)), columns).unwrap()
}

#[tokio::test]
async fn sqllogictest_files() {
    let slt = repo().join("tests/slt");
    let p = TempProject::local();
    std::fs::copy(repo().join("tessera.toml"), p.path().join("tessera.toml")).unwrap();
    copy_dir(&repo().join("queries"), &p.path().join("queries"));
    write_parquet(
        &p.events().join("fixture.parquet"),
        &[fixture_batch(&slt.join("fixture/events.jsonl"))],
    );

    let project = tessera::config::Project::load(p.path()).unwrap();
    let engine = tessera::engine::Engine::open(project).await.unwrap();
    let as_of = chrono::DateTime::parse_from_rfc3339("2026-10-11T00:00:00Z")
        .unwrap()
        .with_timezone(&chrono::Utc);
    let options = tessera::pipeline::RunOptions {
        full: false,
        as_of: Some(as_of),
    };
    tessera::pipeline::run_on(&engine, &options, tessera::progress::Progress::hidden())
        .await
        .unwrap();

    let mut files: Vec<_> = std::fs::read_dir(&slt)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "slt"))
        .collect();
    files.sort();
    assert!(files.len() >= 2);
    for file in files {
        let ctx = engine.ctx.clone();
        let mut runner = sqllogictest::Runner::new(move || {
            let ctx = ctx.clone();
            async move { Ok::<_, SltError>(Tessera { ctx }) }
        });
        if let Err(e) = runner.run_file_async(&file).await {
            panic!("{}:\n{e}", file.display());
        }
    }
}
