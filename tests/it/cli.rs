//! The commands as a user runs them: run, query, validate, init, and their errors.

use std::path::Path;

use crate::common::*;

/// A copy of the bundled project (config, queries, sample events) in a temp folder.
fn bundled() -> TempProject {
    let p = TempProject::local();
    std::fs::copy(repo().join("tessera.toml"), p.path().join("tessera.toml")).unwrap();
    copy_dir(&repo().join("queries"), &p.path().join("queries"));
    copy_dir(&repo().join("data/events"), &p.path().join("data/events"));
    p
}

#[test]
fn the_bundled_project_runs_end_to_end() {
    let p = bundled();
    // At a fixed as-of, so that a second run has nothing to recompute.
    let run_at = |p: &TempProject| -> serde_json::Value {
        let text = ok(run(&mut p.cmd(&[
            "run",
            "--json",
            "--quiet",
            "--as-of",
            "2026-11-01",
        ])));
        serde_json::from_str(text.trim()).unwrap()
    };
    let report = run_at(&p);
    assert_eq!(report["status"], "succeeded");
    let read = report["rows_read"].as_u64().unwrap();
    let rejected = report["rows_rejected"].as_u64().unwrap();
    let duplicate = report["rows_duplicate"].as_u64().unwrap();
    let events = report["events"].as_u64().unwrap();
    assert!(read > 10_000 && rejected > 0 && duplicate > 0, "{report}");
    assert_eq!(
        read,
        rejected + duplicate + events,
        "every row is accounted for"
    );
    assert!(p.path().join("out/rejected_events/_delta_log").is_dir());
    assert!(p.path().join("out/runs/_delta_log").is_dir());

    let by_type = p.query("SELECT type, count(*) AS n FROM events GROUP BY type ORDER BY type");
    let total: u64 = by_type.iter().map(|r| r["n"].as_u64().unwrap()).sum();
    assert_eq!(total, events);
    let rejected_rows = p.query("SELECT count(*) AS n FROM rejected_events");
    assert_eq!(rejected_rows[0]["n"].as_u64().unwrap(), rejected);

    // A second run finds no new files and nothing else changed: it writes no table.
    let unchanged = run_at(&p);
    assert_eq!(unchanged["status"], "unchanged");
    assert_eq!(unchanged["tables"], serde_json::json!({}));
    // A full run appends to `runs` and replaces `rejected_events`.
    let again: serde_json::Value =
        serde_json::from_str(ok(run(&mut p.cmd(&["run", "--full", "--json", "--quiet"]))).trim())
            .unwrap();
    assert_eq!(again["events"], report["events"]);
    let runs = p.query("SELECT status, events FROM runs ORDER BY started_at");
    assert_eq!(runs.len(), 2);
    assert_eq!(
        p.query("SELECT count(*) AS n FROM rejected_events")[0]["n"]
            .as_u64()
            .unwrap(),
        rejected
    );
    assert_eq!(again["tables"]["rejected_events"]["version"], 1);
}

#[test]
fn human_output_summarises_the_run() {
    let p = bundled();
    let text = ok(run(&mut p.cmd(&["run", "--quiet"])));
    assert!(text.contains("succeeded"), "{text}");
    assert!(
        text.contains("rejected_events") && text.contains("rows written"),
        "{text}"
    );
}

#[test]
fn query_prints_table_csv_and_json() {
    let p = bundled();
    p.run_json();
    let sql = "SELECT type, count(*) AS n FROM events WHERE type = 'identify' GROUP BY type";
    let table = ok(run(&mut p.cmd(&["query", sql])));
    assert!(
        table.contains("| type ") && table.contains("| identify |"),
        "{table}"
    );
    let csv = ok(run(&mut p.cmd(&["query", sql, "--format", "csv"])));
    let mut lines = csv.lines();
    assert_eq!(lines.next(), Some("type,n"));
    assert!(lines.next().unwrap().starts_with("identify,"));
    let json = p.query(sql);
    assert_eq!(json[0]["type"], "identify");
    // --explain runs the query and prints the plan with what each operator did.
    let plan = ok(run(&mut p.cmd(&["query", sql, "--explain"])));
    assert!(plan.contains("AggregateExec"), "{plan}");
    // One group came out of the aggregation, from the events the scan read.
    assert!(
        plan.contains("AggregateExec: mode=FinalPartitioned")
            && plan.contains("metrics=[output_rows=1,"),
        "{plan}"
    );
    assert!(plan.contains("DeltaScanExec"), "{plan}");
    assert!(!plan.contains("| identify |"), "{plan}");
}

#[test]
fn queries_that_write_are_refused_with_the_statement_named() {
    let p = bundled();
    for sql in [
        "DROP TABLE events",
        "CREATE TABLE x AS SELECT 1",
        "INSERT INTO runs SELECT * FROM runs",
        "COPY (SELECT 1) TO '/tmp/tessera-copy.parquet'",
        "SET datafusion.execution.batch_size = 1",
    ] {
        let out = run(&mut p.cmd(&["query", sql, "--quiet"]));
        assert_eq!(out.status.code(), Some(2), "{sql}");
        let err = stderr(&out);
        let word = sql.split_whitespace().next().unwrap();
        assert!(
            err.contains("not allowed") && err.contains(word),
            "{sql}: {err}"
        );
    }
    assert!(!Path::new("/tmp/tessera-copy.parquet").exists());
}

#[test]
fn bad_config_errors_name_the_file_and_key_and_exit_2() {
    let p = TempProject::new("[storage]\nevents = \"data/events\"\n\n[[identity.identifiers]]\nname = \"email\"\nlimt = 3\n");
    let out = run(&mut p.cmd(&["run"]));
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(err.contains("tessera.toml"), "{err}");
    assert!(err.contains("identity.identifiers[0].limt"), "{err}");

    let missing = tempfile::tempdir().unwrap();
    let out = run(tessera().arg("--project").arg(missing.path()).arg("run"));
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("tessera init"), "{}", stderr(&out));

    let p = TempProject::new("[storage]\nevents = \"gs://bucket/x\"\n");
    let out = run(&mut p.cmd(&["run"]));
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("storage.events"), "{}", stderr(&out));
}

#[test]
fn json_mode_reports_errors_as_json() {
    let p = TempProject::new("[storage]\nevents = 3\n");
    let out = run(&mut p.cmd(&["run", "--json"]));
    assert_eq!(out.status.code(), Some(2));
    let body: serde_json::Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    assert_eq!(body["exit_code"], 2);
    assert!(body["error"].as_str().unwrap().contains("storage.events"));
}

#[test]
fn validate_checks_config_sql_and_files_without_writing() {
    let p = bundled();
    let out = ok(run(&mut p.cmd(&["validate"])));
    // The verdict is the last line; the sample's deliberately bad rows are noted above it.
    assert!(out.lines().last().unwrap().starts_with("ok:"), "{out}");
    assert!(out.contains("note: "), "{out}");
    assert!(!p.path().join("out").exists(), "validate writes nothing");

    std::fs::write(p.events().join("zz-broken.parquet"), b"nope").unwrap();
    let out = run(&mut p.cmd(&["validate"]));
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stdout(&out).contains("zz-broken.parquet"),
        "{}",
        stdout(&out)
    );

    std::fs::write(
        p.path().join("queries/identity/bad.sql"),
        "SELECT no_such_column AS email FROM events",
    )
    .unwrap();
    std::fs::write(
        p.path().join("queries/identity/write.sql"),
        "DELETE FROM events",
    )
    .unwrap();
    let out = run(&mut p.cmd(&["validate", "--json"]));
    assert_eq!(out.status.code(), Some(2));
    let findings: serde_json::Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    let errors: Vec<&str> = findings["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e.as_str().unwrap())
        .collect();
    assert_eq!(errors.len(), 2, "{errors:?}");
    assert!(
        errors[0].contains("queries/identity/bad.sql") && errors[0].contains("no_such_column"),
        "{errors:?}"
    );
    assert!(
        errors[1].contains("queries/identity/write.sql") && errors[1].contains("DELETE"),
        "{errors:?}"
    );
}

#[test]
fn init_makes_a_project_that_runs() {
    let parent = tempfile::tempdir().unwrap();
    let dir = parent.path().join("shop");
    ok(run(tessera().args([
        "init",
        dir.to_str().unwrap(),
        "--people",
        "100",
        "--quiet",
    ])));
    assert!(dir.join("tessera.toml").is_file());
    assert!(dir.join("queries/identity/events.sql").is_file());
    let out = ok(run(tessera()
        .arg("--project")
        .arg(&dir)
        .args(["run", "--json", "--quiet"])));
    let report: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert!(report["events"].as_u64().unwrap() > 100, "{report}");
    // A second init into the same folder refuses rather than overwrite.
    let again = run(tessera().args(["init", dir.to_str().unwrap(), "--quiet"]));
    assert_eq!(again.status.code(), Some(2));
}

#[test]
fn bench_measures_every_stage_of_both_engines_and_writes_csv_and_markdown() {
    let Some(python) = python("bench") else {
        return;
    };
    let p = bundled();
    let data = p.path().join("bench-data");
    let out = p.path().join("results");
    let text = ok(run(&mut p.cmd(&[
        "bench",
        "--sizes",
        "3k",
        "--data",
        data.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--duckdb",
        python.to_str().unwrap(),
        "--incremental",
        "--json",
        "--quiet",
    ])));
    let report: serde_json::Value = serde_json::from_str(text.trim()).unwrap();
    let rows = report["rows"].as_array().unwrap();
    let stages_of = |data: &str, engine: &str| -> Vec<String> {
        rows.iter()
            .filter(|r| r["engine"] == engine && r["data"] == data)
            .map(|r| r["stats"]["stage"].as_str().unwrap().to_string())
            .collect()
    };
    // Both data sets ran, each with every engine.
    for engine in ["floor", "tessera", "tessera incremental", "duckdb"] {
        assert_eq!(
            stages_of("friendly", engine),
            stages_of("adversarial", engine),
            "{engine}"
        );
    }
    let stages = |engine: &str| stages_of("friendly", engine);
    assert_eq!(stages("floor"), ["scan"]);
    for engine in ["tessera", "tessera incremental"] {
        let s = stages(engine);
        for stage in [
            "ingest",
            "events",
            "identity",
            "resolved_events",
            "profiles",
            "segments",
            "total",
        ] {
            assert!(
                s.iter().any(|x| x == stage),
                "{engine} lacks {stage}: {s:?}"
            );
        }
    }
    assert_eq!(
        stages("duckdb"),
        [
            "events",
            "identity",
            "resolved_events",
            "journeys",
            "profiles",
            "segments",
            "reports",
            "total"
        ]
    );
    assert!(
        report["failures"].as_array().unwrap().is_empty(),
        "{report}"
    );
    for r in rows {
        let s = &r["stats"];
        assert!(s["peak_rss_bytes"].as_u64().unwrap() > 0, "{r}");
    }
    // Both engines found about the same people in the same generated files.
    let events_of = |engine: &str| {
        rows.iter()
            .find(|r| r["engine"] == engine && r["stats"]["stage"] == "total")
            .map(|r| r["stats"]["rows"].as_u64().unwrap())
            .unwrap()
    };
    let (t, d) = (events_of("tessera"), events_of("duckdb"));
    assert!(t > 2_000 && t == d, "events: tessera {t}, duckdb {d}");
    // The incremental run added files: its ingest read fewer rows than the full run's.
    let ingest = |engine: &str| {
        rows.iter()
            .find(|r| r["engine"] == engine && r["stats"]["stage"] == "ingest")
            .map(|r| r["stats"]["rows"].as_u64().unwrap())
            .unwrap()
    };
    assert!(ingest("tessera incremental") < ingest("tessera"));
    let csv = std::fs::read_to_string(out.join("bench.csv")).unwrap();
    assert_eq!(csv.lines().count(), rows.len() + 1, "{csv}");
    let md = std::fs::read_to_string(out.join("bench.md")).unwrap();
    assert!(
        md.contains("| 3k (") && md.contains("DuckDB ÷ Tessera"),
        "{md}"
    );
    // The cache: a second bench finds the generated events and does not make them again.
    let cached = data.join("people-96-days-30/truth.parquet");
    let made = std::fs::metadata(&cached).unwrap().modified().unwrap();
    ok(run(&mut p.cmd(&[
        "bench",
        "--sizes",
        "3k",
        "--data",
        data.to_str().unwrap(),
        "--quiet",
    ])));
    assert_eq!(
        std::fs::metadata(&cached).unwrap().modified().unwrap(),
        made
    );
}

/// Profiles take first_seen, last_seen and event_count from the sessions; they must be the
/// events' own, counted here from the events themselves.
#[test]
fn profiles_are_first_and_last_seen_and_counted_as_their_events_are() {
    let p = bundled();
    p.run_json();
    let seen = p.query(
        "SELECT count(*) AS profiles, sum(event_count) AS events FROM profiles WHERE event_count > 0",
    );
    assert!(seen[0]["profiles"].as_u64().unwrap() > 1000, "{seen:?}");
    let differ = p.query(
        r#"SELECT p.profile_id, p.event_count, e.n, p.first_seen, e.first, p.last_seen, e.last
           FROM profiles p LEFT JOIN (
               SELECT profile_id, count(*) AS n, min("timestamp") AS first, max("timestamp") AS last
               FROM events WHERE profile_id IS NOT NULL GROUP BY profile_id
           ) e ON e.profile_id = p.profile_id
           WHERE (p.event_count <> coalesce(e.n, 0))
              OR (p.first_seen IS DISTINCT FROM e.first)
              OR (p.last_seen IS DISTINCT FROM e.last)
           LIMIT 5"#,
    );
    assert!(differ.is_empty(), "{differ:?}");
    let events = p.query("SELECT count(*) AS n FROM events WHERE profile_id IS NOT NULL");
    assert_eq!(seen[0]["events"], events[0]["n"]);
}

#[test]
fn events_get_the_same_profiles_whether_the_identity_query_is_plain_or_not() {
    let plain = bundled();
    let filtered = bundled();
    let file = filtered.path().join("queries/identity/events.sql");
    let sql = std::fs::read_to_string(&file).unwrap();
    // A WHERE that keeps every row makes the query more than a plain SELECT over events, so the
    // run matches events to profiles through the message_id mapping instead of re-evaluating
    // the identifier expressions on each event.
    std::fs::write(
        &file,
        format!("{}\nWHERE message_id IS NOT NULL\n", sql.trim_end()),
    )
    .unwrap();
    let (a, b) = (plain.run_json(), filtered.run_json());
    assert_eq!(
        a["events_without_profile"], b["events_without_profile"],
        "{a}\n{b}"
    );
    assert_eq!(a["identity"]["profiles"], b["identity"]["profiles"]);
    let q =
        "SELECT profile_id, event_count, first_seen, last_seen FROM profiles ORDER BY profile_id";
    let (pa, pb) = (plain.query(q), filtered.query(q));
    assert!(pa.len() > 1000, "{}", pa.len());
    assert_eq!(pa, pb);
}
