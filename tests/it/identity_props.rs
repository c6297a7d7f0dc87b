//! Property tests of the identity rules (proptest): what must hold for any links at all.

use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;
use tessera::config::{IdentifierConfig, IdentityConfig, Normalize};
use tessera::stages::identity::graph::{Node, Resolution, Resolver, Rules, Side};

type Row = (Vec<(u8, String)>, i64);

fn rules(limits: [Option<u64>; 3], max_links: Option<u64>, blocklist: &[&str]) -> Rules {
    let names = ["user_id", "email", "anonymous_id"];
    let identifiers = names
        .iter()
        .enumerate()
        .map(|(i, name)| IdentifierConfig {
            name: name.to_string(),
            normalize: Normalize::Trim,
            limit: limits[i],
            blocklist: if i == 1 {
                blocklist.iter().map(|s| s.to_string()).collect()
            } else {
                vec![]
            },
            max_links: if i == 2 { max_links } else { None },
        })
        .collect();
    Rules::from_config(&IdentityConfig {
        identifiers,
        default_country_code: "1".into(),
        probabilistic: Vec::new(),
    })
}

fn resolve(rules: &Rules, rows: &[Row]) -> Resolution {
    let mut r = Resolver::new(rules.clone());
    let mut nodes = Vec::new();
    for (row, t) in rows {
        let ids: Vec<(u8, &str)> = row.iter().map(|(k, v)| (*k, v.as_str())).collect();
        r.add_row(&ids, *t, 0, &mut nodes);
    }
    r.resolve()
}

/// The grouping as a set of sets of "type:value".
fn groups(res: &Resolution) -> BTreeSet<BTreeSet<String>> {
    let mut by: BTreeMap<Node, BTreeSet<String>> = BTreeMap::new();
    for n in 0..res.len() as Node {
        if let Some(c) = res.component(n) {
            by.entry(c)
                .or_default()
                .insert(format!("{}:{}", res.kind(n), res.value(n)));
        }
    }
    by.into_values().collect()
}

/// What a later run knows of an earlier one: every distinct link (applied or refused) and
/// every identifier, each with the time it was first seen.
fn state_rows(res: &Resolution) -> Vec<Row> {
    let id = |n: Node| (res.kind(n), res.value(n).to_string());
    let mut rows: Vec<Row> = (0..res.len() as Node)
        .map(|n| (vec![id(n)], res.seen(n).0))
        .collect();
    rows.extend(
        res.accepted
            .iter()
            .map(|l| (vec![id(l.low), id(l.top)], l.seen_at)),
    );
    for f in &res.refused {
        if let (Side::Node(a), Side::Node(b)) = (&f.refused, &f.other) {
            rows.push((vec![id(*a), id(*b)], f.seen_at));
        }
    }
    rows
}

fn row_strategy() -> impl Strategy<Value = Row> {
    let id = (0u8..3, 0u8..6).prop_map(|(t, v)| (t, format!("v{v}")));
    (prop::collection::vec(id, 1..4), 0i64..40).prop_map(|(mut ids, t)| {
        // One value per type in a row, as columns of one query row.
        ids.sort_by_key(|(k, _)| *k);
        ids.dedup_by_key(|(k, _)| *k);
        (ids, t)
    })
}

fn rows_strategy() -> impl Strategy<Value = Vec<Row>> {
    prop::collection::vec(row_strategy(), 0..40)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn without_conflicts_order_does_not_matter(rows in rows_strategy(), seed in any::<u64>()) {
        let free = rules([None, None, None], None, &[]);
        let mut shuffled = rows.clone();
        // A deterministic shuffle and new times: neither may change a conflict-free grouping.
        let n = shuffled.len();
        for i in (1..n).rev() {
            let j = (seed.wrapping_mul(6364136223846793005).wrapping_add(i as u64) >> 33) as usize % (i + 1);
            shuffled.swap(i, j);
        }
        for (k, row) in shuffled.iter_mut().enumerate() {
            row.1 = (n - k) as i64;
        }
        prop_assert_eq!(groups(&resolve(&free, &rows)), groups(&resolve(&free, &shuffled)));
    }

    #[test]
    fn resolving_twice_equals_once(rows in rows_strategy()) {
        let r = rules([Some(1), Some(2), None], Some(3), &["v0"]);
        let once = resolve(&r, &rows);
        let twice = resolve(&r, &state_rows(&once));
        prop_assert_eq!(groups(&once), groups(&twice));
    }

    #[test]
    fn no_profile_exceeds_a_limit(rows in rows_strategy()) {
        let limits = [Some(1), Some(2), Some(3)];
        let res = resolve(&rules(limits, None, &[]), &rows);
        for group in groups(&res) {
            for (t, limit) in limits.iter().enumerate() {
                let count = group.iter().filter(|id| id.starts_with(&format!("{t}:"))).count() as u64;
                prop_assert!(count <= limit.unwrap(), "{:?} breaks the limit of type {}", group, t);
            }
        }
    }

    #[test]
    fn blocklisted_and_shared_values_join_nothing(rows in rows_strategy()) {
        let res = resolve(&rules([None, None, None], Some(2), &["v1", "v2"]), &rows);
        for n in 0..res.len() as Node {
            prop_assert!(!(res.kind(n) == 1 && ["v1", "v2"].contains(&res.value(n))), "blocklisted value interned");
        }
        for l in &res.accepted {
            prop_assert!(!res.is_shared(l.low) && !res.is_shared(l.top));
        }
        for n in 0..res.len() as Node {
            if res.is_shared(n) {
                prop_assert_eq!(res.component(n), None);
            }
        }
    }

    #[test]
    fn a_later_run_from_saved_state_equals_one_run(first in rows_strategy(), later in rows_strategy()) {
        let r = rules([Some(1), Some(2), None], Some(3), &["v0"]);
        let all: Vec<Row> = first.iter().chain(later.iter()).cloned().collect();
        let earlier = resolve(&r, &first);
        let incremental: Vec<Row> = state_rows(&earlier).into_iter().chain(later.iter().cloned()).collect();
        prop_assert_eq!(groups(&resolve(&r, &incremental)), groups(&resolve(&r, &all)));
    }
}
