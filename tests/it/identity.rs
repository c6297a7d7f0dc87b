//! Identity resolution through the real binary: the SQL contract, stable ids and merges,
//! events with profile_id, explain, and accuracy on generated data.

use crate::common::*;

const DAY: i64 = 86_400_000_000;
const T0: i64 = 1_790_000_000_000_000;

const RULES: &str = r#"
[storage]
events = "data/events"
output = "out"

[[identity.identifiers]]
name = "user_id"
limit = 1
[[identity.identifiers]]
name = "email"
normalize = "email"
limit = 2
blocklist = ["test@test.com"]
[[identity.identifiers]]
name = "anonymous_id"
max_links = 5
"#;

const LINKS_SQL: &str = "SELECT message_id, anonymous_id, user_id, json_get_str(traits, 'email') AS email, \"timestamp\" AS seen_at FROM events";

fn project() -> TempProject {
    let p = TempProject::new(RULES);
    std::fs::create_dir_all(p.path().join("queries/identity")).unwrap();
    std::fs::write(p.path().join("queries/identity/events.sql"), LINKS_SQL).unwrap();
    p
}

fn identify(
    id: &'static str,
    anon: &'static str,
    user: Option<&'static str>,
    traits: &'static str,
    ts: i64,
) -> Ev {
    Ev {
        kind: Some("identify"),
        event: None,
        anonymous_id: Some(anon),
        user_id: user,
        traits: Some(traits),
        ..Ev::track(id, ts)
    }
}

fn profile_of(p: &TempProject, kind: &str, value: &str) -> String {
    let rows = p.query(&format!(
        "SELECT profile_id FROM identity_graph WHERE identifier_type = '{kind}' AND identifier_value = '{value}'"
    ));
    assert_eq!(rows.len(), 1, "{kind}:{value} → {rows:?}");
    rows[0]["profile_id"].as_str().unwrap().to_string()
}

#[test]
fn a_merge_keeps_the_older_profile_id_and_records_the_other() {
    let p = project();
    // Day 1: Ann signs up on her laptop; later that day someone subscribes from a phone.
    write_parquet(
        &p.events().join("d1.parquet"),
        &[events_batch(&[
            identify(
                "m1",
                "laptop",
                Some("u-ann"),
                r#"{"email": " Ann@Example.com"}"#,
                T0,
            ),
            Ev {
                anonymous_id: Some("laptop"),
                ..Ev::track("m2", T0 + 10)
            },
            identify(
                "m3",
                "phone",
                None,
                r#"{"email": "ann.mobile@example.com"}"#,
                T0 + 3_600_000_000,
            ),
        ])],
    );
    let first = p.run_json();
    assert_eq!(first["identity"]["profiles"], 2, "{first}");
    let ann = profile_of(&p, "user_id", "u-ann");
    let phone = profile_of(&p, "anonymous_id", "phone");
    assert_ne!(ann, phone);
    assert_eq!(
        profile_of(&p, "email", "ann@example.com"),
        ann,
        "email normalised and linked"
    );

    // The same input again: identical graph, no merges.
    let again = p.run_json();
    assert_eq!(again["identity"]["profiles_merged"], 0);
    assert_eq!(profile_of(&p, "user_id", "u-ann"), ann);

    // Day 2: Ann logs in on the phone. Her older profile absorbs the phone's.
    write_parquet(
        &p.events().join("d2.parquet"),
        &[events_batch(&[identify(
            "m4",
            "phone",
            Some("u-ann"),
            "{}",
            T0 + DAY,
        )])],
    );
    let merged = p.run_json();
    assert_eq!(merged["identity"]["profiles"], 1, "{merged}");
    assert_eq!(merged["identity"]["profiles_merged"], 1);
    for (kind, value) in [
        ("user_id", "u-ann"),
        ("anonymous_id", "phone"),
        ("email", "ann.mobile@example.com"),
        ("anonymous_id", "laptop"),
    ] {
        assert_eq!(profile_of(&p, kind, value), ann, "{kind}:{value}");
    }
    let merges = p.query("SELECT merged_profile_id, into_profile_id, run_id FROM profile_merges");
    assert_eq!(merges.len(), 1);
    assert_eq!(merges[0]["merged_profile_id"], phone.as_str());
    assert_eq!(merges[0]["into_profile_id"], ann.as_str());
    assert_eq!(merges[0]["run_id"], merged["run_id"]);
}

#[test]
fn refused_links_are_recorded_with_their_reason() {
    let p = project();
    let mut rows = vec![
        // A shared laptop: a second user_id is refused by the limit.
        identify("a1", "shared-laptop", Some("u-1"), "{}", T0),
        identify("a2", "shared-laptop", Some("u-2"), "{}", T0 + 1),
        // A placeholder email links nothing.
        identify(
            "a3",
            "dev-3",
            None,
            r#"{"email": "TEST@test.com "}"#,
            T0 + 2,
        ),
    ];
    // A broken SDK's constant id seen with many users: over max_links, it links nothing.
    let users = ["k1", "k2", "k3", "k4", "k5", "k6", "k7"];
    for (i, u) in users.iter().enumerate() {
        rows.push(identify(
            ["b1", "b2", "b3", "b4", "b5", "b6", "b7"][i],
            "0000",
            Some(u),
            "{}",
            T0 + 10 + i as i64,
        ));
    }
    write_parquet(&p.events().join("e.parquet"), &[events_batch(&rows)]);
    p.run_json();
    let conflicts = p.query("SELECT identifier_type, identifier_value, other_value, reason, query FROM identity_conflicts ORDER BY reason, other_value");
    let reasons: Vec<String> = conflicts
        .iter()
        .map(|c| c["reason"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        reasons
            .iter()
            .filter(|r| *r == "max_links exceeded")
            .count(),
        7,
        "{conflicts:?}"
    );
    assert!(reasons.contains(&"limit: user_id (1)".to_string()));
    assert!(reasons.contains(&"blocklisted".to_string()));
    let limit = conflicts
        .iter()
        .find(|c| c["reason"] == "limit: user_id (1)")
        .unwrap();
    assert_eq!(limit["identifier_value"], "shared-laptop");
    assert_eq!(limit["other_value"], "u-2");
    assert_eq!(limit["query"], "queries/identity/events.sql");
    let blocked = conflicts
        .iter()
        .find(|c| c["reason"] == "blocklisted")
        .unwrap();
    assert_eq!(blocked["identifier_value"], "test@test.com");
    // Every user is its own profile; the constant id has none.
    let shared =
        p.query("SELECT count(*) AS n FROM identity_graph WHERE identifier_value = '0000'");
    assert_eq!(shared[0]["n"], 0);
    assert_ne!(
        profile_of(&p, "user_id", "u-1"),
        profile_of(&p, "user_id", "u-2")
    );
    assert_ne!(
        profile_of(&p, "user_id", "k1"),
        profile_of(&p, "user_id", "k2")
    );
}

#[test]
fn identity_queries_that_break_the_contract_name_the_file_and_column() {
    let p = project();
    write_parquet(
        &p.events().join("e.parquet"),
        &[events_batch(&[Ev::track("x", T0)])],
    );
    std::fs::write(
        p.path().join("queries/identity/extra.sql"),
        "SELECT anonymous_id, event AS device FROM events",
    )
    .unwrap();
    let out = run(&mut p.cmd(&["run", "--quiet"]));
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(
        err.contains("queries/identity/extra.sql")
            && err.contains("`device`")
            && err.contains("user_id, email, anonymous_id"),
        "{err}"
    );

    std::fs::write(
        p.path().join("queries/identity/extra.sql"),
        "SELECT anonymous_id FROM no_such_table",
    )
    .unwrap();
    let out = run(&mut p.cmd(&["run", "--quiet"]));
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("queries/identity/extra.sql")
            && stderr(&out).contains("no_such_table"),
        "{}",
        stderr(&out)
    );
}

#[tokio::test]
async fn events_seen_by_later_sql_carry_profile_id() {
    let p = project();
    write_parquet(
        &p.events().join("e.parquet"),
        &[events_batch(&[
            identify("m1", "laptop", Some("u-ann"), "{}", T0),
            Ev {
                anonymous_id: Some("laptop"),
                ..Ev::track("m2", T0 + 5)
            },
            Ev {
                anonymous_id: Some("0000"),
                user_id: None,
                ..Ev::track("m3", T0 + 6)
            },
            // Only a blocklisted email: nothing ties this event to anyone.
            Ev {
                anonymous_id: None,
                kind: Some("identify"),
                traits: Some(r#"{"email": "test@test.com"}"#),
                ..Ev::track("m4", T0 + 7)
            },
        ])],
    );
    let project = tessera::config::Project::load(p.path()).unwrap();
    let engine = tessera::engine::Engine::open(project).await.unwrap();
    let report = tessera::pipeline::run_on(
        &engine,
        &Default::default(),
        tessera::progress::Progress::hidden(),
    )
    .await
    .unwrap();
    assert_eq!(report.events_without_profile, 1);
    let batches = engine
        .ctx
        .sql("SELECT message_id, profile_id FROM events ORDER BY message_id")
        .await
        .unwrap()
        .collect()
        .await
        .unwrap();
    let text = arrow::util::pretty::pretty_format_batches(&batches)
        .unwrap()
        .to_string();
    let ann = profile_of(&p, "user_id", "u-ann");
    let zero = profile_of(&p, "anonymous_id", "0000");
    assert!(text.contains(&format!("| m1         | {ann} |")), "{text}");
    assert!(text.contains(&format!("| m2         | {ann} |")), "{text}");
    assert!(text.contains(&format!("| m3         | {zero} |")), "{text}");
    assert!(
        text.contains("| m4         |                    |"),
        "{text}"
    );

    // `tessera query` after the run sees the same profile_id on events.
    let rows = p.query("SELECT message_id, profile_id FROM events ORDER BY message_id");
    assert_eq!(
        rows,
        vec![
            serde_json::json!({"message_id": "m1", "profile_id": ann}),
            serde_json::json!({"message_id": "m2", "profile_id": ann}),
            serde_json::json!({"message_id": "m3", "profile_id": zero}),
            serde_json::json!({"message_id": "m4"}),
        ]
    );
}

#[test]
fn explain_shows_the_profile_links_and_refusals() {
    let p = project();
    write_parquet(
        &p.events().join("e.parquet"),
        &[events_batch(&[
            identify(
                "m1",
                "laptop",
                Some("u-ann"),
                r#"{"email": "ann@example.com"}"#,
                T0,
            ),
            identify("m2", "laptop", Some("u-bob"), "{}", T0 + DAY),
        ])],
    );
    p.run_json();
    let text = ok(run(&mut p.cmd(&["explain", "email: ANN@example.com"])));
    let ann = profile_of(&p, "user_id", "u-ann");
    assert!(
        text.contains(&format!(
            "email:ann@example.com belongs to profile {ann} (3 identifiers"
        )),
        "{text}"
    );
    assert!(text.contains("user_id:u-ann"), "{text}");
    assert!(
        text.contains("anonymous_id:laptop") && text.contains("by queries/identity/events.sql"),
        "{text}"
    );
    assert!(
        text.contains("✗ anonymous_id:laptop → user_id:u-bob   limit: user_id (1)"),
        "{text}"
    );

    let json: serde_json::Value = serde_json::from_str(&ok(run(&mut p.cmd(&[
        "explain",
        "user_id:u-ann",
        "--json",
    ]))))
    .unwrap();
    assert_eq!(json["profile_id"], ann.as_str());
    assert_eq!(json["identifiers"].as_array().unwrap().len(), 3);
    assert_eq!(json["links"].as_array().unwrap().len(), 2);
    assert_eq!(json["refused"][0]["reason"], "limit: user_id (1)");

    let none = ok(run(&mut p.cmd(&["explain", "email:test@test.com"])));
    assert!(none.contains("has no profile: blocklisted"), "{none}");
    let bad = run(&mut p.cmd(&["explain", "phone:123"]));
    assert_eq!(bad.status.code(), Some(2));
    assert!(
        stderr(&bad).contains("user_id, email, anonymous_id"),
        "{}",
        stderr(&bad)
    );
}

#[test]
fn bundled_rules_are_accurate_on_generated_data() {
    let p = TempProject::local();
    std::fs::copy(repo().join("tessera.toml"), p.path().join("tessera.toml")).unwrap();
    std::fs::create_dir_all(p.path().join("queries/identity")).unwrap();
    std::fs::copy(
        repo().join("queries/identity/events.sql"),
        p.path().join("queries/identity/events.sql"),
    )
    .unwrap();
    generate(&p.path().join("data"), 4000, 30, 99);
    p.run_json();
    let out = ok(run(&mut p.cmd(&["accuracy", "--json", "--quiet"])));
    let acc: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let precision = acc["precision"].as_f64().unwrap();
    let recall = acc["recall"].as_f64().unwrap();
    assert!(
        acc["identifiers_compared"].as_u64().unwrap() > 10_000,
        "{acc}"
    );
    assert!(precision >= 0.995, "precision {precision}: {acc}");
    assert!(recall >= 0.99, "recall {recall}: {acc}");
    assert!(
        precision < 1.0,
        "the generator's shared family devices must cost some precision: {acc}"
    );
}
