//! What a user sees of a run's results: the HTML report (rendered in headless Chromium), the
//! warnings of a run, reports in their `ORDER BY` order, headers of empty results, and the
//! current-files manifests that let plain-Parquet readers see each row once.

use std::path::Path;
use std::process::Command;

use crate::common::*;

/// A copy of the bundled project (config, queries, sample events) in a temp folder.
fn bundled(extra_config: &str) -> TempProject {
    let p = TempProject::local();
    let config = std::fs::read_to_string(repo().join("tessera.toml")).unwrap();
    std::fs::write(
        p.path().join("tessera.toml"),
        format!("{config}\n{extra_config}"),
    )
    .unwrap();
    copy_dir(&repo().join("queries"), &p.path().join("queries"));
    copy_dir(&repo().join("data/events"), &p.path().join("data/events"));
    p
}

fn numbers(rows: &[serde_json::Value], column: &str) -> Vec<f64> {
    rows.iter()
        .map(|r| {
            r[column]
                .as_f64()
                .unwrap_or_else(|| panic!("{column} in {r}"))
        })
        .collect()
}

fn kinds(warnings: &serde_json::Value) -> Vec<(String, String)> {
    warnings
        .as_array()
        .unwrap_or(&Vec::new())
        .iter()
        .map(|w| {
            (
                w["kind"].as_str().unwrap_or_default().to_string(),
                w["subject"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

/// Runs headless Chromium on `page` with `args`; returns (stdout, stderr).
fn chromium_on(chromium: &Path, profile: &Path, page: &Path, args: &[&str]) -> (String, String) {
    let out = Command::new(chromium)
        .args([
            "--headless",
            "--disable-gpu",
            "--no-sandbox",
            "--enable-logging=stderr",
            "--v=0",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .arg(format!("file://{}", page.display()))
        .output()
        .expect("chromium runs");
    let (stdout, stderr) = (stdout(&out), stderr(&out));
    assert!(out.status.success(), "chromium failed: {stderr}");
    (stdout, stderr)
}

#[test]
fn the_bundled_project_warns_keeps_report_order_and_renders_its_report() {
    // `[report]` writes the page after the run, to report.html at the top of the output.
    let p = bundled("[report]\nruns = 10\n");
    // The bundled sample ends on 2026-10-30: at this as-of no window is empty by accident.
    let text = ok(run(&mut p.cmd(&[
        "run",
        "--as-of",
        "2026-10-31",
        "--json",
        "--quiet",
    ])));
    let report: serde_json::Value = serde_json::from_str(text.trim()).unwrap();
    let warned = kinds(&report["warnings"]);

    // BG/NBD runs into a fit where nobody drops out: a/(a+b), the mean drop-out probability
    // after a purchase, is about zero, so P(alive) is about 1 for every buyer.
    let params = p.query(
        "SELECT parameter, value FROM prediction_models WHERE model = 'bgnbd' ORDER BY parameter",
    );
    let param = |name: &str| {
        params
            .iter()
            .find(|r| r["parameter"] == name)
            .and_then(|r| r["value"].as_f64())
            .unwrap_or_else(|| panic!("bgnbd {name} in {params:?}"))
    };
    let drop_out = param("a") / (param("a") + param("b"));
    assert!(
        drop_out < 1e-4,
        "the sample's fit is degenerate: {params:?}"
    );
    assert_eq!(param("converged"), 0.0, "a degenerate fit is not converged");
    assert!(
        warned.contains(&("model_degenerate".into(), "bgnbd".into())),
        "{warned:?}"
    );
    let alive = p.query("SELECT min(p_alive) AS lowest FROM predictions");
    assert!(alive[0]["lowest"].as_f64().unwrap() > 0.99, "{alive:?}");
    // ... which is why the shipped segment on P(alive) is empty, and the run says so.
    assert!(
        warned.contains(&("segment_empty".into(), "segments.valuable_at_risk".into())),
        "{warned:?}"
    );
    let stored = p.query("SELECT warnings FROM runs");
    let stored: serde_json::Value =
        serde_json::from_str(stored[0]["warnings"].as_str().unwrap()).unwrap();
    assert_eq!(
        kinds(&stored),
        warned,
        "runs.warnings holds the run's warnings"
    );

    // Reports come back in their ORDER BY order.
    let rfm = p.query("SELECT * FROM reports.rfm_overview");
    let revenue = numbers(&rfm, "revenue");
    assert!(revenue.len() > 3, "{rfm:?}");
    assert!(
        revenue.windows(2).all(|w| w[0] >= w[1]),
        "ORDER BY revenue DESC: {revenue:?}"
    );
    let funnel = p.query("SELECT * FROM reports.checkout_funnel");
    assert_eq!(numbers(&funnel, "step"), vec![1.0, 2.0, 3.0, 4.0]);
    let next = numbers(&p.query("SELECT * FROM reports.after_add_to_cart"), "times");
    assert!(next.windows(2).all(|w| w[0] >= w[1]), "{next:?}");

    // An empty result still prints its header.
    let empty = ok(run(&mut p.cmd(&[
        "query",
        "SELECT run_id, status FROM runs WHERE status = 'none'",
        "--quiet",
    ])));
    assert!(
        empty.contains("run_id") && empty.contains("status"),
        "{empty}"
    );
    let csv = ok(run(&mut p.cmd(&[
        "query",
        "SELECT run_id, status FROM runs WHERE status = 'none'",
        "--format",
        "csv",
        "--quiet",
    ])));
    assert_eq!(csv.trim(), "run_id,status");

    // The page written after the run is self-contained: no script, nothing fetched.
    let page = p.path().join("out/report.html");
    let html = std::fs::read_to_string(&page).expect("the run wrote out/report.html");
    for remote in [
        "<script",
        "src=\"http",
        "href=\"http",
        "url(http",
        "@import",
    ] {
        assert!(!html.contains(remote), "the report must not load {remote}");
    }
    // `tessera report --out` writes the same page elsewhere.
    let elsewhere = p.path().join("pages/report.html");
    ok(run(&mut p.cmd(&[
        "report",
        "--out",
        elsewhere.to_str().unwrap(),
        "--quiet",
    ])));
    assert!(elsewhere.is_file());

    let Some(chromium) =
        chromium("the_bundled_project_warns_keeps_report_order_and_renders_its_report")
    else {
        return;
    };
    let profile = p.path().join("chromium-profile");
    let (dom, log) = chromium_on(&chromium, &profile, &page, &["--dump-dom"]);
    // Each section, with its charts drawn as SVG.
    for (section, charts) in [
        ("last-run", &["stage-times"][..]),
        (
            "segments",
            &["segment-sizes", "segment-changes", "sparkline"][..],
        ),
        ("identity", &["profile-sizes", "conflicts"][..]),
        ("funnels", &["funnel-checkout_funnel"][..]),
        ("rfm", &["rfm-grid"][..]),
        ("predictions", &["clv", "p-alive"][..]),
    ] {
        assert!(
            dom.contains(&format!("<section id=\"{section}\">")),
            "section {section} missing"
        );
        for chart in charts {
            assert!(
                dom.contains(&format!("data-chart=\"{chart}\"")),
                "chart {chart} missing in {section}"
            );
        }
    }
    // The warnings are on the page.
    assert!(dom.contains("valuable_at_risk"), "warnings shown");
    let shot = p.path().join("report.png");
    let (_, shot_log) = chromium_on(
        &chromium,
        &profile,
        &page,
        &[
            &format!("--screenshot={}", shot.display()),
            "--window-size=1100,3000",
        ],
    );
    for line in log.lines().chain(shot_log.lines()) {
        assert!(
            !line.contains("CONSOLE") && !line.contains("net::ERR"),
            "the page logged an error: {line}"
        );
    }
    let png = std::fs::read(&shot).expect("a screenshot");
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 20_000,
        "{} bytes",
        png.len()
    );
}

/// Events of `people` (one page view each, at `ts`), in file `name`.
fn people_file(p: &TempProject, name: &str, people: &[&'static str], ts: i64) {
    let rows: Vec<Ev> = people
        .iter()
        .map(|who| Ev {
            anonymous_id: Some(who),
            ..Ev::track(who, ts)
        })
        .collect();
    write_parquet(&p.events().join(name), &[events_batch(&rows)]);
}

const JAN_1_2026: i64 = 1_767_225_600_000_000;

#[test]
fn an_as_of_far_after_the_events_and_sharp_segment_changes_warn() {
    let p = TempProject::new(
        "[storage]\nevents = \"data/events\"\noutput = \"out\"\n\
         [warnings]\nsegment_change_percent = 100\n",
    );
    let segments = p.path().join("queries/segments");
    std::fs::create_dir_all(&segments).unwrap();
    std::fs::write(
        segments.join("everyone.sql"),
        "SELECT profile_id FROM profiles",
    )
    .unwrap();
    std::fs::write(
        segments.join("nobody.sql"),
        "SELECT profile_id FROM profiles WHERE event_count > 1000",
    )
    .unwrap();
    // A report reading another reads it as a user sees it: in order, without `report_row`.
    let reports = p.path().join("queries/reports");
    std::fs::create_dir_all(&reports).unwrap();
    std::fs::write(
        reports.join("a_top.sql"),
        "SELECT profile_id, event_count FROM profiles ORDER BY profile_id DESC",
    )
    .unwrap();
    std::fs::write(reports.join("b_copy.sql"), "SELECT * FROM reports.a_top").unwrap();
    people_file(&p, "a.parquet", &["m1", "m2"], JAN_1_2026);
    let first = ok(run(&mut p.cmd(&[
        "run",
        "--as-of",
        "2026-01-02",
        "--json",
        "--quiet",
    ])));
    let first: serde_json::Value = serde_json::from_str(first.trim()).unwrap();
    assert_eq!(
        kinds(&first["warnings"]),
        vec![("segment_empty".to_string(), "segments.nobody".to_string())],
        "a day after the events, only the empty segment warns"
    );

    // Three people join (2 → 5 members: +150%, past the configured 100%), and the as-of is
    // 58 whole days after the newest event (Jan 1 01:00 to Mar 1 00:00).
    people_file(
        &p,
        "b.parquet",
        &["m3", "m4", "m5"],
        JAN_1_2026 + 3_600_000_000,
    );
    let text = ok(run(&mut p.cmd(&["run", "--as-of", "2026-03-01"])));
    assert!(
        text.contains("warning events: the as-of 2026-03-01"),
        "{text}"
    );
    assert!(text.contains("58 days after the newest event"), "{text}");
    assert!(text.contains("from 2 to 5 members"), "{text}");
    let copy = p.query("SELECT * FROM reports.b_copy");
    assert_eq!(copy.len(), 5, "{copy:?}");
    assert!(
        copy.iter().all(|r| r.as_object().unwrap().len() == 2),
        "{copy:?}"
    );
    let ids: Vec<&str> = copy
        .iter()
        .map(|r| r["profile_id"].as_str().unwrap())
        .collect();
    assert!(ids.windows(2).all(|w| w[0] > w[1]), "{ids:?}");
    let rows = p.query("SELECT warnings FROM runs ORDER BY started_at");
    let last: serde_json::Value =
        serde_json::from_str(rows[1]["warnings"].as_str().unwrap()).unwrap();
    let mut seen = kinds(&last);
    seen.sort();
    assert_eq!(
        seen,
        vec![
            ("as_of_after_events".to_string(), "events".to_string()),
            (
                "segment_changed".to_string(),
                "segments.everyone".to_string()
            ),
            ("segment_empty".to_string(), "segments.nobody".to_string()),
        ]
    );
}

#[test]
fn plain_parquet_readers_see_each_row_once_through_the_manifest() {
    let Some(python) = python("plain_parquet_readers_see_each_row_once_through_the_manifest")
    else {
        return;
    };
    let p = TempProject::local();
    let segments = p.path().join("queries/segments");
    std::fs::create_dir_all(&segments).unwrap();
    std::fs::write(
        segments.join("everyone.sql"),
        "SELECT profile_id FROM profiles",
    )
    .unwrap();
    // Three runs, each with a new event file: `profiles` is replaced three times.
    let people: [&[&'static str]; 3] = [&["a1", "a2"], &["b1", "b2", "b3"], &["c1"]];
    for (i, who) in people.iter().enumerate() {
        people_file(
            &p,
            &format!("f{i}.parquet"),
            who,
            JAN_1_2026 + i as i64 * 1_000_000,
        );
        ok(run(&mut p.cmd(&[
            "run",
            "--as-of",
            "2026-01-02",
            "--quiet",
        ])));
        if i == 1 {
            // An older Tessera wrote `runs` without the warnings column: later runs and every
            // reader must still read it.
            let out = Command::new(&python)
                .arg("-c")
                .arg(
                    "import sys, deltalake\n\
                     t = deltalake.DeltaTable(sys.argv[1]).to_pyarrow_table()\n\
                     t = t.drop_columns(['warnings'])\n\
                     deltalake.write_deltalake(sys.argv[1], t, mode='overwrite', schema_mode='overwrite', name='runs')\n",
                )
                .arg(p.path().join("out/runs"))
                .output()
                .unwrap();
            assert!(out.status.success(), "{}", stderr(&out));
        }
    }
    // The segment's file goes: its table is retired and its manifest with it.
    std::fs::remove_file(segments.join("everyone.sql")).unwrap();
    ok(run(&mut p.cmd(&[
        "run",
        "--as-of",
        "2026-01-02",
        "--quiet",
    ])));
    let out_dir = p.path().join("out");
    assert!(!out_dir
        .join("segments/everyone/_symlink_format_manifest/manifest")
        .exists());
    assert!(!out_dir
        .join("_state/events/_symlink_format_manifest/manifest")
        .exists());

    let script = r#"
import sys, json, duckdb
out = sys.argv[1]
con = duckdb.connect()
def via_manifest(table):
    con.execute(f"SET VARIABLE files = (SELECT list(file) FROM read_csv('{out}/{table}/_symlink_format_manifest/manifest', header = false, columns = {{'file': 'VARCHAR'}}))")
    return con.execute("SELECT count(*), count(DISTINCT profile_id) FROM read_parquet(getvariable('files'))").fetchone()
every_file = con.execute(f"SELECT count(*), count(DISTINCT profile_id) FROM read_parquet('{out}/profiles/**/*.parquet')").fetchone()
con.execute(f"SET VARIABLE files = (SELECT list(file) FROM read_csv('{out}/runs/_symlink_format_manifest/manifest', header = false, columns = {{'file': 'VARCHAR'}}))")
runs = con.execute("SELECT count(*), count(warnings) FROM read_parquet(getvariable('files'), union_by_name = true)").fetchone()
print(json.dumps({"every_file": every_file, "profiles": via_manifest("profiles"), "runs": runs}))
"#;
    let out = Command::new(&python)
        .arg("-c")
        .arg(script)
        .arg(&out_dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let seen: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    // Six people, each their own profile (one anonymous id each).
    assert_eq!(seen["profiles"], serde_json::json!([6, 6]), "{seen}");
    let every = seen["every_file"].as_array().unwrap();
    assert!(
        every[0].as_u64().unwrap() > 6,
        "globbing every file sees old versions: {seen}"
    );
    // Four runs; the first two rows were rewritten without `warnings`, the last two have it.
    assert_eq!(seen["runs"], serde_json::json!([4, 2]), "{seen}");

    // Tessera itself reads the older `runs` rows, and the report draws them.
    let rows = p.query("SELECT run_id, warnings FROM runs ORDER BY started_at");
    assert_eq!(rows.len(), 4);
    assert!(rows[0]["warnings"].is_null(), "{rows:?}");
    ok(run(&mut p.cmd(&["status", "--quiet"])));
    ok(run(&mut p.cmd(&["report", "--quiet"])));
    let html = std::fs::read_to_string(out_dir.join("report.html")).unwrap();
    assert!(html.contains("No rfm table"), "absent sections say so");
    assert!(html.contains("No predictions table"));
}
