//! The run's limits hold: a segment larger than the memory limit fails with the memory error
//! naming it (no panic, no growth past the limit), and a query that never ends is stopped at
//! `run.query_timeout`, letting the lease go and publishing nothing.

use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::array::{ArrayRef, RecordBatch, StringArray, TimestampMicrosecondArray};
use arrow::datatypes::{DataType, Field, Schema, TimeUnit};

use crate::common::*;
use crate::reliability::fingerprints;

/// `n` valid track events, one anonymous visitor per ten events.
fn many_events(n: usize) -> RecordBatch {
    let text = |f: &dyn Fn(usize) -> String| {
        Arc::new(StringArray::from((0..n).map(f).collect::<Vec<_>>())) as ArrayRef
    };
    let time = |offset: i64| {
        Arc::new(
            TimestampMicrosecondArray::from(
                (0..n)
                    .map(|i| 1_780_000_000_000_000 + i as i64 * 1_000_000 + offset)
                    .collect::<Vec<_>>(),
            )
            .with_timezone("UTC"),
        ) as ArrayRef
    };
    let ts = DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()));
    let schema = Arc::new(Schema::new(vec![
        Field::new("message_id", DataType::Utf8, true),
        Field::new("type", DataType::Utf8, true),
        Field::new("event", DataType::Utf8, true),
        Field::new("anonymous_id", DataType::Utf8, true),
        Field::new("timestamp", ts.clone(), true),
        Field::new("received_at", ts, true),
    ]));
    RecordBatch::try_new(
        schema,
        vec![
            text(&|i| format!("message-{i:06}")),
            text(&|_| "track".into()),
            text(&|_| "Product Viewed".into()),
            text(&|i| format!("visitor-{:05}", i / 10)),
            time(0),
            time(1_000_000),
        ],
    )
    .unwrap()
}

/// A project of `events` events whose one segment is `sql`, with `run` added to `[run]`.
fn project_with_segment(events: usize, sql: &str, run: &str) -> TempProject {
    let p = TempProject::new(&format!(
        "[storage]\nevents = \"data/events\"\noutput = \"out\"\n[run]\n{run}"
    ));
    write_parquet(&p.events().join("part-0.parquet"), &[many_events(events)]);
    let segments = p.path().join("queries/segments");
    std::fs::create_dir_all(&segments).unwrap();
    std::fs::write(segments.join("everyone_twice.sql"), sql).unwrap();
    p
}

/// Every pair of events is a member: `events`² rows of about 30 bytes of id each.
const PAIRS: &str =
    "SELECT a.message_id || '/' || b.message_id AS profile_id FROM events a CROSS JOIN events b";

/// Runs `cmd` and returns its output and its peak resident memory in bytes, read from
/// `/proc` while it runs (0 where there is no `/proc`).
fn run_measured(cmd: &mut std::process::Command) -> (std::process::Output, u64) {
    use std::io::Read;
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let drain = |mut from: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            from.read_to_end(&mut bytes).unwrap();
            bytes
        })
    };
    let out = drain(Box::new(child.stdout.take().unwrap()));
    let err = drain(Box::new(child.stderr.take().unwrap()));
    let status_file = format!("/proc/{}/status", child.id());
    let mut peak = 0;
    let status = loop {
        if let Ok(text) = std::fs::read_to_string(&status_file) {
            if let Some(kb) = text
                .lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
            {
                peak = peak.max(kb * 1024);
            }
        }
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let output = std::process::Output {
        status,
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
    };
    (output, peak)
}

/// The tables (all but `runs`) published at the project's output.
fn published(p: &TempProject) -> Vec<String> {
    fingerprints(p.path().join("out").to_str().unwrap())
        .into_keys()
        .collect()
}

#[test]
fn a_segment_larger_than_the_memory_limit_fails_naming_it_and_fits_under_a_roomy_limit() {
    // 1,500 events: 2.25M members, some 70 MB of ids before any set or change row.
    let p = project_with_segment(1_500, PAIRS, "");
    let t0 = Instant::now();
    let (out, peak) = run_measured(&mut p.cmd(&["run", "--quiet", "--memory-limit", "64MiB"]));
    let text = stderr(&out);
    eprintln!(
        "2.25M-row segment under 64MiB: exit {:?} in {:?}, peak RSS {} MiB",
        out.status.code(),
        t0.elapsed(),
        peak >> 20
    );
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(!text.contains("panicked"), "{text}");
    for part in [
        "segment `everyone_twice` (queries/segments/everyone_twice.sql)",
        "out of memory under the limit of 64MiB",
        "--memory-limit",
        "run.memory_limit",
        "narrow the segment",
    ] {
        assert!(text.contains(part), "`{part}` missing from: {text}");
    }
    // Nothing but the failed run's row was published.
    assert_eq!(published(&p), Vec::<String>::new());

    // Under a roomy limit the same segment is written whole, with a change row per member.
    let out = run(&mut p.cmd(&["run", "--quiet", "--memory-limit", "4GiB"]));
    assert!(out.status.success(), "{}", stderr(&out));
    let rows = p.query(
        "SELECT (SELECT count(*) FROM segments.everyone_twice) AS members, \
                (SELECT count(*) FROM segment_changes WHERE change = 'entered') AS entered",
    );
    assert_eq!(rows[0]["members"].as_u64(), Some(1_500 * 1_500));
    assert_eq!(rows[0]["entered"].as_u64(), Some(1_500 * 1_500));
}

#[test]
fn a_segment_of_tens_of_millions_of_rows_fails_fast_under_a_small_limit() {
    // 5,000 events: 25M members. Held unchecked, they and their sets took gigabytes.
    let p = project_with_segment(5_000, PAIRS, "");
    let t0 = Instant::now();
    let (out, peak) = run_measured(&mut p.cmd(&["run", "--quiet", "--memory-limit", "64MiB"]));
    let text = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(!text.contains("panicked"), "{text}");
    assert!(
        text.contains("segment `everyone_twice`") && text.contains("out of memory"),
        "{text}"
    );
    eprintln!(
        "25M-row segment under 64MiB: failed in {:?}, peak RSS {} MiB",
        t0.elapsed(),
        peak >> 20
    );
    assert!(peak < 1 << 30, "peak RSS {} MiB", peak >> 20);
}

/// A segment that never ends: the recursion has no stop condition.
const ENDLESS: &str = "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r) \
                       SELECT CAST(n AS VARCHAR) AS profile_id FROM r";

#[test]
fn a_query_that_never_ends_is_stopped_at_the_time_limit_and_the_next_run_starts_at_once() {
    let p = project_with_segment(200, ENDLESS, "query_timeout = \"5s\"\n");
    let t0 = Instant::now();
    let out = run(&mut p.cmd(&["run", "--quiet"]));
    let took = t0.elapsed();
    let text = stderr(&out);
    eprintln!(
        "endless segment: exit {:?} after {took:?}",
        out.status.code()
    );
    assert_eq!(out.status.code(), Some(1), "{text}");
    for part in [
        "queries/segments/everyone_twice.sql",
        "5s (run.query_timeout)",
        "raise run.query_timeout",
    ] {
        assert!(text.contains(part), "`{part}` missing from: {text}");
    }
    // The stages before it take a few seconds in a debug build; the segment itself 5 s.
    assert!(took < Duration::from_secs(5 + 25), "took {took:?}");

    // The lease was let go, and only the failed run's row was published.
    let lease: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(p.path().join("out/_state/lease")).unwrap())
            .unwrap();
    assert_eq!(lease["released"], true, "{lease}");
    assert_eq!(published(&p), Vec::<String>::new());
    let runs = p.query("SELECT status, error FROM runs");
    assert_eq!(runs.len(), 1);
    assert_eq!(runs[0]["status"], "failed");
    assert!(
        runs[0]["error"]
            .as_str()
            .unwrap()
            .contains("queries/segments/everyone_twice.sql"),
        "{runs:?}"
    );

    // Fixed, the next run starts at once and publishes.
    std::fs::write(
        p.path().join("queries/segments/everyone_twice.sql"),
        "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r WHERE n < 3) \
         SELECT CAST(n AS VARCHAR) AS profile_id FROM r",
    )
    .unwrap();
    let out = run(&mut p.cmd(&["run", "--quiet"]));
    assert!(out.status.success(), "{}", stderr(&out));
    let members = p.query("SELECT count(*) AS n FROM segments.everyone_twice");
    assert_eq!(members[0]["n"].as_u64(), Some(3));
}

#[test]
fn query_timeouts_out_of_bounds_are_refused_naming_the_key() {
    let p = TempProject::local();
    for bad in [
        "0",
        "0s",
        "-5m",
        "soon",
        "1.5h",
        "",
        "8d",
        "10000h",
        "99999999999999999999s",
    ] {
        std::fs::write(
            p.path().join("tessera.toml"),
            format!("[storage]\nevents = \"data/events\"\noutput = \"out\"\n[run]\nquery_timeout = \"{bad}\"\n"),
        )
        .unwrap();
        let out = run(&mut p.cmd(&["run", "--quiet"]));
        let text = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{bad}: {text}");
        assert!(
            text.contains("run.query_timeout")
                && text.contains("at most 7 days")
                && !text.contains("panicked"),
            "{bad}: {text}"
        );
    }
    // The bounds themselves are accepted.
    std::fs::create_dir_all(p.events()).unwrap();
    for good in ["1s", "168h", "600", "45 min"] {
        std::fs::write(
            p.path().join("tessera.toml"),
            format!("[storage]\nevents = \"data/events\"\noutput = \"out\"\n[run]\nquery_timeout = \"{good}\"\n"),
        )
        .unwrap();
        let out = run(&mut p.cmd(&["status", "--json"]));
        assert!(out.status.success(), "{good}: {}", stderr(&out));
    }
    // A number, not a string, is refused by type, naming the key too.
    std::fs::write(
        p.path().join("tessera.toml"),
        "[storage]\nevents = \"data/events\"\noutput = \"out\"\n[run]\nquery_timeout = 30\n",
    )
    .unwrap();
    let text = stderr(&run(&mut p.cmd(&["run", "--quiet"])));
    assert!(text.contains("run.query_timeout"), "{text}");
    // The command line's override is checked the same way.
    std::fs::write(
        p.path().join("tessera.toml"),
        "[storage]\nevents = \"data/events\"\noutput = \"out\"\n",
    )
    .unwrap();
    let out = run(&mut p.cmd(&["run", "--quiet", "--query-timeout", "0"]));
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("--query-timeout"), "{}", stderr(&out));
}

#[test]
fn identity_trait_and_report_files_that_never_end_are_stopped_naming_the_file() {
    for (kind, sql) in [
        (
            "identity",
            "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r) \
             SELECT CAST(n AS VARCHAR) AS anonymous_id FROM r",
        ),
        (
            "traits",
            "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r) \
             SELECT profile_id, max(n) AS deepest FROM profiles CROSS JOIN r GROUP BY profile_id",
        ),
        ("reports", ENDLESS),
    ] {
        let p = project_with_segment(50, "SELECT profile_id FROM profiles", "");
        let dir = p.path().join("queries").join(kind);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("forever.sql"), sql).unwrap();
        let t0 = Instant::now();
        let out = run(&mut p.cmd(&["run", "--quiet", "--query-timeout", "3s"]));
        let took = t0.elapsed();
        let text = stderr(&out);
        assert_eq!(out.status.code(), Some(1), "{kind}: {text}");
        assert!(
            text.contains(&format!("queries/{kind}/forever.sql")) && text.contains("after 3s"),
            "{kind}: {text}"
        );
        assert!(took < Duration::from_secs(3 + 25), "{kind}: took {took:?}");
        assert_eq!(published(&p), Vec::<String>::new(), "{kind}");
    }
}
