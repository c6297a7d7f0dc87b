//! The `runs` table: one row per run, appended last, so operators and schedulers can see what
//! each run read, rejected, wrote and how long each stage took.

use std::collections::BTreeMap;
use std::sync::Arc;

use arrow::array::{ArrayRef, Int64Array, RecordBatch, StringArray, TimestampMicrosecondArray};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::error::Result;
use crate::error::SkippedFile;
use crate::output::Committed;
use crate::tables::timestamp_type;

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RunStatus {
    /// Every stage finished and every table was committed.
    Succeeded,
    /// A stage failed; see `error`.
    Failed,
    /// Nothing needed recomputing, so nothing was written (not stored in `runs`).
    Unchanged,
}

impl RunStatus {
    /// The value stored in `runs.status`.
    pub fn as_str(self) -> &'static str {
        match self {
            RunStatus::Succeeded => "succeeded",
            RunStatus::Failed => "failed",
            RunStatus::Unchanged => "unchanged",
        }
    }
}

/// Everything a run reports, as stored in `runs` and printed by `tessera run`.
#[derive(Debug, Clone, Serialize)]
pub struct RunReport {
    /// Unique, sortable id of the run.
    pub run_id: String,
    /// The project name from `tessera.toml`.
    pub project: String,
    /// How it ended.
    pub status: RunStatus,
    /// Why it failed, when it did.
    pub error: Option<String>,
    /// When it started.
    pub started_at: DateTime<Utc>,
    /// When it finished.
    pub finished_at: DateTime<Utc>,
    /// The time relative windows and predictions were measured from (`as_of()`).
    pub as_of: DateTime<Utc>,
    /// Event files read.
    pub input_files: Vec<String>,
    /// Event files recorded and skipped, with the reason.
    pub skipped_files: Vec<SkippedFile>,
    /// Rows in the files read (from their footers).
    pub rows_read: u64,
    /// Rows sent to `rejected_events`.
    pub rows_rejected: u64,
    /// Rows dropped as copies of a message_id already kept.
    pub rows_duplicate: u64,
    /// Rows in `events` after checks and deduplication.
    pub events: u64,
    /// Identity resolution counts.
    pub identity: crate::stages::identity::IdentityStats,
    /// Events no identifier tied to a profile (their `profile_id` is NULL).
    pub events_without_profile: u64,
    /// Rows written to `profiles`.
    pub profiles_written: u64,
    /// Each table committed by this run.
    pub tables: BTreeMap<String, Committed>,
    /// What each stage cost (wall time, rows, memory, bytes read, spill), in run order.
    pub stages: Vec<crate::metrics::StageStats>,
    /// `full` (every input file read) or `incremental` (only files not processed before).
    pub mode: String,
    /// Events this run added to the event history (after checks and deduplication).
    pub new_events: u64,
    /// Input files that changed after an earlier run processed them: reported, not re-read.
    pub changed_files: Vec<SkippedFile>,
    /// Runs that had stopped part way through publishing, finished by this run.
    pub finished_publishes: Vec<String>,
    /// Buyers, the fitted models and what fitting and predicting took.
    pub predictions: Option<crate::stages::predict::PredictionRun>,
    /// Rows dropped because they hold the identifiers of a forgotten person (`tessera forget`).
    pub suppressed: u64,
    /// Every node of the run's graph: recomputed (and why), kept or retired.
    pub nodes: Vec<crate::pipeline::graph::Step>,
    /// Built-in tables not computed, and why.
    pub skipped_nodes: Vec<crate::pipeline::graph::Skipped>,
    /// What each data test found (docs/data-tests.md).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub data_tests: Vec<crate::pipeline::data_tests::Outcome>,
    /// What the user should look at: an as-of far after the events, a degenerate model fit,
    /// an empty segment or one that changed sharply (docs/report.md).
    pub warnings: Vec<crate::pipeline::warnings::Warning>,
}

impl RunReport {
    /// A new report for a run starting now.
    pub fn start(project: &str) -> Self {
        let now = Utc::now();
        let suffix = uuid::Uuid::new_v4().as_u128() as u32;
        RunReport {
            run_id: format!("{}-{suffix:08x}", now.format("%Y%m%dT%H%M%SZ")),
            project: project.to_string(),
            status: RunStatus::Failed,
            error: None,
            started_at: now,
            finished_at: now,
            as_of: now,
            input_files: Vec::new(),
            skipped_files: Vec::new(),
            rows_read: 0,
            rows_rejected: 0,
            rows_duplicate: 0,
            events: 0,
            identity: Default::default(),
            events_without_profile: 0,
            profiles_written: 0,
            tables: BTreeMap::new(),
            stages: Vec::new(),
            mode: "full".into(),
            new_events: 0,
            changed_files: Vec::new(),
            finished_publishes: Vec::new(),
            predictions: None,
            suppressed: 0,
            nodes: Vec::new(),
            skipped_nodes: Vec::new(),
            data_tests: Vec::new(),
            warnings: Vec::new(),
        }
    }

    /// The schema of `runs`.
    pub fn schema() -> SchemaRef {
        let text = |n: &str, nullable: bool| Field::new(n, DataType::Utf8, nullable);
        let int = |n: &str| Field::new(n, DataType::Int64, false);
        Arc::new(Schema::new(vec![
            text("run_id", false),
            text("project", false),
            Field::new("started_at", timestamp_type(), false),
            Field::new("finished_at", timestamp_type(), false),
            text("status", false),
            text("error", true),
            int("input_files"),
            int("skipped_files"),
            int("rows_read"),
            int("rows_rejected"),
            int("rows_duplicate"),
            int("events"),
            int("events_without_profile"),
            int("identifiers"),
            int("profiles"),
            int("links_accepted"),
            int("links_refused"),
            int("profiles_merged"),
            text("input_file_list", false),
            text("skipped_file_list", false),
            text("tables", false),
            text("timings_ms", false),
            text("mode", true),
            Field::new("new_events", DataType::Int64, true),
            text("changed_file_list", true),
            Field::new("suppressed", DataType::Int64, true),
            Field::new("as_of", timestamp_type(), true),
            text("nodes", true),
            text("warnings", true),
        ]))
    }

    /// This report as a one-row batch of `runs`.
    pub fn to_batch(&self) -> Result<RecordBatch> {
        let s = |v: &str| Arc::new(StringArray::from(vec![v])) as ArrayRef;
        let i = |v: u64| Arc::new(Int64Array::from(vec![v as i64])) as ArrayRef;
        let t = |v: &DateTime<Utc>| {
            Arc::new(
                TimestampMicrosecondArray::from(vec![v.timestamp_micros()]).with_timezone("UTC"),
            ) as ArrayRef
        };
        let json = |v: &dyn erased::Json| s(&v.to_json());
        let timings: serde_json::Map<String, serde_json::Value> = self
            .stages
            .iter()
            .map(|s| (s.stage.clone(), s.ms.into()))
            .collect();
        let columns = vec![
            s(&self.run_id),
            s(&self.project),
            t(&self.started_at),
            t(&self.finished_at),
            s(self.status.as_str()),
            Arc::new(StringArray::from(vec![self.error.as_deref()])) as ArrayRef,
            i(self.input_files.len() as u64),
            i(self.skipped_files.len() as u64),
            i(self.rows_read),
            i(self.rows_rejected),
            i(self.rows_duplicate),
            i(self.events),
            i(self.events_without_profile),
            i(self.identity.identifiers),
            i(self.identity.profiles),
            i(self.identity.links_accepted),
            i(self.identity.links_refused),
            i(self.identity.profiles_merged),
            json(&self.input_files),
            json(&self.skipped_files),
            json(&self.tables),
            s(&serde_json::Value::Object(timings).to_string()),
            s(&self.mode),
            i(self.new_events),
            json(&self.changed_files),
            i(self.suppressed),
            t(&self.as_of),
            json(&self.nodes),
            json(&self.warnings),
        ];
        Ok(RecordBatch::try_new(Self::schema(), columns)?)
    }
}

mod erased {
    /// Serialises to JSON text; a JSON column in `runs` is readable by every BI tool.
    pub trait Json {
        fn to_json(&self) -> String;
    }
    impl<T: serde::Serialize> Json for T {
        fn to_json(&self) -> String {
            serde_json::to_string(self).unwrap_or_else(|_| "null".into())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_report_is_one_row_with_the_runs_schema() {
        let mut r = RunReport::start("shop");
        r.tables.insert(
            "rejected_events".into(),
            Committed {
                version: 3,
                rows: 7,
                carried: false,
            },
        );
        r.stages.push(crate::metrics::StageStats {
            stage: "ingest".into(),
            ms: 12,
            rows: 5,
            peak_rss_bytes: 0,
            bytes_read: 0,
            spill_bytes: 0,
        });
        let b = r.to_batch().unwrap();
        assert_eq!(b.num_rows(), 1);
        assert_eq!(b.schema(), RunReport::schema());
        let tables = b.column_by_name("tables").unwrap();
        let tables = tables
            .as_any()
            .downcast_ref::<StringArray>()
            .unwrap()
            .value(0);
        assert_eq!(tables, r#"{"rejected_events":{"version":3,"rows":7}}"#);
        let timings = b.column_by_name("timings_ms").unwrap();
        let timings = timings.as_any().downcast_ref::<StringArray>().unwrap();
        assert_eq!(timings.value(0), r#"{"ingest":12}"#);
        assert!(
            r.run_id.len() > 17 && r.run_id.starts_with(&r.started_at.format("%Y").to_string())
        );
    }
}
