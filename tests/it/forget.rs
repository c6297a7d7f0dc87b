//! `tessera forget`: a person erased from every file under the output (every version's data
//! files, the Delta logs and checkpoints, `_state`), kept out of later runs, and nobody else
//! touched.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use arrow::util::display::{ArrayFormatter, FormatOptions};
use sha2::{Digest, Sha256};

use crate::common::*;

/// Every file under `dir`, recursively.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

/// Path → (size, mtime, SHA-256 of the content) of every file under `dir`.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, (u64, std::time::SystemTime, String)> {
    files_under(dir)
        .into_iter()
        .map(|p| {
            let meta = std::fs::metadata(&p).unwrap();
            let bytes = std::fs::read(&p).unwrap();
            let digest: String = Sha256::digest(&bytes)
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            (p, (meta.len(), meta.modified().unwrap(), digest))
        })
        .collect()
}

/// Every object under the output location `output` (a folder or `s3://…`), with its bytes.
fn objects(output: &str) -> Vec<(String, bytes::Bytes)> {
    use futures::TryStreamExt;
    use object_store::ObjectStoreExt;
    let place = tessera::storage::Place::open(output, Path::new("/"), "test").unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let listed: Vec<object_store::ObjectMeta> = place
            .store
            .list(Some(&place.prefix))
            .try_collect()
            .await
            .unwrap();
        let mut out = Vec::new();
        for meta in listed {
            let bytes = place
                .store
                .get(&meta.location)
                .await
                .unwrap()
                .bytes()
                .await
                .unwrap();
            out.push((meta.location.to_string(), bytes));
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    })
}

/// Every string value of a Parquet file (nested ones included), lowercased.
fn parquet_text(name: &str, bytes: bytes::Bytes) -> Vec<String> {
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(bytes)
        .unwrap_or_else(|e| panic!("{name}: not readable Parquet: {e}"))
        .build()
        .unwrap();
    let options = FormatOptions::default();
    let mut out = Vec::new();
    for batch in reader {
        let batch = batch.unwrap();
        for column in batch.columns() {
            let formatter = ArrayFormatter::try_new(column.as_ref(), &options).unwrap();
            for row in 0..batch.num_rows() {
                out.push(formatter.value(row).to_string().to_lowercase());
            }
        }
    }
    out
}

/// Asserts that no object under the output `output` holds any of `needles` (lowercase):
/// Parquet files (every version's data files, checkpoints) by every decoded value, every other
/// file (Delta JSON, `_last_checkpoint`, state) by its bytes. Returns how many Parquet files
/// and other files were searched.
fn assert_nowhere(output: &str, needles: &BTreeSet<String>) -> (usize, usize) {
    let (mut parquet, mut other) = (0, 0);
    for (name, bytes) in objects(output) {
        if name.ends_with(".parquet") {
            parquet += 1;
            for value in parquet_text(&name, bytes) {
                for n in needles {
                    assert!(
                        !value.contains(n.as_str()),
                        "{name} still holds {n:?} in {value:?}"
                    );
                }
            }
        } else {
            other += 1;
            let text = String::from_utf8_lossy(&bytes).to_lowercase();
            for n in needles {
                assert!(!text.contains(n.as_str()), "{name} still holds {n:?}");
            }
        }
    }
    (parquet, other)
}

/// Objects under `output` whose bytes hold one of `needles`.
fn holding(output: &str, needles: &BTreeSet<String>) -> usize {
    objects(output)
        .into_iter()
        .filter(|(_, bytes)| {
            let text = String::from_utf8_lossy(bytes).to_lowercase();
            needles.iter().any(|n| text.contains(n.as_str()))
        })
        .count()
}

fn count(p: &TempProject, sql: &str) -> u64 {
    p.query(sql)[0]["n"]
        .as_u64()
        .unwrap_or_else(|| panic!("{sql}: no count"))
}

fn text_list(values: &[String]) -> String {
    if values.is_empty() {
        return "NULL".into();
    }
    values
        .iter()
        .map(|v| format!("'{}'", v.replace('\'', "''")))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The ways the generator writes a phone number (see `typed_phone` in src/generate.rs).
fn phone_forms(e164: &str) -> Vec<String> {
    let d = &e164[2..];
    vec![
        e164.to_string(),
        format!("+1 ({}) {}-{}", &d[0..3], &d[3..6], &d[6..10]),
        format!("{}.{}.{}", &d[0..3], &d[3..6], &d[6..10]),
        format!("({}) {}-{}", &d[0..3], &d[3..6], &d[6..10]),
    ]
}

/// The bundled project with its output at `output`, after two runs over generated events (the
/// second incremental, so every table has an older version): returns it and the generated
/// folder.
fn two_runs(output: &str, people: u64, days: u32, seed: u64) -> (TempProject, tempfile::TempDir) {
    let generated = tempfile::tempdir().unwrap();
    generate(generated.path(), people, days, seed);
    // The bundled project's config and queries: four identifier types, phones included.
    let p = crate::reliability::project(output, "");
    copy_dir(
        &repo().join("queries/reports"),
        &p.path().join("queries/reports"),
    );
    let mut days: Vec<PathBuf> = std::fs::read_dir(generated.path().join("events"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    days.sort();
    let half = days.len() / 2;
    for day in &days[..half] {
        copy_dir(day, &p.events().join(day.file_name().unwrap()));
    }
    assert_eq!(p.run_json()["status"], "succeeded");
    for day in &days[half..] {
        copy_dir(day, &p.events().join(day.file_name().unwrap()));
    }
    let second = p.run_json();
    assert_eq!(second["status"], "succeeded");
    assert_eq!(second["mode"], "incremental");
    (p, generated)
}

/// Name → SHA-256 of every object under `output`.
fn digests(output: &str) -> BTreeMap<String, String> {
    objects(output)
        .into_iter()
        .map(|(name, bytes)| {
            let digest: String = Sha256::digest(&bytes)
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            (name, digest)
        })
        .collect()
}

fn has_checkpoint(output: &str, table: &str) -> bool {
    objects(output).iter().any(|(name, _)| {
        name.contains(&format!("{table}/_delta_log/")) && name.ends_with(".checkpoint.parquet")
    })
}

#[test]
fn forget_erases_a_person_from_every_file_of_every_version_and_a_full_run_keeps_them_out() {
    erase_and_keep_out(None);
}

#[test]
fn forget_erases_a_person_from_every_object_of_an_output_on_s3() {
    if !s3_available("forget_erases_a_person_from_every_object_of_an_output_on_s3") {
        return;
    }
    erase_and_keep_out(Some(format!("{}/out", s3_prefix())));
}

/// Two runs, a forget, a `--full` run, and every object of the output searched after each.
fn erase_and_keep_out(s3: Option<String>) {
    let setting = s3.clone().unwrap_or_else(|| "out".into());
    let (p, _generated) = two_runs(&setting, 150, 8, 11);
    let out = p.path().join("out");
    let output = s3
        .clone()
        .unwrap_or_else(|| out.to_str().unwrap().to_string());
    let output = output.as_str();
    let python_env = python("forget (checkpoints and readers in Python)");
    if let (Some(python), None) = (&python_env, &s3) {
        // An older checkpoint, as a long-lived table has one: it must go too.
        let status = std::process::Command::new(python)
            .args([
                "-c",
                "import sys, deltalake; deltalake.DeltaTable(sys.argv[1]).create_checkpoint()",
            ])
            .arg(out.join("_state/events"))
            .status()
            .unwrap();
        assert!(status.success());
        assert!(has_checkpoint(output, "_state/events"));
    }
    // The person: a profile with an email, a user_id and device ids (and a phone if any has).
    let person = p.query(
        "SELECT profile_id FROM identity_graph GROUP BY profile_id \
         HAVING count(DISTINCT identifier_type) >= 3 \
         ORDER BY count(DISTINCT identifier_type) DESC, count(*) DESC, profile_id LIMIT 1",
    );
    let profile = person[0]["profile_id"].as_str().unwrap().to_string();
    let identifiers = p.query(&format!(
        "SELECT identifier_type AS t, identifier_value AS v FROM identity_graph \
         WHERE profile_id = '{profile}'"
    ));
    let of = |t: &str| -> Vec<String> {
        identifiers
            .iter()
            .filter(|r| r["t"] == t)
            .map(|r| r["v"].as_str().unwrap().to_string())
            .collect()
    };
    let (emails, users, phones, anons) =
        (of("email"), of("user_id"), of("phone"), of("anonymous_id"));
    assert!(!emails.is_empty() && !users.is_empty() && !anons.is_empty() && !phones.is_empty());
    eprintln!(
        "forgetting a profile of {} emails, {} user_ids, {} phones, {} device ids",
        emails.len(),
        users.len(),
        phones.len(),
        anons.len()
    );

    // Their events, counted independently of forget: their profile's, and any other event
    // carrying one of their identifiers (the generator types phones four ways).
    let phone_digits: Vec<String> = phones
        .iter()
        .flat_map(|e| [e[1..].to_string(), e[2..].to_string()])
        .collect();
    let theirs = format!(
        "profile_id = '{profile}' OR user_id IN ({}) OR anonymous_id IN ({}) \
         OR lower(trim(json_get_str(traits, 'email'))) IN ({}) \
         OR regexp_replace(json_get_str(traits, 'phone'), '[^0-9]', '', 'g') IN ({})",
        text_list(&users),
        text_list(&anons),
        text_list(&emails),
        text_list(&phone_digits)
    );
    let their_events = count(
        &p,
        &format!("SELECT count(*) AS n FROM events WHERE {theirs}"),
    );
    assert!(their_events > 0);
    let events_before = count(&p, "SELECT count(*) AS n FROM events");
    let profiles_before = count(&p, "SELECT count(*) AS n FROM profiles");
    // Someone else, to see that nothing of theirs goes.
    let other = p.query(&format!(
        "SELECT profile_id, count(*) AS n FROM events WHERE profile_id <> '{profile}' \
         GROUP BY profile_id ORDER BY n DESC, profile_id LIMIT 1"
    ));
    let other_profile = other[0]["profile_id"].as_str().unwrap().to_string();
    let other_events = other[0]["n"].as_u64().unwrap();
    let other_identifiers = count(
        &p,
        &format!("SELECT count(*) AS n FROM identity_graph WHERE profile_id = '{other_profile}'"),
    );

    // What to look for: every identifier of the person, normalised and as the data typed it.
    let mut needles: BTreeSet<String> = BTreeSet::new();
    needles.insert(profile.to_lowercase());
    for v in emails.iter().chain(&users).chain(&anons) {
        needles.insert(v.to_lowercase());
    }
    for e in &phones {
        needles.extend(phone_forms(e).into_iter().map(|f| f.to_lowercase()));
    }
    assert!(
        holding(output, &needles) > 0,
        "the log holds their values before (stats, at least)"
    );

    // A dry run writes nothing at all, and says what it would delete.
    let untouched = (snapshot(p.path()), digests(output));
    std::thread::sleep(Duration::from_millis(20));
    let asked = format!("email:  {}  ", emails[0].to_uppercase());
    let dry: serde_json::Value = serde_json::from_str(
        ok(run(&mut p.cmd(&["forget", &asked, "--dry-run", "--json"]))).trim(),
    )
    .unwrap();
    assert_eq!(
        (snapshot(p.path()), digests(output)),
        untouched,
        "--dry-run changed files"
    );
    assert_eq!(dry["dry_run"], true);
    assert_eq!(dry["rows_deleted"]["_state/events"], their_events);
    assert_eq!(dry["rows_deleted"]["profiles"], 1);

    let done: serde_json::Value =
        serde_json::from_str(ok(run(&mut p.cmd(&["forget", &asked, "--json"]))).trim()).unwrap();
    assert_eq!(done["identifiers"][0]["found"], true, "{done}");
    assert_eq!(done["profiles"], 1);
    assert_eq!(done["rows_deleted"], dry["rows_deleted"]);
    assert_eq!(
        done["suppressed_identifiers"].as_u64().unwrap() as usize,
        identifiers.len()
    );
    assert!(done["data_files_deleted"].as_u64().unwrap() > 0);
    assert!(done["log_entries_deleted"].as_u64().unwrap() > 0);

    let (parquet, other_files) = assert_nowhere(output, &needles);
    eprintln!(
        "after forget: searched {parquet} Parquet files and {other_files} other files for {} values",
        needles.len()
    );
    assert!(has_checkpoint(output, "_state/events"));

    // Everyone else is intact.
    assert_eq!(
        count(&p, "SELECT count(*) AS n FROM events"),
        events_before - their_events
    );
    assert_eq!(
        count(&p, "SELECT count(*) AS n FROM profiles"),
        profiles_before - 1
    );
    assert_eq!(
        count(
            &p,
            &format!("SELECT count(*) AS n FROM events WHERE profile_id = '{other_profile}'")
        ),
        other_events
    );
    assert_eq!(
        count(
            &p,
            &format!(
                "SELECT count(*) AS n FROM identity_graph WHERE profile_id = '{other_profile}'"
            )
        ),
        other_identifiers
    );
    let request = p.query("SELECT request_id, identifiers, rows_deleted FROM forget_requests");
    assert_eq!(request.len(), 1);
    let hashed: String = Sha256::digest(emails[0].as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert!(
        request[0]["identifiers"]
            .as_str()
            .unwrap()
            .contains(&hashed),
        "{request:?}"
    );

    if let Some(python) = &python_env {
        let seen = crate::readers::read_with_python(
            python,
            output,
            &[
                "profiles",
                "identity_graph",
                "_state/events",
                "forget_requests",
                "runs",
            ],
        );
        assert_eq!(seen["profiles"]["rows"], profiles_before - 1, "{seen}");
        assert_eq!(
            seen["profiles"]["duckdb_rows"],
            profiles_before - 1,
            "{seen}"
        );
        assert_eq!(seen["forget_requests"]["rows"], 1, "{seen}");
    }

    // The source files still hold them: status names those files.
    let status: serde_json::Value =
        serde_json::from_str(ok(run(&mut p.cmd(&["status", "--json"]))).trim()).unwrap();
    let held = status["files_holding_forgotten"].as_array().unwrap();
    assert!(!held.is_empty(), "{status}");
    let held_rows: u64 = held.iter().map(|f| f["rows"].as_u64().unwrap()).sum();
    assert!(held_rows >= their_events, "{held_rows} < {their_events}");

    // A full run reads every file again: the person stays out.
    let full = ok(run(&mut p.cmd(&["run", "--full", "--json", "--quiet"])));
    let full: serde_json::Value = serde_json::from_str(full.trim()).unwrap();
    assert_eq!(full["status"], "succeeded");
    assert!(
        full["suppressed"].as_u64().unwrap() >= their_events,
        "{full}"
    );
    let field = |k: &str| full[k].as_u64().unwrap();
    assert_eq!(
        field("rows_read"),
        field("rows_rejected") + field("rows_duplicate") + field("events") + field("suppressed"),
        "every row is accounted for: {full}"
    );
    let runs = p.query("SELECT suppressed FROM runs ORDER BY started_at DESC LIMIT 1");
    assert!(runs[0]["suppressed"].as_u64().unwrap() > 0, "{runs:?}");
    assert_nowhere(output, &needles);
    assert_eq!(
        count(&p, "SELECT count(*) AS n FROM events"),
        events_before - their_events
    );
    assert_eq!(
        count(&p, "SELECT count(*) AS n FROM profiles"),
        profiles_before - 1
    );
    assert_eq!(
        count(
            &p,
            &format!("SELECT count(*) AS n FROM events WHERE profile_id = '{other_profile}'")
        ),
        other_events
    );
}

#[test]
fn forget_waits_for_no_run_and_an_unknown_identifier_is_still_kept_out() {
    let p = TempProject::local();
    generate(&p.path().join("data"), 20, 2, 4);
    assert_eq!(p.run_json()["status"], "succeeded");
    let out = p.path().join("out");

    // While a run holds the lease, forget refuses with the run's "locked" exit code.
    {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let place =
            tessera::storage::Place::open(out.to_str().unwrap(), Path::new("/"), "test").unwrap();
        let lease = rt
            .block_on(tessera::output::lease::Lease::acquire(
                &place,
                "busy-run",
                Duration::from_secs(60),
            ))
            .unwrap();
        let refused = run(&mut p.cmd(&["forget", "email:nobody@example.com"]));
        assert_eq!(refused.status.code(), Some(3), "{}", stderr(&refused));
        assert!(stderr(&refused).contains("locked"), "{}", stderr(&refused));
        rt.block_on(lease.release());
    }
    assert!(
        p.query("SELECT count(*) AS n FROM runs")[0]["n"] == 1
            && !out.join("forget_requests").exists(),
        "a refused forget wrote nothing"
    );

    // Nobody has this email yet: it is reported as not found, and suppressed all the same.
    let requests = p.path().join("requests.txt");
    std::fs::write(
        &requests,
        "# erasure requests of this week\n\nemail:Late.Comer@Example.com\n",
    )
    .unwrap();
    let text = ok(run(&mut p.cmd(&[
        "forget",
        "--from-file",
        requests.to_str().unwrap(),
    ])));
    assert!(
        text.contains("email:Late.Comer@Example.com not found"),
        "{text}"
    );
    let bad = run(&mut p.cmd(&["forget", "fax:123"]));
    assert_eq!(bad.status.code(), Some(2), "{}", stderr(&bad));
    assert!(
        stderr(&bad).contains("argument 1: `fax` is not an identifier type"),
        "{}",
        stderr(&bad)
    );

    // A new file brings someone with that email: the run drops their event.
    let late = Ev {
        kind: Some("identify"),
        user_id: Some("late-user-1"),
        traits: Some(r#"{"email":" late.comer@example.COM "}"#),
        ..Ev::track("late-message-1", 1_790_000_000_000_000)
    };
    write_parquet(
        &p.events().join("date=2030-01-01/late.parquet"),
        &[events_batch(&[
            late,
            Ev::track("late-message-2", 1_790_000_000_000_000),
        ])],
    );
    let report = p.run_json();
    assert_eq!(report["suppressed"], 1, "{report}");
    assert_eq!(
        count(
            &p,
            "SELECT count(*) AS n FROM events WHERE message_id LIKE 'late-message-%'"
        ),
        1
    );
    assert_eq!(
        count(
            &p,
            "SELECT count(*) AS n FROM identity_graph WHERE identifier_value = 'late-user-1'"
        ),
        0
    );
}
