//! Identity by rounds of SQL (`run.cluster_identity_above`): a run with more links than the
//! limit must give the identity tables, and every event's profile, of a run under it, on data
//! where per-type limits and `max_links` refuse links.

use crate::common::*;

/// The bundled config and identity query over adversarial generated data (shared devices, a
/// kiosk over `max_links`, people with several user ids), with `run_keys` appended to the `[run]`
/// section and a scratch folder of the project's own.
pub fn adversarial_identity_project(people: u64, seed: u64, run_keys: &str) -> TempProject {
    let bundled = std::fs::read_to_string(repo().join("tessera.toml")).unwrap();
    let p = TempProject::new(&bundled);
    let scratch = p.path().join("scratch");
    let config = format!(
        "{bundled}\n[run]\nspill_dir = \"{}\"\n{run_keys}\n",
        scratch.display()
    );
    std::fs::write(p.path().join("tessera.toml"), config).unwrap();
    std::fs::create_dir_all(p.path().join("queries/identity")).unwrap();
    std::fs::copy(
        repo().join("queries/identity/events.sql"),
        p.path().join("queries/identity/events.sql"),
    )
    .unwrap();
    let data = p.path().join("data");
    ok(run(tessera()
        .args(["generate", "--out", data.to_str().unwrap(), "--quiet"])
        .args(["--people", &people.to_string(), "--days", "10"])
        .args(["--seed", &seed.to_string()])
        .args(["--preset", "adversarial", "--kiosk", "0.1"])));
    p
}

/// The identity tables and each event's profile, as sorted rows.
const IDENTITY_TABLES: [&str; 4] = [
    "SELECT identifier_type, identifier_value, profile_id, first_seen, last_seen FROM identity_graph ORDER BY 1, 2",
    "SELECT identifier_type, identifier_value, linked_type, linked_value, profile_id, seen_at FROM identity_links ORDER BY 1, 2, 3, 4",
    "SELECT identifier_type, identifier_value, other_type, other_value, reason, seen_at FROM identity_conflicts ORDER BY 1, 2, 3, 4, 5",
    "SELECT message_id, profile_id FROM events ORDER BY 1, 2",
];

/// Asserts that `a` and `b` hold the same identity tables and event profiles (each of
/// [`IDENTITY_TABLES`] non-trivial in `a`); `why` names what differs when they do not.
pub fn assert_same_identity(a: &TempProject, b: &TempProject, why: &str) {
    for sql in IDENTITY_TABLES {
        let (x, y) = (a.query(sql), b.query(sql));
        assert!(x.len() > 5, "{sql}: {}", x.len());
        assert!(x == y, "{sql}: {why}");
    }
}

/// The rounds' log line of a run (JSON logs on stderr), if it has one.
pub fn rounds_line(log: &str) -> Option<serde_json::Value> {
    log.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|l| {
            l["fields"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("connected components by SQL rounds"))
        })
}

#[test]
fn identity_by_sql_rounds_gives_the_union_finds_tables() {
    let under = adversarial_identity_project(400, 31, "");
    let over = adversarial_identity_project(400, 31, "cluster_identity_above = 50");
    under.run_json();
    let out = run(&mut over.cmd(&["run", "--json", "-v"]));
    let log = stderr(&out);
    ok(out);
    let line = rounds_line(&log).unwrap_or_else(|| panic!("the rounds did not run:\n{log}"));
    // More than one round: the components were not settled by the first.
    assert!(line["fields"]["rounds"].as_u64().unwrap() > 1, "{line}");
    assert!(line["fields"]["links"].as_u64().unwrap() > 50, "{line}");
    // Some groups were over a per-type limit and resolved link by link, most were not.
    let limited = line["fields"]["over_a_limit"].as_u64().unwrap();
    assert!(
        limited > 0 && limited < line["fields"]["identifiers"].as_u64().unwrap() / 2,
        "{line}"
    );
    assert_same_identity(
        &under,
        &over,
        "the rounds' run differs from the union-find's",
    );
    // Both kinds of refusal happened, so the rounds met both: a shared value dropped before
    // them, and profiles over a per-type limit resolved link by link after them.
    let reasons = over.query(
        "SELECT count(*) FILTER (WHERE reason = 'max_links exceeded') AS shared, \
                count(*) FILTER (WHERE reason LIKE 'limit:%') AS limited FROM identity_conflicts",
    );
    assert!(reasons[0]["shared"].as_u64().unwrap() > 0, "{reasons:?}");
    assert!(reasons[0]["limited"].as_u64().unwrap() > 0, "{reasons:?}");
}
