//! `tessera export segment`: hashed exports hold no personal data in clear, CSV cells a
//! spreadsheet would run come out neutralised, exports may not land in Tessera's own folders,
//! and phone numbers follow libphonenumber's rules.

use std::collections::BTreeSet;
use std::path::Path;

use arrow::array::{Array, AsArray};
use arrow::datatypes::DataType;
use sha2::{Digest, Sha256};

use crate::common::*;

/// 2026-10-01T00:00:00Z in µs.
const T0: i64 = 1_790_812_800_000_000;

fn sha256(text: &str) -> String {
    Sha256::digest(text.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The fields of a CSV file (RFC 4180 quoting), row by row, header included.
fn csv_rows(text: &str) -> Vec<Vec<String>> {
    let mut rows = Vec::new();
    let mut row = Vec::new();
    let mut field = String::new();
    let mut quoted = false;
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match (quoted, c) {
            (true, '"') if chars.peek() == Some(&'"') => {
                field.push('"');
                chars.next();
            }
            (true, '"') => quoted = false,
            (true, c) => field.push(c),
            (false, '"') => quoted = true,
            (false, ',') => row.push(std::mem::take(&mut field)),
            (false, '\n') => {
                row.push(std::mem::take(&mut field));
                rows.push(std::mem::take(&mut row));
            }
            (false, c) => field.push(c),
        }
    }
    if !field.is_empty() || !row.is_empty() {
        row.push(field);
        rows.push(row);
    }
    rows
}

/// Every cell of a Parquet file as text (list elements one by one), column names included.
fn parquet_cells(path: &Path) -> Vec<String> {
    let file = std::fs::File::open(path).unwrap();
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
        .unwrap()
        .build()
        .unwrap();
    let mut cells = Vec::new();
    for batch in reader {
        let batch = batch.unwrap();
        for (field, column) in batch.schema().fields().iter().zip(batch.columns()) {
            cells.push(field.name().clone());
            let values = match column.data_type() {
                DataType::List(_) => column.as_list::<i32>().values().clone(),
                _ => column.clone(),
            };
            let text = arrow::compute::cast(&values, &DataType::Utf8).unwrap();
            cells.extend(text.as_string::<i32>().iter().flatten().map(str::to_string));
        }
    }
    cells
}

fn is_digest(cell: &str) -> bool {
    cell.len() == 64 && cell.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Plain text of a JSON query result (lists flattened, nulls skipped).
fn texts(value: &serde_json::Value, into: &mut BTreeSet<String>) {
    match value {
        serde_json::Value::String(s) if !s.trim().is_empty() => {
            into.insert(s.trim().to_lowercase());
        }
        serde_json::Value::Array(items) => items.iter().for_each(|v| texts(v, into)),
        _ => {}
    }
}

/// The personal data of a segment's members, read with `tessera query` from `profiles`,
/// `identity_graph` and the raw identify traits in `events` (as people typed them).
struct Plaintext {
    /// Emails, phones (E.164, without "+", and as typed), user and anonymous ids: matched
    /// anywhere inside a cell.
    identifiers: BTreeSet<String>,
    /// First and last names: matched as whole words.
    names: BTreeSet<String>,
    /// Normalised emails and E.164 phones, whose digests the export must hold.
    emails: BTreeSet<String>,
    phones: BTreeSet<String>,
}

fn plaintext_of_members(p: &TempProject, segment: &str) -> Plaintext {
    let members = format!("SELECT profile_id FROM segments.{segment}");
    let profiles = p.query(&format!(
        "SELECT emails, phones, user_ids, anonymous_ids, first_name, last_name FROM profiles \
         WHERE profile_id IN ({members})"
    ));
    let typed = p.query(&format!(
        "SELECT json_get_str(e.traits, 'email') AS email, json_get_str(e.traits, 'phone') AS phone, \
                json_get_str(e.traits, 'first_name') AS first_name, \
                json_get_str(e.traits, 'last_name') AS last_name, e.user_id, e.anonymous_id \
         FROM events e JOIN identity_graph g \
           ON g.identifier_type = 'anonymous_id' AND g.identifier_value = e.anonymous_id \
         WHERE g.profile_id IN ({members})"
    ));
    let mut found = Plaintext {
        identifiers: BTreeSet::new(),
        names: BTreeSet::new(),
        emails: BTreeSet::new(),
        phones: BTreeSet::new(),
    };
    for row in profiles.iter().chain(&typed) {
        for key in [
            "emails",
            "email",
            "user_ids",
            "user_id",
            "anonymous_ids",
            "anonymous_id",
        ] {
            texts(&row[key], &mut found.identifiers);
        }
        for key in ["phones", "phone"] {
            texts(&row[key], &mut found.identifiers);
        }
        for key in ["first_name", "last_name"] {
            let mut names = BTreeSet::new();
            texts(&row[key], &mut names);
            for name in names {
                found
                    .names
                    .extend(name.split_whitespace().map(str::to_string));
            }
        }
    }
    for row in &profiles {
        texts(&row["emails"], &mut found.emails);
        texts(&row["phones"], &mut found.phones);
    }
    for phone in &found.phones.clone() {
        found
            .identifiers
            .insert(phone.trim_start_matches('+').to_string());
    }
    found
}

/// Every cell that holds a member's personal data in clear.
fn leaks(cells: &[String], plain: &Plaintext) -> Vec<String> {
    let mut leaks = Vec::new();
    for cell in cells {
        for part in std::iter::once(cell.as_str()).chain(cell.split(';')) {
            if is_digest(part) || part.is_empty() {
                continue;
            }
            let lower = part.to_lowercase();
            if let Some(hit) = plain
                .identifiers
                .iter()
                .find(|v| lower.contains(v.as_str()))
            {
                leaks.push(format!("{hit:?} in {part:?}"));
            }
            let words: BTreeSet<&str> = lower
                .split(|c: char| !c.is_alphanumeric())
                .filter(|w| !w.is_empty())
                .collect();
            if let Some(hit) = plain.names.iter().find(|n| words.contains(n.as_str())) {
                leaks.push(format!("name {hit:?} in {part:?}"));
            }
        }
    }
    leaks
}

/// The bundled project (config, queries, sample events) with `extra` segment files, run.
fn bundled_run(extra: &[(&str, &str)]) -> TempProject {
    let p = TempProject::local();
    std::fs::copy(repo().join("tessera.toml"), p.path().join("tessera.toml")).unwrap();
    copy_dir(&repo().join("queries"), &p.path().join("queries"));
    copy_dir(&repo().join("data/events"), &p.path().join("data/events"));
    for (name, sql) in extra {
        std::fs::write(p.path().join("queries/segments").join(name), sql).unwrap();
    }
    ok(run(&mut p.cmd(&["run", "--quiet"])));
    p
}

fn export(p: &TempProject, segment: &str, out: &Path, extra: &[&str]) -> std::process::Output {
    let mut args = vec!["export", "segment", segment, "--out", out.to_str().unwrap()];
    args.extend_from_slice(extra);
    run(&mut p.cmd(&args))
}

#[test]
fn hashed_exports_of_the_bundled_project_hold_no_personal_data_in_clear() {
    let p = bundled_run(&[]);
    let plain = plaintext_of_members(&p, "high_value");
    assert!(
        plain.emails.len() > 50 && plain.phones.len() > 10 && plain.names.len() > 10,
        "the segment has members with emails, phones and names to hide: {} emails, {} phones, {} names",
        plain.emails.len(),
        plain.phones.len(),
        plain.names.len()
    );

    let csv = p.path().join("exports/high_value.csv");
    ok(export(&p, "high_value", &csv, &["--hash-pii", "--quiet"]));
    let rows = csv_rows(&std::fs::read_to_string(&csv).unwrap());
    let header = rows[0].clone();
    assert!(rows.len() > 100, "{} rows", rows.len());
    let cells: Vec<String> = rows.concat();
    let found = leaks(&cells, &plain);
    assert!(
        found.is_empty(),
        "{} leaks, e.g. {:?}",
        found.len(),
        &found[..found.len().min(5)]
    );
    assert!(
        !cells.iter().any(|c| c.contains('@')),
        "no cell holds an '@'"
    );
    // The traits JSON is left out; the identifiers and names are there as digests.
    assert!(!header.contains(&"traits".to_string()), "{header:?}");
    for column in [
        "emails",
        "phones",
        "user_ids",
        "anonymous_ids",
        "first_name",
        "last_name",
    ] {
        assert!(
            header.contains(&column.to_string()),
            "{column} in {header:?}"
        );
    }
    // Digests of the normalised values, computed here: what ad platforms match on.
    let digests: BTreeSet<&str> = cells.iter().flat_map(|c| c.split(';')).collect();
    for email in &plain.emails {
        assert!(digests.contains(sha256(email).as_str()), "sha256({email})");
    }
    for phone in &plain.phones {
        assert!(digests.contains(sha256(phone).as_str()), "sha256({phone})");
    }
    let name_column = header.iter().position(|c| c == "first_name").unwrap();
    let first_names = p.query(
        "SELECT first_name FROM profiles WHERE profile_id IN (SELECT profile_id FROM segments.high_value) \
         AND first_name IS NOT NULL",
    );
    let written: BTreeSet<&str> = rows[1..].iter().map(|r| r[name_column].as_str()).collect();
    for row in &first_names {
        let name = row["first_name"].as_str().unwrap().trim().to_lowercase();
        assert!(written.contains(sha256(&name).as_str()), "sha256({name})");
    }

    // Parquet, every column: the same.
    let parquet = p.path().join("exports/high_value.parquet");
    ok(export(
        &p,
        "high_value",
        &parquet,
        &["--hash-pii", "--format", "parquet", "--quiet"],
    ));
    let cells = parquet_cells(&parquet);
    let found = leaks(&cells, &plain);
    assert!(
        found.is_empty(),
        "{} leaks, e.g. {:?}",
        found.len(),
        &found[..found.len().min(5)]
    );

    // Allowlisted trait keys are kept as JSON; personal keys cannot be allowlisted.
    let config = std::fs::read_to_string(p.path().join("tessera.toml")).unwrap();
    std::fs::write(
        p.path().join("tessera.toml"),
        format!("{config}\n[export]\ntraits_allowlist = [\"plan\"]\n"),
    )
    .unwrap();
    let kept = p.path().join("exports/plans.csv");
    ok(export(
        &p,
        "high_value",
        &kept,
        &["--hash-pii", "--columns", "profile_id,traits", "--quiet"],
    ));
    let rows = csv_rows(&std::fs::read_to_string(&kept).unwrap());
    assert_eq!(rows[0], ["profile_id", "traits"]);
    let mut plans = 0;
    for row in &rows[1..] {
        if row[1].is_empty() {
            continue;
        }
        let traits: serde_json::Value = serde_json::from_str(&row[1]).unwrap();
        let keys: Vec<&String> = traits.as_object().unwrap().keys().collect();
        assert_eq!(keys, ["plan"], "{}", row[1]);
        plans += 1;
    }
    assert!(plans > 10, "{plans} members with a plan");
    std::fs::write(
        p.path().join("tessera.toml"),
        format!("{config}\n[export]\ntraits_allowlist = [\"plan\", \"email\"]\n"),
    )
    .unwrap();
    let refused = export(&p, "high_value", &kept, &["--hash-pii"]);
    assert_eq!(refused.status.code(), Some(2));
    let err = stderr(&refused);
    assert!(
        err.contains("export.traits_allowlist[1]") && err.contains("personal data"),
        "{err}"
    );
}

#[test]
fn a_text_column_holding_emails_that_no_rule_covers_stops_a_hashed_export() {
    let p = bundled_run(&[(
        "contacts.sql",
        "SELECT profile_id, array_element(emails, 1) AS contact FROM profiles WHERE cardinality(emails) > 0",
    )]);
    let out = p.path().join("exports/contacts.csv");
    let refused = export(&p, "contacts", &out, &["--hash-pii"]);
    assert_eq!(refused.status.code(), Some(2), "{}", stderr(&refused));
    let err = stderr(&refused);
    assert!(
        err.contains("`contact`") && err.contains("[export.pii_columns]"),
        "{err}"
    );
    assert!(!out.exists(), "nothing is written");

    let config = std::fs::read_to_string(p.path().join("tessera.toml")).unwrap();
    std::fs::write(
        p.path().join("tessera.toml"),
        format!("{config}\n[export.pii_columns]\ncontact = \"email\"\n"),
    )
    .unwrap();
    ok(export(
        &p,
        "contacts",
        &out,
        &["--hash-pii", "--columns", "contact", "--quiet"],
    ));
    let rows = csv_rows(&std::fs::read_to_string(&out).unwrap());
    assert!(
        rows.len() > 100 && rows[1..].iter().all(|r| is_digest(&r[0])),
        "{:?}",
        &rows[..3]
    );
}

/// Payloads from OWASP's CSV injection page, as first names.
const PAYLOADS: &[&str] = &[
    "=HYPERLINK(\"http://x\")",
    "@cmd|' /C calc'!A0",
    "+1+1",
    "-2",
    "\tTab",
    "\rReturn",
];

#[test]
fn csv_cells_a_spreadsheet_would_run_are_neutralised_unless_raw() {
    let p = TempProject::new(
        "[storage]\nevents = \"data/events\"\noutput = \"out\"\n\
         [profiles]\ntraits = [\"first_name\"]\n",
    );
    let dir = p.path().join("queries/segments");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("everyone.sql"), "SELECT profile_id FROM profiles").unwrap();
    let users = ["u1", "u2", "u3", "u4", "u5", "u6"];
    let traits: Vec<&'static str> = PAYLOADS
        .iter()
        .map(|name| {
            let doc = serde_json::json!({ "first_name": name }).to_string();
            &*Box::leak(doc.into_boxed_str())
        })
        .collect();
    let mut rows: Vec<Ev> = Vec::new();
    for (i, (user, traits)) in users.iter().zip(&traits).enumerate() {
        rows.push(Ev {
            message_id: Some(Box::leak(format!("i{i}").into_boxed_str())),
            kind: Some("identify"),
            event: None,
            anonymous_id: Some(Box::leak(format!("anon-{i}").into_boxed_str())),
            user_id: Some(user),
            traits: Some(traits),
            ..Ev::track("x", T0 + i as i64)
        });
    }
    // A second device whose id a spreadsheet would run, in a list column joined with ';'.
    rows.push(Ev {
        message_id: Some("t1"),
        anonymous_id: Some("=1+2"),
        user_id: Some("u1"),
        ..Ev::track("t1", T0 + 100)
    });
    write_parquet(&p.events().join("events.parquet"), &[events_batch(&rows)]);
    ok(run(&mut p.cmd(&["run", "--quiet"])));

    let out = p.path().join("everyone.csv");
    let cols = "user_ids,first_name,anonymous_ids";
    ok(export(
        &p,
        "everyone",
        &out,
        &["--columns", cols, "--quiet"],
    ));
    let safe = csv_rows(&std::fs::read_to_string(&out).unwrap());
    ok(export(
        &p,
        "everyone",
        &out,
        &["--columns", cols, "--raw", "--quiet"],
    ));
    let raw = csv_rows(&std::fs::read_to_string(&out).unwrap());
    assert_eq!(safe.len(), 7, "{safe:?}");
    for (user, payload) in users.iter().zip(PAYLOADS) {
        let row = |rows: &[Vec<String>]| {
            rows.iter()
                .find(|r| r[0] == *user)
                .unwrap_or_else(|| panic!("{user} in {rows:?}"))
                .clone()
        };
        assert_eq!(row(&safe)[1], format!("'{payload}"), "{user}");
        assert_eq!(row(&raw)[1], *payload, "{user}");
    }
    let anon = |rows: &[Vec<String>]| {
        let row = rows.iter().find(|r| r[0] == "u1").unwrap();
        let mut ids: Vec<String> = row[2].split(';').map(str::to_string).collect();
        ids.sort();
        ids
    };
    assert_eq!(anon(&safe), ["'=1+2", "anon-0"]);
    assert_eq!(anon(&raw), ["=1+2", "anon-0"]);
    // Parquet is not a spreadsheet: values as they are.
    let parquet = p.path().join("everyone.parquet");
    ok(export(
        &p,
        "everyone",
        &parquet,
        &["--columns", cols, "--format", "parquet", "--quiet"],
    ));
    let cells = parquet_cells(&parquet);
    for payload in PAYLOADS {
        assert!(cells.iter().any(|c| c == payload), "{payload:?}");
    }
}

#[test]
fn exports_into_the_events_output_or_source_folders_are_refused() {
    let p = TempProject::new(
        "[storage]\nevents = \"data/events\"\noutput = \"tables\"\n\
         [[sources]]\nname = \"crm\"\nlocation = \"crm\"\n",
    );
    let dir = p.path().join("queries/segments");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("everyone.sql"), "SELECT profile_id FROM profiles").unwrap();
    write_parquet(
        &p.events().join("events.parquet"),
        &[events_batch(&[Ev::track("m1", T0).with_user("u1")])],
    );
    write_parquet(
        &p.path().join("crm/contacts.parquet"),
        &[events_batch(&[Ev::track("c1", T0)])],
    );
    ok(run(&mut p.cmd(&["run", "--quiet"])));
    let root = p.path();
    std::fs::create_dir_all(root.join("exports")).unwrap();
    #[cfg(unix)]
    std::os::unix::fs::symlink(root.join("tables"), root.join("exports/link")).unwrap();
    let mut cases = vec![
        (root.join("data/events/members.csv"), "storage.events"),
        (
            root.join("data/events/day=2/members.parquet"),
            "storage.events",
        ),
        (root.join("tables/members.csv"), "storage.output"),
        (
            root.join("tables/segments/everyone/part.parquet"),
            "storage.output",
        ),
        (root.join("exports/../tables/members.csv"), "storage.output"),
        (root.join("crm/members.parquet"), "sources[0].location"),
    ];
    #[cfg(unix)]
    cases.push((root.join("exports/link/members.csv"), "storage.output"));
    for (out, key) in &cases {
        let refused = export(&p, "everyone", out, &[]);
        assert_eq!(
            refused.status.code(),
            Some(2),
            "{}: {}",
            out.display(),
            stderr(&refused)
        );
        let err = stderr(&refused);
        assert!(
            err.contains(key) && err.contains("Write the export somewhere else"),
            "{err}"
        );
        assert!(!out.exists(), "{} was written", out.display());
    }
    // A relative path resolves against the working folder, as the shell gives it.
    let refused = run(p
        .cmd(&["export", "segment", "everyone", "--out", "tables/x.csv"])
        .current_dir(root));
    assert_eq!(refused.status.code(), Some(2), "{}", stderr(&refused));
    // The tables still read, and an export elsewhere works.
    assert_eq!(
        p.query("SELECT count(*) AS n FROM segments.everyone")[0]["n"],
        1
    );
    let fine = root.join("exports/members.csv");
    ok(export(&p, "everyone", &fine, &["--quiet"]));
    assert!(fine.exists());
}

/// Identify events for `phones` typed by anonymous visitors `anon-0`, `anon-1`, …
fn phone_project(country: &str, phones: &[&'static str]) -> TempProject {
    let p = TempProject::new(&format!(
        "[storage]\nevents = \"data/events\"\noutput = \"out\"\n\
         [identity]\ndefault_country_code = \"{country}\"\n\
         [[identity.identifiers]]\nname = \"anonymous_id\"\n\
         [[identity.identifiers]]\nname = \"phone\"\nnormalize = \"phone\"\n"
    ));
    std::fs::create_dir_all(p.path().join("queries/identity")).unwrap();
    std::fs::write(
        p.path().join("queries/identity/events.sql"),
        "SELECT message_id, anonymous_id, json_get_str(traits, 'phone') AS phone, \"timestamp\" AS seen_at FROM events",
    )
    .unwrap();
    std::fs::create_dir_all(p.path().join("queries/segments")).unwrap();
    std::fs::write(
        p.path().join("queries/segments/everyone.sql"),
        "SELECT profile_id FROM profiles",
    )
    .unwrap();
    let rows: Vec<Ev> = phones
        .iter()
        .enumerate()
        .map(|(i, phone)| Ev {
            message_id: Some(Box::leak(format!("i{i}").into_boxed_str())),
            kind: Some("identify"),
            event: None,
            anonymous_id: Some(Box::leak(format!("anon-{i}").into_boxed_str())),
            traits: Some(Box::leak(
                serde_json::json!({ "phone": phone })
                    .to_string()
                    .into_boxed_str(),
            )),
            ..Ev::track("x", T0 + i as i64)
        })
        .collect();
    write_parquet(&p.events().join("events.parquet"), &[events_batch(&rows)]);
    ok(run(&mut p.cmd(&["run", "--quiet"])));
    p
}

fn phone_values(p: &TempProject) -> Vec<String> {
    p.query(
        "SELECT identifier_value FROM identity_graph WHERE identifier_type = 'phone' \
         ORDER BY identifier_value",
    )
    .iter()
    .map(|r| r["identifier_value"].as_str().unwrap().to_string())
    .collect()
}

#[test]
fn phones_are_keyed_by_each_countrys_numbering_plan() {
    // London's 020 7946 0958 typed three ways from the US: one E.164 value, one profile.
    let p = phone_project(
        "1",
        &[
            "+44 (0) 20 7946 0958",
            "011 44 20 7946 0958",
            "+442079460958",
        ],
    );
    assert_eq!(phone_values(&p), ["+442079460958"]);
    let profiles = p.query("SELECT count(*) AS n FROM profiles");
    assert_eq!(profiles[0]["n"], 1, "the three visitors are one person");

    // Rome's 06 1234 5678 dialled in Italy keeps its leading 0; its hash is of the E.164 form.
    let p = phone_project("39", &["06 1234 5678", "+39 06 1234 5678", "123"]);
    assert_eq!(phone_values(&p), ["+390612345678"]);
    let out = p.path().join("rome.csv");
    ok(export(
        &p,
        "everyone",
        &out,
        &["--hash-pii", "--columns", "phones", "--quiet"],
    ));
    let rows = csv_rows(&std::fs::read_to_string(&out).unwrap());
    let phones: BTreeSet<&str> = rows[1..].iter().map(|r| r[0].as_str()).collect();
    // sha256("+390612345678"), by Python's hashlib; the visitor who typed "123" has no phone.
    assert_eq!(
        phones,
        BTreeSet::from([
            "",
            "37b702607839d6dc5fc81d95b52e550e336413bf7ae2e04cafeca79f066ea44b"
        ])
    );
}
