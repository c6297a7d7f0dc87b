//! Data tests: queries that return the rows breaking a rule, run before a run publishes.
//!
//! Three kinds, all compiled to the same thing (a name, a severity and a SELECT):
//! - `queries/tests/*.sql`, written by hand; a `-- severity: warn` comment line sets the
//!   severity (default `error`);
//! - `[[tests]]` in tessera.toml: `unique`, `not_null`, `accepted_values` and
//!   `relationships` on one column of one table;
//! - the identity audits (`[audits]`): no profile holds more values of an identifier type
//!   than its `limit`, no profile holds a blocklisted value, and (when set) no profile holds
//!   more than `max_profile_size` identifiers.
//!
//! They run once every table of the run is computed and before anything is published, against
//! the tables as this run would publish them. A failing `error` test fails the run: nothing
//! is published, and the previous run's tables stay as they were. A failing `warn` test is
//! listed in the run's report.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, Int64Array, StringArray};
use arrow::datatypes::{DataType, Field, Schema};
use arrow::record_batch::RecordBatch;
use serde::Serialize;

use crate::config::{DeclaredTest, Project, Severity};
use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::tables;

/// The folder of hand-written tests, under `queries/`.
pub const FOLDER: &str = "tests";

/// How many failing rows a report and an error show.
const SAMPLE_ROWS: usize = 5;

/// One data test, compiled.
#[derive(Debug, Clone)]
pub struct DataTest {
    /// How reports name it: its file (`queries/tests/x.sql`), its config entry
    /// (`tests[0] profiles.profile_id unique`) or its audit.
    pub name: String,
    /// What a failure does.
    pub severity: Severity,
    /// Returns the rows that break the rule.
    pub sql: String,
}

/// What one test found.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Outcome {
    /// The test's name.
    pub name: String,
    /// `error` or `warn`.
    pub severity: Severity,
    /// Rows that break the rule (0: it passed).
    pub failing_rows: u64,
    /// The first few of them, as JSON objects.
    pub sample: Vec<serde_json::Value>,
    /// True when the test was not run again: it found no rows at the last published run, and
    /// nothing it reads has changed since ([`run_changed`]).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub carried: bool,
}

impl Outcome {
    /// One line: the test, how many rows break it and the first few.
    pub fn describe(&self) -> String {
        let mut text = format!(
            "{} ({}): {} row{} break{} it",
            self.name,
            self.severity.as_str(),
            self.failing_rows,
            if self.failing_rows == 1 { "" } else { "s" },
            if self.failing_rows == 1 { "s" } else { "" },
        );
        if !self.sample.is_empty() {
            let rows: Vec<String> = self.sample.iter().map(|r| r.to_string()).collect();
            let _ = write!(text, "; first: {}", rows.join(", "));
        }
        text
    }
}

/// The severity a test file's comments set: a line `-- severity: warn` (or `error`).
pub fn severity_of(sql: &str) -> Severity {
    for line in sql.lines() {
        let Some(comment) = line.trim().strip_prefix("--") else {
            continue;
        };
        let comment = comment.trim().to_lowercase();
        if let Some(value) = comment.strip_prefix("severity:") {
            if value.trim() == "warn" {
                return Severity::Warn;
            }
            return Severity::Error;
        }
    }
    Severity::Error
}

/// A name quoted for SQL, part by part (`segments.x` → `"segments"."x"`).
fn quoted(name: &str) -> String {
    name.split('.')
        .map(|part| format!("\"{}\"", part.replace('"', "\"\"")))
        .collect::<Vec<_>>()
        .join(".")
}

fn literal(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

/// The queries one `[[tests]]` entry compiles to, one per check.
pub fn compile(i: usize, test: &DeclaredTest) -> Vec<DataTest> {
    let table = quoted(&test.table);
    let column = quoted(&test.column);
    let name = |check: &str| format!("tests[{i}] {}.{} {check}", test.table, test.column);
    let mut out = Vec::new();
    let mut add = |check: &str, sql: String| {
        out.push(DataTest {
            name: name(check),
            severity: test.severity,
            sql,
        })
    };
    if test.unique {
        add(
            "unique",
            format!("SELECT {column}, count(*) AS occurrences FROM {table} WHERE {column} IS NOT NULL GROUP BY {column} HAVING count(*) > 1"),
        );
    }
    if test.not_null {
        add(
            "not_null",
            format!("SELECT * FROM {table} WHERE {column} IS NULL"),
        );
    }
    if let Some(values) = &test.accepted_values {
        let list = values
            .iter()
            .map(|v| literal(v))
            .collect::<Vec<_>>()
            .join(", ");
        let list = if list.is_empty() { "NULL".into() } else { list };
        add(
            "accepted_values",
            format!("SELECT {column}, count(*) AS occurrences FROM {table} WHERE {column} IS NOT NULL AND CAST({column} AS VARCHAR) NOT IN ({list}) GROUP BY {column}"),
        );
    }
    if let Some(to) = &test.relationships {
        let (other, field) = (quoted(&to.to), quoted(&to.field));
        add(
            "relationships",
            format!("SELECT DISTINCT {column} FROM {table} WHERE {column} IS NOT NULL AND {column} NOT IN (SELECT {field} FROM {other} WHERE {field} IS NOT NULL)"),
        );
    }
    out
}

/// The identity audits `[audits]` asks for.
pub fn audits(project: &Project) -> Vec<DataTest> {
    let config = &project.config;
    let audits = &config.audits;
    if !audits.enabled {
        return Vec::new();
    }
    let graph = tables::IDENTITY_GRAPH;
    let mut out = Vec::new();
    for identifier in &config.identity.identifiers {
        if let Some(limit) = identifier.limit {
            out.push(DataTest {
                name: format!("audit: at most {limit} {} per profile", identifier.name),
                severity: audits.severity,
                sql: format!(
                    "SELECT profile_id, count(*) AS values FROM {graph} WHERE identifier_type = {} GROUP BY profile_id HAVING count(*) > {limit}",
                    literal(&identifier.name)
                ),
            });
        }
    }
    let blocked: Vec<String> = config
        .identity
        .identifiers
        .iter()
        .filter(|i| !i.blocklist.is_empty())
        .map(|i| {
            let values = i
                .blocklist
                .iter()
                .map(|v| literal(&v.trim().to_lowercase()))
                .collect::<Vec<_>>()
                .join(", ");
            format!(
                "(identifier_type = {} AND lower(identifier_value) IN ({values}))",
                literal(&i.name)
            )
        })
        .collect();
    if !blocked.is_empty() {
        out.push(DataTest {
            name: "audit: no blocklisted value in a profile".into(),
            severity: audits.severity,
            sql: format!(
                "SELECT identifier_type, identifier_value, profile_id FROM {graph} WHERE {}",
                blocked.join(" OR ")
            ),
        });
    }
    if let Some(max) = audits.max_profile_size {
        out.push(DataTest {
            name: format!("audit: at most {max} identifiers per profile (audits.max_profile_size)"),
            severity: audits.severity,
            sql: format!(
                "SELECT profile_id, count(*) AS identifiers FROM {graph} GROUP BY profile_id HAVING count(*) > {max} ORDER BY count(*) DESC"
            ),
        });
    }
    out
}

/// Every data test of the project: its test files, its `[[tests]]` and the audits.
pub fn collect(project: &Project) -> Result<Vec<DataTest>> {
    let mut out: Vec<DataTest> = project
        .query_files(FOLDER)?
        .into_iter()
        .map(|file| DataTest {
            severity: severity_of(&file.sql),
            name: file.file,
            sql: file.sql,
        })
        .collect();
    for (i, test) in project.config.tests.iter().enumerate() {
        out.extend(compile(i, test));
    }
    out.extend(audits(project));
    Ok(out)
}

/// Runs `tests` over the tables registered in the engine's context.
///
/// An audit is skipped when there is no `identity_graph` to audit.
pub async fn run_all(engine: &Engine, tests: &[DataTest]) -> Result<Vec<Outcome>> {
    let has_graph = engine
        .ctx
        .table_exist(tables::IDENTITY_GRAPH)
        .unwrap_or(false);
    let mut outcomes = Vec::new();
    for test in tests {
        if test.name.starts_with("audit:") && !has_graph {
            continue;
        }
        let df = engine.query(&test.sql, &test.name).await?;
        let batches = engine
            .in_time(&test.name, async {
                df.collect()
                    .await
                    .map_err(|e| Error::query_failed(&test.name, e))
            })
            .await?;
        let failing_rows: usize = batches.iter().map(RecordBatch::num_rows).sum();
        outcomes.push(Outcome {
            name: test.name.clone(),
            severity: test.severity,
            failing_rows: failing_rows as u64,
            sample: sample(&batches)?,
            carried: false,
        });
    }
    Ok(outcomes)
}

/// The `_state/tests` table.
pub const STATE: &str = tables::state::TESTS;

/// Each test's inputs (see [`crate::pipeline::graph::test_inputs`]) with the version of
/// `forget_requests`: a forget request rewrites tables without a run, so after one every test
/// runs again until a run publishes. Tests whose inputs cannot be worked out are left out.
pub async fn keys(
    engine: &Engine,
    tests: &[DataTest],
    as_of: chrono::DateTime<chrono::Utc>,
) -> Result<BTreeMap<String, String>> {
    let forgets = match engine.outputs.open(tables::FORGET_REQUESTS).await? {
        Some(table) => table.version(),
        None => None,
    };
    let mut out = BTreeMap::new();
    let mut listed = BTreeMap::new();
    for test in tests {
        let inputs =
            crate::pipeline::graph::test_inputs(engine, &test.name, &test.sql, as_of, &mut listed)
                .await?;
        if let Some(inputs) = inputs {
            out.insert(
                test.name.clone(),
                crate::digest::sha256_hex(&format!("{inputs}\u{0}forgets={forgets:?}")),
            );
        }
    }
    Ok(out)
}

/// `_state/tests` for the outcomes a run publishes: each test's key and failing rows (no
/// sample: failing rows may hold personal data, and a state table is not where a forget
/// request looks for it).
pub fn state_batch(outcomes: &[Outcome], keys: &BTreeMap<String, String>) -> Result<RecordBatch> {
    let kept: Vec<(&Outcome, &String)> = outcomes
        .iter()
        .filter_map(|o| keys.get(&o.name).map(|k| (o, k)))
        .collect();
    let schema = Arc::new(Schema::new(vec![
        Field::new("name", DataType::Utf8, false),
        Field::new("key", DataType::Utf8, false),
        Field::new("failing_rows", DataType::Int64, false),
    ]));
    let columns: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from_iter_values(
            kept.iter().map(|(o, _)| &o.name),
        )),
        Arc::new(StringArray::from_iter_values(kept.iter().map(|(_, k)| k))),
        Arc::new(Int64Array::from_iter_values(
            kept.iter().map(|(o, _)| o.failing_rows as i64),
        )),
    ];
    Ok(RecordBatch::try_new(schema, columns)?)
}

/// The tests that passed at the last published run, with the key they passed under.
async fn passed(engine: &Engine) -> Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    let Some(df) = engine.outputs.read(&engine.ctx, STATE).await? else {
        return Ok(out);
    };
    for batch in df.collect().await? {
        let (Some(name), Some(key), Some(rows)) = (
            batch.column_by_name("name"),
            batch.column_by_name("key"),
            batch.column_by_name("failing_rows"),
        ) else {
            // Not a layout this version wrote: every test runs.
            return Ok(BTreeMap::new());
        };
        let name = arrow::compute::cast(name, &DataType::Utf8)?;
        let key = arrow::compute::cast(key, &DataType::Utf8)?;
        let rows = arrow::compute::cast(rows, &DataType::Int64)?;
        let (name, key) = (name.as_string::<i32>(), key.as_string::<i32>());
        let rows = rows.as_primitive::<arrow::datatypes::Int64Type>();
        for i in 0..batch.num_rows() {
            if !name.is_null(i) && !key.is_null(i) && !rows.is_null(i) && rows.value(i) == 0 {
                out.insert(name.value(i).to_string(), key.value(i).to_string());
            }
        }
    }
    Ok(out)
}

/// For a run with nothing to recompute: runs the tests that are new, changed, read something
/// that changed, or found rows last time; the rest passed at the last published run over the
/// same inputs and are carried over. Outcomes come in the order of `tests`.
pub async fn run_changed(
    engine: &Engine,
    tests: &[DataTest],
    keys: &BTreeMap<String, String>,
) -> Result<Vec<Outcome>> {
    let passed = passed(engine).await?;
    let settled = |t: &DataTest| {
        keys.get(&t.name)
            .is_some_and(|k| passed.get(&t.name) == Some(k))
    };
    let to_run: Vec<DataTest> = tests.iter().filter(|t| !settled(t)).cloned().collect();
    let mut ran = run_all(engine, &to_run).await?.into_iter().peekable();
    let mut out = Vec::new();
    for test in tests {
        if settled(test) {
            tracing::debug!(test = %test.name, "passed at the last run over the same inputs; not run again");
            out.push(Outcome {
                name: test.name.clone(),
                severity: test.severity,
                failing_rows: 0,
                sample: Vec::new(),
                carried: true,
            });
        } else if let Some(outcome) = ran.next_if(|o| o.name == test.name) {
            // (An audit with no identity graph to audit has no outcome.)
            out.push(outcome);
        }
    }
    Ok(out)
}

/// The first [`SAMPLE_ROWS`] rows as JSON objects.
fn sample(batches: &[RecordBatch]) -> Result<Vec<serde_json::Value>> {
    let mut left = SAMPLE_ROWS;
    let mut rows = Vec::new();
    for batch in batches {
        if left == 0 {
            break;
        }
        let take = batch.num_rows().min(left);
        if take == 0 {
            continue;
        }
        left -= take;
        let mut writer = arrow::json::ArrayWriter::new(Vec::new());
        writer.write(&batch.slice(0, take))?;
        writer.finish()?;
        let text = writer.into_inner();
        if let Ok(serde_json::Value::Array(values)) = serde_json::from_slice(&text) {
            rows.extend(values);
        }
    }
    Ok(rows)
}

/// The error that stops the publish, when an `error` test failed.
pub fn blocking(outcomes: &[Outcome]) -> Option<Error> {
    let failed: Vec<String> = outcomes
        .iter()
        .filter(|o| o.severity == Severity::Error && o.failing_rows > 0)
        .map(Outcome::describe)
        .collect();
    (!failed.is_empty()).then(|| Error::DataTest {
        failed: failed.join("\n  "),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn severity_comes_from_a_comment_line() {
        assert_eq!(severity_of("-- severity: warn\nSELECT 1"), Severity::Warn);
        assert_eq!(severity_of("--Severity:WARN\nSELECT 1"), Severity::Warn);
        assert_eq!(severity_of("SELECT 1 -- nothing"), Severity::Error);
        assert_eq!(severity_of("-- severity: error\nSELECT 1"), Severity::Error);
    }

    #[test]
    fn declared_checks_compile_to_one_query_each() {
        let test = DeclaredTest {
            table: "segments.vip".into(),
            column: "tier".into(),
            unique: true,
            not_null: true,
            accepted_values: Some(vec!["gold".into(), "o'brien".into()]),
            relationships: Some(crate::config::Relationship {
                to: "profiles".into(),
                field: "profile_id".into(),
            }),
            severity: Severity::Warn,
        };
        let compiled = compile(2, &test);
        assert_eq!(compiled.len(), 4);
        assert_eq!(compiled[0].name, "tests[2] segments.vip.tier unique");
        assert!(compiled[0].sql.contains("FROM \"segments\".\"vip\""));
        assert!(compiled[2].sql.contains("('gold', 'o''brien')"));
        assert!(compiled.iter().all(|t| t.severity == Severity::Warn));
    }
}
