//! What a probabilistic block keeps between runs, so that a run scores only the records that
//! are new or changed since the last one instead of every candidate pair again.
//!
//! Two `_state` tables hold it, published with the identity tables:
//!
//! - `_state/match_model`: per block, the fingerprint of its configuration (and Tessera's
//!   version), the trained model (m, u, prior, term frequencies as digests of the values), how
//!   many records it was trained on, and how many `match_scores` rows the block published;
//! - `_state/match_records`: per block and record, a digest of the record id and a digest of
//!   the whole record (every column), so a changed record counts as new.
//!
//! Neither holds a value in clear: record ids, record contents and the values behind term
//! frequencies are kept only as SHA-256 digests.
//!
//! A run reuses the kept model when the block's configuration is unchanged, record ids are
//! present and unique, the records have not grown past `retrain_after_growth` since training,
//! the run is not `--full`, and the published `match_scores` still holds the rows the block
//! wrote (a `tessera forget` that removed some sends the block back to full scoring). Pairs of
//! two unchanged records keep their published rows; every pair with a new or changed record
//! is scored with the kept model. With the model fixed, that is the same set of scored pairs
//! a run over all records would give.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, BooleanArray, Int64Array, RecordBatch, StringArray};
use arrow::compute::{cast, filter_record_batch};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow::util::display::{ArrayFormatter, FormatOptions};
use datafusion::logical_expr::{col, lit};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::config::ProbabilisticConfig;
use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::tables;

/// Term frequencies of one comparison column, as trained: each value's share among the
/// records holding a value, keyed by a digest of the value.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Frequencies {
    /// Records holding a value when the model was trained; a value never seen then counts as
    /// seen once among them.
    pub values: u64,
    /// (value digest, share), sorted by digest.
    pub shares: Vec<(u64, f64)>,
}

impl Frequencies {
    /// The share of `value`, or that of a value seen once.
    pub fn share(&self, value: &str) -> f64 {
        let h = value_hash(value);
        match self.shares.binary_search_by_key(&h, |(k, _)| *k) {
            Ok(i) => self.shares[i].1,
            Err(_) => 1.0 / self.values.max(1) as f64,
        }
    }
}

/// A trained model: enough to score a new pair as the training run scored its pairs.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Frozen {
    /// m per comparison and level.
    pub m: Vec<Vec<f64>>,
    /// u per comparison and level.
    pub u: Vec<Vec<f64>>,
    /// The share of candidate pairs that match.
    pub prior: f64,
    /// EM iterations the training took.
    pub iterations: u32,
    /// Random pairs u was estimated from.
    pub u_pairs: u64,
    /// Candidate pairs the model was trained on.
    pub candidate_pairs: u64,
    /// Per comparison: its term frequencies, when it adjusts by them.
    pub frequencies: Vec<Option<Frequencies>>,
}

/// One block's state as the last published run left it.
pub struct Kept {
    /// [`fingerprint`] of the block when the model was trained.
    pub fingerprint: String,
    /// Records the model was trained on.
    pub trained_records: u64,
    /// `match_scores` rows the block published.
    pub score_rows: u64,
    /// The model.
    pub model: Frozen,
    /// Record key → record digest.
    pub records: HashMap<String, String>,
}

/// One block's state to publish with this run.
pub struct Keep {
    /// The block's name.
    pub block: String,
    /// See [`Kept`].
    pub fingerprint: String,
    /// See [`Kept`].
    pub trained_records: u64,
    /// See [`Kept`].
    pub score_rows: u64,
    /// See [`Kept`].
    pub model: Frozen,
    /// (record key, record digest), one per record.
    pub records: Vec<(String, String)>,
}

/// The block's configuration and Tessera's version, as a digest: a model trained under
/// another one is not reused. `retrain_after_growth` says when to train, not how, so it is
/// left out.
pub fn fingerprint(block: &ProbabilisticConfig) -> String {
    let mut block = block.clone();
    block.retrain_after_growth = 0.0;
    let text = serde_json::to_string(&block).unwrap_or_else(|e| e.to_string());
    crate::digest::sha256_hex(&format!("{}\u{0}{text}", env!("CARGO_PKG_VERSION")))
}

/// A digest of a compared value, for term frequencies.
pub fn value_hash(value: &str) -> u64 {
    let d = Sha256::digest(value.as_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&d[..8]);
    u64::from_le_bytes(first)
}

fn hex16(bytes: &[u8]) -> String {
    bytes[..16]
        .iter()
        .fold(String::with_capacity(32), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

/// Each record's key (a digest of its id); `None` when an id is missing or repeats, since
/// records then cannot be told apart from one run to the next.
pub fn record_keys(ids: &StringArray) -> Option<Vec<String>> {
    let mut seen = std::collections::HashSet::with_capacity(ids.len());
    let mut keys = Vec::with_capacity(ids.len());
    for i in 0..ids.len() {
        if !ids.is_valid(i) || !seen.insert(ids.value(i)) {
            return None;
        }
        keys.push(hex16(&Sha256::digest(ids.value(i).as_bytes())));
    }
    Some(keys)
}

/// Each record's digest over every column, so a record whose any value changed is new.
pub fn record_digests(batch: &RecordBatch) -> Result<Vec<String>> {
    let options = FormatOptions::default().with_null("\u{1}");
    let formatters: Vec<ArrayFormatter> = batch
        .columns()
        .iter()
        .map(|c| ArrayFormatter::try_new(c.as_ref(), &options))
        .collect::<std::result::Result<_, _>>()?;
    let mut text = String::new();
    Ok((0..batch.num_rows())
        .map(|i| {
            let mut hasher = Sha256::new();
            for f in &formatters {
                text.clear();
                let _ = write!(text, "{}", f.value(i));
                hasher.update(text.as_bytes());
                hasher.update([0u8]);
            }
            hex16(&hasher.finalize())
        })
        .collect())
}

fn texts(batch: &RecordBatch, name: &str) -> Result<StringArray> {
    let column = batch
        .column_by_name(name)
        .ok_or_else(|| Error::Internal(format!("a match state table has no column {name}")))?;
    let as_text = cast(column, &DataType::Utf8)?;
    as_text
        .as_any()
        .downcast_ref::<StringArray>()
        .cloned()
        .ok_or_else(|| Error::Internal(format!("match state column {name} is not text")))
}

fn numbers(batch: &RecordBatch, name: &str) -> Result<Int64Array> {
    let column = batch
        .column_by_name(name)
        .ok_or_else(|| Error::Internal(format!("a match state table has no column {name}")))?;
    let as_number = cast(column, &DataType::Int64)?;
    as_number
        .as_any()
        .downcast_ref::<Int64Array>()
        .cloned()
        .ok_or_else(|| Error::Internal(format!("match state column {name} is not a number")))
}

/// Every block's state from the published `_state` tables; empty before any was published.
pub async fn load(engine: &Engine) -> Result<HashMap<String, Kept>> {
    let mut kept: HashMap<String, Kept> = HashMap::new();
    let Some(models) = engine
        .outputs
        .read(&engine.ctx, tables::state::MATCH_MODEL)
        .await?
    else {
        return Ok(kept);
    };
    for batch in models.collect().await? {
        let (block, fp, model) = (
            texts(&batch, "block")?,
            texts(&batch, "fingerprint")?,
            texts(&batch, "model")?,
        );
        let (trained, rows) = (
            numbers(&batch, "trained_records")?,
            numbers(&batch, "score_rows")?,
        );
        for i in 0..batch.num_rows() {
            // A model that no longer reads (written by another version) is trained again.
            let Ok(frozen) = serde_json::from_str::<Frozen>(model.value(i)) else {
                continue;
            };
            kept.insert(
                block.value(i).to_string(),
                Kept {
                    fingerprint: fp.value(i).to_string(),
                    trained_records: trained.value(i).max(0) as u64,
                    score_rows: rows.value(i).max(0) as u64,
                    model: frozen,
                    records: HashMap::new(),
                },
            );
        }
    }
    let Some(records) = engine
        .outputs
        .read(&engine.ctx, tables::state::MATCH_RECORDS)
        .await?
    else {
        // Records missing: nothing can be told new, so every block trains again.
        return Ok(HashMap::new());
    };
    let mut stream = records.execute_stream().await?;
    while let Some(batch) = stream.next().await {
        let batch = batch?;
        let (block, key, digest) = (
            texts(&batch, "block")?,
            texts(&batch, "record_key")?,
            texts(&batch, "digest")?,
        );
        for i in 0..batch.num_rows() {
            if let Some(k) = kept.get_mut(block.value(i)) {
                k.records
                    .insert(key.value(i).to_string(), digest.value(i).to_string());
            }
        }
    }
    Ok(kept)
}

/// `_state/match_model` and `_state/match_records` for this run's blocks.
pub fn batches(keeps: &[Keep]) -> Result<(RecordBatch, RecordBatch)> {
    let mut models = Vec::with_capacity(keeps.len());
    for k in keeps {
        models.push(
            serde_json::to_string(&k.model)
                .map_err(|e| Error::Internal(format!("match model of {}: {e}", k.block)))?,
        );
    }
    let model = RecordBatch::try_new(
        Arc::new(Schema::new(vec![
            Field::new("block", DataType::Utf8, false),
            Field::new("fingerprint", DataType::Utf8, false),
            Field::new("trained_records", DataType::Int64, false),
            Field::new("score_rows", DataType::Int64, false),
            Field::new("model", DataType::Utf8, false),
        ])),
        vec![
            Arc::new(StringArray::from_iter_values(
                keeps.iter().map(|k| k.block.as_str()),
            )),
            Arc::new(StringArray::from_iter_values(
                keeps.iter().map(|k| k.fingerprint.as_str()),
            )),
            Arc::new(Int64Array::from_iter_values(
                keeps.iter().map(|k| k.trained_records as i64),
            )),
            Arc::new(Int64Array::from_iter_values(
                keeps.iter().map(|k| k.score_rows as i64),
            )),
            Arc::new(StringArray::from(models)),
        ],
    )?;
    let rows = keeps.iter().flat_map(|k| {
        k.records
            .iter()
            .map(move |(key, digest)| (k.block.as_str(), key.as_str(), digest.as_str()))
    });
    let (mut block, mut key, mut digest) = (Vec::new(), Vec::new(), Vec::new());
    for (b, k, d) in rows {
        block.push(b);
        key.push(k);
        digest.push(d);
    }
    let records = RecordBatch::try_new(
        Arc::new(Schema::new(vec![
            Field::new("block", DataType::Utf8, false),
            Field::new("record_key", DataType::Utf8, false),
            Field::new("digest", DataType::Utf8, false),
        ])),
        vec![
            Arc::new(StringArray::from(block)),
            Arc::new(StringArray::from(key)),
            Arc::new(StringArray::from(digest)),
        ],
    )?;
    Ok((model, records))
}

/// The block's published `match_scores` rows whose two records are both unchanged, laid out
/// as `schema`, with each row's (left, right) record numbers in this run. `None` when the
/// published table does not hold the rows the block wrote (then the block scores in full).
pub async fn kept_scores(
    engine: &Engine,
    block: &str,
    expected_rows: u64,
    unchanged: &HashMap<&str, u32>,
    schema: &SchemaRef,
) -> Result<Option<(RecordBatch, Vec<(u32, u32)>)>> {
    let Some(df) = engine
        .outputs
        .read(&engine.ctx, tables::MATCH_SCORES)
        .await?
    else {
        return Ok(None);
    };
    let batches = df.filter(col("block").eq(lit(block)))?.collect().await?;
    let published: usize = batches.iter().map(|b| b.num_rows()).sum();
    if published as u64 != expected_rows {
        tracing::info!(
            block,
            published,
            expected_rows,
            "probabilistic: published match_scores differ from the kept state; scoring every pair"
        );
        return Ok(None);
    }
    let mut kept = Vec::new();
    let mut pairs = Vec::new();
    for batch in batches {
        let (left, right) = (
            texts(&batch, "left_record")?,
            texts(&batch, "right_record")?,
        );
        let mut keep = Vec::with_capacity(batch.num_rows());
        for i in 0..batch.num_rows() {
            let found = (left.is_valid(i) && right.is_valid(i))
                .then(|| {
                    Some((
                        *unchanged.get(left.value(i))?,
                        *unchanged.get(right.value(i))?,
                    ))
                })
                .flatten();
            if let Some(pair) = found {
                pairs.push(pair);
            }
            keep.push(found.is_some());
        }
        let batch = filter_record_batch(&batch, &BooleanArray::from(keep))?;
        let columns: Vec<ArrayRef> = schema
            .fields()
            .iter()
            .map(|f| match batch.column_by_name(f.name()) {
                Some(c) => Ok(cast(c, f.data_type())?),
                None => Ok(arrow::array::new_null_array(
                    f.data_type(),
                    batch.num_rows(),
                )),
            })
            .collect::<Result<_>>()?;
        kept.push(RecordBatch::try_new(schema.clone(), columns)?);
    }
    let batch = arrow::compute::concat_batches(schema, &kept)?;
    Ok(Some((batch, pairs)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_keys_refuse_missing_and_repeated_ids() {
        let ids = StringArray::from(vec![Some("a"), Some("b")]);
        let keys = record_keys(&ids).expect("unique ids have keys");
        assert_eq!(keys.len(), 2);
        assert_ne!(keys[0], keys[1]);
        assert!(record_keys(&StringArray::from(vec![Some("a"), Some("a")])).is_none());
        assert!(record_keys(&StringArray::from(vec![Some("a"), None])).is_none());
    }

    #[test]
    fn a_record_whose_any_value_changes_gets_another_digest() {
        let batch = |surname: Option<&str>| {
            RecordBatch::try_new(
                Arc::new(Schema::new(vec![
                    Field::new("id", DataType::Utf8, false),
                    Field::new("surname", DataType::Utf8, true),
                ])),
                vec![
                    Arc::new(StringArray::from(vec!["r1"])) as ArrayRef,
                    Arc::new(StringArray::from(vec![surname])),
                ],
            )
            .expect("batch")
        };
        let same = record_digests(&batch(Some("smith"))).expect("digest");
        assert_eq!(same, record_digests(&batch(Some("smith"))).expect("digest"));
        assert_ne!(same, record_digests(&batch(Some("smyth"))).expect("digest"));
        assert_ne!(same, record_digests(&batch(None)).expect("digest"));
        assert_ne!(
            record_digests(&batch(Some(""))).expect("digest"),
            record_digests(&batch(None)).expect("digest"),
            "an empty value is not a missing one"
        );
    }

    #[test]
    fn an_unseen_value_counts_as_seen_once() {
        let f = Frequencies {
            values: 4,
            shares: {
                let mut s = vec![(value_hash("smith"), 0.75), (value_hash("jones"), 0.25)];
                s.sort_by_key(|(k, _)| *k);
                s
            },
        };
        assert_eq!(f.share("smith"), 0.75);
        assert_eq!(f.share("jones"), 0.25);
        assert_eq!(f.share("okafor"), 0.25);
    }
}
