//! `tessera validate` plans every SQL file against the schemas a run would give it, and data
//! tests (`queries/tests/*.sql`, `[[tests]]`, the identity audits) run before the publish.

use std::collections::BTreeMap;

use crate::common::*;

fn person(id: &'static str, user: &'static str, day: i64) -> Ev {
    Ev {
        anonymous_id: Some(user),
        ..Ev::track(id, 1_790_000_000_000_000 + day * 86_400_000_000).with_user(user)
    }
}

fn write(p: &TempProject, file: &str, sql: &str) {
    let path = p.path().join(file);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, sql).unwrap();
}

/// A project with two people, one trait and one segment over it.
fn project() -> TempProject {
    let p = TempProject::local();
    write_parquet(
        &p.events().join("day1.parquet"),
        &[events_batch(&[
            person("m1", "u1", 0),
            person("m2", "u2", 0),
            person("m3", "u2", 1),
        ])],
    );
    write(
        &p,
        "queries/traits/views.sql",
        "SELECT profile_id, count(*) AS view_count\nFROM events\nGROUP BY profile_id\n",
    );
    write(
        &p,
        "queries/segments/viewers.sql",
        "SELECT profile_id FROM profiles WHERE view_count > 0\n",
    );
    p
}

#[test]
fn validate_finds_misspelt_columns_and_missing_segments_with_their_place() {
    let p = project();
    // Before any run: a trait's misspelt event column, and a segment reading a segment no file
    // defines, are found (the segment over `profiles` waits for the first run's schema).
    write(
        &p,
        "queries/traits/buyers.sql",
        "-- who bought\nSELECT profile_id,\n       count(*) AS orders\nFROM events\nWHERE evnt = 'Order Completed'\nGROUP BY profile_id\n",
    );
    write(
        &p,
        "queries/segments/loyal.sql",
        "SELECT profile_id\nFROM segments.viewer\n",
    );
    write(
        &p,
        "queries/tests/known_users.sql",
        "SELECT message_id\nFROM events\nWHERE usr_id IS NULL\n",
    );
    let out = run(&mut p.cmd(&["validate", "--quiet"]));
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(2), "{text}");
    assert!(
        text.contains("queries/tests/known_users.sql:3:7: ")
            && text.contains("Did you mean 'events.user_id'?"),
        "{text}"
    );
    assert!(
        text.contains("queries/traits/buyers.sql:5:7: ")
            && text.contains("Did you mean 'events.event'?"),
        "{text}"
    );
    assert!(
        text.contains("queries/segments/loyal.sql:2:6: reads segments.viewer, which no file in queries/segments/ defines; did you mean segments.viewers?"),
        "{text}"
    );
    assert!(text.contains("3 errors"), "{text}");
    std::fs::remove_file(p.path().join("queries/tests/known_users.sql")).unwrap();

    // After a run: a segment's misspelt profile column (a trait's column) is found.
    std::fs::remove_file(p.path().join("queries/traits/buyers.sql")).unwrap();
    std::fs::remove_file(p.path().join("queries/segments/loyal.sql")).unwrap();
    p.run_json();
    assert_eq!(
        run(&mut p.cmd(&["validate", "--quiet"])).status.code(),
        Some(0)
    );
    write(
        &p,
        "queries/segments/viewers.sql",
        "SELECT profile_id\nFROM profiles\nWHERE veiw_count > 0\n",
    );
    let out = run(&mut p.cmd(&["validate", "--quiet"]));
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(2), "{text}");
    assert!(
        text.contains("queries/segments/viewers.sql:3:7: ")
            && text.contains("Did you mean 'profiles.view_count'?"),
        "{text}"
    );
}

/// A run report's data tests: name → (failing rows, carried over).
fn data_tests(report: &serde_json::Value) -> BTreeMap<String, (i64, bool)> {
    report["data_tests"]
        .as_array()
        .unwrap_or_else(|| panic!("no data_tests in {report}"))
        .iter()
        .map(|o| {
            (
                o["name"].as_str().unwrap().to_string(),
                (
                    o["failing_rows"].as_i64().unwrap(),
                    o["carried"].as_bool().unwrap_or(false),
                ),
            )
        })
        .collect()
}

#[test]
fn an_error_data_test_blocks_the_publish_and_a_warn_test_is_reported() {
    let p = TempProject::new(
        r#"[storage]
events = "data/events"
output = "out"

[[tests]]
table = "events"
column = "user_id"
accepted_values = ["u1"]
severity = "warn"

[[tests]]
table = "segments.viewers"
column = "profile_id"
unique = true
relationships = { to = "profiles", field = "profile_id" }

[audits]
max_profile_size = 1
severity = "warn"
"#,
    );
    write_parquet(
        &p.events().join("day1.parquet"),
        &[events_batch(&[
            person("m1", "u1", 0),
            person("m2", "u2", 0),
            person("m3", "u2", 1),
        ])],
    );
    write(
        &p,
        "queries/traits/views.sql",
        "SELECT profile_id, count(*) AS view_count\nFROM events\nGROUP BY profile_id\n",
    );
    write(
        &p,
        "queries/segments/viewers.sql",
        "SELECT profile_id FROM profiles WHERE view_count > 0\n",
    );
    let views = |p: &TempProject| -> Vec<(String, i64)> {
        p.query("SELECT user_ids[1] AS user, view_count FROM profiles ORDER BY user")
            .iter()
            .map(|r| {
                (
                    r["user"].as_str().unwrap().to_string(),
                    r["view_count"].as_i64().unwrap(),
                )
            })
            .collect()
    };
    let first = p.run_json();
    assert_eq!(first["status"], "succeeded");
    let outcome = |report: &serde_json::Value, name: &str| -> i64 {
        data_tests(report)
            .into_iter()
            .find(|(test, _)| test.starts_with(name))
            .unwrap_or_else(|| panic!("{name} in {report}"))
            .1
             .0
    };
    // u2 breaks accepted_values; each profile holds a user id and a device id (2 > 1).
    assert_eq!(
        outcome(&first, "tests[0] events.user_id accepted_values"),
        1,
        "{first}"
    );
    assert_eq!(
        outcome(&first, "tests[1] segments.viewers.profile_id unique"),
        0
    );
    assert_eq!(
        outcome(&first, "tests[1] segments.viewers.profile_id relationships"),
        0
    );
    assert_eq!(
        outcome(&first, "audit: at most 1 identifiers"),
        2,
        "{first}"
    );
    let before = views(&p);
    assert_eq!(before, vec![("u1".into(), 1), ("u2".into(), 2)]);

    // An `error` test that u2 (two views) breaks, and a new event for u1.
    write(
        &p,
        "queries/tests/one_view_each.sql",
        "-- every profile viewed at most once\nSELECT profile_id, view_count FROM profiles WHERE view_count > 1\n",
    );
    write_parquet(
        &p.events().join("day2.parquet"),
        &[events_batch(&[person("m4", "u1", 2)])],
    );
    let out = run(&mut p.cmd(&["run", "--quiet"]));
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    let message = stderr(&out);
    assert!(message.contains("published nothing"), "{message}");
    assert!(
        message.contains("queries/tests/one_view_each.sql (error): 2 rows break it; first: {"),
        "{message}"
    );
    assert!(message.contains("\"view_count\":2"), "{message}");
    assert_eq!(views(&p), before, "the published profiles are unchanged");

    // As a warning it is reported and the run publishes.
    write(
        &p,
        "queries/tests/one_view_each.sql",
        "-- severity: warn\nSELECT profile_id, view_count FROM profiles WHERE view_count > 1\n",
    );
    let report = p.run_json();
    assert_eq!(report["status"], "succeeded", "{report}");
    assert_eq!(
        outcome(&report, "queries/tests/one_view_each.sql"),
        2,
        "{report}"
    );
    assert_eq!(views(&p), vec![("u1".into(), 2), ("u2".into(), 2)]);
    let text = ok(run(&mut p.cmd(&["run", "--quiet"])));
    assert!(
        text.contains("test    queries/tests/one_view_each.sql (warn): 2 rows break it"),
        "{text}"
    );
}

#[test]
fn sql_over_runs_reads_it_empty_on_a_projects_first_run() {
    // `runs` is written at the end of a run, so the first run's SQL finds no table yet.
    let p = project();
    write(
        &p,
        "queries/tests/no_failed_runs.sql",
        "SELECT run_id, error FROM runs WHERE status = 'failed'\n",
    );
    write(
        &p,
        "queries/reports/earlier_runs.sql",
        "SELECT count(*) AS runs FROM runs\n",
    );
    let first = p.run_json();
    assert_eq!(first["status"], "succeeded", "{first}");
    let name = "queries/tests/no_failed_runs.sql".to_string();
    assert_eq!(data_tests(&first).get(&name), Some(&(0, false)), "{first}");
    assert_eq!(
        p.query("SELECT runs FROM reports.earlier_runs")[0]["runs"],
        0
    );
    // The run published `runs`; the next run's test reads it, and still finds no failed run.
    assert_eq!(p.query("SELECT count(*) AS n FROM runs")[0]["n"], 1);
    let text = ok(run(&mut p.cmd(&["run", "--full", "--json", "--quiet"])));
    let second: serde_json::Value = serde_json::from_str(text.trim()).unwrap();
    assert_eq!(second["status"], "succeeded", "{second}");
    assert_eq!(
        data_tests(&second).get(&name),
        Some(&(0, false)),
        "{second}"
    );
}

#[test]
fn a_run_with_nothing_to_recompute_runs_only_the_tests_whose_inputs_changed() {
    let p = TempProject::new(
        r#"[storage]
events = "data/events"
output = "out"

[[tests]]
table = "profiles"
column = "profile_id"
unique = true
"#,
    );
    write_parquet(
        &p.events().join("day1.parquet"),
        &[events_batch(&[
            person("m1", "u1", 0),
            person("m2", "u2", 0),
        ])],
    );
    // Fails (as a warning) once there are fewer than two profiles.
    write(
        &p,
        "queries/tests/two_profiles.sql",
        "-- severity: warn\nSELECT count(*) AS profiles FROM profiles HAVING count(*) <> 2\n",
    );
    let outcomes = |report: &serde_json::Value| -> BTreeMap<String, (i64, bool)> {
        let mut all = data_tests(report);
        // The test over `runs` (from the second run on) is never carried over.
        let over_runs = all.remove("queries/tests/no_failed_runs.sql");
        assert!(matches!(over_runs, None | Some((0, false))), "{report}");
        all
    };
    let unique = "tests[0] profiles.profile_id unique".to_string();
    // The default identity rules' audit (one user_id per profile) reads the tables too.
    let audit = "audit: at most 1 user_id per profile".to_string();
    let two = "queries/tests/two_profiles.sql".to_string();
    let first = p.run_json();
    assert_eq!(first["status"], "succeeded", "{first}");
    // Reads `runs`, which a failed run changes without publishing: it runs every time.
    write(
        &p,
        "queries/tests/no_failed_runs.sql",
        "-- severity: warn\nSELECT run_id FROM runs WHERE status = 'failed'\n",
    );
    assert_eq!(
        outcomes(&first),
        BTreeMap::from([
            (unique.clone(), (0, false)),
            (audit.clone(), (0, false)),
            (two.clone(), (0, false))
        ])
    );

    // Nothing new: both passed over the same tables, so neither runs again.
    let second = p.run_json();
    assert_eq!(second["status"], "unchanged", "{second}");
    assert!(
        second["data_tests"]
            .as_array()
            .unwrap()
            .iter()
            .any(|o| o["name"] == "queries/tests/no_failed_runs.sql"),
        "{second}"
    );
    assert_eq!(
        outcomes(&second),
        BTreeMap::from([
            (unique.clone(), (0, true)),
            (audit.clone(), (0, true)),
            (two.clone(), (0, true))
        ])
    );

    // A forget request rewrites the tables without a run: every test runs again, and the
    // count test finds its row (carried over, it would still pass). Until a run publishes,
    // every test keeps running.
    ok(run(&mut p.cmd(&["forget", "user_id:u2"])));
    for _ in 0..2 {
        let after = p.run_json();
        assert_eq!(after["status"], "unchanged", "{after}");
        assert_eq!(
            outcomes(&after),
            BTreeMap::from([
                (unique.clone(), (0, false)),
                (audit.clone(), (0, false)),
                (two.clone(), (1, false))
            ])
        );
    }

    // A new person: the run publishes, every test runs, and the count passes again.
    write_parquet(
        &p.events().join("day2.parquet"),
        &[events_batch(&[person("m3", "u3", 1)])],
    );
    let published = p.run_json();
    assert_eq!(published["status"], "succeeded", "{published}");
    assert_eq!(
        outcomes(&published),
        BTreeMap::from([
            (unique.clone(), (0, false)),
            (audit.clone(), (0, false)),
            (two.clone(), (0, false))
        ])
    );

    // A changed test runs again; the others are carried over.
    write(
        &p,
        "queries/tests/two_profiles.sql",
        "-- severity: warn\nSELECT count(*) AS profiles FROM profiles HAVING count(*) < 2\n",
    );
    let changed = p.run_json();
    assert_eq!(changed["status"], "unchanged", "{changed}");
    assert_eq!(
        outcomes(&changed),
        BTreeMap::from([
            (unique.clone(), (0, true)),
            (audit.clone(), (0, true)),
            (two.clone(), (0, false))
        ])
    );
}
