//! The run as a graph: edits to SQL files and config are applied by the next run without
//! `--full` and without new events, removed files are retired, a moved as-of recomputes only
//! time-dependent nodes, `plan` says exactly what `run` then recomputes, and built-in tables
//! nothing needs are not computed. Every result is compared with a fresh `--full` run of the
//! same project, read back through `tessera query`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use crate::common::*;

const AS_OF: &str = "2026-11-01";

/// The bundled project (config, queries and sample events) in a temporary folder.
fn bundled(extra_config: &str) -> TempProject {
    let config = std::fs::read_to_string(repo().join("tessera.toml")).unwrap();
    let p = TempProject::new(&format!("{config}\n{extra_config}"));
    copy_dir(&repo().join("queries"), &p.path().join("queries"));
    copy_dir(&repo().join("data/events"), &p.events());
    p
}

/// A copy of `p`'s config, queries and events with a fresh output, run with `--full`.
fn fresh_full(p: &TempProject, as_of: &str) -> TempProject {
    let config = std::fs::read_to_string(p.path().join("tessera.toml")).unwrap();
    let q = TempProject::new(&config);
    copy_dir(&p.path().join("queries"), &q.path().join("queries"));
    copy_dir(&p.events(), &q.events());
    ok(run(
        &mut q.cmd(&["run", "--full", "--quiet", "--as-of", as_of])
    ));
    q
}

fn run_at(p: &TempProject, as_of: &str) -> serde_json::Value {
    let text = ok(run(
        &mut p.cmd(&["run", "--json", "--quiet", "--as-of", as_of])
    ));
    serde_json::from_str(text.trim()).unwrap()
}

fn plan_at(p: &TempProject, as_of: &str) -> serde_json::Value {
    let text = ok(run(&mut p.cmd(&["plan", "--json", "--as-of", as_of])));
    serde_json::from_str(text.trim()).unwrap()
}

/// Node names with `action` in a run report's `nodes` or a plan's `steps`.
fn nodes_with(list: &serde_json::Value, action: &str) -> BTreeSet<String> {
    list.as_array()
        .unwrap()
        .iter()
        .filter(|s| s["action"] == action)
        .map(|s| s["node"].as_str().unwrap().to_string())
        .collect()
}

fn status(p: &TempProject) -> serde_json::Value {
    let text = ok(run(&mut p.cmd(&["status", "--json"])));
    serde_json::from_str(text.trim()).unwrap()
}

/// Published table → version, from `status`.
fn versions(p: &TempProject) -> BTreeMap<String, u64> {
    status(p)["tables"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_u64().unwrap()))
        .collect()
}

/// Every published output table's rows (sorted), by the name SQL reads it by; the logs
/// (`runs`, `segment_changes`) and Tessera's state left out.
fn snapshot(p: &TempProject) -> BTreeMap<String, Vec<String>> {
    let mut out = BTreeMap::new();
    for table in versions(p).keys() {
        if table.starts_with("_state/") || table == "runs" || table == "segment_changes" {
            continue;
        }
        let sql_name = table.replace('/', ".");
        // What names the run or the project folder differs between the two projects.
        let folder = p.path().display().to_string();
        let mut rows: Vec<String> = p
            .query(&format!("SELECT * FROM {sql_name}"))
            .into_iter()
            .map(|mut r| {
                if let Some(r) = r.as_object_mut() {
                    r.remove("run_id");
                }
                r.to_string().replace(&folder, "<project>")
            })
            .collect();
        rows.sort();
        out.insert(sql_name, rows);
    }
    out
}

fn assert_same_as_full(p: &TempProject, as_of: &str) {
    let full = fresh_full(p, as_of);
    let (mine, theirs) = (snapshot(p), snapshot(&full));
    assert_eq!(
        mine.keys().collect::<Vec<_>>(),
        theirs.keys().collect::<Vec<_>>(),
        "the same tables are published"
    );
    for (table, rows) in &mine {
        assert!(
            rows == &theirs[table],
            "{table} differs from a fresh --full run: {} rows against {}",
            rows.len(),
            theirs[table].len()
        );
    }
}

fn write(p: &TempProject, file: &str, text: &str) {
    std::fs::write(p.path().join(file), text).unwrap();
}

fn members(p: &TempProject, segment: &str) -> BTreeSet<String> {
    p.query(&format!("SELECT profile_id FROM segments.{segment}"))
        .iter()
        .map(|r| r["profile_id"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn edited_new_and_deleted_sql_files_are_applied_by_the_next_run() {
    let p = bundled("[run]\nretention_hours = 0\n");
    run_at(&p, AS_OF);
    let before = versions(&p);
    let champions = members(&p, "champions");
    assert!(!champions.is_empty(), "the fixture has champions");

    // An edited segment, trait and report; a new segment; a deleted segment.
    write(
        &p,
        "queries/segments/high_value.sql",
        "SELECT profile_id, revenue_total FROM profiles WHERE revenue_total >= 300\n",
    );
    let revenue = std::fs::read_to_string(p.path().join("queries/traits/revenue.sql")).unwrap();
    assert!(revenue.contains("max(json_get_float(properties, 'revenue')) AS order_value_max"));
    write(
        &p,
        "queries/traits/revenue.sql",
        &revenue.replace(
            "max(json_get_float(properties, 'revenue')) AS order_value_max",
            "round(max(json_get_float(properties, 'revenue'))) AS order_value_max",
        ),
    );
    write(
        &p,
        "queries/reports/checkout_funnel.sql",
        "SELECT event, count(*) AS n FROM events GROUP BY event ORDER BY event\n",
    );
    write(
        &p,
        "queries/segments/big_spenders.sql",
        "SELECT profile_id FROM profiles WHERE revenue_total > 500\n",
    );
    std::fs::remove_file(p.path().join("queries/segments/champions.sql")).unwrap();

    let plan = plan_at(&p, AS_OF);
    let planned = nodes_with(&plan["steps"], "recompute");
    let report = run_at(&p, AS_OF);
    assert_eq!(report["status"], "succeeded");
    let recomputed = nodes_with(&report["nodes"], "recompute");
    assert_eq!(
        planned, recomputed,
        "plan lists exactly what run recomputes"
    );
    for node in [
        "segments/high_value",
        "traits/revenue",
        "profiles",
        "reports/checkout_funnel",
        "segments/big_spenders",
    ] {
        assert!(
            recomputed.contains(node),
            "{node} recomputed: {recomputed:?}"
        );
    }
    for node in ["events", "identity", "sessions", "rfm", "predictions"] {
        assert!(!recomputed.contains(node), "{node} kept: {recomputed:?}");
    }
    assert_eq!(
        nodes_with(&report["nodes"], "retire"),
        BTreeSet::from(["segments/champions".to_string()])
    );
    let reasons = |node: &str| {
        report["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["node"] == node)
            .map(|s| s["reasons"].to_string())
            .unwrap_or_default()
    };
    assert!(reasons("segments/high_value").contains("queries/segments/high_value.sql changed"));
    assert!(reasons("segments/big_spenders").contains("new file"));
    assert!(reasons("segments/champions").contains("was removed"));

    // Kept nodes' tables are not rewritten; the new and edited ones are.
    let after = versions(&p);
    for table in ["identity_graph", "sessions", "rfm", "_state/events"] {
        assert_eq!(before[table], after[table], "{table} kept its version");
    }
    assert!(after["segments/high_value"] > before["segments/high_value"]);
    assert!(after.contains_key("segments/big_spenders"));

    // The deleted segment is retired: every member exited, and it is gone from query and
    // status (and, with a zero retention, from the output folder).
    assert!(!after.contains_key("segments/champions"));
    let last = report["run_id"].as_str().unwrap();
    let exits: BTreeSet<String> = p
        .query(&format!(
            "SELECT profile_id FROM segment_changes WHERE segment = 'champions' \
             AND change = 'exited' AND run_id = '{last}'"
        ))
        .iter()
        .map(|r| r["profile_id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        exits, champions,
        "every member of the deleted segment exited"
    );
    let out = run(&mut p.cmd(&["query", "SELECT * FROM segments.champions"]));
    assert!(!out.status.success(), "a retired segment is not queryable");
    assert!(
        !p.path().join("out/segments/champions/_delta_log").exists(),
        "a retired table's files are deleted once the retention has passed"
    );

    assert_same_as_full(&p, AS_OF);

    // Nothing changed since: nothing recomputed, nothing written.
    let again = run_at(&p, AS_OF);
    assert_eq!(again["status"], "unchanged");
    assert_eq!(versions(&p), after);
}

#[test]
fn a_changed_identifier_limit_re_resolves_identity() {
    let p = bundled("");
    run_at(&p, AS_OF);
    let config = std::fs::read_to_string(p.path().join("tessera.toml")).unwrap();
    let edited = config.replacen("limit = 3", "limit = 1", 1);
    assert_ne!(config, edited);
    write(&p, "tessera.toml", &edited);

    let plan = plan_at(&p, AS_OF);
    let identity = plan["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["node"] == "identity")
        .unwrap()
        .clone();
    assert_eq!(identity["action"], "recompute");
    assert!(
        identity["reasons"]
            .to_string()
            .contains("config key identity.identifiers[1].limit changed (3 → 1)"),
        "{identity}"
    );
    let report = run_at(&p, AS_OF);
    assert_eq!(
        nodes_with(&plan["steps"], "recompute"),
        nodes_with(&report["nodes"], "recompute")
    );
    assert!(report["identity"]["links_refused"].as_u64().unwrap() > 0);

    // Profile ids may be carried from the earlier graph; the grouping must be a full run's.
    let full = fresh_full(&p, AS_OF);
    let grouping = |p: &TempProject| -> BTreeSet<Vec<String>> {
        let mut groups: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for row in
            p.query("SELECT identifier_type, identifier_value, profile_id FROM identity_graph")
        {
            groups
                .entry(row["profile_id"].as_str().unwrap().to_string())
                .or_default()
                .push(format!(
                    "{}:{}",
                    row["identifier_type"], row["identifier_value"]
                ));
        }
        groups
            .into_values()
            .map(|mut v| {
                v.sort();
                v
            })
            .collect()
    };
    assert_eq!(grouping(&p), grouping(&full));
    let count = |p: &TempProject, table: &str| {
        p.query(&format!("SELECT count(*) AS n FROM {table}"))[0]["n"].clone()
    };
    for table in [
        "profiles",
        "identity_conflicts",
        "sessions",
        "segments.active_30d",
    ] {
        assert_eq!(count(&p, table), count(&full, table), "{table}");
    }
}

#[test]
fn a_later_as_of_recomputes_time_dependent_nodes_only() {
    let p = bundled("");
    run_at(&p, AS_OF);
    let before = versions(&p);
    let later = "2026-11-20";
    let plan = plan_at(&p, later);
    let report = run_at(&p, later);
    let recomputed = nodes_with(&report["nodes"], "recompute");
    assert_eq!(nodes_with(&plan["steps"], "recompute"), recomputed);
    assert!(recomputed.contains("segments/active_30d"), "{recomputed:?}");
    assert!(recomputed.contains("rfm") && recomputed.contains("predictions"));
    let after = versions(&p);
    for table in [
        "_state/events",
        "identity_graph",
        "identity_links",
        "sessions",
        "reports/checkout_funnel",
    ] {
        assert_eq!(
            before[table], after[table],
            "{table} is not time-dependent: kept"
        );
    }
    assert!(after["segments/active_30d"] > before["segments/active_30d"]);
    assert_ne!(
        members(&p, "active_30d").len(),
        0,
        "the fixture still has active profiles"
    );
    assert_same_as_full(&p, later);
}

#[test]
fn built_in_tables_nothing_reads_are_not_computed() {
    let p = TempProject::local();
    copy_dir(&repo().join("data/events"), &p.events());
    let segments = p.path().join("queries/segments");
    std::fs::create_dir_all(&segments).unwrap();
    std::fs::write(
        segments.join("many_events.sql"),
        "SELECT profile_id FROM profiles WHERE event_count > 20\n",
    )
    .unwrap();
    let report = run_at(&p, AS_OF);
    let skipped: BTreeSet<String> = report["skipped_nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["node"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        skipped,
        BTreeSet::from(["sessions".into(), "rfm".into(), "predictions".into()])
    );
    let tables = versions(&p);
    for table in ["sessions", "rfm", "predictions", "prediction_models"] {
        assert!(!tables.contains_key(table), "{table} not computed");
        assert!(!Path::new(&p.path().join("out").join(table)).exists());
    }
    assert!(tables.contains_key("segments/many_events"));

    // A query that reads `rfm` makes it needed: computed, with its reason; sessions still not.
    std::fs::write(
        segments.join("loyal.sql"),
        "SELECT profile_id FROM rfm WHERE f_score >= 4\n",
    )
    .unwrap();
    let report = run_at(&p, AS_OF);
    let recomputed = nodes_with(&report["nodes"], "recompute");
    assert!(recomputed.contains("rfm") && recomputed.contains("segments/loyal"));
    assert!(!recomputed.contains("sessions") && !recomputed.contains("predictions"));
    assert!(versions(&p).contains_key("rfm"));
    assert_same_as_full(&p, AS_OF);
}
