//! Pairwise precision and recall of `identity_graph` against a truth (`tessera generate` writes one).
//!
//! Precision: of the identifier pairs put in one profile, the share that are one person.
//! Recall: of the pairs that are one person *and* joined by a chain of clean links in the data
//! (links between that person's own identifiers), the share put in one profile. Pairs no link
//! connects cannot be found by any method, so they are reported separately (`recall_vs_truth`).

use std::collections::HashMap;

use arrow::array::{Array, AsArray};
use arrow::datatypes::DataType;
use datafusion::dataframe::DataFrame;
use datafusion::logical_expr::{cast, col, Expr};
use futures::StreamExt;
use serde::Serialize;

use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::storage::Place;
use crate::tables;

/// The accuracy figures.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Accuracy {
    /// Identifiers in both `identity_graph` and the truth.
    pub identifiers_compared: u64,
    /// Pairs placed in one profile.
    pub pairs_predicted: u64,
    /// Of those, pairs that are one person.
    pub pairs_correct: u64,
    /// Pairs that are one person and connected by clean links.
    pub pairs_linkable: u64,
    /// Of those, pairs placed in one profile.
    pub pairs_linkable_found: u64,
    /// Pairs that are one person, linkable or not.
    pub pairs_true: u64,
    /// pairs_correct / pairs_predicted.
    pub precision: f64,
    /// pairs_linkable_found / pairs_linkable.
    pub recall: f64,
    /// pairs_correct / pairs_true.
    pub recall_vs_truth: f64,
}

fn pairs(n: u64) -> u64 {
    n * n.saturating_sub(1) / 2
}

fn ratio(a: u64, b: u64) -> f64 {
    if b == 0 {
        1.0
    } else {
        a as f64 / b as f64
    }
}

/// Streams `(text columns…)` rows of `df`.
async fn rows(
    df: DataFrame,
    columns: &[&str],
    mut each: impl FnMut(&[Option<&str>]),
) -> Result<()> {
    let exprs: Vec<Expr> = columns
        .iter()
        .map(|c| cast(col(*c), DataType::Utf8).alias(*c))
        .collect();
    let mut stream = df.select(exprs)?.execute_stream().await?;
    while let Some(batch) = stream.next().await {
        let batch = batch?;
        let arrays: Vec<_> = (0..columns.len())
            .map(|i| batch.column(i).as_string::<i32>().clone())
            .collect();
        let mut row = Vec::with_capacity(columns.len());
        for r in 0..batch.num_rows() {
            row.clear();
            row.extend(arrays.iter().map(|a| a.is_valid(r).then(|| a.value(r))));
            each(&row);
        }
    }
    Ok(())
}

struct Ids(HashMap<(String, String), u32>);

impl Ids {
    fn get(&self, t: &str, v: &str) -> Option<u32> {
        self.0.get(&(t.to_string(), v.to_string())).copied()
    }
}

fn find(parent: &mut [u32], mut x: u32) -> u32 {
    while parent[x as usize] != x {
        parent[x as usize] = parent[parent[x as usize] as usize];
        x = parent[x as usize];
    }
    x
}

/// Measures the published `identity_graph` against the truth at `truth` (a Parquet location).
pub async fn measure(engine: &Engine, truth: &str) -> Result<Accuracy> {
    let place = Place::open(truth, &engine.project.dir, "--truth")?;
    place.register(&engine.ctx);
    let url = place.url().as_str().trim_end_matches('/').to_string();
    let truth_df = engine
        .ctx
        .read_parquet(url.as_str(), Default::default())
        .await
        .map_err(|e| Error::Usage(format!("cannot read the truth at {truth}: {e}")))?;
    let open = |name: &'static str| async move {
        match engine.outputs.read(&engine.ctx, name).await? {
            Some(df) => Ok(df),
            None => Err(Error::Usage(format!(
                "no {name} in {} yet; run `tessera run` first",
                engine.outputs.place()
            ))),
        }
    };

    // The truth: identifier → person.
    let mut ids = Ids(HashMap::new());
    let mut person: Vec<String> = Vec::new();
    rows(
        truth_df,
        &["identifier_type", "identifier_value", "person"],
        |r| {
            if let (Some(t), Some(v), Some(p)) = (r[0], r[1], r[2]) {
                let next = ids.0.len() as u32;
                if let std::collections::hash_map::Entry::Vacant(e) =
                    ids.0.entry((t.to_string(), v.to_string()))
                {
                    e.insert(next);
                    person.push(p.to_string());
                }
            }
        },
    )
    .await?;
    let n = person.len();

    // The prediction: identifier → profile, for identifiers in the truth.
    let mut profile: Vec<Option<String>> = vec![None; n];
    rows(
        open(tables::IDENTITY_GRAPH).await?,
        &["identifier_type", "identifier_value", "profile_id"],
        |r| {
            if let (Some(t), Some(v), Some(p)) = (r[0], r[1], r[2]) {
                if let Some(i) = ids.get(t, v) {
                    profile[i as usize] = Some(p.to_string());
                }
            }
        },
    )
    .await?;

    // What the data allows: components of the clean links (applied or refused).
    let mut parent: Vec<u32> = (0..n as u32).collect();
    let clean = |a: Option<u32>, b: Option<u32>, parent: &mut Vec<u32>| {
        if let (Some(a), Some(b)) = (a, b) {
            if person[a as usize] == person[b as usize] {
                let (ra, rb) = (find(parent, a), find(parent, b));
                parent[ra as usize] = rb;
            }
        }
    };
    rows(
        open(tables::IDENTITY_LINKS).await?,
        &[
            "identifier_type",
            "identifier_value",
            "linked_type",
            "linked_value",
        ],
        |r| {
            if let (Some(a), Some(b), Some(c), Some(d)) = (r[0], r[1], r[2], r[3]) {
                clean(ids.get(a, b), ids.get(c, d), &mut parent);
            }
        },
    )
    .await?;
    rows(
        open(tables::IDENTITY_CONFLICTS).await?,
        &[
            "identifier_type",
            "identifier_value",
            "other_type",
            "other_value",
        ],
        |r| {
            if let (Some(a), Some(b), Some(c), Some(d)) = (r[0], r[1], r[2], r[3]) {
                clean(ids.get(a, b), ids.get(c, d), &mut parent);
            }
        },
    )
    .await?;

    // Pair counts from group sizes: pairs within profiles, persons, and their intersections.
    let mut by_profile: HashMap<&str, u64> = HashMap::new();
    let mut by_person: HashMap<&str, u64> = HashMap::new();
    let mut by_profile_person: HashMap<(&str, &str), u64> = HashMap::new();
    let mut by_linkable: HashMap<u32, u64> = HashMap::new();
    let mut by_linkable_profile: HashMap<(u32, &str), u64> = HashMap::new();
    let mut compared = 0u64;
    for i in 0..n {
        let Some(p) = profile[i].as_deref() else {
            continue;
        };
        compared += 1;
        let who = person[i].as_str();
        let comp = find(&mut parent, i as u32);
        *by_profile.entry(p).or_default() += 1;
        *by_person.entry(who).or_default() += 1;
        *by_profile_person.entry((p, who)).or_default() += 1;
        *by_linkable.entry(comp).or_default() += 1;
        *by_linkable_profile.entry((comp, p)).or_default() += 1;
    }
    let sum = |m: &mut dyn Iterator<Item = u64>| m.map(pairs).sum::<u64>();
    let pairs_predicted = sum(&mut by_profile.values().copied());
    let pairs_correct = sum(&mut by_profile_person.values().copied());
    let pairs_true = sum(&mut by_person.values().copied());
    let pairs_linkable = sum(&mut by_linkable.values().copied());
    let pairs_linkable_found = sum(&mut by_linkable_profile.values().copied());
    Ok(Accuracy {
        identifiers_compared: compared,
        pairs_predicted,
        pairs_correct,
        pairs_linkable,
        pairs_linkable_found,
        pairs_true,
        precision: ratio(pairs_correct, pairs_predicted),
        recall: ratio(pairs_linkable_found, pairs_linkable),
        recall_vs_truth: ratio(pairs_correct, pairs_true),
    })
}

impl Accuracy {
    /// The figures for people.
    pub fn render(&self, truth: &str) -> String {
        format!(
            "identity accuracy against {truth}\n  identifiers compared  {}\n  precision             {:.4}  ({} of {} pairs in one profile are one person)\n  recall                {:.4}  ({} of {} pairs that clean links connect are in one profile)\n  recall vs all truth   {:.4}  ({} of {} same-person pairs, linkable or not)\n",
            self.identifiers_compared,
            self.precision, self.pairs_correct, self.pairs_predicted,
            self.recall, self.pairs_linkable_found, self.pairs_linkable,
            self.recall_vs_truth, self.pairs_correct, self.pairs_true,
        )
    }
}
