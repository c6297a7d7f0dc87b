//! Probabilistic matching (Fellegi-Sunter): records that share no identifier are paired by
//! blocking rules, compared column by column, weighed with m and u probabilities, and pairs
//! above the block's threshold become links of the identity graph.
//!
//! ```text
//! record source ──► blocking rules (DataFusion joins over l and r) ──► candidate pairs
//!       │                                                                   │
//!       └─► random pairs (seeded) ──► u                 comparison levels ◄─┘
//!                                                      EM over the levels ──► m, prior
//!                                     match weights ──► match_scores, links (via the resolver)
//! ```
//!
//! u comes from random pairs, which are almost all non-matches; m and the share of matches
//! among candidates come from expectation-maximisation over the candidate pairs with u held
//! fixed, as Splink does. Probabilities are posteriors among candidate pairs: the prior is the
//! share of candidate pairs that match, not of all pairs. Links go through the same resolver
//! as every other link, so identifier limits and blocklists apply to them alike; they carry no
//! time and so are applied after every timed link.

use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, BooleanArray, Float64Array, RecordBatch, StringArray, UInt32Array,
};
use arrow::compute::{cast, concat_batches};
use arrow::datatypes::{DataType, Field, Schema};
use chrono::NaiveDate;
use foldhash::HashMap;
use futures::StreamExt;
use rand::{Rng, SeedableRng};

use super::graph::Rules;
use super::match_state::{self, Frequencies, Frozen, Keep, Kept};
use crate::config::{MatchLevel, ProbabilisticConfig};
use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::sql::similarity::{jaro_winkler, levenshtein, parse_date, swapped_day_month};

/// The column numbering records for blocking joins.
const ROW: &str = "__tessera_match_row";
/// The table blocking rules are run on, registered only while a block is matched.
const RECORDS: &str = "__tessera_match_records";
/// The column marking records new or changed since the kept model, on runs that reuse it.
const NEW: &str = "__tessera_match_new";
/// The level of a comparison where either side is null: no evidence either way.
const NULL: u8 = u8::MAX;
/// Bounds on m and u, so that no level has an infinite weight.
const FLOOR: f64 = 1e-6;

/// The label identity tables give a block's links in their `query` column.
pub fn query_label(block: &ProbabilisticConfig) -> String {
    format!("<probabilistic: {}>", block.name)
}

/// What one block produced.
pub struct BlockResult {
    /// Rows for the resolver: each record's identifiers, then one row per linking pair (the
    /// first identifier of each record). Values are raw; the resolver cleans them.
    pub rows: Vec<Vec<(u8, String)>>,
    /// `match_model` rows: (parameter, value).
    pub model: Vec<(String, f64)>,
    /// `match_scores` rows of the block.
    pub scores: RecordBatch,
    /// Candidate pairs scored.
    pub pairs: usize,
    /// Scoring speed (comparison and weighing), for the run log.
    pub pairs_per_second: f64,
    /// The block's state for the next run.
    pub keep: Keep,
}

/// One comparison, ready to score: its record column as text and its parsed levels.
struct Comparison {
    column: String,
    levels: Vec<MatchLevel>,
    text: StringArray,
    dates: Option<Vec<Option<NaiveDate>>>,
    /// Each record's value's share among the records holding a value, when term frequencies
    /// adjust exact agreement.
    share: Option<Vec<f64>>,
}

impl Comparison {
    fn value(&self, i: usize) -> Option<&str> {
        (self.text.is_valid(i) && !self.text.value(i).trim().is_empty()).then(|| self.text.value(i))
    }

    /// The first level the pair reaches, or [`NULL`].
    fn level(&self, i: usize, j: usize) -> u8 {
        let (Some(a), Some(b)) = (self.value(i), self.value(j)) else {
            return NULL;
        };
        let dates = self.dates.as_ref().map(|d| (d[i], d[j]));
        // Each measure once per pair, however many of its thresholds the levels test.
        let (mut jw, mut lev) = (None, None);
        for (k, level) in self.levels.iter().enumerate() {
            let hit = match *level {
                MatchLevel::Exact => a == b,
                MatchLevel::JaroWinkler(x) => *jw.get_or_insert_with(|| jaro_winkler(a, b)) >= x,
                MatchLevel::Levenshtein(n) => *lev.get_or_insert_with(|| levenshtein(a, b)) <= n,
                MatchLevel::Days(n) => {
                    matches!(dates, Some((Some(x), Some(y))) if (x - y).num_days().abs() <= n)
                }
                MatchLevel::SwappedDayMonth => {
                    matches!(dates, Some((Some(x), Some(y))) if swapped_day_month(x, y))
                }
                MatchLevel::Else => true,
            };
            if hit {
                return k as u8;
            }
        }
        NULL
    }
}

/// Levels of every pair for every comparison, pair-major (`pairs × comparisons`), computed a
/// comparison at a time over slices of the pairs on every core.
fn levels_of(comparisons: &[Comparison], pairs: &[(u32, u32)]) -> Vec<u8> {
    let c = comparisons.len();
    let mut out = vec![NULL; pairs.len() * c];
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let chunk = pairs.len().div_ceil(threads).max(4096);
    std::thread::scope(|scope| {
        for (slice, out) in pairs.chunks(chunk).zip(out.chunks_mut(chunk * c)) {
            scope.spawn(move || {
                for (k, comparison) in comparisons.iter().enumerate() {
                    for (p, &(i, j)) in slice.iter().enumerate() {
                        out[p * c + k] = comparison.level(i as usize, j as usize);
                    }
                }
            });
        }
    });
    out
}

/// Matches one block: loads its records, trains, scores, and returns links and tables.
pub async fn match_block(
    engine: &Engine,
    index: usize,
    block: &ProbabilisticConfig,
    rules: &Rules,
    kept: Option<&Kept>,
) -> Result<BlockResult> {
    let key = format!("identity.probabilistic[{index}]");
    let (df, what) = match (&block.source, &block.query) {
        (Some(source), _) => (
            engine
                .ctx
                .table(source.as_str())
                .await
                .map_err(|e| Error::query(format!("{key}.source ({source})"), e))?,
            format!("{key}.source ({source})"),
        ),
        (None, Some(file)) => {
            let path = engine.project.queries_dir("identity").join(file);
            let sql = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
            let name = format!("queries/identity/{file}");
            (engine.query(&sql, &name).await?, name)
        }
        (None, None) => {
            return Err(Error::query(key, "names neither `source` nor `query`"));
        }
    };
    let schema = df.schema().as_arrow().clone();
    let mut needed: Vec<(&str, String)> =
        vec![(block.record_id.as_str(), format!("{key}.record_id"))];
    needed.extend(
        block
            .identifiers
            .keys()
            .map(|c| (c.as_str(), format!("{key}.identifiers.{c}"))),
    );
    needed.extend(
        block
            .comparisons
            .iter()
            .enumerate()
            .map(|(c, x)| (x.column.as_str(), format!("{key}.comparisons[{c}].column"))),
    );
    for (column, named_by) in &needed {
        if schema.index_of(column).is_err() {
            let have: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
            return Err(Error::query(
                &what,
                format!(
                    "has no column `{column}` (named by {named_by}); its columns are: {}",
                    have.join(", ")
                ),
            ));
        }
    }
    let batches = df.collect().await.map_err(|e| Error::query(&what, e))?;
    let batch = concat_batches(&Arc::new(schema.clone()), &batches)?;
    let n = batch.num_rows();
    let text = |name: &str| -> Result<StringArray> {
        let column = batch.column(schema.index_of(name)?);
        let as_text = cast(column, &DataType::Utf8)?;
        Ok(as_text
            .as_any()
            .downcast_ref::<StringArray>()
            .cloned()
            .unwrap_or_else(|| StringArray::new_null(n)))
    };
    let ids = text(&block.record_id)?;

    // Each record's identifiers, highest priority first.
    let mut id_columns: Vec<(u8, StringArray)> = Vec::new();
    for (column, kind) in &block.identifiers {
        let t = rules.type_index(kind).ok_or_else(|| {
            Error::query(
                &key,
                format!("identifier type \"{kind}\" is not in [[identity.identifiers]]"),
            )
        })?;
        id_columns.push((t, text(column)?));
    }
    id_columns.sort_by_key(|(t, _)| *t);
    let record_ids: Vec<Vec<(u8, String)>> = (0..n)
        .map(|i| {
            id_columns
                .iter()
                .filter(|(_, a)| a.is_valid(i) && !a.value(i).trim().is_empty())
                .map(|(t, a)| (*t, a.value(i).to_string()))
                .collect()
        })
        .collect();

    let mut comparisons = Vec::with_capacity(block.comparisons.len());
    for (c, config) in block.comparisons.iter().enumerate() {
        let levels = config
            .parsed_levels()
            .map_err(|(l, e)| Error::query(format!("{key}.comparisons[{c}].levels[{l}]"), e))?;
        let text = text(&config.column)?;
        let dated = levels
            .iter()
            .any(|l| matches!(l, MatchLevel::Days(_) | MatchLevel::SwappedDayMonth));
        let dates = dated.then(|| {
            (0..n)
                .map(|i| {
                    text.is_valid(i)
                        .then(|| parse_date(text.value(i)))
                        .flatten()
                })
                .collect()
        });
        comparisons.push(Comparison {
            column: config.column.clone(),
            levels,
            text,
            dates,
            share: None,
        });
    }

    // Reuse the kept model when nothing it was trained under changed (see match_state).
    let fingerprint = match_state::fingerprint(block);
    let keys = match_state::record_keys(&ids);
    let digests = match_state::record_digests(&batch)?;
    let reusable = match (kept, &keys) {
        (Some(k), Some(_))
            if k.fingerprint == fingerprint
                && block.retrain_after_growth > 0.0
                && n as f64 <= k.trained_records as f64 * (1.0 + block.retrain_after_growth)
                && k.model.m.len() == comparisons.len() =>
        {
            Some(k)
        }
        _ => None,
    };
    let mut incremental = None;
    if let (Some(k), Some(keys)) = (reusable, &keys) {
        let new: Vec<bool> = keys
            .iter()
            .zip(&digests)
            .map(|(key, digest)| k.records.get(key) != Some(digest))
            .collect();
        let unchanged: std::collections::HashMap<&str, u32> = (0..n)
            .filter(|&i| !new[i])
            .map(|i| (ids.value(i), i as u32))
            .collect();
        let schema = scores_batch(
            block,
            rules,
            &comparisons,
            &[],
            &[],
            &Scored::default(),
            &ids,
            &record_ids,
        )?
        .schema();
        if let Some(old) =
            match_state::kept_scores(engine, &block.name, k.score_rows, &unchanged, &schema).await?
        {
            incremental = Some((k, new, old));
        }
    }

    let mut frequencies = Vec::with_capacity(comparisons.len());
    for (k, config) in block.comparisons.iter().enumerate() {
        let comparison = &mut comparisons[k];
        let trained = match &incremental {
            Some((kept, ..)) => kept.model.frequencies.get(k).cloned().flatten(),
            None if config.term_frequency => Some(term_frequencies(comparison)),
            None => None,
        };
        if let Some(f) = &trained {
            comparison.share = Some(
                (0..n)
                    .map(|i| comparison.value(i).map_or(0.0, |v| f.share(v)))
                    .collect(),
            );
        }
        frequencies.push(trained);
    }

    let new = incremental.as_ref().map(|(_, new, _)| new.as_slice());
    let pairs = candidate_pairs(engine, &key, block, &batch, new).await?;
    let started = std::time::Instant::now();
    let levels = levels_of(&comparisons, &pairs);
    let mut scoring = started.elapsed();
    let training = std::time::Instant::now();
    let model = match &incremental {
        Some((kept, ..)) => kept.model.clone(),
        None => {
            let (u, u_pairs) = estimate_u(block, &comparisons, n);
            let (m, prior, iterations) = train_m(block, &comparisons, &levels, &u);
            Frozen {
                m,
                u,
                prior,
                iterations,
                u_pairs,
                candidate_pairs: pairs.len() as u64,
                frequencies,
            }
        }
    };
    let (m, u, prior) = (&model.m, &model.u, model.prior);
    let weights: Vec<Vec<f64>> = m
        .iter()
        .zip(u)
        .map(|(m, u)| m.iter().zip(u).map(|(m, u)| (m / u).log2()).collect())
        .collect();
    let training = training.elapsed();
    let prior_weight = (prior / (1.0 - prior)).log2();
    let weighing = std::time::Instant::now();
    let scored = score(&comparisons, &pairs, &levels, &weights, m, prior_weight);
    scoring += weighing.elapsed();
    // Pairs per second counts comparing and weighing the candidate pairs, not training.
    let seconds = scoring.as_secs_f64();
    let pairs_per_second = pairs.len() as f64 / seconds.max(1e-9);
    tracing::info!(
        block = block.name,
        records = n,
        new_records = new.map(|x| x.iter().filter(|&&b| b).count()),
        pairs = pairs.len(),
        trained = incremental.is_none(),
        iterations = model.iterations,
        training_ms = training.as_millis() as u64,
        scoring_ms = (seconds * 1000.0) as u64,
        pairs_per_second = pairs_per_second as u64,
        "probabilistic: pairs scored"
    );

    let trained_records = match &incremental {
        Some((kept, ..)) => kept.trained_records,
        None => n as u64,
    };
    let mut model_rows = vec![
        ("records".to_string(), n as f64),
        ("trained_records".to_string(), trained_records as f64),
        ("pairs_scored".to_string(), pairs.len() as f64),
        (
            "incremental".to_string(),
            if incremental.is_some() { 1.0 } else { 0.0 },
        ),
        ("candidate_pairs".to_string(), model.candidate_pairs as f64),
        ("u_pairs".to_string(), model.u_pairs as f64),
        ("em_iterations".to_string(), model.iterations as f64),
        ("prior".to_string(), prior),
    ];
    for (k, x) in comparisons.iter().enumerate() {
        for (l, level) in x.levels.iter().enumerate() {
            let name = format!("{}: {}", x.column, level.label());
            model_rows.push((format!("m {name}"), m[k][l]));
            model_rows.push((format!("u {name}"), u[k][l]));
            model_rows.push((format!("weight {name}"), weights[k][l]));
        }
    }

    let mut rows: Vec<Vec<(u8, String)>> = record_ids
        .iter()
        .filter(|r| !r.is_empty())
        .cloned()
        .collect();
    let mut linking: Vec<(u32, u32)> = pairs
        .iter()
        .enumerate()
        .filter(|&(p, _)| scored.probability[p] >= block.threshold)
        .map(|(_, &pair)| pair)
        .collect();
    let new_scores = scores_batch(
        block,
        rules,
        &comparisons,
        &pairs,
        &levels,
        &scored,
        &ids,
        &record_ids,
    )?;
    let scores = match incremental {
        Some((_, _, (old, old_pairs))) => {
            let linked = old
                .column_by_name("linked")
                .and_then(|c| c.as_any().downcast_ref::<BooleanArray>().cloned());
            if let Some(linked) = linked {
                linking.extend(
                    old_pairs
                        .iter()
                        .enumerate()
                        .filter(|&(r, _)| linked.is_valid(r) && linked.value(r))
                        .map(|(_, &pair)| pair),
                );
            }
            concat_batches(&new_scores.schema(), &[old, new_scores])?
        }
        None => new_scores,
    };
    // Links are applied in the order of their record ids, whichever run scored them, so
    // identifier limits settle the same way on a run that scored only new records.
    let record = |i: u32| ids.is_valid(i as usize).then(|| ids.value(i as usize));
    for pair in &mut linking {
        if record(pair.0) > record(pair.1) {
            *pair = (pair.1, pair.0);
        }
    }
    linking.sort_by(|a, b| (record(a.0), record(a.1)).cmp(&(record(b.0), record(b.1))));
    for (i, j) in linking {
        if let (Some(a), Some(b)) = (
            record_ids[i as usize].first(),
            record_ids[j as usize].first(),
        ) {
            rows.push(vec![a.clone(), b.clone()]);
        }
    }
    let keep = Keep {
        block: block.name.clone(),
        fingerprint,
        trained_records,
        score_rows: scores.num_rows() as u64,
        model,
        records: keys
            .map(|keys| keys.into_iter().zip(digests).collect())
            .unwrap_or_default(),
    };
    Ok(BlockResult {
        rows,
        model: model_rows,
        scores,
        pairs: pairs.len(),
        pairs_per_second,
        keep,
    })
}

/// Each value's share among the records holding a value in the comparison's column.
fn term_frequencies(comparison: &Comparison) -> Frequencies {
    let mut counts: HashMap<&str, u64> = HashMap::default();
    let mut total = 0u64;
    for i in 0..comparison.text.len() {
        if let Some(v) = comparison.value(i) {
            *counts.entry(v).or_default() += 1;
            total += 1;
        }
    }
    let mut shares: Vec<(u64, f64)> = counts
        .into_iter()
        .map(|(v, c)| (match_state::value_hash(v), c as f64 / total as f64))
        .collect();
    shares.sort_by(|a, b| a.0.cmp(&b.0).then(a.1.total_cmp(&b.1)));
    Frequencies {
        values: total,
        shares,
    }
}

/// u per comparison level from random pairs (seeded: almost every random pair is two
/// different people), and how many pairs were drawn.
fn estimate_u(
    block: &ProbabilisticConfig,
    comparisons: &[Comparison],
    n: usize,
) -> (Vec<Vec<f64>>, u64) {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(block.seed);
    let all_pairs = (n as u64).saturating_mul(n.saturating_sub(1) as u64) / 2;
    let samples = block.u_pairs.min(all_pairs) as usize;
    let random: Vec<(u32, u32)> = (0..samples)
        .map(|_| loop {
            let (i, j) = (rng.gen_range(0..n as u32), rng.gen_range(0..n as u32));
            if i != j {
                break (i.min(j), i.max(j));
            }
        })
        .collect();
    let random_levels = levels_of(comparisons, &random);
    let c = comparisons.len();
    let mut u: Vec<Vec<f64>> = comparisons
        .iter()
        .enumerate()
        .map(|(k, x)| {
            let mut counts = vec![0.0; x.levels.len()];
            for p in 0..random.len() {
                let l = random_levels[p * c + k];
                if l != NULL {
                    counts[l as usize] += 1.0;
                }
            }
            // Laplace smoothing: a level never seen among random pairs is rare, not impossible.
            let total: f64 = counts.iter().sum::<f64>() + counts.len() as f64;
            counts
                .iter()
                .map(|x| ((x + 1.0) / total).max(FLOOR))
                .collect()
        })
        .collect();
    for (k, config) in block.comparisons.iter().enumerate() {
        if let Some(fixed) = &config.u {
            u[k] = fixed.clone();
        }
    }
    (u, random.len() as u64)
}

/// Pairs (i < j) that any blocking rule joins, each once, in order; with `new`, only pairs
/// with at least one new record.
async fn candidate_pairs(
    engine: &Engine,
    key: &str,
    block: &ProbabilisticConfig,
    batch: &RecordBatch,
    new: Option<&[bool]>,
) -> Result<Vec<(u32, u32)>> {
    let n = batch.num_rows();
    let mut fields: Vec<Arc<Field>> = batch.schema().fields().iter().cloned().collect();
    fields.push(Arc::new(Field::new(ROW, DataType::UInt32, false)));
    let mut columns: Vec<ArrayRef> = batch.columns().to_vec();
    columns.push(Arc::new(UInt32Array::from_iter_values(0..n as u32)));
    if let Some(new) = new {
        fields.push(Arc::new(Field::new(NEW, DataType::Boolean, false)));
        columns.push(Arc::new(BooleanArray::from(new.to_vec())));
    }
    let numbered = RecordBatch::try_new(Arc::new(Schema::new(fields)), columns)?;
    engine.ctx.register_batch(RECORDS, numbered)?;
    let only_new = if new.is_some() {
        format!(" AND (l.{NEW} OR r.{NEW})")
    } else {
        String::new()
    };
    let result = async {
        let mut found: Vec<u64> = Vec::new();
        for (r, rule) in block.blocking.iter().enumerate() {
            let rule_key = format!("{key}.blocking[{r}]");
            let sql = format!(
                "SELECT l.{ROW} AS a, r.{ROW} AS b FROM {RECORDS} AS l JOIN {RECORDS} AS r \
                 ON ({rule}) AND l.{ROW} < r.{ROW}{only_new}"
            );
            let df = engine
                .ctx
                .sql(&sql)
                .await
                .map_err(|e| Error::query(&rule_key, e))?;
            let mut stream = df
                .execute_stream()
                .await
                .map_err(|e| Error::query(&rule_key, e))?;
            while let Some(part) = stream.next().await {
                let part = part.map_err(|e| Error::query(&rule_key, e))?;
                let (a, b) = (part.column(0), part.column(1));
                let (a, b) = (
                    a.as_any().downcast_ref::<UInt32Array>(),
                    b.as_any().downcast_ref::<UInt32Array>(),
                );
                let (Some(a), Some(b)) = (a, b) else {
                    return Err(Error::query(
                        &rule_key,
                        "the join returned no record numbers",
                    ));
                };
                found.extend(
                    a.values()
                        .iter()
                        .zip(b.values())
                        .map(|(&a, &b)| (u64::from(a) << 32) | u64::from(b)),
                );
                if found.len() as u64 > block.max_pairs {
                    return Err(Error::query(
                        &rule_key,
                        format!(
                            "the blocking rules produce more than {} candidate pairs ({key}.max_pairs); make this rule narrower (join on more columns) or raise max_pairs",
                            block.max_pairs
                        ),
                    ));
                }
            }
        }
        found.sort_unstable();
        found.dedup();
        Ok(found
            .into_iter()
            .map(|x| ((x >> 32) as u32, x as u32))
            .collect())
    }
    .await;
    engine.ctx.deregister_table(RECORDS)?;
    result
}

/// m per comparison level and the prior, by EM over the candidate pairs with u fixed. Pairs
/// with the same levels are counted together, in a fixed order, so the result does not depend
/// on thread timing. Returns (m, prior, iterations).
fn train_m(
    block: &ProbabilisticConfig,
    comparisons: &[Comparison],
    levels: &[u8],
    u: &[Vec<f64>],
) -> (Vec<Vec<f64>>, f64, u32) {
    let c = comparisons.len();
    let mut patterns: std::collections::BTreeMap<&[u8], f64> = std::collections::BTreeMap::new();
    for pattern in levels.chunks(c) {
        *patterns.entry(pattern).or_default() += 1.0;
    }
    // Start: the best level likely for matches, every other level less so.
    let mut m: Vec<Vec<f64>> = comparisons
        .iter()
        .map(|x| {
            let l = x.levels.len();
            let raw: Vec<f64> = (0..l)
                .map(|k| {
                    if k + 1 == l {
                        0.05
                    } else {
                        0.5f64.powi(k as i32)
                    }
                })
                .collect();
            let total: f64 = raw.iter().sum();
            raw.iter().map(|r| r / total).collect()
        })
        .collect();
    let fixed_m = |m: &mut Vec<Vec<f64>>| {
        for (k, config) in block.comparisons.iter().enumerate() {
            if let Some(fixed) = &config.m {
                m[k] = fixed.clone();
            }
        }
    };
    fixed_m(&mut m);
    let mut prior = block.prior.unwrap_or(0.1);
    let mut iterations = 0;
    if patterns.is_empty() {
        return (m, prior, 0);
    }
    for _ in 0..block.max_iterations {
        iterations += 1;
        let mut sums: Vec<Vec<f64>> = m.iter().map(|x| vec![0.0; x.len()]).collect();
        let (mut matched, mut total) = (0.0, 0.0);
        let logit = (prior / (1.0 - prior)).ln();
        for (pattern, count) in &patterns {
            let mut w = logit;
            for (k, &l) in pattern.iter().enumerate() {
                if l != NULL {
                    w += (m[k][l as usize] / u[k][l as usize]).ln();
                }
            }
            let p = 1.0 / (1.0 + (-w).exp());
            matched += p * count;
            total += count;
            for (k, &l) in pattern.iter().enumerate() {
                if l != NULL {
                    sums[k][l as usize] += p * count;
                }
            }
        }
        let mut change: f64 = 0.0;
        for (k, s) in sums.iter().enumerate() {
            let total: f64 = s.iter().sum();
            if total <= 0.0 {
                continue;
            }
            for (l, v) in s.iter().enumerate() {
                let next = (v / total).clamp(FLOOR, 1.0);
                change = change.max((next - m[k][l]).abs());
                m[k][l] = next;
            }
        }
        fixed_m(&mut m);
        if block.prior.is_none() {
            let next = (matched / total).clamp(FLOOR, 1.0 - FLOOR);
            change = change.max((next - prior).abs());
            prior = next;
        }
        if change < 1e-6 {
            break;
        }
    }
    (m, prior, iterations)
}

/// Each pair's weights per comparison, total weight and probability.
#[derive(Default)]
struct Scored {
    weights: Vec<f64>,
    total: Vec<f64>,
    probability: Vec<f64>,
}

fn score(
    comparisons: &[Comparison],
    pairs: &[(u32, u32)],
    levels: &[u8],
    weights: &[Vec<f64>],
    m: &[Vec<f64>],
    prior_weight: f64,
) -> Scored {
    let c = comparisons.len();
    let mut out = Scored {
        weights: vec![0.0; levels.len()],
        total: vec![prior_weight; pairs.len()],
        probability: vec![0.0; pairs.len()],
    };
    for (k, comparison) in comparisons.iter().enumerate() {
        for (p, &(i, _)) in pairs.iter().enumerate() {
            let l = levels[p * c + k];
            if l == NULL {
                continue;
            }
            let mut w = weights[k][l as usize];
            // Agreement on a common value is weaker evidence: its u is the value's share.
            if let (Some(share), MatchLevel::Exact) =
                (&comparison.share, comparison.levels[l as usize])
            {
                w = (m[k][l as usize] / share[i as usize].max(FLOOR)).log2();
            }
            out.weights[p * c + k] = w;
            out.total[p] += w;
        }
    }
    for (p, t) in out.total.iter().enumerate() {
        out.probability[p] = 1.0 / (1.0 + (-t).exp2());
    }
    out
}

/// `match_scores` rows of one block: pairs at or above its reporting floor.
#[allow(clippy::too_many_arguments)]
fn scores_batch(
    block: &ProbabilisticConfig,
    rules: &Rules,
    comparisons: &[Comparison],
    pairs: &[(u32, u32)],
    levels: &[u8],
    scored: &Scored,
    ids: &StringArray,
    record_ids: &[Vec<(u8, String)>],
) -> Result<RecordBatch> {
    let c = comparisons.len();
    let kept: Vec<usize> = (0..pairs.len())
        .filter(|&p| scored.probability[p] >= block.report_floor)
        .collect();
    let record = |i: u32| {
        ids.is_valid(i as usize)
            .then(|| ids.value(i as usize).to_string())
    };
    // As identity_links shows it: normalised.
    let identifier = |i: u32| {
        record_ids[i as usize].first().map(|(t, v)| {
            let v = rules
                .clean(*t, v)
                .unwrap_or(std::borrow::Cow::Borrowed(v.as_str()));
            format!("{}:{}", rules.types[*t as usize].name, v)
        })
    };
    let mut fields = vec![
        Field::new("block", DataType::Utf8, false),
        Field::new("left_record", DataType::Utf8, true),
        Field::new("right_record", DataType::Utf8, true),
        Field::new("left_identifier", DataType::Utf8, true),
        Field::new("right_identifier", DataType::Utf8, true),
        Field::new("match_probability", DataType::Float64, false),
        Field::new("match_weight", DataType::Float64, false),
        Field::new("linked", DataType::Boolean, false),
    ];
    let mut columns: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from(vec![block.name.as_str(); kept.len()])),
        Arc::new(StringArray::from_iter(
            kept.iter().map(|&p| record(pairs[p].0)),
        )),
        Arc::new(StringArray::from_iter(
            kept.iter().map(|&p| record(pairs[p].1)),
        )),
        Arc::new(StringArray::from_iter(
            kept.iter().map(|&p| identifier(pairs[p].0)),
        )),
        Arc::new(StringArray::from_iter(
            kept.iter().map(|&p| identifier(pairs[p].1)),
        )),
        Arc::new(Float64Array::from_iter_values(
            kept.iter().map(|&p| scored.probability[p]),
        )),
        Arc::new(Float64Array::from_iter_values(
            kept.iter().map(|&p| scored.total[p]),
        )),
        Arc::new(BooleanArray::from_iter(
            kept.iter()
                .map(|&p| Some(scored.probability[p] >= block.threshold)),
        )),
    ];
    for (k, x) in comparisons.iter().enumerate() {
        fields.push(Field::new(
            format!("{}_level", x.column),
            DataType::Utf8,
            true,
        ));
        fields.push(Field::new(
            format!("{}_weight", x.column),
            DataType::Float64,
            true,
        ));
        let level = |p: usize| {
            let l = levels[p * c + k];
            (l != NULL).then(|| x.levels[l as usize].label())
        };
        columns.push(Arc::new(StringArray::from_iter(
            kept.iter().map(|&p| level(p)),
        )));
        columns.push(Arc::new(Float64Array::from_iter(kept.iter().map(|&p| {
            (levels[p * c + k] != NULL).then(|| scored.weights[p * c + k])
        }))));
    }
    Ok(RecordBatch::try_new(
        Arc::new(Schema::new(fields)),
        columns,
    )?)
}

/// Every block's `match_scores` rows in one batch: each block's comparison columns, null in
/// rows of blocks without them.
pub fn union_scores(batches: &[RecordBatch]) -> Result<RecordBatch> {
    let mut fields: Vec<Arc<Field>> = Vec::new();
    for batch in batches {
        for f in batch.schema().fields() {
            if !fields.iter().any(|g| g.name() == f.name()) {
                fields.push(Arc::new(f.as_ref().clone().with_nullable(true)));
            }
        }
    }
    let schema = Arc::new(Schema::new(fields));
    let aligned: Vec<RecordBatch> = batches
        .iter()
        .map(|b| {
            let columns: Vec<ArrayRef> = schema
                .fields()
                .iter()
                .map(|f| match b.column_by_name(f.name()) {
                    Some(c) => c.clone(),
                    None => arrow::array::new_null_array(f.data_type(), b.num_rows()),
                })
                .collect();
            RecordBatch::try_new(schema.clone(), columns)
        })
        .collect::<std::result::Result<_, _>>()?;
    Ok(concat_batches(&schema, &aligned)?)
}

/// `match_model`: (block, parameter, value) rows.
pub fn model_batch(models: &[(String, Vec<(String, f64)>)]) -> Result<RecordBatch> {
    let rows: Vec<(&str, &str, f64)> = models
        .iter()
        .flat_map(|(b, m)| m.iter().map(move |(k, v)| (b.as_str(), k.as_str(), *v)))
        .collect();
    Ok(RecordBatch::try_new(
        Arc::new(Schema::new(vec![
            Field::new("block", DataType::Utf8, false),
            Field::new("parameter", DataType::Utf8, false),
            Field::new("value", DataType::Float64, false),
        ])),
        vec![
            Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.0))),
            Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.1))),
            Arc::new(Float64Array::from_iter_values(rows.iter().map(|r| r.2))),
        ],
    )?)
}
