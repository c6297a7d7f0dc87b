//! `cargo bench --bench identity`: identity resolution on links from generated events, next to
//! the same links' connected components computed by large-star/small-star rounds in DataFusion SQL.
//!
//! TESSERA_BENCH_LINK_ROWS (comma-separated, default 1000000) sets roughly how many identity
//! query rows (link rows) to resolve; events are generated to match and cached under
//! target/bench-data/. Each size runs on the generator's friendly data (each person's events
//! together) and its adversarial data (shuffled rows, ~3.7 anonymous ids per person, shared
//! devices), side by side; TESSERA_BENCH_DATA picks one (`friendly` or `adversarial`).
//! "rows read" is the intake alone (normalising, interning, collecting links: the identity
//! stage's "links read" on one core); "resolve" adds the rules and union-find. "rows read
//! before" is the same intake as it was before it went a batch at a time with prefetching
//! (benches/common/legacy_intake.rs), on the same rows. TESSERA_BENCH_NO_SQL=1 skips the SQL
//! comparison (minutes at 10M rows) and reports the intake and resolve figures only. Memory per identifier is the peak RSS growth while resolving, divided by
//! the identifiers interned. The SQL side starts from the same link rows, normalises them in SQL
//! (trim, lowercase, E.164 for the generator's phone formats), builds the distinct links, and
//! runs rounds until nothing changes; its grouping is checked against the union-find's (rules
//! switched off, since the rounds compute plain connected components).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use arrow::array::{Array, AsArray, RecordBatch, TimestampMicrosecondArray};
use arrow::datatypes::DataType;
use datafusion::prelude::{ParquetReadOptions, SessionContext};
mod common;

use tessera::cli::generate::Preset;
use tessera::config::Config;
use tessera::stages::identity::graph::{Block, Node, Resolver, Rules};

const LINK_SQL: &str = "SELECT anonymous_id, user_id, json_get_str(traits, 'email') AS email, \
    json_get_str(traits, 'phone') AS phone, \"timestamp\" AS seen_at FROM events";

async fn link_rows(target_rows: u64, preset: Preset) -> Vec<RecordBatch> {
    // The generator gives about 31 rows per person over 30 days.
    let dir = common::generated_as((target_rows / 31).max(100), 30, preset).await;
    let ctx = tessera::engine::new_context().unwrap();
    ctx.register_parquet(
        "events",
        dir.join("events").to_str().unwrap(),
        ParquetReadOptions::default(),
    )
    .await
    .unwrap();
    ctx.sql(LINK_SQL).await.unwrap().collect().await.unwrap()
}

fn bundled_rules() -> Rules {
    let text =
        std::fs::read_to_string(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tessera.toml"))
            .unwrap();
    Rules::from_config(
        &Config::parse(&text, Path::new("tessera.toml"))
            .unwrap()
            .identity,
    )
}

/// The resolution, and the seconds spent reading rows into the resolver (before resolving).
fn resolve(
    rules: &Rules,
    batches: &[RecordBatch],
) -> (tessera::stages::identity::graph::Resolution, f64) {
    let started = Instant::now();
    // Columns in priority order, as the identity stage hands them over.
    let mut columns: Vec<(usize, u8)> = ["anonymous_id", "user_id", "email", "phone"]
        .iter()
        .enumerate()
        .map(|(i, n)| (i, rules.type_index(n).unwrap()))
        .collect();
    columns.sort_by_key(|(_, t)| *t);
    let mut r = Resolver::new(rules.clone());
    let (mut nodes, mut ends) = (Vec::new(), Vec::new());
    // TESSERA_BENCH_ROW_BY_ROW=1: one row at a time (add_row), for comparison with the
    // stage's batch-at-a-time intake (add_block).
    let by_row = std::env::var_os("TESSERA_BENCH_ROW_BY_ROW").is_some();
    for b in batches {
        let cols: Vec<_> = columns
            .iter()
            .map(|(i, t)| (b.column(*i).as_string::<i32>(), *t))
            .collect();
        let seen = b
            .column(4)
            .as_any()
            .downcast_ref::<TimestampMicrosecondArray>()
            .unwrap();
        let mut block = Block::default();
        for i in 0..b.num_rows() {
            for (c, t) in &cols {
                if c.is_valid(i) {
                    block.ids.push((*t, c.value(i)));
                }
            }
            block.end_row(seen.value(i));
        }
        if by_row {
            for i in 0..block.len() {
                r.add_row(block.row(i), block.seen_at[i], 0, &mut nodes);
            }
        } else {
            r.add_block(&block, 0, &mut nodes, &mut ends);
        }
    }
    let read = started.elapsed().as_secs_f64();
    (r.resolve(), read)
}

/// Seconds the intake as it was before batching takes over the same rows.
fn legacy_read(rules: &Rules, batches: &[RecordBatch]) -> f64 {
    let mut columns: Vec<(usize, u8)> = ["anonymous_id", "user_id", "email", "phone"]
        .iter()
        .enumerate()
        .map(|(i, n)| (i, rules.type_index(n).unwrap()))
        .collect();
    columns.sort_by_key(|(_, t)| *t);
    let started = Instant::now();
    let mut intake = common::legacy_intake::LegacyIntake::new(rules.clone());
    let mut nodes = Vec::new();
    let mut row: Vec<(u8, &str)> = Vec::with_capacity(4);
    for b in batches {
        let cols: Vec<_> = columns
            .iter()
            .map(|(i, t)| (b.column(*i).as_string::<i32>(), *t))
            .collect();
        let seen = b
            .column(4)
            .as_any()
            .downcast_ref::<TimestampMicrosecondArray>()
            .unwrap();
        for i in 0..b.num_rows() {
            row.clear();
            for (c, t) in &cols {
                if c.is_valid(i) {
                    row.push((*t, c.value(i)));
                }
            }
            intake.add_row(&row, seen.value(i), &mut nodes);
        }
    }
    let secs = started.elapsed().as_secs_f64();
    assert!(intake.len() > 0 && !intake.links.is_empty());
    secs
}

/// Connected components by large-star/small-star rounds (Kiveris et al. 2014) in SQL, from
/// link rows: each row's identifiers link to its highest-priority one, as in the resolver.
async fn sql_components(rows: Vec<RecordBatch>) -> (HashMap<String, String>, usize) {
    let ctx = SessionContext::new();
    let table = datafusion::datasource::MemTable::try_new(rows[0].schema(), vec![rows]).unwrap();
    ctx.register_table("link_rows", Arc::new(table)).unwrap();
    let edges = "WITH d AS (SELECT *, regexp_replace(phone, '[^0-9]', '', 'g') AS digits FROM link_rows), \
                      r AS (SELECT 'u:' || nullif(trim(user_id), '') AS u, 'e:' || nullif(lower(trim(email)), '') AS e, \
                                   'p:' || CASE WHEN digits = '' THEN NULL WHEN starts_with(trim(phone), '+') THEN '+' || digits \
                                                WHEN length(digits) = 11 AND left(digits, 1) = '1' THEN '+' || digits ELSE '+1' || digits END AS p, \
                                   'a:' || nullif(trim(anonymous_id), '') AS a FROM d), \
                      t AS (SELECT coalesce(u, e, p, a) AS hub, e, p, a FROM r) \
                 SELECT e AS u, hub AS v FROM t WHERE e IS NOT NULL AND e <> hub \
                 UNION SELECT p AS u, hub AS v FROM t WHERE p IS NOT NULL AND p <> hub \
                 UNION SELECT a AS u, hub AS v FROM t WHERE a IS NOT NULL AND a <> hub";
    let batches = ctx.sql(edges).await.unwrap().collect().await.unwrap();
    ctx.register_table(
        "e0",
        Arc::new(
            datafusion::datasource::MemTable::try_new(batches[0].schema(), vec![batches]).unwrap(),
        ),
    )
    .unwrap();
    let mut current = "e0".to_string();
    let mut rounds = 0;
    loop {
        rounds += 1;
        let large = format!(
            "WITH n AS (SELECT u, v FROM {current} UNION SELECT v AS u, u AS v FROM {current}), \
                  m AS (SELECT u, least(u, min(v)) AS m FROM n GROUP BY u) \
             SELECT DISTINCT n.v AS u, m.m AS v FROM n JOIN m ON n.u = m.u WHERE n.v > n.u"
        );
        let batches = ctx.sql(&large).await.unwrap().collect().await.unwrap();
        ctx.deregister_table("large").unwrap();
        ctx.register_table(
            "large",
            Arc::new(
                datafusion::datasource::MemTable::try_new(batches[0].schema(), vec![batches])
                    .unwrap(),
            ),
        )
        .unwrap();
        let small = "WITH n AS (SELECT u, v FROM large UNION SELECT v AS u, u AS v FROM large), \
                          s AS (SELECT u, v FROM n WHERE v <= u), \
                          m AS (SELECT u, least(u, min(v)) AS m FROM s GROUP BY u) \
                     SELECT DISTINCT s.v AS u, m.m AS v FROM s JOIN m ON s.u = m.u WHERE s.v <> m.m \
                     UNION SELECT m.u AS u, m.m AS v FROM m WHERE m.u <> m.m";
        let batches = ctx.sql(small).await.unwrap().collect().await.unwrap();
        let next = format!("r{rounds}");
        ctx.register_table(
            &next,
            Arc::new(
                datafusion::datasource::MemTable::try_new(batches[0].schema(), vec![batches])
                    .unwrap(),
            ),
        )
        .unwrap();
        // Converged when a round changes no edge.
        let diff = ctx
            .sql(&format!("SELECT count(*) FROM ((SELECT u, v FROM {next} EXCEPT SELECT u, v FROM {current}) UNION ALL (SELECT u, v FROM {current} EXCEPT SELECT u, v FROM {next}))"))
            .await.unwrap().collect().await.unwrap();
        let changed = diff[0]
            .column(0)
            .as_primitive::<arrow::datatypes::Int64Type>()
            .value(0);
        current = next;
        if changed == 0 || rounds > 64 {
            break;
        }
    }
    let out = ctx
        .sql(&format!("SELECT u, v FROM {current}"))
        .await
        .unwrap()
        .collect()
        .await
        .unwrap();
    let mut label = HashMap::new();
    for b in out {
        let u = arrow::compute::cast(b.column(0), &DataType::Utf8).unwrap();
        let v = arrow::compute::cast(b.column(1), &DataType::Utf8).unwrap();
        let (u, v) = (u.as_string::<i32>(), v.as_string::<i32>());
        for i in 0..b.num_rows() {
            label.insert(u.value(i).to_string(), v.value(i).to_string());
        }
    }
    (label, rounds)
}

fn main() {
    // Each size runs in a fresh process, so its peak memory is its own.
    if let Ok(one) = std::env::var("TESSERA_BENCH_ONE") {
        let preset = match std::env::var("TESSERA_BENCH_ONE_DATA").as_deref() {
            Ok("adversarial") => Preset::Adversarial,
            _ => Preset::Friendly,
        };
        run_one(one.parse().expect("a whole number"), preset);
        return;
    }
    let sizes: Vec<u64> = std::env::var("TESSERA_BENCH_LINK_ROWS")
        .unwrap_or_else(|_| "1000000".into())
        .split(',')
        .map(|s| {
            s.trim()
                .parse()
                .expect("TESSERA_BENCH_LINK_ROWS holds whole numbers")
        })
        .collect();
    println!("| link rows | data | distinct links | identifiers | rows read before (s) | rows read (s) | resolve (s) | link rows/s | bytes/identifier | SQL large/small-star (s) | rounds | speed-up |");
    println!("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let mut csv = vec!["link_rows,data,distinct_links,identifiers,legacy_read_s,read_s,resolve_s,rows_per_s,bytes_per_identifier,sql_s,rounds,speedup".to_string()];
    for size in sizes {
        for preset in common::data_sets() {
            let data = tessera::cli::bench::data_name(preset);
            let out = std::process::Command::new(std::env::current_exe().unwrap())
                .env("TESSERA_BENCH_ONE", size.to_string())
                .env("TESSERA_BENCH_ONE_DATA", data)
                .stderr(std::process::Stdio::inherit())
                .output()
                .unwrap();
            assert!(out.status.success(), "the run for {size} ({data}) failed");
            let line = String::from_utf8(out.stdout).unwrap();
            let fields: Vec<&str> = line.trim().split(',').collect();
            println!("| {} |", fields.join(" | "));
            csv.push(line.trim().to_string());
        }
    }
    std::fs::write(
        common::data_root().join("identity.csv"),
        csv.join("\n") + "\n",
    )
    .unwrap();
}

fn run_one(target: u64, preset: Preset) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let rules = bundled_rules();
    let mut free = rules.clone();
    for t in &mut free.types {
        t.limit = None;
        t.max_links = None;
        t.blocklist.clear();
    }
    let batches = rt.block_on(link_rows(target, preset));
    let rows: usize = batches.iter().map(|b| b.num_rows()).sum();

    common::reset_peak();
    let before = common::status_kib("VmRSS:");
    let started = Instant::now();
    let (res, read_secs) = resolve(&rules, &batches);
    let secs = started.elapsed().as_secs_f64();
    let peak = common::status_kib("VmHWM:");
    let identifiers = res.len();
    let per_id = (peak.saturating_sub(before) * 1024) as f64 / identifiers.max(1) as f64;
    drop(res);
    let legacy_secs = legacy_read(&rules, &batches);
    if std::env::var_os("TESSERA_BENCH_NO_SQL").is_some() {
        // Intake figures only (the SQL rounds take minutes at 10M rows).
        let data = tessera::cli::bench::data_name(preset);
        let rate = rows as f64 / secs;
        println!(
            "{rows},{data},–,{identifiers},{legacy_secs:.2},{read_secs:.2},{secs:.2},{rate:.0},{per_id:.0},–,–,–"
        );
        return;
    }

    // The same links without rules: plain connected components, for the SQL comparison.
    let (plain, _) = resolve(&free, &batches);
    let distinct = plain.accepted.len();
    let started = Instant::now();
    let (label, rounds) = rt.block_on(sql_components(batches.clone()));
    let sql_secs = started.elapsed().as_secs_f64();

    // Same grouping: a node's SQL label (or itself) maps one-to-one onto its component.
    let prefix = |n: Node| match free.types[plain.kind(n) as usize].name.as_str() {
        "user_id" => "u",
        "email" => "e",
        "phone" => "p",
        _ => "a",
    };
    let mut forward: HashMap<String, Node> = HashMap::new();
    let mut backward: HashMap<Node, String> = HashMap::new();
    for n in 0..plain.len() as Node {
        let key = format!("{}:{}", prefix(n), plain.value(n));
        let l = label.get(&key).cloned().unwrap_or(key);
        let c = plain.component(n).unwrap();
        assert_eq!(
            *forward.entry(l.clone()).or_insert(c),
            c,
            "SQL and union-find disagree"
        );
        assert_eq!(
            *backward.entry(c).or_insert(l.clone()),
            l,
            "SQL and union-find disagree"
        );
    }
    let rate = rows as f64 / secs;
    let speedup = sql_secs / secs;
    let data = tessera::cli::bench::data_name(preset);
    println!("{rows},{data},{distinct},{identifiers},{legacy_secs:.2},{read_secs:.2},{secs:.2},{rate:.0},{per_id:.0},{sql_secs:.2},{rounds},{speedup:.1}x");
}
