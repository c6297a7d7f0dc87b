//! `tessera validate` plans every SQL file against the schemas a run would give it, and data
//! tests (`queries/tests/*.sql`, `[[tests]]`, the identity audits) run before the publish.

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
    let out = run(&mut p.cmd(&["validate", "--quiet"]));
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(2), "{text}");
    assert!(
        text.contains("queries/traits/buyers.sql:5:7: ")
            && text.contains("Did you mean 'events.event'?"),
        "{text}"
    );
    assert!(
        text.contains("queries/segments/loyal.sql:2:6: reads segments.viewer, which no file in queries/segments/ defines; did you mean segments.viewers?"),
        "{text}"
    );
    assert!(text.contains("2 errors"), "{text}");

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
