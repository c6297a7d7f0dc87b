//! Output tables read back as BI tools read them: DataFusion, deltalake, pyarrow, DuckDB.

use std::path::Path;
use std::process::Command;

use crate::common::*;

/// Runs tests/py/read_tables.py over `tables` under `output` and returns what it saw.
pub fn read_with_python(python: &Path, output: &str, tables: &[&str]) -> serde_json::Value {
    let out = Command::new(python)
        .arg(repo().join("tests/py/read_tables.py"))
        .arg(output)
        .args(tables)
        .output()
        .expect("python runs");
    assert!(
        out.status.success(),
        "read_tables.py failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("read_tables.py prints JSON")
}

/// Checks the promised types: plain strings and µs UTC timestamps, for pyarrow and DuckDB.
pub fn assert_plain_types(seen: &serde_json::Value, table: &str, text: &[&str], times: &[&str]) {
    let t = &seen[table];
    for col in text {
        assert_eq!(t["arrow_types"][col], "string", "{table}.{col}: {t}");
        assert_eq!(t["duckdb_types"][col], "VARCHAR", "{table}.{col}: {t}");
    }
    for col in times {
        assert_eq!(
            t["arrow_types"][col], "timestamp[us, tz=UTC]",
            "{table}.{col}: {t}"
        );
        assert_eq!(
            t["duckdb_types"][col], "TIMESTAMP WITH TIME ZONE",
            "{table}.{col}: {t}"
        );
    }
    assert_eq!(t["rows"], t["duckdb_rows"]);
}

#[test]
fn outputs_read_back_in_python_with_the_promised_types() {
    let Some(python) = python("outputs_read_back_in_python_with_the_promised_types") else {
        return;
    };
    let p = TempProject::local();
    generate(&p.path().join("data"), 200, 5, 3);
    let report = p.run_json();
    // A second run finds no new files and changes nothing.
    assert_eq!(p.run_json()["status"], "unchanged");
    let out = p.path().join("out");
    let seen = read_with_python(
        &python,
        out.to_str().unwrap(),
        &[
            "rejected_events",
            "runs",
            "identity_graph",
            "identity_links",
            "identity_conflicts",
            "profile_merges",
            "profiles",
        ],
    );
    assert_plain_types(
        &seen,
        "profiles",
        &["profile_id"],
        &["first_seen", "last_seen"],
    );
    assert_eq!(seen["profiles"]["arrow_types"]["event_count"], "int64");
    assert_eq!(
        seen["profiles"]["arrow_types"]["emails"],
        "list<item: string>"
    );

    assert_plain_types(
        &seen,
        "rejected_events",
        &["message_id", "type", "traits", "reason", "source_file"],
        &["timestamp", "received_at"],
    );
    assert_plain_types(
        &seen,
        "runs",
        &["run_id", "status", "tables"],
        &["started_at", "finished_at"],
    );
    assert_plain_types(
        &seen,
        "identity_graph",
        &["identifier_type", "identifier_value", "profile_id"],
        &["first_seen", "last_seen"],
    );
    assert_plain_types(
        &seen,
        "identity_links",
        &[
            "identifier_type",
            "identifier_value",
            "linked_type",
            "linked_value",
            "profile_id",
            "query",
        ],
        &["seen_at"],
    );
    assert_plain_types(
        &seen,
        "identity_conflicts",
        &[
            "identifier_type",
            "identifier_value",
            "other_type",
            "other_value",
            "reason",
        ],
        &["seen_at"],
    );
    assert_eq!(
        seen["identity_graph"]["rows"],
        report["identity"]["identifiers"]
    );
    assert_eq!(
        seen["identity_links"]["rows"],
        report["identity"]["links_accepted"]
    );
    assert_eq!(seen["profile_merges"]["rows"], 0);
    assert_eq!(seen["runs"]["rows"], 1, "the unchanged run adds no row");
    assert_eq!(seen["runs"]["arrow_types"]["events"], "int64");
    assert_eq!(seen["rejected_events"]["rows"], report["rows_rejected"]);
    assert_eq!(
        seen["rejected_events"]["version"],
        report["tables"]["rejected_events"]["version"]
    );
}

#[tokio::test]
async fn outputs_read_back_in_datafusion_with_the_promised_types() {
    use arrow::datatypes::{DataType, TimeUnit};
    let p = TempProject::new(
        "[storage]\nevents = \"data/events\"\noutput = \"out\"\n[sessions]\n[predictions]\n",
    );
    generate(&p.path().join("data"), 100, 3, 8);
    let bad = Ev {
        kind: Some("Track"),
        ..Ev::track("bad-1", 1_790_000_000_000_000)
    };
    write_parquet(&p.events().join("bad.parquet"), &[events_batch(&[bad])]);
    let report = p.run_json();
    assert!(report["rows_rejected"].as_u64().unwrap() >= 1);

    // Through the Delta log, as `tessera query` and later stages read it.
    let project = tessera::config::Project::load(p.path()).unwrap();
    let engine = tessera::engine::Engine::open(project).await.unwrap();
    let found = engine.register_outputs().await.unwrap();
    assert_eq!(
        found,
        [
            "rejected_events",
            "identity_graph",
            "identity_links",
            "identity_conflicts",
            "profile_merges",
            "profiles",
            "segment_changes",
            "sessions",
            "rfm",
            "predictions",
            "prediction_models",
            "runs"
        ]
    );
    let df = engine
        .ctx
        .sql("SELECT * FROM rejected_events")
        .await
        .unwrap();
    let rows: usize = df
        .collect()
        .await
        .unwrap()
        .iter()
        .map(|b| b.num_rows())
        .sum();
    assert_eq!(rows as u64, report["rows_rejected"].as_u64().unwrap());

    // The Parquet files themselves, as any engine without Delta support reads them.
    let table = engine
        .outputs
        .open("rejected_events")
        .await
        .unwrap()
        .unwrap();
    let files: Vec<String> = table.get_file_uris().unwrap().collect();
    assert_eq!(files.len(), 1);
    let ctx = tessera::engine::new_context().unwrap();
    let df = ctx
        .read_parquet(files[0].as_str(), Default::default())
        .await
        .unwrap();
    let schema = df.schema().as_arrow().clone();
    for f in schema.fields() {
        let ok = match f.name().as_str() {
            "timestamp" | "received_at" => {
                f.data_type() == &DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()))
            }
            _ => f.data_type() == &DataType::Utf8,
        };
        assert!(ok, "{}: {}", f.name(), f.data_type());
    }
}
