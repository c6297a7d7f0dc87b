//! Incremental runs equal full runs: seeded random event batches (late events among them),
//! merges and splits of profiles (shared anonymous ids, a `user_id` limit a late event can
//! flip), and as-of moves, each run compared table by table with a fresh `--full` run of the
//! same files at the same as-of. A few cases only (each comparison reads every table back
//! through `tessera query`); the seed of a failing case is printed, and
//! `TESSERA_TEST_INCREMENTAL_SEED` runs that one again.

use std::collections::{BTreeMap, BTreeSet};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::common::*;

const DAY: i64 = 86_400_000_000;
/// 2026-11-01T00:00:00Z in µs.
const NOV_1: i64 = 1_793_491_200_000_000;

/// The bundled project's config and queries, with no events yet, plus a trait that reads the
/// time within windows (`BETWEEN`, an aggregate's `FILTER`, an offset on the event side) and
/// a segment that reads it otherwise (the month the as-of is in), which must fall back to
/// every profile.
fn project() -> TempProject {
    let config = std::fs::read_to_string(repo().join("tessera.toml")).unwrap();
    let p = TempProject::new(&config);
    copy_dir(&repo().join("queries"), &p.path().join("queries"));
    std::fs::write(
        p.path().join("queries/traits/window_edges.sql"),
        "SELECT profile_id, \
                count(*) FILTER (WHERE \"timestamp\" BETWEEN as_of() - INTERVAL '5 days' AND as_of() - INTERVAL '2 days') AS events_2_to_5d, \
                max(\"timestamp\") FILTER (WHERE \"timestamp\" + INTERVAL '36 hours' > as_of()) AS last_36h \
         FROM events GROUP BY profile_id",
    )
    .unwrap();
    std::fs::write(
        p.path().join("queries/segments/this_month.sql"),
        "SELECT profile_id, count(*) AS events_this_month FROM events \
         WHERE profile_id IS NOT NULL AND \"timestamp\" >= date_trunc('month', as_of()) \
         GROUP BY profile_id",
    )
    .unwrap();
    p
}

fn leak(s: String) -> &'static str {
    Box::leak(s.into_boxed_str())
}

fn as_of_text(micros: i64) -> String {
    chrono::DateTime::from_timestamp_micros(micros)
        .unwrap()
        .to_rfc3339()
}

/// Random events of a handful of people over the 30 days before `until`. People share
/// anonymous ids now and then (merges), and an anonymous id seen with a second `user_id`
/// (limit 1) is refused one way or the other depending on which link is older, so a late
/// event can move it between profiles (a split of one, a merge into the other).
fn batch(rng: &mut ChaCha8Rng, n: usize, from: i64, until: i64, next_id: &mut u32) -> Vec<Ev> {
    let steps = [
        "Product Viewed",
        "Product Added",
        "Checkout Started",
        "Order Completed",
    ];
    (0..n)
        .map(|_| {
            let person = rng.gen_range(0..10u32);
            // Most events carry the person's own anonymous id; some a shared one.
            let anonymous = if rng.gen_bool(0.15) {
                format!("shared-{}", rng.gen_range(0..3u32))
            } else {
                format!("anon-{person}-{}", rng.gen_range(0..2u32))
            };
            let ts = rng.gen_range(from..until);
            *next_id += 1;
            let mut ev = Ev::track(leak(format!("m{next_id}")), ts);
            ev.anonymous_id = Some(leak(anonymous));
            ev.event = Some(steps[rng.gen_range(0..steps.len())]);
            if ev.event == Some("Order Completed") {
                ev.properties = Some(leak(format!(
                    r#"{{"revenue": {}, "category": "c{}"}}"#,
                    rng.gen_range(5..300u32),
                    rng.gen_range(0..3u32)
                )));
            }
            if rng.gen_bool(0.3) {
                ev.user_id = Some(leak(format!("user-{person}")));
            }
            if rng.gen_bool(0.1) {
                ev.kind = Some("identify");
                ev.event = None;
                ev.traits = Some(leak(format!(
                    r#"{{"email": "p{person}@example.com", "plan": "p{}"}}"#,
                    rng.gen_range(0..2u32)
                )));
            }
            ev
        })
        .collect()
}

/// Every published output table's rows (sorted), read back through `tessera query`; the logs
/// (`runs`, `segment_changes`, `profile_merges`) and Tessera's state left out.
fn snapshot(p: &TempProject) -> BTreeMap<String, Vec<String>> {
    let text = ok(run(&mut p.cmd(&["status", "--json"])));
    let status: serde_json::Value = serde_json::from_str(text.trim()).unwrap();
    let mut out = BTreeMap::new();
    for table in status["tables"].as_object().unwrap().keys() {
        // `profile_merges` is a history too: which profiles each run merged away.
        if table.starts_with("_state/")
            || ["runs", "segment_changes", "profile_merges"].contains(&table.as_str())
        {
            continue;
        }
        let sql_name = table.replace('/', ".");
        let mut rows: Vec<String> = p
            .query(&format!("SELECT * FROM {sql_name}"))
            .into_iter()
            .map(|mut r| {
                if let Some(r) = r.as_object_mut() {
                    r.remove("run_id");
                    // A digest of the profile id, which may differ (see `same_ids`).
                    r.remove("session_id");
                }
                r.to_string()
            })
            .collect();
        rows.sort();
        out.insert(sql_name, rows);
    }
    out
}

/// Each identifier's profile in an `identity_graph` snapshot.
fn profile_of(snapshot: &BTreeMap<String, Vec<String>>) -> BTreeMap<(String, String), String> {
    snapshot["identity_graph"]
        .iter()
        .map(|r| {
            let r: serde_json::Value = serde_json::from_str(r).unwrap();
            let text = |k: &str| r[k].as_str().unwrap().to_string();
            (
                (text("identifier_type"), text("identifier_value")),
                text("profile_id"),
            )
        })
        .collect()
}

/// The tables of `p` and of `full` (a fresh project given `p`'s event files and run `--full`
/// at `as_of`), both with the full run's profile ids (see [`same_ids`]).
fn beside_a_full_run(
    p: &TempProject,
    full: TempProject,
    as_of: i64,
    seed: u64,
    step: usize,
) -> (BTreeMap<String, Vec<String>>, BTreeMap<String, Vec<String>>) {
    copy_dir(&p.events(), &full.events());
    ok(run(&mut full.cmd(&[
        "run",
        "--full",
        "--quiet",
        "--as-of",
        &as_of_text(as_of),
    ])));
    let (mine, theirs) = (snapshot(p), snapshot(&full));
    let mine = same_ids(mine, &theirs, seed, step);
    let theirs = same_ids(theirs.clone(), &theirs, seed, step);
    (mine, theirs)
}

/// `mine` with its profile ids renamed to the full run's. An incremental run keeps the ids
/// of the profiles it carries (the oldest surviving a merge), a full run names each profile
/// by its oldest identifier, so the two may name one profile differently; the grouping must
/// be the same, one to one, and every table equal once the names are matched.
fn same_ids(
    mine: BTreeMap<String, Vec<String>>,
    theirs: &BTreeMap<String, Vec<String>>,
    seed: u64,
    step: usize,
) -> BTreeMap<String, Vec<String>> {
    let (a, b) = (profile_of(&mine), profile_of(theirs));
    assert_eq!(
        a.keys().collect::<Vec<_>>(),
        b.keys().collect::<Vec<_>>(),
        "seed {seed}, step {step}: the same identifiers"
    );
    let mut rename: BTreeMap<String, String> = BTreeMap::new();
    let mut back: BTreeMap<String, String> = BTreeMap::new();
    for (identifier, id) in &a {
        let theirs = &b[identifier];
        let one = rename.entry(id.clone()).or_insert_with(|| theirs.clone()) == theirs
            && back.entry(theirs.clone()).or_insert_with(|| id.clone()) == id;
        assert!(
            one,
            "seed {seed}, step {step}: {identifier:?} is grouped differently from a full run"
        );
    }
    fn renamed(v: serde_json::Value, rename: &BTreeMap<String, String>) -> serde_json::Value {
        match v {
            serde_json::Value::String(s) => {
                serde_json::Value::String(rename.get(&s).cloned().unwrap_or(s))
            }
            serde_json::Value::Array(a) => {
                serde_json::Value::Array(a.into_iter().map(|v| renamed(v, rename)).collect())
            }
            serde_json::Value::Object(o) => serde_json::Value::Object(
                o.into_iter()
                    .map(|(k, v)| (k, renamed(v, rename)))
                    .collect(),
            ),
            // Sums of floats depend on the order rows arrive in (the predictions' fit adds
            // them per profile): compared to nine significant digits.
            serde_json::Value::Number(n) if n.is_f64() => {
                serde_json::Value::String(format!("{:.9e}", n.as_f64().unwrap_or(0.0)))
            }
            other => other,
        }
    }
    mine.into_iter()
        .map(|(table, rows)| {
            let mut rows: Vec<String> = rows
                .iter()
                .map(|r| renamed(serde_json::from_str(r).unwrap(), &rename).to_string())
                .collect();
            rows.sort();
            (table, rows)
        })
        .collect()
}

/// One case: a first run, then `steps` runs each adding a file (and maybe moving the as-of),
/// every one compared with a fresh `--full` run. Returns what the case exercised.
fn case(seed: u64, steps: usize) -> BTreeSet<&'static str> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut seen = BTreeSet::new();
    let p = project();
    let mut next_id = 0;
    let mut as_of = NOV_1;
    let first = batch(&mut rng, 160, as_of - 30 * DAY, as_of, &mut next_id);
    write_parquet(&p.events().join("part-0.parquet"), &[events_batch(&first)]);
    ok(run(&mut p.cmd(&[
        "run",
        "--quiet",
        "--as-of",
        &as_of_text(as_of),
    ])));
    for step in 1..=steps {
        // Now and then only the time moves, by up to nine days and some hours: across the
        // edges of the windows (36 hours, 2, 5, 7, 14 and 21 days) of some profiles.
        // Each kind at least once in a case.
        let moved_with_events = step + 1 == steps && !seen.contains("as-of moved");
        let idle = !moved_with_events
            && (rng.gen_bool(0.35) || (step == steps && !seen.contains("as-of moved alone")));
        if idle {
            as_of += rng.gen_range(DAY / 2..9 * DAY);
            seen.insert("as-of moved alone");
        } else if rng.gen_bool(0.4) || moved_with_events {
            as_of += DAY;
            seen.insert("as-of moved");
        }
        // The newest events, and now and then late ones from anywhere in the period.
        let mut rows = batch(&mut rng, 12, as_of - DAY, as_of, &mut next_id);
        if rng.gen_bool(0.5) {
            rows.extend(batch(
                &mut rng,
                4,
                as_of - 30 * DAY,
                as_of - 20 * DAY,
                &mut next_id,
            ));
            seen.insert("late events");
        }
        if !idle {
            write_parquet(
                &p.events().join(format!("part-{step}.parquet")),
                &[events_batch(&rows)],
            );
        }
        let report: serde_json::Value = serde_json::from_str(
            ok(run(&mut p.cmd(&[
                "run",
                "--json",
                "--quiet",
                "--as-of",
                &as_of_text(as_of),
            ])))
            .trim(),
        )
        .unwrap();
        if report["identity"]["profiles_merged"].as_u64().unwrap_or(0) > 0 {
            seen.insert("merges");
        }
        // A profile merged away is gone from every per-profile table.
        let ghosts = p.query(
            "SELECT count(*) AS n FROM profiles WHERE profile_id IN \
             (SELECT merged_profile_id FROM profile_merges)",
        );
        assert_eq!(
            ghosts[0]["n"], 0,
            "seed {seed}, step {step}: merged-away profiles remain"
        );
        let (mine, theirs) = beside_a_full_run(&p, project(), as_of, seed, step);
        assert_eq!(
            mine.keys().collect::<Vec<_>>(),
            theirs.keys().collect::<Vec<_>>(),
            "seed {seed}, step {step}: the same tables are published"
        );
        for (table, rows) in &mine {
            if rows != &theirs[table] {
                let a: BTreeSet<_> = rows.iter().collect();
                let b: BTreeSet<_> = theirs[table].iter().collect();
                eprintln!(
                    "{table}: only incremental {:?}",
                    a.difference(&b).take(3).collect::<Vec<_>>()
                );
                eprintln!(
                    "{table}: only full {:?}",
                    b.difference(&a).take(3).collect::<Vec<_>>()
                );
            }
            assert!(
                rows == &theirs[table],
                "seed {seed}, step {step}: {table} differs from a fresh --full run ({} rows against {}); \
                 rerun with TESSERA_TEST_INCREMENTAL_SEED={seed}",
                rows.len(),
                theirs[table].len()
            );
        }
        let conflicts = p.query("SELECT count(*) AS n FROM identity_conflicts");
        if conflicts[0]["n"].as_u64().unwrap_or(0) > 0 {
            seen.insert("refused links");
        }
    }
    seen
}

#[test]
fn incremental_runs_equal_full_runs_table_by_table() {
    let seeds: Vec<u64> = match std::env::var("TESSERA_TEST_INCREMENTAL_SEED") {
        Ok(s) => vec![s.parse().expect("a number")],
        Err(_) => {
            let base = rand::thread_rng().gen::<u32>() as u64;
            vec![base]
        }
    };
    for seed in seeds {
        eprintln!("incremental vs full: seed {seed}");
        let seen = case(seed, 3);
        eprintln!("seed {seed} exercised: {seen:?}");
    }
}

#[test]
fn plan_says_which_sql_nodes_run_over_touched_profiles() {
    let p = project();
    let mut next_id = 0;
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let rows = batch(&mut rng, 80, NOV_1 - 30 * DAY, NOV_1, &mut next_id);
    write_parquet(&p.events().join("part-0.parquet"), &[events_batch(&rows)]);
    let as_of = as_of_text(NOV_1);
    ok(run(&mut p.cmd(&["run", "--quiet", "--as-of", &as_of])));
    let rows = batch(&mut rng, 5, NOV_1 - DAY, NOV_1, &mut next_id);
    write_parquet(&p.events().join("part-1.parquet"), &[events_batch(&rows)]);
    let over = |as_of: &str| -> BTreeMap<String, String> {
        let text = ok(run(&mut p.cmd(&["plan", "--json", "--as-of", as_of])));
        let plan: serde_json::Value = serde_json::from_str(text.trim()).unwrap();
        plan["steps"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|s| {
                Some((
                    s["node"].as_str()?.to_string(),
                    s["over"].as_str()?.to_string(),
                ))
            })
            .collect()
    };
    let same = over(&as_of);
    // Per profile over events: grouped by profile_id, or per-profile parts joined on it.
    for node in [
        "segments/abandoned_checkout",
        "segments/cart_abandoners",
        "segments/lapsed_buyers",
        "traits/order_count",
    ] {
        assert_eq!(same[node], "touched profiles", "{node}");
    }
    // Reads other tables, or ranks over all profiles.
    for node in [
        "segments/active_30d",
        "segments/champions",
        "segments/valuable_at_risk",
    ] {
        assert_eq!(same[node], "every profile", "{node}");
    }
    // At a moved as-of, queries that compare event times with the as-of run over the
    // touched profiles and those whose windows moved; one that reads the as-of otherwise
    // runs over every profile.
    let later = over(&as_of_text(NOV_1 + DAY));
    for node in [
        "segments/abandoned_checkout",
        "segments/cart_abandoners",
        "segments/lapsed_buyers",
        "traits/order_count",
        "traits/window_edges",
    ] {
        assert_eq!(later[node], "touched and due profiles", "{node}");
    }
    assert_eq!(later["segments/this_month"], "every profile");
    assert_eq!(later["traits/revenue"], "touched profiles", "reads no time");
    // The run does what the plan said (its log names what each segment was computed for).
    let out = run(&mut p.cmd(&["run", "--json", "-v", "--as-of", &as_of]));
    let log = stderr(&out);
    ok(out);
    let computed_for = |file: &str| -> Option<String> {
        log.lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|l| l["fields"]["message"] == "segment" && l["fields"]["file"] == file)
            .and_then(|l| l["fields"]["computed_for"].as_str().map(str::to_string))
    };
    assert_eq!(
        computed_for("queries/segments/abandoned_checkout.sql").as_deref(),
        Some("touched profiles")
    );
    assert_eq!(
        computed_for("queries/segments/active_30d.sql").as_deref(),
        Some("every profile")
    );
}

/// A run at a moved as-of with no new events computes the traits and segments that compare
/// event times with the as-of only for the profiles whose windows moved: exactly those with
/// an event time `t` and a window `k` such that `t + k` was passed between the two as-ofs.
/// It equals a full run; a query that reads the as-of in another way runs over every profile.
#[test]
fn a_moved_as_of_recomputes_only_the_profiles_whose_windows_moved() {
    let config = std::fs::read_to_string(repo().join("tessera.toml")).unwrap();
    let make = || {
        let p = TempProject::new(&config);
        let q = p.path().join("queries");
        for dir in ["traits", "segments"] {
            std::fs::create_dir_all(q.join(dir)).unwrap();
        }
        std::fs::write(
            q.join("traits/events_7d.sql"),
            "SELECT profile_id, count(*) AS events_7d FROM events \
             WHERE \"timestamp\" >= as_of() - INTERVAL '7 days' GROUP BY profile_id",
        )
        .unwrap();
        std::fs::write(
            q.join("segments/quiet_3d.sql"),
            "SELECT profile_id, max(\"timestamp\") AS last_seen FROM events \
             WHERE profile_id IS NOT NULL GROUP BY profile_id \
             HAVING max(\"timestamp\") < as_of() - INTERVAL '3 days'",
        )
        .unwrap();
        // The as-of through a function: no next moment can be worked out.
        std::fs::write(
            q.join("segments/seen_today.sql"),
            "SELECT profile_id FROM events WHERE profile_id IS NOT NULL \
             AND date_trunc('day', \"timestamp\") = date_trunc('day', as_of() - INTERVAL '1 day') \
             GROUP BY profile_id",
        )
        .unwrap();
        p
    };
    // Twelve people, each with two events at odd hours over the three weeks before Nov 1.
    let mut rows = Vec::new();
    let mut times: Vec<Vec<i64>> = Vec::new();
    const HOUR: i64 = 3_600_000_000;
    for person in 0..12i64 {
        let mine = vec![
            NOV_1 - person * 31 * HOUR - 5 * HOUR,
            NOV_1 - person * 43 * HOUR - 17 * HOUR,
        ];
        for (i, &ts) in mine.iter().enumerate() {
            let ev = Ev::track(leak(format!("m{person}-{i}")), ts)
                .with_user(leak(format!("user-{person}")));
            rows.push(Ev {
                anonymous_id: Some(leak(format!("anon-{person}"))),
                ..ev
            });
        }
        times.push(mine);
    }
    let p = make();
    write_parquet(&p.events().join("part-0.parquet"), &[events_batch(&rows)]);
    ok(run(&mut p.cmd(&[
        "run",
        "--quiet",
        "--as-of",
        &as_of_text(NOV_1),
    ])));

    let windows = [3 * 24 * HOUR, 7 * 24 * HOUR];
    let mut before = NOV_1;
    for after in [NOV_1 + 2 * 24 * HOUR + 7 * HOUR, NOV_1 + 6 * 24 * HOUR] {
        // What the plan says, then what the run did.
        let text = ok(run(&mut p.cmd(&[
            "plan",
            "--json",
            "--as-of",
            &as_of_text(after),
        ])));
        let plan: serde_json::Value = serde_json::from_str(text.trim()).unwrap();
        let over = |node: &str| -> String {
            plan["steps"]
                .as_array()
                .unwrap()
                .iter()
                .find(|s| s["node"] == node)
                .and_then(|s| s["over"].as_str())
                .unwrap_or("")
                .to_string()
        };
        assert_eq!(over("traits/events_7d"), "touched and due profiles");
        assert_eq!(over("segments/quiet_3d"), "touched and due profiles");
        assert_eq!(over("segments/seen_today"), "every profile");

        let out = run(&mut p.cmd(&["run", "--json", "-v", "--as-of", &as_of_text(after)]));
        let log = stderr(&out);
        ok(out);
        let lines: Vec<serde_json::Value> = log
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        let due = lines
            .iter()
            .find(|l| {
                l["fields"]["message"]
                    .as_str()
                    .is_some_and(|m| m.starts_with("profiles the windowed"))
            })
            .map(|l| (l["fields"]["touched"].clone(), l["fields"]["due"].clone()))
            .expect("the run says which profiles the windowed queries run over");
        let expected = times
            .iter()
            .filter(|mine| {
                mine.iter()
                    .any(|t| windows.iter().any(|k| (before..=after).contains(&(t + k))))
            })
            .count();
        assert!(
            expected > 0 && expected < times.len(),
            "the case moves some windows only"
        );
        assert_eq!(due, (serde_json::json!(0), serde_json::json!(expected)));
        let computed_for = |message: &str, file: &str| -> Option<String> {
            lines
                .iter()
                .find(|l| l["fields"]["message"] == message && l["fields"]["file"] == file)
                .and_then(|l| l["fields"]["computed_for"].as_str().map(str::to_string))
        };
        assert_eq!(
            computed_for("trait", "queries/traits/events_7d.sql").as_deref(),
            Some("touched and due profiles")
        );
        assert_eq!(
            computed_for("segment", "queries/segments/quiet_3d.sql").as_deref(),
            Some("touched and due profiles")
        );
        assert_eq!(
            computed_for("segment", "queries/segments/seen_today.sql").as_deref(),
            Some("every profile")
        );

        let (mine, theirs) = beside_a_full_run(&p, make(), after, 0, 0);
        assert_eq!(mine, theirs, "as of {}", as_of_text(after));
        before = after;
    }
}

/// When the touched profiles' events do not fit in memory (a sixteenth of the memory limit),
/// they are written once to the scratch folder, and the segments that can run over them still
/// do (they used to fall back to every profile, and at 100M events that made an incremental
/// run's segments cost more than a full run's); the tables still equal a full run's.
#[test]
fn touched_events_too_large_to_hold_are_written_once_and_the_tables_equal_a_full_run() {
    let generated = tempfile::tempdir().unwrap();
    generate(generated.path(), 12_000, 4, 21);
    let mut days: Vec<_> = std::fs::read_dir(generated.path().join("events"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    days.sort();
    let last = days.pop().unwrap();
    let p = project();
    std::fs::create_dir_all(p.events()).unwrap();
    let as_of = "2026-10-08T00:00:00Z";
    let run_with = |extra: &[&str]| {
        let mut args = vec!["run", "--memory-limit", "128MiB", "--as-of", as_of];
        args.extend_from_slice(extra);
        run(&mut p.cmd(&args))
    };
    for day in &days {
        copy_dir(day, &p.events().join(day.file_name().unwrap()));
    }
    ok(run_with(&["--quiet"]));
    copy_dir(&last, &p.events().join(last.file_name().unwrap()));
    let out = run_with(&["-v", "--json"]);
    let log = stderr(&out);
    ok(out);
    let written = log
        .lines()
        .filter(|l| {
            l.contains("written once to the scratch folder")
                && l.contains("__tessera_touched_events")
        })
        .count();
    assert_eq!(
        written, 1,
        "the touched events were written {written} times (expected once: they must not fit in memory here)"
    );
    let touched: Vec<&str> = log
        .lines()
        .filter(|l| {
            l.contains("\"segment\"") && l.contains("\"computed_for\":\"touched profiles\"")
        })
        .collect();
    assert!(
        touched.iter().any(|l| l.contains("cart_abandoners")),
        "a segment that qualifies for touched profiles ran over every profile:\n{log}"
    );
    let micros = chrono::DateTime::parse_from_rfc3339(as_of)
        .unwrap()
        .timestamp_micros();
    let (mine, theirs) = beside_a_full_run(&p, project(), micros, 21, 1);
    for (table, rows) in &theirs {
        // Its rows name the file each came from, in each project's own folder.
        if table == "rejected_events" {
            continue;
        }
        assert!(
            mine.get(table) == Some(rows),
            "{table} differs from a full run's"
        );
    }
    assert_eq!(
        mine.keys().collect::<Vec<_>>(),
        theirs.keys().collect::<Vec<_>>()
    );
}
