//! CRM contacts in, CRM-ready lists out: CSV sources whose errors name the file and line, CRM
//! contacts joining web profiles by email and phone with the most recently modified value
//! winning, and segment exports that Salesforce and HubSpot import (Python's csv module reads
//! them with the destination's header names), cut under a file size, whose change files add up
//! across runs to the membership.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use crate::common::*;

/// 2026-10-01T00:00:00Z in µs.
const T0: i64 = 1_790_812_800_000_000;
const HOUR: i64 = 3_600_000_000;

const CONFIG: &str = r#"
[storage]
events = "data/events"
output = "out"

[[sources]]
name = "crm_contacts"
location = "data/crm"
format = "csv"

[sources.crm]
system = "salesforce"

[[identity.identifiers]]
name = "user_id"
limit = 1

[[identity.identifiers]]
name = "salesforce_id"
limit = 2

[[identity.identifiers]]
name = "email"
normalize = "email"

[[identity.identifiers]]
name = "phone"
normalize = "phone"

[[identity.identifiers]]
name = "anonymous_id"

[[exports]]
name = "sf_a1"
segment = "account_a1"
target = "salesforce"
changes = true
max_file_bytes = 120
"#;

const HEADER: &str = "Id,Email,Phone,FirstName,LastName,AccountId,LastModifiedDate\n";

fn write(path: &Path, text: &str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
}

/// Web events: Ann known by her email, Bob by his phone, Cy by nothing a CRM holds.
fn web_events(p: &TempProject, file: &str, ids: [&'static str; 3], hour: i64) {
    let identify = |id, anon, traits| Ev {
        message_id: Some(id),
        kind: Some("identify"),
        anonymous_id: Some(anon),
        timestamp: Some(T0 + hour * HOUR),
        received_at: Some(T0 + hour * HOUR + 1),
        traits: Some(traits),
        ..Ev::default()
    };
    write_parquet(
        &p.events().join(file),
        &[events_batch(&[
            identify(ids[0], "anon-ann", r#"{"email": "ann@example.com"}"#),
            identify(ids[1], "anon-bob", r#"{"phone": "+14155550123"}"#),
            identify(ids[2], "anon-cy", r#"{"plan": "free"}"#),
        ])],
    );
}

fn project() -> TempProject {
    let p = TempProject::new(CONFIG);
    write(
        &p.path().join("queries/identity/events.sql"),
        "SELECT message_id, anonymous_id, user_id, json_get_str(traits, 'email') AS email, \
         json_get_str(traits, 'phone') AS phone, \"timestamp\" AS seen_at FROM events\n",
    );
    write(
        &p.path().join("queries/segments/account_a1.sql"),
        "SELECT profile_id FROM profiles WHERE account_id = 'A1'\n",
    );
    write(
        &p.path().join("queries/segments/everyone.sql"),
        "SELECT profile_id FROM profiles\n",
    );
    p
}

/// The profile holding identifier `value` of list column `list`, as a JSON row of `profiles`.
fn profile_with(p: &TempProject, list: &str, value: &str) -> serde_json::Value {
    let rows = p.query(&format!(
        "SELECT profile_id, anonymous_ids, salesforce_ids, emails, phones, first_name, last_name, account_id \
         FROM profiles WHERE array_has({list}, '{value}')"
    ));
    assert_eq!(rows.len(), 1, "one profile holds {list} {value}: {rows:?}");
    rows[0].clone()
}

fn strings(v: &serde_json::Value) -> BTreeSet<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// The profile ids in the first column of every `prefix-*.csv` file of `dir`, header skipped;
/// checks every file's header is `header`, it ends lines in LF only and is at most `max` bytes.
fn ids_in(dir: &Path, prefix: &str, header: &str, max: usize) -> BTreeSet<String> {
    let mut ids = BTreeSet::new();
    let mut files = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_str().unwrap().to_string();
        if !(name.starts_with(&format!("{prefix}-")) && name.ends_with(".csv")) {
            continue;
        }
        files += 1;
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            text.len() <= max,
            "{name} is {} bytes, over {max}",
            text.len()
        );
        assert!(!text.contains('\r'), "{name} ends lines in LF only");
        let mut lines = text.lines();
        assert_eq!(lines.next(), Some(header), "{name}");
        for line in lines {
            ids.insert(line.split(',').next().unwrap().to_string());
        }
    }
    assert!(files > 0, "no {prefix} files in {}", dir.display());
    ids
}

/// Reads every CSV file of `dir` with Python's csv module; returns, per file, its header and
/// row count as `name|h1,h2|rows` lines (skipped without the test Python).
fn python_read(dir: &Path, test: &str) -> Option<Vec<String>> {
    let python = python(test)?;
    let script = r#"
import csv, os, sys
d = sys.argv[1]
for name in sorted(os.listdir(d)):
    if not name.endswith('.csv'):
        continue
    with open(os.path.join(d, name), newline='', encoding='utf-8', errors='strict') as f:
        reader = csv.DictReader(f, strict=True)
        rows = list(reader)
        assert all(None not in r for r in rows), name  # no row longer than the header
        assert all(None not in r.values() for r in rows), name  # none shorter
        print(name + '|' + ','.join(reader.fieldnames) + '|' + str(len(rows)))
"#;
    let out = std::process::Command::new(python)
        .arg("-c")
        .arg(script)
        .arg(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(
        String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .map(str::to_string)
            .collect(),
    )
}

#[test]
fn csv_source_errors_name_the_file_and_line() {
    let p = TempProject::new(
        "[storage]\nevents = \"data/events\"\noutput = \"out\"\n\n[[sources]]\nname = \"contacts\"\nlocation = \"data/crm\"\nformat = \"csv\"\n",
    );
    web_events(&p, "e.parquet", ["m1", "m2", "m3"], 0);
    let crm = p.path().join("data/crm");
    let cases: [(&[u8], &str, &str); 3] = [
        (
            b"Id,Email\n1,a@x.com\n2,b@x.com,extra\n",
            "line 3",
            "3 fields where the header has 2",
        ),
        (
            b"Id,Email\n1,\"a@x.com\n2,b@x.com\n",
            "line 2",
            "never closed",
        ),
        (b"Id,Name\n1,Ann\n2,Ren\xe9e\n", "line 3", "not UTF-8"),
    ];
    for (bytes, line, what) in cases {
        std::fs::create_dir_all(&crm).unwrap();
        // A good file beside the broken one: the broken one must still stop the run.
        std::fs::write(crm.join("a_good.csv"), "Id,Email\n9,z@x.com\n").unwrap();
        std::fs::write(crm.join("b_broken.csv"), bytes).unwrap();
        if what == "not UTF-8" {
            std::fs::write(crm.join("a_good.csv"), "Id,Name\n9,Zoe\n").unwrap();
        }
        let out = run(&mut p.cmd(&["run"]));
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert!(
            err.contains("b_broken.csv") && err.contains(line) && err.contains(what),
            "names the file, {line} and {what}: {err}"
        );
        assert!(!p.path().join("out/profiles").exists(), "nothing published");
    }
    // Semicolons and another quote, set in [sources.csv], read the same file cleanly.
    std::fs::remove_dir_all(&crm).unwrap();
    write(&crm.join("c.csv"), "Id;Name\n1;'Lee; Ann'\n2;'O''Hara'\n");
    let config = std::fs::read_to_string(p.path().join("tessera.toml")).unwrap()
        + "\n[sources.csv]\ndelimiter = \";\"\nquote = \"'\"\n";
    std::fs::write(p.path().join("tessera.toml"), config).unwrap();
    let rows = p.query("SELECT \"Id\", \"Name\" FROM contacts ORDER BY \"Id\"");
    assert_eq!(rows[0]["Name"], "Lee; Ann");
    assert_eq!(rows[1]["Name"], "O'Hara");
}

#[test]
fn crm_contacts_join_web_profiles_and_exports_add_up() {
    let p = project();
    let crm = p.path().join("data/crm/contacts.csv");
    // Run 1. Ann's two contacts carry no web identifier but her email (typed otherwise); Bob's
    // only his phone, typed nationally; Carl has no web profile at all.
    web_events(&p, "day1.parquet", ["d1-1", "d1-2", "d1-3"], 0);
    write(
        &crm,
        &format!(
            "{HEADER}\
             003A, ANN@Example.com ,,Ann,Lee,A9,2026-01-01T00:00:00Z\n\
             003D,ann@example.com,,Annie,,A9,2026-03-01T00:00:00Z\n\
             003B,,(415) 555-0123,Bob,Bay,A1,2026-01-01T00:00:00Z\n\
             003C,carl@example.com,,Carl,\"Cole, Jr.\",A1,2026-01-01T00:00:00Z\n"
        ),
    );
    let r1 = p.run_json();
    let run1 = r1["run_id"].as_str().unwrap().to_string();

    // By email: both contacts joined Ann's web profile (and nothing else).
    let ann = profile_with(&p, "anonymous_ids", "anon-ann");
    assert_eq!(
        strings(&ann["salesforce_ids"]),
        BTreeSet::from(["003A".into(), "003D".into()])
    );
    // Survivorship, field by field: the newer contact's first name and account; its empty last
    // name leaves the older contact's.
    assert_eq!(ann["first_name"], "Annie");
    assert_eq!(ann["last_name"], "Lee");
    assert_eq!(ann["account_id"], "A9");
    // By phone: "(415) 555-0123" and "+14155550123" are one number.
    let bob = profile_with(&p, "anonymous_ids", "anon-bob");
    assert_eq!(
        strings(&bob["salesforce_ids"]),
        BTreeSet::from(["003B".into()])
    );
    assert_eq!(bob["first_name"], "Bob");
    let carl = profile_with(&p, "salesforce_ids", "003C");
    assert!(strings(&carl["anonymous_ids"]).is_empty());
    assert_eq!(carl["last_name"], "Cole, Jr.");
    let cy = profile_with(&p, "anonymous_ids", "anon-cy");
    assert!(strings(&cy["salesforce_ids"]).is_empty());

    let id = |v: &serde_json::Value| v["profile_id"].as_str().unwrap().to_string();
    let (ann, bob, carl) = (id(&ann), id(&bob), id(&carl));
    let members = |p: &TempProject| -> BTreeSet<String> {
        p.query("SELECT profile_id FROM segments.account_a1")
            .iter()
            .map(|r| r["profile_id"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(members(&p), BTreeSet::from([bob.clone(), carl.clone()]));

    // Run 2: Carl moves to A2, Ann's newer contact to A1.
    web_events(&p, "day2.parquet", ["d2-1", "d2-2", "d2-3"], 24);
    write(
        &crm,
        &format!(
            "{HEADER}\
             003A, ANN@Example.com ,,Ann,Lee,A9,2026-01-01T00:00:00Z\n\
             003D,ann@example.com,,Annie,,A1,2026-04-01T00:00:00Z\n\
             003B,,(415) 555-0123,Bob,Bay,A1,2026-01-01T00:00:00Z\n\
             003C,carl@example.com,,Carl,\"Cole, Jr.\",A2,2026-04-01T00:00:00Z\n"
        ),
    );
    let r2 = p.run_json();
    let run2 = r2["run_id"].as_str().unwrap().to_string();
    assert_eq!(members(&p), BTreeSet::from([ann.clone(), bob.clone()]));

    // Run 3, with no new event at all (the contacts file alone changed): Bob moves to A3;
    // Dana, new, joins A1.
    write(
        &crm,
        &format!(
            "{HEADER}\
             003A, ANN@Example.com ,,Ann,Lee,A9,2026-01-01T00:00:00Z\n\
             003D,ann@example.com,,Annie,,A1,2026-04-01T00:00:00Z\n\
             003B,,(415) 555-0123,Bob,Bay,A3,2026-05-01T00:00:00Z\n\
             003C,carl@example.com,,Carl,\"Cole, Jr.\",A2,2026-04-01T00:00:00Z\n\
             003E,dana@example.com,+442079460958,Dana,Dee,A1,2026-05-01T00:00:00Z\n"
        ),
    );
    let r3 = p.run_json();
    let run3 = r3["run_id"].as_str().unwrap().to_string();
    let dana = id(&profile_with(&p, "salesforce_ids", "003E"));
    let now = members(&p);
    assert_eq!(now, BTreeSet::from([ann.clone(), dana.clone()]));

    // The files each run wrote: members, and who entered (add) and left (remove) in that run,
    // under <output>/exports/sf_a1/<run_id>/, cut under the configured 120 bytes.
    let header = "Tessera_Profile_Id__c,Email,Phone,FirstName,LastName";
    let mut replayed = BTreeSet::new();
    for (run, expected) in [
        (&run1, BTreeSet::from([bob.clone(), carl.clone()])),
        (&run2, BTreeSet::from([ann.clone(), bob.clone()])),
        (&run3, now.clone()),
    ] {
        let dir = p.path().join("out/exports/sf_a1").join(run);
        assert_eq!(ids_in(&dir, "members", header, 120), expected, "{run}");
        for id in ids_in(&dir, "add", header, 120) {
            assert!(replayed.insert(id), "added twice");
        }
        for id in ids_in(&dir, "remove", header, 120) {
            assert!(replayed.remove(&id), "removed while not a member");
        }
        assert_eq!(replayed, expected, "adds minus removes after {run}");
        let job: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join("job.json")).unwrap()).unwrap();
        assert_eq!(job["externalIdFieldName"], "Tessera_Profile_Id__c");
        assert_eq!(job["lineEnding"], "LF");
    }
    // Every file opens in Python's csv module with Salesforce's field names.
    if let Some(files) = python_read(
        &p.path().join("out/exports/sf_a1").join(&run3),
        "crm_exports",
    ) {
        assert!(files.iter().any(|f| f.starts_with("members-0001.csv|")));
        for f in &files {
            assert_eq!(f.split('|').nth(1), Some(header), "{f}");
        }
    }

    // --changes-since: the net change since run 1, whatever happened in between.
    let out = PathBuf::from(p.path()).join("changes");
    let summary: serde_json::Value = serde_json::from_str(
        ok(run(&mut p.cmd(&[
            "export",
            "segment",
            "account_a1",
            "--to",
            "salesforce",
            "--changes-since",
            &run1,
            "--out",
            out.to_str().unwrap(),
            "--json",
        ])))
        .trim(),
    )
    .unwrap();
    assert_eq!(
        (summary["added"].as_u64(), summary["removed"].as_u64()),
        (Some(2), Some(2))
    );
    let added = ids_in(&out, "add", header, 100_000_000);
    let removed = ids_in(&out, "remove", header, 100_000_000);
    assert_eq!(added, BTreeSet::from([ann.clone(), dana.clone()]));
    assert_eq!(removed, BTreeSet::from([bob.clone(), carl.clone()]));
    // Since run 2 it is Bob out, Dana in; an unknown run is refused.
    let out2 = p.path().join("changes2");
    ok(run(&mut p.cmd(&[
        "export",
        "segment",
        "account_a1",
        "--to",
        "csv",
        "--changes-since",
        &run2,
        "--out",
        out2.to_str().unwrap(),
        "--columns",
        "profile_id",
    ])));
    assert_eq!(
        std::fs::read_to_string(out2.join("add.csv")).unwrap(),
        format!("profile_id\n{dana}\n")
    );
    assert_eq!(
        std::fs::read_to_string(out2.join("remove.csv")).unwrap(),
        format!("profile_id\n{bob}\n")
    );
    let bad = run(&mut p.cmd(&[
        "export",
        "segment",
        "account_a1",
        "--to",
        "csv",
        "--changes-since",
        "nope",
        "--out",
        out2.to_str().unwrap(),
    ]));
    assert_eq!(bad.status.code(), Some(2));
    assert!(stderr(&bad).contains("no such run"), "{}", stderr(&bad));

    // HubSpot: contact property names, an importRequest per file, files cut at 150 bytes.
    let hs = p.path().join("hubspot");
    ok(run(&mut p.cmd(&[
        "export",
        "segment",
        "everyone",
        "--to",
        "hubspot",
        "--max-file-bytes",
        "150",
        "--out",
        hs.to_str().unwrap(),
    ])));
    let hs_header = "tessera_profile_id,email,phone,firstname,lastname";
    let everyone = ids_in(&hs, "members", hs_header, 150);
    assert_eq!(everyone.len(), 5, "Ann, Bob, Carl, Cy, Dana");
    let csvs: Vec<PathBuf> = std::fs::read_dir(&hs)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|f| f.extension().is_some_and(|e| e == "csv"))
        .collect();
    assert!(csvs.len() > 1, "cut into several files: {csvs:?}");
    for csv in &csvs {
        let request = csv.with_extension("import.json");
        let request: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&request).unwrap()).unwrap();
        let file = &request["files"][0];
        assert_eq!(file["fileName"], csv.file_name().unwrap().to_str().unwrap());
        let mapped: Vec<&str> = file["fileImportPage"]["columnMappings"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["propertyName"].as_str().unwrap())
            .collect();
        assert_eq!(mapped.join(","), hs_header);
        let keys: Vec<&serde_json::Value> = file["fileImportPage"]["columnMappings"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|m| m["idColumnType"] == "HUBSPOT_ALTERNATE_ID")
            .collect();
        assert_eq!(keys.len(), 1);
        assert_eq!(keys[0]["columnName"], "email");
    }
    if let Some(files) = python_read(&hs, "crm_exports") {
        let rows: usize = files
            .iter()
            .map(|f| {
                assert_eq!(f.split('|').nth(1), Some(hs_header), "{f}");
                f.rsplit('|').next().unwrap().parse::<usize>().unwrap()
            })
            .sum();
        assert_eq!(rows, 5);
    }

    // --hash-pii keeps working: Salesforce's Email column holds the digest of the normalised
    // email, and names are hashed too.
    let hashed = p.path().join("hashed");
    ok(run(&mut p.cmd(&[
        "export",
        "segment",
        "account_a1",
        "--to",
        "salesforce",
        "--hash-pii",
        // [[exports]] sf_a1 cuts at 120 bytes; digests are longer.
        "--max-file-bytes",
        "100000",
        "--out",
        hashed.to_str().unwrap(),
    ])));
    let text = std::fs::read_to_string(hashed.join("members-0001.csv")).unwrap();
    let dana_row = text.lines().find(|l| l.starts_with(&dana)).unwrap();
    let cells: Vec<&str> = dana_row.split(',').collect();
    use sha2::Digest;
    let sha = |s: &str| {
        sha2::Sha256::digest(s.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    };
    assert_eq!(cells[1], sha("dana@example.com"));
    assert_eq!(cells[2], sha("+442079460958"));
    assert_eq!(cells[3], sha("dana"));
    assert!(!text.contains("dana@example.com") && !text.contains("Dana"));
}
