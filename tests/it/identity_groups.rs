//! Identity by connected groups: an incremental run resolves only the groups its new events
//! reach, from the links kept in `_state/identity_*`, and its identity tables and each event's
//! profile equal a fresh `--full` run's. The cases aim at what could tell a group apart from
//! the whole graph: a `user_id` limit that a late event decides the other way (an identifier
//! moves: a split of one profile, a merge into another), shared values over `max_links`,
//! blocklisted and invalid values, and two identity queries whose links tie on time.

use std::collections::BTreeMap;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::common::*;

const MINUTE: i64 = 60_000_000;
/// 2026-11-01T00:00:00Z in µs.
const NOV_1: i64 = 1_793_491_200_000_000;

const CONFIG: &str = r#"
[storage]
events = "data/events"
output = "out"

[identity]
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
max_links = 4
"#;

/// Links from every event, and from sign-ups a second way (the e-mail in the properties), so
/// two queries give links of the same time.
fn project() -> TempProject {
    let p = TempProject::new(CONFIG);
    let dir = p.path().join("queries/identity");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("events.sql"),
        "SELECT message_id, anonymous_id, user_id, json_get_str(traits, 'email') AS email, \
         \"timestamp\" AS seen_at FROM events",
    )
    .unwrap();
    std::fs::write(
        dir.join("signups.sql"),
        "SELECT anonymous_id, json_get_str(properties, 'email') AS email, \"timestamp\" AS seen_at \
         FROM events WHERE event = 'Signed Up'",
    )
    .unwrap();
    p
}

fn leak(s: String) -> &'static str {
    Box::leak(s.into_boxed_str())
}

fn as_of() -> String {
    chrono::DateTime::from_timestamp_micros(NOV_1)
        .unwrap()
        .to_rfc3339()
}

/// Runs `tessera run -v` and returns its log.
fn run_logged(p: &TempProject, extra: &[&str]) -> String {
    let as_of = as_of();
    let mut args = vec!["run", "-v", "--as-of", as_of.as_str()];
    args.extend_from_slice(extra);
    let out = run(&mut p.cmd(&args));
    let log = stderr(&out);
    ok(out);
    log
}

/// The value of `key=` on the first log line holding `message`.
fn logged(log: &str, message: &str, key: &str) -> Option<u64> {
    let line = log.lines().find(|l| l.contains(message))?;
    let at = line.find(&format!("{key}="))? + key.len() + 1;
    line[at..]
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

/// What identity published, as sorted text rows: the graph, the accepted and refused links,
/// and each event's profile.
fn identity_tables(p: &TempProject) -> BTreeMap<&'static str, Vec<serde_json::Value>> {
    let mut out = BTreeMap::new();
    for (name, sql) in [
        (
            "identity_graph",
            "SELECT identifier_type, identifier_value, profile_id, first_seen, last_seen FROM identity_graph",
        ),
        ("identity_links", "SELECT * FROM identity_links"),
        ("identity_conflicts", "SELECT * FROM identity_conflicts"),
        ("events", "SELECT message_id, profile_id FROM events"),
    ] {
        out.insert(name, p.query(sql));
    }
    out
}

/// `mine` with its profile ids renamed to `theirs`', asserting the two group identifiers one
/// to one. An incremental run keeps the id a profile had (the oldest surviving a merge); a
/// fresh run names each profile after its oldest identifier.
fn renamed(
    mine: BTreeMap<&'static str, Vec<serde_json::Value>>,
    theirs: &BTreeMap<&'static str, Vec<serde_json::Value>>,
    what: &str,
) -> BTreeMap<&'static str, Vec<String>> {
    let profile_of = |rows: &[serde_json::Value]| -> BTreeMap<(String, String), String> {
        rows.iter()
            .map(|r| {
                let text = |k: &str| r[k].as_str().unwrap_or_default().to_string();
                (
                    (text("identifier_type"), text("identifier_value")),
                    text("profile_id"),
                )
            })
            .collect()
    };
    let (a, b) = (
        profile_of(&mine["identity_graph"]),
        profile_of(&theirs["identity_graph"]),
    );
    assert_eq!(
        a.keys().collect::<Vec<_>>(),
        b.keys().collect::<Vec<_>>(),
        "{what}: the same identifiers"
    );
    let (mut to, mut back) = (BTreeMap::new(), BTreeMap::new());
    for (identifier, id) in &a {
        let theirs = &b[identifier];
        let one = to.entry(id.clone()).or_insert_with(|| theirs.clone()) == theirs
            && back.entry(theirs.clone()).or_insert_with(|| id.clone()) == id;
        assert!(one, "{what}: {identifier:?} is grouped differently");
    }
    mine.into_iter()
        .map(|(table, rows)| {
            let mut rows: Vec<String> = rows
                .into_iter()
                .map(|mut r| {
                    if let Some(p) = r.get_mut("profile_id") {
                        if let Some(id) = p.as_str().and_then(|s| to.get(s)) {
                            *p = serde_json::Value::String(id.clone());
                        }
                    }
                    r.to_string()
                })
                .collect();
            rows.sort();
            (table, rows)
        })
        .collect()
}

/// Compares `p`'s identity tables with those of a fresh `--full` run of the same files.
fn assert_equals_full(p: &TempProject, what: &str) {
    let config = std::fs::read_to_string(p.path().join("tessera.toml")).unwrap();
    let full = TempProject::new(&config);
    copy_dir(&p.path().join("queries"), &full.path().join("queries"));
    copy_dir(&p.events(), &full.events());
    run_logged(&full, &["--full"]);
    let theirs = identity_tables(&full);
    let mine = renamed(identity_tables(p), &theirs, what);
    let theirs = renamed(theirs.clone(), &theirs, what);
    for (table, rows) in &mine {
        assert!(
            rows == &theirs[table],
            "{what}: {table} differs from a fresh --full run:\nincremental {rows:#?}\nfull {:#?}",
            theirs[table]
        );
    }
}

fn signup(id: &'static str, ts: i64, anonymous: &'static str, email: &str) -> Ev {
    Ev {
        event: Some("Signed Up"),
        anonymous_id: Some(anonymous),
        properties: Some(leak(format!(r#"{{"email": "{email}"}}"#))),
        ..Ev::track(id, ts)
    }
}

#[test]
fn a_late_event_that_decides_a_limit_the_other_way_moves_the_identifier_as_a_full_run_does() {
    let p = project();
    let t = NOV_1 - 60 * MINUTE;
    // anon-a is seen with user-1 first: it joins user-1; user-2 is refused on it.
    let first = [
        Ev {
            anonymous_id: Some("anon-a"),
            ..Ev::track("m1", t)
        }
        .with_user("user-1"),
        Ev {
            anonymous_id: Some("anon-a"),
            ..Ev::track("m2", t + 10 * MINUTE)
        }
        .with_user("user-2"),
        Ev {
            anonymous_id: Some("anon-b"),
            ..Ev::track("m3", t + 20 * MINUTE)
        }
        .with_user("user-3"),
    ];
    write_parquet(&p.events().join("part-0.parquet"), &[events_batch(&first)]);
    let log = run_logged(&p, &[]);
    assert!(log.contains("identity: resolving every group"), "{log}");
    let before = p.query(
        "SELECT profile_id FROM identity_graph WHERE identifier_value IN ('anon-a', 'user-1')",
    );
    assert_eq!(before.len(), 2);
    assert_eq!(before[0], before[1], "anon-a starts with user-1");

    // A late event: anon-a with user-2 an hour before anything else. user-2's link is now the
    // older one, so the limit keeps it and refuses user-1: anon-a leaves user-1's profile.
    let late = [Ev {
        anonymous_id: Some("anon-a"),
        ..Ev::track("m4", t - 60 * MINUTE)
    }
    .with_user("user-2")];
    write_parquet(&p.events().join("part-1.parquet"), &[events_batch(&late)]);
    let plan = ok(run(&mut p.cmd(&["plan", "--as-of", &as_of()])));
    assert!(
        plan.contains(
            "recompute identity: upstream `events` recomputed [over the groups new events reach]"
        ),
        "{plan}"
    );
    let log = run_logged(&p, &[]);
    assert_eq!(
        logged(
            &log,
            "identity: resolved only the groups the new events reach",
            "groups"
        ),
        Some(1),
        "one group (anon-a, user-1, user-2) is resolved again, not anon-b's:\n{log}"
    );
    let moved = p.query(
        "SELECT identifier_value FROM identity_graph WHERE profile_id = \
         (SELECT profile_id FROM identity_graph WHERE identifier_value = 'anon-a') \
         ORDER BY identifier_value",
    );
    let values: Vec<&str> = moved
        .iter()
        .map(|r| r["identifier_value"].as_str().unwrap())
        .collect();
    assert_eq!(values, ["anon-a", "user-2"]);
    assert_equals_full(&p, "after the late event");
}

#[test]
fn a_shared_value_stays_apart_and_a_new_event_naming_it_resolves_only_its_neighbours() {
    let p = project();
    let t = NOV_1 - 600 * MINUTE;
    // kiosk is seen with six people's user ids: over max_links (4), it links nobody.
    let mut rows = Vec::new();
    for i in 0..6 {
        rows.push(
            Ev {
                anonymous_id: Some("kiosk"),
                ..Ev::track(leak(format!("k{i}")), t + i * MINUTE)
            }
            .with_user(leak(format!("user-{i}"))),
        );
        rows.push(
            Ev {
                anonymous_id: Some(leak(format!("own-{i}"))),
                ..Ev::track(leak(format!("o{i}")), t + i * MINUTE + 1)
            }
            .with_user(leak(format!("user-{i}"))),
        );
    }
    write_parquet(&p.events().join("part-0.parquet"), &[events_batch(&rows)]);
    run_logged(&p, &[]);
    let kiosk =
        p.query("SELECT count(*) AS n FROM identity_graph WHERE identifier_value = 'kiosk'");
    assert_eq!(kiosk[0]["n"], 0, "a shared value is in no profile");

    // One more kiosk event, of a seventh person: the kiosk's own group and the new person's
    // are resolved again, not the six people the kiosk was seen with.
    let more = [Ev {
        anonymous_id: Some("kiosk"),
        ..Ev::track("k6", t + 100 * MINUTE)
    }
    .with_user("user-6")];
    write_parquet(&p.events().join("part-1.parquet"), &[events_batch(&more)]);
    let log = run_logged(&p, &[]);
    let identifiers = logged(
        &log,
        "identity: resolved only the groups the new events reach",
        "identifiers",
    );
    assert_eq!(
        identifiers,
        Some(2),
        "only kiosk and user-6 are resolved again:\n{log}"
    );
    assert_equals_full(&p, "after the kiosk event");
}

#[test]
fn random_batches_resolved_by_groups_equal_a_full_run() {
    let seed: u64 = match std::env::var("TESSERA_TEST_GROUPS_SEED") {
        Ok(s) => s.parse().expect("a number"),
        Err(_) => rand::thread_rng().gen::<u32>() as u64,
    };
    eprintln!("identity groups vs full: seed {seed} (TESSERA_TEST_GROUPS_SEED={seed} repeats it)");
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let p = project();
    let mut next = 0u32;
    let emails = [
        "p{}@example.com",
        "TEST@test.com",
        "not an email",
        " P{}@Example.com ",
    ];
    let mut event = |rng: &mut ChaCha8Rng, from: i64, until: i64| -> Ev {
        next += 1;
        let person = rng.gen_range(0..12u32);
        let ts = rng.gen_range(from..until);
        let anonymous = match rng.gen_range(0..10) {
            // Shared now and then: over max_links after a while.
            0 => "kiosk".to_string(),
            // Someone else's device: merges, or limits refusing them.
            1 => format!("anon-{}", rng.gen_range(0..12u32)),
            _ => format!("anon-{person}"),
        };
        let mut ev = Ev {
            anonymous_id: Some(leak(anonymous)),
            ..Ev::track(leak(format!("m{next}")), ts)
        };
        if rng.gen_bool(0.4) {
            // A second user id for a person now and then: the limit refuses one of them.
            let user = person + 12 * u32::from(rng.gen_bool(0.15));
            ev.user_id = Some(leak(format!("user-{user}")));
        }
        let email = emails[rng.gen_range(0..emails.len())].replace("{}", &person.to_string());
        match rng.gen_range(0..6) {
            0 => {
                ev.kind = Some("identify");
                ev.event = None;
                ev.traits = Some(leak(format!(r#"{{"email": "{email}"}}"#)));
            }
            1 => ev = signup(ev.message_id.unwrap(), ts, ev.anonymous_id.unwrap(), &email),
            _ => {}
        }
        ev
    };
    let day = 24 * 60 * MINUTE;
    let first: Vec<Ev> = (0..40)
        .map(|_| event(&mut rng, NOV_1 - 10 * day, NOV_1 - 2 * day))
        .collect();
    write_parquet(&p.events().join("part-0.parquet"), &[events_batch(&first)]);
    run_logged(&p, &[]);
    let mut groups_runs = 0;
    for step in 1..=3 {
        // New events, and late ones from before everything else (they decide limits again).
        let mut rows: Vec<Ev> = (0..8)
            .map(|_| event(&mut rng, NOV_1 - 2 * day, NOV_1))
            .collect();
        rows.extend((0..4).map(|_| event(&mut rng, NOV_1 - 12 * day, NOV_1 - 10 * day)));
        write_parquet(
            &p.events().join(format!("part-{step}.parquet")),
            &[events_batch(&rows)],
        );
        let log = run_logged(&p, &[]);
        if log.contains("identity: resolved only the groups the new events reach") {
            groups_runs += 1;
        }
        assert_equals_full(&p, &format!("seed {seed}, step {step}"));
    }
    assert_eq!(groups_runs, 3, "every incremental run resolved by groups");
}

#[test]
fn identity_resolves_every_group_when_the_groups_cannot_be_trusted_and_says_why() {
    let p = project();
    let t = NOV_1 - 60 * MINUTE;
    let mut part = 0;
    let mut add = |p: &TempProject, rows: &[Ev]| {
        write_parquet(
            &p.events().join(format!("part-{part}.parquet")),
            &[events_batch(rows)],
        );
        part += 1;
    };
    add(
        &p,
        &[Ev {
            anonymous_id: Some("anon-a"),
            ..Ev::track("m1", t)
        }
        .with_user("user-1")],
    );
    run_logged(&p, &[]);
    let signups = p.path().join("queries/identity/signups.sql");
    let row_wise = std::fs::read_to_string(&signups).unwrap();

    // A query that aggregates over events: its rows for old events can change with new ones.
    std::fs::write(
        &signups,
        "SELECT anonymous_id, min(json_get_str(properties, 'email')) AS email FROM events \
         WHERE event = 'Signed Up' GROUP BY anonymous_id",
    )
    .unwrap();
    add(&p, &[signup("m2", t + MINUTE, "anon-a", "a@example.com")]);
    let plan = ok(run(&mut p.cmd(&["plan", "--as-of", &as_of()])));
    assert!(
        plan.contains(
            "[over every event: identity query queries/identity/signups.sql is not row-wise"
        ),
        "{plan}"
    );
    let log = run_logged(&p, &[]);
    assert!(
        log.contains("resolving every group") && log.contains("not row-wise"),
        "an aggregating query resolves everything:\n{log}"
    );
    assert_equals_full(&p, "with an aggregating identity query");

    // Back to the row-wise query: the groups kept before no longer match the graph.
    std::fs::write(&signups, &row_wise).unwrap();
    add(
        &p,
        &[signup("m3", t + 2 * MINUTE, "anon-b", "b@example.com")],
    );
    let log = run_logged(&p, &[]);
    assert!(
        log.contains("resolving every group")
            && log.contains("identity_graph changed since the groups were kept"),
        "groups older than the graph are not used:\n{log}"
    );

    // Changed rules: every decision may change.
    let config = std::fs::read_to_string(p.path().join("tessera.toml")).unwrap();
    std::fs::write(
        p.path().join("tessera.toml"),
        config.replace("limit = 2", "limit = 3"),
    )
    .unwrap();
    add(
        &p,
        &[signup("m4", t + 3 * MINUTE, "anon-c", "c@example.com")],
    );
    let log = run_logged(&p, &[]);
    assert!(
        log.contains("resolving every group")
            && log.contains("identity rules, the identity queries"),
        "changed rules resolve everything:\n{log}"
    );
    add(
        &p,
        &[signup("m5", t + 4 * MINUTE, "anon-c", "c2@example.com")],
    );
    let log = run_logged(&p, &[]);
    assert!(
        log.contains("identity: resolved only the groups the new events reach"),
        "the run after keeps to the groups:\n{log}"
    );
    assert_equals_full(&p, "after changed rules");

    // `tessera forget` rewrites the graph and the history: the kept groups may hold the
    // person's links, so the next run resolves everything.
    ok(run(&mut p.cmd(&["forget", "user_id:user-1", "--quiet"])));
    add(
        &p,
        &[signup("m6", t + 5 * MINUTE, "anon-d", "d@example.com")],
    );
    let log = run_logged(&p, &[]);
    assert!(
        log.contains("resolving every group") && log.contains("changed since the groups were kept"),
        "after forget everything is resolved:\n{log}"
    );
    let gone = p.query(
        "SELECT count(*) AS n FROM identity_graph WHERE identifier_value IN ('anon-a', 'user-1')",
    );
    assert_eq!(gone[0]["n"], 0);

    add(
        &p,
        &[signup("m7", t + 6 * MINUTE, "anon-e", "e@example.com")],
    );
    let log = run_logged(&p, &["--full"]);
    assert!(
        log.contains("resolving every group") && log.contains("a full run"),
        "{log}"
    );
}
