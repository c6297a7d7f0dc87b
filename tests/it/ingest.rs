//! Ingest: every rejection reason, corrupt and conflicting files, duplicates, partitions.

use std::sync::Arc;

use arrow::array::{ArrayRef, Int32Array, Int64Array, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema};

use crate::common::*;

const T0: i64 = 1_790_000_000_000_000; // 2026-09-21, in µs

#[test]
fn each_rejection_reason_goes_to_rejected_events_with_its_file() {
    let p = TempProject::local();
    let bad = |id: &'static str| Ev::track(id, T0);
    let rows = vec![
        Ev::track("ok-1", T0),
        Ev {
            message_id: None,
            ..bad("")
        },
        Ev {
            message_id: Some("   "),
            ..bad("")
        },
        Ev {
            kind: None,
            ..bad("no-type")
        },
        Ev {
            kind: Some("Track"),
            ..bad("bad-type")
        },
        Ev {
            timestamp: None,
            ..bad("no-ts")
        },
        Ev {
            traits: Some("{\"email\": "),
            ..bad("bad-traits")
        },
        Ev {
            properties: Some("{price: 1}"),
            ..bad("bad-props")
        },
        Ev {
            context: Some("[1, 2"),
            ..bad("bad-context")
        },
        Ev::track("ok-2", T0 + 5),
    ];
    write_parquet(&p.events().join("batch-1.parquet"), &[events_batch(&rows)]);

    let report = p.run_json();
    assert_eq!(report["rows_read"], 10);
    assert_eq!(report["rows_rejected"], 8);
    assert_eq!(report["events"], 2);

    let rejected = p.query(
        "SELECT message_id, reason, source_file FROM rejected_events ORDER BY reason, message_id",
    );
    let reasons: Vec<(String, String)> = rejected
        .iter()
        .map(|r| {
            (
                r["message_id"].as_str().unwrap_or("<null>").to_string(),
                r["reason"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let expected = [
        ("bad-context", "invalid JSON in context"),
        ("bad-props", "invalid JSON in properties"),
        ("bad-traits", "invalid JSON in traits"),
        ("   ", "missing message_id"),
        ("<null>", "missing message_id"),
        ("no-ts", "missing timestamp"),
        ("no-type", "missing type"),
        ("bad-type", "unknown type"),
    ];
    let expected: Vec<(String, String)> = expected
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
    assert_eq!(reasons, expected);
    for row in &rejected {
        let file = row["source_file"].as_str().unwrap();
        assert!(
            file.starts_with("file://") && file.ends_with("/data/events/batch-1.parquet"),
            "{file}"
        );
    }
    let kept = p.query("SELECT message_id FROM events ORDER BY message_id");
    assert_eq!(
        kept,
        vec![
            serde_json::json!({"message_id": "ok-1"}),
            serde_json::json!({"message_id": "ok-2"})
        ]
    );
}

#[test]
fn corrupt_truncated_and_conflicting_files_are_skipped_and_reported() {
    let p = TempProject::local();
    let good = events_batch(&[Ev::track("g-1", T0), Ev::track("g-2", T0 + 1)]);
    let good_path = p.events().join("a-good.parquet");
    write_parquet(&good_path, std::slice::from_ref(&good));
    let bytes = std::fs::read(&good_path).unwrap();

    std::fs::write(p.events().join("b-empty.parquet"), b"").unwrap();
    // Cut inside the footer: the trailing length and magic survive, the metadata does not.
    let mut cut = bytes[..bytes.len() - 20].to_vec();
    cut.extend_from_slice(&bytes[bytes.len() - 8..]);
    std::fs::write(p.events().join("c-cut-mid-footer.parquet"), cut).unwrap();
    std::fs::write(
        p.events().join("d-truncated.parquet"),
        &bytes[..bytes.len() / 2],
    )
    .unwrap();
    std::fs::write(
        p.events().join("e-not-parquet.parquet"),
        b"message_id,type\n1,track\n",
    )
    .unwrap();

    // A file whose timestamp column is text breaks the event contract.
    let text_ts = RecordBatch::try_new(
        Arc::new(Schema::new(vec![
            Field::new("message_id", DataType::Utf8, true),
            Field::new("type", DataType::Utf8, true),
            Field::new("timestamp", DataType::Utf8, true),
        ])),
        vec![
            Arc::new(StringArray::from(vec!["t-1"])) as ArrayRef,
            Arc::new(StringArray::from(vec!["track"])) as ArrayRef,
            Arc::new(StringArray::from(vec!["2026-01-01"])) as ArrayRef,
        ],
    )
    .unwrap();
    write_parquet(&p.events().join("f-text-timestamp.parquet"), &[text_ts]);
    // A file missing a required column.
    let no_id = good.project(&[1, 5]).unwrap();
    write_parquet(&p.events().join("g-no-message-id.parquet"), &[no_id]);

    let out = run(&mut p.cmd(&["run", "--json", "--quiet"]));
    let report: serde_json::Value = serde_json::from_str(ok(out).trim()).unwrap();
    assert_eq!(report["status"], "succeeded");
    assert_eq!(report["input_files"].as_array().unwrap().len(), 1);
    assert_eq!(report["rows_read"], 2);
    assert_eq!(report["events"], 2);
    let skipped: Vec<(String, String)> = report["skipped_files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            let file = s["file"].as_str().unwrap();
            (
                file.rsplit('/').next().unwrap().to_string(),
                s["reason"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let names: Vec<&str> = skipped.iter().map(|(f, _)| f.as_str()).collect();
    assert_eq!(
        names,
        [
            "b-empty.parquet",
            "c-cut-mid-footer.parquet",
            "d-truncated.parquet",
            "e-not-parquet.parquet",
            "f-text-timestamp.parquet",
            "g-no-message-id.parquet"
        ]
    );
    assert!(skipped[0].1.contains("empty"), "{:?}", skipped[0]);
    assert!(
        skipped[1].1.contains("not a readable Parquet file"),
        "{:?}",
        skipped[1]
    );
    assert!(skipped[4].1.contains("`timestamp`"), "{:?}", skipped[4]);
    assert!(skipped[5].1.contains("`message_id`"), "{:?}", skipped[5]);

    // The run's row in `runs` records the skipped files too.
    let runs = p.query("SELECT skipped_files, skipped_file_list FROM runs");
    assert_eq!(runs[0]["skipped_files"], 6);
    assert!(runs[0]["skipped_file_list"]
        .as_str()
        .unwrap()
        .contains("d-truncated.parquet"));
}

#[test]
fn a_column_whose_type_conflicts_with_earlier_files_skips_the_later_file() {
    let p = TempProject::local();
    let base = events_batch(&[Ev::track("x-1", T0)]);
    let with = |name: &str, col: ArrayRef, id: &'static str| {
        let mut fields: Vec<Field> = base
            .schema()
            .fields()
            .iter()
            .map(|f| f.as_ref().clone())
            .collect();
        fields.push(Field::new(name, col.data_type().clone(), true));
        let mut cols = events_batch(&[Ev::track(id, T0)]).columns().to_vec();
        cols.push(col);
        RecordBatch::try_new(Arc::new(Schema::new(fields)), cols).unwrap()
    };
    write_parquet(
        &p.events().join("1.parquet"),
        &[with("store", Arc::new(Int32Array::from(vec![7])), "a")],
    );
    write_parquet(
        &p.events().join("2.parquet"),
        &[with("store", Arc::new(Int64Array::from(vec![8])), "b")],
    );
    write_parquet(
        &p.events().join("3.parquet"),
        &[with("store", Arc::new(StringArray::from(vec!["x"])), "c")],
    );

    let report = p.run_json();
    let skipped = report["skipped_files"].as_array().unwrap();
    assert_eq!(skipped.len(), 1, "{report}");
    let reason = skipped[0]["reason"].as_str().unwrap();
    assert!(skipped[0]["file"].as_str().unwrap().ends_with("/3.parquet"));
    assert!(
        reason.contains("`store`") && reason.contains("1.parquet"),
        "{reason}"
    );
    // Int32 and Int64 widen to one column that keeps both values.
    let rows = p.query("SELECT message_id, store FROM events ORDER BY message_id");
    assert_eq!(
        rows,
        vec![
            serde_json::json!({"message_id": "a", "store": 7}),
            serde_json::json!({"message_id": "b", "store": 8})
        ]
    );
}

#[test]
fn duplicates_are_counted_once_keeping_the_first_received() {
    let p = TempProject::local();
    let first = Ev {
        received_at: Some(T0 + 10),
        properties: Some(r#"{"copy": "first"}"#),
        ..Ev::track("dup", T0)
    };
    let later = Ev {
        received_at: Some(T0 + 99),
        properties: Some(r#"{"copy": "later"}"#),
        ..Ev::track("dup", T0)
    };
    // Exact redeliveries across two files, plus a differing later copy.
    write_parquet(
        &p.events().join("day1.parquet"),
        &[events_batch(&[
            Ev::track("a", T0),
            later.clone(),
            Ev::track("b", T0),
        ])],
    );
    write_parquet(
        &p.events().join("day2.parquet"),
        &[events_batch(&[
            Ev::track("a", T0),
            first,
            Ev::track("a", T0),
        ])],
    );

    let report = p.run_json();
    assert_eq!(report["rows_read"], 6);
    assert_eq!(report["rows_duplicate"], 3);
    assert_eq!(report["events"], 3);
    let rows = p.query("SELECT message_id, properties FROM events ORDER BY message_id");
    assert_eq!(rows.len(), 3);
    assert_eq!(rows[2]["message_id"], "dup");
    assert_eq!(rows[2]["properties"], r#"{"copy": "first"}"#);
}

#[test]
fn hive_partition_folders_become_columns() {
    let p = TempProject::local();
    write_parquet(
        &p.events().join("date=2026-11-27/part-0.parquet"),
        &[events_batch(&[Ev::track("a", T0)])],
    );
    write_parquet(
        &p.events().join("date=2026-11-28/part-0.parquet"),
        &[events_batch(&[Ev::track("b", T0)])],
    );
    // Marker and temp files are not events.
    std::fs::write(p.events().join("_SUCCESS"), b"").unwrap();
    std::fs::write(
        p.events().join("date=2026-11-28/.part-1.parquet.tmp"),
        b"partial",
    )
    .unwrap();
    p.run_json();
    let rows = p.query("SELECT message_id, \"date\" FROM events ORDER BY message_id");
    assert_eq!(
        rows,
        vec![
            serde_json::json!({"message_id": "a", "date": "2026-11-27"}),
            serde_json::json!({"message_id": "b", "date": "2026-11-28"})
        ]
    );
}

#[test]
fn no_event_files_is_an_empty_run_not_a_failure() {
    let p = TempProject::local();
    std::fs::create_dir_all(p.events()).unwrap();
    let report = p.run_json();
    assert_eq!(report["status"], "succeeded");
    assert_eq!(report["events"], 0);
    assert_eq!(
        p.query("SELECT count(*) AS n FROM events"),
        vec![serde_json::json!({"n": 0})]
    );
}

#[test]
fn a_missing_events_folder_is_a_clear_error() {
    let p = TempProject::local();
    let out = run(&mut p.cmd(&["run", "--quiet"]));
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(
        err.contains("storage.events") && err.contains("tessera generate"),
        "{err}"
    );
}

/// The run succeeded with a.parquet's one event and skipped b.parquet as corrupt.
fn assert_b_skipped_as_corrupt_and_a_landed(report: &serde_json::Value) {
    assert_eq!(report["status"], "succeeded", "{report}");
    assert_eq!(report["events"], 1, "{report}");
    let skipped = report["skipped_files"].as_array().unwrap();
    assert_eq!(skipped.len(), 1, "{report}");
    assert!(skipped[0]["file"].as_str().unwrap().ends_with("/b.parquet"));
    assert!(
        skipped[0]["reason"]
            .as_str()
            .unwrap()
            .contains("corrupt data"),
        "{report}"
    );
}

#[test]
fn a_file_corrupt_only_in_a_column_the_first_pass_skips_is_skipped_not_fatal() {
    // The first pass reads message_id alone; `context` is first read by the one scan that
    // writes rejected_events and the history at once. A decoding error there must reach both
    // writers, fail the attempt without publishing anything, and leave the retry to skip it.
    use parquet::file::reader::{FileReader, SerializedFileReader};
    let p = TempProject::local();
    write_parquet(
        &p.events().join("a.parquet"),
        &[events_batch(&[Ev::track("a-1", T0)])],
    );
    let rows: Vec<Ev> = (0..3000)
        .map(|i| {
            let id: &'static str = Box::leak(format!("b-{i:05}").into_boxed_str());
            let context: &'static str = Box::leak(
                format!(
                    r#"{{"page": {{"url": "https://shop.example/p/{i}"}}, "pad": "{}"}}"#,
                    "z".repeat(60)
                )
                .into_boxed_str(),
            );
            Ev {
                context: Some(context),
                ..Ev::track(id, T0)
            }
        })
        .collect();
    let path = p.events().join("b.parquet");
    write_parquet(&path, &[events_batch(&rows)]);
    let (start, end) = {
        let reader = SerializedFileReader::new(std::fs::File::open(&path).unwrap()).unwrap();
        let group = reader.metadata().row_group(0);
        let chunk = (0..group.num_columns())
            .map(|i| group.column(i))
            .find(|c| c.column_path().string() == "context")
            .expect("a context column");
        let start = chunk
            .dictionary_page_offset()
            .unwrap_or(chunk.data_page_offset()) as usize;
        (start, start + chunk.compressed_size() as usize)
    };
    assert!(end - start > 1000, "{start}..{end}");
    let mut bytes = std::fs::read(&path).unwrap();
    // Past the page header's sizes, so the pages still claim sane lengths; their compressed
    // contents become garbage.
    for b in &mut bytes[start + 64..end - 8] {
        *b = b.wrapping_mul(7).wrapping_add(13);
    }
    std::fs::write(&path, bytes).unwrap();

    assert_b_skipped_as_corrupt_and_a_landed(&p.run_json());
    assert_eq!(
        p.query("SELECT count(*) AS n FROM rejected_events"),
        vec![serde_json::json!({"n": 0})]
    );
}

#[test]
fn a_file_with_a_sound_footer_and_corrupt_pages_is_skipped_not_fatal() {
    let p = TempProject::local();
    write_parquet(
        &p.events().join("a.parquet"),
        &[events_batch(&[Ev::track("a-1", T0)])],
    );
    // Many distinct rows so data pages, not the footer, make up most of the file.
    let ids: Vec<&'static str> = (0..3000)
        .map(|i| &*Box::leak(format!("b-{i:05}-{}", "x".repeat(40)).into_boxed_str()))
        .collect();
    let rows: Vec<Ev> = ids.iter().map(|id| Ev::track(id, T0)).collect();
    let path = p.events().join("b.parquet");
    write_parquet(&path, &[events_batch(&rows)]);
    let mut bytes = std::fs::read(&path).unwrap();
    assert!(bytes.len() > 8000, "{}", bytes.len());
    for b in &mut bytes[64..4064] {
        *b = b.wrapping_mul(7).wrapping_add(13);
    }
    std::fs::write(&path, bytes).unwrap();

    assert_b_skipped_as_corrupt_and_a_landed(&p.run_json());
    // `query` and `validate` get past it too.
    assert_eq!(
        p.query("SELECT count(*) AS n FROM events"),
        vec![serde_json::json!({"n": 1})]
    );
    let out = run(&mut p.cmd(&["validate"]));
    assert_eq!(out.status.code(), Some(1));
    assert!(stdout(&out).contains("b.parquet") && stdout(&out).contains("corrupt data"));
}
