//! Sessions, funnels, RFM and predictions, on fixtures small enough to work out by hand, and
//! the BG/NBD and Gamma-Gamma fits on the published CDNOW cohort.

use std::collections::BTreeMap;

use serde_json::Value;

use crate::common::*;

const MINUTE: i64 = 60_000_000;
const HOUR: i64 = 60 * MINUTE;
const DAY: i64 = 24 * HOUR;
/// 2026-10-01T00:00:00Z in µs.
const T0: i64 = 1_790_812_800_000_000;
const AS_OF: &str = "2026-10-11T00:00:00Z"; // T0 + 10 days

fn leak(s: String) -> &'static str {
    Box::leak(s.into_boxed_str())
}

/// A track event of `user` (each user on their own device, so users stay apart).
fn track(id: &str, user: &'static str, event: &'static str, ts: i64) -> Ev {
    Ev {
        message_id: Some(leak(id.to_string())),
        kind: Some("track"),
        event: Some(event),
        anonymous_id: Some(leak(format!("device-{user}"))),
        user_id: Some(user),
        timestamp: Some(ts),
        received_at: Some(ts),
        properties: Some("{}"),
        ..Ev::default()
    }
}

fn project(files: &[&[Ev]], config_extra: &str) -> TempProject {
    // The tables under test are computed because their sections are declared.
    let mut extra = config_extra.to_string();
    for section in ["[sessions]", "[predictions]"] {
        if !extra.contains(section) {
            extra.push_str(&format!("\n{section}\n"));
        }
    }
    let p = TempProject::new(&format!(
        "[storage]\nevents = \"data/events\"\noutput = \"out\"\n{extra}"
    ));
    for (i, rows) in files.iter().enumerate() {
        write_parquet(
            &p.events().join(format!("part-{i}.parquet")),
            &[events_batch(rows)],
        );
    }
    p
}

fn run_as_of(p: &TempProject, as_of: &str) -> Value {
    let text = ok(run(
        &mut p.cmd(&["run", "--json", "--quiet", "--as-of", as_of])
    ));
    serde_json::from_str(text.trim()).expect("one JSON report")
}

fn f64_of(row: &Value, key: &str) -> f64 {
    row[key]
        .as_f64()
        .unwrap_or_else(|| panic!("{key} is a number in {row}"))
}

/// u1's visit starts at 23:50 and runs past midnight; its gaps are 20 min, exactly 30 min and
/// 30 min + 1 s. The files hold the events out of time order.
fn session_events() -> Vec<Vec<Ev>> {
    let night = T0 + 23 * HOUR + 50 * MINUTE;
    let page = |id: &str, ts: i64, context: &'static str| Ev {
        kind: Some("page"),
        event: None,
        context: Some(context),
        ..track(id, "u1", "", ts)
    };
    let e1 = page(
        "s1",
        night,
        r#"{"page": {"url": "https://shop.example.com/?utm_source=news&utm_medium=email", "referrer": "https://mail.example.com/"}}"#,
    );
    let e2 = page(
        "s2",
        night + 20 * MINUTE,
        r#"{"page": {"url": "https://shop.example.com/p/1"}}"#,
    );
    let e3 = track("s3", "u1", "Product Added", night + 50 * MINUTE);
    let e4 = page(
        "s4",
        night + 80 * MINUTE + 1_000_000,
        r#"{"page": {"url": "https://shop.example.com/cart?utm_source=ignored"}, "campaign": {"source": "google", "medium": "cpc", "name": "autumn"}}"#,
    );
    let other = track("o1", "u2", "Product Viewed", T0 + HOUR);
    vec![vec![e4, other], vec![e3, e1, e2]]
}

fn sessions_of(p: &TempProject) -> Vec<Value> {
    p.query(
        "SELECT s.session_id, g.identifier_value AS user_id, s.session_index, \
                CAST(s.started_at AS VARCHAR) AS started_at, CAST(s.ended_at AS VARCHAR) AS ended_at, \
                s.duration_seconds, s.event_count, s.page_views, s.landing_page, s.referrer, \
                s.source, s.medium, s.campaign \
         FROM sessions s JOIN identity_graph g \
           ON g.profile_id = s.profile_id AND g.identifier_type = 'user_id' \
         ORDER BY user_id, s.session_index",
    )
}

#[test]
fn sessions_break_after_the_gap_not_at_midnight_and_ignore_arrival_order() {
    let files = session_events();
    let files: Vec<&[Ev]> = files.iter().map(Vec::as_slice).collect();
    let p = project(&files, "");
    run_as_of(&p, AS_OF);
    let rows = sessions_of(&p);
    assert_eq!(rows.len(), 3, "{rows:#?}");
    let (first, second, other) = (&rows[0], &rows[1], &rows[2]);
    // 23:50 → 00:10 → 00:40 (exactly 30 min later: still the same visit).
    assert_eq!(first["user_id"], "u1");
    assert_eq!(first["session_index"], 1);
    assert_eq!(first["event_count"], 3);
    assert_eq!(first["page_views"], 2);
    assert_eq!(first["started_at"], "2026-10-01T23:50:00Z");
    assert_eq!(first["ended_at"], "2026-10-02T00:40:00Z");
    assert_eq!(f64_of(first, "duration_seconds"), 3000.0);
    assert_eq!(
        first["landing_page"],
        "https://shop.example.com/?utm_source=news&utm_medium=email"
    );
    assert_eq!(first["referrer"], "https://mail.example.com/");
    // No context.campaign: source and medium come from the landing URL's UTM parameters.
    assert_eq!(first["source"], "news");
    assert_eq!(first["medium"], "email");
    // 30 min and 1 s after the last event: a new visit; context.campaign beats the URL.
    assert_eq!(second["session_index"], 2);
    assert_eq!(second["event_count"], 1);
    assert_eq!(second["started_at"], "2026-10-02T01:10:01Z");
    assert_eq!(second["source"], "google");
    assert_eq!(second["medium"], "cpc");
    assert_eq!(second["campaign"], "autumn");
    assert_eq!(other["user_id"], "u2");
    assert_eq!(other["event_count"], 1);
    assert!(other["landing_page"].is_null());
    // Ids are unique and stable: the same input gives the same ids.
    let ids: Vec<&Value> = rows.iter().map(|r| &r["session_id"]).collect();
    let distinct: std::collections::BTreeSet<String> = ids.iter().map(|v| v.to_string()).collect();
    assert_eq!(distinct.len(), 3, "{ids:?}");
    let again = run(&mut p.cmd(&["run", "--quiet", "--full", "--as-of", AS_OF]));
    assert!(again.status.success(), "{}", stderr(&again));
    let ids_again: Vec<Value> = sessions_of(&p)
        .into_iter()
        .map(|r| r["session_id"].clone())
        .collect();
    assert_eq!(ids.into_iter().cloned().collect::<Vec<_>>(), ids_again);
}

#[test]
fn the_session_gap_is_configurable() {
    let files = session_events();
    let files: Vec<&[Ev]> = files.iter().map(Vec::as_slice).collect();
    // 20 minutes: 23:50 → 00:10 stays together (not longer than 20), 00:10 → 00:40 splits.
    let p = project(&files, "[sessions]\ngap_minutes = 20\n");
    run_as_of(&p, AS_OF);
    let counts: Vec<i64> = sessions_of(&p)
        .iter()
        .filter(|r| r["user_id"] == "u1")
        .map(|r| r["event_count"].as_i64().expect("a count"))
        .collect();
    assert_eq!(counts, vec![2, 1, 1]);

    let bad =
        TempProject::new("[storage]\nevents = \"data/events\"\n[sessions]\ngap_minutes = 0\n");
    let out = run(&mut bad.cmd(&["validate"]));
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("sessions.gap_minutes"),
        "{}",
        stderr(&out)
    );
}

/// Every column of every session, in a stable order.
fn all_sessions(p: &TempProject) -> Vec<Value> {
    p.query("SELECT * FROM sessions ORDER BY profile_id, session_index")
}

fn run_logged(p: &TempProject, extra: &[&str]) -> String {
    let mut args = vec!["run", "-v", "--as-of", AS_OF];
    args.extend_from_slice(extra);
    let out = run(&mut p.cmd(&args));
    assert!(out.status.success(), "{}", stderr(&out));
    stderr(&out)
}

#[test]
fn incremental_runs_cut_sessions_again_only_where_events_changed() {
    let at = |minutes: i64| T0 + minutes * MINUTE;
    let guest = |id: &str, ts: i64| Ev {
        user_id: None,
        anonymous_id: Some("device-guest"),
        ..track(id, "nobody", "Product Viewed", ts)
    };
    let first = vec![
        track("a1", "u1", "Product Viewed", at(0)),
        track("a2", "u1", "Product Added", at(10)),
        track("b1", "u2", "Product Viewed", at(0)),
        track("b2", "u2", "Product Viewed", at(100)),
        guest("c1", at(5)),
        guest("c2", at(20)),
        track("d1", "u4", "Product Viewed", at(200)),
    ];
    let p = project(&[&first], "");
    let log = run_logged(&p, &[]);
    assert!(log.contains("rebuilt=\"every profile\""), "{log}");
    let before = all_sessions(&p);
    assert_eq!(before.len(), 5, "{before:#?}");
    assert!(before.iter().all(|s| s["gap_minutes"] == 30), "{before:#?}");

    // u1 goes on with its visit; the guest device signs in as u4, so the guest's visit joins
    // u4's profile; u2 has nothing new.
    let second = vec![
        track("a3", "u1", "Checkout Started", at(30)),
        Ev {
            anonymous_id: Some("device-guest"),
            ..track("d2", "u4", "Product Added", at(25))
        },
    ];
    write_parquet(&p.events().join("part-9.parquet"), &[events_batch(&second)]);
    let log = run_logged(&p, &[]);
    assert!(log.contains("rebuilt=\"changed profiles\""), "{log}");
    // u1's profile, u4's and the guest's (one of the last two is merged away).
    assert!(log.contains("profiles=3"), "{log}");
    let incremental = all_sessions(&p);
    let by_user = |rows: &[Value], user: &str| -> Vec<i64> {
        let users = p.query(&format!(
            "SELECT profile_id FROM identity_graph WHERE identifier_value = '{user}'"
        ));
        let profile = &users[0]["profile_id"];
        rows.iter()
            .filter(|s| &s["profile_id"] == profile)
            .map(|s| s["event_count"].as_i64().expect("a count"))
            .collect()
    };
    assert_eq!(by_user(&incremental, "u1"), vec![3]);
    assert_eq!(by_user(&incremental, "u4"), vec![3, 1]);
    assert_eq!(by_user(&incremental, "u2"), vec![1, 1]);
    assert_eq!(incremental.len(), 5, "{incremental:#?}");
    // u2's sessions are the published ones.
    let u2 = |rows: &[Value]| -> Vec<Value> {
        let profile =
            p.query("SELECT profile_id FROM identity_graph WHERE identifier_value = 'u2'");
        rows.iter()
            .filter(|s| s["profile_id"] == profile[0]["profile_id"])
            .cloned()
            .collect()
    };
    assert_eq!(u2(&incremental), u2(&before));

    // The same as cutting every profile again from the whole history.
    run_logged(&p, &["--full"]);
    assert_eq!(all_sessions(&p), incremental);

    // Another gap: an incremental run cuts every profile again.
    let config = p.path().join("tessera.toml");
    let text = std::fs::read_to_string(&config).expect("config");
    assert!(text.contains("[sessions]\n"));
    let edited = text.replacen("[sessions]\n", "[sessions]\ngap_minutes = 5\n", 1);
    std::fs::write(&config, edited).expect("write");
    write_parquet(
        &p.events().join("part-10.parquet"),
        &[events_batch(&[track(
            "a4",
            "u1",
            "Order Completed",
            at(34),
        )])],
    );
    let log = run_logged(&p, &[]);
    assert!(log.contains("gap_minutes changed"), "{log}");
    assert!(log.contains("rebuilt=\"every profile\""), "{log}");
    let sessions = all_sessions(&p);
    assert!(
        sessions.iter().all(|s| s["gap_minutes"] == 5),
        "{sessions:#?}"
    );
    // 0, 10, 30 and 34 minutes: only the last gap is 5 minutes or less.
    assert_eq!(by_user(&sessions, "u1"), vec![1, 1, 2]);
}

#[test]
fn funnel_counts_steps_in_order_each_within_the_window() {
    let p = TempProject::local();
    std::fs::create_dir_all(p.events()).expect("mkdir");
    // Steps a → b → c, each within 2 days of the one before.
    let rows = p.query(
        "SELECT k, funnel(INTERVAL '2 days', ts, s = 'a', s = 'b', s = 'c') AS furthest \
         FROM (VALUES \
           ('in_order',     TIMESTAMP '2026-10-01 00:00:00', 'a'), \
           ('in_order',     TIMESTAMP '2026-10-02 00:00:00', 'b'), \
           ('in_order',     TIMESTAMP '2026-10-04 00:00:00', 'c'), \
           ('too_late',     TIMESTAMP '2026-10-01 00:00:00', 'a'), \
           ('too_late',     TIMESTAMP '2026-10-02 00:00:00', 'b'), \
           ('too_late',     TIMESTAMP '2026-10-04 00:00:01', 'c'), \
           ('wrong_order',  TIMESTAMP '2026-10-01 00:00:00', 'b'), \
           ('wrong_order',  TIMESTAMP '2026-10-01 01:00:00', 'a'), \
           ('wrong_order',  TIMESTAMP '2026-10-01 02:00:00', 'c'), \
           ('shuffled',     TIMESTAMP '2026-10-03 00:00:00', 'c'), \
           ('shuffled',     TIMESTAMP '2026-10-01 00:00:00', 'a'), \
           ('shuffled',     TIMESTAMP '2026-10-02 00:00:00', 'b'), \
           ('restart',      TIMESTAMP '2026-10-01 00:00:00', 'a'), \
           ('restart',      TIMESTAMP '2026-10-06 00:00:00', 'a'), \
           ('restart',      TIMESTAMP '2026-10-07 00:00:00', 'b'), \
           ('never_starts', TIMESTAMP '2026-10-01 00:00:00', 'c') \
         ) AS t(k, ts, s) GROUP BY k ORDER BY k",
    );
    let got: BTreeMap<String, i64> = rows
        .iter()
        .map(|r| {
            (
                r["k"].as_str().expect("k").to_string(),
                r["furthest"].as_i64().expect("a step"),
            )
        })
        .collect();
    let want: BTreeMap<String, i64> = [
        ("in_order", 3),     // the last step lands exactly 2 days after the one before
        ("too_late", 2),     // 2 days and 1 s: outside the window
        ("wrong_order", 1),  // b before a does not count; c needs b
        ("shuffled", 3),     // rows arrive out of time order
        ("restart", 2),      // the second a opens a window the first no longer covers
        ("never_starts", 0), // no step 1
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    assert_eq!(got, want);

    let bad = run(&mut p.cmd(&[
        "query",
        "SELECT funnel(3, now(), true) FROM (VALUES (1)) t(x)",
        "--quiet",
    ]));
    assert!(!bad.status.success());
    assert!(
        stderr(&bad).contains("the window between steps, an INTERVAL"),
        "{}",
        stderr(&bad)
    );
}

/// Six buyers whose RFM scores are worked out in the test below.
fn buyers() -> Vec<Ev> {
    let order = |id: &str, user: &'static str, ts: i64, revenue: f64| Ev {
        properties: Some(leak(format!(r#"{{"revenue": {revenue}}}"#))),
        ..track(id, user, "Order Completed", ts)
    };
    vec![
        order("b1-1", "b1", T0 + 9 * DAY, 100.0),
        order("b2-1", "b2", T0 + DAY, 50.0),
        order("b2-2", "b2", T0 + 2 * DAY, 50.0),
        order("b3-1", "b3", T0 + 5 * DAY, 10.0),
        order("b3-2", "b3", T0 + 6 * DAY, 10.0),
        order("b3-3", "b3", T0 + 7 * DAY, 10.0),
        order("b4-1", "b4", T0, 500.0),
        order("b5-1", "b5", T0 + 6 * DAY, 25.0),
        order("b5-2", "b5", T0 + 7 * DAY, 25.0),
        order("b5-3", "b5", T0 + 8 * DAY, 25.0),
        order("b5-4", "b5", T0 + 9 * DAY, 25.0),
        // Two orders on one day: two for RFM, one transaction for the models.
        order("b6-1", "b6", T0 + 3 * DAY + 10 * HOUR, 20.0),
        order("b6-2", "b6", T0 + 3 * DAY + 15 * HOUR, 20.0),
        // Not a purchase, and a purchase after the as-of time: neither counts.
        track("v1", "b1", "Product Viewed", T0 + 9 * DAY),
        order("late", "b4", T0 + 11 * DAY, 999.0),
    ]
}

/// `prediction_models` as `model.parameter` → value.
fn models_of(p: &TempProject) -> BTreeMap<String, f64> {
    p.query("SELECT model || '.' || parameter AS k, value FROM prediction_models WHERE value IS NOT NULL")
        .into_iter()
        .map(|r| (r["k"].as_str().expect("k").to_string(), f64_of(&r, "value")))
        .collect()
}

fn by_user(p: &TempProject, table: &str, columns: &str) -> BTreeMap<String, Value> {
    p.query(&format!(
        "SELECT g.identifier_value AS user_id, {columns} FROM {table} t JOIN identity_graph g \
           ON g.profile_id = t.profile_id AND g.identifier_type = 'user_id' ORDER BY user_id"
    ))
    .into_iter()
    .map(|r| (r["user_id"].as_str().expect("user").to_string(), r))
    .collect()
}

#[test]
fn rfm_scores_and_names_buyers_as_worked_out_by_hand() {
    let p = project(&[&buyers()], "");
    run_as_of(&p, AS_OF);
    let rfm = by_user(
        &p,
        "rfm",
        "t.recency_days, t.frequency, t.monetary, t.r_score, t.f_score, t.m_score, t.rfm_score, t.rfm_segment",
    );
    // Scores are 1 + floor(5 × percent_rank), ties sharing the lower rank:
    // recency (days, most recent best): b4 10, b2 8, b6 6.375, b3 3, b1 = b5 1
    // frequency: b1 = b4 1, b2 = b6 2, b3 3, b5 4; monetary: b3 30, b6 40, b1 = b2 = b5 100, b4 500.
    let want = [
        ("b1", 1.0, 1, 100.0, "513", "New Customers"),
        ("b2", 8.0, 2, 100.0, "233", "At Risk"),
        ("b3", 3.0, 3, 30.0, "451", "Loyal Customers"),
        ("b4", 10.0, 1, 500.0, "115", "Hibernating"),
        ("b5", 1.0, 4, 100.0, "553", "Champions"),
        ("b6", 6.375, 2, 40.0, "332", "Need Attention"),
    ];
    assert_eq!(rfm.len(), want.len(), "{rfm:#?}");
    for (user, recency, frequency, monetary, score, segment) in want {
        let row = &rfm[user];
        assert!(
            (f64_of(row, "recency_days") - recency).abs() < 1e-9,
            "{user}: {row}"
        );
        assert_eq!(row["frequency"], frequency, "{user}: {row}");
        assert_eq!(f64_of(row, "monetary"), monetary, "{user}: {row}");
        assert_eq!(row["rfm_score"], score, "{user}: {row}");
        assert_eq!(row["rfm_segment"], segment, "{user}: {row}");
    }
}

#[test]
fn predictions_summarise_each_buyer_and_give_probabilities() {
    let p = project(&[&buyers()], "");
    let report = run_as_of(&p, AS_OF);
    assert!(
        report["tables"]["predictions"]["rows"].as_u64() == Some(6),
        "{report}"
    );
    let predictions = by_user(
        &p,
        "predictions",
        "t.frequency, t.recency, t.age, t.monetary_value, t.expected_purchases_30d, \
         t.expected_purchases_90d, t.expected_purchases_365d, t.p_alive, t.churn_risk",
    );
    // (x, t_x, T) in weeks; b6's two orders share a day, b4's order after the as-of time is out.
    let want = [
        ("b1", 0, 0.0, 1.0 / 7.0, None),
        ("b2", 1, 1.0 / 7.0, 9.0 / 7.0, Some(50.0)),
        ("b3", 2, 2.0 / 7.0, 5.0 / 7.0, Some(10.0)),
        ("b4", 0, 0.0, 10.0 / 7.0, None),
        ("b5", 3, 3.0 / 7.0, 4.0 / 7.0, Some(25.0)),
        ("b6", 0, 0.0, 1.0, None),
    ];
    for (user, x, t_x, t, spend) in want {
        let row = &predictions[user];
        assert_eq!(row["frequency"], x, "{user}: {row}");
        assert!((f64_of(row, "recency") - t_x).abs() < 1e-9, "{user}: {row}");
        assert!((f64_of(row, "age") - t).abs() < 1e-9, "{user}: {row}");
        assert_eq!(row["monetary_value"].as_f64(), spend, "{user}: {row}");
        let alive = f64_of(row, "p_alive");
        assert!((0.0..=1.0).contains(&alive), "{user}: {row}");
        assert!((f64_of(row, "churn_risk") - (1.0 - alive)).abs() < 1e-12);
        let (e30, e90, e365) = (
            f64_of(row, "expected_purchases_30d"),
            f64_of(row, "expected_purchases_90d"),
            f64_of(row, "expected_purchases_365d"),
        );
        assert!(0.0 <= e30 && e30 <= e90 && e90 <= e365, "{user}: {row}");
    }
    // Without a repeat purchase BG/NBD says the buyer cannot have dropped out yet.
    assert_eq!(f64_of(&predictions["b1"], "p_alive"), 1.0);

    let models = models_of(&p);
    assert_eq!(models["bgnbd.customers"], 6.0);
    assert_eq!(models["bgnbd.time_unit_days"], 7.0);
    assert_eq!(models["gamma_gamma.customers"], 3.0);
    for k in ["bgnbd.r", "bgnbd.alpha", "bgnbd.a", "bgnbd.b"] {
        assert!(models[k] > 0.0, "{k}: {models:?}");
    }
}

/// The CDNOW transactions as purchase events (one per transaction, at midnight UTC).
fn cdnow_events() -> Vec<Ev> {
    let text = std::fs::read_to_string(repo().join("tests/fixtures/cdnow/CDNOW_sample.txt"))
        .expect("fixture");
    text.lines()
        .enumerate()
        .map(|(i, line)| {
            let cols: Vec<&str> = line.split_whitespace().collect();
            let date = chrono::NaiveDate::parse_from_str(cols[2], "%Y%m%d").expect("date");
            let ts = date
                .and_hms_opt(0, 0, 0)
                .expect("midnight")
                .and_utc()
                .timestamp_micros();
            let customer = leak(format!("c{}", cols[1]));
            Ev {
                properties: Some(leak(format!(r#"{{"revenue": {}}}"#, cols[4]))),
                ..track(&format!("t{i}"), customer, "Order Completed", ts)
            }
        })
        .collect()
}

fn within(got: f64, want: f64, share: f64) -> bool {
    ((got - want) / want).abs() <= share
}

#[test]
fn cdnow_transactions_through_a_run_reproduce_the_published_models() {
    let p = project(&[&cdnow_events()], "");
    // The calibration period ends 1997-09-30 (39 weeks after 1997-01-01).
    run_as_of(&p, "1997-09-30T00:00:00Z");
    let models = models_of(&p);
    assert_eq!(models["bgnbd.customers"], 2357.0);
    assert_eq!(models["gamma_gamma.customers"], 946.0);
    // Fader, Hardie & Lee (2005) and Fader & Hardie's Gamma-Gamma note.
    for (k, want) in [
        ("bgnbd.r", 0.243),
        ("bgnbd.alpha", 4.414),
        ("bgnbd.a", 0.793),
        ("bgnbd.b", 2.426),
        ("gamma_gamma.p", 6.25),
        ("gamma_gamma.q", 3.74),
        ("gamma_gamma.gamma", 15.44),
    ] {
        assert!(
            within(models[k], want, 0.005),
            "{k} = {} (want {want})",
            models[k]
        );
    }
    assert!(
        (models["bgnbd.log_likelihood"] + 9582.4).abs() < 1.0,
        "{models:?}"
    );
    // Customer 1: x = 2, t_x = 30.43, T = 38.86 weeks.
    let one = p.query(
        "SELECT t.frequency, t.recency, t.age, t.p_alive, t.monetary_value FROM predictions t \
         JOIN identity_graph g ON g.profile_id = t.profile_id \
         WHERE g.identifier_type = 'user_id' AND g.identifier_value = 'c0001'",
    );
    let one = &one[0];
    assert_eq!(one["frequency"], 2);
    assert!((f64_of(one, "recency") - 30.43).abs() < 0.01, "{one}");
    assert!((f64_of(one, "age") - 38.86).abs() < 0.01, "{one}");
    assert!((f64_of(one, "p_alive") - 0.7266).abs() < 0.002, "{one}");
    assert!(
        (f64_of(one, "monetary_value") - 22.35).abs() < 0.01,
        "{one}"
    );
}

#[test]
fn predict_fit_reads_a_summary_file_and_prints_the_published_parameters() {
    let p = TempProject::local();
    let fixtures = repo().join("tests/fixtures/cdnow");
    let text = ok(run(&mut p.cmd(&[
        "predict",
        "fit",
        "--summary",
        fixtures
            .join("summary_with_spend.csv")
            .to_str()
            .expect("utf-8"),
        "--json",
    ])));
    let fit: Value = serde_json::from_str(text.trim()).expect("JSON");
    let bg = &fit["bgnbd"];
    for (k, want) in [("r", 0.243), ("alpha", 4.414), ("a", 0.793), ("b", 2.426)] {
        assert!(within(f64_of(bg, k), want, 0.005), "{k}: {fit}");
    }
    assert!((f64_of(bg, "log_likelihood") + 9582.4).abs() < 0.1, "{fit}");
    let gg = &fit["gamma_gamma"];
    for (k, want) in [("p", 6.25), ("q", 3.74), ("gamma", 15.44)] {
        assert!(within(f64_of(gg, k), want, 0.005), "{k}: {fit}");
    }
    assert_eq!(gg["customers"], 946);

    // Without zbar: BG/NBD only, and the text output names the parameters.
    let text = ok(run(&mut p.cmd(&[
        "predict",
        "fit",
        "--summary",
        fixtures.join("summary.csv").to_str().expect("utf-8"),
    ])));
    assert!(
        text.contains("BG/NBD") && text.contains("r = 0.24"),
        "{text}"
    );
    assert!(text.contains("Gamma-Gamma  not fitted"), "{text}");

    // A file without the needed columns is refused with the column named.
    let bad = p.path().join("bad.csv");
    std::fs::write(&bad, "x,recency\n1,2\n").expect("write");
    let out = run(&mut p.cmd(&["predict", "fit", "--summary", bad.to_str().expect("utf-8")]));
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("no column `t_x`") && stderr(&out).contains("bad.csv"),
        "{}",
        stderr(&out)
    );
    // A customer whose last purchase comes after the end of observation is named.
    std::fs::write(&bad, "x,t_x,T\n1,2,3\n2,5,4\n").expect("write");
    let out = run(&mut p.cmd(&["predict", "fit", "--summary", bad.to_str().expect("utf-8")]));
    assert!(!out.status.success());
    assert!(stderr(&out).contains("bad.csv"), "{}", stderr(&out));
}
