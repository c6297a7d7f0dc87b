//! Profiles, computed traits and segments, on a fixture small enough to compute by hand.

use std::path::Path;

use crate::common::*;

const DAY: i64 = 86_400_000_000;
/// 2026-10-01T00:00:00Z in µs.
const T0: i64 = 1_790_812_800_000_000;
const AS_OF: &str = "2026-10-11T00:00:00Z"; // T0 + 10 days

/// The bundled config and queries over `rows`.
fn bundled_with(rows: &[Ev]) -> TempProject {
    let p = TempProject::local();
    std::fs::copy(repo().join("tessera.toml"), p.path().join("tessera.toml")).unwrap();
    copy_dir(&repo().join("queries"), &p.path().join("queries"));
    write_parquet(&p.events().join("events.parquet"), &[events_batch(rows)]);
    p
}

fn ev(id: &'static str, user: &'static str, ts: i64) -> Ev {
    Ev {
        anonymous_id: Some("dev"),
        user_id: Some(user),
        ..Ev::track(id, ts)
    }
}

fn fixture() -> Vec<Ev> {
    let view = |id, user, ts, props| Ev {
        event: Some("Product Viewed"),
        properties: Some(props),
        ..ev(id, user, ts)
    };
    let order = |id, user, ts, props| Ev {
        event: Some("Order Completed"),
        properties: Some(props),
        ..ev(id, user, ts)
    };
    vec![
        // Ann: two identifies (plan changes), views with a tie between hats and shoes, two orders.
        Ev {
            kind: Some("identify"),
            event: None,
            anonymous_id: Some("ann-laptop"),
            traits: Some(r#"{"email": "ann@x.com", "first_name": "Ann", "plan": "free"}"#),
            context: Some(r#"{"campaign": {"source": "google"}}"#),
            ..ev("a1", "u-ann", T0)
        },
        Ev {
            kind: Some("identify"),
            event: None,
            anonymous_id: Some("ann-laptop"),
            traits: Some(r#"{"plan": "pro", "first_name": null}"#),
            ..ev("a2", "u-ann", T0 + DAY)
        },
        Ev {
            anonymous_id: Some("ann-laptop"),
            ..view(
                "a3",
                "u-ann",
                T0 + DAY,
                r#"{"category": "shoes", "product_id": "p2"}"#,
            )
        },
        Ev {
            anonymous_id: Some("ann-laptop"),
            ..view(
                "a4",
                "u-ann",
                T0 + DAY + 1,
                r#"{"category": "hats", "product_id": "p1"}"#,
            )
        },
        Ev {
            anonymous_id: Some("ann-laptop"),
            ..view(
                "a5",
                "u-ann",
                T0 + DAY + 2,
                r#"{"category": "shoes", "product_id": "p2"}"#,
            )
        },
        Ev {
            anonymous_id: Some("ann-laptop"),
            ..view(
                "a6",
                "u-ann",
                T0 + DAY + 3,
                r#"{"category": "hats", "product_id": "p3"}"#,
            )
        },
        Ev {
            anonymous_id: Some("ann-laptop"),
            ..view(
                "a7",
                "u-ann",
                T0 + DAY + 4,
                r#"{"category": "bags", "product_id": "p1"}"#,
            )
        },
        Ev {
            anonymous_id: Some("ann-laptop"),
            ..order("a8", "u-ann", T0 + 2 * DAY, r#"{"revenue": 100}"#)
        },
        Ev {
            anonymous_id: Some("ann-laptop"),
            context: Some(r#"{"campaign": {"source": "newsletter"}}"#),
            ..order("a9", "u-ann", T0 + 3 * DAY, r#"{"revenue": 50.5}"#)
        },
        // Bob: one big old order, then a view three days ago and nothing bought since.
        Ev {
            anonymous_id: Some("bob-phone"),
            ..order("b1", "u-bob", T0, r#"{"revenue": 300}"#)
        },
        Ev {
            anonymous_id: Some("bob-phone"),
            ..view(
                "b2",
                "u-bob",
                T0 + 9 * DAY,
                r#"{"category": "bags", "product_id": "p9"}"#,
            )
        },
    ]
}

#[test]
fn each_computed_trait_kind_matches_a_hand_computed_value() {
    let p = bundled_with(&fixture());
    let report = ok(run(
        &mut p.cmd(&["run", "--json", "--quiet", "--as-of", AS_OF])
    ));
    let report: serde_json::Value = serde_json::from_str(report.trim()).unwrap();
    assert_eq!(report["profiles_written"], 2, "{report}");
    let rows = p.query(
        "SELECT user_ids, event_count, first_name, plan, traits, orders_90d, revenue_total, order_value_avg, order_value_min, \
                order_value_max, favourite_category, first_source, last_source, viewed_products_30d, viewed_product_count_30d \
         FROM profiles ORDER BY user_ids",
    );
    let ann = &rows[0];
    assert_eq!(ann["user_ids"], serde_json::json!(["u-ann"]));
    assert_eq!(ann["event_count"], 9);
    // Last-known traits: the later identify changed the plan; a null does not erase a value.
    assert_eq!(ann["plan"], "pro");
    assert_eq!(ann["first_name"], "Ann");
    let traits: serde_json::Value = serde_json::from_str(ann["traits"].as_str().unwrap()).unwrap();
    assert_eq!(
        traits,
        serde_json::json!({"email": "ann@x.com", "first_name": "Ann", "plan": "pro"})
    );
    // Event counter, sum/avg/min/max.
    assert_eq!(ann["orders_90d"], 2);
    assert_eq!(ann["revenue_total"], 150.5);
    assert_eq!(ann["order_value_avg"], 75.25);
    assert_eq!(ann["order_value_min"], 50.5);
    assert_eq!(ann["order_value_max"], 100.0);
    // Most frequent: hats and shoes both twice; the tie goes to the first alphabetically.
    assert_eq!(ann["favourite_category"], "hats");
    // First and last value.
    assert_eq!(ann["first_source"], "google");
    assert_eq!(ann["last_source"], "newsletter");
    // Unique list and count in a window.
    assert_eq!(
        ann["viewed_products_30d"],
        serde_json::json!(["p1", "p2", "p3"])
    );
    assert_eq!(ann["viewed_product_count_30d"], 3);

    let bob = &rows[1];
    assert_eq!(bob["user_ids"], serde_json::json!(["u-bob"]));
    assert_eq!(bob["revenue_total"], 300.0);
    assert_eq!(bob["favourite_category"], "bags");
    assert!(
        bob.get("first_source").is_none(),
        "no campaign, no source: {bob}"
    );
}

#[test]
fn queries_read_event_columns_the_pipeline_itself_does_not_use() {
    // Later stages read a copy of the resolved events that keeps only the columns some query
    // names (or all of them, for `*`): a trait over anonymous_id and received_at, and a
    // report selecting `*`, must still see theirs.
    let rows = fixture();
    let p = bundled_with(&rows);
    std::fs::write(
        p.path().join("queries/traits/devices.sql"),
        "SELECT profile_id, count(DISTINCT anonymous_id) AS devices, max(received_at) AS last_received \
         FROM events GROUP BY profile_id",
    )
    .unwrap();
    std::fs::write(
        p.path().join("queries/reports/every_column.sql"),
        "SELECT * FROM events WHERE message_id = 'a1'",
    )
    .unwrap();
    ok(run(&mut p.cmd(&["run", "--quiet", "--as-of", AS_OF])));

    let ann: Vec<&Ev> = rows.iter().filter(|r| r.user_id == Some("u-ann")).collect();
    let mut devices: Vec<&str> = ann.iter().filter_map(|r| r.anonymous_id).collect();
    devices.sort();
    devices.dedup();
    let last_received = ann.iter().filter_map(|r| r.received_at).max().unwrap();
    let got = p.query(
        "SELECT devices, CAST(last_received AS BIGINT) AS last_received FROM profiles \
         WHERE array_has(user_ids, 'u-ann')",
    );
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0]["devices"], devices.len(), "{got:?}");
    assert!(!devices.is_empty(), "the fixture gives Ann a device");
    assert_eq!(got[0]["last_received"], last_received, "{got:?}");

    let a1 = rows.iter().find(|r| r.message_id == Some("a1")).unwrap();
    let got = p.query(
        "SELECT anonymous_id, user_id, CAST(received_at AS BIGINT) AS received_at, profile_id \
         FROM reports.every_column",
    );
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0]["anonymous_id"], a1.anonymous_id.unwrap());
    assert_eq!(got[0]["user_id"], a1.user_id.unwrap());
    assert_eq!(got[0]["received_at"], a1.received_at.unwrap());
    assert!(got[0]["profile_id"].is_string(), "{got:?}");
}

#[test]
fn windows_follow_the_as_of_time() {
    let p = bundled_with(&fixture());
    // 100 days later, no order is within 90 days and no product view within 30.
    ok(run(&mut p.cmd(&[
        "run",
        "--quiet",
        "--as-of",
        "2027-01-09",
    ])));
    let rows = p.query("SELECT orders_90d, viewed_product_count_30d FROM profiles");
    assert!(
        rows.iter()
            .all(|r| r.get("orders_90d").is_none() && r.get("viewed_product_count_30d").is_none()),
        "{rows:?}"
    );
    let bad = run(&mut p.cmd(&["run", "--quiet", "--as-of", "yesterday"]));
    assert_eq!(bad.status.code(), Some(2));
    assert!(stderr(&bad).contains("--as-of"), "{}", stderr(&bad));
}

#[test]
fn shipped_segments_select_the_expected_members() {
    let p = bundled_with(&fixture());
    ok(run(&mut p.cmd(&["run", "--quiet", "--as-of", AS_OF])));
    let members = |segment: &str| -> Vec<String> {
        p.query(&format!(
            "SELECT p.user_ids[1] AS u FROM segments.{segment} s JOIN profiles p ON p.profile_id = s.profile_id ORDER BY u"
        ))
        .iter()
        .map(|r| r["u"].as_str().unwrap().to_string())
        .collect()
    };
    assert_eq!(members("high_value"), ["u-bob"]);
    assert_eq!(members("active_30d"), ["u-ann", "u-bob"]);
    assert_eq!(members("high_value_active"), ["u-bob"]);
    assert_eq!(members("cart_abandoners"), ["u-bob"]);
    assert!(members("lapsed_buyers").is_empty());
    assert!(p.path().join("out/segments/high_value/_delta_log").is_dir());
}

#[test]
fn segment_cycles_and_unknown_segments_are_errors_naming_the_files() {
    let p = bundled_with(&fixture());
    let dir = p.path().join("queries/segments");
    std::fs::write(
        dir.join("loop_a.sql"),
        "SELECT profile_id FROM segments.loop_b",
    )
    .unwrap();
    std::fs::write(
        dir.join("loop_b.sql"),
        "SELECT profile_id FROM segments.loop_a",
    )
    .unwrap();
    let out = run(&mut p.cmd(&["run", "--quiet"]));
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(
        err.contains("queries/segments/loop_a.sql")
            && err.contains("queries/segments/loop_b.sql")
            && err.contains("cycle"),
        "{err}"
    );

    std::fs::remove_file(dir.join("loop_a.sql")).unwrap();
    std::fs::write(
        dir.join("loop_b.sql"),
        "SELECT profile_id FROM segments.nowhere",
    )
    .unwrap();
    let out = run(&mut p.cmd(&["run", "--quiet"]));
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("queries/segments/loop_b.sql")
            && stderr(&out).contains("segments.nowhere"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn trait_files_with_repeated_profiles_or_clashing_columns_are_errors() {
    let p = bundled_with(&fixture());
    let file = p.path().join("queries/traits/zz_per_event.sql");
    for (sql, says) in [
        ("SELECT profile_id, event FROM events", "more than once"),
        // An id that is no profile's is dropped, but repeating it is the same mistake.
        (
            "SELECT 'p_nobody' AS profile_id, event AS what FROM events",
            "p_nobody more than once",
        ),
        (
            "SELECT profile_id, count(*) AS event_count FROM events GROUP BY profile_id",
            "`event_count`",
        ),
    ] {
        std::fs::write(&file, sql).unwrap();
        let out = run(&mut p.cmd(&["run", "--quiet"]));
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{sql}: {err}");
        assert!(
            err.contains("queries/traits/zz_per_event.sql") && err.contains(says),
            "{sql}: {err}"
        );
    }
}

#[test]
fn segment_changes_over_three_runs_with_a_merge() {
    let p = TempProject::local();
    std::fs::create_dir_all(p.path().join("queries/segments")).unwrap();
    std::fs::write(
        p.path().join("queries/segments/buyers.sql"),
        "SELECT DISTINCT profile_id FROM events WHERE event = 'Order Completed' AND profile_id IS NOT NULL",
    )
    .unwrap();
    let order = |id, anon, user, ts| Ev {
        event: Some("Order Completed"),
        anonymous_id: Some(anon),
        user_id: user,
        ..Ev::track(id, ts)
    };
    let view = |id, anon, ts| Ev {
        anonymous_id: Some(anon),
        ..Ev::track(id, ts)
    };
    let profile = |kind: &str, value: &str| {
        p.query(&format!("SELECT profile_id FROM identity_graph WHERE identifier_type = '{kind}' AND identifier_value = '{value}'"))[0]
            ["profile_id"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let changes = |run_id: &serde_json::Value| -> Vec<(String, String)> {
        p.query(&format!("SELECT profile_id, change FROM segment_changes WHERE run_id = '{}' ORDER BY change, profile_id", run_id.as_str().unwrap()))
            .iter()
            .map(|r| (r["profile_id"].as_str().unwrap().to_string(), r["change"].as_str().unwrap().to_string()))
            .collect()
    };

    // Run 1: Ann buys on her laptop; a phone only browses.
    write_parquet(
        &p.events().join("1.parquet"),
        &[events_batch(&[
            order("o1", "laptop", Some("u-ann"), T0),
            view("v1", "phone", T0 + 1),
        ])],
    );
    let r1 = p.run_json();
    let ann = profile("user_id", "u-ann");
    let phone = profile("anonymous_id", "phone");
    assert_eq!(
        changes(&r1["run_id"]),
        [(ann.clone(), "entered".to_string())]
    );

    // Run 2: the phone's (anonymous) profile buys too.
    write_parquet(
        &p.events().join("2.parquet"),
        &[events_batch(&[order("o2", "phone", None, T0 + DAY)])],
    );
    let r2 = p.run_json();
    assert_eq!(
        changes(&r2["run_id"]),
        [(phone.clone(), "entered".to_string())]
    );

    // Run 3: Ann logs in on the phone. The phone's profile merges into Ann's (older) and leaves;
    // Ann was already a member, so she does not enter again.
    write_parquet(
        &p.events().join("3.parquet"),
        &[events_batch(&[Ev {
            kind: Some("identify"),
            ..view("i1", "phone", T0 + 2 * DAY)
        }
        .with_user("u-ann")])],
    );
    let r3 = p.run_json();
    assert_eq!(r3["identity"]["profiles_merged"], 1, "{r3}");
    assert_eq!(profile("anonymous_id", "phone"), ann);
    assert_eq!(
        changes(&r3["run_id"]),
        [(phone.clone(), "exited".to_string())]
    );
    let merges = p.query("SELECT merged_profile_id, into_profile_id FROM profile_merges");
    assert_eq!(
        merges,
        vec![serde_json::json!({"merged_profile_id": phone, "into_profile_id": ann})]
    );

    // A run with nothing new changes nobody.
    let r4 = p.run_json();
    assert!(changes(&r4["run_id"]).is_empty());
}

#[test]
fn export_hashes_normalised_emails_and_phones_for_customer_match() {
    let mut rows = fixture();
    // Bob identifies with a messy email and a phone written the US way.
    rows.push(Ev {
        kind: Some("identify"),
        event: None,
        anonymous_id: Some("bob-phone"),
        traits: Some(r#"{"email": "  BOB@X.com ", "phone": "(415) 555-0123"}"#),
        ..ev("b3", "u-bob", T0 + DAY)
    });
    let p = bundled_with(&rows);
    ok(run(&mut p.cmd(&["run", "--quiet", "--as-of", AS_OF])));
    let out = p.path().join("exports/high_value.csv");
    let args = [
        "export",
        "segment",
        "high_value",
        "--out",
        out.to_str().unwrap(),
        "--columns",
        "emails,phones,revenue_total",
        "--hash-pii",
        "--quiet",
    ];
    ok(run(&mut p.cmd(&args)));
    let text = std::fs::read_to_string(&out).unwrap();
    // Expected digests computed outside Tessera (Python's hashlib) of "bob@x.com" and "+14155550123".
    assert_eq!(
        text,
        "emails,phones,revenue_total\n\
         581d5f1930c81e73906dfbae2d46df90e4a1221064763a4e55ee85dab8312938,36a2cef4ff9bf7a1abd2a93359136b870393be4106e6c5d19b72ff564f9deca4,300.0\n"
    );

    // Without hashing, the normalised values; Parquet keeps the lists.
    let plain = p.path().join("exports/active.parquet");
    let args = [
        "export",
        "segment",
        "active_30d",
        "--format",
        "parquet",
        "--out",
        plain.to_str().unwrap(),
        "--columns",
        "profile_id,emails",
        "--quiet",
    ];
    ok(run(&mut p.cmd(&args)));
    let file = std::fs::File::open(&plain).unwrap();
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
        .unwrap()
        .build()
        .unwrap();
    let batches: Vec<_> = reader.map(|b| b.unwrap()).collect();
    let text = arrow::util::pretty::pretty_format_batches(&batches)
        .unwrap()
        .to_string();
    assert!(
        text.contains("[ann@x.com]") && text.contains("[bob@x.com]"),
        "{text}"
    );

    let missing = run(&mut p.cmd(&["export", "segment", "no_such", "--out", "/tmp/never.csv"]));
    assert_eq!(missing.status.code(), Some(2));
    assert!(
        stderr(&missing).contains("high_value"),
        "{}",
        stderr(&missing)
    );
}

#[test]
fn query_files_that_write_or_read_urls_are_refused_naming_file_and_statement() {
    let p = bundled_with(&fixture());
    let dir = p.path().join("queries/segments");
    for (sql, word) in [
        ("CREATE TABLE x AS SELECT 1 AS profile_id", "CREATE"),
        ("DROP TABLE profiles", "DROP"),
        ("INSERT INTO profiles SELECT * FROM profiles", "INSERT"),
        ("DELETE FROM profiles", "DELETE"),
        ("UPDATE profiles SET event_count = 0", "UPDATE"),
        ("COPY (SELECT 1) TO '/tmp/tessera-sandbox.csv'", "COPY"),
        ("SET datafusion.execution.batch_size = 1", "SET"),
        (
            "SELECT 1 AS profile_id; SELECT 2 AS profile_id",
            "2 statements",
        ),
        (
            "SELECT message_id AS profile_id FROM 'data/events/events.parquet'",
            "data/events/events.parquet",
        ),
    ] {
        std::fs::write(dir.join("zz_bad.sql"), sql).unwrap();
        let out = run(&mut p.cmd(&["run", "--quiet"]));
        assert_eq!(out.status.code(), Some(2), "{sql}");
        let err = stderr(&out);
        assert!(
            err.contains("queries/segments/zz_bad.sql") && err.contains(word),
            "{sql}: {err}"
        );
    }
    assert!(!Path::new("/tmp/tessera-sandbox.csv").exists());
}

#[tokio::test]
async fn shipped_segments_agree_with_duckdb_on_the_same_resolved_events() {
    let Some(python) = python("shipped_segments_agree_with_duckdb_on_the_same_resolved_events")
    else {
        return;
    };
    let p = TempProject::local();
    std::fs::copy(repo().join("tessera.toml"), p.path().join("tessera.toml")).unwrap();
    copy_dir(&repo().join("queries"), &p.path().join("queries"));
    generate(&p.path().join("data"), 1500, 30, 77);
    let project = tessera::config::Project::load(p.path()).unwrap();
    let engine = tessera::engine::Engine::open(project).await.unwrap();
    let as_of = "2026-10-31T00:00:00Z";
    let options = tessera::pipeline::RunOptions {
        full: false,
        as_of: Some(
            chrono::DateTime::parse_from_rfc3339(as_of)
                .unwrap()
                .with_timezone(&chrono::Utc),
        ),
    };
    tessera::pipeline::run_on(&engine, &options, tessera::progress::Progress::hidden())
        .await
        .unwrap();

    // The resolved events exactly as the run's SQL saw them, for DuckDB to read.
    let resolved = p.path().join("resolved.parquet");
    engine
        .ctx
        .sql("SELECT profile_id, event, \"timestamp\", properties FROM events WHERE profile_id IS NOT NULL")
        .await
        .unwrap()
        .write_parquet(
            resolved.to_str().unwrap(),
            datafusion::dataframe::DataFrameWriteOptions::new().with_single_file_output(true),
            None,
        )
        .await
        .unwrap();
    let out = std::process::Command::new(python)
        .arg(repo().join("tests/py/segments_duckdb.py"))
        .arg(&resolved)
        .arg(p.path().join("out"))
        .arg("2026-10-31 00:00:00+00")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for (name, r) in report.as_object().unwrap() {
        assert_eq!(r["same"], true, "{name}: {r}");
        assert!(
            r["tessera"].as_u64().unwrap() > 0,
            "{name} is empty, so it proves nothing: {report}"
        );
    }
    assert_eq!(report.as_object().unwrap().len(), 5);
}
