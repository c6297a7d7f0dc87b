//! `tessera generate`: determinism, and counts and truth that agree with the events.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use arrow::array::{Array, AsArray};
use datafusion::prelude::{ParquetReadOptions, SessionContext};

use crate::common::*;

fn files_under(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else {
                let rel = path.strip_prefix(dir).unwrap().display().to_string();
                out.insert(rel, std::fs::read(&path).unwrap());
            }
        }
    }
    out
}

#[test]
fn the_same_seed_gives_the_same_files_and_another_seed_does_not() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    let c = tempfile::tempdir().unwrap();
    let sa = generate(a.path(), 300, 6, 11);
    let sb = generate(b.path(), 300, 6, 11);
    generate(c.path(), 300, 6, 12);
    assert_eq!(sa, sb);
    let fa = files_under(a.path());
    assert!(fa.len() > 6, "one file per day plus truth at least");
    assert_eq!(fa, files_under(b.path()), "same seed, same bytes");
    assert_ne!(fa, files_under(c.path()), "another seed, other rows");
}

async fn query(ctx: &SessionContext, sql: &str) -> Vec<arrow::array::RecordBatch> {
    ctx.sql(sql).await.unwrap().collect().await.unwrap()
}

fn int(batches: &[arrow::array::RecordBatch], col: usize) -> i64 {
    batches[0]
        .column(col)
        .as_primitive::<arrow::datatypes::Int64Type>()
        .value(0)
}

#[tokio::test]
async fn counts_and_truth_agree_with_the_events() {
    let dir = tempfile::tempdir().unwrap();
    let summary = generate(dir.path(), 800, 20, 5);
    let ctx = tessera::engine::new_context().unwrap();
    let events = dir.path().join("events");
    ctx.register_parquet(
        "ev",
        events.to_str().unwrap(),
        ParquetReadOptions::default(),
    )
    .await
    .unwrap();
    let truth = dir.path().join("truth.parquet");
    ctx.register_parquet(
        "truth",
        truth.to_str().unwrap(),
        ParquetReadOptions::default(),
    )
    .await
    .unwrap();

    let b = query(
        &ctx,
        "SELECT count(*), count(DISTINCT message_id), count(*) FILTER (WHERE message_id IS NULL) FROM ev",
    )
    .await;
    let (rows, distinct, null_ids) = (int(&b, 0), int(&b, 1), int(&b, 2));
    assert_eq!(rows as u64, summary["rows"].as_u64().unwrap());
    // Every copy repeats a message_id; malformed rows may have none.
    assert_eq!(
        (rows - null_ids - distinct) as u64,
        summary["duplicates"].as_u64().unwrap()
    );
    assert!(
        summary["duplicates"].as_u64().unwrap() > 0 && summary["malformed"].as_u64().unwrap() > 0
    );

    // Exact copies: every duplicated message_id has one distinct row.
    let b = query(
        &ctx,
        "SELECT count(*) FROM (SELECT message_id FROM (SELECT DISTINCT * FROM ev) WHERE message_id IS NOT NULL GROUP BY message_id HAVING count(*) > 1)",
    )
    .await;
    assert_eq!(int(&b, 0), 0, "redeliveries are byte-for-byte copies");

    // The truth maps every identifier to one person, and each appears in the events.
    let b = query(&ctx, "SELECT count(*) FROM (SELECT identifier_type, identifier_value FROM truth GROUP BY 1, 2 HAVING count(DISTINCT person) > 1)").await;
    assert_eq!(int(&b, 0), 0);
    let b = query(&ctx, "SELECT count(*) FROM truth").await;
    assert_eq!(int(&b, 0) as u64, summary["truth_rows"].as_u64().unwrap());

    let b = query(
        &ctx,
        "SELECT t.identifier_type, t.identifier_value FROM truth t WHERE \
           (t.identifier_type = 'user_id' AND t.identifier_value NOT IN (SELECT user_id FROM ev WHERE user_id IS NOT NULL)) OR \
           (t.identifier_type = 'anonymous_id' AND t.identifier_value NOT IN (SELECT anonymous_id FROM ev WHERE anonymous_id IS NOT NULL))",
    )
    .await;
    let missing: usize = b.iter().map(|b| b.num_rows()).sum();
    assert_eq!(
        missing, 0,
        "every user_id and anonymous_id in the truth appears in the events"
    );

    // Emails appear in identify traits, typed with stray case and spaces.
    let b = query(
        &ctx,
        "SELECT traits FROM ev WHERE type = 'identify' AND traits LIKE '%email%'",
    )
    .await;
    let mut typed: HashMap<String, usize> = HashMap::new();
    for batch in &b {
        let col = batch.column(0).as_string::<i32>();
        for i in 0..col.len() {
            let v: serde_json::Value = serde_json::from_str(col.value(i)).unwrap();
            if let Some(e) = v["email"].as_str() {
                *typed.entry(e.trim().to_lowercase()).or_default() +=
                    usize::from(e != e.trim().to_lowercase());
            }
        }
    }
    let b = query(
        &ctx,
        "SELECT identifier_value FROM truth WHERE identifier_type = 'email'",
    )
    .await;
    let mut emails = 0;
    for batch in &b {
        let col = batch.column(0).as_string::<i32>();
        for i in 0..col.len() {
            emails += 1;
            assert!(
                typed.contains_key(col.value(i)),
                "truth email {} not in any identify call",
                col.value(i)
            );
        }
    }
    assert!(emails > 100, "{emails}");
    assert!(
        typed.values().sum::<usize>() > 10,
        "some emails are typed with capitals or spaces"
    );
}
