//! Against the real S3 server: the same run as locally, and credentials that never leak.

use crate::common::*;
use crate::readers::{assert_plain_types, read_with_python};

/// Rows of a table as sorted text, with the run-specific and location-specific parts removed.
fn table_text(p: &TempProject, sql: &str) -> String {
    let rows = p.query(sql);
    let mut lines: Vec<String> = rows.iter().map(|r| r.to_string()).collect();
    lines.sort();
    lines.join("\n")
}

#[test]
fn a_run_on_s3_gives_the_same_tables_as_a_local_run() {
    if !s3_available("a_run_on_s3_gives_the_same_tables_as_a_local_run") {
        return;
    }
    let local = TempProject::local();
    generate(&local.path().join("data"), 150, 4, 21);
    // A corrupt file on both sides: it must be skipped the same way.
    std::fs::write(local.events().join("broken.parquet"), b"PAR1 not really").unwrap();

    let prefix = s3_prefix();
    let remote = TempProject::new(&format!(
        "[storage]\nevents = \"{prefix}/data/events\"\noutput = \"{prefix}/out\"\n"
    ));
    ok(run(tessera().args([
        "generate",
        "--out",
        &format!("{prefix}/data"),
        "--people",
        "150",
        "--days",
        "4",
        "--seed",
        "21",
        "--quiet",
    ])));
    upload(
        &local.events().join("broken.parquet"),
        &format!("{prefix}/data/events/broken.parquet"),
    );

    let a = local.run_json();
    let b = remote.run_json();
    // A second run finds no new files: nothing to do. A full one reads the previous graph
    // back for stable ids: nothing merges.
    assert_eq!(remote.run_json()["status"], "unchanged");
    let c = serde_json::from_str::<serde_json::Value>(
        ok(run(&mut remote.cmd(&["run", "--full", "--json", "--quiet"]))).trim(),
    )
    .unwrap();
    assert_eq!(c["identity"]["profiles_merged"], 0);
    assert_eq!(c["identity"], b["identity"]);
    assert_eq!(b["identity"]["profiles_merged"], 0);
    assert_eq!(b["identity"], a["identity"]);
    for key in ["rows_read", "rows_rejected", "rows_duplicate", "events"] {
        assert_eq!(a[key], b[key], "{key}");
    }
    assert_eq!(a["skipped_files"].as_array().unwrap().len(), 1);
    assert_eq!(
        a["skipped_files"][0]["reason"], b["skipped_files"][0]["reason"],
        "the same reason on both stores"
    );
    assert!(b["input_files"][0].as_str().unwrap().starts_with(&prefix));

    let rejected = "SELECT message_id, type, event, anonymous_id, user_id, \"timestamp\", received_at, traits, properties, context, \"date\", reason, \
                    regexp_replace(source_file, '^.*/data/events/', '') AS file FROM rejected_events";
    assert_eq!(table_text(&local, rejected), table_text(&remote, rejected));
    let events = "SELECT * FROM events";
    assert_eq!(table_text(&local, events), table_text(&remote, events));
    let graph = "SELECT * FROM identity_graph";
    assert_eq!(table_text(&local, graph), table_text(&remote, graph));
    let links = "SELECT * FROM identity_links";
    assert_eq!(table_text(&local, links), table_text(&remote, links));
    let conflicts = "SELECT * FROM identity_conflicts";
    assert_eq!(
        table_text(&local, conflicts),
        table_text(&remote, conflicts)
    );
    let runs = "SELECT status, rows_read, rows_rejected, rows_duplicate, events, input_files, skipped_files, profiles FROM runs ORDER BY started_at DESC LIMIT 1";
    assert_eq!(table_text(&local, runs), table_text(&remote, runs));

    if let Some(python) = python("a_run_on_s3_gives_the_same_tables_as_a_local_run") {
        let seen = read_with_python(
            &python,
            &format!("{prefix}/out"),
            &["rejected_events", "runs"],
        );
        assert_plain_types(
            &seen,
            "rejected_events",
            &["message_id", "reason", "source_file"],
            &["timestamp"],
        );
        assert_eq!(seen["rejected_events"]["rows"], b["rows_rejected"]);
        assert_eq!(
            seen["runs"]["rows"], 2,
            "the full run and the one before; not the no-op"
        );
    }
}

/// Puts a local file into the test bucket through tessera's own storage layer.
fn upload(from: &std::path::Path, to: &str) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        use object_store::ObjectStoreExt;
        let (dir, name) = to.rsplit_once('/').unwrap();
        let place = tessera::storage::Place::open(dir, std::path::Path::new("/"), "test").unwrap();
        let bytes = std::fs::read(from).unwrap();
        place
            .store
            .put(&place.child(name), bytes.into())
            .await
            .unwrap();
    });
}

#[test]
fn the_secret_key_never_appears_in_logs_or_errors() {
    if !s3_available("the_secret_key_never_appears_in_logs_or_errors") {
        return;
    }
    let secret = std::env::var("AWS_SECRET_ACCESS_KEY").unwrap();
    assert!(secret.len() >= 16);
    let prefix = s3_prefix();
    ok(run(tessera().args([
        "generate",
        "--out",
        &format!("{prefix}/data"),
        "--people",
        "40",
        "--days",
        "2",
        "--quiet",
    ])));
    let p = TempProject::new(&format!(
        "[storage]\nevents = \"{prefix}/data/events\"\noutput = \"{prefix}/out\"\n"
    ));
    // A successful run and a query, with every log line on.
    for args in [
        vec!["run", "-vv"],
        vec!["query", "SELECT count(*) FROM runs"],
        vec!["validate"],
    ] {
        let out = run(p.cmd(&args).env("RUST_LOG", "trace"));
        let all = format!("{}{}", stdout(&out), stderr(&out));
        assert!(out.status.success(), "{args:?}: {}", stderr(&out));
        assert!(all.len() > 1000, "trace logging is on: {} bytes", all.len());
        assert!(!all.contains(&secret), "{args:?} printed the secret");
    }
    // A run refused by the server (wrong key) fails with an error that does not echo secrets.
    let wrong = format!("{secret}-wrong");
    let out = run(p
        .cmd(&["run"])
        .env("RUST_LOG", "trace")
        .env("AWS_SECRET_ACCESS_KEY", &wrong));
    assert!(!out.status.success());
    let all = format!("{}{}", stdout(&out), stderr(&out));
    assert!(all.contains("error"), "{all}");
    assert!(
        !all.contains(&wrong) && !all.contains(&secret),
        "the failed run printed a secret"
    );
}
