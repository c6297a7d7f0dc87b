//! Trust: every event file is read or reported, Tessera deletes only what it made, config
//! values are bounded. Each test here reproduces a defect found by trying hostile folder
//! names, values, settings and layouts against the real binary.

use std::path::Path;
use std::sync::Arc;

use arrow::array::{ArrayRef, RecordBatch, StringArray, TimestampMillisecondArray};
use arrow::datatypes::{DataType, Field, Schema, TimeUnit};
use serde_json::{json, Value};

use crate::common::*;

const T0: i64 = 1_790_000_000_000_000; // 2026-09-21, in µs

/// The run report's skipped files, as (file, reason).
fn skipped(report: &Value) -> Vec<(String, String)> {
    report["skipped_files"]
        .as_array()
        .map(|files| {
            files
                .iter()
                .map(|f| {
                    (
                        f["file"].as_str().unwrap_or_default().to_string(),
                        f["reason"].as_str().unwrap_or_default().to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Folders named with characters that URLs and Hive escape, each holding one event: the
/// folder, the event's id, and the partition value Hive's escaping gives.
const ESCAPED_FOLDERS: [(&str, &str, &str); 6] = [
    ("date=2026-11-28", "plain", "2026-11-28"),
    ("date=%41", "escaped", "A"),
    ("date=100%25", "percent", "100%"),
    ("date=2026-10-01#1", "hash", "2026-10-01#1"),
    ("date=%1é", "broken-escape", "%1é"),
    ("date=a b?c", "space-question", "a b?c"),
];

/// Runs `p` over [`ESCAPED_FOLDERS`] and checks that every event arrived once, with its value.
fn assert_every_escaped_folder_read(p: &TempProject) {
    let report = p.run_json();
    assert_eq!(report["status"], "succeeded", "{report}");
    assert!(skipped(&report).is_empty(), "{report}");
    // Every row read is a row scanned: none counted as a duplicate, none lost.
    let n = ESCAPED_FOLDERS.len() as u64;
    assert_eq!(report["rows_read"], n, "{report}");
    assert_eq!(report["rows_duplicate"], 0, "{report}");
    assert_eq!(report["events"], n, "{report}");
    let mut want: Vec<Value> = ESCAPED_FOLDERS
        .iter()
        .map(|(_, id, date)| json!({"message_id": id, "date": date}))
        .collect();
    want.sort_by_key(|v| v["message_id"].as_str().unwrap().to_string());
    assert_eq!(
        p.query("SELECT message_id, \"date\" FROM events ORDER BY message_id"),
        want
    );
    // `validate` and `query` take the same folders (the `%1é` one panicked both).
    ok(run(&mut p.cmd(&["validate"])));
    // A second run reads nothing again: each file was recorded under the name it was read by.
    let again = p.run_json();
    assert_eq!(again["status"], "unchanged", "{again}");
}

fn one_event(id: &str) -> RecordBatch {
    let id: &'static str = Box::leak(id.to_string().into_boxed_str());
    events_batch(&[Ev::track(id, T0)])
}

#[test]
fn event_files_under_escaped_folder_names_are_read_with_their_partition_values() {
    let p = TempProject::local();
    for (folder, id, _) in ESCAPED_FOLDERS {
        write_parquet(
            &p.events().join(folder).join("part-0.parquet"),
            &[one_event(id)],
        );
    }
    assert_every_escaped_folder_read(&p);
}

#[test]
fn event_files_under_escaped_key_names_on_s3_are_read_like_local_ones() {
    if !s3_available("event_files_under_escaped_key_names_on_s3_are_read_like_local_ones") {
        return;
    }
    let prefix = s3_prefix();
    let p = TempProject::new(&format!(
        "[storage]\nevents = \"{prefix}/events\"\noutput = \"{prefix}/out\"\n"
    ));
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        use object_store::ObjectStoreExt;
        let place = tessera::storage::Place::open(
            &format!("{prefix}/events"),
            Path::new("/"),
            "storage.events",
        )
        .unwrap();
        for (folder, id, _) in ESCAPED_FOLDERS {
            let batch = one_event(id);
            let bytes = tessera::cli::generate::parquet_bytes(batch.schema(), &[batch]).unwrap();
            // The key exactly as written, not escaped by object_store's path rules.
            let key = object_store::path::Path::parse(format!(
                "{}/{folder}/part-0.parquet",
                place.prefix.as_ref()
            ))
            .unwrap();
            place.store.put(&key, bytes.into()).await.unwrap();
        }
    });
    assert_every_escaped_folder_read(&p);
}

#[test]
fn a_folder_whose_name_cannot_be_read_is_skipped_and_named_and_the_rest_is_read() {
    use std::os::unix::ffi::OsStrExt;
    let p = TempProject::local();
    write_parquet(
        &p.events().join("date=2026-11-28/part-0.parquet"),
        &[events_batch(&[Ev::track("good", T0)])],
    );
    // Escapes that decode to bytes that are not UTF-8 …
    write_parquet(
        &p.events().join("date=%e2%82/part-0.parquet"),
        &[events_batch(&[Ev::track("bad-escape", T0)])],
    );
    // … and a folder name that is not UTF-8 at all (this failed every run: "non-unicode").
    let raw = p
        .events()
        .join(std::ffi::OsStr::from_bytes(b"date=\xff\xfe"))
        .join("part-0.parquet");
    write_parquet(&raw, &[events_batch(&[Ev::track("bad-bytes", T0)])]);

    let report = p.run_json();
    assert_eq!(report["status"], "succeeded", "{report}");
    assert_eq!(report["events"], 1, "{report}");
    let skipped = skipped(&report);
    assert_eq!(skipped.len(), 2, "{report}");
    assert!(
        skipped
            .iter()
            .any(|(f, r)| f.contains("date=%e2%82") && r.contains("UTF-8")),
        "{skipped:?}"
    );
    assert!(
        skipped
            .iter()
            .any(|(f, r)| f.contains("date=") && r.contains("not valid UTF-8")),
        "{skipped:?}"
    );
    // `status` names them too, and `validate` warns about them.
    let status = ok(run(&mut p.cmd(&["status"])));
    assert!(status.contains("date=%e2%82"), "{status}");
    let out = run(&mut p.cmd(&["validate"]));
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    assert!(stdout(&out).contains("date=%e2%82"), "{}", stdout(&out));
}

/// One file whose `timestamp` column is in milliseconds, with the given values.
fn millisecond_file(path: &Path, rows: &[(&str, i64)]) {
    let ids: ArrayRef = Arc::new(StringArray::from(
        rows.iter().map(|(id, _)| *id).collect::<Vec<_>>(),
    ));
    let kinds: ArrayRef = Arc::new(StringArray::from(vec!["track"; rows.len()]));
    let times: ArrayRef = Arc::new(
        TimestampMillisecondArray::from(rows.iter().map(|(_, t)| *t).collect::<Vec<_>>())
            .with_timezone("UTC"),
    );
    let schema = Arc::new(Schema::new(vec![
        Field::new("message_id", DataType::Utf8, true),
        Field::new("type", DataType::Utf8, true),
        Field::new(
            "timestamp",
            DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into())),
            true,
        ),
    ]));
    let batch = RecordBatch::try_new(schema, vec![ids, kinds, times]).unwrap();
    write_parquet(path, &[batch]);
}

#[test]
fn a_timestamp_past_the_microsecond_range_is_one_quarantined_row_not_a_failed_run() {
    let p = TempProject::local();
    write_parquet(
        &p.events().join("a.parquet"),
        &[events_batch(&[Ev::track("fine-us", T0)])],
    );
    // i64::MAX milliseconds cannot be held in microseconds; the other two rows can.
    millisecond_file(
        &p.events().join("b.parquet"),
        &[
            ("fine-ms", T0 / 1000),
            ("far-future", i64::MAX / 2),
            ("far-past", i64::MIN / 2),
        ],
    );
    // `validate` says what a run will quarantine, naming the file.
    let out = run(&mut p.cmd(&["validate"]));
    let text = stdout(&out);
    let note = text
        .lines()
        .find(|l| l.contains("timestamp out of range"))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(
        note.starts_with("note: 2 rows will go to rejected_events: timestamp out of range")
            && note.contains("in 1 file, first file://")
            && note.ends_with("/b.parquet"),
        "{note}"
    );
    let report = p.run_json();
    assert_eq!(report["status"], "succeeded", "{report}");
    assert_eq!(report["events"], 2, "{report}");
    assert_eq!(report["rows_rejected"], 2, "{report}");
    let rejected =
        p.query("SELECT message_id, reason, source_file FROM rejected_events ORDER BY message_id");
    assert_eq!(rejected.len(), 2, "{rejected:?}");
    for (row, id) in rejected.iter().zip(["far-future", "far-past"]) {
        assert_eq!(row["message_id"], id);
        assert!(
            row["reason"]
                .as_str()
                .unwrap()
                .starts_with("timestamp out of range"),
            "{row}"
        );
        assert!(row["source_file"].as_str().unwrap().ends_with("b.parquet"));
    }
    // The valid millisecond row is converted, not shifted.
    let fine = p.query(
        "SELECT CAST(\"timestamp\" AS BIGINT) AS t FROM events WHERE message_id = 'fine-ms'",
    );
    assert_eq!(fine, vec![json!({"t": T0 / 1000 * 1000})]);
}

#[test]
fn an_output_folder_overlapping_the_events_folder_is_refused() {
    for (events, output) in [
        ("data/events", "data/events/out"),
        ("data/events", "data/events"),
        ("out/events", "out"),
    ] {
        let p = TempProject::new(&format!(
            "[storage]\nevents = \"{events}\"\noutput = \"{output}\"\n"
        ));
        write_parquet(
            &p.path().join(events).join("a.parquet"),
            &[events_batch(&[Ev::track("a", T0)])],
        );
        for command in ["run", "validate"] {
            let out = run(&mut p.cmd(&[command, "--quiet"]));
            assert_eq!(out.status.code(), Some(2), "{command} {events} {output}");
            let err = stderr(&out);
            assert!(
                err.contains("storage.output") && err.contains("overlaps storage.events"),
                "{err}"
            );
        }
        assert!(!p.path().join(output).join("rejected_events").exists());
    }
    // A link to the events folder is the events folder.
    let p = TempProject::new("[storage]\nevents = \"data/events\"\noutput = \"linked/out\"\n");
    write_parquet(
        &p.events().join("a.parquet"),
        &[events_batch(&[Ev::track("a", T0)])],
    );
    std::os::unix::fs::symlink(p.events(), p.path().join("linked")).unwrap();
    let out = run(&mut p.cmd(&["run", "--quiet"]));
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
}

#[test]
fn out_of_range_durations_are_config_errors_naming_the_key() {
    for (section, key, value) in [
        ("run", "retention_hours", "10000000000000"),
        ("run", "lease_seconds", "10000000000000"),
        ("run", "lease_seconds", "9223372036854775807"),
        ("run", "lease_seconds", "1"),
        ("storage.retry", "retry_timeout_secs", "0"),
        ("storage.retry", "request_timeout_secs", "100000"),
        ("storage.retry", "max_backoff_ms", "1000000000000"),
        ("sessions", "gap_minutes", "4000000000"),
    ] {
        let p = TempProject::new(&format!(
            "[storage]\nevents = \"data/events\"\n[{section}]\n{key} = {value}\n"
        ));
        std::fs::create_dir_all(p.events()).unwrap();
        for command in ["validate", "run"] {
            let out = run(&mut p.cmd(&[command, "--quiet"]));
            let err = stderr(&out);
            assert_eq!(out.status.code(), Some(2), "{key} = {value}: {err}");
            // A TOML value too large for its type is the parser's error, also naming the key.
            assert!(
                err.contains(&format!("{section}.{key}")),
                "{key} = {value}: {err}"
            );
            assert!(!err.contains("panicked"), "{err}");
        }
    }
    // "Keep for good" is a value that can be written: 100 years.
    let p =
        TempProject::new("[storage]\nevents = \"data/events\"\n[run]\nretention_hours = 876000\n");
    write_parquet(
        &p.events().join("a.parquet"),
        &[events_batch(&[Ev::track("a", T0)])],
    );
    let first = p.run_json();
    assert_eq!(first["status"], "succeeded");
    write_parquet(
        &p.events().join("b.parquet"),
        &[events_batch(&[Ev::track("b", T0)])],
    );
    p.run_json();
    // The first version of the event history is still readable: its files were kept.
    let version = first["tables"]["_state/events"]["version"]
        .as_u64()
        .unwrap();
    let log = p.path().join("out/_state/events/_delta_log");
    let commit = std::fs::read_to_string(log.join(format!("{version:020}.json"))).unwrap();
    for line in commit.lines() {
        let action: Value = serde_json::from_str(line).unwrap();
        if let Some(path) = action["add"]["path"].as_str() {
            assert!(
                p.path().join("out/_state/events").join(path).exists(),
                "{path} of version {version} was deleted"
            );
        }
    }
}

#[test]
fn the_scratch_sweep_removes_only_marked_folders_of_dead_runs_and_only_from_run() {
    let p = TempProject::local();
    write_parquet(
        &p.events().join("a.parquet"),
        &[events_batch(&[Ev::track("a", T0)])],
    );
    let spill = p.path().join("spill");
    std::fs::create_dir_all(&spill).unwrap();
    // A user's folder named like a scratch folder, old, even holding an older Tessera's lock
    // file name: not Tessera's to delete.
    let notes = spill.join("tessera-notes");
    std::fs::create_dir_all(&notes).unwrap();
    std::fs::write(notes.join("todo.txt"), b"keep").unwrap();
    std::fs::write(notes.join(".lock"), b"").unwrap();
    let old = std::time::SystemTime::now() - std::time::Duration::from_secs(30 * 24 * 3600);
    std::fs::File::open(&notes)
        .unwrap()
        .set_modified(old)
        .unwrap();
    // A dead run's folder: marked, nobody holds the marker's lock.
    let dead = spill.join("tessera-dead01");
    std::fs::create_dir_all(&dead).unwrap();
    std::fs::write(dead.join(".tessera-scratch"), b"{\"pid\":1}").unwrap();
    std::fs::write(dead.join("events.parquet"), vec![0u8; 100]).unwrap();

    let spill_arg = spill.to_str().unwrap();
    for command in ["validate", "status"] {
        let out = run(p.cmd(&[command, "--quiet"]).env("TMPDIR", &spill));
        assert!(
            out.status.code().is_some_and(|c| c <= 1),
            "{}",
            stderr(&out)
        );
        assert!(dead.exists(), "{command} must not sweep");
    }
    ok(run(&mut p.cmd(&[
        "run",
        "--quiet",
        "--spill-dir",
        spill_arg,
    ])));
    assert!(!dead.exists(), "run sweeps a dead run's marked folder");
    assert_eq!(std::fs::read(notes.join("todo.txt")).unwrap(), b"keep");
    let left: Vec<String> = std::fs::read_dir(&spill)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(left, vec!["tessera-notes".to_string()]);
}

#[test]
fn a_table_folder_holding_files_tessera_did_not_write_is_refused_and_kept() {
    let p = TempProject::local();
    write_parquet(
        &p.events().join("a.parquet"),
        &[events_batch(&[Ev::track("a", T0)])],
    );
    // A shared export folder: someone else's `runs/` and `profiles/` files.
    let theirs = [
        p.path().join("out/runs/2026-11-01.csv"),
        p.path().join("out/profiles/part-0.parquet"),
    ];
    for file in &theirs {
        std::fs::create_dir_all(file.parent().unwrap()).unwrap();
        std::fs::write(file, b"not tessera's").unwrap();
    }
    let out = run(&mut p.cmd(&["run", "--quiet"]));
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("did not write") && err.contains("storage.output"),
        "{err}"
    );
    for file in &theirs {
        assert_eq!(std::fs::read(file).unwrap(), b"not tessera's");
    }
    // Nothing was published.
    assert!(!p.path().join("out/runs/_delta_log").exists());
    assert!(!p.path().join("out/profiles/_delta_log").exists());
}

#[test]
fn clean_up_of_old_versions_deletes_only_files_tessera_wrote() {
    let p = TempProject::new(
        "[storage]\nevents = \"data/events\"\noutput = \"out\"\n[run]\nretention_hours = 0\n",
    );
    write_parquet(
        &p.events().join("a.parquet"),
        &[events_batch(&[Ev::track("a", T0)])],
    );
    p.run_json();
    // Files put into a table's folder after Tessera made it: a note, a copy of a data file
    // under another name, a folder of the user's.
    let theirs = [
        p.path().join("out/profiles/README.txt"),
        p.path().join("out/profiles/export-copy.parquet"),
        p.path().join("out/profiles/mine/part-00000-x.parquet"),
    ];
    for file in &theirs {
        std::fs::create_dir_all(file.parent().unwrap()).unwrap();
        std::fs::write(file, b"user data").unwrap();
    }
    write_parquet(
        &p.events().join("b.parquet"),
        &[events_batch(&[Ev::track("b", T0)])],
    );
    let report = p.run_json();
    assert_eq!(report["status"], "succeeded", "{report}");
    for file in &theirs {
        assert!(file.exists(), "{} was deleted", file.display());
    }
    // Tessera's own replaced files are still cleaned up (retention 0): one data file left
    // per table version in use.
    let data_files = std::fs::read_dir(p.path().join("out/profiles"))
        .unwrap()
        .filter(|e| {
            let name = e
                .as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .into_owned();
            name.starts_with("part-") && name.ends_with(".parquet")
        })
        .count();
    assert_eq!(data_files, 1);
}
