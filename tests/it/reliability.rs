//! Scheduled runs on S3: kill -9 at every write, overlapping runs, lease take-over and
//! fencing, incremental input equal to a full run, changed files reported, bounded memory.
//!
//! Tables are compared by content ("fingerprints"): every row formatted as text, sorted, with
//! the columns that name a run or its clock removed.

use std::collections::BTreeMap;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::time::Duration;

use arrow::util::display::{ArrayFormatter, FormatOptions};
use tessera::output::Outputs;
use tessera::storage::Place;

use crate::common::*;

/// Columns that differ between two runs over the same input.
const VOLATILE: &[&str] = &["run_id", "changed_at", "merged_at", "e_tag"];

/// Tables compared (all but `runs`, which records each run).
fn compared(outputs: &Outputs, rt: &tokio::runtime::Runtime) -> Vec<String> {
    let mut names = rt
        .block_on(tessera::output::all_tables(outputs))
        .expect("list tables");
    names.retain(|n| n != "runs");
    names
}

pub fn outputs_at(url: &str) -> Outputs {
    Outputs::new(Place::open(url, Path::new("/"), "test").expect("open output"))
}

/// One table's content as sorted lines; `None` when the table does not exist (at that version).
pub async fn table_lines(
    outputs: &Outputs,
    name: &str,
    version: Option<u64>,
    canonical: Option<&BTreeMap<String, String>>,
) -> Option<Vec<String>> {
    let ctx = tessera::engine::new_context().unwrap();
    let provider = outputs.provider_at(&ctx, name, version).await.ok()??;
    let batches = ctx.read_table(provider).unwrap().collect().await.unwrap();
    let options = FormatOptions::default().with_null("∅");
    let mut lines = Vec::new();
    for batch in batches {
        let schema = batch.schema();
        let keep: Vec<usize> = (0..schema.fields().len())
            .filter(|&i| !VOLATILE.contains(&schema.field(i).name().as_str()))
            .collect();
        let formatters: Vec<ArrayFormatter> = keep
            .iter()
            .map(|&i| ArrayFormatter::try_new(batch.column(i).as_ref(), &options).unwrap())
            .collect();
        for row in 0..batch.num_rows() {
            let cells: Vec<String> = keep
                .iter()
                .zip(&formatters)
                .map(|(&i, f)| {
                    let mut value = f.value(row).to_string();
                    // Each trial has its own project folder: compare paths from the project.
                    if let Some(at) = value.find("/data/events/") {
                        value = format!("PROJECT{}", &value[at..]);
                    }
                    let name = schema.field(i).name();
                    match canonical {
                        Some(map) if name.ends_with("profile_id") => {
                            map.get(&value).cloned().unwrap_or(value)
                        }
                        _ => value,
                    }
                })
                .collect();
            lines.push(cells.join("|"));
        }
    }
    lines.sort();
    Some(lines)
}

/// The names of the tables whose content differs (or exists on one side only).
pub fn differing(
    a: &BTreeMap<String, Vec<String>>,
    b: &BTreeMap<String, Vec<String>>,
) -> Vec<String> {
    let mut names: Vec<String> = a.keys().chain(b.keys()).cloned().collect();
    names.sort();
    names.dedup();
    names.retain(|n| a.get(n) != b.get(n));
    names
}

/// Every compared table's content at its latest version.
pub fn fingerprints(url: &str) -> BTreeMap<String, Vec<String>> {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let outputs = outputs_at(url);
    let mut out = BTreeMap::new();
    for name in compared(&outputs, &rt) {
        if let Some(lines) = rt.block_on(table_lines(&outputs, &name, None, None)) {
            out.insert(name, lines);
        }
    }
    out
}

/// The table versions the last succeeded `runs` row pinned, read back.
fn pinned(url: &str) -> Option<BTreeMap<String, Vec<String>>> {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let outputs = outputs_at(url);
    let runs = rt.block_on(async {
        let ctx = tessera::engine::new_context().unwrap();
        let df = outputs.read(&ctx, "runs").await.unwrap()?;
        let df = df
            .filter(datafusion::prelude::col("status").eq(datafusion::prelude::lit("succeeded")))
            .unwrap()
            .sort(vec![
                datafusion::prelude::col("started_at").sort(false, false)
            ])
            .unwrap()
            .limit(0, Some(1))
            .unwrap()
            .select_columns(&["tables"])
            .unwrap();
        let batches = df.collect().await.unwrap();
        let batch = batches.into_iter().find(|b| b.num_rows() > 0)?;
        let text =
            arrow::compute::cast(batch.column(0), &arrow::datatypes::DataType::Utf8).unwrap();
        let text = text
            .as_any()
            .downcast_ref::<arrow::array::StringArray>()
            .unwrap()
            .value(0)
            .to_string();
        Some(text)
    })?;
    let tables: serde_json::Value = serde_json::from_str(&runs).unwrap();
    let mut out = BTreeMap::new();
    for (name, committed) in tables.as_object().unwrap() {
        if name == "runs" {
            continue;
        }
        let version = committed["version"].as_u64().unwrap();
        let lines = rt
            .block_on(table_lines(&outputs, name, Some(version), None))
            .unwrap_or_else(|| panic!("{name} version {version} pinned by runs is readable"));
        out.insert(name.clone(), lines);
    }
    Some(out)
}

/// Copies every object under `from` to `to` (server side), so each trial starts from the same
/// published state without running again.
fn copy_prefix(from: &str, to: &str) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        use futures::TryStreamExt;
        use object_store::{ObjectStore, ObjectStoreExt};
        let a = Place::open(from, Path::new("/"), "test").unwrap();
        let b = Place::open(to, Path::new("/"), "test").unwrap();
        let objects: Vec<object_store::ObjectMeta> =
            a.store.list(Some(&a.prefix)).try_collect().await.unwrap();
        for meta in objects {
            let rest = meta.location.prefix_match(&a.prefix).unwrap();
            let target = rest.fold(b.prefix.clone(), |p, part| p.join(part));
            a.store.copy(&meta.location, &target).await.unwrap();
        }
    });
}

/// A project with events in a local folder and output at `output`, times fixed by `--as-of`.
pub fn project(output: &str, extra: &str) -> TempProject {
    // The bundled project's rules, pointed elsewhere.
    let bundled = std::fs::read_to_string(repo().join("tessera.toml")).unwrap();
    let mut config = String::new();
    for line in bundled.lines() {
        if line.starts_with("output = ") {
            config.push_str(&format!("output = \"{output}\"\n"));
        } else if line.starts_with("events = ") {
            config.push_str("events = \"data/events\"\n");
        } else {
            config.push_str(line);
            config.push('\n');
        }
    }
    config.push_str(extra);
    let p = TempProject::new(&config);
    for kind in ["identity", "traits", "segments"] {
        copy_dir(
            &repo().join("queries").join(kind),
            &p.path().join("queries").join(kind),
        );
    }
    p
}

pub const AS_OF: &str = "2026-10-06T00:00:00Z";

pub fn run_args() -> Vec<&'static str> {
    vec!["run", "--json", "--quiet", "--as-of", AS_OF]
}

/// Moves the generated day folders after the first `first` into `later`.
fn hold_back(p: &TempProject, first: usize, later: &Path) -> Vec<String> {
    let mut days: Vec<String> = std::fs::read_dir(p.events())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    days.sort();
    std::fs::create_dir_all(later).unwrap();
    for day in &days[first..] {
        std::fs::rename(p.events().join(day), later.join(day)).unwrap();
    }
    days[first..].to_vec()
}

fn bring_back(p: &TempProject, later: &Path, days: &[String]) {
    for day in days {
        copy_dir(&later.join(day), &p.events().join(day));
    }
}

#[test]
fn a_run_killed_at_any_write_publishes_all_or_nothing_and_the_next_run_recovers() {
    let test = "a_run_killed_at_any_write_publishes_all_or_nothing_and_the_next_run_recovers";
    if !s3_available(test) {
        return;
    }
    let mut points_tried = 0;
    let mut killed = 0;
    let mut mid_publish = 0;
    let mut partial_pinned = 0;
    let mut sweep = Sweep::from_env();
    for (seed, stride) in [(11u64, 1usize), (12, 3), (13, 3)] {
        let base = s3_prefix();
        let template = format!("{base}/template");
        let lease = "[run]\nlease_seconds = 2\n";
        let p = project(&template, lease);
        generate(&p.path().join("data"), 60, 4, seed);
        let later = p.path().join("later");
        let days = hold_back(&p, 2, &later);
        // The published state before the run under test: batch one.
        ok(run(&mut p.cmd(&run_args())));
        let before = fingerprints(&template);
        bring_back(&p, &later, &days);

        // The undisturbed second run, and how many writes it makes.
        let clean = format!("{base}/clean");
        copy_prefix(&template, &clean);
        let q = project(&clean, lease);
        copy_dir(&p.events(), &q.events());
        let out = run(q.cmd(&run_args()).env("TESSERA_TEST_TRACE_WRITES", "1"));
        let written: Vec<String> = stderr(&out)
            .lines()
            .filter(|l| l.starts_with("tessera-write "))
            .map(str::to_string)
            .collect();
        let writes = written.len();
        ok(out);
        let after = fingerprints(&clean);
        assert!(
            !differing(&before, &after).is_empty(),
            "the second batch changes the tables"
        );
        assert!(writes >= 20, "a run makes at least 20 writes: {writes}");

        for point in sweep_points(&written, stride, &mut sweep) {
            points_tried += 1;
            let trial = format!("{base}/kill{point}");
            copy_prefix(&template, &trial);
            let t = project(&trial, lease);
            copy_dir(&p.events(), &t.events());
            let out = run(t
                .cmd(&run_args())
                .env("TESSERA_TEST_TRACE_WRITES", "1")
                .env("TESSERA_TEST_KILL_AFTER_WRITE", point.to_string()));
            assert_eq!(
                out.status.signal(),
                Some(9),
                "killed at write {point}: {}",
                stderr(&out)
            );
            killed += 1;
            let log = stderr(&out);
            // Whether the publish manifest was written before the kill.
            let manifest_written = log
                .lines()
                .any(|l| l.starts_with("tessera-write ") && l.contains("_state/publish/"));

            // Every table reads as its previous or its new complete version.
            let now = fingerprints(&trial);
            let mut newer = 0;
            for (name, lines) in &now {
                let was = before.get(name);
                let will = after.get(name);
                assert!(
                    Some(lines) == was || Some(lines) == will,
                    "seed {seed}, write {point}: {name} is neither its old nor its new version"
                );
                if Some(lines) != was {
                    newer += 1;
                }
            }
            if !manifest_written {
                assert_eq!(
                    newer, 0,
                    "seed {seed}, write {point}: visible before the publish began"
                );
            } else if newer > 0 && now != after {
                mid_publish += 1;
            }
            // The last succeeded run pins one consistent set.
            let pinned = pinned(&trial).expect("the first run's row is there");
            let consistent = pinned.iter().all(|(n, l)| before.get(n) == Some(l))
                || pinned.iter().all(|(n, l)| after.get(n) == Some(l));
            if !consistent {
                partial_pinned += 1;
            }
            assert!(
                consistent,
                "seed {seed}, write {point}: runs pins a mixed set (pinned versions equal to \
                 neither the old nor the new tables: {:?})",
                pinned
                    .iter()
                    .filter(|(n, l)| before.get(*n) != Some(*l) && after.get(*n) != Some(*l))
                    .map(|(n, _)| n)
                    .collect::<Vec<_>>()
            );

            // The lease of the killed run lapses; the next run finishes the job.
            std::thread::sleep(Duration::from_millis(2100));
            ok(run(&mut t.cmd(&run_args())));
            let recovered = fingerprints(&trial);
            assert!(
                differing(&recovered, &after).is_empty(),
                "seed {seed}, write {point}: after recovery these tables differ from an undisturbed run: {:?}",
                differing(&recovered, &after)
            );
        }
    }
    eprintln!(
        "crash test: {points_tried} kill points, {killed} killed, {mid_publish} stopped mid-publish, \
         {partial_pinned} partial pinned sets"
    );
    assert!(points_tried >= 20);
    assert_eq!(partial_pinned, 0);
}

#[test]
fn two_runs_started_together_publish_once_and_the_other_says_locked() {
    let test = "two_runs_started_together_publish_once_and_the_other_says_locked";
    if !s3_available(test) {
        return;
    }
    let mut locked = 0;
    let mut double = 0;
    let trials = 6;
    for trial in 0..trials {
        let output = format!("{}/out", s3_prefix());
        let p = project(&output, "");
        generate(&p.path().join("data"), 40, 2, 30 + trial);
        let mut a = p.cmd(&run_args());
        let mut b = p.cmd(&run_args());
        let first = a
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(40 * trial));
        let second = b
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let outs = [
            first.wait_with_output().unwrap(),
            second.wait_with_output().unwrap(),
        ];
        let mut published = 0;
        for out in &outs {
            match out.status.code() {
                Some(0) => {
                    let report: serde_json::Value =
                        serde_json::from_str(stdout(out).trim()).unwrap();
                    if report["status"] == "succeeded" {
                        published += 1;
                    } else {
                        assert_eq!(report["status"], "unchanged");
                    }
                }
                Some(3) => {
                    locked += 1;
                    let said = format!("{}{}", stdout(out), stderr(out));
                    assert!(said.contains("locked: another run"), "{said}");
                }
                other => panic!("unexpected exit {other:?}: {}", stderr(out)),
            }
        }
        if published != 1 {
            double += 1;
        }
        assert_eq!(published, 1, "trial {trial}: exactly one run publishes");
        let runs = p.query("SELECT count(*) AS n FROM runs");
        assert_eq!(runs[0]["n"], 1, "one runs row");
        let status: serde_json::Value =
            serde_json::from_str(ok(run(&mut p.cmd(&["status", "--json"]))).trim()).unwrap();
        assert_eq!(status["tables"]["profiles"], 0, "profiles committed once");
        assert_eq!(status["locked"], false);
    }
    eprintln!(
        "overlap test: {trials} trials, {locked} runs refused as locked, {double} double publishes"
    );
    assert!(locked >= 1, "at least one trial overlapped");
}

#[test]
fn an_expired_lease_is_taken_over_and_a_run_that_lost_its_lease_publishes_nothing() {
    let test = "an_expired_lease_is_taken_over_and_a_run_that_lost_its_lease_publishes_nothing";
    if !s3_available(test) {
        return;
    }
    let output = format!("{}/out", s3_prefix());
    let rt = tokio::runtime::Runtime::new().unwrap();
    let place = Place::open(&output, Path::new("/"), "test").unwrap();

    let p = project(&output, "");
    generate(&p.path().join("data"), 30, 2, 5);
    // A live lease refuses a second holder; once it lapses, a run takes it over.
    let holder = rt
        .block_on(tessera::output::lease::Lease::acquire(
            &place,
            "dead-run",
            Duration::from_secs(2),
        ))
        .unwrap();
    let refused = rt.block_on(tessera::output::lease::Lease::acquire(
        &place,
        "second",
        Duration::from_secs(2),
    ));
    assert!(
        matches!(refused, Err(tessera::Error::Locked(_))),
        "a held lease refuses others"
    );
    drop(holder); // stops renewing, as a killed run would; the lease lapses by itself
    let out = run(&mut p.cmd(&["run", "--quiet"]));
    assert_eq!(out.status.code(), Some(3), "still held: {}", stderr(&out));
    assert!(
        stderr(&out).contains("dead-run"),
        "names the holder: {}",
        stderr(&out)
    );
    std::thread::sleep(Duration::from_millis(2200));
    ok(run(&mut p.cmd(&["run", "--quiet"])));

    // Fencing: a run whose lease another run took cannot publish anything.
    let output = format!("{}/fenced", s3_prefix());
    let place = Place::open(&output, Path::new("/"), "test").unwrap();
    rt.block_on(async {
        use object_store::ObjectStoreExt;
        let zombie =
            tessera::output::lease::Lease::acquire(&place, "zombie", Duration::from_secs(30))
                .await
                .unwrap();
        let stage = tessera::output::publish::Stage::new(&place);
        let staged = Outputs::new(stage.place().clone());
        let ctx = tessera::engine::new_context().unwrap();
        let df = ctx.sql("SELECT 1 AS x").await.unwrap();
        staged
            .write(&ctx, "profiles", df, tessera::output::WriteMode::Replace)
            .await
            .unwrap();
        // Another run takes the lease (as after an expiry) by writing it anew.
        let (mut body, _) = tessera::output::lease::read(&place).await.unwrap().unwrap();
        body.run_id = "usurper".into();
        place
            .store
            .put(
                &place.child(tessera::output::lease::LEASE),
                serde_json::to_vec(&body).unwrap().into(),
            )
            .await
            .unwrap();
        let result = stage.publish("zombie", &zombie, "runs").await;
        assert!(
            matches!(result, Err(tessera::Error::Fenced(_))),
            "{result:?}"
        );
        let real = Outputs::new(place.clone());
        assert!(
            real.open("profiles").await.unwrap().is_none(),
            "nothing published"
        );
        assert!(tessera::output::publish::pending(&place)
            .await
            .unwrap()
            .is_empty());
    });
}

#[test]
fn three_incremental_runs_equal_one_full_run_and_a_changed_file_is_reported() {
    let test = "three_incremental_runs_equal_one_full_run_and_a_changed_file_is_reported";
    if !s3_available(test) {
        return;
    }
    let base = s3_prefix();
    let inc = project(&format!("{base}/inc"), "");
    generate(&inc.path().join("data"), 120, 6, 77);
    let full = project(&format!("{base}/full"), "");
    copy_dir(&inc.events(), &full.events());
    let later = inc.path().join("later");
    let days = hold_back(&inc, 2, &later);

    let mut new_events = 0;
    for batch in [&days[..2], &days[2..], &[][..]] {
        bring_back(&inc, &later, batch);
        let report: serde_json::Value =
            serde_json::from_str(ok(run(&mut inc.cmd(&run_args()))).trim()).unwrap();
        if batch.is_empty() && report["status"] == "unchanged" {
            assert_eq!(report["input_files"].as_array().unwrap().len(), 0);
            continue;
        }
        new_events += report["new_events"].as_u64().unwrap();
        assert!(
            report["input_files"].as_array().unwrap().len() <= 2 * 2 + 4,
            "reads only new files"
        );
    }
    let report: serde_json::Value =
        serde_json::from_str(ok(run(&mut full.cmd(&run_args()))).trim()).unwrap();
    let _ = new_events;
    assert_eq!(report["mode"], "full");

    // The same groupings, traits and memberships (profile ids named by their oldest
    // identifier, so ids that history chose differently still compare).
    let rt = tokio::runtime::Runtime::new().unwrap();
    let compare = |name: &str| {
        let read = |url: String| {
            let outputs = outputs_at(&url);
            let canonical = rt.block_on(canonical_ids(&outputs));
            rt.block_on(table_lines(&outputs, name, None, Some(&canonical)))
        };
        let a = read(format!("{base}/inc"));
        let b = read(format!("{base}/full"));
        assert!(a.is_some(), "{name} exists");
        assert_eq!(a, b, "{name}: incremental and full runs differ");
    };
    for name in [
        "_state/events",
        "rejected_events",
        "identity_graph",
        "identity_links",
        "identity_conflicts",
        "profiles",
        "segments/high_value",
        "segments/active_30d",
        "segments/cart_abandoners",
        "segments/lapsed_buyers",
        "segments/high_value_active",
    ] {
        compare(name);
    }

    // A processed file that changes is reported, not read again.
    let victim = std::fs::read_dir(inc.events().join(&days[0]))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let mut bytes = std::fs::read(&victim).unwrap();
    bytes.extend_from_slice(b"appended later");
    std::fs::write(&victim, bytes).unwrap();
    let report: serde_json::Value =
        serde_json::from_str(ok(run(&mut inc.cmd(&run_args()))).trim()).unwrap();
    assert_eq!(report["status"], "unchanged");
    let changed = report["changed_files"].as_array().unwrap();
    assert_eq!(changed.len(), 1, "{report}");
    assert!(changed[0]["file"]
        .as_str()
        .unwrap()
        .ends_with(victim.file_name().unwrap().to_str().unwrap()));
    assert!(changed[0]["reason"].as_str().unwrap().contains("--full"));
    let status: serde_json::Value =
        serde_json::from_str(ok(run(&mut inc.cmd(&["status", "--json"]))).trim()).unwrap();
    assert_eq!(status["changed_files"].as_array().unwrap().len(), 1);
}

#[test]
fn carried_traits_are_recomputed_for_every_profile_when_their_file_or_the_as_of_time_moves() {
    // Two projects over the same files: one run incrementally, one always in full.
    let inc = project("out", "");
    generate(&inc.path().join("data"), 120, 6, 91);
    let full = project("out", "");
    copy_dir(&inc.events(), &full.events());
    let (inc_later, full_later) = (inc.path().join("later"), full.path().join("later"));
    let days = hold_back(&inc, 3, &inc_later);
    hold_back(&full, 3, &full_later);
    let report: serde_json::Value =
        serde_json::from_str(ok(run(&mut inc.cmd(&run_args()))).trim()).unwrap();
    assert_eq!(report["mode"], "full");

    let rt = tokio::runtime::Runtime::new().unwrap();
    let profiles = |p: &TempProject| {
        let outputs = outputs_at(p.path().join("out").to_str().unwrap());
        let canonical = rt.block_on(canonical_ids(&outputs));
        rt.block_on(table_lines(&outputs, "profiles", None, Some(&canonical)))
            .expect("profiles exist")
    };
    // Returns for which profiles the incremental run computed the last-known traits.
    let step = |days: &[String], as_of: &str| -> String {
        bring_back(&inc, &inc_later, days);
        bring_back(&full, &full_later, days);
        let out = run(&mut inc.cmd(&["run", "--json", "-v", "--as-of", as_of]));
        let log = stderr(&out);
        let report: serde_json::Value = serde_json::from_str(ok(out).trim()).unwrap();
        assert_eq!(report["mode"], "incremental");
        let traits_for = log
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|l| l["fields"]["message"] == "last-known traits")
            .map(|l| l["fields"]["computed_for"].as_str().unwrap().to_string())
            .unwrap_or_else(|| panic!("no last-known traits line in {log}"));
        ok(run(
            &mut full.cmd(&["run", "--full", "--quiet", "--as-of", as_of])
        ));
        let (a, b) = (profiles(&inc), profiles(&full));
        assert_eq!(a.len(), b.len());
        let differ: Vec<_> = a.iter().zip(&b).filter(|(x, y)| x != y).take(3).collect();
        assert!(
            differ.is_empty(),
            "incremental and full profiles differ: {differ:#?}"
        );
        traits_for
    };

    // A trait file edited between runs: the new text holds for every profile, not only those
    // with new events (the other files are carried over).
    for p in [&inc, &full] {
        let file = p.path().join("queries/traits/order_count.sql");
        let sql = std::fs::read_to_string(&file).unwrap();
        assert!(sql.contains("90 days"));
        std::fs::write(&file, sql.replace("90 days", "2 days")).unwrap();
    }
    // The last-known traits do not depend on trait files: carried over.
    assert_eq!(step(&days[..1], AS_OF), "changed profiles");
    // Nor on the as-of time (windows over `as_of()` move for every profile).
    assert_eq!(
        step(&days[1..2], "2026-11-04T00:00:00Z"),
        "changed profiles"
    );
    // Lifting another trait changes what was computed: every profile again.
    for p in [&inc, &full] {
        let file = p.path().join("tessera.toml");
        let config = std::fs::read_to_string(&file).unwrap();
        let lifted = "traits = [\"first_name\", \"last_name\", \"plan\"]";
        assert!(config.contains(lifted), "{config}");
        let more = "traits = [\"first_name\", \"last_name\", \"plan\", \"email\"]";
        std::fs::write(&file, config.replace(lifted, more)).unwrap();
    }
    assert_eq!(step(&days[2..], "2026-11-04T00:00:00Z"), "every profile");
}

/// profile_id → its oldest identifier (type:value), so groupings compare across outputs.
async fn canonical_ids(outputs: &Outputs) -> BTreeMap<String, String> {
    let ctx = tessera::engine::new_context().unwrap();
    let mut map = BTreeMap::new();
    let Some(df) = outputs.read(&ctx, "identity_graph").await.unwrap() else {
        return map;
    };
    ctx.register_table("g", df.into_view()).unwrap();
    let batches = ctx
        .sql("SELECT profile_id, min(identifier_type || ':' || identifier_value) AS key FROM g GROUP BY profile_id")
        .await
        .unwrap()
        .collect()
        .await
        .unwrap();
    for batch in batches {
        let ids = arrow::compute::cast(batch.column(0), &arrow::datatypes::DataType::Utf8).unwrap();
        let keys =
            arrow::compute::cast(batch.column(1), &arrow::datatypes::DataType::Utf8).unwrap();
        let ids = ids
            .as_any()
            .downcast_ref::<arrow::array::StringArray>()
            .unwrap();
        let keys = keys
            .as_any()
            .downcast_ref::<arrow::array::StringArray>()
            .unwrap();
        for i in 0..batch.num_rows() {
            map.insert(ids.value(i).to_string(), keys.value(i).to_string());
        }
    }
    map
}

#[test]
fn a_run_under_a_small_memory_limit_completes_or_fails_clearly_and_is_not_killed() {
    let p = project("out", "");
    generate(&p.path().join("data"), 300, 5, 8);
    let spill = p.path().join("spill");
    let out = run(&mut p.cmd(&[
        "run",
        "--quiet",
        "--memory-limit",
        "24MiB",
        "--spill-dir",
        spill.to_str().unwrap(),
    ]));
    assert_eq!(out.status.signal(), None, "not killed: {}", stderr(&out));
    if !out.status.success() {
        let text = stderr(&out);
        assert!(
            text.contains("--memory-limit") && text.contains("out of memory"),
            "{text}"
        );
        return;
    }
    let profiles = p.query("SELECT count(*) AS n FROM profiles");
    assert!(profiles[0]["n"].as_u64().unwrap() > 100);
    // A limit that is not a size is refused, naming the flag's key.
    let out = run(&mut p.cmd(&["run", "--memory-limit", "lots"]));
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("lots"));
}

#[test]
fn a_store_that_ignores_conditional_writes_is_refused() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let place = Place {
        key: "storage.output".into(),
        location: tessera::storage::Location::Memory {
            prefix: "ignores".into(),
        },
        store: std::sync::Arc::new(IgnoresConditions(object_store::memory::InMemory::new())),
        prefix: object_store::path::Path::from("ignores"),
    };
    let err = rt
        .block_on(tessera::output::lease::check_conditional_writes(&place))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("conditional writes") && err.contains("storage.output"),
        "{err}"
    );
    let honest = Place::open("memory://honest", Path::new("/"), "storage.output").unwrap();
    rt.block_on(tessera::output::lease::check_conditional_writes(&honest))
        .unwrap();
}

/// A store that, like some S3 look-alikes, overwrites where a conditional create was asked.
#[derive(Debug)]
struct IgnoresConditions(object_store::memory::InMemory);

impl std::fmt::Display for IgnoresConditions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "IgnoresConditions")
    }
}

#[async_trait::async_trait]
impl object_store::ObjectStore for IgnoresConditions {
    async fn put_opts(
        &self,
        location: &object_store::path::Path,
        payload: object_store::PutPayload,
        _opts: object_store::PutOptions,
    ) -> object_store::Result<object_store::PutResult> {
        self.0.put_opts(location, payload, Default::default()).await
    }
    async fn put_multipart_opts(
        &self,
        location: &object_store::path::Path,
        opts: object_store::PutMultipartOptions,
    ) -> object_store::Result<Box<dyn object_store::MultipartUpload>> {
        self.0.put_multipart_opts(location, opts).await
    }
    async fn get_opts(
        &self,
        location: &object_store::path::Path,
        options: object_store::GetOptions,
    ) -> object_store::Result<object_store::GetResult> {
        self.0.get_opts(location, options).await
    }
    fn delete_stream(
        &self,
        locations: futures::stream::BoxStream<
            'static,
            object_store::Result<object_store::path::Path>,
        >,
    ) -> futures::stream::BoxStream<'static, object_store::Result<object_store::path::Path>> {
        self.0.delete_stream(locations)
    }
    fn list(
        &self,
        prefix: Option<&object_store::path::Path>,
    ) -> futures::stream::BoxStream<'static, object_store::Result<object_store::ObjectMeta>> {
        self.0.list(prefix)
    }
    async fn list_with_delimiter(
        &self,
        prefix: Option<&object_store::path::Path>,
    ) -> object_store::Result<object_store::ListResult> {
        self.0.list_with_delimiter(prefix).await
    }
    async fn copy_opts(
        &self,
        from: &object_store::path::Path,
        to: &object_store::path::Path,
        options: object_store::CopyOptions,
    ) -> object_store::Result<()> {
        self.0.copy_opts(from, to, options).await
    }
}

#[test]
fn files_a_killed_run_left_behind_are_deleted_by_a_later_run() {
    let p = project("out", "[run]\nretention_hours = 0\n");
    generate(&p.path().join("data"), 60, 2, 4);
    // Killed after writing three data files: nothing published, three files orphaned.
    let out = run(p
        .cmd(&run_args())
        .env("TESSERA_TEST_TRACE_WRITES", "1")
        .env("TESSERA_TEST_KILL_AFTER_WRITE", "4"));
    assert_eq!(out.status.signal(), Some(9), "{}", stderr(&out));
    let orphans: Vec<std::path::PathBuf> = stderr(&out)
        .lines()
        .filter(|l| l.starts_with("tessera-write ") && l.ends_with(".parquet"))
        .map(|l| Path::new("/").join(l.split_whitespace().nth(2).unwrap()))
        .collect();
    assert_eq!(orphans.len(), 3, "{}", stderr(&out));
    assert!(orphans.iter().all(|f| f.exists()));
    assert!(
        !p.path().join("out/profiles/_delta_log").exists()
            && !p.path().join("out/rejected_events/_delta_log").exists(),
        "nothing published"
    );
    // The next run publishes, then deletes what no version needs (retention 0 here).
    let report: serde_json::Value =
        serde_json::from_str(ok(run(&mut p.cmd(&run_args()))).trim()).unwrap();
    assert_eq!(report["status"], "succeeded");
    for orphan in &orphans {
        assert!(!orphan.exists(), "{} still there", orphan.display());
    }
    assert!(
        p.query("SELECT count(*) AS n FROM profiles")[0]["n"]
            .as_u64()
            .unwrap()
            > 10
    );
}

/// The scratch folders (`tessera-*`) in `dir`.
fn scratch_folders(dir: &Path) -> Vec<std::path::PathBuf> {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .map(|e| e.unwrap().path())
                .filter(|p| {
                    p.file_name()
                        .is_some_and(|n| n.to_string_lossy().starts_with("tessera-"))
                })
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn resolved_events_in_memory_or_in_the_scratch_folder_give_the_same_tables() {
    let p = project("out", "");
    generate(&p.path().join("data"), 200, 5, 8);
    let tables = [
        "profiles ORDER BY profile_id",
        "sessions ORDER BY session_id",
        "rfm ORDER BY profile_id",
        "segments.cart_abandoners ORDER BY profile_id",
        "segments.active_30d ORDER BY profile_id",
    ];
    let read = |p: &TempProject| -> Vec<Vec<serde_json::Value>> {
        tables
            .iter()
            .map(|t| p.query(&format!("SELECT * FROM {t}")))
            .collect()
    };
    let mut args = run_args();
    args.push("--full");
    let mut runs = Vec::new();
    for on_disk in [false, true] {
        let mut cmd = p.cmd(&args);
        cmd.env("RUST_LOG", "tessera=info");
        if on_disk {
            cmd.env("TESSERA_TEST_EVENTS_ON_DISK", "1");
        }
        let out = run(&mut cmd);
        let log = stderr(&out);
        ok(out);
        assert_eq!(
            log.contains("resolved events kept in memory"),
            !on_disk,
            "{log}"
        );
        let tables = read(&p);
        assert!(tables[0].len() > 50, "{:?}", tables[0].len());
        runs.push(tables);
    }
    assert_eq!(runs[0], runs[1]);
}

#[test]
fn the_scratch_folder_of_a_killed_run_is_removed_by_the_next_run() {
    let p = project("out", "");
    generate(&p.path().join("data"), 60, 2, 8);
    let spill = p.path().join("spill");
    let spill_arg = spill.to_str().unwrap();
    let mut args = run_args();
    args.extend(["--full", "--spill-dir", spill_arg]);

    // How many writes a run makes; a run leaves no scratch folder behind when it ends. (The
    // resolved events of so few events would be kept in memory; they go to the folder here.)
    let out = run(p
        .cmd(&args)
        .env("TESSERA_TEST_TRACE_WRITES", "1")
        .env("TESSERA_TEST_EVENTS_ON_DISK", "1"));
    let writes = stderr(&out).matches("tessera-write ").count();
    ok(out);
    assert!(
        scratch_folders(&spill).is_empty(),
        "a finished run removes its folder"
    );

    // Killed near its end, after the resolved events were written to its scratch folder.
    let out = run(p
        .cmd(&args)
        .env("TESSERA_TEST_TRACE_WRITES", "1")
        .env("TESSERA_TEST_EVENTS_ON_DISK", "1")
        .env("TESSERA_TEST_KILL_AFTER_WRITE", (writes - 2).to_string()));
    assert_eq!(out.status.signal(), Some(9), "{}", stderr(&out));
    let left = scratch_folders(&spill);
    assert_eq!(left.len(), 1, "the killed run's folder is left: {left:?}");
    let parquet = walk(&left[0])
        .into_iter()
        .filter(|f| f.extension().is_some_and(|e| e == "parquet"))
        .count();
    assert!(parquet > 0, "it holds the resolved events: {left:?}");

    // The next run removes it (its lock died with the process) and then its own.
    let out = ok(run(&mut p.cmd(&args)));
    let report: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(report["status"], "succeeded");
    assert!(!left[0].exists(), "{} is still there", left[0].display());
    assert!(scratch_folders(&spill).is_empty());
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(walk(&path));
        } else {
            files.push(path);
        }
    }
    files
}

/// Which kill points a crash sweep tries. Every one (each `stride`-th write) with
/// `TESSERA_TEST_FULL_SWEEP=1`, which `scripts/full-sweeps.sh` sets; otherwise a sample drawn
/// with a seed the test prints (`TESSERA_TEST_SWEEP_SEED` repeats it), so the suite stays
/// within CI's time and every run still covers other points.
struct Sweep {
    full: bool,
    rng: rand_chacha::ChaCha8Rng,
}

impl Sweep {
    fn from_env() -> Sweep {
        use rand::SeedableRng;
        let full = std::env::var_os("TESSERA_TEST_FULL_SWEEP").is_some();
        let seed = std::env::var("TESSERA_TEST_SWEEP_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos() as u64)
            });
        eprintln!(
            "crash sweep: {} (TESSERA_TEST_SWEEP_SEED={seed} repeats this sample; TESSERA_TEST_FULL_SWEEP=1 tries every write)",
            if full { "every write" } else { "sampled" }
        );
        Sweep {
            full,
            rng: rand_chacha::ChaCha8Rng::seed_from_u64(seed),
        }
    }
}

/// The kill points (1-based write numbers) to try for a run that made `written` writes.
/// Sampled: the first write, and four more before the publish starts; in the publish (from
/// its first `_state/publish/` write to the end, where all-or-nothing is decided) its first
/// two writes, its last, and three more.
fn sweep_points(written: &[String], stride: usize, sweep: &mut Sweep) -> Vec<usize> {
    use rand::seq::SliceRandom;
    let n = written.len();
    if sweep.full {
        return (1..=n).step_by(stride).collect();
    }
    let publish = written
        .iter()
        .position(|w| w.contains("_state/publish/"))
        .map_or(n, |i| i + 1);
    let before: Vec<usize> = (2..publish).collect();
    let during: Vec<usize> = (publish + 2..n).collect();
    let mut points = vec![1, publish, publish + 1, n];
    points.extend(before.choose_multiple(&mut sweep.rng, 4));
    points.extend(during.choose_multiple(&mut sweep.rng, 3));
    points.retain(|&p| (1..=n).contains(&p));
    points.sort_unstable();
    points.dedup();
    points
}
