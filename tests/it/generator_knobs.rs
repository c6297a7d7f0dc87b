//! `tessera generate`'s knobs: default data unchanged, the same rows in any order, the
//! adversarial preset's shape, and identity grouping that does not depend on the order events
//! arrive in.

use std::path::{Path, PathBuf};

use arrow::array::Array;
use arrow::util::display::array_value_to_string;
use datafusion::prelude::{ParquetReadOptions, SessionContext};

use crate::common::*;

/// `tessera generate --json` with extra flags.
fn generate_with(
    out: &Path,
    people: u64,
    days: u32,
    seed: u64,
    extra: &[&str],
) -> serde_json::Value {
    let mut cmd = tessera();
    cmd.args(["generate", "--out", out.to_str().unwrap(), "--json"])
        .args(["--people", &people.to_string(), "--days", &days.to_string()])
        .args(["--seed", &seed.to_string()])
        .args(extra);
    serde_json::from_str(ok(run(&mut cmd)).trim()).unwrap()
}

/// Parquet files under `dir`, sorted by path (the order a reader lists them in).
fn parquet_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "parquet") {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

/// Every event row, file by file in path order, each row's values as text.
fn rows_by_file(events: &Path) -> Vec<(PathBuf, Vec<Vec<String>>)> {
    parquet_files(events)
        .into_iter()
        .map(|f| {
            let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(
                std::fs::File::open(&f).unwrap(),
            )
            .unwrap()
            .build()
            .unwrap();
            let mut rows = Vec::new();
            for batch in reader {
                let batch = batch.unwrap();
                for r in 0..batch.num_rows() {
                    rows.push(
                        batch
                            .columns()
                            .iter()
                            .map(|c| {
                                if c.is_null(r) {
                                    "∅".to_string()
                                } else {
                                    array_value_to_string(c, r).unwrap()
                                }
                            })
                            .collect(),
                    );
                }
            }
            (f.strip_prefix(events).unwrap().to_path_buf(), rows)
        })
        .collect()
}

/// FNV-1a over every file's path and rows, in order.
fn digest(events: &Path) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |b: &[u8]| {
        for &x in b.iter().chain([0xffu8].iter()) {
            h ^= x as u64;
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    };
    for (path, rows) in rows_by_file(events) {
        eat(path.display().to_string().as_bytes());
        for row in rows {
            for v in row {
                eat(v.as_bytes());
            }
        }
    }
    h
}

#[test]
fn default_data_is_the_data_generated_before_the_knobs_existed() {
    // Benchmarks and tests compare figures across versions on the default data: the knobs must
    // not change one row of it, nor the order of rows, nor the files they are in. The digest is
    // of the events the generator wrote before it had knobs (same flags).
    let dir = tempfile::tempdir().unwrap();
    generate_with(dir.path(), 300, 6, 11, &[]);
    assert_eq!(
        digest(&dir.path().join("events")),
        PRE_KNOB_DIGEST,
        "default data changed"
    );
    let again = tempfile::tempdir().unwrap();
    generate_with(again.path(), 300, 6, 11, &["--preset", "friendly"]);
    assert_eq!(
        std::fs::read(dir.path().join("truth.parquet")).unwrap(),
        std::fs::read(again.path().join("truth.parquet")).unwrap()
    );
    assert_eq!(digest(&again.path().join("events")), PRE_KNOB_DIGEST);
}

/// See the test above: this file's `digest` of `generate --people 300 --days 6 --seed 11` as
/// the version before the knobs (commit c70bed0) wrote it (the files were compared byte for
/// byte with that version's before the digest was taken).
const PRE_KNOB_DIGEST: u64 = 16_525_857_771_350_351_568;

/// Share of neighbouring rows (within a file) that carry the same anonymous_id.
fn adjacent_share(files: &[(PathBuf, Vec<Vec<String>>)]) -> f64 {
    let (mut same, mut pairs) = (0usize, 0usize);
    for (_, rows) in files {
        for w in rows.windows(2) {
            pairs += 1;
            same += usize::from(w[0][3] == w[1][3]);
        }
    }
    same as f64 / pairs.max(1) as f64
}

#[test]
fn every_order_writes_the_same_rows_and_truth_and_shuffled_scatters_people() {
    let (a, b, c) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    let small = ["--rows-per-file", "1500", "--shuffle-window", "4000"];
    let sa = generate_with(a.path(), 400, 8, 3, &small);
    let sb = generate_with(
        b.path(),
        400,
        8,
        3,
        &[&small[..], &["--order", "by-time"]].concat(),
    );
    let sc = generate_with(
        c.path(),
        400,
        8,
        3,
        &[&small[..], &["--order", "shuffled"]].concat(),
    );
    for s in [&sb, &sc] {
        for k in ["rows", "duplicates", "malformed", "truth_rows"] {
            assert_eq!(sa[k], s[k], "{k}: {sa} vs {s}");
        }
    }
    let (fa, fb, fc) = (
        rows_by_file(&a.path().join("events")),
        rows_by_file(&b.path().join("events")),
        rows_by_file(&c.path().join("events")),
    );
    let sorted = |files: &[(PathBuf, Vec<Vec<String>>)]| {
        let mut all: Vec<Vec<String>> = files.iter().flat_map(|(_, r)| r.clone()).collect();
        all.sort();
        all
    };
    let rows = sorted(&fa);
    assert!(rows.len() > 5_000, "{}", rows.len());
    assert_eq!(rows, sorted(&fb), "by-time holds the same rows");
    assert_eq!(rows, sorted(&fc), "shuffled holds the same rows");
    for dir in [&b, &c] {
        assert_eq!(
            std::fs::read(a.path().join("truth.parquet")).unwrap(),
            std::fs::read(dir.path().join("truth.parquet")).unwrap(),
            "the truth does not depend on the order"
        );
    }

    // By person, a person's events sit together; shuffled, almost never.
    let (by_person, shuffled) = (adjacent_share(&fa), adjacent_share(&fc));
    assert!(by_person > 0.5, "{by_person}");
    assert!(shuffled < 0.02, "{shuffled}");
    // Shuffled windows span days: some file holds events of more than two days.
    let days_in = |rows: &Vec<Vec<String>>| {
        let mut d: Vec<&str> = rows
            .iter()
            .filter(|r| r[5] != "∅")
            .map(|r| &r[5][..10])
            .collect();
        d.sort();
        d.dedup();
        d.len()
    };
    assert!(fc.iter().any(|(_, r)| days_in(r) > 2));
    // By time: within each file, rows in event-time order (rows without one are malformed).
    for (path, rows) in &fb {
        let times: Vec<&String> = rows.iter().map(|r| &r[5]).filter(|t| *t != "∅").collect();
        assert!(times.windows(2).all(|w| w[0] <= w[1]), "{}", path.display());
    }
}

async fn sql_rows(ctx: &SessionContext, sql: &str) -> Vec<Vec<String>> {
    let batches = ctx.sql(sql).await.unwrap().collect().await.unwrap();
    let mut out = Vec::new();
    for b in batches {
        for r in 0..b.num_rows() {
            out.push(
                b.columns()
                    .iter()
                    .map(|c| array_value_to_string(c, r).unwrap())
                    .collect(),
            );
        }
    }
    out
}

#[tokio::test]
async fn the_adversarial_preset_looks_like_the_independent_project() {
    let dir = tempfile::tempdir().unwrap();
    generate_with(dir.path(), 6000, 30, 7, &["--preset", "adversarial"]);
    let ctx = SessionContext::new();
    for (name, path) in [("ev", "events"), ("truth", "truth.parquet")] {
        ctx.register_parquet(
            name,
            dir.path().join(path).to_str().unwrap(),
            ParquetReadOptions::default(),
        )
        .await
        .unwrap();
    }
    let one = |rows: Vec<Vec<String>>| rows[0][0].parse::<f64>().unwrap();

    // About 3.7 anonymous ids per person with any.
    let per_person = one(sql_rows(&ctx, "SELECT CAST(count(*) AS DOUBLE) / count(DISTINCT person) FROM truth WHERE identifier_type = 'anonymous_id'").await);
    assert!((3.3..=4.1).contains(&per_person), "{per_person}");

    // The truth still names one person per identifier, and shared devices are left out of it.
    let ambiguous = one(sql_rows(&ctx, "SELECT count(*) FROM (SELECT identifier_type, identifier_value FROM truth GROUP BY 1, 2 HAVING count(DISTINCT person) > 1)").await);
    assert_eq!(ambiguous, 0.0);
    let shared = sql_rows(
        &ctx,
        "SELECT anonymous_id, count(DISTINCT user_id) AS users FROM ev \
         WHERE user_id IS NOT NULL AND user_id <> '' \
           AND anonymous_id NOT IN (SELECT identifier_value FROM truth WHERE identifier_type = 'anonymous_id') \
         GROUP BY 1 ORDER BY 2 DESC",
    )
    .await;
    let users: Vec<u64> = shared.iter().map(|r| r[1].parse().unwrap()).collect();
    // One kiosk that many people log in on: more than the bundled max_links (20) allows.
    assert!(users[0] > 20, "{:?}", &users[..5]);
    // Family devices that two to four people log in on.
    let families = users.iter().filter(|&&u| (2..=4).contains(&u)).count();
    assert!(families > 50, "{families}");
    // Varied junk: more than one junk anonymous_id.
    let junk = one(sql_rows(&ctx, "SELECT count(DISTINCT anonymous_id) FROM ev WHERE anonymous_id IN ('undefined', 'null', 'anonymous', '00000000-0000-0000-0000-000000000000')").await);
    assert!(junk >= 2.0, "{junk}");
    // Traits only on identify calls (malformed rows have the type `Track`, wrongly cased, on
    // purpose: some of them were identify calls).
    let traits = one(sql_rows(
        &ctx,
        "SELECT count(*) FROM ev WHERE traits IS NOT NULL AND type NOT IN ('identify', 'Track')",
    )
    .await);
    assert_eq!(traits, 0.0);
}

#[test]
fn bad_knobs_are_refused_with_the_flag_named() {
    let dir = tempfile::tempdir().unwrap();
    for (flag, value) in [
        ("--kiosk", "1.5"),
        ("--anonymous-ids", "0.5"),
        ("--family-devices", "-1"),
        ("--junk", "-2"),
    ] {
        let out = run(tessera()
            .args(["generate", "--out", dir.path().to_str().unwrap()])
            .arg(format!("{flag}={value}")));
        assert_eq!(out.status.code(), Some(2), "{flag} {value}");
        assert!(stderr(&out).contains(flag), "{flag}: {}", stderr(&out));
    }
}

/// A project with the bundled config and identity query over `data`.
fn bundled_identity_project(data_args: &[&str]) -> TempProject {
    let p = TempProject::local();
    std::fs::copy(repo().join("tessera.toml"), p.path().join("tessera.toml")).unwrap();
    std::fs::create_dir_all(p.path().join("queries/identity")).unwrap();
    std::fs::copy(
        repo().join("queries/identity/events.sql"),
        p.path().join("queries/identity/events.sql"),
    )
    .unwrap();
    generate_with(&p.path().join("data"), 2500, 30, 21, data_args);
    p
}

#[test]
fn shuffled_events_resolve_to_the_same_profiles_as_ordered_ones() {
    // A busier kiosk than the preset's, so that at this size it is over max_links.
    let ordered = bundled_identity_project(&[
        "--preset",
        "adversarial",
        "--kiosk",
        "0.03",
        "--order",
        "by-person",
    ]);
    let shuffled = bundled_identity_project(&[
        "--preset",
        "adversarial",
        "--kiosk",
        "0.03",
        "--rows-per-file",
        "3000",
        "--shuffle-window",
        "20000",
    ]);
    ordered.run_json();
    shuffled.run_json();
    for sql in [
        "SELECT identifier_type, identifier_value, profile_id, first_seen, last_seen FROM identity_graph ORDER BY 1, 2",
        "SELECT identifier_type, identifier_value, linked_type, linked_value, profile_id, seen_at FROM identity_links ORDER BY 1, 2, 3, 4",
        "SELECT identifier_type, identifier_value, other_type, other_value, reason, seen_at FROM identity_conflicts ORDER BY 1, 2, 3, 4, 5",
        "SELECT message_id, profile_id FROM events ORDER BY 1, 2",
    ] {
        let (x, y) = (ordered.query(sql), shuffled.query(sql));
        assert!(x.len() > 20, "{sql}: {}", x.len());
        assert!(x == y, "{sql} differs");
    }
    // The shared devices are refused, not merged: the kiosk is over max_links.
    let kiosk = shuffled
        .query("SELECT count(*) AS n FROM identity_conflicts WHERE reason = 'max_links exceeded'");
    assert!(kiosk[0]["n"].as_u64().unwrap() > 20, "{kiosk:?}");
}

#[test]
fn bundled_rules_stay_accurate_on_adversarial_data() {
    let p = bundled_identity_project(&["--preset", "adversarial"]);
    p.run_json();
    let out = ok(run(&mut p.cmd(&["accuracy", "--json", "--quiet"])));
    let acc: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let precision = acc["precision"].as_f64().unwrap();
    let recall = acc["recall"].as_f64().unwrap();
    assert!(
        acc["identifiers_compared"].as_u64().unwrap() > 10_000,
        "{acc}"
    );
    assert!(precision >= PRECISION_FLOOR, "precision {precision}: {acc}");
    assert!(recall >= 0.99, "recall {recall}: {acc}");
    assert!(
        precision < 1.0,
        "family devices must cost some precision: {acc}"
    );
}

/// Family devices put one person's later sign-up email in the profile of the housemate who
/// logged in on the device first; the limits keep that small.
const PRECISION_FLOOR: f64 = 0.985;
